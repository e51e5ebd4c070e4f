"""Predict's margin over the best baseline against the fraction of labeled training rows, from bench reports.

    python scripts/plot_labeled_fraction.py OUT.png REPORT.json [REPORT.json ...]

Each REPORT.json is what `embcache bench accuracy --store STORE --test-types both [--labeled-fraction F]` wrote
(one dataset each, the same dataset and seeds in all of them). Per training setting, the figure shows predict -
max(zero, mean) under missing-both at each fraction; the error bar is the std over seeds of the per-seed
difference predict - the best baseline (the same seed trains every impute mode, so the difference is paired).
Prints the numbers it plots.
"""
from __future__ import annotations

import json
import sys

import numpy as np


def margins(report: dict) -> tuple[str, float, dict[str, tuple[float, float]]]:
    """(dataset name, labeled fraction, {setting: (mean margin, std over seeds)}) of one report."""
    (ds,) = report["datasets"]
    out = {}
    for setting in ("complete", "missing"):
        by = {}
        for cell in ds["cells"]:
            if cell["setting"] == setting and cell["test_type"] == "both":
                by.setdefault(cell["impute"], {})[cell["seed"]] = cell["test"]["missing-both"][ds["metric"]]
        best = max(("zero", "mean"), key=lambda i: np.mean(list(by[i].values())))
        diff = [by["predict"][s] - by[best][s] for s in sorted(by["predict"])]
        out[setting] = (float(np.mean(diff)), float(np.std(diff, ddof=1)) if len(diff) > 1 else 0.0)
    return ds["name"], ds.get("labeled_fraction", 1.0), out


def main(out: str, paths: list[str]) -> None:
    from matplotlib.figure import Figure

    from embcache.plots import save_figure

    points = sorted(margins(json.load(open(p))) for p in paths)
    names = {name for name, _, _ in points}
    if len(names) != 1:
        raise SystemExit(f"reports of several datasets: {sorted(names)}; give one dataset's reports")
    fig = Figure(figsize=(6, 3.4))
    ax = fig.subplots()
    for setting, marker in (("complete", "o"), ("missing", "s")):
        x = [f for _, f, _ in points]
        y = [m[setting][0] for _, _, m in points]
        err = [m[setting][1] for _, _, m in points]
        ax.errorbar(x, y, yerr=err, marker=marker, capsize=3, label=f"{setting} training")
        for f, mean, std in zip(x, y, err):
            print(f"{setting} labeled {f:g}: predict - best baseline {mean:+.3f} ± {std:.3f}")
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xscale("log")
    ax.set_xticks([f for _, f, _ in points], [f"{f:g}" for _, f, _ in points])
    ax.set_xlabel("fraction of training rows with a label (the rest: unlabeled pairs)")
    ax.set_ylabel("predict - best of zero, mean")
    ax.set_title(f"{names.pop()}: missing-both at test, mean ± std over seeds", fontsize=10)
    ax.legend(fontsize=8)
    save_figure(fig, out, dpi=100)


if __name__ == "__main__":
    if len(sys.argv) < 3:
        raise SystemExit(__doc__)
    main(sys.argv[1], sys.argv[2:])
