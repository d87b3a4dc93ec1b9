"""The GRPO-family trainer (docs/trainer.md): ``Trainer``, its ``TrainerConfig`` (YAML + command-line
overrides, presets ``dro`` / ``grpo`` / ``pear`` / ``laser``), the rollout-backend interface and the reward
plumbing. ``reasonrl train`` runs it from the command line."""

from reasonrl.trainer.checkpoint import CheckpointError, CheckpointWarning
from reasonrl.trainer.config import (
    PRESETS,
    ConfigError,
    RewardSpec,
    TrainerConfig,
    config_to_yaml,
    load_config,
)
from reasonrl.trainer.rewards import RewardError, TaskVerifierReward
from reasonrl.trainer.rollout import HFGenerateBackend, RolloutBackend, Rollouts, SamplingParams
from reasonrl.trainer.trainer import StepRecord, Trainer, TrainingError, embedded_model_path

__all__ = [
    "Trainer",
    "TrainerConfig",
    "RewardSpec",
    "load_config",
    "config_to_yaml",
    "PRESETS",
    "ConfigError",
    "RewardError",
    "TrainingError",
    "CheckpointError",
    "CheckpointWarning",
    "TaskVerifierReward",
    "RolloutBackend",
    "HFGenerateBackend",
    "Rollouts",
    "SamplingParams",
    "StepRecord",
    "embedded_model_path",
]
