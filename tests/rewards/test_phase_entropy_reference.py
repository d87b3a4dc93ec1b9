"""phase_entropy and find_boundary (docs/ops.md section 6): hand-computed examples in both layouts, masked
tokens, multi-token markers, missing markers, gradients and errors."""

from __future__ import annotations

import pytest
import torch

from reasonrl.reference import find_boundary_reference, phase_entropy_reference
from reasonrl.rewards import find_boundary, phase_entropy


def _hand(values, mask, boundary, blen):
    valid = [v for v, m in zip(values, mask, strict=True) if m]
    before = valid[:boundary]
    after = valid[boundary + blen:]
    mean = lambda xs: sum(xs) / len(xs) if xs else 0.0  # noqa: E731
    return mean(before), mean(after), len(before), len(after)


def test_padded_hand_examples():
    ent = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0, 6.0],
                        [0.5, 0.5, 9.0, 1.0, 0.0, 0.0],
                        [2.0, 4.0, 6.0, 8.0, 0.0, 0.0],
                        [1.0, 1.0, 1.0, 1.0, 1.0, 1.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1],
                         [1, 1, 1, 1, 0, 0],
                         [1, 0, 1, 1, 0, 0],   # a masked token inside: skipped, indices 0, 1, 2
                         [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    boundary = torch.tensor([2, 4, 1, 0])  # row 1: no marker (n_b = 4); row 3: marker first
    out = phase_entropy_reference(ent, boundary, mask=mask, boundary_len=1)
    for b in range(4):
        exp = _hand(ent[b].tolist(), mask[b].tolist(), int(boundary[b]), 1)
        got = (float(out.mean_before[b]), float(out.mean_after[b]), int(out.count_before[b]),
               int(out.count_after[b]))
        assert got == pytest.approx(exp), b
    # row 0: before = 1, 2 (mean 1.5); marker 3; after 4, 5, 6 (mean 5)
    assert out.mean_before[0].item() == 1.5 and out.mean_after[0].item() == 5.0
    # no marker: all "think", mean_after 0 with count 0
    assert out.count_after[1].item() == 0 and out.mean_after[1].item() == 0.0
    assert out.mean_before[1].item() == pytest.approx(2.75)
    # masked token skipped: valid = 2, 6, 8; boundary 1 -> before [2], after [8]
    assert out.mean_before[2].item() == 2.0 and out.mean_after[2].item() == 8.0
    assert out.count_before.dtype == torch.int32


def test_multi_token_marker_and_packed_equals_padded():
    gen = torch.Generator().manual_seed(0)
    ent = torch.rand((3, 7), generator=gen)
    mask = torch.tensor([[1] * 7, [1, 1, 1, 0, 1, 0, 0], [1, 1, 1, 1, 1, 0, 0]], dtype=torch.bool)
    boundary = torch.tensor([3, 1, 4])  # row 2: the 2-token marker starts at the last valid token (cut off)
    pad = phase_entropy_reference(ent, boundary, mask=mask, boundary_len=2)
    for b in range(3):
        exp = _hand(ent[b].tolist(), mask[b].tolist(), int(boundary[b]), 2)
        assert (pad.mean_before[b].item(), pad.mean_after[b].item(), pad.count_before[b].item(),
                pad.count_after[b].item()) == pytest.approx(exp)
    lengths = [7, 5, 5]
    packed = torch.cat([ent[b, :n] for b, n in enumerate(lengths)])
    pmask = torch.cat([mask[b, :n] for b, n in enumerate(lengths)])
    cu = torch.tensor([0, 7, 12, 17], dtype=torch.int32)
    pk = phase_entropy(packed, boundary, cu_seqlens=cu, mask=pmask, boundary_len=2)
    for a, b in zip(pk, pad, strict=True):
        torch.testing.assert_close(a, b)


def test_gradient_is_masked_mean():
    ent = torch.tensor([[1.0, 2.0, 3.0, 4.0]], dtype=torch.float64, requires_grad=True)
    out = phase_entropy_reference(ent, torch.tensor([1]))
    (out.mean_before + 2 * out.mean_after).sum().backward()
    assert ent.grad.tolist() == [[1.0, 0.0, 1.0, 1.0]]  # marker token gets 0; after: 2 * 1/2
    fn = lambda e: phase_entropy_reference(e, torch.tensor([1]), boundary_len=2).mean_after  # noqa: E731
    torch.autograd.gradcheck(fn, (torch.rand(1, 5, dtype=torch.float64, requires_grad=True),))


def test_find_boundary():
    ids = torch.tensor([[5, 7, 9, 7, 9, 1], [1, 2, 3, 4, 5, 6], [7, 0, 9, 7, 9, 0]])
    assert find_boundary_reference(ids, 9).tolist() == [2, 6, 2]
    assert find_boundary_reference(ids, [7, 9]).tolist() == [1, 6, 3]
    # masked token between 7 and 9 in row 2 is skipped: 7 (masked 0) 9 -> contiguous in valid space
    mask = torch.tensor([[1] * 6, [1, 1, 1, 1, 0, 0], [1, 0, 1, 1, 1, 1]], dtype=torch.bool)
    assert find_boundary_reference(ids, [7, 9], mask=mask).tolist() == [1, 4, 0]
    assert find_boundary_reference(ids, torch.tensor([9, 1])).tolist() == [4, 6, 6]
    # packed: same rows, segments of lengths 6, 4, 6
    flat = torch.cat([ids[0], ids[1, :4], ids[2]])
    cu = torch.tensor([0, 6, 10, 16])
    assert find_boundary(flat, [7, 9], cu_seqlens=cu).tolist() == [1, 4, 3]
    # marker longer than the sequence, and an empty sequence
    got = find_boundary(torch.tensor([3, 4]), [3, 4, 5], cu_seqlens=torch.tensor([0, 2, 2]))
    assert got.tolist() == [2, 0]


def test_errors():
    ent = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="boundary"):
        phase_entropy_reference(ent, torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="boundary"):
        phase_entropy_reference(ent, torch.tensor([0, 1, 2]))
    with pytest.raises(TypeError, match="boundary"):
        phase_entropy_reference(ent, torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="mask"):
        phase_entropy_reference(ent, torch.tensor([0, 1]), mask=torch.ones(2, 4))
    with pytest.raises(ValueError, match="cu_seqlens"):
        phase_entropy_reference(ent, torch.tensor([0, 1]), cu_seqlens=torch.tensor([0, 3, 6]))
    with pytest.raises(ValueError, match="cu_seqlens"):
        phase_entropy_reference(torch.zeros(6), torch.tensor([0, 1]), cu_seqlens=torch.tensor([0, 3, 5]))
    with pytest.raises(ValueError, match="entropy"):
        phase_entropy_reference(torch.zeros(6), torch.tensor([0]))
    with pytest.raises(ValueError, match="boundary_len"):
        phase_entropy_reference(ent, torch.tensor([0, 1]), boundary_len=0)
    with pytest.raises(TypeError, match="entropy"):
        phase_entropy_reference(torch.zeros(2, 3, dtype=torch.int64), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="marker_ids"):
        find_boundary_reference(torch.zeros(2, 3, dtype=torch.int64), [])
    with pytest.raises(ValueError, match="marker_ids"):
        find_boundary_reference(torch.zeros(2, 3, dtype=torch.int64), [-1])
    with pytest.raises(TypeError, match="token_ids"):
        find_boundary_reference(torch.zeros(2, 3), [1])
    with pytest.raises(RuntimeError, match="impl='triton'"):  # an explicit impl that cannot run raises
        phase_entropy(ent.double(), torch.tensor([0, 1]), impl="triton")


def test_empty():
    out = phase_entropy_reference(torch.zeros(0), torch.zeros(0, dtype=torch.int64),
                                  cu_seqlens=torch.tensor([0]))
    assert out.mean_before.shape == (0,)
    assert find_boundary_reference(torch.zeros(0, 4, dtype=torch.int64), 3).shape == (0,)
