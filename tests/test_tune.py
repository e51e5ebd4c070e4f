import collections
import json
import os
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from safetensors import safe_open

from embcache import datasets as ds
from embcache import encoders as enc
from embcache import tune as tune_module
from embcache.cli.tune import tune_command
from embcache.config import FitConfig
from embcache.missing import apply_missing, scenario_of
from embcache.tune import TuneConfig, TuneError, enable_checkpointing, is_bias, set_training, state_path, tune
from tiny_encoders import register_tiny_open_clip, tiny_bert_dir, tiny_timm_checkpoint

FIXTURES = os.path.join(os.path.dirname(__file__), "..", "data", "fixtures")
MANIFEST = os.path.join(FIXTURES, "manifest", "manifest.jsonl")
FOOD101 = os.path.join(FIXTURES, "food101")
CPU = torch.device("cpu")
QUIET = {"progress": False, "log": lambda *_: None}


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    return tiny_bert_dir(str(tmp_path_factory.mktemp("bert")))


@pytest.fixture(scope="module")
def timm_ckpt(tmp_path_factory):
    return tiny_timm_checkpoint(str(tmp_path_factory.mktemp("timm") / "w.pth"))


def text_config(bert_dir, out, **kw) -> TuneConfig:
    return TuneConfig(dataset="manifest", root=kw.pop("root", MANIFEST), modality="text", out=str(out),
                      text_encoder=f"hf:{bert_dir}", workers=0, **{"epochs": 2, "lr": 1e-2, "batch_size": 2, **kw})


def image_config(timm_ckpt, out, **kw) -> TuneConfig:
    return TuneConfig(dataset="food101", root=FOOD101, modality="image", out=str(out),
                      image_encoder="timm:test_efficientnet", image_checkpoint=timm_ckpt, workers=0,
                      **{"epochs": 2, "lr": 1e-2, "batch_size": 4, **kw})


def tensors(path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as fh:
        return {k: fh.get_tensor(k) for k in fh.keys()}


def metadata(path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as fh:
        return fh.metadata()


# ---------------------------------------------------------------- BitFit solves what the frozen encoder cannot


def contrast_manifest(folder, n_train=48, n_val=16, size=168, seed=0) -> str:
    """Random +-1 pixel patterns around grey 128, each drawn at low and at high contrast; the label is the
    contrast. Every pattern appears in both classes, so only the contrast tells them apart."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n_train + n_val):
        signs = rng.choice([-1, 1], size=(size, size, 3))
        for level, gain in (("low", 40), ("high", 80)):
            name = f"p{i}_{level}.png"
            Image.fromarray((128 + gain * signs).astype(np.uint8)).save(os.path.join(folder, name))
            rows.append({"id": name[:-4], "image": name, "label": level,
                         "split": "train" if i < n_train else "val"})
    path = os.path.join(folder, "manifest.jsonl")
    with open(path, "w") as fh:
        fh.writelines(json.dumps(row) + "\n" for row in rows)
    return path


def contrast_blind_convnext(path) -> str:
    """A random ConvNeXt whose stem bias cancels grey 128: the stem conv then sees gain * pattern, and the
    LayerNorm right after it removes the gain, so the frozen features are the same at both contrasts. Tuning
    the stem bias (a bias before that LayerNorm) is what breaks the invariance."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model("test_convnext", pretrained=False)
    cfg, stem = model.pretrained_cfg, model.stem[0]
    grey = torch.tensor([(128 / 255 - m) / s for m, s in zip(cfg["mean"], cfg["std"])])
    with torch.no_grad():
        stem.bias.copy_(-(stem.weight.sum((2, 3)) * grey).sum(1))
    torch.save(model.state_dict(), path)
    return path


def test_bias_tuning_solves_a_task_the_frozen_encoder_cannot(tmp_path):
    root = contrast_manifest(str(tmp_path))
    config = dict(dataset="manifest", root=root, modality="image", image_encoder="timm:test_convnext",
                  image_checkpoint=contrast_blind_convnext(str(tmp_path / "convnext.pth")), epochs=4,
                  batch_size=16, lr=1e-2, workers=0, seed=0)
    probe = tune(TuneConfig(out=str(tmp_path / "probe.safetensors"), tune_biases=False, **config), **QUIET)
    tuned = tune(TuneConfig(out=str(tmp_path / "tuned.safetensors"), **config), **QUIET)
    assert probe.metric == tuned.metric == "auroc"
    # Same features for both members of every pair: any head scores 0.5 up to float noise.
    assert probe.trainable == 0 and abs(probe.best_val - 0.5) < 0.05
    assert tuned.best_val > 0.8


# ---------------------------------------------------------------- what changes, and the file


def non_bias_state(module) -> dict[str, torch.Tensor]:
    """Every tensor of the module but the biases: weights and buffers (BatchNorm statistics included)."""
    return {k: v for k, v in module.state_dict().items() if not is_bias(k)}


@pytest.mark.parametrize("modality", ["image", "text"])
def test_only_biases_change_and_the_file_reproduces_the_tuned_encoder(modality, bert_dir, timm_ckpt, tmp_path):
    out = tmp_path / "bitfit.safetensors"
    if modality == "image":
        cfg = image_config(timm_ckpt, out)
        load = lambda **kw: enc.load_image_encoder("timm:test_efficientnet", timm_ckpt, **kw)  # noqa: E731
    else:
        cfg = text_config(bert_dir, out)
        load = lambda **kw: enc.load_text_encoder(f"hf:{bert_dir}", **kw)  # noqa: E731
    base = load()
    if modality == "image":
        inputs = torch.stack([base.preprocess(Image.new("RGB", (40, 30), c)) for c in ("red", "navy")])
    else:
        inputs = base.preprocess(["a cat on a mat", "two dogs"])
    lines = []
    report = tune(cfg, progress=False, log=lines.append)
    tuned = report.encoder

    biases = {n: p for n, p in base.module.named_parameters() if is_bias(n)}
    assert report.trainable == sum(p.numel() for p in biases.values()) > 0
    assert report.total == sum(p.numel() for p in base.module.parameters())
    assert f"trainable: {report.trainable:,} of {report.total:,}" in lines[0]
    before, after = non_bias_state(base.module), non_bias_state(tuned.module)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert any(not torch.equal(p, dict(tuned.module.named_parameters())[n]) for n, p in biases.items())

    saved = tensors(out)
    assert set(saved) == {f"delta.{n}" for n in biases} | {"head.weight", "head.bias"}
    applied = load(bitfit=str(out))
    torch.testing.assert_close(applied.encode(inputs, CPU), tuned.encode(inputs, CPU))
    assert not torch.allclose(base.encode(inputs, CPU), tuned.encode(inputs, CPU))
    assert applied.attrs["bitfit_sha256"] == enc.sha256_file(str(out))


def test_the_file_records_where_it_comes_from(bert_dir, tmp_path):
    report = tune(text_config(bert_dir, tmp_path / "t.safetensors"), **QUIET)
    meta = metadata(report.out)
    assert meta["base_checkpoint_sha256"] == report.encoder.attrs["checkpoint_sha256"]
    assert (meta["modality"], meta["encoder"], meta["pooling"], meta["task"]) == ("text", f"hf:{bert_dir}", "mean",
                                                                                  "multiclass")
    assert json.loads(meta["classes"]) == ["bird", "cat", "dog"]
    assert int(meta["best_epoch"]) == report.best_epoch and meta["metric"] == "accuracy"
    assert json.loads(meta["val_metric"]) == pytest.approx(report.best_val)
    assert tensors(report.out)["head.weight"].shape == (3, 32)


def test_a_delta_on_another_checkpoint_is_refused(timm_ckpt, tmp_path):
    # Protocol off, so that both broken images are among the rows tuned on.
    report = tune(image_config(timm_ckpt, tmp_path / "d.safetensors", epochs=1, train_missing_rate=0.0,
                               test_missing_rate=0.0), **QUIET)
    assert report.unreadable == 2  # pizza_1 (random bytes), sushi_2 (empty): skipped, not fatal
    other = torch.load(timm_ckpt, weights_only=True)
    other["conv_stem.weight"] = other["conv_stem.weight"] * 2
    torch.save(other, tmp_path / "other.pth")
    with pytest.raises(enc.EncoderError, match="tuned on checkpoint"):
        enc.load_image_encoder("timm:test_efficientnet", str(tmp_path / "other.pth"), bitfit=report.out)


# ---------------------------------------------------------------- the missing-modality protocol

DEMO = os.path.join(os.path.dirname(__file__), "..", "data", "demo", "manifest.jsonl")


def kept_ids(root, split, modality, rate, kind, seed) -> list[str]:
    """The labeled rows of `split` that keep `modality` under apply_missing, computed here from the reader."""
    rows = [s for s in ds.open_dataset("manifest", root).samples if s.split == split]
    present = {m: np.array([getattr(s, m) is not None for s in rows]) for m in ("image", "text")}
    has = apply_missing([s.id for s in rows], present, rate, kind, seed)[modality]
    return sorted(s.id for s, keep in zip(rows, has) if keep and s.label >= 0)


def record_samples(monkeypatch) -> list[list[str]]:
    """Per SampleSource tune builds (one per training epoch, one per validation pass): the ids it loads."""
    seen = []

    class Recording(tune_module.SampleSource):
        def __init__(self, samples, *args, **kwargs):
            super().__init__(samples, *args, **kwargs)
            self.ids = []
            seen.append(self.ids)

        def __getitem__(self, index):
            self.ids.append(self.samples[index].id)
            return super().__getitem__(index)

    monkeypatch.setattr(tune_module, "SampleSource", Recording)
    return seen


def test_defaults_are_fits():
    fit_defaults = FitConfig()
    tune_defaults = TuneConfig(dataset="manifest", root=DEMO, modality="text", out="x")
    for name in tune_module.PROTOCOL_FIELDS:
        assert getattr(tune_defaults, name) == getattr(fit_defaults, name)
    assert (tune_defaults.train_missing_rate, tune_defaults.train_missing_type) == (0.7, "both")


@pytest.mark.parametrize("rate,kind,seed,val_rate,val_kind", [
    (0.7, "both", 0, 0.7, "both"),      # the defaults: fit's protocol and selection scenario
    (0.4, "text", 3, 0.5, "text"),
    (0.0, "both", 0, 0.0, "both"),      # protocol off: every row with a text
])
def test_tune_sees_exactly_the_rows_the_protocol_keeps(bert_dir, tmp_path, monkeypatch, rate, kind, seed,
                                                       val_rate, val_kind):
    seen = record_samples(monkeypatch)
    cfg = text_config(bert_dir, tmp_path / "p.safetensors", root=DEMO, epochs=1, batch_size=64,
                      train_missing_rate=rate, train_missing_type=kind, missing_seed=seed,
                      test_missing_rate=val_rate, test_missing_type=val_kind)
    report = tune(cfg, **QUIET)
    train, val = seen  # one training epoch, one validation pass
    expected_train = kept_ids(DEMO, "train", "text", rate, kind, seed)
    expected_val = kept_ids(DEMO, "val", "text", val_rate, val_kind, seed)
    assert sorted(train) == expected_train and sorted(val) == expected_val  # each row once, no other row
    assert report.rows == {"train": len(expected_train), "val": len(expected_val)}
    if rate:  # the demo's rows all have a text: the protocol took it from some labeled rows
        labeled = collections.Counter(s.split for s in ds.open_dataset("manifest", DEMO).samples if s.label >= 0)
        assert len(expected_train) < labeled["train"] and len(expected_val) < labeled["val"]
    meta = metadata(report.out)
    assert json.loads(meta["missing_protocol"]) == {
        "train_missing_rate": rate, "train_missing_type": kind, "test_missing_rate": val_rate,
        "test_missing_type": val_kind, "missing_seed": seed, "val_scenario": scenario_of(val_kind, val_rate)}
    assert json.loads(meta["rows"]) == report.rows


def test_the_protocol_never_takes_a_rows_only_modality(bert_dir, tmp_path, monkeypatch):
    """Fixture row m06 has a text and no image: the text stays even at rate 1 (apply_missing's rule)."""
    seen = record_samples(monkeypatch)
    report = tune(text_config(bert_dir, tmp_path / "o.safetensors", epochs=1, train_missing_rate=1.0,
                              train_missing_type="text"), **QUIET)
    only_text = [s.id for s in ds.open_dataset("manifest", MANIFEST).samples
                 if s.split == "train" and s.image is None and s.text is not None]
    assert only_text and sorted(seen[0]) == sorted(only_text) and report.rows["train"] == len(only_text)
    with pytest.raises(TuneError, match="no labeled training row has the text after the missing protocol.*lower"):
        tune(text_config(bert_dir, tmp_path / "d.safetensors", root=DEMO, train_missing_rate=1.0,
                         train_missing_type="text"), **QUIET)  # every demo row has both: all lose the text
    with pytest.raises(TuneError, match="train_missing_type"):
        tune(text_config(bert_dir, tmp_path / "x.safetensors", train_missing_type="audio"), **QUIET)


def test_a_state_made_under_another_protocol_is_not_resumed(bert_dir, tmp_path):
    out = tmp_path / "r.safetensors"
    tune(text_config(bert_dir, out, epochs=1), **QUIET)
    lines = []
    again = tune(text_config(bert_dir, out, epochs=1, missing_seed=1), progress=False, log=lines.append)
    assert again.start_epoch == 0 and any("other arguments" in line and "missing_protocol" in line for line in lines)


# ---------------------------------------------------------------- resume


def test_resume_continues_from_the_saved_epoch_and_matches_a_straight_run(bert_dir, tmp_path):
    straight = tune(text_config(bert_dir, tmp_path / "straight.safetensors", epochs=2), **QUIET)
    first = tune(text_config(bert_dir, tmp_path / "resumed.safetensors", epochs=1), **QUIET)
    assert first.start_epoch == 0 and os.path.exists(state_path(first.out))
    resumed = tune(text_config(bert_dir, tmp_path / "resumed.safetensors", epochs=2), **QUIET)
    assert resumed.start_epoch == 1 and [h["epoch"] for h in resumed.history] == [1, 2]
    assert resumed.history == straight.history
    a, b = tensors(straight.out), tensors(resumed.out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_finished_tuning_run_again_rewrites_the_same_bytes(bert_dir, tmp_path):
    """Its sha256 is in the fingerprint of every store extracted with it: a rerun that resumes a finished state
    must not change it (safetensors alone writes the metadata in a different order each time)."""
    cfg = text_config(bert_dir, tmp_path / "t.safetensors", epochs=1)
    first = open(tune(cfg, **QUIET).out, "rb").read()
    for _ in range(3):
        again = tune(cfg, **QUIET)
        assert again.start_epoch == 1 and open(again.out, "rb").read() == first


def test_a_state_made_with_other_arguments_is_not_resumed(bert_dir, tmp_path):
    out = tmp_path / "r.safetensors"
    tune(text_config(bert_dir, out, epochs=1), **QUIET)
    lines = []
    again = tune(text_config(bert_dir, out, epochs=1, lr=2e-2), progress=False, log=lines.append)
    assert again.start_epoch == 0 and any("other arguments" in line and "lr" in line for line in lines)
    with pytest.raises(TuneError, match="other arguments"):
        tune(text_config(bert_dir, out, epochs=1, lr=3e-2, resume=True), **QUIET)
    fresh = tune(text_config(bert_dir, out, epochs=2, lr=2e-2, resume=False), **QUIET)
    assert fresh.start_epoch == 0


def test_a_state_made_on_other_rows_under_the_same_root_is_not_resumed(bert_dir, tmp_path):
    """A dataset rewritten in place (e.g. regenerated demo data) starts over instead of resuming the old state."""
    root = tmp_path / "data"
    shutil.copytree(os.path.dirname(MANIFEST), root)
    manifest, out = root / os.path.basename(MANIFEST), tmp_path / "r.safetensors"
    tune(text_config(bert_dir, out, epochs=1, root=str(manifest)), **QUIET)
    before = manifest.read_bytes()  # (the fixture holds invalid UTF-8 on purpose: edit its bytes)
    manifest.write_bytes(before.replace(b'"text": "a ', b'"text": "the '))  # every "a ..." text
    assert manifest.read_bytes() != before
    lines = []
    again = tune(text_config(bert_dir, out, epochs=1, root=str(manifest)), progress=False, log=lines.append)
    assert again.start_epoch == 0 and any("other arguments" in line and "rows_sha256" in line for line in lines)


# ---------------------------------------------------------------- GPU switches, checked on the CPU


@pytest.mark.parametrize("backend", ["timm", "open_clip", "hf"])
def test_gradient_checkpointing_keeps_the_bias_gradients(backend, bert_dir, timm_ckpt, tmp_path):
    if backend == "timm":
        encoder = enc.load_image_encoder("timm:test_efficientnet", timm_ckpt)
        inputs = torch.randn(2, 3, 64, 64)
    elif backend == "open_clip":
        encoder = enc.load_image_encoder(f"open_clip:{register_tiny_open_clip(str(tmp_path))}")
        inputs = torch.randn(2, 3, 32, 32)
    else:
        encoder = enc.load_text_encoder(f"hf:{bert_dir}")
        inputs = encoder.preprocess(["checkpointed", "or not"])
    biases = [p.requires_grad_(True) for n, p in encoder.module.named_parameters() if is_bias(n)]

    def gradients():
        torch.manual_seed(0)
        set_training(encoder.module)
        encoder.forward(encoder.module, inputs).square().sum().backward()
        grads = [p.grad.clone() if p.grad is not None else None for p in biases]
        for p in biases:
            p.grad = None
        return grads

    plain = gradients()
    enable_checkpointing(encoder.module)
    for a, b in zip(plain, gradients()):
        assert (a is None and b is None) or torch.allclose(a, b, atol=1e-6)


# ---------------------------------------------------------------- command line


def test_command(bert_dir, tmp_path):
    out = str(tmp_path / "cli.safetensors")
    args = ["--dataset", "manifest", "--root", MANIFEST, "--modality", "text", "--text-encoder", f"hf:{bert_dir}",
            "--epochs", "1", "--batch-size", "2", "--workers", "0", "--out", out, "--quiet"]
    result = CliRunner().invoke(tune_command, args)
    assert result.exit_code == 0, result.output
    assert "trainable:" in result.output and "best epoch 1, val accuracy" in result.output
    assert metadata(out)["modality"] == "text"
    help_text = CliRunner().invoke(tune_command, ["--help"]).output
    options = [line.split()[0] for line in help_text.splitlines() if line.strip().startswith("--")]
    assert "--text-encoder" in options and not [o for o in options if "bitfit" in o]  # tune starts from the base
    result = CliRunner().invoke(tune_command, args + ["--text-bitfit", out])
    assert result.exit_code == 2 and "No such option '--text-bitfit'" in result.output
    for flag in ("--epochs", "--batch-size"):
        result = CliRunner().invoke(tune_command, args + [flag, "0"])
        assert result.exit_code == 2 and f"Invalid value for '{flag}'" in result.output, result.output
    result = CliRunner().invoke(tune_command, args + ["--option", "nonsense=1"])
    assert result.exit_code == 1 and "Error: " in result.output and "'nonsense'" in result.output
    result = CliRunner().invoke(tune_command, args + ["--train-missing-rate", "0.3", "--train-missing-type", "text",
                                                      "--test-missing-rate", "0", "--missing-seed", "5"])
    assert result.exit_code == 0, result.output
    assert json.loads(metadata(out)["missing_protocol"]) == {
        "train_missing_rate": 0.3, "train_missing_type": "text", "test_missing_rate": 0.0,
        "test_missing_type": "both", "missing_seed": 5, "val_scenario": "full"}
    result = CliRunner().invoke(tune_command, args + ["--train-missing-rate", "1.5"])
    assert result.exit_code == 2 and "Invalid value for '--train-missing-rate'" in result.output
