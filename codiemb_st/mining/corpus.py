"""Reading corpus files for mining: one text a line (``.txt``/``.txt.gz``) or a table with a ``text`` column."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from codiemb_st.file_io import read_jsonl


def read_corpus(source: str | os.PathLike | Iterable[str]) -> list[str]:
    """Extra corpus texts: a ``.txt`` (or ``.txt.gz``) file (one text a line), a table with a ``text`` column
    (JSONL/JSON/CSV/Parquet; a non-empty ``title`` is put in front as ``"title text"``, as the BEIR layout keeps
    documents), or strings.

    Args:
        source: A corpus file, or an iterable of strings (blank ones are dropped).

    Returns:
        The texts, in file order (one Python string each: the miner keeps no second copy).

    Raises:
        ValueError: On a row without a ``text`` string (naming ``path:line``) or an empty corpus.
        TypeError: On a non-string text in an iterable.
        FileNotFoundError: If the file does not exist.

    Example:
        ::

            from codiemb_st.mining import read_corpus

            passages = read_corpus("corpus.jsonl")  # BEIR layout: "title text"
    """
    if not isinstance(source, (str, os.PathLike)):
        texts = list(source)
        for index, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"corpus text {index} must be a string; got {type(text).__name__}.")
        return [text for text in texts if text.strip()]
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"Corpus file not found: {path}")
    if path.name.endswith((".txt", ".txt.gz")):
        texts = _read_text_lines(path)
    else:
        from codiemb_st.record_formats import read_records  # here: datasets is slow to import

        rows = read_jsonl(path) if path.name.endswith((".jsonl", ".jsonl.gz")) else read_records(path)
        texts = []
        for location, row in rows:
            text = row.get("text") if isinstance(row, dict) else None
            if not isinstance(text, str):
                raise ValueError(f"{location}: a corpus row needs a `text` string; got fields {sorted(row)}.")
            title = row.get("title")
            texts.append(f"{title} {text}" if isinstance(title, str) and title.strip() else text)
    if not texts:
        raise ValueError(f"{path}: the corpus file has no texts.")
    return texts


def _read_text_lines(path: Path) -> list[str]:
    """The non-blank lines of a UTF-8 text file (gzip-compressed when named ``.gz``), errors naming ``path:line``."""
    import gzip

    with open(path, "rb") as raw:
        compressed = raw.read(2) == b"\x1f\x8b"
    if compressed and path.suffix != ".gz":
        raise ValueError(
            f"{path}: the corpus file is gzip-compressed but named {path.suffix}; rename it to {path.name}.gz "
            f"(read as gzip) or decompress it: gunzip -c {path} > {path.stem}.plain{path.suffix}."
        )
    texts = []
    with (gzip.open if compressed else open)(path, "rb") as handle:
        for number, line in enumerate(handle, start=1):
            try:
                text = line.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as error:
                raise ValueError(f"{path}:{number}: the corpus file is not UTF-8 text ({error.reason}).") from None
            if text.strip():
                texts.append(text)
    return texts


__all__ = ["read_corpus"]
