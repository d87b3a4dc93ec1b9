"""Property tests of ``token_logprobs``: random shapes, dtypes, temperatures and ignore patterns against the
float64 oracle with the acceptance rule of docs/ops.md section 8 (``check_token_logprobs`` of
tests/_token_logprobs_checks.py).

Reproducible in CI: ``derandomize=True`` (examples are a function of the test), no example database, no
deadline (the first call of a shape pays allocation and, for Triton, interpreter set-up). Shrinking is off:
the tensors are generated from a drawn seed, so shrinking cannot simplify them, and a failing run must not
spend minutes shrinking; the falsifying example (N, V, dtype, temperature, pattern, seed) is printed and
reproduces with ``make_token_logprobs_inputs``.

Budget: forward 120 + backward 120 examples on cpp and reference (N <= 64, V <= 5000), and 25 + 25 on Triton
under the interpreter (N <= 16, V <= 600).
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from _hypothesis_settings import SETTINGS
from _token_logprobs_checks import check_token_logprobs
from hypothesis import given, settings
from hypothesis import strategies as st

from reasonrl._backend import unavailable_reason
from reasonrl.testing import TokenLogprobsCase, make_logits, sample_labels

F32, BF16, F16, F64 = torch.float32, torch.bfloat16, torch.float16, torch.float64


# Sizes a uniform draw would rarely hit: N = 0 / 1, V = 1 / 2, one less / more than a SIMD vector (8),
# the C++ chunk (2048) and the Triton block (1024) edges.
_EDGE_V = [1, 2, 3, 7, 8, 9, 1023, 1024, 1025, 2047, 2048, 2049, 4095, 4097]


@dataclass(frozen=True)
class Spec:
    """What a property example draws; the tensors are built from it, so a falsifying example prints short."""

    n: int
    vocab: int
    dtype: torch.dtype
    seed: int
    entropy: tuple[float, float]
    ignore: str
    temperature: str  # "float", "0d" or "row"
    temperature_value: float
    sampled_labels: bool

    def build(self) -> TokenLogprobsCase:
        n, v, dtype = self.n, self.vocab, self.dtype
        g = torch.Generator().manual_seed(self.seed)
        logits = make_logits(n, v, dtype=dtype, entropy=self.entropy, generator=g)
        acc = F64 if dtype == F64 else F32
        if self.temperature == "float":
            temperature: float | torch.Tensor = self.temperature_value
        elif self.temperature == "0d":
            temperature = torch.tensor(self.temperature_value, dtype=acc)
        else:
            temperature = (0.25 + 3.75 * torch.rand(n, generator=g, dtype=F64)).to(acc)
        if self.sampled_labels:  # as in a rollout: labels drawn from the (temperature-scaled) softmax
            labels = sample_labels(logits, temperature=temperature, generator=g)
        else:  # any vocabulary id, including very unlikely ones (lp of -100s with sharp distributions)
            labels = torch.randint(0, v, (n,), generator=g)
        if n:
            if self.ignore == "some":
                labels[torch.rand(n, generator=g) < 0.3] = -100
            elif self.ignore == "all":
                labels[:] = -100
            elif self.ignore == "first":
                labels[0] = -100
            elif self.ignore == "last":
                labels[-1] = -100
        g_lp = torch.randn(n, generator=g, dtype=F64).to(acc)
        g_h = torch.randn(n, generator=g, dtype=F64).to(acc)
        return TokenLogprobsCase(logits, labels, temperature, -100, g_lp, g_h)


def specs(*, max_n: int, max_v: int, dtypes: tuple[torch.dtype, ...]) -> st.SearchStrategy[Spec]:
    return st.builds(
        Spec,
        n=st.one_of(st.sampled_from([0, 1]), st.integers(0, max_n)),
        vocab=st.one_of(st.sampled_from([e for e in _EDGE_V if e <= max_v]), st.integers(1, max_v)),
        dtype=st.sampled_from(dtypes),
        seed=st.integers(0, 2**31 - 1),
        # Sharp (near-greedy), realistic, and flat distributions.
        entropy=st.sampled_from([(0.02, 0.5), (1.0, 3.0), (3.0, 6.0)]),
        ignore=st.sampled_from(["none", "some", "all", "first", "last"]),
        temperature=st.sampled_from(["float", "0d", "row"]),
        temperature_value=st.floats(0.25, 4.0),
        sampled_labels=st.booleans(),
    )


def _skip_unless(impl: str, dtype: torch.dtype) -> None:
    why = unavailable_reason(impl, torch.device("cpu"), dtype)
    if why is not None:
        pytest.skip(f"impl={impl!r} unavailable: {why}")


_ALL_DTYPES = (F32, BF16, F16, F64)


@pytest.mark.parametrize("impl", ["cpp", "reference"])
@settings(max_examples=60, **SETTINGS)
@given(spec=specs(max_n=64, max_v=5000, dtypes=_ALL_DTYPES))
def test_forward_property(impl, spec):
    _skip_unless(impl, spec.dtype)
    check_token_logprobs(spec.build(), impl, grad=None)


@pytest.mark.parametrize("impl", ["cpp", "reference"])
@settings(max_examples=60, **SETTINGS)
@given(
    spec=specs(max_n=64, max_v=5000, dtypes=_ALL_DTYPES),
    grad=st.sampled_from(["both", "lp", "h"]),
)
def test_backward_property(impl, spec, grad):
    _skip_unless(impl, spec.dtype)
    check_token_logprobs(spec.build(), impl, grad=grad)


# The interpreter runs each Triton program in numpy: a smaller subset.
_TRITON_DTYPES = (F32, BF16, F16)


@settings(max_examples=25, **SETTINGS)
@given(spec=specs(max_n=16, max_v=600, dtypes=_TRITON_DTYPES))
def test_triton_forward_property(spec):
    _skip_unless("triton", spec.dtype)
    check_token_logprobs(spec.build(), "triton", grad=None)


@settings(max_examples=25, **SETTINGS)
@given(spec=specs(max_n=16, max_v=600, dtypes=_TRITON_DTYPES), grad=st.sampled_from(["both", "lp"]))
def test_triton_backward_property(spec, grad):
    _skip_unless("triton", spec.dtype)
    check_token_logprobs(spec.build(), "triton", grad=grad)
