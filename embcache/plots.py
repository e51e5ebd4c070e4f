"""PNG figures of a run: training curves and the main metric per test scenario.

Uses matplotlib's object API with the Agg canvas, so it never touches the global backend (safe to
import from notebooks and headless machines alike).
"""
from __future__ import annotations

from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from embcache.missing import SCENARIOS


def save_figure(fig: Figure, path, dpi: int = 110) -> None:
    """Lay out `fig` and write it as a PNG to `path` (a file name or an open binary file) on the Agg canvas."""
    FigureCanvasAgg(fig)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi, format="png")


def plot_curves(curves: list[dict], metric: str, path: str | Path) -> None:
    """Losses per epoch (left) and the val main metric used for model selection (right)."""
    fig = Figure(figsize=(9, 3.5))
    losses, selection = fig.subplots(1, 2)
    epochs = [row["epoch"] for row in curves]
    for key in ("loss", "task_loss", "vicreg_loss"):
        values = [row[key] for row in curves]
        if any(values):
            losses.plot(epochs, values, label=key)
    losses.set_xlabel("epoch")
    losses.set_yscale("log")
    losses.legend()
    losses.set_title("training losses")
    values = [row[f"val_{metric}"] for row in curves]
    selection.plot(epochs, [float("nan") if v is None else v for v in values], marker=".")
    selection.set_xlabel("epoch")
    selection.set_title(f"val {metric} (model selection)")
    save_figure(fig, path)


def plot_scenarios(metrics: dict, path: str | Path) -> None:
    """Bars of the main metric per scenario, val and test side by side (with std over seeds if any)."""
    metric, std = metrics["metric"], metrics.get("std")
    fig = Figure(figsize=(6.5, 3.5))
    ax = fig.subplots()
    width = 0.38
    for offset, section in ((-width / 2, "val"), (width / 2, "test")):
        values = [metrics[section][s][metric] for s in SCENARIOS]
        errors = [std[section][s][metric] for s in SCENARIOS] if std else None
        ax.bar([i + offset for i in range(len(SCENARIOS))],
               [float("nan") if v is None else v for v in values], width,
               yerr=None if errors is None or None in errors else errors, capsize=3, label=section)
    ax.set_xticks(range(len(SCENARIOS)), SCENARIOS)
    ax.set_ylabel(metric)
    ax.set_title(f"{metrics['task']}, impute {metrics['impute']}, "
                 f"test missing rate {metrics['missing']['test_rate']}")
    ax.legend()
    save_figure(fig, path)
