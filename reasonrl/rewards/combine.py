"""A weighted sum of rewards whose diagnostics keep every component (docs/rewards.md section 1).

``WeightedSumReward({"r3": (R3Reward(...), 1.0), "numeric": (NumericAnswerReward(), 0.5)})`` calls every
component with the same keyword arguments and returns ``sum_i w_i r_i``. NaN handling (``nan_policy``):

* ``"skip"`` (default): a NaN component is left out of the sum; the total is NaN only when every component is
  NaN. This is TRL's ``sum_then_normalize`` rule (``nansum`` over reward functions, NaN when all are NaN),
  and ``reasonrl.ops.group_advantages`` with several reward columns does the same.
* ``"propagate"``: any NaN component makes the total NaN (the completion is unscorable as a whole).

Diagnostics: ``<name>`` = the component's rewards ``[B]``, ``<name>/<key>`` = each of its diagnostics.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch

from reasonrl.rewards.types import RewardOutput

__all__ = ["WeightedSumReward"]


class WeightedSumReward:
    """``sum_i w_i r_i`` over named components ``{name: (reward, weight)}`` (or ``{name: reward}``, weight 1).

    Call with keyword arguments only (``prompts=``, ``completions=``, ``references=``, ...): the components
    have different positional signatures, and each ignores the keywords it does not use.
    """

    name = "weighted_sum"

    def __init__(self, components: Mapping[str, Callable | tuple[Callable, float]], *,
                 nan_policy: str = "skip"):
        if not components:
            raise ValueError("WeightedSumReward: components must not be empty")
        if nan_policy not in ("skip", "propagate"):
            raise ValueError(f"WeightedSumReward: nan_policy must be 'skip' or 'propagate', got "
                             f"{nan_policy!r}")
        self.components: dict[str, tuple[Callable, float]] = {}
        for name, spec in components.items():
            fn, weight = spec if isinstance(spec, tuple) else (spec, 1.0)
            if not callable(fn):
                raise ValueError(f"WeightedSumReward: component {name!r} is not callable")
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
                raise ValueError(f"WeightedSumReward: weight of {name!r} must be a finite number, got "
                                 f"{weight!r}")
            if "/" in name:
                raise ValueError(f"WeightedSumReward: component name {name!r} must not contain '/'")
            self.components[name] = (fn, float(weight))
        self.nan_policy = nan_policy

    def __call__(self, **kwargs) -> RewardOutput:
        total, any_valid, diagnostics, size = None, None, {}, None
        for name, (fn, weight) in self.components.items():
            out = fn(**kwargs)
            if not isinstance(out, RewardOutput):
                out = RewardOutput(torch.as_tensor([math.nan if v is None else v for v in out],
                                                   dtype=torch.float32))
            r = out.rewards.detach().float().cpu()
            if size is None:
                size = r.shape[0]
                total = torch.zeros(size, dtype=torch.float32)
                any_valid = torch.zeros(size, dtype=torch.bool)
                all_valid = torch.ones(size, dtype=torch.bool)
            elif r.shape[0] != size:
                raise ValueError(f"WeightedSumReward: component {name!r} returned {r.shape[0]} rewards, "
                                 f"expected {size}")
            nan = torch.isnan(r)
            total = total + torch.where(nan, torch.zeros_like(r), weight * r)
            any_valid |= ~nan
            all_valid &= ~nan
            diagnostics[name] = r
            for key, value in out.diagnostics.items():
                diagnostics[f"{name}/{key}"] = value
        keep = any_valid if self.nan_policy == "skip" else all_valid
        total = torch.where(keep, total, torch.full_like(total, math.nan))
        return RewardOutput(total, diagnostics)
