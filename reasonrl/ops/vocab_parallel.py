"""Vocab-parallel plumbing shared by the log-prob ops (docs/ops.md section 3.3), ``token_logprobs`` on a
logits shard and ``linear_token_logprobs`` on an lm_head shard: the shard layout and the exact combination of
per-shard streaming statistics into the global log-sum-exp, label log-prob, entropy and rank.

Each of the P ranks of a process group holds the global vocabulary ids ``[v_r, v_r + V_r)`` (a contiguous
shard). Labels are global ids and identical on all ranks, as are temperature and ignore_index; outputs are
identical on all ranks.

Collectives per call, all O(N) (rows), never O(N x V):

* layout (:func:`resolve_vocab_shard`): none for equal shards with ``validate=False`` (``v_r = r V_r``,
  ``V_glob = P V_r``); otherwise one all-gather of ``(v_r, V_r)`` (``[P, 2]`` int64) and a host sync, which
  checks that the shards tile ``[0, V_glob)`` and yields ``V_glob = sum_r V_r``. It is issued per call rather
  than cached: a cache hit on one rank and a miss on another would deadlock, and a call that validates already
  syncs for the label check. Unequal shards (``vocab_start`` given) therefore always cost this one sync.
* ``want_rank``: one all-reduce MAX of the raw label logit ``[N]`` (non-owners send -inf), the pivot of the
  rank count, which must be known before the local streaming pass.
* one all-reduce MAX of ``[m_r, t_r]`` (``[N, 2]``) and one all-reduce SUM of ``[s_r', b_r' (entropy),
  c_r (rank)]``, all in float64 (the rescale and the label log-prob are formed there, see
  :func:`combine_vocab_shards`).
* ``linear_token_logprobs`` only, in the backward: one all-reduce SUM of the partial ``grad_hidden``
  ``[N, H]`` (:func:`all_reduce_sum_`), skipped with ``reduce_grad_hidden=False``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = [
    "VocabShard", "resolve_vocab_shard", "shard_of_call", "label_bound", "label_owner", "share_label_logit",
    "label_pivot", "all_reduce_sum_", "combine_vocab_shards", "combine_local_outputs",
    "finish_sharded_forward",
]


@dataclass(frozen=True)
class VocabShard:
    """This rank's place in the vocab-parallel layout."""

    group: object
    rank: int
    world_size: int
    vocab_start: int  # v_r: global id of local column 0
    vocab: int  # V_r: local columns
    vocab_global: int  # V_glob


def _dist():
    import torch.distributed as dist

    if not dist.is_available():
        raise RuntimeError("vocab-parallel mode (process_group given) needs torch.distributed")
    return dist


def resolve_vocab_shard(
    process_group,
    vocab: int,
    vocab_start: int | None,
    *,
    validate: bool,
    device: torch.device,
    op: str = "token_logprobs",
) -> VocabShard:
    """The shard layout of this rank (see the module docstring for the collectives it issues).

    Raises ``ValueError`` naming ``vocab_start`` on every rank when the shards of the group do not tile
    ``[0, V_glob)``: the check runs on the gathered table, which every rank sees identically, so no rank
    is left waiting in a later collective.
    """
    dist = _dist()
    if vocab_start is not None and (isinstance(vocab_start, bool) or not isinstance(vocab_start, int)):
        raise TypeError(f"{op}: vocab_start must be an int or None, got {type(vocab_start).__name__}")
    rank = dist.get_rank(process_group)
    world = dist.get_world_size(process_group)
    start = rank * vocab if vocab_start is None else vocab_start
    if vocab_start is None and not validate:
        return VocabShard(process_group, rank, world, start, vocab, world * vocab)

    # Gloo reduces CPU tensors, NCCL CUDA tensors: the table lives where the logits do.
    mine = torch.tensor([start, vocab], dtype=torch.int64, device=device)
    table = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(table, mine, group=process_group)
    layout = [tuple(int(v) for v in t.tolist()) for t in table]  # one host sync
    vocab_global = sum(v for _, v in layout)
    shown = ", ".join(f"rank {r}: [{s}, {s + v})" for r, (s, v) in enumerate(layout))
    if vocab_start is None:
        if len({v for _, v in layout}) != 1:
            raise ValueError(
                f"{op}: without vocab_start the vocabulary shards must have equal sizes (v_r = rank * V_r), "
                f"but the local V differ across the group ({shown}); pass vocab_start for unequal shards"
            )
    else:
        tiles = sorted(layout)
        pos = 0
        for s, v in tiles:
            if s != pos:
                raise ValueError(
                    f"{op}: vocab_start does not match the shard layout: the shards "
                    f"[vocab_start, vocab_start + V) of the group must tile [0, {vocab_global}) without gaps "
                    f"or overlaps; got {shown}"
                )
            pos = s + v
    return VocabShard(process_group, rank, world, start, vocab, vocab_global)


def shard_of_call(op: str, process_group, vocab: int, vocab_start: int | None, *, validate: bool,
                  device: torch.device) -> VocabShard | None:
    """The call's vocab shard (:func:`resolve_vocab_shard`), or None without a process_group; ``vocab_start``
    alone is a ValueError."""
    if process_group is not None:
        return resolve_vocab_shard(process_group, vocab, vocab_start, validate=validate, device=device, op=op)
    if vocab_start is not None:
        raise ValueError(f"{op}: vocab_start is only meaningful with a process_group (vocab-parallel mode); "
                         f"got vocab_start={vocab_start!r} and process_group=None")
    return None


def label_bound(vocab: int, shard: VocabShard | None) -> tuple[int, str]:
    """``(the bound of valid labels, its name in error messages)``: V, or V_glob with a process_group."""
    if shard is None:
        return vocab, "V"
    return shard.vocab_global, "V_glob (the global vocabulary of the process_group)"


def label_owner(
    labels: torch.Tensor, ignore_index: int, shard: VocabShard
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(owner [N] bool, local [N] int64)``: which rows' labels lie in this shard, and their local column
    (0 where not owned, so it can index)."""
    local = labels.to(torch.int64) - shard.vocab_start
    owner = (labels != ignore_index) & (local >= 0) & (local < shard.vocab)
    return owner, torch.where(owner, local, 0)


def share_label_logit(value: torch.Tensor, owner: torch.Tensor, shard: VocabShard) -> torch.Tensor:
    """The owner's raw label logit ``value [N]`` on every rank (fp32; fp64 for fp64 logits, so the rank
    compares raw logits in their own precision): non-owners send -inf to one all-reduce MAX. The pivot of
    the sharded rank count (docs/ops.md 3.3)."""
    dist = _dist()
    pivot = value.to(torch.float64 if value.dtype == torch.float64 else torch.float32)
    pivot = pivot.masked_fill(~owner, float("-inf")).contiguous()
    dist.all_reduce(pivot, op=dist.ReduceOp.MAX, group=shard.group)
    return pivot


def label_pivot(x: torch.Tensor, labels: torch.Tensor, ignore_index: int, shard: VocabShard) -> torch.Tensor:
    """The raw label logit ``[N]`` (fp32, as the rank is defined on raw logits upcast to fp32) on every rank,
    read from the logits shard ``x [N, V_r]`` by the owner and shared by :func:`share_label_logit`."""
    owner, local = label_owner(labels, ignore_index, shard)
    return share_label_logit(x.gather(1, local.unsqueeze(1)).squeeze(1), owner, shard)


def all_reduce_sum_(t: torch.Tensor, shard: VocabShard) -> torch.Tensor:
    """In-place SUM over the group (the partial ``grad_hidden`` of the vocab-parallel linear op)."""
    dist = _dist()
    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=shard.group)
    return t


def combine_local_outputs(
    local: tuple[torch.Tensor, ...],
    labels: torch.Tensor,
    ignore_index: int,
    want_entropy: bool,
    want_rank: bool,
    shard: VocabShard,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(logprobs, entropy, rank, lse, stats)`` global, from the 5 outputs of a local forward op run in
    vocab-parallel mode (``token_logprobs_fwd`` or ``linear_token_logprobs_fwd``: same layout). Entropy and
    rank stay the op's empty ``[0]`` tensors when not wanted, as in the unsharded op. The one combine of
    docs/ops.md 3.3 for both ops."""
    lp_r, ent_r, rank_r, _, stats_r = local
    lp, ent, rank, lse, stats = combine_vocab_shards(
        lp_r, stats_r, ent_r if want_entropy else None, rank_r if want_rank else None, labels, ignore_index,
        shard,
    )
    return lp, ent if ent is not None else ent_r, rank if rank is not None else rank_r, lse, stats


def finish_sharded_forward(ctx, local, labels, call, saved: tuple):
    """The end of a vocab-parallel ``autograd.Function.forward`` (token_logprobs and linear_token_logprobs):
    :func:`combine_local_outputs` of this rank's ``local`` op outputs, then save ``saved`` + the global
    (stats, entropy) for the backward, keep ``call`` (the non-tensor arguments: ignore_index, want_entropy,
    want_rank, shard, ...) and mark rank and LSE non-differentiable.
    Returns (logprobs, entropy, rank, lse)."""
    lp, ent, rank, lse, stats = combine_local_outputs(
        local, labels, call.ignore_index, call.want_entropy, call.want_rank, call.shard)
    ctx.save_for_backward(*saved, stats, ent)
    ctx.call = call
    ctx.set_materialize_grads(False)
    ctx.mark_non_differentiable(rank, lse)
    return lp, ent, rank, lse


def combine_vocab_shards(
    lp_r: torch.Tensor,
    stats_r: torch.Tensor,
    entropy_r: torch.Tensor | None,
    rank_r: torch.Tensor | None,
    labels: torch.Tensor,
    ignore_index: int,
    shard: VocabShard,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """Global ``(logprobs, entropy, rank, lse, stats)`` from this shard's kernel outputs (docs/ops.md 3.3,
    steps 2-5).

    Inputs, per row, from the local kernel in vocab-parallel mode: ``lp_r = (z_y - m_r) - log s_r`` (-inf
    where another rank owns the label), ``stats_r = (m_r, log s_r)``,
    ``entropy_r = H_r = log s_r - b_r / s_r`` and ``rank_r = 1 + c_r`` (0 for invalid rows). The kernels
    do not expose the shifted entropy accumulator b_r itself; b_r / s_r = log s_r - H_r is recovered from
    the two fp32 outputs (both O(log V), so the absolute error is a few fp32 ulps of log V, far inside the
    1e-5 atol of docs/ops.md section 8).

    In float64, with M = max_r m_r and delta_r = m_r - M <= 0:

    * t_r = lp_r + log s_r + m_r = z_y on the owner, -inf elsewhere; MAX over ranks gives t.
    * s_r' = exp(log s_r + delta_r) (never exp of a positive number), b_r' = s_r' (b_r / s_r + delta_r);
      both 0 for a shard whose columns are all -inf (m_r = -inf), which also keeps -inf - -inf out.
    * LSE = M + log S, lp = (t - M) - log S, H = log S - Bs / S, rank = 1 + sum_r c_r.

    A NaN statistic (NaN/+inf logits, an invalid label or temperature with validate=False) is kept out of
    the MAX (whose NaN semantics differ between backends) and put into the SUM instead, so every rank
    gets NaN for that row, as the unsharded op does. Ignored rows are 0 (rank 0).

    ``stats`` [N, 2] = (M, log S) in the dtype of ``stats_r``: what the local backward kernel needs to form
    the global p_j = exp((z_j - M) - log S) on its own columns.
    """
    dist = _dist()
    f64 = torch.float64
    inf = float("inf")
    m = stats_r[:, 0].to(f64)
    log_s = stats_r[:, 1].to(f64)
    nan_row = torch.isnan(m) | torch.isnan(log_s)
    m_in = m.masked_fill(nan_row, -inf)
    live = m_in > -inf  # this shard has a finite column in the row
    t = torch.where(live, lp_r.to(f64) + log_s + m, -inf)
    mt = torch.stack([m_in, t], dim=1)
    dist.all_reduce(mt, op=dist.ReduceOp.MAX, group=shard.group)
    big_m, t = mt[:, 0], mt[:, 1]

    delta = torch.where(live, m - big_m, 0.0)
    s_p = torch.where(live, torch.exp(log_s + delta), 0.0).masked_fill(nan_row, float("nan"))
    cols = [s_p]
    if entropy_r is not None:
        mu_rel = log_s - entropy_r.to(f64)  # b_r / s_r
        cols.append(torch.where(live, s_p * (mu_rel + delta), 0.0))
    if rank_r is not None:
        cols.append((rank_r.to(f64) - 1.0).clamp_min(0.0))
    sums = torch.stack(cols, dim=1)
    dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=shard.group)

    log_big_s = torch.log(sums[:, 0])
    acc = stats_r.dtype
    ignored = labels == ignore_index
    lse = (big_m + log_big_s).masked_fill(ignored, 0.0).to(acc)
    # lp <= 0 and H >= 0 hold exactly in every shard's kernel (docs/numerics.md); this float64 combine can
    # overshoot them by an fp64 ulp (log S rounds; t - M <= log s_owner' <= log S only mathematically), which
    # the clamps remove. They never move a value by more than that rounding (NaN stays NaN).
    lp = ((t - big_m) - log_big_s).clamp(max=0.0).masked_fill(ignored, 0.0).to(acc)
    entropy = None
    if entropy_r is not None:
        entropy = (log_big_s - sums[:, 1] / sums[:, 0]).clamp(min=0.0).masked_fill(ignored, 0.0).to(acc)
    rank = None
    if rank_r is not None:
        rank = torch.where(rank_r == 0, 0.0, 1.0 + sums[:, -1]).to(torch.int32)
    stats = torch.stack([big_m, log_big_s], dim=1).to(acc)
    return lp, entropy, rank, lse, stats
