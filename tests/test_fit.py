"""`embcache fit` / `eval` on synthetic caches with a known latent structure."""
import json
import os
from dataclasses import replace

import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner
from safetensors.torch import load_file

from embcache.bench import synthetic
from embcache.cli.fit import compare_command, eval_command, fit_command
from embcache.config import FitConfig, FitError
from embcache.data import dataset_from_features, load_dataset
from embcache.metrics import auroc, expected_calibration_error, f1_scores, r2_score, task_metrics
from embcache.missing import SCENARIOS, apply_missing
from embcache.runs import format_table
from embcache.runtime import Ranks
from embcache.store import open_store
from embcache.train import fit, make_model, predictions, prepare

SIZES = dict(n_train=1500, n_val=300, n_test=600, d_image=48, d_text=32, shared_dim=12, private_dim=4)
SMALL = ["--predictor-hidden", "128", "--classifier-hidden", "128", "--quiet"]
EPOCHS = 40


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def invoke(command, args):
    return CliRunner().invoke(command, [str(a) for a in args])


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    url = str(tmp_path_factory.mktemp("stores") / "syn.zarr")
    # The data itself lacks some images, some texts and a few rows both.
    return synthetic.make_store(url, **SIZES, n_classes=6, absent_image=0.04, absent_text=0.04,
                                absent_both=0.01)


@pytest.fixture(scope="module")
def runs(store, tmp_path_factory):
    """(impute, train missing rate) -> run folder; test scenarios at the default rate 0.7.

    Rate 0.7 (type both) is the default "missing training" setting; rate 0 is "complete training".
    """
    root = tmp_path_factory.mktemp("runs")
    out = {}
    for impute in ("predict", "zero"):
        for rate in (0.7, 0.0):
            out[impute, rate] = root / f"{impute}-{rate}"
            result = invoke(fit_command, [store, "--out", out[impute, rate], "--impute", impute,
                                          "--train-missing-rate", rate, "--epochs", EPOCHS, *SMALL])
            assert result.exit_code == 0, result.output
    return out


def metrics_of(run):
    return json.loads((run / "metrics.json").read_text())


def test_run_folder_layout_and_metrics_keys(runs):
    run = runs["predict", 0.7]
    assert {p.name for p in run.iterdir()} == {"config.json", "model.safetensors", "curves.jsonl",
                                               "metrics.json", "curves.png", "scenarios.png"}
    assert not [p for p in run.parent.iterdir() if p.name.startswith(".")]  # no temp leftovers
    metrics = metrics_of(run)
    assert metrics["task"] == "multilabel" and metrics["metric"] == "f1_macro"
    for split in ("val", "test"):
        assert set(metrics[split]) == set(SCENARIOS)
        for values in metrics[split].values():
            assert set(values) == {"f1_macro", "f1_micro", "nll", "ece"} and values["nll"] > 0
            assert all(0 <= values[k] <= 1 for k in ("f1_macro", "f1_micro", "ece"))
    assert set(metrics["predictor"]) == {"image_to_text", "text_to_image"}
    assert all(set(q) == {"cosine", "r2"} for q in metrics["predictor"].values())
    selection = metrics["selection"]
    assert selection["scenario"] == "missing-both" and 1 <= selection["best_epoch"] <= EPOCHS
    curves = [json.loads(line) for line in (run / "curves.jsonl").read_text().splitlines()]
    assert len(curves) == EPOCHS and curves[selection["best_epoch"] - 1]["val_f1_macro"] == selection["value"]
    config = json.loads((run / "config.json").read_text())
    assert FitConfig.from_dict(config).impute == "predict" and config["resolved"]["rows"]["train_paired"] > 0
    assert config["resolved"]["rows"]["train_labeled"] == config["resolved"]["rows"]["train"]  # multilabel: all
    fallback = metrics["mean_fallback"]  # the default --mean-fallback complete: one choice, for full pairs
    assert fallback == config["resolved"]["mean_fallback"] and list(fallback["falls_back"]) == ["both"]
    answer = "the mean-fill model" if fallback["falls_back"]["both"] else "this run"
    assert f"rows with both modalities: {answer} (val f1_macro" in format_table(metrics)
    pair = metrics["pair_head"]  # the default --pair-head auto: off where pairs are 30 % of the training rows
    assert pair == config["resolved"]["pair_head"] and not pair["on"] and pair["pairs"] < pair["labeled"] / 2
    assert "pair regression off: the labeled training pairs are fewer than half" in format_table(metrics)
    complete = metrics_of(runs["predict", 0.0])  # complete training: on
    assert complete["pair_head"]["on"] and complete["pair_head"]["pairs"] >= complete["pair_head"]["labeled"] / 2
    assert "rows with both modalities: + the pair regression (L2 " in format_table(complete)
    calibration = metrics["calibration"]  # the default --calibrate: one temperature per presence pattern
    assert calibration == config["resolved"]["calibration"] and set(calibration) == {"image", "text", "both"}
    temperature = load_file(str(run / "model.safetensors"))["temperature"]
    assert temperature.tolist() == pytest.approx([calibration[p]["temperature"] for p in ("image", "text", "both")])
    assert all(q["val_loss"][1] <= q["val_loss"][0] for q in calibration.values())
    assert "calibration, temperature per pattern (val loss before -> after): image only" in format_table(metrics)
    staged = metrics["predictor_training"]  # what the predictors became: how far they were shrunk to the mean
    assert staged == config["resolved"]["predictor_training"] and set(staged["shrink"]) == set(metrics["predictor"])
    shrink = ", ".join(f"{f:.2f} ({name.replace('_to_', ' -> ')})" for name, f in staged["shrink"].items())
    assert f"on {staged['val_pairs']} val pairs; predictions scaled towards the train mean by {shrink}" in (
        format_table(metrics)) and all(0 < f <= 1 for f in staged["shrink"].values())
    useless = {**metrics, "predictor_training": {**staged, "shrink": dict.fromkeys(staged["shrink"], 0.0)}}
    assert "predictors: no better than the train mean" in format_table(useless)
    assert "predictors:" not in format_table({**metrics, "predictor_training": None})  # zero / mean fill, joint


def ridge_r2(store, src, dst, train_rate, lam=1.0):
    """Closed-form ridge from the same standardised features and training rows as the predictor."""
    data = load_dataset(store)
    train, test = data.splits["train"], data.splits["test"]
    has = apply_missing(train.ids, train.present, train_rate, "both", 0)
    stats = {m: (train.emb[m][has[m]].mean(0), train.emb[m][has[m]].std(0)) for m in has}

    def z(split, m):
        return (split.emb[m] - stats[m][0]) / stats[m][1]

    fit_rows = has["image"] & has["text"]
    test_rows = test.present["image"] & test.present["text"]
    x = np.c_[z(train, src)[fit_rows], np.ones(fit_rows.sum())]
    w = np.linalg.solve(x.T @ x + lam * np.eye(x.shape[1]), x.T @ z(train, dst)[fit_rows])
    pred = np.c_[z(test, src)[test_rows], np.ones(test_rows.sum())] @ w
    return r2_score(torch.as_tensor(pred), torch.as_tensor(z(test, dst)[test_rows]))


@pytest.mark.parametrize("train_rate", [0.7, 0.0])
def test_predictor_r2_approaches_ridge(store, runs, train_rate):
    predictor = metrics_of(runs["predict", train_rate])["predictor"]
    for name, (src, dst) in {"image_to_text": ("image", "text"), "text_to_image": ("text", "image")}.items():
        reference = ridge_r2(store, src, dst, train_rate)
        assert reference > 0.5  # the synthetic latent structure makes the target predictable
        assert predictor[name]["r2"] > reference - 0.08, (name, predictor[name], reference)
        assert predictor[name]["cosine"] > 0.8


def test_predict_not_worse_than_zero_under_missing_both(runs):
    def score(impute, rate):
        return metrics_of(runs[impute, rate])["test"]["missing-both"]["f1_macro"]

    # Complete training: zero-filled inputs are new to the classifier at test time, predictions are not.
    assert score("predict", 0.0) >= score("zero", 0.0)
    # Missing training: the classifier learnt on zero-filled rows too; the prediction holds no more
    # information than the modality it comes from, so the two end up close.
    assert score("predict", 0.7) >= score("zero", 0.7) - 0.02
    # the zero baseline has no predictor: a zero vector explains none of the target
    assert all(q["r2"] < 0.05 for q in metrics_of(runs["zero", 0.7])["predictor"].values())


def test_eval_reproduces_metrics_and_prints_table(runs, tmp_path):
    out = tmp_path / "eval.json"
    result = invoke(eval_command, [runs["predict", 0.7], "--json", out])
    assert result.exit_code == 0, result.output
    for scenario in SCENARIOS:
        assert scenario in result.output
    saved = metrics_of(runs["predict", 0.7])
    again = json.loads(out.read_text())
    for split in ("val", "test"):
        for scenario in SCENARIOS:
            assert again[split][scenario] == pytest.approx(saved[split][scenario], abs=1e-6)
    # --rate: the missing-* scenarios at 0.3 instead of the run's 0.7; the full scenario does not change.
    # The JSON goes into a folder that does not exist yet, written atomically (no temp file left).
    at_03 = tmp_path / "new" / "rate.json"
    result = invoke(eval_command, [runs["predict", 0.7], "--rate", 0.3, "--json", at_03])
    assert result.exit_code == 0, result.output
    assert "test missing rate 0.3" in result.output
    assert os.listdir(tmp_path / "new") == ["rate.json"]
    at_03 = json.loads(at_03.read_text())
    assert at_03["missing"]["test_rate"] == 0.3 and saved["missing"]["test_rate"] == 0.7
    assert at_03["test"]["full"] == pytest.approx(saved["test"]["full"], abs=1e-6)
    for scenario in ("missing-image", "missing-text", "missing-both"):
        assert at_03["test"][scenario] != pytest.approx(saved["test"][scenario], abs=1e-6), scenario
    # fewer rows lose a modality at 0.3: closer to the full scenario than at 0.7
    gap = {rate: m["test"]["full"]["f1_macro"] - m["test"]["missing-both"]["f1_macro"]
           for rate, m in ((0.3, at_03), (0.7, saved))}
    assert gap[0.3] < gap[0.7], gap


def test_compare_scores_two_runs_on_the_same_rows_with_paired_intervals(runs, tmp_path):
    zero, predict = runs["zero", 0.7], runs["predict", 0.7]
    out = tmp_path / "cmp" / "compare.json"
    result = invoke(compare_command, [zero, predict, "--resamples", 200, "--json", out])
    assert result.exit_code == 0, result.output
    assert "paired bootstrap over the test rows (200 resamples)" in result.output
    cmp = json.loads(out.read_text())
    assert cmp["metric"] == "f1_macro" and cmp["seeds"] == {"a": 1, "b": 1} and os.listdir(out.parent) == [out.name]
    for scenario in SCENARIOS:  # each side is what the run's own metrics.json says; the interval holds B - A
        q = cmp["scenarios"][scenario]
        assert q["a"] == pytest.approx(metrics_of(zero)["test"][scenario]["f1_macro"], abs=1e-6)
        assert q["b"] == pytest.approx(metrics_of(predict)["test"][scenario]["f1_macro"], abs=1e-6)
        assert q["difference"] == pytest.approx(q["b"] - q["a"])
        assert q["interval"][0] <= q["difference"] <= q["interval"][1]
        assert q["b_better"] > 0.97 if q["interval"][0] > 0 else q["b_better"] < 0.98
    # a run against itself: nothing to tell apart, on any resample
    same = invoke(compare_command, [predict, predict, "--resamples", 100, "--json", out])
    assert same.exit_code == 0, same.output
    assert all(q["interval"] == [0.0, 0.0] and q["b_better"] == 0.0
               for q in json.loads(out.read_text())["scenarios"].values())


@pytest.mark.parametrize("task_type,metric", [("multiclass", "accuracy"), ("binary", "auroc")])
def test_seeds_summary_and_other_tasks(tmp_path, task_type, metric):
    store = synthetic.make_store(str(tmp_path / "s.zarr"), n_train=400, n_val=100, n_test=100, d_image=16,
                                 d_text=12, n_classes=4, task_type=task_type, shared_dim=6, private_dim=2)
    group = zarr.open_group(store, mode="r+")  # 100 training rows unlabeled: they still give the predictors pairs
    labels, train = group["labels"][:], np.flatnonzero(group["split"][:] == 0)
    labels[train[:100]] = -1
    group["labels"][:] = labels
    result = invoke(fit_command, [store, "--out", tmp_path / "run", "--seeds", "0,1", "--epochs", 2, *SMALL])
    assert result.exit_code == 0, result.output
    rows = json.loads((tmp_path / "run" / "seed-0" / "config.json").read_text())["resolved"]["rows"]
    assert rows["train"] == 400 and rows["train_labeled"] == 300 and 0 < rows["train_paired"] < 400
    assert (f"training rows after the protocol: 400, of which {rows['train_paired']} with both modalities (what the "
            "predictors learn from) and 300 labeled") in result.output
    summary = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert summary["kind"] == "summary" and summary["seeds"] == [0, 1] and summary["metric"] == metric
    assert set(summary["test"]) == set(SCENARIOS) and metric in summary["test"]["full"]
    assert summary["std"]["test"]["full"][metric] >= 0
    for seed in (0, 1):
        assert (tmp_path / "run" / f"seed-{seed}" / "model.safetensors").exists()
    result = invoke(eval_command, [tmp_path / "run"])
    assert result.exit_code == 0 and "±" in result.output
    # compare: a several-seed run is the mean over its seeds
    result = invoke(compare_command, [tmp_path / "run", tmp_path / "run", "--json", tmp_path / "cmp.json"])
    assert result.exit_code == 0 and "2 seeds" in result.output
    full = json.loads((tmp_path / "cmp.json").read_text())["scenarios"]["full"]
    assert full["a"] == full["b"] == pytest.approx(summary["test"]["full"][metric], abs=1e-6)


# ------------------------------------------------------------------------------------------------
# Metrics
# ------------------------------------------------------------------------------------------------
def test_auroc_with_ties_matches_pair_counting():
    rng = np.random.default_rng(0)
    scores, y = rng.integers(0, 5, 200).astype(float), rng.integers(0, 2, 200)
    pos, neg = scores[y == 1], scores[y == 0]
    expected = ((pos[:, None] > neg[None]).sum() + 0.5 * (pos[:, None] == neg[None]).sum()) / (len(pos) * len(neg))
    assert auroc(torch.as_tensor(scores), torch.as_tensor(y)) == pytest.approx(expected)
    assert auroc(torch.ones(3), torch.ones(3)) is None


def test_f1_macro_at_threshold_half():
    y = torch.tensor([[1, 0, 0], [1, 1, 0], [0, 1, 0]], dtype=torch.float)
    logits = torch.tensor([[2.0, -1, -1], [-1, 1, -1], [1, 1, -1]])  # class 2: no positives, no predictions
    scores = f1_scores(logits, y)
    assert scores["f1_macro"] == pytest.approx((1 / 2 + 1 + 0) / 3)
    assert scores["f1_micro"] == pytest.approx(2 * 3 / (2 * 3 + 2))



def test_calibration_metrics_nll_and_ece():
    # ten rows at confidence 0.95 (bin 15 of 15), nine right; ten at 0.55 (bin 9), all right
    confidence = torch.tensor([0.95] * 10 + [0.55] * 10)
    right = torch.tensor([True] * 9 + [False] + [True] * 10)
    assert expected_calibration_error(confidence, right) == pytest.approx(0.5 * 0.05 + 0.5 * 0.45)
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.0], [0.5, 0.0, 3.0], [1.0, 1.0, 1.0]])
    y = torch.tensor([0, 2, 2, -1])  # the unlabeled row is not scored
    metrics = task_metrics("multiclass", logits, y)
    assert metrics["nll"] == pytest.approx(torch.nn.functional.cross_entropy(logits[:3], y[:3]).item())
    confidence, guess = logits[:3].softmax(1).max(1)
    assert metrics["ece"] == pytest.approx(expected_calibration_error(confidence, guess == y[:3]))
    labels = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    multilabel = task_metrics("multilabel", torch.tensor([[3.0, -3.0], [0.0, -2.0]]), labels)
    probability = torch.sigmoid(torch.tensor([3.0, -3.0, 0.0, -2.0]))
    assert multilabel["ece"] == pytest.approx(expected_calibration_error(probability, labels.flatten() > 0.5))
    assert task_metrics("binary", logits[:0, :2], y[:0]) == dict.fromkeys(["auroc", "accuracy", "nll", "ece"])


# ------------------------------------------------------------------------------------------------
# Bad input: a clear error, exit code != 0, nothing written
# ------------------------------------------------------------------------------------------------
def expect_error(store, tmp_path, match, *extra):
    out = tmp_path / "bad-run"
    result = invoke(fit_command, [store, "--out", out, "--epochs", 1, *SMALL, *extra])
    assert result.exit_code != 0 and "Error" in result.output and match in result.output, result.output
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".bad-run")]
    return result


def small_features(**kw):
    return synthetic.make_features(**{**dict(n_train=200, n_val=50, n_test=50, d_image=8, d_text=8,
                                             shared_dim=4, private_dim=1), **kw})


def test_unknown_format_version(store, tmp_path):
    url = synthetic.write_store(str(tmp_path / "v2.zarr"), small_features())
    group = zarr.open_group(url, mode="r+")
    group.attrs["embcache"] = {**group.attrs["embcache"], "format": 2}
    expect_error(url, tmp_path, "format 2")


def test_fingerprint_mismatch(tmp_path):
    url = synthetic.write_store(str(tmp_path / "a.zarr"), small_features(seed=0))
    other = synthetic.write_store(str(tmp_path / "b.zarr"), small_features(seed=1))
    expect_error(url, tmp_path, "was not made like", "--val-store", other)
    group = zarr.open_group(other, mode="r+")
    group["image"].attrs["encoder"] = {**group["image"].attrs["encoder"], "model": "something-else"}
    expect_error(other, tmp_path, "fingerprint does not match")


def test_compare_refuses_runs_on_other_features(tmp_path):
    a = synthetic.write_store(str(tmp_path / "a.zarr"), small_features(seed=0))
    b = synthetic.write_store(str(tmp_path / "b.zarr"), small_features(seed=1))
    for url, name in ((a, "run-a"), (b, "run-b")):
        result = invoke(fit_command, [url, "--out", tmp_path / name, "--epochs", 1, *SMALL])
        assert result.exit_code == 0, result.output
    result = invoke(compare_command, [tmp_path / "run-a", tmp_path / "run-b"])
    assert result.exit_code != 0 and "fingerprint differs" in result.output


def test_no_training_rows_with_both_modalities(tmp_path):
    url = synthetic.write_store(str(tmp_path / "s.zarr"), small_features())
    result = expect_error(url, tmp_path, "--impute mean", "--train-missing-rate", 1.0)
    assert "both modalities" in result.output
    with pytest.raises(FitError, match="--impute mean"):  # the library raises FitError (a ValueError)
        fit(FitConfig(store=url, train_missing_rate=1.0), tmp_path / "run", progress=False)
    assert invoke(fit_command, [url, "--out", tmp_path / "ok", "--train-missing-rate", 1.0,
                                "--impute", "mean", "--epochs", 1, *SMALL]).exit_code == 0


def test_nan_in_embeddings(tmp_path):
    features = small_features()
    row = int(np.flatnonzero(features.present["text"])[3])
    features.emb["text"][row, 2] = np.inf
    url = synthetic.write_store(str(tmp_path / "s.zarr"), features)
    expect_error(url, tmp_path, "NaN or inf")


def test_labels_out_of_range(tmp_path):
    features = small_features(task_type="multiclass", n_classes=3)
    features.labels[5] = 3
    url = synthetic.write_store(str(tmp_path / "s.zarr"), features)
    expect_error(url, tmp_path, "out of range")


def test_existing_output_and_failure_midway_leave_nothing_half_written(store, tmp_path, monkeypatch):
    out = tmp_path / "run"
    out.mkdir()
    expect_error_result = invoke(fit_command, [store, "--out", out, *SMALL])
    assert expect_error_result.exit_code != 0 and "--overwrite" in expect_error_result.output
    out.rmdir()

    def explode(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr("embcache.plots.plot_scenarios", explode)
    with pytest.raises(RuntimeError):
        fit(FitConfig(store=store, epochs=1, predictor_hidden=32, classifier_hidden=32), out, progress=False)
    assert os.listdir(tmp_path) == []


def test_out_must_not_be_or_hold_an_input_store(tmp_path):
    url = synthetic.write_store(str(tmp_path / "stores" / "s.zarr"), small_features())
    before = sorted(p.name for p in (tmp_path / "stores" / "s.zarr").iterdir())
    for out, where in ((url, "is the input store"), (tmp_path / "stores" / "s.zarr" / "run", "is inside"),
                       (tmp_path / "stores", "contains")):
        result = invoke(fit_command, [url, "--out", out, "--overwrite", "--epochs", 1, *SMALL])
        assert result.exit_code == 1 and where in result.output and "Traceback" not in result.output, result.output
    other = synthetic.write_store(str(tmp_path / "val.zarr"), small_features())
    result = invoke(fit_command, [url, "--val-store", other, "--out", other, "--overwrite", *SMALL])
    assert result.exit_code == 1 and "(--val-store)" in result.output, result.output
    assert sorted(p.name for p in (tmp_path / "stores" / "s.zarr").iterdir()) == before
    assert open_store(url).n_rows == open_store(other).n_rows == 300  # both intact


def test_overwrite_replaces_only_a_run_folder(tmp_path):
    url = synthetic.write_store(str(tmp_path / "s.zarr"), small_features())
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "keep.txt").write_text("mine")
    result = invoke(fit_command, [url, "--out", notes, "--overwrite", "--epochs", 1, *SMALL])
    assert result.exit_code == 1 and "not an `embcache fit` run folder" in result.output, result.output
    assert (notes / "keep.txt").read_text() == "mine"
    run = tmp_path / "run"
    run.mkdir()  # an empty folder may be replaced
    for _ in range(2):  # ... and so may a run
        result = invoke(fit_command, [url, "--out", run, "--overwrite", "--epochs", 1, *SMALL])
        assert result.exit_code == 0, result.output
        assert (run / "config.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes", "run", "s.zarr"]  # no temp or old folders


def test_too_few_paired_rows_for_the_processes(tmp_path):
    """K processes force K batches per epoch; each needs 2 rows with both modalities for VICReg."""
    data = load_dataset(synthetic.write_store(str(tmp_path / "s.zarr"), small_features(n_train=12, n_val=6,
                                                                                        n_test=6)))
    cfg = FitConfig(store="s", train_missing_rate=0.0)
    assert prepare(data, cfg, torch.device("cpu"), Ranks(0, 4)).resolved["steps_per_epoch"] == 4
    with pytest.raises(FitError, match="12 training rows have both modalities.*too few for 8 processes"):
        prepare(data, cfg, torch.device("cpu"), Ranks(0, 8))
    prepare(data, replace(cfg, impute="mean"), torch.device("cpu"), Ranks(0, 8))  # no VICReg: fine


def test_an_expander_without_variance_and_covariance_weights_is_refused():
    with pytest.raises(FitError, match="collapses"):
        FitConfig(store="x", expander_dim=64)
    FitConfig(store="x", expander_dim=64, vicreg_std=25.0, vicreg_cov=1.0)  # the paper's weights: accepted


def test_the_default_predictor_objective_fits_a_weakly_predictable_target_better_than_the_papers_weights():
    # The staged predictors regress fixed targets: VICReg's variance hinge and covariance term (the paper's 25 / 1)
    # pull the prediction off the conditional mean, which varies much less than a weakly predictable target.
    data = dataset_from_features(synthetic.make_features(
        n_train=600, n_val=200, n_test=300, d_image=32, d_text=24, n_classes=4, task_type="multiclass",
        shared_dim=3, private_dim=12, noise=0.5, seed=0), "synthetic:weak")
    test = data.splits["test"]
    x = {m: torch.as_tensor(test.emb[m]) for m in ("image", "text")}
    r2 = []
    for weights in ({}, {"vicreg_std": 25.0, "vicreg_cov": 1.0}):
        cfg = FitConfig(store="x", device="cpu", train_missing_rate=0.0, linear_head=False, mean_fallback="off",
                        cross_fit=0, predictor_hidden=64, **weights)
        prep = prepare(data, cfg, torch.device("cpu"))
        model = make_model(data, prep, cfg, {})[0]
        r2.append([r2_score(p, t) for p, t in predictions(model, x).values()])
    (default_i2t, default_t2i), (paper_i2t, paper_t2i) = r2
    assert default_i2t > paper_i2t + 0.02 and default_t2i > paper_t2i + 0.02
    assert default_i2t > 0.05 and default_t2i > 0.05
