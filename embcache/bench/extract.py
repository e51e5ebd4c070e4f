"""`embcache bench extract`: is the encoder ever left waiting?

Compares the whole pipeline (read, decode, tokenize, encode, write) with the encoders' pure forward throughput on
tensors made beforehand, at the same batch size and device. A ratio near 1 means decoding, tokenizing and writing
are hidden behind the encoders.
"""
from __future__ import annotations

import contextlib
import math
import os
import platform
import tempfile
import time

from dataclasses import replace

import torch

from embcache import datasets as ds
from embcache.extract import ExtractConfig, extract, load_encoders
from embcache.runtime import resolve_device


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def pure_forward_seconds(cfg: ExtractConfig, dataset: ds.Dataset, batch_size: int, device: torch.device) -> dict:
    """Time the encoders alone on the batches the pipeline would feed them, inputs already on the device."""
    encoders = {m: e.to(device) for m, e in load_encoders(cfg).items()}
    n_images = sum(s.image is not None for s in dataset.samples)
    texts = [s.text for s in dataset.samples if s.text is not None]
    size = encoders["image"].attrs["preprocess"]["size"]
    pixels = torch.randn(batch_size, 3, size, size, device=device)
    token_batches = [encoders["text"].preprocess(texts[i:i + batch_size]) for i in range(0, len(texts), batch_size)]
    token_batches = [{k: v.to(device) for k, v in b.items()} for b in token_batches]
    encoders["image"].encode(pixels[:2], device)  # warm-up (lazy init, kernel selection)
    timings = {}
    _sync(device)
    start = time.perf_counter()
    full, rest = divmod(n_images, batch_size)
    for _ in range(full):
        encoders["image"].encode(pixels, device)
    if rest:
        encoders["image"].encode(pixels[:rest], device)
    _sync(device)
    timings["image"] = time.perf_counter() - start
    start = time.perf_counter()
    for tokens in token_batches:
        encoders["text"].encode(tokens, device)
    _sync(device)
    timings["text"] = time.perf_counter() - start
    return timings


DEMO_MANIFEST = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "demo",
                             "manifest.jsonl")


@contextlib.contextmanager
def bench_root(cfg: ExtractConfig):
    """Without --root, the demo data: the manifest, or for `--dataset webdataset` the manifest written as shards
    (100 samples each, one folder per split) in a temporary folder."""
    if cfg.root is not None:
        yield cfg.root
    elif cfg.dataset == "webdataset":
        from embcache.dataset_formats import write_webdataset

        with tempfile.TemporaryDirectory() as tmp:
            yield write_webdataset(ds.open_dataset("manifest", DEMO_MANIFEST), os.path.join(tmp, "shards"))
    elif cfg.dataset == "manifest":
        yield DEMO_MANIFEST
    else:
        raise ValueError(f"bench extract --dataset {cfg.dataset} needs --root")


def run_extract_bench(cfg: ExtractConfig, limit: int | None = None) -> dict:
    with bench_root(cfg) as root:
        return _run_extract_bench(replace(cfg, root=root), limit)


def _run_extract_bench(cfg: ExtractConfig, limit: int | None) -> dict:
    dataset = ds.open_dataset(cfg.dataset, cfg.root, **cfg.dataset_options)
    if limit:
        dataset.samples = dataset.samples[:limit]
    n = len(dataset.samples)
    device = resolve_device(cfg.device)
    batch_size = cfg.batch_size or (256 if device.type == "cuda" else 64)
    with tempfile.TemporaryDirectory() as tmp:
        cfg.out, cfg.limit, cfg.overwrite, cfg.batch_size = f"{tmp}/bench.zarr", limit, True, batch_size
        report = extract(cfg, progress=False, log=lambda *_: None)
    pure = pure_forward_seconds(cfg, dataset, batch_size, device)
    pure_rate = n / sum(pure.values())
    ratio = report.samples_per_s / pure_rate
    result = {
        "dataset": cfg.dataset, "samples": n, "batch_size": batch_size, "device": str(device), "workers": cfg.workers,
        "pipeline_samples_per_s": round(report.samples_per_s, 2),
        "pure_forward_samples_per_s": round(pure_rate, 2),
        "pure_forward_seconds": {k: round(v, 3) for k, v in pure.items()},
        "ratio": round(ratio, 3),
        "machine": f"{platform.machine()} {torch.get_num_threads()} threads"
                   + (f", {torch.cuda.get_device_name()}" if device.type == "cuda" else ""),
        "torch": torch.__version__,
        "encoders": {"image": cfg.image_encoder, "text": cfg.text_encoder},
    }
    result["table"] = [
        f"extract bench: {cfg.dataset}, {n} samples, batch {batch_size}, {device}, {cfg.workers} loader workers",
        f"  pipeline (read+decode+tokenize+encode+write): {result['pipeline_samples_per_s']:>9.1f} samples/s",
        f"  encoders alone on pre-made tensors:           {result['pure_forward_samples_per_s']:>9.1f} samples/s"
        f"  (image {pure['image']:.2f} s, text {pure['text']:.2f} s)",
        f"  ratio: {ratio:.2f}" + ("" if math.isfinite(ratio) else " (undefined)"),
    ]
    return result


def run_process_scaling(cfg: ExtractConfig, counts: list[int], limit: int | None = None) -> dict:
    """Wall time of whole `embcache extract` commands run as 1..K cooperating processes (torchrun-style ranks).

    Each count is timed from launch to the last process's exit, model loading included, so the figures are
    what a user waits for. With K processes, each gets max(1, workers // K) loader workers and
    max(1, threads // K) torch threads, so K processes share the same cores as one.
    """
    with bench_root(cfg) as root:
        return _run_process_scaling(replace(cfg, root=root), counts, limit)


def _run_process_scaling(cfg: ExtractConfig, counts: list[int], limit: int | None) -> dict:
    import socket
    import subprocess
    import sys

    threads = torch.get_num_threads()
    rows = []
    for k in counts:
        with tempfile.TemporaryDirectory() as tmp:
            args = [sys.executable, "-m", "embcache.cli", "extract", "--dataset", cfg.dataset, "--root", cfg.root,
                    "--out", f"{tmp}/s.zarr", "--quiet", "--workers", str(max(1, cfg.workers // k)),
                    "--image-encoder", cfg.image_encoder, "--text-encoder", cfg.text_encoder,
                    "--device", cfg.device]
            args += ["--image-checkpoint", cfg.image_checkpoint] if cfg.image_checkpoint else []
            args += ["--batch-size", str(cfg.batch_size)] if cfg.batch_size else []
            args += ["--limit", str(limit)] if limit else []
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                port = sock.getsockname()[1]
            env = {**os.environ, "WORLD_SIZE": str(k), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                   "OMP_NUM_THREADS": str(max(1, threads // k))}
            start = time.perf_counter()
            procs = [subprocess.Popen(args, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for r in range(k)]
            errors = [p.communicate()[1] for p in procs]
            seconds = time.perf_counter() - start
            if any(p.returncode for p in procs):
                raise RuntimeError(f"extract with {k} processes failed:\n" + "\n".join(errors))
            from embcache.store import open_store

            n = open_store(f"{tmp}/s.zarr").n_rows
        rows.append({"processes": k, "samples": n, "seconds": round(seconds, 2), "samples_per_s": round(n / seconds, 2)})
    table = [f"extract as 1..{max(counts)} processes ({threads} cores' threads shared), whole commands timed:"]
    table += [f"  {r['processes']} process(es): {r['seconds']:>7.1f} s, {r['samples_per_s']:>7.1f} samples/s" for r in rows]
    return {"scaling": rows, "table": table}
