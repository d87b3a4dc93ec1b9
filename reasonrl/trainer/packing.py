"""Packed (padding-free) sequences for the trainer's forward passes (docs/trainer.md section 11).

With ``packing: true`` the trainer still keeps each rollout batch in the padded ``[B, T]`` layout of
:class:`~reasonrl.trainer.trainer.StepRecord` (the rewards, the advantages and the metrics read it), but every
model forward (old and reference log-probs, the policy loss, R3's scoring) runs on a *packed* micro-batch:
the rows' ``[prompt ; completion]`` tokens concatenated, ``N = sum L_i`` tokens (:class:`PackedBatch`), with
``position_ids`` restarting at 0 at every segment (rotary positions as in the padded rows) and
``cu_seqlens [n + 1]`` (int32) the segment offsets (docs/ops.md section 1.2). The decoder runs it in one of
two layouts (:func:`decoder_inputs`), each keeping every segment to itself:

* ``flash_attention_2`` / ``flash_attention_3``: one ``[1, N]`` row and flash-attention's varlen kernel with
  ``cu_seq_lens_q / _k``. No empty slot at all; the attention visits only the diagonal blocks
  (``sum L_i^2``).
* Otherwise (``sdpa``, ``eager``): the segments bin-packed (first-fit decreasing) into ``R`` rows of width
  ``W`` (``packing_row_tokens``, default the longest segment) with a ``[R, 1, W, W]`` block-diagonal causal
  mask (boolean for SDPA, additive 0 / dtype-min for eager) (:func:`row_layout`). SDPA does not skip masked
  blocks, so one ``[1, N]`` row would cost ``N^2`` attention (at N = 6,551 tokens on the embedded task: 43 M
  scores per head and layer against the padded layout's 0.8 M); rows of width ~T cost ``R W^2 ~ N T``, about
  the padded layout's ``B T^2``, while the slots the MLP computes for nothing shrink from the padding
  (``B T - N``) to the bin-packing remainder. The remainder slots attend only to themselves (no fully masked
  query row, which is NaN in SDPA) and no token attends to them.

Per-token values follow docs/ops.md 1.2: row j of segment i predicts token j + 1 of that segment, so the
packed labels are the padded labels ``labels[i, :L_i - 1]`` followed by ``ignore_index`` for the segment's
last row (it has no next token). Only the ``[N, H]`` hidden states of real tokens are gathered, so no
padding slot reaches the lm_head; prompt rows carry ``ignore_index`` and are dropped by
:func:`reasonrl.linear_token_logprobs` before its vocabulary pass. The hidden states go straight to the fused
ops with ``cu_seqlens``.

Memory / work decisions:

* The dense mask is ``R W^2`` booleans (SDPA) or model-dtype values (eager): 0.6 MiB of booleans for 64 rows
  of width 100.
* A model with sliding-window layers gets no hand-built mask (it would drop the window): its attention mask
  is left to transformers, which derives the same block-diagonal structure (plus the window) from the
  restarting ``position_ids`` when ``attention_mask`` is None (``masking_utils.find_packed_sequence_indices``,
  transformers >= 4.56; an empty slot has position 0, a sequence of its own).
* The gathers / scatters between the layouts are one advanced-indexing op per tensor, O(N), with index
  tensors built once per micro-batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = [
    "PackedBatch",
    "pack_rows",
    "pack_sequences",
    "decoder_inputs",
    "row_layout",
    "RowLayout",
    "packed_hidden_states",
    "packed_logits",
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


def block_diagonal_causal_mask(segments: torch.Tensor, *, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``[R, 1, W, W]`` mask from segment ids ``[R, W]``: query k may attend key j iff they carry the same
    segment id and j <= k.

    ``dtype=None``: boolean (True = attend; SDPA's convention). A floating dtype: additive (0 where allowed,
    ``finfo(dtype).min`` elsewhere; eager attention's convention, as transformers' own eager mask)."""
    w = segments.shape[1]
    idx = torch.arange(w, device=segments.device)
    allowed = (segments[:, :, None] == segments[:, None, :]) & (idx[None, :] <= idx[:, None])[None]
    allowed = allowed[:, None]
    if dtype is None:
        return allowed
    zero = torch.zeros((), dtype=dtype, device=segments.device)
    return torch.where(allowed, zero, torch.finfo(dtype).min)


@dataclass
class RowLayout:
    """The segments of a :class:`PackedBatch` placed in ``R`` rows of width ``W`` (first-fit decreasing).

    input_ids / position_ids / segments: ``[R, W]``; a slot holding no token has token id 0, position 0 and
    a segment id of its own (negative), so it attends only to itself (no fully masked query row, which would
    be NaN in SDPA) and no token attends to it. src: ``[N]`` flat indices into ``R * W`` of the packed tokens
    in packed order."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    segments: torch.Tensor
    src: torch.Tensor

    @property
    def fill(self) -> float:
        """Fraction of the ``R x W`` slots that hold a token."""
        return self.src.numel() / max(1, self.input_ids.numel())


def row_layout(batch: PackedBatch, width: int) -> RowLayout:
    """First-fit decreasing bin packing of the segments into rows of ``width`` (>= the longest segment).

    Attention with a dense mask costs ``R W^2`` per layer and head, so rows about as wide as the longest
    sequence keep it near the padded layout's ``B T^2`` while the padding slots (the MLP's waste) shrink to
    the bin-packing remainder."""
    if width < batch.max_length:
        raise ValueError(f"row_layout: width {width} is below the longest segment ({batch.max_length})")
    order = sorted(range(len(batch.lengths)), key=lambda i: -batch.lengths[i])
    free: list[int] = []  # room left per row
    place = [(0, 0)] * len(batch.lengths)  # (row, offset) of each segment
    for i in order:
        n = batch.lengths[i]
        for r, room in enumerate(free):
            if room >= n:
                place[i] = (r, width - room)
                free[r] -= n
                break
        else:
            place[i] = (len(free), 0)
            free.append(width - n)
    R, device = len(free), batch.input_ids.device
    slot = torch.arange(R * width, device=device)
    segments = -1 - slot  # every empty slot its own segment
    position = torch.zeros(R * width, dtype=torch.long, device=device)
    starts = torch.tensor([r * width + o for r, o in place], dtype=torch.long, device=device)
    seg_of = torch.repeat_interleave(
        torch.arange(len(batch.lengths), device=device), torch.tensor(batch.lengths, device=device)
    )
    src = starts[seg_of] + batch.col
    segments[src] = seg_of
    position[src] = batch.col
    ids = torch.zeros(R * width, dtype=batch.input_ids.dtype, device=device)
    ids[src] = batch.input_ids[0]
    shape = (R, width)
    return RowLayout(ids.view(shape), position.view(shape), segments.view(shape), src)


def decoder_inputs(model: torch.nn.Module, batch: PackedBatch, row_tokens: int = 0):
    """``(input_ids, kwargs, src)`` for the decoder forward of a packed micro-batch that keeps the segments
    apart (module docstring); ``src`` (None: the identity) maps the output's flattened rows to the packed
    tokens. ``row_tokens``: the row width of the dense-mask layout (0: the longest segment; at most N)."""
    from reasonrl.rewards._scoring import uses_sliding_window

    impl = _attn_implementation(model)
    if impl in FLASH_IMPLEMENTATIONS:
        # One [1, N] row, explicit varlen arguments: transformers would otherwise re-derive them from
        # position_ids (a host sync and a scan per layer).
        kw = dict(
            position_ids=batch.position_ids,
            attention_mask=None,
            cu_seq_lens_q=batch.cu_seqlens,
            cu_seq_lens_k=batch.cu_seqlens,
            max_length_q=batch.max_length,
            max_length_k=batch.max_length,
        )
        return batch.input_ids, kw, None
    # Rows wider than the whole micro-batch would only add empty slots.
    layout = row_layout(batch, max(min(row_tokens, batch.num_tokens), batch.max_length))
    kw = dict(position_ids=layout.position_ids)
    if impl in ("sdpa", "eager") and not uses_sliding_window(model):
        dtype = None if impl == "sdpa" else next(model.parameters()).dtype
        kw["attention_mask"] = block_diagonal_causal_mask(layout.segments, dtype=dtype)
    else:
        # transformers builds the packed (block-diagonal) mask itself from the restarting position_ids when
        # attention_mask is None and no cache is used (masking_utils.find_packed_sequence_indices); each
        # empty slot has position 0, so it is a sequence of its own there too.
        kw["attention_mask"] = None
    return layout.input_ids, kw, layout.src


def packed_hidden_states(model: torch.nn.Module, batch: PackedBatch, row_tokens: int = 0, hidden_fn=None):
    """``(hidden [N, H], lm_head weight, bias)`` of the packed micro-batch (no logits). ``hidden_fn``:
    ``(model, ids, mask, **decoder_kwargs) -> (hidden, weight, bias)``, default
    :func:`reasonrl.models.hidden_states_and_lm_head` (the trainer passes its FSDP2-aware one)."""
    if hidden_fn is None:
        from reasonrl.models import hidden_states_and_lm_head as hidden_fn

    ids, kw, src = decoder_inputs(model, batch, row_tokens)
    mask = kw.pop("attention_mask")
    hidden, weight, bias = hidden_fn(model, ids, mask, use_cache=False, **kw)
    hidden = hidden.reshape(-1, hidden.shape[-1])
    return (hidden if src is None else hidden[src]), weight, bias


def packed_logits(model: torch.nn.Module, batch: PackedBatch, row_tokens: int = 0) -> torch.Tensor:
    """``[N, V]`` logits of the packed micro-batch (the ``loss_impl="logits"`` path)."""
    ids, kw, src = decoder_inputs(model, batch, row_tokens)
    logits = model(input_ids=ids, use_cache=False, **kw).logits
    logits = logits.reshape(-1, logits.shape[-1])
    return logits if src is None else logits[src]


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


def reward_specs_for_packing(specs):
    """The reward specs with R3's scoring packed as well (``prefix_sharing="packed"``, reasonrl/rewards/
    _scoring.py) unless the spec sets ``prefix_sharing`` itself; the config's specs are not modified."""
    import dataclasses

    out = []
    for s in specs:
        if s.name == "r3" and "prefix_sharing" not in s.options:
            s = dataclasses.replace(s, options={**s.options, "prefix_sharing": "packed"})
        out.append(s)
    return out
