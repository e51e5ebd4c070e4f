"""`embcache fit` at scale: partial stores, streaming a store chunk by chunk, several processes (DDP)."""
import json
import math
import os
import socket
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from embcache.bench import synthetic
from embcache.cli.fit import fit_command
from embcache.config import FitConfig, FitError
from embcache.data import load_dataset
from embcache.evaluate import predict_split
from embcache.runs import evaluate_run
from embcache.runtime import Ranks
from embcache.store import FeatureStore, create_store, mark_chunk_done, mark_complete, n_chunks, write_rows
from embcache.stream import ReadAhead, chunked_order
from embcache.train import batch_loss, epoch_batches, fit, make_model, prepare, selection_key, substitution_generator

SIZES = dict(n_train=600, n_val=150, n_test=200, d_image=24, d_text=16, shared_dim=8, private_dim=2, n_classes=5,
             absent_image=0.05, absent_text=0.05, absent_both=0.02)
SMALL = dict(epochs=4, predictor_hidden=32, classifier_hidden=32)
SMALL_ARGS = ["--epochs", "4", "--predictor-hidden", "32", "--classifier-hidden", "32", "--quiet"]
CHUNK = 64


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def write_chunked(url, features, chunk_rows=CHUNK, done_chunks=None):
    """A store of `features` with small chunks; done_chunks: only these committed, the store left partial."""
    root = create_store(url, ids=list(features.ids), split=features.split, labels=features.labels,
                        dataset={"name": "synthetic"}, task={"type": features.task_type, "classes": features.classes},
                        encoders=features.encoders, reasons=synthetic.REASONS, chunk_rows=chunk_rows, overwrite=True)
    n = len(features.ids)
    for m, emb in features.emb.items():
        write_rows(root, m, 0, emb, features.present[m], np.zeros(n, np.uint8))
    if done_chunks is None:
        mark_complete(root, {})
    else:
        for c in done_chunks:
            mark_chunk_done(root, c)
    return url


@pytest.fixture(scope="module")
def features():
    return synthetic.make_features(**SIZES)


@pytest.fixture(scope="module")
def store(features, tmp_path_factory):
    return write_chunked(str(tmp_path_factory.mktemp("stores") / "chunked.zarr"), features)


def test_chunked_order_is_a_permutation_grouped_by_window():
    chunk_of = np.repeat(np.arange(10), 7)
    paired = np.arange(70) % 3 != 0
    order = chunked_order(chunk_of, paired, 3, torch.Generator().manual_seed(0))
    assert sorted(order.paired.tolist()) == np.flatnonzero(paired).tolist()
    assert sorted(order.unpaired.tolist()) == np.flatnonzero(~paired).tolist()
    assert (np.diff(order.window_of[order.paired]) >= 0).all()  # windows one after the other
    assert len(order.windows) == 4 and all(len(set(chunk_of[w])) <= 3 for w in order.windows)
    again = chunked_order(chunk_of, paired, 3, torch.Generator().manual_seed(0))
    assert (again.paired == order.paired).all() and (again.unpaired == order.unpaired).all()


def test_streaming_equals_the_in_memory_path_in_the_same_order(store, tmp_path, monkeypatch):
    # a streamed fit skips the linear head (its rows are not in memory) but still zeroes the MLP's last layer:
    # compare the MLP paths alone
    memory = fit(FitConfig(store=store, shuffle="chunks", shuffle_window=2, linear_head=False, **SMALL),
                 tmp_path / "memory", progress=False)

    def no_full_load(*a, **k):
        raise AssertionError("a streamed fit must not load the whole store")
    monkeypatch.setattr(FeatureStore, "load", no_full_load)
    monkeypatch.setattr(FeatureStore, "embeddings", no_full_load)
    streamed = fit(FitConfig(store=store, stream=True, shuffle_window=2, read_ahead=1, linear_head=False, **SMALL),
                   tmp_path / "streamed", progress=False)

    a, b = (load_file(str(tmp_path / name / "model.safetensors")) for name in ("memory", "streamed"))
    assert a.keys() == b.keys()
    for k in a:  # the same batches, rows and order: the same weights
        torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-7, msg=k)
    for split in ("val", "test"):
        for scenario, values in memory[split].items():
            for name, value in values.items():
                assert streamed[split][scenario][name] == pytest.approx(value, abs=1e-6), (split, scenario, name)
    for name, q in memory["predictor"].items():
        assert streamed["predictor"][name]["cosine"] == pytest.approx(q["cosine"], abs=1e-5)
        assert streamed["predictor"][name]["r2"] == pytest.approx(q["r2"], abs=1e-5)
    assert memory["selection"]["best_epoch"] == streamed["selection"]["best_epoch"]
    resolved = json.loads((tmp_path / "streamed" / "config.json").read_text())["resolved"]
    assert resolved["data"] == {"streaming": True, "shuffle": "chunks", "processes": 1, "chunk_rows": CHUNK,
                                "partial": None, "shuffle_window": 2}
    curves = [json.loads(line) for line in (tmp_path / "streamed" / "curves.jsonl").read_text().splitlines()]
    assert len(curves) == SMALL["epochs"] and all(np.isfinite(c["loss"]) for c in curves)
    # `embcache eval` re-scores a streamed run chunk by chunk too
    again = evaluate_run(tmp_path / "streamed", device="cpu")
    assert again["test"] == streamed["test"]


def test_over_the_memory_budget_streams_automatically(store, tmp_path):
    result = CliRunner().invoke(fit_command, [store, "--out", str(tmp_path / "auto"), "--memory-budget-gb", "1e-5",
                                              *SMALL_ARGS])
    assert result.exit_code == 0, result.output
    assert "over the memory budget" in result.output
    resolved = json.loads((tmp_path / "auto" / "config.json").read_text())["resolved"]
    assert resolved["data"]["streaming"] and resolved["data"]["shuffle"] == "chunks"
    # the linear head needs the training rows in memory: a streamed fit records why it has none, and the saved
    # linear map stays at 0 (the MLP alone makes the logits)
    assert resolved["linear_head"] == "skipped: the training rows are streamed"
    weights = load_file(str(tmp_path / "auto" / "model.safetensors"))
    assert not weights["linear.weight"].any() and not weights["linear.bias"].any()


def test_streaming_refuses_nan_before_training(features, tmp_path):
    bad = synthetic.make_features(**SIZES)
    row = int(np.flatnonzero(bad.present["text"] & (bad.split == 2))[0])  # a test row: found by the scan
    bad.emb["text"][row, 1] = np.nan
    url = write_chunked(str(tmp_path / "nan.zarr"), bad)
    with pytest.raises(FitError, match="NaN or inf"):
        fit(FitConfig(store=url, stream=True, **SMALL), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_read_ahead_hands_reader_errors_to_the_consumer(store):
    from embcache.store import open_store

    fs = open_store(store)
    blocks = [[(0, np.arange(3))], [(10_000, np.arange(3))]]  # the second chunk does not exist
    got = []
    with pytest.raises(Exception):
        for block in ReadAhead(fs, blocks, depth=1):
            got.append(block)
    assert len(got) == 1 and got[0]["image"].shape == (3, SIZES["d_image"])


def test_partial_store_needs_allow_partial_and_uses_only_written_chunks(features, tmp_path):
    n = len(features.ids)
    done = [c for c in range(n_chunks(n, CHUNK)) if c % 3 != 1]
    url = write_chunked(str(tmp_path / "partial.zarr"), features, done_chunks=done)

    refused = CliRunner().invoke(fit_command, [url, "--out", str(tmp_path / "no"), *SMALL_ARGS])
    assert refused.exit_code != 0 and "did not finish" in refused.output and "--allow-partial" in refused.output
    assert not (tmp_path / "no").exists()

    result = CliRunner().invoke(fit_command, [url, "--out", str(tmp_path / "partial"), "--allow-partial",
                                              *SMALL_ARGS])
    assert result.exit_code == 0, result.output
    rows = np.concatenate([np.arange(c * CHUNK, min(n, (c + 1) * CHUNK)) for c in done])
    assert f"using the {len(rows)} rows of its {len(done)} written chunks" in result.output
    resolved = json.loads((tmp_path / "partial" / "config.json").read_text())["resolved"]
    assert resolved["data"]["partial"][url]["rows"] == len(rows)

    # The same as a complete store holding just those rows (the protocol hashes ids, not positions).
    sub = synthetic.make_features(**SIZES)
    for name in ("ids", "split", "labels"):
        setattr(sub, name, getattr(sub, name)[rows])
    sub.emb = {m: e[rows] for m, e in sub.emb.items()}
    sub.present = {m: p[rows] for m, p in sub.present.items()}
    complete = write_chunked(str(tmp_path / "complete.zarr"), sub)
    expected = fit(FitConfig(store=complete, **SMALL), tmp_path / "complete", progress=False)
    got = json.loads((tmp_path / "partial" / "metrics.json").read_text())
    assert got["test"] == expected["test"] and got["rows"] == expected["rows"]
    assert resolved["rows"]["train"] == int((sub.split == 0).sum()) - resolved["rows"]["train_without_modality"]

    # streamed, the partial store is read chunk by chunk from its written chunks only
    streamed = fit(FitConfig(store=url, allow_partial=True, stream=True, **SMALL), tmp_path / "ps", progress=False)
    assert streamed["rows"] == expected["rows"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_two_ranks(args: list[str]) -> list[str]:
    """Run `args` as ranks 0 and 1 of a torchrun-style 2-process job (gloo, CPU); their outputs, after checking
    that both exited 0."""
    env = {**os.environ, "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
           "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen(args, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in range(2)]
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    return outputs


def accumulated_fit(store, cfg, world):
    """One process accumulating the (averaged) gradients of the `world` batches that a `world`-process fit runs
    side by side in each optimizer step, with the same learning-rate schedule, dropout draws per process, and
    best-epoch selection: what README "Scaling out" says a K-process fit equals. Returns the kept weights."""
    device = torch.device("cpu")
    data = load_dataset(store, stream=cfg.stream)
    prep = prepare(data, cfg, device, Ranks(0, world))
    share = prep.resolved["steps_per_epoch"] // world
    staged: dict = {}  # staged predictor training (every process trains the same predictors)
    model, _, optimizer, _ = make_model(data, replace(prep, ranks=Ranks()), cfg, staged)  # no DDP wrapper
    schedule = torch.optim.lr_scheduler.LambdaLR(  # each process's schedule: `share` steps per epoch
        optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / (cfg.epochs * share))))
    rng = [torch.get_rng_state() for _ in range(world)]  # each process's dropout draws
    generators = [{} for _ in range(world)]
    best_value, best_state, best_epoch = None, None, 0
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        for batches in zip(*(epoch_batches(replace(prep, ranks=Ranks(r, world)), cfg, generators[r])
                             for r in range(world))):
            optimizer.zero_grad(set_to_none=True)
            for r, (idx, n_paired, x) in enumerate(batches):
                torch.set_rng_state(rng[r])
                loss, _ = batch_loss(model, model, prep, idx, n_paired, cfg, data.task_type, x,
                                     substitution_generator(generators[r], cfg, device), staged)
                (loss / world).backward()  # DDP: the mean of the processes' gradients
                rng[r] = torch.get_rng_state()
            optimizer.step()
            schedule.step()
        _, _, value = selection_key(cfg, data.task_type, predict_split(model, prep.val_split, prep.val, prep.val_has),
                                    prep.val.y)
        if value is None or best_value is None or value > best_value:
            best_value, best_epoch = value, epoch
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return best_state, best_epoch


@pytest.mark.parametrize("distill", ["off", "on"])
def test_two_processes_ddp(store, tmp_path, distill):
    """torchrun-style: 2 CPU processes over gloo, streaming. Rank 0 writes the run, rank 1 nothing.

    Each process runs half of every epoch's batches and DDP averages the gradients, so an optimizer step sees
    2 batches (VICReg's statistics per batch, as in one process): the weights equal those of one process that
    accumulates the gradients of the same 2 batches per step (`accumulated_fit`). Processes that did not
    average their gradients (each stepping on its own batches) would not. With distillation each step also runs
    the wrapped model once more without gradient (the real pairs' answers).
    """
    # --mean-fallback off: the reference below replays one training loop; the mean-fill model that the fallback
    # trains first runs the same loop (and `choose_fallback` only scores val on rank 0). --no-calibrate: so do the
    # temperatures fitted after it (rank 0 only); the weights are what this test compares
    args = [sys.executable, "-m", "embcache.cli", "fit", store, "--out", str(tmp_path / "ddp"), "--stream",
            "--mean-fallback", "off", "--no-calibrate", "--distill", distill, *SMALL_ARGS]
    outputs = run_two_ranks(args)
    assert "wrote" in outputs[0] and "wrote" not in outputs[1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ddp"]  # nothing else, no temp folders left
    metrics = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    resolved = json.loads((tmp_path / "ddp" / "config.json").read_text())["resolved"]
    assert resolved["data"]["processes"] == 2 and resolved["data"]["streaming"]
    assert resolved["steps_per_epoch"] % 2 == 0 and resolved["steps_per_epoch"] >= 4
    assert resolved["distill"] == (distill == "on")
    cfg = FitConfig(store=store, stream=True, mean_fallback="off", calibrate=False, distill=distill, **SMALL)
    expected, best_epoch = accumulated_fit(store, cfg, world=2)
    if distill == "on":  # the distillation term changes the training: the reference without it differs
        without, _ = accumulated_fit(store, replace(cfg, distill="off"), world=2)
        assert any(not torch.allclose(without[k], expected[k]) for k in expected)
    got = load_file(str(tmp_path / "ddp" / "model.safetensors"))
    assert got.keys() == expected.keys() and resolved["selection"]["best_epoch"] == best_epoch
    for k in got:
        torch.testing.assert_close(got[k], expected[k], rtol=1e-5, atol=1e-6, msg=k)
    assert all(0 <= values[k] <= 1 for values in metrics["test"].values() for k in ("f1_macro", "f1_micro", "ece"))
    assert metrics["predictor"]["image_to_text"]["cosine"] > 0.3


def test_two_processes_with_mean_fallback(store, tmp_path):
    """The default fit (mean fallback on) under 2 processes: the mean-fill model trains first in step on both,
    rank 0 chooses where to fall back, writes it into the model, and `eval` of the saved run reproduces its metrics."""
    args = [sys.executable, "-m", "embcache.cli", "fit", store, "--out", str(tmp_path / "ddp"), *SMALL_ARGS]
    run_two_ranks(args)
    chosen = json.loads((tmp_path / "ddp" / "config.json").read_text())["resolved"]["mean_fallback"]
    saved = load_file(str(tmp_path / "ddp" / "model.safetensors"))
    assert saved["fallback_on"].tolist() == [False, False, chosen["falls_back"]["both"]]  # the default: "complete"
    assert "fallback.linear.weight" in saved
    metrics = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    assert evaluate_run(tmp_path / "ddp")["test"] == metrics["test"]
