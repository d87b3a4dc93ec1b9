"""Bad input and faults: a raising reward is reported with its name and the prompt, never turned into NaN; an
infinite reward is rejected the same way; a NaN loss stops the run with a clear error and keeps the last
checkpoint (finite parameters)."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from reasonrl.trainer import RewardError, Trainer, TrainingError


def test_raising_reward_names_reward_and_prompt(small_config, tmp_path, embedded):
    model, tok = copy.deepcopy(embedded[0]), embedded[1]
    cfg = small_config(tmp_path, "rewards=[{name: task}]")
    trainer = Trainer(cfg, model=model, tokenizer=tok)
    bad_prompt = trainer.dataset[1]["prompt"]

    def picky(prompts, completions, **kwargs):
        if bad_prompt in prompts:
            raise KeyError("no gold answer for this item")
        return torch.zeros(len(completions))

    trainer.rewards = [("task", trainer.rewards[0][1], 1.0), ("picky", picky, 1.0)]
    with pytest.raises(RewardError) as info:
        trainer.step()
    msg = str(info.value)
    assert "'picky'" in msg and "prompt index 1 in the batch" in msg and "dataset index 1" in msg
    assert "KeyError" in msg and "no gold answer" in msg
    assert isinstance(info.value.__cause__, KeyError)


def test_infinite_reward_is_rejected(small_config, tmp_path, embedded):
    model, tok = copy.deepcopy(embedded[0]), embedded[1]
    cfg = small_config(tmp_path, "rollout.group_size=2")

    def explode(completions, **kwargs):
        out = torch.zeros(len(completions))
        out[3] = math.inf  # prompt 1, completion 1
        return out

    trainer = Trainer(cfg, model=model, tokenizer=tok, rewards=[("explode", explode, 1.0)])
    with pytest.raises(RewardError, match=r"'explode' returned inf for completion 1 of prompt index 1"):
        trainer.step()


def test_nan_loss_stops_and_keeps_last_checkpoint(small_config, tmp_path, embedded):
    model, tok = copy.deepcopy(embedded[0]), embedded[1]
    cfg = small_config(
        tmp_path,
        "steps=3",
        "log.save_every=1",
        "rewards=[{name: task}]",
        "eval.size=2",
        "rollout.mask_truncated_completions=false",
    )
    trainer = Trainer(cfg, model=model, tokenizer=tok)

    # From the second step on, the training forward (grad enabled; generation and the old-log-prob pass run
    # under no_grad) returns NaN hidden states: the loss becomes NaN.
    def poison(module, args, output):
        if torch.is_grad_enabled() and trainer.step_count >= 1:
            return output * math.nan
        return output

    model.model.norm.register_forward_hook(poison)
    with pytest.raises(TrainingError) as info:
        trainer.train()
    msg = str(info.value)
    assert "non-finite loss" in msg and "at step 2," in msg and "step-000001" in msg
    ckpt = tmp_path / "checkpoints" / "step-000001"
    assert trainer.last_checkpoint == ckpt
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(ckpt)
    assert all(torch.isfinite(p).all() for p in reloaded.parameters())
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))  # no half-written checkpoint left
    assert not (tmp_path / "checkpoints" / "step-000002").exists()
    # The metrics of the completed step were written before the fault.
    assert '"step": 1' in (tmp_path / "metrics.jsonl").read_text()
