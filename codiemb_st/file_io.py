"""Reading and writing the project's files: JSON Lines (plain or gzip) and atomic writes.

One reader for every JSONL file the package opens (training records, local evaluation tasks), so that every
malformed line is reported the same way, as ``path:line``; and one atomic writer, so that an interrupted run never
leaves a half-written result file behind.
"""

from __future__ import annotations

import gzip
import json
import math
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

_GZIP_MAGIC = b"\x1f\x8b"


def current_umask() -> int:
    """The process's umask (the permission bits new files and folders lose)."""
    # os.umask can only be read by setting it; restore it at once.
    mask = os.umask(0)
    os.umask(mask)
    return mask


def read_jsonl(path: str | os.PathLike) -> Iterator[tuple[str, Any]]:
    """Yield ``(location, value)`` for every non-blank line of a JSON Lines file.

    A ``.gz`` file is read as gzip. ``location`` is ``"path:line"`` (1-based), for error messages.

    Args:
        path: A ``.jsonl`` file, or a gzip-compressed ``.jsonl.gz`` file.

    Raises:
        FileNotFoundError: If the file does not exist.
        ValueError: If a ``.gz`` file is not gzip, the file is not UTF-8, or a line is not valid JSON (the message
            names ``path:line``).

    Example:
        ::

            for location, record in read_jsonl("train/en_stsb.jsonl.gz"):
                print(location, record["score"])
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"File not found: {path}")
    compressed = path.suffix == ".gz"
    if compressed:
        with open(path, "rb") as raw:
            if raw.read(2) != _GZIP_MAGIC:
                raise ValueError(
                    f"{path}: the file name ends in .gz but the file is not gzip-compressed. If it holds plain "
                    f"JSON Lines, drop the .gz suffix (rename it to {path.with_suffix('').name}), or compress it: "
                    f"mv {path} {path.with_suffix('')} && gzip {path.with_suffix('')}."
                )
    opener = gzip.open if compressed else open
    line_number = 0
    try:
        # Bytes, decoded line by line, so an encoding error names its exact line.
        with opener(path, "rb") as handle:
            for line_number, raw in enumerate(handle, start=1):
                location = f"{path}:{line_number}"
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as error:
                    raise ValueError(
                        f"{location}: the file is not UTF-8 text ({error.reason}); save it as UTF-8."
                    ) from None
                if not line.strip():
                    continue
                try:
                    value = json.loads(line)
                except json.JSONDecodeError as error:
                    raise ValueError(f"{location}: invalid JSON ({error.msg} at column {error.colno}).") from None
                yield location, value
    except (EOFError, gzip.BadGzipFile) as error:
        raise ValueError(f"{path}: corrupt or truncated gzip data after line {line_number} ({error}).") from None


def write_atomic(path: str | os.PathLike, write: Callable[[Path], Any]) -> Path:
    """Write a file through a temporary file in the same folder, then rename it into place.

    Readers never see a half-written file, and an interrupted write leaves the previous content (or nothing): on an
    error (a full disk, say) the temporary file and any parent folders created for it are removed. A process killed
    mid-write (``kill -9``) leaves its hidden ``.NAME.PID.*.tmp`` file; the next write of the same file removes it.

    Args:
        path: The file to write; its parent folders are created.
        write: Called with the temporary path; it must write the whole file there.

    Returns:
        ``path`` as a ``Path``.
    """
    path = Path(path)
    created = [folder for folder in (path.parent, *path.parent.parents) if not folder.exists()]
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(path)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp")
    os.close(handle)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        for folder in created:  # deepest first; only folders this call made, and only while empty
            try:
                folder.rmdir()
            except OSError:
                break
        raise
    return path


def _remove_stale_temporaries(path: Path) -> None:
    """Remove the temporary files of earlier writes of ``path`` whose process no longer runs (killed mid-write)."""
    import glob

    for stale in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        pid = stale.name[len(path.name) + 2 :].split(".", 1)[0]
        if pid.isdigit() and not _process_alive(int(pid)):
            stale.unlink(missing_ok=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


@contextmanager
def file_lock(path: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive advisory lock on ``path`` (created if missing) while the block runs.

    Processes that take the same lock run the block one at a time (POSIX ``flock``; where it is missing, the block
    runs unlocked). The lock file stays behind, empty; it is released when the process ends, even by ``kill -9``.

    Example:
        ::

            with file_lock(folder / ".STSBenchmark.lock"):
                write_json_atomic(folder / "STSBenchmark.json", result)
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """:func:`write_atomic` for a UTF-8 text file."""
    return write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def json_safe(value: Any) -> Any:
    """``value`` with every non-finite float replaced by ``None`` (JSON has no NaN or Infinity).

    A rank-deficient embedding matrix has an infinite condition number, for example; it is written as ``null``.
    """
    if isinstance(value, Mapping):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_json_atomic(path: str | os.PathLike, value: Any, *, indent: int | None = 1) -> Path:
    """Write ``value`` as JSON (non-finite floats as ``null``, non-ASCII kept) atomically."""
    text = json.dumps(json_safe(value), indent=indent, ensure_ascii=False, allow_nan=False, default=str)
    return write_text_atomic(path, text + "\n")


def write_jsonl(path: str | os.PathLike, rows: Iterable[Mapping[str, Any]]) -> Path:
    """Write one JSON object per line (non-ASCII kept), atomically."""
    text = "".join(json.dumps(dict(row), ensure_ascii=False) + "\n" for row in rows)
    return write_text_atomic(path, text)


def folder_fingerprint(folder: str | os.PathLike) -> str:
    """A short digest of a folder's files (relative paths, sizes, modification times).

    Cheap even for multi-GB weights (nothing is read): it changes whenever a file is rewritten, so a cached result
    is never reused for a model that was trained again into the same folder.
    """
    import hashlib

    folder = Path(folder)
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        stat = path.stat()
        digest.update(f"{path.relative_to(folder)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


__all__ = [
    "current_umask",
    "file_lock",
    "folder_fingerprint",
    "json_safe",
    "read_jsonl",
    "write_atomic",
    "write_json_atomic",
    "write_jsonl",
    "write_text_atomic",
]
