"""Evaluation: a trained model's logits and metrics under each missing-modality scenario, and its predictors' quality.

`scenario_metrics` makes a run's metrics.json, documented in docs/metrics-format.md.
"""
from __future__ import annotations

import numpy as np
import torch

from embcache.config import FitConfig
from embcache.data import FeatureSet, SplitData, SplitTensors, labeled, masks_to
from embcache.metrics import MAIN_METRIC, task_metrics
from embcache.missing import MODALITIES, SCENARIOS, scenario_present
from embcache.models import DIRECTIONS, FusionModel

METRICS_SCHEMA = "embcache.metrics/1"


# ------------------------------------------------------------------------------------------------
# Logits
# ------------------------------------------------------------------------------------------------
def _cat_logits(model: FusionModel, out: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """The logits of a split's blocks in one tensor; an empty split (no block) has none, (0, n_outputs)."""
    if not out:
        return torch.zeros(0, model.classifier[-1].out_features, device=device)
    return torch.cat(out)


@torch.no_grad()
def predict_logits(model: FusionModel, x: dict[str, torch.Tensor], has: dict[str, torch.Tensor],
                   chunk: int = 16384) -> torch.Tensor:
    was_training = model.training
    model.eval()
    n = len(next(iter(x.values())))
    out = [model({m: x[m][i:i + chunk] for m in x}, {m: has[m][i:i + chunk] for m in has}).logits
           for i in range(0, n, chunk)]
    model.train(was_training)
    return _cat_logits(model, out, model.mean_image.device)


@torch.no_grad()
def predict_split(model: FusionModel, split: SplitData, tensors: SplitTensors, has: dict[str, torch.Tensor],
                  read_ahead: int = 2) -> torch.Tensor:
    """predict_logits on a split, chunk by chunk from its store when it is streamed."""
    if not split.streamed:
        return predict_logits(model, tensors.x, has)
    device = tensors.y.device
    out = []
    for pos, block in split.blocks(read_ahead):
        idx = torch.as_tensor(pos, device=device)
        x = {m: torch.from_numpy(block[m]).to(device) for m in MODALITIES}
        out.append(predict_logits(model, x, {m: has[m][idx] for m in MODALITIES}))
    return _cat_logits(model, out, device)


# ------------------------------------------------------------------------------------------------
# Evaluation of a model
# ------------------------------------------------------------------------------------------------
def evaluate_scenarios(model: FusionModel, split: SplitData, tensors: SplitTensors, task_type: str,
                       rate: float, seed: int) -> dict[str, dict]:
    """{scenario: metrics} for full / missing-image / missing-text / missing-both at `rate`."""
    device = tensors.y.device
    results = {}
    for scenario in SCENARIOS:
        has = masks_to(scenario_present(split.ids, split.present, scenario, rate, seed), device)
        results[scenario] = task_metrics(task_type, predict_logits(model, tensors.x, has), tensors.y)
    return results


class PredictorQuality:
    """{direction: {cosine, r2}} over the rows with both modalities, accumulated block by block (float64 sums).

    For `zero` / `mean` imputation, the constant that stands in for the missing modality is scored.
    cosine: mean cosine similarity in raw embedding space; r2: `r2_score` in standardised space, pooled over
    the blocks (sum of squares about the mean = sum z^2 - (sum z)^2 / n).
    """

    def __init__(self, model: FusionModel):
        self.model = model
        self.acc = {name: {"n": 0, "cosine": 0.0, "residual": 0.0, "sum": 0.0, "sum2": 0.0} for name in DIRECTIONS}

    @torch.no_grad()
    def add(self, x: dict[str, torch.Tensor]) -> None:
        """x: raw embeddings of rows that have both modalities (and their hidden states, --predictor prompts)."""
        model = self.model
        n = len(x[MODALITIES[0]])
        if n == 0:
            return
        ones = {m: torch.ones(n, dtype=torch.bool, device=x[m].device) for m in MODALITIES}
        out = model(x, ones)
        for name, (src, dst) in DIRECTIONS.items():
            pred = model.fill(dst, out.pred.get(name), ones[src], name).expand_as(out.z[dst])
            # a zero vector has no direction (cosine 0); unstandardising would leave rounding noise instead
            raw = torch.zeros_like(x[dst]) if model.impute == "zero" else model.unstandardize(dst, pred)
            a, z = self.acc[name], out.z[dst].double()
            a["n"] += n
            a["cosine"] += torch.nn.functional.cosine_similarity(raw, x[dst], dim=1).double().sum().item()
            a["residual"] += ((z - pred.double()) ** 2).sum().item()
            a["sum"] = a["sum"] + z.sum(0)
            a["sum2"] = a["sum2"] + (z ** 2).sum(0)

    def result(self) -> dict[str, dict]:
        quality = {}
        for name, a in self.acc.items():
            if a["n"] == 0:
                quality[name] = {"cosine": None, "r2": None}
                continue
            total = (a["sum2"] - a["sum"] ** 2 / a["n"]).sum().item()
            quality[name] = {"cosine": a["cosine"] / a["n"], "r2": 1 - a["residual"] / max(total, 1e-12)}
        return quality


@torch.no_grad()
def predictor_quality(model: FusionModel, split: SplitData, tensors: SplitTensors) -> dict[str, dict]:
    """{direction: {cosine, r2}} on the rows where the data has both modalities (`PredictorQuality`)."""
    both = split.present["image"] & split.present["text"]
    idx = torch.as_tensor(np.flatnonzero(both), device=tensors.y.device)
    model.eval()
    quality = PredictorQuality(model)
    quality.add({k: t[idx] for k, t in tensors.x.items()})  # + hidden states (--predictor prompts)
    return quality.result()


@torch.no_grad()
def streamed_scenarios(model: FusionModel, split: SplitData, tensors: SplitTensors, task_type: str, rate: float,
                       seed: int, quality: bool, read_ahead: int = 2) -> tuple[dict, dict | None]:
    """evaluate_scenarios (and predictor_quality when `quality`) of a streamed split, in one pass over its
    chunks."""
    device = tensors.y.device
    masks = {sc: masks_to(scenario_present(split.ids, split.present, sc, rate, seed), device) for sc in SCENARIOS}
    logits: dict[str, list] = {sc: [] for sc in SCENARIOS}
    both = split.present["image"] & split.present["text"]
    scores = PredictorQuality(model)
    model.eval()
    for pos, block in split.blocks(read_ahead):
        idx = torch.as_tensor(pos, device=device)
        x = {m: torch.from_numpy(block[m]).to(device) for m in MODALITIES}
        for sc in SCENARIOS:
            logits[sc].append(predict_logits(model, x, {m: masks[sc][m][idx] for m in MODALITIES}))
        if quality:
            rows = torch.as_tensor(np.flatnonzero(both[pos]), device=device)
            scores.add({m: t[rows] for m, t in x.items()})
    results = {}
    for sc in SCENARIOS:
        results[sc] = task_metrics(task_type, _cat_logits(model, logits[sc], device), tensors.y)
    return results, scores.result() if quality else None


def scenario_metrics(model: FusionModel, data: FeatureSet, cfg: FitConfig, resolved: dict,
                     rate: float | None = None) -> dict:
    """metrics.json for one trained model (docs/metrics-format.md)."""
    device = next(model.parameters()).device
    rate = cfg.test_missing_rate if rate is None else rate
    metrics = {
        "schema": METRICS_SCHEMA, "kind": "run", "task": data.task_type, "metric": MAIN_METRIC[data.task_type],
        "impute": cfg.impute, "seed": cfg.seed,
        "missing": {"seed": cfg.missing_seed, "test_rate": rate,
                    "train": {"rate": cfg.train_missing_rate, "type": cfg.train_missing_type}},
        "selection": resolved.get("selection", {}),
        "predictor_training": resolved.get("predictor_training"),  # staged: val R2, shrink factors per direction
        "mean_fallback": resolved.get("mean_fallback"),  # --mean-fallback: where the mean-fill model answers
        "pair_head": resolved.get("pair_head"),  # --pair-head: whether rows with both get the pair regression
        "calibration": resolved.get("calibration"),  # --calibrate: the temperature per presence pattern
    }
    for name in ("val", "test"):
        split = data.splits[name]
        tensors = SplitTensors.of(split, data.task_type, device)
        if split.streamed:  # one pass over the split's chunks
            metrics[name], quality = streamed_scenarios(model, split, tensors, data.task_type, rate,
                                                        cfg.missing_seed, name == "test", cfg.read_ahead)
            if name == "test":
                metrics["predictor"] = quality
            continue
        metrics[name] = evaluate_scenarios(model, split, tensors, data.task_type, rate, cfg.missing_seed)
        if name == "test":
            metrics["predictor"] = predictor_quality(model, split, tensors)
    metrics["rows"] = {name: int(labeled(data.task_type, data.splits[name].labels).sum()) for name in ("val", "test")}
    metrics["rows"]["predictor"] = int((data.splits["test"].present["image"]
                                        & data.splits["test"].present["text"]).sum())
    return metrics
