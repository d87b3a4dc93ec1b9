"""Vocab-parallel ``token_logprobs`` (docs/ops.md section 3.3): two gloo ranks on the loopback, each holding a
contiguous shard of the vocabulary, must give the unsharded op's outputs on both ranks and, concatenated,
its gradient.

One ``torch.multiprocessing.spawn`` (world size 2, a ``file://`` store in a temporary directory) runs every
case: a spawned process pays the import of torch and reasonrl, so the cases share it. The workers only run the
op and save what it returned (outputs per rank, local gradients, errors raised); the comparisons run here, in
the pytest process, against the unsharded ``cpp`` op and the float64 oracle by the
rule of docs/ops.md section 8.

The Triton kernels' sharded mode runs twice under the interpreter: through the gloo path (tiny shapes), and
in-process by calling the kernels on each shard with its offset and combining the statistics by hand, which
checks the kernel contract without the collectives.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import _vocab_parallel as vp
import pytest
import torch
from _token_logprobs_checks import input_grad, run_token_logprobs_reference, valid_rows

from reasonrl._backend import unavailable_reason
from reasonrl.ops.token_logprobs import token_logprobs
from reasonrl.testing import (
    TokenLogprobsCase,
    assert_grad_close,
    assert_stat_close,
    make_token_logprobs_inputs,
)

CPU = torch.device("cpu")
F32, BF16, F64 = torch.float32, torch.bfloat16, torch.float64


def _skip_unless(impl: str, dtype: torch.dtype = F32) -> None:
    why = unavailable_reason(impl, CPU, dtype)
    if why is not None:
        pytest.skip(f"impl={impl!r} cannot run {dtype} on CPU here: {why}")


@dataclass
class Sharded:
    """One vocab-parallel call: the full case, how the vocabulary is split and the op's options."""

    name: str
    case: TokenLogprobsCase
    bounds: tuple[int, ...]  # rank r holds columns [bounds[r], bounds[r + 1]) ... of the ORDER below
    order: tuple[int, ...] = (0, 1)  # order[k] = the rank holding the k-th slice of the vocabulary
    pass_vocab_start: bool = False
    impl: str = "cpp"
    want_entropy: bool = True
    want_rank: bool = True
    grad: str | None = "both"  # "both" | "lp" | "h" | None
    inplace_backward: bool = False
    kwargs: dict = field(default_factory=dict)

    def shard(self, rank: int) -> tuple[int, int]:
        k = self.order.index(rank)
        return self.bounds[k], self.bounds[k + 1]


def _with_neg_inf_shards(case: TokenLogprobsCase, split: int) -> TokenLogprobsCase:
    """Row 0: the whole first shard is -inf and the label is in it (lp = -inf, a legal finite-gradient row).
    Row 1: the whole first shard is -inf, the label on the other shard (m_r = -inf contributes nothing)."""
    x = case.logits.clone()
    labels = case.labels.clone()
    x[0, :split] = float("-inf")
    labels[0] = split // 2
    x[1, :split] = float("-inf")
    labels[1] = split + (x.shape[-1] - split) // 2
    return case._replace(logits=x, labels=labels)


def _labels_on_both_sides(case: TokenLogprobsCase, split: int) -> TokenLogprobsCase:
    """Sampled labels cluster on a few ids; make sure both shards own some rows, at the shard edges too."""
    labels = case.labels.clone()
    v = case.logits.shape[-1]
    edges = [0, split - 1, split, v - 1]
    for i, y in zip(range(2, 2 + len(edges)), edges, strict=False):
        if i < labels.numel() and labels[i] != case.ignore_index:
            labels[i] = y
    return case._replace(labels=labels)


def _two_shards(name: str, case: TokenLogprobsCase, split: int, **options) -> Sharded:
    """Two ranks split the vocabulary at ``split`` (bounds ``(0, split, V)``), with labels on both sides."""
    return Sharded(name, _labels_on_both_sides(case, split), (0, split, case.logits.shape[-1]), **options)


def _cases() -> list[Sharded]:
    cases = []
    # Equal shards across a C++ chunk boundary (kChunk = 2048: each shard has 2 chunks), per-row temperature,
    # ignored rows, entropy, rank and both upstream gradients; -inf shards in rows 0 and 1.
    c = make_token_logprobs_inputs(24, 4200, dtype=F32, temperature="row", seed=11)
    cases.append(_two_shards("cpp-f32-equal", _with_neg_inf_shards(c, 2100), 2100))
    c = make_token_logprobs_inputs(24, 4200, dtype=BF16, temperature=0.7, seed=12)
    cases.append(_two_shards("cpp-bf16-equal", c, 2100))
    # Unequal shards, V odd, via vocab_start; the second also with the ranks in reverse vocabulary order
    # (rank 1 holds the low ids), so v_r != r * V_r.
    c = make_token_logprobs_inputs(20, 1001, dtype=F32, temperature="row", seed=13)
    cases.append(_two_shards("cpp-f32-unequal", c, 300, pass_vocab_start=True))
    c = make_token_logprobs_inputs(20, 1001, dtype=BF16, temperature="row", seed=14)
    cases.append(_two_shards("cpp-bf16-unequal-reversed", c, 700, order=(1, 0), pass_vocab_start=True))
    # fp64 (gradcheck dtype) with an odd vocabulary; lp-only / entropy-only gradients without rank.
    c = make_token_logprobs_inputs(10, 37, dtype=F64, temperature="row", seed=15)
    cases.append(_two_shards("cpp-f64-odd", c, 18, pass_vocab_start=True))
    c = make_token_logprobs_inputs(12, 500, dtype=F32, seed=16)
    cases.append(_two_shards("cpp-f32-lp-only", c, 250, want_entropy=False, want_rank=False, grad="lp"))
    cases.append(_two_shards("cpp-f32-entropy-only", c, 250, want_rank=False, grad="h"))
    cases.append(_two_shards("cpp-f32-inplace", c, 250, inplace_backward=True))
    cases.append(_two_shards("cpp-f32-no-grad", c, 250, grad=None))
    # N = 0: the collectives still run, outputs are empty.
    c = make_token_logprobs_inputs(0, 64, dtype=F32, seed=17)
    cases.append(Sharded("cpp-f32-N0", c, (0, 32, 64)))
    # Triton under the interpreter: tiny shapes (one BLOCK_V per shard).
    c = make_token_logprobs_inputs(6, 81, dtype=F32, temperature="row", seed=18)
    cases.append(_two_shards("triton-f32-unequal", c, 40, impl="triton", pass_vocab_start=True))
    c = make_token_logprobs_inputs(6, 80, dtype=BF16, temperature=0.8, seed=19)
    cases.append(_two_shards("triton-bf16-equal", c, 40, impl="triton"))
    return cases


BAD = [
    vp.Bad("gap", (0, 40), (30, 30), expected="vocab_start"),
    vp.Bad("overlap", (0, 20), (30, 30), expected="vocab_start"),
    vp.Bad("not-from-zero", (10, 40), (30, 30), expected="vocab_start"),
    vp.Bad("unequal-without-vocab-start", (None, None), (30, 31), expected="vocab_start"),
    vp.Bad("label-above-global-vocab", (None, None), (30, 30), label=60, expected="outside [0, V_glob"),
    vp.Bad("negative-label", (None, None), (30, 30), label=-3, expected="outside [0, V_glob"),
]


# ----------------------------------------------------------------------------------------------------------
# The spawned workers
# ----------------------------------------------------------------------------------------------------------


def _call(spec: Sharded, x: torch.Tensor, **kwargs):
    """The op on ``x`` (the full logits or a rank's shard) with the case's labels, temperature and options."""
    case = spec.case
    return token_logprobs(
        x,
        case.labels,
        temperature=case.temperature,
        ignore_index=case.ignore_index,
        want_entropy=spec.want_entropy,
        want_rank=spec.want_rank,
        return_lse=True,
        **kwargs,
    )


def _run_one(spec: Sharded, rank: int, group):
    lo, hi = spec.shard(rank)
    x = spec.case.logits[..., lo:hi].detach().clone()
    if spec.grad is not None:
        x.requires_grad_(True)
    out = _call(
        spec,
        x,
        inplace_backward=spec.inplace_backward,
        process_group=group,
        vocab_start=lo if spec.pass_vocab_start else None,
        impl=spec.impl,
    )
    grad = input_grad(x, out, spec.case, spec.grad)
    detached = tuple(None if t is None else t.detach() for t in out)
    return detached, grad


def _bad_call(b: vp.Bad, rank: int, group) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, b.local_vocab[rank], generator=g)
    labels = torch.tensor([1, 2, 3, -100])
    if b.label is not None:
        labels[0] = b.label
    token_logprobs(x, labels, process_group=group, vocab_start=b.vocab_start[rank], validate=True)


def _work(rank: int, group, cases: list[Sharded], bad: list[vp.Bad]) -> dict:
    """What one rank saves: every case's outputs and local gradient, every bad call's error."""
    return {
        "results": {spec.name: vp.traceback_on_error(_run_one, spec, rank, group) for spec in cases},
        "errors": {b.name: vp.error_of(_bad_call, b, rank, group) for b in bad},
    }


@pytest.fixture(scope="module")
def sharded_runs(tmp_path_factory):
    """Run every case and bad input on two gloo ranks in one spawn; {rank: {"results", "errors"}}."""
    _skip_unless("cpp")
    cases = _cases()
    assert [c.name for c in cases] == CASE_NAMES
    if unavailable_reason("triton", CPU, F32) is not None:
        cases = [c for c in cases if c.impl != "triton"]
    runs = vp.spawn_on_two_ranks(tmp_path_factory, "vocab_parallel", _work, cases, BAD)
    return {c.name: c for c in cases}, runs


# ----------------------------------------------------------------------------------------------------------
# Checks
# ----------------------------------------------------------------------------------------------------------


def _unsharded(spec: Sharded):
    """The unsharded cpp op on the full logits, with the same upstream gradients."""
    x = spec.case.logits.detach().clone().requires_grad_(spec.grad is not None)
    out = _call(spec, x, impl="cpp")
    grad = input_grad(x, out, spec.case, spec.grad)
    return out, grad


def _full_gradient(spec: Sharded, grads: dict[int, torch.Tensor]) -> torch.Tensor:
    return torch.cat([grads[spec.order[k]] for k in range(vp.WORLD)], dim=-1)


# Spelled out (not [c.name for c in _cases()]) so that collecting this module, which the spawned workers also
# import, does not build the inputs; the fixture checks that the two lists agree.
CASE_NAMES = [
    "cpp-f32-equal",
    "cpp-bf16-equal",
    "cpp-f32-unequal",
    "cpp-bf16-unequal-reversed",
    "cpp-f64-odd",
    "cpp-f32-lp-only",
    "cpp-f32-entropy-only",
    "cpp-f32-inplace",
    "cpp-f32-no-grad",
    "cpp-f32-N0",
    "triton-f32-unequal",
    "triton-bf16-equal",
]


@pytest.mark.parametrize("name", CASE_NAMES)
def test_sharded_equals_unsharded(sharded_runs, name):
    """Outputs identical (bitwise) on both ranks and equal to the unsharded op; gradient shards concatenate to
    the unsharded gradient. Both within docs/ops.md section 8 of the float64 oracle."""
    specs, runs = sharded_runs
    if name not in specs:
        pytest.skip("impl='triton' is not runnable here (no interpreter)")
    spec = specs[name]
    per_rank = vp.results_on_every_rank(runs, name)
    (outs0, _), (outs1, _) = per_rank[0], per_rank[1]
    vp.assert_outputs_equal_across_ranks(name, outs0, outs1)

    case = spec.case
    dtype = case.logits.dtype
    acc = F64 if dtype == F64 else F32
    out = outs0
    lead = case.labels.shape
    assert out[0].shape == lead and out[0].dtype == acc
    assert (out[1] is None) == (not spec.want_entropy) and (out[2] is None) == (not spec.want_rank)
    if case.labels.numel() == 0:
        return
    ref_out, ref_grad = _unsharded(spec)
    valid = valid_rows(case)
    oracle = run_token_logprobs_reference(case, compute_dtype=F64, grad=spec.grad)
    ref = run_token_logprobs_reference(case, compute_dtype=acc, grad=spec.grad)

    fields = [("logprobs", 0), ("lse", 3)] + ([("entropy", 1)] if spec.want_entropy else [])
    for f, i in fields:
        got = out[i]
        assert_stat_close(
            got, getattr(oracle, f), getattr(ref, f), dtype=dtype, name=f"{name} {f}", valid=valid
        )
        # Same non-finite pattern as the unsharded op (lp = -inf where the label logit is -inf).
        assert torch.equal(torch.isfinite(got), torch.isfinite(getattr(ref_out, f))), f"{name} {f} non-finite"
        assert bool((got[~valid] == 0).all()), f"{name} {f}: ignored rows must be 0"
        fin = valid & torch.isfinite(got)
        torch.testing.assert_close(
            got[fin], getattr(ref_out, f)[fin], rtol=1e-5, atol=2e-5 if acc == F32 else 1e-10
        )
    if spec.want_rank:
        assert torch.equal(out[2], ref_out.rank), f"{name}: rank differs from the unsharded op"

    if spec.grad is None:
        assert per_rank[0][1] is None
        return
    grads = {r: per_rank[r][1] for r in range(vp.WORLD)}
    for r in range(vp.WORLD):
        lo, hi = spec.shard(r)
        assert grads[r].dtype == dtype and grads[r].shape == (*lead, hi - lo)
    full = _full_gradient(spec, grads)
    g_lp = case.g_lp if spec.grad in ("both", "lp") else None
    g_h = case.g_h if spec.grad in ("both", "h") else None
    assert_grad_close(
        full, oracle.grad, ref.grad, dtype=dtype, g_lp=g_lp, g_h=g_h, name=f"{name} grad_logits", valid=valid
    )
    assert bool((full[~valid] == 0).all()), f"{name}: ignored rows must have a zero gradient"
    tol = {F32: (1e-5, 1e-6), BF16: (1.6e-2, 1e-5), F64: (1e-10, 1e-12)}[dtype]
    torch.testing.assert_close(
        full.float() if dtype == BF16 else full,
        ref_grad.float() if dtype == BF16 else ref_grad,
        rtol=tol[0],
        atol=tol[1],
    )


@pytest.mark.parametrize("bad", BAD, ids=[b.name for b in BAD])
def test_bad_layout_or_labels_raise_on_every_rank(sharded_runs, bad):
    _, runs = sharded_runs
    vp.assert_raised_on_every_rank(runs, bad)


def test_vocab_start_without_process_group_raises():
    x = torch.randn(3, 10)
    labels = torch.tensor([1, 2, 3])
    with pytest.raises(ValueError, match="vocab_start"):
        token_logprobs(x, labels, vocab_start=0)


@pytest.mark.parametrize("impl", ["cpp", "triton"])
def test_sharded_kernels_single_process(impl):
    """The kernel contract without collectives: each shard run with its offset (registered ops, in-process),
    combined by hand in float64 as docs/ops.md 3.3 says, equals the fp64 oracle; and the backward ops given
    the global statistics give the oracle gradient shard by shard."""
    _skip_unless(impl)
    from reasonrl.ops.token_logprobs import registered_ops

    fwd, bwd, _ = registered_ops(impl)
    case = make_token_logprobs_inputs(8, 97, dtype=F32, temperature="row", seed=21)
    case = _labels_on_both_sides(case, 33)
    x, labels, temp = case.logits, case.labels, case.temperature.to(F32)
    v = x.shape[-1]
    bounds = [(0, 33), (33, 97)]
    pivot = x.gather(1, labels.clamp(0, v - 1)[:, None]).squeeze(1).float()
    parts = [
        fwd(x[:, lo:hi].contiguous(), labels, temp, 1.0, case.ignore_index, True, True, False, lo, v, pivot)
        for lo, hi in bounds
    ]
    f64 = F64
    m = torch.stack([p[4][:, 0] for p in parts]).to(f64)
    log_s = torch.stack([p[4][:, 1] for p in parts]).to(f64)
    lp_r = torch.stack([p[0] for p in parts]).to(f64)
    h_r = torch.stack([p[1] for p in parts]).to(f64)
    big_m = m.max(0).values
    t = torch.where(torch.isfinite(lp_r), lp_r + log_s + m, -math.inf).max(0).values
    s = torch.exp(log_s + m - big_m)
    big_s = s.sum(0)
    bs = (s * (log_s - h_r + m - big_m)).sum(0)
    lp = (t - big_m) - torch.log(big_s)
    h = torch.log(big_s) - bs / big_s
    rank = 1 + sum(p[2].to(torch.int64) - 1 for p in parts)

    valid = valid_rows(case)
    oracle = run_token_logprobs_reference(case, compute_dtype=f64)
    ref = run_token_logprobs_reference(case, compute_dtype=F32)
    # Owner ranks: the local lp is finite exactly where the shard holds the label; -inf elsewhere.
    for (lo, hi), p in zip(bounds, parts, strict=True):
        owns = valid & (labels >= lo) & (labels < hi)
        assert bool(torch.isfinite(p[0][owns]).all()) and bool((p[0][valid & ~owns] == -math.inf).all())
    assert_stat_close(lp.float(), oracle.logprobs, ref.logprobs, dtype=F32, name=f"{impl} lp", valid=valid)
    assert_stat_close(h.float(), oracle.entropy, ref.entropy, dtype=F32, name=f"{impl} H", valid=valid)
    assert torch.equal(rank[valid], oracle.rank[valid].to(torch.int64)), f"{impl} rank"

    stats = torch.stack([big_m, torch.log(big_s)], 1).float()
    grad = torch.cat(
        [
            bwd(
                case.g_lp,
                case.g_h,
                x[:, lo:hi].contiguous(),
                labels,
                temp,
                1.0,
                case.ignore_index,
                stats,
                h.float(),
                lo,
                v,
            )
            for lo, hi in bounds
        ],
        dim=1,
    )
    assert_grad_close(
        grad,
        oracle.grad,
        ref.grad,
        dtype=F32,
        g_lp=case.g_lp,
        g_h=case.g_h,
        name=f"{impl} sharded grad",
        valid=valid,
    )
