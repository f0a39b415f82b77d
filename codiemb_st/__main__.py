"""``python -m codiemb_st`` = the ``codiemb-st`` command line (also under ``torchrun -m codiemb_st train``)."""

from __future__ import annotations

import sys

from codiemb_st.cli import main

if __name__ == "__main__":
    sys.exit(main())
