"""Public functional entry points of the reward tensor ops: ``r3_reward``, ``phase_entropy``,
``find_boundary`` (docs/ops.md sections 5 and 6).

They currently run the plain-PyTorch implementation in ``reasonrl/reference/`` (the oracle). Fused C++ and
Triton implementations are planned; they will be selected here with the same ``impl=`` keyword and must agree
with the reference. The ops are O(G K L) (R3) and O(N) (phase entropy) elementwise work after the model's
forward pass, which dominates the reward's cost; the fused versions mainly save kernel launches.

``impl``: ``"auto"`` (default) and ``"reference"`` run the reference; any other value raises ``RuntimeError``
(an explicit request that cannot be honoured never falls back, docs/ops.md).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from reasonrl.ops import validation_enabled
from reasonrl.reference.phase_entropy import PhaseEntropy, find_boundary_reference, phase_entropy_reference
from reasonrl.reference.r3_reward import R3Output, r3_reward_reference

__all__ = ["r3_reward", "phase_entropy", "find_boundary", "R3Output", "PhaseEntropy"]

_IMPLS = ("auto", "reference")


def _check_impl(op: str, impl: str) -> None:
    if impl not in _IMPLS:
        raise RuntimeError(f"{op}: impl={impl!r} is not available: this op currently has the 'reference' "
                           "implementation only (use impl='auto' or 'reference')")


def r3_reward(
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
    impl: str = "auto",
    validate: bool | None = None,
) -> R3Output:
    """DRO's reasoning-reflection reward from the reference outcome's log-probs (docs/ops.md section 5).

    ``ref_logprobs`` ``[G, K, L]`` fp32 with ``ref_mask [G, L]`` (padded), or ``[K, M]`` with
    ``ref_cu_seqlens [G + 1]`` (packed); ``rollout_mask [G, K]``. Returns ``R3Output(reward [G, K] fp32,
    NaN for invalid rollouts; weights, sigma [G, L] / [M]; num_valid_rollouts [G] int32)``. Every option is
    described in :func:`reasonrl.reference.r3_reward_reference`. Forward only (no autograd).

    Runs the reference implementation for now; a fused implementation is planned.
    """
    _check_impl("r3_reward", impl)
    return r3_reward_reference(
        ref_logprobs, ref_mask=ref_mask, ref_cu_seqlens=ref_cu_seqlens, rollout_mask=rollout_mask,
        weighting=weighting, softmax_tau=softmax_tau, topk=topk, reduction=reduction,
        baseline_logprobs=baseline_logprobs, propagation_gamma=propagation_gamma,
        min_valid_rollouts=min_valid_rollouts,
        validate=validation_enabled() if validate is None else validate,
    )


def phase_entropy(
    entropy: torch.Tensor,
    boundary: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    boundary_len: int = 1,
    impl: str = "auto",
    validate: bool | None = None,
) -> PhaseEntropy:
    """Mean entropy before / after a boundary marker per sequence (docs/ops.md section 6).

    ``entropy [B, T]`` (+ ``mask``) or ``[N]`` with ``cu_seqlens [B + 1]`` (+ ``mask [N]``); ``boundary [B]``
    int (valid-token index of the marker, ``n_b`` = none). Returns ``PhaseEntropy(mean_before, mean_after,
    count_before, count_after)``, all ``[B]``. Differentiable with respect to ``entropy``.

    Runs the reference implementation for now; a fused implementation is planned.
    """
    _check_impl("phase_entropy", impl)
    return phase_entropy_reference(entropy, boundary, mask=mask, cu_seqlens=cu_seqlens,
                                   boundary_len=boundary_len,
                                   validate=validation_enabled() if validate is None else validate)


def find_boundary(
    token_ids: torch.Tensor,
    marker_ids: int | Sequence[int] | torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    impl: str = "auto",
    validate: bool | None = None,
) -> torch.Tensor:
    """Valid-token index ``[B]`` (int64) of the first occurrence of ``marker_ids`` in each sequence,
    ``n_b`` if absent (docs/ops.md section 6). Runs the reference implementation for now."""
    _check_impl("find_boundary", impl)
    return find_boundary_reference(token_ids, marker_ids, mask=mask, cu_seqlens=cu_seqlens,
                                   validate=validation_enabled() if validate is None else validate)
