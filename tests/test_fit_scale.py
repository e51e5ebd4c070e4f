"""`embcache fit` at scale: partial stores, streaming a store chunk by chunk, several processes (DDP)."""
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from embcache import synthetic
from embcache.cli.fit import fit_command
from embcache.evaluate import evaluate_run
from embcache.models import FitConfig, FitError
from embcache.store import FeatureStore, create_store, mark_chunk_done, mark_complete, n_chunks, write_rows
from embcache.stream import ReadAhead, chunked_order
from embcache.train import fit

SIZES = dict(n_train=600, n_val=150, n_test=200, d_image=24, d_text=16, shared_dim=8, private_dim=2, n_classes=5,
             absent_image=0.05, absent_text=0.05, absent_both=0.02)
SMALL = dict(epochs=4, predictor_hidden=32, classifier_hidden=32)
SMALL_ARGS = ["--epochs", "4", "--predictor-hidden", "32", "--classifier-hidden", "32", "--quiet"]
CHUNK = 64


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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
    memory = fit(FitConfig(store=store, shuffle="chunks", shuffle_window=2, **SMALL), tmp_path / "memory",
                 progress=False)

    def no_full_load(*a, **k):
        raise AssertionError("a streamed fit must not load the whole store")
    monkeypatch.setattr(FeatureStore, "load", no_full_load)
    monkeypatch.setattr(FeatureStore, "embeddings", no_full_load)
    streamed = fit(FitConfig(store=store, stream=True, shuffle_window=2, read_ahead=1, **SMALL),
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


def test_two_processes_ddp(store, tmp_path):
    """torchrun-style: 2 CPU processes over gloo, streaming. Rank 0 writes the run, rank 1 nothing.

    Each process runs half of every epoch's batches and DDP averages the gradients, so an optimizer step
    sees 2 batches (VICReg's statistics per batch, as in one process) and an epoch has half the steps: close
    to, but not the same numbers as, one process.
    """
    args = [sys.executable, "-m", "embcache.cli", "fit", store, "--out", str(tmp_path / "ddp"), "--stream",
            *SMALL_ARGS]
    env = {**os.environ, "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
           "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen(args, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in range(2)]
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    assert "wrote" in outputs[0] and "wrote" not in outputs[1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ddp"]  # nothing else, no temp folders left
    metrics = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    resolved = json.loads((tmp_path / "ddp" / "config.json").read_text())["resolved"]
    assert resolved["data"]["processes"] == 2 and resolved["data"]["streaming"]
    assert resolved["steps_per_epoch"] % 2 == 0
    single = fit(FitConfig(store=store, stream=True, **SMALL), tmp_path / "single", progress=False)
    for scenario, values in metrics["test"].items():
        for name, value in values.items():
            assert 0 <= value <= 1 and value == pytest.approx(single["test"][scenario][name], abs=0.1)
    assert metrics["predictor"]["image_to_text"]["cosine"] > 0.3
