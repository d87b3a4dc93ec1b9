"""Benchmark inputs (docs/performance.md section 4.3): the specs recorded with the results and the rotating
input sets built from them.

The generators themselves (an lm_head scaled to a target entropy, labels sampled from the softmax, ignored
rows and upstream gradients) are ``reasonrl.testing``'s, shared with the test suite; this module composes
them into the two workloads of the benchmarks:

* logits inputs (``token_logprobs``, the policy loss from logits): logits = random hidden states x a random
  weight, scaled so the mean per-row entropy at the benchmark temperature is ``target_entropy`` nats (1-3);
* hidden-state inputs (``linear_token_logprobs``, the policy loss from hidden states): hidden ~ N(0, 1) and
  the scaled lm_head itself;

labels *sampled* from softmax(logits / T); about 10% of rows ``ignore_index``; random upstream gradients
(zero on ignored rows, as a masked loss gives). Several input sets rotate, enough that together they exceed
twice the last-level cache (:func:`n_rotating_sets`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, TypeVar

import torch

from reasonrl import testing

MIB = 1 << 20
GIB = 1 << 30
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_SHORT = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
row_chunks = testing.row_chunks


# ----------------------------------------------------------------------------------------------------------
# Specs
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class _Generator:
    """Generator settings shared by both workloads (keyword-only: the shape comes first in the specs)."""

    temperature: float = 0.9
    target_entropy: float = 2.0  # nats, mean over rows at `temperature` (section 4.3 asks for 1-3)
    ignore_fraction: float = 0.1
    ignore_index: int = -100
    seed: int = 0

    @property
    def dims(self) -> tuple[int, ...]:
        raise NotImplementedError

    @property
    def label(self) -> str:
        dtype = self.dtype  # type: ignore[attr-defined]
        return f"{'x'.join(map(str, self.dims))} {DTYPE_SHORT.get(dtype, dtype)}"


@dataclass(frozen=True)
class LogitsInputSpec(_Generator):
    """Settings of logits-input benchmarks (logits [N, V]); recorded verbatim in the results."""

    n: int
    v: int
    dtype: str
    hidden: int = 256  # rank of the logits; enough that rows are not near-copies of each other

    @property
    def dims(self) -> tuple[int, ...]:
        return self.n, self.v

    @property
    def logits_bytes(self) -> int:
        return self.n * self.v * DTYPES[self.dtype].itemsize


@dataclass(frozen=True)
class LinearSpec(_Generator):
    """Settings of hidden-state benchmarks (hidden [N, H], lm_head [V, H]); recorded verbatim."""

    n: int
    h: int
    v: int
    dtype: str

    @property
    def dims(self) -> tuple[int, ...]:
        return self.n, self.h, self.v


# ----------------------------------------------------------------------------------------------------------
# Input sets
# ----------------------------------------------------------------------------------------------------------


@dataclass
class LogitsInputs:
    """One rotating input set: logits [N, V], labels [N], upstream gradients [N] (fp32), valid-row mask."""

    logits: torch.Tensor
    labels: torch.Tensor
    grad_logprobs: torch.Tensor
    grad_entropy: torch.Tensor
    valid: torch.Tensor


@dataclass
class LinearInputs:
    """One rotating input set of the hidden-state benchmarks."""

    hidden: torch.Tensor  # [N, H]
    weight: torch.Tensor  # [V, H] (shared by every set)
    labels: torch.Tensor  # [N]
    grad_logprobs: torch.Tensor  # [N] fp32, 0 on ignored rows
    grad_entropy: torch.Tensor
    advantages: torch.Tensor  # [N / seq_len] (per-sequence advantages for the loss-shaped peers)
    valid: torch.Tensor


def _lm_head(spec: LogitsInputSpec | LinearSpec, hidden: int, device: torch.device,
             scale: float | None) -> tuple[torch.Generator, torch.Tensor, float]:
    """The case's generator (seeded with ``spec.seed``), its fp32 lm_head [V, hidden] and the scale that
    gives the target entropy (``reasonrl.testing.lm_head_weight``; calibrated unless given)."""
    gen = torch.Generator(device=device)
    gen.manual_seed(spec.seed)
    weight, scale = testing.lm_head_weight(spec.v, hidden, temperature=spec.temperature,
                                           target_entropy=spec.target_entropy, generator=gen, device=device,
                                           scale=scale)
    return gen, weight, scale


def _targets(spec: LogitsInputSpec | LinearSpec, logits_of: Callable[[slice], torch.Tensor],
             gen: torch.Generator) -> tuple[torch.Tensor, float, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Labels sampled from softmax(logits / T) (``logits_of(rows)``: fp32 logits of a row slice), their mean
    entropy, ~``ignore_fraction`` of them ignored, the valid mask and the upstream gradients."""
    labels, entropy = testing.sample_labels_chunked(logits_of, spec.n, spec.v, temperature=spec.temperature,
                                                    generator=gen, device=gen.device)
    valid, g_lp, g_h = testing.ignore_rows_and_upstream(labels, ignore_fraction=spec.ignore_fraction,
                                                        ignore_index=spec.ignore_index, generator=gen)
    return labels, entropy, valid, g_lp, g_h


def _record(spec: LogitsInputSpec | LinearSpec, method: str, scale: float, entropies: list[float],
            **extra: Any) -> dict[str, Any]:
    """The generator record of a case's input sets (recorded with the results): settings, method, scale,
    per-set seeds and mean entropies."""
    return {**asdict(spec), "method": method, "scale": scale, "n_sets": len(entropies),
            "seeds": [spec.seed + 1 + k for k in range(len(entropies))], "mean_entropy_per_set": entropies,
            **extra}


def make_logits_inputs(
    spec: LogitsInputSpec, device: torch.device, n_sets: int, scale: float | None = None
) -> tuple[list[LogitsInputs], dict[str, Any]]:
    """``n_sets`` input sets per section 4.3 and the generator record (settings, seeds, scale, entropies).

    The weight [V, H] is shared by every set (one lm_head), the hidden states [N, H] differ per set. The
    scale is calibrated on 128 separate rows unless given (memory subprocesses reuse the parent's value).
    """
    dtype = DTYPES[spec.dtype]
    gen, weight, scale = _lm_head(spec, spec.hidden, device, scale)
    sets: list[LogitsInputs] = []
    entropies: list[float] = []
    for k in range(n_sets):
        gen.manual_seed(spec.seed + 1 + k)
        hidden = torch.randn(spec.n, spec.hidden, generator=gen, device=device)
        raw = hidden @ weight.T  # fp32 [N, V], entries ~ N(0, 1)
        logits = raw.mul_(scale).to(dtype)  # in place for fp32: one [N, V] buffer, not two
        del raw, hidden
        # Sampled from the distribution the op evaluates: the cast logits at temperature T.
        labels, entropy, valid, g_lp, g_h = _targets(spec, lambda rows, x=logits: x[rows].float(), gen)
        entropies.append(entropy)
        sets.append(LogitsInputs(logits, labels, g_lp, g_h, valid))

    method = "logits = (randn[N,H] @ (randn[V,H] / sqrt(H)).T) * scale; labels ~ softmax(logits / T)"
    return sets, _record(spec, method, scale, entropies, valid_fraction=float(sets[0].valid.float().mean()))


def make_linear_inputs(spec: LinearSpec, device: torch.device, n_sets: int, *, seq_len: int = 256,
                       scale: float | None = None) -> tuple[list[LinearInputs], dict[str, Any]]:
    """hidden ~ N(0, 1) per set, one lm_head ~ N(0, 1/H) x scale (calibrated so the mean entropy at the
    temperature is ``target_entropy``), labels sampled from softmax(h W^T / T); ~10% rows ignored;
    per-sequence advantages for rows viewed as [N / seq_len, seq_len]."""
    dtype = DTYPES[spec.dtype]
    gen, weight, scale = _lm_head(spec, spec.h, device, scale)
    weight = (weight * scale).to(dtype)
    w32 = weight.float()
    sets: list[LinearInputs] = []
    entropies: list[float] = []
    for k in range(n_sets):
        gen.manual_seed(spec.seed + 1 + k)
        hidden = torch.randn(spec.n, spec.h, generator=gen, device=device).to(dtype)

        def logits_of(rows: slice, x: torch.Tensor = hidden) -> torch.Tensor:
            return x[rows].float() @ w32.T  # one row chunk's fp32 logits

        labels, entropy, valid, g_lp, g_h = _targets(spec, logits_of, gen)
        entropies.append(entropy)
        adv = torch.randn(max(1, spec.n // seq_len), generator=gen, device=device)
        sets.append(LinearInputs(hidden, weight, labels, g_lp, g_h, adv, valid))
    method = "hidden = randn[N,H]; weight = randn[V,H] / sqrt(H) * scale; labels ~ softmax(h W^T / T)"
    return sets, _record(spec, method, scale, entropies)


# ----------------------------------------------------------------------------------------------------------
# Rotation (section 4.3) and hand-over to memory subprocesses (section 4.7)
# ----------------------------------------------------------------------------------------------------------


def last_level_cache_bytes(device: torch.device) -> int:
    """L2 of the GPU, or the largest CPU cache level (what rotating inputs must overflow, section 4.3)."""
    if device.type == "cuda":
        return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 * MIB))
    sizes = []
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            text = (index / "size").read_text().strip()
        except OSError:
            continue
        unit = {"K": 1 << 10, "M": MIB, "G": GIB}.get(text[-1:], 1)
        sizes.append(int(text.rstrip("KMG")) * unit)
    return max(sizes, default=32 * MIB)


def n_rotating_sets(bytes_per_set: int, device: torch.device, cap: int = 64) -> int:
    """At least two sets, and enough that together they exceed twice the last-level cache."""
    need = math.ceil(2 * last_level_cache_bytes(device) / max(bytes_per_set, 1)) + 1
    return max(2, min(cap, need))


InputsT = TypeVar("InputsT")


def save_inputs(inputs: Any, path: Path) -> None:
    """Write one input set (a dataclass of tensors and numbers) for a child process: cheaper than
    regenerating it. Tensors are detached and moved to the CPU."""
    torch.save({f.name: (v.detach().cpu() if torch.is_tensor(v := getattr(inputs, f.name)) else v)
                for f in fields(inputs)}, path)


def load_inputs(path: Path, cls: type[InputsT] = LogitsInputs) -> InputsT:  # type: ignore[assignment]
    """Read an input set written by :func:`save_inputs` into ordinary (anonymous) memory, not a mapping of
    the file, so that all of it is resident before a memory baseline is taken."""
    return cls(**torch.load(path, weights_only=True))


def scratch_dir() -> str | None:
    """A RAM-backed directory for files handed to child processes (/dev/shm), or None for the default."""
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
