"""Reward functions (docs/rewards.md): DRO's R3 with its data filter, PEAR, the LASER family, a numeric-answer
verifier, a weighted-sum combinator, and adapters for TRL and verl."""

from reasonrl.rewards.functional import PhaseEntropy, R3Output, find_boundary, phase_entropy, r3_reward

__all__ = ["r3_reward", "phase_entropy", "find_boundary", "R3Output", "PhaseEntropy"]
from reasonrl.rewards.numeric import NumericAnswerConfig, NumericAnswerReward  # noqa: E402
from reasonrl.rewards.types import RewardOutput  # noqa: E402

__all__ += ["RewardOutput", "NumericAnswerConfig", "NumericAnswerReward"]
from reasonrl.rewards.pear import PEARConfig, PEARReward  # noqa: E402

__all__ += ["PEARConfig", "PEARReward"]
from reasonrl.rewards.laser import LaserConfig, LaserLengthMonitor, LaserReward  # noqa: E402

__all__ += ["LaserConfig", "LaserLengthMonitor", "LaserReward"]
from reasonrl.rewards.r3 import R3Config, R3Reward  # noqa: E402

__all__ += ["R3Config", "R3Reward"]
from reasonrl.rewards.filtering import (  # noqa: E402
    FilterResult,
    R3FilterConfig,
    r3_filter_round,
    r3_filter_select,
)

__all__ += ["R3FilterConfig", "FilterResult", "r3_filter_round", "r3_filter_select"]
from reasonrl.rewards.adapters import as_trl_reward, as_verl_score  # noqa: E402
from reasonrl.rewards.combine import WeightedSumReward  # noqa: E402

__all__ += ["WeightedSumReward", "as_trl_reward", "as_verl_score"]
