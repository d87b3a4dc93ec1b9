"""Ahead-of-time compile check of reasonrl's Triton kernels for Hopper (sm_90a), without a GPU.

Every directly launched Triton kernel is reached through its launch helper in ``kernels/*.py`` (the same
code the registered ops run), called with ``device="meta"`` tensors at realistic shapes and a ``launch=``
hook that records the launch instead of running it. Each distinct specialisation (Triton's signature,
constexprs and divisibility attributes, plus the launch options) is then compiled with the real Triton
compiler and its bundled ``ptxas`` for ``GPUTarget("cuda", 90, 32)`` (``.target sm_90a``), and the PTX /
SASS is read for:

* registers, spills (ptxas ``-v``: bytes of spill stores / loads) and shared memory (Triton's allocation);
* global load widths (SASS ``LDG`` by bytes per thread) and asynchronous copies (``LDGSTS`` = cp.async by
  width, ``UTMALDG`` = TMA), with the copy groups left in flight while computing, N of the largest
  ``cp.async.wait_group N`` (0: the loop waits for every copy, i.e. is not pipelined);
* the MMA kind (``wgmma`` / ``mma.sync`` / ``tcgen05``) and how many wgmma groups stay in flight
  (``wgmma.wait_group N``).

The checks (``check_result``): no spills anywhere; in the alignment class where the data allow it (sizes and
row strides multiples of 16 elements), 16-byte global loads (plain or cp.async) in the streaming kernels and
16-byte cp.async (>= 1 copy group in flight) or TMA, plus on sm_90 wgmma with >= 1 group in flight, in
the 16-bit GEMM kernels (wgmma needs 64-row tiles: the 16- and 32-row buckets for small batches use
mma.sync).

Usage (from the repository root; ``make check-sm90`` runs the full set)::

    python -m reasonrl.bench.sm90_report                 # the full set for sm_90, table + checks
    python -m reasonrl.bench.sm90_report --subset ci     # the representative subset of the test suite
    python -m reasonrl.bench.sm90_report --arch 80 --arch 100 --markdown out.md

``tests/kernels/test_sm90_compile.py`` runs the ``ci`` subset in a subprocess and skips (with the reason)
where Triton's CUDA backend or ptxas is unavailable. Nothing here needs or touches a GPU; the kernels are
compiled with TRITON_INTERPRET unset (the tool sets it to 0 before importing them).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter

# ----------------------------------------------------------------------------------------------------------
# Enumerating launches through the helpers' launch= hook
# ----------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Launch:
    case: str  # the helper call that produced it
    kernel: object  # the JITFunction
    args: tuple
    kwargs: dict


class _Recorder:
    """A ``launch=`` hook: ``launch(kernel)[grid](*args, **kwargs)`` records instead of running."""

    def __init__(self, case: str, into: list):
        self.case = case
        self.into = into

    def __call__(self, kernel):
        rec = self

        class _Grid:
            def __getitem__(self, grid):
                def run(*args, **kwargs):
                    rec.into.append(Launch(rec.case, kernel, args, kwargs))

                return run

        return _Grid()


def _meta(shape, dtype):
    import torch

    return torch.empty(shape, dtype=dtype, device="meta")


#: Realistic shapes: N rows of a 4k-token batch; vocabularies of Qwen2 (151936: multiple of 16), GPT-2
#: (50257: not, so rows are not 16-byte aligned) and a small one (4096, the small-block bucket); hidden size
#: 4096 (and 4100, the unaligned class of the linear kernels).
N_ROWS = 4096
VOCABS = {"aligned": 151936, "unaligned": 50257, "small": 4096}
HIDDEN = {"aligned": 4096, "unaligned": 4100}

#: Policy-loss presets (loss kind, KL kind, has_old, bias_correction, dual clip): the trainer presets of
#: docs/losses.md section 3 and one of each remaining surrogate / estimator.
_LOSS_PRESETS = {
    "grpo_clip_k3": (0, 4, True, False, 0.0),
    "dapo_clip": (0, 0, True, False, 0.0),
    "dual_clip_lowvar": (0, 5, True, False, 3.0),
    "cispo_k1": (1, 1, True, False, 0.0),
    "cispo2_abs": (2, 2, True, False, 0.0),
    "sapo_k2": (3, 3, True, False, 0.0),
    "reinforce_k3st_bc": (4, 4 | 8, False, True, 0.0),
}


def _cases(subset: str, arch: int):
    """(name, callable(launch)) pairs; each callable runs one launch helper on meta tensors."""
    import torch

    from reasonrl.kernels import linear_logprobs as lk
    from reasonrl.kernels import linear_policy_loss as lpk
    from reasonrl.kernels import policy_loss as pk
    from reasonrl.kernels import token_logprobs as tk

    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    out = []

    def tok_fwd(dt, vkey, ent, rank, temp, pivot):
        def run(launch):
            v = VOCABS[vkey]
            x = _meta((N_ROWS, v), dtypes[dt])
            lab = _meta((N_ROWS,), torch.int64)
            t = _meta((N_ROWS,), torch.float32) if temp else None
            piv = _meta((N_ROWS,), torch.float32) if pivot else None
            tk.token_logprobs_fwd(x, lab, t, 1.0, -100, ent, rank, 0, v if pivot else 0, piv, launch=launch,
                                  **_arch_kw(tk.token_logprobs_fwd, arch))  # fmt: skip

        return run

    def tok_bwd(dt, vkey, has_lp, has_h, temp):
        def run(launch):
            v = VOCABS[vkey]
            x = _meta((N_ROWS, v), dtypes[dt])
            lab = _meta((N_ROWS,), torch.int64)
            t = _meta((N_ROWS,), torch.float32) if temp else None
            g = _meta((N_ROWS,), torch.float32)
            stats = _meta((N_ROWS, 2), torch.float32)
            ent = _meta((N_ROWS,), torch.float32)
            tk.token_logprobs_bwd(g if has_lp else None, g if has_h else None, x, lab, t, 1.0, -100, stats,
                                  ent, x, launch=launch, **_arch_kw(tk.token_logprobs_bwd, arch))  # fmt: skip

        return run

    def pl_fused(dt, vkey, preset, temp):
        kind, kl, has_old, bc, dual = _LOSS_PRESETS[preset]

        def run(launch):
            v = VOCABS[vkey]
            x = _meta((N_ROWS, v), dtypes[dt])
            lab = _meta((N_ROWS,), torch.int64)
            t = _meta((N_ROWS,), torch.float32) if temp else None
            inputs = _meta((N_ROWS, 6), torch.float32)
            params = (0.2, 0.28, 10.0, dual, 20.0, 5.0, 1.0, 1.05, has_old, bc)
            pk.policy_loss_fused(x, lab, t, 1.0, -100, inputs, kind, kl, params, launch=launch,
                                 **_arch_kw(pk.policy_loss_fused, arch))  # fmt: skip

        return run

    def lin(dt, hkey, n, bias, temp, ent, rank, bwd_lp, bwd_h, vkey="aligned"):
        def run(launch):
            h = HIDDEN[hkey]
            v = VOCABS[vkey]
            hid = _meta((n, h), dtypes[dt])
            w = _meta((v, h), dtypes[dt])
            b = _meta((v,), dtypes[dt]) if bias else None
            lab = _meta((n,), torch.int64)
            t = _meta((n,), torch.float32) if temp else None
            kw = _arch_kw(lk.linear_logprobs_fwd, arch)
            lk.linear_logprobs_fwd(hid, w, b, lab, t, 1.0, -100, ent, rank, launch=launch, **kw)
            if bwd_lp or bwd_h:
                g = _meta((n,), torch.float32)
                stats = _meta((n, 2), torch.float32)
                e = _meta((n,), torch.float32)
                lk.linear_logprobs_bwd(g if bwd_lp else None, g if bwd_h else None, hid, w, b, lab, t, 1.0,
                                       -100, stats, e, launch=launch, **kw)  # fmt: skip

        return run

    def lin_pl(dt, preset):
        kind, kl, has_old, bc, dual = _LOSS_PRESETS[preset]

        def run(launch):
            h, v, n = HIDDEN["aligned"], VOCABS["aligned"], N_ROWS
            hid = _meta((n, h), dtypes[dt])
            w = _meta((v, h), dtypes[dt])
            lab = _meta((n,), torch.int64)
            inputs = _meta((n, 6), torch.float32)
            params = (0.2, 0.28, 10.0, dual, 20.0, 5.0, 1.0, 1.05, has_old, bc)
            lpk.linear_policy_loss(hid, w, None, lab, None, 1.0, -100, inputs, kind, kl, params,
                                   launch=launch, **_arch_kw(lpk.linear_policy_loss, arch))  # fmt: skip

        return run

    if subset == "ci":
        # One specialisation of each kernel in each class the checks care about (see the module docstring):
        # the streaming kernels aligned and not, the 16-bit GEMMs (forward, dz, both matmul call sites),
        # and the fp32 linear forward (the one that used to spill).
        out += [
            ("token_logprobs_fwd bf16 V=151936 entropy+rank",
             tok_fwd("bf16", "aligned", True, True, False, False)),
            ("token_logprobs_fwd bf16 V=50257 entropy",
             tok_fwd("bf16", "unaligned", True, False, False, False)),
            ("token_logprobs_bwd bf16 V=151936 lp+H", tok_bwd("bf16", "aligned", True, True, False)),
            ("policy_loss_fused bf16 V=151936 grpo", pl_fused("bf16", "aligned", "grpo_clip_k3", False)),
            ("linear bf16 H=4096 N=4096 fwd+bwd", lin("bf16", "aligned", N_ROWS, False, False, True, False,
                                                     True, True)),  # fmt: skip
            ("linear fp32 H=4096 N=4096 fwd", lin("fp32", "aligned", N_ROWS, False, False, True, False, False,
                                                 False)),  # fmt: skip
        ]
        return out

    # The full set: every dtype x alignment class x block bucket, with the flag combinations that change
    # the code the most (each flag alone and all together), not their whole product (~245 compilations).
    tok_flags = [(False, False, False, False), (True, False, False, False), (True, False, True, False),
                 (True, True, False, False), (True, True, True, True),
                 (False, True, False, True)]  # fmt: skip
    bwd_flags = [(True, False, False), (False, True, False), (True, True, False), (True, True, True)]
    lin_flags = [(False, False, True, False, True, True), (False, False, True, False, True, False),
                 (True, True, True, True, False, False), (False, False, False, False, False, False),
                 (True, True, True, False, True, True)]  # fmt: skip
    for dt in dtypes:
        for vkey in VOCABS:
            for ent, rank, temp, pivot in tok_flags:
                name = f"token_logprobs_fwd {dt} {vkey} ent={ent} rank={rank} temp={temp} pivot={pivot}"
                out.append((name, tok_fwd(dt, vkey, ent, rank, temp, pivot)))
            for has_lp, has_h, temp in bwd_flags:
                name = f"token_logprobs_bwd {dt} {vkey} lp={has_lp} H={has_h} temp={temp}"
                out.append((name, tok_bwd(dt, vkey, has_lp, has_h, temp)))
            presets = _LOSS_PRESETS if vkey == "aligned" else ("grpo_clip_k3",)
            for preset in presets:
                for temp in (False, True) if preset == "grpo_clip_k3" and vkey == "aligned" else (False,):
                    out.append((f"policy_loss_fused {dt} {vkey} {preset} temp={temp}",
                                pl_fused(dt, vkey, preset, temp)))  # fmt: skip
        for hkey in HIDDEN:
            for n in (N_ROWS, 16):  # the largest and the smallest row-block bucket
                for bias, temp, ent, rank, g_lp, g_h in lin_flags:
                    name = (f"linear {dt} {hkey} N={n} bias={bias} temp={temp} ent={ent} rank={rank} "
                            f"bwd=({g_lp},{g_h})")  # fmt: skip
                    out.append((name, lin(dt, hkey, n, bias, temp, ent, rank, g_lp, g_h)))
        # A vocabulary that is not a multiple of 16: the backward's last chunk (bias + both gradients).
        odd_v = lin(dt, "aligned", N_ROWS, True, False, True, False, True, True, vkey="unaligned")
        out.append((f"linear {dt} aligned V=50257 N={N_ROWS} bias=True bwd=(True,True)", odd_v))
        for preset in _LOSS_PRESETS:
            out.append((f"linear_policy_loss {dt} {preset}", lin_pl(dt, preset)))
    return out


def _arch_kw(helper, arch: int) -> dict:
    """``arch=`` for helpers that choose tile configurations per architecture (meta tensors have none)."""
    import inspect

    return {"arch": arch} if "arch" in inspect.signature(helper).parameters else {}


def enumerate_launches(subset: str, arch: int, only: str | None = None) -> list[Launch]:
    launches: list[Launch] = []
    for name, run in _cases(subset, arch):
        if only is None or only in name:
            run(_Recorder(name, launches))
    return launches


# ----------------------------------------------------------------------------------------------------------
# Specialisation (Triton's own binder) and compilation
# ----------------------------------------------------------------------------------------------------------


def _bind(launch: Launch, backend):
    """(signature, constexprs, attrs, options, key) exactly as ``JITFunction.run`` would compute them."""
    from triton.runtime.jit import create_function_from_signature

    k = launch.kernel
    binder = create_function_from_signature(k.signature, k.params, backend)
    kwargs = dict(launch.kwargs)
    bound, spec, opts = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = k._pack_args(backend, kwargs, bound, spec, opts)
    key = (
        k.__name__,
        tuple(sorted(signature.items())),
        tuple(sorted((str(p), repr(v)) for p, v in constexprs.items())),
        tuple(sorted((str(p), repr(v)) for p, v in attrs.items())),
        repr(sorted(options.__dict__.items())),
    )
    return signature, constexprs, attrs, options, key


def _variant(launch: Launch, signature: dict, constexprs: dict, attrs: dict) -> str:
    """A short description: the first pointer's dtype, the constexprs that are flags / sizes, and which
    integer arguments Triton specialised (D = divisible by 16, =1 = constant)."""
    k = launch.kernel
    names = [p.name for p in k.params]
    parts = [_data_dtype(signature)]
    for path, v in sorted(constexprs.items()):
        name = names[path[0]]
        if name.endswith("_ptr"):
            continue
        if isinstance(v, bool) or name in ("LOSS_KIND", "KL_BASE"):
            if v is True:
                parts.append(name)
            elif not isinstance(v, bool):
                parts.append(f"{name}={v}")
        elif signature.get(name) == "constexpr" and not name.startswith(("BLOCK", "GROUP", "DOT", "STAGES")):
            parts.append(f"{name}={v}")
    ints = []
    for path, a in sorted(attrs.items()):
        name = names[path[0]]
        if name.endswith("_ptr"):
            continue
        if a:
            ints.append(name)
    for path in constexprs:
        name = names[path[0]]
        if signature.get(name) != "constexpr" and not name.endswith("_ptr"):
            ints.append(f"{name}=1")
    if ints:
        parts.append("D:" + ",".join(sorted(ints)))
    return " ".join(parts)


def _tile(constexprs: dict, launch: Launch, options) -> str:
    names = [p.name for p in launch.kernel.params]
    c = {names[p[0]]: v for p, v in constexprs.items()}
    order = ("BLOCK_M", "BLOCK_N", "BLOCK_K") if "BLOCK_M" in c else ("BLOCK_N", "BLOCK_V", "BLOCK_K")
    dims = [str(c[n]) for n in (*order, "BLOCK", "BLOCK_R") if n in c]
    return f"{'x'.join(dims)} w{options.num_warps} s{options.num_stages}"


_PTXAS_RE = {
    "regs": re.compile(r"Used (\d+) registers"),
    "spill_st": re.compile(r"(\d+) bytes spill stores"),
    "spill_ld": re.compile(r"(\d+) bytes spill loads"),
    "stack": re.compile(r"(\d+) bytes stack frame"),
}


def _sass_features(cubin: bytes) -> dict:
    """Load widths, async copies and MMA instructions from the SASS (cuobjdump of the cubin)."""
    from triton import knobs

    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
        path = f.name
    try:
        sass = subprocess.run([knobs.nvidia.cuobjdump.path, "-sass", path], check=True, capture_output=True,
                              text=True).stdout  # fmt: skip
    finally:
        os.remove(path)
    ldg, ldgsts, stg = Counter(), Counter(), Counter()
    for op in re.findall(r"\b((?:LDGSTS|LDG|STG)(?:\.[A-Z0-9_]+)*)", sass):
        mods = op.split(".")[1:]
        width = 4
        for m in mods:
            if m in ("128", "64"):
                width = int(m) // 8
            elif m in ("U16", "S16"):
                width = 2
            elif m in ("U8", "S8"):
                width = 1
        {"LDG": ldg, "LDGSTS": ldgsts, "STG": stg}[op.split(".")[0]][width] += 1
    return dict(
        ldg=dict(ldg),
        ldgsts=dict(ldgsts),
        stg=dict(stg),
        tma=len(re.findall(r"\bUTMALDG\b", sass)),
        hgmma=len(re.findall(r"\bHGMMA\b", sass)),
        hmma=len(re.findall(r"\bHMMA\b", sass)),
        tcgen05=len(re.findall(r"\bUTC[A-Z]*MMA\b", sass)),
        spill_insts=len(re.findall(r"\b(?:STL|LDL)\b", sass)),
    )


def _ptx_features(ptx: str) -> dict:
    waits = [int(n) for n in re.findall(r"cp\.async\.wait_group\s+(\d+)", ptx)]
    wg = [int(n) for n in re.findall(r"wgmma\.wait_group\.sync\.aligned\s+(\d+)", ptx)]
    return dict(
        target=(re.search(r"\.target\s+(\S+)", ptx) or [None, "?"])[1],
        cp_async_16=len(re.findall(r"cp\.async\.cg\.shared\.global[^;]*,\s*16(?:,|;)", ptx)),
        cp_async_wait_max=max(waits) if waits else None,
        tma_ptx=len(re.findall(r"cp\.async\.bulk\.tensor", ptx)),
        wgmma=len(re.findall(r"wgmma\.mma_async", ptx)),
        wgmma_inflight=max(wg) if wg else None,
        mma_sync=len(re.findall(r"\bmma\.sync", ptx)),
        tcgen05=len(re.findall(r"tcgen05\.mma", ptx)),
        approx=sorted(set(re.findall(r"\b(ex2\.approx[.a-z0-9]*|lg2\.approx[.a-z0-9]*|div\.full[.a-z0-9]*|"
                                     r"rcp\.approx[.a-z0-9]*|div\.approx[.a-z0-9]*)", ptx))),  # fmt: skip
    )


def compile_launch(launch: Launch, arch: int) -> dict:
    """Compile one launch for ``arch`` and read its resources and features (raises on a compile error)."""
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.compiler import compile as triton_compile

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    signature, constexprs, attrs, options, _ = _bind(launch, backend)
    log = io.StringIO()
    t0 = time.perf_counter()
    with knobs.nvidia.scope():
        knobs.nvidia.dump_ptxas_log = True  # ptxas -v is always run by Triton; this prints its log
        with contextlib.redirect_stdout(log):
            ck = triton_compile(ASTSource(launch.kernel, signature, constexprs, attrs), target=target,
                                options=options.__dict__)  # fmt: skip
    seconds = time.perf_counter() - t0
    text = log.getvalue()
    res = {k: int(m.group(1)) if (m := r.search(text)) else 0 for k, r in _PTXAS_RE.items()}
    res.update(_sass_features(ck.asm["cubin"]))
    res.update(_ptx_features(ck.asm["ptx"]))
    res.update(
        kernel=launch.kernel.__name__,
        case=launch.case,
        variant=_variant(launch, signature, constexprs, attrs),
        tile=_tile(constexprs, launch, options),
        shared=int(ck.metadata.shared),
        arch=arch,
        seconds=round(seconds, 1),
        aligned=_aligned(launch, constexprs),
        tile_rows=_tile_rows(constexprs, launch),
        dtype=_data_dtype(signature),
    )
    return res


def _tile_rows(constexprs: dict, launch: Launch) -> int:
    """Rows of a GEMM tile (BLOCK_N of the forward / dz kernels, BLOCK_M of the matmul); 0 elsewhere."""
    names = [p.name for p in launch.kernel.params]
    c = {names[p[0]]: v for p, v in constexprs.items()}
    if launch.kernel.__name__ == "_matmul_kernel":
        return int(c.get("BLOCK_M", 0))
    return int(c.get("BLOCK_N", 0)) if "BLOCK_K" in c else 0


def _data_dtype(signature: dict) -> str:
    """The dtype of the data the kernel streams: the first 16-bit pointer argument, else fp32."""
    ptrs = [str(v).lstrip("*") for v in signature.values() if str(v).startswith("*")]
    return next((d for d in ptrs if d in ("bf16", "fp16")), "fp32")


def _aligned(launch: Launch, constexprs: dict) -> bool:
    """Whether the launch is in the class where 16-byte accesses are possible: the helpers pass an
    ``ALIGNED`` constexpr (sizes and strides multiples of 16 elements). Code without the flag (before
    issue 17) counts as aligned exactly when the data were (vocabulary / hidden size multiples of 16)."""
    names = [p.name for p in launch.kernel.params]
    for path, v in constexprs.items():
        if names[path[0]] == "ALIGNED":
            return bool(v)
    return ("50257" not in launch.case) and ("unaligned" not in launch.case) and ("4100" not in launch.case)


# ----------------------------------------------------------------------------------------------------------
# Checks and report
# ----------------------------------------------------------------------------------------------------------

STREAMING = {"_token_logprobs_fwd_kernel", "_token_logprobs_bwd_kernel", "_policy_loss_fused_kernel"}
GEMM = {"_linear_logprobs_fwd_kernel", "_linear_logprobs_dz_kernel", "_matmul_kernel"}


def check_result(r: dict) -> list[str]:
    """The failures of one compiled specialisation (empty when it passes)."""
    bad = []
    if r["spill_st"] or r["spill_ld"] or r["spill_insts"]:
        bad.append(f"spills: {r['spill_st']} B stores, {r['spill_ld']} B loads ({r['spill_insts']} LDL/STL)")
    if not r["aligned"]:
        return bad
    if r["kernel"] in STREAMING and not (r["ldg"].get(16, 0) or r["ldgsts"].get(16, 0)):
        bad.append(f"no 16-byte global loads in a streaming kernel (LDG {r['ldg']}, LDGSTS {r['ldgsts']})")
    if r["kernel"] in GEMM and r["dtype"] in ("bf16", "fp16"):
        if not (r["ldgsts"].get(16, 0) or r["tma"]):
            bad.append(f"no 16-byte cp.async / TMA in a 16-bit GEMM kernel (LDGSTS {r['ldgsts']})")
        elif r["tma"] == 0 and not r["cp_async_wait_max"]:
            bad.append("cp.async not pipelined (no copy group left in flight: cp.async.wait_group 0 only)")
        # wgmma works on 64-row warpgroup tiles: the small-batch buckets (16 / 32 rows) use mma.sync.
        if r["arch"] == 90 and r["tile_rows"] >= 64:
            if not r["hgmma"]:
                bad.append("no wgmma (HGMMA) in a 16-bit GEMM kernel on sm_90")
            elif not r["wgmma_inflight"]:
                bad.append("wgmma waited on at every step (wgmma.wait_group 0 only)")
    return bad


def _widths(c: dict) -> str:
    return " ".join(f"{w}Bx{n}" for w, n in sorted(c.items(), reverse=True)) or "-"


def _pipeline(r: dict) -> str:
    if r["tma"]:
        return f"TMA ({r['tma']})"
    if r["ldgsts"]:
        return f"cp.async {_widths(r['ldgsts'])}, {r['cp_async_wait_max'] or 0} in flight"
    return "-"


def _mma(r: dict) -> str:
    if r["hgmma"]:
        return f"wgmma ({r['wgmma_inflight'] or 0} in flight)"
    if r["tcgen05"]:
        return "tcgen05"
    if r["hmma"]:
        return "mma.sync"
    return "-"


COLUMNS = ("kernel", "variant", "tile", "regs", "spill B", "smem B", "global loads", "pipelining", "MMA", "s")


def row_cells(r: dict) -> list[str]:
    spill = f"{r['spill_st']}/{r['spill_ld']}" if (r["spill_st"] or r["spill_ld"]) else "0"
    name = r["kernel"].strip("_").removesuffix("_kernel")
    loads = "LDG " + _widths(r["ldg"])
    return [name, r["variant"], r["tile"], str(r["regs"]), spill, str(r["shared"]), loads, _pipeline(r),
            _mma(r), str(r["seconds"])]  # fmt: skip


def markdown_table(results: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in results:
        lines.append("| " + " | ".join(row_cells(r)) + " |")
    return "\n".join(lines)


def _compile_safe(item):
    launch, arch = item
    try:
        return compile_launch(launch, arch), None
    except Exception as exc:  # report every failure, not only the first
        return None, f"{launch.kernel.__name__} [{launch.case}] sm_{arch}: {type(exc).__name__}: {exc}"[:2000]


_POOL_ITEMS: list = []


def _compile_index(i: int):
    return _compile_safe(_POOL_ITEMS[i])


def summarise_cache(cache_dir: str) -> list[dict]:
    """The same features for every kernel a real run compiled into a Triton cache (``TRITON_CACHE_DIR``):
    bench/gpu_check.sh uses it to record what the device actually ran next to this ahead-of-time check.
    Registers and stack come from ``cuobjdump --dump-resource-usage`` (no ptxas log is kept in a cache)."""
    import glob
    import json

    from triton import knobs

    out = []
    for meta_path in sorted(glob.glob(os.path.join(cache_dir, "*", "*.json"))):
        with open(meta_path) as fh:
            meta = json.load(fh)
        cubin_path = meta_path[: -len(".json")] + ".cubin"
        if "num_warps" not in meta or not os.path.exists(cubin_path):
            continue
        with open(cubin_path, "rb") as fh:
            cubin = fh.read()
        usage = subprocess.run([knobs.nvidia.cuobjdump.path, "--dump-resource-usage", cubin_path],
                               capture_output=True, text=True).stdout  # fmt: skip
        regs = re.search(r"REG:(\d+)", usage)
        stack = re.search(r"STACK:(\d+)", usage)
        r = dict(kernel=meta.get("name", "?"), regs=int(regs.group(1)) if regs else 0,
                 stack=int(stack.group(1)) if stack else 0, shared=meta.get("shared", 0),
                 tile=f"w{meta.get('num_warps')} s{meta.get('num_stages')}",
                 target=str(meta.get("target")))  # fmt: skip
        r.update(_sass_features(cubin))
        ptx_path = meta_path[: -len(".json")] + ".ptx"
        if os.path.exists(ptx_path):
            with open(ptx_path) as fh:
                r.update(_ptx_features(fh.read()))
        out.append(r)
    return out


def _print_cache_summary(rows: list[dict]) -> None:
    cols = ("kernel", "tile", "regs", "stack B", "LDL/STL", "smem B", "global loads", "pipelining", "MMA")
    print("  ".join(cols))
    for r in rows:
        r.setdefault("cp_async_wait_max", None)
        r.setdefault("wgmma_inflight", None)
        print("  ".join([r["kernel"], r["tile"], str(r["regs"]), str(r["stack"]), str(r["spill_insts"]),
                         str(r["shared"]), "LDG " + _widths(r["ldg"]), _pipeline(r), _mma(r)]))  # fmt: skip


def unavailable_reason() -> str | None:
    """Why sm_90 compilation cannot run here (None when it can): Triton's CUDA backend and ptxas."""
    try:
        import triton  # noqa: F401
        from triton import knobs
        from triton.backends import backends
    except Exception as exc:
        return f"triton not importable: {exc}"
    if "nvidia" not in backends:
        return "triton has no NVIDIA backend installed"
    try:
        for tool in (knobs.nvidia.ptxas_blackwell, knobs.nvidia.cuobjdump):
            if tool is None or not os.path.exists(tool.path):
                return "ptxas / cuobjdump not found"
    except Exception as exc:
        return f"ptxas / cuobjdump unavailable: {exc}"
    return None


def run(subset: str, archs: list[int], jobs: int, only: str | None = None):
    """Compile every distinct specialisation; returns (results, failures, launches seen)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    items, seen, n_launches = [], set(), 0
    for arch in archs:
        backend = make_backend(GPUTarget("cuda", arch, 32))
        for launch in enumerate_launches(subset, arch, only):
            n_launches += 1
            key = (arch, _bind(launch, backend)[4])
            if key not in seen:
                seen.add(key)
                items.append((launch, arch))
    if jobs > 1 and len(items) > 1:
        import multiprocessing as mp

        _POOL_ITEMS[:] = items
        with mp.get_context("fork").Pool(jobs) as pool:
            outs = pool.map(_compile_index, range(len(items)), chunksize=1)
    else:
        outs = [_compile_safe(it) for it in items]
    results = [r for r, _ in outs if r is not None]
    failures = [e for _, e in outs if e is not None]
    results.sort(key=lambda r: (r["arch"], r["kernel"], r["variant"]))
    return results, failures, n_launches


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--subset", choices=("ci", "full"), default="full")
    p.add_argument("--arch", type=int, action="append", help="compute capability x10 (default 90)")
    p.add_argument("--jobs", type=int, default=max(1, min(8, (os.cpu_count() or 1))))
    p.add_argument("--only", help="only the helper calls whose case name contains this text")
    p.add_argument("--from-cache", metavar="DIR",
                   help="summarise the kernels a run compiled into this Triton cache, then exit")  # fmt: skip
    p.add_argument("--markdown", help="also write the table as Markdown to this file")
    p.add_argument("--json", help="also write every result (and its check failures) as JSON to this file")
    p.add_argument("--no-check", action="store_true",
                   help="print the table only (exit 0 unless a compile fails)")  # fmt: skip
    a = p.parse_args(argv)
    os.environ["TRITON_INTERPRET"] = "0"  # before the kernels are defined (they may not be imported yet)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    if "reasonrl.kernels.token_logprobs" in sys.modules and os.environ.get("TRITON_INTERPRET") != "0":
        print("sm90_report: kernels were defined under TRITON_INTERPRET=1; run in a fresh process")
        return 2
    why = unavailable_reason()
    if why:
        print(f"sm90_report: SKIP: {why}")
        return 3
    if a.from_cache:
        _print_cache_summary(summarise_cache(a.from_cache))
        return 0
    archs = a.arch or [90]
    t0 = time.perf_counter()
    # A private cache: every specialisation is really compiled (ptxas -v runs), never read from a cache.
    with tempfile.TemporaryDirectory() as cache:
        os.environ["TRITON_CACHE_DIR"] = cache
        results, failures, n_launches = run(a.subset, archs, a.jobs, a.only)
    problems = [(r, check_result(r)) for r in results]
    print(f"{len(results) + len(failures)} specialisations from {n_launches} launches "
          f"({a.subset} set, sm_{'/'.join(map(str, archs))}), {len(failures)} failed to compile, "
          f"{time.perf_counter() - t0:.0f} s")  # fmt: skip
    widths = [max(len(c), *(len(row_cells(r)[i]) for r in results)) if results else len(c)
              for i, c in enumerate(COLUMNS)]  # fmt: skip
    print("  ".join(c.ljust(w) for c, w in zip(COLUMNS, widths, strict=True)))
    for r, bad in problems:
        line = "  ".join(c.ljust(w) for c, w in zip(row_cells(r), widths, strict=True))
        print(line + ("  FAIL: " + "; ".join(bad) if bad else ""))
    for f in failures:
        print("COMPILE FAILURE:", f)
    if a.markdown:
        with open(a.markdown, "w") as fh:
            fh.write(markdown_table(results) + "\n")
    if a.json:
        import json

        with open(a.json, "w") as fh:
            out = {"results": [dict(r, failures=bad) for r, bad in problems], "compile_failures": failures,
                   "launches": n_launches}  # fmt: skip
            json.dump(out, fh, indent=1, default=str)
    n_bad = sum(1 for _, bad in problems if bad)
    if failures or (n_bad and not a.no_check):
        print(f"sm90_report: FAILED ({len(failures)} compile failures, {n_bad} specialisations fail checks)")
        return 1
    print("sm90_report: OK" + (f" (checks not enforced: {n_bad} would fail)" if a.no_check and n_bad else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
