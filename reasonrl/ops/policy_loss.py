"""The fused policy-loss kernels (docs/losses.md section 13.1): their interface
table and their registered ops.

**The interface table** (this module's constants: the one source of truth). The kernels take, besides the
row inputs of ``token_logprobs``, a ``token_inputs [N, len(INPUT_COLUMNS)]`` tensor, a ``loss_kind`` code,
a ``kl_kind`` code and a ``params`` list, defined here:

* :data:`LOSS_KINDS`: the per-token surrogates the kernels have a branch for, with their codes;
  :data:`LOSS_TYPE_KINDS`: which kind serves each ``PolicyLossConfig.loss_type``, or why none can (a loss
  that couples the tokens of a sequence). A loss type missing here, or mapped to a kind without a code, takes
  the two-phase path with that reason (``reasonrl.losses.fused.single_pass_blocker``).
* :data:`KL_KINDS` (and :data:`KL_STRAIGHT_THROUGH`, added for the ``+`` variants), :data:`PARAMS` (the
  order of ``params``), :data:`INPUT_COLUMNS` (the columns of ``token_inputs``).

csrc/cpu/policy_loss.cpp (enums ``LossKind``, ``KlKind``, ``Param``, ``Column``) and kernels/policy_loss.py
(its named constants) restate the codes in their languages; tests/losses/test_policy_loss_table.py parses
both and fails on any difference, and on a loss type of the config missing from the table.

**The registered ops**, with the signature
``(logits [N, V], labels [N], temperature [N] | None, temperature_scalar, ignore_index, token_inputs,
loss_kind, kl_kind, params) -> (logprobs, entropy, lse, grad_logprobs, grad_entropy, grad_logits)``
(and its from-hidden twin, which takes ``hidden, weight, bias`` and a ``chunk_rows`` and returns
``grad_hidden, grad_weight, grad_bias``) and no autograd formula of their own: they compute dLoss/dlogits
during the forward, and ``reasonrl.losses.fused`` attaches it to the loss.

* ``cpp``: ``torch.ops.reasonrl.policy_loss_fused`` / ``policy_loss_from_hidden_fused``
  (csrc/cpu/policy_loss.cpp), plus ``policy_loss_token_grad``, the per-token functor alone (tests).
* ``triton``: ``torch.ops.reasonrl.policy_loss_fused_triton`` / ``policy_loss_from_hidden_fused_triton``,
  ``triton_op`` s launching ``reasonrl.kernels.policy_loss`` / ``linear_policy_loss``.
* ``policy_loss_fused_inplace`` (and its ``_triton`` twin): ``inplace_backward=True``, the same sweep writing
  dLoss/dlogits into the storage of the (contiguous) logits; returns the first five outputs.
"""

from __future__ import annotations

import math

import torch

from reasonrl import _backend as backend

__all__ = [
    "LOSS_KINDS",
    "LOSS_TYPE_KINDS",
    "KL_KINDS",
    "KL_STRAIGHT_THROUGH",
    "PARAMS",
    "INPUT_COLUMNS",
    "kernel_loss_kind",
    "kernel_codes",
    "kernel_params",
    "registered_ops",
]

# ----------------------------------------------------------------------------------------------------------
# The interface table
# ----------------------------------------------------------------------------------------------------------

# loss_kind: the per-token surrogates of docs/losses.md section 7 that both kernels have a branch for.
LOSS_KINDS: dict[str, int] = {"clip": 0, "cispo_upper": 1, "cispo_two_sided": 2, "sapo": 3, "reinforce": 4}

# PolicyLossConfig.loss_type -> the kernel loss kind serving it (a str, or a function of the config), or
# None and the reason the single pass cannot serve it.
LOSS_TYPE_KINDS: dict[str, object] = {
    "grpo": "clip",
    "bnpo": "clip",
    "dr_grpo": "clip",
    "dapo": "clip",
    "luspo": "clip",
    "cispo": lambda cfg: "cispo_upper" if cfg.cispo_mode == "upper" else "cispo_two_sided",
    "sapo": "sapo",
    "reinforce": "reinforce",
    "vespo": (None, "vespo's weight is a function of the whole sequence's log-ratio"),
}

# kl_kind: the KL estimators of docs/losses.md section 9 (0: no KL term); a "+" (straight-through) variant is
# its base code + KL_STRAIGHT_THROUGH.
KL_KINDS: dict[str, int] = {"no_kl": 0, "k1": 1, "abs": 2, "k2": 3, "k3": 4, "low_var_kl": 5}
KL_STRAIGHT_THROUGH = 8

# params, in this order.
PARAMS: tuple[str, ...] = (
    "eps_low",  # clip lower bound 1 - eps_low
    "eps_high",  # clip upper bound 1 + eps_high
    "delta_cap",  # TRL's delta on the unclipped branch; +inf when off
    "dual_clip_c",  # verl's dual clip C; 0 when off
    "log_ratio_clamp",  # |lp - old| clamp before exponentiating; +inf when off
    "cispo_max",  # CISPO upper cap R_max
    "sapo_tau_pos",  # SAPO gate temperatures
    "sapo_tau_neg",
    "has_old",  # 1: old log-probs given in the "old" column (otherwise old = sg(lp), ratio 1)
    "kl_bias_correction",  # 1: kappa x w (with its gradient)
)

# token_inputs columns, in the accumulation dtype (fp32; fp64 for fp64 logits), 0 at tokens outside the loss.
INPUT_COLUMNS: tuple[str, ...] = (
    "a",  # advantage A of the token (a per-sequence advantage broadcast to its tokens)
    "old",  # behaviour-policy log-prob (read when has_old)
    "ref",  # reference-policy log-prob (read when kl_kind != no_kl)
    "coef_pg",  # c_pg: aggregation coefficient x rollout IS weight (docs/losses.md 10, 8.3)
    "coef_kl",  # c_kl: beta x the KL aggregation coefficient
    "grad_h",  # upstream gradient of the entropy g_H: -eta x the entropy coefficient (docs/losses.md 11.1)
)
# The names are those of the C++ enums without their k prefix, in snake case (kCoefPg: coef_pg), and of the
# Triton constants without their LOSS_ / KL_ / COL_ prefix, in lower case.


def kernel_loss_kind(config) -> tuple[str | None, str | None]:
    """``(kernel loss kind, None)`` for ``config``, or ``(None, why the kernels cannot serve it)``."""
    entry = LOSS_TYPE_KINDS.get(config.loss_type)
    if entry is None:
        return None, (f"loss_type={config.loss_type!r} is not in the fused-loss kernel table "
                      "(reasonrl/ops/policy_loss.py LOSS_TYPE_KINDS)")
    if isinstance(entry, tuple):
        return entry
    kind = entry(config) if callable(entry) else entry
    if kind not in LOSS_KINDS:
        return None, (f"loss_type={config.loss_type!r} needs the kernel loss kind {kind!r}, which the fused "
                      "kernels have no branch for (reasonrl/ops/policy_loss.py LOSS_KINDS)")
    return kind, None


def _kl_kind(config) -> int:
    if config.beta == 0.0:
        return KL_KINDS["no_kl"]
    base = config.kl_estimator.rstrip("+")
    return KL_KINDS[base] + (KL_STRAIGHT_THROUGH if config.kl_estimator.endswith("+") else 0)


def kernel_params(config, has_old: bool) -> list[float]:
    """The ``params`` list of the kernels, in the order of :data:`PARAMS`."""
    values = {
        "eps_low": config.epsilon_low,
        "eps_high": config.epsilon_high_value,
        "delta_cap": math.inf if config.delta is None else config.delta,
        "dual_clip_c": config.dual_clip_c if config.dual_clip else 0.0,
        "log_ratio_clamp": math.inf if config.log_ratio_clamp is None else config.log_ratio_clamp,
        "cispo_max": config.cispo_ratio_max,
        "sapo_tau_pos": config.sapo_tau_pos,
        "sapo_tau_neg": config.sapo_tau_neg,
        "has_old": 1.0 if has_old else 0.0,
        "kl_bias_correction": 1.0 if config.kl_bias_correction else 0.0,
    }
    return [float(values[name]) for name in PARAMS]


def kernel_codes(config, has_old: bool) -> tuple[int, int, list[float]]:
    """``(loss_kind, kl_kind, params)`` of the kernels for a config the single pass serves."""
    kind, why = kernel_loss_kind(config)
    if kind is None:
        raise ValueError(f"the fused policy-loss kernels cannot serve this config: {why}")
    return LOSS_KINDS[kind], _kl_kind(config), kernel_params(config, has_old)


# ----------------------------------------------------------------------------------------------------------
# Registration
# ----------------------------------------------------------------------------------------------------------

FROM_LOGITS = "policy_loss_from_logits"
FROM_HIDDEN = "policy_loss_from_hidden"


def _fake(logits, labels, temperature, temperature_scalar, ignore_index, token_inputs, loss_kind, kl_kind,
          params):
    acc = backend.accumulation_dtype(logits.dtype)
    rows = [logits.new_empty((logits.shape[0],), dtype=acc) for _ in range(5)]
    return (*rows, torch.empty_like(logits, memory_format=torch.contiguous_format))


def _fake_inplace(logits, labels, temperature, temperature_scalar, ignore_index, token_inputs, loss_kind,
                  kl_kind, params):
    return _fake(logits, labels, temperature, temperature_scalar, ignore_index, token_inputs, loss_kind,
                 kl_kind, params)[:5]


def _fake_token_grad(logprobs, token_inputs, loss_kind, kl_kind, params):
    return torch.empty_like(logprobs)


def _fake_hidden(hidden, weight, bias, labels, temperature, temperature_scalar, ignore_index, token_inputs,
                 loss_kind, kl_kind, params, chunk_rows):
    acc = backend.accumulation_dtype(hidden.dtype)
    rows = [hidden.new_empty((hidden.shape[0],), dtype=acc) for _ in range(5)]
    grad_bias = weight.new_empty((weight.shape[0],) if bias is not None else (0,))
    return (*rows, torch.empty_like(hidden, memory_format=torch.contiguous_format),
            torch.empty_like(weight, memory_format=torch.contiguous_format), grad_bias)


def _cpp_from_logits():
    backend.attach_cpp("policy_loss_token_grad", _fake_token_grad)
    backend.attach_cpp("policy_loss_fused_inplace", _fake_inplace)
    return backend.attach_cpp("policy_loss_fused", _fake)


def _cpp_from_hidden():
    return backend.attach_cpp("policy_loss_from_hidden_fused", _fake_hidden)


def _triton_from_logits():
    from reasonrl.kernels import policy_loss as kernels

    def register(inplace: bool):
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
        ):
            out = kernels.policy_loss_fused(
                logits, labels, temperature, temperature_scalar, ignore_index, token_inputs, loss_kind,
                kl_kind, params, inplace=inplace, launch=torch.library.wrap_triton,
            )  # fmt: skip
            return out[:5] if inplace else out

        # The in-place op returns the five per-token outputs; grad_logits is the mutated logits.
        fused.__annotations__["return"] = f"tuple[{', '.join(['torch.Tensor'] * (5 if inplace else 6))}]"
        name = "policy_loss_fused_inplace_triton" if inplace else "policy_loss_fused_triton"
        return torch.library.triton_op(f"reasonrl::{name}", mutates_args={"logits"} if inplace else ())(fused)

    register(inplace=True)
    register(inplace=False)
    return torch.ops.reasonrl.policy_loss_fused_triton.default


def _triton_from_hidden():
    from reasonrl.kernels import linear_policy_loss as kernels

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
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
               torch.Tensor, torch.Tensor]:  # fmt: skip
        return kernels.linear_policy_loss(
            hidden.contiguous(), weight.contiguous(), None if bias is None else bias.contiguous(),
            labels.to(torch.int64), temperature, temperature_scalar, ignore_index, token_inputs, loss_kind,
            kl_kind, params, launch=torch.library.wrap_triton,
        )  # fmt: skip

    return torch.ops.reasonrl.policy_loss_from_hidden_fused_triton.default


backend.declare_op(FROM_LOGITS, cpp=_cpp_from_logits, triton=_triton_from_logits)
backend.declare_op(FROM_HIDDEN, cpp=_cpp_from_hidden, triton=_triton_from_hidden)


def registered_ops(entry: str, impl: str):
    """The registered fused op of ``entry`` (``policy_loss_from_logits`` / ``_from_hidden``) for ``impl``."""
    return backend.registered_ops(entry, impl)
