"""Reference implementation of the GRPO-family policy loss (docs/losses.md sections 5-12): plain PyTorch.

This is THE oracle the fused kernels are tested against: every variant is written as the formula of the
spec, and gradients come from ordinary autograd. Run it in float64 (float64 ``logprobs``) for the oracle
of docs/ops.md section 8; otherwise the arithmetic is float32 whatever the input dtype.

Inputs are per-token log-probabilities in one of the two layouts of docs/ops.md section 1:

* padded: ``logprobs [B, T]`` with an optional ``mask [B, T]`` (None: every token counts);
* packed: ``logprobs [N]`` with ``cu_seqlens [B + 1]`` and an optional ``mask [N]``.

Internally both are flattened to ``[N]`` tokens with a sequence id per token; per-sequence quantities
(GSPO weights, off-policy statistics, VESPO weights, per-sequence normalisers) are segment sums
(``index_add``), and a per-sequence tensor is broadcast to its tokens by indexing. Nothing synchronises
with the host (no ``.item()``, no boolean indexing), except the explicit ``process_group`` paths of the
two public utilities.

Masked positions never reach the loss: every per-token input is replaced by 0 there (``torch.where``,
which also gives them a zero gradient), so padding may hold anything, NaN included. The only exception
is VESPO, whose sum of log IS weights runs over every position of a sequence, as in TRL (section 7).

Known limits: the top-entropy quantile inside :func:`policy_loss_reference` is taken over the local
micro-batch (pass ``process_group`` to :func:`top_entropy_mask` for the all-rank quantile of section 8.2),
and ``batch_normalize`` of rollout weights computed inside the loss is local too (precompute them with
:func:`rollout_is_weights` and a ``process_group``, then pass ``is_weights``).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from reasonrl.loss_config import CLIP_FAMILY, ISCorrection, LossNormalizers, PolicyLossConfig
from reasonrl.loss_types import Extreme, LossMetrics, LossOutput, RolloutISMetrics, Sum

__all__ = ["policy_loss_reference", "rollout_is_weights", "top_entropy_mask", "LossInputs", "loss_inputs",
           "loss_from_inputs"]

_INF = float("inf")


# ----------------------------------------------------------------------------------------------------------
# Layouts
# ----------------------------------------------------------------------------------------------------------


class _Segments(NamedTuple):
    """Token layout flattened to ``[N]``: sequence id and validity of each token."""

    seg: torch.Tensor  # [N] int64, sequence of each token
    num_seqs: int  # B, empty sequences included
    valid: torch.Tensor  # [N] bool
    n: torch.Tensor  # [B] valid tokens per sequence (compute dtype)
    width: int | torch.Tensor  # T of the padded layout, longest segment of the packed one
    shape: torch.Size  # token shape of the caller: [B, T] or [N]

    def seq_sum(self, x: torch.Tensor) -> torch.Tensor:
        """Per-sequence sum ``[B]`` of a per-token ``[N]`` tensor (differentiable)."""
        return x.new_zeros(self.num_seqs).index_add(0, self.seg, x)

    def masked(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` with 0 at masked tokens (value and gradient)."""
        return torch.where(self.valid, x, torch.zeros((), dtype=x.dtype, device=x.device))


def _segments(tokens: torch.Tensor, mask: torch.Tensor | None, cu_seqlens: torch.Tensor | None,
              dtype: torch.dtype, name: str = "logprobs") -> _Segments:
    device = tokens.device
    if cu_seqlens is None:
        if tokens.dim() != 2:
            raise ValueError(
                f"{name}: expected [B, T] (padded layout, optional mask [B, T]) or [N] with cu_seqlens "
                f"(packed layout), got shape {tuple(tokens.shape)} without cu_seqlens"
            )
        num_seqs, width = tokens.shape
        seg = torch.arange(num_seqs, device=device).repeat_interleave(width)
    else:
        if tokens.dim() != 1:
            raise ValueError(f"{name}: the packed layout (cu_seqlens given) needs [N], got "
                             f"{tuple(tokens.shape)}")
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
            raise ValueError(f"cu_seqlens: expected [B + 1] with B >= 0, got shape {tuple(cu_seqlens.shape)}")
        if cu_seqlens.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"cu_seqlens: expected int32 or int64, got {cu_seqlens.dtype}")
        cu = cu_seqlens.to(device=device, dtype=torch.int64)
        num_seqs = cu.numel() - 1
        # Row r belongs to the unique b with cu[b] <= r < cu[b + 1]; empty segments are skipped naturally.
        seg = torch.searchsorted(cu[1:], torch.arange(tokens.shape[0], device=device), right=True)
        lengths = torch.cat([cu.diff(), cu.new_zeros(1)])  # the 0 keeps amax defined for B = 0
        width = lengths.amax()
    if mask is None:
        valid = torch.ones(tokens.numel(), dtype=torch.bool, device=device)
    else:
        if mask.shape != tokens.shape:
            raise ValueError(f"mask: expected shape {tuple(tokens.shape)} (as {name}), got "
                             f"{tuple(mask.shape)}")
        valid = mask.reshape(-1).to(device=device).bool()
    n = torch.zeros(num_seqs, dtype=dtype, device=device).index_add(0, seg, valid.to(dtype))
    return _Segments(seg, num_seqs, valid, n, width, tokens.shape)


def _per_token(x: torch.Tensor | None, name: str, s: _Segments, dtype: torch.dtype) -> torch.Tensor | None:
    if x is None:
        return None
    if x.shape != s.shape:
        raise ValueError(f"{name}: expected shape {tuple(s.shape)} (as logprobs), got {tuple(x.shape)}")
    return x.reshape(-1).to(dtype)


def _per_seq_or_token(x: torch.Tensor, name: str, s: _Segments, dtype: torch.dtype
                      ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(per-token [N] values, per-sequence [B] values or None). A tensor with the token shape is per token
    (in the packed layout with N == B this takes precedence); a ``[B]`` tensor is per sequence."""
    if x.shape == s.shape:
        return x.reshape(-1).to(dtype), None
    if x.shape == (s.num_seqs,):
        x_seq = x.to(dtype)
        return x_seq[s.seg], x_seq
    raise ValueError(f"{name}: expected [B] = ({s.num_seqs},) or the token shape {tuple(s.shape)}, "
                     f"got {tuple(x.shape)}")


def _select(cond: torch.Tensor, if_true: float, if_false: float, like: torch.Tensor) -> torch.Tensor:
    """Per-element choice between two Python numbers, in the dtype and device of ``like``."""
    return torch.where(cond, torch.full_like(like, if_true), torch.full_like(like, if_false))


# ----------------------------------------------------------------------------------------------------------
# Metric helpers (detached; no host sync)
# ----------------------------------------------------------------------------------------------------------


def _token_sum(x: torch.Tensor, s: _Segments) -> Sum:
    """(sum over valid tokens, number of valid tokens)."""
    x = x.detach()
    dtype = x.dtype if x.is_floating_point() else s.n.dtype
    return Sum(s.masked(x.to(dtype)).sum(), s.valid.to(dtype).sum())


def _seq_sum_all(x_seq: torch.Tensor, s: _Segments) -> Sum:
    """(sum over every sequence, B): a per-sequence metric counts each sequence once, empty ones included."""
    x_seq = x_seq.detach().to(s.n.dtype)
    return Sum(x_seq.sum(), torch.tensor(float(s.num_seqs), dtype=s.n.dtype, device=x_seq.device))


def _extreme(x: torch.Tensor, keep: torch.Tensor | None, op: str) -> Extreme:
    """min / max of ``x`` over ``keep`` (all entries when None); the identity of ``op`` when empty."""
    x = x.detach()
    identity = _INF if op == "min" else -_INF
    if keep is not None:
        x = torch.where(keep, x, torch.full((), identity, dtype=x.dtype, device=x.device))
    x = torch.cat([x.reshape(-1), x.new_full((1,), identity)])
    return Extreme(x.amin() if op == "min" else x.amax(), op)


# ----------------------------------------------------------------------------------------------------------
# Section 8.2: top-entropy token mask
# ----------------------------------------------------------------------------------------------------------


def _top_entropy(h: torch.Tensor, valid: torch.Tensor, rho: float, process_group=None) -> torch.Tensor:
    """e = valid & (H >= theta), theta the linear-interpolation quantile at q = 1 - rho of the valid
    entropies (of all ranks of ``process_group``); all False when there are none."""
    h = h.detach()
    values = torch.where(valid, h, torch.full((), _INF, dtype=h.dtype, device=h.device))
    if process_group is not None:
        values = _all_gather_padded(values, process_group)
    # Valid values first (+inf sentinels last; entropies are finite): the quantile never syncs with the host.
    ordered = values.sort().values
    count = (ordered < _INF).sum().to(h.dtype)
    # Exactly torch.quantile(..., interpolation="linear"): rank = q * (n - 1) in the input dtype, below = the
    # truncated rank, above = its ceiling, theta = lerp(x_below, x_above, rank - below).
    q = torch.tensor(1.0 - rho, dtype=h.dtype, device=h.device)
    rank = (q * (count - 1)).clamp(min=0)
    below = rank.to(torch.int64)
    above = rank.ceil().to(torch.int64)
    ordered = torch.cat([ordered, ordered.new_zeros(1)])  # keeps the gathers in range when n = 0
    theta = torch.lerp(ordered[below], ordered[above], rank - below.to(h.dtype))
    return valid & (h >= theta) & (count > 0)


def _all_gather_padded(values: torch.Tensor, group) -> torch.Tensor:
    """Concatenate the variable-length ``values`` of every rank of ``group`` (padded with +inf)."""
    import torch.distributed as dist

    world = dist.get_world_size(group)
    size = torch.tensor([values.numel()], device=values.device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size, group=group)
    longest = int(torch.stack(sizes).max())  # one host sync, only on this distributed path
    padded = torch.cat([values, values.new_full((longest - values.numel(),), _INF)])
    out = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(out, padded, group=group)
    return torch.cat(out)


def top_entropy_mask(
    entropies: torch.Tensor,
    *,
    rho: float,
    mask: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    process_group=None,
) -> torch.Tensor:
    """Keep the top-``rho`` entropy tokens (TRL's ``get_high_entropy_mask``, docs/losses.md section 8.2).

    Args:
        entropies: ``[B, T]`` (with ``mask``) or ``[N]`` (with ``cu_seqlens`` and an optional ``mask``).
        rho: fraction in [0, 1] to keep; 0 keeps only the tokens at the maximum entropy.
        process_group: if given, the quantile is taken over the valid entropies of all its ranks (two
            all-gathers and one host sync for the longest local set).

    Returns:
        bool tensor of the shape of ``entropies``: valid tokens whose entropy is >= the (1 - rho) quantile.
    """
    if not 0.0 <= rho <= 1.0:
        raise ValueError(f"rho must be in [0, 1], got {rho}")
    dtype = torch.float64 if entropies.dtype == torch.float64 else torch.float32
    s = _segments(entropies, mask, cu_seqlens, dtype, name="entropies")
    e = _top_entropy(entropies.reshape(-1).to(dtype), s.valid, rho, process_group)
    return e.reshape(s.shape)


# ----------------------------------------------------------------------------------------------------------
# Section 8.3: rollout (training / inference mismatch) correction weights
# ----------------------------------------------------------------------------------------------------------


def _rollout_is(old: torch.Tensor, samp: torch.Tensor, s: _Segments, cfg: ISCorrection,
                process_group=None) -> tuple[torch.Tensor, RolloutISMetrics]:
    """Per-token rho ``[N]`` (detached) and its metrics, from flat old / sampling log-probs."""
    old, samp = old.detach(), samp.detach()
    diff = old - samp
    scored = s.valid & ~torch.isnan(diff)
    # TRL: (old - sampling) * mask, NaN -> 0, so an unscored token gets ratio 1 (verl has no NaN handling).
    d = torch.where(scored, diff, torch.zeros((), dtype=diff.dtype, device=diff.device))
    per_seq = cfg.level == "sequence"
    r = s.seq_sum(d) if per_seq else d  # sequence: the product of the token ratios, not a geometric mean
    if cfg.log_clamp is not None:
        r = r.clamp(-cfg.log_clamp, cfg.log_clamp)
    w = torch.exp(r)
    if cfg.mode == "truncate":
        w = w.clamp(min=cfg.c_min, max=cfg.c_max)
    else:  # "mask": zero outside [c_min, c_max], bounds kept (verl IcePop, TRL *_mask)
        outside = torch.zeros_like(w, dtype=torch.bool)
        if cfg.c_min is not None:
            outside |= w < cfg.c_min
        if cfg.c_max is not None:
            outside |= w > cfg.c_max
        w = torch.where(outside, torch.zeros((), dtype=w.dtype, device=w.device), w)

    if per_seq:  # over every sequence, empty ones included (TRL flattens its (B, 1) ratio)
        weight_mean, keep = _seq_sum_all(w, s), None
    else:
        weight_mean, keep = _token_sum(w, s), s.valid
    abs_diff = torch.where(scored, diff.abs(), torch.zeros_like(diff))
    metrics = RolloutISMetrics(
        weight_mean=weight_mean,
        weight_min=_extreme(w, keep, "min"),
        weight_max=_extreme(w, keep, "max"),
        logp_diff_mean=Sum(abs_diff.sum(), scored.to(diff.dtype).sum()),
        logp_diff_max=_extreme(abs_diff, scored, "max"),
    )

    if cfg.batch_normalize:  # verl: rho / mean, over valid tokens or non-empty sequences of all ranks
        if per_seq:
            nonempty = (s.n > 0).to(w.dtype)
            stats = torch.stack([(w * nonempty).sum(), nonempty.sum()])
        else:
            stats = torch.stack([s.masked(w).sum(), s.valid.to(w.dtype).sum()])
        if process_group is not None:
            import torch.distributed as dist

            dist.all_reduce(stats, op=dist.ReduceOp.SUM, group=process_group)
        mean = stats[0] / stats[1].clamp(min=1)
        w = torch.where(mean > 1e-8, w / mean, w)
    return (w[s.seg] if per_seq else w), metrics


def rollout_is_weights(
    old_logprobs: torch.Tensor,
    sampling_logprobs: torch.Tensor,
    *,
    config: ISCorrection,
    mask: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    process_group=None,
) -> tuple[torch.Tensor, RolloutISMetrics]:
    """Rollout-correction weights rho = pi_old / pi_sampler (docs/losses.md section 8.3).

    TRL: ``_generate_and_score_completions``' vLLM importance-sampling ratio (token / sequence x truncate /
    mask); verl 0.9.1: ``rollout_corr_helper.compute_rollout_correction_weights`` (TIS / IcePop, the +-20
    log clamp, batch normalisation).

    Args:
        old_logprobs, sampling_logprobs: ``[B, T]`` (with ``mask``) or ``[N]`` (with ``cu_seqlens`` and an
            optional ``mask``). A NaN sampling log-prob (a token the engine could not score) gives that
            token a log-ratio of 0.
        config: level, mode, bounds, log clamp and batch normalisation.
        process_group: only used by ``batch_normalize``: the mean is taken over all its ranks.

    Returns:
        ``(rho, metrics)``: rho detached, with the shape of ``old_logprobs`` (a sequence-level weight is
        broadcast to the sequence's tokens), and its statistics before batch normalisation. At masked
        positions rho follows TRL (a log-ratio of 0 there); every use of rho in the loss is masked, except
        VESPO's, which relies on exactly that convention.
    """
    dtype = torch.float64 if old_logprobs.dtype == torch.float64 else torch.float32
    s = _segments(old_logprobs, mask, cu_seqlens, dtype, name="old_logprobs")
    samp = _per_token(sampling_logprobs, "sampling_logprobs", s, dtype)
    rho, metrics = _rollout_is(old_logprobs.reshape(-1).to(dtype), samp, s, config, process_group)
    return rho.reshape(s.shape), metrics


# ----------------------------------------------------------------------------------------------------------
# Section 9: KL estimators
# ----------------------------------------------------------------------------------------------------------


def _kl(lp: torch.Tensor, ref: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token estimate of KL(pi_theta || pi_ref) (Schulman's k1 / k2 / k3), gradient with respect to lp."""
    base = estimator.rstrip("+")
    diff = lp - ref
    if base == "k1":
        kappa = diff
    elif base == "abs":
        kappa = diff.abs()  # d|x|/dx = sign(x), 0 at 0
    elif base == "k2":
        kappa = 0.5 * diff.square()
    elif base == "k3":  # TRL 1.16: unclamped
        kappa = torch.exp(ref - lp) - (ref - lp) - 1
    else:  # low_var_kl: verl's k3, input clamped to +-20 and output to +-10
        d = (ref - lp).clamp(-20.0, 20.0)
        kappa = (torch.exp(d) - d - 1).clamp(-10.0, 10.0)
    if estimator.endswith("+"):
        # verl's straight-through variants: the value of the estimator, the gradient of k2 (lp - ref).
        k2 = 0.5 * diff.square()
        kappa = k2 - k2.detach() + kappa.detach()
    return kappa


# ----------------------------------------------------------------------------------------------------------
# Section 10: aggregation coefficients, Loss = sum over tokens of c * x
# ----------------------------------------------------------------------------------------------------------


def _global_count(value, local: torch.Tensor, norm: LossNormalizers, name: str) -> torch.Tensor:
    """A global count from the normalisers, or the local count in a single process; clamped to >= 1."""
    if value is None:
        if norm.num_processes > 1:
            raise ValueError(
                f"normalizers.{name} is required when num_processes > 1: reasonrl never all-reduces a "
                "normaliser inside a loss (docs/losses.md section 4)"
            )
        value = local
    return torch.as_tensor(value, dtype=local.dtype, device=local.device).clamp(min=1)


def _agg_coef(mode: str | None, cfg: PolicyLossConfig, s: _Segments, norm: LossNormalizers) -> torch.Tensor:
    """The coefficient c ``[N]`` (0 at masked tokens) of aggregation ``mode`` (None: TRL by loss_type)."""
    m = s.valid.to(s.n.dtype)
    ga = norm.effective_grad_accum_steps
    num_seqs = max(1, s.num_seqs)  # B = 0 has no tokens: any finite value gives the empty sum 0
    n_tok = s.n[s.seg]  # n_i of each token's sequence
    if mode is None:  # TRL 1.16 GRPOTrainer._compute_loss (section 10.1)
        lt = cfg.loss_type
        if lt in ("grpo", "sapo"):
            return m / (num_seqs * n_tok.clamp(min=1) * ga)
        if lt == "bnpo":
            return m / (m.sum().clamp(min=1) * ga)
        if lt == "dr_grpo":
            return m / (num_seqs * cfg.max_completion_length * ga)
        if lt == "luspo":  # section 10.2: each sequence's token sum, averaged over the B sequences
            return m / (num_seqs * ga)
        # dapo, cispo, vespo, reinforce: no GA division; DDP's average over P and the sum over micro-steps
        # make it a token mean over the whole accumulation window.
        n_glob = _global_count(norm.num_items_in_batch, m.sum(), norm, "num_items_in_batch")
        return m * norm.num_processes / n_glob
    if cfg.agg_version == "legacy":  # verl pre-0.9 dp_actor: local statistics, times 1/GA (section 10.4)
        if mode == "token-mean":
            return m / ((m.sum() + 1e-8) * ga)
        if mode == "seq-mean-token-sum":
            return m / (num_seqs * ga)
        if mode == "seq-mean-token-mean":  # verl gives NaN for an empty sequence; here it contributes 0
            return m / (num_seqs * n_tok.clamp(min=1) * ga)
        return m / (_scale_length(cfg, s, norm) * ga)  # seq-mean-token-sum-norm: a scaled sum, no 1/B
    # verl 0.9.1 agg_loss with the global batch info (section 10.3): D * local sum / global count.
    dp = norm.num_processes
    if mode == "token-mean":
        return dp * m / _global_count(norm.num_items_in_batch, m.sum(), norm, "num_items_in_batch")
    if mode == "token-sum":
        return dp * m
    # verl's local fallback counts only non-empty sequences.
    s_glob = _global_count(norm.global_num_seqs, (s.n > 0).to(m.dtype).sum(), norm, "global_num_seqs")
    if mode == "seq-mean-token-sum":
        return dp * m / s_glob
    if mode == "seq-mean-token-mean":
        return dp * m / ((n_tok + 1e-8) * s_glob)
    return dp * m / (s_glob * _scale_length(cfg, s, norm))  # seq-mean-token-sum-norm (Dr. GRPO)


def _scale_length(cfg: PolicyLossConfig, s: _Segments, norm: LossNormalizers):
    """L_const of seq-mean-token-sum-norm: loss_scale_factor, else the padded length."""
    if cfg.loss_scale_factor is not None:
        return cfg.loss_scale_factor
    if norm.padded_length is not None:
        return norm.padded_length
    return s.width


# ----------------------------------------------------------------------------------------------------------
# Section 7: VESPO gamma weight (TRL GRPOTrainer.get_gamma_weights)
# ----------------------------------------------------------------------------------------------------------


@torch.no_grad()
def _vespo_phi(delta: torch.Tensor, rho: torch.Tensor | None, a_tok: torch.Tensor, a_seq: torch.Tensor | None,
               s: _Segments, cfg: PolicyLossConfig) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Detached phi per token ``[N]`` and, for a per-sequence advantage, per sequence ``[B]``."""
    lower = math.log(1e-8)
    log_w = s.seq_sum(s.masked(delta.clamp(-20.0, 20.0)))
    if rho is not None:
        # Not masked (TRL): positions outside the mask must carry rho = 1, which TRL's weights do.
        log_w = log_w + s.seq_sum(torch.log(rho).clamp(lower, 20.0))
    log_w = log_w.clamp(lower, 20.0)

    def phi(log_w: torch.Tensor, adv: torch.Tensor) -> torch.Tensor:
        nonneg = adv >= 0
        k = _select(nonneg, cfg.vespo_k_pos, cfg.vespo_k_neg, adv)
        lam = _select(nonneg, cfg.vespo_lambda_pos, cfg.vespo_lambda_neg, adv).clamp(min=1e-4)
        # phi(W) = e^lam W^k e^{-lam W}, in log space; phi(1) = 1.
        return torch.exp(lam + k * log_w - lam * torch.exp(log_w)).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)

    if a_seq is not None:
        phi_seq = phi(log_w, a_seq)
        return phi_seq[s.seg], phi_seq
    return phi(log_w[s.seg], a_tok), None


# ----------------------------------------------------------------------------------------------------------
# The loss (sections 5-12)
# ----------------------------------------------------------------------------------------------------------


def policy_loss_reference(
    logprobs: torch.Tensor,
    *,
    advantages: torch.Tensor,
    mask: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    old_logprobs: torch.Tensor | None = None,
    ref_logprobs: torch.Tensor | None = None,
    sampling_logprobs: torch.Tensor | None = None,
    is_weights: torch.Tensor | None = None,
    entropies: torch.Tensor | None = None,
    normalizers: LossNormalizers,
    config: PolicyLossConfig,
    entropy_coef: float | torch.Tensor | None = None,
    return_per_token: bool = False,
) -> LossOutput:
    """GRPO-family policy loss over per-token log-probabilities, exactly as docs/losses.md sections 5-12.

    Args:
        logprobs: current-policy log-probs with grad, ``[B, T]`` (padded) or ``[N]`` (packed).
        advantages: ``[B]`` (broadcast over each sequence's tokens) or per token (the shape of logprobs).
        mask: loss mask of the shape of logprobs (bool or 0/1); None: every token counts.
        cu_seqlens: ``[B + 1]`` int32/int64 offsets of the packed layout.
        old_logprobs: behaviour policy; None means sg(logprobs) (ratio 1, correct gradient).
        ref_logprobs: reference policy; required when ``config.beta != 0``.
        sampling_logprobs: inference-engine log-probs, for the off-policy mask and ``config.is_correction``.
        is_weights: precomputed rollout-correction weights rho, ``[B]`` or per token (detached).
        entropies: per-token entropy; required by the entropy bonus and the top-entropy mask; gets a
            gradient from the bonus only.
        normalizers: the per-call global counts (section 4).
        config: the loss hyper-parameters.
        entropy_coef: overrides ``config.entropy_coef`` (the adaptive controller's coefficient).
        return_per_token: also return the masked per-token contribution c * (l + beta * kappa).

    Returns:
        ``LossOutput(loss, metrics, per_token_loss)``; ``loss`` is 0-d, float32 (float64 for float64
        logprobs); metrics are detached device tensors.
    """
    if not logprobs.is_floating_point():
        raise TypeError(f"logprobs: expected a floating tensor, got {logprobs.dtype}")
    inputs = loss_inputs(
        logprobs, advantages=advantages, mask=mask, cu_seqlens=cu_seqlens, old_logprobs=old_logprobs,
        ref_logprobs=ref_logprobs, sampling_logprobs=sampling_logprobs, is_weights=is_weights,
        normalizers=normalizers, config=config,
    )
    return loss_from_inputs(logprobs, inputs, entropies=entropies, normalizers=normalizers, config=config,
                            entropy_coef=entropy_coef, return_per_token=return_per_token)


class LossInputs(NamedTuple):
    """Everything of the loss that does not depend on the current log-probs and entropies: the token layout,
    the per-token inputs and the aggregation coefficients (flat ``[N]``, compute dtype, 0 at masked tokens).
    :func:`loss_inputs` builds it once per call; the fused kernels read their per-token inputs from it
    (reasonrl/losses/fused.py) and :func:`loss_from_inputs` evaluates the loss over it."""

    s: _Segments
    dtype: torch.dtype
    a_tok: torch.Tensor  # advantage of each token (masked)
    a_seq: torch.Tensor | None  # per-sequence advantage [B] when one was given
    old: torch.Tensor | None  # old log-probs (not masked, not detached)
    ref: torch.Tensor | None
    samp: torch.Tensor | None
    rho: torch.Tensor | None  # rollout-correction weight (detached), from is_weights or config.is_correction
    is_metrics: RolloutISMetrics | None
    agg_pg: torch.Tensor  # aggregation coefficient of the policy term (section 10)
    agg_loss: torch.Tensor  # aggregation coefficient of loss_agg_mode (the KL term, verl's entropy bonus)


def loss_inputs(
    tokens: torch.Tensor,
    *,
    advantages: torch.Tensor,
    mask: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    old_logprobs: torch.Tensor | None,
    ref_logprobs: torch.Tensor | None,
    sampling_logprobs: torch.Tensor | None,
    is_weights: torch.Tensor | None,
    normalizers: LossNormalizers,
    config: PolicyLossConfig,
    dtype: torch.dtype | None = None,
) -> LossInputs:
    """The :class:`LossInputs` of one call; ``tokens`` has the token shape (the log-probs, or the mask) and
    sets the compute dtype (fp64 for fp64, else fp32) unless ``dtype`` is given. Checks the arguments'
    shapes and combinations."""
    cfg = config
    if dtype is None:
        dtype = torch.float64 if tokens.dtype == torch.float64 else torch.float32
    s = _segments(tokens, mask, cu_seqlens, dtype)
    if cfg.beta != 0.0 and ref_logprobs is None:
        raise ValueError(f"ref_logprobs are required when beta != 0 (beta={cfg.beta})")
    if cfg.is_correction is not None:
        if is_weights is not None:
            raise ValueError("pass either is_weights or config.is_correction, not both")
        if old_logprobs is None or sampling_logprobs is None:
            raise ValueError("config.is_correction needs old_logprobs and sampling_logprobs")

    a_tok, a_seq = _per_seq_or_token(advantages.detach(), "advantages", s, dtype)
    a_tok = s.masked(a_tok)
    old = _per_token(old_logprobs, "old_logprobs", s, dtype)
    ref = _per_token(ref_logprobs, "ref_logprobs", s, dtype)
    samp = _per_token(sampling_logprobs, "sampling_logprobs", s, dtype)

    rho = is_metrics = None
    if is_weights is not None:
        rho, rho_seq = _per_seq_or_token(is_weights.detach(), "is_weights", s, dtype)
        if cfg.loss_type == "vespo" and rho_seq is not None:
            raise ValueError("loss_type='vespo' needs token-level is_weights (TRL rejects sequence-level "
                             "IS modes)")
    elif cfg.is_correction is not None:  # needs old_logprobs (checked above): lp_old = old
        rho, is_metrics = _rollout_is(s.masked(old.detach()), samp.detach(), s, cfg.is_correction)

    # Section 10: Loss = sum c_pg * l + beta * sum c_kl * kappa.
    pg_mode = cfg.policy_agg_mode or cfg.loss_agg_mode
    agg_pg = _agg_coef(pg_mode, cfg, s, normalizers)
    agg_loss = agg_pg if cfg.loss_agg_mode == pg_mode else _agg_coef(cfg.loss_agg_mode, cfg, s, normalizers)
    return LossInputs(s, dtype, a_tok, a_seq, old, ref, samp, rho, is_metrics, agg_pg, agg_loss)


def loss_from_inputs(
    logprobs: torch.Tensor,
    inputs: LossInputs,
    *,
    entropies: torch.Tensor | None,
    normalizers: LossNormalizers,
    config: PolicyLossConfig,
    entropy_coef: float | torch.Tensor | None = None,
    return_per_token: bool = False,
) -> LossOutput:
    """The loss (sections 5-12) over ``logprobs`` / ``entropies`` (the token shape of ``inputs``) and the
    call's :class:`LossInputs`: what :func:`policy_loss_reference` returns for the same arguments."""
    cfg = config
    s, dtype, a_tok, a_seq, old, ref, samp, rho, is_metrics, c_pg, c_kl = inputs
    lt, level = cfg.loss_type, cfg.importance_sampling_level
    eta = cfg.entropy_coef if entropy_coef is None else entropy_coef
    bonus = isinstance(eta, torch.Tensor) or eta != 0.0
    if entropies is None and (bonus or cfg.top_entropy_quantile < 1.0):
        raise ValueError("entropies are required by the entropy bonus and by top_entropy_quantile < 1")

    # Inputs as flat [N] tokens in the compute dtype, 0 at masked tokens (see the module docstring).
    lp = s.masked(logprobs.reshape(-1).to(dtype))
    lp_old = lp.detach() if old is None else s.masked(old.detach())
    h = _per_token(entropies, "entropies", s, dtype)
    h = None if h is None else s.masked(h)

    # 1. log-ratio (0 at masked tokens), with verl's optional clamp.
    delta = lp - lp_old
    if cfg.log_ratio_clamp is not None:
        delta = delta.clamp(-cfg.log_ratio_clamp, cfg.log_ratio_clamp)

    # 2. importance weight w (section 6); w_seq is the per-sequence weight at level "sequence".
    w_seq = None
    if level == "token":
        w = torch.exp(delta)
    else:
        omega = s.seq_sum(delta) / s.n.clamp(min=1)  # mean log-ratio of each sequence (GSPO)
        if level == "sequence":  # TRL: differentiates through the sequence mean
            if cfg.seq_log_ratio_max is not None:
                omega = omega.clamp(max=cfg.seq_log_ratio_max)
            w_seq = torch.exp(omega)
            w = w_seq[s.seg]
        else:  # "sequence_token", verl gspo: value of the sequence weight, gradient of the token's own ratio
            lam = (lp - lp.detach()) + omega.detach()[s.seg]
            if cfg.seq_log_ratio_max is not None:
                lam = lam.clamp(max=cfg.seq_log_ratio_max)
            w = torch.exp(lam)

    # 3. surrogate l_pg (section 7).
    eps_low, eps_high = cfg.epsilon_low, cfg.epsilon_high_value
    phi_tok = phi_seq = q_uncapped = None
    if lt in CLIP_FAMILY:  # PPO clip; TRL's delta (INTELLECT-2) or verl's dual clip cap the unclipped branch
        c1 = w if cfg.delta is None else w.clamp(max=cfg.delta)
        c2 = w.clamp(1 - eps_low, 1 + eps_high)
        a1, a2 = c1 * a_tok, c2 * a_tok
        # -min(c1 A, c2 A). On a tie the unclipped branch is taken (not torch.min's half-half split), so the
        # gradient passes at the clip bounds and is blocked strictly beyond them (section 6).
        pg = -torch.where(a1 <= a2, a1, a2)
        if cfg.dual_clip:  # verl vanilla: for A < 0, min(q, -C A)
            q_uncapped = pg
            cap = -cfg.dual_clip_c * a_tok
            pg = torch.where((a_tok < 0) & (pg > cap), cap, pg)
    elif lt == "cispo":  # MiniMax-M1: detached clipped weight times the REINFORCE term
        if cfg.cispo_mode == "upper":  # TRL: absolute cap
            weight = w.clamp(max=cfg.cispo_ratio_max)
        else:  # verl: two-sided clip around 1
            weight = w.clamp(1 - eps_low, 1 + eps_high)
        pg = -weight.detach() * a_tok * lp
    elif lt == "sapo":  # SAPO: smooth sigmoid gate instead of a hard clip
        tau = _select(a_tok > 0, cfg.sapo_tau_pos, cfg.sapo_tau_neg, a_tok)
        pg = -(torch.sigmoid(tau * (w - 1)) * 4 / tau) * a_tok
    elif lt == "vespo":  # VESPO: detached gamma weight of the sequence IS weight (rho folded in)
        phi_tok, phi_seq = _vespo_phi(delta.detach(), rho, a_tok, a_seq, s, cfg)
        pg = -phi_tok * a_tok * lp
    else:  # reinforce (verl gpg)
        pg = -a_tok * lp

    # 4. masks and correction weights, policy term only (section 8).
    keep = keep_seq = e = None
    if cfg.off_policy_mask_threshold is not None:  # DeepSeek-V3.2 off-policy sequence mask (TRL)
        lp_s = lp_old if samp is None else s.masked(samp.detach())
        x = lp_s - lp.detach()
        x = torch.where(torch.isnan(x), torch.zeros_like(x), x)  # an unscored token adds 0 but still counts
        low_kl = s.seq_sum(x) / s.n.clamp(min=1) <= cfg.off_policy_mask_threshold
        keep = (a_tok >= 0) | low_kl[s.seg]
        if a_seq is not None:
            keep_seq = (a_seq >= 0) | low_kl
        pg = pg * keep.to(dtype)
    if cfg.top_entropy_quantile < 1.0:  # Beyond the 80/20 rule (TRL), over the local micro-batch
        e = _top_entropy(h, s.valid, cfg.top_entropy_quantile)
        pg = pg * e.to(dtype)
    if rho is not None and lt != "vespo":
        pg = pg * s.masked(rho)

    # 5. KL to the reference policy (section 9), not masked by keep, e or rho.
    kappa = None
    if ref is not None:
        kappa = _kl(lp, s.masked(ref.detach()), cfg.kl_estimator)
        if cfg.kl_bias_correction:  # TRL (DeepSeek-V3.2): times the uncapped weight, with its gradient
            kappa = kappa * w

    # 6. aggregation (section 10) with the coefficients of loss_inputs.
    per_token = s.masked(c_pg * pg)
    kl_tok = None if kappa is None else s.masked(c_kl * kappa)
    if cfg.beta != 0.0:
        per_token = per_token + cfg.beta * kl_tok
    loss_before_entropy = per_token.sum()

    # 7. entropy bonus (section 11.1).
    h_bar = None
    if h is not None:
        if cfg.loss_agg_mode is None:  # TRL: micro-batch mean over the effective mask m * e, / GA
            m_h = (s.valid if e is None else e).to(dtype)
            h_bar = (h * m_h).sum() / m_h.sum().clamp(min=1) / normalizers.effective_grad_accum_steps
        else:  # verl: loss_agg_mode with the mask m and the global batch info
            h_bar = (c_kl * h).sum()  # c_kl is the loss_agg_mode coefficient
    loss = loss_before_entropy - eta * h_bar if bonus else loss_before_entropy

    metrics = _metrics(
        s=s, cfg=cfg, dtype=dtype, w=w.detach(), w_seq=None if w_seq is None else w_seq.detach(), a_tok=a_tok,
        a_seq=a_seq, delta=delta.detach(), q_uncapped=None if q_uncapped is None else q_uncapped.detach(),
        loss_before_entropy=loss_before_entropy, kappa=kappa, kl_tok=kl_tok, h=h, h_bar=h_bar, keep=keep,
        keep_seq=keep_seq, e=e, phi_tok=phi_tok, phi_seq=phi_seq, is_metrics=is_metrics,
    )
    return LossOutput(loss, metrics, per_token.reshape(s.shape) if return_per_token else None)


def _metrics(*, s: _Segments, cfg: PolicyLossConfig, dtype: torch.dtype, w, w_seq, a_tok, a_seq, delta,
             q_uncapped, loss_before_entropy, kappa, kl_tok, h, h_bar, keep, keep_seq, e, phi_tok, phi_seq,
             is_metrics: RolloutISMetrics | None) -> LossMetrics:
    """Section 12, as detached (sum, count) pairs and extremes."""
    lt = cfg.loss_type
    eps_low, eps_high = cfg.epsilon_low, cfg.epsilon_high_value
    # TRL's metrics are per sequence where its tensors are (B, 1): weight and advantage both per sequence.
    per_seq = cfg.importance_sampling_level == "sequence" and a_seq is not None

    def indicator(fn) -> Sum:
        if per_seq:
            return _seq_sum_all(fn(w_seq, a_seq).to(dtype), s)
        return _token_sum(fn(w, a_tok).to(dtype), s)

    def indicator_per_seq(fn) -> Sum:
        if per_seq:
            x = fn(w_seq, a_seq).to(dtype)
            return Sum(x, torch.ones_like(x))
        return Sum(s.seq_sum(s.masked(fn(w, a_tok).to(dtype))), s.n)

    def zero() -> Sum:
        return _token_sum(torch.zeros_like(a_tok), s)

    out: dict = {}
    if lt in CLIP_FAMILY:
        def low(w_, a_):
            return (w_ < 1 - eps_low) & (a_ < 0)

        def high(w_, a_):
            return (w_ > 1 + eps_high) & (a_ > 0)

        out["clip_low"] = indicator(low)
        out["clip_high"] = indicator(high)
        out["clip_region"] = indicator(lambda w_, a_: low(w_, a_) | high(w_, a_))
        out["clip_low_per_seq"] = indicator_per_seq(low)
        out["clip_high_per_seq"] = indicator_per_seq(high)
        # verl: clipped where -A clip(w) > -A w (strictly); the lower fraction is where the dual clip acts.
        clipped = (-a_tok * w.clamp(1 - eps_low, 1 + eps_high)) > (-a_tok * w)
        out["pg_clipfrac"] = _token_sum(clipped.to(dtype), s)
        if cfg.dual_clip:
            lower = (q_uncapped > -cfg.dual_clip_c * a_tok) & (a_tok < 0)
            out["pg_clipfrac_lower"] = _token_sum(lower.to(dtype), s)
        else:
            out["pg_clipfrac_lower"] = zero()
    elif lt == "cispo":
        if cfg.cispo_mode == "upper":
            out["cispo_clip"] = indicator(lambda w_, a_: (w_ > cfg.cispo_ratio_max) & (a_ > 0))
        else:
            out["cispo_clip"] = indicator(lambda w_, a_: w_ != w_.clamp(1 - eps_low, 1 + eps_high))
        out["pg_clipfrac"], out["pg_clipfrac_lower"] = out["cispo_clip"], zero()
    elif lt == "sapo":  # no hard clip: verl reports 0
        out["pg_clipfrac"], out["pg_clipfrac_lower"] = zero(), zero()
    elif lt == "vespo":
        out["vespo_phi"] = _seq_sum_all(phi_seq, s) if phi_seq is not None else _token_sum(phi_tok, s)

    if cfg.importance_sampling_level == "sequence":
        ratio_mean, ratio_keep, ratio = _seq_sum_all(w_seq, s), None, w_seq
    else:
        ratio_mean, ratio_keep, ratio = _token_sum(w, s), s.valid, w
    if kappa is not None:
        out["kl"] = _token_sum(kappa, s)
        out["kl_agg"] = kl_tok.detach().sum()
    if h is not None:
        out["entropy"] = _token_sum(h, s)
        out["entropy_agg"] = h_bar.detach()
        if e is None:
            out["entropy_effective"] = out["entropy"]
        else:
            m_h = e.to(dtype)
            out["entropy_effective"] = Sum((h.detach() * m_h).sum(), m_h.sum())
    if keep_seq is not None:
        nonempty = s.n > 0
        out["off_policy_kept"] = Sum((keep_seq & nonempty).to(dtype).sum(), nonempty.to(dtype).sum())
    elif keep is not None:
        out["off_policy_kept"] = _token_sum(keep.to(dtype), s)
    if e is not None:
        out["entropy_mask_kept"] = _token_sum(e.to(dtype), s)
    if is_metrics is not None:
        out.update(is_weight_mean=is_metrics.weight_mean, is_weight_min=is_metrics.weight_min,
                   is_weight_max=is_metrics.weight_max, logp_diff_mean=is_metrics.logp_diff_mean,
                   logp_diff_max=is_metrics.logp_diff_max)
    return LossMetrics(
        policy_loss=loss_before_entropy.detach(),
        num_tokens=_seq_sum_all(s.n, s),
        ppo_kl=_token_sum(-delta, s),
        ratio_mean=ratio_mean,
        ratio_min=_extreme(ratio, ratio_keep, "min"),
        ratio_max=_extreme(ratio, ratio_keep, "max"),
        **out,
    )
