"""`embcache extract`: run the frozen encoders once over a dataset and write the feature cache.

The pipeline has three stages that overlap:
  loader workers (processes)  read + decode + resize images, tokenize texts      -> batches
  main process                runs the encoders on the device                      -> embeddings
  writer thread               buffers rows and writes whole chunks to Zarr         -> store
so the encoder is rarely left waiting for input or output.
"""
from __future__ import annotations

import collections
import hashlib
import io
import json
import os
import queue
import shutil
import threading
import time
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch.utils.data import DataLoader

from embcache import datasets as ds
from embcache import store as st
from embcache.config import ExtractConfig
from embcache.encoders import Encoder, load_image_encoder, load_text_encoder
from embcache.errors import EmbcacheError
from embcache.images import DECODE_REASONS, read_image
from embcache.runtime import Ranks, bind_local_cuda_device, resolve_device

# The reason vocabulary every store starts with: the readers' reasons, then decoding's (embcache/images.py).
BASE_REASONS = ("present", "missing_field", "missing_file", "empty_text", "non_utf8_text") + DECODE_REASONS


class ExtractError(EmbcacheError):
    """An extraction that cannot start (bad arguments, fingerprint mismatch, malformed dataset)."""


@dataclass
class ExtractReport:
    out: str
    n_rows: int
    present: dict[str, int]
    problems: dict[str, int]
    seconds: float                     # the whole command, model loading included
    samples_per_s: float               # rows / seconds of the pipeline loop (read, decode, encode, write)
    written: int = 0                   # rows this process encoded in this run (fewer after a resume, or per rank)
    skipped: bool = False


# ---------------------------------------------------------------- loading (runs in worker processes)


class SampleSource(torch.utils.data.Dataset):
    """Index -> (index, preprocessed image or None, decode failure reason, text or None)."""

    def __init__(self, samples: list[ds.Sample], image_preprocess, with_image: bool, with_text: bool):
        self.samples = samples
        self.image_preprocess = image_preprocess
        self.with_image = with_image
        self.with_text = with_text

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        sample = self.samples[index]
        pixels, failure = None, None
        if self.with_image and sample.image is not None:
            source = sample.image if isinstance(sample.image, str) else io.BytesIO(sample.image.read())
            pixels, failure = read_image(source, self.image_preprocess)
        return index, pixels, failure, sample.text if self.with_text else None


class Collate:
    """Batch of samples -> the tensors each encoder needs, plus which rows have which modality."""

    def __init__(self, text_preprocess):
        self.text_preprocess = text_preprocess

    def __call__(self, items):
        rows = torch.tensor([it[0] for it in items], dtype=torch.long)
        image_pos = [k for k, it in enumerate(items) if it[1] is not None]
        text_pos = [k for k, it in enumerate(items) if it[3] is not None]
        return {
            "rows": rows,
            "image_pos": torch.tensor(image_pos, dtype=torch.long),
            "pixels": torch.stack([items[k][1] for k in image_pos]) if image_pos else None,
            "failures": [it[2] for it in items],
            "text_pos": torch.tensor(text_pos, dtype=torch.long),
            "tokens": self.text_preprocess([items[k][3] for k in text_pos])
            if text_pos and self.text_preprocess else None,
        }


# ---------------------------------------------------------------- writing (runs in a thread)


class ChunkWriter:
    """Writes finished row chunks from a background thread, then records each chunk as done.

    Batches never cross a chunk boundary and arrive in order, so a chunk is complete when its last row arrives.
    The data of a chunk is written before its `chunks_done` flag: a process killed at any moment leaves either a
    committed chunk or one that a restart will redo.
    """

    def __init__(self, root, modalities: dict[str, int], meta: dict, emb_dtype: str,
                 hidden: dict[str, tuple[int, int]] | None = None):
        self.root, self.meta = root, meta
        rows = meta["chunk_rows"]
        self.buffers = {m: (np.zeros((rows, dim), dtype=emb_dtype), np.zeros(rows, bool), np.zeros(rows, np.uint8))
                        for m, dim in modalities.items()}
        for m, (tokens, width) in (hidden or {}).items():  # block key "<m>/hidden": (states, mask)
            self.buffers[f"{m}/hidden"] = (np.zeros((rows, tokens, width), emb_dtype), np.zeros((rows, tokens), bool))
        self.queue: queue.Queue = queue.Queue(maxsize=4)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="embcache-writer", daemon=True)
        self.thread.start()

    def put(self, start: int, block: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]) -> None:
        if self.error:
            raise self.error
        self.queue.put((start, block))

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join()
        if self.error:
            raise self.error

    def _run(self) -> None:
        try:
            while (item := self.queue.get()) is not None:
                self._add(*item)
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread
            self.error = exc
            while self.queue.get() is not None:  # drain so the producer never blocks forever
                pass

    def _add(self, start: int, block) -> None:
        chunk = start // self.meta["chunk_rows"]
        chunk_start, chunk_stop = st.chunk_bounds(self.meta, chunk)
        offset = start - chunk_start
        n = len(next(iter(block.values()))[0])
        for m, arrays in block.items():
            for buf, src in zip(self.buffers[m], arrays):
                buf[offset:offset + n] = src
        if start + n == chunk_stop:
            size = chunk_stop - chunk_start
            for m, arrays in self.buffers.items():
                if m.endswith("/hidden"):
                    st.write_hidden(self.root, m.split("/")[0], chunk_start, arrays[0][:size], arrays[1][:size])
                    continue
                emb, present, reason = arrays
                st.write_rows(self.root, m, chunk_start, emb[:size], present[:size], reason[:size])
            st.mark_chunk_done(self.root, chunk)


# ---------------------------------------------------------------- the run


def load_encoders(cfg: ExtractConfig) -> dict[str, Encoder]:
    return {
        "image": load_image_encoder(cfg.image_encoder, cfg.image_checkpoint, cfg.image_bitfit, cfg.dtype),
        "text": load_text_encoder(cfg.text_encoder, cfg.text_pooling, cfg.text_max_length, cfg.text_bitfit,
                                  cfg.dtype),
    }


def labels_array(dataset: ds.Dataset) -> np.ndarray:
    if dataset.task == "multilabel":
        labels = np.zeros((len(dataset.samples), len(dataset.classes)), dtype=np.uint8)
        for row, sample in enumerate(dataset.samples):
            labels[row, list(sample.label)] = 1
        return labels
    return np.array([int(s.label) for s in dataset.samples], dtype=np.int64)


def reason_vocabulary(dataset: ds.Dataset) -> list[str]:
    extra = sorted({r for s in dataset.samples for r in s.absent.values()} - set(BASE_REASONS))
    return list(BASE_REASONS) + extra


def encode_rows(encoder: Encoder, batch, device: torch.device, capture=None) -> torch.Tensor:
    """Encode, halving the batch on a CUDA out-of-memory error instead of failing the run.

    capture: a hidden.StateCapture hooked into the encoder; what a failed attempt recorded is dropped."""
    mark = len(capture.states) if capture is not None else 0
    try:
        return encoder.encode(batch, device)
    except torch.cuda.OutOfMemoryError:
        if capture is not None:
            del capture.states[mark:]
        torch.cuda.empty_cache()
        n = len(batch) if isinstance(batch, torch.Tensor) else len(batch["input_ids"])
        if n == 1:
            raise
        if isinstance(batch, torch.Tensor):
            halves = (batch[: n // 2], batch[n // 2:])
        else:
            halves = ({k: v[: n // 2] for k, v in batch.items()}, {k: v[n // 2:] for k, v in batch.items()})
        return torch.cat([encode_rows(encoder, half, device, capture) for half in halves])


@dataclass
class HiddenSpec:
    """What `--cache-layers k` stores for one modality."""

    capture: object                    # hidden.StateCapture on the input of block `index`
    index: int
    tokens: int                        # T (text: the max length; shorter rows are zero-padded)
    width: int
    text: bool


def setup_hidden(cfg: ExtractConfig, encoders: dict[str, Encoder], log) -> dict[str, HiddenSpec]:
    """Hook the input of the last `cache_layers` blocks of every encoder that has transformer blocks and record
    k in its attrs (and so in the fingerprint); say so for the others, which store no states."""
    if cfg.cache_layers < 0:
        raise ExtractError(f"--cache-layers must be >= 0, got {cfg.cache_layers}")
    if not cfg.cache_layers:
        return {}
    from embcache import hidden

    specs: dict[str, HiddenSpec] = {}
    for m, enc in encoders.items():
        backend = enc.attrs["backend"]
        if hidden.blocks_of(backend, enc.module) is None:
            log(f"--cache-layers {cfg.cache_layers}: the {m} encoder {enc.attrs['model']} stores no hidden states: "
                f"{hidden.why_no_blocks(backend, enc.module)}")
            continue
        try:
            capture, index = hidden.attach_capture(backend, enc.module, cfg.cache_layers)
        except hidden.PromptError as exc:
            raise ExtractError(f"{m} encoder {enc.attrs['model']}: {exc}") from exc
        if m == "text":
            tokens, width = enc.preprocess.max_length, int(enc.module.config.hidden_size)
        else:
            size = enc.attrs["preprocess"]["size"]
            with torch.inference_mode():
                enc.module(torch.zeros(1, 3, size, size))
            tokens, width = capture.states.pop().shape[1:]
            capture.states.clear()
        enc.attrs.update(cache_layers=cfg.cache_layers, hidden_layer_index=index)
        specs[m] = HiddenSpec(capture, index, int(tokens), int(width), m == "text")
    return specs


def hidden_chunk_rows(specs: dict[str, HiddenSpec], dtype: str, target_bytes: int = 64 << 20) -> int:
    """Rows per chunk so that the largest hidden-state chunk is about `target_bytes` (a power of 2, >= 8)."""
    row = max(s.tokens * s.width for s in specs.values()) * np.dtype(dtype).itemsize
    return 1 << int(np.log2(max(8, target_bytes // row)))


def check_room(cfg: ExtractConfig, specs: dict[str, HiddenSpec], n_rows: int, log) -> None:
    """Print the size the hidden states imply; refuse to start where a local destination lacks the room."""
    from embcache.hidden import hidden_bytes

    sizes = {m: hidden_bytes(n_rows, s.tokens, s.width, cfg.dtype) for m, s in specs.items()}
    total = sum(sizes.values())
    def human(n: int) -> str:
        return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"

    parts = ", ".join(f"{m} {n_rows} x {s.tokens} x {s.width} {cfg.dtype} = {human(sizes[m])}"
                      for m, s in specs.items())
    log(f"--cache-layers {cfg.cache_layers}: hidden states need up to {human(total)} ({parts}; "
        "uncompressed, text padding compresses away)")
    if st.local_path(cfg.out) is None:
        return  # remote stores: no portable way to ask for free space
    path = os.path.abspath(st.local_path(cfg.out))
    existing = st.read_meta(cfg.out)
    if existing is not None and not cfg.overwrite and existing.get("fingerprint") and os.path.isdir(path):
        done = st.chunks_done(st.open_store(cfg.out, require_complete=False).root)  # a resume needs the rest
        total = int(total * (1 - done.mean()))
    probe = path
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    free = shutil.disk_usage(probe).free
    if total > free:
        raise ExtractError(f"{cfg.out}: the hidden states of --cache-layers {cfg.cache_layers} need up to "
                           f"{human(total)} and {probe} has {human(free)} free; free space, "
                           "lower --cache-layers or --text-max-length, or choose another --out")


def hidden_block(spec: HiddenSpec, n: int, pos: np.ndarray, inputs, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """The captured states of one batch as (n, T, W) and the (n, T) mask: zeros for absent rows and, for
    text, beyond each row's real length."""
    states = np.zeros((n, spec.tokens, spec.width), dtype=dtype)
    mask = np.zeros((n, spec.tokens), dtype=bool)
    if len(pos):
        got = torch.cat(spec.capture.states)
        spec.capture.states.clear()
        if dtype == "float16":
            got = got.clamp(-65504, 65504)
        if spec.text:
            real = inputs["attention_mask"].bool()
            got = got * real.unsqueeze(-1).to(got.device)
            states[pos, :got.shape[1]] = got.cpu().numpy()
            mask[pos, :real.shape[1]] = real.numpy()
        else:
            states[pos] = got.cpu().numpy()
            mask[pos] = True
    return states, mask


def chunk_batches(meta: dict, chunks: list[int], batch_size: int) -> list[list[int]]:
    """Row batches that never cross a chunk boundary, so a chunk's batches (and values) do not depend on
    which chunks a run, a restart or another rank handles."""
    batches = []
    for chunk in chunks:
        start, stop = st.chunk_bounds(meta, chunk)
        batches += [list(range(b, min(b + batch_size, stop))) for b in range(start, stop, batch_size)]
    return batches


def samples_sha256(dataset: ds.Dataset) -> str:
    """Fingerprint of what the reader found: ids, image paths (relative to the dataset root, so a moved dataset
    still matches) or references (shard name and size, member offset and size), texts, labels and splits. Image
    bytes are not read: that would cost a pass over the data."""
    base = dataset.source if os.path.isdir(dataset.source) else os.path.dirname(dataset.source)
    digest = hashlib.sha256()
    for s in dataset.samples:
        image = (None if s.image is None else os.path.relpath(s.image, base) if isinstance(s.image, str)
                 else s.image.fingerprint())
        digest.update(json.dumps([s.id, image, s.text, s.label, s.split, sorted(s.absent.items())]).encode())
    return digest.hexdigest()


def prepare_store(cfg: ExtractConfig, dataset: ds.Dataset, enc_attrs: dict, log) -> tuple[object, bool]:
    """Create the store, or reopen one this same extraction started. Returns (root, already complete)."""
    dataset_meta = {"name": dataset.name, "source": dataset.source, "options": cfg.dataset_options,
                    "samples_sha256": samples_sha256(dataset)}
    existing = st.read_meta(cfg.out)
    if existing is not None and not cfg.overwrite:
        wanted = st.fingerprint({"dataset": {**dataset_meta, "n_rows": len(dataset.samples)}}, enc_attrs)
        diffs = st.fingerprint_diff(existing.get("fingerprint", {}), wanted)
        if diffs:
            raise ExtractError(f"{cfg.out} already holds features made differently ({'; '.join(diffs)}); "
                               "pass --overwrite to replace it, or choose another --out")
        if cfg.chunk_rows and cfg.chunk_rows != existing["chunk_rows"]:
            raise ExtractError(f"{cfg.out} was started with --chunk-rows {existing['chunk_rows']}; "
                               "resume with the same value or pass --overwrite")
        root = st.open_store(cfg.out, require_complete=False, mode="r+").root
        if existing.get("complete"):
            log(f"{cfg.out} is already complete with the same encoders and data: nothing to do")
        else:
            done = st.chunks_done(root)
            log(f"{cfg.out}: resuming, {int(done.sum())} of {len(done)} chunks already written")
        return root, bool(existing.get("complete"))
    try:
        root = st.create_store(
            cfg.out, ids=[s.id for s in dataset.samples],
            split=np.array([st.SPLIT_CODES[s.split] for s in dataset.samples], dtype=np.int8),
            labels=labels_array(dataset), dataset=dataset_meta,
            task={"type": dataset.task, "classes": list(dataset.classes)}, encoders=enc_attrs,
            reasons=reason_vocabulary(dataset), chunk_rows=cfg.chunk_rows, overwrite=True)
    except st.StoreError as exc:
        raise ExtractError(str(exc)) from exc
    except OSError as exc:
        raise ExtractError(f"cannot create the store {cfg.out}: {exc}") from exc
    return root, False


def count_problems(root, dataset: ds.Dataset) -> dict[str, int]:
    """Reader problems plus decode failures, the latter counted from the stored reason codes so that resumed
    and multi-process runs count every row exactly once."""
    problems = collections.Counter(dataset.problems)
    names = list(root["image"].attrs["reasons"])
    codes = np.bincount(np.asarray(root["image"]["reason"][:]), minlength=len(names))
    for reason in DECODE_REASONS:
        if codes[names.index(reason)]:
            problems[reason] += int(codes[names.index(reason)])
    return dict(sorted(problems.items()))


def extract(cfg: ExtractConfig, progress: bool = True, log=print) -> ExtractReport:
    started = time.perf_counter()
    try:
        dataset = ds.open_dataset(cfg.dataset, cfg.root, **cfg.dataset_options)
    except ds.DatasetError as exc:
        raise ExtractError(str(exc)) from exc
    if cfg.limit is not None:
        dataset.samples = dataset.samples[:cfg.limit]
    if not dataset.samples:
        raise ExtractError(f"{cfg.root}: the {cfg.dataset} reader found no samples")
    device = bind_local_cuda_device(resolve_device(cfg.device))  # torchrun: this rank's GPU, not cuda:0
    batch_size = cfg.batch_size or (256 if device.type == "cuda" else 64)
    encoders = load_encoders(cfg)
    ranks = Ranks.from_env(torch.device("cpu"))  # gloo: the ranks only exchange a few small messages
    n = len(dataset.samples)
    hidden = setup_hidden(cfg, encoders, log if ranks.rank == 0 else (lambda *_: None))
    if hidden and cfg.chunk_rows is None:
        cfg = replace(cfg, chunk_rows=min(hidden_chunk_rows(hidden, cfg.dtype),
                                         st.default_chunk_rows(max(e.dim for e in encoders.values()))))

    # Rank 0 checks, creates or reopens the store and decides the pending chunks; every rank gets the same
    # answer (or the same error), so no rank works from a list another rank has already changed.
    failure, setup = None, None
    if ranks.rank == 0:
        try:
            if hidden:
                check_room(cfg, hidden, n, log)
            root, complete = prepare_store(cfg, dataset, {m: e.attrs for m, e in encoders.items()}, log)
            if hidden and not complete and "hidden" not in root[next(iter(hidden))]:
                for m, spec in hidden.items():
                    st.create_hidden(root, m, spec.tokens, spec.width, cfg.dtype, with_mask=spec.text)
            setup = (complete, [int(c) for c in np.flatnonzero(~st.chunks_done(root))])
        except (ExtractError, st.StoreError, OSError) as exc:
            failure, setup = exc, str(exc)
    setup = ranks.broadcast(setup)
    if failure is not None:
        raise failure
    if isinstance(setup, str):
        raise ExtractError(f"rank 0 could not prepare {cfg.out}: {setup}")
    complete, pending = setup
    if ranks.rank != 0:
        root = st.open_store(cfg.out, require_complete=False, mode="r+").root
    meta = dict(root.attrs[st.ATTRS_KEY])
    if complete:
        ranks.close()
        return ExtractReport(cfg.out, n, present_counts(root), meta.get("problems", {}), 0.0, 0.0, skipped=True)

    mine = pending[ranks.rank::ranks.world]  # whole chunks per rank: no two writers share a chunk file
    batches = chunk_batches(meta, mine, batch_size)
    code = {name: i for i, name in enumerate(root["image"].attrs["reasons"])}
    # The readers' absence reasons as codes, once; per batch only decode failures are added.
    reader_reasons = {m: np.array([code.get(s.absent.get(m), 0) for s in dataset.samples], dtype=np.uint8)
                      for m in encoders}
    for enc in encoders.values():
        enc.to(device)
    loader = DataLoader(
        SampleSource(dataset.samples, encoders["image"].preprocess, True, True), batch_sampler=batches,
        num_workers=cfg.workers, collate_fn=Collate(encoders["text"].preprocess),
        pin_memory=device.type == "cuda", prefetch_factor=4 if cfg.workers else None)
    writer = ChunkWriter(root, {m: e.dim for m, e in encoders.items()}, meta, cfg.dtype,
                         {m: (s.tokens, s.width) for m, s in hidden.items()})
    todo = sum(len(b) for b in batches)

    from tqdm.auto import tqdm

    bar = tqdm(total=todo, unit="sample", desc="extract" if ranks.world == 1 else f"extract rank {ranks.rank}",
               disable=not progress)
    loop_started = time.perf_counter()
    try:
        for batch in loader:
            rows = batch["rows"].numpy()
            block = {}
            for m, pos_key, input_key in (("image", "image_pos", "pixels"), ("text", "text_pos", "tokens")):
                emb = np.zeros((len(rows), encoders[m].dim), dtype=cfg.dtype)
                present = np.zeros(len(rows), dtype=bool)
                reason = reader_reasons[m][rows]  # fancy indexing: a copy, safe to modify
                if m == "image":
                    for k, failure in enumerate(batch["failures"]):
                        if failure is not None and not reason[k]:
                            reason[k] = code[failure]
                pos = batch[pos_key].numpy()
                spec = hidden.get(m)
                if len(pos):
                    emb[pos] = encode_rows(encoders[m], batch[input_key], device,
                                           spec.capture if spec else None).cpu().numpy()
                    present[pos] = True
                if spec:
                    block[f"{m}/hidden"] = hidden_block(spec, len(rows), pos, batch[input_key], cfg.dtype)
                block[m] = (emb, present, reason)
            writer.put(int(rows[0]), block)
            bar.update(len(rows))
    finally:
        bar.close()
        try:
            writer.close()
        except OSError as exc:
            done = int(st.chunks_done(root).sum())
            raise ExtractError(f"could not write to {cfg.out}: {exc}. The {done} chunks written so far are "
                               "kept; free space or fix permissions and re-run the same command to resume") from exc

    loop_seconds = time.perf_counter() - loop_started
    ranks.barrier()
    problems = count_problems(root, dataset)
    seconds = time.perf_counter() - started
    rate = todo / loop_seconds if loop_seconds > 0 else 0.0
    if ranks.rank == 0:
        done = st.chunks_done(root)
        if not done.all():
            raise ExtractError(f"{cfg.out}: {int((~done).sum())} chunks were not written; re-run the same command "
                               "to finish them")
        stats = {"batch_size": batch_size, "device": str(device), "workers": cfg.workers, "processes": ranks.world,
                 "seconds": round(seconds, 3), "samples_per_s": round(rate, 2)}
        st.mark_complete(root, problems, extra={"extract": stats})
    ranks.close()
    return ExtractReport(cfg.out, n, present_counts(root), problems, seconds, rate, written=todo)


def present_counts(root) -> dict[str, int]:
    """Rows per modality that hold an embedding, over the whole store (not only this run's rows)."""
    return {m: int(np.asarray(root[m]["present"][:]).sum()) for m in root.attrs[st.ATTRS_KEY]["modalities"]}
