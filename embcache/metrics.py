"""Metrics: the task loss, the task metrics (F1, AUROC, accuracy) and the predictors' R2, on torch tensors."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

MAIN_METRIC = {"multilabel": "f1_macro", "multiclass": "accuracy", "binary": "auroc"}


def task_loss(task_type: str, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The training loss: BCE per label (multilabel), else cross-entropy over the labeled rows."""
    if task_type == "multilabel":
        return F.binary_cross_entropy_with_logits(logits, y)
    # Unlabeled rows (-1) still train the predictors; divide by a clamped count, not .mean(), so a batch
    # without labels gives 0 instead of NaN and nothing syncs with the host.
    total = F.cross_entropy(logits, y, ignore_index=-1, reduction="sum")
    return total / (y >= 0).sum().clamp(min=1)


def f1_scores(logits: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """Multilabel F1 at sigmoid 0.5 (logit 0). A class with no positives and no predictions scores 0."""
    pred, truth = logits > 0, y > 0.5
    tp = (pred & truth).sum(0).double()
    wrong = (pred ^ truth).sum(0).double()  # false positives + false negatives
    per_class = torch.where(2 * tp + wrong > 0, 2 * tp / (2 * tp + wrong).clamp(min=1), torch.zeros_like(tp))
    micro = 2 * tp.sum() / (2 * tp.sum() + wrong.sum()).clamp(min=1)
    return {"f1_macro": per_class.mean().item(), "f1_micro": micro.item()}


def auroc(scores: torch.Tensor, y: torch.Tensor) -> float | None:
    """Area under the ROC curve (Mann-Whitney, ties count half); None when one class is absent."""
    pos = y == 1
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    _, inverse, counts = torch.unique(scores.double(), return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()
    ranks = (ends - (counts.double() - 1) / 2)[inverse]  # average 1-based rank within ties
    return ((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)).item()


def metric_names(task_type: str) -> list[str]:
    """The task's own metrics (the paper's columns); `task_metrics` adds CALIBRATION_METRICS to them."""
    return {"multilabel": ["f1_macro", "f1_micro"], "multiclass": ["accuracy"],
            "binary": ["auroc", "accuracy"]}[task_type]


CALIBRATION_METRICS = ("nll", "ece")
ECE_BINS = 15


def expected_calibration_error(confidence: torch.Tensor, correct: torch.Tensor, bins: int = ECE_BINS) -> float:
    """Sum over equal-width confidence bins of (the bin's share of the rows) x |mean confidence - accuracy|."""
    confidence = confidence.double()
    which = (confidence * bins).long().clamp(0, bins - 1)
    gap = torch.zeros(bins, dtype=torch.float64, device=confidence.device)
    gap.index_add_(0, which, confidence - correct.double())  # per bin: sum of (confidence - right)
    return (gap.abs().sum() / len(confidence)).item()


def calibration_metrics(task_type: str, logits: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """How far the scores can be read as probabilities, on labeled rows: `nll`, the task loss (cross-entropy;
    multilabel: binary cross-entropy per label), and `ece`: for multiclass and binary the top-label expected
    calibration error (confidence = the largest softmax probability, right = the argmax is the label), for
    multilabel the same over every (row, label) sigmoid probability against the label."""
    nll = task_loss(task_type, logits, y).item()
    if task_type == "multilabel":
        probability = torch.sigmoid(logits).flatten()
        return {"nll": nll, "ece": expected_calibration_error(probability, y.flatten() > 0.5)}
    confidence, guess = logits.softmax(1).max(1)
    return {"nll": nll, "ece": expected_calibration_error(confidence, guess == y)}


def task_metrics(task_type: str, logits: torch.Tensor, y: torch.Tensor) -> dict[str, float | None]:
    """The task's metrics and CALIBRATION_METRICS on the labeled rows; None when there are none (e.g. an
    unlabeled test file)."""
    if task_type != "multilabel":
        keep = y >= 0
        logits, y = logits[keep], y[keep]
    if len(y) == 0:
        return {name: None for name in metric_names(task_type) + list(CALIBRATION_METRICS)}
    if task_type == "multilabel":
        return {**f1_scores(logits, y), **calibration_metrics(task_type, logits, y)}
    accuracy = (logits.argmax(1) == y).double().mean().item()
    own = {"accuracy": accuracy} if task_type == "multiclass" else {
        "auroc": auroc(logits[:, 1] - logits[:, 0], y), "accuracy": accuracy}
    return {**own, **calibration_metrics(task_type, logits, y)}


def r2_score(pred: torch.Tensor, target: torch.Tensor) -> float:
    """Fraction of the target's variance explained, pooled over dimensions.

    Both are in standardised coordinates (train std 1 per dimension), so every dimension counts about
    equally; the target's own mean is the baseline (a predictor of the mean scores about 0).
    """
    residual = ((target - pred) ** 2).sum()
    total = ((target - target.mean(0)) ** 2).sum()
    return (1 - residual / total.clamp(min=1e-12)).item()


def resample_rows(n: int, resamples: int, seed: int = 0) -> np.ndarray:
    """(resamples, n) row indices, each row drawn with replacement: the bootstrap over a test set's rows. Every
    quantity compared on one set is computed on the same resamples (a paired bootstrap)."""
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def interval95(replicates) -> list[float]:
    """The 2.5 and 97.5 percentiles of bootstrap replicates."""
    return np.percentile(np.asarray(replicates, dtype=np.float64), [2.5, 97.5]).tolist()
