"""Reference ``r3_reward`` (docs/ops.md section 5): DRO's reasoning-reflection reward from reference
log-probs.

Plain PyTorch, written for clarity; THE oracle of the op (the fused C++ and Triton implementations,
reasonrl/ops/r3_reward.py, are tested against this file). Forward only, no autograd. The method and the
choice of defaults: docs/rewards.md section 2.

Input: ``ref_logprobs`` l, the log-probability of reference token j of prompt g teacher-forced after the
reasoning trace of rollout k, in one of two layouts:

* padded: ``[G, K, L]`` with ``ref_mask [G, L]`` (valid reference tokens; default all), ``baseline_logprobs
  [G, L]``; outputs ``weights`` / ``sigma`` ``[G, L]``;
* packed: ``[K, M]`` with ``ref_cu_seqlens [G + 1]`` (prompt g owns columns ``cu[g] .. cu[g+1] - 1``, so the
  reference tokens of all prompts are concatenated without padding), ``baseline_logprobs [M]``; outputs
  ``[M]``.

``rollout_mask [G, K]`` marks the valid rollouts (default all). Outputs ``R3Output(reward [G, K],
weights, sigma, num_valid_rollouts [G] int32)``; ``reward`` is NaN for invalid rollouts and for every rollout
of a prompt without a valid rollout.

Semantics (J_g = valid reference tokens, L_g = |J_g|, n_g = number of valid rollouts):

* sigma_j: population std (ddof 0) of l[., j] over the valid rollouts, two passes (mean, then squared
  deviations), so equal log-probs give exactly 0; sigma = 0 for the whole prompt when
  n_g < min_valid_rollouts.
* weights over J_g: ``linear`` sigma / sum sigma; ``softmax`` softmax(sigma / tau) (max subtracted);
  ``topk`` 1/k_g on the k_g largest sigma (ties to the lower index; k_g = min(L_g, max(1, ceil(topk L_g))) for
  a float topk in (0, 1], min(L_g, topk) for an int); ``uniform`` 1 / L_g. When every sigma of the prompt is 0
  (one valid rollout, identical traces) the weights are uniform for every weighting (docs/rewards.md 2.2:
  the all-zero fallback; for ``linear`` the op contract says so, and for ``topk`` the tie rule would
  otherwise pick the first k_g reference tokens for no reason).
* per-token term u = l + P - b: b = ``baseline_logprobs`` (0 if absent); P = 0 unless ``propagation_gamma``
  gamma is set, then P[k, j] = sum over reflective a < j of log(1 - (1 - p_a) exp(-gamma (j - a))),
  p_a = exp(l[k, a]), computed as log1p(expm1(l_a) exp(-gamma d)) (exact for p near 1 and near 0). Positions
  are indices within J_g. The reflective set S_g is the top-k_g set of sigma (same k_g as ``topk``), and empty
  when every sigma is 0 (no token varies across traces, so none is reflective).
* reward: ``weighted_mean`` sum_j w_j u_j; ``sum`` L_g * sum_j w_j u_j (uniform + sum = DRO-Aggr, sum_j l_j).

Values of invalid rollouts and invalid tokens are never read (selected away with ``torch.where``, so NaN or
garbage there cannot leak). NaN at a valid position propagates to the prompt's sigma and rewards.

Precision: fp32 internals for fp32 / bf16 / fp16 input, fp64 for fp64 input or ``compute_dtype=float64``
(the oracle, docs/ops.md section 8). Outputs in the compute dtype.

Memory: O(G K L) (padded) plus, with propagation, one ``[G, K, chunk, L]`` block at a time (chunked over the
query position j so the pairwise term stays under ~16M elements).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from reasonrl.reference.layout import check_cu_seqlens

__all__ = ["R3Output", "r3_reward_reference", "WEIGHTINGS", "REDUCTIONS", "resolve_topk"]

WEIGHTINGS = ("linear", "softmax", "topk", "uniform")
REDUCTIONS = ("weighted_mean", "sum")
_OP = "r3_reward"
# Upper bound on the elements of one pairwise propagation block [G, K, chunk, L].
_PAIR_BLOCK = 1 << 24


class R3Output(NamedTuple):
    """``reward [G, K]`` (NaN for invalid rollouts), ``weights`` and ``sigma`` (``[G, L]`` or ``[M]``, 0 on
    invalid tokens), ``num_valid_rollouts [G]`` int32."""

    reward: torch.Tensor
    weights: torch.Tensor
    sigma: torch.Tensor
    num_valid_rollouts: torch.Tensor


def resolve_topk(topk: float | int, lengths: torch.Tensor) -> torch.Tensor:
    """k_g for every prompt: ``min(L_g, max(1, ceil(topk * L_g)))`` for a float in (0, 1], ``min(L_g, topk)``
    for an int >= 1. ``lengths`` is the int64 ``[G]`` tensor of L_g."""
    if isinstance(topk, int):
        return lengths.clamp(max=topk)
    # ceil in float64 on the exact product: 0.1 * 30 = 3.0000000000000004 in binary; the spec means 3.
    k = torch.ceil(lengths.to(torch.float64) * topk - 1e-9).to(torch.int64)
    return torch.minimum(lengths, k.clamp(min=1))


def _check_options(weighting, softmax_tau, topk, reduction, propagation_gamma, min_valid_rollouts):
    if weighting not in WEIGHTINGS:
        raise ValueError(f"{_OP}: weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"{_OP}: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if isinstance(softmax_tau, bool) or not isinstance(softmax_tau, (int, float)) or not (
            math.isfinite(softmax_tau) and softmax_tau > 0):
        raise ValueError(f"{_OP}: softmax_tau must be a finite number > 0, got {softmax_tau!r}")
    if isinstance(topk, bool) or not isinstance(topk, (int, float)):
        raise ValueError(f"{_OP}: topk must be a float in (0, 1] or an int >= 1, got {topk!r}")
    if isinstance(topk, int) and topk < 1:
        raise ValueError(f"{_OP}: topk as an int must be >= 1, got {topk}")
    if isinstance(topk, float) and not (0.0 < topk <= 1.0):
        raise ValueError(f"{_OP}: topk as a float must be in (0, 1], got {topk}")
    if propagation_gamma is not None and (
            isinstance(propagation_gamma, bool) or not isinstance(propagation_gamma, (int, float))
            or not (math.isfinite(propagation_gamma) and propagation_gamma >= 0)):
        raise ValueError(f"{_OP}: propagation_gamma must be None or a finite number >= 0, got "
                         f"{propagation_gamma!r}")
    mvr = min_valid_rollouts
    if isinstance(mvr, bool) or not isinstance(mvr, int) or mvr < 1:
        raise ValueError(f"{_OP}: min_valid_rollouts must be an int >= 1, got {min_valid_rollouts!r}")


def _as_bool_mask(mask: torch.Tensor, name: str, shape: tuple, validate: bool) -> torch.Tensor:
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{_OP}: {name} must be a tensor, got {type(mask).__name__}")
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"{_OP}: {name}: expected shape {tuple(shape)}, got {tuple(mask.shape)}")
    if mask.dtype == torch.bool:
        return mask
    if mask.is_complex():
        raise TypeError(f"{_OP}: {name} must be bool or hold only 0 and 1, got {mask.dtype}")
    if validate and bool(((mask != 0) & (mask != 1)).any()):
        raise ValueError(f"{_OP}: {name} must hold only 0 and 1 (or be bool)")
    return mask != 0


def check_r3_args(ref_logprobs, baseline_logprobs, weighting, softmax_tau, topk, reduction, propagation_gamma,
                  min_valid_rollouts) -> None:
    """The checks every implementation makes before it looks at the layout (docs/ops.md section 7): the
    options, then the types of the log-prob tensors."""
    _check_options(weighting, softmax_tau, topk, reduction, propagation_gamma, min_valid_rollouts)
    if not isinstance(ref_logprobs, torch.Tensor) or not ref_logprobs.is_floating_point():
        raise TypeError(f"{_OP}: ref_logprobs must be a floating-point tensor, got "
                        f"{getattr(ref_logprobs, 'dtype', type(ref_logprobs).__name__)}")
    if baseline_logprobs is not None and (not isinstance(baseline_logprobs, torch.Tensor)
                                          or not baseline_logprobs.is_floating_point()):
        raise TypeError(f"{_OP}: baseline_logprobs must be a floating-point tensor or None")


def check_r3_layout(lp: torch.Tensor, base: torch.Tensor | None, ref_mask, ref_cu_seqlens, rollout_mask,
                    validate: bool):
    """The layout checks of every implementation, on ``lp`` (``ref_logprobs``) and ``base``
    (``baseline_logprobs`` on lp's device, or None): shapes always, and with ``validate`` the values that need
    a host sync (mask values, offsets, a prompt with no valid reference token).

    Returns ``(cu, mask, roll, lengths)``: the packed layout has the offsets ``cu [G + 1]`` int64 and no mask,
    the padded one a ``mask [G, L]`` bool (all valid by default) and no offsets; ``roll [G, K]`` bool; the
    lengths L_g ``[G]`` int64. Masks and offsets are contiguous, on lp's device, as the kernels take them."""
    dev = lp.device
    if ref_cu_seqlens is not None:
        if ref_mask is not None:
            raise ValueError(f"{_OP}: ref_mask is for the padded layout [G, K, L]; the packed layout "
                             "(ref_cu_seqlens given) has exact segments and takes no ref_mask")
        if lp.dim() != 2:
            raise ValueError(f"{_OP}: ref_logprobs: the packed layout (ref_cu_seqlens given) needs [K, M], "
                             f"got shape {tuple(lp.shape)}")
        k, m = lp.shape
        cu = check_cu_seqlens(ref_cu_seqlens, m, op=_OP, name="ref_cu_seqlens", validate=validate, device=dev,
                              total_name="M = ref_logprobs.shape[1]").contiguous()
        g = cu.numel() - 1
        if base is not None and tuple(base.shape) != (m,):
            raise ValueError(f"{_OP}: baseline_logprobs: expected shape ({m},) = [M] (packed), got "
                             f"{tuple(base.shape)}")
        lengths = cu.diff()
        mask = None
        where = "ref_cu_seqlens"
    else:
        if lp.dim() != 3:
            raise ValueError(f"{_OP}: ref_logprobs: expected [G, K, L] (padded) or [K, M] with "
                             f"ref_cu_seqlens (packed), got shape {tuple(lp.shape)}")
        g, k, width = lp.shape
        mask = (torch.ones((g, width), dtype=torch.bool, device=dev) if ref_mask is None
                else _as_bool_mask(ref_mask, "ref_mask", (g, width), validate).to(dev).contiguous())
        if base is not None and tuple(base.shape) != (g, width):
            raise ValueError(f"{_OP}: baseline_logprobs: expected shape {(g, width)} = [G, L] (padded), got "
                             f"{tuple(base.shape)}")
        lengths = mask.sum(dim=1)
        cu = None
        where = "ref_mask"
    roll = (torch.ones((g, k), dtype=torch.bool, device=dev) if rollout_mask is None
            else _as_bool_mask(rollout_mask, "rollout_mask", (g, k), validate).to(dev).contiguous())
    if validate and g > 0 and bool((lengths == 0).any()):
        first = int((lengths == 0).nonzero()[0, 0])
        raise ValueError(f"{_OP}: prompt {first} has no valid reference token ({where}); every prompt needs "
                         "L_g >= 1")
    return cu, mask, roll, lengths


def _packed_to_padded(lp: torch.Tensor, cu: torch.Tensor, baseline: torch.Tensor | None):
    """[K, M] + the checked offsets cu [G+1] (int64, :func:`check_r3_layout`) -> ([G, K, L], mask [G, L],
    baseline [G, L] | None, (seg, pos) to scatter back)."""
    k, m = lp.shape
    g = cu.numel() - 1
    lengths = cu.diff()
    width = int(lengths.max()) if g > 0 else 0
    seg = torch.searchsorted(cu[1:], torch.arange(m, device=lp.device), right=True)
    pos = torch.arange(m, device=lp.device) - cu[seg]
    padded = lp.new_zeros((g, k, width))
    padded[seg, :, pos] = lp.T
    mask = torch.zeros((g, width), dtype=torch.bool, device=lp.device)
    mask[seg, pos] = True
    base = None
    if baseline is not None:
        base = baseline.new_zeros((g, width))
        base[seg, pos] = baseline
    return padded, mask, base, (seg, pos)


def r3_reward_reference(
    ref_logprobs: torch.Tensor,
    *,
    ref_mask: torch.Tensor | None = None,
    ref_cu_seqlens: torch.Tensor | None = None,
    rollout_mask: torch.Tensor | None = None,
    weighting: str = "linear",
    softmax_tau: float = 1.0,
    topk: float | int = 0.1,
    reduction: str = "weighted_mean",
    baseline_logprobs: torch.Tensor | None = None,
    propagation_gamma: float | None = None,
    min_valid_rollouts: int = 2,
    validate: bool = True,
    compute_dtype: torch.dtype | None = None,
) -> R3Output:
    """R3 rewards of K rollouts per prompt from the reference outcome's log-probs (docs/ops.md section 5).

    Args:
        ref_logprobs: ``[G, K, L]`` (padded) or ``[K, M]`` with ``ref_cu_seqlens`` (packed), float.
        ref_mask: padded only: ``[G, L]`` bool (or 0/1) valid reference tokens; default all valid.
        ref_cu_seqlens: packed only: ``[G + 1]`` int32/int64 offsets of each prompt's reference tokens.
        rollout_mask: ``[G, K]`` bool (or 0/1) valid rollouts; default all valid.
        weighting: ``"linear" | "softmax" | "topk" | "uniform"``.
        softmax_tau: temperature of ``softmax`` weighting (> 0).
        topk: float in (0, 1] (fraction of L_g, rounded up, at least 1) or int >= 1; used by ``topk``
            weighting and as the size of the reflective set of the propagation form.
        reduction: ``"weighted_mean"`` (sum w u) or ``"sum"`` (L_g sum w u).
        baseline_logprobs: ``[G, L]`` / ``[M]`` masked-reasoning log-probs subtracted per token, or None.
        propagation_gamma: decay gamma >= 0 of the controlled-certainty-propagation form, or None (off).
        min_valid_rollouts: prompts with fewer valid rollouts get sigma = 0 (uniform weights).
        validate: check mask values, offsets and empty references (host syncs).
        compute_dtype: float32 (default; float64 for float64 input) or float64 (the oracle).

    Returns:
        ``R3Output(reward [G, K], weights, sigma, num_valid_rollouts [G] int32)``.

    Raises:
        ValueError: bad shapes or options (the message names the argument), a prompt with no valid reference
            token (``validate=True``; otherwise its rewards are NaN), both or neither layout hints misused.
        TypeError: non-floating ``ref_logprobs`` / ``baseline_logprobs``.
    """
    check_r3_args(ref_logprobs, baseline_logprobs, weighting, softmax_tau, topk, reduction, propagation_gamma,
                  min_valid_rollouts)
    if compute_dtype is None:
        compute_dtype = torch.float64 if ref_logprobs.dtype == torch.float64 else torch.float32
    if compute_dtype not in (torch.float32, torch.float64):
        raise ValueError(f"{_OP}: compute_dtype must be torch.float32 or torch.float64, got {compute_dtype}")
    lp = ref_logprobs.detach().to(compute_dtype)
    base = None if baseline_logprobs is None else baseline_logprobs.detach().to(device=lp.device,
                                                                                  dtype=compute_dtype)
    cu, tok_mask, roll, lengths = check_r3_layout(lp, base, ref_mask, ref_cu_seqlens, rollout_mask, validate)
    packed = cu is not None
    if packed:
        lp, tok_mask, base, scatter = _packed_to_padded(lp, cu, base)
    g, k, width = lp.shape  # lengths: L_g, int64
    n_valid = roll.sum(dim=1)  # n_g
    zero = lp.new_zeros(())
    both = roll[:, :, None] & tok_mask[:, None, :]  # [G, K, L] entries that are read
    lp_v = torch.where(both, lp, zero)

    # sigma: two-pass population std over valid rollouts (ddof 0).
    n_f = n_valid.to(compute_dtype).clamp(min=1)[:, None]
    mean = lp_v.sum(dim=1) / n_f
    dev = torch.where(both, lp - mean[:, None, :], zero)
    sigma = torch.sqrt((dev * dev).sum(dim=1) / n_f)
    sigma = torch.where(tok_mask & (n_valid >= min_valid_rollouts)[:, None], sigma, zero)

    # Weights over J_g. all_zero -> uniform fallback for every weighting.
    len_f = lengths.to(compute_dtype).clamp(min=1)[:, None]
    uniform = torch.where(tok_mask, 1.0 / len_f, zero)
    sig_sum = sigma.sum(dim=1, keepdim=True)
    all_zero = sig_sum == 0  # [G, 1]
    k_g = resolve_topk(topk, lengths)
    # Rank of each valid token by sigma, descending, ties to the lower index (stable sort); invalid last.
    key = torch.where(tok_mask, sigma, torch.full((), -math.inf, dtype=compute_dtype, device=lp.device))
    order = torch.sort(key, dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(width, device=lp.device).expand(g, width))
    top_set = tok_mask & (rank < k_g[:, None]) & ~all_zero
    if weighting == "uniform":
        w = uniform
    elif weighting == "linear":
        w = torch.where(all_zero, uniform, sigma / torch.where(all_zero, 1.0, sig_sum))
    elif weighting == "softmax":
        z = torch.where(tok_mask, sigma / softmax_tau, key)
        z = z - z.amax(dim=1, keepdim=True).clamp(min=0)  # sigma >= 0 and every row has a valid token
        e = torch.where(tok_mask, torch.exp(z), zero)
        denom = e.sum(dim=1, keepdim=True).clamp(min=torch.finfo(compute_dtype).tiny)
        w = torch.where(all_zero, uniform, e / denom)
    else:  # topk
        inv_k = 1.0 / k_g.to(compute_dtype).clamp(min=1)[:, None]
        w = torch.where(all_zero, uniform, torch.where(top_set, inv_k, zero))

    u = lp_v
    if base is not None:
        u = u - torch.where(tok_mask, base, zero)[:, None, :]
    if propagation_gamma is not None:
        u = u + _propagation(lp_v, tok_mask, top_set, float(propagation_gamma))
    r = (w[:, None, :] * torch.where(both, u, zero)).sum(dim=2)
    if reduction == "sum":
        r = r * lengths.to(compute_dtype)[:, None]
    nan = torch.full((), math.nan, dtype=compute_dtype, device=lp.device)
    r = torch.where(roll & (lengths > 0)[:, None], r, nan)

    if packed:
        seg, pos = scatter
        w, sigma = w[seg, pos], sigma[seg, pos]
    return R3Output(r, w, sigma, n_valid.to(torch.int32))


def _propagation(lp: torch.Tensor, tok_mask: torch.Tensor, reflective: torch.Tensor,
                 gamma: float) -> torch.Tensor:
    """P[g, k, j] = sum_{a in S_g, a < j} log1p(expm1(l[g, k, a]) * exp(-gamma (j - a))), positions in J_g.

    log(1 - (1 - p) e^{-gamma d}) with 1 - p = -expm1(l): log1p keeps it exact when the product is tiny (p
    near 1 or large d), expm1 keeps 1 - p exact when p is near 1. Chunked over j to bound the [.., j, a]
    block.
    """
    g, k, width = lp.shape
    idx = (tok_mask.cumsum(dim=1) - 1).to(lp.dtype)  # position within J_g
    em1 = torch.expm1(lp)  # [G, K, L]; lp is 0 (not read) off the valid entries
    out = torch.zeros_like(lp)
    chunk = max(1, _PAIR_BLOCK // max(1, g * k * width))
    zero = lp.new_zeros(())
    for j0 in range(0, width, chunk):
        j1 = min(width, j0 + chunk)
        d = idx[:, j0:j1, None] - idx[:, None, :]  # [G, J, A]: j - a
        pair = reflective[:, None, :] & tok_mask[:, j0:j1, None] & (d > 0)
        decay = torch.exp(-gamma * torch.where(pair, d, zero))  # [G, J, A]
        term = torch.log1p(em1[:, :, None, :] * decay[:, None, :, :])  # [G, K, J, A]
        out[:, :, j0:j1] = torch.where(pair[:, None], term, zero).sum(dim=3)
    return out
