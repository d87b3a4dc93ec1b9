"""Benchmark of ``phase_entropy`` (docs/ops.md section 6) following docs/performance.md section 4.

Workload: PEAR's phase means on a padded batch, entropies ``[B, T]`` in U[0, 4) nats, a ragged mask
(lengths in [T/2, T], ~5% holes inside, as tool-output tokens), one marker of 2 tokens per sequence at a
random valid-token index (10% of the sequences without a marker); the backward takes random upstream
gradients of both means. A case is ``--shapes BxT``.

Providers: ``reasonrl`` (``impl="cpp"`` on CPU, ``"triton"`` on CUDA, ``validate=False``),
``reference-eager`` (``reasonrl.reference.phase_entropy_reference``, ``validate=False``) and
``reference-compiled`` (the same under ``torch.compile(dynamic=False)``, compiled by the gate's calls: the
strongest plain-PyTorch baseline, since inductor fuses the reference's masked copies and index_adds).

Modes: ``fwd`` (under no_grad, as the reward calls it), ``bwd`` (``autograd.grad`` on a retained graph) and
``full`` (forward + backward). Traffic counted (section 1): the forward reads the entropies and the mask,
the backward reads the mask and writes the gradient. Correctness gate: the means and the gradient against
the float64 reference, under docs/ops.md section 8 (``reasonrl.testing``'s table) for reasonrl and
``bench.accuracy.peer_bound`` for the others.

Usage: ``python -m reasonrl.bench.bench_phase_entropy --profile quick``.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import Any

import torch

from reasonrl.reference.phase_entropy import phase_entropy_reference

from . import harness
from .accuracy import MaxError, acceptance_bound, peer_bound
from .bench_token_logprobs import _no_donated_buffers
from .ceilings import floor_ms
from .harness import GateRun, Verdict, Work
from .inputs import DTYPE_SHORT, DTYPES, n_rotating_sets
from .memory import peak_memory

OP = "phase_entropy"
MODULE = __spec__.name if __spec__ else __name__
MODES = ("fwd", "bwd", "full")
PEER_DISTS = ()
BOUNDARY_LEN = 2
# (B, T, dtype): GRPO batches of B completions up to T tokens (CPU: what 2 cores time in seconds).
PROFILES: dict[str, dict[str, list[tuple[int, int, str]]]] = {
    "quick": {"cpu": [(256, 4096, "float32")], "cuda": [(1024, 8192, "float32"), (1024, 8192, "bfloat16")]},
    "full": {"cpu": [(64, 4096, "float32"), (256, 4096, "float32"), (256, 16384, "float32"),
                     (256, 4096, "bfloat16")],
             "cuda": [(b, 8192, "float32") for b in (256, 1024, 4096)] + [(1024, 32768, "bfloat16")]},
}


@dataclass(frozen=True)
class PhaseSpec:
    b: int
    t: int
    dtype: str
    seed: int = 0

    @property
    def n(self) -> int:  # token rows
        return self.b * self.t

    @property
    def label(self) -> str:
        return f"{self.b}x{self.t} {DTYPE_SHORT.get(self.dtype, self.dtype)}"


@dataclass
class PhaseInputs:
    entropy: torch.Tensor  # [B, T] in the case's dtype
    mask: torch.Tensor  # [B, T] bool
    boundary: torch.Tensor  # [B] int64
    grad_before: torch.Tensor  # [B] fp32
    grad_after: torch.Tensor  # [B] fp32


def make_inputs(spec: PhaseSpec, device: torch.device, n_sets: int) -> list[PhaseInputs]:
    sets = []
    for k in range(n_sets):
        gen = torch.Generator(device=device).manual_seed(spec.seed + 1 + k)
        ent = (torch.rand((spec.b, spec.t), generator=gen, device=device) * 4.0).to(DTYPES[spec.dtype])
        lengths = torch.randint(spec.t // 2, spec.t + 1, (spec.b,), generator=gen, device=device)
        mask = (torch.arange(spec.t, device=device)[None, :] < lengths[:, None]) & (
            torch.rand((spec.b, spec.t), generator=gen, device=device) >= 0.05)
        n = mask.sum(dim=1)
        boundary = (torch.rand(spec.b, generator=gen, device=device) * n).long()
        no_marker = torch.rand(spec.b, generator=gen, device=device) < 0.1
        boundary = torch.where(no_marker, n, boundary)
        g_b = torch.randn(spec.b, generator=gen, device=device)
        g_a = torch.randn(spec.b, generator=gen, device=device)
        sets.append(PhaseInputs(ent, mask, boundary, g_b, g_a))
    return sets


# fn(entropy, mask, boundary) -> PhaseEntropy
def _build_reasonrl(spec: PhaseSpec, device: torch.device):
    from reasonrl.ops.phase_entropy import phase_entropy

    impl = "triton" if device.type == "cuda" else "cpp"
    return lambda e, m, b: phase_entropy(e, b, mask=m, boundary_len=BOUNDARY_LEN, impl=impl, validate=False)


def _reference(e, m, b):
    return phase_entropy_reference(e, b, mask=m, boundary_len=BOUNDARY_LEN, validate=False)


def _build_eager(spec: PhaseSpec, device: torch.device):
    return _reference


def _build_compiled(spec: PhaseSpec, device: torch.device):
    torch._dynamo.reset()  # a fresh cache per case: dynamic=False compiles one graph per shape and grad mode
    return torch.compile(_reference, dynamic=False)


def _reasonrl_unavailable(device: torch.device, dtype: torch.dtype) -> str | None:
    from reasonrl._backend import unavailable_reason

    return unavailable_reason("triton" if device.type == "cuda" else "cpp", device, dtype)


PROVIDERS: dict[str, harness.Provider] = {p.name: p for p in (
    harness.Provider("reasonrl", _build_reasonrl, strict=True, unavailable=_reasonrl_unavailable,
                     note="impl='cpp' on CPU, 'triton' on CUDA; validate=False"),
    harness.Provider("reference-eager", _build_eager,
                     note="reasonrl.reference.phase_entropy_reference, validate=False"),
    harness.Provider("reference-compiled", _build_compiled,
                     note="torch.compile(reference, dynamic=False); compiled by the gate calls, not timed"),
)}


def _infer(fn, inp: PhaseInputs):
    with torch.no_grad():
        return fn(inp.entropy, inp.mask, inp.boundary)


def _backward(out, inp: PhaseInputs, retain: bool) -> torch.Tensor:
    return torch.autograd.grad([out.mean_before, out.mean_after], inp.entropy,
                               [inp.grad_before, inp.grad_after], retain_graph=retain)[0]


def _oracle(inp: PhaseInputs, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean_before, mean_after, gradient) of the reference computed in ``dtype`` on the same values."""
    leaf = inp.entropy.detach().to(dtype).requires_grad_(True)
    out = _reference(leaf, inp.mask, inp.boundary)
    acc = out.mean_before.dtype
    grad = torch.autograd.grad([out.mean_before, out.mean_after], leaf,
                               [inp.grad_before.to(acc), inp.grad_after.to(acc)])[0]
    return out.mean_before.detach(), out.mean_after.detach(), grad


class PhaseEntropyBenchmark(harness.Benchmark):
    op, module, modes, profiles, providers, peer_dists = OP, MODULE, MODES, PROFILES, PROVIDERS, PEER_DISTS
    spec_cls, inputs_cls, leaves = PhaseSpec, PhaseInputs, ("entropy",)
    shape_form = "BxT"
    profile_help = "quick: one CPU case (256 x 4096 fp32) or two GPU cases; full: more shapes and dtypes"

    def make_inputs(self, spec, device):
        bytes_per_set = spec.n * (DTYPES[spec.dtype].itemsize + 1)
        sets = make_inputs(spec, device, n_rotating_sets(bytes_per_set, device, cap=8))
        record = {"b": spec.b, "t": spec.t, "dtype": spec.dtype, "n_sets": len(sets),
                  "boundary_len": BOUNDARY_LEN, "valid_fraction": float(sets[0].mask.float().mean()),
                  "layout": "padded [B, T] with a ragged mask"}
        return sets, record

    def oracle(self, spec, inp, device):
        return {"float64": _oracle(inp, torch.float64), "same": _oracle(inp, torch.float32)}

    def gate(self, p, fn, inp, modes, device, oracle) -> GateRun:
        def sync():
            if device.type == "cuda":
                torch.cuda.synchronize(device)

        result: dict[str, Any] = {}
        first: dict[str, float] = {}
        if "fwd" in modes:
            t0 = time.perf_counter()
            out = _infer(fn, inp)
            sync()
            first["fwd"] = time.perf_counter() - t0
            result["fwd"] = (out.mean_before.detach().cpu(), out.mean_after.detach().cpu())
        if "bwd" in modes or "full" in modes:
            t0 = time.perf_counter()
            out = fn(inp.entropy, inp.mask, inp.boundary)
            grad = _backward(out, inp, retain=False)
            sync()
            first["bwd"] = first["full"] = time.perf_counter() - t0
            result["train"] = (out.mean_before.detach().cpu(), out.mean_after.detach().cpu(),
                               grad.detach().cpu())
        return GateRun(result, {m: first[m] for m in modes})

    def check(self, spec, inp, results, device, oracle) -> dict[str, dict[str, Verdict]]:
        dtype = DTYPES[spec.dtype]
        o_b, o_a, o_g = (t.cpu() for t in oracle["float64"])
        r_b, r_a, r_g = (t.cpu() for t in oracle["same"])
        everything = torch.ones_like(o_b, dtype=torch.bool)
        tokens = torch.ones_like(o_g, dtype=torch.bool)

        def err(a, o, valid, ulp=None):
            e = MaxError()
            e.update(a, o, valid, ulp, 1.0 if ulp is not None else 0.0)
            return e

        ref_stat = max(err(r_b, o_b, everything).err, err(r_a, o_a, everything).err)
        grad_ulp = dtype if dtype in (torch.bfloat16, torch.float16) else None
        ref_grad = err(r_g, o_g, tokens).err
        upstream = float(max(inp.grad_before.abs().max(), inp.grad_after.abs().max()))
        stat_scale = 1 + float(max(o_b.abs().max(), o_a.abs().max()))
        verdicts: dict[str, dict[str, Verdict]] = {}
        for name, res in results.items():
            strict = self.providers[name].strict
            checks: dict[str, Any] = {}
            for tag in ("fwd", "train"):
                if tag not in res:
                    continue
                e_stat = max(err(res[tag][0], o_b, everything).err, err(res[tag][1], o_a, everything).err)
                bound = acceptance_bound("stat", dtype, ref_stat, stat_scale)
                bound = bound if strict else peer_bound(bound, stat_scale, spec.dtype)
                checks[f"{tag}:means"] = {"err": e_stat, "bound": bound, "ok": e_stat <= bound}
                if tag == "train":
                    e = err(res[tag][2], o_g, tokens, grad_ulp)
                    measured = e.err_beyond_ulp if grad_ulp is not None else e.err
                    bound = acceptance_bound("grad", dtype, ref_grad, upstream)
                    bound = bound if strict else peer_bound(bound, e.max_oracle, spec.dtype)
                    checks["train:grad"] = {"err": e.err, "measured": measured, "bound": bound,
                                            "ok": measured <= bound}
            modes = {}
            for mode in MODES:
                keys = ["fwd:means"] if mode == "fwd" else ["train:means", "train:grad"]
                if all(k in checks for k in keys):
                    shown = ["train:grad"] if mode == "bwd" else keys
                    modes[mode] = Verdict(all(checks[k]["ok"] for k in keys),
                                          max(checks[k]["err"] for k in shown), checks)
            verdicts[name] = modes
        return verdicts

    def timed(self, p, fn, sets, mode):
        if mode == "fwd":
            return (lambda k: _infer(fn, sets[k])), []
        if mode == "full":
            return (lambda k: _backward(fn(sets[k].entropy, sets[k].mask, sets[k].boundary), sets[k],
                                        retain=False)), []
        graphs = [fn(s.entropy, s.mask, s.boundary) for s in sets]
        return (lambda k: _backward(graphs[k], sets[k], retain=True)), graphs

    def work(self, spec, p, mode, ceilings, device) -> Work:
        x, m = spec.n * DTYPES[spec.dtype].itemsize, spec.n  # entropies, bool mask
        reads, writes = {"fwd": (x + m, 0), "bwd": (m, x), "full": (x + 2 * m, x)}[mode]
        return Work(reads + writes, "GB/s", floor_ms(reads, writes, ceilings, device))

    def measure_memory(self, p, fn, inp, modes, device, warm):
        if warm:
            _infer(fn, inp)
            _backward(fn(inp.entropy, inp.mask, inp.boundary), inp, retain=False)
        peaks: dict[str, tuple[int, int]] = {}
        if "fwd" in modes:
            _, d, a = peak_memory(lambda: _infer(fn, inp), device)
            peaks["fwd"] = d, a
        if "bwd" in modes or "full" in modes:
            out, d_train, a_train = peak_memory(lambda: fn(inp.entropy, inp.mask, inp.boundary), device)
            _, d_bwd, a_bwd = peak_memory(lambda: _backward(out, inp, retain=False), device)
            base, a_full = a_train - d_train, max(a_train, a_bwd)
            peaks.update(bwd=(d_bwd, a_bwd), full=(a_full - base, a_full))
        return {m: peaks[m] for m in modes}

    def context(self):
        # The bwd mode retains graphs, which a compiled backward with donated buffers refuses (as in
        # bench_token_logprobs.py, whose context this is).
        return _no_donated_buffers()


BENCHMARK = PhaseEntropyBenchmark()

main = BENCHMARK.main


if __name__ == "__main__":
    sys.exit(main())
