"""Accuracy bounds (docs/ops.md section 8, from the ONE tolerance table of ``reasonrl.testing``) for the
correctness gate of every benchmark (docs/performance.md section 4.4), and the
looser documented bound for peers.
"""

from __future__ import annotations

import math

import torch

from reasonrl import testing

# Providers other than reasonrl (peers and the reference baselines) are held to max(docs/ops.md bound,
# PEER_RTOL[dtype] * scale), scale = 1 + max|oracle| for outputs and max|oracle| for gradients. fp32: 1e-3.
# 16-bit: 5e-2, because peers may legitimately compute in the input dtype (TRL's CPU bf16 path takes the
# log-softmax in bf16: its entropy and gradients are ~2% of max|oracle| off at V = 4000); a semantic error
# such as a wrong temperature (0.9 vs 1: ~10% of |log-prob|) still fails.
PEER_RTOL = {"float32": 1e-3, "bfloat16": 5e-2, "float16": 5e-2}


class MaxError:
    """Running max |impl - oracle| over valid rows, accumulated block by block.

    ``err_beyond_ulp`` is the same maximum after granting each element ``ulps`` units in the last place of
    ``ulp_dtype`` at the oracle value (the 16-bit gradient rule of docs/ops.md section 8).
    """

    def __init__(self) -> None:
        self.err = 0.0
        self.err_beyond_ulp = 0.0
        self.max_oracle = 0.0

    def update(self, impl: torch.Tensor, oracle: torch.Tensor, valid: torch.Tensor,
               ulp_dtype: torch.dtype | None = None, ulps: float = 0.0) -> None:
        if not bool(valid.any()):
            return
        a, o = impl[valid].double(), oracle[valid].double()
        diff = (a - o).abs()
        # NaN anywhere is an error, whatever max() would make of it.
        self.err = max(self.err, float(diff.max()) if not bool(diff.isnan().any()) else math.inf)
        self.max_oracle = max(self.max_oracle, float(o.abs().max()))
        if ulp_dtype is not None:
            beyond = (diff - ulps * testing.ulp(o, ulp_dtype)).clamp_min(0)
            self.err_beyond_ulp = max(self.err_beyond_ulp,
                                      float(beyond.max()) if not bool(beyond.isnan().any()) else math.inf)


def acceptance_bound(quantity: str, dtype: torch.dtype, err_ref: float, magnitude: float) -> float:
    """docs/ops.md section 8 from the one tolerance table (``reasonrl.testing``): ``quantity`` is 'stat'
    (magnitude 1 + max|oracle|) or 'grad' (magnitude max of the upstream gradients)."""
    tol = testing.tolerance(quantity, dtype)
    return tol.ref_factor * err_ref + tol.atol_scale * magnitude


def peer_bound(bound: float, scale: float, dtype: str) -> float:
    return max(bound, PEER_RTOL[dtype] * scale)
