"""GPU tests of token_logprobs (pytest -m gpu; run by bench/gpu_check.sh on a CUDA machine).

On CPU the Triton kernels run under TRITON_INTERPRET=1, where opcheck and torch.compile cannot trace a
triton_op (the interpreter reads data pointers of fake tensors). Those checks, and realistic vocabularies,
are therefore covered here, on a real device.
"""

from __future__ import annotations

import pytest
import torch

from reasonrl.ops import token_logprobs
from reasonrl.ops.token_logprobs import registered_ops
from reasonrl.reference import token_logprobs_reference

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _inputs(n, vocab, dtype, *, seed=0, ignore_frac=0.1):
    g = torch.Generator(device="cuda").manual_seed(seed)
    logits = (torch.randn(n, vocab, device="cuda", generator=g) * 2.0).to(dtype)
    probs = torch.softmax(logits.float(), -1)
    labels = torch.multinomial(probs, 1, generator=g).squeeze(-1)
    labels[torch.rand(n, device="cuda", generator=g) < ignore_frac] = -100
    return logits, labels


def _max_err(a, b, valid):
    return (a.double() - b.double())[valid].abs().max().item() if bool(valid.any()) else 0.0


# Realistic vocabularies (Llama-2, Llama-3, Qwen2; GPT-2's 50257 runs the kernels' variant for rows that are
# not 16-byte aligned, see docs/gpu-kernels.md) x the two dtypes users train in; N kept moderate so the
# float64 oracle ([N, V] fp64 softmax) fits in memory next to the inputs.
@pytest.mark.parametrize("vocab", [32000, 50257, 128256, 151936])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_triton_matches_oracle(vocab, dtype):
    logits, labels = _inputs(1024, vocab, dtype)
    temperature = 0.7
    oracle = token_logprobs_reference(logits, labels, temperature=temperature, want_entropy=True,
                                      want_rank=True, return_lse=True, compute_dtype=torch.float64)
    ref32 = token_logprobs_reference(logits, labels, temperature=temperature, want_entropy=True,
                                     return_lse=True)
    out = token_logprobs(logits, labels, temperature=temperature, want_entropy=True, want_rank=True,
                         return_lse=True, impl="triton")
    valid = labels != -100
    for name in ("logprobs", "entropy", "lse"):
        o, r, a = getattr(oracle, name), getattr(ref32, name), getattr(out, name)
        bound = 2 * _max_err(r, o, valid) + 1e-5 * (1 + o[valid].abs().max().item())
        assert _max_err(a, o, valid) <= bound, name
    assert torch.equal(out.rank[valid], oracle.rank[valid])

    x = logits.clone().requires_grad_(True)
    x64 = logits.double().requires_grad_(True)
    g_lp = torch.randn(labels.shape, device="cuda")
    g_h = torch.randn(labels.shape, device="cuda")
    o = token_logprobs(x, labels, temperature=temperature, want_entropy=True, impl="triton")
    (o.logprobs * g_lp + o.entropy * g_h).sum().backward()
    r = token_logprobs_reference(x64, labels, temperature=temperature, want_entropy=True)
    (r.logprobs * g_lp + r.entropy * g_h).sum().backward()
    err = (x.grad.double() - x64.grad).abs().max().item()
    ulp = torch.finfo(dtype).eps * x64.grad.abs().max().item()
    assert err <= max(ulp, 1e-6), (err, ulp)


def test_triton_large_n_one_dimensional_grid():
    # More rows than a grid axis 1/2 could hold (65535): the grid is 1-D.
    logits, labels = _inputs(70000, 64, torch.bfloat16)
    out = token_logprobs(logits, labels, want_entropy=True, impl="triton")
    ref = token_logprobs_reference(logits, labels, want_entropy=True)
    valid = labels != -100
    assert _max_err(out.logprobs, ref.logprobs, valid) < 1e-4


def test_triton_opcheck():
    fwd, bwd, _ = registered_ops("triton")
    logits, labels = _inputs(64, 3000, torch.bfloat16)
    temp = torch.full((64,), 0.8, device="cuda")
    torch.library.opcheck(fwd, (logits, labels, temp, 1.0, -100, True, True, False))
    lp, ent, _, _, stats = fwd(logits, labels, temp, 1.0, -100, True, True, False)
    torch.library.opcheck(bwd, (torch.randn_like(lp), torch.randn_like(ent), logits, labels, temp, 1.0, -100,
                                stats, ent))


def test_triton_compile_fullgraph():
    logits, labels = _inputs(256, 5000, torch.bfloat16)

    def f(x, y):
        o = token_logprobs(x, y, temperature=0.9, want_entropy=True, impl="triton", validate=False)
        return (o.logprobs.sum() - 0.1 * o.entropy.sum())

    x = logits.clone().requires_grad_(True)
    f(x, labels).backward()
    expected = x.grad.clone()
    x.grad = None
    torch.compile(f, fullgraph=True)(x, labels).backward()
    torch.testing.assert_close(x.grad, expected)
