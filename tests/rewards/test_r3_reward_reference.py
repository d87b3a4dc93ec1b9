"""r3_reward (docs/ops.md section 5): the reference against a float64 hand computation written with Python
loops over prompts, rollouts and tokens (an independent reading of the formulas), on ragged inputs, plus the
invariants of docs/rewards.md 2.3 and the error contract."""

from __future__ import annotations

import math

import pytest
import torch

from reasonrl.ops import group_advantages
from reasonrl.reference import r3_reward_reference
from reasonrl.rewards import r3_reward

# ----------------------------------------------------------------------------------------------------------
# The hand computation (float64, plain Python floats)
# ----------------------------------------------------------------------------------------------------------


def _k_of(topk, n):
    if isinstance(topk, int):
        return min(n, topk)
    return min(n, max(1, math.ceil(round(topk * n, 9))))


def hand_r3(lp, rollouts, *, weighting, tau=1.0, topk=0.1, reduction="weighted_mean", baseline=None,
            gamma=None, min_valid=2):
    """lp: list over prompts of [K][L_g] lists (only valid tokens, in order); rollouts: list of [K] bools;
    baseline: list of [L_g] or None. Returns (rewards [G][K] with NaN, weights [G][L_g], sigma [G][L_g])."""
    rewards, weights, sigmas = [], [], []
    for g, rows in enumerate(lp):
        n_tok = len(rows[0])
        valid = [k for k, ok in enumerate(rollouts[g]) if ok]
        if len(valid) >= min_valid:
            sig = []
            for j in range(n_tok):
                vals = [rows[k][j] for k in valid]
                mu = sum(vals) / len(vals)
                sig.append(math.sqrt(sum((v - mu) ** 2 for v in vals) / len(vals)))
        else:
            sig = [0.0] * n_tok
        kg = _k_of(topk, n_tok)
        all_zero = sum(sig) == 0
        top = sorted(range(n_tok), key=lambda j: (-sig[j], j))[:kg] if not all_zero else []
        if all_zero or weighting == "uniform":
            w = [1.0 / n_tok] * n_tok
        elif weighting == "linear":
            w = [s / sum(sig) for s in sig]
        elif weighting == "softmax":
            e = [math.exp(s / tau) for s in sig]
            w = [x / sum(e) for x in e]
        else:
            w = [1.0 / kg if j in top else 0.0 for j in range(n_tok)]
        out = []
        for k in range(len(rows)):
            if not rollouts[g][k] or not valid:
                out.append(math.nan)
                continue
            total = 0.0
            for j in range(n_tok):
                term = rows[k][j]
                if baseline is not None:
                    term -= baseline[g][j]
                if gamma is not None:
                    for a in top:
                        if a < j:
                            p = math.exp(rows[k][a])
                            term += math.log(p + (1 - p) * (1 - math.exp(-gamma * (j - a))))
                total += w[j] * term
            out.append(total * (n_tok if reduction == "sum" else 1.0))
        rewards.append(out)
        weights.append(w)
        sigmas.append(sig)
    return rewards, weights, sigmas


def ragged_case(seed=0, dtype=torch.float64):
    """Three prompts, K = 4: reference lengths 5, 1 and 3 (padded to 6 with holes), valid rollouts 3,
    1 (sigma = 0) and 4. Garbage (NaN) at every position that must not be read."""
    gen = torch.Generator().manual_seed(seed)
    g, k, width = 3, 4, 6
    lp = -torch.rand((g, k, width), generator=gen, dtype=torch.float64) * 3.0
    mask = torch.zeros((g, width), dtype=torch.bool)
    mask[0, :5] = True
    mask[1, 2] = True
    mask[2, [0, 2, 5]] = True  # non-contiguous valid tokens
    roll = torch.tensor([[1, 1, 0, 1], [0, 0, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)
    base = -torch.rand((g, width), generator=gen, dtype=torch.float64) * 2.0
    lp_dirty = lp.clone()
    lp_dirty[~(roll[:, :, None] & mask[:, None, :])] = math.nan
    base_dirty = base.clone()
    base_dirty[~mask] = math.nan
    rows = [[[float(lp[gi, ki, j]) for j in range(width) if mask[gi, j]] for ki in range(k)]
            for gi in range(g)]
    base_rows = [[float(base[gi, j]) for j in range(width) if mask[gi, j]] for gi in range(g)]
    return lp_dirty.to(dtype), mask, roll, base_dirty.to(dtype), rows, base_rows


def _to_packed(lp, mask, base):
    """Padded [G, K, L] -> packed [K, M], cu [G + 1], baseline [M]."""
    g, k, _ = lp.shape
    cols = [lp[gi][:, mask[gi]] for gi in range(g)]
    lengths = [int(mask[gi].sum()) for gi in range(g)]
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0).tolist()), dtype=torch.int32)
    return torch.cat(cols, dim=1), cu, torch.cat([base[gi][mask[gi]] for gi in range(g)])


def _assert_matches(out, hand, mask, rtol=1e-12, atol=1e-12):
    rewards, weights, sigmas = hand
    got = out.reward.tolist()
    for gi, row in enumerate(rewards):
        for ki, v in enumerate(row):
            if math.isnan(v):
                assert math.isnan(got[gi][ki]), (gi, ki, got[gi][ki])
            else:
                assert got[gi][ki] == pytest.approx(v, rel=rtol, abs=atol), (gi, ki)
    for gi in range(len(weights)):
        w = out.weights[gi][mask[gi]].tolist() if mask is not None else None
        s = out.sigma[gi][mask[gi]].tolist() if mask is not None else None
        if mask is not None:
            assert w == pytest.approx(weights[gi], rel=rtol, abs=atol)
            assert s == pytest.approx(sigmas[gi], rel=rtol, abs=atol)
            assert bool((out.weights[gi][~mask[gi]] == 0).all())
            assert bool((out.sigma[gi][~mask[gi]] == 0).all())


# Every weighting x reduction, with and without the baseline and the propagation form: the grid is the full
# product because each option enters the result through a different term.
@pytest.mark.parametrize("weighting", ["linear", "softmax", "topk", "uniform"])
@pytest.mark.parametrize("reduction", ["weighted_mean", "sum"])
@pytest.mark.parametrize("with_baseline", [False, True])
@pytest.mark.parametrize("gamma", [None, 0.1, 0.7])
def test_padded_matches_hand_computation(weighting, reduction, with_baseline, gamma):
    lp, mask, roll, base, rows, base_rows = ragged_case()
    topk = 0.4  # k_g = 2, 1, 2: several reflective tokens where the length allows
    out = r3_reward_reference(lp, ref_mask=mask, rollout_mask=roll, weighting=weighting, softmax_tau=0.5,
                              topk=topk, reduction=reduction,
                              baseline_logprobs=base if with_baseline else None,
                              propagation_gamma=gamma)
    hand = hand_r3(rows, [r.tolist() for r in roll], weighting=weighting, tau=0.5, topk=topk,
                   reduction=reduction, baseline=base_rows if with_baseline else None, gamma=gamma)
    _assert_matches(out, hand, mask)
    assert out.num_valid_rollouts.tolist() == [3, 1, 4]
    assert out.num_valid_rollouts.dtype == torch.int32
    # prompt 1 has one valid rollout: sigma = 0 and uniform weights.
    assert float(out.sigma[1].abs().sum()) == 0.0
    assert out.weights[1, 2].item() == 1.0


@pytest.mark.parametrize("weighting", ["linear", "softmax", "topk", "uniform"])
@pytest.mark.parametrize("gamma", [None, 0.3])
def test_packed_equals_padded(weighting, gamma):
    lp, mask, roll, base, rows, base_rows = ragged_case(seed=3)
    kwargs = dict(rollout_mask=roll, weighting=weighting, topk=2, propagation_gamma=gamma)
    pad = r3_reward_reference(lp, ref_mask=mask, baseline_logprobs=base, **kwargs)
    lp_p, cu, base_p = _to_packed(lp, mask, base)
    pk = r3_reward_reference(lp_p, ref_cu_seqlens=cu, baseline_logprobs=base_p, **kwargs)
    torch.testing.assert_close(pk.reward, pad.reward, equal_nan=True, rtol=0, atol=1e-14)
    torch.testing.assert_close(pk.weights, pad.weights[mask], rtol=0, atol=1e-15)
    torch.testing.assert_close(pk.sigma, pad.sigma[mask], rtol=0, atol=1e-15)
    hand = hand_r3(rows, [r.tolist() for r in roll], weighting=weighting, topk=2, baseline=base_rows,
                   gamma=gamma)
    for gi in range(3):
        lo, hi = int(cu[gi]), int(cu[gi + 1])
        assert pk.weights[lo:hi].tolist() == pytest.approx(hand[1][gi], abs=1e-12)


def test_fp32_close_to_fp64_oracle():
    lp, mask, roll, base, _, _ = ragged_case(seed=5)
    for weighting in ("linear", "softmax", "topk", "uniform"):
        kw = dict(ref_mask=mask, rollout_mask=roll, weighting=weighting, baseline_logprobs=base,
                  propagation_gamma=0.2)
        oracle = r3_reward_reference(lp, **kw)
        got = r3_reward_reference(lp.float(), **kw)
        assert got.reward.dtype == torch.float32
        ok = ~torch.isnan(oracle.reward)
        err = (got.reward.double() - oracle.reward)[ok].abs().max()
        assert err <= 1e-6 * (1 + oracle.reward[ok].abs().max()), (weighting, float(err))
        assert torch.isnan(got.reward[~ok]).all()


def test_topk_ties_lower_index_and_int_k():
    # sigma equal on tokens 1 and 3 (largest), k = 1 picks token 1.
    lp = torch.tensor([[[0.0, -1.0, 0.0, -1.0], [0.0, 0.0, 0.0, 0.0]]], dtype=torch.float64)
    out = r3_reward_reference(lp, weighting="topk", topk=1)
    assert out.weights.tolist() == [[0.0, 1.0, 0.0, 0.0]]
    out = r3_reward_reference(lp, weighting="topk", topk=0.5)  # ceil(0.5 * 4) = 2
    assert out.weights.tolist() == [[0.0, 0.5, 0.0, 0.5]]
    out = r3_reward_reference(lp, weighting="topk", topk=0.1)  # max(1, ceil(0.4)) = 1
    assert out.weights.tolist() == [[0.0, 1.0, 0.0, 0.0]]
    out = r3_reward_reference(lp, weighting="topk", topk=10)  # min(L, 10) = 4 -> the 4 tokens
    assert out.weights.tolist() == [[0.25] * 4]


def test_min_valid_rollouts_and_no_valid_rollout():
    lp = torch.tensor([[[-1.0, -2.0], [-3.0, -0.5]], [[-1.0, -1.0], [-2.0, -2.0]]], dtype=torch.float64)
    roll = torch.tensor([[True, True], [False, False]])
    out = r3_reward_reference(lp, rollout_mask=roll, min_valid_rollouts=3)
    assert float(out.sigma.abs().sum()) == 0.0  # 2 valid < 3 -> sigma 0 -> uniform
    assert out.reward[0].tolist() == pytest.approx([-1.5, -1.75])
    assert torch.isnan(out.reward[1]).all()  # no valid rollout: NaN for all K
    assert out.num_valid_rollouts.tolist() == [2, 0]


def test_propagation_gamma_zero_adds_reflective_logprob():
    # gamma = 0: log(p + (1 - p) * 0) = log p = l_a for every later j.
    lp = torch.tensor([[[-0.1, -2.0, -0.3], [-0.2, -0.5, -0.4]]], dtype=torch.float64)
    out = r3_reward_reference(lp, weighting="uniform", topk=1, propagation_gamma=0.0, reduction="sum")
    # reflective token = index 1 (largest sigma); it adds l_1 to token 2's term.
    expect = [sum(lp[0, k].tolist()) + float(lp[0, k, 1]) for k in range(2)]
    assert out.reward[0].tolist() == pytest.approx(expect, abs=1e-14)


def test_propagation_extreme_probabilities_finite():
    lp = torch.tensor([[[-1e-12, -80.0, -1.0, -2.0], [-2e-12, -1.0, -1.0, -1.0]]], dtype=torch.float64)
    out = r3_reward_reference(lp, topk=2, propagation_gamma=1e-3)
    assert torch.isfinite(out.reward).all()


# ----------------------------------------------------------------------------------------------------------
# Invariants (docs/rewards.md 2.3)
# ----------------------------------------------------------------------------------------------------------


def test_uniform_sum_is_aggregate_certainty():
    lp, mask, roll, _, rows, _ = ragged_case(seed=7)
    out = r3_reward_reference(lp, ref_mask=mask, rollout_mask=roll, weighting="uniform", reduction="sum")
    for gi in range(3):
        for ki in range(4):
            if roll[gi, ki]:
                assert float(out.reward[gi, ki]) == pytest.approx(sum(rows[gi][ki]), rel=1e-13)


@pytest.mark.parametrize("weighting", ["linear", "softmax", "topk", "uniform"])
@pytest.mark.parametrize("scale", ["group", "none"])
def test_masked_cot_baseline_shifts_prompt_equally(weighting, scale):
    lp, mask, roll, base, _, _ = ragged_case(seed=11)
    roll = torch.ones_like(roll)
    lp = torch.nan_to_num(lp, nan=-1.0)
    kw = dict(ref_mask=mask, rollout_mask=roll, weighting=weighting)
    plain = r3_reward_reference(lp, **kw).reward
    based = r3_reward_reference(lp, baseline_logprobs=base, **kw).reward
    shift = plain - based
    # the same shift for every rollout of a prompt
    torch.testing.assert_close(shift, shift[:, :1].expand_as(shift), rtol=0, atol=1e-12)
    a1 = group_advantages(plain.reshape(-1), group_size=4, scale=scale).advantages
    a2 = group_advantages(based.reshape(-1), group_size=4, scale=scale).advantages
    torch.testing.assert_close(a1, a2, rtol=0, atol=1e-9)


def test_reduction_sum_scales_by_length():
    lp, mask, roll, _, _, _ = ragged_case(seed=13)
    a = r3_reward_reference(lp, ref_mask=mask, rollout_mask=roll, reduction="weighted_mean").reward
    b = r3_reward_reference(lp, ref_mask=mask, rollout_mask=roll, reduction="sum").reward
    torch.testing.assert_close(b, a * mask.sum(1, keepdim=True).double(), equal_nan=True)


def test_public_entry_point_matches_reference():
    lp, mask, roll, base, _, _ = ragged_case(seed=17, dtype=torch.float32)
    ref = r3_reward_reference(lp, ref_mask=mask, rollout_mask=roll, baseline_logprobs=base)
    out = r3_reward(lp, ref_mask=mask, rollout_mask=roll, baseline_logprobs=base)
    torch.testing.assert_close(out.reward, ref.reward, equal_nan=True, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="impl"):
        r3_reward(lp, ref_mask=mask, impl="triton")


# ----------------------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------------------


def test_errors_name_the_argument():
    lp = torch.zeros(2, 3, 4)
    with pytest.raises(ValueError, match="ref_mask"):
        r3_reward_reference(lp, ref_mask=torch.ones(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="rollout_mask"):
        r3_reward_reference(lp, rollout_mask=torch.ones(3, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="baseline_logprobs"):
        r3_reward_reference(lp, baseline_logprobs=torch.zeros(2, 3))
    with pytest.raises(ValueError, match="no valid reference token"):
        m = torch.ones(2, 4, dtype=torch.bool)
        m[1] = False
        r3_reward_reference(lp, ref_mask=m)
    with pytest.raises(ValueError, match="no valid reference token"):
        r3_reward_reference(torch.zeros(3, 4), ref_cu_seqlens=torch.tensor([0, 2, 2, 4]))
    with pytest.raises(ValueError, match="ref_cu_seqlens"):
        r3_reward_reference(torch.zeros(3, 4), ref_cu_seqlens=torch.tensor([0, 2, 5]))
    with pytest.raises(ValueError, match="ref_logprobs"):
        r3_reward_reference(torch.zeros(3, 4))
    with pytest.raises(ValueError, match="ref_logprobs"):
        r3_reward_reference(torch.zeros(3, 4, 2), ref_cu_seqlens=torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="ref_mask"):
        r3_reward_reference(torch.zeros(3, 4), ref_cu_seqlens=torch.tensor([0, 4]), ref_mask=torch.ones(1, 4))
    with pytest.raises(TypeError, match="ref_logprobs"):
        r3_reward_reference(torch.zeros(2, 3, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="weighting"):
        r3_reward_reference(lp, weighting="sigmoid")
    with pytest.raises(ValueError, match="reduction"):
        r3_reward_reference(lp, reduction="mean")
    with pytest.raises(ValueError, match="topk"):
        r3_reward_reference(lp, topk=0.0)
    with pytest.raises(ValueError, match="topk"):
        r3_reward_reference(lp, topk=0)
    with pytest.raises(ValueError, match="softmax_tau"):
        r3_reward_reference(lp, softmax_tau=0.0)
    with pytest.raises(ValueError, match="propagation_gamma"):
        r3_reward_reference(lp, propagation_gamma=-1.0)
    with pytest.raises(ValueError, match="min_valid_rollouts"):
        r3_reward_reference(lp, min_valid_rollouts=0)
    with pytest.raises(ValueError, match="rollout_mask"):
        r3_reward_reference(lp, rollout_mask=torch.full((2, 3), 2))


def test_empty_batch():
    out = r3_reward_reference(torch.zeros(0, 4, 3))
    assert out.reward.shape == (0, 4) and out.weights.shape == (0, 3)
    out = r3_reward_reference(torch.zeros(4, 0), ref_cu_seqlens=torch.tensor([0]))
    assert out.reward.shape == (0, 4) and out.weights.shape == (0,)
