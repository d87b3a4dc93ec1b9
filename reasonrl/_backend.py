"""Which implementations are available in this process, and why the others are not.

The choice between them for one op call (``impl=``, ``REASONRL_IMPL``) is made by
``reasonrl.ops._scaffold.resolve_impl``, on top of :func:`unavailable_reason`.

Import hygiene (style.md): nothing here imports triton, initialises CUDA or touches global torch config at
import time. The compiled extension is loaded on first use; a failed load is a warning naming the cause,
never silence. ``reasonrl info`` prints :func:`backend_report`.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import warnings

import torch

IMPLS = ("auto", "triton", "cpp", "reference")


@functools.cache
def load_extension():
    """Return the ``reasonrl._C`` module (its import registers the C++ ops), or None with a warning."""
    try:
        return importlib.import_module("reasonrl._C")
    except (ImportError, OSError) as exc:  # OSError: an undefined symbol from a torch version mismatch
        warnings.warn(
            f"reasonrl: the compiled extension reasonrl._C could not be loaded ({exc}); CPU ops fall back "
            "to the plain-PyTorch reference. Reinstall with `pip install --no-build-isolation -e .`.",
            RuntimeWarning,
            stacklevel=3,
        )
        load_extension.error = str(exc)
        return None


def extension_error() -> str | None:
    load_extension()
    return getattr(load_extension, "error", None)


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def triton_importable() -> tuple[bool, str]:
    if importlib.util.find_spec("triton") is None:
        return False, "triton is not installed"
    try:
        import triton  # noqa: F401
    except Exception as exc:  # a broken triton install must not break reasonrl
        return False, f"import triton failed: {exc}"
    return True, "triton " + importlib.import_module("triton").__version__


def unavailable_reason(impl: str, device: torch.device, dtype: torch.dtype) -> str | None:
    """None if ``impl`` can run on ``device`` with ``dtype``; otherwise the reason it cannot."""
    if impl == "reference":
        return None
    if impl == "cpp":
        if device.type != "cpu":
            return f"impl='cpp' runs on CPU tensors, got a {device.type} tensor"
        if load_extension() is None:
            return f"the compiled extension is not loaded ({extension_error()})"
        return None
    if impl == "triton":
        ok, why = triton_importable()
        if not ok:
            return why
        if device.type == "cpu" and not triton_interpret():
            return "Triton runs CPU tensors only under TRITON_INTERPRET=1"
        if device.type not in ("cpu", "cuda"):
            return f"Triton does not run on {device.type} tensors"
        if dtype == torch.float64:
            return "the Triton kernels do not support float64 (use impl='cpp' or 'reference')"
        return None
    raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")


def backend_report() -> dict:
    """What `reasonrl info` prints: versions, active backends, and why the others are not."""
    ext = load_extension()
    report = {
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "extension": ext.build_info() if ext is not None else f"not loaded: {extension_error()}",
        "triton": triton_importable()[1],
        "triton_interpret": triton_interpret(),
        "cuda_available": torch.cuda.is_available(),
        "threads": torch.get_num_threads(),
    }
    backends = {}
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    for dev in devices:
        for impl in IMPLS[1:]:
            reason = unavailable_reason(impl, dev, torch.float32)
            backends[f"{impl}@{dev.type}"] = "active" if reason is None else f"unavailable: {reason}"
    report["backends"] = backends
    return report
