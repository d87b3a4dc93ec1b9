"""The common reward interface (docs/rewards.md section 1).

Every reward is a callable returning :class:`RewardOutput`: one fp32 value per completion (``[B]``; NaN means
"unscorable", which ``group_advantages(nan_policy="missing")`` leaves out of the group statistics) and a
diagnostics dict of per-item tensors or lists (status codes, extracted answers, lengths, components) for
logging. Rewards never raise on malformed model output; they raise ``ValueError`` / ``TypeError`` only for
malformed *arguments* (mismatched batch sizes, a config field out of range).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["RewardOutput", "completion_text", "check_batch"]


@dataclass
class RewardOutput:
    """``rewards [B]`` fp32 (NaN = unscorable) and ``diagnostics``: name -> ``[B]`` tensor or length-B
    list (a few entries that are not per item, such as R3's per-prompt ``sigma``, are documented by each
    reward)."""

    rewards: torch.Tensor
    diagnostics: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.rewards.shape[0])

    def tolist(self) -> list[float | None]:
        """The rewards as Python floats with None for NaN (TRL's convention for 'not scored')."""
        return [None if v != v else float(v) for v in self.rewards.tolist()]


def completion_text(completion: Any) -> str | None:
    """Text of one completion: a ``str``, or TRL's conversational form (a list of message dicts, whose last
    message's ``content`` is the completion). Anything else is None (unscorable, never an exception)."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, (list, tuple)) and completion and isinstance(completion[-1], dict):
        content = completion[-1].get("content")
        if isinstance(content, str):
            return content
        if isinstance(content, list):  # multimodal message: concatenate the text parts
            parts = [p.get("text") for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)]
            return "".join(parts) if parts else None
    return None


def check_batch(name: str, values: Sequence | None, size: int) -> None:
    """ValueError naming ``name`` when ``values`` is not a sequence of ``size`` items."""
    if values is None:
        raise ValueError(f"{name} is required (one entry per completion, {size} expected)")
    try:
        n = len(values)
    except TypeError:
        raise ValueError(f"{name} must be a sequence with one entry per completion, got "
                         f"{type(values).__name__}") from None
    if n != size:
        raise ValueError(f"{name}: expected {size} entries (one per completion), got {n}")
