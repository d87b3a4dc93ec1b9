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
"""

from __future__ import annotations

import functools
import logging
import math
import os

import torch

from reasonrl._backend import load_extension, resolve_impl
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
#    want_entropy, want_rank, inplace_backward) -> (logprobs, entropy, rank, lse, stats)
# where stats [N, 2] = (m, log-sum) of the scaled logits, read only by the paired backward: it forms
# log p_j = (x_j / tau - m) - log_sum, exact near the maximum (see csrc/cpu/token_logprobs_rows.h).
# ----------------------------------------------------------------------------------------------------------


def _setup_context(ctx, inputs, output):
    logits, labels, temperature, temperature_scalar, ignore_index, want_entropy, _, inplace = inputs
    _, entropy, rank, lse, stats = output
    ctx.save_for_backward(logits, labels, temperature, stats, entropy)
    ctx.temperature_scalar = temperature_scalar
    ctx.ignore_index = ignore_index
    ctx.want_entropy = want_entropy
    ctx.inplace = inplace
    ctx.mark_non_differentiable(rank, lse, stats)


def _make_backward(bwd_op, bwd_inplace_op):
    def backward(ctx, grad_logprobs, grad_entropy, _grad_rank, _grad_lse, _grad_stats):
        logits, labels, temperature, stats, entropy = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return (None,) * 8
        if not ctx.want_entropy:
            grad_entropy = None
        args = (grad_logprobs, grad_entropy)
        rest = (labels, temperature, ctx.temperature_scalar, ctx.ignore_index, stats, entropy)
        if ctx.inplace:
            bwd_inplace_op(*args, logits, *rest)
            grad_logits = logits
        else:
            grad_logits = bwd_op(*args, logits, *rest)
        return grad_logits, None, None, None, None, None, None, None

    return backward


def _fake_fwd(logits, labels, temperature, temperature_scalar, ignore_index, want_entropy, want_rank, inplace):
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
              entropy):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _fake_bwd_inplace(grad_logprobs, grad_entropy, logits, labels, temperature, temperature_scalar,
                      ignore_index, stats, entropy):
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
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return tk.token_logprobs_fwd(
            logits, labels, temperature, temperature_scalar, ignore_index, want_entropy, want_rank,
            launch=torch.library.wrap_triton,
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
    ) -> torch.Tensor:
        grad = torch.empty_like(logits, memory_format=torch.contiguous_format)
        tk.token_logprobs_bwd(
            grad_logprobs, grad_entropy, logits, labels, temperature, temperature_scalar, ignore_index, stats,
            entropy, grad, launch=torch.library.wrap_triton,
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
    ) -> None:
        tk.token_logprobs_bwd(
            grad_logprobs, grad_entropy, logits, labels, temperature, temperature_scalar, ignore_index, stats,
            entropy, logits, launch=torch.library.wrap_triton,
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
        if not (math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"token_logprobs: temperature must be finite and > 0, got {temperature}")
    else:
        raise TypeError(f"token_logprobs: temperature must be a float or a tensor, got {type(temperature).__name__}")


def _validate_values(x, labels_flat, temperature, ignore_index):
    """The checks that need a host sync (only with validate=True)."""
    vocab = x.shape[-1]
    bad = (labels_flat != ignore_index) & ((labels_flat < 0) | (labels_flat >= vocab))
    n_bad = int(bad.sum())
    if n_bad:
        first = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"token_logprobs: {n_bad} labels are outside [0, V={vocab}) and not ignore_index={ignore_index}; "
            f"first at flattened row {first} (label {int(labels_flat[first])})"
        )
    if isinstance(temperature, torch.Tensor):
        ok = torch.isfinite(temperature) & (temperature > 0)
        if not bool(ok.all()):
            first = int((~ok).reshape(-1).nonzero()[0, 0])
            raise ValueError(
                f"token_logprobs: temperature must be finite and > 0 everywhere; "
                f"got {float(temperature.reshape(-1)[first])} at row {first}"
            )


def _check_outputs(lp, labels_flat, ignore_index):
    """NaN in a valid row means NaN/+inf logits or a row with no finite logit: report it (O(N) check)."""
    nan_rows = torch.isnan(lp) & (labels_flat != ignore_index)
    if bool(nan_rows.any()):
        first = int(nan_rows.nonzero()[0, 0])
        raise FloatingPointError(
            f"token_logprobs: {int(nan_rows.sum())} rows have a NaN log-prob (NaN or +inf in logits, or no "
            f"finite logit); first at flattened row {first}. Pass validate=False to propagate NaN instead."
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
        impl: ``"auto" | "triton" | "cuda" | "cpp" | "reference"``; env ``REASONRL_IMPL`` sets the default.
            An explicit choice that cannot run raises ``RuntimeError``.
        validate: check label range / temperature values and report NaN rows (host syncs). ``None`` uses the
            global setting (:func:`set_validation`, env ``REASONRL_VALIDATE``; on by default). Must be False
            under ``torch.compile(fullgraph=True)`` and CUDA graphs.

    Returns:
        ``TokenLogprobs(logprobs, entropy, rank, lse)``: ``[...]`` tensors, fp32 (fp64 for fp64 logits),
        rank int32; fields not requested are None.
    """
    _check_args(logits, labels, temperature, ignore_index)
    if validate is None:
        validate = _VALIDATE
    lead_shape = logits.shape[:-1]
    if validate:
        _validate_values(logits, labels.reshape(-1), temperature, ignore_index)

    impl = _select_impl(impl, logits.device.type, logits.dtype)
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
