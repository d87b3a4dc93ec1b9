"""What every op of reasonrl shares, so that an op's own module holds only what is specific to it.

* **Availability** (:func:`unavailable_reason`, :func:`load_extension`, :func:`backend_report`): which
  implementations can run in this process, and why the others cannot (``reasonrl info`` prints the report).
* **Implementation choice** (:func:`resolve_impl`, :func:`select_impl`): one rule for every op. ``impl``
  ``"auto"`` (or None) takes ``REASONRL_IMPL`` (read here and nowhere else); an explicit choice, from the
  keyword or the environment, that cannot run raises ``RuntimeError`` naming the reason; ``auto`` falls back
  to the reference (logged once, and a ``RuntimeWarning`` when a CPU user loses the C++ path). An op that
  has no kernel at all (:func:`declare_op` with ``reference_only``) ignores an environment preference for a
  kernel: the variable only chooses among implementations that exist.
* **Lazy registration** (:func:`declare_op`, :func:`registered_ops`, :func:`attach_cpp`, :func:`kernel_op`):
  each op declares one registration function per kernel implementation (attach the fake / meta functions
  and the autograd formula to the C++ ops, define the Triton ``triton_op`` s). They run on the first call
  that selects the implementation, so ``import reasonrl`` neither loads the extension nor imports triton.
* **Validation**: the global switch (:func:`set_validation`, env ``REASONRL_VALIDATE``), the argument checks
  every row op makes on its input, labels, ignore_index and temperature (docs/ops.md section 7), the
  host-syncing value checks and the NaN-row report.
* **The row view of the kernels**: flattening ``[..., D]`` to ``[N, D]`` rows, the temperature as a row
  tensor or a scalar in the accumulation dtype, fake row outputs, and reshaping the outputs back.

Import hygiene (docs/contributing.md): nothing here imports triton, initialises CUDA or touches global torch
config at import time. The compiled extension is loaded on first use; a failed load is a warning naming the
cause, never silence. The recipe for adding an op on this module is docs/adding-an-op.md.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import logging
import math
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from reasonrl.reference.token_logprobs import TokenLogprobs

__all__ = [
    "IMPLS",
    "load_extension",
    "unavailable_reason",
    "backend_report",
    "set_validation",
    "validation_enabled",
    "resolve_validate",
    "declare_op",
    "resolve_impl",
    "select_impl",
    "registered_ops",
    "attach_cpp",
    "kernel_op",
    "accumulation_dtype",
    "check_logits_args",
    "check_labels",
    "check_ignore_index",
    "check_temperature",
    "validate_rows",
    "check_nan_rows",
    "flatten_rows",
    "row_temperature",
    "fake_row_outputs",
    "token_outputs",
]

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


logger = logging.getLogger("reasonrl")

# ----------------------------------------------------------------------------------------------------------
# The global validation switch
# ----------------------------------------------------------------------------------------------------------

_VALIDATE = os.environ.get("REASONRL_VALIDATE", "1") != "0"


def set_validation(enabled: bool) -> None:
    """Globally enable or disable input/output validation (host syncs) for calls with ``validate=None``."""
    global _VALIDATE
    _VALIDATE = bool(enabled)


def validation_enabled() -> bool:
    return _VALIDATE


def resolve_validate(validate: bool | None, x: torch.Tensor | None = None) -> bool:
    """A call's ``validate`` argument: None follows the global switch. Meta tensors (``x``) have no values to
    check: the impl choice then says which implementations run on them, instead of a failing ``.item()``."""
    if x is not None and x.device.type == "meta":
        return False
    return _VALIDATE if validate is None else bool(validate)


# ----------------------------------------------------------------------------------------------------------
# Ops, their implementations and the choice between them
# ----------------------------------------------------------------------------------------------------------


@dataclass
class _Op:
    name: str
    register: dict[str, Callable[[], object]]  # kernel impl -> registration function (returns the ops)
    reference_only: str | None  # why the op has no kernel (None: it has the kernels of `register`)
    registered: dict[str, object] = field(default_factory=dict)


_OPS: dict[str, _Op] = {}
_logged: set[tuple[str, str]] = set()


def declare_op(
    name: str,
    *,
    cpp: Callable[[], object] | None = None,
    triton: Callable[[], object] | None = None,
    reference_only: str | None = None,
) -> None:
    """Declare op ``name`` and its kernel implementations: ``cpp`` / ``triton`` are registration functions
    (run once, on first use; they return the registered ops, which :func:`registered_ops` hands out). An op
    with no kernel passes ``reference_only``, the reason, which an explicit kernel request raises with."""
    register = {impl: fn for impl, fn in (("cpp", cpp), ("triton", triton)) if fn is not None}
    _OPS[name] = _Op(name, register, reference_only)


def _op(name: str) -> _Op:
    try:
        return _OPS[name]
    except KeyError:
        raise KeyError(f"reasonrl: no op {name!r} was declared (known: {sorted(_OPS)})") from None


def _missing_reason(op: _Op, impl: str, device: torch.device, dtype: torch.dtype) -> str | None:
    """None if ``op`` can run ``impl`` on ``device`` / ``dtype``; otherwise why not."""
    if impl == "reference":
        return None
    if impl not in op.register:
        if op.reference_only is not None:
            return f"there is no {impl} kernel for this op because {op.reference_only}"
        return f"there is no {impl} implementation of {op.name}"
    return unavailable_reason(impl, device, dtype)


def resolve_impl(op: str, impl: str | None, device: torch.device, dtype: torch.dtype) -> str:
    """The implementation of ``op`` to run (see the module docstring for the rule). Registers nothing."""
    spec = _op(op)
    from_env = impl is None or impl == "auto"
    if from_env:
        impl = os.environ.get("REASONRL_IMPL", "auto") or "auto"
        if impl not in IMPLS:
            raise ValueError(f"REASONRL_IMPL: impl must be one of {IMPLS}, got {impl!r}")
        if impl != "auto" and spec.reference_only is not None and impl not in spec.register:
            if (op, "env:" + impl) not in _logged:
                _logged.add((op, "env:" + impl))
                logger.info("reasonrl.%s: REASONRL_IMPL=%s ignored: the op has only the reference "
                            "implementation (%s)", op, impl, spec.reference_only)
            impl = "auto"
    elif impl not in IMPLS:
        raise ValueError(f"reasonrl.{op}: impl must be one of {IMPLS}, got {impl!r}")
    if impl != "auto":
        reason = _missing_reason(spec, impl, device, dtype)
        if reason is not None:
            raise RuntimeError(f"reasonrl.{op}: impl={impl!r} is unavailable: {reason}")
        return impl
    preference = ("triton", "reference") if device.type == "cuda" else ("cpp", "reference")
    for candidate in preference:
        if _missing_reason(spec, candidate, device, dtype) is None:
            if candidate != preference[0] and spec.reference_only is None and (op, candidate) not in _logged:
                _logged.add((op, candidate))
                why = _missing_reason(spec, preference[0], device, dtype)
                if preference[0] == "cpp":
                    # A CPU user silently losing the fast path would be surprised: warn, not just log.
                    warnings.warn(f"reasonrl.{op}: using the reference implementation ({why})",
                                  RuntimeWarning, stacklevel=4)
                logger.info("reasonrl.%s: auto picked %s (%s)", op, candidate, why)
            return candidate
    raise AssertionError("the reference implementation is always available")


def registered_ops(op: str, impl: str):
    """The registered ops of ``op``'s ``impl`` (registering them on first use): what its registration
    function returned. Raises ``RuntimeError`` when ``op`` has no such kernel or it cannot be loaded."""
    spec = _op(op)
    if impl not in spec.register:
        raise RuntimeError(f"no registered {op} ops for impl={impl!r}")
    if impl not in spec.registered:
        if impl == "cpp" and load_extension() is None:
            raise RuntimeError(f"no registered {op} ops for impl='cpp': the compiled extension is not loaded")
        spec.registered[impl] = spec.register[impl]()
    return spec.registered[impl]


def select_impl(op: str, impl: str | None, device_type: str, dtype: torch.dtype) -> str:
    """:func:`resolve_impl`, then register the chosen implementation's ops.

    Runs eagerly even under torch.compile (dynamo treats the result as a constant and guards nothing on
    it): the choice reads the environment, imports triton lazily and loads the extension, none of which
    belongs in a traced graph. Every argument is a constant (strings and a dtype).
    """
    chosen = resolve_impl(op, impl, torch.device(device_type), dtype)
    if chosen != "reference":
        registered_ops(op, chosen)
    return chosen


# Equivalent to decorating with @torch.compiler.assume_constant_result, which only sets this attribute but
# imports torch._dynamo (and with it triton) to do so: `import reasonrl` must stay light and triton-free.
select_impl._dynamo_marked_constant = True


def attach_cpp(name: str, fake: Callable, *, backward: Callable | None = None,
               setup_context: Callable | None = None):
    """Attach the fake (meta) function and, given ``backward``, the autograd formula to the C++ op
    ``reasonrl::<name>`` (its schema is declared in csrc/reasonrl.cpp); returns its ``OpOverload``."""
    torch.library.register_fake(f"reasonrl::{name}")(fake)
    if backward is not None:
        torch.library.register_autograd(f"reasonrl::{name}", backward, setup_context=setup_context)
    return getattr(torch.ops.reasonrl, name).default


def kernel_op(name: str, impl: str):
    """``torch.ops.reasonrl.<name>`` (C++) or ``<name>_triton`` (the Triton ``triton_op``) once
    :func:`select_impl` has registered it: plain attribute access, which torch.compile traces."""
    return getattr(torch.ops.reasonrl, name + "_triton" if impl == "triton" else name).default


# ----------------------------------------------------------------------------------------------------------
# Argument checks shared by the row ops (docs/ops.md section 7)
# ----------------------------------------------------------------------------------------------------------


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of statistics and per-token outputs: fp32 for every input, fp64 for fp64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_logits_args(op: str, logits, labels, temperature, ignore_index) -> None:
    """The argument checks of an op over logits ``[..., V]`` and labels (token_logprobs, the fused loss)."""
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point():
        raise TypeError(
            f"{op}: logits must be a floating tensor (float32, bfloat16, float16 or float64), got "
            f"{getattr(logits, 'dtype', type(logits).__name__)}"
        )
    if logits.dim() < 1:
        raise ValueError(f"{op}: logits must have shape [..., V] with at least 1 dimension, got a scalar")
    if logits.shape[-1] == 0:
        raise ValueError(f"{op}: the vocabulary size V = logits.shape[-1] must be > 0, got "
                         f"{tuple(logits.shape)}")
    check_labels(op, labels, logits.shape[:-1], logits.device, "logits")
    check_ignore_index(op, ignore_index)
    check_temperature(op, temperature, logits.shape[:-1], logits.device, "logits", logits.dtype)


def check_labels(op: str, labels, token_shape: torch.Size, device: torch.device, source: str) -> None:
    """``labels`` is an int32 / int64 tensor of ``token_shape`` (``<source>.shape[:-1]``) on ``device``."""
    if not isinstance(labels, torch.Tensor) or labels.dtype not in (torch.int32, torch.int64):
        got = getattr(labels, "dtype", type(labels))
        raise TypeError(f"{op}: labels must be an int32 or int64 tensor, got {got}")
    if labels.shape != token_shape:
        raise ValueError(f"{op}: labels must have shape {source}.shape[:-1] = {tuple(token_shape)}, got "
                         f"{tuple(labels.shape)}")
    if labels.device != device:
        raise ValueError(f"{op}: labels are on {labels.device} but {source} is on {device}")


def check_ignore_index(op: str, ignore_index) -> None:
    if not isinstance(ignore_index, int):
        raise TypeError(f"{op}: ignore_index must be an int, got {type(ignore_index).__name__}")


def min_temperature(dtype: torch.dtype) -> float:
    """The smallest valid temperature: the smallest normal number of the compute dtype (fp64 for fp64 input,
    else fp32). A subnormal temperature (1e-40 in fp32) has no finite reciprocal (docs/numerics.md)."""
    return torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).tiny


def check_temperature(op: str, temperature, token_shape: torch.Size, device: torch.device,
                      source: str, dtype: torch.dtype) -> None:
    """A Python number, a 0-d tensor or a per-row tensor of ``token_shape``; a number must be finite and at
    least :func:`min_temperature` of the input ``dtype`` (tensor values are checked by
    :func:`validate_rows`, which needs a host sync)."""
    if isinstance(temperature, torch.Tensor):
        if not temperature.is_floating_point():
            raise TypeError(f"{op}: temperature must be a floating tensor, got {temperature.dtype}")
        if temperature.dim() > 0 and temperature.shape != token_shape:
            raise ValueError(f"{op}: a temperature tensor must be 0-d or have shape {source}.shape[:-1] = "
                             f"{tuple(token_shape)}, got {tuple(temperature.shape)}")
        if temperature.device != device and not (temperature.dim() == 0 and temperature.device.type == "cpu"):
            raise ValueError(f"{op}: temperature is on {temperature.device} but {source} is on {device}")
    elif isinstance(temperature, (int, float)) and not isinstance(temperature, bool):
        tiny = min_temperature(dtype)
        if not (math.isfinite(temperature) and temperature >= tiny):
            raise ValueError(f"{op}: temperature must be finite and >= {tiny:.7g} (the smallest normal "
                             f"number of the compute dtype, so that 1 / temperature is finite), "
                             f"got {temperature}")
    else:
        raise TypeError(f"{op}: temperature must be a float or a tensor, got {type(temperature).__name__}")


def validate_rows(op: str, labels_flat: torch.Tensor, temperature, ignore_index: int, vocab: int,
                  vocab_name: str = "V", *, dtype: torch.dtype) -> None:
    """The checks that need a host sync (only with validate=True): every label other than ``ignore_index``
    in ``[0, vocab)`` (``vocab_name`` says what ``vocab`` is), every temperature value finite and at least
    :func:`min_temperature` of the input ``dtype`` (the compute precision, whatever the temperature's own)."""
    bad = (labels_flat != ignore_index) & ((labels_flat < 0) | (labels_flat >= vocab))
    n_bad = int(bad.sum())
    if n_bad:
        first = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"{op}: {n_bad} labels are outside [0, {vocab_name}={vocab}) and not "
            f"ignore_index={ignore_index}; first at flattened row {first} (label {int(labels_flat[first])})"
        )
    if isinstance(temperature, torch.Tensor):
        tiny = min_temperature(dtype)
        ok = torch.isfinite(temperature) & (temperature >= tiny)
        if not bool(ok.all()):
            first = int((~ok).reshape(-1).nonzero()[0, 0])
            raise ValueError(f"{op}: temperature must be finite and >= {tiny:.7g} everywhere; got "
                             f"{float(temperature.reshape(-1)[first])} at row {first}")


def check_nan_rows(op: str, lp: torch.Tensor, labels_flat: torch.Tensor, ignore_index: int,
                   cause: str) -> None:
    """NaN in a valid row of the outputs (O(N), one host sync): report it with its ``cause``."""
    nan_rows = torch.isnan(lp) & (labels_flat != ignore_index)
    if bool(nan_rows.any()):
        first = int(nan_rows.nonzero()[0, 0])
        raise FloatingPointError(
            f"{op}: {int(nan_rows.sum())} rows have a NaN log-prob ({cause}); first at flattened row "
            f"{first}. Pass validate=False to propagate NaN instead."
        )


# ----------------------------------------------------------------------------------------------------------
# The row view of the kernels
# ----------------------------------------------------------------------------------------------------------


def row_temperature(temperature: float | torch.Tensor, n: int, acc: torch.dtype, device: torch.device):
    """``(temperature [N] in the accumulation dtype or None, temperature_scalar)``: a tensor temperature
    becomes a row tensor (a 0-d one is expanded, no copy), a number stays a scalar argument."""
    if isinstance(temperature, torch.Tensor):
        temp_t = temperature.to(device=device, dtype=acc)
        return (temp_t.reshape(-1) if temp_t.dim() > 0 else temp_t.reshape(1).expand(n)), 1.0
    return None, float(temperature)


def flatten_rows(x: torch.Tensor, labels: torch.Tensor, temperature: float | torch.Tensor, *,
                 unit_stride: bool = True):
    """The kernels' row view of the arguments: ``(x [N, D], labels [N], temperature [N] or None,
    temperature_scalar)``. A view when possible; with ``unit_stride`` (logits, whose kernels stream the
    vocabulary) one copy only when the last dimension is strided."""
    rows = x.reshape(-1, x.shape[-1])
    if unit_stride and rows.stride(-1) != 1:
        if not torch.compiler.is_compiling():
            logger.debug("reasonrl: input has stride %d on its last dimension; making one contiguous copy",
                         rows.stride(-1))
        rows = rows.contiguous()
    acc = accumulation_dtype(x.dtype)
    temp_t, temp_scalar = row_temperature(temperature, rows.shape[0], acc, rows.device)
    return rows, labels.reshape(-1), temp_t, temp_scalar


def fake_row_outputs(like: torch.Tensor, want_entropy: bool, want_rank: bool):
    """Fake outputs of a row forward op over ``like`` ``[N, ...]``: (logprobs, entropy, rank, lse, stats)."""
    n = like.shape[0]
    acc = accumulation_dtype(like.dtype)
    return (
        like.new_empty((n,), dtype=acc),
        like.new_empty((n if want_entropy else 0,), dtype=acc),
        like.new_empty((n if want_rank else 0,), dtype=torch.int32),
        like.new_empty((n,), dtype=acc),
        like.new_empty((n, 2), dtype=acc),
    )


def token_outputs(lead_shape: torch.Size, lp, ent, rank, lse, *, want_entropy: bool, want_rank: bool,
                  return_lse: bool) -> TokenLogprobs:
    """Row outputs reshaped to the caller's token shape; the fields not requested are None."""
    return TokenLogprobs(
        lp.reshape(lead_shape),
        ent.reshape(lead_shape) if want_entropy else None,
        rank.reshape(lead_shape) if want_rank else None,
        lse.reshape(lead_shape) if return_lse else None,
    )
