"""The fusion trainer's parts: indicators, training substitution, staged predictors (cross-fitting, shrinkage),
model selection, the mean fallback, calibration, and configs saved before these settings existed."""
from dataclasses import asdict, replace

import numpy as np
import pytest
import torch

from embcache import train as train_module
from embcache.bench import synthetic
from embcache.bench.accuracy import keep_labels, linear_probe, run_cell
from embcache.config import LEGACY_SETTINGS, FitConfig
from embcache.data import dataset_from_features
from embcache.evaluate import predict_logits
from embcache.metrics import r2_score
from embcache.missing import MODALITIES
from embcache.models import PATTERNS, FusionModel
from embcache.train import prepare, shrink_factor, substitution, train

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SMALL = dict(predictor_hidden=64, classifier_hidden=64, epochs=8, predictor_epochs=30)


@pytest.fixture(scope="module")
def predictable():
    """Modalities that share most of their latent: cross-modal R2 well above 0.3."""
    features = synthetic.make_features(n_train=600, n_val=200, n_test=300, d_image=24, d_text=16, n_classes=4,
                                       task_type="multiclass", shared_dim=8, private_dim=2, noise=0.3, seed=3)
    return dataset_from_features(features, "synthetic:predictable")


@pytest.fixture(scope="module")
def unrelated():
    """Modalities that share nothing: no predictor beats the mean."""
    features = synthetic.make_features(n_train=400, n_val=150, n_test=200, d_image=24, d_text=16, n_classes=4,
                                       task_type="multiclass", shared_dim=0, private_dim=8, noise=0.3, seed=4)
    return dataset_from_features(features, "synthetic:unrelated")


def test_indicators_widen_the_classifier_and_reach_it():
    dims = {"image": 6, "text": 4}
    # without the linear head, whose zero start would hide the bits until it is fitted
    model = FusionModel(dims, 3, FitConfig(impute="mean", input_dropout=0.0, classifier_dropout=0.0,
                                           linear_head=False)).eval()
    assert model.classifier[0].in_features == 6 + 4 + 2
    x = {m: torch.zeros(2, d) for m, d in dims.items()}  # the real embedding equals the mean: only the bits differ
    both = {m: torch.tensor([True, True]) for m in dims}
    without_text = {"image": torch.tensor([True, True]), "text": torch.tensor([True, False])}
    out_both, out_missing = model(x, both).logits, model(x, without_text).logits
    assert torch.equal(out_both[0], out_missing[0]) and not torch.equal(out_both[1], out_missing[1])
    legacy = FusionModel(dims, 3, FitConfig.from_dict({"impute": "mean"}))
    assert not hasattr(legacy, "temperature")  # an old run's model.safetensors has none: it loads as it was saved
    assert isinstance(legacy.classifier[0], torch.nn.Linear)  # no input dropout in front
    assert legacy.classifier[0].in_features == 10  # no indicators


def test_substitution_hides_one_modality_of_paired_rows_only():
    generator = torch.Generator().manual_seed(0)
    hide = substitution(10_000, 6_000, 0.3, torch.device("cpu"), generator)
    assert not (hide["image"] & hide["text"]).any()  # never both
    assert not hide["image"][6_000:].any() and not hide["text"][6_000:].any()  # unpaired rows keep theirs
    rate = (hide["image"] | hide["text"])[:6_000].float().mean().item()
    assert abs(rate - 0.3) < 0.03 and abs(hide["image"][:6_000].float().mean().item() - 0.15) < 0.02
    assert substitution(10, 5, 0.0, torch.device("cpu")) is None


def test_shrink_factor_is_the_clipped_least_squares_scale():
    rng = np.random.default_rng(0)
    target = torch.as_tensor(rng.standard_normal((500, 8)))
    pred = 2.0 * target + 0.1 * torch.as_tensor(rng.standard_normal((500, 8)))
    expected = float((pred * target).sum() / (pred * pred).sum())
    assert shrink_factor(pred, target) == pytest.approx(expected, rel=1e-5) and 0.45 < expected < 0.5
    assert shrink_factor(-pred, target) == 0.0  # anti-correlated: the mean
    assert shrink_factor(0.5 * target, target) == 1.0  # never inflated


def test_a_useless_predictor_gives_exactly_mean_imputation(unrelated):
    """Shrunk to nothing (val R2 <= 0 gives factor 0), the prediction is the train mean, and the classifier trains
    on the same initial weights and random draws as with --impute mean: the same model, bit for bit."""
    device = torch.device("cpu")
    cfg = FitConfig(train_missing_rate=0.7, **SMALL)
    predict = run_cell(unrelated, cfg, device)
    mean = run_cell(unrelated, FitConfig(**{**asdict(cfg), "impute": "mean"}), device)
    prep = prepare(unrelated, cfg, device)
    result = train(unrelated, prep, cfg, progress=False)
    assert result.predictors["shrink"] == {"image_to_text": 0.0, "text_to_image": 0.0}
    assert predict["test"] == mean["test"]


def test_mean_fallback_per_presence_pattern(predictable):
    """mean_fallback "every": rows of a pattern that falls back get exactly the answer of the mean-fill model trained
    first (same seed, same batches), whatever the impute mode; the other rows get the run's own classifier,
    selected as without the fallback. A pattern falls back when mean fill scores at least as well on val pairs shown
    that way."""
    device = torch.device("cpu")
    cfg = FitConfig(train_missing_rate=0.7, mean_fallback="every", calibrate=False, **SMALL)  # raw logits
    runs = {name: train(predictable, prepare(predictable, c, device), c, progress=False)
            for name, c in [("predict", cfg), ("mean", replace(cfg, impute="mean")),
                            ("zero", replace(cfg, impute="zero")), ("plain", replace(cfg, mean_fallback="off"))]}
    test = predictable.splits["test"]
    x = {m: torch.as_tensor(test.emb[m]) for m in MODALITIES}
    yes, no = torch.ones(len(test), dtype=torch.bool), torch.zeros(len(test), dtype=torch.bool)
    shown = {"both": {"image": yes, "text": yes}, "image": {"image": yes, "text": no}, "text": {"image": no, "text": yes}}
    mean = {p: predict_logits(runs["mean"].model, x, has) for p, has in shown.items()}
    for name in ("predict", "zero"):
        model, report = runs[name].model, runs[name].mean_fallback
        assert report["best_epoch"] == runs["mean"].best_epoch
        for p in PATTERNS:
            assert report["falls_back"][p] == (report["val"][p]["mean"] >= report["val"][p]["own"])
        saved = dict(zip(PATTERNS, model.state_dict()["fallback_on"].tolist()))  # saved with the run
        assert model.falls_back == report["falls_back"] == saved
        for p, has in shown.items():
            model.falls_back = dict.fromkeys(PATTERNS, True)
            assert torch.equal(predict_logits(model, x, has), mean[p])
            model.falls_back = {}
            assert not torch.allclose(predict_logits(model, x, has), mean[p])
        # one pattern at a time: a batch mixing patterns is routed row by row
        mixed = {"image": torch.arange(len(test)) % 3 != 1, "text": torch.arange(len(test)) % 3 != 0}
        own = predict_logits(model, x, mixed)
        model.falls_back = {"text": True}
        routed, text_only = predict_logits(model, x, mixed), ~mixed["image"]
        assert torch.equal(routed[text_only], predict_logits(runs["mean"].model, x, mixed)[text_only])
        assert torch.equal(routed[~text_only], own[~text_only])
    runs["predict"].model.falls_back = {}  # the own classifier is the one a run without the fallback selects
    for has in shown.values():
        assert torch.equal(predict_logits(runs["predict"].model, x, has), predict_logits(runs["plain"].model, x, has))
    # the default, "complete": only rows with both modalities may fall back
    default = train(predictable, prepare(predictable, replace(cfg, mean_fallback="complete"), device),
                    replace(cfg, mean_fallback="complete"), progress=False)
    assert list(default.mean_fallback["falls_back"]) == ["both"]
    assert not default.model.falls_back["image"] and not default.model.falls_back["text"]




def test_a_remembered_mean_fill_model_is_the_one_a_run_would_train(predictable, monkeypatch):
    """train's mean_models: a mean-fill run (with the pair head and calibration) leaves its raw model in the memo,
    and predict / zero runs with the same settings take it instead of training it: the same runs, bit for bit,
    with one classifier trained per run instead of two."""
    device = torch.device("cpu")
    cfg = FitConfig(train_missing_rate=0.0, pair_head="on", **SMALL)
    alone = {mode: run_cell(predictable, replace(cfg, impute=mode), device) for mode in ("predict", "zero")}
    nested = []  # the mean-fill fits a run makes inside itself (train calls itself through the module's name)
    real_train = train_module.train
    monkeypatch.setattr(train_module, "train", lambda *a, **k: nested.append(a[2].impute) or real_train(*a, **k))
    memo: dict = {}
    torch.manual_seed(7)
    run_cell(predictable, replace(cfg, impute="mean"), device)
    after_plain = torch.get_rng_state()
    torch.manual_seed(7)
    run_cell(predictable, replace(cfg, impute="mean"), device, memo)
    assert len(memo) == 1 and torch.equal(torch.get_rng_state(), after_plain)  # remembering draws nothing
    for mode in ("predict", "zero"):
        shared = run_cell(predictable, replace(cfg, impute=mode), device, memo)
        assert {k: v for k, v in shared.items() if k != "seconds"} == {k: v for k, v in alone[mode].items()
                                                                       if k != "seconds"}
    assert nested == []
    run_cell(predictable, replace(cfg, impute="zero", seed=1), device, memo)  # another seed: trained, remembered
    assert nested == ["mean"] and len(memo) == 2
def test_calibration_divides_each_patterns_logits_by_its_val_temperature(predictable):
    """--calibrate trains the same model and then divides each presence pattern's logits by the temperature with
    the least val loss on the val pairs shown that way: no argmax changes, rows with neither modality keep theirs."""
    device = torch.device("cpu")
    cfg = FitConfig(train_missing_rate=0.7, **SMALL)
    plain, run = (train(predictable, prepare(predictable, c, device), c, progress=False)
                  for c in (replace(cfg, calibrate=False), cfg))
    assert plain.calibration is None and not hasattr(plain.model, "temperature")
    temperature = dict(zip(PATTERNS, run.model.temperature.tolist()))
    assert temperature != dict.fromkeys(PATTERNS, 1.0)
    val = predictable.splits["val"]
    vx = {m: torch.as_tensor(val.emb[m]) for m in MODALITIES}
    vy = torch.as_tensor(val.labels)
    tx = {m: torch.as_tensor(predictable.splits["test"].emb[m]) for m in MODALITIES}
    for split, x in (("val", vx), ("test", tx)):
        n = len(x["image"])
        yes, no = torch.ones(n, dtype=torch.bool), torch.zeros(n, dtype=torch.bool)
        shown = {"image": {"image": yes, "text": no}, "text": {"image": no, "text": yes},
                 "both": {"image": yes, "text": yes}, None: {"image": no, "text": no}}
        for pattern, has in shown.items():
            raw, calibrated = predict_logits(plain.model, x, has), predict_logits(run.model, x, has)
            assert torch.allclose(calibrated, raw / temperature.get(pattern, 1.0))
            assert torch.equal(calibrated.argmax(1), raw.argmax(1))
            if split == "val" and pattern is not None:
                report = run.calibration[pattern]
                assert report["temperature"] == pytest.approx(temperature[pattern]) and report["rows"] == n
                loss = lambda t: torch.nn.functional.cross_entropy(raw.double() / t, vy).item()  # noqa: E731
                t = temperature[pattern]
                assert report["val_loss"] == pytest.approx([loss(1.0), loss(t)])
                assert loss(t) <= min(loss(1.0), loss(t * 1.1), loss(t / 1.1)) + 1e-9
        mixed = {"image": torch.arange(n) % 3 != 1, "text": torch.arange(n) % 3 != 0}  # routed row by row
        text_only = ~mixed["image"]
        assert torch.allclose(predict_logits(run.model, x, mixed)[text_only],
                              predict_logits(plain.model, x, mixed)[text_only] / temperature["text"])


def test_the_pair_head_is_the_probe_on_real_pairs_averaged_into_rows_with_both(predictable):
    """--pair-head: a logistic regression on the standardised [image, text] of the labeled training pairs (L2 chosen
    on the val pairs) whose logits are averaged with the classifier's on rows shown with both modalities, at
    inference only; "auto" turns it on where the labeled training pairs are at least half of the labeled rows."""
    device = torch.device("cpu")
    cfg = FitConfig(impute="zero", train_missing_rate=0.0, calibrate=False, **SMALL)  # raw logits
    run = train(predictable, prepare(predictable, cfg, device), cfg, progress=False)
    plain = train(predictable, prepare(predictable, replace(cfg, pair_head="off"), device),
                  replace(cfg, pair_head="off"), progress=False)
    model, report = run.model, run.pair_head
    train_split = predictable.splits["train"]
    assert report["on"] and bool(model.pair_on) and report["l2"] in train_module.LINEAR_L2
    assert report["pairs"] == report["labeled"] == len(train_split)
    # the regression sits at the regularised optimum on the training pairs: its objective's gradient vanishes
    z = {m: model.standardize(m, torch.as_tensor(train_split.emb[m])) for m in MODALITIES}
    head = torch.nn.Linear(sum(predictable.dims.values()), predictable.n_outputs)
    head.load_state_dict(model.pair.state_dict())
    loss = (torch.nn.functional.cross_entropy(head(torch.cat([z[m] for m in MODALITIES], 1)),
                                              torch.as_tensor(train_split.labels))
            + report["l2"] * head.weight.pow(2).sum())
    assert max(g.abs().max().item() for g in torch.autograd.grad(loss, list(head.parameters()))) < 1e-3
    val = predictable.splits["val"]
    z_val = {m: model.standardize(m, torch.as_tensor(val.emb[m])) for m in MODALITIES}
    chosen = model.pair_logits(z_val).argmax(1)
    assert report["val"] == pytest.approx((chosen == torch.as_tensor(val.labels)).float().mean().item())

    test = predictable.splits["test"]
    x = {m: torch.as_tensor(test.emb[m]) for m in MODALITIES}
    mixed = {"image": torch.arange(len(test)) % 3 != 1, "text": torch.arange(len(test)) % 3 != 0}
    both = mixed["image"] & mixed["text"]
    own, out = predict_logits(plain.model, x, mixed), predict_logits(model, x, mixed)  # the same classifier
    z = {m: model.standardize(m, x[m]) for m in MODALITIES}
    assert torch.allclose(out[both], 0.5 * (own[both] + model.pair_logits(z)[both]), atol=1e-6)
    assert torch.equal(out[~both], own[~both]) and not torch.allclose(out[both], own[both])
    model.train()
    assert torch.equal(model(x, mixed).logits, plain.model.train()(x, mixed).logits)  # training: the classifier
    # "auto" with most training rows lacking a modality: off; forced on, it changes the rows with both only
    missing = replace(cfg, train_missing_rate=0.7)
    auto = train(predictable, prepare(predictable, missing, device), missing, progress=False)
    assert not auto.pair_head["on"] and "fewer than half" in auto.pair_head["skipped"]
    few_labels = keep_labels(predictable, 0.2, seed=0)  # complete training, most pairs unlabeled: every label a pair
    report = train(few_labels, prepare(few_labels, cfg, device), cfg, progress=False).pair_head
    assert report["on"] and report["pairs"] == report["labeled"] < report["all_pairs"] / 2
    forced = train(predictable, prepare(predictable, replace(missing, pair_head="on"), device),
                   replace(missing, pair_head="on"), progress=False)
    assert forced.pair_head["on"] and forced.pair_head["pairs"] < forced.pair_head["labeled"] / 2
    off, on = predict_logits(auto.model, x, mixed), predict_logits(forced.model, x, mixed)
    assert torch.equal(off[~both], on[~both]) and not torch.allclose(off[both], on[both])


def test_the_best_temperature_recovers_the_one_that_made_the_labels():
    generator = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(4000, 5, generator=generator, dtype=torch.float64)
    y = torch.multinomial((logits / 2.5).softmax(1), 1, generator=generator).squeeze(1)
    assert train_module.best_temperature("multiclass", logits, y) == pytest.approx(2.5, rel=0.1)
    labels = torch.bernoulli(torch.sigmoid(logits / 0.5), generator=generator)
    assert train_module.best_temperature("multilabel", logits, labels) == pytest.approx(0.5, rel=0.1)


def test_staged_predictors_reach_ridge_quality_and_keep_their_shrink(predictable):
    device = torch.device("cpu")
    cfg = FitConfig(train_missing_rate=0.0, **SMALL)
    prep = prepare(predictable, cfg, device)
    result = train(predictable, prep, cfg, progress=False)
    summary = result.predictors
    assert summary["cross_fit"] == 3 and summary["predictor_val_r2"] > 0.5
    assert all(0.7 < c <= 1.0 for c in summary["shrink"].values())
    model = result.model
    assert all(float(getattr(model, f"shrink_{name}")) == c for name, c in summary["shrink"].items())
    assert not any(p.requires_grad for p in model.predictors.parameters())  # frozen for the classifier
    model.train()
    assert not any(m.training for m in model.predictors.modules())  # and no dropout on its predictions


def test_out_of_fold_predictions_are_as_good_as_new_rows():
    """The classifier's substituted predictions on training pairs come from predictors that did not see those
    rows: far less accurate than the in-sample predictions of an over-fitting predictor (few pairs, wide MLP)."""
    device = torch.device("cpu")
    predictable = dataset_from_features(synthetic.make_features(
        n_train=120, n_val=100, n_test=50, d_image=24, d_text=16, n_classes=4, task_type="multiclass",
        shared_dim=8, private_dim=2, noise=0.3, seed=5), "synthetic:few")
    cfg = FitConfig(train_missing_rate=0.0, predictor_hidden=512, predictor_dropout=0.0, weight_decay=0.0,
                    classifier_hidden=32, epochs=1, predictor_epochs=60, predictor_patience=60)
    prep = prepare(predictable, cfg, device)
    staged = {}
    model, *_ = train_module.make_model(predictable, prep, cfg, staged)
    pairs = train_module.gather_rows(prep.train_split, prep.train, prep.paired_mask, device, 2)
    in_sample = train_module.predictions(model, pairs)
    for name, (pred, target) in in_sample.items():
        oof = staged["out_of_fold"][name][staged["paired_position"][prep.paired]]
        assert r2_score(pred, target) > r2_score(oof, target) + 0.1, name  # the full predictor over-fits
        assert r2_score(oof, target) > 0.2


def test_distillation_is_soft_cross_entropy_towards_the_real_pairs_answer():
    dims, n = {"image": 6, "text": 4}, 8
    model = FusionModel(dims, 3, FitConfig(impute="zero", linear_head=False, input_dropout=0.0,
                                           classifier_dropout=0.0))
    x = {m: torch.randn(n, d, requires_grad=True) for m, d in dims.items()}
    has = {m: torch.ones(n, dtype=torch.bool) for m in dims}
    hide = {"image": torch.arange(n) < 2, "text": (torch.arange(n) >= 2) & (torch.arange(n) < 5)}
    logits = model(x, has, hide).logits
    loss = train_module.distill_loss(model, x, has, None, hide, logits, "multiclass")
    with torch.no_grad():
        teacher = model(x, has).logits[:5].softmax(1)
    assert loss.item() == pytest.approx(-(teacher * logits[:5].log_softmax(1)).sum().item() / n, rel=1e-5)
    loss.backward()
    # the teacher (the real pair) gets no gradient: rows whose text is hidden never pass gradient to their text
    assert torch.equal(x["text"].grad[2:5], torch.zeros(3, 4)) and x["text"].grad[:2].abs().sum() > 0
    assert torch.equal(x["image"].grad[5:], torch.zeros(3, 6))  # rows not substituted are not distilled


def test_distillation_is_on_where_most_pairs_have_no_label(predictable):
    device = torch.device("cpu")
    cfg = FitConfig(impute="zero", train_missing_rate=0.0)
    assert prepare(predictable, cfg, device).resolved["distill"] is False
    few = prepare(keep_labels(predictable, 0.1, 0), cfg, device)
    assert few.resolved["distill"] is True and 2 * few.resolved["rows"]["train_paired_labeled"] < 600
    assert prepare(predictable, replace(cfg, distill="on"), device).resolved["distill"] is True
    assert prepare(keep_labels(predictable, 0.1, 0), replace(cfg, distill="off"), device).resolved["distill"] is False


def test_selection_by_loss_keeps_the_lowest_val_loss_epoch(predictable):
    cfg = FitConfig(impute="zero", select="loss", **SMALL)
    result = train(predictable, prepare(predictable, cfg, torch.device("cpu")), cfg, progress=False)
    losses = [row["val_loss"] for row in result.curves]
    assert result.best_epoch == 1 + int(np.argmin(losses))


def test_legacy_configs_keep_their_behaviour():
    old = FitConfig.from_dict({"impute": "predict", "epochs": 3})
    for key, value in LEGACY_SETTINGS.items():
        assert getattr(old, key) == value
    assert old.epochs == 3
    assert FitConfig.from_dict({**asdict(FitConfig()), "resolved": {}}) == FitConfig()


def test_linear_probe_beats_chance_and_fills(predictable):
    probe = linear_probe(predictable, 0.7, 0, torch.device("cpu"))
    full = probe["test"]["mean"]["full"]["accuracy"]
    assert full > 0.6 and probe["l2"] in (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
    assert probe["test"]["zero"]["full"] == probe["test"]["mean"]["full"]  # nothing missing: same inputs
    assert probe["test"]["mean"]["missing-both"]["accuracy"] < full


def test_fit_records_and_prints_the_vicreg_backend(tmp_path):
    import json

    from embcache.train import fit

    store = synthetic.make_store(str(tmp_path / "s.zarr"), n_train=200, n_val=80, n_test=80, d_image=12, d_text=8,
                                 shared_dim=4, private_dim=2)
    said = []
    fit(FitConfig(store=store, vicreg_backend="auto", vicreg_precision="tf32", **SMALL), tmp_path / "run",
        progress=False, log=said.append)
    resolved = json.loads((tmp_path / "run" / "config.json").read_text())["resolved"]
    # on the CPU "auto" resolves to the PyTorch closed form, without a Triton self-check
    assert {k: resolved["vicreg_backend"][k] for k in ("requested", "used", "precision")} == {
        "requested": "auto", "used": "torch", "precision": "tf32"}
    assert [m for m in said if m.startswith("VICReg backend")] == ["VICReg backend: torch (requested auto)"]
    with pytest.raises(Exception, match="vicreg_backend"):
        FitConfig(vicreg_backend="cuda")
