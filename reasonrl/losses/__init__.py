"""GRPO-family policy losses (docs/losses.md): config, normalisers, outputs, the functional and the module.

``policy_loss`` runs the plain-PyTorch reference over per-token log-probabilities;
``policy_loss_from_logits`` runs the single-pass fused kernel where the configuration allows it
(``reasonrl.losses.fused``) and the two-phase composition otherwise. ``AdaptiveEntropyController`` is the
trainer-side entropy-coefficient controller of docs/losses.md section 11.2.
"""

from reasonrl.loss_config import ISCorrection, LossNormalizers, PolicyLossConfig
from reasonrl.loss_types import Extreme, LossMetrics, LossOutput, RolloutISMetrics, Sum
from reasonrl.losses.entropy import AdaptiveEntropyController
from reasonrl.losses.policy import (
    FusedLinearPolicyLoss,
    PolicyLoss,
    policy_loss,
    policy_loss_from_hidden,
    policy_loss_from_logits,
    rollout_is_weights,
    top_entropy_mask,
)

__all__ = [
    "AdaptiveEntropyController",
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
    "policy_loss_from_hidden",
    "PolicyLoss",
    "FusedLinearPolicyLoss",
    "rollout_is_weights",
    "top_entropy_mask",
]
