"""Adapters from reasonrl rewards to the reward-function interfaces of TRL and verl (docs/rewards.md 1).

* :func:`as_trl_reward` gives TRL's ``GRPOTrainer`` reward-function signature (TRL 1.16,
  ``GRPOTrainer._calculate_rewards``): called as ``f(prompts=..., completions=..., completion_ids=...,
  **columns)`` where ``columns`` are the dataset's other columns (one list entry per completion) plus
  ``trainer_state``, ``log_extra``, ``log_metric`` (and ``environments``); returns ``list[float | None]``,
  None meaning "not scored" (TRL turns it into NaN and leaves the row out of the group statistics).
* :func:`as_verl_score` gives verl's custom ``compute_score(data_source, solution_str, ground_truth,
  extra_info=None, **kwargs)`` (the naive reward manager calls it once per response and accepts a float or a
  dict with a ``score`` key whose other keys become ``reward_extra_info``), or with ``batch=True`` the batch
  reward manager's ``compute_score(data_sources, solution_strs, ground_truths, extra_infos, **kwargs)``
  returning one entry per response.

A reasonrl reward is called with keywords: ``prompts``, ``completions``, ``references``, ``completion_ids``
and the remaining dataset columns.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from reasonrl.rewards.types import RewardOutput

__all__ = ["as_trl_reward", "as_verl_score"]

# Columns TRL adds to the reward kwargs that are not dataset columns.
_TRL_RUNTIME = ("trainer_state", "log_extra", "log_metric", "environments")
# Where the gold answer / reference outcome usually lives in a dataset, in order of preference.
_REFERENCE_COLUMNS = ("reference", "answer", "solution", "ground_truth", "target")


def _scalar(value: Any) -> float | int | bool | str | None:
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else None
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    return None


def _per_item(diagnostics: dict, size: int) -> dict[str, list]:
    """The diagnostics that hold one scalar per completion, as lists."""
    out = {}
    for key, value in diagnostics.items():
        if isinstance(value, torch.Tensor) and value.dim() == 1 and value.shape[0] == size:
            out[key] = value.tolist()
        elif isinstance(value, (list, tuple)) and len(value) == size and all(
                _scalar(v) is not None or v is None for v in value) and not any(
                isinstance(v, torch.Tensor) and v.numel() != 1 for v in value):
            out[key] = [_scalar(v) for v in value]
    return out


def as_trl_reward(fn: Callable[..., RewardOutput], *, reference_column: str | None = None,
                  name: str | None = None, log_metrics: bool = True) -> Callable[..., list[float | None]]:
    """Wrap a reasonrl reward as a TRL reward function.

    Args:
        fn: a reasonrl reward (``R3Reward``, ``NumericAnswerReward``, ``PEARReward``, ``LaserReward``,
            ``WeightedSumReward``, or any callable returning :class:`RewardOutput`).
        reference_column: the dataset column with the reference outcome / gold answer, passed as
            ``references``; default: the first of ``reference``, ``answer``, ``solution``, ``ground_truth``,
            ``target`` that is present.
        name: ``__name__`` of the wrapper (TRL logs rewards under it); default ``fn.name`` or the class name.
        log_metrics: report the batch mean of every numeric per-item diagnostic and the share of each
            ``status`` value through TRL's ``log_metric`` hook (as ``<name>/<key>``).
    """
    label = name or getattr(fn, "name", None) or type(fn).__name__

    def reward_func(prompts: Sequence | None = None, completions: Sequence | None = None,
                    completion_ids: Sequence | None = None, **kwargs) -> list[float | None]:
        log_metric = kwargs.get("log_metric")
        columns = {k: v for k, v in kwargs.items() if k not in _TRL_RUNTIME}
        col = reference_column
        if col is None:
            col = next((c for c in _REFERENCE_COLUMNS if c in columns), None)
        elif col not in columns:
            raise ValueError(f"as_trl_reward({label}): the dataset has no column {col!r} "
                             f"(columns: {sorted(columns)})")
        references = columns.pop(col) if col is not None else None
        out = fn(prompts=prompts, completions=completions, references=references,
                 completion_ids=completion_ids, **columns)
        if not isinstance(out, RewardOutput):
            raise TypeError(f"as_trl_reward({label}): the reward returned {type(out).__name__}, expected "
                            "RewardOutput")
        if log_metrics and callable(log_metric):
            _log(label, out, log_metric)
        return out.tolist()

    reward_func.__name__ = label
    reward_func.__qualname__ = label
    return reward_func


def _log(label: str, out: RewardOutput, log_metric: Callable[[str, float], None]) -> None:
    """Batch mean (NaN skipped) of every numeric per-item diagnostic, and the share of each status."""
    size = len(out)
    for key, values in _per_item(out.diagnostics, size).items():
        if key == "status":
            for status in sorted({v for v in values if isinstance(v, str)}):
                log_metric(f"{label}/status_{status}", sum(v == status for v in values) / size)
            continue
        if any(isinstance(v, (str, bool)) for v in values):
            continue
        nums = [float(v) for v in values if v is not None and not math.isnan(float(v))]
        if nums:
            log_metric(f"{label}/{key}", sum(nums) / len(nums))


def as_verl_score(fn: Callable[..., RewardOutput], *, batch: bool = False, nan_score: float | None = 0.0,
                  prompt_key: str = "prompt") -> Callable[..., Any]:
    """Wrap a reasonrl reward as verl's ``compute_score``.

    Args:
        fn: a reasonrl reward that scores from text (``NumericAnswerReward``, ``LaserReward`` with
            ``batch=True`` so that the groups are visible, a ``WeightedSumReward`` of such; model-based
            rewards need the policy's tensors and belong in the trainer instead).
        batch: ``False``: per-response ``compute_score(data_source, solution_str, ground_truth,
            extra_info=None, **kwargs)``; ``True``: the batch reward manager's ``compute_score(data_sources,
            solution_strs, ground_truths, extra_infos, **kwargs)``.
        nan_score: the score reported for an unscorable response (verl has no NaN handling; a NaN would reach
            the advantages): 0.0 by default, with ``unscorable = 1`` in the returned dict; None keeps NaN.
        prompt_key: key of ``extra_info`` holding the prompt (passed as ``prompts`` when present).

    Returns:
        A function returning ``{"score": float, <per-item diagnostics>}`` (a list of such dicts with
        ``batch=True``).
    """

    def _dicts(out: RewardOutput) -> list[dict]:
        per_item = _per_item(out.diagnostics, len(out))
        result = []
        for i, r in enumerate(out.rewards.tolist()):
            d: dict[str, Any] = {}
            for key, values in per_item.items():
                v = values[i]
                if v is not None:
                    d[key] = v
            unscorable = math.isnan(r)
            d["unscorable"] = int(unscorable)
            d["score"] = (nan_score if nan_score is not None else r) if unscorable else float(r)
            result.append(d)
        return result

    if batch:
        def compute_score_batch(data_sources, solution_strs, ground_truths, extra_infos=None, **kwargs):
            infos = list(extra_infos) if extra_infos is not None else [None] * len(solution_strs)
            prompts = [i.get(prompt_key) if isinstance(i, dict) else None for i in infos]
            out = fn(completions=list(solution_strs), references=list(ground_truths),
                     prompts=prompts if all(p is not None for p in prompts) else None, **kwargs)
            return _dicts(out)

        return compute_score_batch

    def compute_score(data_source, solution_str, ground_truth, extra_info=None, **kwargs):
        prompt = extra_info.get(prompt_key) if isinstance(extra_info, dict) else None
        out = fn(completions=[solution_str], references=[ground_truth],
                 prompts=None if prompt is None else [prompt], **kwargs)
        return _dicts(out)[0]

    return compute_score
