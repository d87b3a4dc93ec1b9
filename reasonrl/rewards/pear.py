"""PEAR: phase-entropy-aware reward (docs/rewards.md section 3).

Huang, Lu, Zhang, "PEAR: Phase Entropy Aware Reward for Efficient Reasoning", arXiv 2510.08026 (ICLR 2026),
Eq. 5-7; authors' code iNLP-Lab/PEAR (veRL-based; scoring interface ``compute_score(..., method='strict',
score=1.0, format_score=0.0)``). Not diffed against the authors' scoring code (it was not at hand).

Per response (tokens t = 0 .. n - 1, the first ``</think>`` at valid-token index k; k = n without a marker):

    H_think  = mean_{t < k} H_t                  (0 when k = 0)
    H_answer = mean_{t >= k + |marker|} H_t       (0 when nothing follows; the marker is in neither phase)
    P        = max(0, H_think - alpha * H_answer)
    r        = min(1, score - P)  if the final answer is correct, else format_score

with H_t the full-vocabulary entropy of the old policy at position t (at the sampling temperature, as verl's
old-log-prob pass computes it). The entropies are an input (``entropy=``: verl's ``entropys``, or
``token_logprobs(..., want_entropy=True)``), or PEARReward computes them with ``model`` under no_grad. The
phases come from :func:`reasonrl.rewards.find_boundary` and :func:`reasonrl.rewards.phase_entropy`.

Correctness: GSM8K strict extraction: the number right after the last ``####`` (option ``boxed_fallback``:
else the last ``\\boxed{...}``), compared with the reference's number at relative tolerance 0 and absolute
tolerance 1e-9 (the parser of docs/rewards.md 5, percent signs not rescaled).

Caveat reproduced by default: nothing bounds r from below, so a correct answer with a large think-answer
entropy gap scores below a wrong one; ``clip_to_format_score=True`` uses max(format_score, min(1, score - P)).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from reasonrl.rewards._validate import check_bool, check_real, check_str
from reasonrl.rewards.functional import find_boundary, phase_entropy
from reasonrl.rewards.numeric import (
    _NUMBER,
    ParsedNumber,
    _match_value,
    extract_number,
    find_last_boxed,
    numbers_match,
    parse_number,
)
from reasonrl.rewards.types import RewardOutput, check_batch, completion_text

__all__ = ["PEARConfig", "PEARReward", "gsm8k_strict_answer"]


@dataclass(frozen=True)
class PEARConfig:
    """Settings of :class:`PEARReward` (docs/rewards.md section 3).

    alpha: weight of the answer-phase entropy in the penalty (paper: 1; 0 and -1 hurt in its ablation).
    score: reward ceiling of a correct answer (``score``, 1.0). format_score: reward of a wrong / missing
    answer (``format_score``, 0.0). think_end: the reasoning end marker; think_end_ids: its token ids
    (default: ``tokenizer.encode(think_end)`` without special tokens). boxed_fallback: also accept the last
    \\boxed{}. clip_to_format_score: lower-clip correct answers at format_score (off: the paper's formula).
    temperature: temperature of PEAR's own entropy pass (only when ``model`` is given and no entropies are
    passed); **library default (assumption)**: 1.0, set it to the rollout sampling temperature.
    prefix_sharing / max_batch_tokens: of that pass (docs/rewards.md 2.3 explains them).
    """

    alpha: float = 1.0
    score: float = 1.0
    format_score: float = 0.0
    think_end: str = "</think>"
    think_end_ids: tuple[int, ...] | None = None
    boxed_fallback: bool = False
    clip_to_format_score: bool = False
    temperature: float = 1.0
    prefix_sharing: str = "kv_cache"
    max_batch_tokens: int = 16384

    def __post_init__(self):
        n = type(self).__name__
        check_real(n, "alpha", self.alpha)
        check_real(n, "score", self.score)
        check_real(n, "format_score", self.format_score)
        check_str(n, "think_end", self.think_end, allow_empty=False)
        if self.think_end_ids is not None:
            if (not isinstance(self.think_end_ids, tuple) or not self.think_end_ids
                    or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0
                               for i in self.think_end_ids)):
                raise ValueError(f"{n}.think_end_ids must be None or a non-empty tuple of ids >= 0, got "
                                 f"{self.think_end_ids!r}")
        check_bool(n, "boxed_fallback", self.boxed_fallback)
        check_bool(n, "clip_to_format_score", self.clip_to_format_score)
        check_real(n, "temperature", self.temperature, lo=0, lo_open=True)
        if self.prefix_sharing not in ("kv_cache", "none"):
            raise ValueError(f"{n}.prefix_sharing must be 'kv_cache' or 'none', got {self.prefix_sharing!r}")
        if isinstance(self.max_batch_tokens, bool) or not isinstance(self.max_batch_tokens, int) or \
                self.max_batch_tokens < 1:
            raise ValueError(f"{n}.max_batch_tokens must be an int >= 1, got {self.max_batch_tokens!r}")


def gsm8k_strict_answer(text: str, *, boxed_fallback: bool = False) -> ParsedNumber | None:
    """The number right after the last ``####`` (GSM8K strict format), else (``boxed_fallback``) the first
    number of the last ``\\boxed{...}``, else None."""
    if not isinstance(text, str):
        return None
    pos = text.rfind("####")
    if pos != -1:
        i = pos + 4
        while i < len(text) and text[i] in " \t":
            i += 1
        m = _NUMBER.match(text, i)
        if m is not None:
            v = _match_value(m)
            if v is not None and math.isfinite(float(v[0])):
                return ParsedNumber(float(v[0]), v[1])
        return None
    if boxed_fallback:
        boxed = find_last_boxed(text)
        if boxed is not None:
            return parse_number(boxed, first=True)
    return None


def _ragged(values: Any, name: str, size: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """A length-``size`` list of 1-D sequences -> (packed [N], cu_seqlens [size + 1])."""
    check_batch(name, values, size)
    parts = [torch.as_tensor(v, dtype=dtype).reshape(-1) for v in values]
    lengths = torch.tensor([0] + [p.numel() for p in parts], dtype=torch.int64)
    flat = torch.cat(parts) if parts else torch.zeros(0, dtype=dtype)
    return flat, lengths.cumsum(0)


class PEARReward:
    """Phase-entropy-aware reward (docs/rewards.md section 3).

    Call with ``completions`` (text, for correctness), ``references`` (gold answers), ``completion_ids`` and
    either ``entropy`` (per completion token, same layout as ``completion_ids``) or, when the reward was built
    with ``model``, ``prompt_ids`` (or ``prompts`` text and a tokenizer) so that PEAR computes the entropies.

    Layouts: ``completion_ids`` as a list of B id lists (ragged; ``entropy`` then a list of B 1-D tensors) or
    as a ``[B, T]`` tensor with ``completion_mask [B, T]`` (``entropy [B, T]``).

    Diagnostics: ``status`` (correct / incorrect / no_answer / bad_gold: NaN reward), ``h_think``,
    ``h_answer``, ``penalty``, ``has_marker`` and ``boundary`` (valid-token index of the marker),
    ``think_tokens``, ``answer_tokens``.
    """

    name = "pear"

    def __init__(self, config: PEARConfig | None = None, *, tokenizer=None,
                 model: torch.nn.Module | None = None, **overrides):
        base = config or PEARConfig()
        self.config = PEARConfig(**{**base.__dict__, **overrides}) if overrides else base
        self.tokenizer = tokenizer
        self.model = model

    def _marker_ids(self) -> list[int]:
        if self.config.think_end_ids is not None:
            return list(self.config.think_end_ids)
        if self.tokenizer is None:
            raise ValueError("PEARReward: set PEARConfig.think_end_ids or pass a tokenizer (to encode "
                             "think_end)")
        ids = self.tokenizer.encode(self.config.think_end, add_special_tokens=False)
        if not ids:
            raise ValueError(f"PEARReward: think_end {self.config.think_end!r} encodes to no token")
        return list(ids)

    def _entropies_from_model(self, completion_ids: list[list[int]], prompt_ids,
                              prompts) -> list[torch.Tensor]:
        from reasonrl.rewards._scoring import score_rows, scoring_mode

        n = len(completion_ids)
        if prompt_ids is None:
            if prompts is None or self.tokenizer is None:
                raise ValueError("PEARReward: without entropy=, pass prompt_ids (or prompts with a "
                                 "tokenizer) so "
                                 "that the entropies can be computed with the model")
            check_batch("prompts", prompts, n)
            prompt_ids = [self.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
        check_batch("prompt_ids", prompt_ids, n)
        # Completions of the same prompt share its prefix (consecutive equal prompt ids, TRL's layout).
        uniq: dict[tuple[int, ...], int] = {}
        plist, owner = [], []
        for p in prompt_ids:
            key = tuple(int(t) for t in p)
            if not key:
                raise ValueError("PEARReward: every prompt needs at least one token")
            if key not in uniq:
                uniq[key] = len(plist)
                plist.append(list(key))
            owner.append(uniq[key])
        c = self.config
        with scoring_mode(self.model):
            stats = score_rows(self.model, plist, completion_ids, owner, [0] * n, temperature=c.temperature,
                               want_entropy=True, prefix_sharing=c.prefix_sharing,
                               max_batch_tokens=c.max_batch_tokens)
        return [s.entropy.float().cpu() if s.entropy is not None else torch.zeros(0) for s in stats]

    def __call__(self, completions: Sequence, references: Sequence | None = None, *, completion_ids=None,
                 entropy=None, completion_mask: torch.Tensor | None = None, prompt_ids=None, prompts=None,
                 **kwargs) -> RewardOutput:
        n = len(completions)
        check_batch("references", references, n)
        c = self.config
        if completion_ids is None:
            if self.tokenizer is None:
                raise ValueError("PEARReward: completion_ids are required (or a tokenizer to encode "
                                 "completions)")
            completion_ids = [self.tokenizer(completion_text(x) or "", add_special_tokens=False)["input_ids"]
                              for x in completions]
        marker = self._marker_ids()
        padded = isinstance(completion_ids, torch.Tensor)
        if padded:
            if completion_ids.dim() != 2 or completion_ids.shape[0] != n:
                raise ValueError(f"PEARReward: completion_ids: expected [B, T] with B = {n}, got "
                                 f"{tuple(completion_ids.shape)}")
            if entropy is None:
                raise ValueError("PEARReward: a padded completion_ids tensor needs entropy [B, T] (the model "
                                 "pass "
                                 "takes ragged id lists)")
            if not isinstance(entropy, torch.Tensor) or entropy.shape != completion_ids.shape:
                raise ValueError(f"PEARReward: entropy: expected shape {tuple(completion_ids.shape)} (as "
                                 f"completion_ids), got {tuple(getattr(entropy, 'shape', ()))}")
            ids_t, cu = completion_ids, None
            ent = entropy.detach().float()
            mask = completion_mask
        else:
            check_batch("completion_ids", completion_ids, n)
            ids_lists = [[int(t) for t in torch.as_tensor(x).reshape(-1).tolist()] for x in completion_ids]
            if entropy is None:
                if self.model is None:
                    raise ValueError("PEARReward: pass entropy= (per completion token) or build the reward "
                                     "with "
                                     "model= to compute it")
                entropy = self._entropies_from_model(ids_lists, prompt_ids, prompts)
            ids_t, cu = _ragged(ids_lists, "completion_ids", n, torch.int64)
            ent, cu_e = _ragged([torch.as_tensor(e).detach() for e in entropy], "entropy", n, torch.float32)
            if not torch.equal(cu, cu_e):
                raise ValueError("PEARReward: entropy: each completion needs one entropy per completion "
                                 "token "
                                 "(lengths differ from completion_ids)")
            mask = None
        with torch.no_grad():
            boundary = find_boundary(ids_t, marker, mask=mask, cu_seqlens=cu)
            phases = phase_entropy(ent, boundary, mask=mask, cu_seqlens=cu, boundary_len=len(marker))
        has_marker = boundary < _valid_counts(ids_t, mask, cu)
        h_think, h_answer = phases.mean_before.double(), phases.mean_after.double()
        penalty = torch.clamp(h_think - c.alpha * h_answer, min=0.0)
        rewards, status = [], []
        for i in range(n):
            text = completion_text(completions[i])
            gold = extract_number(references[i], think_end=None)
            pred = None if text is None else gsm8k_strict_answer(text, boxed_fallback=c.boxed_fallback)
            if gold is None:  # a data error: unscorable (docs/rewards.md 1), never raised
                rewards.append(math.nan)
                status.append("bad_gold")
                continue
            if pred is None:
                rewards.append(c.format_score)
                status.append("no_answer")
                continue
            if numbers_match(pred, gold, rel_tol=0.0, abs_tol=1e-9, percent_insensitive=False):
                r = min(1.0, c.score - float(penalty[i]))
                if c.clip_to_format_score:
                    r = max(c.format_score, r)
                rewards.append(r)
                status.append("correct")
            else:
                rewards.append(c.format_score)
                status.append("incorrect")
        return RewardOutput(torch.tensor(rewards, dtype=torch.float32), {
            "status": status,
            "h_think": phases.mean_before.float(),
            "h_answer": phases.mean_after.float(),
            "penalty": penalty.float(),
            "has_marker": has_marker,
            "boundary": boundary,
            "think_tokens": phases.count_before,
            "answer_tokens": phases.count_after,
        })


def _valid_counts(ids: torch.Tensor, mask: torch.Tensor | None, cu: torch.Tensor | None) -> torch.Tensor:
    if cu is not None:
        if mask is None:
            return cu.diff()
        seg = torch.searchsorted(cu[1:], torch.arange(ids.shape[0]), right=True)
        return torch.zeros(cu.numel() - 1, dtype=torch.int64).index_add(0, seg, (mask != 0).to(torch.int64))
    if mask is None:
        return torch.full((ids.shape[0],), ids.shape[1], dtype=torch.int64)
    return (mask != 0).sum(dim=1)
