"""GPU tests of the single-pass fused policy loss (pytest -m gpu; run by bench/gpu_check.sh on a CUDA
machine): the Triton kernel at realistic vocabularies against the float64 oracle chain,
its opcheck and torch.compile."""

from __future__ import annotations

import pytest
import torch
from _policy_loss_fused import from_logits_op_args

from reasonrl.losses import LossNormalizers, PolicyLossConfig, policy_loss, policy_loss_from_logits
from reasonrl.ops.policy_loss import FROM_LOGITS, registered_ops
from reasonrl.reference.token_logprobs import token_logprobs_reference

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

CONFIG = PolicyLossConfig(loss_type="dapo", epsilon_high=0.28, beta=0.04, entropy_coef=0.01, temperature=0.9)


def _case(b, t, vocab, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    logits = (torch.randn(b, t, vocab, device="cuda", generator=g) * 2).to(dtype)
    labels = torch.randint(0, vocab, (b, t), device="cuda", generator=g)
    mask = torch.rand(b, t, device="cuda", generator=g) > 0.1
    adv = torch.randn(b, device="cuda", generator=g)
    with torch.no_grad():
        base = token_logprobs_reference(logits.float(), labels, temperature=CONFIG.temperature).logprobs
    old = base + 0.2 * torch.randn(b, t, device="cuda", generator=g)
    return logits, labels, dict(mask=mask, advantages=adv, old_logprobs=old, ref_logprobs=old - 0.05)


@pytest.mark.parametrize("vocab", [32000, 50257, 151936])  # 50257: the unaligned-row variant
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_triton_matches_float64_oracle(vocab, dtype):
    logits, labels, kw = _case(4, 16, vocab, dtype)
    norms = LossNormalizers()
    x = logits.clone().requires_grad_(True)
    out = policy_loss_from_logits(x, labels, normalizers=norms, config=CONFIG, impl="triton", **kw)
    assert type(out.loss.grad_fn).__name__ == "_PrecomputedGradientBackward"
    out.loss.backward()
    x64 = logits.double().requires_grad_(True)
    tl = token_logprobs_reference(
        x64, labels.masked_fill(~kw["mask"], -100), temperature=CONFIG.temperature, want_entropy=True
    )
    kw64 = {k: (v.double() if v.is_floating_point() else v) for k, v in kw.items()}
    oracle = policy_loss(tl.logprobs, entropies=tl.entropy, normalizers=norms, config=CONFIG, **kw64)
    oracle.loss.backward()
    torch.testing.assert_close(out.loss.double(), oracle.loss.detach(), rtol=1e-4, atol=1e-6)
    atol = 1e-2 * float(x64.grad.abs().max()) if dtype == torch.bfloat16 else 1e-6
    torch.testing.assert_close(
        x.grad.double(), x64.grad, rtol=2e-2 if dtype == torch.bfloat16 else 1e-4, atol=atol
    )


def test_triton_opcheck_and_compile():
    logits, labels, kw = _case(2, 8, 1000, torch.float32)
    args = from_logits_op_args(logits, labels, kw, CONFIG, valid=kw["mask"])
    args = (args[0].reshape(-1, 1000), args[1].reshape(-1), *args[2:])  # the op takes [N, V] rows
    torch.library.opcheck(registered_ops(FROM_LOGITS, "triton"), args)

    def step(x):
        return policy_loss_from_logits(
            x, labels, normalizers=LossNormalizers(), config=CONFIG, impl="triton", validate=False, **kw
        ).loss

    x = logits.clone().requires_grad_(True)
    step(x).backward()
    y = logits.clone().requires_grad_(True)
    torch.compile(step, fullgraph=True)(y).backward()
    torch.testing.assert_close(y.grad, x.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("vocab", [32000, 50257])
def test_triton_inplace_backward_equals_out_of_place(vocab):
    logits, labels, kw = _case(4, 16, vocab, torch.bfloat16, seed=1)
    grads = []
    for inplace in (False, True):
        x = logits.clone().requires_grad_(True)
        out = policy_loss_from_logits(x, labels, normalizers=LossNormalizers(), config=CONFIG, impl="triton",
                                      inplace_backward=inplace, **kw)
        out.loss.backward()
        grads.append((x, x.grad, out.loss))
    (_, g0, l0), (x1, g1, l1) = grads
    assert g1.data_ptr() == x1.data_ptr()
    assert torch.equal(l1, l0) and torch.equal(g1, g0)
