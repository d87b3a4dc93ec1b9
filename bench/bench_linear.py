"""Benchmark of ``linear_token_logprobs`` (ops.md section 3) following performance.md section 4.

Workload: log-prob + entropy of sampled labels at temperature 0.9 straight from hidden states ``[N, H]`` and
an lm_head ``[V, H]`` (no bias), ~10% of rows ``ignore_index``; the backward takes random upstream gradients
on both outputs and produces the gradients of hidden and weight.

Providers (a missing one is a row saying why, never dropped):

* ``reasonrl``: ``linear_token_logprobs(impl="cpp")`` on CPU, ``validate=False`` (Triton on CUDA once it
  exists; until then the row says unsupported).
* ``reference-eager``: ``hidden.float() @ weight.float().T`` then ``token_logprobs_reference``
  (``reasonrl.reference.linear_token_logprobs_reference``): materialises the [N, V] logits.
* ``reference-compiled``: the same function under ``torch.compile(dynamic=False)``, compiled by the gate calls.
* ``trl-chunked``: TRL's own fused lm_head log-prob + entropy, ``trl.kernels.ChunkedLogProbFunction`` (torch
  tiles of [4096, 32768] on CPU, TRL's default vocabulary chunk). As TRL does off Triton devices, every row is
  scored (label clamped to 0 on ignored rows, which are excluded from the check).
* ``liger-grpo``: ``liger_kernel.chunked_loss.LigerFusedLinearGRPOLoss`` (beta 0, "dapo", on-policy ratio 1,
  per-sequence advantages, the rows viewed as [N / 256, 256] sequences). It returns a loss, not log-probs and
  no entropy: its ``fwd`` row is the loss without autograd, its gradients are checked against the oracle's
  gradients for the equivalent upstream gradient ``g_lp = -A_b mask / sum(mask)``.

Modes: ``fwd`` (no autograd: old-policy / reference log-probs) and ``full`` (training forward + backward).

Correctness gate: every provider runs both modes once on input set 0 and is compared with the float64 oracle
(fp64 matmul then the reference, row block by row block) over valid rows: reasonrl within ops.md section 8,
peers within ``bench.common.peer_bound``. Throughput counts 2 N V H FLOP for ``fwd`` and 8 N V H for ``full``
(forward, recomputed logits, two gradient GEMMs; what a fused kernel does) for every provider, against the
measured GEMM ceiling (``at::mm`` at [1024, H] x [H, V], preallocated output).

Usage: ``python -m reasonrl.bench.bench_linear --profile quick``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch

from . import common
from .common import (
    DTYPE_SHORT,
    DTYPES,
    ERROR,
    INCORRECT,
    MIB,
    NOT_INSTALLED,
    OK,
    OOM,
    UNSUPPORTED,
    MaxError,
)
from reasonrl.reference import linear_token_logprobs_reference

OP = "linear_token_logprobs"
MODULE = __spec__.name if __spec__ else __name__  # the memory subprocesses run `python -m MODULE`
MODES = ("fwd", "full")
FLOPS_NVH = {"fwd": 2, "full": 8}
PEER_DISTS = ("trl", "liger-kernel", "transformers")
DEFAULT_CPU_THREADS = 2
SEQ_LEN = 256  # rows per sequence for Liger's [B, T] layout
_T0 = time.perf_counter()

# (N, H, V, dtype) per profile and device type. CPU full is the acceptance shape of issue 4; quick is a
# quarter of it (~1-2 minutes with every provider on 2 cores).
PROFILES: dict[str, dict[str, list[tuple[int, int, int, str]]]] = {
    "quick": {"cpu": [(2048, 512, 32000, "float32")], "cuda": [(8192, 4096, 151936, "bfloat16")]},
    "full": {"cpu": [(8192, 512, 32000, "float32")], "cuda": [(16384, 4096, 151936, "bfloat16")]},
}


# ----------------------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LinearSpec:
    n: int
    h: int
    v: int
    dtype: str
    temperature: float = 0.9
    target_entropy: float = 2.0
    ignore_fraction: float = 0.1
    ignore_index: int = -100
    seed: int = 0

    @property
    def label(self) -> str:
        return f"{self.n}x{self.h}x{self.v} {DTYPE_SHORT.get(self.dtype, self.dtype)}"


@dataclass
class LinearInputs:
    hidden: torch.Tensor  # [N, H]
    weight: torch.Tensor  # [V, H] (shared by every set)
    labels: torch.Tensor  # [N]
    grad_logprobs: torch.Tensor  # [N] fp32, 0 on ignored rows
    grad_entropy: torch.Tensor
    advantages: torch.Tensor  # [N / SEQ_LEN] (Liger)
    valid: torch.Tensor


def make_inputs(spec: LinearSpec, device: torch.device, n_sets: int, scale: float | None = None
                ) -> tuple[list[LinearInputs], dict[str, Any]]:
    """hidden ~ N(0, 1), weight ~ N(0, 1/H) x scale with the scale calibrated (bench.common) so the mean entropy
    at the temperature is ``target_entropy``; labels sampled from the softmax; ~10% rows ignored."""
    dtype = DTYPES[spec.dtype]
    gen = torch.Generator(device=device)
    gen.manual_seed(spec.seed)
    weight = torch.randn(spec.v, spec.h, generator=gen, device=device) / math.sqrt(spec.h)
    if scale is None:
        probe = torch.randn(128, spec.h, generator=gen, device=device) @ weight.T
        scale = common._calibrate_scale(probe, spec.temperature, spec.target_entropy)
    weight = (weight * scale).to(dtype)
    sets = []
    for k in range(n_sets):
        gen.manual_seed(spec.seed + 1 + k)
        hidden = torch.randn(spec.n, spec.h, generator=gen, device=device).to(dtype)
        labels = torch.empty(spec.n, dtype=torch.long, device=device)
        for rows in common.row_chunks(spec.n, spec.v):
            probs = torch.softmax((hidden[rows].float() @ weight.float().T) / spec.temperature, dim=-1)
            labels[rows] = torch.multinomial(probs, 1, generator=gen).squeeze(-1)
        ignored = torch.randperm(spec.n, generator=gen, device=device)[: round(spec.ignore_fraction * spec.n)]
        labels[ignored] = spec.ignore_index
        valid = labels != spec.ignore_index
        g_lp = torch.randn(spec.n, generator=gen, device=device) * valid
        g_h = torch.randn(spec.n, generator=gen, device=device) * valid
        adv = torch.randn(max(1, spec.n // SEQ_LEN), generator=gen, device=device)
        sets.append(LinearInputs(hidden, weight, labels, g_lp, g_h, adv, valid))
    record = {**asdict(spec), "scale": scale, "n_sets": n_sets,
              "method": "hidden = randn[N,H]; weight = randn[V,H] / sqrt(H) * scale; labels ~ softmax(h W^T / T)"}
    return sets, record


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


def _build_reasonrl(spec: LinearSpec, device: torch.device) -> ProviderFn:
    from reasonrl import linear_token_logprobs

    def fn(inp, hidden, weight):
        out = linear_token_logprobs(hidden, weight, inp.labels, temperature=spec.temperature,
                                    ignore_index=spec.ignore_index, want_entropy=True, validate=False,
                                    impl="cpp" if device.type == "cpu" else "triton")
        return out.logprobs, out.entropy

    return fn


def _build_eager(spec: LinearSpec, device: torch.device) -> ProviderFn:
    return _reference(spec)


def _build_compiled(spec: LinearSpec, device: torch.device) -> ProviderFn:
    torch._dynamo.reset()
    return torch.compile(_reference(spec), dynamic=False)


def _build_trl(spec: LinearSpec, device: torch.device) -> ProviderFn:
    from trl.kernels import ChunkedLogProbFunction

    def fn(inp, hidden, weight):
        lp, ent, *_ = ChunkedLogProbFunction.apply(hidden, weight, None, inp.labels.clamp_min(0), spec.temperature,
                                                   32768, None, 1.0, ("entropy",))
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
class Provider:
    name: str
    build: Callable[[LinearSpec, torch.device], ProviderFn]
    note: str = ""
    strict: bool = False
    loss_only: bool = False  # Liger: a scalar loss, gradients from it
    module: str | None = None
    unavailable: Callable[[torch.device, torch.dtype], str | None] | None = None


PROVIDERS: dict[str, Provider] = {p.name: p for p in (
    Provider("reasonrl", _build_reasonrl, note="linear_token_logprobs impl='cpp' (default 64 MiB workspace)",
             strict=True, unavailable=_reasonrl_unavailable),
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
    for rows in common.row_chunks(spec.n, spec.v, max_elems=1 << 24):
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
            "gh_liger": torch.cat(res["gh_liger"]) if liger else None, "gw_liger": gw_liger if liger else None}


def _check(spec: LinearSpec, inp: LinearInputs, results: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Errors against the fp64 oracle and the bound each provider is held to (per check key)."""
    dtype = DTYPES[spec.dtype]
    liger = any(PROVIDERS[name].loss_only for name in results)
    oracle = _oracle(spec, inp, torch.float64, liger)
    # err(reference) of ops.md section 8: the eager reference's own results when it ran (fp32 inputs), else
    # the reference block by block in fp32.
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
        items += [("train:grad_hidden", gh, "gh" + suffix, "grad"), ("train:grad_weight", gw, "gw" + suffix, "grad")]
        for key, got, okey, kind in items:
            e = MaxError()
            rows = inp.valid if okey in ("lp", "H", "gh", "gh_liger") else torch.ones(got.shape[0], dtype=torch.bool)
            e.update(got.float(), oracle[okey], rows)
            base = okey.removesuffix("_liger")
            # The gradient rule of ops.md 8 is relative to the gradient's own size (grad_param of the table).
            scale = 1 + e.max_oracle if kind == "stat" else e.max_oracle
            err_ref = ref_err[base] if not p.loss_only else 0.0
            bound = common.acceptance_bound("stat" if kind == "stat" else "grad_param", dtype, err_ref, scale)
            if not p.strict:
                bound = common.peer_bound(bound, scale, spec.dtype)
            checks[name][key] = {"err": e.err, "bound": bound, "err_reference_fp32": err_ref,
                                 "max_abs_oracle": e.max_oracle, "ok": e.err <= bound}
    return checks


def _verdict(check: dict[str, dict[str, Any]], mode: str) -> tuple[bool, float | None]:
    keys = [k for k in check if k.startswith("fwd:" if mode == "fwd" else "train:")]
    if not keys:  # Liger's fwd: no log-probs to check, its loss is checked through the gradients
        keys = [k for k in check if k.startswith("train:")]
    return all(check[k]["ok"] for k in keys), max(check[k]["err"] for k in keys)


def _measure_memory(p: Provider, fn: ProviderFn, inp: LinearInputs, modes: list[str]) -> dict[str, Any]:
    device = torch.device("cpu")
    peaks = {}
    if "fwd" in modes:
        _, d, a = common.peak_memory(lambda: _infer(fn, inp), device)
        peaks["fwd"] = {"delta_mib": d / MIB, "peak_mib": a / MIB}
    if "full" in modes:
        _, d, a = common.peak_memory(lambda: _train(p, fn, inp), device)
        peaks["full"] = {"delta_mib": d / MIB, "peak_mib": a / MIB}
    return peaks


def _memcase(payload: dict[str, Any]) -> dict[str, Any]:
    """Child side of the CPU memory measurement: one fresh process per (provider, case)."""
    torch.set_num_threads(payload["threads"])
    spec = LinearSpec(**payload["spec"])
    p = PROVIDERS[payload["provider"]]
    fn = p.build(spec, torch.device("cpu"))
    inp = LinearInputs(**torch.load(payload["inputs"], weights_only=True))
    # Warm-up on a slice (rows are independent) except for torch.compile, which specialises on the shape.
    if payload["provider"] == COMPILED:
        warm = inp
    else:
        k = min(spec.n, 2 * SEQ_LEN)
        warm = LinearInputs(inp.hidden[:k], inp.weight, inp.labels[:k], inp.grad_logprobs[:k],
                            inp.grad_entropy[:k], inp.advantages[: max(1, k // SEQ_LEN)], inp.valid[:k])
    if "fwd" in payload["modes"]:
        _infer(fn, warm)
    _train(p, fn, warm)
    del warm
    return _measure_memory(p, fn, inp, payload["modes"])


def gemm_ceiling(spec: LinearSpec, device: torch.device) -> dict[str, Any]:
    """GFLOP/s of ``at::mm`` at [1024, H] x [H, V] (fp32, the op's chunk GEMM) into a preallocated output."""
    rows = min(1024, spec.n)
    a = torch.randn(rows, spec.h, device=device)
    w = torch.randn(spec.v, spec.h, device=device)
    out = torch.empty(rows, spec.v, device=device)
    t = common.time_fn(lambda _k: torch.mm(a, w.T, out=out), 1, device)
    return {"gemm_gflops": 2 * rows * spec.h * spec.v / t.median_ms / 1e6, "gemm_shape": [rows, spec.h, spec.v],
            "gemm_ms": asdict(t)}


def _log(msg: str) -> None:
    print(f"[{OP} {time.perf_counter() - _T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


def _short(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"


def _row(spec: LinearSpec, mode: str, p: Provider, status: str, detail: str = "") -> dict[str, Any]:
    return {"op": OP, "case": spec.label, "n": spec.n, "h": spec.h, "v": spec.v, "dtype": spec.dtype,
            "mode": mode, "provider": p.name, "status": status, "status_detail": detail, "note": p.note}


def run_case(spec: LinearSpec, providers: list[Provider], modes: list[str], device: torch.device,
             ceilings: dict[str, Any], threads: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    t_case = time.perf_counter()
    sets, record = make_inputs(spec, device, n_sets=2)
    _log(f"{spec.label}: inputs ready")
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    fns: dict[str, ProviderFn] = {}
    for p in providers:
        blocked = None
        if p.module is not None and importlib.util.find_spec(p.module) is None:
            blocked = NOT_INSTALLED, p.module
        elif p.unavailable is not None and (why := p.unavailable(device, DTYPES[spec.dtype])) is not None:
            blocked = UNSUPPORTED, why
        else:
            try:
                fns[p.name] = p.build(spec, device)
            except ImportError as exc:
                blocked = NOT_INSTALLED, _short(exc)
        if blocked is not None:
            for m in modes:
                rows[p.name, m] = _row(spec, m, p, *blocked)

    results: dict[str, dict[str, Any]] = {}
    first_s: dict[str, dict[str, float]] = {}
    for name, fn in list(fns.items()):
        p = PROVIDERS[name]
        try:
            t0 = time.perf_counter()
            fwd = _infer(fn, sets[0])
            t1 = time.perf_counter()
            train = _train(p, fn, sets[0])
            t2 = time.perf_counter()
        except Exception as exc:  # a broken peer must not take the run down
            status = OOM if isinstance(exc, torch.OutOfMemoryError) else ERROR
            del fns[name]
            for m in modes:
                rows[name, m] = _row(spec, m, p, status, _short(exc))
            continue
        results[name] = {"fwd": tuple(t.detach() if t is not None else None for t in fwd),
                         "train": (tuple(t.detach() if t is not None else None for t in train[0]), train[1])}
        first_s[name] = {"fwd": t1 - t0, "full": t2 - t1}
        _log(f"{spec.label}: {name} gate: fwd {t1 - t0:.1f} s, full {t2 - t1:.1f} s")
    checks = _check(spec, sets[0], results) if results else {}
    _log(f"{spec.label}: checked against the float64 oracle")
    del results

    for name, fn in fns.items():
        p = PROVIDERS[name]
        for m in modes:
            passed, max_err = _verdict(checks[name], m)
            row = _row(spec, m, p, OK if passed else INCORRECT)
            row.update(max_err=max_err, errors=checks[name], first_call_s=first_s[name][m])
            rows[name, m] = row
            if not passed:
                continue
            timed = ((lambda k, fn=fn: _infer(fn, sets[k])) if m == "fwd"
                     else (lambda k, fn=fn, p=p: _train(p, fn, sets[k])))
            try:
                t = common.time_fn(timed, len(sets), device, prior_calls=1, prior_s=first_s[name][m])
            except Exception as exc:
                row.update(status=OOM if isinstance(exc, torch.OutOfMemoryError) else ERROR, status_detail=_short(exc))
                continue
            flop = FLOPS_NVH[m] * spec.n * spec.v * spec.h
            floor = flop / ceilings["gemm_gflops"] / 1e6
            row.update(median_ms=t.median_ms, p20_ms=t.p20_ms, p80_ms=t.p80_ms, repeats=t.repeats,
                       warmups=t.warmups, timing_method=t.method, flop=flop, unit="GFLOP/s",
                       throughput=flop / t.median_ms / 1e6, floor_ms=floor, pct_ceiling=100 * floor / t.median_ms)
            _log(f"{spec.label}: {name} {m} {t.median_ms:.0f} ms ({t.repeats} repeats)")

    measured = [name for name in fns if any(rows[name, m]["status"] == OK for m in modes)]
    if device.type == "cpu" and measured:
        with tempfile.TemporaryDirectory(prefix="reasonrl-bench-", dir=common.scratch_dir()) as tmp:
            path = Path(tmp) / "inputs.pt"
            torch.save({f.name: getattr(sets[0], f.name) for f in fields(LinearInputs)}, path)
            for name in measured:
                payload = {"provider": name, "spec": asdict(spec), "inputs": str(path), "threads": threads,
                           "modes": modes}
                mem = common.run_memory_subprocess(MODULE, payload)
                for m in modes:
                    if "error" in mem:
                        rows[name, m]["mem_error"] = mem["error"]
                    else:
                        rows[name, m].update(mem_delta_mib=mem[m]["delta_mib"], mem_peak_mib=mem[m]["peak_mib"],
                                             mem_method="peak RSS (VmHWM) - RSS before, fresh subprocess")
                _log(f"{spec.label}: {name} peak memory delta MiB "
                     f"{mem.get('error') or {m: round(mem[m]['delta_mib']) for m in modes}}")
    record["wall_s"] = time.perf_counter() - t_case
    order = {p.name: i for i, p in enumerate(providers)}
    return sorted(rows.values(), key=lambda r: (MODES.index(r["mode"]), order[r["provider"]])), record


# ----------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__.split("\n")[0])
    ap.add_argument("--profile", choices=sorted(PROFILES), default="quick",
                    help="quick: fp32 [2048, 512, 32000] on CPU; full: the issue-4 shape [8192, 512, 32000]")
    ap.add_argument("--shapes", help="NxHxV[,NxHxV...]: replaces the profile's shapes")
    ap.add_argument("--dtype", help="replaces the profile's dtype")
    ap.add_argument("--providers", default=",".join(PROVIDERS), help=f"subset of {', '.join(PROVIDERS)}")
    ap.add_argument("--modes", default=",".join(MODES), help="subset of fwd,full")
    ap.add_argument("--out-dir", type=Path, default=common.DEFAULT_OUT_DIR)
    ap.add_argument("--threads", type=int, help=f"torch CPU threads (default on CPU: {DEFAULT_CPU_THREADS})")
    ap.add_argument("--_memcase", help=argparse.SUPPRESS)
    return ap


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; 0 on success, 1 when reasonrl failed its correctness gate or errored."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    if args._memcase:
        common.emit_memcase_result(_memcase(json.loads(args._memcase)))
        return 0
    t_start = time.perf_counter()
    device = common.pick_device()
    threads = args.threads or (DEFAULT_CPU_THREADS if device.type == "cpu" else torch.get_num_threads())
    torch.set_num_threads(threads)
    providers = [PROVIDERS[n.strip()] for n in args.providers.split(",") if n.strip()]
    modes = [m.strip() for m in args.modes.split(",") if m.strip() in MODES]
    shapes = PROFILES[args.profile][device.type]
    if args.shapes:
        shapes = [(*map(int, s.lower().split("x")), shapes[0][3]) for s in args.shapes.split(",") if s.strip()]
    if args.dtype:
        shapes = [(n, h, v, args.dtype) for n, h, v, _ in shapes]
    report = common.new_report(OP, device, PEER_DISTS, args.profile, argv)
    report["ceilings"] = common.measure_ceilings(device)
    report["workload"] = {"want_entropy": True, "modes": modes, "flops_nvh": FLOPS_NVH,
                          "providers": {p.name: {"note": p.note, "strict": p.strict} for p in providers}}
    for n, h, v, dtype in shapes:
        spec = LinearSpec(n=n, h=h, v=v, dtype=dtype)
        ceil = gemm_ceiling(spec, device)
        report["ceilings"].update(ceil)
        _log(f"GEMM ceiling {ceil['gemm_gflops']:.0f} GFLOP/s at {ceil['gemm_shape']}")
        rows, record = run_case(spec, providers, modes, device, report["ceilings"], threads)
        report["rows"] += rows
        report["cases"].append(record)
    common.fill_speedups(report["rows"], EAGER, COMPILED)
    report["wall_s"] = time.perf_counter() - t_start
    paths = common.write_results(report, args.out_dir, device)
    common.print_tables(report["rows"], report)
    print(f"GEMM ceiling: {report['ceilings'].get('gemm_gflops', 0):.0f} GFLOP/s (fp32 at::mm)")
    print(f"wrote {', '.join(str(p) for p in paths.values())} ({report['wall_s']:.0f} s)")
    failed = [r for r in report["rows"] if r["provider"] == "reasonrl" and r["status"] in (INCORRECT, ERROR)]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
