"""Peak-memory readers: the resident set of this process (Linux) or CUDA's allocator, and saved activations.

Example:
    ::

        from measurement.memory import peak_since, reset_peak

        baseline = reset_peak("cpu")
        step()
        print(peak_since(baseline, "cpu") / 2**20, "MiB")
"""

from __future__ import annotations

import os
import resource
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any


def read_status_kib(field: str, status: str | None = None) -> int:
    """A ``kB`` field (``VmRSS``, ``VmHWM``, ...) of ``/proc/self/status``, or of the given ``status`` text.

    Raises:
        RuntimeError: if the field is missing.
    """
    text = Path("/proc/self/status").read_text() if status is None else status
    for line in text.splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not found in /proc/self/status")


def peak_rss_mb() -> float:
    """Peak resident set of this process in MiB (``ru_maxrss``, KiB on Linux; a fork starts at its parent's)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mb() -> float:
    """Current resident set of this process in MiB (``/proc/self/statm``)."""
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def reset_peak(device: str) -> int:
    """Reset the peak-memory counter and return the current usage in bytes (the baseline of a measurement).

    CUDA: the allocator's peak statistics. CPU: the resident-set high-water mark (``/proc/self/clear_refs``).
    """
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    Path("/proc/self/clear_refs").write_text("5")
    return read_status_kib("VmRSS") * 1024


def peak_since(baseline: int, device: str) -> int:
    """Bytes of peak usage above ``baseline`` (from :func:`reset_peak`) since the reset."""
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - baseline
    return read_status_kib("VmHWM") * 1024 - baseline


def saved_activations_bytes(step: Callable[[], Any], exclude: Iterable[Any] = ()) -> int:
    """Bytes of the unique storages autograd saves for backward while ``step()`` runs (deterministic, unlike the
    resident-set peak); storages of the ``exclude`` tensors (e.g. the parameters) are left out."""
    import torch

    excluded = {tensor.untyped_storage().data_ptr() for tensor in exclude}
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in excluded:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        step()
    return sum(storages.values())
