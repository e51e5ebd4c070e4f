"""Runs: a finished run folder read back (its model, its seeds), re-scored, summarized over seeds, and printed.

`embcache eval` uses `evaluate_run` and `format_table`; the run folder is documented in docs/metrics-format.md.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from embcache.config import FitConfig, FitError
from embcache.data import fingerprint_mismatch, load_dataset
from embcache.evaluate import METRICS_SCHEMA, scenario_metrics
from embcache.missing import SCENARIOS
from embcache.models import FusionModel
from embcache.runtime import resolve_device


def load_run(run_dir: str | Path, device: str | torch.device = "cpu") -> tuple[FitConfig, dict, FusionModel]:
    """(config, resolved settings, model with the best epoch's weights) of one seed's run folder."""
    run_dir = Path(run_dir)
    try:
        saved = json.loads((run_dir / "config.json").read_text())
    except FileNotFoundError as exc:
        raise FitError(f"{run_dir}: no config.json; is this an `embcache fit` run folder?") from exc
    cfg, resolved = FitConfig.from_dict(saved), saved["resolved"]
    model = FusionModel(resolved["dims"], resolved["n_outputs"], cfg)
    if resolved.get("predictors"):  # --predictor prompts: rebuild the blocks from the encoders' checkpoints
        from embcache.prompts import attach_prompt_predictors

        attach_prompt_predictors(model, resolved["prompt_encoders"], cfg)
    model.load_state_dict(load_file(str(run_dir / "model.safetensors")))
    return cfg, resolved, model.to(resolve_device(str(device)))


def seed_dirs(run_dir: str | Path) -> list[Path]:
    """The per-seed run folders of a run: itself (one seed) or its seed-* folders (--seeds)."""
    run_dir = Path(run_dir)
    if (run_dir / "model.safetensors").exists():
        return [run_dir]
    dirs = sorted((p for p in run_dir.glob("seed-*") if (p / "model.safetensors").exists()),
                  key=lambda p: int(p.name.split("-", 1)[1]))
    if not dirs:
        raise FitError(f"{run_dir}: neither a run (model.safetensors) nor a folder of seed-* runs")
    return dirs


def evaluate_run(run_dir: str | Path, *, store: str | None = None, rate: float | None = None,
                 device: str = "auto") -> dict:
    """Re-score a finished run (all seeds) under every scenario; same layout as its metrics.json."""
    results, loaded = [], {}
    for path in seed_dirs(run_dir):
        cfg, resolved, model = load_run(path, device)
        sources = (store or cfg.store, cfg.val_store, cfg.test_store)
        data = loaded[sources] = loaded.get(sources) or load_dataset(
            *sources, hidden=cfg.predictor == "prompts", allow_partial=cfg.allow_partial,
            stream=bool((resolved.get("data") or {}).get("streaming")))
        diffs = fingerprint_mismatch(resolved["fingerprint"], data.fingerprint)
        if diffs:
            raise FitError(f"{store or cfg.store}: not the features {path} was trained on (fingerprint differs: "
                           f"{'; '.join(diffs)})")
        results.append(scenario_metrics(model, data, cfg, resolved, rate=rate))
    return results[0] if len(results) == 1 else summarize(results)


def summarize(runs: list[dict]) -> dict:
    """Mean and std (sample, ddof 1) over seeds of every number in `val`, `test` and `predictor`."""
    first = runs[0]

    def stat(fn, path):
        values = []
        for run in runs:
            value = run
            for key in path:
                value = value[key]
            values.append(value)
        return None if any(v is None for v in values) else fn(np.asarray(values, dtype=np.float64))

    def tree(fn):
        return {section: {group: {metric: stat(fn, (section, group, metric)) for metric in values}
                          for group, values in first[section].items()}
                for section in ("val", "test", "predictor")}

    mean = tree(np.mean)
    std = tree(lambda v: float(v.std(ddof=1)) if len(v) > 1 else 0.0)
    return {"schema": METRICS_SCHEMA, "kind": "summary", "task": first["task"], "metric": first["metric"],
            "impute": first["impute"], "seeds": [run["seed"] for run in runs],
            "runs": [f"seed-{run['seed']}" for run in runs], "missing": first["missing"],
            **{k: _floats(v) for k, v in mean.items()}, "std": _floats(std), "rows": first["rows"]}


def _num(value) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _floats(tree):
    """numpy scalars -> float, recursively (json.dump refuses np.float64 inside some containers)."""
    if isinstance(tree, dict):
        return {k: _floats(v) for k, v in tree.items()}
    return None if tree is None else float(tree)


def format_table(metrics: dict) -> str:
    """A plain-text table: one row per scenario, val main metric and every test metric."""
    main, std = metrics["metric"], metrics.get("std")
    names = list(metrics["test"]["full"])

    def cell(section, scenario, name):
        value = metrics[section][scenario][name]
        if value is None:
            return "n/a"
        text = f"{value:.4f}"
        return text + (f" ± {std[section][scenario][name]:.4f}" if std else "")

    header = ["scenario", f"val {main}"] + [f"test {name}" for name in names]
    rows = [[s, cell("val", s, main)] + [cell("test", s, n) for n in names] for s in SCENARIOS]
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in [header] + rows]
    seeds = f", seeds {metrics['seeds']}" if metrics["kind"] == "summary" else f", seed {metrics['seed']}"
    lines.insert(0, f"task {metrics['task']} ({main}), impute {metrics['impute']}, "
                    f"test missing rate {metrics['missing']['test_rate']}{seeds}")
    selection = metrics.get("selection") or {}
    if selection.get("best_epoch"):
        lines.append(f"best epoch {selection['best_epoch']}/{selection['epochs']} by val {selection['metric']} "
                     f"under {selection['scenario']}")
    for pattern, falls_back in ((metrics.get("mean_fallback") or {}).get("falls_back") or {}).items():
        rows = "rows with both modalities" if pattern == "both" else f"rows with only the {pattern}"
        val = metrics["mean_fallback"]["val"][pattern]
        lines.append(f"{rows}: {'the mean-fill model' if falls_back else 'this run'} (val {main} "
                     f"{_num(val['mean'])} mean-fill model, {_num(val['own'])} this run)")
    for name, q in metrics["predictor"].items() if metrics.get("impute") == "predict" else ():
        if q["r2"] is not None:
            lines.append(f"predictor {name}: cosine {q['cosine']:.4f}, r2 {q['r2']:.4f} (test rows with both)")
    return "\n".join(lines)
