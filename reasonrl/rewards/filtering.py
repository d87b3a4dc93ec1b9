"""R3-based dynamic data filtering (docs/rewards.md 2.1 and 2.5; DRO, arXiv 2506.13351 v1).

A round over a pool of prompts (each with its reference outcome), run once before training and then once per
epoch over the current training set (``R3FilterConfig.interval``; the trainer decides when to call):

1. sample ``num_samples`` traces per prompt with the training sampling settings (the caller's ``sample_fn``);
2. one no_grad pass per trace (the R3 scoring path of :class:`reasonrl.rewards.R3Reward`, with ranks): the
   log-prob ``l[k, j]`` and the rank (1 + number of vocabulary entries with a strictly larger logit) of every
   reference token after trace k;
3. stage 1, *too hard*: D_k = mean of the ``max(1, ceil(rank_fraction L))`` largest ranks of trace k; the
   prompt is dropped when min_k D_k > ``rank_cutoff`` (even its best trace ranks the reference badly) or when
   no trace is valid (no ``</think>`` marker or too long);
4. stage 2, *too easy / no reasoning signal*: score s = max_j sigma_j (population std over the valid traces,
   0 with fewer than 2); the survivors of stage 1 sorted by s descending (ties keep pool order) lose their
   last ``floor(sigma_drop_fraction * count)``;
5. the new set = the survivors, then a uniform random ``floor(carry_over_fraction * |previous|)`` of the
   previous round's training set (seeded), without duplicates.

:func:`r3_filter_select` is the pure selection (steps 3-5) on per-prompt statistics; :func:`r3_filter_round`
runs the whole round with a model.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from reasonrl.rewards._validate import check_choice, check_int, check_real
from reasonrl.rewards.r3 import R3Config, R3Reward

__all__ = ["R3FilterConfig", "PromptFilterStats", "FilterResult", "r3_filter_select", "r3_filter_round",
           "prompt_filter_stats"]


@dataclass(frozen=True)
class R3FilterConfig:
    """Settings of the R3 data filter (docs/rewards.md 2.4 and 2.5).

    num_samples: traces per prompt (paper: 16 or 32). rank_fraction: share of the reference tokens whose ranks
    are averaged into D_k (**library default (assumption)**: 0.1, at least one token). rank_cutoff: keep a
    prompt iff min_k D_k <= it (**assumption**: 50). sigma_drop_fraction: share of the stage-1 survivors
    dropped for the lowest max-sigma (**assumption**: 0.2, floor). carry_over_fraction: share of the previous
    training set carried forward (paper: 0.10; **assumption**: a seeded uniform sample, floor, deduplicated).
    interval: ``"epoch"`` (one round before training, then one per epoch) or ``"steps"`` (every
    ``interval_steps`` optimiser steps). seed: of the carry-over sample.
    """

    num_samples: int = 16
    rank_fraction: float = 0.1
    rank_cutoff: float = 50.0
    sigma_drop_fraction: float = 0.2
    carry_over_fraction: float = 0.10
    interval: str = "epoch"
    interval_steps: int | None = None
    seed: int = 0

    def __post_init__(self):
        n = type(self).__name__
        check_int(n, "num_samples", self.num_samples, lo=1)
        check_real(n, "rank_fraction", self.rank_fraction, lo=0, hi=1, lo_open=True)
        check_real(n, "rank_cutoff", self.rank_cutoff, lo=1)
        check_real(n, "sigma_drop_fraction", self.sigma_drop_fraction, lo=0, hi=1, hi_open=True)
        check_real(n, "carry_over_fraction", self.carry_over_fraction, lo=0, hi=1)
        check_choice(n, "interval", self.interval, ("epoch", "steps"))
        if self.interval == "steps":
            check_int(n, "interval_steps", self.interval_steps, lo=1)
        else:
            check_int(n, "interval_steps", self.interval_steps, lo=1, allow_none=True)
        check_int(n, "seed", self.seed)

    def due(self, *, step: int, epoch_start: bool) -> bool:
        """Whether a round should run now: at the start of each epoch (``"epoch"``) or every
        ``interval_steps`` steps (``"steps"``; step 0 included)."""
        if self.interval == "epoch":
            return epoch_start
        return step % self.interval_steps == 0


@dataclass
class PromptFilterStats:
    """Per-prompt statistics of a round: ``num_valid`` traces, ``min_rank_score`` (min_k D_k, inf without a
    valid trace), ``max_sigma``, ``decision`` (``kept``, ``too_hard``, ``no_valid_trace``, ``too_easy``)."""

    num_valid: int
    min_rank_score: float
    max_sigma: float
    decision: str = "kept"


@dataclass
class FilterResult:
    """``kept``: the new training set (survivors then carried items); ``survivors`` / ``carried``: its two
    parts; ``stats``: one :class:`PromptFilterStats` per pool item, in pool order."""

    kept: list[Any]
    survivors: list[Any]
    carried: list[Any]
    stats: list[PromptFilterStats] = field(default_factory=list)


def prompt_filter_stats(logprobs: torch.Tensor, ranks: torch.Tensor,
                        cfg: R3FilterConfig) -> PromptFilterStats:
    """Statistics of one prompt from its VALID traces: ``logprobs`` and ``ranks`` ``[K_valid, L]``."""
    k, length = ranks.shape if ranks.dim() == 2 else (0, 0)
    if k == 0 or length == 0:
        return PromptFilterStats(0, math.inf, 0.0, "no_valid_trace")
    n_worst = max(1, math.ceil(cfg.rank_fraction * length - 1e-9))
    worst = ranks.double().topk(min(n_worst, length), dim=1).values  # the largest ranks of each trace
    d = worst.mean(dim=1)
    lp = logprobs.double()
    if k >= 2:
        sigma = (lp - lp.mean(dim=0)).pow(2).mean(dim=0).sqrt()  # population std, two-pass
        max_sigma = float(sigma.max())
    else:
        max_sigma = 0.0
    return PromptFilterStats(k, float(d.min()), max_sigma)


def r3_filter_select(pool: Sequence[Any], stats: Sequence[PromptFilterStats], cfg: R3FilterConfig, *,
                     previous_train_set: Sequence[Any] | None = None, key: Callable[[Any], Any] = repr
                     ) -> FilterResult:
    """Stages 1-2 and the carry-over (docs/rewards.md 2.5) on precomputed statistics; deterministic given
    ``cfg.seed``. ``key`` identifies items for deduplication (default ``repr``)."""
    if len(stats) != len(pool):
        raise ValueError(f"stats: expected {len(pool)} entries (one per pool item), got {len(stats)}")
    survivors = []
    for i, st in enumerate(stats):
        if st.num_valid == 0:
            st.decision = "no_valid_trace"
        elif st.min_rank_score > cfg.rank_cutoff:
            st.decision = "too_hard"
        else:
            st.decision = "kept"
            survivors.append(i)
    order = sorted(survivors, key=lambda i: (-stats[i].max_sigma, i))  # stable: ties keep pool order
    n_drop = math.floor(cfg.sigma_drop_fraction * len(order) + 1e-9)
    for i in order[len(order) - n_drop:] if n_drop else []:
        stats[i].decision = "too_easy"
    kept_idx = [i for i in survivors if stats[i].decision == "kept"]
    kept = [pool[i] for i in kept_idx]
    previous = list(previous_train_set or [])
    n_carry = math.floor(cfg.carry_over_fraction * len(previous) + 1e-9)
    carried = []
    if n_carry:
        gen = torch.Generator().manual_seed(cfg.seed)
        pick = sorted(torch.randperm(len(previous), generator=gen)[:n_carry].tolist())
        seen = {key(x) for x in kept}
        for j in pick:
            k = key(previous[j])
            if k not in seen:
                seen.add(k)
                carried.append(previous[j])
    return FilterResult(kept + carried, kept, carried, list(stats))


def _item(x: Any, prompt_key: str, reference_key: str) -> tuple[Any, Any]:
    if isinstance(x, dict):
        return x[prompt_key], x[reference_key]
    if isinstance(x, (tuple, list)) and len(x) == 2:
        return x[0], x[1]
    raise ValueError(f"pool items must be dicts with {prompt_key!r} / {reference_key!r} or (prompt, "
                     f"reference) "
                     f"pairs, got {type(x).__name__}")


def r3_filter_round(
    pool: Sequence[Any],
    *,
    model: torch.nn.Module,
    sample_fn: Callable[[list[Any], int], list[list[Any]]],
    tokenizer=None,
    previous_train_set: Sequence[Any] | None = None,
    config: R3FilterConfig | None = None,
    r3_config: R3Config | None = None,
    prompt_key: str = "prompt",
    reference_key: str = "reference",
    key: Callable[[Any], Any] = repr,
) -> FilterResult:
    """One filter round with the current policy ``model`` (docs/rewards.md 2.5).

    Args:
        pool: items to filter: dicts with ``prompt_key`` / ``reference_key`` or (prompt, reference) pairs; a
            prompt / reference is text (with ``tokenizer``) or a list of token ids.
        sample_fn: ``sample_fn(prompts, num_samples)`` returns, per prompt, ``num_samples`` sampled
            completions (text, or id lists) with the training sampling settings (HF generate, vLLM, ...).
        previous_train_set: the previous round's training set (for the carry-over).
        config: :class:`R3FilterConfig`. r3_config: how traces are cut and scored (marker, answer prefix,
            temperature, truncation, prefix sharing); its ``reward_policy`` is ignored: the filter always
            scores with ``model``.
    Returns:
        :class:`FilterResult` (the new set and per-prompt statistics).
    """
    cfg = config or R3FilterConfig()
    r3cfg = r3_config or R3Config()
    if r3cfg.reward_policy != "current":
        r3cfg = R3Config(**{**r3cfg.__dict__, "reward_policy": "current"})
    scorer = R3Reward(model, tokenizer, r3cfg)
    items = [_item(x, prompt_key, reference_key) for x in pool]
    prompts = [p for p, _ in items]
    samples = sample_fn(prompts, cfg.num_samples)
    if len(samples) != len(pool):
        raise ValueError(f"sample_fn returned {len(samples)} lists, expected {len(pool)} (one per prompt)")
    rows_p, rows_c, rows_y, gids = [], [], [], []
    for g, ((p, y), comps) in enumerate(zip(items, samples, strict=True)):
        for c in comps:
            rows_p.append(p)
            rows_c.append(c)
            rows_y.append(y)
            gids.append(g)
    text = [isinstance(v, str) or (isinstance(v, list) and v and isinstance(v[0], dict)) for v in rows_p]
    kw = dict(group_ids=gids)
    kw["prompt_ids" if not any(text) else "prompts"] = rows_p
    kw["reference_ids" if not any(isinstance(v, str) for v in rows_y) else "references"] = rows_y
    kw["completion_ids" if not any(isinstance(v, str) for v in rows_c) else "completions"] = rows_c
    prep = scorer.prepare(**kw)
    row_stats = scorer.score(prep, want_rank=True)
    stats = []
    for rows in prep["groups"]:
        lps = [row_stats[prep["row_of"][r]].logprobs for r in rows if r in prep["row_of"]]
        rks = [row_stats[prep["row_of"][r]].rank for r in rows if r in prep["row_of"]]
        if lps:
            stats.append(prompt_filter_stats(torch.stack(lps).cpu(), torch.stack(rks).cpu(), cfg))
        else:
            stats.append(PromptFilterStats(0, math.inf, 0.0, "no_valid_trace"))
    if len(prep["groups"]) != len(pool):  # a prompt whose samples list was empty has no group
        full, it = [], iter(stats)
        present = {gids[r] for rows in prep["groups"] for r in rows}
        for g in range(len(pool)):
            full.append(next(it) if g in present else PromptFilterStats(0, math.inf, 0.0, "no_valid_trace"))
        stats = full
    return r3_filter_select(pool, stats, cfg, previous_train_set=previous_train_set, key=key)
