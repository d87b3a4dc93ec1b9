"""Which op implementations can run on CPU tensors in this process, as skip markers for the op tests."""

from __future__ import annotations

import pytest
import torch

from reasonrl import _backend as backend


def cpp_available() -> bool:
    return backend.unavailable_reason("cpp", torch.device("cpu"), torch.float32) is None


def triton_available() -> bool:
    return backend.unavailable_reason("triton", torch.device("cpu"), torch.float32) is None


needs_cpp = pytest.mark.skipif(not cpp_available(), reason="the compiled extension is not loaded")
needs_triton = pytest.mark.skipif(not triton_available(), reason="Triton (interpreter) is not available")
