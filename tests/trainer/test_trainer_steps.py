"""Two training steps end to end, each compared with a slow step built from the reference implementations.

For every step the model is snapshotted before the step; the slow step recomputes, with full logits and the
plain-PyTorch oracles of reasonrl/reference on that snapshot: the old log-probs, the rewards (R3 from one
teacher-forced forward per completion, the task verifier from the decoded text), the advantages, and the
loss of the whole batch in a single call with its gradient. The trainer's values come from the fused
hidden-state path with gradient accumulation over micro-batches, so agreement checks the fused ops, the
reward plumbing and the global normalisers at once.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from reasonrl.losses import LossNormalizers
from reasonrl.ops import advantage_preset
from reasonrl.reference import group_advantages_reference, token_logprobs_reference
from reasonrl.reference.policy_loss import policy_loss_reference
from reasonrl.reference.r3_reward import r3_reward_reference
from reasonrl.tasks.arithmetic import ANSWER_PREFIX, THINK_END, verify
from reasonrl.testing import tiny_causal_lm
from reasonrl.trainer import Trainer
from reasonrl.trainer.trainer import IGNORE

# fp32 model, fused (chunked, blocked GEMM) vs full-logits reference: differences are rounding only.
ATOL = 2e-4


def _full_logprobs(model, rec, temperature):
    logits = model(input_ids=rec.input_ids, attention_mask=rec.attention_mask, use_cache=False).logits[:, :-1]
    labels = rec.labels.masked_fill(~rec.loss_mask, IGNORE)
    return token_logprobs_reference(logits, labels, temperature=temperature, want_entropy=True)


@torch.no_grad()
def _r3_reference(model, tok, rec, group_size):
    """R3 + length penalty (docs/rewards.md 2.3) with one plain forward per completion."""
    marker = tok(THINK_END, add_special_tokens=False)["input_ids"]
    sep = tok(ANSWER_PREFIX, add_special_tokens=False)["input_ids"]
    B = len(rec.completion_ids)
    G = B // group_size
    ref_ids = [tok(rec.items[g]["reference"], add_special_tokens=False)["input_ids"] for g in range(G)]
    L = max(len(y) for y in ref_ids)
    lp = torch.zeros(G, group_size, L, dtype=torch.float64)
    ref_mask = torch.zeros(G, L, dtype=torch.bool)
    roll = torch.zeros(G, group_size, dtype=torch.bool)
    ans_len = torch.zeros(B)
    model.eval()
    for r, c in enumerate(rec.completion_ids):
        g, k = divmod(r, group_size)
        y = ref_ids[g]
        ref_mask[g, : len(y)] = True
        if marker[0] not in c:
            continue
        b = c.index(marker[0])
        ans = c[b + 1 :]
        if ans[: len(sep)] == sep:  # the separator is not part of the outcome (docs/rewards.md 2.2)
            ans = ans[len(sep) :]
        while ans and ans[-1] in (tok.eos_token_id, tok.pad_token_id):
            ans = ans[:-1]
        ans_len[r] = len(ans)
        seq = rec.prompt_ids[g] + c[: b + 1] + sep + y
        logits = model(input_ids=torch.tensor([seq])).logits[0].double()
        start = len(seq) - len(y)
        lps = torch.log_softmax(logits[start - 1 : len(seq) - 1], -1)
        lp[g, k, : len(y)] = lps.gather(1, torch.tensor(y)[:, None])[:, 0]
        roll[g, k] = True
    r3 = r3_reward_reference(lp, ref_mask=ref_mask, rollout_mask=roll).reward.reshape(B).float()
    ref_len = torch.tensor([len(ref_ids[r // group_size]) for r in range(B)], dtype=torch.float32)
    r_len = 1 - 0.5 * (ref_len - ans_len).abs() / ref_len
    valid = roll.reshape(B)
    return torch.where(valid, r3 + r_len, torch.full_like(r3, math.nan))


def _slow_loss(snap, ref_model, trainer, rec, rewards):
    cfg = trainer.config
    K = cfg.rollout.group_size
    weights = torch.tensor([w for _, _, w in trainer.rewards])
    preset = advantage_preset(cfg.advantages.preset)
    preset.pop("nan_policy")
    adv = group_advantages_reference(
        rewards,
        group_size=K,
        estimator=cfg.advantages.estimator,
        scale=cfg.advantages.scale,
        reward_weights=weights,
        lengths=rec.loss_mask.sum(1),
        **preset,
    ).advantages
    temp = trainer.loss_config.temperature
    snap.train()
    cur = _full_logprobs(snap, rec, temp)
    ref_lp = None
    if ref_model is not None:
        with torch.no_grad():
            ref_lp = _full_logprobs(ref_model, rec, temp).logprobs
    # The whole batch in ONE call (GA = 1): the trainer's micro-batch losses must add up to it.
    out = policy_loss_reference(
        cur.logprobs,
        advantages=adv,
        mask=rec.loss_mask,
        old_logprobs=cur.logprobs.detach(),
        ref_logprobs=ref_lp,
        entropies=cur.entropy,
        config=trainer.loss_config,
        normalizers=LossNormalizers(
            num_items_in_batch=max(1, int(rec.loss_mask.sum())),  # as the trainer: an empty window counts 1
            global_num_seqs=len(rec.completion_ids),
            grad_accum_steps=1,
            padded_length=cfg.rollout.max_new_tokens,
        ),
    )
    return cur, ref_lp, adv, out.loss


def _capture_grads(trainer) -> dict:
    """The gradients the optimiser is about to apply (after accumulation; clipping is off in these tests)."""
    grads: dict = {}

    def hook(optimizer, args, kwargs):
        grads.update({n: p.grad.detach().clone() for n, p in trainer.model.named_parameters()})

    trainer.optimizer.register_step_pre_hook(hook)
    return grads


def _check_step(trainer, snap, ref_model, rec, *, r3_col=None, task_col=None, grads=None):
    K = trainer.config.rollout.group_size
    cur, ref_lp, adv, loss = None, None, None, None
    rewards = rec.rewards.clone()
    texts = trainer.tokenizer.batch_decode(rec.completion_ids, skip_special_tokens=True)
    if task_col is not None:
        expect = torch.tensor(
            [
                1.0 if verify(t, rec.items[i // K]["answers"]) == "correct" else 0.0
                for i, t in enumerate(texts)
            ]
        )
        torch.testing.assert_close(rec.rewards[:, task_col], expect)
    if r3_col is not None:
        expect = _r3_reference(snap, trainer.tokenizer, rec, K)
        torch.testing.assert_close(rec.rewards[:, r3_col], expect, atol=ATOL, rtol=1e-4, equal_nan=True)
        rewards[:, r3_col] = expect
    cur, ref_lp, adv, loss = _slow_loss(snap, ref_model, trainer, rec, rewards)
    m = rec.loss_mask
    torch.testing.assert_close(rec.old_logprobs[m], cur.logprobs.detach()[m], atol=ATOL, rtol=0)
    torch.testing.assert_close(rec.entropies[m], cur.entropy.detach()[m], atol=ATOL, rtol=0)
    if ref_lp is not None:
        torch.testing.assert_close(rec.ref_logprobs[m], ref_lp[m], atol=ATOL, rtol=0)
    torch.testing.assert_close(rec.advantages, adv.float(), atol=1e-4, rtol=1e-4)
    assert len(rec.micro_losses) == 1 and len(rec.micro_losses[0]) > 1, "expected gradient accumulation"
    assert sum(rec.micro_losses[0]) == pytest.approx(float(loss.detach()), abs=1e-5, rel=1e-4)
    if grads is not None:  # the accumulated fused gradient equals the reference gradient of the whole batch
        loss.backward()
        for name, p in snap.named_parameters():
            err = float((grads[name] - p.grad).norm() / p.grad.norm().clamp(min=1e-12))
            assert err < 1e-3, f"gradient of {name}: relative error {err:.2e}"


def _params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_two_steps_embedded_model_match_reference(small_config, tmp_path, embedded):
    model, tok = copy.deepcopy(embedded[0]), embedded[1]
    cfg = small_config(
        tmp_path,
        "rewards=[{name: r3, weight: 1.0}, {name: task, weight: 0.5}]",
        "loss.beta=0.01",
        "optim.micro_batch_size=2",
        "optim.max_grad_norm=0",
        "rollout.max_new_tokens=40",
    )
    trainer = Trainer(cfg, model=model, tokenizer=tok)
    assert trainer.ref_model is not None  # beta > 0: frozen reference for the KL
    grads = _capture_grads(trainer)
    first = _params(model)
    for _ in range(2):
        snap = copy.deepcopy(model)
        before = _params(model)
        metrics = trainer.step()
        rec = trainer.last_record
        assert rec.rewards.shape == (8, 2)
        _check_step(trainer, snap, trainer.ref_model, rec, r3_col=0, task_col=1, grads=grads)
        assert any(not torch.equal(before[n], p) for n, p in model.named_parameters()), "no parameter moved"
        for key in (
            "reward",
            "r3",
            "kl",
            "entropy",
            "clip_ratio",
            "loss",
            "tokens_per_s",
            "time/generation",
            "time/reward",
            "time/old_logprobs",
            "time/loss_fwd_bwd",
            "time/optimizer",
        ):
            assert key in metrics, key
    assert any(not torch.equal(first[n], p) for n, p in model.named_parameters())


def test_two_steps_random_qwen2_match_reference(small_config, tmp_path, embedded):
    """A tiny random Qwen2 (tied embeddings, q/k/v biases) with a user reward: the completion length."""
    tok = embedded[1]
    model = tiny_causal_lm("qwen2", len(tok), hidden_size=48, max_positions=256, tie=True,
                           pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)

    def length_reward(completions, **kwargs):
        return torch.tensor([len(c) / 100.0 for c in completions])

    cfg = small_config(
        tmp_path,
        "loss.loss_type=grpo",
        "loss.beta=0.0",
        "optim.micro_batch_size=2",
        "optim.max_grad_norm=0",
        "rollout.mask_truncated_completions=false",
        "rollout.max_new_tokens=12",
        preset="grpo",
    )
    trainer = Trainer(cfg, model=model, tokenizer=tok, rewards=[("length", length_reward, 1.0)])
    assert trainer.ref_model is None
    grads = _capture_grads(trainer)
    for _ in range(2):
        snap = copy.deepcopy(model)
        before = _params(model)
        trainer.step()
        rec = trainer.last_record
        expect = torch.tensor(
            [len(t) / 100.0 for t in tok.batch_decode(rec.completion_ids, skip_special_tokens=True)]
        )[:, None]
        torch.testing.assert_close(rec.rewards, expect)
        _check_step(trainer, snap, None, rec, grads=grads)
        assert any(not torch.equal(before[n], p) for n, p in model.named_parameters())


def test_train_writes_metrics_curves_checkpoint(small_config, tmp_path, embedded):
    pytest.importorskip("matplotlib")
    model, tok = copy.deepcopy(embedded[0]), embedded[1]
    cfg = small_config(
        tmp_path,
        "log.plot=true",
        "log.save_every=1",
        "log.save_total_limit=1",
        "optim.updates_per_batch=2",
        "rollout.mask_truncated_completions=false",
        "optim.mini_batches=2",
        "entropy_control.enabled=true",
    )
    trainer = Trainer(cfg, model=model, tokenizer=tok)
    summary = trainer.train()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["kind"] == "train"]
    evals = [r for r in rows if r["kind"] == "eval"]
    assert [r["step"] for r in train] == [1, 2] and [r["step"] for r in evals] == [0, 2]
    for r in train:
        assert r["time/step"] >= r["time/generation"] > 0 and "entropy_coef" in r and "accuracy" in r
    assert 0 <= summary["heldout_accuracy_before"] <= 1 and 0 <= summary["heldout_accuracy_after"] <= 1
    assert (tmp_path / "curves.png").stat().st_size > 1000
    assert json.loads((tmp_path / "summary.json").read_text())["steps"] == 2
    ckpts = sorted((tmp_path / "checkpoints").glob("step-*"))
    assert [c.name for c in ckpts] == ["step-000002"]  # save_total_limit=1 pruned step 1
    assert (ckpts[0] / "model.safetensors").exists() and (ckpts[0] / "optimizer.pt").exists()
    assert json.loads((ckpts[0] / "trainer_state.json").read_text())["step"] == 2
    # Two passes x two mini-batches = 4 optimiser steps per rollout batch; the old log-probs are those from
    # before the first pass.
    assert len(trainer.last_record.micro_losses) == 4
    assert train[-1]["ppo_kl"] != 0.0  # later passes are off-policy: log-probs moved away from the old ones


def test_r3_filter_rounds_once_per_pass_over_the_kept_set(small_config, tmp_path, embedded, monkeypatch):
    """docs/trainer.md section 6: a filter round before the first step, then one per pass over the kept set
    (interval = |kept| // prompts_per_step steps after the previous round), never on consecutive steps when
    the kept set's size changes between rounds."""
    import types

    import reasonrl.rewards

    sizes = iter([14, 15, 13, 16, 12, 14, 15, 13])  # kept-set sizes of successive rounds

    def fake_round(items, **kwargs):
        kept = items[: next(sizes)]
        return types.SimpleNamespace(kept=kept, survivors=kept, carried=[])

    monkeypatch.setattr(reasonrl.rewards, "r3_filter_round", fake_round)
    model, tok = embedded
    cfg = small_config(tmp_path, "r3_filter.enabled=true", "r3_filter.pool_size=16", "steps=20")
    trainer = Trainer(cfg, model=copy.deepcopy(model), tokenizer=tok)
    rounds = []
    for step in range(20):
        trainer.step_count = step
        n = len([h for h in trainer.history if h.get("kind") == "filter"])
        trainer._maybe_filter()
        if len([h for h in trainer.history if h.get("kind") == "filter"]) > n:
            rounds.append(step)
    # prompts_per_step = 2: kept 14 -> next round 7 steps later, 15 -> 7, 13 -> 6
    assert rounds == [0, 7, 14]
