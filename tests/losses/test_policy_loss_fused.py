"""The single-pass fused policy loss (docs/losses.md section 13.1; reasonrl/losses/fused.py,
csrc/cpu/policy_loss.cpp, kernels/policy_loss.py).

(a) The per-token functor (``reasonrl::policy_loss_token_grad``, the C++ code the fused kernel runs per row)
    against autograd of the reference loss in float64, over every token-local loss type x feature x
    aggregation, with advantages of both signs, fully masked sequences and
    ratios exactly on every clamp bound.
(b) End to end: ``policy_loss_from_logits`` on the single-pass path (cpp and triton) against the float64
    oracle chain (reference token_logprobs in float64, then the reference loss): loss, dlogits and metrics,
    padded and packed layouts.
(c) gradcheck (float64, cpp), opcheck of the registered ops, torch.compile(fullgraph=True), bad input, an
    empty batch, and the dispatch rule (which configurations take the single pass).
"""

from __future__ import annotations

import dataclasses
import math
import warnings

import pytest
import torch
from _policy_loss_fused import from_logits_op_args, kernel_inputs

from reasonrl.losses import (
    ISCorrection,
    LossNormalizers,
    PolicyLossConfig,
    policy_loss,
    policy_loss_from_logits,
)
from reasonrl.losses import fused as fused_mod
from reasonrl.ops.policy_loss import FROM_LOGITS, kernel_codes, registered_ops
from reasonrl.reference.token_logprobs import token_logprobs_reference

F64 = torch.float64


def _quiet(fn, *args, **kw):
    """``fn(*args, **kw)`` without the config's advisory UserWarnings (luspo at token level is allowed)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return fn(*args, **kw)


# Token-local configurations: every loss type the single pass supports and every token-local feature.
BASE = dict(epsilon_high=0.28)
CONFIGS = {
    "grpo": PolicyLossConfig(loss_type="grpo", **BASE),
    "bnpo": PolicyLossConfig(loss_type="bnpo", **BASE),
    "dr_grpo": PolicyLossConfig(loss_type="dr_grpo", max_completion_length=7, **BASE),
    "dapo+kl+entropy": PolicyLossConfig(loss_type="dapo", beta=0.04, entropy_coef=0.01, **BASE),
    "luspo": _quiet(PolicyLossConfig, loss_type="luspo", **BASE),  # token level: warned, allowed
    "dapo+delta": PolicyLossConfig(loss_type="dapo", delta=1.6, **BASE),
    "verl-vanilla": PolicyLossConfig(
        loss_type="dapo",
        dual_clip=True,
        dual_clip_c=1.6,
        log_ratio_clamp=0.15,
        loss_agg_mode="token-mean",
        kl_bias_correction=False,
        beta=0.1,
        kl_estimator="low_var_kl",
        entropy_coef=0.02,
        **BASE,
    ),
    "cispo-upper": PolicyLossConfig(loss_type="cispo", cispo_ratio_max=1.1, beta=0.05, kl_estimator="k2"),
    "cispo-two-sided": PolicyLossConfig(
        loss_type="cispo", cispo_mode="two_sided", loss_agg_mode="seq-mean-token-sum", **BASE
    ),
    "sapo": PolicyLossConfig(loss_type="sapo", beta=0.05, kl_estimator="k1", entropy_coef=0.03),
    "sapo-verl": PolicyLossConfig(
        loss_type="sapo",
        loss_agg_mode="token-mean",
        policy_agg_mode="seq-mean-token-mean",
        beta=0.02,
        kl_estimator="k3+",
        kl_bias_correction=False,
    ),
    "reinforce": PolicyLossConfig(
        loss_type="reinforce", beta=0.1, kl_estimator="abs", loss_agg_mode="token-sum"
    ),
    "grpo-seq-mean-token-sum-norm": PolicyLossConfig(
        loss_type="grpo",
        loss_agg_mode="seq-mean-token-sum-norm",
        loss_scale_factor=9.0,
        entropy_coef=0.01,
        **BASE,
    ),
    "dapo-legacy-token-mean": PolicyLossConfig(
        loss_type="dapo",
        loss_agg_mode="token-mean",
        agg_version="legacy",
        beta=0.03,
        kl_estimator="abs+",
        **BASE,
    ),
    "dapo+is-token-mask": PolicyLossConfig(
        loss_type="dapo",
        is_correction=ISCorrection(level="token", mode="mask", c_min=0.9, c_max=1.05),
        **BASE,
    ),
    "grpo+is-seq-truncate": PolicyLossConfig(
        loss_type="grpo",
        is_correction=ISCorrection(level="sequence", mode="truncate", c_max=1.1),
        beta=0.02,
        kl_estimator="k1+",
        **BASE,
    ),
}
KL_ESTIMATORS = ("k1", "abs", "k2", "k3", "low_var_kl", "k1+", "abs+", "k3+", "low_var_kl+")


def _batch(seed: int, b: int = 4, t: int = 6, dtype=F64):
    """Per-token inputs with ratios spread across the clip region, advantages of both signs (per sequence and
    per token), one fully masked sequence and a ragged mask."""
    g = torch.Generator().manual_seed(seed)
    lp = -torch.rand(b, t, generator=g, dtype=F64) * 3
    old = lp - (torch.rand(b, t, generator=g, dtype=F64) - 0.5) * 0.8  # w in about [0.67, 1.5]
    ref = lp + torch.randn(b, t, generator=g, dtype=F64) * 0.3
    samp = old + torch.randn(b, t, generator=g, dtype=F64) * 0.05
    h = torch.rand(b, t, generator=g, dtype=F64) * 4
    adv = torch.tensor([0.9, -1.3, 0.4, -0.2], dtype=F64)[:b]
    mask = torch.ones(b, t, dtype=torch.bool)
    mask[0, 4:] = False
    mask[2, :] = False  # fully masked sequence
    mask[3, 1] = False
    return dict(
        lp=lp.to(dtype),
        old=old.to(dtype),
        ref=ref.to(dtype),
        samp=samp.to(dtype),
        h=h.to(dtype),
        adv=adv.to(dtype),
        mask=mask,
    )


def _reference_token_grads(cfg, b, norms, advantages, is_weights=None):
    lp = b["lp"].clone().requires_grad_(True)
    h = b["h"].clone().requires_grad_(True)
    out = policy_loss(
        lp,
        advantages=advantages,
        mask=b["mask"],
        old_logprobs=b["old"],
        ref_logprobs=b["ref"],
        sampling_logprobs=b["samp"],
        is_weights=is_weights,
        entropies=h,
        normalizers=norms,
        config=cfg,
    )
    g_lp, g_h = torch.autograd.grad(out.loss, (lp, h), allow_unused=True)
    return g_lp, (torch.zeros_like(h) if g_h is None else g_h)


def _functor_grads(cfg, b, norms, advantages, is_weights=None):
    inputs = kernel_inputs(
        b["mask"],
        config=cfg,
        normalizers=norms,
        dtype=b["lp"].dtype,
        advantages=advantages,
        old_logprobs=b["old"],
        ref_logprobs=b["ref"],
        sampling_logprobs=b["samp"],
        is_weights=is_weights,
    )
    g_lp = torch.ops.reasonrl.policy_loss_token_grad(
        b["lp"].reshape(-1),
        inputs,
        *kernel_codes(cfg, has_old=True),
    )
    return g_lp.reshape(b["lp"].shape), inputs[:, 5].reshape(b["lp"].shape)


@pytest.fixture(scope="module")
def cpp_ops(available_impls):
    if "cpp" not in available_impls:
        pytest.skip("the compiled extension is not available")
    registered_ops(FROM_LOGITS, "cpp")  # registers the fake kernels


def _close(actual, expected, name, rtol=1e-10, atol=1e-13):
    torch.testing.assert_close(
        actual.to(F64), expected.to(F64), rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}"
    )


# ----------------------------------------------------------------------------------------------------------
# (a) the per-token functor in float64
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("adv_kind", ["per_sequence", "per_token"])
def test_functor_matches_reference_autograd(name, adv_kind, cpp_ops):
    cfg = CONFIGS[name]
    b = _batch(seed=hash(name) % 1000)
    adv = (
        b["adv"] if adv_kind == "per_sequence" else b["adv"][:, None] * torch.linspace(-1, 1.5, 6, dtype=F64)
    )
    norms = LossNormalizers(global_num_seqs=6, num_items_in_batch=17, grad_accum_steps=2)
    ref_lp, ref_h = _reference_token_grads(cfg, b, norms, adv)
    g_lp, g_h = _functor_grads(cfg, b, norms, adv)
    _close(g_lp, ref_lp, f"{name}: dLoss/dlp")
    _close(g_h, ref_h, f"{name}: dLoss/dH")


@pytest.mark.parametrize("estimator", KL_ESTIMATORS)
@pytest.mark.parametrize("bias_correction", [False, True])
def test_functor_every_kl_estimator(estimator, bias_correction, cpp_ops):
    cfg = PolicyLossConfig(
        loss_type="dapo",
        beta=0.3,
        kl_estimator=estimator,
        kl_bias_correction=bias_correction,
        log_ratio_clamp=0.3,
    )
    b = _batch(seed=7)
    # low_var_kl: spread x = ref - lp across its +-20 input and +-10 output clamps. The unclamped estimators
    # stay within |x| <= 6: with bias correction, w d(kappa)/dlp + kappa dw/dlp cancels terms of size e^|x|,
    # whose rounding (in the reference too) would swamp a 1e-10 comparison.
    spread = 25.0 if estimator.startswith("low_var_kl") else 6.0
    b["ref"] = b["lp"] + torch.linspace(-spread, spread, b["lp"].numel(), dtype=F64).reshape(b["lp"].shape)
    norms = LossNormalizers()
    ref_lp, _ = _reference_token_grads(cfg, b, norms, b["adv"])
    g_lp, _ = _functor_grads(cfg, b, norms, b["adv"])
    _close(g_lp, ref_lp, f"{estimator}: dLoss/dlp")


def test_functor_precomputed_is_weights(cpp_ops):
    cfg = CONFIGS["dapo+kl+entropy"]
    b = _batch(seed=3)
    for rho in (torch.tensor([0.5, 1.2, 0.0, 2.0], dtype=F64), torch.rand(4, 6, dtype=F64) * 2):
        ref_lp, _ = _reference_token_grads(cfg, b, LossNormalizers(), b["adv"], is_weights=rho)
        g_lp, _ = _functor_grads(cfg, b, LossNormalizers(), b["adv"], is_weights=rho)
        _close(g_lp, ref_lp, "is_weights: dLoss/dlp")


@pytest.mark.parametrize("bound", ["low", "high", "delta", "dual_clip", "log_ratio_clamp", "cispo_max"])
def test_functor_at_clip_boundaries(bound, cpp_ops):
    """A clamp passes the gradient when the ratio is exactly on the bound and blocks it strictly beyond (as
    torch.clamp and the reference). The bound is the kernel's own w = exp(lp - old), here math.exp (the same
    libm exp as the C++ functor), so equality is exact."""
    old = 0.0
    if bound == "low":
        lp, a, beyond = math.log(0.8), -1.0, -1e-6
        cfg = PolicyLossConfig(epsilon_low=1 - math.exp(lp))
    elif bound == "high":
        lp, a, beyond = math.log(1.2), 1.0, 1e-6
        cfg = PolicyLossConfig(epsilon_high=math.exp(lp) - 1)
    elif bound == "delta":
        lp, a, beyond = math.log(2.5), -1.0, 1e-6
        cfg = PolicyLossConfig(delta=math.exp(lp))
    elif bound == "dual_clip":
        lp, a, beyond = math.log(2.5), -1.0, 1e-6
        cfg = PolicyLossConfig(dual_clip=True, dual_clip_c=math.exp(lp))
    elif bound == "log_ratio_clamp":
        lp, a, beyond = 0.15, 1.0, 1e-6
        cfg = PolicyLossConfig(log_ratio_clamp=lp, epsilon_high=0.5)
    else:  # CISPO's cap: the weight is min(w, R) on both sides of the bound (no blocking, a kink)
        lp, a, beyond = math.log(1.5), 1.0, 1e-6
        cfg = PolicyLossConfig(loss_type="cispo", cispo_ratio_max=math.exp(lp))

    def grads(x):
        b = dict(
            lp=torch.tensor([[x]], dtype=F64),
            old=torch.tensor([[old]], dtype=F64),
            ref=torch.zeros(1, 1, dtype=F64),
            samp=torch.zeros(1, 1, dtype=F64),
            h=torch.ones(1, 1, dtype=F64),
            mask=torch.ones(1, 1, dtype=torch.bool),
        )
        adv = torch.tensor([a], dtype=F64)
        return _functor_grads(cfg, b, LossNormalizers(), adv)[0], _reference_token_grads(
            cfg, b, LossNormalizers(), adv
        )[0]

    g_at, r_at = grads(lp)
    _close(g_at, r_at, f"{bound}: on the bound, vs reference")
    if bound == "cispo_max":
        _close(g_at, torch.tensor([[-a * math.exp(lp)]], dtype=F64), "cispo: -min(w, R) A")
        return
    _close(
        g_at,
        torch.tensor([[-a * math.exp(min(lp, cfg.log_ratio_clamp or lp))]], dtype=F64),
        f"{bound}: passes on the bound",
    )
    g_beyond, r_beyond = grads(lp + beyond)
    assert float(g_beyond) == 0.0 == float(r_beyond), f"{bound}: gradient beyond the bound {float(g_beyond)}"


# ----------------------------------------------------------------------------------------------------------
# (b) end to end from logits, against the float64 oracle chain
# ----------------------------------------------------------------------------------------------------------


def _logits_case(layout, seed=0, b=4, t=5, v=97, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(b, t, v, generator=g) * 2).to(dtype)
    labels = torch.randint(0, v, (b, t), generator=g)
    mask = torch.ones(b, t, dtype=torch.bool)
    mask[0, 3:] = False
    mask[min(2, b - 1), :] = False  # a fully masked sequence
    labels[1, 0] = -100  # an ignored token inside a valid sequence
    adv = torch.tensor([1.0, -0.5, 0.3, -1.2])[:b]
    base = token_logprobs_reference(logits.double(), labels.clamp_min(0), temperature=0.9).logprobs
    old = (base + 0.3 * torch.randn(b, t, generator=g, dtype=F64)).float()
    kw = dict(
        advantages=adv,
        old_logprobs=old,
        ref_logprobs=old - 0.05,
        sampling_logprobs=old + 0.02 * torch.randn(b, t, generator=g),
    )
    if layout == "padded":
        return logits, labels, dict(mask=mask, **kw)
    cu = torch.arange(0, (b + 1) * t, t)
    flat = {k: v.reshape(-1) if v.dim() == 2 else v for k, v in kw.items()}
    return logits.reshape(b * t, v), labels.reshape(-1), dict(mask=mask.reshape(-1), cu_seqlens=cu, **flat)


def _oracle(logits, labels, kw, cfg, norms):
    x64 = logits.double().requires_grad_(True)
    valid = kw["mask"] & (labels != -100)
    tl = token_logprobs_reference(
        x64, labels.masked_fill(~valid, -100), temperature=cfg.temperature, want_entropy=True
    )
    kw64 = {k: (v.double() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in kw.items()}
    kw64["mask"] = valid
    out = policy_loss(tl.logprobs, entropies=tl.entropy, normalizers=norms, config=cfg, **kw64)
    out.loss.backward()
    return out, x64.grad


def _check_end_to_end(impl, name, layout, temperature=0.9, v=97):
    cfg = _quiet(dataclasses.replace, CONFIGS[name], temperature=temperature)
    norms = LossNormalizers(global_num_seqs=4, grad_accum_steps=2)
    logits, labels, kw = _logits_case(layout, v=v)
    x = logits.clone().requires_grad_(True)
    out = policy_loss_from_logits(x, labels, normalizers=norms, config=cfg, impl=impl, **kw)
    assert type(out.loss.grad_fn).__name__ == "_PrecomputedGradientBackward", "single pass not taken"
    out.loss.backward()
    oracle, grad64 = _oracle(logits, labels, kw, cfg, norms)
    torch.testing.assert_close(out.loss.double(), oracle.loss.detach(), rtol=1e-5, atol=1e-6)
    scale = grad64.abs().max()
    torch.testing.assert_close(x.grad.double(), grad64, rtol=1e-4, atol=1e-6 * float(scale) + 1e-9)
    for field in ("entropy", "kl", "ratio_mean", "num_tokens", "clip_region", "pg_clipfrac", "ppo_kl"):
        mine, theirs = getattr(out.metrics, field), getattr(oracle.metrics, field)
        if theirs is None:
            assert mine is None, field
            continue
        torch.testing.assert_close(
            mine.sum.double(), theirs.sum.double(), rtol=1e-5, atol=1e-6,
            msg=lambda m, f=field: f"metric {f}: {m}",
        )
    torch.testing.assert_close(
        out.metrics.ratio_max.value.double(), oracle.metrics.ratio_max.value, rtol=1e-5, atol=0
    )


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_cpp_matches_float64_oracle(name, layout, cpp_ops):
    _check_end_to_end("cpp", name, layout)


# Rows of several 2048-column chunks, each chunk with its own shift; V = 4128 makes every fp32 gradient row
# 64-byte aligned (the kernel's streaming-store sweep), V = 4101 leaves most rows unaligned (plain stores).
# With and without an entropy bonus: without one the gradient sweep reads only the stored exponentials.
@pytest.mark.parametrize("name", ["dapo+delta", "dapo+kl+entropy"])
@pytest.mark.parametrize("v", [4128, 4101])
def test_cpp_multi_chunk_rows_match_float64_oracle(name, v, cpp_ops):
    _check_end_to_end("cpp", name, "packed", v=v)


@pytest.mark.parametrize(
    "name", ["dapo+kl+entropy", "verl-vanilla", "cispo-upper", "sapo", "reinforce", "dapo-legacy-token-mean"]
)
@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_triton_matches_float64_oracle(name, layout, available_impls):
    if "triton" not in available_impls:
        pytest.skip("triton unavailable")
    _check_end_to_end("triton", name, layout)


def test_cpp_bf16_and_per_row_temperature(cpp_ops):
    cfg = CONFIGS["dapo+kl+entropy"]
    norms = LossNormalizers()
    logits, labels, kw = _logits_case("padded", seed=5)
    temp = torch.linspace(0.7, 1.3, labels.numel()).reshape(labels.shape)
    x = logits.bfloat16().requires_grad_(True)
    out = policy_loss_from_logits(
        x, labels, normalizers=norms, config=cfg, temperature=temp, impl="cpp", **kw
    )
    out.loss.backward()
    x_ref = logits.bfloat16().requires_grad_(True)
    two_phase = policy_loss_from_logits(
        x_ref,
        labels,
        normalizers=norms,
        config=cfg,
        temperature=temp,
        impl="cpp",
        return_per_token=True,
        **kw,
    )
    two_phase.loss.backward()
    # Same row kernels, same per-token coefficients: the single pass equals the two-phase path up to the
    # rounding of the per-token gradient (fp64 functor vs fp32 autograd) and one bf16 rounding of dlogits.
    torch.testing.assert_close(out.loss, two_phase.loss, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(x.grad.float(), x_ref.grad.float(), rtol=2e-2, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------
# (c) gradcheck, opcheck, compile, bad input, dispatch
# ----------------------------------------------------------------------------------------------------------


def test_gradcheck_float64(cpp_ops):
    cfg = dataclasses.replace(CONFIGS["verl-vanilla"], temperature=0.8)
    logits, labels, kw = _logits_case("packed", b=3, t=3, v=11, seed=2)
    kw = {k: (v.double() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in kw.items()}
    norms = LossNormalizers()

    def f(x):
        return policy_loss_from_logits(x, labels, normalizers=norms, config=cfg, impl="cpp", **kw).loss

    x = logits.double().requires_grad_(True)
    assert type(f(x).grad_fn).__name__ == "_PrecomputedGradientBackward"
    assert torch.autograd.gradcheck(f, (x,), eps=1e-6, atol=1e-7)


def _opcheck_args(dtype=torch.float32):
    cfg = CONFIGS["dapo+kl+entropy"]
    logits, labels, kw = _logits_case("packed", b=2, t=3, v=37, seed=4, dtype=dtype)
    return from_logits_op_args(logits, labels, kw, cfg, valid=kw["mask"] & (labels != -100))


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_opcheck_cpp(dtype, cpp_ops):
    args = _opcheck_args(dtype)
    torch.library.opcheck(torch.ops.reasonrl.policy_loss_fused.default, args)
    lp = torch.randn(6, dtype=dtype)
    torch.library.opcheck(torch.ops.reasonrl.policy_loss_token_grad.default, (lp, args[5][:6], *args[6:]))


# The Triton registration's opcheck / torch.compile need a GPU (under the interpreter the fake-tensor pass
# would run the kernel on fake tensors): tests/losses/test_policy_loss_fused_gpu.py.


def test_torch_compile_fullgraph(cpp_ops):
    cfg = CONFIGS["dapo+kl+entropy"]
    norms = LossNormalizers()
    logits, labels, kw = _logits_case("padded", seed=9)

    def step(x):
        return policy_loss_from_logits(
            x, labels, normalizers=norms, config=cfg, impl="cpp", validate=False, **kw
        ).loss

    x = logits.clone().requires_grad_(True)
    eager = step(x)
    eager.backward()
    y = logits.clone().requires_grad_(True)
    compiled = torch.compile(step, fullgraph=True)(y)
    compiled.backward()
    torch.testing.assert_close(compiled, eager, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(y.grad, x.grad, rtol=1e-5, atol=1e-8)


def test_upstream_gradient_scales_the_precomputed_gradient(cpp_ops):
    cfg = CONFIGS["sapo"]
    logits, labels, kw = _logits_case("padded", seed=1)
    x = logits.clone().requires_grad_(True)
    out = policy_loss_from_logits(x, labels, normalizers=LossNormalizers(), config=cfg, impl="cpp", **kw)
    (g1,) = torch.autograd.grad(out.loss, x, retain_graph=True)
    (g3,) = torch.autograd.grad(out.loss * -3.0, x)
    torch.testing.assert_close(g3, -3.0 * g1)


def test_no_valid_token_gives_zero_loss_and_gradient(cpp_ops):
    cfg = CONFIGS["dapo+kl+entropy"]
    logits, labels, kw = _logits_case("padded", seed=1)
    kw["mask"] = torch.zeros_like(kw["mask"])
    x = logits.clone().requires_grad_(True)
    out = policy_loss_from_logits(x, labels, normalizers=LossNormalizers(), config=cfg, impl="cpp", **kw)
    out.loss.backward()
    assert float(out.loss.detach()) == 0.0
    assert torch.count_nonzero(x.grad) == 0


def test_bad_input_names_the_argument(cpp_ops):
    cfg = CONFIGS["grpo"]
    logits, labels, kw = _logits_case("padded")
    nan_logits = logits.clone()
    nan_logits[1, 2, 3] = float("nan")
    # (logits, labels, keyword arguments, the error, a pattern its message must match)
    bad_inputs = [
        (logits, labels, {**kw, "advantages": torch.zeros(7)}, ValueError, "advantages"),
        (logits, labels, {**kw, "old_logprobs": torch.zeros(3, 3)}, ValueError, "old_logprobs"),
        (logits, labels.masked_fill(labels == labels[0, 0], 10_000), kw, ValueError, "labels"),
        (nan_logits, labels, kw, FloatingPointError, None),
    ]
    for x, lab, kwargs, error, match in bad_inputs:
        with pytest.raises(error, match=match):
            policy_loss_from_logits(
                x.clone().requires_grad_(True),
                lab,
                normalizers=LossNormalizers(),
                config=cfg,
                impl="cpp",
                **kwargs,
            )


@pytest.mark.parametrize(
    "cfg,blocked",
    [
        (PolicyLossConfig(), False),
        (PolicyLossConfig(importance_sampling_level="sequence", loss_type="grpo"), True),
        (PolicyLossConfig(importance_sampling_level="sequence_token", loss_type="grpo"), True),
        (PolicyLossConfig(loss_type="vespo"), True),
        (PolicyLossConfig(off_policy_mask_threshold=0.5), True),
        (PolicyLossConfig(top_entropy_quantile=0.2), True),
    ],
)
def test_dispatch_rule(cfg, blocked, cpp_ops):
    assert (fused_mod.single_pass_blocker(cfg) is not None) == blocked
    logits, labels, kw = _logits_case("padded")
    x = logits.clone().requires_grad_(True)
    out = policy_loss_from_logits(x, labels, normalizers=LossNormalizers(), config=cfg, impl="cpp", **kw)
    single = type(out.loss.grad_fn).__name__ == "_PrecomputedGradientBackward"
    assert single != blocked
    with torch.no_grad():  # nothing needs a gradient: the forward alone, no gradient buffer
        out = policy_loss_from_logits(
            logits, labels, normalizers=LossNormalizers(), config=cfg, impl="cpp", **kw
        )
    assert out.loss.grad_fn is None


# ----------------------------------------------------------------------------------------------------------
# (d) inplace_backward: dLoss/dlogits written into the storage of the logits
# ----------------------------------------------------------------------------------------------------------


def _inplace_and_out_of_place(impl, dtype, layout, *, per_row_temperature=False, **extra):
    """The same call with ``inplace_backward`` False then True, each on a fresh leaf copy of the logits:
    [(x, out)] after ``backward()``."""
    cfg = CONFIGS["dapo+kl+entropy"]
    logits, labels, kw = _logits_case(layout, seed=3, dtype=dtype)
    if per_row_temperature:
        kw["temperature"] = torch.linspace(0.7, 1.3, labels.numel()).reshape(labels.shape)
    runs = []
    for inplace in (False, True):
        x = logits.clone().requires_grad_(True)
        out = policy_loss_from_logits(x, labels, normalizers=LossNormalizers(), config=cfg, impl=impl,
                                      inplace_backward=inplace, **kw, **extra)
        out.loss.backward()
        runs.append((x, out))
    return runs


@pytest.mark.parametrize(
    "impl,dtype",
    [("cpp", torch.float32), ("cpp", torch.bfloat16), ("cpp", F64), ("triton", torch.float32),
     ("triton", torch.bfloat16)],
)
@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_inplace_backward_equals_the_out_of_place_single_pass(impl, dtype, layout, available_impls):
    if impl not in available_impls:
        pytest.skip(f"{impl} unavailable")
    per_row = layout == "padded"
    (x0, out0), (x1, out1) = _inplace_and_out_of_place(impl, dtype, layout, per_row_temperature=per_row)
    assert type(out1.loss.grad_fn).__name__ == "_PrecomputedGradientBackward", "single pass not taken"
    assert x1.grad.data_ptr() == x1.data_ptr(), "the gradient was not written into the logits' storage"
    # Same kernel sweep, same arithmetic: bitwise equal, loss, metrics and gradient.
    assert torch.equal(out1.loss, out0.loss)
    assert torch.equal(x1.grad, x0.grad)
    for field in ("entropy", "kl", "ratio_mean", "clip_region"):
        assert torch.equal(getattr(out1.metrics, field).sum, getattr(out0.metrics, field).sum), field


def test_inplace_backward_on_the_two_phase_path(cpp_ops):
    # return_per_token=True takes the two-phase path: the flag goes to token_logprobs' in-place backward.
    (x0, out0), (x1, out1) = _inplace_and_out_of_place("cpp", torch.float32, "packed", return_per_token=True)
    assert out1.per_token_loss is not None
    assert x1.grad.data_ptr() == x1.data_ptr()
    assert torch.equal(out1.loss, out0.loss)
    assert torch.equal(x1.grad, x0.grad)
    # The reference ignores the flag: the caller's logits stay as they were.
    (xr, _), (xr1, _) = _inplace_and_out_of_place("reference", torch.float32, "packed")
    assert torch.equal(xr1.detach(), xr.detach())
    assert xr1.grad.data_ptr() != xr1.data_ptr()


@pytest.mark.parametrize("impl", ["cpp", "triton"])
def test_inplace_backward_fails_loudly_when_the_logits_are_needed_elsewhere(impl, available_impls):
    if impl not in available_impls:
        pytest.skip(f"{impl} unavailable")
    logits, labels, kw = _logits_case("padded", seed=2)
    x = logits.clone().requires_grad_(True)
    z = x * 1.5
    other = (z * z).sum()  # saves z for its backward
    out = policy_loss_from_logits(z, labels, normalizers=LossNormalizers(), config=CONFIGS["grpo"], impl=impl,
                                  inplace_backward=True, **kw)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (out.loss + other).backward()


def test_inplace_backward_needs_contiguous_logits(cpp_ops):
    logits, labels, kw = _logits_case("padded", seed=2)
    x = logits.transpose(0, 1).contiguous().transpose(0, 1).requires_grad_(True)  # not contiguous
    with pytest.raises(ValueError, match="inplace_backward=True needs contiguous logits"):
        policy_loss_from_logits(x, labels, normalizers=LossNormalizers(), config=CONFIGS["grpo"], impl="cpp",
                                inplace_backward=True, **kw)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_opcheck_cpp_inplace(dtype, cpp_ops):
    torch.library.opcheck(torch.ops.reasonrl.policy_loss_fused_inplace.default, _opcheck_args(dtype))
