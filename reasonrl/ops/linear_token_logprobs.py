"""``linear_token_logprobs``: per-token log-probabilities, entropy and rank straight from hidden states and
the lm_head weight, never materialising the ``N x V`` logits (docs/ops.md section 3).

Semantics are exactly ``token_logprobs(hidden @ weight.T + bias, labels, ...)`` where the logits are the
fp32 accumulator of the matmul (never rounded to a 16-bit input dtype). Shapes: ``hidden [..., H]``,
``weight [V, H]``, ``bias [V]`` or None, ``labels [...]``; outputs ``[...]`` fp32 (fp64 for fp64 inputs),
``rank`` int32. Gradients flow to ``hidden``, ``weight`` and ``bias`` through ``logprobs`` and ``entropy``.

Implementations, all with the semantics of ``reasonrl/reference/linear_token_logprobs.py``:

* ``cpp``: ``torch.ops.reasonrl.linear_token_logprobs_{fwd,bwd}`` from csrc/cpu/linear_logprobs.cpp. Rows
  whose label is ``ignore_index`` are dropped first; the rest are processed in chunks of rows: ATen's GEMM
  computes the chunk's logits into a preallocated workspace (``workspace_bytes``, default 64 MiB), the
  token_logprobs row kernels reduce it; the backward recomputes each chunk, turns it into dlogits in place
  and accumulates ``grad_hidden``, ``grad_weight`` (fp32) and ``grad_bias`` with GEMMs. Extra memory: the
  workspace, O(N) statistics, and with gradients the fp32 weight-gradient accumulator. Saved for
  backward: hidden, weight, bias (by reference), labels, temperature and the [N, 2] row statistics; nothing
  when no input requires grad. With a ``saved_logits_bytes`` budget (docs/ops.md 3.4) the forward also keeps
  the fp32 logits of whole chunks that fit it (all rows if they all fit), and the backward reads them
  instead of recomputing those chunks: the results are bit-identical for every budget.
* ``triton``: ``torch.ops.reasonrl.linear_token_logprobs_{fwd,bwd}_triton``, ``triton_op``s launching
  kernels/linear_logprobs.py (split-vocabulary tiled forward with the online statistics in the epilogue;
  deterministic chunked backward with recompute, whatever ``saved_logits_bytes``). ``auto`` picks it on
  CUDA.
* ``reference``: matmul + ``token_logprobs_reference`` (O(N x V) memory).

Vocab-parallel mode (``process_group`` given, docs/ops.md 3.3): ``weight`` / ``bias`` are this rank's shard of
lm_head rows. :class:`_LinearVocabParallel` runs the C++ ops in their sharded-label mode (``vocab_start``,
``vocab_global``, ``label_logit``) on the shard, combines the statistics with the same code as
``token_logprobs`` (``reasonrl.ops.vocab_parallel.combine_local_outputs``: all-reduces MAX and SUM of O(N)
fp64 statistics), and in the backward sums the partial ``grad_hidden`` with one all-reduce.

Known limits: the vocab-parallel mode is ``cpp`` only (``triton`` / ``reference`` raise NotImplementedError)
and eager only; no ``softcap`` /
``logit_scale``; the CPU path chunks over rows only (each chunk holds whole vocabulary rows).
"""

from __future__ import annotations

import numbers
import os
from dataclasses import dataclass

import torch

from reasonrl import _backend as backend
from reasonrl.ops.vocab_parallel import (
    VocabShard,
    all_reduce_sum_,
    finish_sharded_forward,
    label_bound,
    label_owner,
    shard_of_call,
    share_label_logit,
)
from reasonrl.reference.linear_token_logprobs import linear_token_logprobs_reference
from reasonrl.reference.token_logprobs import TokenLogprobs

__all__ = ["linear_token_logprobs", "set_saved_logits_bytes", "saved_logits_bytes_default"]

OP = "linear_token_logprobs"


# ----------------------------------------------------------------------------------------------------------
# The saved-logits budget (docs/ops.md 3.4): the global default of ``saved_logits_bytes``
# ----------------------------------------------------------------------------------------------------------

SAVED_LOGITS_ENV = "REASONRL_SAVED_LOGITS_BYTES"
# kDefaultWorkspaceBytes of csrc/cpu/linear_chunks.h: the C++ op's chunk when workspace_bytes is None, which
# the budget is rounded to (tests/ops/test_linear_token_logprobs_budget.py checks the two agree).
_DEFAULT_WORKSPACE_BYTES = 64 << 20
_saved_logits_bytes: int | None = None  # set_saved_logits_bytes; None: the environment, else 0


def _check_budget(value, name: str) -> int:
    """``value`` as a byte count: an int >= 0 (not a bool); TypeError / ValueError naming ``name``
    otherwise."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):  # int, numpy ints; not tensors
        raise TypeError(f"{OP}: {name} must be an int number of bytes >= 0 (or None for the default), got "
                        f"{type(value).__name__} {value!r}")
    value = int(value)
    if value < 0:
        raise ValueError(f"{OP}: {name} must be an int number of bytes >= 0 (0 = recompute every chunk), got "
                         f"{value}")
    return value


def set_saved_logits_bytes(nbytes: int | None) -> None:
    """Set the global default of ``linear_token_logprobs(..., saved_logits_bytes=None)`` (docs/ops.md 3.4):
    how many bytes of fp32 logits the forward may keep so that the backward skips their recompute.
    ``0`` keeps nothing (the streaming recompute, the memory of docs/ops.md 3.1); ``None`` goes back to the
    environment variable ``REASONRL_SAVED_LOGITS_BYTES`` (bytes), or 0 when it is unset."""
    global _saved_logits_bytes
    _saved_logits_bytes = None if nbytes is None else _check_budget(nbytes, "set_saved_logits_bytes(nbytes)")


def saved_logits_bytes_default() -> int:
    """The budget a call with ``saved_logits_bytes=None`` uses: :func:`set_saved_logits_bytes`, else
    ``REASONRL_SAVED_LOGITS_BYTES``, else 0. The variable is read on each call (not at import, so that a bad
    value is an error of the call, naming the variable, rather than of ``import reasonrl``)."""
    if _saved_logits_bytes is not None:
        return _saved_logits_bytes
    raw = os.environ.get(SAVED_LOGITS_ENV, "").strip()
    if not raw:
        return 0
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{OP}: the environment variable {SAVED_LOGITS_ENV} must be an int number of bytes "
                         f">= 0, got {raw!r}") from None
    if value < 0:
        raise ValueError(f"{OP}: the environment variable {SAVED_LOGITS_ENV} must be an int number of bytes "
                         f">= 0, got {value}")
    return value


# ----------------------------------------------------------------------------------------------------------
# Autograd for the registered forward op
#   (hidden [N, H], weight [V, H], bias [V] | None, labels [N], temperature [N] | None, temperature_scalar,
#    ignore_index, want_entropy, want_rank, chunk_rows) -> (logprobs, entropy, rank, lse, stats [N, 2])
# stats = (row max, log-sum) of the scaled logits, read only by the paired backward op. The C++ op has a sixth
# output, saved_logits [min(saved_rows, N), V] (docs/ops.md 3.4; [0, V] with the default saved_rows = 0),
# which its backward op takes as its last argument; the Triton op always recomputes and has neither.
# ----------------------------------------------------------------------------------------------------------


def _setup_context(ctx, inputs, output):
    # inputs[10:] (cpp only): vocab_start, vocab_global, label_logit, left at their unsharded defaults here:
    # the vocab-parallel mode has its own autograd (_LinearVocabParallel).
    (hidden, weight, bias, labels, temperature, temperature_scalar, ignore_index, want_entropy, _,
     chunk) = inputs[:10]
    _, entropy, rank, lse, stats = output[:5]
    saved = output[5] if len(output) > 5 and output[5].numel() > 0 else None
    ctx.save_for_backward(hidden, weight, bias, labels, temperature, stats, entropy, saved)
    ctx.temperature_scalar = temperature_scalar
    ctx.ignore_index = ignore_index
    ctx.want_entropy = want_entropy
    ctx.chunk_rows = chunk
    ctx.mark_non_differentiable(*output[2:])
    # No zero gradients for the outputs that got none (the backward op takes None): autograd would otherwise
    # allocate one the size of saved_logits for every backward.
    ctx.set_materialize_grads(False)


def _make_backward(bwd_op):
    def backward(ctx, grad_logprobs, grad_entropy, _grad_rank, _grad_lse, _grad_stats, *_grad_saved):
        hidden, weight, bias, labels, temperature, stats, entropy, saved = ctx.saved_tensors
        mask = [bool(ctx.needs_input_grad[0]), bool(ctx.needs_input_grad[1]),
                bias is not None and bool(ctx.needs_input_grad[2])]
        # One gradient per input the dispatcher passed (arguments equal to their schema default are dropped).
        rest = (None,) * (len(ctx.needs_input_grad) - 3)
        if not any(mask):
            return (None,) * 3 + rest
        if not ctx.want_entropy:
            grad_entropy = None
        # Saved logits (C++ op only): the backward reads those rows instead of recomputing them.
        extra = {} if saved is None else {"saved_logits": saved}
        gh, gw, gb = bwd_op(grad_logprobs, grad_entropy, hidden, weight, bias, labels, temperature,
                            ctx.temperature_scalar, ctx.ignore_index, stats, entropy, ctx.chunk_rows, mask,
                            **extra)
        return (gh if mask[0] else None, gw if mask[1] else None, gb if mask[2] else None) + rest

    return backward


def _fake_fwd(hidden, weight, bias, labels, temperature, temperature_scalar, ignore_index, want_entropy,
              want_rank, chunk_rows, vocab_start=0, vocab_global=0, label_logit=None, saved_rows=0):
    # saved_logits has min(saved_rows, N) rows whatever the labels (rows past the valid ones are unused), so
    # that its shape is known here without the label values.
    saved = hidden.new_empty((torch.sym_min(saved_rows, hidden.shape[0]), weight.shape[0]),
                             dtype=backend.accumulation_dtype(hidden.dtype))
    return (*backend.fake_row_outputs(hidden, want_entropy, want_rank), saved)


def _fake_bwd(grad_logprobs, grad_entropy, hidden, weight, bias, labels, temperature, temperature_scalar,
              ignore_index, stats, entropy, chunk_rows, output_mask, vocab_start=0, vocab_global=0,
              saved_logits=None):
    return (
        hidden.new_empty(hidden.shape if output_mask[0] else (0,)),
        weight.new_empty(weight.shape if output_mask[1] else (0,)),
        weight.new_empty((weight.shape[0],) if output_mask[2] else (0,)),
    )


def _cpp_ops():
    """Fake impls and autograd attached to the C++ ops (schemas in csrc/reasonrl.cpp)."""
    bwd = backend.attach_cpp("linear_token_logprobs_bwd", _fake_bwd)
    fwd = backend.attach_cpp("linear_token_logprobs_fwd", _fake_fwd, backward=_make_backward(bwd),
                              setup_context=_setup_context)
    return fwd, bwd


def _triton_ops():
    """``triton_op``s with the signatures of the C++ ops, launching kernels/linear_logprobs.py."""
    from reasonrl.kernels import linear_logprobs as kernels

    @torch.library.triton_op("reasonrl::linear_token_logprobs_fwd_triton", mutates_args=())
    def fwd(
        hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor,
        temperature: torch.Tensor | None, temperature_scalar: float, ignore_index: int, want_entropy: bool,
        want_rank: bool, chunk_rows: int,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return kernels.linear_logprobs_fwd(
            hidden.contiguous(), weight.contiguous(), None if bias is None else bias.contiguous(),
            labels.to(torch.int64), temperature, temperature_scalar, ignore_index, want_entropy, want_rank,
            launch=torch.library.wrap_triton,
        )

    @torch.library.triton_op("reasonrl::linear_token_logprobs_bwd_triton", mutates_args=())
    def bwd(
        grad_logprobs: torch.Tensor | None, grad_entropy: torch.Tensor | None, hidden: torch.Tensor,
        weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor,
        temperature: torch.Tensor | None, temperature_scalar: float, ignore_index: int, stats: torch.Tensor,
        entropy: torch.Tensor, chunk_rows: int, output_mask: list[bool],
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        gh, gw, gb = kernels.linear_logprobs_bwd(
            None if grad_logprobs is None else grad_logprobs.float().contiguous(),
            None if grad_entropy is None else grad_entropy.float().contiguous(),
            hidden.contiguous(), weight.contiguous(), None if bias is None else bias.contiguous(),
            labels.to(torch.int64), temperature, temperature_scalar, ignore_index, stats, entropy,
            launch=torch.library.wrap_triton,
        )
        # The kernels always produce all three (one sweep); the ones not asked for are returned empty.
        empty = hidden.new_empty((0,))
        return (gh if output_mask[0] else empty, gw if output_mask[1] else empty,
                gb if output_mask[2] and gb is not None else empty)

    torch.library.register_autograd("reasonrl::linear_token_logprobs_fwd_triton", _make_backward(bwd),
                                    setup_context=_setup_context)
    return fwd, bwd


backend.declare_op(OP, cpp=_cpp_ops, triton=_triton_ops)


def registered_ops(impl: str = "cpp"):
    """(fwd, bwd) registered ops of ``impl``; used by tests (opcheck)."""
    return backend.registered_ops(OP, impl)


def check_args(hidden, weight, labels, bias, temperature, ignore_index):
    """Argument checks without a host sync (docs/ops.md section 7)."""
    for name, t in (("hidden", hidden), ("weight", weight)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"{OP}: {name} must be a floating tensor (float32, bfloat16, float16 or "
                            f"float64), got {getattr(t, 'dtype', type(t).__name__)}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"{OP}: weight dtype {weight.dtype} differs from hidden dtype {hidden.dtype}")
    if hidden.dim() < 1:
        raise ValueError(f"{OP}: hidden must have shape [..., H] with at least 1 dimension, got a scalar")
    if weight.dim() != 2:
        raise ValueError(f"{OP}: weight must have shape [V, H], got {tuple(weight.shape)}")
    h = hidden.shape[-1]
    if h == 0 or weight.shape[0] == 0:
        raise ValueError(f"{OP}: H = hidden.shape[-1] and V = weight.shape[0] must be > 0, got hidden "
                         f"{tuple(hidden.shape)} and weight {tuple(weight.shape)}")
    if weight.shape[1] != h:
        raise ValueError(f"{OP}: weight must have shape [V, H] = [V, {h}] (H = hidden.shape[-1]), got "
                         f"{tuple(weight.shape)}")
    if weight.device != hidden.device:
        raise ValueError(f"{OP}: weight is on {weight.device} but hidden is on {hidden.device}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            raise TypeError(f"{OP}: bias must be a tensor or None, got {type(bias).__name__}")
        if bias.dtype != hidden.dtype:
            raise TypeError(f"{OP}: bias dtype {bias.dtype} differs from hidden dtype {hidden.dtype}")
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"{OP}: bias must have shape [V] = [{weight.shape[0]}], got {tuple(bias.shape)}")
        if bias.device != hidden.device:
            raise ValueError(f"{OP}: bias is on {bias.device} but hidden is on {hidden.device}")
    backend.check_labels(OP, labels, hidden.shape[:-1], hidden.device, "hidden")
    backend.check_ignore_index(OP, ignore_index)
    backend.check_temperature(OP, temperature, hidden.shape[:-1], hidden.device, "hidden", hidden.dtype)


_NAN_CAUSE = "NaN or inf in hidden, weight or bias, or logits / temperature overflowing"


# ----------------------------------------------------------------------------------------------------------
# Vocab-parallel mode (docs/ops.md 3.3)
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _ShardedLinearCall:
    """The non-tensor arguments of one vocab-parallel call."""

    shard: VocabShard
    temperature_scalar: float
    ignore_index: int
    want_entropy: bool
    want_rank: bool
    chunk_rows: int
    reduce_grad_hidden: bool
    saved_rows: int = 0


def _label_logit(x, weight, bias, labels, ignore_index, shard):
    """The raw label logit h . W[y] (+ b[y]) on every rank (docs/ops.md 3.3, the pivot of the sharded rank
    count): a per-row dot product with the label's weight row on its owner, in the accumulation dtype, shared
    by one all-reduce MAX. O(N H) work and memory (the gathered weight rows)."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    owner, local = label_owner(labels, ignore_index, shard)
    value = (x.to(acc) * weight.index_select(0, local).to(acc)).sum(-1)
    if bias is not None:
        value = value + bias.index_select(0, local).to(acc)
    return share_label_logit(value, owner, shard)


class _LinearVocabParallel(torch.autograd.Function):
    """Local C++ forward op on the lm_head shard (sharded-label mode) -> the shared combine of
    ``reasonrl.ops.vocab_parallel`` -> global outputs. The backward runs the local backward op with the global
    ``(M, log S)`` and entropy, which gives this rank's ``grad_weight`` / ``grad_bias`` shard and its partial
    ``grad_hidden`` (its columns' share of ``dx W``); the partials are summed by one all-reduce over the group
    (``reduce_grad_hidden``). The upstream gradients are identical on all ranks and are not communicated."""

    @staticmethod
    def forward(ctx, x, weight, bias, labels, temperature, call: _ShardedLinearCall):
        shard = call.shard
        pivot = _label_logit(x, weight, bias, labels, call.ignore_index, shard) if call.want_rank else None
        local = torch.ops.reasonrl.linear_token_logprobs_fwd.default(
            x, weight, bias, labels, temperature, call.temperature_scalar, call.ignore_index,
            call.want_entropy, call.want_rank, call.chunk_rows, shard.vocab_start, shard.vocab_global, pivot,
            call.saved_rows,
        )
        # saved_logits (docs/ops.md 3.4): this shard's logits; the backward reads them with the global stats.
        saved = local[5] if local[5].numel() > 0 else None
        return finish_sharded_forward(ctx, local[:5], labels, call,
                                      (x, weight, bias, labels, temperature, saved))

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy, _grad_rank, _grad_lse):
        call = ctx.call
        x, weight, bias, labels, temperature, saved, stats, ent = ctx.saved_tensors
        mask = [bool(ctx.needs_input_grad[0]), bool(ctx.needs_input_grad[1]),
                bias is not None and bool(ctx.needs_input_grad[2])]
        if not any(mask):
            return (None,) * 6
        if not call.want_entropy:
            grad_entropy = None
        if grad_logprobs is None and grad_entropy is None:  # the same on every rank: no collective either
            gh, gw, gb = (torch.zeros_like(x), torch.zeros_like(weight),
                          None if bias is None else torch.zeros_like(bias))
        else:
            shard = call.shard
            # 16-bit inputs with a reduced grad_hidden: run the op on fp32 operands (what its GEMMs do anyway:
            # it upcasts the weight once and each hidden chunk) so that the partial grad_hidden stays fp32
            # and the sum over ranks is rounded to the input dtype once, as the unsharded gradient is.
            # Costs an fp32 copy of hidden (N H 4 bytes); the weight copy replaces the op's own.
            upcast = mask[0] and call.reduce_grad_hidden and x.dtype in (torch.bfloat16, torch.float16)
            xs, ws, bs = (x.float(), weight.float(), None if bias is None else bias.float()) if upcast else (
                x, weight, bias)
            gh, gw, gb = torch.ops.reasonrl.linear_token_logprobs_bwd.default(
                grad_logprobs, grad_entropy, xs, ws, bs, labels, temperature, call.temperature_scalar,
                call.ignore_index, stats, ent, call.chunk_rows, mask, shard.vocab_start, shard.vocab_global,
                saved,
            )
            if mask[0] and call.reduce_grad_hidden:
                gh = all_reduce_sum_(gh, shard).to(x.dtype)
            if upcast:
                gw, gb = gw.to(weight.dtype), gb.to(weight.dtype)
        return (gh if mask[0] else None, gw if mask[1] else None, gb if mask[2] else None, None, None, None)


# ----------------------------------------------------------------------------------------------------------
# Public entry point
# ----------------------------------------------------------------------------------------------------------


def linear_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float | torch.Tensor = 1.0,
    ignore_index: int = -100,
    want_entropy: bool = False,
    want_rank: bool = False,
    return_lse: bool = False,
    process_group=None,
    vocab_start: int | None = None,
    reduce_grad_hidden: bool = True,
    workspace_bytes: int | None = None,
    saved_logits_bytes: int | None = None,
    impl: str = "auto",
    validate: bool | None = None,
) -> TokenLogprobs:
    """``token_logprobs(hidden @ weight.T + bias, labels, ...)`` without materialising the logits.

    Args:
        hidden: ``[..., H]`` float32 / bfloat16 / float16 (float64 on ``cpp`` and ``reference``), any strides.
        weight: ``[V, H]`` lm_head weight, same dtype as ``hidden``.
        labels: ``[...]`` int32 / int64 vocabulary ids; rows equal to ``ignore_index`` are skipped (removed
            before the matmul: they cost nothing).
        bias: ``[V]`` or None, same dtype as ``hidden``.
        temperature: Python float, 0-d tensor or ``[...]`` tensor (per-row); every value finite and > 0.
            A tensor temperature is a constant: no gradient flows to it.
        ignore_index: label value of rows to skip (their outputs and gradient rows are 0).
        want_entropy: also return the entropy of the temperature-scaled distribution (differentiable).
        want_rank: also return ``1 + #{j != y : x_j > x_y}`` on the fp32 logits (int32, not differentiable).
        return_lse: also return the (detached) log-sum-exp of ``logits / temperature``.
        process_group: vocab-parallel mode (docs/ops.md 3.3). ``weight`` ``[V_r, H]`` (and ``bias`` ``[V_r]``)
            are then this rank's contiguous shard of lm_head rows, global ids ``[v_r, v_r + V_r)``;
            ``hidden``, ``labels`` (GLOBAL ids), ``temperature``, ``ignore_index`` and every keyword are
            identical on all ranks. Outputs are identical on all ranks and equal the op on the full weight;
            each rank gets the gradient of its weight / bias shard, and ``grad_hidden`` is the sum over ranks
            of the partial gradients (one all-reduce SUM in the backward). Forward collectives are those of
            ``token_logprobs`` with a process_group (two O(N) all-reduces; a third, MAX of the label logit
            ``h . W[y]`` computed by its owner, with ``want_rank``). ``cpp`` only: ``triton`` and
            ``reference`` raise NotImplementedError. Every rank must make the call (also with N = 0 rows) and
            run the backward with identical upstream gradients. Eager mode only (an autograd.Function with
            collectives).
        vocab_start: ``v_r`` for unequal shards (default: equal shards, ``v_r = rank * V_r``); given, one
            all-gather checks that the shards tile ``[0, V_glob)`` (``ValueError`` naming ``vocab_start`` on
            every rank otherwise), as for ``token_logprobs``. Labels outside ``[0, V_glob)`` other than
            ``ignore_index`` are a ``ValueError`` on every rank (``validate``).
        reduce_grad_hidden: with a process_group, sum the partial ``grad_hidden`` over the group in the
            backward (default). False returns this rank's partial (for a caller that reduce-scatters it
            itself, e.g. in a sequence-parallel region).
        workspace_bytes: ``cpp`` only: size of the logits chunk buffer, which sets the rows per GEMM chunk
            (``workspace_bytes // ((V + H) * 4)``; default 64 MiB). Larger chunks make the GEMMs more
            efficient; the extra memory grows with the chunk, never with N x V.
        saved_logits_bytes: ``cpp`` only: memory budget for keeping logits from the forward to the
            backward (docs/ops.md 3.4). The fp32 (fp64 for fp64 inputs) logits of as many whole chunks of rows
            as fit (all rows when they all fit) are kept, and the backward reads them instead of recomputing
            their GEMM (6NVH instead of 8NVH for those rows); the other rows are recomputed as usual. ``0``
            keeps nothing (the memory of docs/ops.md 3.1); ``None`` uses the global default
            (:func:`set_saved_logits_bytes`, env ``REASONRL_SAVED_LOGITS_BYTES``, else 0). The kept logits
            (at most the budget, on top of the workspace) exist only when an input requires grad. Results and
            gradients are those of the recompute path, bit for bit. ``triton`` and ``reference`` ignore it
            (the first always recomputes; the second keeps the whole N x V graph anyway).
        impl: ``"auto" | "triton" | "cpp" | "reference"``; env ``REASONRL_IMPL`` sets the default. An
            explicit choice that cannot run raises ``RuntimeError``.
        validate: check label range / temperature values and report NaN rows (host syncs). ``None`` uses the
            global setting (``reasonrl.set_validation``). Must be False under
            ``torch.compile(fullgraph=True)``.

    Returns:
        ``TokenLogprobs(logprobs, entropy, rank, lse)``: ``[...]`` tensors, fp32 (fp64 for fp64 inputs), rank
        int32; fields not requested are None.
    """
    check_args(hidden, weight, labels, bias, temperature, ignore_index)
    budget = (saved_logits_bytes_default() if saved_logits_bytes is None
              else _check_budget(saved_logits_bytes, "saved_logits_bytes"))
    validate = backend.resolve_validate(validate, hidden)
    lead_shape = hidden.shape[:-1]
    vocab, h = weight.shape
    shard = shard_of_call(OP, process_group, vocab, vocab_start, validate=validate, device=hidden.device)
    if validate:
        backend.validate_rows(OP, labels.reshape(-1), temperature, ignore_index, *label_bound(vocab, shard),
                              dtype=hidden.dtype)

    impl = backend.select_impl(OP, impl, hidden.device.type, hidden.dtype)
    if shard is not None and impl != "cpp":
        raise NotImplementedError(f"{OP}: vocab-parallel mode (process_group) is implemented by impl='cpp' "
                                  f"only (CPU); impl={impl!r} has no sharded path")
    if impl == "reference":
        out = linear_token_logprobs_reference(
            hidden, weight, labels, bias=bias, temperature=temperature, ignore_index=ignore_index,
            want_entropy=want_entropy, want_rank=want_rank, return_lse=return_lse,
        )
        if validate:
            backend.check_nan_rows(OP, out.logprobs.reshape(-1), labels.reshape(-1), ignore_index,
                                    _NAN_CAUSE)
        return out

    # The Triton op makes its operands contiguous itself; the C++ op gathers rows with any strides.
    x, labels_flat, temp_t, temp_scalar = backend.flatten_rows(hidden, labels, temperature,
                                                                unit_stride=False)
    acc = backend.accumulation_dtype(hidden.dtype)
    chunk_rows = (0 if workspace_bytes is None
                  else max(1, int(workspace_bytes) // ((vocab + h) * acc.itemsize)))
    saved_rows = 0
    if impl == "cpp" and torch.is_grad_enabled() and (
            hidden.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)):
        # Every row when all fit in the budget, else whole chunks (docs/ops.md 3.4), kept only when a backward
        # will read them. Whole chunks, so that the chunk boundaries, hence the GEMMs and every bit of the
        # results, are those of the recompute path whatever the budget.
        fit = budget // (vocab * acc.itemsize)
        chunk = chunk_rows or max(1, _DEFAULT_WORKSPACE_BYTES // ((vocab + h) * acc.itemsize))
        saved_rows = x.shape[0] if fit >= x.shape[0] else fit // chunk * chunk
    if shard is not None:
        call = _ShardedLinearCall(shard, temp_scalar, ignore_index, want_entropy, want_rank, chunk_rows,
                                  reduce_grad_hidden, saved_rows)
        lp, ent, rank, lse = _LinearVocabParallel.apply(x, weight, bias, labels_flat, temp_t, call)
    elif impl == "cpp":
        fwd = backend.kernel_op("linear_token_logprobs_fwd", impl)
        lp, ent, rank, lse = fwd(x, weight, bias, labels_flat, temp_t, temp_scalar, ignore_index,
                                 want_entropy, want_rank, chunk_rows, saved_rows=saved_rows)[:4]
    else:
        fwd = backend.kernel_op("linear_token_logprobs_fwd", impl)
        lp, ent, rank, lse, _ = fwd(x, weight, bias, labels_flat, temp_t, temp_scalar, ignore_index,
                                    want_entropy, want_rank, chunk_rows)
    if validate:
        backend.check_nan_rows(OP, lp, labels_flat, ignore_index, _NAN_CAUSE)
    return backend.token_outputs(lead_shape, lp, ent, rank, lse, want_entropy=want_entropy,
                                  want_rank=want_rank, return_lse=return_lse)
