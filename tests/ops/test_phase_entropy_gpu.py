"""GPU tests of phase_entropy / find_boundary (pytest -m gpu): the compiled Triton kernels on CUDA against the
float64 reference, ``opcheck`` of the Triton registrations (under the interpreter the fake-tensor pass would
run the kernels on fake tensors), ``torch.compile(fullgraph=True)`` and ``impl="auto"`` picking Triton. The
interpreter tests (tests/ops/test_phase_entropy.py) cover the semantics on small shapes; these add the
compiled code path and realistic sizes (sequences of thousands of tokens, many 256-token blocks)."""

from __future__ import annotations

import pytest
import torch

from reasonrl import _backend as backend
from reasonrl.ops.phase_entropy import find_boundary, phase_entropy
from reasonrl.reference.phase_entropy import find_boundary_reference, phase_entropy_reference
from reasonrl.testing import assert_close_to_oracle, assert_stat_close

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _case(seed, b=64, t=3000):
    gen = torch.Generator().manual_seed(seed)
    ent = torch.rand((b, t), generator=gen, dtype=torch.float64) * 5.0
    lengths = torch.randint(0, t + 1, (b,), generator=gen)
    mask = (torch.arange(t)[None, :] < lengths[:, None]) & (torch.rand((b, t), generator=gen) < 0.9)
    n = mask.sum(dim=1)
    boundary = (torch.rand(b, generator=gen) * (n + 1).double()).long().clamp(max=n)
    boundary[0] = 0
    boundary[1] = n[1]
    return ent, mask, boundary


def _packed(x, mask):
    lengths = mask.shape[1] - mask.flip(1).int().argmax(dim=1)
    lengths = torch.where(mask.any(dim=1), lengths, torch.zeros_like(lengths))
    parts = [x[i, :n] for i, n in enumerate(lengths.tolist())]
    cu = torch.nn.functional.pad(lengths.cumsum(0), (1, 0))
    return torch.cat(parts), cu, torch.cat([mask[i, :n] for i, n in enumerate(lengths.tolist())])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_triton_cuda_matches_reference(dtype, packed):
    ent, mask, boundary = _case(0)
    cu = None
    if packed:
        ent, cu, mask = _packed(ent, mask)
    x = ent.to(dtype)
    kw = dict(mask=mask, cu_seqlens=cu, boundary_len=2)
    oracle = phase_entropy_reference(x.double(), boundary, **kw)
    ref_same = phase_entropy_reference(x, boundary, **kw)
    cuda_kw = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
    leaf = x.cuda().requires_grad_(True)
    out = phase_entropy(leaf, boundary.cuda(), impl="triton", **cuda_kw)
    assert torch.equal(out.count_before.cpu(), oracle.count_before)
    assert torch.equal(out.count_after.cpu(), oracle.count_after)
    for field in ("mean_before", "mean_after"):
        assert_stat_close(getattr(out, field).cpu().double(), getattr(oracle, field),
                          getattr(ref_same, field).double(), dtype=dtype, name=f"cuda {field}")
    g = torch.randn(2, boundary.shape[0], dtype=torch.float64)
    (grad,) = torch.autograd.grad([out.mean_before, out.mean_after], leaf, [g[0].float().cuda(),
                                                                            g[1].float().cuda()])
    leaf64 = x.double().requires_grad_(True)
    o64 = phase_entropy_reference(leaf64, boundary, **kw)
    (grad64,) = torch.autograd.grad([o64.mean_before, o64.mean_after], leaf64, [g[0], g[1]])
    leaf32 = x.float().requires_grad_(True)
    o32 = phase_entropy_reference(leaf32, boundary, **kw)
    (grad32,) = torch.autograd.grad([o32.mean_before, o32.mean_after], leaf32, [g[0].float(), g[1].float()])
    assert grad.dtype == dtype and grad.shape == x.shape
    assert_close_to_oracle(grad.cpu().double(), grad64, grad32.double(), atol_scale=1e-7,
                           magnitude=float(g.abs().max()),
                           ulp_dtype=dtype if dtype != torch.float32 else None, name="cuda grad")


@pytest.mark.parametrize("marker", [[3], [1, 2], [0, 1, 2, 3]])
def test_find_boundary_cuda(marker):
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 4, (64, 3000), generator=gen)
    mask = torch.rand((64, 3000), generator=gen) < 0.9
    got = find_boundary(ids.cuda(), marker, mask=mask.cuda(), impl="triton")
    assert torch.equal(got.cpu(), find_boundary_reference(ids, marker, mask=mask))
    pids, cu, pmask = _packed(ids, mask)
    got = find_boundary(pids.int().cuda(), marker, mask=pmask.cuda(), cu_seqlens=cu.cuda(), impl="triton")
    assert torch.equal(got.cpu(), find_boundary_reference(pids, marker, mask=pmask, cu_seqlens=cu))


def test_triton_opcheck_cuda():
    fwd, bwd = backend.registered_ops("phase_entropy", "triton")
    (find,) = backend.registered_ops("find_boundary", "triton")
    ent, mask, boundary = _case(2, b=8, t=300)
    x, m, bnd = ent.float().cuda().requires_grad_(True), mask.cuda(), boundary.cuda()
    torch.library.opcheck(fwd, (x, m, None, bnd, 2))
    out = phase_entropy(x.detach(), bnd, mask=m, boundary_len=2, impl="triton")
    g = torch.randn(8, device="cuda")
    torch.library.opcheck(bwd, (g, g, x.detach(), m, None, bnd, out.count_before, out.count_after, 2))
    torch.library.opcheck(find, (torch.randint(0, 3, (8, 300), device="cuda"), m, None,
                                 torch.tensor([1, 2], device="cuda")))


def test_compile_fullgraph_triton():
    torch._dynamo.reset()
    ent, mask, boundary = _case(3, b=8, t=500)
    ids = torch.randint(0, 4, ent.shape).cuda()
    m = mask.cuda()

    def step(e, ids, m):
        bnd = find_boundary(ids, [1, 2], mask=m, impl="triton", validate=False)
        out = phase_entropy(e, bnd, mask=m, boundary_len=2, impl="triton", validate=False)
        return (out.mean_before - 0.5 * out.mean_after).sum()

    leaf_e = ent.float().cuda().requires_grad_(True)
    step(leaf_e, ids, m).backward()
    leaf_c = ent.float().cuda().requires_grad_(True)
    torch.compile(step, fullgraph=True)(leaf_c, ids, m).backward()
    torch.testing.assert_close(leaf_c.grad, leaf_e.grad)


def test_auto_picks_triton_on_cuda(monkeypatch):
    monkeypatch.delenv("REASONRL_IMPL", raising=False)
    assert backend.resolve_impl("phase_entropy", "auto", torch.device("cuda"), torch.float32) == "triton"
    assert backend.resolve_impl("find_boundary", "auto", torch.device("cuda"), torch.int64) == "triton"
