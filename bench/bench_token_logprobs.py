"""Benchmark of ``token_logprobs`` (docs/ops.md section 2) following docs/performance.md section 4.

Workload: log-prob + entropy (``want_entropy=True``) of sampled labels at temperature 0.9, ~10% of rows
``ignore_index``; the backward takes random upstream gradients on both outputs.

Providers (side by side in one run; a missing one is a row saying why, never dropped):

* ``reasonrl``: ``impl="cpp"`` on CPU, ``impl="triton"`` on CUDA, ``validate=False`` (validation syncs).
* ``reference-eager``: ``reasonrl.reference.token_logprobs_reference``.
* ``reference-compiled``: the same function under ``torch.compile(dynamic=False)``, compiled per case by the
  correctness-gate calls (one graph without and one with autograd), so compile time never reaches the
  timings.
* ``trl``: ``selective_log_softmax`` + ``entropy_from_logits`` on ``logits / T`` (what TRL's trainers call;
  on CUDA they dispatch to TRL's Triton kernel by themselves). No ignore_index: ignored rows run with label 0
  and are excluded from the check.
* CUDA only: ``trl-fused`` (``selective_log_softmax_and_entropy`` with ``row_mask``), ``liger``
  (``liger_cross_entropy(logits / T, reduction="none")``, log-prob = -loss) and ``flash-attn`` (Triton
  ``cross_entropy_loss`` with ``logit_scale = 1/T``); the last two return no entropy, so they run the
  log-prob subset and their gradients are checked against the log-prob-only oracle.

Modes: ``fwd`` (the forward under ``torch.no_grad``, as old-policy and reference log-probs are computed and
as docs/performance.md section 3 times the CPU forward), ``bwd`` (``autograd.grad`` on a retained training
graph, timed alone), ``full`` (training forward + backward).

Correctness gate (section 4.4): each provider runs the forward without autograd and the training forward +
backward once on input set 0, and both are compared with the float64 reference over valid rows. reasonrl
must meet docs/ops.md section 8 (the tolerance table of ``reasonrl.testing``), every other provider the looser
``bench.accuracy.peer_bound`` (the compiled reference is fused and reordered by inductor: its fp32 gradient
error is a few times the eager one's). A provider failing a mode is ``incorrect`` there and not timed.

Usage: ``python -m reasonrl.bench.bench_token_logprobs --profile quick``.
"""


from __future__ import annotations

import functools
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from reasonrl import testing
from reasonrl.reference import token_logprobs_reference

from . import harness
from .accuracy import PEER_RTOL, MaxError, acceptance_bound, peer_bound
from .ceilings import floor_ms
from .harness import GateRun, Verdict, Work
from .inputs import DTYPES, LogitsInputs, LogitsInputSpec, make_logits_inputs, n_rotating_sets, row_chunks
from .memory import peak_memory

OP = "token_logprobs"
MODULE = __spec__.name if __spec__ else __name__  # the memory subprocesses run `python -m MODULE`
MODES = ("fwd", "bwd", "full")
# docs/performance.md section 1: (reads, writes) of the logits, in units of N*V*b.
TRAFFIC = {"fwd": (1, 0), "bwd": (1, 1), "full": (2, 1)}
# Distributions whose versions are recorded with the results.
PEER_DISTS = ("trl", "liger-kernel", "flash-attn", "transformers")

# (N, V, dtype) per profile and device type. The CPU quick case is the acceptance shape of docs/performance.md
# section 3 (fp32 [4096, 32000], 2 threads); it is sized to finish in under 3 minutes on 2 cores with every
# provider. The CPU full profile stays below ~20 GiB: the eager reference keeps about five fp32 [N, V]
# tensors per retained graph, and the bwd mode retains one graph per rotating input set.
PROFILES: dict[str, dict[str, list[tuple[int, int, str]]]] = {
    "quick": {
        "cpu": [(4096, 32000, "float32")],
        "cuda": [(8192, 151936, "bfloat16"), (16384, 151936, "bfloat16")],
    },
    "full": {
        "cpu": [(1024, 32000, "float32"), (4096, 32000, "float32"), (1024, 151936, "float32"),
                (4096, 32000, "bfloat16")],
        "cuda": [(n, 151936, "bfloat16") for n in (1024, 2048, 4096, 8192, 16384)]
        + [(4096, 151936, "float32")],
    },
}

# fn(logits [N, V], labels [N]) -> (log-probs [N], entropy [N] or None)
LogprobFn = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]]


# ----------------------------------------------------------------------------------------------------------
# Providers
# ----------------------------------------------------------------------------------------------------------


def _reference_pair(logits: torch.Tensor, labels: torch.Tensor, temperature: float,
                    ignore_index: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    out = token_logprobs_reference(logits, labels, temperature=temperature, ignore_index=ignore_index,
                                   want_entropy=True)
    return out.logprobs, out.entropy


def _build_reasonrl(spec: LogitsInputSpec, device: torch.device) -> LogprobFn:
    from reasonrl.ops import token_logprobs

    impl = _reasonrl_impl(device)

    def fn(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        out = token_logprobs(logits, labels, temperature=spec.temperature, ignore_index=spec.ignore_index,
                             want_entropy=True, impl=impl, validate=False)
        return out.logprobs, out.entropy

    return fn


def _build_eager(spec: LogitsInputSpec, device: torch.device) -> LogprobFn:
    return functools.partial(_reference_pair, temperature=spec.temperature, ignore_index=spec.ignore_index)


def _build_compiled(spec: LogitsInputSpec, device: torch.device) -> LogprobFn:
    # A fresh dynamo cache per case: with dynamic=False every (shape, dtype, grad mode) is its own graph,
    # and accumulating them across cases would run into dynamo's recompile limit.
    torch._dynamo.reset()
    temperature, ignore_index = spec.temperature, spec.ignore_index

    def reference(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        return _reference_pair(logits, labels, temperature, ignore_index)

    return torch.compile(reference, dynamic=False)


def _minimal_pair(logits: torch.Tensor, labels: torch.Tensor, temperature: float,
                  ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The same maths written for torch.compile: the row maximum, the exponentials once, their sum, then
    ln p_y = z_y - lse and H = lse - sum(e z) / s. Of the formulations tried on CPU (log_softmax + gather +
    -(p log p).sum, logsumexp + softmax, this one) it is the fastest under torch.compile by far (inductor
    fuses it into row reductions without an [N, V] intermediate; log_softmax's output, read twice, is
    materialised), so it is the strongest compiled baseline (docs/benchmarks.md)."""
    z = logits.float() / temperature
    m = z.amax(-1, keepdim=True)
    e = (z - m).exp()
    s = e.sum(-1)
    lse = m.squeeze(-1) + s.log()
    valid = labels != ignore_index
    lp = z.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1) - lse
    entropy = lse - (e * z).sum(-1) / s
    return torch.where(valid, lp, 0.0), torch.where(valid, entropy, 0.0)


def _build_minimal_compiled(spec: LogitsInputSpec, device: torch.device) -> LogprobFn:
    torch._dynamo.reset()  # as _build_compiled: a fresh dynamo cache per case
    return torch.compile(functools.partial(_minimal_pair, temperature=spec.temperature,
                                           ignore_index=spec.ignore_index), dynamic=False)


def _no_donated_buffers():
    """Context for everything that compiles or runs the compiled reference.

    A compiled backward that donates (reuses) its saved buffers refuses ``retain_graph=True``, which the bwd
    mode needs; the setting is read when the backward is compiled, on its first call, so it must cover the
    gate, timings and memory measurement alike. It costs the compiled reference some backward memory.
    """
    from torch._functorch import config as functorch_config

    return functorch_config.patch(donated_buffer=False)


def _build_trl(spec: LogitsInputSpec, device: torch.device) -> LogprobFn:
    from trl.trainer.utils import entropy_from_logits, selective_log_softmax

    def fn(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        scaled = logits / spec.temperature  # TRL's trainers divide the logits first: one more [N, V] tensor
        return selective_log_softmax(scaled, labels.clamp_min(0)), entropy_from_logits(scaled)

    return fn


def _build_trl_fused(spec: LogitsInputSpec, device: torch.device) -> LogprobFn:
    from trl.trainer.utils import selective_log_softmax_and_entropy

    def fn(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        return selective_log_softmax_and_entropy(logits, labels.clamp_min(0), temperature=spec.temperature,
                                                 row_mask=labels != spec.ignore_index)

    return fn


def _build_liger(spec: LogitsInputSpec, device: torch.device) -> LogprobFn:
    from liger_kernel.transformers.functional import liger_cross_entropy

    def fn(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        # Liger writes the gradient into its input during the forward: that input is the scaled copy.
        loss = liger_cross_entropy(logits / spec.temperature, labels, ignore_index=spec.ignore_index,
                                   reduction="none")
        return -loss, None

    return fn


def _build_flash_attn(spec: LogitsInputSpec, device: torch.device) -> LogprobFn:
    from flash_attn.ops.triton.cross_entropy import cross_entropy_loss

    def fn(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        loss, _ = cross_entropy_loss(logits, labels, logit_scale=1.0 / spec.temperature,
                                     ignore_index=spec.ignore_index)
        return -loss, None

    return fn


def _reasonrl_impl(device: torch.device) -> str:
    return "triton" if device.type == "cuda" else "cpp"


def _reasonrl_unavailable(device: torch.device, dtype: torch.dtype) -> str | None:
    from reasonrl._backend import unavailable_reason

    return unavailable_reason(_reasonrl_impl(device), device, dtype)


@dataclass(frozen=True)
class Provider(harness.Provider):
    entropy: bool = True  # False: log-probs only; gradients flow from the log-probs only


PROVIDERS: dict[str, Provider] = {p.name: p for p in (
    Provider("reasonrl", _build_reasonrl, note="impl='cpp' on CPU, 'triton' on CUDA; validate=False",
             strict=True, unavailable=_reasonrl_unavailable),
    Provider("reference-eager", _build_eager, note="reasonrl.reference.token_logprobs_reference"),
    Provider("reference-compiled", _build_compiled,
             note="torch.compile(reference, dynamic=False), donated_buffer=False (retained graphs); "
                  "compiled by the gate calls, not timed"),
    Provider("minimal-compiled", _build_minimal_compiled,
             note="torch.compile of the maths written for it (max, exp once, sums: no [N, V] intermediate); "
                  "'x compiled' is against the faster of the two compiled providers; compiled by the gate "
                  "calls, not timed"),
    Provider("trl", _build_trl, module="trl",
             note="selective_log_softmax + entropy_from_logits on logits/T; no ignore_index (label 0 on "
                  "ignored rows, excluded from the check)"),
    Provider("trl-fused", _build_trl_fused, cuda_only=True, module="trl",
             note="selective_log_softmax_and_entropy (Triton) with row_mask; on CPU it is the 'trl' pair"),
    Provider("liger", _build_liger, entropy=False, cuda_only=True, module="liger_kernel",
             note="liger_cross_entropy(logits/T, reduction='none'): log-prob only, no entropy"),
    Provider("flash-attn", _build_flash_attn, entropy=False, cuda_only=True, module="flash_attn",
             note="flash_attn Triton cross_entropy_loss(logit_scale=1/T): log-prob only, no entropy"),
)}
EAGER, COMPILED, MINIMAL = "reference-eager", "reference-compiled", "minimal-compiled"


# ----------------------------------------------------------------------------------------------------------
# Running a provider
# ----------------------------------------------------------------------------------------------------------


def _grad_args(lp: torch.Tensor, ent: torch.Tensor | None,
               inp: LogitsInputs) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(outputs, upstream gradients) for autograd.grad: both outputs, or the log-probs alone."""
    if ent is None:
        return [lp], [inp.grad_logprobs]
    return [lp, ent], [inp.grad_logprobs, inp.grad_entropy]


def _backward(outs: tuple[torch.Tensor, torch.Tensor | None], inp: LogitsInputs,
              retain: bool) -> torch.Tensor:
    targets, grads = _grad_args(*outs, inp)
    return torch.autograd.grad(targets, inp.logits, grads, retain_graph=retain)[0]


def _infer(fn: LogprobFn, inp: LogitsInputs) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The forward alone, without autograd: how old-policy and reference log-probs are computed."""
    with torch.no_grad():
        return fn(inp.logits, inp.labels)


@dataclass
class GateResult:
    """A provider's outputs on input set 0, kept on the CPU until they are compared with the oracle: the
    forward without autograd (``fwd`` mode) and the training forward + backward (``bwd`` / ``full``)."""

    inference: tuple[torch.Tensor, torch.Tensor | None] | None
    training: tuple[torch.Tensor, torch.Tensor | None, torch.Tensor] | None


def _gate_call(fn: LogprobFn, inp: LogitsInputs, modes: list[str], device: torch.device) -> GateRun:
    # Offloaded so that held results of several providers do not crowd the device (no-op on CPU).
    def host(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.detach().to("cpu")

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    result, inference_s, training_s = GateResult(None, None), 0.0, 0.0
    if "fwd" in modes:
        t0 = time.perf_counter()
        lp, ent = _infer(fn, inp)
        sync()
        inference_s = time.perf_counter() - t0
        result.inference = host(lp), host(ent)
    if "bwd" in modes or "full" in modes:
        t0 = time.perf_counter()
        lp, ent = fn(inp.logits, inp.labels)
        grad = _backward((lp, ent), inp, retain=False)
        sync()
        training_s = time.perf_counter() - t0
        result.training = host(lp), host(ent), host(grad)
    first_s = {"fwd": inference_s, "bwd": training_s, "full": training_s}
    return GateRun(result, {m: first_s[m] for m in modes})


@dataclass
class _Oracle:
    logprobs: torch.Tensor
    entropy: torch.Tensor
    grads: dict[str, torch.Tensor]  # "lp+H": from both outputs, "lp": from the log-probs alone


def _reference_chunk(x: torch.Tensor, y: torch.Tensor, g_lp: torch.Tensor, g_h: torch.Tensor,
                     spec: LogitsInputSpec, compute_dtype: torch.dtype, variants: set[str]) -> _Oracle:
    """The reference on a block of rows, in ``compute_dtype``; float64 is the oracle of docs/ops.md section 8.

    As in ``reasonrl.testing``, the logits are upcast exactly before the autograd leaf, so the gradients are
    in ``compute_dtype`` and never rounded back to 16 bits (the 16-bit rule grants the implementation one
    ulp for its own rounding instead). Each gradient variant is its own backward call.
    """
    leaf = x.to(compute_dtype).detach().requires_grad_(bool(variants))
    out = token_logprobs_reference(leaf, y, temperature=spec.temperature, ignore_index=spec.ignore_index,
                                   want_entropy=True, compute_dtype=compute_dtype)
    grads = {}
    for i, variant in enumerate(sorted(variants)):
        retain = i < len(variants) - 1
        if variant == "lp":
            grads[variant] = torch.autograd.grad(out.logprobs, leaf, g_lp, retain_graph=retain)[0]
        else:
            grads[variant] = torch.autograd.grad([out.logprobs, out.entropy], leaf, [g_lp, g_h],
                                                 retain_graph=retain)[0]
    return _Oracle(out.logprobs.detach(), out.entropy.detach(), grads)


def _check(spec: LogitsInputSpec, inp: LogitsInputs, results: dict[str, GateResult],
           device: torch.device) -> dict[str, dict[str, dict[str, Any]]]:
    """Errors of every provider against the float64 oracle, and the bound each is held to.

    Keys of a provider's checks: ``fwd:logprobs``, ``fwd:entropy`` (the forward without autograd) and
    ``train:logprobs``, ``train:entropy``, ``train:grad``. Rows are independent, so the oracle runs block by
    block: its memory stays bounded (with autograd it would otherwise need several 8-byte [N, V] tensors).
    """
    grad_variant = {name: "lp+H" if PROVIDERS[name].entropy else "lp" for name in results}
    variants = {grad_variant[name] for name, res in results.items() if res.training is not None}
    dtype = DTYPES[spec.dtype]
    grad_ulps = testing.tolerance("grad", dtype).ulps  # 1 for 16-bit gradients, else 0
    ref: dict[str, MaxError] = defaultdict(MaxError)
    err: dict[str, dict[str, MaxError]] = {name: defaultdict(MaxError) for name in results}
    # err(reference in fp32) of docs/ops.md section 8. With fp32 inputs the eager provider's training pass
    # *is* that reference (same function on the same whole tensor, fp32 gradients): reuse it. Otherwise run it
    # block by block like the oracle: bounded memory, and for 16-bit inputs fp32 gradients. (ATen's fp32
    # row reductions are often more accurate on a block than on the whole tensor, so this bound can be a
    # little tighter; the source is recorded.)
    eager = results.get(EAGER)
    eager_fp32 = eager.training if spec.dtype == "float32" and eager is not None else None
    ref_source = "reference-eager training pass" if eager_fp32 is not None else "reference, block by block"
    logits = inp.logits.detach()
    for rows in row_chunks(spec.n, spec.v, max_elems=1 << 23):
        x, y, valid = logits[rows], inp.labels[rows], inp.valid[rows]
        g_lp, g_h = inp.grad_logprobs[rows], inp.grad_entropy[rows]
        oracle = _reference_chunk(x, y, g_lp, g_h, spec, torch.float64, variants)
        if eager_fp32 is None:
            fp32 = _reference_chunk(x, y, g_lp, g_h, spec, torch.float32, variants)
        else:
            lp32, h32, g32 = (t[rows].to(device) for t in eager_fp32)
            grads = {"lp+H": g32}
            if rest := variants - {"lp+H"}:  # the log-prob-only gradient, for peers without entropy
                grads.update(_reference_chunk(x, y, g_lp, g_h, spec, torch.float32, rest).grads)
            fp32 = _Oracle(lp32, h32, grads)
        ref["logprobs"].update(fp32.logprobs, oracle.logprobs, valid)
        ref["entropy"].update(fp32.entropy, oracle.entropy, valid)
        for v in variants:
            ref[f"grad:{v}"].update(fp32.grads[v], oracle.grads[v], valid)
        for name, res in results.items():
            passes = [("fwd", *res.inference, None)] if res.inference is not None else []
            passes += [("train", *res.training)] if res.training is not None else []
            for tag, lp, ent, grad in passes:
                err[name][f"{tag}:logprobs"].update(lp[rows].to(device), oracle.logprobs, valid)
                if ent is not None:
                    err[name][f"{tag}:entropy"].update(ent[rows].to(device), oracle.entropy, valid)
                if grad is not None:
                    err[name][f"{tag}:grad"].update(grad[rows].to(device), oracle.grads[grad_variant[name]],
                                                    valid, dtype if grad_ulps else None, grad_ulps)

    upstream = {"lp+H": max(float(inp.grad_logprobs.abs().max()), float(inp.grad_entropy.abs().max())),
                "lp": float(inp.grad_logprobs.abs().max())}
    checks: dict[str, dict[str, dict[str, Any]]] = {}
    for name in results:
        checks[name] = {}
        for key, e in err[name].items():
            quantity = key.split(":", 1)[1]
            if quantity == "grad":
                v = grad_variant[name]
                err_ref = ref[f"grad:{v}"].err
                bound = acceptance_bound("grad", dtype, err_ref, upstream[v])
                scale = e.max_oracle
                # 16-bit gradients may also be 1 ulp of their dtype off the oracle (docs/ops.md section 8).
                measured = e.err_beyond_ulp if grad_ulps else e.err
            else:
                err_ref = ref[quantity].err
                bound = acceptance_bound("stat", dtype, err_ref, 1 + e.max_oracle)
                scale = 1 + e.max_oracle
                measured = e.err
            if not PROVIDERS[name].strict:
                bound = peer_bound(bound, scale, spec.dtype)
            checks[name][key] = {"err": e.err, "measured": measured, "bound": bound,
                                 "err_reference_fp32": err_ref, "reference_fp32": ref_source,
                                 "max_abs_oracle": e.max_oracle, "ok": measured <= bound}
    return checks


def _mode_verdict(check: dict[str, dict[str, Any]], mode: str) -> tuple[bool, float]:
    """(passes, max error of what the mode produces): fwd its outputs, bwd the gradient (its forward must
    pass too), full the training outputs and the gradient."""
    needed = [c for key, c in check.items() if key.startswith("fwd:" if mode == "fwd" else "train:")]
    shown = [check["train:grad"]] if mode == "bwd" else needed
    return all(c["ok"] for c in needed), max(c["err"] for c in shown)


def _timed_fn(mode: str, fn: LogprobFn, sets: list[LogitsInputs]) -> tuple[Callable[[int], object], list]:
    """The callable timed for ``mode`` and the state it keeps alive (retained graphs for ``bwd``)."""
    if mode == "fwd":
        return (lambda k: _infer(fn, sets[k])), []
    if mode == "full":
        return (lambda k: _backward(fn(sets[k].logits, sets[k].labels), sets[k], retain=False)), []
    graphs = [fn(s.logits, s.labels) for s in sets]  # one retained graph per rotating input set
    return (lambda k: _backward(graphs[k], sets[k], retain=True)), graphs


def _measure_memory(fn: LogprobFn, inp: LogitsInputs, modes: list[str],
                    device: torch.device) -> dict[str, tuple[int, int]]:
    """Incremental and absolute peak bytes of the forward without autograd (fwd), of the backward alone
    after a training forward whose graph it consumes (bwd), and of the two in sequence (full)."""
    peaks: dict[str, tuple[int, int]] = {}
    if "fwd" in modes:
        _, d_fwd, a_fwd = peak_memory(lambda: _infer(fn, inp), device)
        peaks["fwd"] = d_fwd, a_fwd
    if "bwd" in modes or "full" in modes:
        outs, d_train, a_train = peak_memory(lambda: fn(inp.logits, inp.labels), device)
        _, d_bwd, a_bwd = peak_memory(lambda: _backward(outs, inp, retain=False), device)
        base, a_full = a_train - d_train, max(a_train, a_bwd)  # base: the inputs only
        peaks.update(bwd=(d_bwd, a_bwd), full=(a_full - base, a_full))
    return peaks


def _warm_up(name: str, fn: LogprobFn, inp: LogitsInputs, modes: list[str]) -> None:
    """One call of each pass, so that one-time costs (thread pools, lazily loaded kernels) are not counted.
    Rows are independent, so a 64-row slice warms up everything except torch.compile, which specialises on
    the shape and is warmed up (compiled) on the real input."""
    if name in (COMPILED, MINIMAL):
        warm = inp
    else:
        rows = slice(0, min(64, inp.logits.shape[0]))
        warm = LogitsInputs(inp.logits[rows].detach().clone().requires_grad_(True), inp.labels[rows],
                            inp.grad_logprobs[rows], inp.grad_entropy[rows], inp.valid[rows])
    if "fwd" in modes:
        _infer(fn, warm)
    if "bwd" in modes or "full" in modes:
        _backward(fn(warm.logits, warm.labels), warm, retain=False)


# ----------------------------------------------------------------------------------------------------------
# The benchmark
# ----------------------------------------------------------------------------------------------------------


class TokenLogprobsBenchmark(harness.Benchmark):
    op, module, modes, profiles, providers, peer_dists = OP, MODULE, MODES, PROFILES, PROVIDERS, PEER_DISTS
    compiled = (COMPILED, MINIMAL)
    spec_cls, inputs_cls, leaves = LogitsInputSpec, LogitsInputs, ("logits",)
    profile_help = ("quick: the CPU acceptance shape fp32 [4096, 32000] (< 3 min on 2 cores) or the H100 "
                    "reference shapes; full: more shapes and dtypes")
    modes_help = ("Default: all; the CPU quick profile times fwd and full only, so that it stays under 3 "
                  "minutes on 2 cores: the eager reference and TRL's pair take seconds per backward.")

    def default_modes(self, profile: str, device: torch.device) -> list[str]:
        return ["fwd", "full"] if (profile == "quick" and device.type == "cpu") else list(MODES)

    def make_inputs(self, spec: LogitsInputSpec, device: torch.device):
        return make_logits_inputs(spec, device, n_rotating_sets(spec.logits_bytes, device))

    def gate(self, p, fn, inp, modes, device, oracle) -> GateRun:
        return _gate_call(fn, inp, modes, device)

    def check(self, spec, inp, results, device, oracle) -> dict[str, dict[str, Verdict]]:
        checks = _check(spec, inp, results, device)
        verdicts: dict[str, dict[str, Verdict]] = {}
        for name, check in checks.items():
            ran = {"fwd": results[name].inference is not None, "bwd": results[name].training is not None}
            verdicts[name] = {mode: Verdict(*_mode_verdict(check, mode), check)
                              for mode in MODES if ran.get(mode, ran["bwd"])}
        return verdicts

    def timed(self, p, fn, sets, mode):
        return _timed_fn(mode, fn, sets)

    def work(self, spec, p, mode, ceilings, device) -> Work:
        reads, writes = (k * spec.logits_bytes for k in TRAFFIC[mode])
        return Work(reads + writes, "GB/s", floor_ms(reads, writes, ceilings, device))

    def measure_memory(self, p, fn, inp, modes, device, warm):
        if warm:
            _warm_up(p.name, fn, inp, modes)
        return _measure_memory(fn, inp, modes, device)

    def workload(self, providers, modes) -> dict[str, Any]:
        return {"want_entropy": True, "modes": modes, "traffic_nvb": TRAFFIC, "peer_rtol": PEER_RTOL,
                "providers": {p.name: {"note": p.note, "strict": p.strict, "entropy": p.entropy}
                              for p in providers}}

    def context(self):
        return _no_donated_buffers()


BENCHMARK = TokenLogprobsBenchmark()

main = BENCHMARK.main  # main(argv) -> exit status: what run_all and `python -m` call


if __name__ == "__main__":
    sys.exit(main())
