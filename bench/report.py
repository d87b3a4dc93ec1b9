"""Results (docs/performance.md section 4.8-4.9): environment metadata, the report dictionary written as JSON,
speed-ups against the reference baselines, Markdown and terminal tables, and the PNG plot.

matplotlib and rich (the ``bench`` extra) are imported where they are used; without them the terminal table
is the Markdown text and no PNG is written.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import re
import subprocess
import sys
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from . import PACKAGE_PARENT
from .inputs import DTYPE_SHORT, GIB

SCHEMA_VERSION = 1
# Results go where the user runs the benchmark unless --out-dir says otherwise (never into site-packages).
DEFAULT_OUT_DIR = Path(".")
# Statuses of a result row. Only "ok" rows carry timings.
OK, INCORRECT, NOT_INSTALLED, UNSUPPORTED, OOM, ERROR = (
    "ok", "incorrect", "not installed", "unsupported", "oom", "error")


# ----------------------------------------------------------------------------------------------------------
# Environment
# ----------------------------------------------------------------------------------------------------------


def pick_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()


def device_slug(device: torch.device) -> str:
    """File-name form of the device: ``cpu-amd-epyc``, ``nvidia-h100-80gb-hbm3``."""
    name = device_name(device).lower()
    if device.type == "cpu":
        name = "cpu-" + name
    return re.sub(r"[^a-z0-9]+", "-", name).strip("-")


def git_info() -> dict[str, Any]:
    """SHA of HEAD and whether tracked or untracked (non-ignored) files differ from it (source checkouts only:
    an installed package has no commit of its own, and a git repository around site-packages is not it)."""
    if not (PACKAGE_PARENT / "setup.py").is_file():
        return {"sha": None, "dirty": None}

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=PACKAGE_PARENT, capture_output=True, text=True,
                                 timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    status = git("status", "--porcelain")
    return {"sha": git("rev-parse", "HEAD"), "dirty": None if status is None else bool(status)}


def package_versions(names: Sequence[str]) -> dict[str, str | None]:
    """Installed distribution versions (metadata only: nothing is imported, so triton stays unloaded)."""
    versions: dict[str, str | None] = {}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _nvidia_driver() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None


def environment(device: torch.device, peers: Sequence[str] = ()) -> dict[str, Any]:
    """Run metadata required by docs/performance.md section 4.9."""
    env: dict[str, Any] = {
        "device_type": device.type,
        "device_name": device_name(device),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": package_versions(["torch", "triton", "reasonrl", *peers]),
        "git": git_info(),
        # How the C allocator treats freed memory decides whether every [N, V] output is page-faulted anew
        # (docs/benchmarks.md, "The allocator"): the settings that change it, when set.
        "allocator_env": {k: v for k, v in os.environ.items()
                          if k.startswith("MALLOC_") or k == "LD_PRELOAD"},
    }
    try:
        from reasonrl._backend import load_extension

        ext = load_extension()
        # 'parallel' repeats the thread settings recorded above in a long free-text form.
        env["reasonrl_build"] = None if ext is None else {
            k: v for k, v in ext.build_info().items() if k != "parallel"}
    except ImportError:
        env["reasonrl_build"] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update({
            "compute_capability": f"{props.major}.{props.minor}",
            "sm_count": props.multi_processor_count,
            "gpu_memory_gib": round(props.total_memory / GIB, 2),
            "l2_cache_bytes": getattr(props, "L2_cache_size", None),
            "cuda_version": torch.version.cuda,
            "driver_version": _nvidia_driver(),
        })
    return env


# ----------------------------------------------------------------------------------------------------------
# Report, speed-ups, tables, plot
# ----------------------------------------------------------------------------------------------------------


def fill_speedups(rows: list[dict[str, Any]], eager: str, compiled: str | tuple[str, ...]) -> None:
    """speedup_vs_eager / speedup_vs_compiled: baseline median / row median, same op, case and mode. With
    several compiled baselines the fastest one that passed in that case and mode is the baseline (the
    strongest compiled formulation); its name is the row's ``compiled_baseline``."""
    compiled = (compiled,) if isinstance(compiled, str) else tuple(compiled)
    base: dict[tuple, dict[str, float]] = {}
    for r in rows:
        if r["status"] == OK and r["provider"] in (eager, *compiled):
            base.setdefault((r["op"], r["case"], r["mode"]), {})[r["provider"]] = r["median_ms"]
    for r in rows:
        b = base.get((r["op"], r["case"], r["mode"]), {})
        ok = r["status"] == OK
        r["speedup_vs_eager"] = b[eager] / r["median_ms"] if ok and eager in b else None
        best = min((name for name in compiled if name in b), key=b.__getitem__, default=None)
        r["compiled_baseline"] = best
        r["speedup_vs_compiled"] = b[best] / r["median_ms"] if ok and best is not None else None


def _fmt(x: float | None, kind: str) -> str:
    if x is None:
        return "-"
    if kind == "ms":
        return f"{x:.0f}" if x >= 100 else f"{x:.1f}" if x >= 10 else f"{x:.2f}" if x >= 1 else f"{x:.3f}"
    if kind == "x":
        return f"{x:.2f}x"
    if kind == "pct":
        return f"{x:.1f}%"
    if kind == "err":
        return f"{x:.1e}"
    return f"{x:.0f}" if abs(x) >= 10 else f"{x:.1f}"


COLUMNS = ("case", "provider", "median ms", "p20-p80 ms", "throughput", "% ceiling", "x eager",
           "x compiled", "mem MiB", "max err", "status")


def _cells(r: dict[str, Any]) -> list[str]:
    ok = r["status"] == OK
    timed = ok and r.get("median_ms") is not None
    return [
        r["case"],
        r["provider"],
        _fmt(r.get("median_ms"), "ms") if timed else "-",
        f"{_fmt(r['p20_ms'], 'ms')}-{_fmt(r['p80_ms'], 'ms')}" if timed else "-",
        f"{r['throughput']:.1f} {r['unit']}" if timed else "-",
        _fmt(r.get("pct_ceiling"), "pct") if timed else "-",
        _fmt(r.get("speedup_vs_eager"), "x"),
        _fmt(r.get("speedup_vs_compiled"), "x"),
        _fmt(r.get("mem_delta_mib"), "mib"),
        _fmt(r.get("max_err"), "err"),
        r["status"] if not r.get("status_detail") else f"{r['status']}: {r['status_detail']}",
    ]


def _groups(rows: list[dict[str, Any]]) -> dict[tuple[str, str], list[dict[str, Any]]]:
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["op"], r["mode"]), []).append(r)
    return groups


def _notes(rows: list[dict[str, Any]]) -> list[str]:
    seen: dict[str, str] = {}
    for r in rows:
        if r.get("note"):
            seen.setdefault(r["provider"], r["note"])
    return [f"{p}: {n}" for p, n in seen.items()]


def run_line(timestamp: str, env: dict[str, Any]) -> str:
    """The line under a results title: when, which commit, torch, threads and, on CPU, the ISA variant of
    reasonrl's row kernels the run used (ATEN_CPU_CAPABILITY can lower it)."""
    dirty = " (dirty)" if env["git"]["dirty"] else ""
    isa = (env.get("reasonrl_build") or {}).get("cpu_isa_selected") if env["device_type"] == "cpu" else None
    return (f"{timestamp} · git {str(env['git']['sha'])[:12]}{dirty} · torch {env['versions'].get('torch')}"
            f" · {env['threads']} threads" + (f" · reasonrl CPU kernels: {isa}" if isa else ""))


def markdown_tables(rows: list[dict[str, Any]], report: dict[str, Any]) -> str:
    """One table per (op, mode): cases x providers; then ceilings and provider notes."""
    env, ceil = report["environment"], report["ceilings"]
    lines = [
        f"# {report['op']} benchmark: {env['device_name']}",
        "",
        run_line(report["timestamp"], env),
        "",
        *([f"Allocator: {' '.join(f'{k}={v}' for k, v in env['allocator_env'].items())}", ""]
          if env.get("allocator_env") else []),
        f"Ceilings: read {ceil['read_gbps']:.1f} GB/s, copy {ceil['copy_gbps']:.1f} GB/s"
        + (f", bf16 matmul {ceil['matmul_tflops']:.0f} TFLOP/s" if "matmul_tflops" in ceil else ""),
        "",
    ]
    for (op, mode), group in _groups(rows).items():
        lines += [f"## {op} · {mode}", "", "| " + " | ".join(COLUMNS) + " |",
                  "|" + "|".join("---" for _ in COLUMNS) + "|"]
        lines += ["| " + " | ".join(_cells(r)) + " |" for r in group]
        lines.append("")
    notes = _notes(rows)
    if notes:
        lines += ["Notes:", ""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(lines)


def print_tables(rows: list[dict[str, Any]], report: dict[str, Any]) -> None:
    """Terminal tables with rich when it is installed (the ``bench`` extra), else the Markdown text."""
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(markdown_tables(rows, report))
        return
    console = Console(width=max(160, Console().width))
    ceil = report["ceilings"]
    console.print(f"[bold]{report['op']}[/bold] on {report['environment']['device_name']}, "
                  f"{report['environment']['threads']} threads; ceilings: read {ceil['read_gbps']:.1f} GB/s, "
                  f"copy {ceil['copy_gbps']:.1f} GB/s")
    for (op, mode), group in _groups(rows).items():
        table = Table(title=f"{op} · {mode}", title_justify="left")
        for i, col in enumerate(COLUMNS):
            table.add_column(col, justify="left" if i in (0, 1, len(COLUMNS) - 1) else "right")
        for r in group:
            table.add_row(*_cells(r))
        console.print(table)
    for note in _notes(rows):
        console.print(f"  note: {note}")


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> Path | None:
    """Median time (p20-p80 bars) vs N, one line per provider, the measured floor dashed; one panel per
    (V, dtype) x mode. Providers are dodged sideways around each N so that points and labels do not overlap.
    Returns None (with a message) when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install -e '.[bench]'): no PNG written", file=sys.stderr)
        return None
    timed = [r for r in rows if r["status"] == OK and r.get("median_ms") is not None]
    if not timed:
        return None
    panels = sorted({(r.get("v", 0), r["dtype"]) for r in timed})
    modes = list(dict.fromkeys(r["mode"] for r in timed))
    providers = list(dict.fromkeys(r["provider"] for r in timed))
    colors = {p: plt.get_cmap("tab10")(i % 10) for i, p in enumerate(providers)}
    # Multiplicative x offsets (the x axis is log2): providers spread over +-0.25 octave around each N.
    dodge = {p: 2 ** (0.5 * (i / max(len(providers) - 1, 1) - 0.5)) for i, p in enumerate(providers)}
    fig, axes = plt.subplots(len(panels), len(modes), figsize=(4.8 * len(modes), 4.0 * len(panels)),
                             squeeze=False)
    for i, (v, dtype) in enumerate(panels):
        for j, mode in enumerate(modes):
            ax = axes[i][j]
            sel = [r for r in timed if r.get("v", 0) == v and r["dtype"] == dtype and r["mode"] == mode]
            ns = sorted({r["n"] for r in sel})
            for p in providers:
                pts = sorted((r["n"], r["median_ms"], r["p20_ms"], r["p80_ms"])
                             for r in sel if r["provider"] == p)
                if not pts:
                    continue
                n, y, lo, hi = (list(col) for col in zip(*pts, strict=True))
                x = [k * dodge[p] for k in n]
                yerr = [[m - a for m, a in zip(y, lo, strict=True)],
                        [b - m for m, b in zip(y, hi, strict=True)]]
                ax.errorbar(x, y, yerr=yerr, marker="o", capsize=3, color=colors[p], label=p)
                if len(ns) == 1:  # a single N: label the points, there is no trend to read
                    ax.annotate(f"  {_fmt(y[0], 'ms')}", (x[0], y[0]), fontsize=8, va="center")
            floor = sorted({(r["n"], r["floor_ms"]) for r in sel if r.get("floor_ms") is not None})
            for k, (n_, f) in enumerate(floor):
                ax.hlines(f, n_ * 2**-0.35, n_ * 2**0.35, colors="k", linestyles="--",
                          label="floor (measured ceilings)" if k == 0 else None)
            if len(floor) > 1:
                ax.plot([f[0] for f in floor], [f[1] for f in floor], "k--", linewidth=0.8)
            ax.set_yscale("log")
            ax.set_xscale("log", base=2)
            ax.set_xticks(ns, [str(n_) for n_ in ns])
            ax.set_xlim(ns[0] * 2**-0.7, ns[-1] * 2**0.9)  # room for the labels right of the points
            ax.minorticks_off()
            ax.set_title(f"{mode} · {f'V={v} ' if v else ''}{DTYPE_SHORT.get(dtype, dtype)}", fontsize=10)
            ax.set_xlabel("N (rows)")
            ax.set_ylabel("ms (median, p20-p80)")
            ax.grid(True, which="major", alpha=0.3)
    handles: dict[str, Any] = {}
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(lab, h)
    fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=min(len(handles), 6),
               fontsize=9)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, 0.08, 1, 0.95))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def timestamp() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")


def write_results(report: dict[str, Any], out_dir: Path, device: torch.device) -> dict[str, Path]:
    """``<device>-<timestamp>.json`` / ``.md`` / ``.png`` in ``out_dir``; returns the paths written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"{device_slug(device)}-{report['timestamp']}"
    paths = {"json": stem.with_suffix(".json"), "md": stem.with_suffix(".md")}
    paths["json"].write_text(json.dumps(report, indent=2, default=str) + "\n")
    paths["md"].write_text(markdown_tables(report["rows"], report))
    png = plot(report["rows"], stem.with_suffix(".png"),
               f"{report['op']} on {report['environment']['device_name']} "
               f"({report['environment']['threads']} threads), {report['timestamp']}")
    if png is not None:
        paths["png"] = png
    return paths


def new_report(op: str, device: torch.device, peers: Sequence[str], profile: str,
               argv: Sequence[str]) -> dict[str, Any]:
    return {
        "schema_version": SCHEMA_VERSION,
        "op": op,
        "timestamp": timestamp(),
        "profile": profile,
        "argv": list(argv),
        "environment": environment(device, peers),
        "ceilings": None,
        "cases": [],
        "rows": [],
    }
