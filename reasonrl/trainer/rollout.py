"""Rollout backends: K sampled completions per prompt (docs/trainer.md section 5).

The trainer only talks to a :class:`RolloutBackend`:

    backend.generate(prompt_ids, params) -> Rollouts      # B prompts in, B x K completions out
    backend.sync_weights(model)                            # after every optimiser step

:class:`HFGenerateBackend` runs transformers' ``generate`` on the policy itself (KV cache, sampling), so its
``sync_weights`` has nothing to do. An engine that keeps its own copy of the weights (vLLM, SGLang, a remote
server) implements the same two methods: ``generate`` returns the completion token ids (and, when it has
them, the per-token sampling log-probs, which the loss's rollout correction can use) and ``sync_weights``
pushes the trainer's parameters to the engine. Name it in the config as
``rollout.backend="pkg.module:Class"``; the class is built as ``Class(model, tokenizer, config)``.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

__all__ = ["SamplingParams", "Rollouts", "RolloutBackend", "HFGenerateBackend", "make_backend"]


@dataclass(frozen=True)
class SamplingParams:
    """num_samples: K completions per prompt; temperature, top_p, top_k (0: off), max_new_tokens; seed: the
    generator seed of this call (None: the global RNG state). prompt_seeds: None, or one seed per prompt:
    each prompt's K completions are then sampled from its own seed, independently of the other prompts of
    the call (what makes a distributed run's rollouts those of one process, docs/trainer.md section 10);
    it takes precedence over ``seed``."""

    num_samples: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 64
    seed: int | None = None
    prompt_seeds: tuple[int, ...] | None = None


@dataclass
class Rollouts:
    """The completions of B prompts, group-contiguous: rows ``i*K ... i*K+K-1`` belong to prompt ``i``.

    completion_ids: B*K lists of token ids, ending with the EOS token when the model stopped (nothing after
    it). truncated: B*K flags, True when ``max_new_tokens`` was reached without EOS. sampling_logprobs: None,
    or B*K 1-D fp32 tensors of the sampler's log-probability of each completion token (engines whose
    numerics differ from the trainer's: feeds ``PolicyLossConfig.is_correction``).
    """

    completion_ids: list[list[int]]
    truncated: list[bool]
    sampling_logprobs: list[torch.Tensor] | None = None


@runtime_checkable
class RolloutBackend(Protocol):
    def generate(self, prompt_ids: list[list[int]], params: SamplingParams) -> Rollouts: ...

    def sync_weights(self, model: torch.nn.Module) -> None: ...


class HFGenerateBackend:
    """transformers ``generate`` on the policy: left-padded prompts, ``num_return_sequences=K``, KV cache.

    Args:
        model: the policy (a causal LM). tokenizer: gives the pad and EOS ids. batch_size: prompts per
            ``generate`` call (0: all). synced_gpus: transformers' ``synced_gpus`` (set by the trainer under
            FSDP2: every forward is a collective, so a rank whose completions have ended keeps stepping
            until every rank's have).
    """

    def __init__(self, model: torch.nn.Module, tokenizer, batch_size: int = 0, synced_gpus: bool = False):
        self.model, self.tokenizer, self.batch_size = model, tokenizer, int(batch_size)
        self.synced_gpus = bool(synced_gpus)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.eos_id = tokenizer.eos_token_id
        if self.eos_id is None:
            raise ValueError(
                "HFGenerateBackend: the tokenizer has no eos_token_id (needed to end completions)"
            )

    def sync_weights(self, model: torch.nn.Module) -> None:
        """Nothing to do: ``generate`` runs on the policy's own parameters."""

    @torch.no_grad()
    def generate(self, prompt_ids: list[list[int]], params: SamplingParams) -> Rollouts:
        model = self.model
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        step = self.batch_size or len(prompt_ids)
        ids_out: list[list[int]] = []
        truncated: list[bool] = []
        gen_kwargs = dict(
            do_sample=True,
            temperature=params.temperature,
            top_p=params.top_p,
            top_k=params.top_k if params.top_k > 0 else None,
            max_new_tokens=params.max_new_tokens,
            num_return_sequences=params.num_samples,
            pad_token_id=self.pad_id,
            eos_token_id=self.eos_id,
            use_cache=True,
        )
        if self.synced_gpus:
            gen_kwargs["synced_gpus"] = True
        seeds = params.prompt_seeds
        if seeds is not None and len(seeds) != len(prompt_ids):
            raise ValueError(
                f"SamplingParams.prompt_seeds has {len(seeds)} seeds for {len(prompt_ids)} prompts"
            )
        # Per-prompt seeds: one generate call per prompt, seeded, and no padding (a prompt's sampled
        # tokens depend only on its seed and the weights, not on the other prompts of the batch).
        starts = range(0, len(prompt_ids), 1 if seeds is not None else step)
        try:
            if params.seed is not None and seeds is None:
                torch.manual_seed(params.seed)
            for s in starts:
                if seeds is not None:
                    torch.manual_seed(seeds[s])
                chunk = prompt_ids[s : s + (1 if seeds is not None else step)]
                width = max(len(p) for p in chunk)
                ids = torch.full((len(chunk), width), self.pad_id, dtype=torch.long)
                mask = torch.zeros_like(ids)
                for i, p in enumerate(chunk):  # left padding: every prompt ends at the same column
                    ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
                    mask[i, width - len(p) :] = 1
                out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **gen_kwargs)
                for row in out[:, width:].tolist():
                    if self.eos_id in row:
                        cut = row.index(self.eos_id) + 1
                        ids_out.append(row[:cut])
                        truncated.append(False)
                    else:
                        ids_out.append(row)
                        truncated.append(True)
        finally:
            model.train(was_training)
        return Rollouts(ids_out, truncated)


def make_backend(name: str, model: torch.nn.Module, tokenizer, config) -> RolloutBackend:
    """``"hf"`` or ``"pkg.module:Class"`` (built as ``Class(model, tokenizer, config)``)."""
    if name == "hf":
        return HFGenerateBackend(model, tokenizer, batch_size=config.rollout.generation_batch_size)
    module, sep, attr = name.partition(":")
    if not sep:
        raise ValueError(f"rollout.backend must be 'hf' or 'module:Class', got {name!r}")
    backend = getattr(importlib.import_module(module), attr)(model, tokenizer, config)
    if not isinstance(backend, RolloutBackend):
        raise TypeError(
            f"rollout.backend {name!r} must implement generate(prompt_ids, params) and "
            "sync_weights(model) (reasonrl.trainer.rollout.RolloutBackend)"
        )
    return backend
