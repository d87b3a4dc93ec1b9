"""Reference ``phase_entropy`` and ``find_boundary`` (docs/ops.md section 6): per-sequence mean entropy of the
reasoning phase (before a marker such as ``</think>``) and of the answer phase (after it), for PEAR
(docs/rewards.md section 3).

Plain PyTorch; THE oracle of the op (a fused implementation is planned and must agree with this file).

Layouts (docs/ops.md section 1): ``entropy [B, T]`` with an optional ``mask [B, T]`` (padded), or ``[N]`` with
``cu_seqlens [B + 1]`` and an optional ``mask [N]`` (packed). Each sequence's valid tokens are indexed
0 .. n_b - 1 in order; masked tokens belong to neither phase. ``boundary [B]`` is the valid-token index of the
marker's first token (``n_b`` = no marker). ``before`` = indices < boundary, ``after`` = indices >=
boundary + boundary_len; the marker's own tokens are in neither phase.

Outputs ``PhaseEntropy(mean_before, mean_after, count_before, count_after)``, all ``[B]``: means in fp32
(fp64 for fp64 input), 0 for an empty phase (a missing marker gives ``mean_after = 0``, the PEAR
convention); counts int32. Differentiable with respect to ``entropy`` (a masked mean, built with row sums
(padded) or ``index_add`` (packed), so the gradient of a token is 1 / count of its phase, 0 outside both
phases).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from reasonrl.reference.layout import check_cu_seqlens

__all__ = ["PhaseEntropy", "phase_entropy_reference", "find_boundary_reference"]


class PhaseEntropy(NamedTuple):
    """``mean_before``, ``mean_after`` (float, 0 for an empty phase), ``count_before``, ``count_after``
    (int32), all ``[B]``."""

    mean_before: torch.Tensor
    mean_after: torch.Tensor
    count_before: torch.Tensor
    count_after: torch.Tensor


def check_layout(x: torch.Tensor, mask, cu_seqlens, op: str, name: str, validate: bool):
    """The layout checks shared by the reference and the fused op (docs/ops.md sections 1 and 7): ``x`` is
    ``[B, T]`` (padded) or ``[N]`` with ``cu_seqlens`` (packed), ``mask`` has ``x``'s shape. Returns
    ``(B, cu [B + 1] int64 on x's device or None, mask as bool on x's device or None)``; with ``validate``
    the offsets and the mask values are checked (host syncs)."""
    device = x.device
    cu = None
    if cu_seqlens is None:
        if x.dim() != 2:
            raise ValueError(f"{op}: {name}: expected [B, T] (padded layout, optional mask [B, T]) or [N] "
                             f"with cu_seqlens (packed layout), got {tuple(x.shape)} without cu_seqlens")
        b = x.shape[0]
    else:
        if x.dim() != 1:
            raise ValueError(f"{op}: {name}: the packed layout (cu_seqlens given) needs [N], got shape "
                             f"{tuple(x.shape)}; a [B, T] input takes mask, not cu_seqlens")
        cu = check_cu_seqlens(cu_seqlens, x.shape[0], op=op, validate=validate, device=device)
        b = cu.numel() - 1
    valid = None
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != tuple(x.shape):
            raise ValueError(f"{op}: mask: expected shape {tuple(x.shape)} (as {name}), got "
                             f"{tuple(getattr(mask, 'shape', ()))}")
        if mask.dtype != torch.bool and validate and bool(((mask != 0) & (mask != 1)).any()):
            raise ValueError(f"{op}: mask must be bool or hold only 0 and 1")
        valid = mask.to(device) != 0
    return b, cu, valid


def valid_counts(x: torch.Tensor, b: int, cu: torch.Tensor | None,
                 valid: torch.Tensor | None) -> torch.Tensor:
    """n_b, the number of valid tokens of every sequence, ``[B]`` int64 (no host sync)."""
    if cu is None:
        if valid is None:
            return torch.full((b,), x.shape[1], dtype=torch.int64, device=x.device)
        return valid.sum(dim=1, dtype=torch.int64)
    if valid is None:
        return cu.diff()
    csum = torch.nn.functional.pad(valid.to(torch.int64).cumsum(0), (1, 0))
    return csum[cu[1:]] - csum[cu[:-1]]


def check_boundary(boundary, b: int, n: torch.Tensor | None, op: str, device: torch.device) -> torch.Tensor:
    """``boundary`` is an integer ``[B]`` tensor; returned as int64 on ``device``. Given the valid counts
    ``n`` (only with validate: one host sync), every value must lie in ``[0, n_b]``."""
    if not isinstance(boundary, torch.Tensor) or boundary.is_floating_point() or boundary.dtype == torch.bool:
        raise TypeError(f"{op}: boundary must be an integer tensor [B], got "
                        f"{getattr(boundary, 'dtype', type(boundary).__name__)}")
    if tuple(boundary.shape) != (b,):
        raise ValueError(f"{op}: boundary: expected shape ({b},) = [B], got {tuple(boundary.shape)}")
    bnd = boundary.to(device=device, dtype=torch.int64)
    if n is not None and b > 0:
        bad = (bnd < 0) | (bnd > n)
        if bool(bad.any()):
            first = int(bad.nonzero()[0, 0])
            raise ValueError(f"{op}: boundary[{first}] = {int(bnd[first])} is outside [0, n_b] = "
                             f"[0, {int(n[first])}] "
                             "(n_b = number of valid tokens of the sequence, meaning 'no marker')")
    return bnd


def check_phase_args(entropy, boundary_len, op: str = "phase_entropy") -> None:
    """The argument checks of ``phase_entropy`` that need no layout: the dtypes and ``boundary_len``."""
    if not isinstance(entropy, torch.Tensor) or not entropy.is_floating_point():
        raise TypeError(f"{op}: entropy must be a floating-point tensor, got "
                        f"{getattr(entropy, 'dtype', type(entropy).__name__)}")
    if isinstance(boundary_len, bool) or not isinstance(boundary_len, int) or boundary_len < 1:
        raise ValueError(f"{op}: boundary_len must be an int >= 1, got {boundary_len!r}")


def check_token_ids(token_ids, op: str = "find_boundary") -> None:
    if (not isinstance(token_ids, torch.Tensor) or token_ids.is_floating_point()
            or token_ids.dtype == torch.bool):
        raise TypeError(f"{op}: token_ids must be an integer tensor, got "
                        f"{getattr(token_ids, 'dtype', type(token_ids).__name__)}")


def marker_list(marker_ids, op: str = "find_boundary") -> list[int]:
    """``marker_ids`` (an int, a sequence of ints or a 1-D int tensor) as a non-empty list of ids >= 0."""
    if isinstance(marker_ids, torch.Tensor):
        if marker_ids.is_floating_point() or marker_ids.dim() > 1:
            raise ValueError(f"{op}: marker_ids must be an int, a sequence of ints or a 1-D int tensor")
        marker = [int(v) for v in marker_ids.reshape(-1).tolist()]
    elif isinstance(marker_ids, int) and not isinstance(marker_ids, bool):
        marker = [marker_ids]
    else:
        try:
            marker = [int(v) for v in marker_ids]
        except (TypeError, ValueError):
            raise ValueError(f"{op}: marker_ids must be an int, a sequence of ints or a 1-D int tensor, got "
                             f"{marker_ids!r}") from None
    if not marker:
        raise ValueError(f"{op}: marker_ids must not be empty")
    if min(marker) < 0:
        raise ValueError(f"{op}: marker_ids must be vocabulary ids >= 0, got {marker}")
    return marker


def _layout(x: torch.Tensor, mask, cu_seqlens, op: str, name: str, validate: bool):
    """(segment id [N_flat], valid [N_flat] bool, valid-token index [N_flat] int64, B, n [B], the
    per-sequence sum [N_flat] -> [B]) for x."""
    device = x.device
    b, cu, valid = check_layout(x, mask, cu_seqlens, op, name, validate)
    valid = torch.ones(x.numel(), dtype=torch.bool, device=device) if valid is None else valid.reshape(-1)
    v64 = valid.to(torch.int64)
    if cu is None:
        # Padded: a sequence is a row, so per-sequence sums are row sums (no scatter: torch.compile's CPU
        # backend fails on the index_add of the packed path, and this is the layout benchmarks compile).
        t = x.shape[1]

        def seq_sum(v: torch.Tensor) -> torch.Tensor:
            return v.reshape(b, t).sum(dim=1)

        seg = torch.arange(b, device=device).repeat_interleave(t)
        idx = (v64.reshape(b, t).cumsum(dim=1) - 1).reshape(-1)
        return seg, valid, idx, b, seq_sum(v64), seq_sum
    seg = torch.searchsorted(cu[1:], torch.arange(x.shape[0], device=device), right=True)

    def seq_sum(v: torch.Tensor) -> torch.Tensor:
        return v.new_zeros(b).index_add(0, seg, v)

    # Valid-token index: running count of valid tokens within the segment, minus 1.
    n = seq_sum(v64)
    start = torch.cumsum(n, 0) - n  # valid tokens before segment b
    idx = v64.cumsum(0) - 1 - start[seg]
    return seg, valid, idx, b, n, seq_sum


def phase_entropy_reference(
    entropy: torch.Tensor,
    boundary: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    boundary_len: int = 1,
    validate: bool = True,
    compute_dtype: torch.dtype | None = None,
) -> PhaseEntropy:
    """Mean entropy before and after a boundary marker, per sequence (docs/ops.md section 6).

    Args:
        entropy: ``[B, T]`` (padded) or ``[N]`` with ``cu_seqlens`` (packed), float.
        boundary: ``[B]`` int: valid-token index of the marker's first token; ``n_b`` = no marker.
        mask: ``[B, T]`` / ``[N]`` valid tokens (bool or 0/1); default all.
        cu_seqlens: ``[B + 1]`` int32/int64 segment offsets (packed layout).
        boundary_len: number of marker tokens (>= 1), which belong to neither phase.
        validate: check mask values, offsets and ``0 <= boundary <= n_b`` (host syncs).
        compute_dtype: float32 (default; float64 for float64 input) or float64.

    Returns:
        ``PhaseEntropy(mean_before, mean_after, count_before, count_after)``, all ``[B]``.
    """
    op = "phase_entropy"
    check_phase_args(entropy, boundary_len, op)
    seg, valid, idx, b, n, seq_sum = _layout(entropy, mask, cu_seqlens, op, "entropy", validate)
    bnd = check_boundary(boundary, b, n if validate else None, op, entropy.device)
    if compute_dtype is None:
        compute_dtype = torch.float64 if entropy.dtype == torch.float64 else torch.float32
    x = entropy.reshape(-1).to(compute_dtype)
    tb = bnd[seg]
    before = valid & (idx < tb)
    after = valid & (idx >= tb + boundary_len)
    zero = x.new_zeros(())
    s_before = seq_sum(torch.where(before, x, zero))
    s_after = seq_sum(torch.where(after, x, zero))
    c_before = seq_sum(before.to(torch.int64))
    c_after = seq_sum(after.to(torch.int64))
    mean_before = torch.where(c_before > 0, s_before / c_before.clamp(min=1).to(compute_dtype), zero)
    mean_after = torch.where(c_after > 0, s_after / c_after.clamp(min=1).to(compute_dtype), zero)
    return PhaseEntropy(mean_before, mean_after, c_before.to(torch.int32), c_after.to(torch.int32))


def find_boundary_reference(
    token_ids: torch.Tensor,
    marker_ids: int | Sequence[int] | torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    validate: bool = True,
) -> torch.Tensor:
    """Valid-token index of the first occurrence of the contiguous id sequence ``marker_ids``, or ``n_b``.

    Args:
        token_ids: ``[B, T]`` (padded) or ``[N]`` with ``cu_seqlens`` (packed), int.
        marker_ids: one id, a sequence of ids, or a 1-D int tensor (non-empty, ids >= 0). Contiguity is in the
            valid-token index space (masked tokens are skipped, as in ``phase_entropy``).
        mask: ``[B, T]`` / ``[N]`` valid tokens; default all.
        cu_seqlens: ``[B + 1]`` segment offsets (packed layout).

    Returns:
        ``[B]`` int64.
    """
    op = "find_boundary"
    check_token_ids(token_ids, op)
    marker = marker_list(marker_ids, op)
    seg, valid, idx, b, n, _ = _layout(token_ids, mask, cu_seqlens, op, "token_ids", validate)
    device = token_ids.device
    m = len(marker)
    width = int(n.max()) if b > 0 else 0
    # Compact the valid tokens into [B, width + m] filled with -1 (never a vocabulary id), then compare every
    # window of m tokens with the marker.
    compact = torch.full((b, width + m), -1, dtype=torch.int64, device=device)
    compact[seg[valid], idx[valid]] = token_ids.reshape(-1)[valid].to(torch.int64)
    windows = compact.unfold(1, m, 1)[:, :width]  # [B, width, m]
    hit = (windows == torch.tensor(marker, dtype=torch.int64, device=device)).all(dim=2)
    pos = torch.arange(width, device=device).expand(b, width)
    big = torch.full((), width + 1, dtype=torch.int64, device=device)
    if width > 0:
        first = torch.where(hit, pos, big).amin(dim=1)
    else:
        first = torch.zeros(b, dtype=torch.int64, device=device)
    return torch.where(first < n, first, n)
