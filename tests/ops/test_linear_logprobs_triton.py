"""The Triton fused-linear kernels (kernels/linear_logprobs.py) against the float64 oracle, on CPU under
the Triton interpreter and (marked gpu) compiled on CUDA.

The launchers are called directly (the registered ``linear_token_logprobs`` op is tested with the op). The
oracle is ``hidden @ weight.T + bias`` in float64 followed by THE reference ``token_logprobs_reference``
in float64, with torch.autograd for the three gradients under random upstream g_lp and g_H. The yardstick
of docs/ops.md section 8 is the same computation "in the input dtype with fp32 accumulation": fp32 logits from
the (exact) products of the inputs, the fp32 reference, grad_logits rounded to the input dtype, and fp32
GEMMs for grad_hidden / grad_weight / grad_bias rounded to their dtypes.

Shapes stay at N <= 48, H <= 64, V <= 300 (the interpreter runs every program in numpy), with N, H and V
not multiples of the blocks. The "small" configuration forces 16 x 64 x 32 tiles, several vocabulary splits
in the forward and several vocabulary chunks in the backward, so the combine kernel, the chunk loop and
the accumulating GEMM all run on these tiny shapes.
"""

from __future__ import annotations

import pytest
import torch

from reasonrl.reference.token_logprobs import token_logprobs_reference
from reasonrl.testing import assert_close_to_oracle, assert_stat_close, sample_labels, tolerance

pytest.importorskip("triton")
from reasonrl.kernels import linear_logprobs as K  # noqa: E402  (fails loudly if the module is missing)

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
IGNORE = -100


def _small_config(monkeypatch, workspace_bytes=16 * 1024):
    # Small tiles (the interpreter's speed); the architecture / forward arguments are ignored.
    monkeypatch.setattr(
        K, "_tile_config", lambda n, v, h, dt, *a, **k: dict(BLOCK_N=16, BLOCK_V=64, BLOCK_K=32, num_warps=4)
    )
    monkeypatch.setattr(
        K, "_matmul_config", lambda dt, *a: dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=2, num_warps=4)
    )
    monkeypatch.setattr(K, "_target_programs", lambda device: 8)
    monkeypatch.setattr(K, "WORKSPACE_BYTES", workspace_bytes)


def _case(n, hdim, vocab, dtype, *, bias=True, temperature="row", ignore_frac=0.2, seed=0):
    """Inputs whose logits have a per-row entropy of a few nats; labels sampled from softmax(x / tau)."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn((n, hdim), generator=g, dtype=torch.float64)
    weight = torch.randn((vocab, hdim), generator=g, dtype=torch.float64) * (2.5 / hdim**0.5)
    b = torch.randn((vocab,), generator=g, dtype=torch.float64) * 0.5 + 1.0 if bias else None
    hidden, weight = hidden.to(dtype), weight.to(dtype)
    b = b.to(dtype) if bias else None
    if temperature == "row":
        temp = 0.6 + 0.8 * torch.rand((n,), generator=g)
    else:
        temp = float(temperature)
    logits = _logits64(hidden, weight, b)
    labels = sample_labels(
        logits, temperature=temp, ignore_frac=ignore_frac, ignore_index=IGNORE, generator=g
    )
    if n > 2:  # the vocabulary ends as labels
        labels[0], labels[1] = 0, vocab - 1
    g_lp = torch.randn((n,), generator=g)
    g_h = torch.randn((n,), generator=g)
    return hidden, weight, b, labels, temp, g_lp, g_h


def _logits64(hidden, weight, bias):
    x = hidden.double() @ weight.double().T
    return x + bias.double() if bias is not None else x


def _run(hidden, weight, bias, labels, temp, g_lp, g_h, *, want_entropy=True, want_rank=True):
    temp_t = temp if isinstance(temp, torch.Tensor) else None
    temp_s = 1.0 if isinstance(temp, torch.Tensor) else temp
    lp, ent, rank, lse, stats = K.linear_logprobs_fwd(
        hidden, weight, bias, labels, temp_t, temp_s, IGNORE, want_entropy, want_rank
    )
    grads = K.linear_logprobs_bwd(
        g_lp, g_h if want_entropy else None, hidden, weight, bias, labels, temp_t, temp_s, IGNORE, stats, ent
    )
    return (lp, ent, rank, lse, stats), grads


def _reference(hidden, weight, bias, labels, temp, g_lp, g_h, compute_dtype):
    """Outputs and (grad_hidden, grad_weight, grad_bias). float64: the oracle. float32: the docs/ops.md 8
    yardstick in the input dtype (fp32 logits accumulator, grad_logits rounded to
    the input dtype, fp32 GEMMs)."""
    dtype = hidden.dtype
    if compute_dtype == torch.float64:
        h = hidden.double().requires_grad_(True)
        w = weight.double().requires_grad_(True)
        b = bias.double().requires_grad_(True) if bias is not None else None
        x = h @ w.T + (b if b is not None else 0.0)
    else:
        x = hidden.float() @ weight.float().T
        if bias is not None:
            x = x + bias.float()
        x = x.detach().requires_grad_(True)
    t = temp.to(compute_dtype) if isinstance(temp, torch.Tensor) else temp
    out = token_logprobs_reference(
        x,
        labels,
        temperature=t,
        ignore_index=IGNORE,
        want_entropy=True,
        want_rank=True,
        return_lse=True,
        compute_dtype=compute_dtype,
    )
    (out.logprobs * g_lp.to(compute_dtype) + out.entropy * g_h.to(compute_dtype)).sum().backward()
    if compute_dtype == torch.float64:
        grads = (h.grad, w.grad, b.grad if b is not None else None)
    else:
        gl = x.grad.to(dtype).float()
        grads = (
            (gl @ weight.float()).to(dtype),
            (gl.T @ hidden.float()).to(dtype),
            gl.sum(0).to(dtype) if bias is not None else None,
        )
    return out, grads


def _check(hidden, weight, bias, labels, temp, g_lp, g_h, tag):
    dtype = hidden.dtype
    (lp, ent, rank, lse, stats), (gh, gw, gb) = _run(hidden, weight, bias, labels, temp, g_lp, g_h)
    oracle, ograds = _reference(hidden, weight, bias, labels, temp, g_lp, g_h, torch.float64)
    ref, rgrads = _reference(hidden, weight, bias, labels, temp, g_lp, g_h, torch.float32)
    n = labels.shape[0]
    valid = labels != IGNORE

    for name, got in (("logprobs", lp), ("entropy", ent), ("lse", lse)):
        assert got.shape == (n,) and got.dtype == F32, (name, got.shape, got.dtype)
        assert_stat_close(
            got, getattr(oracle, name), getattr(ref, name), dtype=dtype, name=f"{tag} {name}", valid=valid
        )
        assert bool((got[~valid] == 0).all()), f"{tag} {name}: ignored rows must be 0"
    assert stats.shape == (n, 2) and torch.equal((stats[:, 0] + stats[:, 1])[valid], lse[valid])

    # rank: exact up to near-ties within GEMM rounding (docs/ops.md 8: columns
    # within 1e-4 (1 + |x_y|) of x_y).
    assert rank.dtype == torch.int32 and rank.shape == (n,)
    x = _logits64(hidden, weight, bias)
    for i in range(n):
        y = int(labels[i])
        if y == IGNORE:
            assert int(rank[i]) == 0
            continue
        tol = 1e-4 * (1 + abs(float(x[i, y])))
        others = torch.cat([x[i, :y], x[i, y + 1 :]])
        lo = 1 + int((others > x[i, y] + tol).sum())
        hi = 1 + int((others > x[i, y] - tol).sum())
        assert lo <= int(rank[i]) <= hi, f"{tag} rank row {i}: {int(rank[i])} not in [{lo}, {hi}]"

    # Gradients: docs/ops.md 8, err <= 2 err(reference in the input dtype, fp32 accumulation) + atol, with the
    # grad_logits line of the tolerance table (atol 1e-7 x the gradient's magnitude, +1 ulp for 16-bit
    # outputs, which are rounded once).
    tol = tolerance("grad", dtype)
    for name, got, o, r, like in (
        ("grad_hidden", gh, ograds[0], rgrads[0], hidden),
        ("grad_weight", gw, ograds[1], rgrads[1], weight),
        ("grad_bias", gb, ograds[2], rgrads[2], bias),
    ):
        if like is None:
            assert got is None, f"{tag} {name}: expected None without a bias"
            continue
        assert got.dtype == like.dtype and got.shape == like.shape, (name, got.dtype, got.shape)
        assert_close_to_oracle(
            got,
            o,
            r,
            atol_scale=tol.atol_scale,
            name=f"{tag} {name}",
            magnitude=float(o.abs().max()),
            ulp_dtype=dtype if tol.ulps else None,
            ref_factor=tol.ref_factor,
        )
    assert bool((gh[~valid] == 0).all()), f"{tag}: ignored rows must get a zero grad_hidden row"


# Chosen to cover each axis at least once, not the full product (the interpreter is slow): both bias
# settings, both temperature forms, both tile configurations for fp32 and bf16, one fp16 case.
CASES = [
    # dtype, n, hdim, vocab, bias, temperature, config
    (F32, 45, 40, 300, True, "row", "small"),
    (F32, 37, 64, 257, False, 0.7, "default"),
    (BF16, 45, 40, 300, True, 1.3, "small"),
    (BF16, 33, 64, 257, False, "row", "default"),
    (F16, 20, 40, 130, True, "row", "default"),
    # H a multiple of 16 (the ALIGNED kernels), several vocabulary chunks, the last one (300 - 256 = 44
    # columns) stored padded to 48 in the dx workspace, with a bias (its partial sums padded too).
    (BF16, 45, 32, 300, True, "row", "small"),
]


@pytest.mark.parametrize(
    "dtype,n,hdim,vocab,bias,temperature,config",
    CASES,
    ids=[
        f"{str(c[0])[6:]}-n{c[1]}-h{c[2]}-v{c[3]}-{'bias' if c[4] else 'nobias'}-t{c[5]}-{c[6]}"
        for c in CASES
    ],
)
def test_matches_oracle(monkeypatch, dtype, n, hdim, vocab, bias, temperature, config):
    if config == "small":
        _small_config(monkeypatch)
    case = _case(n, hdim, vocab, dtype, bias=bias, temperature=temperature)
    _check(*case, tag=f"triton-linear {dtype} [{n}, {hdim}] x [{vocab}] {config}")


def test_small_config_really_splits_and_chunks(monkeypatch):
    # Guards the test above: the forced configuration gives several forward splits and backward chunks.
    _small_config(monkeypatch)
    assert K._vocab_splits(3, K._cdiv(300, 64), torch.device("cpu"))[0] == 3
    for elt in (2, 4):
        nc, vc = K._bwd_chunks(45, 300, 16, 64, elt)
        assert nc == 45 and vc < 300, (elt, nc, vc)


def test_row_chunks_accumulate_grad_weight(monkeypatch):
    # A workspace too small for all rows x BLOCK_V: rows are chunked and grad_weight accumulates in fp32
    # across row chunks (the N > ~1M rows path of a real GPU), with bias.
    _small_config(monkeypatch, workspace_bytes=4096)
    assert K._bwd_chunks(45, 300, 16, 64, 2)[0] < 45
    case = _case(45, 40, 300, BF16, bias=True, temperature="row")
    _check(*case, tag="triton-linear bf16 row-chunked")


def test_all_rows_ignored():
    hidden, weight, bias, labels, temp, g_lp, g_h = _case(19, 40, 130, F32)
    labels = torch.full_like(labels, IGNORE)
    (lp, ent, rank, lse, stats), (gh, gw, gb) = _run(hidden, weight, bias, labels, temp, g_lp, g_h)
    for t in (lp, ent, rank, lse, stats, gh, gw, gb):
        assert bool((t == 0).all())
    assert gw.shape == weight.shape and gb.shape == bias.shape  # zero tensors, not None


def test_invalid_rows_are_nan_with_zero_gradient():
    # validate=False semantics: a label outside [0, V) or a bad temperature gives NaN statistics for that row
    # only, and the row contributes nothing to any gradient.
    hidden, weight, bias, labels, temp, g_lp, g_h = _case(20, 40, 130, F32, ignore_frac=0.0)
    labels[3] = 130
    temp[5] = 0.0
    temp[6] = float("nan")
    (lp, ent, _, lse, _), (gh, gw, gb) = _run(hidden, weight, bias, labels, temp, g_lp, g_h)
    bad = torch.zeros(20, dtype=torch.bool)
    bad[[3, 5, 6]] = True
    assert bool(lp[bad].isnan().all() and ent[bad].isnan().all() and lse[bad].isnan().all())
    assert bool(lp[~bad].isfinite().all()) and bool((gh[bad] == 0).all())
    # The same gradients as with those rows ignored.
    labels2 = labels.clone()
    labels2[bad] = IGNORE
    temp2 = temp.clone()
    temp2[bad] = 1.0
    _, (gh2, gw2, gb2) = _run(hidden, weight, bias, labels2, temp2, g_lp, g_h)
    assert torch.equal(gh, gh2) and torch.equal(gw, gw2) and torch.equal(gb, gb2)


@pytest.mark.parametrize("which", ["lp", "h", "none"])
def test_one_upstream_gradient(which):
    # A missing upstream gradient means 0 (its work is compiled out); want_entropy=False passes entropy [0].
    hidden, weight, bias, labels, temp, g_lp, g_h = _case(20, 40, 130, F32)
    want_entropy = which != "lp"
    lp, ent, _, _, stats = K.linear_logprobs_fwd(
        hidden, weight, bias, labels, temp, 1.0, IGNORE, want_entropy, False
    )
    assert ent.shape == ((20,) if want_entropy else (0,))
    glp = g_lp if which == "lp" else None
    gh_up = g_h if which == "h" else None
    gh, gw, gb = K.linear_logprobs_bwd(
        glp, gh_up, hidden, weight, bias, labels, temp, 1.0, IGNORE, stats, ent
    )
    if which == "none":
        assert bool((gh == 0).all() and (gw == 0).all() and (gb == 0).all())
        return
    # The oracle (float64) and the same-dtype reference (float32) with the missing upstream gradient as 0.
    up_lp = g_lp if which == "lp" else torch.zeros(20)
    up_h = g_h if which == "h" else torch.zeros(20)
    (oh, ow, ob), (rh, rw, rb) = (
        _reference(hidden, weight, bias, labels, temp, up_lp, up_h, dtype)[1]
        for dtype in (torch.float64, torch.float32)
    )
    for name, got, o, r in (
        ("grad_hidden", gh, oh, rh),
        ("grad_weight", gw, ow, rw),
        ("grad_bias", gb, ob, rb),
    ):
        assert_close_to_oracle(
            got, o, r, atol_scale=1e-7, name=f"upstream {which} {name}", magnitude=float(o.abs().max())
        )


def test_no_rows():
    hidden = torch.empty((0, 40))
    weight = torch.randn(130, 40)
    bias = torch.randn(130)
    labels = torch.empty((0,), dtype=torch.long)
    lp, ent, rank, lse, stats = K.linear_logprobs_fwd(
        hidden, weight, bias, labels, None, 1.0, IGNORE, True, True
    )
    assert lp.shape == (0,) and ent.shape == (0,) and rank.shape == (0,) and stats.shape == (0, 2)
    gh, gw, gb = K.linear_logprobs_bwd(lp, ent, hidden, weight, bias, labels, None, 1.0, IGNORE, stats, ent)
    assert gh.shape == (0, 40) and bool((gw == 0).all()) and bool((gb == 0).all())


def test_backward_is_bitwise_deterministic(monkeypatch):
    _small_config(monkeypatch)
    case = _case(37, 40, 300, F32)
    _, g1 = _run(*case)
    _, g2 = _run(*case)
    assert all(torch.equal(a, b) for a, b in zip(g1, g2, strict=True))


def test_runtime_sizes_are_not_specialised():
    # N, V, H, ignore_index and the chunk offsets must never trigger a recompile (docs/ops.md 0).
    for kernel, names in (
        (K._linear_logprobs_fwd_kernel, {"n_rows", "vocab", "hdim", "ignore_index", "blocks_per_split"}),
        (K._linear_logprobs_combine_kernel, {"n_rows", "vocab", "ignore_index", "n_splits"}),
        (
            K._linear_logprobs_dz_kernel,
            {"n_rows", "vocab", "hdim", "ignore_index", "row_start", "v_start", "v_count"},
        ),
        (K._matmul_kernel, {"m_size", "n_size", "k_size", "a_offset", "b_offset", "c_offset"}),
    ):
        # A JITFunction keeps the list as an attribute; the interpreter's wrapper keeps the jit kwargs.
        dns = getattr(kernel, "do_not_specialize", None) or getattr(kernel, "kwargs", {}).get(
            "do_not_specialize"
        )
        assert dns is not None, f"cannot read do_not_specialize from {type(kernel)}"
        got = {kernel.arg_names[i] if isinstance(i, int) else i for i in dns}
        assert names <= got, (kernel.arg_names, names - got)


# ----------------------------------------------------------------------------------------------------------
# GPU (pytest -m gpu on a CUDA machine): a realistic shape, compiled kernels, default configuration.
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize(
    "dtype,n,hdim,vocab", [(BF16, 2048, 1024, 32000), (F32, 512, 512, 32000), (BF16, 1000, 1000, 151936)]
)
def test_gpu_matches_oracle(dtype, n, hdim, vocab):
    # Non-multiple N / H / V in the last case; the float64 oracle ([N, V] fp64 softmax) fits next to it.
    hidden, weight, bias, labels, temp, g_lp, g_h = _case(
        n, hdim, vocab, dtype, bias=True, temperature="row", ignore_frac=0.1
    )
    cuda = [
        t.cuda() if isinstance(t, torch.Tensor) else t
        for t in (hidden, weight, bias, labels, temp, g_lp, g_h)
    ]
    _check(*cuda, tag=f"triton-linear cuda {dtype} [{n}, {hdim}] x [{vocab}]")
    _, g1 = _run(*cuda)
    _, g2 = _run(*cuda)
    same = all(torch.equal(a, b) for a, b in zip(g1, g2, strict=True))
    assert same, "backward must be bitwise deterministic"
