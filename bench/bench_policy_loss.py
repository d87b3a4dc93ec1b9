"""Benchmark of the policy loss from logits (losses.md section 13) following performance.md section 4.

Workload: the DAPO loss of a GRPO step on packed sequences of 256 tokens (cu_seqlens), ~10% of tokens
``ignore_index``, per-sequence advantages of both signs, old-policy log-probs within a few percent of the
current policy (ratios on both sides of the clip bounds), reference log-probs for a k3 KL term (beta 0.04),
temperature 0.9; the loss gradient flows into the logits (``full``: forward + backward, the training step).
The config has no entropy bonus so that Liger runs the same loss (reasonrl still computes the entropy, for the
metric). Normalisation: ``num_items_in_batch`` = the valid tokens, given explicitly.

Providers (side by side in one run; a missing one is a row saying why):

* ``reasonrl``: ``policy_loss_from_logits`` with ``impl="cpp"`` (CPU) or ``"triton"`` (CUDA), the
  single-pass kernel (1 read + 1 write of the logits), ``validate=False``.
* ``reasonrl-two-phase``: the same call with ``return_per_token=True``, which takes the two-phase path
  (token_logprobs forward, the O(N) loss, token_logprobs backward: 2 reads + 1 write).
* ``reference-eager``: ``impl="reference"``: the reference token_logprobs then the reference loss, autograd.
* ``reference-compiled``: the same function under ``torch.compile(dynamic=False)``, compiled by the
  correctness gate's call (not timed).
* ``liger-triton`` (CUDA): Liger-Kernel's ``triton_grpo_loss`` on the padded [B, 257, V] layout it expects
  (completion_mask, same DAPO config, ``num_items_in_batch``); it has no entropy.

Correctness gate: loss and dlogits of every provider on input set 0 against the float64 oracle (the reference
chain in float64, computed one sequence-aligned row chunk at a time, which is exact here because every
coefficient of the loss is fixed by ``num_items_in_batch``). reasonrl must be within 1e-5 relative on the
loss and 1e-4 x max|oracle gradient| on dlogits (the test-suite bound); others within the peer bound.

Usage: ``python -m reasonrl.bench.bench_policy_loss --profile quick``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from . import common
from .common import ERROR, INCORRECT, MIB, NOT_INSTALLED, OK, OOM, UNSUPPORTED, LogitsInputSpec

OP = "policy_loss_from_logits"
MODULE = __spec__.name if __spec__ else __name__  # the memory subprocesses run `python -m MODULE`
MODES = ("fwd", "full")
TRAFFIC = {"fwd": (1, 0), "full": (1, 1)}  # the single pass; the two-phase path moves (2, 1)
PEER_DISTS = ("liger-kernel", "trl", "transformers")
SEQ_LEN = 256
PROFILES: dict[str, dict[str, list[tuple[int, int, str]]]] = {
    "quick": {"cpu": [(4096, 32000, "float32")], "cuda": [(16384, 151936, "bfloat16")]},
    "full": {
        "cpu": [
            (1024, 32000, "float32"),
            (4096, 32000, "float32"),
            (4096, 32000, "bfloat16"),
            (1024, 151936, "float32"),
        ],
        "cuda": [(n, 151936, "bfloat16") for n in (4096, 8192, 16384)] + [(4096, 151936, "float32")],
    },
}
DEFAULT_CPU_THREADS = 2
_T0 = time.perf_counter()


def _config():
    from reasonrl.losses import PolicyLossConfig

    return PolicyLossConfig(
        loss_type="dapo",
        epsilon_low=0.2,
        epsilon_high=0.28,
        beta=0.04,
        kl_estimator="k3",
        kl_bias_correction=False,
        temperature=0.9,
    )


@dataclass
class LossInputs:
    logits: torch.Tensor  # [N, V], requires grad
    labels: torch.Tensor  # [N]
    cu_seqlens: torch.Tensor  # [B + 1]
    advantages: torch.Tensor  # [B]
    old_logprobs: torch.Tensor  # [N]
    ref_logprobs: torch.Tensor  # [N]
    num_items: int


def _loss_inputs(spec: LogitsInputSpec, device: torch.device, n_sets: int) -> tuple[list[LossInputs], dict]:
    from reasonrl.ops import token_logprobs

    sets, record = common.make_logits_inputs(spec, device, n_sets)
    out = []
    for k, s in enumerate(sets):
        gen = torch.Generator(device=device).manual_seed(1000 + k)
        n_seq = spec.n // SEQ_LEN
        with torch.no_grad():
            lp = token_logprobs(
                s.logits,
                s.labels,
                temperature=spec.temperature,
                ignore_index=spec.ignore_index,
                impl="reference" if device.type == "cpu" and spec.dtype == "float64" else "auto",
                validate=False,
            ).logprobs
        old = lp + 0.1 * torch.randn(spec.n, generator=gen, device=device)
        ref = old - 0.05 * torch.randn(spec.n, generator=gen, device=device).abs()
        out.append(
            LossInputs(
                logits=s.logits.requires_grad_(True),
                labels=s.labels,
                cu_seqlens=torch.arange(0, spec.n + 1, SEQ_LEN, device=device),
                advantages=torch.randn(n_seq, generator=gen, device=device),
                old_logprobs=old.float(),
                ref_logprobs=ref.float(),
                num_items=int(s.valid.sum()),
            )
        )
    record["layout"] = f"packed, {spec.n // SEQ_LEN} sequences of {SEQ_LEN} tokens"
    return out, record


# A provider: build(spec, device) -> fn(inputs, grad: bool) -> (loss 0-d, dlogits or None)
LossFn = Callable[[LossInputs, bool], tuple[torch.Tensor, torch.Tensor | None]]


def _policy_loss_fn(impl: str, **extra) -> Callable[[LogitsInputSpec, torch.device], LossFn]:
    def build(spec: LogitsInputSpec, device: torch.device) -> LossFn:
        from reasonrl.losses import LossNormalizers, policy_loss_from_logits

        cfg = _config()

        def loss_of(inp: LossInputs) -> torch.Tensor:
            norms = LossNormalizers(num_items_in_batch=inp.num_items)
            return policy_loss_from_logits(
                inp.logits,
                inp.labels,
                advantages=inp.advantages,
                cu_seqlens=inp.cu_seqlens,
                old_logprobs=inp.old_logprobs,
                ref_logprobs=inp.ref_logprobs,
                normalizers=norms,
                config=cfg,
                ignore_index=spec.ignore_index,
                impl=impl,
                validate=False,
                **extra,
            ).loss

        return _runner(loss_of)

    return build


def _runner(loss_of: Callable[[LossInputs], torch.Tensor]) -> LossFn:
    def fn(inp: LossInputs, grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not grad:
            with torch.no_grad():
                return loss_of(inp), None
        loss = loss_of(inp)
        return loss.detach(), torch.autograd.grad(loss, inp.logits)[0]

    return fn


def _reasonrl_impl(device: torch.device) -> str:
    return "triton" if device.type == "cuda" else "cpp"


def _build_reasonrl(spec, device):
    return _policy_loss_fn(_reasonrl_impl(device))(spec, device)


def _build_two_phase(spec, device):
    return _policy_loss_fn(_reasonrl_impl(device), return_per_token=True)(spec, device)


def _build_eager(spec, device):
    return _policy_loss_fn("reference")(spec, device)


def _build_compiled(spec, device):
    from reasonrl.losses import LossNormalizers, policy_loss_from_logits

    cfg = _config()

    def loss_of(logits, labels, advantages, cu_seqlens, old, ref, num_items):
        return policy_loss_from_logits(
            logits,
            labels,
            advantages=advantages,
            cu_seqlens=cu_seqlens,
            old_logprobs=old,
            ref_logprobs=ref,
            normalizers=LossNormalizers(num_items_in_batch=num_items),
            config=cfg,
            ignore_index=spec.ignore_index,
            impl="reference",
            validate=False,
        ).loss

    compiled = torch.compile(loss_of, dynamic=False)
    return _runner(
        lambda i: compiled(
            i.logits, i.labels, i.advantages, i.cu_seqlens, i.old_logprobs, i.ref_logprobs, i.num_items
        )
    )


def _build_liger(spec, device):
    from liger_kernel.transformers.grpo_loss import triton_grpo_loss

    cfg = _config()
    cache: dict[int, tuple] = {}

    def padded(inp: LossInputs):
        # Liger's layout: logits [B, L + 1, V] (the last position is dropped), completion ids / mask [B, L].
        # Built once per input set, outside the timed region; its logits are a copy of the same values.
        key = id(inp)
        if key not in cache:
            b, v = inp.advantages.numel(), inp.logits.shape[-1]
            x = torch.empty(b, SEQ_LEN + 1, v, device=inp.logits.device, dtype=inp.logits.dtype)
            x[:, :SEQ_LEN] = inp.logits.detach().view(b, SEQ_LEN, v)
            x[:, SEQ_LEN] = 0
            ids = inp.labels.view(b, SEQ_LEN)
            mask = ids != spec.ignore_index
            cache[key] = (
                x.requires_grad_(True),
                ids.clamp_min(0),
                mask.to(torch.int32),
                inp.old_logprobs.view(b, SEQ_LEN),
                inp.ref_logprobs.view(b, SEQ_LEN),
            )
        return cache[key]

    def fn(inp: LossInputs, grad: bool):
        x, ids, mask, old, ref = padded(inp)

        def loss():
            out = triton_grpo_loss(
                x,
                old,
                ref,
                ids,
                inp.advantages,
                mask,
                temperature=cfg.temperature,
                beta=cfg.beta,
                eps_low=cfg.epsilon_low,
                eps_high=cfg.epsilon_high_value,
                inplace=False,
                loss_type="dapo",
                reduce=True,
                num_items_in_batch=inp.num_items,
            )
            return out[0] if isinstance(out, tuple) else out

        if not grad:
            with torch.no_grad():
                return loss(), None
        val = loss()
        g = torch.autograd.grad(val, x)[0]
        return val.detach(), g[:, :SEQ_LEN].reshape(-1, g.shape[-1])

    return fn


@dataclass(frozen=True)
class Provider:
    name: str
    build: Callable[[LogitsInputSpec, torch.device], LossFn]
    note: str = ""
    strict: bool = False
    cuda_only: bool = False
    module: str | None = None
    traffic_full: tuple[int, int] = (1, 1)


PROVIDERS: dict[str, Provider] = {
    p.name: p
    for p in (
        Provider(
            "reasonrl",
            _build_reasonrl,
            strict=True,
            note="single pass: impl='cpp' on CPU, 'triton' on CUDA; validate=False",
        ),
        Provider(
            "reasonrl-two-phase",
            _build_two_phase,
            strict=True,
            traffic_full=(2, 1),
            note="return_per_token=True: token_logprobs forward + backward around the O(N) loss",
        ),
        Provider("reference-eager", _build_eager, traffic_full=(2, 1), note="impl='reference' (autograd)"),
        Provider(
            "reference-compiled",
            _build_compiled,
            traffic_full=(2, 1),
            note="torch.compile(reference chain, dynamic=False); compiled by the gate call, not timed",
        ),
        Provider(
            "liger-triton",
            _build_liger,
            cuda_only=True,
            module="liger_kernel",
            traffic_full=(2, 1),
            note="liger_kernel triton_grpo_loss, padded [B, L+1, V] layout, no entropy",
        ),
    )
}
EAGER, COMPILED = "reference-eager", "reference-compiled"


def _oracle(spec: LogitsInputSpec, inp: LossInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss and dlogits in float64, sequence-aligned row chunks (exact: the loss is a sum of per-token terms
    whose coefficients num_items_in_batch fixes)."""
    from reasonrl.losses import LossNormalizers, policy_loss
    from reasonrl.reference import token_logprobs_reference

    cfg = _config()
    norms = LossNormalizers(num_items_in_batch=inp.num_items)
    rows_per_chunk = max(SEQ_LEN, (1 << 24) // spec.v // SEQ_LEN * SEQ_LEN)
    total = torch.zeros((), dtype=torch.float64)
    grad = torch.empty(inp.logits.shape, dtype=torch.float64, device=inp.logits.device)
    for start in range(0, spec.n, rows_per_chunk):
        rows = slice(start, min(spec.n, start + rows_per_chunk))
        seqs = slice(start // SEQ_LEN, rows.stop // SEQ_LEN)
        x = inp.logits[rows].detach().double().requires_grad_(True)
        labels = inp.labels[rows]
        out = token_logprobs_reference(
            x, labels, temperature=cfg.temperature, ignore_index=spec.ignore_index, want_entropy=True
        )
        cu = inp.cu_seqlens[seqs.start : seqs.stop + 1] - start
        loss = policy_loss(
            out.logprobs,
            advantages=inp.advantages[seqs].double(),
            mask=labels != spec.ignore_index,
            cu_seqlens=cu,
            old_logprobs=inp.old_logprobs[rows].double(),
            ref_logprobs=inp.ref_logprobs[rows].double(),
            entropies=out.entropy,
            normalizers=norms,
            config=cfg,
        ).loss
        grad[rows] = torch.autograd.grad(loss, x)[0]
        total += loss.detach().cpu()
    return total, grad


def _check(provider: Provider, loss, grad, oracle_loss, oracle_grad, dtype: str) -> dict[str, Any]:
    loss_err = abs(float(loss) - float(oracle_loss)) / max(abs(float(oracle_loss)), 1e-12)
    scale = float(oracle_grad.abs().max())
    grad_err = (
        float((grad.double() - oracle_grad).abs().max()) / max(scale, 1e-30) if grad is not None else 0.0
    )
    if provider.strict:
        bound_loss, bound_grad = 1e-5 if dtype == "float32" else 2e-3, 1e-4 if dtype == "float32" else 2e-2
    else:
        bound_loss = bound_grad = common.PEER_RTOL[dtype]
    return {
        "loss_rel_err": loss_err,
        "grad_err_rel_max": grad_err,
        "bound_loss": bound_loss,
        "bound_grad": bound_grad,
        "ok": loss_err <= bound_loss and grad_err <= bound_grad,
    }


def _memcase(payload: dict[str, Any]) -> dict[str, Any]:
    """Child side of the CPU memory measurement: fresh process; extra peak RSS of one call per mode."""
    torch.set_num_threads(payload["threads"])
    device = torch.device("cpu")
    spec = LogitsInputSpec(**payload["spec"])
    inp = LossInputs(**torch.load(payload["inputs"], weights_only=False))
    inp.logits.requires_grad_(True)
    fn = PROVIDERS[payload["provider"]].build(spec, device)
    out = {}
    for mode in payload["modes"]:
        fn(inp, mode == "full")  # warm-up (and compilation) outside the measurement
        _, delta, peak = common.peak_memory(lambda m=mode: fn(inp, m == "full"), device)
        out[mode] = {"delta_mib": delta / MIB, "peak_mib": peak / MIB}
    return out


def _log(msg: str) -> None:
    print(f"[{OP} {time.perf_counter() - _T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


def _short(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"


def _row(spec, mode, p: Provider, status, detail=""):
    return {
        "op": OP,
        "case": spec.label,
        "n": spec.n,
        "v": spec.v,
        "dtype": spec.dtype,
        "mode": mode,
        "provider": p.name,
        "status": status,
        "status_detail": detail,
        "note": p.note,
    }


def run_case(
    spec: LogitsInputSpec,
    providers: list[Provider],
    modes: list[str],
    device: torch.device,
    ceilings: dict[str, Any],
    threads: int,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    t_case = time.perf_counter()
    n_sets = common.n_rotating_sets(spec.logits_bytes, device)
    sets, record = _loss_inputs(spec, device, n_sets)
    _log(f"{spec.label}: {n_sets} input sets, {record['layout']}")
    oracle_loss, oracle_grad = _oracle(spec, sets[0])
    _log(f"{spec.label}: float64 oracle loss {float(oracle_loss):.6g}")
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    fns: dict[str, LossFn] = {}
    for p in providers:
        blocked = None
        if p.module is not None and importlib.util.find_spec(p.module) is None:
            blocked = NOT_INSTALLED, p.module
        elif p.cuda_only and device.type != "cuda":
            blocked = UNSUPPORTED, "CUDA only"
        else:
            try:
                fns[p.name] = p.build(spec, device)
            except Exception as exc:
                blocked = ERROR, _short(exc)
        if blocked is not None:
            rows.update({(p.name, m): _row(spec, m, p, *blocked) for m in modes})

    for name, fn in list(fns.items()):
        p = PROVIDERS[name]
        for mode in modes:
            row = rows[name, mode] = _row(spec, mode, p, OK)
            try:
                t0 = time.perf_counter()
                loss, grad = fn(sets[0], mode == "full")
                first_s = time.perf_counter() - t0
                check = _check(p, loss, grad, oracle_loss, oracle_grad, spec.dtype)
                del loss, grad
                row.update(
                    errors=check,
                    max_err=check["grad_err_rel_max"] if mode == "full" else check["loss_rel_err"],
                    first_call_s=first_s,
                )
                if not check["ok"]:
                    row["status"] = INCORRECT
                    continue
                timing = common.time_fn(
                    lambda k, m=mode, f=fn: f(sets[k], m == "full"),
                    n_sets,
                    device,
                    grad_to_none=[s.logits for s in sets],
                    prior_calls=1,
                    prior_s=first_s,
                )
            except torch.OutOfMemoryError as exc:
                row.update(status=OOM, status_detail=_short(exc))
                continue
            except Exception as exc:
                row.update(status=ERROR, status_detail=_short(exc))
                continue
            reads, writes = (
                k * spec.logits_bytes for k in (TRAFFIC["fwd"] if mode == "fwd" else p.traffic_full)
            )
            floor = common.floor_ms(
                spec.logits_bytes * TRAFFIC[mode][0], spec.logits_bytes * TRAFFIC[mode][1], ceilings, device
            )
            row.update(
                median_ms=timing.median_ms,
                p20_ms=timing.p20_ms,
                p80_ms=timing.p80_ms,
                repeats=timing.repeats,
                warmups=timing.warmups,
                timing_method=timing.method,
                bytes=reads + writes,
                unit="GB/s",
                throughput=(reads + writes) / timing.median_ms / 1e6,
                floor_ms=floor,
                pct_ceiling=100 * floor / timing.median_ms,
            )
            _log(f"{spec.label}: {name} {mode} {timing.median_ms:.1f} ms")

    measured = [n for n in fns if any(rows[n, m]["status"] == OK for m in modes)]
    with tempfile.TemporaryDirectory(prefix="reasonrl-bench-", dir=common.scratch_dir()) as tmp:
        path = Path(tmp) / "inputs.pt"
        if device.type == "cpu" and measured:
            inp = sets[0]
            torch.save({k: (v.detach() if torch.is_tensor(v) else v) for k, v in asdict(inp).items()}, path)
        for name in measured:
            if device.type == "cuda":
                mem = {}
                for mode in modes:
                    _, delta, peak = common.peak_memory(
                        lambda m=mode, f=fns[name]: f(sets[0], m == "full"), device
                    )
                    mem[mode] = {"delta_mib": delta / MIB, "peak_mib": peak / MIB}
                method = "torch.cuda.max_memory_allocated - allocated before (incremental)"
            else:
                mem = common.run_memory_subprocess(
                    MODULE,
                    {
                        "provider": name,
                        "spec": asdict(spec),
                        "inputs": str(path),
                        "threads": threads,
                        "modes": modes,
                    },
                )
                method = "peak RSS (VmHWM) - RSS before, fresh subprocess per provider and case"
            for mode in modes:
                row = rows[name, mode]
                if "error" in mem:
                    row["mem_error"] = mem["error"]
                else:
                    row.update(
                        mem_delta_mib=mem[mode]["delta_mib"],
                        mem_peak_mib=mem[mode]["peak_mib"],
                        mem_method=method,
                        mem_vs_logits=mem[mode]["delta_mib"] * MIB / spec.logits_bytes,
                    )
            _log(
                f"{spec.label}: {name} memory {mem.get('error') or {m: round(mem[m]['delta_mib']) for m in modes}}"
            )
    record["wall_s"] = time.perf_counter() - t_case
    order = {p.name: i for i, p in enumerate(providers)}
    return sorted(rows.values(), key=lambda r: (MODES.index(r["mode"]), order[r["provider"]])), record


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__.split("\n")[0])
    ap.add_argument(
        "--profile",
        choices=sorted(PROFILES),
        default="quick",
        help="quick: fp32 [4096, 32000] on CPU (the issue's acceptance shape), bf16 [16384, 151936] "
        "on CUDA; full: more shapes",
    )
    ap.add_argument(
        "--providers", default=",".join(PROVIDERS), help=f"comma-separated subset of {', '.join(PROVIDERS)}"
    )
    ap.add_argument("--modes", default="full", help="comma-separated subset of fwd,full (default: full)")
    ap.add_argument("--out-dir", type=Path, default=common.DEFAULT_OUT_DIR)
    ap.add_argument("--threads", type=int, help=f"torch CPU threads (default on CPU: {DEFAULT_CPU_THREADS})")
    ap.add_argument("--_memcase", help=argparse.SUPPRESS)
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args, _unknown = _parser().parse_known_args(argv)
    if args._memcase:
        common.emit_memcase_result(_memcase(json.loads(args._memcase)))
        return 0
    device = common.pick_device()
    threads = args.threads or (DEFAULT_CPU_THREADS if device.type == "cpu" else torch.get_num_threads())
    torch.set_num_threads(threads)
    providers = [PROVIDERS[n] for n in args.providers.split(",") if n]
    modes = [m for m in args.modes.split(",") if m]
    report = common.new_report(OP, device, PEER_DISTS, args.profile, argv)
    report["ceilings"] = common.measure_ceilings(device)
    report["workload"] = {
        "config": repr(_config()),
        "seq_len": SEQ_LEN,
        "modes": modes,
        "traffic_nvb": {p.name: p.traffic_full for p in providers},
    }
    t_start = time.perf_counter()
    for n, v, dtype in PROFILES[args.profile][device.type]:
        spec = LogitsInputSpec(n=n, v=v, dtype=dtype)
        rows, record = run_case(spec, providers, modes, device, report["ceilings"], threads)
        report["rows"] += rows
        report["cases"].append(record)
    common.fill_speedups(report["rows"], EAGER, COMPILED)
    report["wall_s"] = time.perf_counter() - t_start
    paths = common.write_results(report, args.out_dir, device)
    common.print_tables(report["rows"], report)
    print(f"wrote {', '.join(str(p) for p in paths.values())} ({report['wall_s']:.0f} s)")
    failed = [
        r
        for r in report["rows"]
        if r["provider"].startswith("reasonrl") and r["status"] in (INCORRECT, ERROR)
    ]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
