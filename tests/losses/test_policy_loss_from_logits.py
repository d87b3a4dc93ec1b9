"""policy_loss_from_logits == policy_loss(token_logprobs(...)) (docs/losses.md section 2), for every impl.

The oracle is the float64 reference chain: reference token_logprobs in float64, then the reference loss.
Grid chosen on purpose: one clip-family config with every token-local feature that needs the entropy (bonus,
top-entropy mask) and KL, one sequence-level config (GSPO) whose gradient couples the tokens of a sequence,
on both layouts.
"""

from __future__ import annotations

import pytest
import torch

from reasonrl.losses import LossNormalizers, PolicyLossConfig, policy_loss, policy_loss_from_logits
from reasonrl.reference.token_logprobs import token_logprobs_reference

CONFIGS = {
    "dapo-kl-entropy-topH": PolicyLossConfig(loss_type="dapo", epsilon_high=0.28, beta=0.04,
                                             entropy_coef=0.01, top_entropy_quantile=0.5, temperature=0.9),
    "gspo-grpo": PolicyLossConfig(loss_type="grpo", importance_sampling_level="sequence", temperature=1.0),
}


def _case(layout, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    b, t, v = 3, 5, 97
    logits = (torch.randn(b, t, v, generator=g) * 2).to(dtype)
    labels = torch.randint(0, v, (b, t), generator=g)
    mask = torch.ones(b, t, dtype=torch.bool)
    mask[0, 3:] = False
    mask[2, :] = False  # a fully masked sequence
    labels[1, 0] = -100  # an ignored token inside a valid sequence
    adv = torch.tensor([1.0, -0.5, 0.3])
    old = (token_logprobs_reference(logits, labels.clamp_min(0)).logprobs
           + 0.05 * torch.randn(b, t, generator=g))
    ref = old - 0.02
    kw = dict(advantages=adv, old_logprobs=old, ref_logprobs=ref)
    if layout == "padded":
        return logits, labels, dict(mask=mask, **kw)
    lengths = torch.tensor([t, t, t])
    cu = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    flat = {k: v.reshape(-1) if v.dim() == 2 else v for k, v in kw.items()}
    return logits.reshape(b * t, v), labels.reshape(-1), dict(mask=mask.reshape(-1), cu_seqlens=cu, **flat)


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("impl", ["cpp", "triton", "reference"])
def test_matches_reference_chain(name, layout, impl, available_impls):
    if impl not in available_impls:
        pytest.skip(f"{impl} unavailable")
    config = CONFIGS[name]
    norms = LossNormalizers(num_items_in_batch=None)
    logits, labels, kw = _case(layout, torch.float32)

    x = logits.clone().requires_grad_(True)
    out = policy_loss_from_logits(x, labels, normalizers=norms, config=config, impl=impl, **kw)
    out.loss.backward()

    x64 = logits.double().requires_grad_(True)
    valid = kw["mask"] & (labels != -100)
    tl = token_logprobs_reference(x64, labels.masked_fill(~valid, -100), temperature=config.temperature,
                                  want_entropy=True)
    kw64 = {k: (v.double() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in kw.items()}
    kw64["mask"] = valid
    oracle = policy_loss(tl.logprobs, entropies=tl.entropy, normalizers=norms, config=config, **kw64)
    oracle.loss.backward()

    torch.testing.assert_close(out.loss.double(), oracle.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-4, atol=1e-6)
    assert out.metrics.entropy is not None
    torch.testing.assert_close(out.metrics.entropy.sum.double(), oracle.metrics.entropy.sum, rtol=1e-5,
                               atol=1e-6)


def test_label_shape_mismatch_names_the_argument():
    config = CONFIGS["gspo-grpo"]
    with pytest.raises(ValueError, match="labels"):
        policy_loss_from_logits(torch.randn(2, 3, 7), torch.zeros(2, 4, dtype=torch.long),
                                advantages=torch.zeros(2), normalizers=LossNormalizers(), config=config)
