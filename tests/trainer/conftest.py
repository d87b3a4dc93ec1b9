"""Fixtures of the trainer tests: one CPU thread (the models are tiny: intra-op threads only add
synchronisation, and on a shared 2-core machine they make every matmul wait for a descheduled thread), the
embedded model, small configurations."""

from __future__ import annotations

import pytest
import torch

from reasonrl.trainer import load_config


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _small_config(tmp_path, *overrides: str, preset: str | None = "dro"):
    """A run of a few seconds: 2 prompts x 4 completions of at most 72 tokens, no progress bar, no plot."""
    base = [
        "steps=2",
        "prompts_per_step=2",
        "rollout.group_size=4",
        "rollout.max_new_tokens=72",
        "eval.size=8",
        "eval.max_new_tokens=72",
        "optim.lr=1e-3",
        f"log.out_dir={tmp_path}",
        "log.progress=false",
        "log.plot=false",
        "log.tensorboard=off",
    ]
    return load_config(preset=preset, overrides=base + list(overrides))


@pytest.fixture(scope="module")
def embedded():
    """(model, tokenizer) of the shipped tiny model, loaded once per module; tests deep-copy the model."""
    from reasonrl.trainer.trainer import load_model_and_tokenizer

    return load_model_and_tokenizer("embedded")


@pytest.fixture
def small_config():
    """``small_config(tmp_path, *overrides, preset="dro")``: a run of a few seconds."""
    return _small_config
