"""The trainer configuration: presets, YAML + command-line overrides through OmegaConf, and invalid keys
rejected with the list of valid ones (every section, the loss fields and each reward's options)."""

from __future__ import annotations

import pytest

from reasonrl.cli import main
from reasonrl.losses import PolicyLossConfig
from reasonrl.trainer import PRESETS, ConfigError, load_config
from reasonrl.trainer.config import build_loss_config


@pytest.mark.parametrize("preset", PRESETS)
def test_presets_load_and_build_their_loss(preset):
    cfg = load_config(preset=preset)
    loss = build_loss_config(cfg)
    assert isinstance(loss, PolicyLossConfig)
    assert loss.temperature == cfg.rollout.temperature  # the loss sees the sampling temperature
    name = {"dro": "r3", "grpo": "numeric", "pear": "pear", "laser": "laser"}[preset]
    assert cfg.rewards[0].name == name


def test_dro_preset_follows_the_paper():
    cfg = load_config(preset="dro")
    loss = build_loss_config(cfg)
    assert (loss.loss_type, loss.epsilon_high, loss.beta, loss.kl_estimator) == ("dr_grpo", 0.2, 0.001, "k3")
    assert (cfg.rollout.group_size, cfg.rollout.temperature, cfg.rollout.top_p) == (16, 1.0, 0.95)
    assert cfg.rollout.mask_truncated_completions and cfg.optim.warmup_ratio == 0.2 and cfg.optim.lr == 1e-6


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("steps: 7\noptim:\n  lr: 0.001\nloss:\n  beta: 0.02\n")
    cfg = load_config(
        path,
        preset="grpo",
        overrides=[
            "optim.lr=5e-4",
            "rewards.0.options.rel_tol=0.01",
            "loss.is_correction={level: token, mode: truncate}",
        ],
    )
    assert cfg.steps == 7 and cfg.optim.lr == 5e-4
    loss = build_loss_config(cfg)
    assert loss.beta == 0.02 and loss.loss_type == "grpo" and loss.is_correction.level == "token"
    assert cfg.rewards[0].options == {"rel_tol": 0.01}


@pytest.mark.parametrize(
    "override, section, some_valid",
    [
        ("stepz=3", "the top level", "prompts_per_step"),
        ("optim.lrr=3", "optim", "updates_per_batch"),
        ("rollout.temp=0.5", "rollout", "temperature"),
        ("rewards.0.optionz=1", "rewards[0]", "options"),
        ("loss.betta=0.1", "loss", "kl_estimator"),
    ],
)
def test_invalid_key_lists_valid_keys(override, section, some_valid):
    with pytest.raises(ConfigError) as info:
        load_config(preset="dro", overrides=[override])
    msg = str(info.value)
    assert f"in {section}" in msg and "valid keys:" in msg and some_valid in msg


def test_invalid_reward_option_lists_valid_options(tmp_path, embedded):
    from reasonrl.trainer import Trainer

    cfg = load_config(preset="dro", overrides=["rewards.0.options.weightin=topk", f"log.out_dir={tmp_path}"])
    with pytest.raises(
        ConfigError, match=r"unknown option 'weightin' for reward 'r3'; valid options: .*weighting"
    ):
        Trainer(cfg, model=embedded[0], tokenizer=embedded[1])


def test_bad_values_are_rejected():
    with pytest.raises(ConfigError, match="could not be converted"):
        load_config(overrides=["steps=abc"])
    with pytest.raises(ConfigError, match=r"rollout.top_p must be in \(0, 1\]"):
        load_config(overrides=["rollout.top_p=2"])
    with pytest.raises(ConfigError, match="loss: unknown loss_type"):
        load_config(overrides=["loss.loss_type=ppo"])
    with pytest.raises(ConfigError, match="mini_batches"):
        load_config(overrides=["optim.mini_batches=3", "prompts_per_step=2", "rollout.group_size=4"])


def test_cli_print_config_and_invalid_key(capsys):
    assert (
        main(["train", "--preset", "laser", "--optim.lr", "3e-4", "rollout.group_size=4", "--print-config"])
        == 0
    )
    out = capsys.readouterr().out
    assert "lr: 0.0003" in out and "group_size: 4" in out and "name: laser" in out
    assert main(["train", "--preset", "dro", "--optim.learning_rate", "1"]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'learning_rate' in optim" in err and "valid keys: lr," in err


def test_cli_train_runs(tmp_path, capsys):
    rc = main(
        [
            "train",
            "--preset",
            "dro",
            "--steps",
            "1",
            "--prompts_per_step",
            "1",
            "--rollout.group_size",
            "2",
            "--rollout.max_new_tokens",
            "40",
            "--eval.size",
            "2",
            "--log.out_dir",
            str(tmp_path),
            "--log.progress",
            "false",
            "--log.plot",
            "false",
            "--threads",
            "1",
        ]
    )
    assert rc == 0
    out = capsys.readouterr().out
    assert "held-out accuracy:" in out and "time per step:" in out
    assert (tmp_path / "metrics.jsonl").exists() and (tmp_path / "checkpoints" / "step-000001").is_dir()
