"""Every numeric field of the loss configuration dataclasses is validated at construction (issue 10).

NaN passes every ``x < 0`` test, so before these checks ``PolicyLossConfig(delta=nan)`` gave a zero loss and
gradient, ``epsilon_high=nan`` a NaN loss, ``max_completion_length=-5`` a loss of the wrong sign and
``LossNormalizers(num_items_in_batch=0)`` a loss 6x too large, all silently. Each field is checked here
against the range its meaning requires (docs/losses.md sections 3.1 and 4): a property test draws arbitrary
floats (NaN and +-inf included) and asserts that construction succeeds exactly when the value is in the
documented range, and a ``ValueError`` names the field, the value and the range otherwise.
"""

from __future__ import annotations

import math
import re
import warnings

import pytest
import torch
from _hypothesis_settings import SETTINGS
from hypothesis import given, settings
from hypothesis import strategies as st

from reasonrl.losses import (
    AdaptiveEntropyController,
    ISCorrection,
    LossNormalizers,
    PolicyLossConfig,
    policy_loss,
)

NAN, INF = math.nan, math.inf
FLT_TINY = 1.1754943508222875e-38

# field -> (the allowed range as a predicate on a finite float, None allowed?)
_POLICY_REAL = {
    "epsilon_low": (lambda v: 0 <= v < 1, False),
    "epsilon_high": (lambda v: v >= 0, True),
    "delta": (lambda v: v > 1, True),
    "dual_clip_c": (lambda v: v > 1, False),
    "log_ratio_clamp": (lambda v: v > 0, True),
    "seq_log_ratio_max": (lambda v: v > 0, True),
    "cispo_ratio_max": (lambda v: v > 0, False),
    "sapo_tau_pos": (lambda v: v > 0, False),
    "sapo_tau_neg": (lambda v: v > 0, False),
    "vespo_k_pos": (lambda v: v >= 0, False),
    "vespo_k_neg": (lambda v: v >= 0, False),
    "vespo_lambda_pos": (lambda v: v >= 0, False),
    "vespo_lambda_neg": (lambda v: v >= 0, False),
    "beta": (lambda v: v >= 0, False),
    "entropy_coef": (lambda v: True, False),
    "top_entropy_quantile": (lambda v: 0 <= v <= 1, False),
    "off_policy_mask_threshold": (lambda v: v >= 0, True),
    "temperature": (lambda v: v >= FLT_TINY, False),
    "loss_scale_factor": (lambda v: v > 0, True),
}
_IS_REAL = {
    "c_min": (lambda v: 0 <= v < 3.0, True),  # with the default c_max = 3.0 (c_min < c_max)
    "c_max": (lambda v: v > 0, True),
    "log_clamp": (lambda v: v > 0, True),
}
_CONTROLLER_REAL = {
    "initial_coef": lambda v: True,
    "target": lambda v: True,
    "delta": lambda v: v >= 0,
    "coef_min": lambda v: v <= 1.0,  # with the default coef_max = 1.0
    "coef_max": lambda v: v >= 0.0,  # with the default coef_min = 0.0
}

# Arbitrary floats, with the special values and the boundaries of the ranges above drawn often.
_SPECIAL = [NAN, INF, -INF, 0.0, -0.0, 1.0, -1.0, 0.5, 1.5, 3.0, 1e-40, FLT_TINY, 1e300, -1e-300]
FLOATS = st.one_of(st.sampled_from(_SPECIAL), st.floats(allow_nan=True, allow_infinity=True),
                   st.floats(-5, 5))


def _constructs(factory, **kwargs) -> bool:
    """True if the object builds; False on a ValueError that names the field and the value."""
    (name, value), = kwargs.items()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the "delta <= 1 + epsilon" advice, TRL's level warnings
            factory(**kwargs)
    except ValueError as exc:
        msg = str(exc)
        assert name in msg, f"the error does not name the field {name!r}: {msg}"
        assert repr(value) in msg or str(value) in msg, f"the error does not show the value {value!r}: {msg}"
        assert "must be" in msg, f"the error does not state the allowed range: {msg}"
        return False
    return True


# (the dataclass, the field, its range) for every real field of PolicyLossConfig and ISCorrection.
_REAL_FIELDS = [
    pytest.param(factory, field, table[field][0], id=f"{factory.__name__}.{field}")
    for factory, table in ((PolicyLossConfig, _POLICY_REAL), (ISCorrection, _IS_REAL))
    for field in sorted(table)
]


@pytest.mark.parametrize("factory,field,ok", _REAL_FIELDS)
@settings(max_examples=60, **SETTINGS)
@given(value=FLOATS)
def test_real_fields(factory, field, ok, value):
    expected = math.isfinite(value) and ok(value)
    if factory is ISCorrection and field == "c_min" and math.isfinite(value) and value >= 3.0:
        # Rejected by the c_min < c_max rule (a ValueError naming both), not by the range check.
        with pytest.raises(ValueError, match="(?s)(?=.*c_min)(?=.*c_max)"):
            ISCorrection(c_min=value)
        return
    assert _constructs(factory, **{field: value}) == expected, (field, value)


@pytest.mark.parametrize("field", sorted(_CONTROLLER_REAL))
@settings(max_examples=40, **SETTINGS)
@given(value=FLOATS)
def test_adaptive_entropy_controller_fields(field, value):
    kwargs = {"initial_coef": 0.0, field: value}
    expected = math.isfinite(value) and _CONTROLLER_REAL[field](value)
    try:
        AdaptiveEntropyController(**kwargs)
        built = True
    except ValueError as exc:
        assert field in str(exc), str(exc)
        built = False
    assert built == expected, (field, value)


@pytest.mark.parametrize("field", ["num_items_in_batch", "global_num_seqs"])
@settings(max_examples=80, **SETTINGS)
@given(value=FLOATS)
def test_normalizer_counts(field, value):
    """A Python count must be finite and > 0; a CPU tensor finite and >= 0 (0 = TRL's empty window)."""
    assert _constructs(LossNormalizers, **{field: value}) == (math.isfinite(value) and value > 0), value
    as_tensor = torch.tensor(value, dtype=torch.float64)
    try:
        LossNormalizers(**{field: as_tensor})
        built = True
    except ValueError as exc:
        assert field in str(exc)
        built = False
    assert built == (math.isfinite(value) and value >= 0), value


@pytest.mark.parametrize("field,minimum,optional", [
    ("grad_accum_steps", 1, False), ("num_processes", 1, False), ("padded_length", 1, True),
])
@settings(max_examples=40, **SETTINGS)
@given(value=st.one_of(st.integers(-10, 10), st.sampled_from([2**40, -(2**40)])))
def test_normalizer_integer_fields(field, minimum, optional, value):
    assert _constructs(LossNormalizers, **{field: value}) == (value >= minimum), value


@settings(max_examples=40, **SETTINGS)
@given(value=st.one_of(st.integers(-10, 10), st.sampled_from([2**40, -(2**40)])))
def test_max_completion_length(value):
    assert _constructs(PolicyLossConfig, max_completion_length=value) == (value >= 1), value


@pytest.mark.parametrize("factory,field,value", [
    (PolicyLossConfig, "max_completion_length", 3.0),
    (PolicyLossConfig, "max_completion_length", NAN),
    (LossNormalizers, "grad_accum_steps", NAN),
    (LossNormalizers, "grad_accum_steps", 2.5),
    (LossNormalizers, "padded_length", 0.5),
])
def test_integer_fields_reject_floats(factory, field, value):
    with pytest.raises(ValueError, match=re.escape(f"{field} must be an int >= 1")):
        factory(**{field: value})


@pytest.mark.parametrize("factory,field,value", [
    (PolicyLossConfig, "beta", True),
    (PolicyLossConfig, "epsilon_low", "0.2"),
    (PolicyLossConfig, "max_completion_length", True),
    (LossNormalizers, "num_items_in_batch", "17"),
    (LossNormalizers, "grad_accum_steps", False),
])
def test_non_numbers_are_type_errors(factory, field, value):
    with pytest.raises(TypeError, match=field):
        factory(**{field: value})


def test_none_and_zero_keep_their_documented_meanings():
    """None: the feature is off (or epsilon_high = epsilon_low); 0: TRL's meaning where TRL gives one."""
    cfg = PolicyLossConfig(epsilon_high=None, delta=None, log_ratio_clamp=None, seq_log_ratio_max=None,
                           off_policy_mask_threshold=None, loss_scale_factor=None, max_completion_length=None,
                           beta=0.0, entropy_coef=0.0, epsilon_low=0.0, top_entropy_quantile=0.0)
    assert cfg.epsilon_high_value == 0.0
    assert PolicyLossConfig(epsilon_low=0.3).epsilon_high_value == 0.3
    ISCorrection(mode="mask", c_min=0.0, c_max=None)
    LossNormalizers(num_items_in_batch=torch.tensor(0.0), global_num_seqs=torch.tensor(0))
    LossNormalizers(num_items_in_batch=12.5)  # TRL's rescaled count may be fractional
    # A 0-d tensor value (as the tests of the clip boundaries pass) is checked like a float.
    PolicyLossConfig(delta=torch.tensor(2.5, dtype=torch.float64))
    with pytest.raises(ValueError, match="delta"):
        PolicyLossConfig(delta=torch.tensor(NAN))


def test_trainer_presets_still_build(tmp_path):
    """The TRL and verl presets pass their own defaults through the new checks."""
    trl = pytest.importorskip("trl")
    for loss_type in ("grpo", "dapo", "dr_grpo", "cispo", "sapo", "bnpo"):
        g = trl.GRPOConfig(output_dir=str(tmp_path), report_to=[], bf16=False, use_cpu=True,
                           loss_type=loss_type)
        PolicyLossConfig.from_trl(g)
    for mode in ("vanilla", "gspo", "sapo", "cispo", "gpg"):
        PolicyLossConfig.from_verl({"policy_loss": {"loss_mode": mode}, "clip_ratio_c": 3.0})


# ----------------------------------------------------------------------------------------------------------
# The reproducers of issue 10
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("field,value", [
    ("delta", NAN),  # gave loss 0 and gradient 0
    ("epsilon_high", NAN),  # NaN loss; cpp gradient finite, reference gradient 0
    ("cispo_ratio_max", NAN),
    ("sapo_tau_pos", NAN),
    ("dual_clip_c", NAN),  # silently disabled the dual clip
    ("max_completion_length", 0),  # NaN loss
    ("loss_scale_factor", 0),  # NaN loss
    ("max_completion_length", -5),  # flipped the sign of the loss
    ("log_ratio_clamp", -1),  # zero gradient
    ("beta", NAN),  # misleading "ref_logprobs are required"
])
def test_reproducer_policy_config(field, value):
    expected = rf"PolicyLossConfig\.{field} must be .*, got {re.escape(repr(value))}"
    with pytest.raises(ValueError, match=expected):
        PolicyLossConfig(**{field: value})


@pytest.mark.parametrize("field,value", [
    ("num_items_in_batch", 0), ("num_items_in_batch", -5), ("global_num_seqs", 0), ("global_num_seqs", -3),
])
def test_reproducer_normalizers(field, value):
    """These were silently treated as 1 (loss 7.30 instead of 1.22)."""
    expected = rf"LossNormalizers\.{field} must be a finite number > 0.*got {value}"
    with pytest.raises(ValueError, match=expected):
        LossNormalizers(**{field: value})


def test_reproducer_normalizer_changes_the_loss_only_through_its_value():
    """The valid count gives the token mean; the rejected 0 used to give the plain sum."""
    lp = torch.tensor([[-1.0, -2.0, -0.5]], dtype=torch.float64)
    adv = torch.tensor([1.0], dtype=torch.float64)
    mask = torch.ones(1, 3, dtype=torch.bool)
    cfg = PolicyLossConfig(loss_type="dapo")
    mean = policy_loss(lp, advantages=adv, mask=mask, normalizers=LossNormalizers(num_items_in_batch=3),
                       config=cfg).loss
    total = policy_loss(lp, advantages=adv, mask=mask, normalizers=LossNormalizers(num_items_in_batch=1),
                        config=cfg).loss
    assert torch.allclose(mean * 3, total)
