"""``r3_reward`` (docs/ops.md section 5): every implementation (cpp, Triton under the interpreter, reference)
against the float64 reference, the oracle.

float64 input (cpp, reference) must agree to 1e-12; fp32 / bf16 input follows the tolerance rule of
reasonrl/testing.py (err <= 2 x err(fp32 reference) + 1e-5 (1 + max |oracle|)). The ragged inputs come from
the reference's tests (``ragged_case``: reference lengths 5, 1, 3 with holes, 3 / 1 / 4 valid rollouts, so
one prompt has sigma = 0; NaN at every entry that must not be read) plus random cases wide enough to cross the
Triton kernel's column block (32). The interpreter is slow: Triton covers every weighting and reduction, with
and without baseline / propagation, on a chosen subset of the product, not the whole of it.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

from reasonrl import _backend as backend
from reasonrl.ops.r3_reward import r3_reward
from reasonrl.reference.r3_reward import r3_reward_reference
from reasonrl.rewards import functional
from reasonrl.testing import assert_stat_close

# The reference tests' input builders, under the module name pytest gives them (rootdir-relative sys.path
# insertion, no package): imported once whichever file is collected first.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "rewards"))
from _impls import cpp_available, needs_cpp, needs_triton, triton_available  # noqa: E402
from test_r3_reward_reference import _to_packed, ragged_case  # noqa: E402

WEIGHTINGS = ("linear", "softmax", "topk", "uniform")
REDUCTIONS = ("weighted_mean", "sum")




def random_case(seed: int, g: int = 4, k: int = 5, width: int = 45):
    """Random ragged padded case: reference lengths 1..width (holes anywhere), 0..k valid rollouts per prompt
    with at least one prompt of a single valid rollout; NaN at every entry that is not read."""
    gen = torch.Generator().manual_seed(seed)
    lp = -torch.rand((g, k, width), generator=gen, dtype=torch.float64) * 4.0
    mask = torch.rand((g, width), generator=gen) < 0.7
    mask[:, 0] |= ~mask.any(dim=1)  # every prompt has a reference token
    roll = torch.rand((g, k), generator=gen) < 0.75
    roll[0] = False
    roll[0, 1] = True  # one valid rollout: sigma = 0, uniform weights
    roll[1, :2] = True
    base = -torch.rand((g, width), generator=gen, dtype=torch.float64)
    lp[~(roll[:, :, None] & mask[:, None, :])] = math.nan
    base[~mask] = math.nan
    return lp, mask, roll, base


def _check(out, oracle, ref32=None, *, dtype, name):
    """``out`` against the float64 ``oracle``: 1e-12 for float64, the tolerance rule otherwise."""
    assert torch.equal(out.num_valid_rollouts, oracle.num_valid_rollouts), name
    assert out.num_valid_rollouts.dtype == torch.int32
    for field in ("reward", "weights", "sigma"):
        a, o = getattr(out, field), getattr(oracle, field)
        assert a.shape == o.shape, (name, field)
        if dtype == torch.float64:
            assert a.dtype == torch.float64
            torch.testing.assert_close(a, o, rtol=1e-12, atol=1e-12, equal_nan=True, msg=f"{name} {field}")
        else:
            assert a.dtype == torch.float32
            assert_stat_close(a.double(), o, getattr(ref32, field).double(), dtype=dtype,
                              name=f"{name} {field}")


def _run_both_layouts(impl, dtype, lp, mask, roll, base, **kw):
    """Padded and packed layouts of one case through ``impl`` against the reference (fp64 oracle)."""
    b = kw.pop("with_baseline", False)
    oracle = r3_reward_reference(lp, ref_mask=mask, rollout_mask=roll, baseline_logprobs=base if b else None,
                                 **kw)
    ref32 = r3_reward_reference(lp.to(dtype), ref_mask=mask, rollout_mask=roll,
                                baseline_logprobs=base.to(dtype) if b else None, **kw)
    out = r3_reward(lp.to(dtype), ref_mask=mask, rollout_mask=roll,
                    baseline_logprobs=base.to(dtype) if b else None, impl=impl, **kw)
    _check(out, oracle, ref32, dtype=dtype, name=f"{impl} {dtype} padded {kw}")
    plp, cu, pbase = _to_packed(lp, mask, base)
    oracle = r3_reward_reference(plp, ref_cu_seqlens=cu, rollout_mask=roll,
                                 baseline_logprobs=pbase if b else None, **kw)
    ref32 = r3_reward_reference(plp.to(dtype), ref_cu_seqlens=cu, rollout_mask=roll,
                                baseline_logprobs=pbase.to(dtype) if b else None, **kw)
    out = r3_reward(plp.to(dtype), ref_cu_seqlens=cu, rollout_mask=roll,
                    baseline_logprobs=pbase.to(dtype) if b else None, impl=impl, **kw)
    _check(out, oracle, ref32, dtype=dtype, name=f"{impl} {dtype} packed {kw}")


# ----------------------------------------------------------------------------------------------------------
# cpp: the full product of the options, float64 (1e-12) and float32 (tolerance rule)
# ----------------------------------------------------------------------------------------------------------


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("gamma", [None, 0.0, 0.7])
@pytest.mark.parametrize("with_baseline", [False, True])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("weighting", WEIGHTINGS)
def test_cpp_matches_reference_ragged(weighting, reduction, with_baseline, gamma, dtype):
    lp, mask, roll, base, _, _ = ragged_case(seed=3, dtype=torch.float64)
    _run_both_layouts("cpp", dtype, lp, mask, roll, base, weighting=weighting, reduction=reduction,
                      with_baseline=with_baseline, propagation_gamma=gamma, topk=0.4, softmax_tau=0.3)


@needs_cpp
@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("weighting", WEIGHTINGS)
def test_cpp_matches_reference_random(weighting, seed):
    lp, mask, roll, base = random_case(seed, g=6, k=7, width=70)
    topk = [0.1, 0.25, 3, 1.0][seed]
    _run_both_layouts("cpp", torch.float64, lp, mask, roll, base, weighting=weighting, topk=topk,
                      with_baseline=seed % 2 == 1, propagation_gamma=[None, 0.3, 1.5, None][seed],
                      reduction=REDUCTIONS[seed % 2], min_valid_rollouts=1 + seed % 3)


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cpp_16bit_input(dtype):
    lp, mask, roll, base = random_case(5)
    lp16 = lp.to(dtype)  # the oracle runs on the same (rounded) values
    _run_both_layouts("cpp", dtype, lp16.double(), mask, roll, base, weighting="softmax",
                      propagation_gamma=0.5, with_baseline=True)


@needs_cpp
def test_cpp_strided_input():
    lp, mask, roll, base = random_case(6)
    strided = lp.transpose(1, 2).contiguous().transpose(1, 2)  # [G, K, L] with stride 1 on K
    ref = r3_reward_reference(lp, ref_mask=mask, rollout_mask=roll, weighting="topk", propagation_gamma=0.2)
    out = r3_reward(strided, ref_mask=mask, rollout_mask=roll, weighting="topk", propagation_gamma=0.2,
                    impl="cpp")
    _check(out, ref, dtype=torch.float64, name="cpp strided")


@needs_cpp
def test_cpp_ties_nan_and_no_valid_rollout():
    # Column sigmas tie (ties to the lower index), one prompt has no valid rollout (NaN rewards, sigma 0),
    # min_valid_rollouts above the count zeroes sigma (uniform weights).
    lp = torch.tensor([[[0.0, -1.0, 0.0, -1.0], [-1.0, 0.0, -1.0, 0.0]],
                       [[-0.5, -0.2, -0.3, -0.1], [-0.4, -0.6, -0.3, -0.9]]], dtype=torch.float64)
    roll = torch.tensor([[True, True], [False, False]])
    for w in WEIGHTINGS:
        for mvr in (1, 2, 3):
            for topk in (1, 2, 0.5, 0.1):
                kw = dict(rollout_mask=roll, weighting=w, min_valid_rollouts=mvr, topk=topk,
                          propagation_gamma=0.4)
                _check(r3_reward(lp, impl="cpp", **kw), r3_reward_reference(lp, **kw), dtype=torch.float64,
                       name=f"ties {w} {mvr} {topk}")
    # NaN at a valid position propagates as in the reference (sigma, weights and rewards).
    bad = lp.clone()
    bad[0, 0, 1] = math.nan
    for w in WEIGHTINGS:
        kw = dict(weighting=w, propagation_gamma=0.4, topk=2)
        _check(r3_reward(bad, impl="cpp", **kw), r3_reward_reference(bad, **kw), dtype=torch.float64,
               name=f"nan {w}")


@needs_cpp
def test_cpp_validate_false_empty_reference_gives_nan():
    lp = torch.randn(2, 3, 4, dtype=torch.float64)
    mask = torch.ones(2, 4, dtype=torch.bool)
    mask[1] = False
    kw = dict(ref_mask=mask, validate=False)
    _check(r3_reward(lp, impl="cpp", **kw), r3_reward_reference(lp, **kw), dtype=torch.float64, name="empty")
    assert bool(torch.isnan(r3_reward(lp, impl="cpp", **kw).reward[1]).all())


@needs_cpp
def test_cpp_empty_batch():
    out = r3_reward(torch.zeros(0, 4, 3), impl="cpp")
    assert out.reward.shape == (0, 4) and out.weights.shape == (0, 3)
    out = r3_reward(torch.zeros(4, 0), ref_cu_seqlens=torch.tensor([0]), impl="cpp")
    assert out.reward.shape == (0, 4) and out.weights.shape == (0,)


@needs_cpp
def test_cpp_opcheck():
    (op,) = backend.registered_ops("r3_reward", "cpp")
    lp, mask, roll, base = random_case(7, g=3, k=4, width=9)
    lp = torch.nan_to_num(lp, nan=-1.0)
    roll = torch.ones_like(roll)  # opcheck compares outputs without equal_nan: no NaN rewards here
    k_g = torch.tensor([2, 1, 3])
    torch.library.opcheck(op, (lp, mask, None, roll, torch.nan_to_num(base), k_g, 2, 1.0, 1, 0.5, 2))
    plp, cu, pbase = _to_packed(lp, mask, torch.nan_to_num(base))
    torch.library.opcheck(op, (plp.float(), None, cu.long(), roll, pbase.float(), k_g, 1, 0.5, 0, None, 1))


@needs_cpp
def test_cpp_kernel_checks_memory_safety():
    """The C++ op itself refuses what would read out of bounds, naming the argument (validate=False paths)."""
    op = torch.ops.reasonrl.r3_reward_fwd.default
    lp = torch.zeros(2, 5)
    roll = torch.ones(2, 2, dtype=torch.bool)
    k_g = torch.ones(2, dtype=torch.int64)
    with pytest.raises(RuntimeError, match="ref_cu_seqlens"):
        op(lp, None, torch.tensor([0, 3, 9]), roll, None, k_g, 0, 1.0, 0, None, 2)
    with pytest.raises(RuntimeError, match="ref_cu_seqlens"):
        op(lp, None, torch.tensor([0, 4, 2, 5]), torch.ones(3, 2, dtype=torch.bool), None,
           torch.ones(3, dtype=torch.int64), 0, 1.0, 0, None, 2)
    with pytest.raises(RuntimeError, match="rollout_mask"):
        op(lp, None, torch.tensor([0, 5]), roll, None, k_g[:1], 0, 1.0, 0, None, 2)
    with pytest.raises(RuntimeError, match="ref_mask"):
        op(torch.zeros(2, 2, 5), torch.ones(2, 4, dtype=torch.bool), None, roll, None, k_g, 0, 1.0, 0, None,
           2)
    with pytest.raises(RuntimeError, match="baseline"):
        op(torch.zeros(2, 2, 5), torch.ones(2, 5, dtype=torch.bool), None, roll, torch.zeros(9), k_g, 0, 1.0,
           0, None, 2)


# ----------------------------------------------------------------------------------------------------------
# Triton under the interpreter (fp32): every weighting and reduction, baseline and propagation toggled
# ----------------------------------------------------------------------------------------------------------

_TRITON_CASES = [
    ("linear", "weighted_mean", False, None),
    ("linear", "sum", True, 0.7),
    ("softmax", "weighted_mean", True, None),
    ("softmax", "sum", False, 0.0),
    ("topk", "weighted_mean", False, 0.7),
    ("topk", "sum", True, None),
    ("uniform", "weighted_mean", True, 1.3),
    ("uniform", "sum", False, None),
]


@needs_triton
@pytest.mark.parametrize("weighting,reduction,with_baseline,gamma", _TRITON_CASES)
def test_triton_matches_reference_ragged(weighting, reduction, with_baseline, gamma):
    lp, mask, roll, base, _, _ = ragged_case(seed=4, dtype=torch.float64)
    _run_both_layouts("triton", torch.float32, lp, mask, roll, base, weighting=weighting, reduction=reduction,
                      with_baseline=with_baseline, propagation_gamma=gamma, topk=0.4, softmax_tau=0.3)


@needs_triton
@pytest.mark.parametrize("weighting", WEIGHTINGS)
def test_triton_matches_reference_multi_block(weighting):
    # width 45 > the kernel's 32-column block: the rank count and the propagation positions cross blocks.
    lp, mask, roll, base = random_case(11, g=3, k=4, width=45)
    _run_both_layouts("triton", torch.float32, lp, mask, roll, base, weighting=weighting, topk=0.3,
                      propagation_gamma=0.4, with_baseline=True, min_valid_rollouts=2)


@needs_triton
def test_triton_ties_no_valid_rollout_and_bf16():
    lp = torch.tensor([[[0.0, -1.0, 0.0, -1.0], [-1.0, 0.0, -1.0, 0.0]],
                       [[-0.5, -0.2, -0.3, -0.1], [-0.4, -0.6, -0.3, -0.9]]], dtype=torch.float64)
    roll = torch.tensor([[True, True], [False, False]])
    for topk in (1, 0.5):
        kw = dict(rollout_mask=roll, weighting="topk", topk=topk, propagation_gamma=0.4)
        _check(r3_reward(lp.float(), impl="triton", **kw), r3_reward_reference(lp, **kw),
               r3_reward_reference(lp.float(), **kw), dtype=torch.float32, name=f"ties {topk}")
    lp16 = lp.to(torch.bfloat16)
    kw = dict(rollout_mask=roll, weighting="softmax")
    _check(r3_reward(lp16, impl="triton", **kw), r3_reward_reference(lp16.double(), **kw),
           r3_reward_reference(lp16, **kw), dtype=torch.bfloat16, name="bf16")


# ----------------------------------------------------------------------------------------------------------
# Errors and the implementation choice
# ----------------------------------------------------------------------------------------------------------


def _kernel_impls():
    impls = ["reference"]
    if cpp_available():
        impls.append("cpp")
    if triton_available():
        impls.append("triton")
    return impls


@pytest.mark.parametrize("impl", _kernel_impls())
def test_bad_input_named_errors(impl):
    lp = torch.zeros(2, 3, 4)
    with pytest.raises(ValueError, match="ref_mask"):
        r3_reward(lp, ref_mask=torch.ones(2, 5, dtype=torch.bool), impl=impl)
    with pytest.raises(ValueError, match="rollout_mask"):
        r3_reward(lp, rollout_mask=torch.ones(3, 3, dtype=torch.bool), impl=impl)
    with pytest.raises(ValueError, match="baseline_logprobs"):
        r3_reward(lp, baseline_logprobs=torch.zeros(2, 3), impl=impl)
    m = torch.ones(2, 4, dtype=torch.bool)
    m[1] = False
    with pytest.raises(ValueError, match="no valid reference token"):
        r3_reward(lp, ref_mask=m, impl=impl)
    with pytest.raises(ValueError, match="no valid reference token"):
        r3_reward(torch.zeros(3, 4), ref_cu_seqlens=torch.tensor([0, 2, 2, 4]), impl=impl)
    with pytest.raises(ValueError, match="ref_cu_seqlens"):
        r3_reward(torch.zeros(3, 4), ref_cu_seqlens=torch.tensor([0, 2, 5]), impl=impl)
    with pytest.raises(ValueError, match="ref_logprobs"):
        r3_reward(torch.zeros(3, 4), impl=impl)
    with pytest.raises(ValueError, match="ref_mask"):
        r3_reward(torch.zeros(3, 4), ref_cu_seqlens=torch.tensor([0, 4]), ref_mask=torch.ones(1, 4),
                  impl=impl)
    with pytest.raises(TypeError, match="ref_logprobs"):
        r3_reward(torch.zeros(2, 3, 4, dtype=torch.int64), impl=impl)
    with pytest.raises(ValueError, match="weighting"):
        r3_reward(lp, weighting="sigmoid", impl=impl)
    with pytest.raises(ValueError, match="topk"):
        r3_reward(lp, topk=0, impl=impl)
    with pytest.raises(ValueError, match="rollout_mask"):
        r3_reward(lp, rollout_mask=torch.full((2, 3), 2), impl=impl)


@pytest.mark.parametrize("impl", _kernel_impls())
def test_validate_false_empty_reference_gives_nan(impl):
    # A prompt without a reference token is an error with validate=True; without validation its rewards
    # are NaN (the reference's behaviour), in both layouts (the packed one with an empty segment).
    lp = torch.randn(3, 2, 4, dtype=torch.float64)
    mask = torch.ones(3, 4, dtype=torch.bool)
    mask[1] = False
    plp, cu = torch.randn(2, 5, dtype=torch.float64), torch.tensor([0, 2, 2, 5])
    dtype = torch.float32 if impl == "triton" else torch.float64
    for args, kw in (((lp,), dict(ref_mask=mask)), ((plp,), dict(ref_cu_seqlens=cu))):
        kw.update(validate=False, weighting="topk", propagation_gamma=0.5)
        oracle = r3_reward_reference(*args, **kw)
        out = r3_reward(args[0].to(dtype), impl=impl, **kw)
        _check(out, oracle, r3_reward_reference(args[0].to(dtype), **kw), dtype=dtype, name=f"{impl} empty")
        assert bool(torch.isnan(out.reward[1]).all())


def test_impl_dispatch_rule(monkeypatch):
    monkeypatch.delenv("REASONRL_IMPL", raising=False)
    lp, mask, roll, base, _, _ = ragged_case(seed=9, dtype=torch.float64)
    cpu = torch.device("cpu")
    expected = "cpp" if cpp_available() else "reference"
    assert backend.resolve_impl("r3_reward", "auto", cpu, torch.float64) == expected
    # An explicit choice that cannot run raises, never falls back.
    with pytest.raises(RuntimeError, match="impl='triton'.*float64"):
        r3_reward(lp, ref_mask=mask, rollout_mask=roll, impl="triton")
    with pytest.raises(RuntimeError, match="impl='triton'.*float64"):
        functional.r3_reward(lp, ref_mask=mask, rollout_mask=roll, impl="triton")
    with pytest.raises(ValueError, match="impl must be one of"):
        functional.r3_reward(lp, ref_mask=mask, impl="cuda")
    monkeypatch.setenv("REASONRL_IMPL", "triton")
    with pytest.raises(RuntimeError, match="impl='triton'"):  # the environment's choice is explicit too
        functional.r3_reward(lp, ref_mask=mask, rollout_mask=roll)
    monkeypatch.setenv("REASONRL_IMPL", "reference")
    out = functional.r3_reward(lp, ref_mask=mask, rollout_mask=roll, baseline_logprobs=base)
    ref = r3_reward_reference(lp, ref_mask=mask, rollout_mask=roll, baseline_logprobs=base)
    torch.testing.assert_close(out.reward, ref.reward, rtol=0, atol=0, equal_nan=True)


@needs_cpp
def test_functional_auto_runs_cpp_on_cpu(monkeypatch):
    monkeypatch.delenv("REASONRL_IMPL", raising=False)
    lp, mask, roll, base, _, _ = ragged_case(seed=10, dtype=torch.float64)
    kw = dict(ref_mask=mask, rollout_mask=roll, baseline_logprobs=base, weighting="topk",
              propagation_gamma=0.3)
    auto = functional.r3_reward(lp, **kw)
    cpp = r3_reward(lp, impl="cpp", **kw)
    for a, c in zip(auto, cpp, strict=True):
        assert torch.equal(a.nan_to_num(), c.nan_to_num())  # the same kernel, bit for bit
    _check(auto, r3_reward_reference(lp, **kw), dtype=torch.float64, name="functional auto")
