"""Runs: a finished run folder read back (its model, its seeds), re-scored, summarized over seeds, compared with
another, and printed.

`embcache eval` uses `evaluate_run` and `format_table`, `embcache compare` uses `compare_runs` and
`format_comparison`; the run folder is documented in docs/metrics-format.md.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from embcache.config import FitConfig, FitError
from embcache.data import SplitTensors, fingerprint_mismatch, labeled, load_dataset, masks_to
from embcache.evaluate import METRICS_SCHEMA, predict_split, scenario_metrics
from embcache.metrics import MAIN_METRIC, interval95, resample_rows, task_metrics
from embcache.missing import SCENARIOS, scenario_present
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


def seed_models(run_dir: str | Path, store: str | None, device: str, loaded: dict):
    """Yield (config, resolved, model, data) per seed of a run, its data read from `store` (default: the one it was
    fit on) and checked against the run's fingerprint. `loaded` caches the datasets between calls."""
    for path in seed_dirs(run_dir):
        cfg, resolved, model = load_run(path, device)
        sources = (store or cfg.store, cfg.val_store, cfg.test_store)
        hidden = cfg.predictor == "prompts"
        data = loaded[sources, hidden] = loaded.get((sources, hidden)) or load_dataset(
            *sources, hidden=hidden, allow_partial=cfg.allow_partial,
            stream=bool((resolved.get("data") or {}).get("streaming")))
        diffs = fingerprint_mismatch(resolved["fingerprint"], data.fingerprint)
        if diffs:
            raise FitError(f"{store or cfg.store}: not the features {path} was trained on (fingerprint differs: "
                           f"{'; '.join(diffs)})")
        yield cfg, resolved, model, data


def evaluate_run(run_dir: str | Path, *, store: str | None = None, rate: float | None = None,
                 device: str = "auto") -> dict:
    """Re-score a finished run (all seeds) under every scenario; same layout as its metrics.json."""
    results = [scenario_metrics(model, data, cfg, resolved, rate=rate)
               for cfg, resolved, model, data in seed_models(run_dir, store, device, {})]
    return results[0] if len(results) == 1 else summarize(results)


COMPARE_SCHEMA = "embcache.compare/1"


def compare_runs(run_a: str | Path, run_b: str | Path, *, store: str | None = None, rate: float | None = None,
                 resamples: int = 1000, device: str = "auto") -> dict:
    """Score runs A and B (each the mean over its seeds) on the same test rows under every scenario, and the
    difference B - A of the main metric with a 95 % interval from a paired bootstrap over those rows (the same
    resamples for both runs). The scenarios hide the same rows for both: run A's missing rate (or `rate`) and
    missing seed. Both runs must read the same features: `store`, or run A's store, whose fingerprint each run's
    must match."""
    loaded: dict = {}
    seeds_a = list(seed_models(run_a, store, device, loaded))
    cfg_a, data = seeds_a[0][0], seeds_a[0][3]
    rate = cfg_a.test_missing_rate if rate is None else rate
    test = data.splits["test"]
    on = resolve_device(device)  # where load_run put the models
    y = SplitTensors.of(test, data.task_type, on).y
    keep = torch.as_tensor(np.flatnonzero(labeled(data.task_type, test.labels)), device=on)
    if len(keep) == 0:
        raise FitError(f"{store or cfg_a.store}: the test split has no labeled rows to compare on")
    masks = {sc: masks_to(scenario_present(test.ids, test.present, sc, rate, cfg_a.missing_seed), on)
             for sc in SCENARIOS}
    logits: dict = {}  # run -> scenario -> [per seed (labeled rows, outputs)]
    seeds_b = seed_models(run_b, store or cfg_a.store, device, loaded)  # read lazily, one model at a time
    for name, run, seeds in (("a", run_a, seeds_a), ("b", run_b, seeds_b)):
        for _, _, model, seed_data in seeds:
            if not np.array_equal(seed_data.splits["test"].ids, test.ids):
                raise FitError(f"{run} and {run_a} are not scored on the same test rows")
            tensors = SplitTensors.of(seed_data.splits["test"], data.task_type, on)
            for sc in SCENARIOS:
                scores = predict_split(model, seed_data.splits["test"], tensors, masks[sc])
                logits.setdefault(name, {}).setdefault(sc, []).append(scores[keep])
    y, main = y[keep], MAIN_METRIC[data.task_type]
    rows = torch.as_tensor(resample_rows(len(keep), resamples), device=on)

    def metric(name, sc, idx=None):  # the run's mean over seeds, on rows idx (default: every labeled row)
        values = [task_metrics(data.task_type, out if idx is None else out[idx], y if idx is None else y[idx])[main]
                  for out in logits[name][sc]]
        return None if None in values else float(np.mean(values))

    scenarios = {}
    for sc in SCENARIOS:
        a, b = metric("a", sc), metric("b", sc)
        replicates = [d for idx in rows if None not in (d := (metric("b", sc, idx), metric("a", sc, idx)))]
        differences = np.array([rb - ra for rb, ra in replicates])
        scenarios[sc] = {"a": a, "b": b, "difference": None if None in (a, b) else b - a,
                         "interval": interval95(differences) if len(differences) else None,
                         "b_better": float((differences > 0).mean()) if len(differences) else None,
                         "resamples": len(differences)}  # fewer than asked where a metric was undefined
    return {"schema": COMPARE_SCHEMA, "task": data.task_type, "metric": main,
            "runs": {"a": str(run_a), "b": str(run_b)},
            "seeds": {name: len(by[SCENARIOS[0]]) for name, by in logits.items()}, "test_rows": len(keep),
            "missing": {"rate": rate, "seed": cfg_a.missing_seed}, "resamples": resamples, "scenarios": scenarios}


def format_comparison(result: dict) -> str:
    """A plain-text table of `compare_runs`: per scenario A, B, B - A and its interval."""
    main = result["metric"]
    header = ["scenario", f"A {main}", f"B {main}", "B - A", "95 % interval", "resamples with B > A"]
    rows = [[sc, _num(q["a"]), _num(q["b"]), "n/a" if q["difference"] is None else f"{q['difference']:+.4f}",
             "n/a" if q["interval"] is None else f"[{q['interval'][0]:+.4f}, {q['interval'][1]:+.4f}]",
             "n/a" if q["b_better"] is None else f"{q['b_better']:.0%}"] for sc, q in result["scenarios"].items()]
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    seeds = {k: f"{n} seed{'s' if n > 1 else ''}" for k, n in result["seeds"].items()}
    lines = [f"A = {result['runs']['a']} ({seeds['a']}), B = {result['runs']['b']} ({seeds['b']}); test {main} on "
             f"the same {result['test_rows']} rows, missing rate {result['missing']['rate']} (missing seed "
             f"{result['missing']['seed']}); intervals from a paired bootstrap over the test rows "
             f"({result['resamples']} resamples)"]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header] + rows]
    lines.append("An interval that contains 0 means the test rows cannot tell the two runs apart.")
    return "\n".join(lines)


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


def predictor_line(staged: dict | None) -> str | None:
    """What the staged predictors became (FitConfig.shrink): how far their predictions were scaled towards the
    train mean, and whether that left the prediction at the mean (factor 0 both ways: the classifier then trains on
    exactly what --impute mean gives it, so the run is that run, tests/test_fusion.py)."""
    if not staged or not staged.get("shrink"):
        return None
    shrink = staged["shrink"]
    where = f"val R2 {staged['predictor_val_r2']:.3f} on {staged['val_pairs']} val pairs"
    if not any(shrink.values()):
        return (f"predictors: no better than the train mean ({where}): predictions shrunk to it, so this run's "
                "model is --impute mean's (docs/training.md)")
    return (f"predictors: {where}; predictions scaled towards the train mean by "
            + ", ".join(f"{factor:.2f} ({name.replace('_to_', ' -> ')})" for name, factor in shrink.items()))


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
    if pair := metrics.get("pair_head"):
        lines.append(f"rows with both modalities: + the pair regression (L2 {pair['l2']:g}, val {main} "
                     f"{_num(pair['val'])} on the val pairs)" if pair["on"]
                     else f"pair regression off: {pair.get('skipped', '--pair-head')}")
    calibration = {p: q for p, q in (metrics.get("calibration") or {}).items() if q}
    if calibration:
        lines.append("calibration, temperature per pattern (val loss before -> after): " + ", ".join(
            f"{'both' if p == 'both' else p + ' only'} {q['temperature']:.2f} ({q['val_loss'][0]:.3f} -> "
            f"{q['val_loss'][1]:.3f})" for p, q in calibration.items()))
    if line := predictor_line(metrics.get("predictor_training")):
        lines.append(line)
    for name, q in metrics["predictor"].items() if metrics.get("impute") == "predict" else ():
        if q["r2"] is not None:
            lines.append(f"predictor {name}: cosine {q['cosine']:.4f}, r2 {q['r2']:.4f} (test rows with both)")
    return "\n".join(lines)
