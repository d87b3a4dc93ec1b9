"""Which implementations are available in this process, and why the others are not.

Import hygiene (style.md): nothing here imports triton, initialises CUDA or touches global torch config at
import time. The compiled extension is loaded on first use; a failed load is a warning naming the cause,
never silence. ``reasonrl info`` prints :func:`backend_report`.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import logging
import os
import warnings

import torch

logger = logging.getLogger("reasonrl")

IMPLS = ("auto", "triton", "cuda", "cpp", "reference")


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


def cuda_ops_built() -> bool:
    ext = load_extension()
    return bool(ext is not None and ext.build_info()["cuda"])


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
    if impl == "cuda":
        if device.type != "cuda":
            return f"impl='cuda' runs on CUDA tensors, got a {device.type} tensor"
        if not cuda_ops_built():
            return "the extension was built without CUDA kernels"
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


_logged_fallbacks: set[tuple[str, str]] = set()


def resolve_impl(impl: str | None, device: torch.device, dtype: torch.dtype, op: str) -> str:
    """Pick the implementation: explicit choices raise when unavailable, ``auto`` falls back (logged once)."""
    if impl is None or impl == "auto":
        impl = os.environ.get("REASONRL_IMPL", "auto") or "auto"
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl != "auto":
        reason = unavailable_reason(impl, device, dtype)
        if reason is not None:
            raise RuntimeError(f"reasonrl.{op}: impl={impl!r} is unavailable: {reason}")
        return impl
    preference = ("triton", "cuda", "reference") if device.type == "cuda" else ("cpp", "reference")
    for candidate in preference:
        reason = unavailable_reason(candidate, device, dtype)
        if reason is None:
            if candidate != preference[0]:
                key = (op, candidate)
                if key not in _logged_fallbacks:
                    _logged_fallbacks.add(key)
                    why = unavailable_reason(preference[0], device, dtype)
                    if preference[0] == "cpp" and device.type == "cpu":
                        # A CPU user silently losing the fast path would be surprised: warn, not just log.
                        warnings.warn(f"reasonrl.{op}: using the reference implementation ({why})",
                                      RuntimeWarning, stacklevel=4)
                    logger.info("reasonrl.%s: auto picked %s (%s)", op, candidate, why)
            return candidate
    raise AssertionError("the reference implementation is always available")


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
