"""Vocab-parallel ``linear_token_logprobs`` and ``policy_loss_from_hidden`` (docs/ops.md section 3.3): two
gloo ranks on the loopback, each holding a contiguous shard of the lm_head rows (weight ``[V_r, H]``, bias
``[V_r]``), must give the unsharded op's outputs on both ranks; the per-rank weight / bias gradients,
concatenated, must be the unsharded gradients, and every rank's grad_hidden the unsharded one (the sum of the
partials, which ``reduce_grad_hidden=False`` returns unsummed).

One ``torch.multiprocessing.spawn`` (world size 2, a ``file://`` store in a temporary directory) runs every
case, as in test_token_logprobs_vocab_parallel.py: the workers only run the op and save what it returned; the
comparisons run here against the unsharded ``cpp`` op (same GEMM accumulation, so a tight tolerance) and the
float64 oracle.
"""

from __future__ import annotations

from dataclasses import dataclass

import _vocab_parallel as vp
import pytest
import torch

from reasonrl._backend import unavailable_reason
from reasonrl.losses import LossNormalizers, PolicyLossConfig, policy_loss_from_hidden
from reasonrl.ops.linear_token_logprobs import linear_token_logprobs

CPU = torch.device("cpu")
F32, F64, BF16 = torch.float32, torch.float64, torch.bfloat16
IGNORE = -100


@dataclass
class Case:
    """One vocab-parallel call: inputs of the full op, the split of the vocabulary and the op's options."""

    name: str
    hidden: torch.Tensor  # [..., H]
    weight: torch.Tensor  # [V, H] (full)
    bias: torch.Tensor | None
    labels: torch.Tensor
    temperature: float | torch.Tensor
    g_lp: torch.Tensor
    g_h: torch.Tensor
    bounds: tuple[int, int, int]  # the k-th slice of the vocabulary is [bounds[k], bounds[k + 1])
    order: tuple[int, int] = (0, 1)  # order[k] = the rank holding the k-th slice
    pass_vocab_start: bool = False
    want_entropy: bool = True
    want_rank: bool = True
    reduce_grad_hidden: bool = True
    workspace_bytes: int | None = None
    saved_logits_bytes: int | None = None  # docs/ops.md 3.4: the shard keeps its logits within this budget

    def shard(self, rank: int) -> tuple[int, int]:
        k = self.order.index(rank)
        return self.bounds[k], self.bounds[k + 1]


def _inputs(lead, h, v, *, dtype, bias, temperature, split, seed):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*lead, h, generator=g, dtype=F64).to(dtype)
    weight = (torch.randn(v, h, generator=g, dtype=F64) * 3 / h**0.5).to(dtype)
    b = (torch.randn(v, generator=g, dtype=F64) * 0.5).to(dtype) if bias else None
    labels = torch.randint(0, v, lead, generator=g)
    flat = labels.view(-1)
    n = flat.numel()
    if n:
        flat[torch.rand(n, generator=g) < 0.2] = IGNORE
        for i, y in zip(range(n), (0, split - 1, split, v - 1), strict=False):  # both shards, at the edges
            flat[i] = y
    acc = F64 if dtype == F64 else F32
    temp = (0.5 + torch.rand(lead, generator=g, dtype=F64)).to(acc) if temperature == "row" else temperature
    g_lp = torch.randn(lead, generator=g, dtype=F64).to(acc)
    g_h = torch.randn(lead, generator=g, dtype=F64).to(acc)
    return dict(hidden=hidden, weight=weight, bias=b, labels=labels, temperature=temp, g_lp=g_lp, g_h=g_h)


def _cases() -> list[Case]:
    # Chosen on purpose: equal shards (default layout) with bias, a per-row temperature and several row
    # chunks; an odd V split unequally and in reversed rank order (vocab_start) without bias; fp64 with an
    # odd V; the unsummed partial grad_hidden; log-prob only; N = 0 rows; bf16 (grad_hidden partials summed
    # in fp32 and rounded once, as the unsharded bf16 gradient).
    def inp(lead, h, v, split, seed, *, dtype=F32, bias=True, temperature=1.0):
        return _inputs(lead, h, v, dtype=dtype, bias=bias, temperature=temperature, split=split, seed=seed)

    return [
        Case("f32-equal-bias-rowtemp-chunks", **inp((4, 6), 32, 300, 150, 1, temperature="row"),
             bounds=(0, 150, 300), workspace_bytes=5 * (300 + 32) * 4),
        # Kept logits: 2 of the shard's 5-row chunks (12 rows of V_r = 150 fit), the rest recomputed.
        Case("f32-kept-logits-chunks", **inp((4, 6), 32, 300, 150, 10, temperature="row"),
             bounds=(0, 150, 300), workspace_bytes=5 * (300 + 32) * 4, saved_logits_bytes=12 * 150 * 4),
        Case("f32-unequal-nobias-reversed", **inp((20,), 24, 301, 200, 2, bias=False, temperature=0.8),
             bounds=(0, 200, 301), order=(1, 0), pass_vocab_start=True),
        Case("f64-unequal-bias", **inp((10,), 8, 37, 18, 3, dtype=F64, temperature="row"),
             bounds=(0, 18, 37), pass_vocab_start=True),
        Case("f32-no-reduce", **inp((12,), 16, 120, 60, 4), bounds=(0, 60, 120), reduce_grad_hidden=False),
        Case("f32-lp-only", **inp((12,), 16, 121, 50, 5), bounds=(0, 50, 121), pass_vocab_start=True,
             want_entropy=False, want_rank=False),
        Case("f32-N0", **inp((0,), 16, 64, 32, 6), bounds=(0, 32, 64)),
        Case("bf16-equal", **inp((10,), 16, 100, 50, 9, dtype=BF16, temperature="row"), bounds=(0, 50, 100)),
    ]


POLICY_CFG = PolicyLossConfig(
    loss_type="dapo", epsilon_high=0.28, beta=0.04, entropy_coef=0.01, temperature=0.9
)


def _policy_inputs():
    b, t, h, v = 4, 6, 24, 301
    d = _inputs((b, t), h, v, dtype=F32, bias=True, temperature=1.0, split=120, seed=7)
    g = torch.Generator().manual_seed(8)
    mask = torch.ones(b, t, dtype=torch.bool)
    mask[0, 4:] = False
    old = -torch.rand(b, t, generator=g) * 3
    kw = dict(advantages=torch.tensor([1.0, -0.7, 0.4, -1.5]), old_logprobs=old, ref_logprobs=old - 0.05,
              mask=mask)
    return d["hidden"], d["weight"], d["bias"], d["labels"], kw, (0, 120, 301)


BAD = [
    vp.Bad("gap", (0, 40), (30, 30), expected="vocab_start"),
    vp.Bad("overlap", (0, 20), (30, 30), expected="vocab_start"),
    vp.Bad("label-above-global-vocab", (None, None), (30, 30), label=60, expected="outside [0, V_glob"),
]


def _call(c: Case, hidden, weight, bias, **kw):
    return linear_token_logprobs(
        hidden, weight, c.labels, bias=bias, temperature=c.temperature, ignore_index=IGNORE,
        want_entropy=c.want_entropy, want_rank=c.want_rank, return_lse=True, impl="cpp",
        workspace_bytes=c.workspace_bytes, saved_logits_bytes=c.saved_logits_bytes, **kw,
    )


def _grads(c: Case, out, leaves):
    outs, gs = [out.logprobs], [c.g_lp]
    if c.want_entropy:
        outs.append(out.entropy)
        gs.append(c.g_h)
    return torch.autograd.grad(outs, leaves, gs)


def _run_one(c: Case, rank: int, group):
    lo, hi = c.shard(rank)
    leaves = [c.hidden.clone().requires_grad_(True), c.weight[lo:hi].clone().requires_grad_(True)]
    if c.bias is not None:
        leaves.append(c.bias[lo:hi].clone().requires_grad_(True))
    out = _call(c, leaves[0], leaves[1], leaves[2] if c.bias is not None else None, process_group=group,
                vocab_start=lo if c.pass_vocab_start else None, reduce_grad_hidden=c.reduce_grad_hidden)
    return tuple(None if t is None else t.detach() for t in out), _grads(c, out, leaves)


def _run_policy(rank: int, group):
    hidden, weight, bias, labels, kw, bounds = _policy_inputs()
    lo, hi = bounds[rank], bounds[rank + 1]
    leaves = [hidden.clone().requires_grad_(True), weight[lo:hi].clone().requires_grad_(True),
              bias[lo:hi].clone().requires_grad_(True)]
    out = policy_loss_from_hidden(leaves[0], leaves[1], labels, bias=leaves[2], normalizers=LossNormalizers(),
                                  config=POLICY_CFG, process_group=group, vocab_start=lo, **kw)
    return out.loss.detach(), torch.autograd.grad(out.loss, leaves)


def _bad_call(b: vp.Bad, rank: int, group) -> None:
    g = torch.Generator().manual_seed(0)
    h = torch.randn(4, 8, generator=g)
    w = torch.randn(b.local_vocab[rank], 8, generator=g)
    labels = torch.tensor([1, 2, 3, IGNORE])
    if b.label is not None:
        labels[0] = b.label
    linear_token_logprobs(h, w, labels, process_group=group, vocab_start=b.vocab_start[rank], validate=True,
                          impl="cpp")


def _work(rank: int, group, cases: list[Case], bad: list[vp.Bad]) -> dict:
    """What one rank saves: every case's and the policy loss's outputs and local gradients, every bad call's
    error, and the reference implementation's refusal of a process group."""
    results = {c.name: vp.traceback_on_error(_run_one, c, rank, group) for c in cases}
    results["policy"] = vp.traceback_on_error(_run_policy, rank, group)
    errors = {b.name: vp.error_of(_bad_call, b, rank, group) for b in bad}
    # No sharded path in the reference implementation: an explicit, clear refusal.
    errors["reference"] = vp.error_of(linear_token_logprobs, torch.randn(2, 4), torch.randn(3, 4),
                                   torch.tensor([0, 1]), process_group=group, impl="reference")
    return {"results": results, "errors": errors}


@pytest.fixture(scope="module")
def sharded_runs(tmp_path_factory):
    why = unavailable_reason("cpp", CPU, F32)
    if why is not None:
        pytest.skip(f"impl='cpp' is unavailable: {why}")
    cases = _cases()
    runs = vp.spawn_on_two_ranks(tmp_path_factory, "vocab_parallel_linear", _work, cases, BAD)
    return {c.name: c for c in cases}, runs


def _tol(dtype, grad=False):
    if dtype == F64:
        return dict(rtol=1e-10, atol=1e-10)
    if dtype == BF16 and grad:  # bf16 gradients: a couple of bf16 ulps (2^-8 relative)
        return dict(rtol=1.6e-2, atol=1e-3)
    return dict(rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize("name", [c.name for c in _cases()])
def test_sharded_equals_unsharded(sharded_runs, name):
    cases, runs = sharded_runs
    c = cases[name]
    per_rank = vp.results_on_every_rank(runs, name)
    (outs0, grads0), (outs1, grads1) = per_rank[0], per_rank[1]
    vp.assert_outputs_equal_across_ranks(name, outs0, outs1)

    leaves = [c.hidden.clone().requires_grad_(True), c.weight.clone().requires_grad_(True)]
    if c.bias is not None:
        leaves.append(c.bias.clone().requires_grad_(True))
    ref = _call(c, leaves[0], leaves[1], leaves[2] if c.bias is not None else None)
    tol = _tol(c.hidden.dtype)
    for f, got, want in zip(("logprobs", "entropy", "rank", "lse"), outs0, ref, strict=True):
        if want is None:
            assert got is None, f
            continue
        assert got.shape == want.shape and got.dtype == want.dtype, f
        if f == "rank":
            assert torch.equal(got, want), f"{name}: rank"
        else:
            torch.testing.assert_close(got, want.detach(), **tol, msg=lambda m, f=f: f"{name}: {f}: {m}")
    ref_grads = _grads(c, ref, leaves)

    by_rank = {0: grads0, 1: grads1}
    gh = {r: by_rank[r][0] for r in range(vp.WORLD)}
    if c.reduce_grad_hidden:
        assert torch.equal(gh[0], gh[1]), f"{name}: grad_hidden differs between ranks"
        got_gh = gh[0]
    else:
        got_gh = gh[0] + gh[1]
    tol = _tol(c.hidden.dtype, grad=True)
    torch.testing.assert_close(got_gh, ref_grads[0], **tol, msg=lambda m: f"{name}: grad_hidden: {m}")
    for i, what in ((1, "grad_weight"), (2, "grad_bias")):
        if i >= len(ref_grads):
            continue
        full = torch.cat([by_rank[c.order[k]][i] for k in range(vp.WORLD)], dim=0)
        torch.testing.assert_close(full, ref_grads[i], **tol, msg=lambda m, w=what: f"{name}: {w}: {m}")


def test_policy_loss_from_hidden_sharded(sharded_runs):
    _, runs = sharded_runs
    res = vp.results_on_every_rank(runs, "policy")
    assert torch.equal(res[0][0], res[1][0]), "the loss differs between ranks"
    hidden, weight, bias, labels, kw, bounds = _policy_inputs()
    leaves = [hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True),
              bias.clone().requires_grad_(True)]
    out = policy_loss_from_hidden(leaves[0], leaves[1], labels, bias=leaves[2], normalizers=LossNormalizers(),
                                  config=POLICY_CFG, impl="cpp", **kw)  # the unsharded single-pass path
    want = torch.autograd.grad(out.loss, leaves)
    tol = _tol(F32)
    torch.testing.assert_close(res[0][0], out.loss.detach(), **tol)
    assert torch.equal(res[0][1][0], res[1][1][0]), "grad_hidden differs between ranks"
    torch.testing.assert_close(res[0][1][0], want[0], **tol)
    for i in (1, 2):
        torch.testing.assert_close(torch.cat([res[0][1][i], res[1][1][i]]), want[i], **tol)


@pytest.mark.parametrize("bad", BAD, ids=lambda b: b.name)
def test_bad_input_raises_on_every_rank(sharded_runs, bad):
    _, runs = sharded_runs
    vp.assert_raised_on_every_rank(runs, bad)


def test_reference_impl_has_no_sharded_path(sharded_runs):
    _, runs = sharded_runs
    for r in range(vp.WORLD):
        kind, msg = runs[r]["errors"]["reference"]
        assert kind == "NotImplementedError" and "process_group" in msg, msg
