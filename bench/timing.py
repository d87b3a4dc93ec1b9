"""Timing (docs/performance.md section 4.5): CPU -- ``time.perf_counter`` around each call, 3 warm-ups, >= 10
repeats or >= 1 s (then at least 3; the same 1 s rule caps the warm-up of multi-second calls), median / p20 /
p80; GPU -- ``triton.testing.do_bench`` with quantiles (0.5, 0.2, 0.8), imported only when used.
"""

from __future__ import annotations

import gc
import itertools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

QUANTILES = (0.5, 0.2, 0.8)  # median, p20, p80 (the order triton.testing.do_bench returns them in)


@dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    repeats: int | None  # None on GPU: do_bench picks the count from `rep_ms`
    warmups: int | None  # CPU: including the calls counted from before (time_cpu's prior_calls)
    method: str
    rep_ms: float | None = None


def _quantiles_ms(times_s: list[float]) -> tuple[float, float, float]:
    t = torch.tensor(times_s, dtype=torch.float64) * 1e3
    med, p20, p80 = (float(torch.quantile(t, q)) for q in QUANTILES)
    return med, p20, p80


def time_cpu(
    fn: Callable[[int], object],
    n_sets: int,
    *,
    warmup: int = 3,
    min_repeats: int = 10,
    min_time_s: float = 1.0,
    min_slow_repeats: int = 3,
    prior_calls: int = 0,
    prior_s: float = 0.0,
) -> Timing:
    """CPU protocol: ``fn(k)`` runs on input set ``k``; 3 warm-ups, then timed calls until 10 repeats or 1 s.

    The 1 s rule keeps slow providers (the eager reference takes seconds per call at the acceptance shape)
    affordable: timing stops after ``min_time_s`` if at least ``min_slow_repeats`` calls ran, so that
    p20/p80 mean something, and the same rule ends the warm-up once it has lasted ``min_time_s``.
    ``prior_calls`` / ``prior_s``: calls of the same work this process already made (the correctness gate's),
    which count as warm-ups. Results are dropped inside the timed region, so freeing outputs (and autograd
    graphs) is part of every provider's time. The cyclic garbage collector is paused while timing, as
    ``timeit`` does.
    """
    calls = itertools.count()
    warmups, warm_s = prior_calls, prior_s
    while warmups < warmup and (warmups == 0 or warm_s < min_time_s):
        t0 = time.perf_counter()
        fn(next(calls) % n_sets)
        warm_s += time.perf_counter() - t0
        warmups += 1
    gc.collect()
    gc_was_enabled = gc.isenabled()
    gc.disable()
    times: list[float] = []
    try:
        while True:
            k = next(calls) % n_sets
            t0 = time.perf_counter()
            fn(k)
            times.append(time.perf_counter() - t0)
            if len(times) >= min_repeats or (sum(times) >= min_time_s and len(times) >= min_slow_repeats):
                break
    finally:
        if gc_was_enabled:
            gc.enable()
    med, p20, p80 = _quantiles_ms(times)
    return Timing(med, p20, p80, len(times), warmups, f"perf_counter, {torch.get_num_threads()} threads")


def time_gpu(
    fn: Callable[[int], object], n_sets: int, *, grad_to_none: Sequence[torch.Tensor] | None = None
) -> Timing:
    """GPU protocol: ``triton.testing.do_bench`` (flushes L2 between calls) with ``rep`` for >= 10 calls."""
    import triton.testing  # lazy: CPU runs never import triton

    calls = itertools.count()

    def call() -> None:
        fn(next(calls) % n_sets)

    call()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(3):
        call()
    end.record()
    torch.cuda.synchronize()
    estimate_ms = max(start.elapsed_time(end) / 3, 1e-3)
    rep_ms = max(100.0, 15 * estimate_ms)  # do_bench runs rep / estimate calls: >= 15 here, >= 10 asked
    med, p20, p80 = triton.testing.do_bench(
        call, warmup=25, rep=rep_ms, grad_to_none=list(grad_to_none or []), quantiles=list(QUANTILES))
    return Timing(med, p20, p80, None, None, "triton.testing.do_bench", rep_ms)


def time_fn(fn: Callable[[int], object], n_sets: int, device: torch.device, *,
            grad_to_none: Sequence[torch.Tensor] | None = None, prior_calls: int = 0,
            prior_s: float = 0.0) -> Timing:
    """:func:`time_gpu` on CUDA (do_bench warms up by itself), else :func:`time_cpu`."""
    if device.type == "cuda":
        return time_gpu(fn, n_sets, grad_to_none=grad_to_none)
    return time_cpu(fn, n_sets, prior_calls=prior_calls, prior_s=prior_s)
