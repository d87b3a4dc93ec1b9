"""Exact invariants of ``token_logprobs``, ``linear_token_logprobs`` and the fused policy-loss kernels, in
every implementation and dtype, at temperatures other than 1 (docs/numerics.md), plus the fp64 accuracy rule
at large V and the reproducers of issue 10 (an independent fuzz campaign).

Invariants (mathematics, so they must hold bit-for-bit, not within a tolerance):

* log p <= 0 and H >= 0 for every valid row; rank >= 1.
* A row with a single finite logit (V = 1 included) has log p = 0, H = 0 and a gradient of exactly 0.

They hold by construction when z - m is formed by one expression everywhere and the shift m is that
expression's value at the maximum (then d = 0 there, d <= 0 elsewhere, s >= 1); before the fix, the fp32
kernels scaled the row maximum and the exponents by slightly different values of 1/tau and about half of the
confident rows at T = 0.7 had log p > 0 and H < 0.

Budget (CI, 2 cores): ~3000 hypothesis examples over small shapes; Triton runs under the interpreter, with
fewer and smaller examples. Reproducible: ``derandomize=True``, no database, no shrinking (tensors are built
from a drawn seed, so shrinking cannot simplify them).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from _hypothesis_settings import SETTINGS
from hypothesis import given, settings
from hypothesis import strategies as st

from reasonrl._backend import unavailable_reason
from reasonrl.ops.linear_token_logprobs import linear_token_logprobs
from reasonrl.ops.token_logprobs import token_logprobs

F32, BF16, F16, F64 = torch.float32, torch.bfloat16, torch.float16, torch.float64
IGNORE = -100
NEG_INF = float("-inf")



def _skip_unless(impl: str, dtype: torch.dtype) -> None:
    why = unavailable_reason(impl, torch.device("cpu"), dtype)
    if why is not None:
        pytest.skip(f"impl={impl!r} unavailable: {why}")


# ----------------------------------------------------------------------------------------------------------
# Inputs: row patterns that stress the invariants
# ----------------------------------------------------------------------------------------------------------

PATTERNS = ("confident", "gaussian", "ties", "neg_inf", "large", "single")


def _row_logits(pattern: str, n: int, v: int, g: torch.Generator) -> torch.Tensor:
    """fp64 logits [n, v] of one pattern (rounded to the test dtype by the caller)."""
    if pattern == "confident":  # one token dominates: p_max = 1 - O(e^-20) or closer
        x = torch.randn(n, v, generator=g, dtype=F64) * 2
        top = torch.randint(0, v, (n,), generator=g)
        x[torch.arange(n), top] = 20 + 60 * torch.rand(n, generator=g, dtype=F64)
        return x
    if pattern == "gaussian":
        scale = [0.1, 1.0, 5.0, 30.0][int(torch.randint(0, 4, (1,), generator=g))]
        return torch.randn(n, v, generator=g, dtype=F64) * scale
    if pattern == "ties":  # many exact ties, the maximum included
        return torch.randint(-3, 4, (n, v), generator=g).to(F64)
    if pattern == "neg_inf":  # about half the logits -inf, at least one finite per row
        x = torch.randn(n, v, generator=g, dtype=F64) * 3
        x[torch.rand(n, v, generator=g) < 0.5] = NEG_INF
        keep = torch.randint(0, v, (n,), generator=g)
        x[torch.arange(n), keep] = torch.randn(n, generator=g, dtype=F64)
        return x
    if pattern == "large":  # |x| ~ 1e4: m has a large ulp
        offset = 1e4 * (1 + torch.rand(n, 1, generator=g, dtype=F64))
        return offset + 30 * torch.randn(n, v, generator=g, dtype=F64)
    assert pattern == "single"  # one finite logit per row, the rest -inf (V = 1 is the same case)
    x = torch.full((n, v), NEG_INF, dtype=F64)
    keep = torch.randint(0, v, (n,), generator=g)
    x[torch.arange(n), keep] = 100 * torch.randn(n, generator=g, dtype=F64)
    return x


TEMPERATURES = st.one_of(
    st.sampled_from([0.7, 0.3, 1.3, 2.5, 0.9, 1 / 3, 0.1, 3.7]),
    st.floats(0.05, 8.0).filter(lambda t: t != 1.0),
)


@dataclass(frozen=True)
class Case:
    """What an example draws; the tensors are built from it, so a falsifying example prints short."""

    n: int
    vocab: int
    dtype: torch.dtype
    pattern: str
    temperature: float
    per_row_temperature: bool
    label_at_max: bool
    seed: int

    def build(self):
        g = torch.Generator().manual_seed(self.seed)
        x = _row_logits(self.pattern, self.n, self.vocab, g).to(self.dtype)
        finite = torch.isfinite(x.double())
        if self.label_at_max or self.pattern == "single":
            labels = x.double().argmax(-1)
        else:
            labels = torch.randint(0, self.vocab, (self.n,), generator=g)
        if self.n > 1:
            labels[torch.rand(self.n, generator=g) < 0.2] = IGNORE
        acc = F64 if self.dtype == F64 else F32
        if self.per_row_temperature:
            temperature = (self.temperature * (0.5 + torch.rand(self.n, generator=g, dtype=F64))).to(acc)
        else:
            temperature = self.temperature
        single = finite.sum(-1) == 1  # rows whose only finite logit is the label: exact zeros expected
        single &= labels != IGNORE
        single &= finite.gather(1, labels.clamp(min=0).unsqueeze(1)).squeeze(1)
        g_lp = torch.randn(self.n, generator=g, dtype=F64).to(acc)
        g_h = torch.randn(self.n, generator=g, dtype=F64).to(acc)
        return x, labels, temperature, single, g_lp, g_h


def cases(*, max_n: int, max_v: int, dtypes, patterns=PATTERNS):
    return st.builds(
        Case,
        n=st.integers(1, max_n),
        vocab=st.one_of(st.sampled_from([v for v in (1, 2, 3, 8, 9, 17) if v <= max_v]),
                        st.integers(1, max_v)),
        dtype=st.sampled_from(dtypes),
        pattern=st.sampled_from(patterns),
        temperature=TEMPERATURES,
        per_row_temperature=st.booleans(),
        label_at_max=st.booleans(),
        seed=st.integers(0, 2**31 - 1),
    )


def assert_invariants(tag, labels, lp, ent, rank=None, single=None, grad=None) -> None:
    """log p <= 0, H >= 0, rank >= 1 on valid rows; exact zeros on single-candidate rows."""
    valid = labels != IGNORE
    lp_v, h_v = lp[valid], ent[valid]
    assert not torch.isnan(lp_v).any(), f"{tag}: NaN log-prob"
    assert bool((lp_v <= 0).all()), f"{tag}: log p > 0: max {float(lp_v.max()):.3e}"
    assert bool((h_v >= 0).all()), f"{tag}: H < 0: min {float(h_v.min()):.3e}"
    if rank is not None:
        assert bool((rank[valid] >= 1).all()), f"{tag}: rank < 1"
    if single is not None and bool(single.any()):
        assert bool((lp[single] == 0).all()), f"{tag}: single-candidate log p != 0: {lp[single].tolist()}"
        assert bool((ent[single] == 0).all()), f"{tag}: single-candidate H != 0: {ent[single].tolist()}"
        if grad is not None:
            g = grad[single]
            assert bool((g == 0).all()), f"{tag}: single-candidate gradient != 0: {float(g.abs().max())}"


# ----------------------------------------------------------------------------------------------------------
# token_logprobs
# ----------------------------------------------------------------------------------------------------------


def _run_token_logprobs(case: Case, impl: str):
    _skip_unless(impl, case.dtype)
    x, labels, temperature, single, g_lp, g_h = case.build()
    xg = x.clone().requires_grad_()
    out = token_logprobs(xg, labels, temperature=temperature, want_entropy=True, want_rank=True, impl=impl,
                         validate=False)
    ((out.logprobs * g_lp).sum() + (out.entropy * g_h).sum()).backward()
    tag = f"{impl} {case}"
    assert_invariants(tag, labels, out.logprobs.detach(), out.entropy.detach(), out.rank, single, xg.grad)
    assert bool(torch.isfinite(xg.grad.double()).all()), f"{tag}: non-finite gradient"


@pytest.mark.parametrize("impl", ["cpp", "reference"])
@settings(max_examples=500, **SETTINGS)
@given(case=cases(max_n=12, max_v=300, dtypes=(F32, BF16, F16, F64)))
def test_token_logprobs_invariants(impl, case):
    _run_token_logprobs(case, impl)


@pytest.mark.parametrize("impl", ["cpp", "reference"])
@settings(max_examples=40, **SETTINGS)
@given(case=cases(max_n=3, max_v=5000, dtypes=(F32, BF16, F64)))
def test_token_logprobs_invariants_across_chunks(impl, case):
    """Vocabularies over the C++ chunk (2048): the shift is rescaled when a later chunk has a larger max."""
    _run_token_logprobs(case, impl)


@settings(max_examples=40, **SETTINGS)
@given(case=cases(max_n=4, max_v=64, dtypes=(F32, BF16, F16)))
def test_token_logprobs_invariants_triton(case):
    _run_token_logprobs(case, "triton")


# ----------------------------------------------------------------------------------------------------------
# linear_token_logprobs (its own Triton kernels; the C++ op reuses the row kernels on GEMM chunks)
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LinearCase:
    n: int
    vocab: int
    hdim: int
    dtype: torch.dtype
    confident: bool
    bias: bool
    temperature: float
    seed: int

    def build(self):
        g = torch.Generator().manual_seed(self.seed)
        h = torch.randn(self.n, self.hdim, generator=g, dtype=F64)
        w = torch.randn(self.vocab, self.hdim, generator=g, dtype=F64) / math.sqrt(self.hdim)
        labels = torch.randint(0, self.vocab, (self.n,), generator=g)
        if self.confident:  # the label's logit dominates (~20-60 above the rest)
            gap = 20 + 40 * torch.rand(self.n, 1, generator=g, dtype=F64)
            w[labels] += h * gap / h.pow(2).sum(-1, True)
        b = torch.randn(self.vocab, generator=g, dtype=F64) if self.bias else None
        if self.n > 1:
            labels[0] = IGNORE
        return h.to(self.dtype), w.to(self.dtype), None if b is None else b.to(self.dtype), labels


def linear_cases(*, max_n: int, max_v: int, dtypes):
    return st.builds(
        LinearCase,
        n=st.integers(1, max_n),
        vocab=st.integers(1, max_v),
        hdim=st.sampled_from([1, 4, 16]),
        dtype=st.sampled_from(dtypes),
        confident=st.booleans(),
        bias=st.booleans(),
        temperature=TEMPERATURES,
        seed=st.integers(0, 2**31 - 1),
    )


def _run_linear(case: LinearCase, impl: str):
    _skip_unless(impl, case.dtype)
    h, w, b, labels = case.build()
    out = linear_token_logprobs(h, w, labels, bias=b, temperature=case.temperature, want_entropy=True,
                                want_rank=True, impl=impl, validate=False)
    assert_invariants(f"{impl} {case}", labels, out.logprobs, out.entropy, out.rank)


@pytest.mark.parametrize("impl", ["cpp", "reference"])
@settings(max_examples=200, **SETTINGS)
@given(case=linear_cases(max_n=8, max_v=200, dtypes=(F32, BF16, F16, F64)))
def test_linear_token_logprobs_invariants(impl, case):
    _run_linear(case, impl)


@settings(max_examples=25, **SETTINGS)
@given(case=linear_cases(max_n=4, max_v=80, dtypes=(F32, BF16)))
def test_linear_token_logprobs_invariants_triton(case):
    _run_linear(case, "triton")


def test_linear_single_candidate_exact_zeros():
    """A -inf bias leaves one finite logit: lp = H = 0 and no gradient, at T != 1 (cpp, reference)."""
    h = torch.randn(3, 4, dtype=F64)
    w = torch.randn(5, 4, dtype=F64)
    b = torch.full((5,), NEG_INF, dtype=F64)
    b[2] = 0.5
    labels = torch.tensor([2, 2, 2])
    for impl in ("cpp", "reference"):
        for dtype in (F32, F64):
            hg = h.to(dtype).clone().requires_grad_()
            wg = w.to(dtype).clone().requires_grad_()
            out = linear_token_logprobs(hg, wg, labels, bias=b.to(dtype), temperature=0.7, want_entropy=True,
                                        impl=impl, validate=False)
            (out.logprobs.sum() + 2 * out.entropy.sum()).backward()
            assert bool((out.logprobs == 0).all()) and bool((out.entropy == 0).all()), (impl, dtype, out)
            assert bool((hg.grad == 0).all()) and bool((wg.grad == 0).all()), (impl, dtype)


# ----------------------------------------------------------------------------------------------------------
# The single-pass fused policy-loss kernels (their own copy of the row sweep)
# ----------------------------------------------------------------------------------------------------------

# params of csrc/cpu/policy_loss.cpp: eps_low, eps_high, delta, dual_clip_c, log_ratio_clamp, cispo_max,
# tau_pos, tau_neg, has_old, kl_bias_correction. Clip loss, no KL, no old log-probs.
_PARAMS = [0.2, 0.28, math.inf, 0.0, math.inf, 5.0, 1.0, 1.05, 0.0, 1.0]


def _fused(impl: str):
    if impl == "cpp":
        from reasonrl._backend import load_extension

        load_extension()
        return torch.ops.reasonrl.policy_loss_fused
    from reasonrl.kernels.policy_loss import policy_loss_fused

    return policy_loss_fused


def _run_fused(case: Case, impl: str):
    _skip_unless(impl, case.dtype)
    x, labels, temperature, single, _, _ = case.build()
    acc = F64 if case.dtype == F64 else F32
    g = torch.Generator().manual_seed(case.seed + 1)
    inputs = torch.zeros(case.n, 6, dtype=acc)
    inputs[:, 0] = torch.randn(case.n, generator=g, dtype=F64).to(acc)  # advantage
    inputs[:, 3] = 1.0 / case.n  # c_pg
    inputs[:, 5] = torch.randn(case.n, generator=g, dtype=F64).to(acc) * 0.1  # g_H
    if isinstance(temperature, torch.Tensor):
        temp_t, temp_s = temperature.to(acc).contiguous(), 1.0
    else:
        temp_t, temp_s = None, float(temperature)
    kernel = _fused(impl)
    lp, ent, _, _, _, grad = kernel(x.contiguous(), labels, temp_t, temp_s, IGNORE, inputs, 0, 0, _PARAMS)
    assert_invariants(f"fused {impl} {case}", labels, lp, ent, None, single, grad)


@settings(max_examples=300, **SETTINGS)
@given(case=cases(max_n=12, max_v=300, dtypes=(F32, BF16, F16, F64)))
def test_fused_policy_loss_invariants_cpp(case):
    _run_fused(case, "cpp")


@settings(max_examples=30, **SETTINGS)
@given(case=cases(max_n=4, max_v=64, dtypes=(F32, BF16)))
def test_fused_policy_loss_invariants_triton(case):
    _run_fused(case, "triton")


# ----------------------------------------------------------------------------------------------------------
# fp64: the 2x rule of docs/ops.md section 8 against plain torch, at large V
# ----------------------------------------------------------------------------------------------------------


def _oracle_longdouble(x: torch.Tensor, labels: torch.Tensor, tau: float):
    """LSE, log p and H in x87 extended precision (64-bit significand): ~1e-19 relative, far below fp64."""
    z = x.numpy().astype(np.longdouble) / np.longdouble(tau)
    m = z.max(axis=1, keepdims=True)
    e = np.exp(z - m)
    s = e.sum(axis=1, keepdims=True)
    log_s = np.log(s)
    lse = (m + log_s)[:, 0]
    lp = z[np.arange(len(labels)), labels.numpy()] - lse
    h = -((e / s) * ((z - m) - log_s)).sum(axis=1)
    return lse, lp, h


def _max_err(a: torch.Tensor, oracle) -> float:
    return float(np.max(np.abs(a.detach().numpy().astype(np.longdouble) - oracle)))


_HAVE_LONG_DOUBLE = np.finfo(np.longdouble).nmant >= 60


@pytest.mark.skipif(not _HAVE_LONG_DOUBLE, reason="needs x87 extended long double for the oracle")
@pytest.mark.parametrize("impl", ["cpp", "reference"])
@settings(max_examples=12, **SETTINGS)
@given(
    vocab=st.one_of(st.just(40000), st.integers(20000, 65536)),
    pattern=st.sampled_from(["ties_int", "one_max", "gaussian", "constant"]),
    tau=st.sampled_from([1.0, 0.7, 1.3]),
    seed=st.integers(0, 2**31 - 1),
)
def test_fp64_error_within_2x_of_torch_at_large_vocab(impl, vocab, pattern, tau, seed):
    """err(impl) <= 2 err(plain torch fp64) + 2 ulp, for LSE, log p and H (the rule of the other dtypes).
    Before compensated summation the fp64 LSE error was up to 113x torch's at V = 40000 (tied logits)."""
    _skip_unless(impl, F64)
    g = torch.Generator().manual_seed(seed)
    n = 4
    if pattern == "ties_int":
        x = torch.randint(-3, 4, (n, vocab), generator=g).to(F64)
    elif pattern == "one_max":
        x = torch.full((n, vocab), -1.7, dtype=F64)
        x[:, int(torch.randint(0, vocab, (1,), generator=g))] = 2.0
    elif pattern == "constant":
        x = torch.full((n, vocab), 0.3, dtype=F64)
    else:
        x = torch.randn(n, vocab, generator=g, dtype=F64) * 2
    labels = torch.randint(0, vocab, (n,), generator=g)
    lse_o, lp_o, h_o = _oracle_longdouble(x, labels, tau)
    out = token_logprobs(x, labels, temperature=tau, want_entropy=True, return_lse=True, impl=impl)
    z = x / tau
    log_p = torch.log_softmax(z, dim=-1)
    plain = {
        "lse": torch.logsumexp(z, dim=-1),
        "lp": log_p.gather(1, labels[:, None])[:, 0],
        "H": -(log_p.exp() * log_p).sum(-1),
    }
    eps = float(np.finfo(np.float64).eps)
    for name, got, oracle in (("lse", out.lse, lse_o), ("lp", out.logprobs, lp_o), ("H", out.entropy, h_o)):
        err, err_torch = _max_err(got, oracle), _max_err(plain[name], oracle)
        bound = 2 * err_torch + 2 * eps * (1 + float(np.max(np.abs(oracle))))
        assert err <= bound, f"{impl} {name} V={vocab} {pattern} tau={tau}: err {err:.3e} > {bound:.3e} " \
                             f"(torch {err_torch:.3e})"


# ----------------------------------------------------------------------------------------------------------
# Regression tests: the reproducers of issue 10
# ----------------------------------------------------------------------------------------------------------


def _impls(dtype):
    cpu = torch.device("cpu")
    return [i for i in ("cpp", "reference", "triton") if unavailable_reason(i, cpu, dtype) is None]


def test_reproducer_confident_row_at_temperature_0_7():
    """[[45, 0, 1, -2]], label 0, T = 0.7 gave lp = +3.9e-8 and H = -3.9e-8 on cpp."""
    for impl in _impls(F32):
        out = token_logprobs(torch.tensor([[45.0, 0.0, 1.0, -2.0]]), torch.tensor([0]), temperature=0.7,
                             want_entropy=True, impl=impl)
        assert float(out.logprobs) <= 0 and float(out.entropy) >= 0, (impl, out)
        # The true values: lp = -exp(-45/0.7 + 1/0.7) ~ -1e-27 (0 in fp32 rounding), H ~ 6e-26.
        assert abs(float(out.logprobs)) < 1e-20 and float(out.entropy) < 1e-20, (impl, out)


@pytest.mark.parametrize("dtype", [F32, BF16, F16, F64])
def test_no_confident_row_has_positive_logprob_at_temperature_0_7(dtype):
    """4096 confident rows at T = 0.7: before the fix about half (2018) had lp > 0 and H < 0 on cpp."""
    g = torch.Generator().manual_seed(0)
    n = 4096
    x = torch.randn(n, 4, generator=g) * 2
    x[:, 0] = 30 + 30 * torch.rand(n, generator=g)
    labels = torch.zeros(n, dtype=torch.long)
    for impl in _impls(dtype):
        rows = slice(None) if impl != "triton" else slice(0, 256)  # the interpreter is slow
        out = token_logprobs(x[rows].to(dtype), labels[rows], temperature=0.7, want_entropy=True, impl=impl)
        assert int((out.logprobs > 0).sum()) == 0, f"{impl}: {int((out.logprobs > 0).sum())} rows with lp > 0"
        assert int((out.entropy < 0).sum()) == 0, f"{impl}: {int((out.entropy < 0).sum())} rows with H < 0"


@pytest.mark.parametrize("dtype", [F32, BF16, F16, F64])
@pytest.mark.parametrize("row", [[3.3], [3.3, NEG_INF, NEG_INF], [NEG_INF, -7.25, NEG_INF, NEG_INF]])
def test_single_candidate_rows_are_exactly_zero(dtype, row):
    """V = 1 and single-finite-logit rows gave lp = -4.9e-9, H = 4.9e-9 and a 1e-14 gradient at T = 0.7."""
    labels = torch.tensor([int(np.argmax(row))])
    for impl in _impls(dtype):
        x = torch.tensor([row], dtype=dtype, requires_grad=True)
        out = token_logprobs(x, labels, temperature=0.7, want_entropy=True, want_rank=True, impl=impl)
        (out.logprobs.sum() * 1.5 + out.entropy.sum() * 0.5).backward()
        assert float(out.logprobs.detach()) == 0.0 and float(out.entropy.detach()) == 0.0, (impl, out)
        assert int(out.rank) == 1
        assert bool((x.grad == 0).all()), (impl, x.grad)


def test_fp64_rank_compares_raw_logits_in_fp64():
    """x = [[1, 1 + 1e-12, 0.5]] (fp64), label 0: rank 2 (the fp32-rounded comparison said 1)."""
    x = torch.tensor([[1.0, 1.0 + 1e-12, 0.5]], dtype=F64)
    for impl in _impls(F64):
        assert int(token_logprobs(x, torch.tensor([0]), want_rank=True, impl=impl).rank) == 2, impl
    # The linear op: logits h W^T = x exactly (h = 1, W = x^T).
    h = torch.ones(1, 1, dtype=F64)
    w = x.reshape(3, 1)
    for impl in ("cpp", "reference"):
        if unavailable_reason(impl, torch.device("cpu"), F64) is None:
            out = linear_token_logprobs(h, w, torch.tensor([0]), want_rank=True, impl=impl)
            assert int(out.rank) == 2, impl


def test_fp64_tied_logits_lse_at_40000():
    """V = 40000 tied logits: the sequential sum's LSE error was 4.6e-13 (7.5e-14 here at T = 0.7), against
    ~1e-15 for torch.logsumexp."""
    g = torch.Generator().manual_seed(3)
    x = torch.randint(-3, 4, (8, 40000), generator=g).to(F64)
    labels = torch.randint(0, 40000, (8,), generator=g)
    lse_o = _oracle_longdouble(x, labels, 0.7)[0] if _HAVE_LONG_DOUBLE else None
    out = token_logprobs(x, labels, temperature=0.7, return_lse=True, impl="cpp")
    ref = torch.logsumexp(x / 0.7, dim=-1)
    assert float((out.lse - ref).abs().max()) < 1e-14
    if lse_o is not None:
        assert _max_err(out.lse, lse_o) <= 2 * _max_err(ref, lse_o) + 4e-15


def test_subnormal_temperature_is_a_clear_error():
    """temperature = 1e-40 passed the check and then raised FloatingPointError blaming NaN / +inf logits."""
    x, y = torch.randn(2, 5), torch.tensor([0, 1])
    for impl in _impls(F32):
        with pytest.raises(ValueError, match="temperature must be finite and >= 1.175494e-38.*1e-40"):
            token_logprobs(x, y, temperature=1e-40, impl=impl)
        with pytest.raises(ValueError, match="temperature must be finite and >= 1.175494e-38 everywhere"):
            token_logprobs(x, y, temperature=torch.tensor([1.0, 1e-40], dtype=F64), impl=impl)
    with pytest.raises(ValueError, match="temperature must be finite and >= 1.175494e-38"):
        linear_token_logprobs(torch.randn(2, 3), torch.randn(5, 3), y, temperature=1e-40, impl="reference")
    # fp64 logits have fp64 arithmetic: 1e-300 is a valid (if extreme) temperature there.
    out = token_logprobs(torch.tensor([[1.0, 0.0]], dtype=F64), torch.tensor([0]), temperature=1e-300,
                         impl="reference")
    assert float(out.logprobs) == 0.0
    # validate=False (a tensor temperature is only checked with validation on): the rows are NaN (invalid
    # temperature), consistently across implementations, and their gradient is 0.
    for impl in _impls(F32):
        xg = x.clone().requires_grad_()
        out = token_logprobs(xg, y, temperature=torch.full((2,), 1e-40), want_entropy=True, impl=impl,
                             validate=False)
        assert bool(torch.isnan(out.logprobs).all()) and bool(torch.isnan(out.entropy).all()), impl
        out.logprobs.nan_to_num().sum().backward()
        assert bool((xg.grad == 0).all()), impl


def test_meta_tensors():
    """impl='cpp' on meta tensors failed inside validation ("Tensor.item() cannot be called on meta tensors");
    now the implementation choice says what runs on meta, and 'auto' / 'reference' compute shapes."""
    x = torch.empty(3, 7, device="meta")
    y = torch.empty(3, dtype=torch.long, device="meta")
    if unavailable_reason("cpp", torch.device("cpu"), F32) is None:
        with pytest.raises(RuntimeError, match="impl='cpp'.*meta"):
            token_logprobs(x, y, impl="cpp")
        with pytest.raises(RuntimeError, match="impl='cpp'.*meta"):
            linear_token_logprobs(torch.empty(3, 4, device="meta"), torch.empty(7, 4, device="meta"), y,
                                  impl="cpp")
    for impl in ("auto", "reference"):
        out = token_logprobs(x, y, want_entropy=True, impl=impl, validate=True)
        assert out.logprobs.device.type == "meta" and out.logprobs.shape == (3,)
