"""Reference ``group_advantages`` (docs/ops.md section 4): group-relative advantages of the GRPO family.

This IS the implementation of the op (it is not on the hot path: O(B) work once per batch, so there is no
kernel). Plain vectorised PyTorch: segment reductions with ``index_add_`` / ``scatter_reduce_`` over a dense
group index, never a Python loop over groups. No gradient. Arithmetic in fp32 (fp64 for fp64 rewards).

Shapes: ``rewards [B]`` or ``[B, R]`` (NaN = "this reward function did not score this completion"); groups
given by ``group_size`` (contiguous blocks, TRL layout) or ``group_ids [B]`` (arbitrary ids, verl ``uid``
layout; output in input order). Output ``Advantages(advantages, group_mean, group_std, zero_std_rows,
num_rows)`` with ``advantages [B]`` fp32 (``[B, T]`` / ``[N]`` per token for ``reinforce_plus_plus`` with
gamma != 1).

Estimators, with the trainer code each one mirrors (V_g = scorable members of group g, n_g = |V_g|, mu_g their
mean, sigma_g their Bessel std):

* ``grpo``: (r - mu_g) / (sigma + eps), sigma = sigma_g (``scale="group"``), the batch std (``"batch"``) or no
  division (``"none"``). GRPO: Shao et al. 2024, DeepSeekMath, arXiv:2402.03300. Mirrors TRL 1.16
  ``GRPOTrainer._generate_and_score_completions`` (``scale_rewards`` group/batch/none, eps 1e-4; batch scaling
  from Liu et al. 2025, "Tricks or Traps?", arXiv:2508.08221) and verl 0.9.1
  ``core_algos.compute_grpo_outcome_advantage`` (eps 1e-6, ``norm_adv_by_std_in_grpo``).
* ``dr_grpo``: ``grpo`` with ``scale="none"``. Dr. GRPO: Liu et al. 2025, arXiv:2503.20783.
* ``rloo``: n_g / (n_g - 1) (r_i - mu_g), the leave-one-out baseline. Ahmadian et al. 2024, arXiv:2402.14740;
  verl ``compute_rloo_outcome_advantage`` / ``compute_rloo_vectorized_outcome_advantage``.
* ``reinforce_plus_plus_baseline``: r_i - mu_g, then token-weighted whitening over the batch
  (docs/ops.md 4.3). REINFORCE++: Hu 2025, arXiv:2501.03262; verl
  ``compute_reinforce_plus_plus_baseline_outcome_advantage``.
* ``reinforce_plus_plus``: gamma = 1: whitening of r. gamma != 1: per-token discounted returns G_{i,t} =
  gamma^{k(t)} r_i (k(t) = valid tokens of row i after t; masked tokens carry the return unchanged), whitened
  over all valid tokens. verl 0.9.1 ``compute_reinforce_plus_plus_outcome_advantage``.
* ``gpg``: alpha (r_i - mu_g) / f_norm, alpha = B_eff / max(1, #{r_i != 0}). Chu et al. 2025, GPG,
  arXiv:2504.02546; verl ``compute_gpg_outcome_advantage``.
* ``opo``: r_i - b_g with the length-weighted baseline b_g = sum l_j r_j / sum l_j. Hao et al. 2025, OPO,
  arXiv:2505.23585; verl ``compute_opo_outcome_advantage`` (where verl divides 0 by 0 we use b_g = 0).

Several reward functions (docs/ops.md 4.1): ``sum_then_normalize`` (TRL default) sums the weighted rewards
first; ``normalize_then_sum`` is GDPO (arXiv:2601.05242): each function is normalised within its group, the
weighted sum is then normalised over the batch, TRL-style (``gdpo_final="trl"``) or verl-style whitening
(``"verl"``, verl 0.9.1 ``compute_gdpo_outcome_advantage``).

Numerics. Every group statistic is computed on rewards shifted by a per-group reference value (the group
maximum), mean first then squared deviations (two passes): a group of equal rewards gets exactly zero
advantages and exactly zero std, and a large common offset does not cost precision. The whitening is shifted
the same way while keeping verl's exact formula (its ``W + 1e-8`` denominators included).

Determinism: on CPU every reduction is sequential and the result is bitwise reproducible. On CUDA
``index_add_`` accumulates with atomics; run under ``torch.use_deterministic_algorithms(True)`` for
bitwise-reproducible output.

Known limits: the op is local (groups must be complete on this process; TRL gathers rewards across processes
before normalising, and so must the caller). With ``validate=False`` the checks that need a host sync (±inf
rewards, NaN under ``nan_policy="raise"``, whitening weight W <= 1) are skipped and those inputs give
undefined results; the only remaining sync is the output size of the packed per-token layout without
``token_mask``.
"""

from __future__ import annotations

import logging
from typing import NamedTuple

import torch

__all__ = ["Advantages", "group_advantages_reference", "advantage_preset", "ESTIMATORS", "ZERO_STD_ATOL"]

logger = logging.getLogger("reasonrl")

ESTIMATORS = ("grpo", "dr_grpo", "rloo", "reinforce_plus_plus", "reinforce_plus_plus_baseline", "gpg", "opo")
WHITENING_ESTIMATORS = ("reinforce_plus_plus", "reinforce_plus_plus_baseline")

#: |sigma| <= ZERO_STD_ATOL counts a row in ``zero_std_rows``: TRL's ``torch.isclose(std, 0)`` (atol 1e-8).
ZERO_STD_ATOL = 1e-8
#: The constant verl's ``masked_mean`` adds to the mask sum (``mask.sum() + 1e-8``); part of the 4.3 formula.
_WHITEN_COUNT_EPS = 1e-8

_PRESETS = {
    "trl": {"eps": 1e-4, "singleton": "zero", "nan_policy": "missing", "gdpo_final": "trl"},
    "verl": {"eps": 1e-6, "singleton": "verl", "nan_policy": "raise", "gdpo_final": "verl"},
}


def advantage_preset(name: str) -> dict:
    """Keyword arguments of ``group_advantages`` that reproduce a trainer (docs/ops.md 4.2 preset table).

    ``"trl"``: eps 1e-4, singleton "zero", nan_policy "missing", gdpo_final "trl" (TRL 1.16 GRPOTrainer).
    ``"verl"``: eps 1e-6, singleton "verl", nan_policy "raise", gdpo_final "verl" (verl 0.9.1 core_algos).
    Returns a new dict on every call.
    """
    if name not in _PRESETS:
        raise ValueError(f"advantage_preset: name must be one of {tuple(_PRESETS)}, got {name!r}")
    return dict(_PRESETS[name])


class Advantages(NamedTuple):
    """Outputs of ``group_advantages``.

    advantages: ``[B]`` (``[B, T]`` or ``[N]`` for ``reinforce_plus_plus`` with gamma != 1), fp32 (fp64 for
        fp64 rewards); always finite; 0 for unscorable (NaN) rows and for masked tokens.
    group_mean, group_std: ``[B]``, the statistics each row was normalised with, broadcast to every row of the
        group (unscorable rows included); NaN where undefined. See ``group_advantages_reference`` for which
        statistics each estimator reports.
    zero_std_rows: 0-d int64 tensor, number of rows with ``|group_std| <= 1e-8`` (NaN does not count).
    num_rows: B, so that TRL's ``frac_reward_zero_std`` is ``zero_std_rows / num_rows``.
    """

    advantages: torch.Tensor
    group_mean: torch.Tensor
    group_std: torch.Tensor
    zero_std_rows: torch.Tensor
    num_rows: int


# ----------------------------------------------------------------------------------------------------------
# Segment machinery
# ----------------------------------------------------------------------------------------------------------


def _dense_segments(
    num_rows: int, group_size: int | None, group_ids: torch.Tensor | None, device: torch.device
) -> tuple[torch.Tensor, int]:
    """Dense group index ``seg [B]`` (int64) and an upper bound S on the number of groups.

    ``group_ids`` are compacted by a stable sort and a cumulative sum of "new id" flags rather than
    ``torch.unique``: no host sync (the number of groups is data dependent, the bound S = B is not); segments
    that no row maps to stay empty and are never read back.
    """
    if group_size is not None:
        return torch.arange(num_rows, device=device) // group_size, num_rows // group_size
    ids = group_ids.reshape(-1)
    sorted_ids, order = torch.sort(ids, stable=True)
    new_group = torch.ones(num_rows, dtype=torch.long, device=device)
    new_group[1:] = (sorted_ids[1:] != sorted_ids[:-1]).long()
    dense_sorted = torch.cumsum(new_group, 0) - 1
    seg = torch.empty_like(dense_sorted).scatter_(0, order, dense_sorted)
    return seg, num_rows


def _segment_sum(x: torch.Tensor, seg: torch.Tensor, num_segments: int) -> torch.Tensor:
    return x.new_zeros((num_segments,) + tuple(x.shape[1:])).index_add_(0, seg, x)


def _segment_max(x: torch.Tensor, valid: torch.Tensor, seg: torch.Tensor, num_segments: int) -> torch.Tensor:
    """Per-segment max of the valid entries of ``x [B, C]``; 0 for a segment with no valid entry."""
    neg_inf = torch.full((), float("-inf"), dtype=x.dtype, device=x.device)
    out = torch.full((num_segments, x.shape[1]), float("-inf"), dtype=x.dtype, device=x.device)
    out.scatter_reduce_(0, seg[:, None].expand_as(x), torch.where(valid, x, neg_inf), reduce="amax")
    return torch.where(torch.isfinite(out), out, torch.zeros_like(out))


class _Stats(NamedTuple):
    count: torch.Tensor  # [S, C] scorable members n_g
    mean: torch.Tensor  # [S, C] mu_g; NaN when n_g = 0
    std: torch.Tensor  # [S, C] Bessel std; 0 when the group has one row (even an unscorable one), NaN when
    #                    it has several rows but n_g <= 1 (TRL: nanstd is NaN, torch.zeros when G = 1)
    centred: torch.Tensor  # [B, C] r_i - mu_g on valid entries, exactly 0 elsewhere


def _group_stats(
    x: torch.Tensor, valid: torch.Tensor, seg: torch.Tensor, num_segments: int, members: torch.Tensor
) -> _Stats:
    """NaN-aware group mean / Bessel std of the columns of ``x [B, C]`` (``valid`` marks scorable entries).

    ``members [S]``: rows per group, unscorable rows included (decides std = 0 versus NaN when n_g <= 1).
    """
    ref = _segment_max(x, valid, seg, num_segments)
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    d = torch.where(valid, x - ref[seg], zero)
    count = _segment_sum(valid.to(x.dtype), seg, num_segments)
    mean_d = _segment_sum(d, seg, num_segments) / count.clamp(min=1)
    centred = torch.where(valid, d - mean_d[seg], zero)
    var = _segment_sum(centred * centred, seg, num_segments) / (count - 1).clamp(min=1)
    nan = torch.full((), float("nan"), dtype=x.dtype, device=x.device)
    one_row = (members == 1)[:, None]
    std = torch.where(count >= 2, var.sqrt(), torch.where(one_row, zero, nan))
    mean = torch.where(count >= 1, ref + mean_d, nan)
    return _Stats(count, mean, std, centred)


def _safe_div(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """num / den where den > 0, else 0 (den = 0 only with eps = 0 and a zero std, where num is exactly 0)."""
    return torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)), torch.zeros_like(num))


# ----------------------------------------------------------------------------------------------------------
# Estimators
# ----------------------------------------------------------------------------------------------------------


def _grpo(x, valid, seg, num_segments, members, *, scale, eps, singleton):
    """GRPO on each column of ``x [B, C]``. Returns advantages (0 on invalid entries), row mean, row std."""
    st = _group_stats(x, valid, seg, num_segments, members)
    single = (st.count <= 1)[seg]
    if scale == "batch":
        zero_seg = torch.zeros_like(seg)
        batch = _group_stats(x, valid, zero_seg, 1, members.new_full((1,), x.shape[0]))
        sigma_row = batch.std[zero_seg]
    else:
        sigma_row = st.std[seg]
    mean_row = st.mean[seg]
    adv = st.centred if scale == "none" else _safe_div(st.centred, sigma_row + eps)
    if singleton == "zero":
        adv = torch.where(single, torch.zeros_like(adv), adv)
    else:  # verl: mean 0, std 1 for a group with one (scorable) member
        adv = torch.where(single, x if scale == "none" else x / (1.0 + eps), adv)
        mean_row = torch.where(single, torch.zeros_like(mean_row), mean_row)
        sigma_row = torch.where(single, torch.ones_like(sigma_row), sigma_row)
    adv = torch.where(valid, adv, torch.zeros_like(adv))
    return adv, mean_row, sigma_row


def _whiten(
    a: torch.Tensor,
    weight: torch.Tensor,
    valid: torch.Tensor,
    *,
    whiten_eps: float,
    validate: bool,
    what: str,
):
    """Token-weighted whitening of docs/ops.md 4.3 (verl ``masked_whiten``) of ``a [M]`` with weights
    ``weight [M]`` over the ``valid`` entries. Returns (whitened a, 0 on invalid entries; mu_w; sqrt(v)),
    the last two 0-d.

    Computed on ``d = a - ref`` (ref = max valid a). Exactly the 4.3 formula, rearranged:
    mu_w = (sum w d + ref W) / (W + 1e-8), so a - mu_w = d - sum w d / (W + 1e-8) + ref * 1e-8 / (W + 1e-8).
    """
    zero = torch.zeros((), dtype=a.dtype, device=a.device)
    w = torch.where(valid, weight, zero)
    total = w.sum()
    if validate and bool(total <= 1):
        raise ValueError(
            f"group_advantages: {what} needs a whitening weight W > 1 (docs/ops.md 4.3; verl's masked_var "
            f"raises too), got W = {float(total):g} (the sum of the weights over the scorable rows)"
        )
    ref = torch.where(valid, a, torch.full_like(a, float("-inf"))).max() if a.numel() else zero
    ref = torch.where(torch.isfinite(ref), ref, zero)
    d = torch.where(valid, a - ref, zero)
    denom = total + _WHITEN_COUNT_EPS
    mean_d = (w * d).sum() / denom
    centred = d - mean_d + ref * (_WHITEN_COUNT_EPS / denom)
    var = (w * centred * centred).sum() / denom * (total / (total - 1))
    out = torch.where(valid, centred * torch.rsqrt(var + whiten_eps), zero)
    mu_w = mean_d + ref * (total / denom)
    return out, mu_w, var.clamp(min=0).sqrt()


_warned_unweighted: set[str] = set()


def _row_weights(lengths, rows, dtype, device, what):
    if lengths is not None:
        return lengths.reshape(-1).to(dtype)
    if what not in _warned_unweighted:
        _warned_unweighted.add(what)
        logger.warning(
            "reasonrl.group_advantages: %s whitens with weight 1 per row because lengths=None; verl weights "
            "every row by its number of response tokens (pass lengths= to match verl)",
            what,
        )
    return torch.ones(rows, dtype=dtype, device=device)


def _per_token_returns(r, row_valid, gamma, token_mask, cu_seqlens):
    """Discounted returns G_{i,t} = gamma^{k(t)} r_i (k(t) = valid tokens of row i after t) and the token
    weights (valid tokens of scorable rows), both in the token layout ([B, T] padded or [N] packed)."""
    dtype = r.dtype
    if cu_seqlens is None:  # padded [B, T]
        mask = token_mask.to(torch.bool)
        m = mask.long()
        after = m.sum(1, keepdim=True) - torch.cumsum(m, 1)
        rows, tok_valid = r[:, None], mask & row_valid[:, None]
    else:  # packed [N]
        cu = cu_seqlens.long()
        n = int(cu[-1]) if token_mask is None else token_mask.shape[0]  # a host sync only without token_mask
        pos = torch.arange(n, device=r.device)
        seg = torch.searchsorted(cu[1:], pos, right=True)
        mask = (
            torch.ones(n, dtype=torch.bool, device=r.device)
            if token_mask is None
            else token_mask.to(torch.bool)
        )
        m = mask.long()
        seg_end = torch.cumsum(_segment_sum(m, seg, r.shape[0]), 0)  # valid tokens up to the end of each row
        after = seg_end[seg] - torch.cumsum(m, 0)
        rows, tok_valid = r[seg], mask & row_valid[seg]
    discount = torch.pow(torch.tensor(gamma, dtype=dtype, device=r.device), after.to(dtype))
    zero = torch.zeros((), dtype=dtype, device=r.device)
    returns = torch.where(tok_valid, discount * torch.where(tok_valid, rows, zero), zero)
    return returns, tok_valid


# ----------------------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------------------


@torch.no_grad()
def group_advantages_reference(
    rewards: torch.Tensor,
    *,
    group_size: int | None = None,
    group_ids: torch.Tensor | None = None,
    estimator: str = "grpo",
    scale: str = "group",
    eps: float = 1e-4,
    reward_weights: torch.Tensor | None = None,
    multi_reward: str = "sum_then_normalize",
    gdpo_final: str = "trl",
    lengths: torch.Tensor | None = None,
    singleton: str = "zero",
    whiten_eps: float = 1e-8,
    gpg_f_norm: float = 1.0,
    gamma: float = 1.0,
    token_mask: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    validate: bool = True,
) -> Advantages:
    """Group-relative advantages (docs/ops.md 4). Arguments as ``reasonrl.ops.group_advantages`` (which checks
    them); NaN rewards are treated as missing (``nan_policy="missing"``; the public op raises for
    ``"raise"``).
    ``validate``: raise ``ValueError`` when a whitening weight W <= 1 (one host sync).

    Reported statistics (``group_mean`` / ``group_std``, broadcast to every row of a group):

    * ``sum_then_normalize``: the group mean mu_g and Bessel std sigma_g of the combined reward (TRL computes
      sigma_g for logging even with ``scale="none"``), except: ``grpo`` with ``scale="batch"`` reports the
      batch std; ``opo`` reports its baseline b_g as the mean; with ``singleton="verl"`` a group with
      n_g <= 1 reports the mean 0 of its baseline, and ``grpo`` / ``dr_grpo`` also report the std 1 they
      divide by.
      A group of one row has std 0 (TRL's G = 1 case); several rows with n_g <= 1 give NaN (TRL's nanstd).
    * ``normalize_then_sum``: the statistics of the final batch normalisation of s: batch mean and Bessel std
      (``gdpo_final="trl"``, as TRL) or the whitening mean mu_w and sqrt(v) (``"verl"``).
    """
    if estimator == "dr_grpo":
        estimator, scale = "grpo", "none"
    dtype = torch.float64 if rewards.dtype == torch.float64 else torch.float32
    device = rewards.device
    x = rewards.detach().to(dtype)
    if x.dim() == 1:
        x = x[:, None]
    num_rows, num_funcs = x.shape
    per_token = estimator == "reinforce_plus_plus" and gamma != 1.0

    if num_rows == 0:
        empty = x.new_empty((0,))
        if per_token:
            shape = token_mask.shape if token_mask is not None else (0,)
            adv = x.new_zeros(shape)
        else:
            adv = empty
        return Advantages(adv, empty, empty.clone(), torch.zeros((), dtype=torch.long, device=device), 0)

    if reward_weights is None:
        w = torch.ones(num_funcs, dtype=dtype, device=device)
    else:
        w = torch.as_tensor(reward_weights).to(device=device, dtype=dtype).reshape(-1)
    seg, num_segments = _dense_segments(num_rows, group_size, group_ids, device)
    members = _segment_sum(torch.ones(num_rows, dtype=torch.long, device=device), seg, num_segments)
    valid_k = ~torch.isnan(x)
    row_valid = valid_k.any(1)  # an unscorable row has every reward NaN
    zero = torch.zeros((), dtype=dtype, device=device)
    nan = torch.full((), float("nan"), dtype=dtype, device=device)

    if multi_reward == "normalize_then_sum":  # GDPO
        if gdpo_final == "trl":  # TRL: per function (R - mu) / (std + eps), std NaN -> skipped, 0 when G = 1
            a_k, _, _ = _grpo(
                x, valid_k, seg, num_segments, members, scale="group", eps=eps, singleton="zero"
            )
        else:  # verl: the grpo estimator per function with the op's eps / scale / singleton rule
            a_k, _, _ = _grpo(
                x, valid_k, seg, num_segments, members, scale=scale, eps=eps, singleton=singleton
            )
        s = (a_k * w).sum(1)  # invalid entries of a_k are 0: the nansum of TRL
        if gdpo_final == "trl":
            zero_seg = torch.zeros_like(seg)
            st = _group_stats(s[:, None], row_valid[:, None], zero_seg, 1, members.new_full((1,), num_rows))
            adv = _safe_div(st.centred, st.std[0] + eps)[:, 0]
            mean_row, std_row = st.mean[0].expand(num_rows), st.std[0].expand(num_rows)
        else:
            omega = _row_weights(lengths, num_rows, dtype, device, "gdpo_final='verl'")
            adv, mu_w, sd = _whiten(
                s, omega, row_valid, whiten_eps=whiten_eps, validate=validate, what="gdpo_final='verl'"
            )
            mean_row, std_row = mu_w.expand(num_rows), sd.expand(num_rows)
        adv = torch.where(row_valid, adv, zero)
        return _finish(adv, mean_row.clone(), std_row.clone(), num_rows)

    # sum_then_normalize: r_i = sum_k w_k R[i, k] over the non-NaN entries, NaN when all are NaN.
    r = torch.where(valid_k, x, zero).mul(w).sum(1)
    r = torch.where(row_valid, r, nan)[:, None]
    valid = row_valid[:, None]

    if estimator == "grpo":
        adv, mean_row, std_row = _grpo(
            r, valid, seg, num_segments, members, scale=scale, eps=eps, singleton=singleton
        )
        return _finish(adv[:, 0], mean_row[:, 0], std_row[:, 0], num_rows)

    st = _group_stats(r, valid, seg, num_segments, members)
    single = (st.count <= 1)[seg]
    mean_row, std_row = st.mean[seg], st.std[seg]
    r0 = torch.where(valid, r, zero)
    if estimator == "rloo":
        n = st.count[seg]
        centred = st.centred * (n / (n - 1).clamp(min=1))
    elif estimator == "gpg":
        b_eff = row_valid.sum().to(dtype)
        nonzero = (row_valid & (r[:, 0] != 0)).sum().to(dtype)
        alpha = b_eff / nonzero.clamp(min=1)
        centred = alpha * st.centred / gpg_f_norm
        r0 = alpha * r0 / gpg_f_norm  # the verl singleton value alpha * r_i / f_norm
    elif estimator == "opo":
        ell = torch.where(valid, lengths.reshape(-1, 1).to(dtype), zero)
        ref = torch.where(st.count >= 1, st.mean, zero)  # shift: b_g = ref + sum l (r - ref) / sum l
        num = _segment_sum(ell * torch.where(valid, r - ref[seg], zero), seg, num_segments)
        den = _segment_sum(ell, seg, num_segments)
        baseline = torch.where(den > 0, ref + _safe_div(num, den), zero)
        centred = torch.where(valid, r - baseline[seg], zero)
        mean_row = baseline[seg]
    elif estimator in WHITENING_ESTIMATORS:
        centred = st.centred if estimator == "reinforce_plus_plus_baseline" else r0
    else:  # pragma: no cover - the public op checks the name
        raise ValueError(f"group_advantages: unknown estimator {estimator!r}")

    if estimator != "reinforce_plus_plus":  # reinforce_plus_plus has no group baseline
        if singleton == "zero":  # baseline r_i: a_i = 0
            centred = torch.where(single, zero, centred)
        else:  # verl: baseline 0, a_i = r_i
            centred = torch.where(single, r0, centred)
            mean_row = torch.where(single, zero, mean_row)
    a = torch.where(valid, centred, zero)[:, 0]
    mean_row, std_row = mean_row[:, 0], std_row[:, 0]

    if estimator not in WHITENING_ESTIMATORS:
        return _finish(a, mean_row, std_row, num_rows)
    if estimator == "reinforce_plus_plus" and gamma != 1.0:
        returns, tok_valid = _per_token_returns(r[:, 0], row_valid, gamma, token_mask, cu_seqlens)
        flat, _, _ = _whiten(
            returns.reshape(-1),
            tok_valid.reshape(-1).to(dtype),
            tok_valid.reshape(-1),
            whiten_eps=whiten_eps,
            validate=validate,
            what="reinforce_plus_plus (per token)",
        )
        return _finish(flat.reshape(returns.shape), mean_row, std_row, num_rows)
    omega = _row_weights(lengths, num_rows, dtype, device, estimator)
    adv, _, _ = _whiten(a, omega, row_valid, whiten_eps=whiten_eps, validate=validate, what=estimator)
    return _finish(adv, mean_row, std_row, num_rows)


def _finish(adv, mean_row, std_row, num_rows) -> Advantages:
    zero_std = (std_row.abs() <= ZERO_STD_ATOL).sum()
    return Advantages(adv, mean_row, std_row, zero_std, num_rows)
