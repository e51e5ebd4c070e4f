"""Read-only prompts on cached hidden states (issue 7): extraction with --cache-layers, the top-k runners, fit."""
import os

import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner

from embcache import store as st
from embcache.cli.main import main as cli
from embcache.extract import ExtractConfig, ExtractError, extract, load_encoders
from embcache.hidden import blocks_of, make_runner
from embcache.prompts import PromptPredictor
from tiny_encoders import register_tiny_open_clip, tiny_bert_dir, tiny_timm_checkpoint

FIXTURES = os.path.join(os.path.dirname(__file__), "..", "data", "fixtures")
MANIFEST = os.path.join(FIXTURES, "manifest", "manifest.jsonl")


@pytest.fixture(scope="module")
def enc(tmp_path_factory):
    import open_clip

    folder = tmp_path_factory.mktemp("enc")
    name = register_tiny_open_clip(str(folder / "clip"))
    torch.manual_seed(0)
    torch.save(open_clip.create_model(name).state_dict(), folder / "clip.pt")  # the same weights every load
    return {"clip": f"open_clip:{name}", "clip_checkpoint": str(folder / "clip.pt"),
            "bert": f"hf:{tiny_bert_dir(str(folder / 'bert'))}",
            "timm": tiny_timm_checkpoint(str(folder / "img.pth"))}


def run(enc, out, image="clip", logs=None, **kw):
    image_kw = ({"image_encoder": enc["clip"], "image_checkpoint": enc["clip_checkpoint"]} if image == "clip" else
                {"image_encoder": "timm:test_efficientnet", "image_checkpoint": enc["timm"]})
    cfg = ExtractConfig(dataset="manifest", root=MANIFEST, out=str(out), workers=0, text_encoder=enc["bert"],
                        text_max_length=24, **image_kw, **kw)
    log = logs.append if logs is not None else (lambda *_: None)
    return cfg, extract(cfg, progress=False, log=log)


@pytest.fixture(scope="module")
def cached(enc, tmp_path_factory):
    """A float32 store with the states entering both blocks of each tiny encoder, and the encoders."""
    out = tmp_path_factory.mktemp("s") / "k2.zarr"
    logs = []
    cfg, _ = run(enc, out, cache_layers=2, dtype="float32", batch_size=4, chunk_rows=4, logs=logs)
    return st.open_store(str(out)), load_encoders(cfg), logs


def test_extract_stores_hidden_states_and_records_k(cached):
    store, encoders, logs = cached
    assert any("hidden states need up to" in line for line in logs)  # the size, printed before extracting
    g = store.root
    assert g["image/hidden"].shape == (10, 17, 48) and g["image/hidden"].chunks == (4, 17, 48)  # 1 + 4x4 patches
    assert g["text/hidden"].shape[:2] == g["text/hidden_mask"].shape == (10, 24)
    assert "hidden_mask" not in g["image"]
    for m in ("image", "text"):
        assert store.encoder(m)["cache_layers"] == 2 and store.encoder(m)["hidden_layer_index"] == 0
        assert store.meta["fingerprint"]["encoders"][m]["cache_layers"] == 2
    mask = np.asarray(g["text/hidden_mask"][:])
    states = np.asarray(g["text/hidden"][:])
    present = store.present("text")
    assert (mask.any(1) == present).all() and mask[present, 0].all()
    assert (states[~mask] == 0).all() and (np.abs(states[mask]).sum(-1) > 0).all()  # only the real tokens


def test_top_k_run_from_cached_states_reproduces_the_encoders_output(cached):
    store, encoders, _ = cached
    for m in ("image", "text"):
        e = encoders[m]
        runner = make_runner(e.attrs["backend"], e.module, 2, e.attrs["pooling"])
        hidden, mask = store.hidden(m)
        present = store.present(m)
        with torch.no_grad():
            out = runner(torch.as_tensor(hidden[present]), None if mask is None else torch.as_tensor(mask[present]))
        np.testing.assert_allclose(out.pooled.numpy(), store.embeddings(m)[present], rtol=1e-5, atol=1e-5)


def joint_reference(runner, hidden, mask, prompts):
    """The RPO formulation: one sequence [real tokens; prompts] with every prompt key masked out."""
    b, t, _ = hidden.shape
    k = prompts.shape[0]
    x = torch.cat([hidden, prompts.expand(b, -1, -1)], dim=1)
    blocked = torch.zeros(t + k, t + k, dtype=torch.bool)
    blocked[:, t:] = True  # no query (real or prompt) attends to a prompt key
    if runner.family == "bert":
        keys = torch.cat([mask, torch.zeros(b, k, dtype=torch.bool)], dim=1)
        allowed = keys[:, None, None, :] & ~blocked
        additive = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
        for layer in runner.blocks:
            x = layer(x, additive)
    else:
        additive = torch.zeros(t + k, t + k).masked_fill(blocked, float("-inf"))
        for block in runner.blocks:
            x = block(x, attn_mask=additive)
    return x[:, :t], x[:, t:]


@pytest.mark.parametrize("m", ["image", "text"])
def test_read_only_prompts_leave_the_real_outputs_bit_identical(cached, m):
    store, encoders, _ = cached
    e = encoders[m]
    runner = make_runner(e.attrs["backend"], e.module, 2, "cls")
    hidden, mask = store.hidden(m)
    present = store.present(m)
    h = torch.as_tensor(hidden[present])
    mk = None if mask is None else torch.as_tensor(mask[present])
    torch.manual_seed(0)
    prompts = torch.randn(3, runner.width)
    with torch.no_grad():
        plain = runner(h, mk)
        with_prompts = runner(h, mk, prompts)
    assert torch.equal(plain.tokens[:, 0], with_prompts.tokens[:, 0])  # the [CLS] output
    assert torch.equal(plain.tokens, with_prompts.tokens) and torch.equal(plain.pooled, with_prompts.pooled)
    # The prompts read the real tokens exactly as in one joint sequence with the prompt keys masked out ...
    mk_full = torch.ones(h.shape[:2], dtype=torch.bool) if mk is None else mk
    with torch.no_grad():
        ref_tokens, ref_prompts = joint_reference(runner, h, mk_full, prompts)
    torch.testing.assert_close(with_prompts.prompts, ref_prompts, rtol=1e-4, atol=1e-4)
    real = mk_full.unsqueeze(-1).expand_as(ref_tokens)
    torch.testing.assert_close(with_prompts.tokens[real], ref_tokens[real], rtol=1e-4, atol=1e-4)
    # ... and no prompt sees another: changing prompt 2 leaves prompts 0 and 1 as they were.
    other = prompts.clone()
    other[2] += 1.0
    with torch.no_grad():
        changed = runner(h, mk, other)
    assert torch.equal(changed.prompts[:, :2], with_prompts.prompts[:, :2])
    assert not torch.equal(changed.prompts[:, 2], with_prompts.prompts[:, 2])
    with torch.no_grad():  # the predictor skips the last block's real path: the prompts do not need it
        lean = runner(h, mk, prompts, real_output=False)
    assert lean.tokens is None and torch.equal(lean.prompts, with_prompts.prompts)


def test_prompt_predictor_trains_prompts_head_and_optionally_biases(cached):
    store, encoders, _ = cached
    e = encoders["text"]
    hidden, mask = store.hidden("text")
    batch = {"text/hidden": torch.as_tensor(hidden), "text/hidden_mask": torch.as_tensor(mask)}
    for bitfit in (False, True):
        runner = make_runner("hf", e.module, 2, "mean")
        pred = PromptPredictor("text", runner, 4, torch.nn.Linear(runner.width, 5), bitfit=bitfit)
        pred.train()
        out = pred(batch)
        assert out.shape == (10, 5) and torch.isfinite(out).all()  # rows without text give finite values
        out.square().sum().backward()
        trained = {n for n, p in pred.named_parameters() if p.grad is not None}
        assert {"prompts", "head.weight", "head.bias"} <= trained
        biases = {n for n in trained if n.startswith("runner.")}
        assert all(n.endswith("bias") for n in biases) and bool(biases) == bitfit
        assert not runner.training  # frozen blocks never switch dropout on


def test_cnn_encoder_stores_no_states_and_says_so(enc, tmp_path):
    logs = []
    run(enc, tmp_path / "s.zarr", image="timm", cache_layers=1, logs=logs)
    store = st.open_store(str(tmp_path / "s.zarr"))
    assert "hidden" not in store.root["image"] and "cache_layers" not in store.encoder("image")
    assert store.root["text/hidden"].shape == (10, 24, 32) and store.encoder("text")["hidden_layer_index"] == 1
    assert any("image encoder timm:test_efficientnet stores no hidden states" in line for line in logs)
    assert store.hidden_modalities() == ["text"]


def test_cache_layers_is_part_of_the_fingerprint_and_zero_changes_nothing(enc, tmp_path):
    out = tmp_path / "s.zarr"
    run(enc, out, image="timm")
    plain = st.open_store(str(out))
    assert "cache_layers" not in plain.meta["fingerprint"]["encoders"]["text"]  # today's stores, unchanged
    assert not plain.hidden_modalities()
    with pytest.raises(ExtractError, match="text.cache_layers: None -> 1"):
        run(enc, out, image="timm", cache_layers=1)
    with pytest.raises(ExtractError, match="has 2 transformer blocks"):
        run(enc, tmp_path / "t.zarr", image="timm", cache_layers=3)


def test_refuses_to_start_without_room(enc, tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**6, 10**6 - 1000, 1000))
    out = tmp_path / "s.zarr"
    result = CliRunner().invoke(cli, ["extract", "--dataset", "manifest", "--root", MANIFEST, "--out", str(out),
                                      "--image-encoder", "timm:test_efficientnet", "--image-checkpoint",
                                      enc["timm"], "--text-encoder", enc["bert"], "--workers", "0", "--quiet",
                                      "--cache-layers", "1", "--text-max-length", "24"])
    assert result.exit_code == 1 and "MiB free" in result.output and "Traceback" not in result.output
    assert not out.exists()


def test_blocks_of_finds_the_supported_families(cached):
    _, encoders, _ = cached
    assert blocks_of("hf", encoders["text"].module)[0] == "bert"
    assert blocks_of("open_clip", encoders["image"].module)[0] == "open_clip"
    assert blocks_of("timm", torch.nn.Linear(2, 2)) is None


# ------------------------------------------------------------------------------------------------
# fit --predictor prompts on a synthetic task
# ------------------------------------------------------------------------------------------------
SIZES = dict(n_train=1200, n_val=200, n_test=400, d_image=24, d_text=32, shared_dim=8, private_dim=3,
             n_classes=4, absent_image=0.03, absent_text=0.03)
FIT = ["--epochs", 25, "--lr", 3e-3, "--predictor-hidden", 64, "--classifier-hidden", 64, "--quiet"]


@pytest.fixture(scope="module")
def prompt_store(enc, tmp_path_factory):
    """Synthetic features whose text comes with hidden states of the tiny BERT (k = 1); no image states."""
    from embcache.bench import synthetic
    from embcache.encoders import load_text_encoder
    from embcache.bench.synthetic import synthetic_hidden

    features = synthetic.make_features(**SIZES)
    synthetic_hidden(features, "text", tokens=8, width=32, min_tokens=3)
    text = load_text_encoder(enc["bert"])
    features.encoders["text"] = {**text.attrs, "cache_layers": 1, "hidden_layer_index": 1}
    hidden, mask = features.emb.pop("text/hidden"), features.emb.pop("text/hidden_mask")
    url = str(tmp_path_factory.mktemp("p") / "prompts.zarr")
    synthetic.write_store(url, features)
    root = zarr.open_group(url, mode="r+")
    st.create_hidden(root, "text", 8, 32, "float16", with_mask=True)
    st.write_hidden(root, "text", 0, hidden, mask)
    return url


def fit_cli(store, out, *args):
    from embcache.cli.fit import fit_command

    with torch.random.fork_rng():
        torch.set_num_threads(1)
        return CliRunner().invoke(fit_command, [str(a) for a in [store, "--out", out, *FIT, *args]])


def test_fit_with_prompts_trains_and_reports_r2_like_the_mlp(prompt_store, tmp_path):
    import json

    from embcache.runs import evaluate_run

    mlp = fit_cli(prompt_store, tmp_path / "mlp")
    assert mlp.exit_code == 0, mlp.output
    result = fit_cli(prompt_store, tmp_path / "prompts", "--predictor", "prompts", "--prompts", 4)
    assert result.exit_code == 0, result.output
    assert "predictor text_to_image: read-only prompts (K = 4) in the last 1 blocks" in result.output
    assert "predictor image_to_text: MLP (the image encoder has no cached hidden states)" in result.output
    assert "predictor text_to_image: cosine" in result.output  # the R2 line, as for the MLP
    config = json.loads((tmp_path / "prompts" / "config.json").read_text())
    assert config["predictor"] == "prompts"
    assert config["resolved"]["predictors"] == {"image_to_text": "mlp", "text_to_image": "prompts"}
    r2 = {kind: json.loads((tmp_path / kind / "metrics.json").read_text())["predictor"] for kind in ("mlp", "prompts")}
    # text -> image from the hidden states through the frozen block: it learns (about 0.43 against the MLP's
    # 0.65 on the pooled embedding, in 25 epochs here)
    assert r2["prompts"]["text_to_image"]["r2"] > max(0.3, 0.5 * r2["mlp"]["text_to_image"]["r2"]), r2
    assert r2["prompts"]["image_to_text"] == pytest.approx(r2["mlp"]["image_to_text"], abs=0.1)
    # a saved prompts run reloads (blocks rebuilt from the encoder's checkpoint) and scores the same
    again = evaluate_run(tmp_path / "prompts", device="cpu")
    assert again["predictor"]["text_to_image"]["r2"] == pytest.approx(r2["prompts"]["text_to_image"]["r2"], abs=1e-5)


def test_fit_with_prompts_refuses_a_store_without_hidden_states(tmp_path):
    from embcache.bench import synthetic

    url = synthetic.make_store(str(tmp_path / "s.zarr"), n_train=200, n_val=50, n_test=50)
    result = fit_cli(url, tmp_path / "run", "--predictor", "prompts")
    assert result.exit_code == 1 and "--cache-layers" in result.output and "Traceback" not in result.output
