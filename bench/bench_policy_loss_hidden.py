"""Benchmark of the policy loss from hidden states and the lm_head
(docs/losses.md 13.1, the fused-linear loss).

Same workload and loss as bench/bench_policy_loss.py (DAPO + k3 KL, temperature 0.9, packed sequences of 256
tokens, ~10% ignored rows, ``num_items_in_batch`` given), but the inputs are ``hidden [N, H]`` and the lm_head
``weight [V, H]``: the training step computes the loss and the gradients of hidden and weight.

Providers (side by side in one run):

* ``reasonrl``: ``policy_loss_from_hidden``, ``impl="cpp"`` (CPU: per row chunk, the logits GEMM, the fused
  row pass in place, then the grad_hidden / grad_weight GEMMs: 3 GEMMs, 6NVH) or ``"triton"`` (CUDA: 8NVH).
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

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from . import harness
from .accuracy import PEER_RTOL
from .ceilings import gemm_ceiling
from .harness import GateRun, Provider, Verdict, Work
from .inputs import LinearSpec, make_linear_inputs
from .memory import peak_memory
from .policy_workload import SEQ_LEN, Rollout, loss_config, make_rollout, oracle_chunks, rel_err

OP = "policy_loss_from_hidden"
MODULE = __spec__.name if __spec__ else __name__  # the memory subprocesses run `python -m MODULE`
MODES = ("full",)
PEER_DISTS = ("liger-kernel", "trl", "transformers")
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

    sets, record = make_linear_inputs(spec, device, n_sets, seq_len=SEQ_LEN)
    weight = sets[0].weight.detach().clone()
    out = []
    for k, s in enumerate(sets):
        with torch.no_grad():
            lp = linear_token_logprobs(s.hidden, s.weight, s.labels, temperature=spec.temperature,
                                       ignore_index=spec.ignore_index, validate=False).logprobs
        r = make_rollout(lp, s.valid, seed=2000 + k)
        out.append(HiddenLossInputs(s.hidden.detach().clone(), weight, s.labels, r.cu_seqlens, r.advantages,
                                    r.old_logprobs, r.ref_logprobs, r.num_items))
    record["layout"] = f"packed, {spec.n // SEQ_LEN} sequences of {SEQ_LEN} tokens"
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

        cfg, impl = loss_config(), "triton" if device.type == "cuda" else "cpp"
        return _runner(lambda i: policy_loss_from_hidden(
            i.hidden, i.weight, i.labels, advantages=i.advantages, cu_seqlens=i.cu_seqlens,
            old_logprobs=i.old_logprobs, ref_logprobs=i.ref_logprobs,
            normalizers=LossNormalizers(num_items_in_batch=i.num_items), config=cfg,
            ignore_index=spec.ignore_index, impl=impl, validate=False, return_per_token=two_phase).loss)

    return build


def _reference_loss(spec: LinearSpec):
    from reasonrl.losses import LossNormalizers, policy_loss_from_logits

    cfg = loss_config()

    def loss_of(hidden, weight, labels, advantages, cu_seqlens, old, ref, num_items):
        logits = hidden.float() @ weight.float().T
        return policy_loss_from_logits(
            logits, labels, advantages=advantages, cu_seqlens=cu_seqlens, old_logprobs=old, ref_logprobs=ref,
            normalizers=LossNormalizers(num_items_in_batch=num_items), config=cfg,
            ignore_index=spec.ignore_index, impl="reference", validate=False).loss

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

    cfg = loss_config()
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



def _oracle(spec: LinearSpec, inp: HiddenLossInputs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Loss, grad_hidden and grad_weight in float64 (fp64 matmul and reference chain), sequence-aligned row
    chunks (``policy_workload.oracle_chunks``); grad_weight is accumulated over the chunks."""
    rollout = Rollout(inp.cu_seqlens, inp.advantages, inp.old_logprobs, inp.ref_logprobs, inp.num_items)
    w = inp.weight.detach().double().requires_grad_(True)
    total = torch.zeros((), dtype=torch.float64)
    grad_h = torch.empty(inp.hidden.shape, dtype=torch.float64)
    grad_w = torch.zeros_like(w)

    def leaves_and_logits(rows: slice) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        h = inp.hidden[rows].detach().double().requires_grad_(True)
        return (h, w), h @ w.T

    chunks = oracle_chunks(rollout, inp.labels, spec.v, spec.ignore_index, leaves_and_logits)
    for rows, loss, (gh, gw) in chunks:
        grad_h[rows], grad_w = gh, grad_w + gw
        total += loss
    return total, grad_h, grad_w


def _errors(p: Provider, result, oracle, dtype: str) -> dict[str, Any]:
    loss, gh, gw = result
    o_loss, o_gh, o_gw = oracle
    errs = {"loss": rel_err(loss, o_loss)}
    if gh is not None:
        errs["grad_hidden"] = rel_err(gh, o_gh)
        errs["grad_weight"] = rel_err(gw, o_gw)
    bounds = ({"loss": 1e-5, "grad_hidden": 1e-4, "grad_weight": 1e-4} if p.strict and dtype == "float32"
              else {k: PEER_RTOL[dtype] for k in ("loss", "grad_hidden", "grad_weight")})
    return {"errors": errs, "bounds": bounds, "ok": all(errs[k] <= bounds[k] for k in errs)}


# ----------------------------------------------------------------------------------------------------------
# The benchmark
# ----------------------------------------------------------------------------------------------------------


class PolicyLossHiddenBenchmark(harness.Benchmark):
    op, module, modes, profiles, providers, peer_dists = OP, MODULE, MODES, PROFILES, PROVIDERS, PEER_DISTS
    spec_cls, inputs_cls, leaves = LinearSpec, HiddenLossInputs, ("hidden", "weight")
    profile_help = "quick: fp32 [2048, 512, 32000] on CPU; full: the issue's [8192, 512, 32000]"

    def make_inputs(self, spec, device):
        return _inputs(spec, device, n_sets=2)

    def oracle(self, spec, inp, device):
        oracle = _oracle(spec, inp)
        harness.log(OP, f"{spec.label}: float64 oracle loss {float(oracle[0]):.6g}")
        return oracle

    def gate(self, p, fn, inp, modes, device, oracle) -> GateRun:
        # Checked right away against the oracle: only the errors are kept.
        t0 = time.perf_counter()
        check = _errors(p, fn(inp, True), oracle, str(inp.hidden.dtype).removeprefix("torch."))
        return GateRun(check, {"full": time.perf_counter() - t0})

    def check(self, spec, inp, results, device, oracle) -> dict[str, dict[str, Verdict]]:
        return {name: {"full": Verdict(c["ok"], max(c["errors"].values()), c)} for name, c in results.items()}

    def timed(self, p, fn, sets, mode):
        return (lambda k: fn(sets[k], True)), []

    def work(self, spec, p, mode, ceilings, device) -> Work:
        flop = 6 * spec.n * spec.v * spec.h  # the FLOP of 3 GEMMs, for every provider
        return Work(flop, "GFLOP/s", flop / ceilings["gemm_gflops"] / 1e6)

    def measure_memory(self, p, fn, inp, modes, device, warm):
        if warm:
            fn(inp, True)  # warm-up (and compilation) outside the measurement
        _, delta, peak = peak_memory(lambda: fn(inp, True), device)
        return {"full": (delta, peak)}

    def case_ceilings(self, spec, device):
        return gemm_ceiling(spec, device)

    def workload(self, providers, modes):
        return {"config": repr(loss_config()), "seq_len": SEQ_LEN, "flops": "6NVH for every provider"}


BENCHMARK = PolicyLossHiddenBenchmark()

main = BENCHMARK.main  # main(argv) -> exit status: what run_all and `python -m` call


if __name__ == "__main__":
    sys.exit(main())
