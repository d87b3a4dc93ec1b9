"""Test runners of ``token_logprobs``: run the public op and the reference on one
:class:`reasonrl.testing.TokenLogprobsCase` and check every output and gradient against the float64 oracle
with the acceptance rule of ``reasonrl.testing`` (docs/ops.md section 8).

Used by tests/ops/test_token_logprobs*.py and tests/test_testing.py (importable from every test module:
pytest puts tests/, the folder of the root conftest.py, on ``sys.path``). They live with the tests, not in
the package: only the tolerance table, the assertions and the input generators of ``reasonrl.testing`` are
shared with the benchmarks.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from reasonrl.reference.token_logprobs import token_logprobs_reference
from reasonrl.testing import (
    TokenLogprobsCase,
    assert_grad_close,
    assert_grad_row_sums,
    assert_stat_close,
)

__all__ = [
    "TokenLogprobsResult",
    "run_token_logprobs",
    "run_token_logprobs_reference",
    "valid_rows",
    "check_token_logprobs",
]


class TokenLogprobsResult(NamedTuple):
    logprobs: torch.Tensor
    entropy: torch.Tensor | None
    rank: torch.Tensor | None
    lse: torch.Tensor | None
    grad: torch.Tensor | None  # grad_logits, or None when no upstream gradient was given


def input_grad(leaf, out, case: TokenLogprobsCase, grad: str | None) -> torch.Tensor | None:
    """The gradient of ``leaf`` from the case's upstream gradients of ``out``'s log-probs and / or entropy
    (``grad`` 'both' / 'lp' / 'h', cast to the outputs' dtype), or None for ``grad=None``."""
    if grad is None:
        return None
    outputs, grads = [], []
    if grad in ("both", "lp"):
        outputs.append(out.logprobs)
        grads.append(case.g_lp.to(out.logprobs.dtype))
    if grad in ("both", "h"):
        outputs.append(out.entropy)
        grads.append(case.g_h.to(out.entropy.dtype))
    (g,) = torch.autograd.grad(outputs, [leaf], grads)
    return g


def _with_grad(leaf, out, case: TokenLogprobsCase, grad: str | None) -> TokenLogprobsResult:
    """``out`` and, if ``grad`` is 'both' / 'lp' / 'h', grad_logits (of ``leaf``): :func:`input_grad`."""
    return TokenLogprobsResult(*out, input_grad(leaf, out, case, grad))


def run_token_logprobs(
    case: TokenLogprobsCase,
    *,
    impl: str,
    grad: str | None = "both",
    want_entropy: bool = True,
    want_rank: bool = True,
    return_lse: bool = True,
    logits: torch.Tensor | None = None,
    **kwargs,
) -> TokenLogprobsResult:
    """Run the public op with ``impl`` and, if ``grad`` is 'both' / 'lp' / 'h', backpropagate the case's
    upstream gradients from those outputs."""
    from reasonrl.ops.token_logprobs import token_logprobs

    x = (case.logits if logits is None else logits).detach().clone().requires_grad_(grad is not None)
    out = token_logprobs(x, case.labels, temperature=case.temperature, ignore_index=case.ignore_index,
                         want_entropy=want_entropy, want_rank=want_rank, return_lse=return_lse, impl=impl,
                         **kwargs)
    return _with_grad(x, out, case, grad)


def run_token_logprobs_reference(
    case: TokenLogprobsCase,
    *,
    compute_dtype: torch.dtype,
    grad: str | None = "both",
) -> TokenLogprobsResult:
    """The plain-PyTorch reference on the case's values in ``compute_dtype`` (float64: the oracle), with
    gradients in that dtype (the logits are upcast exactly before the leaf, so 16-bit inputs get fp32 or fp64
    gradients, never rounded back to 16 bits)."""
    x = case.logits.detach().to(compute_dtype).requires_grad_(grad is not None)
    temp = case.temperature
    if isinstance(temp, torch.Tensor):
        temp = temp.to(compute_dtype)
    out = token_logprobs_reference(x, case.labels, temperature=temp, ignore_index=case.ignore_index,
                                   want_entropy=True, want_rank=True, return_lse=True,
                                   compute_dtype=compute_dtype)
    return _with_grad(x, out, case, grad)


def valid_rows(case: TokenLogprobsCase) -> torch.Tensor:
    """Rows with a real label (not ignore_index, inside [0, V)): where the acceptance rule applies."""
    v = case.logits.shape[-1]
    return (case.labels != case.ignore_index) & (case.labels >= 0) & (case.labels < v)


class _Failures:
    """Collects the failures of several checks so that one assertion reports all of them."""

    def __init__(self) -> None:
        self.messages: list[str] = []

    def check(self, fn, *args, **kwargs) -> None:
        try:
            fn(*args, **kwargs)
        except AssertionError as exc:
            self.messages.append(str(exc))

    def expect(self, ok: bool, message: str) -> None:
        if not ok:
            self.messages.append(message)

    def raise_if_any(self) -> None:
        __tracebackhide__ = True
        if self.messages:
            n = len(self.messages)
            raise AssertionError(f"{n} check(s) failed:\n" + "\n".join(f"- {m}" for m in self.messages))


def check_token_logprobs(
    case: TokenLogprobsCase,
    impl: str,
    *,
    grad: str | None = "both",
    name: str = "",
    per_row: bool = False,
    **kwargs,
) -> None:
    """Assert that ``impl`` meets docs/ops.md section 8 on ``case``: logprobs / entropy / lse against the
    float64 oracle, rank exact, ignored rows exactly 0; with ``grad`` ('both' / 'lp' / 'h') also grad_logits
    from the case's upstream gradients, zero gradient rows for ignored rows, and fp32/fp64 gradient row
    sums ~ 0. Every check runs; the assertion lists all that failed.

    ``per_row``: apply the rule to each row on its own (its own max|oracle|, err(reference) and max|g|), so
    that one extreme row cannot loosen the bound of the others. Extra keyword arguments go to the op."""
    __tracebackhide__ = True
    dtype = case.logits.dtype
    f64 = torch.float64
    acc = f64 if dtype == f64 else torch.float32
    tag = f"{impl} {str(dtype).removeprefix('torch.')} {tuple(case.logits.shape)}{name}"
    out = run_token_logprobs(case, impl=impl, grad=grad, **kwargs)
    oracle = run_token_logprobs_reference(case, compute_dtype=f64, grad=grad)
    ref = run_token_logprobs_reference(case, compute_dtype=acc, grad=grad)
    valid = valid_rows(case)
    lead = case.logits.shape[:-1]
    masks = [("", valid)]
    if per_row:
        masks = []
        for i in range(valid.numel()):
            one = torch.zeros(valid.numel(), dtype=torch.bool)
            one[i] = True
            masks.append((f" row {i}", valid & one.reshape(lead)))
    failures = _Failures()

    for field in ("logprobs", "entropy", "lse"):
        got = getattr(out, field)
        assert got.shape == lead and got.dtype == acc, f"{tag} {field}: {tuple(got.shape)} {got.dtype}"
        for rows, mask in masks:
            failures.check(
                assert_stat_close,
                got,
                getattr(oracle, field),
                getattr(ref, field),
                dtype=dtype,
                name=f"{tag}{rows} {field}",
                valid=mask,
            )
        ignored = got[~valid]
        failures.expect(
            bool((ignored == 0).all()), f"{tag} {field}: ignored rows must be 0, got {ignored.tolist()}"
        )
    assert out.rank.dtype == torch.int32 and out.rank.shape == lead, f"{tag} rank: {out.rank.dtype}"
    # rank compares the same raw values as the oracle (fp32 upcast, strict >): exact, ties included.
    bad = (out.rank != oracle.rank).reshape(-1).nonzero()
    if bad.numel():
        i = int(bad[0, 0])
        failures.expect(
            False,
            f"{tag} rank: {bad.numel()} rows differ from the oracle; first flattened row {i}: "
            f"{int(out.rank.reshape(-1)[i])} != {int(oracle.rank.reshape(-1)[i])}",
        )

    if grad is not None:
        g_lp = case.g_lp if grad in ("both", "lp") else None
        g_h = case.g_h if grad in ("both", "h") else None
        gname = f"grad_logits (upstream: {grad})"
        assert out.grad.dtype == dtype and out.grad.shape == case.logits.shape, (
            f"{tag} {gname}: {out.grad.dtype}"
        )
        for rows, mask in masks:
            failures.check(
                assert_grad_close,
                out.grad,
                oracle.grad,
                ref.grad,
                dtype=dtype,
                g_lp=g_lp,
                g_h=g_h,
                name=f"{tag}{rows} {gname}",
                valid=mask,
            )
        failures.expect(
            bool((out.grad[~valid] == 0).all()), f"{tag} {gname}: ignored rows must have a zero gradient"
        )
        if dtype in (torch.float32, f64):
            failures.check(
                assert_grad_row_sums,
                out.grad,
                case.temperature,
                g_lp=g_lp,
                g_h=g_h,
                name=f"{tag} {gname} row sums",
                valid=valid,
            )
    failures.raise_if_any()
