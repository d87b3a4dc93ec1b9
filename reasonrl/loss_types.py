"""Output types shared by every policy-loss implementation (docs/losses.md sections 2 and 12).

The plain-PyTorch reference (``reasonrl.reference.policy_loss``) and the fused kernels return the same
``LossOutput``. Metrics are detached device tensors kept as pairs that combine exactly across
micro-batches and ranks, so that computing them never synchronises with the host:

* ``Sum(sum, count)``: combine by adding both (all-reduce SUM); the mean is ``sum / max(1, count)``.
* ``Extreme(value, op)``: combine with ``op`` (``"min"`` or ``"max"``; all-reduce MIN / MAX). An empty set
  yields the identity of ``op`` (+inf for min, -inf for max), so combining stays exact.

Public through ``reasonrl.losses``. This module sits below both ``reasonrl.reference`` and ``reasonrl.losses``
(it imports neither): the reference loss reads it, and the public loss entry points import the reference.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch

__all__ = ["Sum", "Extreme", "RolloutISMetrics", "LossMetrics", "LossOutput"]


@dataclass(frozen=True)
class Sum:
    """A (sum, count) pair: 0-d tensors, or ``[B]`` tensors for the per-sequence metrics."""

    sum: torch.Tensor
    count: torch.Tensor

    def mean(self) -> torch.Tensor:
        """``sum / max(1, count)`` (0 where nothing was counted), still a device tensor."""
        return self.sum / self.count.clamp(min=1)

    def __add__(self, other: Sum) -> Sum:
        return Sum(self.sum + other.sum, self.count + other.count)


@dataclass(frozen=True)
class Extreme:
    """A minimum or maximum (0-d tensor); +inf / -inf when taken over an empty set."""

    value: torch.Tensor
    op: Literal["min", "max"]

    def combine(self, other: Extreme) -> Extreme:
        if other.op != self.op:
            raise ValueError(f"cannot combine a {self.op} with a {other.op}")
        fn = torch.minimum if self.op == "min" else torch.maximum
        return Extreme(fn(self.value, other.value), self.op)


@dataclass(frozen=True)
class RolloutISMetrics:
    """Statistics of the rollout-correction weights rho (docs/losses.md section 8.3),
    before batch normalisation.

    ``weight_*``: rho over valid tokens (token level) or over all sequences, empty ones included (sequence
    level). ``logp_diff_*``: |old_logprobs - sampling_logprobs| over valid tokens whose value is not NaN.
    They match TRL's ``sampling/importance_sampling_ratio/{min,mean,max}`` and
    ``sampling/sampling_logp_difference/{mean,max}``.
    """

    weight_mean: Sum
    weight_min: Extreme
    weight_max: Extreme
    logp_diff_mean: Sum
    logp_diff_max: Extreme


@dataclass(frozen=True)
class LossMetrics:
    """The metrics of docs/losses.md section 12; a field is None when its feature is off or does not apply.

    Token-level ``Sum`` pairs count valid tokens (``count = sum of the mask``). Where a metric is per
    sequence (``importance_sampling_level="sequence"`` with a per-sequence advantage, and VESPO's phi), every
    sequence of the micro-batch is counted once, empty ones included, as TRL does.
    """

    policy_loss: torch.Tensor  # loss before the entropy term (policy + beta * KL), 0-d
    num_tokens: Sum  # (sum of the mask, number of sequences): its mean is the mean loss tokens per sequence
    ppo_kl: Sum  # verl ppo_kl: mean of (old_logprobs - logprobs) after the log-ratio clamp
    ratio_mean: Sum  # importance weight w (tokens, or sequences at level "sequence")
    ratio_min: Extreme
    ratio_max: Extreme
    kl: Sum | None = None  # per-token KL after bias correction (TRL kl), when ref_logprobs are given
    kl_agg: torch.Tensor | None = None  # Agg_kl(kappa) without beta (verl kl_loss)
    entropy: Sum | None = None  # per-token entropy over the loss mask (TRL entropy), when entropies are given
    entropy_agg: torch.Tensor | None = None  # H-bar of section 11 (verl entropy_loss)
    # Entropy over the bonus's effective mask m * e (= ``entropy`` without a top-entropy mask): what TRL's
    # adaptive entropy control accumulates; feed it to AdaptiveEntropyController.observe.
    entropy_effective: Sum | None = None
    clip_low: Sum | None = None  # clip family: TRL clip_ratio/low_mean
    clip_high: Sum | None = None  # TRL clip_ratio/high_mean
    clip_region: Sum | None = None  # TRL clip_ratio/region_mean
    clip_low_per_seq: Sum | None = None  # [B] pairs; min of the fractions with count > 0 = TRL low_min
    clip_high_per_seq: Sum | None = None  # [B] pairs; max = TRL clip_ratio/high_max
    cispo_clip: Sum | None = None  # TRL cispo_clip_ratio (upper) / verl pg_clipfrac for cispo (two_sided)
    pg_clipfrac: Sum | None = None  # verl pg_clipfrac
    pg_clipfrac_lower: Sum | None = None  # verl pg_clipfrac_lower
    off_policy_kept: Sum | None = None  # sequences kept by the off-policy mask
    entropy_mask_kept: Sum | None = None  # tokens kept by the top-entropy mask
    vespo_phi: Sum | None = None  # TRL vespo/phi_seq_mean
    is_weight_mean: Sum | None = None  # rollout-correction weights computed inside the loss (section 8.3)
    is_weight_min: Extreme | None = None
    is_weight_max: Extreme | None = None
    logp_diff_mean: Sum | None = None
    logp_diff_max: Extreme | None = None


class LossOutput(NamedTuple):
    """``loss``: 0-d tensor (fp32; fp64 for fp64 log-probs) to call ``backward`` on. ``per_token_loss``: the
    masked per-token contribution (same layout as ``logprobs``) whose sum is the loss before the entropy
    term, or None unless ``return_per_token=True``."""

    loss: torch.Tensor
    metrics: LossMetrics
    per_token_loss: torch.Tensor | None
