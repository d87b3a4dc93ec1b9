"""GRPO-family policy losses (losses.md): config, normalisers, outputs, the functional and the module.

For now ``policy_loss`` runs the plain-PyTorch reference over per-token log-probabilities; the fused
logits / hidden-state entry points will reuse the same config, normalisers and output types.
"""

from reasonrl.losses.config import ISCorrection, LossNormalizers, PolicyLossConfig
from reasonrl.losses.policy import (
    PolicyLoss,
    policy_loss,
    policy_loss_from_logits,
    rollout_is_weights,
    top_entropy_mask,
)
from reasonrl.losses.types import Extreme, LossMetrics, LossOutput, RolloutISMetrics, Sum

__all__ = [
    "PolicyLossConfig",
    "ISCorrection",
    "LossNormalizers",
    "LossOutput",
    "LossMetrics",
    "RolloutISMetrics",
    "Sum",
    "Extreme",
    "policy_loss",
    "policy_loss_from_logits",
    "PolicyLoss",
    "rollout_is_weights",
    "top_entropy_mask",
]
