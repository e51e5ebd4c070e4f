"""Crash safety, resume, several processes, fsspec URLs and a fuzzed dataset for `embcache extract`."""
import io
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
import zlib

import numpy as np
import pytest
import zarr
from PIL import Image

from embcache import store as st
from embcache.extract import ExtractConfig, ExtractError, extract
from tiny_encoders import tiny_extract_options

DEMO = os.path.join(os.path.dirname(__file__), "..", "data", "demo", "manifest.jsonl")
ARRAYS = ("ids", "split", "labels", "image/emb", "image/present", "image/reason", "text/emb", "text/present",
          "text/reason", "chunks_done")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_extract_options(tmp_path_factory.mktemp("enc"))


def config(tiny, out, **kw):
    base = dict(dataset="manifest", root=DEMO, out=str(out), workers=0, batch_size=4, chunk_rows=8, limit=40)
    return ExtractConfig(**{**base, **tiny, **kw})


def assert_same_store(a_url, b_url):
    a, b = zarr.open_group(a_url, mode="r"), zarr.open_group(b_url, mode="r")
    for path in ARRAYS:
        np.testing.assert_array_equal(np.asarray(a[path][:]), np.asarray(b[path][:]), err_msg=path)
    meta_a, meta_b = a.attrs["embcache"], b.attrs["embcache"]
    assert meta_a["complete"] and meta_b["complete"]
    assert meta_a["problems"] == meta_b["problems"] and meta_a["fingerprint"] == meta_b["fingerprint"]


def cli_args(tiny, out, limit, chunk_rows=8):
    return [sys.executable, "-m", "embcache.cli", "extract", "--dataset", "manifest", "--root", DEMO,
            "--out", str(out), "--limit", str(limit), "--chunk-rows", str(chunk_rows), "--batch-size", "4",
            "--workers", "0", "--quiet", "--text-encoder", tiny["text_encoder"]]


def test_sigkill_mid_run_then_resume_gives_the_uninterrupted_store(tiny, tmp_path):
    # The default EfficientNet-Lite0 image encoder is slow enough on the CPU to be killed mid-run.
    args = cli_args(tiny, tmp_path / "killed.zarr", limit=96)
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 120
    done = 0
    while time.time() < deadline and proc.poll() is None:
        meta = st.read_meta(str(tmp_path / "killed.zarr"))
        if meta is not None:
            done = int(st.chunks_done(zarr.open_group(str(tmp_path / "killed.zarr"), mode="r")).sum())
            if done >= 3:
                break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed = st.read_meta(str(tmp_path / "killed.zarr"))
    assert done >= 3 and not killed["complete"], "the run must be killed part-way"
    with pytest.raises(st.StoreError, match="did not finish"):
        st.open_store(str(tmp_path / "killed.zarr"))

    resumed = subprocess.run(args, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resuming" in resumed.stdout and "(this run: " in resumed.stdout
    counts = st.open_store(str(tmp_path / "killed.zarr")).load().present
    assert f"image: {int(counts['image'].sum())} present" in resumed.stdout  # the whole store, not this run
    straight = subprocess.run(cli_args(tiny, tmp_path / "straight.zarr", limit=96), capture_output=True, text=True)
    assert straight.returncode == 0, straight.stderr
    assert_same_store(str(tmp_path / "killed.zarr"), str(tmp_path / "straight.zarr"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_processes_write_one_store_equal_to_a_single_process(tiny, tmp_path):
    extract(config(tiny, tmp_path / "single.zarr"), progress=False, log=lambda *_: None)
    args = cli_args(tiny, tmp_path / "multi.zarr", limit=40) + ["--image-encoder", tiny["image_encoder"],
                                                                "--image-checkpoint", tiny["image_checkpoint"]]
    env = {**os.environ, "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    procs = [subprocess.Popen(args, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in range(2)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    assert_same_store(str(tmp_path / "single.zarr"), str(tmp_path / "multi.zarr"))
    assert zarr.open_group(str(tmp_path / "multi.zarr")).attrs["embcache"]["extract"]["processes"] == 2


@pytest.mark.parametrize("scheme", ["file", "memory"])
def test_fsspec_urls(tiny, tmp_path, scheme):
    url = f"file://{tmp_path}/remote.zarr" if scheme == "file" else f"memory://embcache-test-{os.getpid()}"
    extract(config(tiny, url, limit=16), progress=False, log=lambda *_: None)
    extract(config(tiny, tmp_path / "local.zarr", limit=16), progress=False, log=lambda *_: None)
    assert_same_store(url, str(tmp_path / "local.zarr"))
    assert st.open_store(url).load().emb["image"].shape == (16, st.open_store(url).encoder("image")["dim"])


def test_disk_full_keeps_finished_chunks_and_resumes(tiny, tmp_path, monkeypatch):
    real_write = st.write_rows
    calls = []

    def failing_write(root, modality, start, *arrays):
        calls.append(start)
        if len(calls) == 5:  # chunks 0 and 1 (image + text each) succeed, chunk 2 fails
            raise OSError(28, "No space left on device")
        return real_write(root, modality, start, *arrays)

    monkeypatch.setattr(st, "write_rows", failing_write)
    with pytest.raises(ExtractError, match="No space left.*2 chunks written so far are kept.*resume"):
        extract(config(tiny, tmp_path / "full.zarr"), progress=False, log=lambda *_: None)
    monkeypatch.setattr(st, "write_rows", real_write)
    partial = st.open_store(str(tmp_path / "full.zarr"), require_complete=False)
    assert partial.completed_rows().tolist() == [True] * 16 + [False] * 24
    extract(config(tiny, tmp_path / "full.zarr"), progress=False, log=lambda *_: None)
    extract(config(tiny, tmp_path / "ref.zarr"), progress=False, log=lambda *_: None)
    assert_same_store(str(tmp_path / "full.zarr"), str(tmp_path / "ref.zarr"))


def test_unwritable_destination_is_a_clear_error(tiny, tmp_path):
    (tmp_path / "a-file").write_text("not a folder")
    with pytest.raises(ExtractError, match="cannot create the store"):
        extract(config(tiny, tmp_path / "a-file" / "s.zarr"), progress=False, log=lambda *_: None)


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims a huge size (decoding it would need gigabytes)."""
    buf = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    ihdr = struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return bytes(data)


def test_fuzzed_dataset_finishes_and_counts_every_bad_row(tiny, tmp_path):
    rng = np.random.default_rng(0)
    good = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(good, format="JPEG")
    png = io.BytesIO()
    Image.new("RGB", (9, 9), (1, 2, 3)).save(png, format="PNG")
    images = {  # kind -> (bytes, file suffix, expected reason or None)
        "good": (good.getvalue(), ".jpg", None),
        "png_named_jpg": (png.getvalue(), ".jpg", None),  # a wrong extension is fine: content decides
        "truncated": (good.getvalue()[: len(good.getvalue()) // 2], ".jpg", "truncated_image"),
        "zero": (b"", ".jpg", "undecodable_image"),
        "garbage": (rng.integers(0, 255, 500, dtype=np.uint8).tobytes(), ".png", "undecodable_image"),
        "huge": (png_claiming(40000, 40000), ".png", "oversized_image"),
        "absent": (None, ".jpg", "missing_file"),
    }
    texts = {"ok": (b'"a plain caption"', None), "latin1": (b'"caf\xe9 au lait"', "non_utf8_text"),
             "empty": (b'""', "missing_field"), "blank": (b'"   "', "empty_text"),
             "long": (json.dumps("word " * 5000).encode(), None)}
    lines, expected = [], {}
    kinds, text_kinds = list(images), list(texts)
    for i in range(60):
        kind, tkind = kinds[rng.integers(len(kinds))], text_kinds[rng.integers(len(text_kinds))]
        data, suffix, reason = images[kind]
        name = f"img{i}{suffix}"
        if data is not None:
            (tmp_path / name).write_bytes(data)
        label = ["a", "b", "zzz"][rng.integers(3)]
        lines.append(b'{"id": "r%d", "image": "%s", "text": %s, "label": "%s", "split": "%s"}'
                     % (i, name.encode(), texts[tkind][0], label.encode(), [b"train", b"val", b"test"][i % 3]))
        expected[f"r{i}"] = (reason, texts[tkind][1])
    (tmp_path / "m.jsonl").write_bytes(b"\n".join(lines) + b"\n")

    extract(config(tiny, tmp_path / "f.zarr", root=str(tmp_path / "m.jsonl"), limit=None,
                   dataset_options={"classes": ["a", "b"]}), progress=False, log=lambda *_: None)
    store = st.open_store(str(tmp_path / "f.zarr"))
    names = {m: store.reasons(m) for m in ("image", "text")}
    ids = list(store.ids())
    assert ids == [f"r{i}" for i in range(60)]  # no row lost
    for m, k in (("image", 0), ("text", 1)):
        got = [names[m][c] if c else None for c in store.reason_codes(m)]
        assert got == [expected[i][k] for i in ids], m
        assert store.present(m).tolist() == [expected[i][k] is None for i in ids]
    counts = {}
    for reason in [r for pair in expected.values() for r in pair if r]:
        counts[reason] = counts.get(reason, 0) + 1
    for reason, count in counts.items():
        assert store.meta["problems"][reason] == count, reason
    assert store.meta["problems"]["unknown_label"] == sum(1 for line in lines if b'"zzz"' in line)
