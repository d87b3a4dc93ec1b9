"""Public functional entry points of the reward tensor ops: ``r3_reward``, ``phase_entropy``,
``find_boundary`` (docs/ops.md sections 5 and 6).

``r3_reward`` dispatches to the registered op (``reasonrl/ops/r3_reward.py``): ``impl="auto"`` takes the
C++ kernel on CPU tensors and the Triton kernel on CUDA tensors, falling back to the plain-PyTorch reference
(``reasonrl/reference/``, the oracle); ``"cpp"`` / ``"triton"`` / ``"reference"`` choose explicitly, and an
explicit choice that cannot run raises ``RuntimeError`` (docs/ops.md section 7: never a silent fallback).
``phase_entropy`` and ``find_boundary`` run the reference only for now: ``"auto"`` and ``"reference"`` run it,
any other value raises ``RuntimeError``. The ops are O(G K L) (R3) and O(N) (phase entropy) elementwise work
after the model's forward pass, which dominates the reward's cost; the fused versions mainly save kernel
launches and the reference's [G, K, L] temporaries.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from reasonrl.ops import validation_enabled

# r3_reward is the registered op itself (C++ on CPU, Triton on CUDA, the reference as fallback).
from reasonrl.ops.r3_reward import r3_reward
from reasonrl.reference.phase_entropy import PhaseEntropy, find_boundary_reference, phase_entropy_reference
from reasonrl.reference.r3_reward import R3Output

__all__ = ["r3_reward", "phase_entropy", "find_boundary", "R3Output", "PhaseEntropy"]

_IMPLS = ("auto", "reference")


def _check_impl(op: str, impl: str) -> None:
    if impl not in _IMPLS:
        raise RuntimeError(f"{op}: impl={impl!r} is not available: this op currently has the 'reference' "
                           "implementation only (use impl='auto' or 'reference')")


def phase_entropy(
    entropy: torch.Tensor,
    boundary: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    boundary_len: int = 1,
    impl: str = "auto",
    validate: bool | None = None,
) -> PhaseEntropy:
    """Mean entropy before / after a boundary marker per sequence (docs/ops.md section 6).

    ``entropy [B, T]`` (+ ``mask``) or ``[N]`` with ``cu_seqlens [B + 1]`` (+ ``mask [N]``); ``boundary [B]``
    int (valid-token index of the marker, ``n_b`` = none). Returns ``PhaseEntropy(mean_before, mean_after,
    count_before, count_after)``, all ``[B]``. Differentiable with respect to ``entropy``.

    Runs the reference implementation for now; a fused implementation is planned.
    """
    _check_impl("phase_entropy", impl)
    return phase_entropy_reference(entropy, boundary, mask=mask, cu_seqlens=cu_seqlens,
                                   boundary_len=boundary_len,
                                   validate=validation_enabled() if validate is None else validate)


def find_boundary(
    token_ids: torch.Tensor,
    marker_ids: int | Sequence[int] | torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    impl: str = "auto",
    validate: bool | None = None,
) -> torch.Tensor:
    """Valid-token index ``[B]`` (int64) of the first occurrence of ``marker_ids`` in each sequence,
    ``n_b`` if absent (docs/ops.md section 6). Runs the reference implementation for now."""
    _check_impl("find_boundary", impl)
    return find_boundary_reference(token_ids, marker_ids, mask=mask, cu_seqlens=cu_seqlens,
                                   validate=validation_enabled() if validate is None else validate)
