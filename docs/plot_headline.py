"""Render the README's headline figure, docs/assets/headline.png, from docs/assets/headline.json.

The JSON holds numbers already measured and logged in docs/benchmarks.md (machine, command, date, git SHA
and run ids included); this script only draws them. Speed-ups are computed here from the medians, relative to
the row marked ``"baseline": true`` (the plain-PyTorch reference under torch.compile) of each panel. The
labels show the speed-ups as logged (``x_compiled``, computed by the benchmark from unrounded medians); the
script checks that they agree with the rounded medians (within 1% + the 0.005 of the rounding).

    python docs/plot_headline.py            # needs matplotlib (the [bench] extra)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATA = HERE / "assets" / "headline.json"
OUT = HERE / "assets" / "headline.png"

OURS = "#d62728"
OTHERS = "#7f7f7f"
BASELINE = "#1f77b4"


def main(argv: list[str] | None = None) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(argv[0]) if argv else OUT
    data = json.loads(DATA.read_text())
    panels = data["panels"]
    fig, axes = plt.subplots(len(panels), 1, figsize=(10.5, 2.4 * len(panels) + 0.9))
    for ax, panel in zip(axes, panels, strict=True):
        rows = panel["rows"]
        base = next(r["median_ms"] for r in rows if r.get("baseline"))
        for r in rows:
            from_medians = base / r["median_ms"]
            # the logged value is rounded to 2 decimals; the medians are rounded to 3 significant digits
            if abs(from_medians - r["x_compiled"]) > 0.005 + 0.01 * r["x_compiled"]:
                raise ValueError(f"{panel['title']}: {r['provider']}: logged x_compiled {r['x_compiled']} "
                                 f"disagrees with the medians ({from_medians:.3f})")
        labels = [r["provider"] for r in rows]
        values = [r["median_ms"] / 1000.0 for r in rows]  # seconds: the panels span 0.1 s to 18 s
        colors = [OURS if r.get("ours") else BASELINE if r.get("baseline") else OTHERS for r in rows]
        y = list(range(len(rows)))[::-1]  # first row on top
        ax.barh(y, values, color=colors, height=0.62)
        for yi, r, v in zip(y, rows, values, strict=True):
            text = f"  {r['median_ms']:,.0f} ms  ({r['x_compiled']:.2f}x torch.compile, {r['mem_mib']:,} MiB)"
            ax.text(v, yi, text, va="center", fontsize=8.5,
                    fontweight="bold" if r.get("ours") else "normal")
        ax.set_yticks(y, labels, fontsize=8.5)
        ax.set_xlim(0, max(values) * 2.0)  # room for the text right of the longest bar
        ax.set_xlabel("median seconds per call (lower is better)", fontsize=8.5)
        ax.tick_params(axis="x", labelsize=8)
        ax.set_title(f"{panel['title']}\n{panel['detail']}", fontsize=9, loc="left")
        for side in ("top", "right"):
            ax.spines[side].set_visible(False)
    fig.suptitle(f"reasonrl on CPU: {data['machine']}, {data['date']}", fontsize=10.5)
    fig.text(0.01, 0.005, "Memory: extra peak RSS of the call (fresh process). "
             "Commands, commits and full tables: docs/benchmarks.md", fontsize=7.5, color="#555555")
    fig.tight_layout(rect=(0, 0.02, 1, 0.97))
    fig.savefig(out, dpi=110)
    plt.close(fig)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
