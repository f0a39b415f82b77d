"""Clocks and interleaved repeats: the contenders alternate round by round so they see the same load.

Example:
    ::

        from measurement.timing import interleaved_medians

        medians = interleaved_medians({"baseline": (step_a, 1), "ours": (step_b, 1)}, rounds=5)
        print(f"{medians['ours'] / medians['baseline']:.2f}x")
"""

from __future__ import annotations

import resource
import statistics
import time
from collections.abc import Callable, Mapping, Sequence


def cpu_seconds() -> float:
    """User + system CPU seconds of this process so far (with one torch thread: the work of this process alone)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def timed(step: Callable[[], object], device: str = "cpu") -> float:
    """Wall seconds of one call of ``step``, synchronising CUDA first when ``device`` is a CUDA device."""
    start = time.perf_counter()
    step()
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()
    return time.perf_counter() - start


def interleaved_rounds(
    steps: Mapping[str, Callable[[], object]], rounds: int, device: str = "cpu"
) -> dict[str, dict[str, list[float]]]:
    """Wall and CPU seconds of every step, the steps alternating round by round (no warm-up: do it before).

    Returns:
        ``{"times": {name: [wall seconds per round]}, "cpu_times": {name: [CPU seconds per round]}}``.
    """
    times: dict[str, list[float]] = {name: [] for name in steps}
    cpu_times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            cpu_start = time.process_time()
            times[name].append(timed(step, device))
            cpu_times[name].append(time.process_time() - cpu_start)
    return {"times": times, "cpu_times": cpu_times}


def interleaved_medians(
    steps: Mapping[str, tuple[Callable[[], object], int]], rounds: int, device: str = "cpu"
) -> dict[str, float]:
    """Median wall seconds per call of each ``name: (step, runs_per_round)``, alternating the steps round by round.

    Each step runs once as a warm-up first; then every round runs each step ``runs_per_round`` times.
    """
    times: dict[str, list[float]] = {name: [] for name in steps}
    for step, _ in steps.values():
        timed(step, device)
    for _ in range(rounds):
        for name, (step, runs) in steps.items():
            times[name].extend(timed(step, device) for _ in range(runs))
    return {name: statistics.median(values) for name, values in times.items()}


def round_ratios(values: Sequence[float], baseline: Sequence[float]) -> list[float]:
    """Per-round ratios ``values[i] / baseline[i]`` of two interleaved series of the same length.

    Raises:
        ValueError: if the series differ in length or are empty.
    """
    if len(values) != len(baseline) or not values:
        raise ValueError(
            f"values and baseline must be non-empty series of one length (got {len(values)} and {len(baseline)})"
        )
    return [value / base for value, base in zip(values, baseline)]


def ratio_summary(values: Sequence[float], baseline: Sequence[float]) -> tuple[float, float, float]:
    """``(median, min, max)`` over rounds of ``values / baseline`` measured in the same round."""
    ratios = round_ratios(values, baseline)
    return statistics.median(ratios), min(ratios), max(ratios)


class MethodClock:
    """Replaces ``owner.<name>`` by a wrapper that accumulates the wall time spent inside it in ``seconds``.

    Example:
        >>> class Model:
        ...     def encode(self, texts):
        ...         return len(texts)
        >>> model = Model()
        >>> clock = MethodClock(model, "encode")
        >>> model.encode(["a", "b"]), clock.seconds >= 0.0
        (2, True)
    """

    def __init__(self, owner: object, name: str) -> None:
        self.seconds = 0.0
        self._method = getattr(owner, name)
        setattr(owner, name, self)

    def __call__(self, *args: object, **kwargs: object) -> object:
        start = time.perf_counter()
        try:
            return self._method(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - start
