"""``phase_entropy`` and ``find_boundary`` (docs/ops.md section 6): every implementation (cpp, Triton under
the interpreter, reference) against the float64 reference, the oracle.

float64 input (cpp, reference) must agree to 1e-12 (counts and boundaries exactly); fp32 / bf16 / fp16 input
follows the tolerance rule of reasonrl/testing.py (err <= 2 x err(same-dtype reference) + 1e-5 (1 + max
|oracle|)), for the means and for the gradient. The inputs are ragged on purpose (``ragged_case``): holes in
the mask, an all-masked sequence, a boundary at 0 (empty "before"), at n_b (no marker: empty "after"), a
multi-token marker cut off by the end of the sequence, and in the packed layout an empty segment; widths
cross the Triton kernel's 256-token block. The interpreter is slow: Triton runs a chosen subset (both
layouts, fp32 and bf16, boundary lengths 1 and 3), not the whole product.
"""

from __future__ import annotations

import pytest
import torch
from _impls import cpp_available, needs_cpp, needs_triton, triton_available

from reasonrl import _backend as backend
from reasonrl.ops.phase_entropy import find_boundary, phase_entropy
from reasonrl.reference.phase_entropy import find_boundary_reference, phase_entropy_reference
from reasonrl.rewards import functional
from reasonrl.testing import assert_close_to_oracle, assert_stat_close


def _kernel_impls():
    return ["reference"] + (["cpp"] if cpp_available() else []) + (["triton"] if triton_available() else [])


def ragged_case(seed: int, b: int = 6, t: int = 40, boundary_len: int = 1):
    """Padded float64 entropies [B, T] in [0, 6) with a ragged mask and boundaries covering every phase
    shape: row 0 boundary 0 (nothing before), row 1 no marker (boundary = n_b), row 2 all masked (n_b = 0),
    row 3 a marker starting at the last valid token (cut off: nothing after), the rest random."""
    gen = torch.Generator().manual_seed(seed)
    ent = torch.rand((b, t), generator=gen, dtype=torch.float64) * 6.0
    lengths = torch.randint(t // 2, t + 1, (b,), generator=gen)
    mask = (torch.arange(t)[None, :] < lengths[:, None]) & (torch.rand((b, t), generator=gen) < 0.85)
    mask[2] = False
    n = mask.sum(dim=1)
    boundary = (torch.rand(b, generator=gen) * (n + 1).double()).long().clamp(max=n)
    boundary[0] = 0
    boundary[1] = n[1]
    boundary[3] = max(int(n[3]) - 1, 0)
    return ent, mask, boundary


def to_packed(x: torch.Tensor, mask: torch.Tensor):
    """Each padded row cut at its last valid token (masked holes stay, as masked packed tokens), plus an
    empty segment in front: (x [N], cu_seqlens [B + 2] int32, mask [N]) and the boundary's index map."""
    rows, masks, lengths = [], [], [0]
    for i in range(x.shape[0]):
        valid = mask[i].nonzero()
        end = int(valid[-1, 0]) + 1 if valid.numel() else 0
        rows.append(x[i, :end])
        masks.append(mask[i, :end])
        lengths.append(end)
    cu = torch.tensor([0] + lengths, dtype=torch.int64).cumsum(0).to(torch.int32)
    return torch.cat(rows), cu, torch.cat(masks)


def _packed_boundary(boundary: torch.Tensor) -> torch.Tensor:
    return torch.cat([torch.zeros(1, dtype=boundary.dtype), boundary])  # the empty segment: n_b = 0


def _check_phases(out, oracle, ref_same=None, *, dtype, name):
    assert torch.equal(out.count_before, oracle.count_before), name
    assert torch.equal(out.count_after, oracle.count_after), name
    assert out.count_before.dtype == torch.int32 and out.count_after.dtype == torch.int32
    for field in ("mean_before", "mean_after"):
        a, o = getattr(out, field), getattr(oracle, field)
        assert a.shape == o.shape, (name, field)
        if dtype == torch.float64:
            assert a.dtype == torch.float64
            torch.testing.assert_close(a, o, rtol=1e-12, atol=1e-12, msg=f"{name} {field}")
        else:
            assert a.dtype == torch.float32
            assert_stat_close(a.double(), o, getattr(ref_same, field).double(), dtype=dtype,
                              name=f"{name} {field}")


def _grads(fn, ent: torch.Tensor, g_before: torch.Tensor, g_after: torch.Tensor) -> torch.Tensor:
    """d(g_before . mean_before + g_after . mean_after) / d entropy of ``fn`` at ``ent``."""
    leaf = ent.detach().clone().requires_grad_(True)
    out = fn(leaf)
    acc = out.mean_before.dtype
    return torch.autograd.grad([out.mean_before, out.mean_after], leaf,
                               [g_before.to(acc), g_after.to(acc)])[0]


def _run(impl: str, dtype: torch.dtype, ent, mask, boundary, *, boundary_len, cu=None, name=""):
    """Forward and gradient of ``impl`` in ``dtype`` against the float64 reference on the same values."""
    x = ent.to(dtype)
    oracle_in = x.double()  # bf16 / fp16 values exactly, upcast
    kw = dict(mask=mask, cu_seqlens=cu, boundary_len=boundary_len)
    oracle = phase_entropy_reference(oracle_in, boundary, **kw)
    ref_same = phase_entropy_reference(x, boundary, **kw)
    out = phase_entropy(x, boundary, impl=impl, **kw)
    _check_phases(out, oracle, ref_same, dtype=dtype, name=f"{impl} {dtype} {name}")

    gen = torch.Generator().manual_seed(7)
    g_b = torch.randn(boundary.shape[0], generator=gen, dtype=torch.float64)
    g_a = torch.randn(boundary.shape[0], generator=gen, dtype=torch.float64)
    grad = _grads(lambda e: phase_entropy(e, boundary, impl=impl, **kw), x, g_b, g_a)
    grad_oracle = _grads(lambda e: phase_entropy_reference(e, boundary, **kw), oracle_in, g_b, g_a)
    grad_same = _grads(lambda e: phase_entropy_reference(e, boundary, **kw), x, g_b, g_a)
    assert grad.dtype == dtype and grad.shape == x.shape
    if dtype == torch.float64:
        torch.testing.assert_close(grad, grad_oracle, rtol=1e-12, atol=1e-15)
    else:
        # docs/ops.md section 8's gradient line: 2 x the same-dtype reference's error + 1e-7 of the upstream
        # gradient, and for 16-bit gradients 1 ulp of the output dtype besides (the rounding of g / count to
        # bf16 / fp16 may differ by one ulp: the Triton interpreter's downcast is not round-to-nearest).
        assert_close_to_oracle(grad.double(), grad_oracle, grad_same.double(), ref_factor=2.0,
                               atol_scale=1e-7, magnitude=float(max(g_b.abs().max(), g_a.abs().max())),
                               ulp_dtype=dtype if dtype in (torch.bfloat16, torch.float16) else None,
                               name=f"{impl} {dtype} {name} grad")


def _run_padded_and_packed(impl: str, dtype: torch.dtype, ent, mask, boundary, *, boundary_len):
    """:func:`_run` on a padded [B, T] case, then on the same rows packed (cu_seqlens, the boundaries
    shifted to the packed positions)."""
    _run(impl, dtype, ent, mask, boundary, boundary_len=boundary_len, name="padded")
    pent, cu, pmask = to_packed(ent, mask)
    _run(impl, dtype, pent, pmask, _packed_boundary(boundary), boundary_len=boundary_len, cu=cu,
         name="packed")


# ----------------------------------------------------------------------------------------------------------
# cpp: both layouts, every boundary length, float64 (1e-12) and fp32 / bf16 / fp16 (tolerance rule)
# ----------------------------------------------------------------------------------------------------------


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("boundary_len", [1, 2, 5])
@pytest.mark.parametrize("seed", range(2))
def test_cpp_matches_reference(seed, boundary_len, dtype):
    ent, mask, boundary = ragged_case(seed, boundary_len=boundary_len)
    _run_padded_and_packed("cpp", dtype, ent, mask, boundary, boundary_len=boundary_len)


@needs_cpp
def test_cpp_without_mask_and_wide_rows():
    # No mask (every token valid), rows much longer than a parallel task's grain: every phase shape again.
    gen = torch.Generator().manual_seed(3)
    ent = torch.rand((5, 3000), generator=gen, dtype=torch.float64)
    boundary = torch.tensor([0, 3000, 2999, 1500, 17])
    _run("cpp", torch.float64, ent, None, boundary, boundary_len=2, name="no mask")
    _run("cpp", torch.float32, ent, None, boundary, boundary_len=2, name="no mask")
    cu = torch.tensor([0, 3000, 6000, 9000, 12000, 15000])
    _run("cpp", torch.float32, ent.reshape(-1), None, boundary, boundary_len=1, cu=cu, name="packed no mask")


@needs_cpp
def test_cpp_strided_and_integer_mask():
    ent, mask, boundary = ragged_case(4)
    strided = ent.t().contiguous().t()  # [B, T] with stride 1 on B
    kw = dict(mask=mask.to(torch.int64), boundary_len=2)  # a 0/1 integer mask is legal (docs/ops.md 1.1)
    ref = phase_entropy_reference(ent, boundary, **kw)
    _check_phases(phase_entropy(strided, boundary, impl="cpp", **kw), ref, dtype=torch.float64,
                  name="strided")
    pent, cu, pmask = to_packed(ent, mask)
    wide = torch.stack([pent, torch.full_like(pent, float("nan"))], dim=1)[:, 0]  # packed, stride 2
    pb = _packed_boundary(boundary)
    ref = phase_entropy_reference(pent, pb, mask=pmask, cu_seqlens=cu)
    _check_phases(phase_entropy(wide, pb, mask=pmask, cu_seqlens=cu, impl="cpp"), ref, dtype=torch.float64,
                  name="packed strided")
    # The gradient of a strided input is contiguous, with the input's shape and values of the reference's.
    leaf = strided.detach().clone().requires_grad_(True)
    phase_entropy(leaf, boundary, impl="cpp", **kw).mean_after.sum().backward()
    leaf_ref = ent.detach().clone().requires_grad_(True)
    phase_entropy_reference(leaf_ref, boundary, **kw).mean_after.sum().backward()
    torch.testing.assert_close(leaf.grad, leaf_ref.grad, rtol=0, atol=0)


@needs_cpp
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_cpp_gradcheck(packed):
    ent, mask, boundary = ragged_case(5, b=4, t=9)
    if packed:
        ent, cu, mask = to_packed(ent, mask)
        boundary = _packed_boundary(boundary)
    else:
        cu = None
    leaf = ent.clone().requires_grad_(True)

    def fn(e):
        out = phase_entropy(e, boundary, mask=mask, cu_seqlens=cu, boundary_len=2, impl="cpp")
        return out.mean_before, out.mean_after

    torch.autograd.gradcheck(fn, (leaf,))


@needs_cpp
def test_cpp_one_mean_unused():
    # Only mean_after reaches the loss: mean_before's upstream gradient is absent (or zero), tokens before
    # the marker get 0.
    ent, mask, boundary = ragged_case(6)
    leaf = ent.clone().requires_grad_(True)
    phase_entropy(leaf, boundary, mask=mask, impl="cpp").mean_after.sum().backward()
    leaf_ref = ent.clone().requires_grad_(True)
    phase_entropy_reference(leaf_ref, boundary, mask=mask).mean_after.sum().backward()
    torch.testing.assert_close(leaf.grad, leaf_ref.grad, rtol=1e-12, atol=0)


@needs_cpp
def test_cpp_opcheck():
    fwd, bwd = backend.registered_ops("phase_entropy", "cpp")
    (find,) = backend.registered_ops("find_boundary", "cpp")
    ent, mask, boundary = ragged_case(8, b=4, t=12)
    for dtype in (torch.float32, torch.float64):
        x = ent.to(dtype).requires_grad_(True)
        torch.library.opcheck(fwd, (x, mask, None, boundary, 2))
        torch.library.opcheck(fwd, (x.detach().reshape(-1), None, torch.tensor([0, 10, 10, 30, 48]),
                                    boundary, 1))
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        counts = phase_entropy(ent.to(dtype), boundary, mask=mask, boundary_len=2, impl="cpp")
        torch.library.opcheck(bwd, (torch.randn(4, dtype=acc), torch.randn(4, dtype=acc), x.detach(), mask,
                                    None, boundary, counts.count_before, counts.count_after, 2))
    ids = torch.randint(0, 3, (4, 12))
    torch.library.opcheck(find, (ids, mask, None, torch.tensor([1, 2])))
    torch.library.opcheck(find, (ids.reshape(-1).int(), None, torch.tensor([0, 5, 5, 48]), torch.tensor([0])))


@needs_cpp
def test_cpp_kernel_checks_memory_safety():
    """The C++ ops themselves refuse what would read out of bounds, naming the argument."""
    fwd = torch.ops.reasonrl.phase_entropy_fwd.default
    find = torch.ops.reasonrl.find_boundary_fwd.default
    bnd = torch.zeros(2, dtype=torch.int64)
    with pytest.raises(RuntimeError, match="cu_seqlens"):
        fwd(torch.zeros(5), None, torch.tensor([0, 3, 9]), bnd, 1)
    with pytest.raises(RuntimeError, match="cu_seqlens"):
        fwd(torch.zeros(5), None, torch.tensor([0, 4, 2]), bnd, 1)
    with pytest.raises(RuntimeError, match="mask"):
        fwd(torch.zeros(2, 5), torch.ones(2, 4, dtype=torch.bool), None, bnd, 1)
    with pytest.raises(RuntimeError, match="boundary"):
        fwd(torch.zeros(2, 5), None, None, torch.zeros(3, dtype=torch.int64), 1)
    with pytest.raises(RuntimeError, match="boundary_len"):
        fwd(torch.zeros(2, 5), None, None, bnd, 0)
    with pytest.raises(RuntimeError, match="marker"):
        find(torch.zeros(2, 5, dtype=torch.int64), None, None, torch.zeros(0, dtype=torch.int64))
    with pytest.raises(RuntimeError, match="token_ids"):
        find(torch.zeros(2, 5), None, None, torch.zeros(1, dtype=torch.int64))


# ----------------------------------------------------------------------------------------------------------
# Triton under the interpreter (fp32, bf16)
# ----------------------------------------------------------------------------------------------------------


@needs_triton
@pytest.mark.parametrize("dtype,boundary_len", [(torch.float32, 1), (torch.bfloat16, 3)])
def test_triton_matches_reference(dtype, boundary_len):
    ent, mask, boundary = ragged_case(9, b=5, t=300, boundary_len=boundary_len)  # 300 > the 256-token block
    _run_padded_and_packed("triton", dtype, ent, mask, boundary, boundary_len=boundary_len)


@needs_triton
def test_triton_strided_without_mask():
    ent, _, _ = ragged_case(10, b=4, t=20)
    strided = ent.float().t().contiguous().t()
    boundary = torch.tensor([0, 20, 7, 19])
    out = phase_entropy(strided, boundary, boundary_len=2, impl="triton")
    _check_phases(out, phase_entropy_reference(ent.float().double(), boundary, boundary_len=2),
                  phase_entropy_reference(ent.float(), boundary, boundary_len=2), dtype=torch.float32,
                  name="triton strided")


# ----------------------------------------------------------------------------------------------------------
# find_boundary
# ----------------------------------------------------------------------------------------------------------


def _ids_case(seed: int, b: int = 6, t: int = 50, vocab: int = 4):
    """Random ids over a tiny vocabulary (so that markers occur, often more than once), a ragged mask whose
    holes sit inside would-be markers, an all-masked row."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (b, t), generator=gen)
    mask = torch.rand((b, t), generator=gen) < 0.8
    mask[1] = False
    ids[4] = 3  # no marker made of 0 / 1 / 2 in this row
    return ids, mask


@pytest.mark.parametrize("impl", [i for i in _kernel_impls() if i != "reference"])
@pytest.mark.parametrize("marker", [[2], [0, 1], [1, 2, 0], [3, 3, 3, 3, 3, 3, 3, 3]])
def test_find_boundary_matches_reference(impl, marker):
    ids, mask = _ids_case(11, t=300 if impl == "triton" else 50)
    for m in (mask, None):
        assert torch.equal(find_boundary(ids, marker, mask=m, impl=impl), find_boundary_reference(ids, marker,
                                                                                                     mask=m))
    pids, cu, pmask = to_packed(ids, mask)
    expected = find_boundary_reference(pids, marker, mask=pmask, cu_seqlens=cu)
    got = find_boundary(pids.to(torch.int32), torch.tensor(marker), mask=pmask, cu_seqlens=cu, impl=impl)
    assert got.dtype == torch.int64 and torch.equal(got, expected)


@pytest.mark.parametrize("impl", _kernel_impls())
def test_find_boundary_hand_examples(impl):
    ids = torch.tensor([[5, 7, 9, 7, 9, 1], [1, 2, 3, 4, 5, 6], [7, 0, 9, 7, 9, 0]])
    assert find_boundary(ids, 9, impl=impl).tolist() == [2, 6, 2]
    assert find_boundary(ids, [7, 9], impl=impl).tolist() == [1, 6, 3]
    mask = torch.tensor([[1] * 6, [1, 1, 1, 1, 0, 0], [1, 0, 1, 1, 1, 1]], dtype=torch.bool)
    assert find_boundary(ids, [7, 9], mask=mask, impl=impl).tolist() == [1, 4, 0]  # the hole is skipped
    # marker longer than the sequence, an empty sequence, a marker at the very end
    got = find_boundary(torch.tensor([3, 4, 3, 4, 5]), [3, 4, 5], cu_seqlens=torch.tensor([0, 2, 2, 5]),
                        impl=impl)
    assert got.tolist() == [2, 0, 0]
    assert find_boundary(torch.tensor([[1, 2, 3]]), [2, 3], impl=impl).tolist() == [1]


@pytest.mark.parametrize("impl", _kernel_impls())
def test_find_then_phase_entropy_roundtrip(impl):
    """What PEAR does: the boundary of find_boundary fed to phase_entropy with the marker's length."""
    if impl == "triton":
        dtype = torch.float32
    else:
        dtype = torch.float64
    ids, mask = _ids_case(12)
    ent = torch.rand(ids.shape, dtype=torch.float64)
    bnd = find_boundary(ids, [0, 1], mask=mask, impl=impl)
    out = phase_entropy(ent.to(dtype), bnd, mask=mask, boundary_len=2, impl=impl)
    ref = phase_entropy_reference(ent, find_boundary_reference(ids, [0, 1], mask=mask), mask=mask,
                                  boundary_len=2)
    _check_phases(out, ref, phase_entropy_reference(ent.to(dtype), bnd, mask=mask, boundary_len=2),
                  dtype=dtype, name=f"{impl} roundtrip")


# ----------------------------------------------------------------------------------------------------------
# Edge cases, errors and the implementation choice
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", _kernel_impls())
def test_empty_batch_and_no_tokens(impl):
    dtype = torch.float32
    out = phase_entropy(torch.zeros(0, dtype=dtype), torch.zeros(0, dtype=torch.int64),
                        cu_seqlens=torch.tensor([0]), impl=impl)
    assert out.mean_before.shape == (0,) and out.count_after.dtype == torch.int32
    out = phase_entropy(torch.zeros(0, 7, dtype=dtype), torch.zeros(0, dtype=torch.int64), impl=impl)
    assert out.mean_after.shape == (0,) and out.mean_after.dtype == torch.float32
    # B = 3 sequences without any token (T = 0): means 0, counts 0; the gradient is empty.
    leaf = torch.zeros(3, 0, dtype=dtype, requires_grad=True)
    out = phase_entropy(leaf, torch.zeros(3, dtype=torch.int64), impl=impl)
    assert out.mean_before.tolist() == [0.0] * 3 and out.count_before.tolist() == [0] * 3
    (out.mean_before.sum() + out.mean_after.sum()).backward()
    assert leaf.grad is not None and leaf.grad.shape == (3, 0)
    assert find_boundary(torch.zeros(0, 4, dtype=torch.int64), 3, impl=impl).shape == (0,)
    assert find_boundary(torch.zeros(3, 0, dtype=torch.int64), [1, 2], impl=impl).tolist() == [0, 0, 0]


@pytest.mark.parametrize("impl", _kernel_impls())
def test_validate_false_out_of_range_boundary(impl):
    # With validate=False nothing is checked on the host; a boundary outside [0, n_b] gives the
    # reference's result (negative: everything after the marker window; > n_b: everything before).
    ent = torch.rand(3, 6, dtype=torch.float64)
    boundary = torch.tensor([-2, 9, 3])
    dtype = torch.float32 if impl == "triton" else torch.float64
    out = phase_entropy(ent.to(dtype), boundary, boundary_len=2, impl=impl, validate=False)
    ref = phase_entropy_reference(ent, boundary, boundary_len=2, validate=False)
    _check_phases(out, ref, phase_entropy_reference(ent.to(dtype), boundary, boundary_len=2, validate=False),
                  dtype=dtype, name=f"{impl} out of range")
    with pytest.raises(ValueError, match=r"boundary\[0\] = -2"):
        phase_entropy(ent.to(dtype), boundary, boundary_len=2, impl=impl)


@pytest.mark.parametrize("impl", _kernel_impls())
def test_bad_input_named_errors(impl):
    ent = torch.zeros(2, 3)
    b2 = torch.tensor([0, 1])
    with pytest.raises(ValueError, match="boundary"):
        phase_entropy(ent, torch.tensor([0, 4]), impl=impl)
    with pytest.raises(ValueError, match="boundary"):
        phase_entropy(ent, torch.tensor([0, 1, 2]), impl=impl)
    with pytest.raises(TypeError, match="boundary"):
        phase_entropy(ent, torch.tensor([0.0, 1.0]), impl=impl)
    with pytest.raises(ValueError, match="mask"):
        phase_entropy(ent, b2, mask=torch.ones(2, 4), impl=impl)
    with pytest.raises(ValueError, match="mask"):
        phase_entropy(ent, b2, mask=torch.full((2, 3), 2), impl=impl)
    with pytest.raises(ValueError, match="cu_seqlens"):
        phase_entropy(ent, b2, cu_seqlens=torch.tensor([0, 3, 6]), impl=impl)
    with pytest.raises(ValueError, match="cu_seqlens"):
        phase_entropy(torch.zeros(6), b2, cu_seqlens=torch.tensor([0, 3, 5]), impl=impl)
    with pytest.raises(ValueError, match="cu_seqlens"):
        phase_entropy(torch.zeros(6), b2, cu_seqlens=torch.tensor([0.0, 3.0, 6.0]), impl=impl)
    with pytest.raises(ValueError, match="entropy"):
        phase_entropy(torch.zeros(6), torch.tensor([0]), impl=impl)
    with pytest.raises(ValueError, match="boundary_len"):
        phase_entropy(ent, b2, boundary_len=0, impl=impl)
    with pytest.raises(TypeError, match="entropy"):
        phase_entropy(torch.zeros(2, 3, dtype=torch.int64), b2, impl=impl)
    ids = torch.zeros(2, 3, dtype=torch.int64)
    with pytest.raises(ValueError, match="marker_ids"):
        find_boundary(ids, [], impl=impl)
    with pytest.raises(ValueError, match="marker_ids"):
        find_boundary(ids, [-1], impl=impl)
    with pytest.raises(ValueError, match="marker_ids"):
        find_boundary(ids, torch.tensor([[1, 2]]), impl=impl)
    with pytest.raises(TypeError, match="token_ids"):
        find_boundary(torch.zeros(2, 3), [1], impl=impl)
    with pytest.raises(ValueError, match="token_ids"):
        find_boundary(torch.zeros(6, dtype=torch.int64), [1], impl=impl)
    with pytest.raises(ValueError, match="mask"):
        find_boundary(ids, [1], mask=torch.ones(3, 2), impl=impl)


def test_impl_dispatch_rule(monkeypatch):
    monkeypatch.delenv("REASONRL_IMPL", raising=False)
    cpu = torch.device("cpu")
    expected = "cpp" if cpp_available() else "reference"
    assert backend.resolve_impl("phase_entropy", "auto", cpu, torch.float64) == expected
    assert backend.resolve_impl("find_boundary", "auto", cpu, torch.int64) == expected
    # The public functions of reasonrl.rewards are the registered ops.
    assert functional.phase_entropy is phase_entropy and functional.find_boundary is find_boundary
    ent, mask, boundary = ragged_case(13)
    with pytest.raises(RuntimeError, match="impl='triton'.*float64"):  # explicit: never a fallback
        phase_entropy(ent, boundary, mask=mask, impl="triton")
    with pytest.raises(ValueError, match="impl must be one of"):
        phase_entropy(ent, boundary, mask=mask, impl="cuda")
    monkeypatch.setenv("REASONRL_IMPL", "reference")
    ref = phase_entropy(ent, boundary, mask=mask)
    for a, r in zip(ref, phase_entropy_reference(ent, boundary, mask=mask), strict=True):
        assert torch.equal(a, r)


@needs_cpp
def test_auto_runs_cpp_on_cpu(monkeypatch):
    monkeypatch.delenv("REASONRL_IMPL", raising=False)
    ent, mask, boundary = ragged_case(14)
    auto = functional.phase_entropy(ent, boundary, mask=mask, boundary_len=2)
    cpp = phase_entropy(ent, boundary, mask=mask, boundary_len=2, impl="cpp")
    for a, c in zip(auto, cpp, strict=True):
        assert torch.equal(a, c)  # the same kernel, bit for bit


@needs_cpp
@pytest.mark.slow
def test_compile_fullgraph_cpp():
    """torch.compile(fullgraph=True) of both public ops on the cpp path with validate=False, forward and
    backward (docs/ops.md 0: no host sync with validate=False). One test: each compile costs seconds."""
    torch._dynamo.reset()
    ids, mask = _ids_case(15)
    ent = torch.rand(ids.shape, dtype=torch.float32)

    def step(e, ids, mask):
        bnd = find_boundary(ids, [0, 1], mask=mask, impl="cpp", validate=False)
        out = phase_entropy(e, bnd, mask=mask, boundary_len=2, impl="cpp", validate=False)
        return (out.mean_before - 0.5 * out.mean_after).sum(), out.count_after

    leaf_e = ent.clone().requires_grad_(True)
    loss_e, count_e = step(leaf_e, ids, mask)
    loss_e.backward()
    leaf_c = ent.clone().requires_grad_(True)
    loss_c, count_c = torch.compile(step, fullgraph=True)(leaf_c, ids, mask)
    loss_c.backward()
    torch.testing.assert_close(loss_c, loss_e)
    assert torch.equal(count_c, count_e)
    torch.testing.assert_close(leaf_c.grad, leaf_e.grad)
