"""Hyper-parameters of the policy losses (docs/losses.md sections 3 and 4).

``PolicyLossConfig`` is the one frozen dataclass of the GRPO-family loss; ``ISCorrection`` configures the
rollout (training/inference mismatch) correction weights; ``LossNormalizers`` carries the per-call global
counts. ``PolicyLossConfig.from_trl`` and ``PolicyLossConfig.from_verl`` build the exact presets of TRL 1.16
``GRPOConfig`` and of a verl 0.9.1 actor config (section 3.2).

Public through ``reasonrl.losses``. This module sits below both ``reasonrl.reference`` and ``reasonrl.losses``
(it imports neither): the reference loss reads it, and the public loss entry points import the reference.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from numbers import Integral, Real
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    import torch

__all__ = ["ISCorrection", "PolicyLossConfig", "LossNormalizers"]

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo", "reinforce")
CLIP_FAMILY = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")
IS_LEVELS = ("token", "sequence", "sequence_token")
CISPO_MODES = ("upper", "two_sided")
KL_ESTIMATORS = ("k1", "abs", "k2", "k3", "low_var_kl", "k1+", "abs+", "k3+", "low_var_kl+")
LOSS_AGG_MODES = (
    "token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm",
)
AGG_VERSIONS = ("0.9", "legacy")

# verl kl_loss_type -> kl_estimator (section 3.2). verl's "k3" is its clamped low_var_kl; "k2+" is plain k2.
_VERL_KL = {
    "kl": "k1", "k1": "k1", "mse": "k2", "k2": "k2", "abs": "abs",
    "k3": "low_var_kl", "low_var_kl": "low_var_kl",
    "kl+": "k1+", "k1+": "k1+", "mse+": "k2", "k2+": "k2", "abs+": "abs+",
    "k3+": "low_var_kl+", "low_var_kl+": "low_var_kl+",
}
_VERL_UNSUPPORTED_MODES = ("clip_cov", "kl_cov", "geo_mean", "dppo_tv", "dppo_kl", "dro", "bypass_mode")

# PolicyLossConfig.from_trl (section 3.2): the fields read from the TRL GRPOConfig attribute of the same name,
# the fields whose TRL attribute has another name, and the fields TRL's loss fixes (no GRPOConfig option).
_TRL_SAME_NAME = (
    "loss_type", "importance_sampling_level", "delta", "vespo_k_pos", "vespo_lambda_pos", "vespo_k_neg",
    "vespo_lambda_neg", "beta", "entropy_coef", "top_entropy_quantile", "off_policy_mask_threshold",
    "temperature", "max_completion_length",
)
_TRL_RENAMED = {
    "epsilon_low": "epsilon",
    "sapo_tau_pos": "sapo_temperature_pos",
    "sapo_tau_neg": "sapo_temperature_neg",
    "kl_bias_correction": "use_bias_correction_kl",
}
_TRL_FIXED: dict[str, Any] = dict(kl_estimator="k3", cispo_mode="upper", log_ratio_clamp=None,
                                  seq_log_ratio_max=None, dual_clip=False, loss_agg_mode=None)


def _choice(name: str, value: Any, options: tuple) -> None:
    if value not in options:
        raise ValueError(f"unknown {name}={value!r}; expected one of {', '.join(map(repr, options))}")


# ----------------------------------------------------------------------------------------------------------
# Numeric field validation (docs/losses.md sections 3 and 4): every numeric field is checked at construction,
# so that NaN (which passes every `x < 0` test) or an out-of-range value fails loudly, naming the field, the
# value and the allowed range, instead of giving a silently wrong loss.
# ----------------------------------------------------------------------------------------------------------

_FLT_TINY = 1.1754943508222875e-38  # smallest normal float32: 1 / temperature must be finite in fp32


def _real_value(owner: str, name: str, value: Any) -> float:
    """``value`` as a float: a real number (not a bool) or a one-element tensor / array holding one."""
    v = value
    one_element = callable(getattr(v, "numel", None)) and v.numel() == 1
    if not isinstance(v, Real) and hasattr(v, "item") and one_element:
        v = v.item()  # a 0-d tensor (host sync once, at construction)
    if isinstance(v, bool) or not isinstance(v, Real):
        raise TypeError(f"{owner}.{name} must be a real number, got {value!r} ({type(value).__name__})")
    return float(v)


def check_real(owner: str, name: str, value: Any, ok: Callable[[float], bool], allowed: str, *,
                optional: bool = False) -> None:
    """ValueError unless ``value`` is finite and ``ok(value)``; ``allowed`` describes the range. ``optional``:
    None is allowed (the feature is off)."""
    if value is None:
        if optional:
            return
        raise ValueError(f"{owner}.{name} must be {allowed}, got None")
    v = _real_value(owner, name, value)
    if not (math.isfinite(v) and ok(v)):
        none = " (or None)" if optional else ""
        raise ValueError(f"{owner}.{name} must be {allowed}{none}, got {value!r}")


def _check_int(owner: str, name: str, value: Any, minimum: int, *, optional: bool = False) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{owner}.{name} must be an int >= {minimum}, got {value!r} ({type(value).__name__})")
    if not isinstance(value, Integral) or value < minimum:
        none = " (or None)" if optional else ""
        raise ValueError(f"{owner}.{name} must be an int >= {minimum}{none}, got {value!r}")


@dataclass(frozen=True)
class ISCorrection:
    """Rollout-correction weights rho = pi_old / pi_sampler computed inside the loss (docs/losses.md 8.3).

    Attributes:
        level: ``"token"`` (one ratio per token) or ``"sequence"`` (the product of the token ratios).
        mode: ``"truncate"`` (rho <- clip(rho, c_min, c_max): TRL ``*_truncate``, verl TIS) or ``"mask"``
            (rho <- 0 outside [c_min, c_max]: TRL ``*_mask``, verl IcePop). A None bound is open.
        c_min, c_max: the bounds (TRL ``vllm_importance_sampling_clip_min`` / ``_clip_max``): None, or
            finite with 0 <= c_min < c_max and c_max > 0.
        log_clamp: clamp of the log-ratio before exponentiating (verl: 20.0; TRL: None): None or finite > 0.
        batch_normalize: divide by the mean weight (verl ``rollout_is_batch_normalize``).

    The defaults are TRL's (``sequence_mask``, C_max = 3.0, C_min = None).
    """

    level: Literal["token", "sequence"] = "sequence"
    mode: Literal["truncate", "mask"] = "mask"
    c_min: float | None = None
    c_max: float | None = 3.0
    log_clamp: float | None = None
    batch_normalize: bool = False

    def __post_init__(self) -> None:
        _choice("ISCorrection.level", self.level, ("token", "sequence"))
        _choice("ISCorrection.mode", self.mode, ("truncate", "mask"))
        # c_min = 0 is an open lower bound for truncate and masks only rho = 0 for mask (TRL accepts it).
        c = "ISCorrection"
        check_real(c, "c_min", self.c_min, lambda v: v >= 0, "a finite number >= 0", optional=True)
        check_real(c, "c_max", self.c_max, lambda v: v > 0, "a finite number > 0", optional=True)
        check_real(c, "log_clamp", self.log_clamp, lambda v: v > 0, "a finite number > 0", optional=True)
        # Both checks as TRL's GRPOConfig.__post_init__.
        if self.c_min is not None and self.c_max is not None and self.c_min >= self.c_max:
            raise ValueError(f"ISCorrection: c_min ({self.c_min}) must be less than c_max ({self.c_max})")
        if self.mode == "truncate" and self.c_min is None and self.c_max is None:
            raise ValueError("ISCorrection: at least one of c_min or c_max must be set when mode='truncate'")


@dataclass(frozen=True)
class PolicyLossConfig:
    """Hyper-parameters of the GRPO-family policy loss (docs/losses.md 3.1); defaults mirror TRL's GRPOConfig.

    Which trainer each option mirrors:

    * ``loss_type``: TRL ``loss_type`` (``grpo``, ``bnpo``, ``dr_grpo``, ``dapo``, ``cispo``, ``sapo``,
      ``luspo``, ``vespo``); ``reinforce`` is verl's ``gpg`` policy loss (-A * logprob).
    * ``importance_sampling_level``: TRL (``token``, ``sequence`` = GSPO); ``sequence_token`` is verl's
      ``gspo`` loss mode (GSPO-token, which TRL 1.16 does not have).
    * ``epsilon_low`` / ``epsilon_high``: TRL ``epsilon`` / ``epsilon_high``; verl ``clip_ratio_low`` /
      ``clip_ratio_high``. ``epsilon_high=None`` means ``epsilon_low`` (see :attr:`epsilon_high_value`).
    * ``delta``: TRL ``delta`` (INTELLECT-2 two-sided clip: caps the unclipped ratio branch).
    * ``dual_clip`` / ``dual_clip_c``: verl ``vanilla`` dual-clip PPO (always on there) and ``clip_ratio_c``.
    * ``log_ratio_clamp``: verl's +-20 clamp of logprobs - old_logprobs (``vanilla``, ``sapo``, ``cispo``).
    * ``seq_log_ratio_max``: verl ``gspo``'s upper clamp (10.0) of the sequence log-weight.
    * ``cispo_mode`` / ``cispo_ratio_max``: ``upper`` caps w at the absolute ``cispo_ratio_max`` (TRL, where
      the cap is ``epsilon_high``); ``two_sided`` clips w to [1 - eps_low, 1 + eps_high] (verl). The bare
      default 5.0 is ScaleRL's recommendation; ``from_trl`` reproduces TRL's effective cap.
    * ``sapo_tau_pos`` / ``sapo_tau_neg``: TRL ``sapo_temperature_*``; verl ``tau_pos`` / ``tau_neg``.
    * ``vespo_*``: TRL's VESPO gamma-weight parameters.
    * ``beta``: TRL ``beta``; verl ``kl_loss_coef`` when ``use_kl_loss``.
    * ``kl_estimator``: TRL uses ``k3`` only; verl ``kl_loss_type`` (``low_var_kl`` and the ``+``
      straight-through variants).
    * ``kl_bias_correction``: TRL ``use_bias_correction_kl`` (DeepSeek-V3.2); verl has none.
    * ``entropy_coef``: TRL ``entropy_coef``; verl ``entropy_coeff``.
    * ``top_entropy_quantile``: TRL (Beyond the 80/20 Rule).
    * ``off_policy_mask_threshold``: TRL (DeepSeek-V3.2 off-policy sequence masking).
    * ``is_correction``: TRL ``vllm_importance_sampling_*``; verl ``algorithm.rollout_correction``.
    * ``temperature``: TRL ``temperature``; verl rollout temperature (used by the fused entry points).
    * ``loss_agg_mode`` / ``agg_version``: verl ``loss_agg_mode`` with the 0.9.1 global-batch ``agg_loss``
      or the pre-0.9 per-micro-batch ``dp_actor`` formulas; None selects the TRL normalisation of
      ``loss_type``.
    * ``policy_agg_mode``: verl ``sapo``, which always aggregates its policy term with
      ``seq-mean-token-mean``.
    * ``max_completion_length``: TRL (L_max of ``dr_grpo``). ``loss_scale_factor``: verl.
    """

    loss_type: str = "dapo"
    importance_sampling_level: str = "token"
    epsilon_low: float = 0.2
    epsilon_high: float | None = None
    delta: float | None = None
    dual_clip: bool = False
    dual_clip_c: float = 3.0
    log_ratio_clamp: float | None = None
    seq_log_ratio_max: float | None = None
    cispo_mode: Literal["upper", "two_sided"] = "upper"
    cispo_ratio_max: float = 5.0
    sapo_tau_pos: float = 1.0
    sapo_tau_neg: float = 1.05
    vespo_k_pos: float = 2.0
    vespo_lambda_pos: float = 3.0
    vespo_k_neg: float = 3.0
    vespo_lambda_neg: float = 2.0
    beta: float = 0.0
    kl_estimator: str = "k3"
    kl_bias_correction: bool = True
    entropy_coef: float = 0.0
    top_entropy_quantile: float = 1.0
    off_policy_mask_threshold: float | None = None
    is_correction: ISCorrection | None = None
    temperature: float = 1.0
    loss_agg_mode: str | None = None
    policy_agg_mode: str | None = None
    agg_version: Literal["0.9", "legacy"] = "0.9"
    max_completion_length: int | None = 512
    loss_scale_factor: float | None = None

    def __post_init__(self) -> None:
        _choice("loss_type", self.loss_type, LOSS_TYPES)
        _choice("importance_sampling_level", self.importance_sampling_level, IS_LEVELS)
        _choice("cispo_mode", self.cispo_mode, CISPO_MODES)
        _choice("kl_estimator", self.kl_estimator, KL_ESTIMATORS)
        _choice("agg_version", self.agg_version, AGG_VERSIONS)
        for name in ("loss_agg_mode", "policy_agg_mode"):
            mode = getattr(self, name)
            if mode is not None:
                _choice(name, mode, LOSS_AGG_MODES)
                if mode == "token-sum" and self.agg_version == "legacy":
                    raise ValueError(f"{name}='token-sum' does not exist with agg_version='legacy' "
                                     "(docs/losses.md section 10.4)")
        if self.is_correction is not None and not isinstance(self.is_correction, ISCorrection):
            raise ValueError(f"is_correction must be an ISCorrection or None, got {type(self.is_correction)}")
        self._check_numbers()

        if self.delta is not None and self.dual_clip:
            raise ValueError(
                "delta and dual_clip=True are two caps of the same branch (TRL's two-sided clip and verl's "
                "dual clip); set only one of them"
            )
        upper = 1.0 + self.epsilon_high_value
        for name, value, active in (("delta", self.delta, self.delta is not None),
                                    ("dual_clip_c", self.dual_clip_c, self.dual_clip)):
            if active and value <= upper:
                warnings.warn(
                    f"{name}={value} <= 1 + epsilon_high = {upper}: it should exceed 1 + epsilon (TRL's "
                    "recommendation for delta); the cap then acts inside the clip range",
                    UserWarning,
                    stacklevel=3,
                )
        if self.loss_type == "dr_grpo" and self.max_completion_length is None:
            raise ValueError("loss_type='dr_grpo' normalises by max_completion_length, which is None")
        if self.policy_agg_mode is not None and self.loss_agg_mode is None:
            raise ValueError(
                "policy_agg_mode overrides loss_agg_mode for the policy term; set loss_agg_mode as well "
                "(policy_agg_mode without loss_agg_mode would mix TRL and verl normalisations)"
            )
        is_level = None if self.is_correction is None else self.is_correction.level
        if self.loss_type == "vespo" and is_level == "sequence":
            raise ValueError(
                "loss_type='vespo' folds token-level IS weights into its sequence weight; is_correction with "
                "level='sequence' is not supported (TRL rejects sequence_* modes for VESPO)"
            )

        # Warnings, as TRL's GRPOTrainer.__init__ logs them.
        level = self.importance_sampling_level
        if level == "sequence" and self.loss_type in ("bnpo", "dr_grpo", "dapo", "cispo"):
            warnings.warn(
                f"importance_sampling_level='sequence' with loss_type='{self.loss_type}' sums per-token "
                "contributions, which weights each sequence by its completion length instead of optimising "
                "the per-sequence objective; GSPO is reproduced with loss_type='grpo'",
                UserWarning,
                stacklevel=3,
            )
        if self.loss_type == "luspo" and self.importance_sampling_level != "sequence":
            warnings.warn(
                "loss_type='luspo' should use importance_sampling_level='sequence' to mirror the paper",
                UserWarning,
                stacklevel=3,
            )
        if self.loss_type == "vespo" and self.importance_sampling_level != "token":
            warnings.warn(
                "VESPO computes sequence-level importance weights internally; importance_sampling_level "
                "should be 'token'",
                UserWarning,
                stacklevel=3,
            )

    def _check_numbers(self) -> None:
        """Finiteness and the range each numeric field's meaning requires (docs/losses.md section 3.1).
        None keeps its documented meaning where the field is optional (the feature is off, or epsilon_high
        = epsilon_low); 0 keeps TRL's meaning where TRL gives it one (beta = 0: no KL term; entropy_coef = 0:
        no bonus; epsilon_low / epsilon_high = 0: no clip range on that side)."""
        c = "PolicyLossConfig"
        pos, nonneg = (lambda v: v > 0), (lambda v: v >= 0)
        check_real(c, "epsilon_low", self.epsilon_low, lambda v: 0 <= v < 1, "a finite number in [0, 1)")
        check_real(c, "epsilon_high", self.epsilon_high, nonneg, "a finite number >= 0", optional=True)
        check_real(c, "delta", self.delta, lambda v: v > 1, "a finite number > 1", optional=True)
        check_real(c, "dual_clip_c", self.dual_clip_c, lambda v: v > 1, "a finite number > 1")
        # A clamp c <= 0 of the log-ratio would clamp to the empty interval [-c, c] (a zero gradient).
        check_real(c, "log_ratio_clamp", self.log_ratio_clamp, pos, "a finite number > 0", optional=True)
        # The neutral log-weight is 0: an upper clamp <= 0 would clamp the on-policy weight (zero gradient).
        check_real(c, "seq_log_ratio_max", self.seq_log_ratio_max, pos, "a finite number > 0", optional=True)
        check_real(c, "cispo_ratio_max", self.cispo_ratio_max, pos, "a finite number > 0")
        check_real(c, "sapo_tau_pos", self.sapo_tau_pos, pos, "a finite number > 0")
        check_real(c, "sapo_tau_neg", self.sapo_tau_neg, pos, "a finite number > 0")
        # VESPO phi(W) = e^lam W^k e^(-lam W): k is a power (>= 0: down-weights W < 1, TRL's meaning), lam a
        # decay rate (>= 0; values below 1e-4 act as 1e-4, TRL's clamp).
        for name in ("vespo_k_pos", "vespo_k_neg", "vespo_lambda_pos", "vespo_lambda_neg"):
            check_real(c, name, getattr(self, name), nonneg, "a finite number >= 0")
        check_real(c, "beta", self.beta, nonneg, "a finite number >= 0 (0: no KL term)")
        check_real(c, "entropy_coef", self.entropy_coef, lambda v: True, "a finite number")
        check_real(c, "top_entropy_quantile", self.top_entropy_quantile, lambda v: 0 <= v <= 1,
                    "a finite number in [0, 1]")
        check_real(c, "off_policy_mask_threshold", self.off_policy_mask_threshold, nonneg,
                    "a finite number >= 0", optional=True)
        check_real(c, "temperature", self.temperature, lambda v: v >= _FLT_TINY,
                    f"a finite number >= {_FLT_TINY:.7g} (the smallest normal float32, so that "
                    "1 / temperature is finite)")
        _check_int(c, "max_completion_length", self.max_completion_length, 1, optional=True)
        check_real(c, "loss_scale_factor", self.loss_scale_factor, pos, "a finite number > 0", optional=True)

    @property
    def epsilon_high_value(self) -> float:
        """epsilon_high, or epsilon_low when it is None (the field itself keeps None, so that
        ``dataclasses.replace(cfg, epsilon_low=...)`` keeps a symmetric clip symmetric)."""
        return self.epsilon_low if self.epsilon_high is None else self.epsilon_high

    # ------------------------------------------------------------------------------------------------------
    # Presets (section 3.2)
    # ------------------------------------------------------------------------------------------------------

    @classmethod
    def from_trl(cls, grpo_config: Any) -> PolicyLossConfig:
        """The exact TRL 1.16 ``GRPOTrainer`` loss of ``grpo_config`` (a ``trl.GRPOConfig`` or any object
        with its attribute names)."""
        g = grpo_config
        epsilon_high = g.epsilon_high
        kwargs: dict[str, Any] = {}
        if g.loss_type == "cispo":
            # TRL caps w at epsilon_high, or at epsilon (0.2) when epsilon_high is unset: reproduced.
            kwargs["cispo_ratio_max"] = epsilon_high if epsilon_high is not None else g.epsilon
        is_correction = None
        # TRL applies the correction only when generating with vLLM (GRPOTrainer._compute_loss).
        if getattr(g, "use_vllm", False) and getattr(g, "vllm_importance_sampling_correction", False):
            level, _, mode = g.vllm_importance_sampling_mode.partition("_")
            c_max = g.vllm_importance_sampling_clip_max
            cap = getattr(g, "vllm_importance_sampling_cap", None)  # deprecated alias of _clip_max
            if cap is not None:
                c_max = cap
            is_correction = ISCorrection(level=level, mode=mode, c_min=g.vllm_importance_sampling_clip_min,
                                         c_max=c_max)
        return cls(
            **{field: getattr(g, field) for field in _TRL_SAME_NAME},
            **{field: getattr(g, trl_name) for field, trl_name in _TRL_RENAMED.items()},
            epsilon_high=epsilon_high,
            is_correction=is_correction,
            **_TRL_FIXED,
            **kwargs,
        )

    @classmethod
    def from_verl(cls, actor_config: Any, rollout_correction: Any = None) -> PolicyLossConfig:
        """The exact verl 0.9.1 actor loss (``workers/utils/losses.ppo_loss``) of ``actor_config``
        (``actor_rollout_ref.actor``: a verl ``ActorConfig``, an omegaconf ``DictConfig``, a mapping or a
        namespace with verl's field names) and of ``algorithm.rollout_correction`` (or None).

        Raises:
            NotImplementedError: for loss modes, KL types and rollout-correction features not in v1.
        """
        a = actor_config
        mode = _get(_get(a, "policy_loss", {}), "loss_mode", "vanilla")
        clip_ratio = _get(a, "clip_ratio", 0.2)
        low = _get(a, "clip_ratio_low", None)
        high = _get(a, "clip_ratio_high", None)
        kwargs: dict[str, Any] = {}
        if mode == "vanilla":
            kwargs.update(loss_type="dapo", dual_clip=True, dual_clip_c=_get(a, "clip_ratio_c", 3.0),
                          log_ratio_clamp=20.0)
        elif mode == "gspo":
            kwargs.update(loss_type="grpo", importance_sampling_level="sequence_token",
                          seq_log_ratio_max=10.0)
        elif mode == "sapo":
            kwargs.update(loss_type="sapo", log_ratio_clamp=20.0, policy_agg_mode="seq-mean-token-mean")
        elif mode == "cispo":
            kwargs.update(loss_type="cispo", cispo_mode="two_sided", log_ratio_clamp=20.0)
        elif mode == "gpg":
            kwargs.update(loss_type="reinforce")
        elif mode in _VERL_UNSUPPORTED_MODES:
            raise NotImplementedError(f"verl policy_loss.loss_mode={mode!r} is not supported by reasonrl v1")
        else:
            raise ValueError(f"unknown verl policy_loss.loss_mode={mode!r}")

        kl_type = _get(a, "kl_loss_type", "low_var_kl")
        if kl_type not in _VERL_KL:
            raise NotImplementedError(f"verl kl_loss_type={kl_type!r} is not supported by reasonrl v1")
        use_kl = bool(_get(a, "use_kl_loss", False))

        return cls(
            epsilon_low=low if low is not None else clip_ratio,
            epsilon_high=high if high is not None else clip_ratio,
            sapo_tau_pos=_get(a, "tau_pos", 1.0),
            sapo_tau_neg=_get(a, "tau_neg", 1.05),
            loss_agg_mode=_get(a, "loss_agg_mode", "token-mean"),
            loss_scale_factor=_get(a, "loss_scale_factor", None),
            entropy_coef=_get(a, "entropy_coeff", 0.0),
            beta=_get(a, "kl_loss_coef", 0.001) if use_kl else 0.0,
            kl_estimator=_VERL_KL[kl_type],
            kl_bias_correction=False,
            is_correction=_verl_is_correction(rollout_correction),
            **kwargs,
        )


def _get(obj: Any, key: str, default: Any) -> Any:
    """Field ``key`` of a mapping (dict, omegaconf DictConfig) or of an object (dataclass, namespace)."""
    if obj is None:
        return default
    if isinstance(obj, Mapping):
        return obj.get(key, default)
    return getattr(obj, key, default)


def _verl_is_correction(rc: Any) -> ISCorrection | None:
    """verl ``algorithm.rollout_correction`` -> ISCorrection (None when it or its ``rollout_is`` is None)."""
    if rc is None:
        return None
    if _get(rc, "rollout_rs", None) is not None:
        raise NotImplementedError("verl rollout_correction.rollout_rs (rejection-sampling masks) is not in "
                                  "reasonrl v1")
    if _get(rc, "bypass_mode", False):
        raise NotImplementedError("verl rollout_correction.bypass_mode is not supported by reasonrl v1")
    level = _get(rc, "rollout_is", "sequence")  # RolloutCorrectionConfig's dataclass default
    if level is None:
        return None
    threshold = _get(rc, "rollout_is_threshold", 2.0)
    # verl's _parse_rollout_is_threshold: a float (or float string) is TIS with an upper bound only; a
    # "lower_upper" string is IcePop.
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float, str)):
        raise TypeError(f"rollout_is_threshold must be a float or a string, got {threshold!r}")
    spec = threshold.strip() if isinstance(threshold, str) else threshold
    if isinstance(spec, str) and "_" in spec:
        lower, upper = (float(x) for x in spec.split("_", 1))
        mode, c_min, c_max = "mask", lower, upper
    else:
        mode, c_min, c_max = "truncate", None, float(spec)
    if not (math.isfinite(c_max) and c_max > 0) or (c_min is not None and not c_min > 0):
        raise ValueError(f"rollout_is_threshold bounds must be positive, got {threshold!r}")
    return ISCorrection(level=level, mode=mode, c_min=c_min, c_max=c_max, log_clamp=20.0,
                        batch_normalize=bool(_get(rc, "rollout_is_batch_normalize", False)))


@dataclass(frozen=True)
class LossNormalizers:
    """Per-call normalisers of docs/losses.md section 4: values that change every step, never inferred with a
    collective. A missing global count falls back to the local count when ``num_processes == 1`` (what TRL
    and verl do in a single process) and raises ``ValueError`` when ``num_processes > 1``.

    Attributes:
        num_items_in_batch: N_glob, active loss tokens of one normalisation window over all ranks (a Python
            number or a 0-d device tensor, which avoids a host sync). TRL preset:
            ``num_items_in_batch * GA / steps_per_generation`` in training, ``num_items_in_batch`` in eval;
            verl: ``batch_num_tokens``. A Python number must be finite and > 0 (it may be fractional: TRL's
            rescaled count). A tensor is used as TRL uses its gathered count, clamped to >= 1, so a count of 0
            (a window with no loss tokens on any rank) gives a zero loss; its value is only checked (finite,
            >= 0) when it lives on the CPU, because checking a device tensor would be a host sync.
        global_num_seqs: S_glob, verl ``global_batch_size`` (``ppo_mini_batch_size * rollout.n``); the same
            rules as ``num_items_in_batch``.
        grad_accum_steps: GA, TRL ``current_gradient_accumulation_steps``: an int >= 1.
        num_processes: P, TRL ``num_processes`` / verl ``dp_size``: an int >= 1.
        training: False forces GA = 1 (TRL eval).
        padded_length: T_pad of ``seq-mean-token-sum-norm`` without ``loss_scale_factor`` (an int >= 1); None:
            T of the padded layout, the longest segment of the packed layout.
    """

    num_items_in_batch: float | torch.Tensor | None = None
    global_num_seqs: float | torch.Tensor | None = None
    grad_accum_steps: int = 1
    num_processes: int = 1
    training: bool = True
    padded_length: int | None = None

    def __post_init__(self) -> None:
        c = "LossNormalizers"
        for name in ("num_items_in_batch", "global_num_seqs"):
            value = getattr(self, name)
            if value is None:
                continue
            if hasattr(value, "device") and hasattr(value, "numel"):  # a tensor: TRL's device count
                if value.numel() != 1 or value.is_complex() or str(value.dtype) == "torch.bool":
                    raise ValueError(f"{c}.{name} must be a real number or a one-element real tensor, got a "
                                     f"tensor of shape {tuple(value.shape)} and dtype {value.dtype}")
                if value.device.type == "cpu":  # checkable without a device sync
                    check_real(c, name, value, lambda v: v >= 0,
                                "finite and >= 0 (a tensor count of 0 is an empty window, clamped to 1 as "
                                "TRL does)")
                continue
            check_real(c, name, value, lambda v: v > 0,
                        "a finite number > 0 (None: the local count; TRL's empty-window count 0 is "
                        "accepted as a 0-d tensor, not as a Python number)")
        _check_int(c, "grad_accum_steps", self.grad_accum_steps, 1)
        _check_int(c, "num_processes", self.num_processes, 1)
        _check_int(c, "padded_length", self.padded_length, 1, optional=True)

    @property
    def effective_grad_accum_steps(self) -> int:
        """GA in training, 1 in eval."""
        return self.grad_accum_steps if self.training else 1
