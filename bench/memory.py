"""Peak memory (docs/performance.md section 4.7): CPU -- peak-RSS delta in a fresh subprocess per case (the
child runs ``python -m <benchmark module> --_memcase <json>``); GPU -- incremental
``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import json
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import torch

from . import PACKAGE_PARENT


def _proc_status_bytes(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0), so one process can measure successive phases."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def _release_free_heap() -> None:
    """Return freed malloc memory to the OS: memory glibc keeps would hide later allocations from RSS."""
    gc.collect()
    libc_name = ctypes.util.find_library("c")
    if libc_name:
        libc = ctypes.CDLL(libc_name)
        if hasattr(libc, "malloc_trim"):
            libc.malloc_trim(0)


def cpu_peak_supported() -> str | None:
    """None when peak RSS can be measured per phase, else the reason."""
    if _proc_status_bytes("VmHWM") is None:
        return "no /proc/self/status (Linux only)"
    if not _reset_peak_rss():
        return "/proc/self/clear_refs is not writable"
    return None


def peak_memory(fn: Callable[[], Any], device: torch.device) -> tuple[Any, int, int]:
    """Run ``fn`` once; return (its result, incremental peak bytes, absolute peak bytes).

    GPU: ``max_memory_allocated`` after emptying the cache and resetting the statistics, minus what was
    allocated before (inputs, and for a backward its retained graph). CPU: VmHWM minus VmRSS before the
    call, after handing freed heap back to the OS; only meaningful in a fresh process
    (:func:`run_memory_subprocess`) since allocator and library state left by other cases would blur it. The
    result is kept alive until the peak is read, so outputs count, as they do on GPU.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        result = fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        return result, peak - base, peak
    _release_free_heap()
    base = _proc_status_bytes("VmRSS")
    if base is None or not _reset_peak_rss():
        raise RuntimeError(f"peak RSS is not measurable here: {cpu_peak_supported()}")
    result = fn()
    peak = _proc_status_bytes("VmHWM") or 0
    return result, peak - base, peak


MEMCASE_MARKER = "REASONRL_MEMCASE_RESULT "


def run_memory_subprocess(module: str, payload: dict[str, Any], timeout_s: float = 900) -> dict[str, Any]:
    """Run ``python -m <module> --_memcase <json>`` in a fresh process and return its JSON answer.

    The child prints one line ``MEMCASE_MARKER + json`` (:func:`emit_memcase_result`); anything else it
    prints (library warnings) is ignored. Failures come back as ``{"error": ...}``.
    """
    cmd = [sys.executable, "-m", module, "--_memcase", json.dumps(payload)]
    # ``bench.<name>`` resolves from the checkout that holds it; ``reasonrl.bench.<name>`` from wherever
    # reasonrl is installed, so the child keeps the parent's working directory.
    cwd = PACKAGE_PARENT if module.startswith("bench.") else None
    try:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"error": f"memory subprocess timed out after {timeout_s:.0f} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(MEMCASE_MARKER):
            return json.loads(line[len(MEMCASE_MARKER):])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return {"error": f"memory subprocess exited with {proc.returncode}: {' | '.join(tail)}"}


def emit_memcase_result(result: dict[str, Any]) -> None:
    print(MEMCASE_MARKER + json.dumps(result), flush=True)
