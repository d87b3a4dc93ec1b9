"""The numerical acceptance rule of docs/ops.md section 8, its ONE tolerance table, and the realistic input
generators (logits with a target entropy, labels sampled from the softmax, ignored rows).

Used by the test suite (tests/) and by the benchmarks (reasonrl.bench), which check every provider against
the reference before timing it: both draw their inputs from the generators here. Nothing here is imported
by ``import reasonrl``; it only needs torch. The token_logprobs test runners (run the op, the reference and
every check on one case) are tests/_token_logprobs_checks.py.

The rule (flash-attention's and cut-cross-entropy's): with err(x) = max |x - oracle| over the valid rows,
where the oracle is the reference implementation run in float64 on the same input values (16-bit inputs
are upcast exactly),

    err(impl) <= ref_factor * err(reference in fp32, or in the input dtype) + atol

* ``logprobs`` / ``entropy`` / ``lse``: atol = 1e-5 * (1 + max |oracle|).
* fp32 ``grad_logits``: atol = 1e-7 * max(|g_lp|, |g_H|) (the upstream gradients).
* bf16 / fp16 ``grad_logits``: additionally 1 ulp of the gradient dtype at the oracle value, element-wise
  (the gradient is returned in the logits dtype, so rounding it once costs up to half an ulp).
* float64 inputs (cpp and reference only): the same form with a float64-sized atol.
* gradient row sums: |sum_j dz_j| <= 1e-5 * (|g_lp| + |g_H|) in fp32 (dz = tau * dx).

Non-finite oracle values (lp = -inf for a label logit of -inf, NaN for an all -inf row) must be matched
exactly; a non-finite value where the oracle is finite is a failure. The assertion message names the
quantity, the worst element and every term of the bound.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch

from reasonrl.reference.token_logprobs import token_logprobs_reference

__all__ = [
    "Tolerance",
    "TOLERANCES",
    "tolerance",
    "ulp",
    "max_abs_error",
    "assert_close_to_oracle",
    "assert_stat_close",
    "assert_grad_close",
    "assert_grad_row_sums",
    "assert_param_grad_close",
    "make_logits",
    "sample_labels",
    "make_token_logprobs_inputs",
    "TokenLogprobsCase",
    "row_entropy",
    "row_chunks",
    "calibrate_scale",
    "lm_head_weight",
    "sample_labels_chunked",
    "ignore_rows_and_upstream",
    "tiny_config",
    "tiny_causal_lm",
    "word_tokenizer",
]


# ----------------------------------------------------------------------------------------------------------
# The tolerance table
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tolerance:
    """One line of the rule: err <= ref_factor * err(reference) + atol_scale * magnitude (+ ulps)."""

    ref_factor: float
    atol_scale: float
    ulps: float = 0.0


_STAT_LOW = Tolerance(ref_factor=2.0, atol_scale=1e-5)
# fp64 inputs: the oracle is the reference in fp64 itself, so err(reference) is 0 and the atol must be sized
# for float64 arithmetic (a cpp fp64 kernel is scalar double code: errors are ~1e-15 relative).
_STAT_F64 = Tolerance(ref_factor=2.0, atol_scale=1e-10)

#: (quantity, dtype) -> Tolerance. "stat" covers logprobs, entropy and lse; "grad" covers grad_logits with
#: magnitude max(|g_lp|, |g_H|); "row_sum" is the gradient row-sum invariant (magnitude |g_lp| + |g_H|).
TOLERANCES: dict[tuple[str, torch.dtype], Tolerance] = {
    ("stat", torch.float32): _STAT_LOW,
    ("stat", torch.bfloat16): _STAT_LOW,
    ("stat", torch.float16): _STAT_LOW,
    ("stat", torch.float64): _STAT_F64,
    ("grad", torch.float32): Tolerance(ref_factor=2.0, atol_scale=1e-7),
    ("grad", torch.bfloat16): Tolerance(ref_factor=2.0, atol_scale=1e-7, ulps=1.0),
    ("grad", torch.float16): Tolerance(ref_factor=2.0, atol_scale=1e-7, ulps=1.0),
    ("grad", torch.float64): Tolerance(ref_factor=2.0, atol_scale=1e-12),
    ("row_sum", torch.float32): Tolerance(ref_factor=0.0, atol_scale=1e-5),
    ("row_sum", torch.float64): Tolerance(ref_factor=0.0, atol_scale=1e-12),
    # grad_hidden / grad_weight / grad_bias of linear_token_logprobs (docs/ops.md section 8: 2 x the error of
    # the reference in the input dtype with fp32 accumulation, + atol); magnitude max |oracle gradient|.
    ("grad_param", torch.float32): Tolerance(ref_factor=2.0, atol_scale=1e-6),
    ("grad_param", torch.bfloat16): Tolerance(ref_factor=2.0, atol_scale=1e-6, ulps=1.0),
    ("grad_param", torch.float16): Tolerance(ref_factor=2.0, atol_scale=1e-6, ulps=1.0),
    ("grad_param", torch.float64): Tolerance(ref_factor=2.0, atol_scale=1e-12),
}


def tolerance(quantity: str, dtype: torch.dtype) -> Tolerance:
    """The table entry for ``quantity`` ('stat', 'grad', 'row_sum') and input dtype ``dtype``."""
    try:
        return TOLERANCES[(quantity, dtype)]
    except KeyError:
        raise KeyError(f"no tolerance for quantity={quantity!r}, dtype={dtype}") from None


_SIGNIFICAND_BITS = {torch.float16: 11, torch.bfloat16: 8, torch.float32: 24, torch.float64: 53}


def ulp(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Spacing of ``dtype`` numbers at each of ``values`` (float64 result; subnormal spacing near 0)."""
    p = _SIGNIFICAND_BITS[dtype]
    v = values.detach().to(torch.float64).abs()
    _, e = torch.frexp(v)  # v = m * 2**e, 0.5 <= m < 1
    _, e_min = torch.frexp(torch.tensor(torch.finfo(dtype).tiny, dtype=torch.float64))
    e = torch.where(v == 0, e_min.to(e.dtype), torch.clamp(e, min=int(e_min)))  # frexp(0) has exponent 0
    return torch.ldexp(torch.ones_like(v), (e - p).to(torch.float64))


# ----------------------------------------------------------------------------------------------------------
# The assertion
# ----------------------------------------------------------------------------------------------------------


def _rows(t: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    t = t.detach().to(torch.float64)
    if valid is None:
        return t.reshape(-1)
    valid = valid.to(device=t.device, dtype=torch.bool)
    if valid.shape != t.shape[: valid.dim()]:
        raise ValueError(
            f"valid mask shape {tuple(valid.shape)} does not prefix tensor shape {tuple(t.shape)}"
        )
    return t[valid].reshape(-1)


def max_abs_error(actual: torch.Tensor, oracle: torch.Tensor, valid: torch.Tensor | None = None) -> float:
    """max |actual - oracle| over the valid rows and the finite oracle entries (0.0 when there are none)."""
    a, o = _rows(actual, valid), _rows(oracle, valid)
    fin = torch.isfinite(o)
    if not bool(fin.any()):
        return 0.0
    return float((a[fin] - o[fin]).abs().max())


def assert_close_to_oracle(
    actual: torch.Tensor,
    oracle: torch.Tensor,
    reference_same_dtype: torch.Tensor | None,
    *,
    atol_scale: float,
    name: str,
    valid: torch.Tensor | None = None,
    magnitude: float | None = None,
    ulp_dtype: torch.dtype | None = None,
    ref_factor: float = 2.0,
) -> None:
    """Assert ``err(actual) <= ref_factor * err(reference_same_dtype) + atol_scale * magnitude``
    (docs/ops.md 8).

    Args:
        actual: the implementation's result, ``[...]`` (statistics) or ``[..., V]`` (gradients).
        oracle: the float64 reference on the same input values, same shape.
        reference_same_dtype: the plain-PyTorch reference computed in fp32 (16-bit / fp32 inputs) or in the
            input dtype; ``None`` means err(reference) = 0.
        atol_scale: 1e-5 for statistics, 1e-7 for gradients (see ``TOLERANCES``).
        name: the quantity, for the message (e.g. ``"cpp bfloat16 entropy"``).
        valid: boolean mask over the leading (row) dimensions; errors are measured on these rows only.
        magnitude: what atol_scale multiplies; default ``1 + max |oracle|`` over valid finite entries (the
            statistics rule). Gradients pass ``max(|g_lp|, |g_H|)``.
        ulp_dtype: if given, each element may also be off by one ulp of this dtype at the oracle value.
        ref_factor: the 2 of the rule.
    """
    __tracebackhide__ = True  # pytest: show the caller, not this helper
    if actual.shape != oracle.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != oracle shape {tuple(oracle.shape)}")
    a, o = _rows(actual, valid), _rows(oracle, valid)
    n_rows = int(valid.sum()) if valid is not None else (oracle.shape[0] if oracle.dim() else 1)

    def fail_if_any(bad: torch.Tensor, what: str) -> None:
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise AssertionError(
                f"{name}: {int(bad.sum())} {what}; first at flat index {i}: "
                f"impl={float(a[i])!r}, oracle={float(o[i])!r}"
            )

    # Non-finite oracle entries must be reproduced exactly (NaN where NaN, the same infinity where infinite).
    fin = torch.isfinite(o)
    same = (torch.isnan(o) & torch.isnan(a)) | (o == a)
    fail_if_any(~fin & ~same, "entries where the oracle is non-finite differ")
    fail_if_any(fin & ~torch.isfinite(a), "non-finite entries where the oracle is finite")
    if not bool(fin.any()):
        return

    a, o = a[fin], o[fin]
    err_ref = 0.0
    if reference_same_dtype is not None:
        r = _rows(reference_same_dtype, valid)[fin]
        if not bool(torch.isfinite(r).all()):
            raise AssertionError(
                f"{name}: the fp32 reference itself is non-finite where the oracle is finite"
            )
        err_ref = float((r - o).abs().max())
    max_oracle = float(o.abs().max())
    if magnitude is None:
        magnitude = 1.0 + max_oracle
    atol = atol_scale * float(magnitude)
    bound = ref_factor * err_ref + atol
    diff = (a - o).abs()
    allowed = torch.full_like(diff, bound)
    if ulp_dtype is not None:
        allowed = allowed + ulp(o, ulp_dtype)
    excess = diff - allowed
    if bool((excess > 0).any()):
        i = int(excess.argmax())
        ulp_txt = f" + 1 ulp({ulp_dtype}) = {float(allowed[i] - bound):.3e}" if ulp_dtype is not None else ""
        raise AssertionError(
            f"{name}: err = max|impl - oracle| = {float(diff.max()):.3e} exceeds the docs/ops.md section 8 "
            f"bound; worst element (flat index {i} of the valid finite entries): "
            f"|{float(a[i])!r} - {float(o[i])!r}| = "
            f"{float(diff[i]):.3e} > allowed {float(allowed[i]):.3e} = {ref_factor:g} x err(reference) "
            f"{err_ref:.3e} + atol {atol:.3e} ({atol_scale:g} x {float(magnitude):.4g}){ulp_txt}; "
            f"max|oracle| = {max_oracle:.4g}, rows checked = {n_rows}"
        )


def _assert_table_line(quantity, actual, oracle, reference_same_dtype, *, dtype, name, valid=None,
                       magnitude=None) -> None:
    """``assert_close_to_oracle`` with the ``quantity`` line of ``TOLERANCES`` for input dtype ``dtype``: its
    ref_factor and atol_scale, and 1 ulp of ``dtype`` per element where the line grants it."""
    __tracebackhide__ = True
    tol = tolerance(quantity, dtype)
    assert_close_to_oracle(actual, oracle, reference_same_dtype, atol_scale=tol.atol_scale, name=name,
                           valid=valid, magnitude=magnitude, ulp_dtype=dtype if tol.ulps else None,
                           ref_factor=tol.ref_factor)


def assert_stat_close(actual, oracle, reference_same_dtype, *, dtype, name, valid=None) -> None:
    """``assert_close_to_oracle`` with the statistics line of ``TOLERANCES`` for input dtype ``dtype``."""
    __tracebackhide__ = True
    _assert_table_line("stat", actual, oracle, reference_same_dtype, dtype=dtype, name=name, valid=valid)


def _grad_magnitude(g_lp, g_h, valid) -> float:
    mags = [0.0]
    for g in (g_lp, g_h):
        if g is not None and g.numel():
            gv = _rows(g, valid)
            if gv.numel():
                mags.append(float(gv.abs().max()))
    return max(mags)


def assert_grad_close(actual, oracle, reference_same_dtype, *, dtype, g_lp, g_h, name, valid=None) -> None:
    """``assert_close_to_oracle`` for ``grad_logits``: atol = 1e-7 max(|g_lp|, |g_H|), +1 ulp for 16-bit."""
    __tracebackhide__ = True
    _assert_table_line("grad", actual, oracle, reference_same_dtype, dtype=dtype, name=name, valid=valid,
                       magnitude=_grad_magnitude(g_lp, g_h, valid))


def assert_param_grad_close(actual, oracle, reference_same_dtype, *, dtype, name) -> None:
    """``assert_close_to_oracle`` for a parameter gradient (grad_hidden / grad_weight / grad_bias of
    linear_token_logprobs): the ``grad_param`` line of ``TOLERANCES``, magnitude max |oracle|, + 1 ulp of
    the gradient dtype for 16-bit inputs."""
    __tracebackhide__ = True
    magnitude = float(oracle.detach().abs().max()) if oracle.numel() else 0.0
    _assert_table_line("grad_param", actual, oracle, reference_same_dtype, dtype=dtype, name=name,
                       magnitude=magnitude)


def assert_grad_row_sums(grad_logits, temperature, *, g_lp, g_h, name, valid=None) -> None:
    """|sum_j dz_j| <= 1e-5 (|g_lp| + |g_H|) per valid row, dz = tau * dx
    (docs/ops.md 2.3 invariant, fp32)."""
    __tracebackhide__ = True
    dtype = torch.float64 if grad_logits.dtype == torch.float64 else torch.float32
    tol = tolerance("row_sum", dtype)
    lead = grad_logits.shape[:-1]
    sums = grad_logits.detach().to(torch.float64).sum(-1)
    if isinstance(temperature, torch.Tensor):
        tau = (
            temperature.detach().to(torch.float64).expand(lead)
            if temperature.dim() == 0
            else temperature.to(torch.float64)
        )
    else:
        tau = torch.full(lead, float(temperature), dtype=torch.float64)
    sums = sums * tau
    scale = torch.zeros(lead, dtype=torch.float64)
    for g in (g_lp, g_h):
        if g is not None:
            scale = scale + g.detach().to(torch.float64).abs()
    allowed = tol.atol_scale * scale
    over = sums.abs() - allowed
    if valid is not None:
        over = torch.where(valid.reshape(lead), over, torch.full_like(over, -1.0))
    sums, allowed, over = sums.reshape(-1), allowed.reshape(-1), over.reshape(-1)
    if over.numel() and bool((over > 0).any()):
        i = int(over.argmax())
        raise AssertionError(
            f"{name}: {int((over > 0).sum())} rows break the row-sum invariant; worst: flattened row {i} "
            f"sums to {float(sums[i]):.3e} (times tau), allowed |sum| <= "
            f"{tol.atol_scale:g} x (|g_lp| + |g_H|) = "
            f"{float(allowed[i]):.3e}"
        )


# ----------------------------------------------------------------------------------------------------------
# Realistic inputs
# ----------------------------------------------------------------------------------------------------------


# Two generators share these helpers. The tests' (make_logits, sample_labels, make_token_logprobs_inputs)
# draw a target entropy per row and sample in float64 on the CPU: small shapes, every row different. The
# benchmarks' (lm_head_weight, calibrate_scale, sample_labels_chunked, ignore_rows_and_upstream; composed
# into rotating input sets by reasonrl.bench.inputs) build logits as hidden states times one lm_head whose
# scale sets the mean entropy, and sample row chunk by row chunk: [N, V] at benchmark sizes, bounded
# temporaries (docs/performance.md section 4.3).


def row_entropy(z: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Per-row entropy of softmax(z / temperature), from THE reference (labels are irrelevant to it)."""
    labels = torch.zeros(z.shape[:-1], dtype=torch.long, device=z.device)
    return token_logprobs_reference(z, labels, temperature=temperature, want_entropy=True).entropy


def make_logits(
    shape: tuple[int, ...] | int,
    vocab: int,
    *,
    dtype: torch.dtype = torch.float32,
    entropy: tuple[float, float] = (1.0, 3.0),
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Logits ``[*shape, vocab]`` whose rows have a softmax entropy drawn uniformly from ``entropy`` (nats).

    Like an LLM's next-token distribution at temperature 1: a Gaussian background scaled per row (by
    bisection on the scale) until the entropy hits its target; targets above 0.9 log(V) are
    capped there (a vocabulary of 1 has entropy 0). The result is rounded once to ``dtype``.
    """
    if isinstance(shape, int):
        shape = (shape,)
    n = math.prod(shape)
    base = torch.randn((n, vocab), generator=generator, dtype=torch.float64)
    lo_h, hi_h = entropy
    target = lo_h + (hi_h - lo_h) * torch.rand((n,), generator=generator, dtype=torch.float64)
    target = torch.minimum(target, torch.full_like(target, 0.9 * math.log(vocab)))
    lo = torch.zeros((n,), dtype=torch.float64)
    hi = torch.full((n,), 64.0, dtype=torch.float64)
    if n and vocab > 1:
        # The entropy of softmax(s * base) decreases monotonically in s (dH/ds = -s Var_p(base) <= 0).
        # Bisection in fp32 (the target only needs ~3 digits; this keeps [64, 5000] rows at ~0.1 s).
        base32 = base.float()
        target32 = target.float()
        for _ in range(22):
            mid = (lo + hi) / 2
            too_flat = row_entropy(base32 * mid.float()[:, None]) > target32
            lo = torch.where(too_flat, mid, lo)
            hi = torch.where(too_flat, hi, mid)
    scale = (lo + hi) / 2
    # An offset per row (LLM logits are not centred): exercises the max-subtraction of the kernels.
    offset = 4.0 * torch.randn((n, 1), generator=generator, dtype=torch.float64)
    x = base * scale[:, None] + offset
    return x.reshape(*shape, vocab).to(dtype=dtype, device=device)


def sample_labels(
    logits: torch.Tensor,
    *,
    temperature: float | torch.Tensor = 1.0,
    ignore_frac: float = 0.0,
    ignore_index: int = -100,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.int64,
) -> torch.Tensor:
    """Labels ``[...]`` sampled from ``softmax(logits / temperature)`` (as a rollout would), a fraction
    ``ignore_frac`` of the rows set to ``ignore_index`` (at least one when ignore_frac > 0 and N > 1)."""
    lead = logits.shape[:-1]
    vocab = logits.shape[-1]
    x = logits.detach().reshape(-1, vocab).to(torch.float64).cpu()
    n = x.shape[0]
    if n == 0:
        return torch.empty(lead, dtype=dtype, device=logits.device)
    if isinstance(temperature, torch.Tensor):
        tau = (
            temperature.detach().to(torch.float64).cpu().reshape(-1, 1)
            if temperature.dim()
            else float(temperature)
        )
    else:
        tau = float(temperature)
    p = torch.softmax(x / tau, dim=-1)
    p = torch.where(torch.isfinite(p), p, torch.zeros_like(p))
    p[p.sum(-1) == 0] = 1.0  # all -inf rows: any label
    labels = torch.multinomial(p, 1, generator=generator).squeeze(-1)
    if ignore_frac > 0 and n > 1:
        ignored = torch.rand((n,), generator=generator) < ignore_frac
        ignored[int(torch.randint(0, n, (1,), generator=generator))] = True
        labels = torch.where(ignored, torch.full_like(labels, ignore_index), labels)
    return labels.reshape(lead).to(dtype=dtype, device=logits.device)


class TokenLogprobsCase(NamedTuple):
    """One set of inputs for ``token_logprobs`` plus random upstream gradients for both outputs."""

    logits: torch.Tensor
    labels: torch.Tensor
    temperature: float | torch.Tensor
    ignore_index: int
    g_lp: torch.Tensor  # fp32 (fp64 for fp64 logits), shape [...]
    g_h: torch.Tensor


def make_token_logprobs_inputs(
    shape: tuple[int, ...] | int,
    vocab: int,
    *,
    dtype: torch.dtype = torch.float32,
    temperature: str | float = 1.0,
    ignore_frac: float = 0.15,
    ignore_index: int = -100,
    seed: int = 0,
) -> TokenLogprobsCase:
    """A realistic case: entropy 1-3 nats, labels sampled from the softmax, some ignored rows.

    ``temperature``: a float, ``"row"`` (a per-row tensor in [0.5, 1.5]) or ``"0d"`` (a 0-d tensor of 0.7).
    """
    g = torch.Generator().manual_seed(seed)
    if isinstance(shape, int):
        shape = (shape,)
    logits = make_logits(shape, vocab, dtype=dtype, generator=g)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    if temperature == "row":
        temp: float | torch.Tensor = (0.5 + torch.rand(shape, generator=g, dtype=torch.float64)).to(acc)
    elif temperature == "0d":
        temp = torch.tensor(0.7, dtype=acc)
    else:
        temp = float(temperature)
    labels = sample_labels(
        logits, temperature=temp, ignore_frac=ignore_frac, ignore_index=ignore_index, generator=g
    )
    g_lp = torch.randn(shape, generator=g, dtype=torch.float64).to(acc)
    g_h = torch.randn(shape, generator=g, dtype=torch.float64).to(acc)
    return TokenLogprobsCase(logits, labels, temp, ignore_index, g_lp, g_h)


def row_chunks(n: int, row_elems: int, max_elems: int = 1 << 24) -> list[slice]:
    """Row slices of about ``max_elems`` elements each: bounded temporaries for row-wise [N, V] work."""
    step = max(1, max_elems // max(row_elems, 1))
    return [slice(i, min(i + step, n)) for i in range(0, n, step)]


def calibrate_scale(raw: torch.Tensor, temperature: float, target: float) -> float:
    """Scale s with mean entropy of softmax(s * raw / T) == target (entropy decreases monotonically in s).

    Bisection to 0.1% in s: the entropy of a set then lands within a few hundredths of a nat of the target,
    less than the spread between sets.
    """

    def mean_entropy(scale: float) -> float:
        return float(row_entropy(raw * scale, temperature).mean())

    lo, hi = 0.0, 1.0
    while mean_entropy(hi) > target:
        lo, hi = hi, 2.0 * hi
        if hi > 1e6:
            raise ValueError(f"cannot reach a mean entropy of {target} nats")
    while hi - lo > 1e-3 * hi:
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if mean_entropy(mid) > target else (lo, mid)
    return 0.5 * (lo + hi)


def lm_head_weight(
    vocab: int,
    hidden: int,
    *,
    temperature: float,
    target_entropy: float,
    generator: torch.Generator,
    device: torch.device | str = "cpu",
    scale: float | None = None,
) -> tuple[torch.Tensor, float]:
    """An fp32 lm_head ``[vocab, hidden]`` ~ N(0, 1/hidden) and the scale s such that for hidden states
    h ~ N(0, 1) the logits s * h W^T (entries ~ N(0, s^2)) have a mean entropy of ``target_entropy`` nats at
    ``temperature``.

    The weight is returned unscaled: callers apply s to the logits or to the weight, whichever they keep.
    The scale is calibrated on 128 rows drawn after the weight from ``generator`` unless given (a memory
    subprocess reuses its parent's value).
    """
    weight = torch.randn(vocab, hidden, generator=generator, device=device) / math.sqrt(hidden)
    if scale is None:
        probe = torch.randn(128, hidden, generator=generator, device=device) @ weight.T
        scale = calibrate_scale(probe, temperature, target_entropy)
    return weight, scale


def sample_labels_chunked(
    logits_of: Callable[[slice], torch.Tensor],
    n: int,
    vocab: int,
    *,
    temperature: float,
    generator: torch.Generator,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, float]:
    """Labels ``[n]`` sampled from softmax(logits / temperature) and the mean entropy of those rows.

    ``logits_of(rows)`` returns the fp32 logits of a row slice (a slice of a logits tensor, or hidden states
    times the lm_head): chunks of :func:`row_chunks`, so fp32 probabilities never exist for all rows at
    once. Labels are drawn from the distribution the op evaluates, as rollout tokens are, by inverting the
    CDF (one cumsum; several times faster than ``torch.multinomial`` on the CPU).
    """
    labels = torch.empty(n, dtype=torch.long, device=device)
    ent_sum = 0.0
    for rows in row_chunks(n, vocab):
        logp = torch.log_softmax(logits_of(rows) / temperature, dim=-1)
        probs = logp.exp()
        ent_sum += float(-(probs * logp).sum())
        cdf = probs.cumsum_(-1)
        u = torch.rand(cdf.shape[0], 1, generator=generator, device=device) * cdf[:, -1:]
        labels[rows] = torch.searchsorted(cdf, u).squeeze(-1).clamp_max_(vocab - 1)
    return labels, ent_sum / max(n, 1)


def ignore_rows_and_upstream(
    labels: torch.Tensor,
    *,
    ignore_fraction: float,
    ignore_index: int,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Set ``round(ignore_fraction * N)`` random rows of ``labels`` (in place) to ``ignore_index``; return the
    valid-row mask and random fp32 upstream gradients for the log-probs and the entropy, of both signs and
    zero on ignored rows (as the masked loss of a trainer gives)."""
    n = labels.shape[0]
    ignored = torch.randperm(n, generator=generator, device=labels.device)[: round(ignore_fraction * n)]
    labels[ignored] = ignore_index
    valid = labels != ignore_index
    g_lp = torch.randn(n, generator=generator, device=labels.device) * valid
    g_h = torch.randn(n, generator=generator, device=labels.device) * valid
    return valid, g_lp, g_h


# ----------------------------------------------------------------------------------------------------------
# Tiny transformers models and tokenizers (built from a config: nothing is downloaded)
# ----------------------------------------------------------------------------------------------------------


def tiny_config(
    family: str,
    vocab_size: int,
    *,
    hidden_size: int = 32,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    max_positions: int = 64,
    tie: bool = False,
    **extra,
):
    """A ``LlamaConfig`` / ``Qwen2Config`` (``family`` ``"llama"`` / ``"qwen2"``) of a random model small
    enough for a unit test: intermediate size 2 x hidden, grouped-query attention by default (heads /
    kv_heads).
    ``extra`` goes to the config as is (pad / eos ids, ``bos_token_id=None``, ...)."""
    import transformers

    classes = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config}
    if family not in classes:
        raise ValueError(f"tiny_config: family must be one of {sorted(classes)}, got {family!r}")
    return classes[family](
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=tie,
        **extra,
    )


def tiny_causal_lm(family: str, vocab_size: int, *, seed: int | None = None, dtype=None, **config):
    """A random ``LlamaForCausalLM`` / ``Qwen2ForCausalLM`` from :func:`tiny_config` (same keywords),
    initialised under ``torch.manual_seed(seed)`` when ``seed`` is given, cast to ``dtype``."""
    import transformers

    cfg = tiny_config(family, vocab_size, **config)
    if seed is not None:
        torch.manual_seed(seed)
    cls = transformers.LlamaForCausalLM if family == "llama" else transformers.Qwen2ForCausalLM
    model = cls(cfg)
    return model if dtype is None else model.to(dtype)


def word_tokenizer(words: list[str], *, unk: str, pad: str, eos: str):
    """A whitespace-split word-level ``PreTrainedTokenizerFast`` whose ids are the positions in ``words``
    (no training, no download): test and example prompts are written as the words themselves."""
    import tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(words)}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token=unk))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=unk, pad_token=pad, eos_token=eos)
