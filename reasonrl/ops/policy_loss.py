"""Registered ops of the single-pass fused policy loss (losses.md section 13.1).

* ``cpp``: ``torch.ops.reasonrl.policy_loss_fused`` (csrc/cpu/policy_loss.cpp), plus
  ``torch.ops.reasonrl.policy_loss_token_grad``, its per-token functor alone (tests).
* ``triton``: ``torch.ops.reasonrl.policy_loss_fused_triton``, a ``triton_op`` launching
  ``reasonrl.kernels.policy_loss``; registered lazily so that ``import reasonrl`` never imports triton.

Both have the signature
``(logits [N, V], labels [N], temperature [N] | None, temperature_scalar, ignore_index, token_inputs [N, 6],
loss_kind, kl_kind, params) -> (logprobs, entropy, lse, grad_logprobs, grad_entropy, grad_logits)``
and no autograd formula of their own: they compute dLoss/dlogits during the forward, and
``reasonrl.losses.fused`` attaches it to the loss. The column layout of ``token_inputs`` and the codes are
documented in csrc/cpu/policy_loss.cpp.
"""

from __future__ import annotations

import functools

import torch

from reasonrl._backend import load_extension, resolve_impl

__all__ = ["fused_hidden_op", "fused_kernel", "fused_op", "select_fused_impl"]


def _fake(
    logits, labels, temperature, temperature_scalar, ignore_index, token_inputs, loss_kind, kl_kind, params
):
    n = logits.shape[0]
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    rows = [logits.new_empty((n,), dtype=acc) for _ in range(5)]
    return (*rows, torch.empty_like(logits, memory_format=torch.contiguous_format))


@functools.cache
def _cpp_ops():
    load_extension()
    torch.library.register_fake("reasonrl::policy_loss_fused")(_fake)

    @torch.library.register_fake("reasonrl::policy_loss_token_grad")
    def _fake_token_grad(logprobs, token_inputs, loss_kind, kl_kind, params):
        return torch.empty_like(logprobs)

    return torch.ops.reasonrl.policy_loss_fused.default


@functools.cache
def _triton_ops():
    from reasonrl.kernels import linear_policy_loss as linear_kernels
    from reasonrl.kernels import policy_loss as kernels

    @torch.library.triton_op("reasonrl::policy_loss_fused_triton", mutates_args=())
    def fused(
        logits: torch.Tensor,
        labels: torch.Tensor,
        temperature: torch.Tensor | None,
        temperature_scalar: float,
        ignore_index: int,
        token_inputs: torch.Tensor,
        loss_kind: int,
        kl_kind: int,
        params: list[float],
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return kernels.policy_loss_fused(
            logits, labels, temperature, temperature_scalar, ignore_index, token_inputs, loss_kind, kl_kind,
            params, launch=torch.library.wrap_triton,
        )  # fmt: skip

    @torch.library.triton_op("reasonrl::policy_loss_from_hidden_fused_triton", mutates_args=())
    def fused_hidden(
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        labels: torch.Tensor,
        temperature: torch.Tensor | None,
        temperature_scalar: float,
        ignore_index: int,
        token_inputs: torch.Tensor,
        loss_kind: int,
        kl_kind: int,
        params: list[float],
        chunk_rows: int,  # the C++ op's row chunk; the Triton kernels tile by themselves
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
               torch.Tensor]:  # fmt: skip
        return linear_kernels.linear_policy_loss(
            hidden.contiguous(), weight.contiguous(), None if bias is None else bias.contiguous(),
            labels.to(torch.int64), temperature, temperature_scalar, ignore_index, token_inputs, loss_kind,
            kl_kind, params, launch=torch.library.wrap_triton,
        )  # fmt: skip

    return torch.ops.reasonrl.policy_loss_fused_triton.default


def select_fused_impl(impl: str, device_type: str, dtype: torch.dtype) -> str:
    """Resolve ``impl`` for the fused loss and register its op (runs eagerly under torch.compile)."""
    chosen = resolve_impl(impl, torch.device(device_type), dtype, "policy_loss_from_logits")
    if chosen in ("cpp", "cuda"):
        _cpp_ops()
    elif chosen == "triton":
        _triton_ops()
    return chosen


select_fused_impl._dynamo_marked_constant = True  # see reasonrl.ops.token_logprobs._select_impl


def fused_kernel(impl: str):
    """The registered fused op of an implementation (``cpp``/``cuda`` or ``triton``)."""
    if impl in ("cpp", "cuda"):
        return _cpp_ops()
    if impl == "triton":
        return _triton_ops()
    raise RuntimeError(f"no fused policy-loss kernel for impl={impl!r}")


def fused_op(impl: str):
    """The fused op of ``impl`` once :func:`select_fused_impl` has registered it: plain ``torch.ops``
    attribute access, which torch.compile traces (unlike the cached registration functions)."""
    if impl == "triton":
        return torch.ops.reasonrl.policy_loss_fused_triton.default
    return torch.ops.reasonrl.policy_loss_fused.default


def fused_hidden_op(impl: str):
    """The fused-linear loss op of ``impl`` (registered by :func:`select_fused_impl`)."""
    if impl == "triton":
        return torch.ops.reasonrl.policy_loss_from_hidden_fused_triton.default
    return torch.ops.reasonrl.policy_loss_from_hidden_fused.default
