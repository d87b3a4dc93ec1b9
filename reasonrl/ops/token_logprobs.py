"""``token_logprobs``: per-token log-probabilities, entropy and rank from logits (ops.md section 2).

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

Vocab-parallel mode (``process_group`` given, ops.md 3.3) is a composition in :class:`_VocabParallel`: the
same registered forward op run on this rank's shard (``vocab_start`` / ``vocab_global`` arguments), the
collectives of ``reasonrl.ops.vocab_parallel``, and a backward that calls the registered backward op with the
GLOBAL statistics (no communication in the backward: the upstream gradients are identical on all ranks).
"""

from __future__ import annotations

import functools
import logging
import math
import os
from dataclasses import dataclass

import torch

from reasonrl._backend import load_extension, resolve_impl
from reasonrl.ops.vocab_parallel import VocabShard, combine_local_outputs, label_pivot, resolve_vocab_shard
from reasonrl.reference.token_logprobs import TokenLogprobs, token_logprobs_reference

__all__ = ["TokenLogprobs", "token_logprobs", "set_validation", "validation_enabled"]

logger = logging.getLogger("reasonrl")

_VALIDATE = os.environ.get("REASONRL_VALIDATE", "1") != "0"


def set_validation(enabled: bool) -> None:
    """Globally enable or disable input/output validation (host syncs) for calls with ``validate=None``."""
    global _VALIDATE
    _VALIDATE = bool(enabled)


def validation_enabled() -> bool:
    return _VALIDATE


# ----------------------------------------------------------------------------------------------------------
# Autograd shared by the cpp and triton registrations: both forward ops have the signature
#   (logits [N, V], labels [N], temperature [N] | None, temperature_scalar, ignore_index,
#    want_entropy, want_rank, inplace_backward, vocab_start=0, vocab_global=0, label_logit=None)
#   -> (logprobs, entropy, rank, lse, stats)
# where stats [N, 2] = (m, log-sum) of the scaled logits, read only by the paired backward: it forms
# log p_j = (x_j / tau - m) - log_sum, exact near the maximum (see csrc/cpu/token_logprobs_rows.h).
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
    n = logits.shape[0]
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    return (
        logits.new_empty((n,), dtype=acc),
        logits.new_empty((n if want_entropy else 0,), dtype=acc),
        logits.new_empty((n if want_rank else 0,), dtype=torch.int32),
        logits.new_empty((n,), dtype=acc),
        logits.new_empty((n, 2), dtype=acc),
    )


def _fake_bwd(grad_logprobs, grad_entropy, logits, labels, temperature, temperature_scalar, ignore_index, stats,
              entropy, vocab_start=0, vocab_global=0):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _fake_bwd_inplace(grad_logprobs, grad_entropy, logits, labels, temperature, temperature_scalar,
                      ignore_index, stats, entropy, vocab_start=0, vocab_global=0):
    return None


@functools.cache
def _cpp_ops():
    """The C++ ops (their schemas come from csrc/reasonrl.cpp) with fake impls and autograd attached."""
    if load_extension() is None:
        return None
    fwd = torch.ops.reasonrl.token_logprobs_fwd.default
    bwd = torch.ops.reasonrl.token_logprobs_bwd.default
    bwd_inplace = torch.ops.reasonrl.token_logprobs_bwd_inplace.default
    torch.library.register_fake("reasonrl::token_logprobs_fwd")(_fake_fwd)
    torch.library.register_fake("reasonrl::token_logprobs_bwd")(_fake_bwd)
    torch.library.register_fake("reasonrl::token_logprobs_bwd_inplace")(_fake_bwd_inplace)
    torch.library.register_autograd(
        "reasonrl::token_logprobs_fwd", _make_backward(bwd, bwd_inplace), setup_context=_setup_context
    )
    return fwd, bwd, bwd_inplace


@functools.cache
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

    @torch.library.triton_op("reasonrl::token_logprobs_bwd_triton", mutates_args=())
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
    ) -> torch.Tensor:
        grad = torch.empty_like(logits, memory_format=torch.contiguous_format)
        tk.token_logprobs_bwd(
            grad_logprobs, grad_entropy, logits, labels, temperature, temperature_scalar, ignore_index, stats,
            entropy, grad, vocab_start, vocab_global, launch=torch.library.wrap_triton,
        )
        return grad

    @torch.library.triton_op("reasonrl::token_logprobs_bwd_inplace_triton", mutates_args={"logits"})
    def bwd_inplace(
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
    ) -> None:
        tk.token_logprobs_bwd(
            grad_logprobs, grad_entropy, logits, labels, temperature, temperature_scalar, ignore_index, stats,
            entropy, logits, vocab_start, vocab_global, launch=torch.library.wrap_triton,
        )

    fwd.register_autograd(_make_backward(bwd, bwd_inplace), setup_context=_setup_context)
    return fwd, bwd, bwd_inplace


def _select_impl(impl: str, device_type: str, dtype: torch.dtype) -> str:
    """Resolve ``impl`` and make sure its ops are registered.

    Runs eagerly even under torch.compile (dynamo treats the result as a constant and guards nothing
    on it): the choice reads the environment, imports triton lazily and loads the extension, none of which
    belongs in a traced graph.
    """
    chosen = resolve_impl(impl, torch.device(device_type), dtype, "token_logprobs")
    if chosen in ("cpp", "cuda"):
        _cpp_ops()
    elif chosen == "triton":
        _triton_ops()
    return chosen


# Equivalent to decorating with @torch.compiler.assume_constant_result, which only sets this attribute but
# imports torch._dynamo (and with it triton) to do so: `import reasonrl` must stay light and triton-free.
_select_impl._dynamo_marked_constant = True


def registered_ops(impl: str):
    """(fwd, bwd, bwd_inplace) registered ops of ``impl`` ('cpp' or 'triton'); used by tests (opcheck)."""
    ops = _cpp_ops() if impl in ("cpp", "cuda") else _triton_ops() if impl == "triton" else None
    if ops is None:
        raise RuntimeError(f"no registered token_logprobs ops for impl={impl!r}")
    return ops


# ----------------------------------------------------------------------------------------------------------
# Argument checking (ops.md section 7)
# ----------------------------------------------------------------------------------------------------------


def _check_args(logits, labels, temperature, ignore_index):
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point():
        raise TypeError(
            "token_logprobs: logits must be a floating tensor (float32, bfloat16, float16 or float64), got "
            f"{getattr(logits, 'dtype', type(logits).__name__)}"
        )
    if not isinstance(labels, torch.Tensor) or labels.dtype not in (torch.int32, torch.int64):
        raise TypeError(
            f"token_logprobs: labels must be an int32 or int64 tensor, got {getattr(labels, 'dtype', type(labels))}"
        )
    if logits.dim() < 1:
        raise ValueError("token_logprobs: logits must have shape [..., V] with at least 1 dimension, got a scalar")
    if logits.shape[-1] == 0:
        raise ValueError(f"token_logprobs: the vocabulary size V = logits.shape[-1] must be > 0, got {tuple(logits.shape)}")
    if labels.shape != logits.shape[:-1]:
        raise ValueError(
            f"token_logprobs: labels must have shape logits.shape[:-1] = {tuple(logits.shape[:-1])}, "
            f"got {tuple(labels.shape)}"
        )
    if labels.device != logits.device:
        raise ValueError(f"token_logprobs: labels are on {labels.device} but logits are on {logits.device}")
    if not isinstance(ignore_index, int):
        raise TypeError(f"token_logprobs: ignore_index must be an int, got {type(ignore_index).__name__}")
    if isinstance(temperature, torch.Tensor):
        if not temperature.is_floating_point():
            raise TypeError(f"token_logprobs: temperature must be a floating tensor, got {temperature.dtype}")
        if temperature.dim() > 0 and temperature.shape != logits.shape[:-1]:
            raise ValueError(
                "token_logprobs: a temperature tensor must be 0-d or have shape logits.shape[:-1] = "
                f"{tuple(logits.shape[:-1])}, got {tuple(temperature.shape)}"
            )
        if temperature.device != logits.device and not (temperature.dim() == 0 and temperature.device.type == "cpu"):
            raise ValueError(f"token_logprobs: temperature is on {temperature.device} but logits are on {logits.device}")
    elif isinstance(temperature, (int, float)) and not isinstance(temperature, bool):
        tiny = _min_temperature(logits.dtype)
        if not (math.isfinite(temperature) and temperature >= tiny):
            raise ValueError(f"token_logprobs: temperature must be finite and >= {tiny:.7g} (the smallest "
                             "normal number of the compute dtype, so that 1 / temperature is finite), got "
                             f"{temperature}")
    else:
        raise TypeError(f"token_logprobs: temperature must be a float or a tensor, got {type(temperature).__name__}")


def _min_temperature(dtype: torch.dtype) -> float:
    """The smallest valid temperature: the smallest normal number of the compute dtype (fp64 for fp64 logits,
    else fp32). A subnormal temperature (1e-40 in fp32) has no finite reciprocal (docs/numerics.md)."""
    return torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).tiny


def _validate_values(x, labels_flat, temperature, ignore_index, vocab_global=None):
    """The checks that need a host sync (only with validate=True). ``vocab_global``: the size of the global
    vocabulary in vocab-parallel mode (labels are global ids there)."""
    vocab = x.shape[-1] if vocab_global is None else vocab_global
    what = "V" if vocab_global is None else "V_glob (the global vocabulary of the process_group)"
    bad = (labels_flat != ignore_index) & ((labels_flat < 0) | (labels_flat >= vocab))
    n_bad = int(bad.sum())
    if n_bad:
        first = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"token_logprobs: {n_bad} labels are outside [0, {what}={vocab}) and not ignore_index={ignore_index}; "
            f"first at flattened row {first} (label {int(labels_flat[first])})"
        )
    if isinstance(temperature, torch.Tensor):
        tiny = _min_temperature(x.dtype)
        ok = torch.isfinite(temperature) & (temperature >= tiny)
        if not bool(ok.all()):
            first = int((~ok).reshape(-1).nonzero()[0, 0])
            raise ValueError(
                f"token_logprobs: temperature must be finite and >= {tiny:.7g} everywhere; "
                f"got {float(temperature.reshape(-1)[first])} at row {first}"
            )


def _check_outputs(lp, labels_flat, ignore_index):
    """NaN in a valid row means NaN/+inf logits or a row with no finite logit: report it (O(N) check)."""
    nan_rows = torch.isnan(lp) & (labels_flat != ignore_index)
    if bool(nan_rows.any()):
        first = int(nan_rows.nonzero()[0, 0])
        raise FloatingPointError(
            f"token_logprobs: {int(nan_rows.sum())} rows have a NaN log-prob (NaN or +inf in logits, "
            f"logits / temperature overflowing, or no finite logit); first at flattened row {first}. Pass "
            "validate=False to propagate NaN instead."
        )


def flatten_rows(logits: torch.Tensor, labels: torch.Tensor, temperature: float | torch.Tensor):
    """The kernels' row view of the arguments: ``(x [N, V] with unit vocabulary stride, labels [N],
    temperature [N] in the accumulation dtype or None, temperature_scalar)``. A view when possible; one
    copy of the logits only when their rows cannot be flattened or the vocabulary is strided."""
    x = logits.reshape(-1, logits.shape[-1])
    if x.stride(-1) != 1:
        if not torch.compiler.is_compiling():
            logger.debug("token_logprobs: logits have stride %d on the vocabulary; making one contiguous copy",
                         x.stride(-1))
        x = x.contiguous()
    if isinstance(temperature, torch.Tensor):
        temp_t = temperature.to(device=x.device, dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)
        temp_t = temp_t.reshape(-1) if temp_t.dim() > 0 else temp_t.reshape(1).expand(x.shape[0])
        return x, labels.reshape(-1), temp_t, 1.0
    return x, labels.reshape(-1), None, float(temperature)


# ----------------------------------------------------------------------------------------------------------
# Vocab-parallel mode (ops.md 3.3)
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
        ops = torch.ops.reasonrl
        fwd = ops.token_logprobs_fwd_triton.default if call.impl == "triton" else ops.token_logprobs_fwd.default
        pivot = label_pivot(x, labels, call.ignore_index, shard) if call.want_rank else None
        local = fwd(
            x, labels, temperature, call.temperature_scalar, call.ignore_index, call.want_entropy, call.want_rank,
            False, shard.vocab_start, shard.vocab_global, pivot,
        )
        lp, ent, rank, lse, stats = combine_local_outputs(
            local, labels, call.ignore_index, call.want_entropy, call.want_rank, shard)
        ctx.save_for_backward(x, labels, temperature, stats, ent)
        ctx.call = call
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(rank, lse)
        return lp, ent, rank, lse

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
        ops = torch.ops.reasonrl
        triton = call.impl == "triton"
        rest = (labels, temperature, call.temperature_scalar, call.ignore_index, stats, ent,
                call.shard.vocab_start, call.shard.vocab_global)
        if call.inplace_backward:
            bwd = ops.token_logprobs_bwd_inplace_triton if triton else ops.token_logprobs_bwd_inplace
            bwd.default(grad_logprobs, grad_entropy, x, *rest)
            return x, None, None, None
        bwd = ops.token_logprobs_bwd_triton if triton else ops.token_logprobs_bwd
        return bwd.default(grad_logprobs, grad_entropy, x, *rest), None, None, None


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
        process_group: vocab-parallel mode (ops.md 3.3). ``logits`` ``[..., V_r]`` is then this rank's
            contiguous shard of global vocabulary ids ``[v_r, v_r + V_r)``; ``labels`` are GLOBAL ids and, with
            ``temperature``, ``ignore_index`` and every keyword, identical on all ranks. Outputs are identical on
            all ranks and equal the op on the full logits; the gradient is with respect to the local shard. The
            forward issues two O(N) all-reduces (MAX of ``[m_r, t_r]``, SUM of ``[s_r, b_r, c_r]``; a third,
            MAX of the label logit, with ``want_rank``); the backward communicates nothing (the upstream
            gradients must be identical on all ranks). Needs ``impl`` cpp / cuda / triton (not reference).
            Every rank must make the call, also with N = 0 rows. Eager mode: the collectives run in a
            ``torch.autograd.Function`` and are not meant for ``torch.compile(fullgraph=True)``.
        vocab_start: ``v_r`` for unequal shards. Default ``None``: equal shards, ``v_r = rank * V_r`` and
            ``V_glob = P * V_r``. When given, ``V_glob`` is the sum of the ``V_r``, found by one all-gather of
            ``(v_r, V_r)`` over the group and a host sync per call, which also checks that the shards tile
            ``[0, V_glob)`` (``ValueError`` naming ``vocab_start`` on every rank otherwise). With ``validate``
            the all-gather runs for equal shards too and checks that the ``V_r`` are equal. Labels outside
            ``[0, V_glob)`` other than ``ignore_index`` are a ``ValueError`` on every rank (``validate``), or
            NaN rows with a zero gradient (``validate=False``).
        impl: ``"auto" | "triton" | "cuda" | "cpp" | "reference"``; env ``REASONRL_IMPL`` sets the default.
            An explicit choice that cannot run raises ``RuntimeError``.
        validate: check label range / temperature values and report NaN rows (host syncs). ``None`` uses the
            global setting (:func:`set_validation`, env ``REASONRL_VALIDATE``; on by default). Must be False
            under ``torch.compile(fullgraph=True)`` and CUDA graphs, and the same on every rank of a
            ``process_group`` (it decides which collectives run).

    Returns:
        ``TokenLogprobs(logprobs, entropy, rank, lse)``: ``[...]`` tensors, fp32 (fp64 for fp64 logits),
        rank int32; fields not requested are None.
    """
    _check_args(logits, labels, temperature, ignore_index)
    if validate is None:
        validate = _VALIDATE
    if logits.device.type == "meta":
        validate = False  # no values to check; the impl choice below says which implementations run on meta
    lead_shape = logits.shape[:-1]
    vocab = logits.shape[-1]
    shard = None
    if process_group is not None:
        shard = resolve_vocab_shard(process_group, vocab, vocab_start, validate=validate, device=logits.device)
    elif vocab_start is not None:
        raise ValueError("token_logprobs: vocab_start is only meaningful with a process_group (vocab-parallel "
                         f"mode); got vocab_start={vocab_start!r} and process_group=None")
    if validate:
        _validate_values(logits, labels.reshape(-1), temperature, ignore_index,
                         None if shard is None else shard.vocab_global)

    impl = _select_impl(impl, logits.device.type, logits.dtype)
    if shard is not None and impl == "reference":
        raise RuntimeError("token_logprobs: vocab-parallel mode (process_group given) needs impl='cpp', 'cuda' "
                           "or 'triton'; the reference implementation has no sharded path")
    if impl == "reference":
        out = token_logprobs_reference(
            logits, labels, temperature=temperature, ignore_index=ignore_index, want_entropy=want_entropy,
            want_rank=want_rank, return_lse=return_lse,
        )
        if validate:
            _check_outputs(out.logprobs.reshape(-1), labels.reshape(-1), ignore_index)
        return out

    x, labels_flat, temp_t, temp_scalar = flatten_rows(logits, labels, temperature)
    if inplace_backward and not (x.is_contiguous() and x.data_ptr() == logits.data_ptr()):
        raise ValueError("token_logprobs: inplace_backward=True needs contiguous logits (the gradient is "
                         "written into their storage)")

    if shard is not None:
        call = _ShardedCall(impl, shard, temp_scalar, ignore_index, want_entropy, want_rank, inplace_backward)
        lp, ent, rank, lse = _VocabParallel.apply(x, labels_flat, temp_t, call)
        if validate:
            _check_outputs(lp, labels_flat, ignore_index)
        return TokenLogprobs(
            lp.reshape(lead_shape),
            ent.reshape(lead_shape) if want_entropy else None,
            rank.reshape(lead_shape) if want_rank else None,
            lse.reshape(lead_shape) if return_lse else None,
        )

    # 'cpp' and 'cuda' are the same dispatcher ops (TORCH_LIBRARY_IMPL per device); 'triton' are triton_ops.
    # Both were registered by _select_impl; plain torch.ops attribute access keeps this traceable.
    if impl == "triton":
        fwd = torch.ops.reasonrl.token_logprobs_fwd_triton.default
    else:
        fwd = torch.ops.reasonrl.token_logprobs_fwd.default
    lp, ent, rank, lse, _ = fwd(x, labels_flat, temp_t, temp_scalar, ignore_index, want_entropy, want_rank,
                             inplace_backward)
    if validate:
        _check_outputs(lp, labels_flat, ignore_index)
    return TokenLogprobs(
        lp.reshape(lead_shape),
        ent.reshape(lead_shape) if want_entropy else None,
        rank.reshape(lead_shape) if want_rank else None,
        lse.reshape(lead_shape) if return_lse else None,
    )
