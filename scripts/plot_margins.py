"""Predict's margins over the best baseline with their 95 % intervals over the test rows, from bench reports.

    python scripts/plot_margins.py OUT.png REPORT.json [REPORT.json ...]

Each REPORT.json is what `embcache bench accuracy` wrote (schema 3 or later: the margins' intervals). One line per
dataset (a synthetic cache: over its draws), training setting and test type: the dot is predict - max(zero, mean),
the bar its interval from the paired bootstrap over the test rows. Where the reports hold two or more real
datasets (stores, not synthetic caches) with the same share of labeled training rows and training rate, their
margins pooled over all their test rows come last (`pooled_rows`). The acceptance lines are drawn: 0,
the "never hurts" allowance below it and the "helps" margin above it. Prints the numbers it plots.
"""
from __future__ import annotations

import json
import sys

from embcache.bench.accuracy import HELPS_MARGIN, NEVER_HURTS, SETTINGS, margin_of, pooled_margins


def _labels(ds: dict) -> str:
    return f", labels on {ds['labeled_fraction']:g}" if ds.get("labeled_fraction", 1.0) < 1 else ""


def _training(setting: str, train_rate: float) -> str:
    return "complete" if setting == "complete" else f"missing {train_rate}"


def rows(report: dict) -> list[tuple[str, float, list[float]]]:
    """(label, margin, [lo, hi]) for each cell of the report that has a margin and an interval."""
    grouped = {d["group"] for d in report.get("over_draws", [])}
    entries = [d for d in report["datasets"] if d.get("group") not in grouped] + report.get("over_draws", [])
    out = []
    for ds in entries:
        for setting in SETTINGS:
            for test_type, by_impute in ds["summary"].get(setting, {}).items():
                margin = margin_of(by_impute)
                interval = ((ds.get("intervals") or {}).get("margin") or {}).get(setting, {}).get(test_type)
                if margin is not None and interval:
                    out.append((f"{ds['name']}{_labels(ds)}: {_training(setting, ds['train_rate'])}, "
                                f"missing-{test_type}", margin, interval))
    return out


def pooled_rows(reports: list[dict]) -> list[tuple[str, float, list[float]]]:
    """(label, margin, [lo, hi]) of the real datasets' margins pooled over their test rows, per share of labeled
    training rows (to one decimal: a store whose own data lacks labels, like the demo's, pools with sets that
    kept as few) and training rate held by two datasets or more."""
    groups: dict = {}
    for report in reports:
        for ds in report["datasets"]:
            if "group" not in ds:  # a store, not a draw of a synthetic cache
                train = (ds.get("rows") or {}).get("train")
                share = round(ds["train_labeled"] / train, 1) if train and "train_labeled" in ds else 1.0
                groups.setdefault((share, ds["train_rate"]), []).append(ds)
    out = []
    for (_, train_rate), entries in groups.items():
        if len(entries) < 2 or (pool := pooled_margins(entries)) is None:
            continue
        name = f"pooled: {', '.join(pool['datasets'])} ({pool['rows']} rows){_labels(entries[0])}"
        for setting in SETTINGS:
            for test_type, m in pool["margin"].get(setting, {}).items():
                out.append((f"{name}: {_training(setting, train_rate)}, missing-{test_type}", m["value"],
                            m["interval"]))
    return out


def main(out: str, paths: list[str]) -> None:
    from matplotlib.figure import Figure

    from embcache.plots import save_figure

    reports = [json.load(open(path)) for path in paths]
    points = [row for report in reports for row in rows(report)] + pooled_rows(reports)
    if not points:
        raise SystemExit("no margins with intervals in these reports (written before schema 3?)")
    fig = Figure(figsize=(10, 0.9 + 0.32 * len(points)))
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
    ax.set_xlabel("predict - max(zero, mean fill), 95 % interval over the test rows")
    ax.set_ylim(-0.6, len(points) + 0.4)  # an empty slot on top for the legend
    ax.legend(fontsize=8, loc="upper right", ncol=2)
    save_figure(fig, out, dpi=100)


if __name__ == "__main__":
    if len(sys.argv) < 3:
        raise SystemExit(__doc__)
    main(sys.argv[1], sys.argv[2:])
