"""Ceilings (docs/performance.md section 4.6) and the floor of the counting rules of section 1: read and copy
bandwidth (CPU and GPU), bf16 8192^3 matmul (GPU), and the op's own GEMM for the hidden-state benchmarks.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import torch

from .inputs import GIB, LinearSpec
from .timing import Timing, time_cpu, time_fn, time_gpu


def measure_ceilings(device: torch.device) -> dict[str, Any]:
    """Read and copy bandwidth of a large buffer (and bf16 matmul throughput on GPU), in this process.

    GPU: ``clone`` of a 4 GiB buffer, counting read + write, as section 4.6 says. CPU: a 1 GiB buffer
    (32x a 32 MiB L3) copied into a preallocated, already-touched destination, so the figure is memory
    bandwidth and not page-fault cost; "read" is ``x.sum()``, one streaming read (the CPU forward floor of
    section 3).
    """
    nbytes = 4 * GIB if device.type == "cuda" else GIB
    copy, read = _bandwidth_timings(nbytes, device)
    ceilings: dict[str, Any] = {
        "buffer_bytes": nbytes,
        "copy_gbps": 2 * nbytes / copy.median_ms / 1e6,
        "read_gbps": nbytes / read.median_ms / 1e6,
        "copy_ms": asdict(copy),
        "read_ms": asdict(read),
    }
    if device.type == "cuda":
        m = 8192
        mm = _matmul_timing(m, device)
        ceilings["matmul_tflops"] = 2 * m**3 / mm.median_ms / 1e9
        ceilings["matmul_ms"] = asdict(mm)
        torch.cuda.empty_cache()
    return ceilings


def _bandwidth_timings(nbytes: int, device: torch.device) -> tuple[Timing, Timing]:
    """(copy, read) timings of one ``nbytes`` buffer; a single buffer (no rotation) at 32x the cache."""
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    if device.type == "cuda":
        copy = time_gpu(lambda _k: src.clone(), 1)
    else:
        dst = torch.zeros_like(src)
        copy = time_cpu(lambda _k: dst.copy_(src), 1)
    return copy, time_fn(lambda _k: src.sum(), 1, device)


def _matmul_timing(m: int, device: torch.device) -> Timing:
    a = torch.randn(m, m, device=device, dtype=torch.bfloat16)
    b = torch.randn(m, m, device=device, dtype=torch.bfloat16)
    return time_gpu(lambda _k: a @ b, 1)


def floor_ms(read_bytes: int, write_bytes: int, ceilings: dict[str, Any], device: torch.device) -> float:
    """Time of the counted traffic at the measured ceilings.

    GPU: all bytes at copy bandwidth (the targets of section 3 are "% of copy bandwidth"). CPU: writes are
    paired with as many reads and priced as a copy, the remaining reads at the streaming-read bandwidth.
    """
    if device.type == "cuda":
        return (read_bytes + write_bytes) / ceilings["copy_gbps"] / 1e6
    paired = min(read_bytes, write_bytes)
    return (2 * paired / ceilings["copy_gbps"] + (read_bytes - paired) / ceilings["read_gbps"]) / 1e6


def gemm_ceiling(spec: LinearSpec, device: torch.device) -> dict[str, Any]:
    """GFLOP/s of ``at::mm`` at [1024, H] x [H, V] (fp32, the op's chunk GEMM) into a preallocated output."""
    rows = min(1024, spec.n)
    a = torch.randn(rows, spec.h, device=device)
    w = torch.randn(spec.v, spec.h, device=device)
    out = torch.empty(rows, spec.v, device=device)
    t = time_fn(lambda _k: torch.mm(a, w.T, out=out), 1, device)
    return {"gemm_gflops": 2 * rows * spec.h * spec.v / t.median_ms / 1e6,
            "gemm_shape": [rows, spec.h, spec.v], "gemm_ms": asdict(t)}
