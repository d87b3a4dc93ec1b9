"""Shared fixtures: seeding, the list of token_logprobs implementations runnable here, GPU skipping.

TRITON_INTERPRET must be set before the Triton kernels are defined: ``triton.jit`` decides at decoration
time whether a kernel is compiled or interpreted, and reasonrl defines its kernels lazily on the first
``impl="triton"`` call, i.e. during the tests, after this file has run. CI has no GPU, so without a CUDA
device the Triton kernels run under the interpreter (small shapes only: it is ~1000x slower). reasonrl's
backend reads the variable at call time, so tests can unset it with ``monkeypatch.delenv``.
"""

from __future__ import annotations

import os
import random
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# reasonrl itself must not have imported triton by now (import hygiene is tested in tests/test_import.py).
assert "reasonrl.kernels.token_logprobs" not in sys.modules, "Triton kernels defined before TRITON_INTERPRET"


SEED = 1234


@pytest.fixture(autouse=True)
def _seed_everything():
    """Every test starts from the same RNG state: failures reproduce with ``pytest path::test_id``."""
    random.seed(SEED)
    torch.manual_seed(SEED)
    try:
        import numpy as np
    except ImportError:  # numpy is a dependency, but seeding must not be the reason a test errors
        pass
    else:
        np.random.seed(SEED)
    yield


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


def cpu_impls() -> list[str]:
    """token_logprobs implementations that can run on CPU tensors in this process."""
    from reasonrl._backend import unavailable_reason

    impls = ["reference"]
    if unavailable_reason("cpp", torch.device("cpu"), torch.float32) is None:
        impls.append("cpp")
    if unavailable_reason("triton", torch.device("cpu"), torch.float32) is None:
        impls.append("triton")
    return impls


@pytest.fixture(scope="session")
def available_impls() -> list[str]:
    return cpu_impls()


def require_impl(impl: str) -> None:
    """Skip (with the reason) when ``impl`` cannot run on CPU here; 'reference' always can."""
    from reasonrl._backend import unavailable_reason

    why = unavailable_reason(impl, torch.device("cpu"), torch.float32)
    if why is not None:
        pytest.skip(f"impl={impl!r} unavailable on CPU: {why}")
