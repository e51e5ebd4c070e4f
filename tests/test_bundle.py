"""The whole workflow on the demo data: tune (BitFit) -> extract with the deltas -> fit -> export -> predict.

Predictions on raw inputs must equal what eval computes from the cache for the same rows."""
import json
import os
import shutil
import zipfile

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import embcache
from embcache.bundle import BundleError
from embcache.cli.main import main as cli
from embcache.config import FitConfig
from embcache.encoders import sha256_file
from embcache.evaluate import predict_logits
from embcache.extract import ExtractConfig, extract
from embcache.runs import load_run
from embcache.store import open_store
from embcache.train import fit
from embcache.tune import TuneConfig, tune
from tiny_encoders import tiny_extract_options, tiny_timm_checkpoint

DEMO = os.path.join(os.path.dirname(__file__), "..", "data", "demo", "manifest.jsonl")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bundle")
    tiny = tiny_extract_options(tmp)
    tune(TuneConfig(dataset="manifest", root=DEMO, modality="text", out=str(tmp / "text-bitfit.safetensors"),
                    text_encoder=tiny["text_encoder"], epochs=1, workers=0), progress=False, log=lambda *_: None)
    extract(ExtractConfig(dataset="manifest", root=DEMO, out=str(tmp / "s.zarr"), workers=0, limit=80,
                          text_bitfit=str(tmp / "text-bitfit.safetensors"), **tiny),
            progress=False, log=lambda *_: None)
    assert open_store(str(tmp / "s.zarr")).encoder("text")["bitfit_sha256"] == sha256_file(
        str(tmp / "text-bitfit.safetensors"))
    # complete training, so that every labeled row is a pair and the default --pair-head auto is on: the bundle
    # must carry it too
    fit(FitConfig(store=str(tmp / "s.zarr"), epochs=3, train_missing_rate=0.0), str(tmp / "run"), progress=False)
    result = CliRunner().invoke(cli, ["export", str(tmp / "run"), "--out", str(tmp / "m.embcache")])
    assert result.exit_code == 0, result.output
    return tmp, tiny


def cache_scores(tmp, present=None):
    _, _, model = load_run(tmp / "run")
    features = open_store(str(tmp / "s.zarr")).load()
    x = {m: torch.tensor(features.emb[m]) for m in features.emb}
    has = {m: torch.tensor(features.present[m] if present is None else present[m]) for m in features.present}
    return torch.softmax(predict_logits(model, x, has), dim=1).numpy(), features


def test_predict_on_raw_inputs_matches_eval_from_the_cache(trained):
    tmp, _ = trained
    manifest = tmp / "new.jsonl"  # the first 80 demo rows, without labels or splits
    rows = [json.loads(line) for line in open(DEMO)][:80]
    base = os.path.dirname(DEMO)
    with open(manifest, "w") as fh:
        for r in rows:
            fh.write(json.dumps({"id": r["id"], "image": os.path.join(base, r["image"]), "text": r["text"]}) + "\n")
    result = CliRunner().invoke(cli, ["predict", str(tmp / "m.embcache"), "--manifest", str(manifest),
                                      "--out", str(tmp / "preds.jsonl"), "--quiet"])
    assert result.exit_code == 0, result.output
    preds = [json.loads(line) for line in open(tmp / "preds.jsonl")]
    expected, features = cache_scores(tmp)
    assert bool(load_run(tmp / "run")[2].pair_on)
    got = np.array([[p["scores"][c] for c in features.classes] for p in preds])
    assert [p["id"] for p in preds] == list(features.ids)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert [p["labels"] for p in preds] == [[features.classes[i]] for i in expected.argmax(1)]
    with zipfile.ZipFile(tmp / "m.embcache") as archive:  # the deltas travel inside the bundle
        assert "bitfit-text.safetensors" in archive.namelist() and "bitfit-image.safetensors" not in archive.namelist()


def test_python_api_fills_an_absent_modality_like_eval(trained):
    tmp, _ = trained
    model = embcache.load(str(tmp / "m.embcache"))
    row = json.loads(open(DEMO).readline())
    image = os.path.join(os.path.dirname(DEMO), row["image"])
    only_image = model.predict(image=image, text=None)
    assert only_image.present == {"image": True, "text": False}
    features = open_store(str(tmp / "s.zarr")).load()
    present = {"image": features.present["image"].copy(), "text": np.zeros_like(features.present["text"])}
    expected, _ = cache_scores(tmp, present)
    np.testing.assert_allclose([only_image.scores[c] for c in model.classes], expected[0], atol=1e-5)
    both = model.predict(image=image, text=row["text"])
    assert both.scores != only_image.scores and abs(sum(both.scores.values()) - 1) < 1e-5


def test_bundle_refuses_other_encoder_weights(trained, tmp_path):
    tmp, tiny = trained
    torch.manual_seed(1)
    other = tiny_timm_checkpoint(str(tmp_path / "other.pth"))
    torch.save({k: v + 1 for k, v in torch.load(other).items()}, other)
    with pytest.raises(BundleError, match="not those the model was trained on.*--image-checkpoint"):
        embcache.load(str(tmp / "m.embcache"), image_checkpoint=other)
    with pytest.raises(BundleError, match="not an embcache bundle"):
        embcache.load(str(tmp / "run" / "config.json"))


def test_export_takes_the_encoders_the_run_was_trained_on(trained, tmp_path):
    """Not those of whatever the store at the run's path holds now (re-extracted with another pooling)."""
    tmp, tiny = trained
    store, run = tmp_path / "s.zarr", tmp_path / "run"
    shutil.copytree(tmp / "s.zarr", store)
    shutil.copytree(tmp / "run", run)
    config = json.loads((run / "config.json").read_text())
    recorded = config["resolved"]["encoders"]
    assert recorded == {m: open_store(str(store)).encoder(m) for m in ("image", "text")}

    def export(config, out):
        config = {**config, "store": str(store)}
        (run / "config.json").write_text(json.dumps(config))
        return CliRunner().invoke(cli, ["export", str(run), "--out", str(out)])

    def bundled(path):
        with zipfile.ZipFile(path) as archive:
            return json.loads(archive.read("bundle.json"))["encoders"]

    old_run = {**config, "resolved": {k: v for k, v in config["resolved"].items() if k != "encoders"}}
    result = export(old_run, tmp_path / "new" / "old.embcache")  # a run from before fit recorded its encoders
    assert result.exit_code == 0, result.output
    assert bundled(tmp_path / "new" / "old.embcache") == recorded  # from the store, still the run's

    extract(ExtractConfig(dataset="manifest", root=DEMO, out=str(store), workers=0, limit=80, text_pooling="cls",
                          overwrite=True, **tiny), progress=False, log=lambda *_: None)
    assert open_store(str(store)).encoder("text")["pooling"] == "cls"
    result = export(config, tmp_path / "new" / "m.embcache")
    assert result.exit_code == 0, result.output
    assert bundled(tmp_path / "new" / "m.embcache") == recorded and recorded["text"]["pooling"] == "mean"

    result = export(old_run, tmp_path / "new" / "refused.embcache")
    assert result.exit_code == 1 and "no longer holds the features" in result.output, result.output
    assert "text.pooling: 'mean' -> 'cls'" in result.output and "Traceback" not in result.output
    assert sorted(os.listdir(tmp_path / "new")) == ["m.embcache", "old.embcache"]  # no temp file left

    shutil.rmtree(store)  # the run alone is enough (a store gone, or a partial one with --allow-partial)
    assert export(config, tmp_path / "new" / "again.embcache").exit_code == 0


def test_a_bundle_trained_on_images_decoded_under_other_rules_warns(trained, tmp_path):
    import warnings

    tmp, _ = trained
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # this embcache's own bundle: no warning
        embcache.load(str(tmp / "m.embcache"))
    old = tmp_path / "old.embcache"
    with zipfile.ZipFile(tmp / "m.embcache") as src, zipfile.ZipFile(old, "w") as dst:
        for name in src.namelist():
            data = src.read(name)
            if name == "bundle.json":
                manifest = json.loads(data)
                del manifest["encoders"]["image"]["preprocess"]["decode"]  # a store made before the rules
                data = json.dumps(manifest).encode()
            dst.writestr(name, data)
    with pytest.warns(UserWarning, match="decoded before embcache versioned its decoding rules.*rgb-on-white/1"):
        model = embcache.load(str(old))
    assert model.predict(text="still predicts").present == {"image": False, "text": True}
