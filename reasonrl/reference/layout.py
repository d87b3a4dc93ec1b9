"""The packed layout's offsets (docs/ops.md section 7), checked one way for every op and reference.

``cu_seqlens [B + 1]`` (int32 / int64) cuts a packed ``[N]`` axis into B segments: ``cu[0] = 0``,
non-decreasing, ``cu[B] = N``; an empty segment (equal neighbours) is allowed. Plain PyTorch, so the
references can use it without the compiled extension.
"""

from __future__ import annotations

import torch


def check_cu_seqlens(
    cu_seqlens,
    total: int,
    *,
    op: str,
    name: str = "cu_seqlens",
    total_name: str = "N",
    validate: bool = True,
    device: torch.device | None = None,
) -> torch.Tensor:
    """``cu_seqlens`` as int64 on ``device`` (default: where it is) after the checks: its type, rank and dtype
    always (free); its values against ``total`` only with ``validate`` (one host sync, O(B)). Errors are
    ``ValueError`` naming ``op``, the argument and what was expected; ``total_name`` says where ``total``
    comes from (e.g. ``"N = logprobs.shape[0]"``)."""
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError(f"{op}: {name}: expected an int32/int64 [B + 1] tensor with B >= 0, got "
                         f"{getattr(cu_seqlens, 'shape', type(cu_seqlens).__name__)!r}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{op}: {name}: expected int32 or int64, got {cu_seqlens.dtype}")
    cu = cu_seqlens.to(device=cu_seqlens.device if device is None else device, dtype=torch.int64)
    if validate:
        c = cu.detach().cpu()
        if int(c[0]) != 0 or int(c[-1]) != total or bool((c.diff() < 0).any()):
            raise ValueError(f"{op}: {name} must start at 0, be non-decreasing and end at {total_name} = "
                             f"{total}; got {c.tolist()[:8]}{' ...' if c.numel() > 8 else ''} "
                             f"(last {int(c[-1])})")
    return cu
