"""Benchmark of the policy loss from hidden states and the lm_head (losses.md 13.1, the fused-linear loss).

Same workload and loss as bench/bench_policy_loss.py (DAPO + k3 KL, temperature 0.9, packed sequences of 256
tokens, ~10% ignored rows, ``num_items_in_batch`` given), but the inputs are ``hidden [N, H]`` and the lm_head
``weight [V, H]``: the training step computes the loss and the gradients of hidden and weight.

Providers (side by side in one run):

* ``reasonrl``: ``policy_loss_from_hidden``, ``impl="cpp"`` (CPU: per row chunk, the logits GEMM, the fused row
  pass in place, then the grad_hidden / grad_weight GEMMs: 3 GEMMs, 6NVH) or ``"triton"`` (CUDA: 8NVH).
* ``reasonrl-two-phase``: ``return_per_token=True``: ``linear_token_logprobs`` forward, the loss with
  autograd, its backward with recompute (4 GEMMs, 8NVH).
* ``reference-eager`` / ``reference-compiled``: fp32 ``hidden @ weight.T``, then the reference token_logprobs
  and loss, autograd; the compiled one under ``torch.compile(dynamic=False)`` (compiled by the gate call).
* ``liger-chunked``: Liger-Kernel's ``LigerFusedLinearGRPOLoss`` (DAPO, beta 0.04, precomputed old and ref
  log-probs, padded [B, 256, H] layout); it computes no entropy.

Correctness gate: loss, grad_hidden and grad_weight of set 0 against the float64 oracle (fp64 matmul and
reference chain, one sequence-aligned row chunk at a time); reasonrl within 1e-5 (loss) / 1e-4 x max|grad|,
the others within the peer bound. Throughput counts 6NVH (the FLOP of 3 GEMMs) for every provider.

Usage: ``python -m reasonrl.bench.bench_policy_loss_hidden --profile quick``.
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
from .bench_linear import LinearSpec, gemm_ceiling, make_inputs
from .bench_policy_loss import SEQ_LEN, _config
from .common import ERROR, INCORRECT, MIB, NOT_INSTALLED, OK, OOM

OP = "policy_loss_from_hidden"
MODULE = __spec__.name if __spec__ else __name__  # the memory subprocesses run `python -m MODULE`
PEER_DISTS = ("liger-kernel", "trl", "transformers")
DEFAULT_CPU_THREADS = 2
PROFILES: dict[str, dict[str, list[tuple[int, int, int, str]]]] = {
    "quick": {"cpu": [(2048, 512, 32000, "float32")], "cuda": [(16384, 4096, 151936, "bfloat16")]},
    "full": {"cpu": [(8192, 512, 32000, "float32")], "cuda": [(8192, 4096, 151936, "bfloat16"),
                                                             (16384, 4096, 151936, "bfloat16")]},
}
_T0 = time.perf_counter()


@dataclass
class HiddenLossInputs:
    hidden: torch.Tensor  # [N, H], requires grad
    weight: torch.Tensor  # [V, H], requires grad (shared by every set)
    labels: torch.Tensor
    cu_seqlens: torch.Tensor
    advantages: torch.Tensor  # [N / 256]
    old_logprobs: torch.Tensor
    ref_logprobs: torch.Tensor
    num_items: int


def _inputs(spec: LinearSpec, device: torch.device, n_sets: int):
    from reasonrl import linear_token_logprobs

    sets, record = make_inputs(spec, device, n_sets)
    weight = sets[0].weight.detach().clone().requires_grad_(True)
    out = []
    for k, s in enumerate(sets):
        gen = torch.Generator(device=device).manual_seed(2000 + k)
        with torch.no_grad():
            lp = linear_token_logprobs(s.hidden, s.weight, s.labels, temperature=spec.temperature,
                                       ignore_index=spec.ignore_index, validate=False).logprobs
        old = lp + 0.1 * torch.randn(spec.n, generator=gen, device=device)
        ref = old - 0.05 * torch.randn(spec.n, generator=gen, device=device).abs()
        out.append(HiddenLossInputs(
            hidden=s.hidden.detach().clone().requires_grad_(True), weight=weight, labels=s.labels,
            cu_seqlens=torch.arange(0, spec.n + 1, SEQ_LEN, device=device),
            advantages=torch.randn(spec.n // SEQ_LEN, generator=gen, device=device),
            old_logprobs=old.float(), ref_logprobs=ref.float(), num_items=int(s.valid.sum())))
    return out, record


# fn(inputs, grad) -> (loss, grad_hidden or None, grad_weight or None)
LossFn = Callable[[HiddenLossInputs, bool], tuple]


def _runner(loss_of) -> LossFn:
    def fn(inp: HiddenLossInputs, grad: bool):
        if not grad:
            with torch.no_grad():
                return loss_of(inp), None, None
        loss = loss_of(inp)
        gh, gw = torch.autograd.grad(loss, [inp.hidden, inp.weight])
        return loss.detach(), gh, gw

    return fn


def _reasonrl(two_phase: bool):
    def build(spec: LinearSpec, device: torch.device) -> LossFn:
        from reasonrl.losses import LossNormalizers, policy_loss_from_hidden

        cfg, impl = _config(), "triton" if device.type == "cuda" else "cpp"
        return _runner(lambda i: policy_loss_from_hidden(
            i.hidden, i.weight, i.labels, advantages=i.advantages, cu_seqlens=i.cu_seqlens,
            old_logprobs=i.old_logprobs, ref_logprobs=i.ref_logprobs,
            normalizers=LossNormalizers(num_items_in_batch=i.num_items), config=cfg, ignore_index=spec.ignore_index,
            impl=impl, validate=False, return_per_token=two_phase).loss)

    return build


def _reference_loss(spec: LinearSpec):
    from reasonrl.losses import LossNormalizers, policy_loss_from_logits

    cfg = _config()

    def loss_of(hidden, weight, labels, advantages, cu_seqlens, old, ref, num_items):
        logits = hidden.float() @ weight.float().T
        return policy_loss_from_logits(
            logits, labels, advantages=advantages, cu_seqlens=cu_seqlens, old_logprobs=old, ref_logprobs=ref,
            normalizers=LossNormalizers(num_items_in_batch=num_items), config=cfg, ignore_index=spec.ignore_index,
            impl="reference", validate=False).loss

    return loss_of


def _build_eager(spec, device):
    f = _reference_loss(spec)
    return _runner(lambda i: f(i.hidden, i.weight, i.labels, i.advantages, i.cu_seqlens, i.old_logprobs,
                               i.ref_logprobs, i.num_items))


def _build_compiled(spec, device):
    torch._dynamo.reset()
    f = torch.compile(_reference_loss(spec), dynamic=False)
    return _runner(lambda i: f(i.hidden, i.weight, i.labels, i.advantages, i.cu_seqlens, i.old_logprobs,
                               i.ref_logprobs, i.num_items))


def _build_liger(spec, device):
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    cfg = _config()
    loss_fn = LigerFusedLinearGRPOLoss(beta=cfg.beta, use_ref_model=True, loss_type="dapo",
                                       epsilon_low=cfg.epsilon_low, epsilon_high=cfg.epsilon_high_value,
                                       temperature=cfg.temperature)

    def loss_of(i: HiddenLossInputs):
        b = i.advantages.shape[0]
        mask = (i.labels != spec.ignore_index).view(b, -1).to(i.hidden.dtype)
        loss, _ = loss_fn(i.hidden.view(b, -1, spec.h), i.weight, i.labels.clamp_min(0).view(b, -1), mask,
                          i.advantages, ref_per_token_logps=i.ref_logprobs.view(b, -1),
                          old_per_token_logps=i.old_logprobs.view(b, -1), num_items_in_batch=i.num_items)
        return loss

    return _runner(loss_of)


@dataclass(frozen=True)
class Provider:
    name: str
    build: Callable[[LinearSpec, torch.device], LossFn]
    note: str = ""
    strict: bool = False
    module: str | None = None


PROVIDERS: dict[str, Provider] = {p.name: p for p in (
    Provider("reasonrl", _reasonrl(False), strict=True,
             note="single pass: cpp = 3 GEMMs per row chunk with the fused row pass in place; triton = 8NVH"),
    Provider("reasonrl-two-phase", _reasonrl(True), strict=True,
             note="return_per_token=True: linear_token_logprobs + loss + backward with recompute (4 GEMMs)"),
    Provider("reference-eager", _build_eager, note="fp32 matmul + reference token_logprobs + reference loss"),
    Provider("reference-compiled", _build_compiled,
             note="torch.compile of the eager chain, dynamic=False; compiled by the gate call, not timed"),
    Provider("liger-chunked", _build_liger, module="liger_kernel",
             note="liger_kernel LigerFusedLinearGRPOLoss (dapo, beta 0.04, precomputed old/ref); no entropy"),
)}
EAGER, COMPILED = "reference-eager", "reference-compiled"


def _oracle(spec: LinearSpec, inp: HiddenLossInputs):
    from reasonrl.losses import LossNormalizers, policy_loss
    from reasonrl.reference import token_logprobs_reference

    cfg = _config()
    norms = LossNormalizers(num_items_in_batch=inp.num_items)
    w = inp.weight.detach().double().requires_grad_(True)
    total, grad_h = torch.zeros((), dtype=torch.float64), torch.empty(inp.hidden.shape, dtype=torch.float64)
    rows_per_chunk = max(SEQ_LEN, (1 << 24) // spec.v // SEQ_LEN * SEQ_LEN)
    grad_w = torch.zeros_like(w)
    for start in range(0, spec.n, rows_per_chunk):
        rows = slice(start, min(spec.n, start + rows_per_chunk))
        seqs = slice(start // SEQ_LEN, rows.stop // SEQ_LEN)
        h = inp.hidden[rows].detach().double().requires_grad_(True)
        labels = inp.labels[rows]
        out = token_logprobs_reference(h @ w.T, labels, temperature=cfg.temperature, ignore_index=spec.ignore_index,
                                       want_entropy=True)
        loss = policy_loss(out.logprobs, advantages=inp.advantages[seqs].double(),
                           mask=labels != spec.ignore_index, cu_seqlens=inp.cu_seqlens[seqs.start:seqs.stop + 1] - start,
                           old_logprobs=inp.old_logprobs[rows].double(), ref_logprobs=inp.ref_logprobs[rows].double(),
                           entropies=out.entropy, normalizers=norms, config=cfg).loss
        gh, gw = torch.autograd.grad(loss, [h, w])
        grad_h[rows], grad_w = gh, grad_w + gw
        total += loss.detach()
    return total, grad_h, grad_w


def _errors(p: Provider, result, oracle, dtype: str) -> dict[str, Any]:
    loss, gh, gw = result
    o_loss, o_gh, o_gw = oracle
    errs = {"loss": abs(float(loss) - float(o_loss)) / max(abs(float(o_loss)), 1e-12)}
    if gh is not None:
        errs["grad_hidden"] = float((gh.double() - o_gh).abs().max()) / max(float(o_gh.abs().max()), 1e-30)
        errs["grad_weight"] = float((gw.double() - o_gw).abs().max()) / max(float(o_gw.abs().max()), 1e-30)
    bounds = ({"loss": 1e-5, "grad_hidden": 1e-4, "grad_weight": 1e-4} if p.strict and dtype == "float32"
              else {k: common.PEER_RTOL[dtype] for k in ("loss", "grad_hidden", "grad_weight")})
    return {"errors": errs, "bounds": bounds, "ok": all(errs[k] <= bounds[k] for k in errs)}


def _memcase(payload: dict[str, Any]) -> dict[str, Any]:
    torch.set_num_threads(payload["threads"])
    device = torch.device("cpu")
    spec = LinearSpec(**payload["spec"])
    d = torch.load(payload["inputs"], weights_only=False)
    inp = HiddenLossInputs(**d)
    inp.hidden.requires_grad_(True)
    inp.weight.requires_grad_(True)
    fn = PROVIDERS[payload["provider"]].build(spec, device)
    fn(inp, True)  # warm-up (and compilation) outside the measurement
    _, delta, peak = common.peak_memory(lambda: fn(inp, True), device)
    return {"delta_mib": delta / MIB, "peak_mib": peak / MIB}


def _log(msg: str) -> None:
    print(f"[{OP} {time.perf_counter() - _T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


def run_case(spec: LinearSpec, providers: list[Provider], device: torch.device, threads: int, ceiling: dict):
    t_case = time.perf_counter()
    sets, record = _inputs(spec, device, n_sets=2)
    oracle = _oracle(spec, sets[0])
    _log(f"{spec.label}: float64 oracle loss {float(oracle[0]):.6g}")
    flops = 6 * spec.n * spec.v * spec.h
    rows: list[dict[str, Any]] = []
    fns: dict[str, LossFn] = {}
    for p in providers:
        row = {"op": OP, "case": spec.label, "n": spec.n, "v": spec.v, "dtype": spec.dtype, "mode": "full",
               "provider": p.name, "status": OK, "status_detail": "", "note": p.note}
        rows.append(row)
        if p.module is not None and importlib.util.find_spec(p.module) is None:
            row.update(status=NOT_INSTALLED, status_detail=p.module)
            continue
        try:
            fn = p.build(spec, device)
            t0 = time.perf_counter()
            check = _errors(p, fn(sets[0], True), oracle, spec.dtype)
            first_s = time.perf_counter() - t0
            row.update(errors=check, max_err=max(check["errors"].values()), first_call_s=first_s)
            if not check["ok"]:
                row["status"] = INCORRECT
                continue
            timing = common.time_fn(lambda k, f=fn: f(sets[k], True), len(sets), device, prior_calls=1,
                                    prior_s=first_s)
        except torch.OutOfMemoryError as exc:
            row.update(status=OOM, status_detail=str(exc).splitlines()[0][:160])
            continue
        except Exception as exc:  # a broken peer must not take the run down
            row.update(status=ERROR, status_detail=f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}")
            continue
        fns[p.name] = fn
        row.update(median_ms=timing.median_ms, p20_ms=timing.p20_ms, p80_ms=timing.p80_ms, repeats=timing.repeats,
                   timing_method=timing.method, unit="GFLOP/s", throughput=flops / timing.median_ms / 1e6,
                   floor_ms=flops / (ceiling["gemm_gflops"] * 1e6), pct_ceiling=100 * flops / timing.median_ms / 1e6
                   / ceiling["gemm_gflops"])
        _log(f"{spec.label}: {p.name} {timing.median_ms:.0f} ms")
    with tempfile.TemporaryDirectory(prefix="reasonrl-bench-", dir=common.scratch_dir()) as tmp:
        path = Path(tmp) / "inputs.pt"
        torch.save({k: (v.detach() if torch.is_tensor(v) else v) for k, v in asdict(sets[0]).items()}, path)
        for row in rows:
            if row["status"] != OK:
                continue
            if device.type == "cuda":
                _, delta, peak = common.peak_memory(lambda r=row: fns[r["provider"]](sets[0], True), device)
                mem = {"delta_mib": delta / MIB, "peak_mib": peak / MIB}
            else:
                mem = common.run_memory_subprocess(MODULE, {"provider": row["provider"], "spec": asdict(spec),
                                                            "inputs": str(path), "threads": threads})
            if "error" in mem:
                row["mem_error"] = mem["error"]
            else:
                row.update(mem_delta_mib=mem["delta_mib"], mem_peak_mib=mem["peak_mib"])
            _log(f"{spec.label}: {row['provider']} memory {mem}")
    record["wall_s"] = time.perf_counter() - t_case
    return rows, record


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__.split("\n")[0])
    ap.add_argument("--profile", choices=sorted(PROFILES), default="quick",
                    help="quick: fp32 [2048, 512, 32000] on CPU; full: the issue's [8192, 512, 32000]")
    ap.add_argument("--providers", default=",".join(PROVIDERS))
    ap.add_argument("--out-dir", type=Path, default=common.DEFAULT_OUT_DIR)
    ap.add_argument("--threads", type=int)
    ap.add_argument("--_memcase", help=argparse.SUPPRESS)
    args, _unknown = ap.parse_known_args(argv)
    if args._memcase:
        common.emit_memcase_result(_memcase(json.loads(args._memcase)))
        return 0
    device = common.pick_device()
    threads = args.threads or (DEFAULT_CPU_THREADS if device.type == "cpu" else torch.get_num_threads())
    torch.set_num_threads(threads)
    providers = [PROVIDERS[n] for n in args.providers.split(",") if n]
    report = common.new_report(OP, device, PEER_DISTS, args.profile, argv)
    report["ceilings"] = common.measure_ceilings(device)
    report["workload"] = {"config": repr(_config()), "seq_len": SEQ_LEN, "flops": "6NVH for every provider"}
    t_start = time.perf_counter()
    for n, h, v, dtype in PROFILES[args.profile][device.type]:
        spec = LinearSpec(n=n, h=h, v=v, dtype=dtype)
        ceiling = gemm_ceiling(spec, device)
        report["ceilings"]["gemm"] = ceiling
        rows, record = run_case(spec, providers, device, threads, ceiling)
        report["rows"] += rows
        report["cases"].append(record)
    common.fill_speedups(report["rows"], EAGER, COMPILED)
    report["wall_s"] = time.perf_counter() - t_start
    paths = common.write_results(report, args.out_dir, device)
    common.print_tables(report["rows"], report)
    print(f"wrote {', '.join(str(p) for p in paths.values())} ({report['wall_s']:.0f} s)")
    failed = [r for r in report["rows"] if r["provider"].startswith("reasonrl") and r["status"] in (INCORRECT, ERROR)]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
