"""Tests of ``reasonrl.linear_token_logprobs`` (docs/ops.md sections 3, 7 and 8) on
CPU: ``cpp`` and ``reference``.

Accuracy follows docs/ops.md section 8 through ``reasonrl.testing``: outputs and the three gradients (hidden,
weight, bias) against a float64 oracle (fp64 matmul, then the reference), within 2x the error of the
reference computed in the input dtype with fp32 accumulation, plus a small atol. The realistic-shape memory
test measures peak RSS with the benchmarks' own helper (``bench.memory.peak_memory``) in a fresh process.
"""

from __future__ import annotations

import importlib
import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import NamedTuple

import pytest
import torch

import reasonrl
from reasonrl._backend import unavailable_reason
from reasonrl.ops.linear_token_logprobs import linear_token_logprobs, registered_ops
from reasonrl.reference.linear_token_logprobs import linear_token_logprobs_reference
from reasonrl.testing import assert_param_grad_close, assert_stat_close, sample_labels

CPU = torch.device("cpu")
F32, BF16, F16, F64 = torch.float32, torch.bfloat16, torch.float16, torch.float64
REPO_ROOT = Path(__file__).resolve().parents[2]


def skip_unless(impl: str, dtype: torch.dtype = F32) -> None:
    why = unavailable_reason(impl, CPU, dtype)
    if why is not None:
        pytest.skip(f"impl={impl!r} cannot run {dtype} on CPU here: {why}")


class LinearCase(NamedTuple):
    hidden: torch.Tensor  # [*lead, H], input dtype
    weight: torch.Tensor  # [V, H]
    bias: torch.Tensor | None
    labels: torch.Tensor
    temperature: float | torch.Tensor
    g_lp: torch.Tensor  # [*lead] fp32 (fp64 for fp64)
    g_h: torch.Tensor


def make_case(lead, hidden_size, vocab, *, dtype=F32, bias=True, temperature="row", ignore_frac=0.2, seed=0):
    """Logits h W^T + b with entropies of a few nats (weight std 2.5 / sqrt(H)), labels sampled from the
    fp64 softmax, a fraction of rows ignored, random upstream gradients of both signs."""
    g = torch.Generator().manual_seed(seed)
    if isinstance(lead, int):
        lead = (lead,)
    acc = F64 if dtype == F64 else F32
    hidden = torch.randn(*lead, hidden_size, generator=g, dtype=F64).to(dtype)
    weight = (torch.randn(vocab, hidden_size, generator=g, dtype=F64) * 2.5
              / math.sqrt(hidden_size)).to(dtype)
    b = (torch.randn(vocab, generator=g, dtype=F64) * 0.5).to(dtype) if bias else None
    if temperature == "row":
        temp = (0.5 + torch.rand(lead, generator=g, dtype=F64)).to(acc)
    else:
        temp = float(temperature)
    logits = hidden.double() @ weight.double().T + (b.double() if bias else 0)
    labels = sample_labels(logits, temperature=temp, ignore_frac=ignore_frac, generator=g)
    g_lp = torch.randn(lead, generator=g, dtype=F64).to(acc)
    g_h = torch.randn(lead, generator=g, dtype=F64).to(acc)
    return LinearCase(hidden, weight, b, labels, temp, g_lp, g_h)


class Run(NamedTuple):
    logprobs: torch.Tensor
    entropy: torch.Tensor
    rank: torch.Tensor
    lse: torch.Tensor
    grads: tuple  # (grad_hidden, grad_weight, grad_bias or None)


def run(case: LinearCase, fn, *, cast=None, grads=True, **kwargs) -> Run:
    """fn(hidden, weight, labels, bias=..., ...) on leaves cast to ``cast`` (default: the case's dtype),
    then backpropagate the case's upstream gradients from log-probs and entropy."""
    leaves = [t if t is None else t.detach().to(cast or t.dtype).requires_grad_(grads)
              for t in (case.hidden, case.weight, case.bias)]
    temp = case.temperature
    if cast is not None and isinstance(temp, torch.Tensor):
        temp = temp.to(F64 if cast == F64 else F32)
    out = fn(leaves[0], leaves[1], case.labels, bias=leaves[2], temperature=temp, want_entropy=True,
             want_rank=True, return_lse=True, **kwargs)
    g = (None, None, None)
    if grads:
        wrt = [t for t in leaves if t is not None]
        dt = out.logprobs.dtype
        got = torch.autograd.grad([out.logprobs, out.entropy], wrt, [case.g_lp.to(dt), case.g_h.to(dt)])
        g = tuple(got) + ((None,) if case.bias is None else ())
    return Run(out.logprobs, out.entropy, out.rank, out.lse, g)


def oracle(case: LinearCase, grads=True) -> Run:
    return run(case, linear_token_logprobs_reference, cast=F64, grads=grads, compute_dtype=F64)


def check_case(case: LinearCase, impl: str, *, grads=True, tag="", **kwargs) -> None:
    """docs/ops.md section 8 for every output and gradient; ignored rows exactly 0."""
    dtype = case.hidden.dtype
    name = (f"{impl} {str(dtype).removeprefix('torch.')} "
            f"{tuple(case.hidden.shape)}x{case.weight.shape[0]}{tag}")
    got = run(case, linear_token_logprobs, grads=grads, impl=impl, **kwargs)
    ora = oracle(case, grads=grads)
    # err(reference) in the input dtype with fp32 accumulation: the reference on the same leaves.
    ref = run(case, linear_token_logprobs_reference, grads=grads)
    valid = case.labels != -100
    acc = F64 if dtype == F64 else F32
    for field in ("logprobs", "entropy", "lse"):
        x = getattr(got, field)
        assert x.dtype == acc and x.shape == case.labels.shape, f"{name} {field}: {x.dtype} {tuple(x.shape)}"
        assert_stat_close(x, getattr(ora, field), getattr(ref, field), dtype=dtype, name=f"{name} {field}",
                          valid=valid)
        assert bool((x[~valid] == 0).all()), f"{name} {field}: ignored rows must be 0"
    # rank: only columns within 1e-4 (1 + |x_y|) of the label logit may be
    # counted differently (docs/ops.md 8).
    logits = case.hidden.double().reshape(-1, case.hidden.shape[-1]) @ case.weight.double().T
    if case.bias is not None:
        logits = logits + case.bias.double()
    y = case.labels.reshape(-1).clamp_min(0)
    x_y = logits.gather(1, y[:, None])
    near = ((logits - x_y).abs() <= 1e-4 * (1 + x_y.abs())).sum(1) - 1
    diff = (got.rank.reshape(-1) - ora.rank.reshape(-1)).abs()
    assert got.rank.dtype == torch.int32
    assert bool((diff <= near)[valid.reshape(-1)].all()), f"{name} rank differs beyond near-ties"
    assert bool((got.rank[~valid] == 0).all())
    if grads:
        for label, a, o, r in zip(("grad_hidden", "grad_weight", "grad_bias"), got.grads, ora.grads,
                                  ref.grads, strict=True):
            if o is None:
                assert a is None
                continue
            assert a.dtype == dtype and a.shape == o.shape, f"{name} {label}: {a.dtype} {tuple(a.shape)}"
            assert_param_grad_close(a, o, r, dtype=dtype, name=f"{name} {label}")
        gh = got.grads[0]
        assert bool((gh[~valid] == 0).all()), f"{name} grad_hidden: ignored rows must be 0"


# ----------------------------------------------------------------------------------------------------------
# Accuracy against the float64 oracle (docs/ops.md section 8)
# ----------------------------------------------------------------------------------------------------------

# Grid chosen on purpose: V = 1000 (not a multiple of the SIMD width or of the row kernels' 2048-column
# chunk) and V = 2049 (one chunk + 1: a rescale across chunks); tiny workspaces force many GEMM chunks and a
# last partial chunk (37 rows, ~20% ignored, so the chunks are gathered rows). fp16 shares the bf16 code path.
ACCURACY = [
    pytest.param(impl, dtype, vocab, ws, id=f"{impl}-{str(dtype).removeprefix('torch.')}-V{vocab}-{wsid}")
    for impl in ("cpp", "reference")
    for dtype in (F32, BF16, F64)
    for vocab in (1000, 2049)
    for ws, wsid in ((None, "ws-default"), (7 * (vocab + 64) * 8, "ws-7rows"))
    if impl == "cpp" or ws is None
] + [  # the Triton kernels through the public op (triton_ops + autograd), under the interpreter
    pytest.param("triton", dtype, 1000, None, id=f"triton-{str(dtype).removeprefix('torch.')}-V1000")
    for dtype in (F32, BF16)
]


@pytest.mark.parametrize("impl,dtype,vocab,workspace", ACCURACY)
def test_matches_oracle(impl, dtype, vocab, workspace):
    skip_unless(impl, dtype)
    case = make_case(37, 64, vocab, dtype=dtype, seed=vocab)
    kwargs = {"workspace_bytes": workspace} if workspace else {}
    check_case(case, impl, **kwargs)


@pytest.mark.parametrize("impl", ["cpp", "reference"])
@pytest.mark.parametrize("bias,temperature", [(False, 1.0), (True, 0.7), (False, "row")],
                         ids=["nobias-t1", "bias-t0.7", "nobias-row"])
def test_bias_and_temperature_forms(impl, bias, temperature):
    skip_unless(impl)
    case = make_case(29, 32, 515, bias=bias, temperature=temperature, seed=3)
    check_case(case, impl)


def test_fp16_matches_oracle():
    skip_unless("cpp", F16)
    check_case(make_case(21, 48, 777, dtype=F16, seed=5), "cpp")


def test_cpp_realistic_rows():
    """300 rows x H 256 x V 8000 fp32 through the default workspace: several parallel_for tasks, all valid
    rows (no gather: the chunk is a view of hidden) and a bias."""
    skip_unless("cpp")
    case = make_case(300, 256, 8000, ignore_frac=0.0, seed=11)
    check_case(case, "cpp")


def test_workspace_does_not_change_results():
    """Chunking changes only the GEMM blocking: results equal the default to fp32 rounding."""
    skip_unless("cpp")
    case = make_case(64, 32, 300, seed=4)
    a = run(case, linear_token_logprobs, impl="cpp")
    b = run(case, linear_token_logprobs, impl="cpp", workspace_bytes=1)  # one row per chunk
    for x, y in zip(a[:4], b[:4], strict=True):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)
    for x, y in zip(a.grads, b.grads, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5)


def test_leading_shape_and_strided_hidden():
    """hidden [B, T, H] as a strided view (hidden[:, :-1], what a causal LM's shift produces)."""
    skip_unless("cpp")
    g = torch.Generator().manual_seed(0)
    full = torch.randn(3, 8, 16, generator=g)
    weight = torch.randn(50, 16, generator=g) / 2
    labels = torch.randint(0, 50, (3, 7), generator=g)
    labels[1, 2] = -100
    outs = {}
    for label, h in (("view", full[:, :-1]), ("contiguous", full[:, :-1].contiguous())):
        leaf = h.detach().clone() if label == "contiguous" else None
        src = full.detach().clone().requires_grad_(True)
        x = src[:, :-1] if label == "view" else leaf.requires_grad_(True)
        out = linear_token_logprobs(x, weight, labels, want_entropy=True, impl="cpp")
        assert out.logprobs.shape == (3, 7)
        (out.logprobs.sum() + out.entropy.sum()).backward()
        grad = src.grad[:, :-1] if label == "view" else leaf.grad
        outs[label] = (out.logprobs, out.entropy, grad)
    for a, b in zip(outs["view"], outs["contiguous"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------
# Gradient checks, opcheck, torch.compile
# ----------------------------------------------------------------------------------------------------------


def assert_gradcheck_fp64(impl: str, **kwargs) -> None:
    """Finite differences in fp64 for hidden, weight and bias through both outputs: 6 rows x H 4 x V 9,
    per-row temperature, an ignored row. ``kwargs`` go to the op (workspace and saved-logits budgets)."""
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(6, 4, generator=g, dtype=F64, requires_grad=True)
    weight = torch.randn(9, 4, generator=g, dtype=F64, requires_grad=True)
    bias = torch.randn(9, generator=g, dtype=F64, requires_grad=True)
    labels = torch.tensor([0, 8, -100, 3, 4, 5])
    temperature = torch.tensor([0.7, 1.0, 1.3, 2.0, 0.5, 0.9], dtype=F64)

    def fn(h, w, b):
        out = linear_token_logprobs(h, w, labels, bias=b, temperature=temperature, want_entropy=True,
                                    impl=impl, **kwargs)
        return out.logprobs, out.entropy

    assert torch.autograd.gradcheck(fn, (hidden, weight, bias), eps=1e-6, atol=1e-8, rtol=1e-6)


def opcheck_inputs():
    """fp32 operands of the registered ops: hidden [6, 8], weight [37, 8], bias [37], labels with an ignored
    row; returns (generator, h, w, b, labels), the generator to draw further inputs from."""
    g = torch.Generator().manual_seed(0)
    h = torch.randn(6, 8, generator=g)
    w = torch.randn(37, 8, generator=g)
    b = torch.randn(37, generator=g)
    labels = torch.tensor([0, 36, -100, 5, 17, 2])
    return g, h, w, b, labels


def assert_compile_fullgraph_matches_eager(**kwargs) -> None:
    """torch.compile(fullgraph=True) of the public op (cpp, validate=False), forward + backward: the loss,
    rank and the three gradients equal eager's. ``kwargs`` go to the op."""
    torch._dynamo.reset()
    case = make_case(12, 16, 300, seed=2)

    def step(h, w, b, labels, temperature, g_lp, g_h):
        out = linear_token_logprobs(h, w, labels, bias=b, temperature=temperature, want_entropy=True,
                                    want_rank=True, validate=False, impl="cpp", **kwargs)
        return (out.logprobs * g_lp).sum() + (out.entropy * g_h).sum(), out.rank

    def leaves():
        return [t.detach().clone().requires_grad_(True) for t in (case.hidden, case.weight, case.bias)]

    eager = leaves()
    loss_e, rank_e = step(*eager, case.labels, case.temperature, case.g_lp, case.g_h)
    loss_e.backward()
    compiled = torch.compile(step, fullgraph=True)
    comp = leaves()
    loss_c, rank_c = compiled(*comp, case.labels, case.temperature, case.g_lp, case.g_h)
    loss_c.backward()
    torch.testing.assert_close(loss_c, loss_e)
    assert torch.equal(rank_c, rank_e)
    for a, b in zip(comp, eager, strict=True):
        torch.testing.assert_close(a.grad, b.grad)


@pytest.mark.parametrize("impl", ["cpp", "reference"])
def test_gradcheck_fp64(impl):
    """Finite differences in fp64 through 2-row chunks (three chunks, the last partial) for cpp."""
    skip_unless(impl, F64)
    kwargs = {"workspace_bytes": 2 * (9 + 4) * 8} if impl == "cpp" else {}
    assert_gradcheck_fp64(impl, **kwargs)


def test_opcheck_cpp_ops():
    """torch.library.opcheck on both registered C++ ops (schema, fake impl, autograd, aot dispatch)."""
    skip_unless("cpp")
    fwd, bwd = registered_ops("cpp")
    g, h, w, b, labels = opcheck_inputs()
    temp = 0.5 + torch.rand(6, generator=g)
    # (hidden, weight, bias?, labels, temperature?, temperature_scalar, ignore_index, want_entropy, want_rank,
    #  chunk_rows)
    for args in [
        (h.clone().requires_grad_(), w.clone().requires_grad_(), b.clone().requires_grad_(), labels, None,
         0.8, -100, True, True, 0),
        (h.clone().requires_grad_(), w.clone(), None, labels.int(), temp, 1.0, -100, True, False, 2),
        (h.clone(), w.clone().requires_grad_(), b, labels, temp, 1.0, -100, False, True, 4),
        (h.to(BF16), w.to(BF16), b.to(BF16), labels, None, 1.0, -100, True, True, 0),
    ]:
        torch.library.opcheck(fwd, args)
    lp, ent, _, _, stats, _ = fwd(h, w, b, labels, temp, 1.0, -100, True, False, 0)  # + saved_logits [0, V]
    g_lp, g_h = torch.randn(6, generator=g), torch.randn(6, generator=g)
    for gl, gh, mask in [(g_lp, g_h, [True, True, True]), (g_lp, None, [True, False, False]),
                         (None, g_h, [False, True, True])]:
        torch.library.opcheck(bwd, (gl, gh, h, w, b, labels, temp, 1.0, -100, stats, ent, 3, mask))


def test_compile_fullgraph_cpp():
    """torch.compile(fullgraph=True) of the public op, validate=False, forward + backward (docs/ops.md 0)."""
    skip_unless("cpp")
    assert_compile_fullgraph_matches_eager()


# ----------------------------------------------------------------------------------------------------------
# Edge cases (docs/ops.md sections 3 and 7)
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["cpp", "reference"])
@pytest.mark.parametrize("what", ["N0", "all-ignored"])
def test_no_valid_rows(impl, what):
    """N = 0 or every row ignored: outputs of the documented shape; grad_weight / grad_bias are zero tensors
    (not None), grad_hidden zero."""
    skip_unless(impl)
    n = 0 if what == "N0" else 5
    h = torch.randn(n, 8, requires_grad=True)
    w = torch.randn(20, 8, requires_grad=True)
    b = torch.randn(20, requires_grad=True)
    labels = torch.full((n,), -100, dtype=torch.long)
    out = linear_token_logprobs(h, w, labels, bias=b, want_entropy=True, want_rank=True, return_lse=True,
                                impl=impl)
    for t in out:
        assert t.shape == (n,) and bool((t == 0).all())
    assert out.logprobs.dtype == F32 and out.rank.dtype == torch.int32
    gh, gw, gb = torch.autograd.grad([out.logprobs.sum() + out.entropy.sum()], [h, w, b])
    for grad, like in ((gh, h), (gw, w), (gb, b)):
        assert grad is not None and grad.shape == like.shape and grad.dtype == like.dtype
        assert bool((grad == 0).all())


def test_partial_requires_grad_and_lp_only():
    """Only hidden requires grad (frozen lm_head), gradient from the log-probs alone, no entropy requested."""
    skip_unless("cpp")
    case = make_case(20, 16, 100, bias=False, seed=7)
    h = case.hidden.clone().requires_grad_(True)
    out = linear_token_logprobs(h, case.weight, case.labels, temperature=case.temperature, impl="cpp")
    assert out.entropy is None and out.rank is None and out.lse is None
    (gh,) = torch.autograd.grad(out.logprobs, h, case.g_lp)
    h64 = case.hidden.double().requires_grad_(True)
    ref = linear_token_logprobs_reference(h64, case.weight.double(), case.labels,
                                          temperature=case.temperature)
    (gh64,) = torch.autograd.grad(ref.logprobs, h64, case.g_lp.double())
    torch.testing.assert_close(gh.double(), gh64, rtol=1e-4, atol=1e-5)


def test_nothing_saved_without_grad():
    """Old-policy / reference passes: no input requires grad -> no autograd node, nothing saved."""
    skip_unless("cpp")
    case = make_case(10, 8, 40)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = linear_token_logprobs(case.hidden, case.weight, case.labels, bias=case.bias, want_entropy=True,
                                    impl="cpp")
    assert out.logprobs.grad_fn is None and not saved


def test_weight_tied_and_reused_twice():
    """Gradients accumulate into one weight used by two calls (tied embeddings / several micro-batches)."""
    skip_unless("cpp")
    case = make_case(16, 8, 64, bias=False, seed=9)
    w = case.weight.clone().requires_grad_(True)
    w_ref = case.weight.clone().requires_grad_(True)
    for fn, weight, kw in ((linear_token_logprobs, w, {"impl": "cpp"}),
                           (linear_token_logprobs_reference, w_ref, {})):
        for half in (slice(0, 8), slice(8, 16)):
            out = fn(case.hidden[half], weight, case.labels[half], want_entropy=True, **kw)
            (out.logprobs * case.g_lp[half] + out.entropy * case.g_h[half]).sum().backward()
    torch.testing.assert_close(w.grad, w_ref.grad, rtol=1e-4, atol=1e-6)


def test_auto_picks_cpp_and_explicit_triton_raises(monkeypatch):
    skip_unless("cpp")
    mod = importlib.import_module("reasonrl.ops.linear_token_logprobs")  # the attribute is the function
    called = []

    def spy(*a, **k):
        called.append(1)
        return linear_token_logprobs_reference(*a, **k)

    monkeypatch.setattr(mod, "linear_token_logprobs_reference", spy)
    h, w, y = torch.randn(3, 4), torch.randn(5, 4), torch.tensor([0, 1, 2])
    linear_token_logprobs(h, w, y)
    assert not called
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="triton"):
        linear_token_logprobs(h, w, y, impl="triton")
    monkeypatch.setenv("REASONRL_IMPL", "reference")
    linear_token_logprobs(h, w, y)
    assert called


# ----------------------------------------------------------------------------------------------------------
# Errors (docs/ops.md section 7)
# ----------------------------------------------------------------------------------------------------------

_H, _W, _Y = ((lambda: torch.randn(4, 8)), (lambda: torch.randn(10, 8)),
              (lambda: torch.tensor([0, 1, 9, -100])))


@pytest.mark.parametrize("impl", ["cpp", "reference"])
@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        ({"weight": torch.randn(10, 7)}, ValueError, "weight"),
        ({"weight": torch.randn(10)}, ValueError, "weight"),
        ({"weight": torch.randn(0, 8)}, ValueError, "V"),
        ({"hidden": torch.randn(4, 0), "weight": torch.randn(10, 0)}, ValueError, "H"),
        ({"labels": torch.tensor([0, 1, 2])}, ValueError, "labels"),
        ({"bias": torch.randn(9)}, ValueError, "bias"),
        ({"weight": torch.randn(10, 8, dtype=F64)}, TypeError, "weight"),
        ({"bias": torch.randn(10, dtype=F64)}, TypeError, "bias"),
        ({"hidden": torch.randint(0, 3, (4, 8))}, TypeError, "hidden"),
        ({"labels": torch.tensor([0.0, 1, 2, 3])}, TypeError, "labels"),
        ({"labels": torch.tensor([0, 1, 10, -100])}, ValueError, r"outside \[0, V=10\)"),
        ({"labels": torch.tensor([0, -1, 2, 3])}, ValueError, "labels"),
        ({"temperature": 0.0}, ValueError, "temperature"),
        ({"temperature": torch.tensor([1.0, 1.0, -1.0, 1.0])}, ValueError, "temperature"),
        ({"temperature": torch.ones(3)}, ValueError, "temperature"),
    ],
    ids=["weight-H", "weight-1d", "V0", "H0", "labels-shape", "bias-shape", "weight-dtype", "bias-dtype",
         "hidden-int", "labels-float", "label-range", "label-negative", "temp-0", "temp-row-neg",
         "temp-shape"],
)
def test_bad_inputs_raise(impl, kwargs, exc, match):
    skip_unless(impl)
    args = {"hidden": _H(), "weight": _W(), "labels": _Y(), **kwargs}
    opts = {k: args.pop(k) for k in ("bias", "temperature") if k in args}
    with pytest.raises(exc, match=match):
        linear_token_logprobs(args["hidden"], args["weight"], args["labels"], impl=impl, **opts)


@pytest.mark.parametrize("impl", ["cpp", "reference"])
def test_nan_weight_raises_floating_point_error(impl):
    skip_unless(impl)
    w = _W()
    w[3, 2] = float("nan")
    with pytest.raises(FloatingPointError, match="NaN"):
        linear_token_logprobs(_H(), w, _Y(), impl=impl)
    out = linear_token_logprobs(_H(), w, _Y(), impl=impl, validate=False)
    assert bool(out.logprobs[:3].isnan().all()) and float(out.logprobs[3]) == 0.0


@pytest.mark.parametrize("impl", ["cpp", "reference"])
def test_label_out_of_range_without_validation_is_nan(impl):
    skip_unless(impl)
    h = torch.randn(3, 8, requires_grad=True)
    out = linear_token_logprobs(h, _W(), torch.tensor([0, 10, -100]), impl=impl, validate=False)
    lp = out.logprobs.detach()
    assert not bool(lp[0].isnan()) and bool(lp[1].isnan()) and float(lp[2]) == 0
    (gh,) = torch.autograd.grad(out.logprobs, h, torch.tensor([1.0, 0.0, 1.0]))
    assert bool((gh[1:] == 0).all())


def test_exports():
    assert reasonrl.linear_token_logprobs is linear_token_logprobs
    assert reasonrl.ops.linear_token_logprobs is linear_token_logprobs
    from reasonrl.reference import linear_token_logprobs_reference as ref

    assert ref is linear_token_logprobs_reference


# ----------------------------------------------------------------------------------------------------------
# Memory (docs/ops.md 3.1): no N x V buffer, forward + backward at [N=8192, H=512, V=32000] fp32
# ----------------------------------------------------------------------------------------------------------

# Runs in a fresh interpreter so that the peak RSS (VmHWM) of each phase is this op's alone; the helper is
# the benchmarks' (bench.memory.peak_memory: VmHWM minus VmRSS after trimming the heap). Prints JSON
# {case: extra peak bytes of forward + backward}.
_MEMORY_CHILD = textwrap.dedent(
    """
    import json, sys, torch
    from reasonrl.bench.memory import peak_memory
    from reasonrl import linear_token_logprobs

    torch.set_num_threads(2)
    cpu = torch.device("cpu")
    H, V = 512, 32000
    g = torch.Generator().manual_seed(0)
    weight = (torch.randn(V, H, generator=g) / H**0.5).requires_grad_(True)

    def fwd_bwd(n, workspace):
        hidden = torch.randn(n, H, generator=g).requires_grad_(True)
        labels = torch.randint(0, V, (n,), generator=g)
        g_lp, g_h = torch.randn(n, generator=g), torch.randn(n, generator=g)

        def run():
            out = linear_token_logprobs(hidden, weight, labels, temperature=0.9, want_entropy=True,
                                        workspace_bytes=workspace, validate=False, impl="cpp")
            return torch.autograd.grad([out.logprobs, out.entropy], [hidden, weight], [g_lp, g_h])

        return run

    MiB = 1 << 20
    fwd_bwd(256, 64 * MiB)()  # warm-up (rows are independent): thread pools, MKL buffers
    result = {}
    for n, ws in ((1024, 16), (1024, 80), (8192, 80)):
        _, delta, _ = peak_memory(fwd_bwd(n, ws * MiB), cpu)
        result[f"n{n}_ws{ws}"] = delta
    print("RESULT " + json.dumps(result))
    """
)


def test_peak_memory_bounded_by_workspace():
    """Extra peak RSS of forward + backward (gradients for hidden and weight included) at fp32
    [N=8192, H=512, V=32000] is at most 1/8 of the eager path's (about 5 N V 4 bytes = 5 GiB, measured by
    bench/bench_linear.py), and it grows with the workspace, not with N x V: from N = 1024 to 8192 the logits
    would grow by 875 MiB, the measured peak grows by the O(N H) grad_hidden and statistics only."""
    skip_unless("cpp")
    from reasonrl.bench.memory import cpu_peak_supported

    if (why := cpu_peak_supported()) is not None:
        pytest.skip(f"peak RSS not measurable: {why}")
    proc = subprocess.run([sys.executable, "-c", _MEMORY_CHILD], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=600)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-2000:]
    mib = {k: v / 2**20 for k, v in json.loads(lines[-1][7:]).items()}
    n, v, h = 8192, 32000, 512
    eager_mib = 5 * n * v * 4 / 2**20  # ~5000 MiB: logits, softmax, their gradients (bench: ~5 GiB)
    assert mib["n8192_ws80"] <= eager_mib / 8, mib
    # The workspace: 80 MiB vs 16 MiB of [C, V + H] fp32 chunk -> ~64 MiB more (not ~0, not ~N x V).
    grow = mib["n1024_ws80"] - mib["n1024_ws16"]
    assert 32 <= grow <= 100, mib
    # 8x the rows: the logits would add 7168 x 32000 x 4 B = 875 MiB; grad_hidden and O(N) stats add ~15 MiB.
    assert mib["n8192_ws80"] - mib["n1024_ws80"] <= 32 + 7168 * h * 4 / 2**20, mib
