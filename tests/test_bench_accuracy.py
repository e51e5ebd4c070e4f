"""`embcache bench accuracy`: the grid, its table, JSON and figure, on small synthetic caches."""
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from embcache.bench import accuracy as bench_accuracy
from embcache.bench.accuracy import (_resamples, acceptance, format_acceptance, keep_labels, linear_probe,
                                     pack_correct, paired_intervals, pooled_margins, resplit, run_dataset,
                                     synthetic_facts, unpack_correct)
from embcache.bench.synthetic import bayes_accuracy, label_shared_share, make_features, make_store
from embcache.cli.bench_accuracy import accuracy_command
from embcache.config import FitConfig, FitError
from embcache.data import dataset_from_features, load_dataset
from embcache.metrics import task_metrics
from embcache.missing import apply_missing

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = dict(n_train=300, n_val=120, n_test=150, d_image=16, d_text=12, n_classes=3, task_type="multiclass",
            shared_dim=6, private_dim=2, noise=0.3)
FAST = ["--epochs", "3", "--fit-option", "predictor_hidden=32", "--fit-option", "classifier_hidden=32",
        "--fit-option", "predictor_epochs=60", "--fit-option", "lr=0.003"]


def test_grid_writes_table_json_and_figure(tmp_path, monkeypatch):
    monkeypatch.setitem(bench_accuracy.SYNTHETIC, "synthetic-predictable", TINY)
    result = CliRunner().invoke(accuracy_command, [
        "--synthetic", "synthetic-predictable", "--draws", "1", "--seeds", "0,1", "--test-types", "both,image",
        *FAST, "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "out" / "accuracy.json").read_text())
    (ds,) = report["datasets"]
    assert ds["name"] == "synthetic-predictable@11" and ds["draw"] == 11 and report["over_draws"] == []
    # 3 impute modes x 2 settings x 2 test types x 2 seeds
    assert len(ds["cells"]) == 24
    assert {(c["setting"], c["test_type"]) for c in ds["cells"]} == {
        (s, t) for s in ("complete", "missing") for t in ("both", "image")}
    summary = ds["summary"]["missing"]["both"]
    assert set(summary) == {"predict", "zero", "mean"} and summary["predict"]["missing"]["n"] == 2
    assert summary["predict"]["r2"]["mean"] > 0.3 and summary["zero"]["r2"] is None
    assert 0 < ds["summary"]["probe"]["mean"]["full"] <= 1
    assert (tmp_path / "out" / "accuracy.png").read_bytes()[:4] == b"\x89PNG"
    table = (tmp_path / "out" / "accuracy.txt").read_text()
    assert "predict - best baseline" in table and "missing-image" in table and "linear probe" in table
    assert "missing-text" not in table  # only the test types asked for
    assert "check: predict >= best baseline - 0.005 everywhere:" in table and set(ds["checks"]) == {
        "never_hurts", "helps", "spread", "trainer_vs_probe"}
    # every run kept which test rows it got right; the margins' bootstrap intervals reach the table
    assert ds["test_labeled"] == TINY["n_test"] and all(set(c["correct"]) == {"full", f"missing-{c['test_type']}"}
                                                        for c in ds["cells"])
    lo, hi = ds["intervals"]["margin"]["missing"]["both"]
    assert lo <= hi and f"[{lo:+.3f}, {hi:+.3f}]" in table and len(ds["intervals"]["trainer_vs_probe"]) == 2
    # a synthetic cache knows its ceiling, and no run beats it
    assert set(ds["bayes"]) == {"full", "missing-both", "missing-image"} and "Bayes-optimal" in table
    assert all(c["test"]["full"]["accuracy"] <= ds["bayes"]["full"] + 0.03 for c in ds["cells"])


def test_jobs_train_the_same_runs_in_worker_processes():
    """--jobs N: each (setting, test type, seed) trains in a spawned worker; the cells, their order and the log
    lines are those of one process."""
    data = dataset_from_features(make_features(**TINY, seed=5), "synthetic:jobs")
    base = FitConfig(epochs=2, predictor_hidden=16, classifier_hidden=16, predictor_epochs=5, device="cpu")
    kwargs = dict(seeds=[0, 1], test_types=["both"], log=lambda line: lines[-1].append(line))
    lines = [[]]
    alone = run_dataset("a", data, base, **kwargs)
    lines.append([])
    pooled = run_dataset("a", data, base, jobs=2, **kwargs)
    strip = lambda cells: [{k: v for k, v in c.items() if k != "seconds"} for c in cells]  # noqa: E731
    assert strip(pooled["cells"]) == strip(alone["cells"]) and len(alone["cells"]) == 12
    assert [(c["setting"], c["impute"], c["seed"]) for c in pooled["cells"]][:4] == [
        ("complete", "predict", 0), ("complete", "predict", 1), ("complete", "zero", 0), ("complete", "zero", 1)]
    assert sorted(lines[1]) == sorted(lines[0]) and len(lines[0]) == 2  # one line per (setting, test type)


def test_a_run_that_fails_in_a_job_stops_the_grid_with_its_error():
    data = dataset_from_features(make_features(**TINY, seed=5), "synthetic:jobs")
    base = FitConfig(epochs=2, predictor="prompts", device="cpu")  # a store without cached hidden states
    with pytest.raises(FitError, match="hidden"):
        run_dataset("a", data, base, seeds=[0, 1], test_types=["both"], jobs=2, log=lambda line: None)


def test_acceptance_checks_name_the_worst_cell():
    def cell(missing, std=0.0, full=None, r2=None):
        return {"missing": {"mean": missing, "std": std}, "full": {"mean": full}, "r2": None if r2 is None else {"mean": r2}}

    ds = {"summary": {
        "complete": {"both": {"predict": cell(0.70, 0.010, 0.80, 0.5), "zero": cell(0.66, 0.004, 0.79),
                              "mean": cell(0.67, 0.0, 0.81)}},
        "missing": {"both": {"predict": cell(0.60, 0.002, r2=0.5), "zero": cell(0.61, 0.001), "mean": cell(0.607)}},
        "probe": {"mean": {"full": 0.805}}}}
    checks = acceptance(ds)
    assert checks["never_hurts"] == {"ok": False, "value": pytest.approx(-0.010), "where": "missing missing-both",
                                     "interval": None}
    assert checks["helps"]["ok"] is False and checks["helps"]["where"] == "missing missing-both"
    assert checks["spread"] == {"ok": False, "value": [0.010, 0.004], "where": "complete missing-both",
                                "interval": None, "mean_fill": 0.0}
    assert "seed std <= 2 x zero fill's: NO (worst 0.010 vs 0.004; mean fill's 0.000, complete missing-both)" in \
        "\n".join(format_acceptance(checks))
    assert checks["trainer_vs_probe"] == {"ok": False, "value": [0.79, 0.805], "where": "complete full, zero",
                                          "interval": None}
    ds["summary"]["missing"]["both"]["predict"] = cell(0.64, 0.002, r2=0.2)  # now +0.03, but R2 below 0.3
    ds["summary"]["probe"]["mean"]["full"] = 0.80
    checks = acceptance(ds)
    assert checks["never_hurts"]["ok"] and checks["never_hurts"]["value"] == pytest.approx(0.03)
    assert checks["helps"] == {"ok": True, "value": pytest.approx(0.03), "where": "complete missing-both",
                               "interval": None}
    assert checks["trainer_vs_probe"]["ok"]
    lines = format_acceptance(checks)
    assert len(lines) == 4 and lines[0].endswith("yes (worst +0.030, complete missing-both)") and "NO" in lines[2]
    # with the bootstrap intervals of the report entry, each margin check names its own
    ds["intervals"] = {"margin": {"complete": {"both": [0.01, 0.05]}, "missing": {"both": [0.02, 0.04]}},
                       "trainer_vs_probe": [-0.03, 0.01]}
    checks = acceptance(ds)
    assert checks["never_hurts"]["interval"] == [0.01, 0.05] and checks["trainer_vs_probe"]["interval"] == [-0.03, 0.01]
    assert "interval over test rows [+0.010, +0.050]" in format_acceptance(checks)[0]


def test_a_run_keeps_which_test_rows_it_got_right():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 1.0], [0.0, 5.0], [1.0, 0.0]] * 3)
    y = torch.tensor([0, 1, 1, 0, -1] * 3)  # the -1 rows are unlabeled: left out, as the accuracy leaves them out
    right = unpack_correct(pack_correct(logits, y), 12)
    assert right.tolist() == [1, 1, 0, 0] * 3 and right.mean() == task_metrics("multiclass", logits, y)["accuracy"]


def _entry(correct: dict, n: int) -> dict:
    """A report entry whose runs (one seed, complete training, test type both) got `correct[impute]` right."""
    def bits(rows):
        return pack_correct(torch.eye(2)[torch.tensor(rows)], torch.ones(len(rows), dtype=torch.long))
    cells = [{"setting": "complete", "test_type": "both", "impute": i,
              "correct": {"missing-both": bits(rows), "full": bits(rows)}} for i, rows in correct.items()]
    return {"cells": cells, "test_labeled": n, "probe": {"correct": {"full": bits(correct["zero"])}}}


def test_the_margins_intervals_are_paired_over_the_test_rows():
    n = 400
    rng = np.random.default_rng(0)
    zero = rng.integers(0, 2, n)
    # predict gets right what zero fill gets right, and 8 rows more (+0.02); mean fill loses 40 of zero's rows.
    # Paired, the margin is the share of those 8 rows in a resample: above 0 and some 0.03 wide; resampling each
    # mode on its own rows would give an interval some 0.14 wide (two accuracies near 0.5 on 400 rows)
    predict, mean = zero.copy(), zero.copy()
    predict[np.flatnonzero(zero == 0)[:8]] = 1
    mean[np.flatnonzero(zero == 1)[:40]] = 0
    intervals = paired_intervals([_resamples(_entry({"predict": predict, "zero": zero, "mean": mean}, n))])
    lo, hi = intervals["margin"]["complete"]["both"]
    assert 0 < lo < 8 / n < hi < lo + 0.04
    # the trainer's lowest full score (mean fill's) against the probe (zero fill's rows): -0.1, paired again
    low, high = intervals["trainer_vs_probe"]
    assert low < -40 / n < high < 0 and high - low < 0.07
    # two draws averaged: the interval of the mean margin
    other = _entry({"predict": zero, "zero": zero, "mean": zero}, n)
    both = paired_intervals([_resamples(_entry({"predict": predict, "zero": zero, "mean": mean}, n)), _resamples(other)])
    lo2, hi2 = both["margin"]["complete"]["both"]
    assert 0 < lo2 < 4 / n < hi2 < hi
    # runs without per-row results (a main metric other than accuracy) get no interval
    assert paired_intervals([_resamples({"cells": [{"setting": "complete"}], "test_labeled": n})]) is None


def test_margins_pool_over_datasets_with_every_test_row_weighing_the_same():
    rng = np.random.default_rng(1)
    zero_a, zero_b = rng.integers(0, 2, 300), rng.integers(0, 2, 700)
    # set a: predict gets 15 more rows right than zero fill (+0.05); set b: 7 fewer (-0.01)
    predict_a, predict_b = zero_a.copy(), zero_b.copy()
    predict_a[np.flatnonzero(zero_a == 0)[:15]] = 1
    predict_b[np.flatnonzero(zero_b == 1)[:7]] = 0
    a = {**_entry({"predict": predict_a, "zero": zero_a, "mean": zero_a}, 300), "name": "a"}
    b = {**_entry({"predict": predict_b, "zero": zero_b, "mean": zero_b}, 700), "name": "b"}
    pool = pooled_margins([a, b])
    assert pool["rows"] == 1000 and pool["datasets"] == ["a", "b"]
    margin = pool["margin"]["complete"]["both"]
    assert margin["value"] == pytest.approx((15 - 7) / 1000)  # not the mean of +0.05 and -0.01 (+0.02)
    lo, hi = margin["interval"]
    lo_a, hi_a = paired_intervals([_resamples(a)])["margin"]["complete"]["both"]
    assert lo < 0.008 < hi and hi - lo < hi_a - lo_a  # more rows, a narrower interval
    # the trainer's lowest full score against the probe: predict's in b, 7 rows below the probe (zero fill's rows)
    assert pool["trainer_vs_probe"]["value"] == pytest.approx(-7 / 1000)
    # a dataset without per-row results (another main metric) cannot be pooled
    assert pooled_margins([a, {"name": "c", "cells": [{"setting": "complete"}], "test_labeled": 10}]) is None


def test_the_bayes_ceiling_is_what_a_logistic_regression_on_many_rows_approaches():
    # On this linear-Gaussian model a logistic regression on 20k rows is close to the Bayes classifier: the
    # ceiling must sit just above it (a wrong posterior, e.g. a wrong latent map, would put it well below)
    features = make_features(n_train=20_000, n_val=10, n_test=1500, d_image=16, d_text=12, n_classes=4,
                             task_type="multiclass", shared_dim=6, private_dim=2, noise=0.3, seed=7)
    train, test = np.flatnonzero(features.split == 0), np.flatnonzero(features.split == 2)
    ones = np.ones(len(test), dtype=bool)
    for shown in (("image", "text"), ("image",), ("text",)):
        x = torch.as_tensor(np.concatenate([features.emb[m] for m in shown], axis=1))
        head = bench_accuracy._fit_logistic(x[train], torch.as_tensor(features.labels[train]), "multiclass", 4, 1e-6)
        fitted = (head(x[test]).argmax(1).numpy() == features.labels[test]).mean()
        ceiling = bayes_accuracy(features, test, {m: ones if m in shown else ~ones for m in ("image", "text")})
        assert fitted - 0.015 <= ceiling <= fitted + 0.03, (shown, fitted, ceiling)
    # showing nothing: the prior's most probable class, the same for every row
    nothing = bayes_accuracy(features, test, {m: ~ones for m in ("image", "text")})
    assert nothing == pytest.approx(max(np.bincount(features.labels[test])) / len(test), abs=0.02)


def test_a_synthetic_cache_reports_its_bayes_ceiling(monkeypatch):
    monkeypatch.setitem(bench_accuracy.SYNTHETIC, "synthetic-predictable", TINY)
    bayes = synthetic_facts("synthetic-predictable", 11, 0.7, ("both", "image"), 0)["bayes"]
    assert set(bayes) == {"full", "missing-both", "missing-image"}
    assert bayes["full"] > bayes["missing-both"] > 1 / TINY["n_classes"]
    monkeypatch.setitem(bench_accuracy.SYNTHETIC, "synthetic-predictable", {**TINY, "task_type": "multilabel"})
    assert synthetic_facts("synthetic-predictable", 11, 0.7, ("both",), 0)["bayes"] is None


def test_bad_test_types_are_refused():
    result = CliRunner().invoke(accuracy_command, ["--synthetic", "synthetic-weak", "--test-types", "both,nope"])
    assert result.exit_code == 2 and "nope" in result.output


def test_per_pattern_probe_scores_single_modality_rows_with_their_own_regression():
    # the label depends on the modalities' private parts too, so a regression fitted on pairs and fed a zero
    # stand-in is far from one fitted on the single modality
    data = dataset_from_features(make_features(n_train=600, n_val=200, n_test=400, n_classes=4, task_type="multiclass",
                                               shared_dim=4, private_dim=6, seed=5), "synthetic:test")
    probe = linear_probe(data, 0.7, 0, torch.device("cpu"))["test"]
    # full pairs: every variant is the pair regression
    assert probe["per-pattern"]["full"]["accuracy"] == probe["mean"]["full"]["accuracy"] == probe["zero"]["full"]["accuracy"]
    for scenario in ("missing-both", "missing-image", "missing-text"):
        assert probe["per-pattern"][scenario]["accuracy"] > probe["zero"][scenario]["accuracy"] + 0.02


def test_synthetic_draws_are_summarised_over_draws(tmp_path, monkeypatch):
    monkeypatch.setitem(bench_accuracy.SYNTHETIC, "synthetic-predictable", TINY)
    monkeypatch.setitem(bench_accuracy.SYNTHETIC_DRAWS, "synthetic-predictable", (1, 2, 3))
    result = CliRunner().invoke(accuracy_command, [
        "--synthetic", "synthetic-predictable", "--draws", "2", "--seeds", "0", "--test-types", "both", *FAST,
        "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "out" / "accuracy.json").read_text())
    assert [d["draw"] for d in report["datasets"]] == [1, 2]  # the first two draws only
    (over,) = report["over_draws"]
    assert over["draws"] == [1, 2] and over["group"] == "synthetic-predictable"
    for setting in ("complete", "missing"):
        per_draw = [d["summary"][setting]["both"] for d in report["datasets"]]
        cell = over["summary"][setting]["both"]
        for impute in ("predict", "zero", "mean"):
            means = [q[impute]["missing"]["mean"] for q in per_draw]
            assert cell[impute]["missing"]["mean"] == pytest.approx(sum(means) / 2)
            assert cell[impute]["missing"]["n"] == 2
        margins = [q["predict"]["missing"]["mean"] - max(q["zero"]["missing"]["mean"], q["mean"]["missing"]["mean"])
                   for q in per_draw]
        assert cell["predict"]["margin"]["mean"] == pytest.approx(sum(margins) / 2)
        assert cell["predict"]["margin"]["std"] == pytest.approx(abs(margins[0] - margins[1]) / 2 ** 0.5)
    # each draw's share of the label on the shared latent, and its mean over the draws
    shares = [label_shared_share(make_features(**TINY, seed=draw)) for draw in (1, 2)]
    assert [d["label_shared"] for d in report["datasets"]] == pytest.approx(shares)
    assert over["label_shared"]["mean"] == pytest.approx(sum(shares) / 2)
    table = (tmp_path / "out" / "accuracy.txt").read_text()
    assert "synthetic-predictable over 2 draws" in table and "mean ± std over draws [1, 2]" in table
    assert f"label's share on the shared latent {shares[0]:.2f}" in table


def test_the_label_share_on_the_shared_latent_is_the_score_variance_there():
    features = make_features(**TINY, seed=5)
    share = label_shared_share(features)
    assert 0.0 < share < 1.0
    # the same number by hand: TINY's first shared_dim latent dimensions are the shared ones
    score = features.meta["latent"]["score"]
    centred = score - score.mean(axis=1, keepdims=True)
    assert share == pytest.approx((centred[:TINY["shared_dim"]] ** 2).sum() / (centred ** 2).sum())
    # no private dimensions: all of the label is shared; the score moved off the shared dimensions: none of it
    assert label_shared_share(make_features(**{**TINY, "private_dim": 0}, seed=5)) == pytest.approx(1.0)
    features.meta["latent"]["score"][:TINY["shared_dim"]] = 0.0
    assert label_shared_share(features) == 0.0


def test_a_resplit_deals_the_same_rows_into_splits_of_the_same_sizes(tmp_path):
    data = load_dataset(make_store(str(tmp_path / "s.zarr"), **TINY, seed=4, absent_image=0.1))
    assert resplit(data, 0) is data  # split 0: the store's own
    rows = {}  # id -> (split, image, present image, label) in the store's own split
    for name, sp in data.splits.items():
        for i, row_id in enumerate(sp.ids):
            rows[row_id] = (name, sp.emb["image"][i], sp.present["image"][i], sp.labels[i])
    one = resplit(data, 1)
    moved = 0
    for name, sp in one.splits.items():
        assert len(sp) == len(data.splits[name])
        assert (np.diff(sp.index) > 0).all()  # the store's row order kept within each split
        for i, row_id in enumerate(sp.ids):  # every row keeps what it holds
            was, image, present, label = rows.pop(row_id)
            moved += was != name
            assert (sp.emb["image"][i] == image).all() and sp.present["image"][i] == present and sp.labels[i] == label
    assert rows == {}  # every row dealt, once
    assert moved > len(data.splits["test"])  # a new deal, not the old one
    again, two = resplit(data, 1), resplit(data, 2)
    assert all((again.splits[n].ids == one.splits[n].ids).all() for n in one.splits)  # the same deal each run
    assert set(two.splits["test"].ids) != set(one.splits["test"].ids)


def test_a_store_over_its_splits_is_summarised_and_checked_over_them(tmp_path):
    url = make_store(str(tmp_path / "s.zarr"), **TINY, seed=4)
    result = CliRunner().invoke(accuracy_command, [
        "--store", url, "--splits", "2", "--seeds", "0,1", "--test-types", "both", *FAST,
        "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "out" / "accuracy.json").read_text())
    assert [(d["name"], d["draw"]) for d in report["datasets"]] == [("s@split0", 0), ("s@split1", 1)]
    (over,) = report["over_draws"]
    assert (over["name"], over["over"], over["draws"], over["group"]) == ("s over 2 splits", "splits", [0, 1], "s")
    per_split = [d["summary"]["complete"]["both"] for d in report["datasets"]]
    cell = over["summary"]["complete"]["both"]
    for impute in ("predict", "zero", "mean"):
        split_means, split_stds = ([q[impute]["missing"][key] for q in per_split] for key in ("mean", "std"))
        assert cell[impute]["missing"]["mean"] == pytest.approx(np.mean(split_means))
        assert cell[impute]["seed_std"]["mean"] == pytest.approx(np.mean(split_stds))
    # the seed-spread check reads the splits' own seed stds, averaged (not the std between splits)
    seed_stds = [[over["summary"][setting]["both"][impute]["seed_std"]["mean"] for impute in ("predict", "zero")]
                 for setting in ("complete", "missing")]
    assert over["checks"]["spread"]["value"] in seed_stds
    table = (tmp_path / "out" / "accuracy.txt").read_text()
    assert "s over 2 splits" in table and "mean ± std over splits [0, 1] of the mean over seeds [0, 1]" in table
    refused = CliRunner().invoke(accuracy_command, ["--dataset", "manifest", "--root", url, "--splits", "2"])
    assert refused.exit_code != 0 and "--splits applies to --store" in refused.output


def test_labeled_fraction_keeps_the_labels_of_the_same_rows_independently_of_the_protocol():
    data = dataset_from_features(make_features(**{**TINY, "n_train": 2000}, seed=3), "synthetic:test")
    kept = keep_labels(data, 0.25, seed=0)
    train, before = kept.splits["train"], data.splits["train"]
    labeled = train.labels >= 0
    assert abs(labeled.mean() - 0.25) < 0.03
    assert (train.labels[labeled] == before.labels[labeled]).all() and (before.labels >= 0).all()
    assert kept.splits["val"] is data.splits["val"] and kept.splits["test"] is data.splits["test"]
    assert (keep_labels(data, 0.25, seed=0).splits["train"].labels == train.labels).all()  # the same rows each run
    assert (keep_labels(data, 0.25, seed=1).splits["train"].labels >= 0).tolist() != labeled.tolist()
    # not the rows the missing protocol (same seed) takes a modality from
    dropped = apply_missing(before.ids, before.present, 0.25, "image", 0)["image"] == 0
    assert abs((labeled & dropped).mean() - 0.25 * 0.25) < 0.02
    assert keep_labels(data, 1.0, seed=0) is data
    multilabel = dataset_from_features(make_features(**{**TINY, "task_type": "multilabel"}, seed=3), "synthetic:m")
    with pytest.raises(FitError, match="multiclass or binary"):
        keep_labels(multilabel, 0.5, seed=0)


def test_labeled_fraction_reaches_the_report(tmp_path, monkeypatch):
    monkeypatch.setitem(bench_accuracy.SYNTHETIC, "synthetic-predictable", TINY)
    result = CliRunner().invoke(accuracy_command, [
        "--synthetic", "synthetic-predictable", "--draws", "1", "--seeds", "0", "--test-types", "both",
        "--labeled-fraction", "0.3", *FAST, "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    (ds,) = json.loads((tmp_path / "out" / "accuracy.json").read_text())["datasets"]
    assert ds["labeled_fraction"] == 0.3 and 0.2 * 300 < ds["train_labeled"] < 0.4 * 300
    assert "labels kept on 0.3 of the train rows" in (tmp_path / "out" / "accuracy.txt").read_text()


def test_the_labeled_fraction_figure_plots_paired_margins(tmp_path):
    spec = importlib.util.spec_from_file_location(
        "plot_labeled_fraction", Path(__file__).resolve().parents[1] / "scripts" / "plot_labeled_fraction.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)

    def report(fraction, scores):  # scores: impute -> per-seed accuracies, the same in both settings
        cells = [{"setting": setting, "test_type": "both", "impute": impute, "seed": seed,
                  "test": {"missing-both": {"accuracy": value}}}
                 for setting in ("complete", "missing") for impute, values in scores.items()
                 for seed, value in enumerate(values)]
        return {"datasets": [{"name": "set", "metric": "accuracy", "labeled_fraction": fraction, "cells": cells}]}

    # mean fill is the best baseline (0.61 on average); the per-seed differences are 0.04, 0.02, 0.03
    few = report(0.1, {"predict": [0.65, 0.63, 0.64], "zero": [0.50, 0.50, 0.50], "mean": [0.61, 0.61, 0.61]})
    name, fraction, margins = script.margins(few)
    assert (name, fraction) == ("set", 0.1)
    assert margins["complete"] == pytest.approx((0.03, 0.01)) and margins["missing"] == margins["complete"]
    paths = []
    for i, r in enumerate([few, report(1.0, {"predict": [0.7] * 3, "zero": [0.7] * 3, "mean": [0.69] * 3})]):
        paths.append(tmp_path / f"r{i}.json")
        paths[-1].write_text(json.dumps(r))
    script.main(str(tmp_path / "fig.png"), [str(p) for p in paths])
    assert (tmp_path / "fig.png").read_bytes()[:4] == b"\x89PNG"


def test_the_margins_figure_plots_each_margin_with_its_interval(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location(
        "plot_margins", Path(__file__).resolve().parents[1] / "scripts" / "plot_margins.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)

    def cell(value):
        return {"missing": {"mean": value}}

    def entry(name, fraction, margins):  # margins: setting -> (predict, interval); zero 0.60, mean 0.62
        return {"name": name, "labeled_fraction": fraction, "train_rate": 0.7, "rows": {"train": 100},
                "train_labeled": round(100 * fraction),
                "summary": {s: {"both": {"predict": cell(p), "zero": cell(0.60), "mean": cell(0.62)}}
                            for s, (p, _) in margins.items()},
                "intervals": {"margin": {s: {"both": i} for s, (_, i) in margins.items()}}}

    report = {"datasets": [entry("set", 0.1, {"complete": (0.65, [0.01, 0.05]), "missing": (0.63, [-0.01, 0.03])}),
                           {**entry("syn@1", 1.0, {"complete": (0.70, [0.0, 0.1])}), "group": "syn"}],
              "over_draws": [{**entry("syn over 2 draws", 1.0, {"complete": (0.64, [0.0, 0.04])}), "group": "syn"}]}
    rows = script.rows(report)  # the draws of a synthetic cache: their summary only
    assert [(label, round(m, 3), i) for label, m, i in rows] == [
        ("set, labels on 0.1: complete, missing-both", 0.03, [0.01, 0.05]),
        ("set, labels on 0.1: missing 0.7, missing-both", 0.01, [-0.01, 0.03]),
        ("syn over 2 draws: complete, missing-both", 0.02, [0.0, 0.04])]
    # two real sets with all labels (one in each report) pool; the synthetic draws and a lone 0.1-labels set do not,
    # nor a store whose own data is labeled on a fifth of its training rows
    ones, zeros = np.ones(100, dtype=int), np.zeros(300, dtype=int)
    real = [{**_entry({"predict": ones, "zero": ones * 0, "mean": ones * 0}, 100), "name": "x", "train_rate": 0.7},
            {**_entry({"predict": zeros, "zero": zeros, "mean": zeros}, 300), "name": "y", "train_rate": 0.7}]
    few = {**real[1], "name": "z", "rows": {"train": 50}, "train_labeled": 10}
    pooled = script.pooled_rows([{"datasets": [real[0]] + report["datasets"]}, {"datasets": [real[1], few]}])
    assert [(label, m) for label, m, _ in pooled] == [("pooled: x, y (400 rows): complete, missing-both", 0.25)]
    (tmp_path / "r.json").write_text(json.dumps(report))
    script.main(str(tmp_path / "fig.png"), [str(tmp_path / "r.json")])
    assert (tmp_path / "fig.png").read_bytes()[:4] == b"\x89PNG"
    assert "set, labels on 0.1: complete, missing-both: +0.030 [+0.010, +0.050]" in capsys.readouterr().out


def test_the_margin_sweep_scores_each_point_and_resumes(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location(
        "margin_sweep", Path(__file__).resolve().parents[1] / "scripts" / "margin_sweep.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    cfg = bench_accuracy.FitConfig(device="cpu", epochs=3, predictor_hidden=32, classifier_hidden=32,
                                   predictor_epochs=60, lr=0.003)
    points = [("latent", {"shared_dim": 6, "private_dim": 2}), ("latent", {"shared_dim": 1, "private_dim": 6}),
              ("n_train", {"n_train": 300})]  # the last is the first point again: trained once
    trained = []
    run_draw = script.run_draw
    monkeypatch.setattr(script, "run_draw", lambda *a: trained.append(a[1]) or run_draw(*a))
    report = script.run_sweep(tmp_path, points, [11], [0], cfg, base=TINY, log=lambda *a: None)
    assert trained == [11, 11]
    first, weak, rows = report["points"]
    assert first["draws"] == rows["draws"] and rows["label"] == "300 training rows"
    for point in report["points"]:
        (draw,) = point["draws"]
        for setting in ("complete", "missing"):
            q = draw[setting]
            best = max(q["scores"]["zero"], q["scores"]["mean"])
            assert q["margin"] == pytest.approx(q["scores"]["predict"] - best)
            assert q["headroom"] == pytest.approx(draw["bayes_missing_both"] - best)
            assert point["summary"][setting]["margin"] == {"mean": pytest.approx(q["margin"]), "std": 0.0}
    # the shared latent is what the predictors learn: more of it, a higher R2
    assert first["summary"]["complete"]["r2"]["mean"] > weak["summary"]["complete"]["r2"]["mean"] + 0.2
    assert (tmp_path / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    assert "shared 6, private 2" in (tmp_path / "sweep.txt").read_text()

    # a rerun with the same settings trains nothing and writes the same numbers
    monkeypatch.setattr(script, "run_draw", lambda *a: pytest.fail("the earlier run's draws were not reused"))
    again = script.run_sweep(tmp_path, points, [11], [0], cfg, base=TINY, log=lambda *a: None)
    assert again["points"] == json.loads(json.dumps(report["points"]))
    # other settings: refused, the measured file kept; with overwrite, started afresh
    saved = (tmp_path / "sweep.json").read_bytes()
    with pytest.raises(SystemExit, match="other settings .seeds differ.*--overwrite"):
        script.run_sweep(tmp_path, points[:1], [11], [1], cfg, base=TINY, log=lambda *a: None)
    assert (tmp_path / "sweep.json").read_bytes() == saved
    monkeypatch.setattr(script, "run_draw", lambda *a: trained.append(a[1]) or run_draw(*a))
    script.run_sweep(tmp_path, points[:1], [11], [1], cfg, base=TINY, overwrite=True, log=lambda *a: None)
    assert trained == [11, 11, 11] and json.loads((tmp_path / "sweep.json").read_text())["seeds"] == [1]

    # real sets from a bench report sit beside the sweep: their margin (predict - best baseline) at their R2
    def cell(value, r2=None):
        return {"missing": {"mean": value}, "r2": None if r2 is None else {"mean": r2}}
    by_impute = {"predict": cell(0.70, 0.05), "zero": cell(0.68), "mean": cell(0.69)}
    icons = {"name": "icons", "summary": {s: {"both": by_impute} for s in ("complete", "missing")},
             "intervals": {"margin": {"complete": {"both": [-0.01, 0.03]}}}}
    bench = {"datasets": [icons, {"name": "synthetic@11", "draw": 11, "summary": {}}]}
    real = script.real_margins(bench)
    assert [(r["name"], r["setting"]) for r in real] == [("icons", "complete"), ("icons", "missing")]
    assert real[0]["margin"] == pytest.approx(0.01) and real[0]["r2"] == 0.05 and real[0]["interval"] == [-0.01, 0.03]
    assert real[1]["interval"] is None
    script.plot(again["points"], tmp_path / "with-real.png", real)
    assert (tmp_path / "with-real.png").read_bytes()[:4] == b"\x89PNG"


def test_the_margin_sweep_command_line_sets_the_points_and_widths(monkeypatch):
    spec = importlib.util.spec_from_file_location(
        "margin_sweep", Path(__file__).resolve().parents[1] / "scripts" / "margin_sweep.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    calls = []
    monkeypatch.setattr(script, "run_sweep", lambda *args, **kwargs: calls.append((args, kwargs)))
    script.main(["out", "--dims", "640:384", "--latent", "12:2", "4:6", "--n-train", "--draws", "11,21"])
    (args, kwargs), = calls
    assert args[1] == [("latent", {"shared_dim": 12, "private_dim": 2}),
                       ("latent", {"shared_dim": 4, "private_dim": 6})]
    assert args[2] == [11, 21] and args[3] == [0, 1, 2]
    assert kwargs["base"] == {**bench_accuracy.SYNTHETIC["synthetic-predictable"], "d_image": 640, "d_text": 384}
    calls.clear()
    script.main(["out"])  # the defaults: six latent splits, three training sizes, the bench's cache and draws
    (args, kwargs), = calls
    assert [vary for vary, _ in args[1]] == ["latent"] * 6 + ["n_train"] * 3
    assert kwargs["base"] == bench_accuracy.SYNTHETIC["synthetic-predictable"] and args[2] == [11, 21, 22, 23]
