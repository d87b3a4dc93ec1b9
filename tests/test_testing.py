"""The acceptance rule itself (reasonrl/testing.py) must be able to fail: a tolerance helper that accepts
everything would make every accuracy test in the suite a tautology."""

from __future__ import annotations

import importlib
import math

import pytest
import torch
from _token_logprobs_checks import check_token_logprobs

from reasonrl.reference.token_logprobs import TokenLogprobs
from reasonrl.testing import (
    assert_close_to_oracle,
    assert_grad_row_sums,
    make_logits,
    make_token_logprobs_inputs,
    sample_labels,
    ulp,
)

tl_mod = importlib.import_module("reasonrl.ops.token_logprobs")


@pytest.mark.parametrize(
    "dtype,value,expected",
    [
        (torch.bfloat16, 1.0, 2.0**-7),
        (torch.float16, 1.0, 2.0**-10),
        (torch.float32, 1.0, 2.0**-23),
        (torch.bfloat16, 0.75, 2.0**-8),
        (torch.float16, 0.0, 2.0**-24),  # subnormal spacing
        (torch.float16, -3.0, 2.0**-9),
    ],
)
def test_ulp(dtype, value, expected):
    assert float(ulp(torch.tensor([value]), dtype)[0]) == expected


def test_rule_accepts_within_and_rejects_beyond_the_bound():
    oracle = torch.tensor([-1.0, -2.0, -3.0], dtype=torch.float64)
    ref = oracle + torch.tensor([1e-6, 0.0, 0.0], dtype=torch.float64)
    atol = 1e-5 * (1 + 3.0)
    inside = oracle + (2e-6 + 0.9 * atol)
    assert_close_to_oracle(inside, oracle, ref, atol_scale=1e-5, name="lp")
    outside = oracle.clone()
    outside[1] += 2e-6 + 1.1 * atol
    with pytest.raises(AssertionError, match=r"^lp: err = .*rows checked = 3"):
        assert_close_to_oracle(outside, oracle, ref, atol_scale=1e-5, name="lp")
    # The same error on a row that is not valid is ignored.
    assert_close_to_oracle(
        outside, oracle, ref, atol_scale=1e-5, name="lp", valid=torch.tensor([1, 0, 1]).bool()
    )


def test_rule_ulp_allowance_is_per_element():
    oracle = torch.tensor([1.0, 1e-3], dtype=torch.float64)
    one_ulp = ulp(oracle, torch.bfloat16)
    assert_close_to_oracle(oracle + one_ulp, oracle, None, atol_scale=0.0, name="g", ulp_dtype=torch.bfloat16)
    # One ulp of the large element is far more than one ulp of the small one.
    with pytest.raises(AssertionError, match="ulp"):
        assert_close_to_oracle(
            oracle + one_ulp[0], oracle, None, atol_scale=0.0, name="g", ulp_dtype=torch.bfloat16
        )


def test_rule_non_finite_values_must_match():
    oracle = torch.tensor([-math.inf, math.nan, -1.0], dtype=torch.float64)
    assert_close_to_oracle(oracle.clone(), oracle, None, atol_scale=1e-5, name="lp")
    with pytest.raises(AssertionError, match="non-finite"):
        assert_close_to_oracle(
            torch.tensor([-1e30, math.nan, -1.0]), oracle, None, atol_scale=1e-5, name="lp"
        )
    with pytest.raises(AssertionError, match="non-finite"):
        assert_close_to_oracle(
            torch.tensor([-math.inf, math.nan, math.nan]), oracle, None, atol_scale=1, name="lp"
        )


def test_row_sum_check():
    g = torch.zeros(2, 5)
    g[0, 0], g[0, 1] = 1.0, -1.0  # sums to 0
    assert_grad_row_sums(g, 1.0, g_lp=torch.ones(2), g_h=None, name="g")
    g[1, 0] = 1e-3
    with pytest.raises(AssertionError, match="flattened row 1"):
        assert_grad_row_sums(g, 1.0, g_lp=torch.ones(2), g_h=None, name="g")


def test_inputs_are_realistic():
    gen = torch.Generator().manual_seed(0)
    x = make_logits(64, 1000, generator=gen).double()
    logp = torch.log_softmax(x, -1)
    h = -(logp.exp() * logp).sum(-1)
    assert bool((h > 0.95).all() and (h < 3.05).all()), (h.min(), h.max())
    y = sample_labels(x, ignore_frac=0.2, generator=gen)
    valid = y != -100
    assert 0 < int((~valid).sum()) < 64
    # Sampled labels are likely tokens: their mean log-prob is about -H, far above a uniform pick (-6.9).
    assert float(logp[valid].gather(-1, y[valid, None]).mean()) > -4.0
    assert make_logits(3, 1).shape == (3, 1)


def _perturbed(field, delta):
    real = tl_mod.token_logprobs

    def fake(*args, **kwargs):
        out = real(*args, **kwargs)
        return out._replace(**{field: getattr(out, field) + delta})

    return fake


@pytest.mark.parametrize(
    "field,delta,match",
    [
        ("entropy", 1e-3, "entropy"),
        ("logprobs", 1e-3, "logprobs"),
        ("rank", 1, "rank"),
        ("lse", -1e-3, "lse"),
    ],
)
def test_check_token_logprobs_detects_a_wrong_implementation(monkeypatch, field, delta, match):
    case = make_token_logprobs_inputs(8, 100, seed=0)
    check_token_logprobs(case, "reference")  # the real thing passes
    monkeypatch.setattr(tl_mod, "token_logprobs", _perturbed(field, delta))
    with pytest.raises(AssertionError, match=match):
        check_token_logprobs(case, "reference")


def test_check_token_logprobs_detects_a_wrong_gradient(monkeypatch):
    case = make_token_logprobs_inputs(8, 100, seed=0)
    real = tl_mod.token_logprobs

    def scaled_grad(logits, *args, **kwargs):
        # Doubles the gradient reaching the logits without changing the forward values.
        x = logits * 2 - logits.detach()
        return real(x, *args, **kwargs)

    monkeypatch.setattr(tl_mod, "token_logprobs", scaled_grad)
    with pytest.raises(AssertionError, match="grad_logits"):
        check_token_logprobs(case, "reference")
    assert isinstance(real(case.logits, case.labels), TokenLogprobs)
