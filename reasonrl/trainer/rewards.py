"""Reward plumbing of the trainer (docs/trainer.md section 6; the interface is docs/rewards.md section 1).

Every reward is called with the same keyword arguments (each one ignores those it does not use)::

    prompts, completions, references       text, one entry per completion (B = prompts x K)
    prompt_ids, completion_ids, reference_ids   token-id lists (ids take precedence over text in R3)
    group_size=K                            groups are contiguous blocks of K rows
    entropy                                 per completion token, from the old-policy pass (PEAR)
    completion_lengths                      tokens per completion (LASER)
    <dataset columns>                       e.g. ``answers`` for the embedded task's verifier

and returns a ``RewardOutput`` (rewards ``[B]``, NaN = unscorable; diagnostics). The trainer stacks the R
rewards into ``[B, R]`` and passes them with their weights to ``group_advantages`` (``sum_then_normalize``:
NaN entries are left out of the sum, as ``reasonrl.rewards.WeightedSumReward`` does).

Faults: a reward that raises is re-run prompt by prompt to find the first prompt that reproduces the error,
and reported as :class:`RewardError` naming the reward and that prompt (never turned into NaN); +-inf values
are rejected the same way.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from reasonrl.rewards import (
    LaserConfig,
    LaserReward,
    NumericAnswerConfig,
    NumericAnswerReward,
    PEARConfig,
    PEARReward,
    R3Config,
    R3Reward,
    RewardOutput,
)
from reasonrl.tasks.arithmetic import verify

__all__ = ["RewardError", "TaskVerifierReward", "build_rewards", "score_rewards", "REWARD_CONFIGS"]

#: The config dataclass of each built-in reward name (``rewards[i].options`` are its fields).
REWARD_CONFIGS = {
    "r3": R3Config,
    "numeric": NumericAnswerConfig,
    "pear": PEARConfig,
    "laser": LaserConfig,
    "task": None,
}


class RewardError(RuntimeError):
    """A reward function raised (or returned +-inf); the message names the reward and the prompt."""


class TaskVerifierReward:
    """The embedded task's verifier as a reward: 1.0 when the integer in the last ``\\boxed{}`` after
    ``</think>`` equals the gold answer, else 0.0 (also for a malformed completion). Needs the dataset column
    ``answers``. Diagnostics: ``status`` (correct / incorrect / bad_format)."""

    name = "task"

    def __call__(
        self, completions: Sequence[str], answers: Sequence[int] | None = None, **kwargs
    ) -> RewardOutput:
        if answers is None or len(answers) != len(completions):
            raise ValueError("TaskVerifierReward: answers (one gold integer per completion) are required")
        status = [verify(c, a) for c, a in zip(completions, answers, strict=True)]
        rewards = torch.tensor([1.0 if s == "correct" else 0.0 for s in status], dtype=torch.float32)
        return RewardOutput(rewards, {"status": status})


def _options(name: str, cls, options: dict) -> Any:
    valid = [f.name for f in dataclasses.fields(cls)]
    bad = [k for k in options if k not in valid]
    if bad:
        from reasonrl.trainer.config import ConfigError

        raise ConfigError(
            f"unknown option{'s' if len(bad) > 1 else ''} {', '.join(map(repr, bad))} for reward "
            f"{name!r}; valid options: {', '.join(valid)}"
        )
    conv = {k: tuple(v) if isinstance(v, list) else v for k, v in options.items()}  # YAML lists -> id tuples
    return cls(**conv)


def build_rewards(specs, *, model, tokenizer, reference_model=None) -> list[tuple[str, Callable, float]]:
    """``[(name, reward, weight)]`` for the config's ``rewards`` list."""
    out = []
    seen: dict[str, int] = {}
    for spec in specs:
        name, opts = spec.name, dict(spec.options)
        if name == "r3":
            cfg = _options(name, R3Config, opts)
            ref = reference_model if cfg.reward_policy == "reference" else None
            fn = R3Reward(model, tokenizer, cfg, reference_model=ref)
        elif name == "numeric":
            fn = NumericAnswerReward(_options(name, NumericAnswerConfig, opts))
        elif name == "pear":
            fn = PEARReward(_options(name, PEARConfig, opts), tokenizer=tokenizer)
        elif name == "laser":
            fn = LaserReward(_options(name, LaserConfig, opts))
        elif name == "task":
            if opts:
                from reasonrl.trainer.config import ConfigError

                raise ConfigError(f"reward 'task' takes no options, got {sorted(opts)}")
            fn = TaskVerifierReward()
        elif ":" in name:
            module, _, attr = name.partition(":")
            obj = getattr(importlib.import_module(module), attr)
            fn = obj(**opts) if isinstance(obj, type) else obj
        else:
            from reasonrl.trainer.config import ConfigError

            raise ConfigError(
                f"unknown reward {name!r}; valid names: {', '.join(REWARD_CONFIGS)} or 'module:callable'"
            )
        seen[name] = seen.get(name, 0) + 1
        label = name if seen[name] == 1 else f"{name}_{seen[name]}"
        out.append((label, fn, float(spec.weight)))
    return out


def _slice(kwargs: dict, rows: slice, batch: int) -> dict:
    """The keyword arguments restricted to ``rows`` (every per-completion sequence or tensor)."""
    sub = {}
    for k, v in kwargs.items():
        if isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == batch:
            sub[k] = v[rows]
        elif isinstance(v, (list, tuple)) and len(v) == batch:
            sub[k] = v[rows]
        else:
            sub[k] = v
    return sub


def _as_output(name: str, out: Any, batch: int) -> RewardOutput:
    if not isinstance(out, RewardOutput):
        if isinstance(out, torch.Tensor):
            out = RewardOutput(out)
        else:
            out = RewardOutput(
                torch.as_tensor([math.nan if v is None else float(v) for v in out], dtype=torch.float32)
            )
    if out.rewards.shape != (batch,):
        raise RewardError(
            f"reward {name!r} returned shape {tuple(out.rewards.shape)}, expected [{batch}] (one "
            "value per completion)"
        )
    return out


def score_rewards(
    rewards: list[tuple[str, Callable, float]],
    kwargs: dict,
    *,
    group_size: int,
    prompt_indices: Sequence[int] | None = None,
) -> tuple[torch.Tensor, dict[str, RewardOutput]]:
    """Call every reward; returns ``(values [B, R] fp32, {name: RewardOutput})``.

    Raises:
        RewardError: a reward raised or returned +-inf. The message names the reward and the first prompt (its
            index in the batch and, when ``prompt_indices`` is given, in the dataset) that reproduces it.
    """
    batch = len(kwargs["completions"])
    num_prompts = batch // group_size
    cols, outs = [], {}

    def where(g: int) -> str:
        ds = f", dataset index {prompt_indices[g]}" if prompt_indices is not None else ""
        text = kwargs.get("prompts", [None] * batch)[g * group_size]
        shown = f" {str(text)[:80]!r}" if text is not None else ""
        return f"prompt index {g} in the batch{ds}{shown}"

    for name, fn, _ in rewards:
        try:
            out = _as_output(name, fn(**kwargs), batch)
        except RewardError:
            raise
        except Exception as exc:  # noqa: BLE001 - re-raised below with the reward name and the prompt
            for g in range(num_prompts):
                rows = slice(g * group_size, (g + 1) * group_size)
                try:
                    fn(**_slice(kwargs, rows, batch))  # group_size (K) is unchanged: one whole group
                except Exception as sub_exc:  # noqa: BLE001
                    raise RewardError(
                        f"reward {name!r} raised on {where(g)}: {type(sub_exc).__name__}: {sub_exc}"
                    ) from exc
            raise RewardError(
                f"reward {name!r} raised on the batch of {num_prompts} prompts (no single prompt "
                f"reproduces it): {type(exc).__name__}: {exc}"
            ) from exc
        values = out.rewards.detach().float().cpu()
        inf = torch.isinf(values)
        if bool(inf.any()):
            row = int(inf.nonzero()[0, 0])
            raise RewardError(
                f"reward {name!r} returned {float(values[row])} for completion {row % group_size} "
                f"of {where(row // group_size)} (rewards must be finite, or NaN for unscorable)"
            )
        cols.append(values)
        outs[name] = out
    return torch.stack(cols, dim=1), outs
