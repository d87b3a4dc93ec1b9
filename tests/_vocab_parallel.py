"""Two gloo ranks on the loopback for the vocab-parallel tests (docs/ops.md section 3.3).

One ``torch.multiprocessing.spawn`` (world size 2, a ``file://`` store in a temporary directory) runs a test
module's ``work(rank, group, *args)`` on both ranks and saves what it returns; the comparisons run in the
pytest process. A spawned process pays the import of torch and reasonrl, so a module runs all its cases in
one spawn, and a case that raises on a rank is recorded (its traceback, or the error's type and message) for
that case's test to report instead of failing the spawn.

Used by tests/ops/test_token_logprobs_vocab_parallel.py and
tests/ops/test_linear_token_logprobs_vocab_parallel.py (importable from every test module: pytest puts tests/,
the folder of the root conftest.py, on ``sys.path``; the spawned processes get the parent's ``sys.path``).
"""

from __future__ import annotations

import datetime
import os
import traceback
from dataclasses import dataclass

import pytest
import torch

__all__ = [
    "WORLD",
    "Bad",
    "assert_outputs_equal_across_ranks",
    "assert_raised_on_every_rank",
    "error_of",
    "results_on_every_rank",
    "same",
    "spawn_on_two_ranks",
    "traceback_on_error",
]

WORLD = 2


def _worker(rank: int, init_method: str, out_dir: str, work, args: tuple) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)  # two ranks on a 2-core machine
    dist.init_process_group(
        "gloo", init_method=init_method, rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=120)
    )
    try:
        torch.save(work(rank, dist.group.WORLD, *args), os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def spawn_on_two_ranks(tmp_path_factory, name: str, work, *args) -> dict[int, object]:
    """Run ``work(rank, group, *args)`` (a module-level function: it is pickled by name) on two gloo ranks;
    ``{rank: what it returned}``. Skips where torch.distributed has no gloo backend."""
    import torch.distributed as dist
    import torch.multiprocessing as mp

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    tmp = tmp_path_factory.mktemp(name)
    mp.spawn(_worker, args=(f"file://{tmp / 'store'}", str(tmp), work, args), nprocs=WORLD, join=True)
    return {r: torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(WORLD)}


def traceback_on_error(fn, *args, **kwargs):
    """``fn(*args, **kwargs)``, or the traceback (a str) of what it raised."""
    try:
        return fn(*args, **kwargs)
    except Exception:  # reported by the test of this case, not by the spawn
        return traceback.format_exc()


def error_of(fn, *args, **kwargs) -> tuple[str, str] | None:
    """``(type name, message)`` of what ``fn(*args, **kwargs)`` raised, or None if it returned."""
    try:
        fn(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 - the type and message are what the tests check
        return type(e).__name__, str(e)
    return None


def same(a, b) -> bool:
    """Both None, or bitwise-equal tensors."""
    return (a is None and b is None) or (a is not None and b is not None and torch.equal(a, b))


def results_on_every_rank(runs: dict, name: str) -> dict:
    """``{rank: runs[rank]["results"][name]}``, after asserting that no rank raised."""
    per_rank = {r: runs[r]["results"][name] for r in range(WORLD)}
    for r, res in per_rank.items():
        assert not isinstance(res, str), f"rank {r} raised:\n{res}"
    return per_rank


def assert_outputs_equal_across_ranks(name: str, outs0, outs1) -> None:
    """The (logprobs, entropy, rank, lse) outputs of two ranks are identical (bitwise; None alike)."""
    for f, a, b in zip(("logprobs", "entropy", "rank", "lse"), outs0, outs1, strict=True):
        assert same(a, b), f"{name}: {f} differs between ranks"


@dataclass
class Bad:
    """A call that must raise on every rank: ``vocab_start[r]`` per rank (None = default), the local
    vocabulary size per rank, an optional label written into row 0, and a substring of the message."""

    name: str
    vocab_start: tuple[int | None, int | None]
    local_vocab: tuple[int, int]
    label: int | None = None
    expected: str = ""


def assert_raised_on_every_rank(runs: dict, bad: Bad) -> None:
    """Every rank recorded a ValueError whose message contains ``bad.expected``."""
    for r in range(WORLD):
        err = runs[r]["errors"][bad.name]
        assert err is not None, f"rank {r}: {bad.name} did not raise"
        kind, msg = err
        assert kind == "ValueError", f"rank {r}: {kind}: {msg}"
        assert bad.expected in msg, f"rank {r}: {msg!r} does not mention {bad.expected!r}"
