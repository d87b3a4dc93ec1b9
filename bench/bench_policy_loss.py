"""Benchmark of the policy loss from logits (docs/losses.md section 13) following
docs/performance.md section 4.

Workload: the DAPO loss of a GRPO step on packed sequences of 256 tokens (cu_seqlens), ~10% of tokens
``ignore_index``, per-sequence advantages of both signs, old-policy log-probs within a few percent of the
current policy (ratios on both sides of the clip bounds), reference log-probs for a k3 KL term (beta 0.04),
temperature 0.9; the loss gradient flows into the logits (``full``: forward + backward, the training step).
The config has no entropy bonus so that Liger runs the same loss (reasonrl still computes the entropy, for the
metric). Normalisation: ``num_items_in_batch`` = the valid tokens, given explicitly.

Providers (side by side in one run; a missing one is a row saying why):

* ``reasonrl``: ``policy_loss_from_logits`` with ``impl="cpp"`` (CPU) or ``"triton"`` (CUDA), the
  single-pass kernel (1 read + 1 write of the logits), ``validate=False``.
* ``reasonrl-inplace``: the same call with ``inplace_backward=True``: the gradient overwrites the logits
  (no logits-sized allocation, hence no fresh pages to fault in on CPU); it runs on its own copy of each
  input set, made by its first, untimed call on the set.
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

import dataclasses
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from . import harness
from .accuracy import PEER_RTOL
from .ceilings import floor_ms
from .harness import GateRun, Verdict, Work
from .inputs import LogitsInputSpec, make_logits_inputs, n_rotating_sets
from .memory import peak_memory
from .policy_workload import SEQ_LEN, Rollout, loss_config, make_rollout, oracle_chunks, rel_err

OP = "policy_loss_from_logits"
MODULE = __spec__.name if __spec__ else __name__  # the memory subprocesses run `python -m MODULE`
MODES = ("fwd", "full")
TRAFFIC = {"fwd": (1, 0), "full": (1, 1)}  # the single pass; the two-phase path moves (2, 1)
PEER_DISTS = ("liger-kernel", "trl", "transformers")
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

    sets, record = make_logits_inputs(spec, device, n_sets)
    out = []
    for k, s in enumerate(sets):
        with torch.no_grad():
            lp = token_logprobs(
                s.logits,
                s.labels,
                temperature=spec.temperature,
                ignore_index=spec.ignore_index,
                impl="reference" if device.type == "cpu" and spec.dtype == "float64" else "auto",
                validate=False,
            ).logprobs
        r = make_rollout(lp, s.valid, seed=1000 + k)
        out.append(LossInputs(s.logits, s.labels, r.cu_seqlens, r.advantages, r.old_logprobs, r.ref_logprobs,
                              r.num_items))
    record["layout"] = f"packed, {spec.n // SEQ_LEN} sequences of {SEQ_LEN} tokens"
    return out, record


# A provider: build(spec, device) -> fn(inputs, grad: bool) -> (loss 0-d, dlogits or None)
LossFn = Callable[[LossInputs, bool], tuple[torch.Tensor, torch.Tensor | None]]


def _policy_loss_fn(impl: str, **extra) -> Callable[[LogitsInputSpec, torch.device], LossFn]:
    def build(spec: LogitsInputSpec, device: torch.device) -> LossFn:
        from reasonrl.losses import LossNormalizers, policy_loss_from_logits

        cfg = loss_config()

        def loss_of(inp: LossInputs) -> torch.Tensor:
            norms = LossNormalizers(num_items_in_batch=inp.num_items)
            return policy_loss_from_logits(
                inp.logits, inp.labels, advantages=inp.advantages, cu_seqlens=inp.cu_seqlens,
                old_logprobs=inp.old_logprobs, ref_logprobs=inp.ref_logprobs, normalizers=norms, config=cfg,
                ignore_index=spec.ignore_index, impl=impl, validate=False, **extra,
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


def _build_inplace(spec, device):
    # inplace_backward=True overwrites the logits with dLoss/dlogits: the provider runs on its own copy of
    # each input set, made by ``prepare`` (the gate's set) or by ``timed`` before the clock starts. Later
    # calls read the previous call's gradient as logits: finite values, and the kernel's work does not depend
    # on them, so the timing is that of fresh logits; the gate checked the first call, on fresh ones.
    fn = _policy_loss_fn(_reasonrl_impl(device), inplace_backward=True)(spec, device)
    own: dict[int, LossInputs] = {}

    def prepare(inp: LossInputs) -> LossInputs:
        if id(inp) not in own:
            own[id(inp)] = dataclasses.replace(inp, logits=inp.logits.detach().clone().requires_grad_(True))
        return own[id(inp)]

    def run(inp: LossInputs, grad: bool):
        return fn(prepare(inp), grad)

    run.prepare = prepare
    return run


def _build_two_phase(spec, device):
    return _policy_loss_fn(_reasonrl_impl(device), return_per_token=True)(spec, device)


def _build_eager(spec, device):
    return _policy_loss_fn("reference")(spec, device)


def _build_compiled(spec, device):
    from reasonrl.losses import LossNormalizers, policy_loss_from_logits

    cfg = loss_config()

    def loss_of(logits, labels, advantages, cu_seqlens, old, ref, num_items):
        return policy_loss_from_logits(
            logits, labels, advantages=advantages, cu_seqlens=cu_seqlens, old_logprobs=old, ref_logprobs=ref,
            normalizers=LossNormalizers(num_items_in_batch=num_items), config=cfg,
            ignore_index=spec.ignore_index, impl="reference", validate=False,
        ).loss

    compiled = torch.compile(loss_of, dynamic=False)
    return _runner(
        lambda i: compiled(
            i.logits, i.labels, i.advantages, i.cu_seqlens, i.old_logprobs, i.ref_logprobs, i.num_items
        )
    )


def _build_liger(spec, device):
    from liger_kernel.transformers.grpo_loss import triton_grpo_loss

    cfg = loss_config()
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
                x, old, ref, ids, inp.advantages, mask, temperature=cfg.temperature, beta=cfg.beta,
                eps_low=cfg.epsilon_low, eps_high=cfg.epsilon_high_value, inplace=False, loss_type="dapo",
                reduce=True, num_items_in_batch=inp.num_items,
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
class Provider(harness.Provider):
    traffic_full: tuple[int, int] = (1, 1)  # (reads, writes) of the logits in ``full``, in units of N*V*b


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
            "reasonrl-inplace",
            _build_inplace,
            strict=True,
            note="single pass with inplace_backward=True: dLoss/dlogits overwrites the logits (no [N, V] "
            "allocation)",
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



# ----------------------------------------------------------------------------------------------------------
# Oracle and check
# ----------------------------------------------------------------------------------------------------------


def _oracle(spec: LogitsInputSpec, inp: LossInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss and dlogits in float64, sequence-aligned row chunks (``policy_workload.oracle_chunks``)."""
    rollout = Rollout(inp.cu_seqlens, inp.advantages, inp.old_logprobs, inp.ref_logprobs, inp.num_items)
    total = torch.zeros((), dtype=torch.float64)
    grad = torch.empty(inp.logits.shape, dtype=torch.float64, device=inp.logits.device)

    def leaves_and_logits(rows: slice) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        x = inp.logits[rows].detach().double().requires_grad_(True)
        return (x,), x

    for rows, loss, (g,) in oracle_chunks(rollout, inp.labels, spec.v, spec.ignore_index, leaves_and_logits):
        grad[rows] = g
        total += loss.cpu()
    return total, grad


def _check(provider: Provider, loss, grad, oracle_loss, oracle_grad, dtype: str) -> dict[str, Any]:
    loss_err = rel_err(loss, oracle_loss)
    grad_err = rel_err(grad, oracle_grad) if grad is not None else 0.0
    if provider.strict:
        bound_loss, bound_grad = 1e-5 if dtype == "float32" else 2e-3, 1e-4 if dtype == "float32" else 2e-2
    else:
        bound_loss = bound_grad = PEER_RTOL[dtype]
    return {
        "loss_rel_err": loss_err,
        "grad_err_rel_max": grad_err,
        "bound_loss": bound_loss,
        "bound_grad": bound_grad,
        "ok": loss_err <= bound_loss and grad_err <= bound_grad,
    }


# ----------------------------------------------------------------------------------------------------------
# The benchmark
# ----------------------------------------------------------------------------------------------------------


class PolicyLossBenchmark(harness.Benchmark):
    op, module, modes, profiles, providers, peer_dists = OP, MODULE, MODES, PROFILES, PROVIDERS, PEER_DISTS
    spec_cls, inputs_cls, leaves = LogitsInputSpec, LossInputs, ("logits",)
    profile_help = ("quick: fp32 [4096, 32000] on CPU (the issue's acceptance shape), bf16 [16384, 151936] "
                    "on CUDA; full: more shapes")
    modes_help = "Default: full."

    def default_modes(self, profile, device):
        return ["full"]

    def make_inputs(self, spec, device):
        return _loss_inputs(spec, device, n_rotating_sets(spec.logits_bytes, device))

    def oracle(self, spec, inp, device):
        oracle = _oracle(spec, inp)
        harness.log(OP, f"{spec.label}: float64 oracle loss {float(oracle[0]):.6g}")
        return oracle

    def gate(self, p, fn, inp, modes, device, oracle) -> GateRun:
        # Checked right away against the oracle computed before the gate: only the errors are kept, not a
        # [N, V] gradient per provider.
        checks, first_s = {}, {}
        for mode in modes:
            t0 = time.perf_counter()
            loss, grad = fn(inp, mode == "full")
            first_s[mode] = time.perf_counter() - t0
            checks[mode] = _check(p, loss, grad, *oracle, str(inp.logits.dtype).removeprefix("torch."))
            del loss, grad
        return GateRun(checks, first_s)

    def check(self, spec, inp, results, device, oracle) -> dict[str, dict[str, Verdict]]:
        shown = {"fwd": "loss_rel_err", "full": "grad_err_rel_max"}  # the table's max err column
        return {name: {mode: Verdict(c["ok"], c[shown[mode]], c) for mode, c in checks.items()}
                for name, checks in results.items()}

    def timed(self, p, fn, sets, mode):
        for s in sets:  # providers that need per-set state (reasonrl-inplace's own copies) make it untimed
            getattr(fn, "prepare", lambda _: None)(s)
        return (lambda k: fn(sets[k], mode == "full")), []

    def work(self, spec, p, mode, ceilings, device) -> Work:
        reads, writes = (k * spec.logits_bytes for k in (TRAFFIC["fwd"] if mode == "fwd" else p.traffic_full))
        floor = floor_ms(spec.logits_bytes * TRAFFIC[mode][0], spec.logits_bytes * TRAFFIC[mode][1], ceilings,
                         device)
        return Work(reads + writes, "GB/s", floor)

    def measure_memory(self, p, fn, inp, modes, device, warm):
        peaks = {}
        for mode in modes:
            if warm:
                fn(inp, mode == "full")  # warm-up (and compilation) outside the measurement
            _, delta, peak = peak_memory(lambda m=mode: fn(inp, m == "full"), device)
            peaks[mode] = delta, peak
        return peaks

    def workload(self, providers, modes):
        return {"config": repr(loss_config()), "seq_len": SEQ_LEN, "modes": modes,
                "traffic_nvb": {p.name: p.traffic_full for p in providers}}


BENCHMARK = PolicyLossBenchmark()

main = BENCHMARK.main  # main(argv) -> exit status: what run_all and `python -m` call


if __name__ == "__main__":
    sys.exit(main())
