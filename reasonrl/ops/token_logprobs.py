"""``token_logprobs``: per-token log-probabilities, entropy and rank from logits (docs/ops.md section 2).

Public entry point :func:`token_logprobs`. Implementations, all with the semantics of
``reasonrl/reference/token_logprobs.py``:

* ``cpp``: ``torch.ops.reasonrl.token_logprobs_{fwd,bwd,bwd_inplace}`` from csrc/cpu (one streaming pass
  per row, vectorised per ISA, OpenMP over rows).
* ``triton``: ``torch.ops.reasonrl.token_logprobs_{fwd,bwd,bwd_inplace}_triton``, ``triton_op``s launching
  the kernels of ``reasonrl.kernels.token_logprobs``. Registered lazily on first use so that
  ``import reasonrl`` never imports triton.
* ``reference``: plain PyTorch autograd (O(N x V) fp32 memory).

Forward and backward are separate registered ops joined by ``torch.library.register_autograd``. The
forward saves the logits by reference plus O(N) statistics (LSE and entropy, from which mu = LSE - H);
the backward recomputes the softmax on the fly, so no [N, V] fp32 tensor is ever allocated. Gradients flow
to ``logits`` through ``logprobs`` and ``entropy``; ``rank`` and ``lse`` are not differentiable.

Vocab-parallel mode (``process_group`` given, docs/ops.md 3.3) is a composition in :class:`_VocabParallel`:
the same registered forward op run on this rank's shard (``vocab_start`` / ``vocab_global`` arguments), the
collectives of ``reasonrl.ops.vocab_parallel``, and a backward that calls the registered backward op with the
GLOBAL statistics (no communication in the backward: the upstream gradients are identical on all ranks).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from reasonrl import _backend as backend
from reasonrl.ops.vocab_parallel import (
    VocabShard,
    finish_sharded_forward,
    label_bound,
    label_pivot,
    shard_of_call,
)
from reasonrl.reference.token_logprobs import TokenLogprobs, token_logprobs_reference

__all__ = ["TokenLogprobs", "token_logprobs"]

OP = "token_logprobs"

# ----------------------------------------------------------------------------------------------------------
# Autograd shared by the cpp and triton registrations: both forward ops have the signature
#   (logits [N, V], labels [N], temperature [N] | None, temperature_scalar, ignore_index,
#    want_entropy, want_rank, inplace_backward, vocab_start=0, vocab_global=0, label_logit=None)
#   -> (logprobs, entropy, rank, lse, stats)
# where stats [N, 2] = (m, log-sum) of the scaled logits, read only by the paired backward: it forms
# log p_j = (x_j / tau - m) - log_sum, exact near the maximum (see csrc/cpu/row_kernels.h).
# With vocab_start / vocab_global (a vocab shard) this autograd is the derivative of the LOCAL outputs; the
# vocab-parallel op (_VocabParallel) instead calls the backward op with the global statistics.
# ----------------------------------------------------------------------------------------------------------


def _setup_context(ctx, inputs, output):
    # `inputs` has the schema defaults filled in (torch.library adds them back for setup_context).
    logits, labels, temperature, temperature_scalar, ignore_index, want_entropy, _, inplace = inputs[:8]
    vocab_start, vocab_global = (*inputs[8:10], 0, 0)[:2]
    _, entropy, rank, lse, stats = output
    ctx.save_for_backward(logits, labels, temperature, stats, entropy)
    ctx.temperature_scalar = temperature_scalar
    ctx.ignore_index = ignore_index
    ctx.want_entropy = want_entropy
    ctx.inplace = inplace
    ctx.shard = (vocab_start, vocab_global)
    ctx.n_inputs = len(inputs)
    ctx.mark_non_differentiable(rank, lse, stats)


def _make_backward(bwd_op, bwd_inplace_op):
    def backward(ctx, grad_logprobs, grad_entropy, _grad_rank, _grad_lse, _grad_stats):
        logits, labels, temperature, stats, entropy = ctx.saved_tensors
        # Trailing Nones for inputs the dispatcher left at their defaults are trimmed by autograd.
        nones = (None,) * (ctx.n_inputs - 1)
        if not ctx.needs_input_grad[0]:
            return None, *nones
        if not ctx.want_entropy:
            grad_entropy = None
        args = (grad_logprobs, grad_entropy)
        rest = (labels, temperature, ctx.temperature_scalar, ctx.ignore_index, stats, entropy)
        if ctx.shard != (0, 0):
            rest = (*rest, *ctx.shard)
        if ctx.inplace:
            bwd_inplace_op(*args, logits, *rest)
            grad_logits = logits
        else:
            grad_logits = bwd_op(*args, logits, *rest)
        return grad_logits, *nones

    return backward


def _fake_fwd(logits, labels, temperature, temperature_scalar, ignore_index, want_entropy, want_rank, inplace,
              vocab_start=0, vocab_global=0, label_logit=None):
    return backend.fake_row_outputs(logits, want_entropy, want_rank)


def _fake_bwd(grad_logprobs, grad_entropy, logits, labels, temperature, temperature_scalar, ignore_index,
              stats, entropy, vocab_start=0, vocab_global=0):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _fake_bwd_inplace(grad_logprobs, grad_entropy, logits, labels, temperature, temperature_scalar,
                      ignore_index, stats, entropy, vocab_start=0, vocab_global=0):
    return None


def _cpp_ops():
    """Fake impls and autograd attached to the C++ ops (their schemas come from csrc/reasonrl.cpp)."""
    bwd = backend.attach_cpp("token_logprobs_bwd", _fake_bwd)
    bwd_inplace = backend.attach_cpp("token_logprobs_bwd_inplace", _fake_bwd_inplace)
    fwd = backend.attach_cpp("token_logprobs_fwd", _fake_fwd, backward=_make_backward(bwd, bwd_inplace),
                              setup_context=_setup_context)
    return fwd, bwd, bwd_inplace


def _triton_ops():
    """Define the Triton ops on first use (importing triton is deferred until someone asks for it)."""
    from reasonrl.kernels import token_logprobs as tk

    @torch.library.triton_op("reasonrl::token_logprobs_fwd_triton", mutates_args=())
    def fwd(
        logits: torch.Tensor,
        labels: torch.Tensor,
        temperature: torch.Tensor | None,
        temperature_scalar: float,
        ignore_index: int,
        want_entropy: bool,
        want_rank: bool,
        inplace_backward: bool,
        vocab_start: int = 0,
        vocab_global: int = 0,
        label_logit: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return tk.token_logprobs_fwd(
            logits, labels, temperature, temperature_scalar, ignore_index, want_entropy, want_rank,
            vocab_start, vocab_global, label_logit, launch=torch.library.wrap_triton,
        )

    def backward_op(inplace: bool):
        """The backward triton_op: out of place (returns the gradient) or in place (writes it into the storage
        of ``logits``). One body; the two schemas differ only in the return and the mutation of logits."""

        def bwd(
            grad_logprobs: torch.Tensor | None,
            grad_entropy: torch.Tensor | None,
            logits: torch.Tensor,
            labels: torch.Tensor,
            temperature: torch.Tensor | None,
            temperature_scalar: float,
            ignore_index: int,
            stats: torch.Tensor,
            entropy: torch.Tensor,
            vocab_start: int = 0,
            vocab_global: int = 0,
        ):
            grad = logits if inplace else torch.empty_like(logits, memory_format=torch.contiguous_format)
            tk.token_logprobs_bwd(
                grad_logprobs, grad_entropy, logits, labels, temperature, temperature_scalar, ignore_index,
                stats, entropy, grad, vocab_start, vocab_global, launch=torch.library.wrap_triton,
            )
            return None if inplace else grad

        bwd.__annotations__["return"] = "None" if inplace else "torch.Tensor"
        name = "token_logprobs_bwd_inplace_triton" if inplace else "token_logprobs_bwd_triton"
        return torch.library.triton_op(f"reasonrl::{name}", mutates_args={"logits"} if inplace else ())(bwd)

    bwd, bwd_inplace = backward_op(inplace=False), backward_op(inplace=True)
    fwd.register_autograd(_make_backward(bwd, bwd_inplace), setup_context=_setup_context)
    return fwd, bwd, bwd_inplace


backend.declare_op(OP, cpp=_cpp_ops, triton=_triton_ops)


def registered_ops(impl: str):
    """(fwd, bwd, bwd_inplace) registered ops of ``impl`` ('cpp' or 'triton'); used by tests (opcheck)."""
    return backend.registered_ops(OP, impl)


_NAN_CAUSE = "NaN or +inf in logits, logits / temperature overflowing, or no finite logit"


# ----------------------------------------------------------------------------------------------------------
# Vocab-parallel mode (docs/ops.md 3.3)
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _ShardedCall:
    """The non-tensor arguments of one vocab-parallel call."""

    impl: str
    shard: VocabShard
    temperature_scalar: float
    ignore_index: int
    want_entropy: bool
    want_rank: bool
    inplace_backward: bool


class _VocabParallel(torch.autograd.Function):
    """Local forward op on the shard -> collectives -> global outputs; the backward is the local backward op
    with the global (M, log S) and entropy, the one-hot term on the label's owner only, and no communication.
    The collectives run on detached tensors inside ``forward`` (autograd is off there)."""

    @staticmethod
    def forward(ctx, x, labels, temperature, call: _ShardedCall):
        shard = call.shard
        fwd = backend.kernel_op("token_logprobs_fwd", call.impl)
        pivot = label_pivot(x, labels, call.ignore_index, shard) if call.want_rank else None
        local = fwd(
            x, labels, temperature, call.temperature_scalar, call.ignore_index, call.want_entropy,
            call.want_rank, False, shard.vocab_start, shard.vocab_global, pivot,
        )
        return finish_sharded_forward(ctx, local, labels, call, (x, labels, temperature))

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy, _grad_rank, _grad_lse):
        call = ctx.call
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        x, labels, temperature, stats, ent = ctx.saved_tensors
        if not call.want_entropy:
            grad_entropy = None
        if grad_logprobs is None and grad_entropy is None:
            return torch.zeros_like(x, memory_format=torch.contiguous_format), None, None, None
        rest = (labels, temperature, call.temperature_scalar, call.ignore_index, stats, ent,
                call.shard.vocab_start, call.shard.vocab_global)
        if call.inplace_backward:
            backend.kernel_op("token_logprobs_bwd_inplace", call.impl)(grad_logprobs, grad_entropy, x, *rest)
            return x, None, None, None
        grad = backend.kernel_op("token_logprobs_bwd", call.impl)(grad_logprobs, grad_entropy, x, *rest)
        return grad, None, None, None

# ----------------------------------------------------------------------------------------------------------
# Public entry point
# ----------------------------------------------------------------------------------------------------------


def token_logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float | torch.Tensor = 1.0,
    ignore_index: int = -100,
    want_entropy: bool = False,
    want_rank: bool = False,
    return_lse: bool = False,
    inplace_backward: bool = False,
    process_group=None,
    vocab_start: int | None = None,
    impl: str = "auto",
    validate: bool | None = None,
) -> TokenLogprobs:
    """Log-probability of each label under ``softmax(logits / temperature)``, fused with entropy and rank.

    Args:
        logits: ``[..., V]`` float32 / bfloat16 / float16 (float64 on ``cpp`` and ``reference``), any strides.
        labels: ``[...]`` int32 / int64 vocabulary ids; rows equal to ``ignore_index`` are skipped.
        temperature: Python float, 0-d tensor or ``[...]`` tensor (per-row); every value finite and > 0.
            A tensor temperature is a constant: no gradient flows to it.
        ignore_index: label value of rows to skip (their outputs and gradient are 0).
        want_entropy: also return the entropy of the temperature-scaled distribution (differentiable).
        want_rank: also return ``1 + #{j != y : x_j > x_y}`` on the raw logits (int32, not differentiable).
        return_lse: also return the (detached) log-sum-exp of ``logits / temperature``.
        inplace_backward: write the gradient into the storage of ``logits`` (saves one logits-sized buffer;
            ``logits`` must be contiguous and must not be used again). Ignored by ``impl='reference'``.
        process_group: vocab-parallel mode (docs/ops.md 3.3). ``logits`` ``[..., V_r]`` is then this rank's
            contiguous shard of global vocabulary ids ``[v_r, v_r + V_r)``; ``labels`` are GLOBAL ids and,
            with ``temperature``, ``ignore_index`` and every keyword, identical on all ranks. Outputs are
            identical on all ranks and equal the op on the full logits; the gradient is with respect to the
            local shard. The forward issues two O(N) all-reduces (MAX of ``[m_r, t_r]``, SUM of
            ``[s_r, b_r, c_r]``; a third, MAX of the label logit, with ``want_rank``); the backward
            communicates nothing (the upstream gradients must be identical on all ranks). Needs ``impl``
            cpp / triton (not reference). Every rank must make the call, also with N = 0 rows. Eager mode: the
            collectives run in a ``torch.autograd.Function`` and are not meant for
            ``torch.compile(fullgraph=True)``.
        vocab_start: ``v_r`` for unequal shards. Default ``None``: equal shards, ``v_r = rank * V_r`` and
            ``V_glob = P * V_r``. When given, ``V_glob`` is the sum of the ``V_r``, found by one all-gather of
            ``(v_r, V_r)`` over the group and a host sync per call, which also checks that the shards tile
            ``[0, V_glob)`` (``ValueError`` naming ``vocab_start`` on every rank otherwise). With ``validate``
            the all-gather runs for equal shards too and checks that the ``V_r`` are equal. Labels outside
            ``[0, V_glob)`` other than ``ignore_index`` are a ``ValueError`` on every rank (``validate``), or
            NaN rows with a zero gradient (``validate=False``).
        impl: ``"auto" | "triton" | "cpp" | "reference"``; env ``REASONRL_IMPL`` sets the default.
            An explicit choice that cannot run raises ``RuntimeError``.
        validate: check label range / temperature values and report NaN rows (host syncs). ``None`` uses the
            global setting (``reasonrl.set_validation``, env ``REASONRL_VALIDATE``; on by default). Must be
            False
            under ``torch.compile(fullgraph=True)`` and CUDA graphs, and the same on every rank of a
            ``process_group`` (it decides which collectives run).

    Returns:
        ``TokenLogprobs(logprobs, entropy, rank, lse)``: ``[...]`` tensors, fp32 (fp64 for fp64 logits),
        rank int32; fields not requested are None.
    """
    backend.check_logits_args(OP, logits, labels, temperature, ignore_index)
    validate = backend.resolve_validate(validate, logits)
    lead_shape = logits.shape[:-1]
    vocab = logits.shape[-1]
    shard = shard_of_call(OP, process_group, vocab, vocab_start, validate=validate, device=logits.device)
    if validate:
        backend.validate_rows(OP, labels.reshape(-1), temperature, ignore_index, *label_bound(vocab, shard),
                              dtype=logits.dtype)

    impl = backend.select_impl(OP, impl, logits.device.type, logits.dtype)
    if shard is not None and impl == "reference":
        raise RuntimeError(f"{OP}: vocab-parallel mode (process_group given) needs impl='cpp' or 'triton'; "
                           "the reference implementation has no sharded path")
    if impl == "reference":
        out = token_logprobs_reference(
            logits, labels, temperature=temperature, ignore_index=ignore_index, want_entropy=want_entropy,
            want_rank=want_rank, return_lse=return_lse,
        )
        if validate:
            backend.check_nan_rows(OP, out.logprobs.reshape(-1), labels.reshape(-1), ignore_index,
                                    _NAN_CAUSE)
        return out

    x, labels_flat, temp_t, temp_scalar = backend.flatten_rows(logits, labels, temperature)
    if inplace_backward and not (x.is_contiguous() and x.data_ptr() == logits.data_ptr()):
        raise ValueError(f"{OP}: inplace_backward=True needs contiguous logits (the gradient is written into "
                         "their storage)")
    if shard is not None:
        call = _ShardedCall(impl, shard, temp_scalar, ignore_index, want_entropy, want_rank, inplace_backward)
        lp, ent, rank, lse = _VocabParallel.apply(x, labels_flat, temp_t, call)
    else:
        fwd = backend.kernel_op("token_logprobs_fwd", impl)
        lp, ent, rank, lse, _ = fwd(x, labels_flat, temp_t, temp_scalar, ignore_index, want_entropy,
                                    want_rank, inplace_backward)
    if validate:
        backend.check_nan_rows(OP, lp, labels_flat, ignore_index, _NAN_CAUSE)
    return backend.token_outputs(lead_shape, lp, ent, rank, lse, want_entropy=want_entropy,
                                  want_rank=want_rank, return_lse=return_lse)
