"""Predict's margins over the best baseline with their 95 % intervals over the test rows, from bench reports.

    python scripts/plot_margins.py OUT.png REPORT.json [REPORT.json ...]

Each REPORT.json is what `embcache bench accuracy` wrote (schema 3 or later: the margins' intervals). One line per
dataset (a synthetic cache: over its draws), training setting and test type: the dot is predict - max(zero, mean),
the bar its interval from the paired bootstrap over the test rows. The acceptance lines are drawn: 0, the
"never hurts" allowance below it and the "helps" margin above it. Prints the numbers it plots.
"""
from __future__ import annotations

import json
import sys

from embcache.bench.accuracy import HELPS_MARGIN, NEVER_HURTS, SETTINGS, margin_of


def rows(report: dict) -> list[tuple[str, float, list[float]]]:
    """(label, margin, [lo, hi]) for each cell of the report that has a margin and an interval."""
    grouped = {d["group"] for d in report.get("over_draws", [])}
    entries = [d for d in report["datasets"] if d.get("group") not in grouped] + report.get("over_draws", [])
    out = []
    for ds in entries:
        labels = f", labels on {ds['labeled_fraction']:g}" if ds.get("labeled_fraction", 1.0) < 1 else ""
        for setting in SETTINGS:
            for test_type, by_impute in ds["summary"].get(setting, {}).items():
                margin = margin_of(by_impute)
                interval = ((ds.get("intervals") or {}).get("margin") or {}).get(setting, {}).get(test_type)
                if margin is not None and interval:
                    training = "complete" if setting == "complete" else f"missing {ds['train_rate']}"
                    out.append((f"{ds['name']}{labels}: {training}, missing-{test_type}", margin, interval))
    return out


def main(out: str, paths: list[str]) -> None:
    from matplotlib.figure import Figure

    from embcache.plots import save_figure

    points = [row for path in paths for row in rows(json.load(open(path)))]
    if not points:
        raise SystemExit("no margins with intervals in these reports (written before schema 3?)")
    fig = Figure(figsize=(8, 0.9 + 0.32 * len(points)))
    ax = fig.subplots()
    for y, (label, margin, (lo, hi)) in enumerate(reversed(points)):
        colour = "tab:green" if lo > 0 else "tab:red" if hi < 0 else "tab:gray"
        ax.plot([lo, hi], [y, y], color=colour, lw=2)
        ax.plot(margin, y, "o", color=colour)
    for label, margin, (lo, hi) in points:
        print(f"{label}: {margin:+.3f} [{lo:+.3f}, {hi:+.3f}]")
    ax.axvline(0, color="k", lw=0.8)
    ax.axvline(-NEVER_HURTS, color="k", lw=0.8, ls="--", label=f"-{NEVER_HURTS} (never hurts)")
    ax.axvline(HELPS_MARGIN, color="k", lw=0.8, ls=":", label=f"+{HELPS_MARGIN} (helps)")
    ax.set_yticks(range(len(points)), [label for label, _, _ in reversed(points)], fontsize=8)
    ax.set_xlabel("predict - best of zero, mean fill (95 % interval over the test rows)")
    ax.set_ylim(-0.6, len(points) + 0.4)  # an empty slot on top for the legend
    ax.legend(fontsize=8, loc="upper right", ncol=2)
    save_figure(fig, out, dpi=100)


if __name__ == "__main__":
    if len(sys.argv) < 3:
        raise SystemExit(__doc__)
    main(sys.argv[1], sys.argv[2:])
