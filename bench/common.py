"""Shared helpers of the benchmarks in ``bench/``: the protocol of performance.md section 4.

* Inputs (section 4.3): logits = random hidden states x a random weight, scaled so the mean per-row entropy
  at the benchmark temperature is ``target_entropy`` nats (1-3); labels *sampled* from softmax(x / tau);
  about 10% of rows ``ignore_index``; random upstream gradients (zero on ignored rows, as a masked loss
  gives). Several input sets rotate, enough that together they exceed twice the last-level cache.
* Timing (4.5): CPU -- ``time.perf_counter`` around each call, 3 warm-ups, >= 10 repeats or >= 1 s (then at
  least 3; the same 1 s rule caps the warm-up of multi-second calls), median / p20 / p80; GPU --
  ``triton.testing.do_bench`` with quantiles (0.5, 0.2, 0.8).
* Ceilings (4.6): read and copy bandwidth (CPU and GPU), bf16 8192^3 matmul (GPU).
* Memory (4.7): CPU -- peak-RSS delta in a fresh subprocess per case; GPU -- incremental
  ``torch.cuda.max_memory_allocated``.
* Accuracy bounds (ops.md section 8, from the tolerance table of ``reasonrl.testing``) for the correctness
  gate (4.4), and a looser documented bound for peers.
* Environment metadata, results JSON, Markdown and terminal tables, PNG plot (4.9).

Nothing here imports triton, matplotlib or rich at import time: GPU-only and output-only dependencies are
imported where they are used, so a CPU run needs only torch.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import importlib.metadata
import itertools
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from reasonrl import testing
from reasonrl.reference import token_logprobs_reference

SCHEMA_VERSION = 1
# The folder holding this package: the source checkout for ``python -m bench.<name>`` run from it, the
# installed ``reasonrl`` package for ``python -m reasonrl.bench.<name>`` / ``reasonrl bench``.
PACKAGE_PARENT = Path(__file__).resolve().parents[1]
# Results go where the user runs the benchmark unless --out-dir says otherwise (never into site-packages).
DEFAULT_OUT_DIR = Path(".")
QUANTILES = (0.5, 0.2, 0.8)  # median, p20, p80 (the order triton.testing.do_bench returns them in)
MIB = 1 << 20
GIB = 1 << 30

# Statuses of a result row. Only "ok" rows carry timings.
OK, INCORRECT, NOT_INSTALLED, UNSUPPORTED, OOM, ERROR = (
    "ok", "incorrect", "not installed", "unsupported", "oom", "error")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_SHORT = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


# ----------------------------------------------------------------------------------------------------------
# Environment
# ----------------------------------------------------------------------------------------------------------


def pick_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()


def device_slug(device: torch.device) -> str:
    """File-name form of the device: ``cpu-amd-epyc``, ``nvidia-h100-80gb-hbm3``."""
    name = device_name(device).lower()
    if device.type == "cpu":
        name = "cpu-" + name
    return re.sub(r"[^a-z0-9]+", "-", name).strip("-")


def git_info() -> dict[str, Any]:
    """SHA of HEAD and whether tracked or untracked (non-ignored) files differ from it (source checkouts only:
    an installed package has no commit of its own, and a git repository around site-packages is not it)."""
    if not (PACKAGE_PARENT / "setup.py").is_file():
        return {"sha": None, "dirty": None}

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=PACKAGE_PARENT, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    status = git("status", "--porcelain")
    return {"sha": git("rev-parse", "HEAD"), "dirty": None if status is None else bool(status)}


def package_versions(names: Sequence[str]) -> dict[str, str | None]:
    """Installed distribution versions (metadata only: nothing is imported, so triton stays unloaded)."""
    versions: dict[str, str | None] = {}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _nvidia_driver() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None


def environment(device: torch.device, peers: Sequence[str] = ()) -> dict[str, Any]:
    """Run metadata required by performance.md section 4.9."""
    env: dict[str, Any] = {
        "device_type": device.type,
        "device_name": device_name(device),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": package_versions(["torch", "triton", "reasonrl", *peers]),
        "git": git_info(),
    }
    try:
        from reasonrl._backend import load_extension

        ext = load_extension()
        # 'parallel' repeats the thread settings recorded above in a long free-text form.
        env["reasonrl_build"] = None if ext is None else {
            k: v for k, v in ext.build_info().items() if k != "parallel"}
    except ImportError:
        env["reasonrl_build"] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update({
            "compute_capability": f"{props.major}.{props.minor}",
            "sm_count": props.multi_processor_count,
            "gpu_memory_gib": round(props.total_memory / GIB, 2),
            "l2_cache_bytes": getattr(props, "L2_cache_size", None),
            "cuda_version": torch.version.cuda,
            "driver_version": _nvidia_driver(),
        })
    return env


def last_level_cache_bytes(device: torch.device) -> int:
    """L2 of the GPU, or the largest CPU cache level (what rotating inputs must overflow, section 4.3)."""
    if device.type == "cuda":
        return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 * MIB))
    sizes = []
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            text = (index / "size").read_text().strip()
        except OSError:
            continue
        unit = {"K": 1 << 10, "M": MIB, "G": GIB}.get(text[-1:], 1)
        sizes.append(int(text.rstrip("KMG")) * unit)
    return max(sizes, default=32 * MIB)


def n_rotating_sets(bytes_per_set: int, device: torch.device, cap: int = 64) -> int:
    """At least two sets, and enough that together they exceed twice the last-level cache."""
    need = math.ceil(2 * last_level_cache_bytes(device) / max(bytes_per_set, 1)) + 1
    return max(2, min(cap, need))


# ----------------------------------------------------------------------------------------------------------
# Inputs (performance.md section 4.3)
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LogitsInputSpec:
    """Generator settings of logits-input benchmarks; recorded verbatim in the results."""

    n: int
    v: int
    dtype: str
    temperature: float = 0.9
    hidden: int = 256  # rank of the logits; enough that rows are not near-copies of each other
    target_entropy: float = 2.0  # nats, mean over rows at `temperature` (section 4.3 asks for 1-3)
    ignore_fraction: float = 0.1
    ignore_index: int = -100
    seed: int = 0

    @property
    def label(self) -> str:
        return f"{self.n}x{self.v} {DTYPE_SHORT.get(self.dtype, self.dtype)}"

    @property
    def logits_bytes(self) -> int:
        return self.n * self.v * DTYPES[self.dtype].itemsize


@dataclass
class LogitsInputs:
    """One rotating input set: logits [N, V], labels [N], upstream gradients [N] (fp32), valid-row mask."""

    logits: torch.Tensor
    labels: torch.Tensor
    grad_logprobs: torch.Tensor
    grad_entropy: torch.Tensor
    valid: torch.Tensor


def save_inputs(inputs: LogitsInputs, path: Path) -> None:
    """Write one input set for a child process (memory measurement): cheaper than regenerating it."""
    torch.save({f.name: getattr(inputs, f.name).detach().cpu() for f in fields(LogitsInputs)}, path)


def load_inputs(path: Path) -> LogitsInputs:
    """Read an input set written by :func:`save_inputs` into ordinary (anonymous) memory, not a mapping of
    the file, so that all of it is resident before a memory baseline is taken."""
    return LogitsInputs(**torch.load(path, weights_only=True))


def scratch_dir() -> str | None:
    """A RAM-backed directory for files handed to child processes (/dev/shm), or None for the default."""
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None


def row_chunks(n: int, row_elems: int, max_elems: int = 1 << 24) -> list[slice]:
    """Row slices of about ``max_elems`` elements each: bounded temporaries for row-wise [N, V] work."""
    step = max(1, max_elems // max(row_elems, 1))
    return [slice(i, min(i + step, n)) for i in range(0, n, step)]


def _mean_entropy(logits: torch.Tensor, temperature: float) -> float:
    """Mean per-row entropy of softmax(logits / T), from THE reference."""
    labels = torch.zeros(logits.shape[:-1], dtype=torch.long, device=logits.device)
    return float(token_logprobs_reference(logits, labels, temperature=temperature,
                                          want_entropy=True).entropy.mean())


def _calibrate_scale(raw: torch.Tensor, temperature: float, target: float) -> float:
    """Scale s with mean entropy of softmax(s * raw / T) == target (entropy decreases monotonically in s).

    Bisection to 0.1% in s: the entropy of a set then lands within a few hundredths of a nat of the target,
    less than the spread between sets.
    """
    lo, hi = 0.0, 1.0
    while _mean_entropy(raw * hi, temperature) > target:
        lo, hi = hi, 2.0 * hi
        if hi > 1e6:
            raise ValueError(f"cannot reach a mean entropy of {target} nats")
    while hi - lo > 1e-3 * hi:
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if _mean_entropy(raw * mid, temperature) > target else (lo, mid)
    return 0.5 * (lo + hi)


def make_logits_inputs(
    spec: LogitsInputSpec, device: torch.device, n_sets: int, scale: float | None = None
) -> tuple[list[LogitsInputs], dict[str, Any]]:
    """``n_sets`` input sets per section 4.3 and the generator record (settings, seeds, scale, entropies).

    The weight [V, H] is shared by every set (one lm_head), the hidden states [N, H] differ per set. The
    scale is calibrated on 128 separate rows unless given (memory subprocesses reuse the parent's value).
    """
    dtype = DTYPES[spec.dtype]
    gen = torch.Generator(device=device)
    gen.manual_seed(spec.seed)
    weight = torch.randn(spec.v, spec.hidden, generator=gen, device=device) / math.sqrt(spec.hidden)
    if scale is None:
        probe = torch.randn(128, spec.hidden, generator=gen, device=device) @ weight.T
        scale = _calibrate_scale(probe, spec.temperature, spec.target_entropy)
        del probe

    sets: list[LogitsInputs] = []
    entropies: list[float] = []
    for k in range(n_sets):
        gen.manual_seed(spec.seed + 1 + k)
        hidden = torch.randn(spec.n, spec.hidden, generator=gen, device=device)
        raw = hidden @ weight.T  # fp32 [N, V], entries ~ N(0, 1)
        logits = raw.mul_(scale).to(dtype)  # in place for fp32: one [N, V] buffer, not two
        del raw, hidden

        # Labels are sampled from the distribution the op evaluates (the cast logits at temperature T), as
        # rollout tokens are, by inverting the CDF (one cumsum; several times faster than torch.multinomial
        # on CPU). Chunked so the fp32 probabilities never exist for all rows at once.
        labels = torch.empty(spec.n, dtype=torch.long, device=device)
        ent_sum = 0.0
        for rows in row_chunks(spec.n, spec.v):
            logp = torch.log_softmax(logits[rows].float() / spec.temperature, dim=-1)
            probs = logp.exp()
            ent_sum += float(-(probs * logp).sum())
            cdf = probs.cumsum_(-1)
            u = torch.rand(cdf.shape[0], 1, generator=gen, device=device) * cdf[:, -1:]
            labels[rows] = torch.searchsorted(cdf, u).squeeze(-1).clamp_max_(spec.v - 1)
        entropies.append(ent_sum / spec.n)

        n_ignored = round(spec.ignore_fraction * spec.n)
        ignored = torch.randperm(spec.n, generator=gen, device=device)[:n_ignored]
        labels[ignored] = spec.ignore_index
        valid = labels != spec.ignore_index
        # Upstream gradients of both signs; zero on ignored rows, as the masked loss of a trainer gives.
        g_lp = torch.randn(spec.n, generator=gen, device=device) * valid
        g_h = torch.randn(spec.n, generator=gen, device=device) * valid
        sets.append(LogitsInputs(logits, labels, g_lp, g_h, valid))

    record = {
        **asdict(spec),
        "method": "logits = (randn[N,H] @ (randn[V,H] / sqrt(H)).T) * scale; labels ~ softmax(logits / T)",
        "scale": scale,
        "n_sets": n_sets,
        "seeds": [spec.seed + 1 + k for k in range(n_sets)],
        "mean_entropy_per_set": entropies,
        "valid_fraction": float(sets[0].valid.float().mean()),
    }
    return sets, record


# ----------------------------------------------------------------------------------------------------------
# Timing (performance.md section 4.5)
# ----------------------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------------------
# Ceilings (performance.md section 4.6) and the counting rules of section 1
# ----------------------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------------------
# Peak memory (performance.md section 4.7)
# ----------------------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------------------
# Accuracy bounds (ops.md section 8) for the correctness gate (performance.md section 4.4)
# ----------------------------------------------------------------------------------------------------------

# Providers other than reasonrl (peers and the reference baselines) are held to max(ops.md bound,
# PEER_RTOL[dtype] * scale), scale = 1 + max|oracle| for outputs and max|oracle| for gradients. fp32: 1e-3.
# 16-bit: 5e-2, because peers may legitimately compute in the input dtype (TRL's CPU bf16 path takes the
# log-softmax in bf16: its entropy and gradients are ~2% of max|oracle| off at V = 4000); a semantic error
# such as a wrong temperature (0.9 vs 1: ~10% of |log-prob|) still fails.
PEER_RTOL = {"float32": 1e-3, "bfloat16": 5e-2, "float16": 5e-2}


class MaxError:
    """Running max |impl - oracle| over valid rows, accumulated block by block.

    ``err_beyond_ulp`` is the same maximum after granting each element ``ulps`` units in the last place of
    ``ulp_dtype`` at the oracle value (the 16-bit gradient rule of ops.md section 8).
    """

    def __init__(self) -> None:
        self.err = 0.0
        self.err_beyond_ulp = 0.0
        self.max_oracle = 0.0

    def update(self, impl: torch.Tensor, oracle: torch.Tensor, valid: torch.Tensor,
               ulp_dtype: torch.dtype | None = None, ulps: float = 0.0) -> None:
        if not bool(valid.any()):
            return
        a, o = impl[valid].double(), oracle[valid].double()
        diff = (a - o).abs()
        # NaN anywhere is an error, whatever max() would make of it.
        self.err = max(self.err, float(diff.max()) if not bool(diff.isnan().any()) else math.inf)
        self.max_oracle = max(self.max_oracle, float(o.abs().max()))
        if ulp_dtype is not None:
            beyond = (diff - ulps * testing.ulp(o, ulp_dtype)).clamp_min(0)
            self.err_beyond_ulp = max(self.err_beyond_ulp,
                                      float(beyond.max()) if not bool(beyond.isnan().any()) else math.inf)


def acceptance_bound(quantity: str, dtype: torch.dtype, err_ref: float, magnitude: float) -> float:
    """ops.md section 8 from the one tolerance table (``reasonrl.testing``): ``quantity`` is 'stat'
    (magnitude 1 + max|oracle|) or 'grad' (magnitude max of the upstream gradients)."""
    tol = testing.tolerance(quantity, dtype)
    return tol.ref_factor * err_ref + tol.atol_scale * magnitude


def peer_bound(bound: float, scale: float, dtype: str) -> float:
    return max(bound, PEER_RTOL[dtype] * scale)


# ----------------------------------------------------------------------------------------------------------
# Result rows and outputs (performance.md section 4.8-4.9)
# ----------------------------------------------------------------------------------------------------------


def fill_speedups(rows: list[dict[str, Any]], eager: str, compiled: str) -> None:
    """speedup_vs_eager / speedup_vs_compiled: baseline median / row median, same op, case and mode."""
    base: dict[tuple, dict[str, float]] = {}
    for r in rows:
        if r["status"] == OK and r["provider"] in (eager, compiled):
            base.setdefault((r["op"], r["case"], r["mode"]), {})[r["provider"]] = r["median_ms"]
    for r in rows:
        b = base.get((r["op"], r["case"], r["mode"]), {})
        for key, name in (("speedup_vs_eager", eager), ("speedup_vs_compiled", compiled)):
            r[key] = b[name] / r["median_ms"] if r["status"] == OK and name in b else None


def _fmt(x: float | None, kind: str) -> str:
    if x is None:
        return "-"
    if kind == "ms":
        return f"{x:.0f}" if x >= 100 else f"{x:.1f}" if x >= 10 else f"{x:.2f}" if x >= 1 else f"{x:.3f}"
    if kind == "x":
        return f"{x:.2f}x"
    if kind == "pct":
        return f"{x:.1f}%"
    if kind == "err":
        return f"{x:.1e}"
    return f"{x:.0f}" if abs(x) >= 10 else f"{x:.1f}"


COLUMNS = ("case", "provider", "median ms", "p20-p80 ms", "throughput", "% ceiling", "x eager",
           "x compiled", "mem MiB", "max err", "status")


def _cells(r: dict[str, Any]) -> list[str]:
    ok = r["status"] == OK
    timed = ok and r.get("median_ms") is not None
    return [
        r["case"],
        r["provider"],
        _fmt(r.get("median_ms"), "ms") if timed else "-",
        f"{_fmt(r['p20_ms'], 'ms')}-{_fmt(r['p80_ms'], 'ms')}" if timed else "-",
        f"{r['throughput']:.1f} {r['unit']}" if timed else "-",
        _fmt(r.get("pct_ceiling"), "pct") if timed else "-",
        _fmt(r.get("speedup_vs_eager"), "x"),
        _fmt(r.get("speedup_vs_compiled"), "x"),
        _fmt(r.get("mem_delta_mib"), "mib"),
        _fmt(r.get("max_err"), "err"),
        r["status"] if not r.get("status_detail") else f"{r['status']}: {r['status_detail']}",
    ]


def _groups(rows: list[dict[str, Any]]) -> dict[tuple[str, str], list[dict[str, Any]]]:
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["op"], r["mode"]), []).append(r)
    return groups


def _notes(rows: list[dict[str, Any]]) -> list[str]:
    seen: dict[str, str] = {}
    for r in rows:
        if r.get("note"):
            seen.setdefault(r["provider"], r["note"])
    return [f"{p}: {n}" for p, n in seen.items()]


def markdown_tables(rows: list[dict[str, Any]], report: dict[str, Any]) -> str:
    """One table per (op, mode): cases x providers; then ceilings and provider notes."""
    env, ceil = report["environment"], report["ceilings"]
    dirty = " (dirty)" if env["git"]["dirty"] else ""
    lines = [
        f"# {report['op']} benchmark: {env['device_name']}",
        "",
        f"{report['timestamp']} · git {str(env['git']['sha'])[:12]}{dirty}"
        f" · torch {env['versions'].get('torch')} · {env['threads']} threads",
        "",
        f"Ceilings: read {ceil['read_gbps']:.1f} GB/s, copy {ceil['copy_gbps']:.1f} GB/s"
        + (f", bf16 matmul {ceil['matmul_tflops']:.0f} TFLOP/s" if "matmul_tflops" in ceil else ""),
        "",
    ]
    for (op, mode), group in _groups(rows).items():
        lines += [f"## {op} · {mode}", "", "| " + " | ".join(COLUMNS) + " |",
                  "|" + "|".join("---" for _ in COLUMNS) + "|"]
        lines += ["| " + " | ".join(_cells(r)) + " |" for r in group]
        lines.append("")
    notes = _notes(rows)
    if notes:
        lines += ["Notes:", ""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(lines)


def print_tables(rows: list[dict[str, Any]], report: dict[str, Any]) -> None:
    """Terminal tables with rich when it is installed (the ``bench`` extra), else the Markdown text."""
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(markdown_tables(rows, report))
        return
    console = Console(width=max(160, Console().width))
    ceil = report["ceilings"]
    console.print(f"[bold]{report['op']}[/bold] on {report['environment']['device_name']}, "
                  f"{report['environment']['threads']} threads; ceilings: read {ceil['read_gbps']:.1f} GB/s, "
                  f"copy {ceil['copy_gbps']:.1f} GB/s")
    for (op, mode), group in _groups(rows).items():
        table = Table(title=f"{op} · {mode}", title_justify="left")
        for i, col in enumerate(COLUMNS):
            table.add_column(col, justify="left" if i in (0, 1, len(COLUMNS) - 1) else "right")
        for r in group:
            table.add_row(*_cells(r))
        console.print(table)
    for note in _notes(rows):
        console.print(f"  note: {note}")


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> Path | None:
    """Median time (p20-p80 bars) vs N, one line per provider, the measured floor dashed; one panel per
    (V, dtype) x mode. Providers are dodged sideways around each N so that points and labels do not overlap.
    Returns None (with a message) when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install -e '.[bench]'): no PNG written", file=sys.stderr)
        return None
    timed = [r for r in rows if r["status"] == OK and r.get("median_ms") is not None]
    if not timed:
        return None
    panels = sorted({(r["v"], r["dtype"]) for r in timed})
    modes = list(dict.fromkeys(r["mode"] for r in timed))
    providers = list(dict.fromkeys(r["provider"] for r in timed))
    colors = {p: plt.get_cmap("tab10")(i % 10) for i, p in enumerate(providers)}
    # Multiplicative x offsets (the x axis is log2): providers spread over +-0.25 octave around each N.
    dodge = {p: 2 ** (0.5 * (i / max(len(providers) - 1, 1) - 0.5)) for i, p in enumerate(providers)}
    fig, axes = plt.subplots(len(panels), len(modes), figsize=(4.8 * len(modes), 4.0 * len(panels)),
                             squeeze=False)
    for i, (v, dtype) in enumerate(panels):
        for j, mode in enumerate(modes):
            ax = axes[i][j]
            sel = [r for r in timed if r["v"] == v and r["dtype"] == dtype and r["mode"] == mode]
            ns = sorted({r["n"] for r in sel})
            for p in providers:
                pts = sorted((r["n"], r["median_ms"], r["p20_ms"], r["p80_ms"])
                             for r in sel if r["provider"] == p)
                if not pts:
                    continue
                n, y, lo, hi = (list(col) for col in zip(*pts, strict=True))
                x = [k * dodge[p] for k in n]
                yerr = [[m - a for m, a in zip(y, lo, strict=True)],
                        [b - m for m, b in zip(y, hi, strict=True)]]
                ax.errorbar(x, y, yerr=yerr, marker="o", capsize=3, color=colors[p], label=p)
                if len(ns) == 1:  # a single N: label the points, there is no trend to read
                    ax.annotate(f"  {_fmt(y[0], 'ms')}", (x[0], y[0]), fontsize=8, va="center")
            floor = sorted({(r["n"], r["floor_ms"]) for r in sel})
            for k, (n_, f) in enumerate(floor):
                ax.hlines(f, n_ * 2**-0.35, n_ * 2**0.35, colors="k", linestyles="--",
                          label="floor (measured ceilings)" if k == 0 else None)
            if len(floor) > 1:
                ax.plot([f[0] for f in floor], [f[1] for f in floor], "k--", linewidth=0.8)
            ax.set_yscale("log")
            ax.set_xscale("log", base=2)
            ax.set_xticks(ns, [str(n_) for n_ in ns])
            ax.set_xlim(ns[0] * 2**-0.7, ns[-1] * 2**0.9)  # room for the labels right of the points
            ax.minorticks_off()
            ax.set_title(f"{mode} · V={v} {DTYPE_SHORT.get(dtype, dtype)}", fontsize=10)
            ax.set_xlabel("N (rows)")
            ax.set_ylabel("ms (median, p20-p80)")
            ax.grid(True, which="major", alpha=0.3)
    handles: dict[str, Any] = {}
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(lab, h)
    fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=min(len(handles), 6),
               fontsize=9)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, 0.08, 1, 0.95))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def timestamp() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")


def write_results(report: dict[str, Any], out_dir: Path, device: torch.device) -> dict[str, Path]:
    """``<device>-<timestamp>.json`` / ``.md`` / ``.png`` in ``out_dir``; returns the paths written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"{device_slug(device)}-{report['timestamp']}"
    paths = {"json": stem.with_suffix(".json"), "md": stem.with_suffix(".md")}
    paths["json"].write_text(json.dumps(report, indent=2, default=str) + "\n")
    paths["md"].write_text(markdown_tables(report["rows"], report))
    png = plot(report["rows"], stem.with_suffix(".png"),
               f"{report['op']} on {report['environment']['device_name']} "
               f"({report['environment']['threads']} threads), {report['timestamp']}")
    if png is not None:
        paths["png"] = png
    return paths


def new_report(op: str, device: torch.device, peers: Sequence[str], profile: str,
               argv: Sequence[str]) -> dict[str, Any]:
    return {
        "schema_version": SCHEMA_VERSION,
        "op": op,
        "timestamp": timestamp(),
        "profile": profile,
        "argv": list(argv),
        "environment": environment(device, peers),
        "ceilings": None,
        "cases": [],
        "rows": [],
    }
