"""The GRPO-family trainer: rollout -> reward -> advantage -> fused loss -> optimiser
(docs/trainer.md section 1).

One step of :class:`Trainer`:

1. **rollouts**: ``prompts_per_step`` prompts, K completions each, from the rollout backend (transformers
   ``generate`` by default; ``reasonrl.trainer.rollout``);
2. **old log-probs** of the completion tokens (and their entropies), under ``no_grad`` with the fused op
   :func:`reasonrl.linear_token_logprobs` on the model's last hidden states and its lm_head
   (:func:`reasonrl.models.hidden_states_and_lm_head`): the ``[tokens, V]`` logits never exist, only row
   chunks of them inside the op; the same for the frozen reference model when the KL coefficient is > 0;
3. **rewards**: every configured reward (R3 by default) on the decoded completions and the token ids
   (``reasonrl.trainer.rewards``), stacked ``[B, R]``;
4. **advantages**: :func:`reasonrl.ops.group_advantages` over the K completions of each prompt, the rewards'
   weights as ``reward_weights``;
5. **policy updates**: ``optim.updates_per_batch`` passes over the batch, each split into
   ``optim.mini_batches`` optimiser steps, each accumulated over micro-batches of ``optim.micro_batch_size``
   sequences. The loss is :class:`reasonrl.losses.FusedLinearPolicyLoss` (hidden states + lm_head; the
   gradient of each row chunk is formed inside the forward call) or, with ``loss_impl="logits"``,
   :func:`reasonrl.losses.policy_loss_from_logits`. The normalisers are the global counts of the
   mini-batch (``LossNormalizers``: its loss tokens, its sequences, the number of micro-batches), so the sum
   of the micro-batch losses equals the loss of the whole mini-batch in one call (docs/losses.md section 10).
   The adaptive entropy controller, when enabled, sets the entropy coefficient of each window.

Faults: a reward that raises stops the run with a :class:`~reasonrl.trainer.rewards.RewardError` naming the
reward and the prompt; a non-finite loss or gradient norm stops it with :class:`TrainingError` before the
optimiser step, so the last checkpoint (written atomically every ``log.save_every`` steps and at the end)
holds finite parameters.

Checkpoints and resume: :mod:`reasonrl.trainer.checkpoint` (``save_checkpoint``, ``resume``, the ``resume``
config key and ``reasonrl train --resume``; docs/trainer.md section 7.1).
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from reasonrl.losses import (
    AdaptiveEntropyController,
    FusedLinearPolicyLoss,
    LossNormalizers,
    Sum,
    policy_loss_from_logits,
)
from reasonrl.ops import advantage_preset, group_advantages, linear_token_logprobs, token_logprobs
from reasonrl.trainer.checkpoint import resume_trainer, step_name, write_checkpoint
from reasonrl.trainer.config import TrainerConfig, build_loss_config, config_to_yaml
from reasonrl.trainer.distributed import metric_weights, prompt_seed, setup_distributed
from reasonrl.trainer.metrics import MetricsWriter, plot_curves, progress_postfix
from reasonrl.trainer.packing import (
    pack_rows,
    packed_hidden_states,
    packed_logits,
    reward_specs_for_packing,
    select_attention,
    token_budget_slices,
)
from reasonrl.trainer.rewards import build_rewards, score_rewards
from reasonrl.trainer.rollout import RolloutBackend, SamplingParams, make_backend

__all__ = [
    "Trainer",
    "TrainingError",
    "StepRecord",
    "embedded_model_path",
    "load_model_and_tokenizer",
    "task_datasets",
]

IGNORE = -100


class TrainingError(RuntimeError):
    """The run stopped (non-finite loss or gradient); the message says where and which checkpoint is kept."""


def embedded_model_path() -> Path:
    """The tiny Llama SFT-ed on the arithmetic task, shipped in the package (reasonrl/assets/tiny-arith)."""
    from importlib.resources import files

    return Path(str(files("reasonrl") / "assets" / "tiny-arith"))


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_model_and_tokenizer(
    name: str, tokenizer: str | None = None, *, dtype: str = "float32", device: str = "cpu"
):
    """``from_pretrained`` of ``name`` (``"embedded"``: the package's tiny model) and of its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = str(embedded_model_path()) if name == "embedded" else name
    model = AutoModelForCausalLM.from_pretrained(path, dtype=_DTYPES[dtype]).to(device)
    tok = AutoTokenizer.from_pretrained(tokenizer or path)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return model, tok


def task_datasets(cfg: TrainerConfig, num_train: int) -> tuple[list[dict], list[dict]]:
    """Train / held-out items of the embedded task: dicts with ``prompt``, ``reference`` (the reference
    outcome sentence), ``answers`` (the gold integer), ``level`` and ``index``."""
    from reasonrl.tasks.arithmetic import ArithmeticTask

    if cfg.task.name != "arithmetic":
        raise ValueError(
            f"task.name must be 'arithmetic' (the embedded task), got {cfg.task.name!r}; pass "
            "dataset= to Trainer for other data"
        )
    task = ArithmeticTask(cfg.task.levels, seed=cfg.task.seed)

    def items(problems):
        return [
            {"prompt": p.prompt, "reference": p.reference, "answers": p.answer, "level": p.level, "index": i}
            for i, p in enumerate(problems)
        ]

    return items(task.problems("train", num_train)), items(task.problems("heldout", cfg.eval.size))


@dataclass
class StepRecord:
    """What one step computed (the tests compare it with a slow reference step). Padded layout ``[B, T]``
    for the sequences and ``[B, T - 1]`` for the per-token values (position t predicts token t + 1)."""

    items: list[dict]
    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    truncated: list[bool]
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    loss_mask: torch.Tensor
    old_logprobs: torch.Tensor
    entropies: torch.Tensor
    ref_logprobs: torch.Tensor | None
    rewards: torch.Tensor  # [B, R]
    reward_names: list[str]
    reward_outputs: dict
    advantages: torch.Tensor
    micro_losses: list[list[float]] = field(default_factory=list)  # per optimiser step, per micro-batch


class Trainer:
    """GRPO-family RL on a Hugging Face causal LM (see the module docstring for one step).

    Args:
        config: :class:`TrainerConfig`.
        model / tokenizer: a causal LM and its tokenizer (default: ``config.model`` with ``from_pretrained``).
        dataset / eval_dataset: lists of dicts with ``prompt`` and ``reference`` (the reference outcome, or
            the gold answer for verifier rewards) and any extra columns, passed to the rewards by name
            (``answers`` for the task verifier). Default: the embedded arithmetic task.
        rewards: ``[(name, callable, weight)]`` instead of the config's reward list.
        backend: a :class:`~reasonrl.trainer.rollout.RolloutBackend` instead of ``config.rollout.backend``.
    """

    def __init__(
        self,
        config: TrainerConfig,
        *,
        model=None,
        tokenizer=None,
        dataset: Sequence[dict] | None = None,
        eval_dataset: Sequence[dict] | None = None,
        rewards=None,
        backend: RolloutBackend | None = None,
    ):
        self.config = cfg = config
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        torch.manual_seed(cfg.seed)
        # Under torchrun: the process group, this rank's device and step share (docs/trainer.md section 10).
        self.dist = setup_distributed(cfg, cfg.device)
        self.dist.check_config(cfg)
        if model is None:
            model, loaded_tok = load_model_and_tokenizer(
                cfg.model, cfg.tokenizer, dtype=cfg.dtype, device=str(self.dist.device)
            )
            tokenizer = tokenizer or loaded_tok
        if tokenizer is None:
            raise ValueError("Trainer: pass the tokenizer with the model")
        self.model, self.tokenizer = model, tokenizer
        self.dist.broadcast_parameters(model)  # every rank (and its reference copy) starts from rank 0's
        self.device = next(model.parameters()).device
        reward_specs = cfg.rewards
        if cfg.packing:  # before the reference copy below, so that it runs the same attention
            select_attention(model, cfg.packing_attention)
            reward_specs = reward_specs_for_packing(cfg.rewards)
        self.loss_config = build_loss_config(cfg)
        need = cfg.steps * cfg.prompts_per_step
        if dataset is None:
            dataset, default_eval = task_datasets(cfg, max(need, 1))
            eval_dataset = default_eval if eval_dataset is None else eval_dataset
        self.dataset, self.eval_dataset = list(dataset), list(eval_dataset or [])
        if not self.dataset:
            raise ValueError("Trainer: the dataset is empty")
        for i, item in enumerate(self.dataset[:1]):
            if not isinstance(item, dict) or "prompt" not in item:
                raise ValueError(
                    f"Trainer: dataset items must be dicts with a 'prompt' key, item {i} is {item!r}"
                )
        self.ref_model = None
        uses_ref_reward = any(
            s.name == "r3" and s.options.get("reward_policy") == "reference" for s in cfg.rewards
        )
        if self.loss_config.beta > 0 or uses_ref_reward:
            with torch.no_grad():
                self.ref_model = copy.deepcopy(model).requires_grad_(False).eval()
        self.rewards = (
            rewards
            if rewards is not None
            else build_rewards(reward_specs, model=model, tokenizer=tokenizer, reference_model=self.ref_model)
        )
        self.backend = (
            backend if backend is not None else make_backend(cfg.rollout.backend, model, tokenizer, cfg)
        )
        self.dist.wrap(model)  # fsdp2, before the optimiser: fully_shard replaces the parameters by DTensors
        if self.dist.fsdp and hasattr(self.backend, "synced_gpus"):
            self.backend.synced_gpus = True
        o = cfg.optim
        self.optimizer = torch.optim.AdamW(
            [p for p in model.parameters() if p.requires_grad],
            lr=o.lr,
            betas=tuple(o.betas),
            weight_decay=o.weight_decay,
        )
        total = max(1, cfg.steps * o.updates_per_batch * o.mini_batches)
        warm = int(o.warmup_ratio * total)

        def lr_lambda(s: int) -> float:
            if s < warm:
                return (s + 1) / (warm + 1)
            if o.schedule == "cosine":
                return 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, total - warm)))
            return 1.0

        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda)
        e = cfg.entropy_control
        self.entropy_ctl = (
            AdaptiveEntropyController(e.initial_coef, e.target, e.delta, e.coef_min, e.coef_max)
            if e.enabled
            else None
        )
        self.fused_loss = FusedLinearPolicyLoss(
            model.get_output_embeddings(), self.loss_config, chunk_rows=cfg.chunk_rows, impl=cfg.impl
        )
        self.out_dir = Path(cfg.log.out_dir)
        self.step_count = 0
        self.last_checkpoint: Path | None = None
        self.last_record: StepRecord | None = None
        self.history: list[dict] = []
        self._writer: MetricsWriter | None = None
        self._filter_set: list[dict] | None = None
        self._last_filter_step: int | None = None
        self._cursor = 0
        self._enc_cache: dict[str, list[int]] = {}
        self._resumed_from: Path | None = None  # the checkpoint resume() restored (train() then skips it)
        self._ref_fingerprint: str | None = None  # SHA-256 of the frozen reference model, once computed
        # [prompt ; completion] tokens per row of the current batch: the token-budget micro-batches.
        self._row_lengths: list[int] = []

    # ------------------------------------------------------------------------------------------------------
    # Batches
    # ------------------------------------------------------------------------------------------------------

    def _encode(self, text: str) -> list[int]:
        ids = self._enc_cache.get(text)
        if ids is None:
            ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
            self._enc_cache[text] = ids
        return ids

    def _next_items(self) -> list[dict]:
        pool = self._filter_set if self._filter_set else self.dataset
        n = self.config.prompts_per_step
        out = [pool[(self._cursor + i) % len(pool)] for i in range(n)]
        self._cursor += n
        return out

    def _pack(self, prompt_ids, completion_ids, truncated):
        """Right-padded ``[B, T]`` sequences [prompt ; completion], labels and the loss mask
        ``[B, T - 1]``. This is the record's layout in both modes; with ``packing`` the forward passes pack
        micro-batches of its rows (reasonrl.trainer.packing); the row lengths kept here size the token-budget
        micro-batches."""
        pad = self.tokenizer.pad_token_id
        seqs = [p + c for p, c in zip(prompt_ids, completion_ids, strict=True)]
        self._row_lengths = [len(s) for s in seqs]
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), pad, dtype=torch.long)
        attn = torch.zeros_like(ids)
        labels = torch.full((len(seqs), width - 1), IGNORE, dtype=torch.long)
        for i, (p, c) in enumerate(zip(prompt_ids, completion_ids, strict=True)):
            ids[i, : len(p) + len(c)] = torch.tensor(p + c, dtype=torch.long)
            attn[i, : len(p) + len(c)] = 1
            labels[i, len(p) - 1 : len(p) + len(c) - 1] = torch.tensor(c, dtype=torch.long)
        loss_mask = labels != IGNORE
        if self.config.rollout.mask_truncated_completions:
            loss_mask &= ~torch.tensor(truncated, dtype=torch.bool)[:, None]
        return ids.to(self.device), attn.to(self.device), labels.to(self.device), loss_mask.to(self.device)

    def _micro_slices(self, rows: range) -> list[range]:
        budget = self.config.optim.micro_batch_tokens
        if self.config.packing and budget:
            return token_budget_slices(rows, self._row_lengths, budget)
        mb = self.config.optim.micro_batch_size or len(rows)
        return [rows[i : i + mb] for i in range(0, len(rows), mb)]

    # ------------------------------------------------------------------------------------------------------
    # Log-probs (no_grad) and the loss
    # ------------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def _logprobs(self, model, ids, attn, labels):
        """Per-token log-probs and entropies of ``labels`` under ``model``, ``[B, T - 1]`` fp32, at the
        rollout temperature. Fused: hidden states + lm_head through ``linear_token_logprobs`` (no logits).
        With ``packing`` each micro-batch runs packed and its values are scattered back to the padded rows."""
        was = model.training
        model.eval()
        lp_rows, ent_rows = [], []
        lengths = attn.sum(1).tolist() if self.config.packing else None
        try:
            for rows in self._micro_slices(range(ids.shape[0])):
                sl = slice(rows.start, rows.stop)
                if lengths is not None:
                    lp, ent = self._packed_logprobs(model, ids, lengths, labels, rows)
                    lp_rows.append(lp)
                    ent_rows.append(ent)
                    continue
                width = int(attn[sl].sum(1).max())
                i, a, y = ids[sl, :width], attn[sl, :width], labels[sl, : width - 1]
                if self.config.loss_impl == "fused_linear":
                    hidden, weight, bias = self.dist.hidden_states_and_lm_head(model, i, a)
                    out = self._token_stats(y, hidden=hidden[:, :-1], weight=weight, bias=bias)
                else:
                    logits = model(input_ids=i, attention_mask=a, use_cache=False).logits[:, :-1]
                    out = self._token_stats(y, logits=logits)
                pad = labels.shape[1] - (width - 1)
                lp_rows.append(torch.nn.functional.pad(out.logprobs.float(), (0, pad)))
                ent_rows.append(torch.nn.functional.pad(out.entropy.float(), (0, pad)))
        finally:
            model.train(was)
        return torch.cat(lp_rows), torch.cat(ent_rows)

    def _token_stats(self, labels, *, hidden=None, weight=None, bias=None, logits=None):
        """Log-probs and entropies of ``labels`` at the rollout temperature: from hidden states and the
        lm_head through ``linear_token_logprobs`` (no logits), or from ``logits`` (``loss_impl="logits"``)."""
        temp, impl = self.loss_config.temperature, self.config.impl
        if logits is not None:
            return token_logprobs(logits, labels, temperature=temp, want_entropy=True, impl=impl)
        return linear_token_logprobs(
            hidden,
            weight,
            labels,
            bias=bias,
            temperature=temp,
            want_entropy=True,
            impl=impl,
            workspace_bytes=self.config.logprob_workspace_bytes,
        )

    def _packed_logprobs(self, model, ids, lengths, labels, rows: range):
        """One packed micro-batch of :meth:`_logprobs`: ``[len(rows), T - 1]`` log-probs and entropies."""
        batch = pack_rows(ids, lengths, rows)
        y = batch.gather(labels, IGNORE)  # [N]; prompt rows and each segment's last row are IGNORE
        if self.config.loss_impl == "fused_linear":
            hidden, weight, bias = packed_hidden_states(
                model, batch, self.config.packing_row_tokens, hidden_fn=self.dist.hidden_states_and_lm_head
            )
            out = self._token_stats(y, hidden=hidden, weight=weight, bias=bias)
        else:
            out = self._token_stats(y, logits=packed_logits(model, batch, self.config.packing_row_tokens))
        width = labels.shape[1]
        return batch.scatter(out.logprobs.float(), width), batch.scatter(out.entropy.float(), width)

    def _micro_loss(self, rec: StepRecord, rows: range, normalizers: LossNormalizers):
        if self.config.packing:
            return self._packed_micro_loss(rec, rows, normalizers)
        sl = slice(rows.start, rows.stop)
        width = int(rec.attention_mask[sl].sum(1).max())
        ids, attn = rec.input_ids[sl, :width], rec.attention_mask[sl, :width]
        labels, mask = rec.labels[sl, : width - 1], rec.loss_mask[sl, : width - 1]
        kw = dict(
            advantages=rec.advantages[sl],
            mask=mask,
            old_logprobs=rec.old_logprobs[sl, : width - 1],
            ref_logprobs=None if rec.ref_logprobs is None else rec.ref_logprobs[sl, : width - 1],
            normalizers=normalizers,
            entropy_coef=None if self.entropy_ctl is None else self.entropy_ctl.coef,
        )
        if self.config.loss_impl == "fused_linear":
            hidden, _, _ = self.dist.hidden_states_and_lm_head(self.model, ids, attn)
            return self.fused_loss(hidden[:, :-1], labels.masked_fill(~mask, IGNORE), **kw)
        logits = self.model(input_ids=ids, attention_mask=attn, use_cache=False).logits[:, :-1]
        return policy_loss_from_logits(
            logits, labels.masked_fill(~mask, IGNORE), config=self.loss_config, impl=self.config.impl, **kw
        )

    def _packed_micro_loss(self, rec: StepRecord, rows: range, normalizers: LossNormalizers):
        """:meth:`_micro_loss` on one packed micro-batch: ``[N, H]`` hidden states with ``cu_seqlens``
        (docs/ops.md 1.2), the per-token inputs gathered from the padded record."""
        batch = pack_rows(rec.input_ids, rec.attention_mask.sum(1).tolist(), rows)
        mask = batch.gather(rec.loss_mask, False)
        labels = batch.gather(rec.labels, IGNORE).masked_fill(~mask, IGNORE)
        kw = dict(
            advantages=rec.advantages[rows.start : rows.stop],
            mask=mask,
            cu_seqlens=batch.cu_seqlens,
            old_logprobs=batch.gather(rec.old_logprobs, 0.0),
            ref_logprobs=None if rec.ref_logprobs is None else batch.gather(rec.ref_logprobs, 0.0),
            normalizers=normalizers,
            entropy_coef=None if self.entropy_ctl is None else self.entropy_ctl.coef,
        )
        if self.config.loss_impl == "fused_linear":
            hidden, _, _ = packed_hidden_states(
                self.model,
                batch,
                self.config.packing_row_tokens,
                hidden_fn=self.dist.hidden_states_and_lm_head,
            )
            return self.fused_loss(hidden, labels, **kw)
        logits = packed_logits(self.model, batch, self.config.packing_row_tokens)
        # The packed [N, V] logits are contiguous and read by nothing but the loss, so the gradient may
        # overwrite them: one logits-sized buffer less per micro-batch (docs/losses.md 13.1).
        return policy_loss_from_logits(logits, labels, config=self.loss_config, impl=self.config.impl,
                                       inplace_backward=True, **kw)

    # ------------------------------------------------------------------------------------------------------
    # One step
    # ------------------------------------------------------------------------------------------------------

    def step(self) -> dict:
        """One rollout batch and its policy updates; returns the step's metrics (also written to JSONL)."""
        cfg, r = self.config, self.config.rollout
        times: dict[str, float] = {}
        t_step = time.perf_counter()
        items = self._next_items()
        # This rank's whole groups (all of them in one process), laid out per mini-batch (docs/trainer.md 10).
        positions = self.dist.positions(len(items), cfg.optim.mini_batches)
        items = [items[j] for j in positions]
        prompt_ids = [self._encode(it["prompt"]) for it in items]
        K = r.group_size
        step_seed = cfg.seed * 1_000_003 + self.step_count

        t = time.perf_counter()
        params = SamplingParams(
            num_samples=K,
            temperature=r.temperature,
            top_p=r.top_p,
            top_k=r.top_k,
            max_new_tokens=r.max_new_tokens,
            seed=step_seed,
            prompt_seeds=tuple(prompt_seed(step_seed, j) for j in positions)
            if r.seed_per_prompt or self.dist.enabled
            else None,
        )
        roll = self.backend.generate(prompt_ids, params)
        times["time/generation"] = time.perf_counter() - t
        B = len(items) * K
        if len(roll.completion_ids) != B:
            raise RuntimeError(
                f"rollout backend returned {len(roll.completion_ids)} completions, expected "
                f"{B} ({len(items)} prompts x {K})"
            )
        rows_prompt = [p for p in prompt_ids for _ in range(K)]
        ids, attn, labels, loss_mask = self._pack(rows_prompt, roll.completion_ids, roll.truncated)

        t = time.perf_counter()
        old_lp, entropies = self._logprobs(self.model, ids, attn, labels)
        ref_lp = None
        if self.loss_config.beta > 0:
            ref_lp, _ = self._logprobs(self.ref_model, ids, attn, labels)
        times["time/old_logprobs"] = time.perf_counter() - t

        t = time.perf_counter()
        texts = self.tokenizer.batch_decode(roll.completion_ids, skip_special_tokens=True)
        row_items = [it for it in items for _ in range(K)]
        kwargs: dict[str, Any] = dict(
            prompts=[it["prompt"] for it in row_items],
            completions=texts,
            references=[it.get("reference") for it in row_items],
            prompt_ids=rows_prompt,
            completion_ids=roll.completion_ids,
            group_size=K,
            completion_lengths=[len(c) for c in roll.completion_ids],
            entropy=[
                entropies[i, len(p) - 1 : len(p) - 1 + len(c)].cpu()
                for i, (p, c) in enumerate(zip(rows_prompt, roll.completion_ids, strict=True))
            ],
        )
        if all(it.get("reference") is not None for it in row_items):
            kwargs["reference_ids"] = [self._encode(it["reference"]) for it in row_items]
        for key in items[0]:
            if key not in ("prompt", "reference") and key not in kwargs:
                kwargs[key] = [it.get(key) for it in row_items]
        reward_cols, reward_outs = score_rewards(
            self.rewards,
            kwargs,
            group_size=K,
            prompt_indices=[it.get("index", None) for it in items]
            if all("index" in it for it in items)
            else None,
        )
        for name, fn, _ in self.rewards:  # rewards that adapt to training (LASER-D's length monitor)
            hook = getattr(fn, "after_step", None)
            if callable(hook):
                hook(reward_outs[name], step=self.step_count, group_size=K)
        times["time/reward"] = time.perf_counter() - t

        weights = torch.tensor([w for _, _, w in self.rewards], dtype=torch.float32)
        a = cfg.advantages
        adv_kw = advantage_preset(a.preset)
        for k in ("eps", "singleton", "nan_policy", "gdpo_final"):
            if getattr(a, k) is not None:
                adv_kw[k] = getattr(a, k)
        lengths = loss_mask.sum(1).cpu()
        adv = group_advantages(
            reward_cols,
            group_size=K,
            estimator=a.estimator,
            scale=a.scale,
            reward_weights=weights if reward_cols.shape[1] > 1 else None,
            multi_reward=a.multi_reward,
            lengths=lengths,
            whiten_eps=a.whiten_eps,
            gpg_f_norm=a.gpg_f_norm,
            **adv_kw,
        )
        rec = StepRecord(
            items,
            prompt_ids,
            roll.completion_ids,
            roll.truncated,
            ids,
            attn,
            labels,
            loss_mask,
            old_lp,
            entropies,
            ref_lp,
            reward_cols,
            [n for n, _, _ in self.rewards],
            reward_outs,
            adv.advantages.to(self.device),
        )

        t_loss = t_opt = 0.0
        agg: dict[str, Sum] = {}
        grad_norms = []
        mb_size = B // cfg.optim.mini_batches
        # The loss tokens of every mini-batch over all ranks: the GLOBAL normaliser (one all-reduce per step).
        global_tokens = self.dist.all_reduce(
            loss_mask.reshape(cfg.optim.mini_batches, -1).sum(1).to(torch.float64)
        ).tolist()
        world = self.dist.world_size
        for epoch in range(cfg.optim.updates_per_batch):
            for m in range(cfg.optim.mini_batches):
                rows = range(m * mb_size, (m + 1) * mb_size)
                micro = self._micro_slices(rows)
                normalizers = LossNormalizers(
                    # A mini-batch without loss tokens (every completion masked) has a zero loss; 1 is TRL's
                    # clamp(min=1) of an empty window (a Python 0 is rejected by LossNormalizers).
                    num_items_in_batch=max(1, int(global_tokens[m])),
                    global_num_seqs=len(rows) * world,
                    grad_accum_steps=len(micro),
                    num_processes=world,
                    padded_length=r.max_new_tokens,
                )
                losses = []
                t = time.perf_counter()
                for u, mrows in enumerate(micro):
                    try:
                        out = self._micro_loss(rec, mrows, normalizers)
                    except FloatingPointError as exc:  # the fused ops' validation saw NaN / inf log-probs
                        self.optimizer.zero_grad(set_to_none=True)
                        what = f"non-finite loss inputs ({exc})"
                        raise TrainingError(self._fault(what, epoch, m, u)) from exc
                    value = float(out.loss.detach())
                    if not math.isfinite(value):
                        self.optimizer.zero_grad(set_to_none=True)
                        raise TrainingError(self._fault(f"non-finite loss ({value})", epoch, m, u))
                    self.dist.set_gradient_sync(self.model, u == len(micro) - 1)
                    out.loss.backward()
                    losses.append(value)
                    self._accumulate(agg, out.metrics)
                    if self.entropy_ctl is not None:
                        self.entropy_ctl.observe(out.metrics.entropy_effective)
                t_loss += time.perf_counter() - t
                rec.micro_losses.append(losses)
                t = time.perf_counter()
                self.dist.reduce_gradients(self.model)  # ddp: the ranks' gradients averaged
                norm = torch.nn.utils.clip_grad_norm_(
                    self.model.parameters(),
                    cfg.optim.max_grad_norm if cfg.optim.max_grad_norm > 0 else float("inf"),
                )
                norm = self.dist.to_float(norm)
                if not math.isfinite(norm):
                    self.optimizer.zero_grad(set_to_none=True)
                    raise TrainingError(self._fault(f"non-finite gradient norm ({norm})", epoch, m, None))
                grad_norms.append(norm)
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                if self.entropy_ctl is not None:
                    self.entropy_ctl.step()
                for _, fn, _ in self.rewards:
                    if hasattr(fn, "step") and callable(fn.step):
                        fn.step()  # R3's lagged reward policy counts optimiser steps
                self.backend.sync_weights(self.model)
                t_opt += time.perf_counter() - t
        times["time/loss_fwd_bwd"] = t_loss
        times["time/optimizer"] = t_opt
        self.step_count += 1
        self.last_record = rec
        times["time/step"] = time.perf_counter() - t_step
        metrics = self._metrics(rec, adv, self.dist.reduce_sums(agg), grad_norms, times)
        return self.dist.reduce_metrics(metrics, metric_weights(rec))

    def _fault(self, what: str, epoch: int, mini: int, micro: int | None) -> str:
        where = f"step {self.step_count + 1}, update pass {epoch}, mini-batch {mini}"
        if micro is not None:
            where += f", micro-batch {micro}"
        kept = (
            f"the last checkpoint, {self.last_checkpoint}, is kept"
            if self.last_checkpoint is not None
            else "no checkpoint was written yet (log.save_every)"
        )
        return (
            f"{what} at {where}: training stopped before the optimiser step; {kept}. Lower optim.lr, check "
            "the rewards and the loss settings."
        )

    @staticmethod
    def _accumulate(agg: dict, metrics) -> None:
        for name in (
            "kl",
            "entropy",
            "ratio_mean",
            "clip_region",
            "clip_low",
            "clip_high",
            "pg_clipfrac",
            "cispo_clip",
            "ppo_kl",
        ):
            v = getattr(metrics, name, None)
            if isinstance(v, Sum):
                agg[name] = agg[name] + v if name in agg else v

    def _metrics(self, rec: StepRecord, adv, agg: dict, grad_norms: list[float], times: dict) -> dict:
        total = rec.rewards.clone()
        w = torch.tensor([w for _, _, w in self.rewards], dtype=torch.float32)
        weighted = torch.where(torch.isnan(total), torch.zeros_like(total), total * w)
        scored = ~torch.isnan(total).all(1)
        reward = torch.where(scored, weighted.sum(1), torch.full_like(weighted[:, 0], math.nan))
        m: dict[str, Any] = {"kind": "train", "step": self.step_count}
        m["reward"] = _nanmean(reward)
        for j, name in enumerate(rec.reward_names):
            if len(rec.reward_names) > 1:
                m[f"reward/{name}"] = _nanmean(rec.rewards[:, j])
            diag = rec.reward_outputs[name].diagnostics
            for key in ("r3", "r_len"):
                if isinstance(diag.get(key), torch.Tensor):
                    m[key] = _nanmean(diag[key])
        m["frac_unscorable"] = float((~scored).float().mean())
        m["frac_reward_zero_std"] = float(adv.zero_std_rows) / adv.num_rows
        m["advantage_abs_mean"] = float(adv.advantages.abs().mean())
        answers = [it.get("answers") for it in rec.items]
        if all(
            isinstance(a, int) for a in answers
        ):  # the embedded task: the batch's accuracy, for the curves
            from reasonrl.tasks.arithmetic import verify

            texts = self.tokenizer.batch_decode(rec.completion_ids, skip_special_tokens=True)
            K = len(rec.completion_ids) // len(rec.items)
            m["accuracy"] = sum(verify(t, answers[i // K]) == "correct" for i, t in enumerate(texts)) / len(
                texts
            )
        names = {"kl": "kl", "entropy": "entropy", "ratio_mean": "ratio", "ppo_kl": "ppo_kl"}
        for key, out in names.items():
            if key in agg:
                m[out] = float(agg[key].mean())
        clip = agg.get("clip_region") or agg.get("pg_clipfrac") or agg.get("cispo_clip")
        if clip is not None:
            m["clip_ratio"] = float(clip.mean())
        flat = [v for pass_losses in rec.micro_losses for v in pass_losses]
        m["loss"] = sum(flat) / max(1, len(rec.micro_losses))
        m["grad_norm"] = sum(grad_norms) / max(1, len(grad_norms))
        m["lr"] = self.scheduler.get_last_lr()[0]
        if self.entropy_ctl is not None:
            m["entropy_coef"] = self.entropy_ctl.coef
        lengths = [len(c) for c in rec.completion_ids]
        m["completion_length"] = sum(lengths) / len(lengths)
        m["frac_truncated"] = sum(rec.truncated) / len(rec.truncated)
        tokens = int(rec.attention_mask.sum())
        m["tokens"] = tokens
        m["tokens_per_s"] = tokens / max(times["time/step"], 1e-9)
        m.update({k: round(v, 4) for k, v in times.items()})
        return m

    # ------------------------------------------------------------------------------------------------------
    # Evaluation, checkpoints, the loop
    # ------------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self, items: Sequence[dict] | None = None) -> dict:
        """Greedy held-out accuracy: the task verifier when items have ``answers``, else the numeric verifier
        against ``reference``. Returns ``heldout_accuracy``, per-level accuracies when items have ``level``,
        and the mean completion length."""
        from reasonrl.rewards import NumericAnswerReward
        from reasonrl.tasks.arithmetic import verify

        items = list(self.eval_dataset if items is None else items)
        if not items:
            return {}
        e, model = self.config.eval, self.model
        was = model.training
        model.eval()
        correct, lengths = [], []
        pad, eos = self.tokenizer.pad_token_id, self.tokenizer.eos_token_id
        numeric = NumericAnswerReward()
        try:
            for s in range(0, len(items), e.batch_size):
                chunk = items[s : s + e.batch_size]
                enc = [self._encode(it["prompt"]) for it in chunk]
                width = max(len(p) for p in enc)
                ids = torch.full((len(enc), width), pad, dtype=torch.long)
                mask = torch.zeros_like(ids)
                for i, p in enumerate(enc):
                    ids[i, width - len(p) :] = torch.tensor(p)
                    mask[i, width - len(p) :] = 1
                out = model.generate(
                    input_ids=ids.to(self.device),
                    attention_mask=mask.to(self.device),
                    do_sample=False,
                    max_new_tokens=e.max_new_tokens,
                    pad_token_id=pad,
                    eos_token_id=eos,
                    **self.dist.generate_kwargs(),
                )
                gen = out[:, width:].tolist()
                texts = self.tokenizer.batch_decode(gen, skip_special_tokens=True)
                for it, text, row in zip(chunk, texts, gen, strict=True):
                    lengths.append(row.index(eos) + 1 if eos in row else len(row))
                    if isinstance(it.get("answers"), int):
                        correct.append(verify(text, it["answers"]) == "correct")
                    else:
                        correct.append(float(numeric([text], [it.get("reference")]).rewards[0]) == 1.0)
        finally:
            model.train(was)
        res = {
            "heldout_accuracy": sum(correct) / len(correct),
            "heldout_n": len(correct),
            "heldout_completion_length": sum(lengths) / len(lengths),
        }
        levels = sorted({it["level"] for it in items if "level" in it})
        for lv in levels:
            sub = [c for c, it in zip(correct, items, strict=True) if it.get("level") == lv]
            res[f"heldout_accuracy_level{lv}"] = sum(sub) / max(1, len(sub))
        return res

    def save_checkpoint(self) -> Path:
        """Write the complete training state (model, optimiser, scheduler, RNG states, data position, reward,
        backend and entropy-controller state, metrics history) to ``checkpoints/step-NNNNNN`` atomically, with
        a manifest of file hashes written last; older checkpoints beyond ``save_total_limit`` are removed
        (:func:`reasonrl.trainer.checkpoint.write_checkpoint`). Distributed: rank 0 writes (under FSDP2 the
        full state dicts, which every rank gathers first) while the other ranks wait."""
        model_sd, optim_sd = self.dist.full_state_dicts(self.model, self.optimizer)
        if self.dist.is_main:
            self.last_checkpoint = write_checkpoint(self, model_state=model_sd, optimizer_state=optim_sd)
        else:
            self.last_checkpoint = self.out_dir / "checkpoints" / step_name(self.step_count)
        self.dist.barrier()
        return self.last_checkpoint

    def resume(self, path: str | os.PathLike = "latest") -> Path | None:
        """Restore the state of a checkpoint so that :meth:`train` continues the run bit-identically.

        ``path``: ``"latest"`` (the newest intact checkpoint under ``log.out_dir``; damaged ones are skipped
        with a warning; none: returns None and the run starts at step 0), a run or checkpoints folder (its
        newest intact checkpoint) or a checkpoint folder (must be intact). Build the Trainer as the run was
        built (same config, initial model and dataset); the checkpoint's weights replace the model's.

        Raises:
            reasonrl.trainer.checkpoint.CheckpointError: a named checkpoint is damaged, or the checkpoint
                does not fit this trainer (other rewards, reference model, entropy control).
        """
        return resume_trainer(self, path)

    def _log(self, record: dict) -> None:
        self.history.append(record)
        if self._writer is not None:
            self._writer.write(record)

    def _maybe_filter(self) -> None:
        """DRO's R3 filter round (docs/rewards.md 2.5) over the prompt pool, when enabled and due."""
        f = self.config.r3_filter
        if not f.enabled:
            return
        interval = f.interval_steps or max(
            1, len(self._filter_set or self.dataset) // self.config.prompts_per_step
        )
        # Due before the first step, then `interval` steps after the previous round. (Multiples of an interval
        # that changes with the kept set's size would fire on consecutive steps, e.g. at 6 and 7.)
        if self._last_filter_step is not None and self.step_count - self._last_filter_step < interval:
            return
        self._last_filter_step = self.step_count
        from reasonrl.rewards import R3Config, R3FilterConfig, r3_filter_round
        from reasonrl.trainer.rewards import _options

        r3_opts = next((s.options for s in self.config.rewards if s.name == "r3"), {})
        fcfg = _options("r3_filter", R3FilterConfig, dict(f.options))
        pool = (
            self.dataset[: f.pool_size]
            if self._filter_set is None
            else self.dataset[(self._cursor % len(self.dataset)) :][: f.pool_size]
        )
        r = self.config.rollout

        def sample_fn(prompts, n):
            roll = self.backend.generate(
                prompts,
                SamplingParams(
                    num_samples=n,
                    temperature=r.temperature,
                    top_p=r.top_p,
                    top_k=r.top_k,
                    max_new_tokens=r.max_new_tokens,
                    seed=self.config.seed + 7919 * (self.step_count + 1),
                ),
            )
            return [roll.completion_ids[i * n : (i + 1) * n] for i in range(len(prompts))]

        items = [
            {"prompt": self._encode(it["prompt"]), "reference": self._encode(it["reference"]), "item": it}
            for it in pool
        ]
        result = r3_filter_round(
            items,
            model=self.model,
            sample_fn=sample_fn,
            tokenizer=self.tokenizer,
            previous_train_set=None
            if self._filter_set is None
            else [
                {"prompt": self._encode(it["prompt"]), "reference": self._encode(it["reference"]), "item": it}
                for it in self._filter_set
            ],
            config=fcfg,
            r3_config=_options("r3", R3Config, dict(r3_opts)),
            key=lambda x: x["item"].get("index", repr(x["item"]["prompt"])),
        )
        self._filter_set = [x["item"] for x in result.kept] or self._filter_set
        self._log(
            {
                "kind": "filter",
                "step": self.step_count,
                "pool": len(pool),
                "kept": len(result.kept),
                "survivors": len(result.survivors),
                "carried": len(result.carried),
            }
        )

    def train(self) -> dict:
        """Evaluate, run ``config.steps`` steps (progress bar, JSONL, checkpoints), evaluate, plot. Returns
        the summary (also written to ``summary.json``)."""
        from tqdm.auto import tqdm

        cfg = self.config
        main = self.dist.is_main  # distributed: rank 0 alone writes files and shows the progress bar
        if cfg.resume and self._resumed_from is None:
            self.resume(cfg.resume)
        resumed = self._resumed_from is not None
        if main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            (self.out_dir / "config.yaml").write_text(config_to_yaml(cfg))
            self._writer = MetricsWriter(
                self.out_dir, cfg.log.tensorboard, purge_step=self.step_count + 1 if resumed else None
            )
        t0 = time.perf_counter()
        try:
            if resumed:  # the initial evaluation is in the restored history
                before = next(
                    (
                        {k: v for k, v in h.items() if k not in ("kind", "step")}
                        for h in self.history
                        if h.get("kind") == "eval" and h.get("step") == 0
                    ),
                    {},
                )
            else:
                before = self.evaluate()
                self._log({"kind": "eval", "step": 0, **before})
            bar = tqdm(
                total=cfg.steps,
                initial=min(self.step_count, cfg.steps),
                desc="reasonrl train",
                disable=not (cfg.log.progress and main),
                dynamic_ncols=True,
            )
            while self.step_count < cfg.steps:
                self._maybe_filter()
                metrics = self.step()
                self._log(metrics)
                bar.set_postfix(progress_postfix(metrics), refresh=False)
                bar.update(1)
                s = self.step_count
                if cfg.eval.every and s % cfg.eval.every == 0 and s < cfg.steps:
                    self._log({"kind": "eval", "step": s, **self.evaluate()})
                if cfg.log.save_every and s % cfg.log.save_every == 0:
                    self.save_checkpoint()
            bar.close()
            after = self.evaluate()
            self._log({"kind": "eval", "step": self.step_count, **after})
            ckpt = self.save_checkpoint()
        finally:
            if self._writer is not None:
                self._writer.close()
                self._writer = None
        png = (
            plot_curves(self.history, self.out_dir / "curves.png", title=f"reasonrl train ({cfg.model})")
            if cfg.log.plot and main
            else None
        )
        train_rows = [h for h in self.history if h.get("kind") == "train"]
        summary = {
            "steps": self.step_count,
            "wall_s": round(time.perf_counter() - t0, 1),
            "heldout_accuracy_before": before.get("heldout_accuracy"),
            "heldout_accuracy_after": after.get("heldout_accuracy"),
            "before": before,
            "after": after,
            "reward_first": train_rows[0]["reward"] if train_rows else None,
            "reward_last": train_rows[-1]["reward"] if train_rows else None,
            "mean_time": {
                k: sum(r[k] for r in train_rows) / len(train_rows)
                for k in train_rows[0]
                if k.startswith("time/")
            }
            if train_rows
            else {},
            "metrics": str(self.out_dir / "metrics.jsonl"),
            "curves": None if png is None else str(png),
            "checkpoint": str(ckpt),
            "resumed_from": None if self._resumed_from is None else str(self._resumed_from),
        }
        if main:
            (self.out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        return summary


def _nanmean(x: torch.Tensor) -> float:
    x = x.float()
    ok = ~torch.isnan(x)
    return float(x[ok].mean()) if bool(ok.any()) else math.nan
