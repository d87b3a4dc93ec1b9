"""Public GRPO-family policy loss over per-token log-probabilities (docs/losses.md section 2).

``policy_loss`` (functional) and ``PolicyLoss`` (an ``nn.Module`` that only holds a ``PolicyLossConfig``)
run the plain-PyTorch reference of ``reasonrl/reference/policy_loss.py``; ``policy_loss_from_logits`` and
``policy_loss_from_hidden`` (and ``FusedLinearPolicyLoss``) share its config, normalisers and outputs, and
one argument handling (:class:`_LossCall`): the single pass of ``reasonrl.losses.fused`` when the
configuration allows it, the two-phase composition otherwise. ``rollout_is_weights`` (section 8.3) and
``top_entropy_mask`` (section 8.2) are the public utilities the loss uses internally.

These entry points check ``cu_seqlens`` values (one host sync) when validation is enabled
(``reasonrl.set_validation`` / ``REASONRL_VALIDATE``); the computation itself never syncs with the host.
"""

from __future__ import annotations

import functools
import inspect

import torch
from torch import nn

from reasonrl import _backend as backend
from reasonrl.loss_config import LossNormalizers, PolicyLossConfig
from reasonrl.loss_types import LossOutput
from reasonrl.losses.fused import (
    fused_policy_loss_from_hidden,
    fused_policy_loss_from_logits,
    single_pass_blocker,
)
from reasonrl.ops.linear_token_logprobs import check_args as check_linear_args
from reasonrl.ops.linear_token_logprobs import linear_token_logprobs
from reasonrl.ops.policy_loss import FROM_HIDDEN, FROM_LOGITS
from reasonrl.ops.token_logprobs import token_logprobs
from reasonrl.reference import policy_loss as reference
from reasonrl.reference.layout import check_cu_seqlens

__all__ = ["policy_loss", "policy_loss_from_logits", "policy_loss_from_hidden", "PolicyLoss",
           "FusedLinearPolicyLoss", "rollout_is_weights", "top_entropy_mask"]


def _validate_cu_seqlens(cu_seqlens: torch.Tensor | None, num_tokens: int,
                         validate: bool | None = None) -> None:
    """docs/ops.md section 7: cu[0] = 0, non-decreasing, cu[B] = N (O(B), one host sync). ``validate`` None:
    the global setting."""
    if cu_seqlens is None or not backend.resolve_validate(validate):
        return
    check_cu_seqlens(cu_seqlens, num_tokens, op="policy_loss", validate=True)


def _with_cu_seqlens_check(reference_fn, name: str):
    """The public form of a reference function over per-token tensors: the reference itself (signature and
    docstring), after :func:`_validate_cu_seqlens` on its ``cu_seqlens`` against its first tensor."""
    first = next(iter(inspect.signature(reference_fn).parameters))

    @functools.wraps(reference_fn)
    def entry(*args, **kwargs):
        tokens = args[0] if args else kwargs[first]
        _validate_cu_seqlens(kwargs.get("cu_seqlens"), tokens.shape[0] if tokens.dim() else 0)
        return reference_fn(*args, **kwargs)

    entry.__name__ = entry.__qualname__ = name
    entry.__module__ = __name__
    return entry


# GRPO-family policy loss over per-token log-probabilities (docs/losses.md sections 5-12): the reference.
policy_loss = _with_cu_seqlens_check(reference.policy_loss_reference, "policy_loss")
# Rollout-correction weights rho = pi_old / pi_sampler and their metrics (docs/losses.md section 8.3).
rollout_is_weights = _with_cu_seqlens_check(reference.rollout_is_weights, "rollout_is_weights")
# Bool mask of the top-rho entropy tokens over all ranks of a process_group (docs/losses.md section 8.2).
top_entropy_mask = _with_cu_seqlens_check(reference.top_entropy_mask, "top_entropy_mask")


class _LossCall:
    """The argument handling ``policy_loss_from_logits`` and ``policy_loss_from_hidden`` share: the valid
    tokens (label != ignore_index, ANDed with ``mask``; masked labels become ``ignore_index``, so their rows
    skip the vocabulary pass and, from hidden states, the GEMMs), the temperature (None: the config's), the
    validation switch, the choice between the single pass and the two-phase path, and the two-phase tail."""

    def __init__(self, entry: str, source: str, x: torch.Tensor, labels: torch.Tensor, *, mask, temperature,
                 ignore_index: int, validate: bool | None, loss_kw: dict) -> None:
        token_shape = x.shape[:-1]
        if labels.shape != token_shape:
            raise ValueError(f"{entry}: labels must have shape {source}.shape[:-1] = {tuple(token_shape)}, "
                             f"got {tuple(labels.shape)}")
        valid = labels != ignore_index
        if mask is not None:
            if mask.shape != token_shape:
                raise ValueError(f"{entry}: mask must have shape {tuple(token_shape)}, got "
                                 f"{tuple(mask.shape)}")
            valid = valid & mask.bool()
            labels = labels.masked_fill(~valid, ignore_index)  # O(N)
        self.entry, self.labels, self.valid, self.ignore_index = entry, labels, valid, ignore_index
        self.config, self.loss_kw = loss_kw["config"], loss_kw
        self.temperature = self.config.temperature if temperature is None else temperature
        self.validate = backend.resolve_validate(validate, x)
        self.dtype = x.dtype
        self.num_tokens = token_shape[0] if len(token_shape) else 0
        self.single_pass = False

    def choose_impl(self, impl: str, x: torch.Tensor, needs_grad: bool, *, return_per_token: bool) -> str:
        """The implementation to run. Sets ``single_pass`` when the single-pass kernels apply (gradients are
        needed, the configuration is token-local: ``single_pass_blocker``); a kernel choice without them is
        the implementation of the two-phase path's op."""
        self.single_pass = (needs_grad and torch.is_grad_enabled()
                            and single_pass_blocker(self.config, return_per_token=return_per_token) is None)
        if not self.single_pass:
            return impl
        return backend.select_impl(self.entry, impl, x.device.type, x.dtype)

    def fused_kwargs(self, vocab: int) -> dict:
        """Value checks of the single pass (with validation on) and the keywords of the fused entry points."""
        _validate_cu_seqlens(self.loss_kw["cu_seqlens"], self.num_tokens, self.validate)
        validate, entry, ignore_index = self.validate, self.entry, self.ignore_index
        if validate:
            backend.validate_rows(entry, self.labels.reshape(-1), self.temperature, ignore_index, vocab,
                                  dtype=self.dtype)

        def check_outputs(lp, labels_flat):
            if validate:
                backend.check_nan_rows(entry, lp, labels_flat, ignore_index, "NaN or inf in the inputs")

        return dict(valid=self.valid, temperature=self.temperature, ignore_index=ignore_index,
                    check_outputs=check_outputs)

    def two_phase(self, out, return_per_token: bool) -> LossOutput:
        """The reference loss over the op's per-token log-probs and entropies (docs/losses.md 13.2)."""
        _validate_cu_seqlens(self.loss_kw["cu_seqlens"], self.num_tokens, self.validate)
        return reference.policy_loss_reference(out.logprobs, mask=self.valid, entropies=out.entropy,
                                               return_per_token=return_per_token, **self.loss_kw)


def policy_loss_from_logits(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    advantages: torch.Tensor,
    normalizers: LossNormalizers,
    config: PolicyLossConfig,
    mask: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    temperature: float | torch.Tensor | None = None,
    ignore_index: int = -100,
    old_logprobs: torch.Tensor | None = None,
    ref_logprobs: torch.Tensor | None = None,
    sampling_logprobs: torch.Tensor | None = None,
    is_weights: torch.Tensor | None = None,
    entropy_coef: float | torch.Tensor | None = None,
    return_per_token: bool = False,
    inplace_backward: bool = False,
    impl: str = "auto",
    validate: bool | None = None,
) -> LossOutput:
    """The policy loss straight from logits (docs/losses.md section 2): ``policy_loss`` over
    ``token_logprobs(logits, labels, temperature, want_entropy=True)``, by definition.

    Args:
        logits: ``[B, T, V]`` (padded, with ``mask [B, T]``) or ``[N, V]`` (packed, with ``cu_seqlens``);
            float32 / bfloat16 / float16, any strides. labels: ``[B, T]`` / ``[N]`` next-token ids; tokens
            whose label is ``ignore_index`` are excluded from the loss (ANDed into the mask) and skip the
            vocabulary pass. temperature: float or per-token tensor; None uses ``config.temperature``.
        inplace_backward: write dLoss/dlogits into the storage of ``logits`` instead of a new [N, V] buffer
            (opt-in, as ``token_logprobs(..., inplace_backward=True)``): ``logits`` must be contiguous and
            must not be used again after the call; any autograd use of them that saved the values raises in
            its backward (their version counter is bumped). Saves one logits-sized buffer and, on CPU, the
            page faults of allocating it (docs/losses.md 13.1). Ignored by ``impl="reference"``.
        Every other argument as in :func:`policy_loss`; ``impl`` / ``validate`` as in ``token_logprobs``.

    The entropy is always computed (for the ``entropy`` metric, the bonus and the top-entropy mask): in the
    fused kernel it costs one FMA per logit. No [N, V] tensor other than the gradient is allocated.

    Cost (docs/losses.md section 13): when the logits require grad and the configuration is token-local (token
    importance-sampling level, no VESPO, no off-policy or top-entropy mask, ``return_per_token=False``; see
    :func:`reasonrl.losses.fused.single_pass_blocker`), the ``cpp`` and ``triton`` implementations run the
    single-pass kernel: each row of logits is read once and its gradient written once, during the forward
    call, and ``loss.backward()`` hands that buffer over. The loss value and the metrics are then evaluated
    by the reference formulas over the kernel's per-token log-probs and entropies (O(N)). Every other case
    takes the two-phase path of section 13.2: ``token_logprobs`` (one read), the per-token loss and its
    gradient with respect to log-prob / entropy (O(N)), then the ``token_logprobs`` backward (one read + one
    write), never more than an unfused forward + backward. ``per_token_loss`` is only returned (with its
    gradient) on the two-phase path, which ``return_per_token=True`` selects.
    """
    loss_kw = dict(advantages=advantages, cu_seqlens=cu_seqlens, old_logprobs=old_logprobs,
                   ref_logprobs=ref_logprobs, sampling_logprobs=sampling_logprobs, is_weights=is_weights,
                   normalizers=normalizers, config=config, entropy_coef=entropy_coef)
    call = _LossCall(FROM_LOGITS, "logits", logits, labels, mask=mask, temperature=temperature,
                     ignore_index=ignore_index, validate=validate, loss_kw=loss_kw)
    backend.check_logits_args(FROM_LOGITS, logits, call.labels, call.temperature, ignore_index)
    impl = call.choose_impl(impl, logits, logits.requires_grad, return_per_token=return_per_token)
    if impl != "reference" and call.single_pass:
        if inplace_backward and not logits.is_contiguous():
            raise ValueError(f"{FROM_LOGITS}: inplace_backward=True needs contiguous logits (the gradient is "
                             f"written into their storage), got strides {tuple(logits.stride())}")
        return fused_policy_loss_from_logits(logits, call.labels, impl=impl,
                                             inplace_backward=inplace_backward,
                                             **call.fused_kwargs(logits.shape[-1]), **loss_kw)
    out = token_logprobs(logits, call.labels, temperature=call.temperature, ignore_index=ignore_index,
                         want_entropy=True, inplace_backward=inplace_backward, impl=impl,
                         validate=call.validate)
    return call.two_phase(out, return_per_token)


def policy_loss_from_hidden(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    advantages: torch.Tensor,
    normalizers: LossNormalizers,
    config: PolicyLossConfig,
    bias: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    temperature: float | torch.Tensor | None = None,
    ignore_index: int = -100,
    old_logprobs: torch.Tensor | None = None,
    ref_logprobs: torch.Tensor | None = None,
    sampling_logprobs: torch.Tensor | None = None,
    is_weights: torch.Tensor | None = None,
    entropy_coef: float | torch.Tensor | None = None,
    return_per_token: bool = False,
    process_group=None,
    vocab_start: int | None = None,
    chunk_rows: int | None = None,
    impl: str = "auto",
    validate: bool | None = None,
) -> LossOutput:
    """The policy loss straight from hidden states and the lm_head (docs/losses.md section 2): by definition
    ``policy_loss`` over ``linear_token_logprobs(hidden, weight, labels, bias=bias, want_entropy=True)``,
    whose logits are the fp32 matmul accumulator (docs/ops.md section 3). The [N, V] logits never exist.

    Args:
        hidden: ``[B, T, H]`` (padded, with ``mask [B, T]``) or ``[N, H]`` (packed, with ``cu_seqlens``).
        weight: the lm_head ``[V, H]`` (tied embeddings: pass the embedding matrix; see
            ``reasonrl.models.hidden_states_and_lm_head``), same dtype as ``hidden``. bias: ``[V]`` or None.
        chunk_rows: rows per logits chunk on the fused CPU path (None: the 64 MiB workspace of
            ``linear_token_logprobs``, csrc/cpu/linear_chunks.h).
        process_group: vocab-parallel lm_head shards (docs/ops.md 3.3): ``weight`` ``[V_r, H]`` / ``bias``
            ``[V_r]`` are this rank's rows ``[v_r, v_r + V_r)`` of the lm_head; every other argument (labels
            are global ids) is identical on all ranks. Takes the two-phase path: the sharded
            ``linear_token_logprobs(..., want_entropy=True, process_group=...)`` (``cpp``), then the reference
            ``policy_loss`` over its global per-token log-probs and entropies, computed redundantly (and
            identically) on every rank. The loss equals the unsharded call's; each rank gets its weight / bias
            shard's gradient and the full ``grad_hidden`` (summed over the group in the backward). The
            single-pass fused kernels have no sharded mode.
        vocab_start: ``v_r`` for unequal shards (with ``process_group``), as in ``linear_token_logprobs``.
        Every other argument as in :func:`policy_loss_from_logits`.

    Cost: when the parameters need gradients and the configuration is token-local (as for
    :func:`policy_loss_from_logits`), the gradients are computed inside the forward call and ``backward()``
    hands them over: ``cpp`` runs one sweep of three GEMMs per row chunk (6NVH FLOP: logits chunk, then
    grad_hidden and grad_weight from the chunk's dLoss/dlogits, formed in place); ``triton`` runs the
    statistics sweep, the per-token loss gradient and the recompute sweep (8NVH,
    kernels/linear_policy_loss.py). Otherwise: ``linear_token_logprobs`` (forward
    2NVH, backward with recompute 6NVH) around the O(N) loss.
    """
    loss_kw = dict(advantages=advantages, cu_seqlens=cu_seqlens, old_logprobs=old_logprobs,
                   ref_logprobs=ref_logprobs, sampling_logprobs=sampling_logprobs, is_weights=is_weights,
                   normalizers=normalizers, config=config, entropy_coef=entropy_coef)
    call = _LossCall(FROM_HIDDEN, "hidden", hidden, labels, mask=mask, temperature=temperature,
                     ignore_index=ignore_index, validate=validate, loss_kw=loss_kw)
    check_linear_args(hidden, weight, call.labels, bias, call.temperature, ignore_index)
    needs_grad = any(t is not None and t.requires_grad for t in (hidden, weight, bias))
    # The single-pass fused kernels have no sharded mode: a process_group takes the two-phase path.
    impl = call.choose_impl(impl, hidden, needs_grad and process_group is None,
                            return_per_token=return_per_token)
    if impl != "reference" and call.single_pass:
        return fused_policy_loss_from_hidden(
            hidden, weight, call.labels, bias=bias, impl=impl,
            chunk_rows=0 if chunk_rows is None else int(chunk_rows), **call.fused_kwargs(weight.shape[0]),
            **loss_kw,
        )
    out = linear_token_logprobs(hidden, weight, call.labels, bias=bias, temperature=call.temperature,
                                ignore_index=ignore_index, want_entropy=True, impl=impl,
                                validate=call.validate, process_group=process_group, vocab_start=vocab_start)
    return call.two_phase(out, return_per_token)


class PolicyLoss(nn.Module):
    """``nn.Module`` form of :func:`policy_loss`: holds a ``PolicyLossConfig``, ``forward`` calls the
    functional with it."""

    def __init__(self, config: PolicyLossConfig | None = None) -> None:
        super().__init__()
        self.config = PolicyLossConfig() if config is None else config

    def forward(self, logprobs: torch.Tensor, **kwargs) -> LossOutput:
        """``policy_loss(logprobs, config=self.config, **kwargs)``."""
        return policy_loss(logprobs, config=self.config, **kwargs)

    def extra_repr(self) -> str:
        return repr(self.config)


class FusedLinearPolicyLoss(nn.Module):
    """``nn.Module`` form of :func:`policy_loss_from_hidden`: holds a ``PolicyLossConfig`` and the lm_head (an
    ``nn.Linear``, whose weight / bias are used by reference: pass ``model.get_output_embeddings()`` to share
    it with the model). ``forward(hidden, labels, **loss_kwargs)``."""

    def __init__(self, lm_head: nn.Linear, config: PolicyLossConfig | None = None, *,
                 chunk_rows: int | None = None, impl: str = "auto") -> None:
        super().__init__()
        self.lm_head = lm_head
        self.config = PolicyLossConfig() if config is None else config
        self.chunk_rows, self.impl = chunk_rows, impl

    def forward(self, hidden: torch.Tensor, labels: torch.Tensor, **kwargs) -> LossOutput:
        kwargs.setdefault("chunk_rows", self.chunk_rows)
        kwargs.setdefault("impl", self.impl)
        return policy_loss_from_hidden(hidden, self.lm_head.weight, labels, bias=self.lm_head.bias,
                                       config=self.config, **kwargs)

    def extra_repr(self) -> str:
        return repr(self.config)
