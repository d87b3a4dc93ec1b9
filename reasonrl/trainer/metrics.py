"""Run outputs of the trainer (docs/trainer.md section 7): metrics JSONL, TensorBoard (when installed),
the PNG of the training curves, the progress bar's text."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

__all__ = ["MetricsWriter", "plot_curves", "progress_postfix"]


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None  # JSON has no NaN / inf
    return v


class MetricsWriter:
    """Appends one JSON object per record to ``metrics.jsonl`` (flushed each time, so a crash keeps what was
    logged) and mirrors scalars to TensorBoard when ``tensorboard`` is ``"on"`` or ``"auto"`` and
    installed. ``purge_step``: a resumed run's first new step; TensorBoard drops the events a killed run
    logged from that step on (``SummaryWriter(purge_step=...)``; the JSONL is rewritten on resume)."""

    def __init__(self, out_dir: Path, tensorboard: str = "auto", purge_step: int | None = None):
        self.path = Path(out_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a", encoding="utf-8")
        self._tb = None
        if tensorboard != "off":
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(log_dir=str(Path(out_dir) / "tensorboard"), purge_step=purge_step)
            except ImportError as exc:
                if tensorboard == "on":
                    raise RuntimeError("log.tensorboard='on' needs the tensorboard package") from exc

    def write(self, record: dict) -> None:
        self._file.write(json.dumps({k: _clean(v) for k, v in record.items()}) + "\n")
        self._file.flush()
        if self._tb is not None and "step" in record:
            for k, v in record.items():
                if (
                    isinstance(v, (int, float))
                    and not isinstance(v, bool)
                    and k != "step"
                    and math.isfinite(v)
                ):
                    self._tb.add_scalar(k, v, record["step"])

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def progress_postfix(m: dict) -> dict:
    """The progress bar's live values: reward, R3, KL, entropy, clip ratio, tokens/s."""
    keys = (
        ("reward", "reward"),
        ("r3", "r3"),
        ("kl", "kl"),
        ("entropy", "ent"),
        ("clip_ratio", "clip"),
        ("tokens_per_s", "tok/s"),
    )
    out = {}
    for key, short in keys:
        v = m.get(key)
        if isinstance(v, (int, float)) and math.isfinite(v):
            out[short] = f"{v:.0f}" if key == "tokens_per_s" else f"{v:.3g}"
    return out


def plot_curves(records: list[dict], path: Path, title: str = "") -> Path | None:
    """A PNG of the training curves (needs matplotlib; returns None without it)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    train = [r for r in records if r.get("kind") == "train"]
    evals = [r for r in records if r.get("kind") == "eval"]
    panels = [
        ("reward", [k for k in ("reward", "r3", "r_len") if any(k in r for r in train)]),
        ("accuracy", ["accuracy"]),
        ("KL to reference", ["kl"]),
        ("entropy", ["entropy"]),
        ("completion length (tokens)", ["completion_length"]),
        ("clip ratio", ["clip_ratio"]),
    ]
    fig, axes = plt.subplots(2, 3, figsize=(13, 6.5))
    for ax, (name, keys) in zip(axes.flat, panels, strict=True):
        for k in keys:
            pts = [(r["step"], r[k]) for r in train if isinstance(r.get(k), (int, float))]
            if pts:
                ax.plot(*zip(*pts, strict=True), label=f"{k} (train batch)" if name == "accuracy" else k)
        if name == "accuracy":
            pts = [(r["step"], r["heldout_accuracy"]) for r in evals if "heldout_accuracy" in r]
            if pts:
                ax.plot(*zip(*pts, strict=True), "o-", label="held-out (greedy)")
        ax.set_title(name)
        ax.set_xlabel("step")
        if ax.lines:
            ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return Path(path)
