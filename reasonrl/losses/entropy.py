"""Adaptive entropy-bonus coefficient (docs/losses.md section 11.2; TRL 1.16
``use_adaptive_entropy``, Skywork-OR1).

The controller lives next to the loss, not inside it: the loss takes the coefficient to apply as
``policy_loss(..., entropy_coef=controller.coef)`` and reports the entropy statistics the controller needs
(``LossMetrics.entropy_effective``, the (sum, count) of H over the bonus's effective mask m * e). A trainer:

    ctl = AdaptiveEntropyController(initial_coef=0.0, target=0.2)
    for micro_batch in window:
        out = policy_loss_from_logits(..., entropy_coef=ctl.coef)
        out.loss.backward()
        ctl.observe(out.metrics.entropy_effective)
    ctl.step(process_group)          # at the optimiser-step boundary: one all-reduce, one host sync
    optimizer.step()

Exactly TRL's rule: the coefficient applied during a window is the one from the end of the previous window,
and only if that window's token-weighted entropy H_w (over all ranks) was <= target, else 0; before the first
measurement H_w = +inf, so no bonus is applied. After each window: H_w <= target raises the coefficient by
``delta`` (capped at ``coef_max``), otherwise it is lowered by ``delta`` (floored at ``coef_min``).
"""

from __future__ import annotations

import math

import torch

from reasonrl.loss_config import check_real
from reasonrl.loss_types import Sum

__all__ = ["AdaptiveEntropyController"]


class AdaptiveEntropyController:
    def __init__(
        self,
        initial_coef: float,
        target: float = 0.2,
        delta: float = 0.005,
        coef_min: float = 0.0,
        coef_max: float = 1.0,
    ) -> None:
        c = "AdaptiveEntropyController"
        # NaN passes every `x < 0` test: check finiteness first (docs/losses.md section 11.2).
        for name, value in (("initial_coef", initial_coef), ("target", target), ("coef_min", coef_min),
                            ("coef_max", coef_max)):
            check_real(c, name, value, lambda v: True, "a finite number")
        check_real(c, "delta", delta, lambda v: v >= 0, "a finite number >= 0")
        if not coef_min <= coef_max:
            raise ValueError(
                f"{c}.coef_min must be <= coef_max, got coef_min={coef_min} > coef_max={coef_max}"
            )
        self.target, self.delta, self.coef_min, self.coef_max = (
            float(target),
            float(delta),
            coef_min,
            coef_max,
        )
        self.entropy_coef = float(initial_coef)  # TRL's self.entropy_coef: updated at every step boundary
        self.last_window_entropy = math.inf  # H_w of the previous window (+inf before the first one)
        self._window: torch.Tensor | None = None  # [sum, count] of the current window, on the metric's device

    @property
    def coef(self) -> float:
        """The coefficient to apply to every micro-batch of the current window."""
        return self.entropy_coef if self.last_window_entropy <= self.target else 0.0

    def observe(self, entropy: Sum) -> None:
        """Add one micro-batch's (sum of m_H * H, sum of m_H): ``LossMetrics.entropy_effective``. No sync."""
        if entropy is None:
            raise ValueError("entropy: expected LossMetrics.entropy_effective (a Sum), got None")
        stats = torch.stack([entropy.sum.detach().double(), entropy.count.detach().double()])
        self._window = stats if self._window is None else self._window + stats

    def step(self, process_group=None) -> float:
        """Close the window: all-reduce the sums over ``process_group`` (when torch.distributed is
        initialised), update the coefficient, return H_w. A window without observations leaves the state
        unchanged and returns the previous H_w."""
        if self._window is None:
            return self.last_window_entropy
        stats = self._window
        if process_group is not None or (
            torch.distributed.is_available() and torch.distributed.is_initialized()
        ):
            stats = stats.clone()
            torch.distributed.all_reduce(stats, op=torch.distributed.ReduceOp.SUM, group=process_group)
        total, count = (float(v) for v in stats.cpu())  # one host sync per optimiser step
        h_w = total / max(1.0, count)
        if h_w <= self.target:
            self.entropy_coef = min(self.entropy_coef + self.delta, self.coef_max)
        else:
            self.entropy_coef = max(self.entropy_coef - self.delta, self.coef_min)
        self.last_window_entropy = h_w
        self._window = None
        return h_w

    def state_dict(self) -> dict:
        """What a checkpoint must keep (TRL saves the same two numbers); the open window is not saved."""
        return {"entropy_coef": self.entropy_coef, "last_window_entropy": self.last_window_entropy}

    def load_state_dict(self, state: dict) -> None:
        self.entropy_coef = float(state["entropy_coef"])
        self.last_window_entropy = float(state["last_window_entropy"])
        self._window = None

    def __repr__(self) -> str:
        return (
            f"AdaptiveEntropyController(coef={self.entropy_coef}, target={self.target}, delta={self.delta}, "
            f"range=[{self.coef_min}, {self.coef_max}], last_window_entropy={self.last_window_entropy})"
        )
