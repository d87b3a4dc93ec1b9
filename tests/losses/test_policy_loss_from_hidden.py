"""policy_loss_from_hidden (docs/losses.md section 2, 13.1): the fused-linear single pass on CPU against the
float64 oracle (fp64 matmul, reference token_logprobs, reference loss): loss, grad_hidden, grad_weight,
grad_bias and metrics; several row chunks, compacted ignored / masked rows, per-row temperature, padded and
packed layouts, gradcheck in float64, the module form, and bad input."""

from __future__ import annotations

import pytest
import torch

from reasonrl.losses import (
    FusedLinearPolicyLoss,
    LossNormalizers,
    PolicyLossConfig,
    policy_loss,
    policy_loss_from_hidden,
)
from reasonrl.reference.token_logprobs import token_logprobs_reference

F64 = torch.float64
CONFIGS = {
    "dapo+kl+entropy": PolicyLossConfig(
        loss_type="dapo", epsilon_high=0.28, beta=0.04, entropy_coef=0.01, temperature=0.9
    ),
    "verl-vanilla": PolicyLossConfig(
        loss_type="dapo",
        dual_clip=True,
        log_ratio_clamp=20.0,
        beta=0.1,
        kl_estimator="low_var_kl",
        kl_bias_correction=False,
        loss_agg_mode="seq-mean-token-mean",
        entropy_coef=0.02,
    ),
    "sapo": PolicyLossConfig(loss_type="sapo", temperature=1.1),
}


@pytest.fixture(autouse=True)
def _needs_impl(request, available_impls):
    impl = "triton" if "triton" in request.node.name else "cpp"
    if impl not in available_impls:
        pytest.skip(f"{impl} is not available")


def _case(layout, *, b=4, t=6, h=24, v=83, dtype=torch.float32, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(b, t, h, generator=g).to(dtype)
    weight = (torch.randn(v, h, generator=g) / h**0.5 * 3).to(dtype)
    bias_t = (torch.randn(v, generator=g) * 0.5).to(dtype) if bias else None
    labels = torch.randint(0, v, (b, t), generator=g)
    mask = torch.ones(b, t, dtype=torch.bool)
    mask[0, 4:] = False
    mask[2, :] = False  # a fully masked sequence
    labels[1, 1] = -100
    logits = hidden.double() @ weight.double().T + (0 if bias_t is None else bias_t.double())
    old = token_logprobs_reference(logits, labels.clamp_min(0)).logprobs.float() + 0.2 * torch.randn(
        b, t, generator=g
    )
    kw = dict(advantages=torch.tensor([1.0, -0.7, 0.4, -1.5])[:b], old_logprobs=old, ref_logprobs=old - 0.05)
    if layout == "padded":
        return hidden, weight, bias_t, labels, dict(mask=mask, **kw)
    cu = torch.arange(0, (b + 1) * t, t)
    flat = {k: x.reshape(-1) if x.dim() == 2 else x for k, x in kw.items()}
    return (
        hidden.reshape(b * t, h),
        weight,
        bias_t,
        labels.reshape(-1),
        dict(mask=mask.reshape(-1), cu_seqlens=cu, **flat),
    )


def _oracle(hidden, weight, bias, labels, kw, cfg, norms, temperature=None):
    leaves = [hidden.double().requires_grad_(True), weight.double().requires_grad_(True)]
    if bias is not None:
        leaves.append(bias.double().requires_grad_(True))
    logits = leaves[0] @ leaves[1].T + (leaves[2] if bias is not None else 0)
    valid = kw["mask"] & (labels != -100)
    tl = token_logprobs_reference(
        logits,
        labels.masked_fill(~valid, -100),
        temperature=cfg.temperature if temperature is None else temperature,
        want_entropy=True,
    )
    kw64 = {k: (x.double() if torch.is_tensor(x) and x.is_floating_point() else x) for k, x in kw.items()}
    kw64["mask"] = valid
    out = policy_loss(tl.logprobs, entropies=tl.entropy, normalizers=norms, config=cfg, **kw64)
    return out, torch.autograd.grad(out.loss, leaves)


def _run(hidden, weight, bias, labels, kw, cfg, norms, impl="cpp", **extra):
    leaves = [hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)]
    if bias is not None:
        leaves.append(bias.clone().requires_grad_(True))
    out = policy_loss_from_hidden(
        leaves[0],
        leaves[1],
        labels,
        bias=leaves[2] if bias is not None else None,
        normalizers=norms,
        config=cfg,
        impl="cpp",
        **kw,
        **extra,
    )
    return out, torch.autograd.grad(out.loss, leaves)


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("chunk_rows", [None, 5])
def test_matches_float64_oracle(name, layout, chunk_rows):
    cfg = CONFIGS[name]
    norms = LossNormalizers(global_num_seqs=4)
    hidden, weight, bias, labels, kw = _case(layout)
    out, grads = _run(hidden, weight, bias, labels, kw, cfg, norms, chunk_rows=chunk_rows)
    assert type(out.loss.grad_fn).__name__ == "_PrecomputedLinearGradientsBackward", "single pass not taken"
    oracle, oracle_grads = _oracle(hidden, weight, bias, labels, kw, cfg, norms)
    torch.testing.assert_close(out.loss.detach().double(), oracle.loss.detach(), rtol=1e-5, atol=1e-7)
    for name_, mine, theirs in zip(("hidden", "weight", "bias"), grads, oracle_grads, strict=True):
        scale = float(theirs.abs().max())
        torch.testing.assert_close(
            mine.double(), theirs, rtol=1e-4, atol=1e-5 * scale, msg=lambda m, n=name_: f"grad_{n}: {m}"
        )
    for field in ("entropy", "kl", "ratio_mean", "clip_region"):
        mine, theirs = getattr(out.metrics, field), getattr(oracle.metrics, field)
        if theirs is not None:
            torch.testing.assert_close(mine.sum.double(), theirs.sum.double(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["dapo+kl+entropy", "verl-vanilla"])
def test_triton_matches_float64_oracle(name):
    """kernels/linear_policy_loss.py under the interpreter: statistics sweep, per-token loss gradient,
    recompute sweep, all inside the forward call."""
    cfg = CONFIGS[name]
    norms = LossNormalizers(global_num_seqs=4)
    hidden, weight, bias, labels, kw = _case("packed", h=16, v=50)
    out, grads = _run(hidden, weight, bias, labels, kw, cfg, norms, impl="triton")
    assert type(out.loss.grad_fn).__name__ == "_PrecomputedLinearGradientsBackward"
    oracle, oracle_grads = _oracle(hidden, weight, bias, labels, kw, cfg, norms)
    torch.testing.assert_close(out.loss.detach().double(), oracle.loss.detach(), rtol=1e-5, atol=1e-7)
    for mine, theirs in zip(grads, oracle_grads, strict=True):
        torch.testing.assert_close(mine.double(), theirs, rtol=1e-4, atol=1e-5 * float(theirs.abs().max()))


def test_per_row_temperature_no_bias_and_bf16():
    cfg = CONFIGS["dapo+kl+entropy"]
    norms = LossNormalizers()
    hidden, weight, _, labels, kw = _case("padded", bias=False, seed=3)
    temp = torch.linspace(0.6, 1.4, labels.numel()).reshape(labels.shape)
    out, grads = _run(hidden, weight, None, labels, kw, cfg, norms, temperature=temp, chunk_rows=7)
    oracle, oracle_grads = _oracle(hidden, weight, None, labels, kw, cfg, norms, temperature=temp)
    torch.testing.assert_close(out.loss.detach().double(), oracle.loss.detach(), rtol=1e-5, atol=1e-7)
    for mine, theirs in zip(grads, oracle_grads, strict=True):
        torch.testing.assert_close(mine.double(), theirs, rtol=1e-4, atol=1e-5 * float(theirs.abs().max()))
    # bf16 inputs: the GEMMs run in fp32 on the bf16 values, gradients are rounded once to bf16.
    hb, wb = hidden.bfloat16(), weight.bfloat16()
    out, grads = _run(hb, wb, None, labels, kw, cfg, norms, temperature=temp)
    oracle, oracle_grads = _oracle(hb, wb, None, labels, kw, cfg, norms, temperature=temp)
    assert grads[0].dtype == grads[1].dtype == torch.bfloat16
    torch.testing.assert_close(out.loss.detach().double(), oracle.loss.detach(), rtol=1e-4, atol=1e-6)
    for mine, theirs in zip(grads, oracle_grads, strict=True):
        torch.testing.assert_close(mine.double(), theirs, rtol=1e-2, atol=1e-2 * float(theirs.abs().max()))


def test_gradcheck_float64():
    cfg = CONFIGS["verl-vanilla"]
    hidden, weight, bias, labels, kw = _case("packed", b=3, t=3, h=5, v=13, seed=2)
    kw = {k: (x.double() if torch.is_tensor(x) and x.is_floating_point() else x) for k, x in kw.items()}
    norms = LossNormalizers()

    def f(h, w, b):
        return policy_loss_from_hidden(
            h, w, labels, bias=b, normalizers=norms, config=cfg, impl="cpp", chunk_rows=2, **kw
        ).loss

    args = tuple(x.double().requires_grad_(True) for x in (hidden, weight, bias))
    assert torch.autograd.gradcheck(f, args, eps=1e-6, atol=1e-7)


def test_module_shares_the_lm_head_and_scales_with_upstream():
    cfg = CONFIGS["sapo"]
    hidden, weight, bias, labels, kw = _case("padded", seed=5)
    head = torch.nn.Linear(weight.shape[1], weight.shape[0])
    with torch.no_grad():
        head.weight.copy_(weight)
        head.bias.copy_(bias)
    module = FusedLinearPolicyLoss(head, cfg, chunk_rows=4, impl="cpp")
    h = hidden.clone().requires_grad_(True)
    out = module(h, labels, normalizers=LossNormalizers(), **kw)
    (2.5 * out.loss).backward()
    _, (g_h, g_w, g_b) = _run(hidden, weight, bias, labels, kw, cfg, LossNormalizers())
    torch.testing.assert_close(h.grad, 2.5 * g_h)
    torch.testing.assert_close(head.weight.grad, 2.5 * g_w)
    torch.testing.assert_close(head.bias.grad, 2.5 * g_b)


def test_everything_masked_gives_zero_loss_and_zero_gradients():
    cfg = CONFIGS["dapo+kl+entropy"]
    hidden, weight, bias, labels, kw = _case("padded")
    kw["mask"] = torch.zeros_like(kw["mask"])
    out, grads = _run(hidden, weight, bias, labels, kw, cfg, LossNormalizers())
    assert float(out.loss.detach()) == 0.0
    assert all(torch.count_nonzero(g) == 0 for g in grads)


def test_bad_input_names_the_argument():
    cfg = CONFIGS["sapo"]
    hidden, weight, bias, labels, kw = _case("padded")
    h = hidden.requires_grad_(True)
    with pytest.raises(ValueError, match="weight"):
        policy_loss_from_hidden(h, weight[:, :-1], labels, normalizers=LossNormalizers(), config=cfg, **kw)
    with pytest.raises(ValueError, match="bias"):
        policy_loss_from_hidden(
            h, weight, labels, bias=bias[:-1], normalizers=LossNormalizers(), config=cfg, **kw
        )
    with pytest.raises(ValueError, match="labels"):
        policy_loss_from_hidden(h, weight, labels[:, :-1], normalizers=LossNormalizers(), config=cfg, **kw)
    with pytest.raises(ValueError, match="labels"):
        policy_loss_from_hidden(
            h,
            weight,
            labels.masked_fill(labels == labels[0, 0], 10**6),
            normalizers=LossNormalizers(),
            config=cfg,
            **kw,
        )


def test_sequence_level_config_takes_the_two_phase_path():
    """GSPO couples the tokens of a sequence: linear_token_logprobs + the loss with autograd (still no [N, V]
    logits), against the same float64 oracle."""
    cfg = PolicyLossConfig(loss_type="grpo", importance_sampling_level="sequence", beta=0.02,
                           entropy_coef=0.01)
    norms = LossNormalizers()
    hidden, weight, bias, labels, kw = _case("packed", seed=8)
    out, grads = _run(hidden, weight, bias, labels, kw, cfg, norms, chunk_rows=None)
    assert type(out.loss.grad_fn).__name__ != "_PrecomputedLinearGradientsBackward"
    oracle, oracle_grads = _oracle(hidden, weight, bias, labels, kw, cfg, norms)
    torch.testing.assert_close(out.loss.detach().double(), oracle.loss.detach(), rtol=1e-5, atol=1e-7)
    for mine, theirs in zip(grads, oracle_grads, strict=True):
        torch.testing.assert_close(mine.double(), theirs, rtol=1e-4, atol=1e-5 * float(theirs.abs().max()))
