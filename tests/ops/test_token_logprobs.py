"""Tests of ``reasonrl.token_logprobs`` (docs/ops.md sections 2, 7 and 8) for
every CPU-runnable implementation.

* ``cpp``: the C++ extension (skipped, with the reason, when it does not load).
* ``triton``: the Triton kernels under ``TRITON_INTERPRET=1`` (set by tests/conftest.py); the interpreter is
  ~1000x slower than a GPU, so Triton cases stay at N <= 16 rows and V <= 3000.
* ``reference``: the plain-PyTorch path of the public op.

Accuracy follows docs/ops.md section 8 through ``reasonrl.testing`` (the one tolerance table): the error
against a float64 oracle is at most 2x the error of the reference computed in fp32, plus a small atol.
"""

from __future__ import annotations

import importlib
import math
import warnings

import pytest
import torch
from _token_logprobs_checks import (
    check_token_logprobs,
    run_token_logprobs,
    run_token_logprobs_reference,
    valid_rows,
)

import reasonrl
from reasonrl._backend import unavailable_reason
from reasonrl.ops.token_logprobs import registered_ops, token_logprobs
from reasonrl.reference.token_logprobs import token_logprobs_reference
from reasonrl.testing import TokenLogprobsCase, assert_grad_close, make_logits, make_token_logprobs_inputs

# The attribute reasonrl.ops.token_logprobs is the function; the module is needed for monkeypatching.
tl_mod = importlib.import_module("reasonrl.ops.token_logprobs")
CPU = torch.device("cpu")
F32, BF16, F16, F64 = torch.float32, torch.bfloat16, torch.float16, torch.float64


def skip_unless(impl: str, dtype: torch.dtype = F32) -> None:
    why = unavailable_reason(impl, CPU, dtype)
    if why is not None:
        pytest.skip(f"impl={impl!r} cannot run {dtype} on CPU here: {why}")


# ----------------------------------------------------------------------------------------------------------
# Accuracy against the float64 oracle (docs/ops.md section 8)
# ----------------------------------------------------------------------------------------------------------

# Vocabulary sizes chosen against the block structure of the kernels, not at random:
#   1, 2    degenerate distributions (lp = 0 / two-way softmax);
#   7       shorter than one SIMD vector (AVX2: 8 floats): only the scalar tail of the C++ loops runs;
#   1025    one Triton block (BLOCK_V = 1024) + 1 column;
#   2049    one C++ chunk (kChunk = 2048) / two Triton blocks + 1 column: a rescale across chunks;
#   4097    two chunks + 1;
#   32000   a real vocabulary (Llama-2), many chunks (cpp only: the interpreter would take minutes).
# Triton stays within N <= 16, V <= 3000 (interpreter cost). fp64 only where supported (not triton).
_VOCABS = {"cpp": (1, 2, 7, 2049, 4097, 32000), "reference": (1, 7, 2049), "triton": (1, 7, 1025, 2049)}
_DTYPES = {"cpp": (F32, BF16, F16, F64), "reference": (F32, BF16, F16, F64), "triton": (F32, BF16, F16)}
ACCURACY_GRID = [
    pytest.param(impl, dtype, v, id=f"{impl}-{str(dtype).removeprefix('torch.')}-V{v}")
    for impl in ("cpp", "triton", "reference")
    for dtype in _DTYPES[impl]
    for v in _VOCABS[impl]
]


@pytest.mark.parametrize("impl,dtype,vocab", ACCURACY_GRID)
def test_matches_oracle(impl, dtype, vocab):
    """Forward outputs and the gradient from random upstream gradients on BOTH outputs vs the fp64 oracle."""
    skip_unless(impl, dtype)
    case = make_token_logprobs_inputs(16, vocab, dtype=dtype, seed=vocab)
    check_token_logprobs(case, impl)


@pytest.mark.parametrize("impl", ["cpp", "reference"])
def test_matches_oracle_many_rows(impl):
    """257 rows x 512: several at::parallel_for tasks (grain 65536 / V = 128 rows) on 2+ threads."""
    skip_unless(impl)
    case = make_token_logprobs_inputs(257, 512, dtype=F32, seed=7)
    check_token_logprobs(case, impl)


# Each output alone, and the lp-only gradient both with the entropy computed-but-unused and not computed:
# the three ways the backward receives a missing upstream gradient (None from autograd / compiled out).
@pytest.mark.parametrize("impl", ["cpp", "triton", "reference"])
@pytest.mark.parametrize(
    "grad,want_entropy",
    [("lp", True), ("lp", False), ("h", True)],
    ids=["lp-only", "lp-only-no-entropy", "entropy-only"],
)
@pytest.mark.parametrize("dtype", [F32, BF16], ids=["f32", "bf16"])
def test_grad_from_one_output(impl, grad, want_entropy, dtype):
    skip_unless(impl, dtype)
    case = make_token_logprobs_inputs(12, 1500, dtype=dtype, seed=3)
    if want_entropy:
        check_token_logprobs(case, impl, grad=grad)
        return
    out = run_token_logprobs(case, impl=impl, grad="lp", want_entropy=False)
    assert out.entropy is None
    oracle = run_token_logprobs_reference(case, compute_dtype=F64, grad="lp")
    ref = run_token_logprobs_reference(case, compute_dtype=F32, grad="lp")
    assert_grad_close(
        out.grad,
        oracle.grad,
        ref.grad,
        dtype=dtype,
        g_lp=case.g_lp,
        g_h=None,
        valid=valid_rows(case),
        name=f"{impl} grad_logits (lp only, want_entropy=False)",
    )


# Temperature in each of its accepted forms (docs/ops.md 2, argument table): Python float != 1, 0-d tensor,
# one value per row; fp32 and bf16 because a 16-bit input must still divide by the fp32 temperature.
@pytest.mark.parametrize("impl", ["cpp", "triton", "reference"])
@pytest.mark.parametrize("temperature", [0.6, "0d", "row"])
@pytest.mark.parametrize("dtype", [F32, BF16], ids=["f32", "bf16"])
def test_temperature_forms_match_oracle(impl, temperature, dtype):
    skip_unless(impl, dtype)
    case = make_token_logprobs_inputs(10, 1100, dtype=dtype, temperature=temperature, seed=11)
    check_token_logprobs(case, impl)


@pytest.mark.parametrize("impl", ["cpp", "triton", "reference"])
def test_temperature_tensor_equals_float(impl):
    """A 0-d tensor and a constant per-row tensor give the same results as the Python float."""
    skip_unless(impl)
    case = make_token_logprobs_inputs(8, 300, seed=5, temperature=0.75)
    base = run_token_logprobs(case, impl=impl)
    for temp in (torch.tensor(0.75), torch.full((8,), 0.75)):
        other = run_token_logprobs(case._replace(temperature=temp), impl=impl)
        for a, b, name in zip(base, other, base._fields, strict=True):
            torch.testing.assert_close(
                b, a, rtol=1e-6, atol=1e-6, msg=f"{impl} {name} with temperature {temp}"
            )


# ----------------------------------------------------------------------------------------------------------
# Gradient checks, opcheck, torch.compile
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["cpp", "reference"])
def test_gradcheck_fp64(impl):
    """Central finite differences in fp64: both outputs, per-row temperature, an
    ignored row (docs/ops.md 2.3)."""
    skip_unless(impl, F64)
    g = torch.Generator().manual_seed(0)
    logits = make_logits(5, 9, dtype=F64, generator=g).requires_grad_(True)
    labels = torch.tensor([0, 8, -100, 3, 4])
    temperature = torch.tensor([0.7, 1.0, 1.3, 2.0, 0.5], dtype=F64)

    def fn(x):
        out = token_logprobs(x, labels, temperature=temperature, want_entropy=True, impl=impl)
        return out.logprobs, out.entropy

    assert torch.autograd.gradcheck(fn, (logits,), eps=1e-6, atol=1e-8, rtol=1e-6)


def test_opcheck_cpp_ops():
    """torch.library.opcheck on the three registered C++ ops (schema, fake impl, autograd, aot dispatch)."""
    skip_unless("cpp")
    fwd, bwd, bwd_inplace = registered_ops("cpp")
    g = torch.Generator().manual_seed(0)
    x = make_logits(6, 37, generator=g)
    labels = torch.tensor([0, 36, -100, 5, 17, 2])
    temp = 0.5 + torch.rand(6, generator=g)
    # (logits, labels, temperature?, temperature_scalar, ignore_index, want_entropy, want_rank,
    #  inplace_backward)
    for args in [
        (x.clone().requires_grad_(), labels, None, 0.8, -100, True, True, False),
        (x.clone().requires_grad_(), labels.int(), temp, 1.0, -100, True, False, False),
        (x.clone().requires_grad_(), labels, temp, 1.0, -100, False, True, False),
        (x.to(BF16), labels, None, 1.0, -100, True, True, False),
    ]:
        torch.library.opcheck(fwd, args)
    lp, ent, _, _, stats = fwd(x, labels, temp, 1.0, -100, True, False, False)
    g_lp, g_h = torch.randn(6, generator=g), torch.randn(6, generator=g)
    # (grad_logprobs?, grad_entropy?, logits, labels, temperature?, temperature_scalar, ignore_index,
    #  stats, entropy)
    for gl, gh in [(g_lp, g_h), (g_lp, None), (None, g_h)]:
        torch.library.opcheck(bwd, (gl, gh, x, labels, temp, 1.0, -100, stats, ent))
        torch.library.opcheck(bwd_inplace, (gl, gh, x.clone(), labels, temp, 1.0, -100, stats, ent))


# The Triton registrations' opcheck / torch.compile and realistic vocabularies need a GPU (under the
# interpreter the fake-tensor pass would run the kernels on fake tensors):
# tests/ops/test_token_logprobs_gpu.py.


def test_compile_fullgraph_cpp():
    """torch.compile(fullgraph=True) of the public op on the cpp path, validate=False, forward + backward
    (docs/ops.md 0: no host sync with validate=False). One test: each compile costs tens of seconds."""
    skip_unless("cpp")
    torch._dynamo.reset()
    case = make_token_logprobs_inputs(6, 300, seed=2, temperature="row")

    def step(x, labels, temperature, g_lp, g_h):
        out = token_logprobs(
            x, labels, temperature=temperature, want_entropy=True, want_rank=True, validate=False, impl="cpp"
        )
        return (out.logprobs * g_lp).sum() + (out.entropy * g_h).sum(), out.rank

    x_eager = case.logits.clone().requires_grad_(True)
    loss_e, rank_e = step(x_eager, case.labels, case.temperature, case.g_lp, case.g_h)
    loss_e.backward()

    compiled = torch.compile(step, fullgraph=True)
    x_comp = case.logits.clone().requires_grad_(True)
    loss_c, rank_c = compiled(x_comp, case.labels, case.temperature, case.g_lp, case.g_h)
    loss_c.backward()
    torch.testing.assert_close(loss_c, loss_e)
    assert torch.equal(rank_c, rank_e)
    torch.testing.assert_close(x_comp.grad, x_eager.grad)


# ----------------------------------------------------------------------------------------------------------
# Edge cases (docs/ops.md section 7)
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["cpp", "triton", "reference"])
@pytest.mark.parametrize("shape", [(0, 50), (2, 0, 50)], ids=["N0", "B2-T0"])
def test_no_rows(impl, shape):
    """N = 0: empty outputs of the documented dtype and shape; the backward returns an empty gradient."""
    skip_unless(impl)
    x = torch.randn(shape, requires_grad=True)
    labels = torch.zeros(shape[:-1], dtype=torch.long)
    out = token_logprobs(x, labels, want_entropy=True, want_rank=True, return_lse=True, impl=impl)
    for t, dt in zip(out, (F32, F32, torch.int32, F32), strict=True):
        assert t.shape == shape[:-1] and t.dtype == dt
    (out.logprobs.sum() + out.entropy.sum()).backward()
    assert x.grad is not None and x.grad.shape == x.shape


@pytest.mark.parametrize("impl", ["cpp", "triton", "reference"])
def test_leading_shape_and_strided_views(impl):
    """[B, T, V] input and its non-contiguous forms must equal the contiguous case exactly (docs/ops.md 7),
    forward and gradient: the usual shift logits[:, :-1, :] of a leaf (the gradient flows back into the
    leaf and is 0 outside the view), a vocabulary slice [N, V] of an [N, V + 13] buffer (row stride > V,
    unit column stride: the kernels' strided fast path) and a column-major copy (column stride != 1)."""
    skip_unless(impl)
    b, t, v = 2, 5, 700
    g = torch.Generator().manual_seed(0)
    full = make_logits((b, t), v + 13, generator=g)  # [B, T, V + 13]
    labels = torch.randint(0, v, (b, t - 1), generator=g)
    labels[0, 1] = -100
    g_lp, g_h = torch.randn(b, t - 1, generator=g), torch.randn(b, t - 1, generator=g)
    names = ("logprobs", "entropy", "rank", "lse", "grad")

    def run(leaf, view_fn):
        leaf = leaf.detach().clone().requires_grad_(True)
        x = view_fn(leaf)
        out = token_logprobs(
            x,
            labels.reshape(x.shape[:-1]),
            want_entropy=True,
            want_rank=True,
            return_lse=True,
            temperature=0.9,
            impl=impl,
        )
        (grad,) = torch.autograd.grad(
            [out.logprobs, out.entropy], [leaf], [g_lp.reshape(x.shape[:-1]), g_h.reshape(x.shape[:-1])]
        )
        return x, [o.reshape(b, t - 1) for o in out], grad

    dense = full[:, :-1, :v].contiguous()
    _, expected, expected_grad = run(dense, lambda z: z)
    assert expected[0].shape == (b, t - 1)

    def compare(label, got, grad, exact=True):
        for e, gt, name in zip([*expected, expected_grad], [*got, grad], names, strict=True):
            if exact:
                assert torch.equal(gt, e), (
                    f"{impl}: {label} {name} differs from the contiguous [B, T, V] result"
                )
            else:
                torch.testing.assert_close(gt, e, rtol=1e-6, atol=1e-6, msg=f"{impl}: {label} {name}")

    # [B*T, V]: the same rows flattened.
    _, got, grad = run(dense, lambda z: z.reshape(-1, v))
    compare("[B*T, V]", got, grad)

    # logits[:, :-1, :v] of a leaf: gradient through a non-contiguous view.
    x, got, grad_full = run(full, lambda z: z[:, :-1, :v])
    assert not x.is_contiguous()
    outside = torch.ones_like(grad_full, dtype=torch.bool)
    outside[:, :-1, :v] = False
    assert bool((grad_full[outside] == 0).all()), f"{impl}: gradient leaked outside the view"
    compare("strided view logits[:, :-1, :v]", got, grad_full[:, :-1, :v])

    # [N, V] slice of a wider buffer: row stride V + 13, column stride 1.
    wide = full[:, :-1].reshape(-1, v + 13)
    x, got, grad_wide = run(wide, lambda z: z[:, :v])
    assert x.stride() == (v + 13, 1)
    compare("vocabulary slice", got, grad_wide[:, :v].reshape(b, t - 1, v))

    # Column-major: stride(-1) != 1 (one contiguous copy is allowed, results must not change).
    cm = dense.reshape(-1, v).t().contiguous().t()
    assert cm.stride(-1) != 1
    x, got, grad = run(cm, lambda z: z)
    # The fused kernels copy to unit column stride, so they are bitwise equal; the reference is plain PyTorch,
    # whose reductions follow the memory order: equal up to fp32 summation-order rounding.
    compare("column-major", got, grad.reshape(b, t - 1, v), exact=impl != "reference")


@pytest.mark.parametrize("impl", ["cpp", "triton", "reference"])
@pytest.mark.parametrize("ignore_index", [-100, 5], ids=["ignore-100", "ignore-a-vocab-id"])
def test_ignore_index_rows(impl, ignore_index):
    """Ignored rows: lp = H = rank = lse = 0 and a zero gradient row; also when ignore_index is a valid
    vocabulary id, and when every row is ignored."""
    skip_unless(impl)
    g = torch.Generator().manual_seed(1)
    x = make_logits(6, 64, generator=g)
    labels = torch.tensor([ignore_index, 3, ignore_index, 63, 0, ignore_index])
    case = TokenLogprobsCase(
        x, labels, 1.0, ignore_index, torch.randn(6, generator=g), torch.randn(6, generator=g)
    )
    check_token_logprobs(case, impl)
    out = run_token_logprobs(case, impl=impl)
    ign = labels == ignore_index
    for t in (out.logprobs, out.entropy, out.rank, out.lse):
        assert bool((t[ign] == 0).all())
    assert bool((out.logprobs[~ign] < 0).all()), "non-ignored rows must have a real log-prob"
    all_ignored = run_token_logprobs(case._replace(labels=torch.full((6,), ignore_index)), impl=impl)
    for t in (*all_ignored[:4], all_ignored.grad):
        assert bool((t == 0).all())


@pytest.mark.parametrize("impl", ["cpp", "triton", "reference"])
@pytest.mark.parametrize("vocab", [9, 2049], ids=["V9", "V2049"])
def test_labels_at_vocabulary_ends(impl, vocab):
    """Labels 0 and V - 1: the first column of the first block, the last column of the (partial) last one."""
    skip_unless(impl)
    g = torch.Generator().manual_seed(vocab)
    x = make_logits(6, vocab, generator=g)
    labels = torch.tensor([0, vocab - 1, 0, vocab - 1, 0, vocab - 1])
    case = TokenLogprobsCase(x, labels, 1.0, -100, torch.randn(6, generator=g), torch.randn(6, generator=g))
    check_token_logprobs(case, impl)


def _extreme_case(dtype):
    g = torch.Generator().manual_seed(4)
    v = 300
    x = make_logits(8, v, generator=g).to(F32)
    x[0] = x[0] * 1e4  # huge spread: a one-hot distribution, H ~ 0
    x[1] = x[1] + 1e4  # huge common offset: max subtraction
    x[2] = x[2] - 1e4  # all very negative: the running max must start at -inf, not 0
    x[3, ::3] = -math.inf  # masked vocabulary entries (legal)
    x[4, :200] = -math.inf  # every early block fully masked: skipped blocks
    x[5] = x[5] * 1e-4  # nearly uniform
    x[6, 10] = -math.inf  # label logit -inf in a finite row: lp = -inf, finite gradient
    x[7, 1:] = -math.inf  # a single finite column, which is the label: lp = 0, H = 0
    labels = torch.tensor([5, 6, 7, 4, 250, 9, 10, 0])
    return TokenLogprobsCase(
        x.to(dtype),
        labels,
        1.0,
        -100,
        torch.randn(8, generator=g, dtype=F64).float(),
        torch.randn(8, generator=g, dtype=F64).float(),
    )


@pytest.mark.parametrize("impl", ["cpp", "triton", "reference"])
@pytest.mark.parametrize("dtype", [F32, BF16], ids=["f32", "bf16"])
def test_extreme_logits(impl, dtype):
    """+-1e4 scaled / offset rows, -inf entries, fully masked blocks, a label logit of -inf (lp = -inf with a
    finite gradient), a single finite column. bf16 holds 1e4 with 3 significant digits: still no overflow."""
    skip_unless(impl, dtype)
    case = _extreme_case(dtype)
    check_token_logprobs(case, impl, per_row=True)
    out = run_token_logprobs(case, impl=impl)
    assert out.logprobs[6] == -math.inf, "a finite row whose label logit is -inf must give lp = -inf"
    assert bool(torch.isfinite(out.grad).all()), "gradients must stay finite with -inf logits"
    assert bool((out.entropy >= 0).all()), f"entropy must be >= 0 (shifted accumulator), got {out.entropy}"
    assert out.logprobs[7] == 0 and out.entropy[7] == 0


@pytest.mark.parametrize("impl", ["cpp", "triton", "reference"])
def test_all_neg_inf_row_is_nan(impl):
    """A row whose logits are all -inf has no distribution: lp = H = NaN (validate=False); validate=True
    reports it with FloatingPointError naming the row."""
    skip_unless(impl)
    x = torch.randn(3, 40)
    x[1] = -math.inf
    labels = torch.tensor([1, 2, 3])
    out = token_logprobs(x, labels, want_entropy=True, impl=impl, validate=False)
    assert torch.isnan(out.logprobs[1]) and torch.isnan(out.entropy[1])
    assert bool(torch.isfinite(out.logprobs[[0, 2]]).all()) and bool(
        torch.isfinite(out.entropy[[0, 2]]).all()
    )
    with pytest.raises(FloatingPointError, match=r"row 1\b"):
        token_logprobs(x, labels, want_entropy=True, impl=impl, validate=True)


@pytest.mark.parametrize("impl", ["cpp", "triton", "reference"])
def test_want_entropy_false(impl):
    """want_entropy=False: entropy is None; the log-probs, rank, lse and lp-gradient are those of the
    entropy-computing path (the entropy accumulator does not feed anything else)."""
    skip_unless(impl)
    case = make_token_logprobs_inputs(8, 1500, seed=21)
    with_h = run_token_logprobs(case, impl=impl, grad="lp", want_entropy=True)
    without = run_token_logprobs(case, impl=impl, grad="lp", want_entropy=False)
    assert without.entropy is None and with_h.entropy is not None
    for name in ("logprobs", "rank", "lse", "grad"):
        assert torch.equal(getattr(without, name), getattr(with_h, name)), name
    plain = token_logprobs(case.logits, case.labels, impl=impl)
    assert plain.entropy is None and plain.rank is None and plain.lse is None


@pytest.mark.parametrize("impl", ["cpp", "triton", "reference"])
@pytest.mark.parametrize("dtype", [F32, BF16], ids=["f32", "bf16"])
def test_rank_ties_count_strictly_greater(impl, dtype):
    """rank = 1 + #{j != y : x_j > x_y} on the raw logits: ties with the label never raise the rank; the
    temperature does not change it; -inf columns are never above a finite label."""
    skip_unless(impl, dtype)
    row = torch.tensor([1.0, 3.0, 3.0, 2.0, 3.0, -math.inf, 0.5, 3.0, -1.0, 2.0, 2.0])
    x = row.repeat(6, 1).to(dtype)
    labels = torch.tensor([1, 2, 3, 0, 5, 8])
    # label 1 (3.0): no column strictly above -> 1; label 2 likewise; label 3 (2.0): four 3.0 -> 5;
    # label 0 (1.0): 4 x 3.0 + 3 x 2.0 -> 8; label 5 (-inf): every finite column (10) -> 11;
    # label 8 (-1.0): every finite column but itself (9) -> 10.
    expected = torch.tensor([1, 1, 5, 8, 11, 10], dtype=torch.int32)
    for temperature in (1.0, 0.3, torch.tensor([0.5, 1.0, 2.0, 0.7, 1.1, 3.0])):
        out = token_logprobs(x, labels, want_rank=True, temperature=temperature, impl=impl, validate=False)
        assert torch.equal(out.rank, expected), f"{impl} rank {out.rank.tolist()} != {expected.tolist()}"
    # With 3000 columns the ties span several blocks / chunks.
    wide = torch.zeros(2, 3000, dtype=dtype)
    wide[:, 2500] = 1.0
    out = token_logprobs(wide, torch.tensor([0, 2500]), want_rank=True, impl=impl)
    assert out.rank.tolist() == [2, 1]


@pytest.mark.parametrize("impl", ["cpp", "triton"])
@pytest.mark.parametrize("dtype", [F32, BF16], ids=["f32", "bf16"])
def test_inplace_backward(impl, dtype):
    """inplace_backward=True: the gradient equals the out-of-place one exactly and is written into the
    storage of the logits (which must not be used again)."""
    skip_unless(impl, dtype)
    case = make_token_logprobs_inputs(8, 2100, dtype=dtype, seed=8, temperature="row")
    expected = run_token_logprobs(case, impl=impl)

    w = case.logits.detach().clone().requires_grad_(True)
    logits = w * 1.0  # a non-leaf, as the lm_head output would be
    ptr = logits.data_ptr()
    out = token_logprobs(
        logits,
        case.labels,
        temperature=case.temperature,
        want_entropy=True,
        want_rank=True,
        return_lse=True,
        inplace_backward=True,
        impl=impl,
    )
    for name in ("logprobs", "entropy", "rank", "lse"):
        assert torch.equal(getattr(out, name), getattr(expected, name)), name
    (grad,) = torch.autograd.grad(
        [out.logprobs, out.entropy], [logits], [case.g_lp, case.g_h], retain_graph=True
    )
    assert torch.equal(grad, expected.grad), "in-place gradient differs from the out-of-place gradient"
    assert grad.data_ptr() == ptr, "the gradient was not written into the storage of logits"
    assert torch.equal(logits.detach(), expected.grad), "logits storage does not hold the gradient"


@pytest.mark.parametrize("impl", ["cpp", "triton", "reference"])
def test_inplace_backward_leaf_gradient(impl):
    """End to end through a leaf: w.grad is the correct gradient (reference ignores inplace_backward)."""
    skip_unless(impl)
    case = make_token_logprobs_inputs(5, 600, seed=9)
    expected = run_token_logprobs(case, impl="reference")
    w = case.logits.detach().clone().requires_grad_(True)
    out = token_logprobs(
        w * 2.0, case.labels, temperature=2.0, want_entropy=True, inplace_backward=True, impl=impl
    )
    ((out.logprobs * case.g_lp).sum() + (out.entropy * case.g_h).sum()).backward()
    # z = (2 w) / 2 = w: the gradient with respect to w is the temperature-1 gradient of the same values.
    torch.testing.assert_close(w.grad, expected.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("impl", ["cpp", "triton"])
def test_inplace_backward_needs_contiguous_logits(impl):
    skip_unless(impl)
    x = torch.randn(4, 30)[:, :20]
    with pytest.raises(ValueError, match="contiguous"):
        token_logprobs(x, torch.zeros(4, dtype=torch.long), inplace_backward=True, impl=impl)


@pytest.mark.parametrize("impl", ["cpp", "triton", "reference"])
def test_deterministic(impl):
    """Forward and backward are bitwise reproducible for a fixed device, dtype and shape (docs/ops.md 0)."""
    skip_unless(impl)
    case = make_token_logprobs_inputs(16 if impl == "triton" else 200, 900, seed=13)
    a, b = run_token_logprobs(case, impl=impl), run_token_logprobs(case, impl=impl)
    for name, x, y in zip(a._fields, a, b, strict=True):
        assert torch.equal(x, y), f"{impl} {name} not bitwise reproducible"


@pytest.mark.parametrize("impl", ["cpp", "triton", "reference"])
def test_no_gradient_to_temperature(impl):
    """A temperature tensor is a constant (docs/ops.md 2.3): no gradient flows to
    it, even if it requires grad."""
    skip_unless(impl)
    case = make_token_logprobs_inputs(4, 50, seed=3, ignore_frac=0.0)
    temp = torch.tensor([0.5, 1.0, 1.5, 2.0], requires_grad=True)
    x = case.logits.clone().requires_grad_(True)
    out = token_logprobs(x, case.labels, temperature=temp, want_entropy=True, impl=impl)
    (out.logprobs.sum() + out.entropy.sum()).backward()
    assert x.grad is not None
    assert temp.grad is None, f"impl={impl!r} propagated a gradient to temperature: {temp.grad}"


# ----------------------------------------------------------------------------------------------------------
# Implementation selection (docs/ops.md: explicit requests raise, auto falls back; REASONRL_IMPL)
# ----------------------------------------------------------------------------------------------------------


def _args():
    return torch.randn(3, 10), torch.tensor([1, 2, 3])


def test_triton_without_interpreter_raises(monkeypatch):
    """On CPU Triton needs TRITON_INTERPRET=1; an explicit impl='triton' without it raises, never falls back.
    The backend reads the variable at call time."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        token_logprobs(*_args(), impl="triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    skip_unless("triton")
    token_logprobs(*_args(), impl="triton")


def test_triton_float64_raises():
    skip_unless("triton")
    with pytest.raises(RuntimeError, match="float64"):
        token_logprobs(torch.randn(3, 10, dtype=F64), torch.tensor([1, 2, 3]), impl="triton")


def test_cuda_is_not_an_impl():
    """There is no CUDA C++ kernel: on a GPU the kernels are Triton's, so "cuda" is no implementation name."""
    with pytest.raises(ValueError, match="impl must be one of.*got 'cuda'"):
        token_logprobs(*_args(), impl="cuda")


def test_unknown_impl_raises():
    with pytest.raises(ValueError, match="impl"):
        token_logprobs(*_args(), impl="fastest")


def _spy_reference(monkeypatch):
    calls = []

    def spy(*a, **k):
        calls.append(1)
        return token_logprobs_reference(*a, **k)

    monkeypatch.setattr(tl_mod, "token_logprobs_reference", spy)
    return calls


def test_reasonrl_impl_env_respected(monkeypatch):
    calls = _spy_reference(monkeypatch)
    monkeypatch.setenv("REASONRL_IMPL", "reference")
    token_logprobs(*_args())
    assert calls, "REASONRL_IMPL=reference did not route impl='auto' to the reference"
    # An env choice that cannot run is an explicit request: it raises.
    monkeypatch.setenv("REASONRL_IMPL", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError):
        token_logprobs(*_args())
    monkeypatch.setenv("REASONRL_IMPL", "no-such-impl")
    with pytest.raises(ValueError, match="impl"):
        token_logprobs(*_args())
    # An explicit keyword wins over the environment.
    monkeypatch.setenv("REASONRL_IMPL", "triton")
    calls.clear()
    token_logprobs(*_args(), impl="reference")
    assert calls


def test_auto_picks_cpp_on_cpu(monkeypatch):
    skip_unless("cpp")
    monkeypatch.delenv("REASONRL_IMPL", raising=False)
    calls = _spy_reference(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the fast path must not warn
        token_logprobs(*_args())
    assert not calls, "impl='auto' used the reference although the C++ extension is available"


@pytest.mark.parametrize("dtype", [F32, BF16, F16, F64])
@pytest.mark.parametrize("impl", ["cpp", "reference"])
def test_output_dtypes(impl, dtype):
    """Statistics are fp32 whatever the input (fp64 for fp64); rank int32; grad in the logits dtype."""
    skip_unless(impl, dtype)
    x = torch.randn(2, 3, 17, dtype=dtype, requires_grad=True)
    out = token_logprobs(
        x,
        torch.randint(0, 17, (2, 3), dtype=torch.int32),
        want_entropy=True,
        want_rank=True,
        return_lse=True,
        impl=impl,
    )
    acc = F64 if dtype == F64 else F32
    assert (out.logprobs.dtype, out.entropy.dtype, out.rank.dtype, out.lse.dtype) == (
        acc,
        acc,
        torch.int32,
        acc,
    )
    assert out.lse.requires_grad is False and out.rank.requires_grad is False
    out.logprobs.sum().backward()
    assert x.grad.dtype == dtype


# ----------------------------------------------------------------------------------------------------------
# Bad inputs (docs/ops.md section 7)
# ----------------------------------------------------------------------------------------------------------

IMPLS_ALL = ["cpp", "triton", "reference"]


@pytest.mark.parametrize("impl", IMPLS_ALL)
def test_labels_out_of_range_validate(impl):
    """validate=True: ValueError with the count of bad labels and the first offending (flattened) index."""
    skip_unless(impl)
    x = torch.randn(2, 3, 10)
    labels = torch.tensor([[3, 10, -100], [-1, 9, 15]])  # bad: 10 (row 1), -1 (row 3), 15 (row 5)
    with pytest.raises(ValueError, match=r"(?s)\b3 labels\b.*row 1\b"):
        token_logprobs(x, labels, impl=impl, validate=True)


@pytest.mark.parametrize("impl", IMPLS_ALL)
def test_labels_out_of_range_no_validate(impl):
    """validate=False: that row's lp is NaN (never a plausible number) and its gradient row is 0."""
    skip_unless(impl)
    x = torch.randn(4, 10, requires_grad=True)
    labels = torch.tensor([3, 10, -1, 9])
    out = token_logprobs(x, labels, want_entropy=True, impl=impl, validate=False)
    assert torch.isnan(out.logprobs[1]) and torch.isnan(out.logprobs[2])
    assert bool(torch.isfinite(out.logprobs[[0, 3]]).all())
    (g,) = torch.autograd.grad(out.logprobs, x, torch.ones(4))
    assert bool((g[[1, 2]] == 0).all()), "rows with out-of-range labels must get a zero gradient"
    assert bool(torch.isfinite(g).all()) and bool((g[[0, 3]] != 0).any())


@pytest.mark.parametrize(
    "logits_shape,labels_shape",
    [((4, 10), (5,)), ((2, 3, 10), (6,)), ((2, 3, 10), (3, 2)), ((4, 10), (4, 1))],
    ids=["N-mismatch", "flattened-labels", "transposed-lead", "extra-dim"],
)
def test_shape_mismatch(logits_shape, labels_shape):
    with pytest.raises(ValueError, match=r"labels.*\(.*\)"):
        token_logprobs(torch.randn(logits_shape), torch.zeros(labels_shape, dtype=torch.long))


def test_device_mismatch_meta():
    """Different devices are a ValueError (simulated with the meta device); a 0-d CPU temperature is allowed
    with tensors on any device."""
    x = torch.randn(3, 10)
    with pytest.raises(ValueError, match="labels"):
        token_logprobs(x, torch.zeros(3, dtype=torch.long, device="meta"))
    with pytest.raises(ValueError, match="temperature"):
        token_logprobs(x, torch.zeros(3, dtype=torch.long), temperature=torch.ones(3, device="meta"))
    xm = torch.randn(3, 10, device="meta")
    out = token_logprobs(
        xm, torch.zeros(3, dtype=torch.long, device="meta"), temperature=torch.tensor(0.5), validate=False
    )
    assert out.logprobs.device.type == "meta" and out.logprobs.shape == (3,)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool], ids=str)
def test_non_floating_logits(dtype):
    with pytest.raises(TypeError, match="logits"):
        token_logprobs(torch.ones(3, 10, dtype=dtype), torch.zeros(3, dtype=torch.long))


@pytest.mark.parametrize("dtype", [F32, torch.int16, torch.uint8, torch.bool], ids=str)
def test_bad_label_dtype(dtype):
    with pytest.raises(TypeError, match="labels"):
        token_logprobs(torch.randn(3, 10), torch.zeros(3, dtype=dtype))


@pytest.mark.parametrize("bad", [0.0, -1.0, math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("form", ["float", "0d", "row"])
@pytest.mark.parametrize("impl", ["cpp", "reference"])
def test_bad_temperature_raises(impl, bad, form):
    """temperature <= 0, NaN or +-inf: ValueError (a tensor temperature under validate=True)."""
    skip_unless(impl)
    x, labels = torch.randn(3, 10), torch.tensor([1, 2, 3])
    temp = {"float": bad, "0d": torch.tensor(bad), "row": torch.tensor([1.0, bad, 0.5])}[form]
    with pytest.raises(ValueError, match="temperature"):
        token_logprobs(x, labels, temperature=temp, impl=impl, validate=True)


@pytest.mark.parametrize("bad", [0.0, -1.0, math.nan, math.inf])
@pytest.mark.parametrize("impl", IMPLS_ALL)
def test_bad_temperature_tensor_no_validate_gives_nan_rows(impl, bad):
    """docs/ops.md 7: an invalid tensor temperature is not checked with validate=False and 'yields NaN rows':
    the row with the bad value must not come out as a plausible number."""
    skip_unless(impl)
    x, labels = torch.randn(3, 10), torch.tensor([1, 2, 3])
    out = token_logprobs(
        x, labels, temperature=torch.tensor([1.0, bad, 0.5]), want_entropy=True, impl=impl, validate=False
    )
    assert torch.isnan(out.logprobs[1]), f"temperature {bad}: lp = {float(out.logprobs[1])}, expected NaN"
    assert bool(torch.isfinite(out.logprobs[[0, 2]]).all())


@pytest.mark.parametrize("impl", IMPLS_ALL)
@pytest.mark.parametrize("value", [math.nan, math.inf], ids=["nan", "+inf"])
def test_nan_or_posinf_logits(impl, value):
    """NaN / +inf in logits: validate=True raises FloatingPointError naming the first row; validate=False
    propagates NaN to that row's lp and H only."""
    skip_unless(impl)
    x = make_logits(4, 2100, generator=torch.Generator().manual_seed(0))
    x[2, 1500] = value  # in the second C++ chunk / a later Triton block, not next to the label
    labels = torch.tensor([1, 2, 3, 4])
    with pytest.raises(FloatingPointError, match=r"row 2\b"):
        token_logprobs(x, labels, impl=impl, validate=True)
    out = token_logprobs(x, labels, want_entropy=True, impl=impl, validate=False)
    assert torch.isnan(out.logprobs[2]) and torch.isnan(out.entropy[2])
    keep = [0, 1, 3]
    assert bool(torch.isfinite(out.logprobs[keep]).all()) and bool(torch.isfinite(out.entropy[keep]).all())


# Columns that land in every accumulator of the C++ maximum pass (8 independent vectors of 8 or 16 lanes
# per step, then single vectors, then scalars), in a full first chunk, a full second chunk and a partial
# third one; and in the matching Triton blocks.
_SPREAD_V = 2 * 2048 + 300
_SPREAD_COLS = [0, 17, 40, 63, 64, 77, 100, 127, 128, 255, 2047, 2048 + 5, 2048 + 1000, 4096, 4096 + 130,
                4096 + 255, 4096 + 256, 4096 + 270, 4096 + 287, 4096 + 288, 4096 + 299]


@pytest.mark.parametrize("impl", IMPLS_ALL)
def test_row_maximum_nan_and_rank_in_every_accumulator(impl):
    """The row maximum, a NaN, and the columns above the label, placed in each accumulator and tail of the
    maximum pass: the maximum found (lp, H against the fp64 oracle: a missed maximum overflows the sums), NaN
    propagated to its row only, the rank counted in every lane."""
    skip_unless(impl)
    g = torch.Generator().manual_seed(5)
    n = len(_SPREAD_COLS)
    x = make_logits(n, _SPREAD_V, generator=g)
    labels = torch.randint(0, _SPREAD_V, (n,), generator=g)
    for r, c in enumerate(_SPREAD_COLS):
        x[r, c] = float(x[r].max()) + 30.0  # the row maximum, far above every other logit
    out = token_logprobs(x, labels, want_entropy=True, want_rank=True, impl=impl, validate=False)
    ref = token_logprobs_reference(x.double(), labels, want_entropy=True, want_rank=True)
    assert (out.logprobs.double() - ref.logprobs).abs().max() < 1e-5
    assert (out.entropy.double() - ref.entropy).abs().max() < 1e-5
    assert torch.equal(out.rank, ref.rank)
    # Rank: the label's logit is 0 and exactly the spread columns (never the label) lie above it.
    wide = torch.full((2, _SPREAD_V), -1.0)
    wide[:, _SPREAD_COLS] = 1.0
    wide[:, 3] = 0.0
    out = token_logprobs(wide, torch.tensor([3, 3]), want_rank=True, impl=impl, validate=False)
    assert out.rank.tolist() == [1 + n, 1 + n]
    for c in _SPREAD_COLS:
        y = x.clone()
        y[1, c] = math.nan
        out = token_logprobs(y, labels, want_entropy=True, impl=impl, validate=False)
        assert torch.isnan(out.logprobs[1]) and torch.isnan(out.entropy[1]), f"NaN at column {c} missed"
        assert bool(torch.isfinite(out.logprobs[[0, 2]]).all()), f"NaN at column {c} leaked"


def test_set_validation_global_switch():
    x = torch.randn(2, 10)
    x[0, 0] = math.nan
    labels = torch.tensor([1, 2])
    assert reasonrl.validation_enabled()
    try:
        reasonrl.set_validation(False)
        out = token_logprobs(x, labels)  # validate=None -> global setting
        assert torch.isnan(out.logprobs[0])
    finally:
        reasonrl.set_validation(True)
    with pytest.raises(FloatingPointError):
        token_logprobs(x, labels)


def test_empty_vocabulary_and_scalar_logits():
    with pytest.raises(ValueError, match="V"):
        token_logprobs(torch.randn(3, 0), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="logits"):
        token_logprobs(torch.tensor(1.0), torch.tensor(0))
