"""Measurement helpers shared by the scripts in ``benchmarks/`` (nothing in the library imports this package).

One concept per module: :mod:`~codiemb_st.benchmarking.timing` (CPU / wall clocks, interleaved rounds, medians and
ratios against a baseline measured in the same run), :mod:`~codiemb_st.benchmarking.memory` (peak resident set,
CUDA peak, activations saved for backward), :mod:`~codiemb_st.benchmarking.workers` (one measurement in a fresh
process that answers JSON), :mod:`~codiemb_st.benchmarking.tables` (markdown rows, ratio cells, target verdicts) and
:mod:`~codiemb_st.benchmarking.baselines` (reference implementations the benchmarks compare against). None of them
imports torch at import time, so a parent process that measures its children's memory stays small.
"""
