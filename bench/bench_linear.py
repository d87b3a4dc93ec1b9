"""Benchmark of ``linear_token_logprobs`` (docs/ops.md section 3) following docs/performance.md section 4.

Workload: log-prob + entropy of sampled labels at temperature 0.9 straight from hidden states ``[N, H]`` and
an lm_head ``[V, H]`` (no bias), ~10% of rows ``ignore_index``; the backward takes random upstream gradients
on both outputs and produces the gradients of hidden and weight.

Providers (a missing one is a row saying why, never dropped):

* ``reasonrl``: ``linear_token_logprobs(impl="cpp")`` on CPU, ``validate=False`` (Triton on CUDA once it
  exists; until then the row says unsupported), with the library's default budget of kept logits
  (``saved_logits_bytes``: 0 unless ``REASONRL_SAVED_LOGITS_BYTES`` or ``set_saved_logits_bytes`` set
  one).
* ``reasonrl-keep25`` / ``-keep50`` / ``-keep100``: the same with ``saved_logits_bytes`` = 25% / 50% / 100% of
  the ``N x V`` fp32 logits (docs/ops.md 3.4): the forward keeps whole chunks of logits within that budget and
  the backward skips their recompute (6NVH for those rows instead of 8NVH). Their ``full`` rows are the
  time / memory curve of the budget; their ``fwd`` rows equal ``reasonrl``'s (nothing is kept without grad).
* ``reference-eager``: ``hidden.float() @ weight.float().T`` then ``token_logprobs_reference``
  (``reasonrl.reference.linear_token_logprobs_reference``): materialises the [N, V] logits.
* ``reference-compiled``: the same function under ``torch.compile(dynamic=False)``, compiled by the gate
  calls.
* ``trl-chunked``: TRL's own fused lm_head log-prob + entropy, ``trl.kernels.ChunkedLogProbFunction`` (torch
  tiles of [4096, 32768] on CPU, TRL's default vocabulary chunk). As TRL does off Triton devices, every row is
  scored (label clamped to 0 on ignored rows, which are excluded from the check).
* ``liger-grpo``: ``liger_kernel.chunked_loss.LigerFusedLinearGRPOLoss`` (beta 0, "dapo", on-policy ratio 1,
  per-sequence advantages, the rows viewed as [N / 256, 256] sequences). It returns a loss, not log-probs and
  no entropy: its ``fwd`` row is the loss without autograd, its gradients are checked against the oracle's
  gradients for the equivalent upstream gradient ``g_lp = -A_b mask / sum(mask)``.

Modes: ``fwd`` (no autograd: old-policy / reference log-probs) and ``full`` (training forward + backward).

Correctness gate: every provider runs both modes once on input set 0 and is compared with the float64 oracle
(fp64 matmul then the reference, row block by row block) over valid rows: reasonrl within
docs/ops.md section 8, peers within ``bench.accuracy.peer_bound``. Throughput counts 2 N V H FLOP for ``fwd``
and 8 N V H for ``full`` (forward, recomputed logits, two gradient GEMMs; what a fused kernel does) for every
provider, against the measured GEMM ceiling (``at::mm`` at [1024, H] x [H, V], preallocated output).

Usage: ``python -m reasonrl.bench.bench_linear --profile quick``.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from reasonrl.reference import linear_token_logprobs_reference

from . import harness
from .accuracy import MaxError, acceptance_bound, peer_bound
from .ceilings import gemm_ceiling
from .harness import GateRun, Verdict, Work
from .inputs import DTYPES, LinearInputs, LinearSpec, make_linear_inputs, row_chunks
from .memory import peak_memory

OP = "linear_token_logprobs"
MODULE = __spec__.name if __spec__ else __name__  # the memory subprocesses run `python -m MODULE`
MODES = ("fwd", "full")
FLOPS_NVH = {"fwd": 2, "full": 8}
PEER_DISTS = ("trl", "liger-kernel", "transformers")
SEQ_LEN = 256  # rows per sequence for Liger's [B, T] layout

# (N, H, V, dtype) per profile and device type. CPU full is the acceptance shape of issue 4; quick is a
# quarter of it (~1-2 minutes with every provider on 2 cores).
PROFILES: dict[str, dict[str, list[tuple[int, int, int, str]]]] = {
    "quick": {"cpu": [(2048, 512, 32000, "float32")], "cuda": [(8192, 4096, 151936, "bfloat16")]},
    "full": {"cpu": [(8192, 512, 32000, "float32")], "cuda": [(16384, 4096, 151936, "bfloat16")]},
}


# ----------------------------------------------------------------------------------------------------------
# Providers: fn(inp, hidden, weight) -> (logprobs or loss, entropy or None)
# ----------------------------------------------------------------------------------------------------------

ProviderFn = Callable[[LinearInputs, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]]


def _reference(spec: LinearSpec):
    def fn(inp, hidden, weight):
        out = linear_token_logprobs_reference(hidden, weight, inp.labels, temperature=spec.temperature,
                                              ignore_index=spec.ignore_index, want_entropy=True)
        return out.logprobs, out.entropy

    return fn


def _build_reasonrl(spec: LinearSpec, device: torch.device, keep: float | None = None) -> ProviderFn:
    """``keep``: the ``saved_logits_bytes`` budget as a fraction of the N x V fp32 logits (None: the library
    default)."""
    from reasonrl import linear_token_logprobs

    budget = None if keep is None else int(keep * spec.n * spec.v * 4)

    def fn(inp, hidden, weight):
        out = linear_token_logprobs(hidden, weight, inp.labels, temperature=spec.temperature,
                                    ignore_index=spec.ignore_index, want_entropy=True, validate=False,
                                    saved_logits_bytes=budget,
                                    impl="cpp" if device.type == "cpu" else "triton")
        return out.logprobs, out.entropy

    return fn


def _build_keep(keep: float):
    def build(spec: LinearSpec, device: torch.device) -> ProviderFn:
        return _build_reasonrl(spec, device, keep)

    return build


KEEP_FRACTIONS = (0.25, 0.5, 1.0)  # the reasonrl-keep<percent> providers


def _build_eager(spec: LinearSpec, device: torch.device) -> ProviderFn:
    return _reference(spec)


def _build_compiled(spec: LinearSpec, device: torch.device) -> ProviderFn:
    torch._dynamo.reset()
    return torch.compile(_reference(spec), dynamic=False)


def _build_trl(spec: LinearSpec, device: torch.device) -> ProviderFn:
    from trl.kernels import ChunkedLogProbFunction

    def fn(inp, hidden, weight):
        lp, ent, *_ = ChunkedLogProbFunction.apply(hidden, weight, None, inp.labels.clamp_min(0),
                                                   spec.temperature, 32768, None, 1.0, ("entropy",))
        return lp, ent

    return fn


def _build_liger(spec: LinearSpec, device: torch.device) -> ProviderFn:
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    loss_fn = LigerFusedLinearGRPOLoss(beta=0.0, use_ref_model=False, loss_type="dapo",
                                       temperature=spec.temperature)

    def fn(inp, hidden, weight):
        b = inp.advantages.shape[0]
        mask = inp.valid.view(b, -1).to(hidden.dtype)
        loss, _ = loss_fn(hidden.view(b, -1, spec.h), weight, inp.labels.clamp_min(0).view(b, -1), mask,
                          inp.advantages)
        return loss, None

    return fn


def _liger_upstream(inp: LinearInputs) -> torch.Tensor:
    """d loss / d logprob of Liger's dapo loss at ratio 1, beta 0: -A_b mask / sum(mask)."""
    b = inp.advantages.shape[0]
    mask = inp.valid.view(b, -1).float()
    return (-inp.advantages[:, None] * mask / mask.sum().clamp_min(1)).reshape(-1)


def _reasonrl_unavailable(device: torch.device, dtype: torch.dtype) -> str | None:
    if device.type != "cpu":
        return "the Triton linear_token_logprobs kernels are not written yet"
    from reasonrl._backend import unavailable_reason

    return unavailable_reason("cpp", device, dtype)


@dataclass(frozen=True)
class Provider(harness.Provider):
    loss_only: bool = False  # Liger: a scalar loss, gradients from it


PROVIDERS: dict[str, Provider] = {p.name: p for p in (
    Provider("reasonrl", _build_reasonrl, note="linear_token_logprobs impl='cpp' (default 64 MiB workspace)",
             strict=True, unavailable=_reasonrl_unavailable),
    *(Provider(f"reasonrl-keep{round(100 * k)}", _build_keep(k), strict=True,
               unavailable=_reasonrl_unavailable,
               note=f"linear_token_logprobs impl='cpp', saved_logits_bytes = {100 * k:g}% of the N x V fp32 "
                    "logits (docs/ops.md 3.4)")
      for k in KEEP_FRACTIONS),
    Provider("reference-eager", _build_eager, note="fp32 matmul + token_logprobs_reference"),
    Provider("reference-compiled", _build_compiled,
             note="torch.compile(matmul + reference, dynamic=False); compiled by the gate calls, not timed"),
    Provider("trl-chunked", _build_trl, module="trl",
             note="trl.kernels.ChunkedLogProbFunction (torch tiles on CPU, chunk 32768); every row scored"),
    Provider("liger-grpo", _build_liger, loss_only=True, module="liger_kernel",
             note="LigerFusedLinearGRPOLoss(beta=0, dapo): loss only, no entropy; grads checked vs the "
                  "equivalent upstream"),
)}
EAGER, COMPILED = "reference-eager", "reference-compiled"


# ----------------------------------------------------------------------------------------------------------
# Running, checking, timing
# ----------------------------------------------------------------------------------------------------------


def _upstream(p: Provider, inp: LinearInputs, outs) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    lp, ent = outs
    if p.loss_only:
        return [lp], [torch.ones_like(lp)]
    return [lp, ent], [inp.grad_logprobs, inp.grad_entropy]


def _train(p: Provider, fn: ProviderFn, inp: LinearInputs):
    """Training forward + backward: (outputs, (grad_hidden, grad_weight))."""
    hidden = inp.hidden.detach().requires_grad_(True)
    weight = inp.weight.detach().requires_grad_(True)
    outs = fn(inp, hidden, weight)
    targets, grads = _upstream(p, inp, outs)
    return outs, torch.autograd.grad(targets, [hidden, weight], grads)


def _infer(fn: ProviderFn, inp: LinearInputs):
    with torch.no_grad():
        return fn(inp, inp.hidden, inp.weight)


def _oracle(spec: LinearSpec, inp: LinearInputs, compute_dtype: torch.dtype, liger: bool) -> dict[str, Any]:
    """The reference in ``compute_dtype`` (float64: the oracle), row block by row block so no [N, V] tensor of
    the whole batch exists; grad_weight is accumulated over the blocks."""
    weight = inp.weight.detach().to(compute_dtype).requires_grad_(True)
    res: dict[str, Any] = {"lp": [], "H": [], "gh": [], "gh_liger": []}
    gw = torch.zeros_like(weight)
    gw_liger = torch.zeros_like(weight)
    g_liger = _liger_upstream(inp) if liger else None
    for rows in row_chunks(spec.n, spec.v, max_elems=1 << 24):
        h = inp.hidden[rows].detach().to(compute_dtype).requires_grad_(True)
        out = linear_token_logprobs_reference(h, weight, inp.labels[rows], temperature=spec.temperature,
                                              ignore_index=spec.ignore_index, want_entropy=True,
                                              compute_dtype=compute_dtype)
        res["lp"].append(out.logprobs.detach())
        res["H"].append(out.entropy.detach())
        gh, gwb = torch.autograd.grad([out.logprobs, out.entropy], [h, weight],
                                      [inp.grad_logprobs[rows].to(compute_dtype),
                                       inp.grad_entropy[rows].to(compute_dtype)], retain_graph=liger)
        res["gh"].append(gh)
        gw += gwb
        if liger:
            gh2, gw2 = torch.autograd.grad(out.logprobs, [h, weight], g_liger[rows].to(compute_dtype))
            res["gh_liger"].append(gh2)
            gw_liger += gw2
    return {"lp": torch.cat(res["lp"]), "H": torch.cat(res["H"]), "gh": torch.cat(res["gh"]), "gw": gw,
            "gh_liger": torch.cat(res["gh_liger"]) if liger else None,
            "gw_liger": gw_liger if liger else None}


def _check(spec: LinearSpec, inp: LinearInputs,
           results: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Errors against the fp64 oracle and the bound each provider is held to (per check key)."""
    dtype = DTYPES[spec.dtype]
    liger = any(PROVIDERS[name].loss_only for name in results)
    oracle = _oracle(spec, inp, torch.float64, liger)
    # err(reference) of docs/ops.md section 8: the eager reference's own results when it ran (fp32 inputs),
    # else the reference block by block in fp32.
    eager = results.get(EAGER)
    if eager is None or spec.dtype != "float32":
        r32 = _oracle(spec, inp, torch.float32, liger)
        ref = {"lp": r32["lp"], "H": r32["H"], "gh": r32["gh"], "gw": r32["gw"]}
    else:
        ref = {"lp": eager["train"][0][0], "H": eager["train"][0][1], "gh": eager["train"][1][0],
               "gw": eager["train"][1][1]}
    ref_err = {}
    for key in ("lp", "H", "gh", "gw"):
        e = MaxError()
        rows = inp.valid if key in ("lp", "H", "gh") else torch.ones(ref[key].shape[0], dtype=torch.bool)
        e.update(ref[key], oracle[key], rows)
        ref_err[key] = e.err
    checks: dict[str, dict[str, Any]] = {}
    for name, res in results.items():
        p = PROVIDERS[name]
        checks[name] = {}
        items = []
        if not p.loss_only:
            for tag in ("fwd", "train"):
                lp, ent = res[tag][0] if tag == "train" else res[tag]
                items += [(f"{tag}:logprobs", lp, "lp", "stat"), (f"{tag}:entropy", ent, "H", "stat")]
        gh, gw = res["train"][1]
        suffix = "_liger" if p.loss_only else ""
        items += [("train:grad_hidden", gh, "gh" + suffix, "grad"),
                  ("train:grad_weight", gw, "gw" + suffix, "grad")]
        for key, got, okey, kind in items:
            e = MaxError()
            per_row = okey in ("lp", "H", "gh", "gh_liger")  # grad_weight: every row of [V, H]
            rows = inp.valid if per_row else torch.ones(got.shape[0], dtype=torch.bool)
            e.update(got.float(), oracle[okey], rows)
            base = okey.removesuffix("_liger")
            # The gradient rule of docs/ops.md 8 is relative to the gradient's own
            # size (grad_param of the table).
            scale = 1 + e.max_oracle if kind == "stat" else e.max_oracle
            err_ref = ref_err[base] if not p.loss_only else 0.0
            bound = acceptance_bound("stat" if kind == "stat" else "grad_param", dtype, err_ref, scale)
            if not p.strict:
                bound = peer_bound(bound, scale, spec.dtype)
            checks[name][key] = {"err": e.err, "bound": bound, "err_reference_fp32": err_ref,
                                 "max_abs_oracle": e.max_oracle, "ok": e.err <= bound}
    return checks


def _verdict(check: dict[str, dict[str, Any]], mode: str) -> tuple[bool, float | None]:
    keys = [k for k in check if k.startswith("fwd:" if mode == "fwd" else "train:")]
    if not keys:  # Liger's fwd: no log-probs to check, its loss is checked through the gradients
        keys = [k for k in check if k.startswith("train:")]
    return all(check[k]["ok"] for k in keys), max(check[k]["err"] for k in keys)



def _detach(ts: tuple) -> tuple:
    return tuple(t.detach() if t is not None else None for t in ts)


def _gate_call(p: Provider, fn: ProviderFn, inp: LinearInputs) -> GateRun:
    """Both passes on input set 0 whatever the modes (the check reads the log-probs of both)."""
    t0 = time.perf_counter()
    fwd = _infer(fn, inp)
    t1 = time.perf_counter()
    outs, grads = _train(p, fn, inp)
    t2 = time.perf_counter()
    return GateRun({"fwd": _detach(fwd), "train": (_detach(outs), grads)}, {"fwd": t1 - t0, "full": t2 - t1})


def _measure_memory(p: Provider, fn: ProviderFn, inp: LinearInputs, modes: list[str],
                    device: torch.device) -> dict[str, tuple[int, int]]:
    peaks = {}
    if "fwd" in modes:
        _, d, a = peak_memory(lambda: _infer(fn, inp), device)
        peaks["fwd"] = d, a
    if "full" in modes:
        _, d, a = peak_memory(lambda: _train(p, fn, inp), device)
        peaks["full"] = d, a
    return peaks


def _warm_up(p: Provider, fn: ProviderFn, inp: LinearInputs, modes: list[str]) -> None:
    """Warm-up on a slice (rows are independent) except for torch.compile, which specialises on the shape."""
    if p.name == COMPILED:
        warm = inp
    else:
        k = min(inp.hidden.shape[0], 2 * SEQ_LEN)
        warm = LinearInputs(inp.hidden[:k], inp.weight, inp.labels[:k], inp.grad_logprobs[:k],
                            inp.grad_entropy[:k], inp.advantages[: max(1, k // SEQ_LEN)], inp.valid[:k])
    if "fwd" in modes:
        _infer(fn, warm)
    _train(p, fn, warm)


# ----------------------------------------------------------------------------------------------------------
# The benchmark
# ----------------------------------------------------------------------------------------------------------


class LinearBenchmark(harness.Benchmark):
    op, module, modes, profiles, providers, peer_dists = OP, MODULE, MODES, PROFILES, PROVIDERS, PEER_DISTS
    spec_cls, inputs_cls = LinearSpec, LinearInputs
    profile_help = "quick: fp32 [2048, 512, 32000] on CPU; full: the issue-4 shape [8192, 512, 32000]"

    def make_inputs(self, spec, device):
        return make_linear_inputs(spec, device, n_sets=2, seq_len=SEQ_LEN)

    def gate(self, p, fn, inp, modes, device, oracle) -> GateRun:
        return _gate_call(p, fn, inp)

    def check(self, spec, inp, results, device, oracle) -> dict[str, dict[str, Verdict]]:
        return {name: {m: Verdict(*_verdict(c, m), c) for m in MODES}
                for name, c in _check(spec, inp, results).items()}

    def timed(self, p, fn, sets, mode):
        if mode == "fwd":
            return (lambda k: _infer(fn, sets[k])), []
        return (lambda k: _train(p, fn, sets[k])), []

    def work(self, spec, p, mode, ceilings, device) -> Work:
        flop = FLOPS_NVH[mode] * spec.n * spec.v * spec.h
        return Work(flop, "GFLOP/s", flop / ceilings["gemm_gflops"] / 1e6)

    def measure_memory(self, p, fn, inp, modes, device, warm):
        if warm:
            _warm_up(p, fn, inp, modes)
        return _measure_memory(p, fn, inp, modes, device)

    def case_ceilings(self, spec, device):
        return gemm_ceiling(spec, device)

    def workload(self, providers, modes):
        return {"want_entropy": True, "modes": modes, "flops_nvh": FLOPS_NVH,
                "providers": {p.name: {"note": p.note, "strict": p.strict} for p in providers}}

    def closing_lines(self, report):
        return [f"GEMM ceiling: {report['ceilings'].get('gemm_gflops', 0):.0f} GFLOP/s (fp32 at::mm)"]


BENCHMARK = LinearBenchmark()

main = BENCHMARK.main  # main(argv) -> exit status: what run_all and `python -m` call


if __name__ == "__main__":
    sys.exit(main())
