"""Packed (padding-free) sequences for the trainer's forward passes (docs/trainer.md section 10).

With ``packing: true`` the trainer still keeps each rollout batch in the padded ``[B, T]`` layout of
:class:`~reasonrl.trainer.trainer.StepRecord` (the rewards, the advantages and the metrics read it), but every
model forward (old and reference log-probs, the policy loss) runs on a *packed* micro-batch: the rows'
``[prompt ; completion]`` tokens concatenated into one ``[1, N]`` sequence, ``N = sum L_i``, with

* ``position_ids [1, N]`` restarting at 0 at every segment (rotary positions as in the padded rows),
* ``cu_seqlens [n + 1]`` (int32) the segment offsets (docs/ops.md section 1.2),
* an attention layout that keeps every segment to itself (:func:`attention_kwargs`): flash-attention's varlen
  kernel with ``cu_seq_lens_q / _k`` for ``flash_attention_2`` / ``flash_attention_3``; a ``[1, 1, N, N]``
  block-diagonal causal mask for ``sdpa`` (boolean) and ``eager`` (additive, 0 / dtype min).

Per-token values follow docs/ops.md 1.2: row j of segment i predicts token j + 1 of that segment, so the
packed labels are the padded labels ``labels[i, :L_i - 1]`` followed by ``ignore_index`` for the segment's
last row (it has no next token). No padding token exists in the packed layout, so none reaches the attention
or the lm_head; prompt rows carry ``ignore_index`` and are dropped by :func:`reasonrl.linear_token_logprobs`
before its vocabulary pass. The ``[N, H]`` hidden states go straight to the fused ops with ``cu_seqlens``.

Memory / work decisions:

* The block-diagonal mask of the SDPA / eager path is ``N^2`` elements (bool for SDPA: 16 MiB at N = 4096;
  the eager path's additive mask is in the model dtype) and SDPA does not skip the masked blocks, so its
  attention costs ``N^2`` instead of ``sum L_i^2``: keep N bounded with ``optim.micro_batch_tokens``.
  Flash-attention's varlen kernel only visits the diagonal blocks (``sum L_i^2``) and needs no mask.
* A model with sliding-window layers gets no hand-built mask (it would drop the window): its attention mask
  is left to transformers, which derives the same block-diagonal structure (plus the window) from the
  restarting ``position_ids`` when ``attention_mask`` is None (``masking_utils.find_packed_sequence_indices``,
  transformers >= 4.56).
* The gather / scatter between the two layouts is one advanced-indexing op per tensor (index tensors built
  once per micro-batch), O(N).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = [
    "PackedBatch",
    "pack_rows",
    "pack_sequences",
    "attention_kwargs",
    "packed_hidden_states",
    "token_budget_slices",
    "flash_attention_usable",
    "check_token_budget_loss",
    "GLOBAL_NORMALISATION_LOSS_TYPES",
    "select_attention",
    "reward_specs_for_packing",
    "block_diagonal_causal_mask",
]

FLASH_IMPLEMENTATIONS = ("flash_attention_2", "flash_attention_3")
#: TRL loss types whose coefficient uses only global counts (docs/losses.md 10.1): their micro-batch losses
#: add up to the mini-batch loss for ANY split, so token-budget micro-batches of unequal sizes are exact.
GLOBAL_NORMALISATION_LOSS_TYPES = ("dapo", "cispo", "vespo", "reinforce")


@dataclass
class PackedBatch:
    """One packed micro-batch of rows of a padded ``[B, T]`` batch (see the module docstring).

    input_ids / position_ids: ``[1, N]``. cu_seqlens: ``[n + 1]`` int32 on the batch's device. lengths: the
    n segment lengths ``L_i`` (Python ints). row / col: ``[N]`` int64 indices such that packed row k holds
    padded token ``(row[k], col[k])`` (``row - first_row``: the row within the micro-batch); the same
    indices map a padded per-token tensor ``[B, T - 1]`` (one extra column appended for the segment's last
    row) to ``[N]``.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    lengths: list[int]
    row: torch.Tensor
    col: torch.Tensor
    first_row: int = 0

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[1])

    @property
    def max_length(self) -> int:
        return max(self.lengths) if self.lengths else 0

    def gather(self, per_token: torch.Tensor, fill) -> torch.Tensor:
        """``[B, T - 1]`` padded per-token values (position t predicts token t + 1) -> ``[N]`` packed values;
        each segment's last row (no next token) gets ``fill``."""
        extra = torch.full_like(per_token[:, :1], fill)
        return torch.cat([per_token, extra], dim=1)[self.row, self.col]

    def scatter(self, packed: torch.Tensor, width: int) -> torch.Tensor:
        """``[N]`` packed per-token values -> ``[n, width]`` padded rows (rows local to this micro-batch,
        zeros elsewhere), dropping each segment's last row: the inverse of :meth:`gather` on valid tokens."""
        keep = torch.ones_like(self.col, dtype=torch.bool)
        keep[self.cu_seqlens[1:].long() - 1] = False  # the last row of each segment predicts nothing
        out = packed.new_zeros((len(self.lengths), width))
        out[self.row[keep] - self.first_row, self.col[keep]] = packed[keep]
        return out


def pack_rows(input_ids: torch.Tensor, lengths: Sequence[int], rows: range) -> PackedBatch:
    """Pack ``rows`` of the right-padded ``input_ids [B, T]`` whose valid lengths are ``lengths[r]``."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        shape = getattr(input_ids, "shape", None)
        raise ValueError(f"pack_rows: input_ids must be a [B, T] tensor, got {shape}")
    lens = [int(lengths[r]) for r in rows]
    if any(n < 1 or n > input_ids.shape[1] for n in lens):
        raise ValueError(f"pack_rows: every row length must be in [1, T = {input_ids.shape[1]}], got {lens}")
    device = input_ids.device
    row = torch.cat([torch.full((n,), r, dtype=torch.long) for r, n in zip(rows, lens, strict=True)])
    col = torch.cat([torch.arange(n, dtype=torch.long) for n in lens])
    row, col = row.to(device), col.to(device)
    cu = torch.zeros(len(lens) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(lens, dtype=torch.int32), 0)
    return PackedBatch(
        input_ids=input_ids[row, col][None],
        position_ids=col[None],
        cu_seqlens=cu.to(device),
        lengths=lens,
        row=row,
        col=col,
        first_row=rows.start,
    )


def pack_sequences(seqs: Sequence[Sequence[int]], device) -> PackedBatch:
    """Pack token lists (each of length >= 1) into one ``[1, N]`` sequence (``row`` = the list's index)."""
    lens = [len(x) for x in seqs]
    if any(n < 1 for n in lens):
        raise ValueError(f"pack_sequences: every sequence needs at least one token, got lengths {lens}")
    ids = torch.tensor([t for x in seqs for t in x], dtype=torch.long, device=device)
    row = torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(lens)).to(device)
    col = torch.cat([torch.arange(n, dtype=torch.long) for n in lens]).to(device)
    cu = torch.zeros(len(lens) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(lens, dtype=torch.int32), 0)
    return PackedBatch(ids[None], col[None], cu.to(device), lens, row, col, 0)


def _attn_implementation(model: torch.nn.Module) -> str:
    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    impl = getattr(text, "_attn_implementation", None) or getattr(config, "_attn_implementation", "eager")
    return str(impl)


def block_diagonal_causal_mask(
    lengths: Sequence[int], device, *, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """``[1, 1, N, N]`` mask: query k may attend key j iff both are in the same segment and j <= k.

    ``dtype=None``: boolean (True = attend; SDPA's convention). A floating dtype: additive (0 where allowed,
    ``finfo(dtype).min`` elsewhere; eager attention's convention, as transformers' own eager mask)."""
    seg = torch.repeat_interleave(
        torch.arange(len(lengths), device=device), torch.tensor(list(lengths), device=device)
    )
    n = seg.shape[0]
    idx = torch.arange(n, device=device)
    allowed = (seg[:, None] == seg[None, :]) & (idx[None, :] <= idx[:, None])
    if dtype is None:
        return allowed[None, None]
    zero = torch.zeros((), dtype=dtype, device=device)
    return torch.where(allowed, zero, torch.finfo(dtype).min)[None, None]


def attention_kwargs(model: torch.nn.Module, batch: PackedBatch) -> dict:
    """Keyword arguments of the decoder forward that keep the packed segments apart (module docstring)."""
    from reasonrl.rewards._scoring import uses_sliding_window

    impl = _attn_implementation(model)
    kw: dict = {"position_ids": batch.position_ids}
    if impl in FLASH_IMPLEMENTATIONS:
        # Explicit varlen arguments: transformers would otherwise re-derive them from position_ids (a host
        # sync and a scan per layer).
        kw.update(
            cu_seq_lens_q=batch.cu_seqlens,
            cu_seq_lens_k=batch.cu_seqlens,
            max_length_q=batch.max_length,
            max_length_k=batch.max_length,
        )
        kw["attention_mask"] = None
    elif impl in ("sdpa", "eager") and not uses_sliding_window(model):
        dtype = None if impl == "sdpa" else next(model.parameters()).dtype
        kw["attention_mask"] = block_diagonal_causal_mask(batch.lengths, batch.input_ids.device, dtype=dtype)
    else:
        # transformers builds the packed (block-diagonal) mask itself from the restarting position_ids when
        # attention_mask is None and no cache is used (masking_utils.find_packed_sequence_indices).
        kw["attention_mask"] = None
    return kw


def packed_hidden_states(model: torch.nn.Module, batch: PackedBatch):
    """``(hidden [N, H], lm_head weight, bias)`` of the packed micro-batch (no logits)."""
    from reasonrl.models import hidden_states_and_lm_head

    kw = attention_kwargs(model, batch)
    mask = kw.pop("attention_mask")
    hidden, weight, bias = hidden_states_and_lm_head(model, batch.input_ids, mask, use_cache=False, **kw)
    return hidden[0], weight, bias


def token_budget_slices(rows: range, lengths: Sequence[int], budget: int) -> list[range]:
    """Consecutive slices of ``rows`` holding at most ``budget`` tokens each (``sum lengths[r]``); a row
    longer than the budget forms a micro-batch of its own. Order is kept (rows of one group stay adjacent)."""
    if budget < 1:
        raise ValueError(f"token_budget_slices: budget must be >= 1, got {budget}")
    out: list[range] = []
    start, used = rows.start, 0
    for r in rows:
        n = int(lengths[r])
        if r > start and used + n > budget:
            out.append(range(start, r))
            start, used = r, 0
        used += n
    if len(rows):
        out.append(range(start, rows.stop))
    return out


def flash_attention_usable(model: torch.nn.Module) -> bool:
    """True when flash-attention 2's varlen kernel can run this model: flash-attn importable, the model on a
    CUDA device, in float16 / bfloat16 (flash-attn has no fp32 kernel)."""
    try:
        p = next(model.parameters())
    except StopIteration:
        return False
    if p.device.type != "cuda" or p.dtype not in (torch.float16, torch.bfloat16):
        return False
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True


def check_token_budget_loss(loss_config, *, entropy_bonus: bool) -> None:
    """Token-budget micro-batches have unequal sizes: only losses normalised by global counts (docs/losses.md
    10.1 ``dapo`` / ``cispo`` / ``vespo`` / ``reinforce``, or a verl ``loss_agg_mode`` with
    ``agg_version="0.9"``, 10.3) add up to the mini-batch's loss; under TRL normalisation the entropy bonus
    is a micro-batch mean (11.1), so ``entropy_bonus`` (a non-zero or adaptive coefficient) must be off.
    Raises ValueError otherwise."""
    mode = loss_config.loss_agg_mode
    global_trl = loss_config.loss_type in GLOBAL_NORMALISATION_LOSS_TYPES and not entropy_bonus
    ok = (mode is None and global_trl) or (mode is not None and loss_config.agg_version == "0.9")
    if not ok:
        what = (
            f"loss_type={loss_config.loss_type!r}"
            if mode is None
            else f"loss_agg_mode={mode!r} with agg_version={loss_config.agg_version!r}"
        )
        if mode is None and loss_config.loss_type in GLOBAL_NORMALISATION_LOSS_TYPES:
            what += " with an entropy bonus (a micro-batch mean under TRL normalisation, docs/losses.md 11.1)"
        raise ValueError(
            f"optim.micro_batch_tokens > 0 gives micro-batches of unequal sizes, but {what} normalises by "
            "local micro-batch counts (docs/losses.md 10.1 / 10.4), so their losses would not add up to the "
            f"mini-batch's loss; use loss_type in {GLOBAL_NORMALISATION_LOSS_TYPES} or a verl loss_agg_mode "
            "with agg_version 0.9 (dr_grpo: loss_agg_mode=seq-mean-token-sum-norm, docs/losses.md 10.5), or "
            "optim.micro_batch_size"
        )


def select_attention(model: torch.nn.Module, choice: str) -> str:
    """Set the attention implementation of packed passes on ``model`` (``TrainerConfig.packing_attention``)
    and return the one in use. ``auto``: ``flash_attention_2`` when :func:`flash_attention_usable`, else the
    model's own; ``model``: the model's own; a name: that one (``flash_attention_2`` raises a clear error
    when flash-attn cannot run the model)."""
    if choice == "auto":
        choice = "flash_attention_2" if flash_attention_usable(model) else "model"
    if choice == "flash_attention_2" and not flash_attention_usable(model):
        raise ValueError(
            "packing_attention='flash_attention_2' needs the flash-attn package, the model on a CUDA device "
            "and a float16 / bfloat16 dtype; use packing_attention=auto (SDPA otherwise)"
        )
    if choice != "model" and _attn_implementation(model) != choice:
        model.set_attn_implementation(choice)
    return _attn_implementation(model)


def reward_specs_for_packing(specs, attn_implementation: str):
    """The reward specs with R3's scoring packed as well (``prefix_sharing="packed"``) when the packed passes
    use flash-attention's varlen kernel; an explicit ``prefix_sharing`` option is kept. With a dense
    block-diagonal mask (SDPA / eager) R3 keeps its KV-cache route: packing its micro-batches of up to
    ``max_batch_tokens`` (16,384) tokens would cost N^2 attention (module docstring), and that route
    already sends no padding to the lm_head (only the reference positions are gathered)."""
    import dataclasses

    if attn_implementation not in FLASH_IMPLEMENTATIONS:
        return list(specs)
    out = []
    for s in specs:
        if s.name == "r3" and "prefix_sharing" not in s.options:
            s = dataclasses.replace(s, options={**s.options, "prefix_sharing": "packed"})
        out.append(s)
    return out
