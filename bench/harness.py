"""The one harness of the benchmarks: providers, the protocol of one case, and the command line.

A benchmark (``bench_<op>.py``) declares what is specific to it as a :class:`Benchmark` subclass: its
providers, how its input sets are made, what one gate call of a provider returns, how the results are checked
against the float64 oracle, what is timed per mode, what it counts (bytes or FLOP) and how its peak memory is
taken. Everything else is here and the same for every benchmark (docs/performance.md section 4):

1. inputs: the rotating input sets of the case (section 4.3);
2. availability: a provider whose module is missing, which needs CUDA, or which its own check rules out gets
   a row saying why, never dropped;
3. correctness gate (4.4): every provider runs each mode once on input set 0 (these first calls also compile
   and autotune, outside any timing), then the benchmark checks them all against the oracle; a provider that
   fails a mode is ``incorrect`` there and not timed;
4. timing (4.5): ``timing.time_fn`` per (provider, mode), the gate's call counted as the first warm-up; the
   throughput and the share of the measured ceiling (4.6) from what the mode moves or computes;
5. peak memory (4.7): on CPU a fresh ``python -m <module> --_memcase`` subprocess per (provider, case), which
   reads input set 0 from a RAM-backed file; on GPU in this process;
6. one result row per (provider, mode), written by ``report`` (4.8-4.9).

A broken peer never takes the run down: its exception becomes the row's status. ``main`` returns 1 when a
reasonrl provider is incorrect or errored.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from . import report
from .ceilings import measure_ceilings
from .inputs import DTYPES, MIB, load_inputs, save_inputs, scratch_dir
from .memory import cpu_peak_supported, emit_memcase_result, run_memory_subprocess
from .report import ERROR, INCORRECT, NOT_INSTALLED, OK, OOM, UNSUPPORTED  # statuses of a result row
from .timing import time_fn

ALL_MODES = ("fwd", "bwd", "full")  # what --modes accepts; each benchmark runs the ones it has
GPU_MEMORY_METHOD = "torch.cuda.max_memory_allocated - allocated before (incremental)"
CPU_MEMORY_METHOD = "peak RSS (VmHWM) - RSS before, fresh subprocess per provider and case"
_T0 = time.perf_counter()  # origin of the progress stamps of log(): the start of the benchmark's main()


@dataclass(frozen=True)
class Provider:
    """One implementation under test. ``build(spec, device)`` returns the callable the benchmark runs."""

    name: str
    build: Callable[[Any, torch.device], Any]
    note: str = ""
    strict: bool = False  # held to docs/ops.md section 8 (reasonrl); the others get accuracy.peer_bound
    cuda_only: bool = False
    module: str | None = None  # top-level module that must be importable ("not installed" otherwise)
    unavailable: Callable[[torch.device, torch.dtype], str | None] | None = None  # reason it cannot run


@dataclass
class GateRun:
    """A provider's gate calls on input set 0: what ``Benchmark.check`` reads, and the seconds of the first
    call of each mode (they include compilation / autotuning for the providers that do either)."""

    result: Any
    first_s: dict[str, float]


@dataclass
class Verdict:
    """The correctness verdict of one (provider, mode): passed, the error shown in the table, the details."""

    ok: bool
    max_err: float | None
    errors: dict[str, Any]


@dataclass
class Work:
    """What one call of a mode counts (docs/performance.md section 1): ``amount`` bytes (unit "GB/s") or FLOP
    (unit "GFLOP/s"), and its time at the measured ceilings. A benchmark whose work is not bytes or FLOP
    (tokens scored by a model) gives its own unit and ``scale`` (throughput = amount / seconds / scale) and
    ``floor_ms`` None: no ceiling applies to it."""

    amount: float
    unit: str
    floor_ms: float | None
    scale: float = 1e9


class Benchmark:
    """What a benchmark declares; the harness runs it. Subclasses set the class attributes and implement
    ``make_inputs``, ``gate``, ``check``, ``timed``, ``work`` and ``measure_memory``."""

    op: ClassVar[str]
    module: ClassVar[str]  # run by the CPU memory subprocesses as `python -m module`
    description: ClassVar[str] = ""  # --help's; default: the first line of the benchmark module's docstring
    spec_cls: ClassVar[type]  # built from a profile entry (*dims, dtype) and from asdict(spec) in the child
    inputs_cls: ClassVar[type]  # dataclass of one input set (saved for the memory subprocess)
    leaves: ClassVar[tuple[str, ...]] = ()  # input fields that are autograd leaves (requires_grad)
    modes: ClassVar[tuple[str, ...]]
    # profile -> device type -> [(N, V, dtype)] or [(N, H, V, dtype)]
    profiles: ClassVar[dict[str, dict[str, list[tuple]]]]
    providers: ClassVar[dict[str, Provider]]
    peer_dists: ClassVar[tuple[str, ...]]  # distributions whose versions are recorded with the results
    eager: ClassVar[str] = "reference-eager"
    # The compiled baselines; "x compiled" is against the fastest of them in the same case and mode (the
    # strongest compiled formulation, docs/performance.md), named in the row's compiled_baseline.
    compiled: ClassVar[tuple[str, ...]] = ("reference-compiled",)
    profile_help: ClassVar[str] = ""
    shape_form: ClassVar[str | None] = None  # --shapes' form; None: "NxV" / "NxHxV" from the profile entries
    modes_help: ClassVar[str] = ""
    # the thread count of the CPU targets (docs/performance.md section 3)
    default_cpu_threads: ClassVar[int] = 2

    def default_modes(self, profile: str, device: torch.device) -> list[str]:
        return list(self.modes)

    def make_inputs(self, spec: Any, device: torch.device) -> tuple[list[Any], dict[str, Any]]:
        """The rotating input sets of the case and the generator record."""
        raise NotImplementedError

    def oracle(self, spec: Any, inp: Any, device: torch.device) -> Any:
        """Computed once per case before the gate, passed to ``gate`` and ``check`` (None: ``check``
        computes its own, after the gate)."""
        return None

    def gate(self, p: Provider, fn: Any, inp: Any, modes: list[str], device: torch.device,
             oracle: Any) -> GateRun:
        raise NotImplementedError

    def check(self, spec: Any, inp: Any, results: dict[str, Any], device: torch.device,
              oracle: Any) -> dict[str, dict[str, Verdict]]:
        """Verdicts of every gated provider (``results``: name -> ``GateRun.result``) for every mode."""
        raise NotImplementedError

    def timed(self, p: Provider, fn: Any, sets: list[Any],
              mode: str) -> tuple[Callable[[int], object], list]:
        """The callable timed for ``mode`` (its argument: the input set) and the state it keeps alive, which
        the harness clears after timing (retained graphs)."""
        raise NotImplementedError

    def work(self, spec: Any, p: Provider, mode: str, ceilings: dict[str, Any], device: torch.device) -> Work:
        raise NotImplementedError

    def measure_memory(self, p: Provider, fn: Any, inp: Any, modes: list[str], device: torch.device,
                       warm: bool) -> dict[str, tuple[int, int]]:
        """Per mode (incremental peak bytes, absolute peak bytes), with ``memory.peak_memory``. ``warm``: in
        the fresh memory subprocess, warm up first so that one-time costs are not counted."""
        raise NotImplementedError

    def row_metrics(self, spec: Any, p: Provider, mode: str, median_ms: float) -> dict[str, Any]:
        """Further per-row rates recorded next to the throughput (completions per second, ...)."""
        return {}

    def case_ceilings(self, spec: Any, device: torch.device) -> dict[str, Any]:
        """Ceilings measured per case (the GEMM of the hidden-state benchmarks), merged into the report's."""
        return {}

    def workload(self, providers: list[Provider], modes: list[str]) -> dict[str, Any]:
        return {"modes": modes,
                "providers": {p.name: {"note": p.note, "strict": p.strict} for p in providers}}

    def context(self) -> contextlib.AbstractContextManager:
        """Entered around each case and the memory subprocess's work."""
        return contextlib.nullcontext()

    def grad_to_none(self, sets: list[Any]) -> list[torch.Tensor]:
        """Tensors whose ``.grad`` do_bench resets between GPU calls: the autograd leaves of every set."""
        return [getattr(s, leaf) for s in sets for leaf in self.leaves]

    def closing_lines(self, results: dict[str, Any]) -> list[str]:
        """Lines printed after the tables (``results``: the report written as JSON)."""
        return []

    def main(self, argv: list[str] | None = None) -> int:
        """Run the benchmark from the command line (``argv``: its options; default ``sys.argv[1:]``)."""
        return main(self, argv)


# ----------------------------------------------------------------------------------------------------------
# One case
# ----------------------------------------------------------------------------------------------------------


def log(op: str, msg: str) -> None:
    """Progress on stderr, stamped with the seconds since the benchmark started."""
    print(f"[{op} {time.perf_counter() - _T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


def short(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"


def availability(p: Provider, device: torch.device, dtype: torch.dtype) -> tuple[str, str] | None:
    """(status, detail) when the provider cannot run here, else None."""
    if p.module is not None and importlib.util.find_spec(p.module) is None:
        return NOT_INSTALLED, p.module
    if p.cuda_only and device.type != "cuda":
        return UNSUPPORTED, "CUDA only"
    if p.unavailable is not None and (reason := p.unavailable(device, dtype)) is not None:
        return UNSUPPORTED, reason
    return None


def result_row(op: str, spec: Any, mode: str, p: Provider, status: str, detail: str = "") -> dict[str, Any]:
    shape = {k: getattr(spec, k) for k in ("n", "h", "v") if hasattr(spec, k)}
    return {"op": op, "case": spec.label, **shape, "dtype": spec.dtype, "mode": mode, "provider": p.name,
            "status": status, "status_detail": detail, "note": p.note}


def _empty_cache(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _mib(peaks: dict[str, tuple[int, int]]) -> dict[str, dict[str, float]]:
    return {m: {"delta_mib": d / MIB, "peak_mib": a / MIB} for m, (d, a) in peaks.items()}


def run_case(bench: Benchmark, spec: Any, providers: list[Provider], modes: list[str], device: torch.device,
             ceilings: dict[str, Any], threads: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Gate, time and measure every provider on one case: (its rows, ordered by mode then provider; its
    record for the report: label, the generator record of its inputs, wall time)."""
    op, t_case = bench.op, time.perf_counter()
    sets, record = bench.make_inputs(spec, device)
    for s in sets:
        for leaf in bench.leaves:
            getattr(s, leaf).requires_grad_(True)
    detail = [f"{len(sets)} input sets"]
    if "mean_entropy_per_set" in record:
        detail.append(f"mean entropy {record['mean_entropy_per_set'][0]:.2f} nats")
    if "layout" in record:
        detail.append(record["layout"])
    log(op, f"{spec.label}: {', '.join(detail)}")
    oracle = bench.oracle(spec, sets[0], device)

    rows: dict[tuple[str, str], dict[str, Any]] = {}
    fns: dict[str, Any] = {}
    for p in providers:
        blocked = availability(p, device, DTYPES[spec.dtype])
        if blocked is None:
            try:
                fns[p.name] = p.build(spec, device)
            except ImportError as exc:
                blocked = NOT_INSTALLED, short(exc)
            except Exception as exc:  # a broken peer must not take the run down: its rows say what happened
                blocked = ERROR, short(exc)
        if blocked is not None:
            for m in modes:
                rows[p.name, m] = result_row(op, spec, m, p, *blocked)

    # Correctness gate: each provider's calls on set 0, then one check of all of them against the oracle.
    gate_runs: dict[str, GateRun] = {}
    for name, fn in list(fns.items()):
        try:
            run = gate_runs[name] = bench.gate(bench.providers[name], fn, sets[0], modes, device, oracle)
        except torch.OutOfMemoryError as exc:
            blocked = OOM, short(exc)
        except Exception as exc:  # as above
            blocked = ERROR, short(exc)
        else:
            firsts = ", ".join(f"{m} {s:.1f} s" for m, s in run.first_s.items())
            log(op, f"{spec.label}: {name} gate: {firsts}")
            continue
        del fns[name]
        for m in modes:
            rows[name, m] = result_row(op, spec, m, bench.providers[name], *blocked)
        _empty_cache(device)
    verdicts = bench.check(spec, sets[0], {n: r.result for n, r in gate_runs.items()}, device, oracle) \
        if gate_runs else {}
    log(op, f"{spec.label}: checked against the float64 oracle")
    # The gate's calls are each mode's first warm-up (they ran the same work on set 0 in this process).
    first_s = {name: r.first_s for name, r in gate_runs.items()}
    del gate_runs, oracle

    for name, fn in fns.items():
        p = bench.providers[name]
        for m in modes:
            verdict = verdicts[name][m]
            row = rows[name, m] = result_row(op, spec, m, p, OK if verdict.ok else INCORRECT)
            row.update(max_err=verdict.max_err, errors=verdict.errors, first_call_s=first_s[name][m])
            if not verdict.ok:
                continue
            state: list = []
            try:
                timed, state = bench.timed(p, fn, sets, m)
                timing = time_fn(timed, len(sets), device, grad_to_none=bench.grad_to_none(sets),
                                 prior_calls=1, prior_s=first_s[name][m])
            except torch.OutOfMemoryError as exc:
                row.update(status=OOM, status_detail=short(exc))
                continue
            except Exception as exc:  # as in the gate: the row says what happened, the run goes on
                row.update(status=ERROR, status_detail=short(exc))
                continue
            finally:
                state.clear()  # frees what the timed closure kept alive (it holds the list)
                _empty_cache(device)
            work = bench.work(spec, p, m, ceilings, device)
            row.update(
                median_ms=timing.median_ms, p20_ms=timing.p20_ms, p80_ms=timing.p80_ms,
                repeats=timing.repeats, warmups=timing.warmups, timing_method=timing.method,
                rep_ms=timing.rep_ms, unit=work.unit,
                throughput=work.amount / (timing.median_ms / 1e3) / work.scale, floor_ms=work.floor_ms,
                pct_ceiling=None if work.floor_ms is None else 100 * work.floor_ms / timing.median_ms)
            row[{"GB/s": "bytes", "GFLOP/s": "flop"}.get(work.unit, "amount")] = work.amount
            row.update(bench.row_metrics(spec, p, m, timing.median_ms))
            log(op, f"{spec.label}: {name} {m} {timing.median_ms:.2f} ms ({timing.repeats or '-'} repeats)")

    _memory_rows(bench, spec, sets[0], fns, rows, modes, device, threads)
    case = {"case": spec.label, "inputs": record, "wall_s": time.perf_counter() - t_case}
    order = {p.name: i for i, p in enumerate(providers)}
    return sorted(rows.values(), key=lambda r: (bench.modes.index(r["mode"]), order[r["provider"]])), case


def _memory_rows(bench: Benchmark, spec: Any, inp: Any, fns: dict[str, Any],
                 rows: dict[tuple[str, str], dict[str, Any]], modes: list[str], device: torch.device,
                 threads: int) -> None:
    """Peak memory of every provider that passed a mode: CPU in a fresh subprocess per (provider, case),
    which reads input set 0 from a file; GPU in this process."""
    measured = [name for name in fns if any(rows[name, m]["status"] == OK for m in modes)]
    logits_bytes = getattr(spec, "logits_bytes", None)
    with tempfile.TemporaryDirectory(prefix="reasonrl-bench-", dir=scratch_dir()) as tmp:
        inputs_path = Path(tmp) / "inputs.pt"
        if device.type == "cpu" and measured:
            save_inputs(inp, inputs_path)
        for name in measured:
            if device.type == "cuda":
                try:
                    mem = _mib(bench.measure_memory(bench.providers[name], fns[name], inp, modes, device,
                                                    warm=False))
                except torch.OutOfMemoryError as exc:
                    mem = {"error": short(exc)}
                method = GPU_MEMORY_METHOD
            else:
                payload = {"provider": name, "spec": asdict(spec), "inputs": str(inputs_path),
                           "threads": threads, "modes": modes}
                mem = run_memory_subprocess(bench.module, payload)
                method = CPU_MEMORY_METHOD
            for m in modes:
                row = rows[name, m]
                if "error" in mem:
                    row["mem_error"] = mem["error"]
                    continue
                row.update(mem_delta_mib=mem[m]["delta_mib"], mem_peak_mib=mem[m]["peak_mib"],
                           mem_method=method)
                if logits_bytes:
                    row["mem_vs_logits"] = mem[m]["delta_mib"] * MIB / logits_bytes
            summary = mem.get("error") or {m: round(mem[m]["delta_mib"]) for m in modes}
            log(bench.op, f"{spec.label}: {name} peak memory delta MiB {summary}")


def memcase(bench: Benchmark, payload: dict[str, Any]) -> dict[str, Any]:
    """Child side of the CPU memory measurement: a fresh process per (provider, case)."""
    torch.set_num_threads(payload["threads"])
    device = torch.device("cpu")
    spec = bench.spec_cls(**payload["spec"])
    p = bench.providers[payload["provider"]]
    fn = p.build(spec, device)
    inp = load_inputs(Path(payload["inputs"]), bench.inputs_cls)
    for leaf in bench.leaves:
        getattr(inp, leaf).requires_grad_(True)
    with bench.context():  # as in the parent, where the provider is timed
        return _mib(bench.measure_memory(p, fn, inp, payload["modes"], device, warm=True))


# ----------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------


def _csv(choices: Sequence[str]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        items = [t.strip() for t in text.split(",") if t.strip()]
        bad = [t for t in items if t not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(
                f"expected a comma-separated subset of {tuple(choices)}, got {text!r}")
        return items

    return parse


def _shapes(n_dims: int, form: str) -> Callable[[str], list[tuple[int, ...]]]:
    def parse(text: str) -> list[tuple[int, ...]]:
        try:
            shapes = [tuple(int(d) for d in s.lower().split("x")) for s in text.split(",") if s.strip()]
        except ValueError:
            shapes = []
        if not shapes or any(len(s) != n_dims or min(s) <= 0 for s in shapes):
            raise argparse.ArgumentTypeError(f"expected shapes like {form}[,{form}...], got {text!r}")
        return shapes

    return parse


def parser(bench: Benchmark) -> argparse.ArgumentParser:
    n_dims = len(next(iter(next(iter(bench.profiles.values())).values()))[0]) - 1
    form = bench.shape_form or ("NxV" if n_dims == 2 else "NxHxV")
    description = bench.description or (sys.modules[type(bench).__module__].__doc__ or "").split("\n")[0]
    ap = argparse.ArgumentParser(prog=f"python -m {bench.module}", description=description)
    ap.add_argument("--profile", choices=sorted(bench.profiles), default="quick", help=bench.profile_help)
    ap.add_argument("--shapes", type=_shapes(n_dims, form),
                    help=f"{form}[,{form}...]: replaces the profile's shapes (with the profile's dtypes for "
                         "a shape it lists, else its first dtype)")
    ap.add_argument("--dtype", type=_csv(tuple(DTYPES)),
                    help="dtype[,dtype...]: replaces the profile's dtypes")
    ap.add_argument("--providers", type=_csv(tuple(bench.providers)), default=list(bench.providers),
                    help=f"comma-separated subset of {', '.join(bench.providers)} (default: all)")
    ap.add_argument("--modes", type=_csv(ALL_MODES),
                    help=f"comma-separated subset of {','.join(bench.modes)}; modes of other benchmarks are "
                         f"skipped. {bench.modes_help}")
    ap.add_argument("--out-dir", type=Path, default=report.DEFAULT_OUT_DIR,
                    help="folder for the JSON / Markdown / PNG results (default: the current directory)")
    ap.add_argument("--threads", type=int,
                    help=f"torch CPU threads (default on CPU: {bench.default_cpu_threads}, the setting of "
                         "the CPU targets; on CUDA: torch's default)")
    ap.add_argument("--_memcase", help=argparse.SUPPRESS)  # internal: child of the CPU memory measurement
    return ap


def cases(bench: Benchmark, args: argparse.Namespace, device: torch.device) -> list[Any]:
    """The specs to run: the profile's (shape, dtype) entries, or --shapes / --dtype in their place."""
    profile = bench.profiles[args.profile][device.type]
    shapes = args.shapes or list(dict.fromkeys(tuple(entry[:-1]) for entry in profile))
    specs = []
    for dims in shapes:
        dtypes = args.dtype or [e[-1] for e in profile if tuple(e[:-1]) == dims] or [profile[0][-1]]
        specs += [bench.spec_cls(*dims, d) for d in dtypes]
    return specs


def inductor_cache_per_isa() -> None:
    """Give torch.compile's on-disk cache one folder per CPU ISA, unless TORCHINDUCTOR_CACHE_DIR is set.

    ``ATEN_CPU_CAPABILITY=avx2`` on an AVX-512 machine (how the AVX2 kernels are measured there) makes
    inductor generate AVX2 code, but its cache key does not include the variable: a graph compiled under one
    setting was reused under the other and returned wrong results (log-probs of 1e29, an out-of-bounds
    gather index) or corrupted the heap (glibc "unaligned tcache chunk"), measured with torch 2.13.0. A
    folder per ISA keeps the two apart; the memory subprocesses inherit it through the environment."""
    if "TORCHINDUCTOR_CACHE_DIR" in os.environ:
        return
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    isa = torch.backends.cpu.get_cpu_capability().lower()
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = f"{default_cache_dir()}-{isa}"


def main(bench: Benchmark, argv: list[str] | None = None) -> int:
    """Run the benchmark; 0 on success, 1 when a reasonrl provider failed its correctness gate or errored."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser(bench).parse_args(argv)
    inductor_cache_per_isa()
    if args._memcase:
        emit_memcase_result(memcase(bench, json.loads(args._memcase)))
        return 0

    global _T0
    t_start = _T0 = time.perf_counter()
    device = report.pick_device()
    default_threads = bench.default_cpu_threads if device.type == "cpu" else torch.get_num_threads()
    threads = args.threads or default_threads
    torch.set_num_threads(threads)
    if args.modes is None:
        modes = bench.default_modes(args.profile, device)
    else:
        modes = [m for m in bench.modes if m in args.modes]
        if skipped := [m for m in args.modes if m not in bench.modes]:
            log(bench.op, f"mode(s) {', '.join(skipped)} skipped: it has {', '.join(bench.modes)}")
        if not modes:
            log(bench.op, "none of the requested modes applies: nothing to run")
            return 0
    if device.type == "cpu" and (why := cpu_peak_supported()) is not None:
        log(bench.op, f"peak memory will not be measured: {why}")
    providers = [bench.providers[name] for name in args.providers]
    results = report.new_report(bench.op, device, bench.peer_dists, args.profile, argv)
    ceilings = results["ceilings"] = measure_ceilings(device)
    log(bench.op, f"ceilings: read {ceilings['read_gbps']:.1f} GB/s, copy {ceilings['copy_gbps']:.1f} GB/s")
    results["workload"] = bench.workload(providers, modes)
    for spec in cases(bench, args, device):
        if extra := bench.case_ceilings(spec, device):
            ceilings.update(extra)
            shown = ", ".join(f"{k} {v:.0f}" for k, v in extra.items() if isinstance(v, float))
            log(bench.op, f"{spec.label}: ceilings {shown}")
        with bench.context():
            rows, record = run_case(bench, spec, providers, modes, device, ceilings, threads)
        results["rows"] += rows
        results["cases"].append(record)
    report.fill_speedups(results["rows"], bench.eager, bench.compiled)
    results["wall_s"] = time.perf_counter() - t_start
    paths = report.write_results(results, args.out_dir, device)
    report.print_tables(results["rows"], results)
    for line in bench.closing_lines(results):
        print(line)
    print(f"wrote {', '.join(str(p) for p in paths.values())} ({results['wall_s']:.0f} s)")
    failed = [r for r in results["rows"]
              if r["provider"].startswith("reasonrl") and r["status"] in (INCORRECT, ERROR)]
    return 1 if failed else 0
