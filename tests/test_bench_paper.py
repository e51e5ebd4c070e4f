"""`embcache bench accuracy --dataset ... --root ...` end to end on the three benchmark fixtures, tiny encoders."""
import json
import os

import pytest
from click.testing import CliRunner
from safetensors import safe_open

from embcache.bench import synthetic
from embcache.bench.accuracy import run_dataset
from embcache.bench.paper import PaperError, dataset_scores, format_markdown, pair_sources
from embcache.config import FitConfig
from embcache.data import dataset_from_features, load_dataset
from embcache.cli.main import main as cli
from tiny_encoders import tiny_extract_options

FIXTURES = os.path.join(os.path.dirname(__file__), "..", "data", "fixtures")
# The fixtures have 2-3 paired training rows; with this missing seed, rate 0.7 (the protocol's) of every type
# keeps at least 2 paired training rows in each, so the predictors can train.
FIXTURE_MISSING_SEED = 69
FAST = ["--epochs", "2", "--fit-option", "predictor_epochs=2", "--fit-option", "predictor_hidden=16",
        "--fit-option", "classifier_hidden=16", "--missing-seed", str(FIXTURE_MISSING_SEED), "--workers", "0",
        "--device", "cpu", "--threads", "2"]


@pytest.fixture(scope="module")
def encoder_args(tmp_path_factory):
    tiny = tiny_extract_options(tmp_path_factory.mktemp("enc"))
    return ["--image-encoder", tiny["image_encoder"], "--image-checkpoint", tiny["image_checkpoint"],
            "--text-encoder", tiny["text_encoder"]]


def sources(*names):
    return [arg for name in names for arg in ("--dataset", name, "--root", os.path.join(FIXTURES, name))]


def metadata(path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as fh:
        return fh.metadata()


def store_files(store):
    """{relative path: mtime_ns} of every file of a store: a rewrite of anything shows."""
    out = {}
    for folder, _, files in os.walk(store):
        for name in files:
            path = os.path.join(folder, name)
            out[os.path.relpath(path, store)] = os.stat(path).st_mtime_ns
    return out


def test_paper_grid_on_the_three_fixtures_then_reuses_the_cache(tmp_path, encoder_args):
    cache, out = tmp_path / "cache", tmp_path / "out"
    args = ["bench", "accuracy", *sources("mmimdb", "food101", "hateful_memes"), *encoder_args, *FAST,
            "--seeds", "0", "--cache", str(cache), "--out", str(out)]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert "reusing" not in result.output

    report = json.loads((out / "paper.json").read_text())
    assert report["schema"] == "embcache.bench-paper/1" and report["seeds"] == [0]
    by_name = {ds["name"]: ds for ds in report["datasets"]}
    assert list(by_name) == ["mmimdb", "food101", "hateful_memes"]
    # the metric columns follow the task type
    assert {n: (ds["task"], ds["metrics"]) for n, ds in by_name.items()} == {
        "mmimdb": ("multilabel", ["f1_macro", "f1_micro"]), "food101": ("multiclass", ["accuracy"]),
        "hateful_memes": ("binary", ["auroc", "accuracy"])}
    scenarios = ["missing-both", "missing-image", "missing-text", "full"]
    for ds in by_name.values():
        assert ds["reused"] is False and os.path.isdir(ds["store"])
        assert os.path.dirname(ds["store"]) == str(cache)
        assert list(ds["scores"]) == ["complete", "missing"]
        for setting in ds["scores"].values():
            assert list(setting) == scenarios
            for metrics in setting.values():
                assert list(metrics) == ds["metrics"]
                for by_impute in metrics.values():
                    assert list(by_impute) == ["predict", "zero", "mean"]
        assert len(ds["grid"]["cells"]) == 2 * 3 * 3  # settings x test types x imputes, one seed
    mm = by_name["mmimdb"]["scores"]["missing"]["missing-both"]["f1_macro"]["predict"]
    assert mm["n"] == 1 and 0.0 <= mm["mean"] <= 1.0
    # the fixture's Hateful Memes test.jsonl is unlabeled: n/a, and said so
    assert by_name["hateful_memes"]["test_labeled"] == 0
    assert by_name["hateful_memes"]["scores"]["complete"]["full"]["auroc"]["predict"]["mean"] is None
    assert "hateful_memes: warning: the test split" in result.output

    md = (out / "paper.md").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| training"))
    for column in ("MM-IMDb F1-macro: predict", "MM-IMDb F1-micro: mean", "Food-101 accuracy: zero",
                   "Hateful Memes AUROC: predict", "Hateful Memes accuracy: mean"):
        assert column in header
    assert header.count("|") == 2 + (2 + 1 + 2) * 3 + 1  # 2 row labels, 15 value columns
    assert "| missing 0.7 | missing-text 0.7" in md.replace("  ", " ").replace("  ", " ")
    assert header in result.output  # printed too

    # Second run: the finished stores are reused, nothing re-extracted or rewritten.
    stores = {n: ds["store"] for n, ds in by_name.items()}
    before = store_files(stores["mmimdb"])
    out2 = tmp_path / "out2"
    args = ["bench", "accuracy", *sources("mmimdb"), *encoder_args, *FAST, "--seeds", "0",
            "--cache", str(cache), "--out", str(out2)]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert "mmimdb: reusing the finished store" in result.output and "extracted" not in result.output
    assert store_files(stores["mmimdb"]) == before
    assert sorted(os.listdir(cache)) == sorted(os.path.basename(s) for s in stores.values())
    second = json.loads((out2 / "paper.json").read_text())
    (ds,) = second["datasets"]
    assert ds["reused"] is True and ds["store"] == stores["mmimdb"]
    assert ds["scores"] == by_name["mmimdb"]["scores"]  # same features, same seed: the same numbers
    assert "(reused)" in (out2 / "paper.md").read_text()


def test_tune_epochs_tunes_both_encoders_once_per_training_protocol(tmp_path, encoder_args):
    """--tune-epochs: the complete protocol's encoders tune on every training row, the missing protocol's only on
    the rows it keeps; each protocol's runs use its own store; a second run reuses every tuning and store."""
    cache, out = tmp_path / "cache", tmp_path / "out"
    args = ["bench", "accuracy", *sources("food101"), *encoder_args, *FAST, "--seeds", "0", "--test-types", "both",
            "--tune-epochs", "1", "--cache", str(cache), "--out", str(out)]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output + repr(result.exception)
    report = json.loads((out / "paper.json").read_text())
    (ds,) = report["datasets"]
    assert report["tune_epochs"] == 1 and list(ds["stores"]) == ["complete both", "missing both"]
    complete, missing = ds["stores"]["complete both"], ds["stores"]["missing both"]
    assert complete != missing and ds["store"] == complete and os.path.isdir(missing)
    attrs = {key: load_dataset(path).encoders for key, path in ds["stores"].items()}
    rows = {}
    for key, encoders in attrs.items():
        for modality in ("image", "text"):
            meta = metadata(encoders[modality]["bitfit"])
            protocol = json.loads(meta["missing_protocol"])
            rows[key, modality] = json.loads(meta["rows"])["train"]
            assert protocol["train_missing_rate"] == (0.0 if key == "complete both" else 0.7)
    for modality in ("image", "text"):  # the missing protocol hides rows from the encoders it tunes
        assert rows["missing both", modality] < rows["complete both", modality]
    assert "encoders BitFit-tuned (1 epochs) per training protocol" in (out / "paper.md").read_text()

    again = CliRunner().invoke(cli, args[:-1] + [str(tmp_path / "out2")])
    assert again.exit_code == 0, again.output + repr(again.exception)
    assert again.output.count("reusing the finished store") == 2 and "extracted" not in again.output
    assert "epoch 1 of 1 done" in again.output  # the tunings resumed from their finished state
    second = json.loads((tmp_path / "out2" / "paper.json").read_text())
    assert second["datasets"][0]["scores"] == ds["scores"]


def test_runs_of_a_protocol_use_its_own_features():
    """run_dataset's data_for: the (setting, test type) it names trains and tests on those features; the others,
    and the probe, on the dataset's own."""
    shape = dict(n_train=200, n_val=80, n_test=80, d_image=8, d_text=6, n_classes=3, task_type="multiclass",
                 shared_dim=3, private_dim=2, noise=0.3)
    data = dataset_from_features(synthetic.make_features(**shape, seed=0), "synthetic:a")
    other = dataset_from_features(synthetic.make_features(**shape, seed=1), "synthetic:b")
    base = FitConfig(device="cpu", epochs=2, predictor_epochs=2, predictor_hidden=16, classifier_hidden=16)
    kwargs = dict(seeds=[0], imputes=("zero",), test_types=("both",), log=lambda m: None)
    plain = run_dataset("a", data, base, **kwargs)
    routed = run_dataset("a", data, base, data_for={("missing", "both"): other}, **kwargs)
    alone = run_dataset("b", other, base, **kwargs)
    by = lambda entry, setting: next(c for c in entry["cells"] if c["setting"] == setting)["test"]  # noqa: E731
    assert by(routed, "complete") == by(plain, "complete") and by(routed, "missing") == by(alone, "missing")
    assert by(routed, "missing") != by(plain, "missing") and routed["probe"] == plain["probe"]


def test_cells_are_mean_and_std_over_seeds_of_every_metric():
    def cell(setting, test_type, impute, seed, value):
        scenarios = ("full", "missing-both", "missing-image", "missing-text")
        return {"setting": setting, "test_type": test_type, "impute": impute, "seed": seed,
                "test": {s: {"auroc": value + (0.1 if s == "full" else 0.0), "accuracy": None} for s in scenarios}}

    cells = [cell(setting, t, impute, seed, 0.5 + 0.1 * seed + (0.2 if impute == "predict" else 0.0))
             for setting in ("complete", "missing") for t in ("both", "image", "text")
             for impute in ("predict", "zero", "mean") for seed in (0, 1)]
    scores = dataset_scores({"task": "binary", "cells": cells}, ["predict", "zero", "mean"],
                            ["both", "image", "text"])
    got = scores["missing"]["missing-both"]["auroc"]["predict"]
    assert got["n"] == 2 and abs(got["mean"] - 0.75) < 1e-9 and abs(got["std"] - 0.1 * 2 ** -0.5) < 1e-9
    assert abs(scores["complete"]["full"]["auroc"]["zero"]["mean"] - 0.65) < 1e-9
    assert scores["complete"]["full"]["accuracy"]["zero"] == {"mean": None, "std": None, "n": 0}
    report = {"datasets": [{"name": "hateful_memes", "title": "Hateful Memes", "root": "/d", "store": "/s",
                            "reused": False, "task": "binary", "metrics": ["auroc", "accuracy"], "classes": 2,
                            "rows": {"train": 8, "val": 2, "test": 3}, "test_labeled": 3, "scores": scores}],
              "imputes": ["predict", "zero", "mean"], "test_rate": 0.7, "train_rate": 0.7,
              "test_types": ["both", "image", "text"], "seeds": [0, 1]}
    md = format_markdown(report)
    row = next(line for line in md if line.startswith("| missing 0.7 | missing-both 0.7"))
    assert [c.strip() for c in row.strip("|").split("|")][2:5] == ["0.750 ± 0.071", "0.550 ± 0.071",
                                                                    "0.550 ± 0.071"]
    assert row.rstrip(" |").endswith("n/a")


@pytest.mark.parametrize("args,message", [
    (["--dataset", "mmimdb"], "--dataset mmimdb has no --root"),
    (["--dataset", "mmimdb", "--root", os.path.join(FIXTURES, "mmimdb"), "--dataset", "food101"],
     "--dataset food101 has no --root"),
    (["--dataset", "imdb", "--root", os.path.join(FIXTURES, "mmimdb")], "unknown dataset 'imdb'"),
    (["--root", os.path.join(FIXTURES, "mmimdb")], "has no --dataset"),
    (["--dataset", "food101", "--root", os.path.join(FIXTURES, "nowhere")], "does not exist"),
    (["--dataset", "mmimdb", "--root", os.path.join(FIXTURES, "mmimdb"), "--synthetic", "synthetic-weak"],
     "cannot be combined"),
    (["--dataset", "mmimdb", "--root", os.path.join(FIXTURES, "mmimdb"), "--fit-option", "imputee=zero"],
     "not a fit setting"),
    (["--dataset", "food101", "--root", os.path.join(FIXTURES, "food101"), "--tune-epochs", "1",
      "--text-bitfit", __file__], "--tune-epochs tunes the encoders itself"),
    (["--store", "features.zarr", "--tune-epochs", "1"], "--tune-epochs applies to --dataset"),
])
def test_bad_requests_fail_cleanly_before_any_work(tmp_path, args, message):
    result = CliRunner().invoke(cli, ["bench", "accuracy", *args, "--cache", str(tmp_path / "c"),
                                      "--out", str(tmp_path / "o")])
    assert result.exit_code in (1, 2) and message in result.output, result.output
    if "--fit-option" not in args:  # a usage error of the option parser is exit code 2
        assert result.exit_code == 1
        error_lines = [line for line in result.output.splitlines() if line.startswith("Error:")]
        assert len(error_lines) == 1 and "Traceback" not in result.output
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit)
    assert not (tmp_path / "c").exists() and not (tmp_path / "o").exists()


def test_pairing_keeps_the_order_and_refuses_duplicates():
    mm, food = os.path.join(FIXTURES, "mmimdb"), os.path.join(FIXTURES, "food101")
    assert pair_sources(["mmimdb", "food101"], [mm, food]) == [("mmimdb", mm), ("food101", food)]
    with pytest.raises(PaperError, match="given twice"):
        pair_sources(["mmimdb", "mmimdb"], [mm, mm])
