"""Caches larger than memory: chunk-by-chunk reads with read-ahead, the chunked epoch order, moments.

`embcache fit --stream` (or automatically above `--memory-budget-gb`) keeps only the per-row metadata
(labels, which modalities a row has, its store row) in memory and reads the embeddings chunk by chunk:

- `ReadAhead` reads blocks of store chunks in a background thread, at most `depth` blocks ahead of the
  consumer, so Zarr reads and decompression overlap training;
- `chunked_order` is the epoch order both the streaming and the in-memory path use under
  `--shuffle chunks`: permute the order of the chunks, group them into windows of W consecutive chunks,
  and shuffle the rows within each window (rows with both modalities and rows with one separately, so
  the training loop can keep its batch layout: both-modality rows first, in a count fixed per step);
- `Moments` accumulates per-dimension means and variances chunk by chunk in float64 (the same numbers
  whether the chunks come from memory or from the store).
"""
from __future__ import annotations

import os
import queue
import threading
from dataclasses import dataclass

import numpy as np
import torch

from embcache.missing import MODALITIES


# ------------------------------------------------------------------------------------------------
# Memory budget
# ------------------------------------------------------------------------------------------------
def available_memory_bytes() -> int:
    """MemAvailable from /proc/meminfo (Linux), else free physical pages."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 1 << 62  # unknown: never stream automatically


def memory_budget_bytes(budget_gb: float, device: torch.device) -> int:
    """`--memory-budget-gb` in bytes; 0 means half the available host memory (and, on CUDA, at most half
    the device's free memory, since the in-memory path keeps the training split on the device)."""
    if budget_gb > 0:
        return int(budget_gb * (1 << 30))
    budget = available_memory_bytes() // 2
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = min(budget, free // 2)
    return budget


# ------------------------------------------------------------------------------------------------
# Blocks of store chunks
# ------------------------------------------------------------------------------------------------
def chunk_groups(index: np.ndarray, chunk_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """(chunk numbers, start offsets) of ascending store rows `index`: rows starts[i]:starts[i+1] of
    `index` lie in chunk chunks[i] (starts has one extra entry, len(index))."""
    chunk_of = index // chunk_rows
    starts = np.flatnonzero(np.diff(chunk_of)) + 1
    starts = np.concatenate([[0], starts, [len(index)]]).astype(np.int64)
    return chunk_of[starts[:-1]], starts


class ReadAhead:
    """Read blocks of rows from a store in a background thread, at most `depth` blocks ahead.

    blocks: one list per block of (chunk number, store rows in that chunk); iterating yields, per block,
    {modality: float32 array (rows of the block, in the given order, D_m)}. Each chunk is read whole
    (a Zarr chunk is the unit of I/O anyway) and the wanted rows taken from it.
    """

    def __init__(self, store, blocks: list[list[tuple[int, np.ndarray]]], depth: int = 2,
                 modalities=MODALITIES):
        self.store, self.blocks, self.modalities = store, blocks, tuple(modalities)
        self.chunk_rows, self.n_rows = int(store.meta["chunk_rows"]), int(store.n_rows)
        self.queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="embcache-read-ahead", daemon=True)
        self.thread.start()

    def read_block(self, block: list[tuple[int, np.ndarray]]) -> dict[str, np.ndarray]:
        parts: dict[str, list[np.ndarray]] = {m: [] for m in self.modalities}
        for chunk, rows in block:
            start = chunk * self.chunk_rows
            stop = min(self.n_rows, start + self.chunk_rows)
            for m in self.modalities:
                data = np.asarray(self.store.root[m]["emb"][start:stop], dtype=np.float32)
                parts[m].append(data[np.asarray(rows) - start])
        return {m: np.concatenate(p) if len(p) != 1 else p[0] for m, p in parts.items()}

    def _put(self, item) -> bool:
        while not self.stop.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        try:
            for block in self.blocks:
                if not self._put(("block", self.read_block(block))):
                    return
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, raised there
            self._put(("error", exc))
            return
        self._put(("end", None))

    def __iter__(self):
        try:
            while True:
                kind, item = self.queue.get()
                if kind == "error":
                    raise item
                if kind == "end":
                    return
                yield item
        finally:
            self.close()

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=5)


def split_blocks(index: np.ndarray, chunk_rows: int) -> list[list[tuple[int, np.ndarray]]]:
    """One block per store chunk holding rows of `index` (ascending), in order: the blocks of a split."""
    chunks, starts = chunk_groups(index, chunk_rows)
    return [[(int(c), index[a:b])] for c, a, b in zip(chunks, starts[:-1], starts[1:])]


# ------------------------------------------------------------------------------------------------
# The chunked epoch order
# ------------------------------------------------------------------------------------------------
@dataclass
class EpochOrder:
    paired: np.ndarray          # positions (train rows) with both modalities, in epoch order
    unpaired: np.ndarray        # the others
    windows: list[np.ndarray]   # the train rows of each window, in the order its block is read
    window_of: np.ndarray       # per train row: its window this epoch
    slot_of: np.ndarray         # per train row: its row in its window's block


def chunked_order(chunk_of: np.ndarray, paired: np.ndarray, window: int, generator: torch.Generator) -> EpochOrder:
    """The epoch order of `--shuffle chunks` (and of streaming).

    chunk_of: per train row (ascending store rows), its store chunk; paired: per train row, has both.
    Permute the chunks; cut the permuted list into windows of `window` chunks; within each window,
    shuffle its paired rows and its unpaired rows. Draws, in this order, from the CPU `generator`:
    one permutation of the chunks, then per window one of its paired and one of its unpaired rows.
    """
    chunks, starts = chunk_groups(chunk_of, 1)
    perm = torch.randperm(len(chunks), generator=generator).numpy()
    n = len(chunk_of)
    window_of, slot_of = np.empty(n, dtype=np.int64), np.empty(n, dtype=np.int64)
    p_parts, u_parts, windows = [], [], []
    for w, first in enumerate(range(0, len(perm), window)):
        rows = np.concatenate([np.arange(starts[c], starts[c + 1]) for c in perm[first:first + window]])
        windows.append(rows)
        window_of[rows], slot_of[rows] = w, np.arange(len(rows))
        both = paired[rows]
        p, u = rows[both], rows[~both]
        p_parts.append(p[torch.randperm(len(p), generator=generator).numpy()])
        u_parts.append(u[torch.randperm(len(u), generator=generator).numpy()])
    return EpochOrder(np.concatenate(p_parts), np.concatenate(u_parts), windows, window_of, slot_of)


class StreamedBatches:
    """The embeddings of an epoch's batches, read window by window in a background thread.

    steps: the steps this process runs, each (train rows of the batch, in batch order). Windows are read
    in order from the first one the first step needs to the last one the last step needs; a window is
    dropped once no later step needs it. Batches are gathered from the concatenation of the windows the
    current step spans (rebuilt only when that span changes), so a batch holds exactly the rows, in
    exactly the order, the in-memory path gathers.
    """

    def __init__(self, store, train_index: np.ndarray, order: EpochOrder, steps: list[np.ndarray],
                 device: torch.device, depth: int = 2):
        self.order, self.steps, self.device = order, steps, device
        spans = [(int(order.window_of[r].min()), int(order.window_of[r].max())) for r in steps if len(r)]
        self.first = spans[0][0] if spans else 0
        self.last = spans[-1][1] if spans else -1
        chunk_rows = int(store.meta["chunk_rows"])
        blocks = []
        for rows in order.windows[self.first:self.last + 1]:
            index = train_index[rows]
            chunks, starts = chunk_groups(index, chunk_rows)
            blocks.append([(int(c), index[a:b]) for c, a, b in zip(chunks, starts[:-1], starts[1:])])
        self.reader = ReadAhead(store, blocks, depth)

    def __iter__(self):
        """Yield {modality: (B, D) tensor on the device} per step."""
        loaded: dict[int, dict[str, torch.Tensor]] = {}
        blocks = iter(self.reader)
        next_window, span, buffer, offsets = self.first, None, None, None
        try:
            for rows in self.steps:
                win = self.order.window_of[rows]
                lo, hi = (int(win.min()), int(win.max())) if len(rows) else (next_window, next_window - 1)
                while next_window <= hi:
                    block = next(blocks)
                    loaded[next_window] = {m: torch.from_numpy(a).to(self.device) for m, a in block.items()}
                    next_window += 1
                for w in [w for w in loaded if w < lo]:
                    del loaded[w]
                if span != (lo, hi):
                    span = (lo, hi)
                    keep = range(lo, hi + 1)
                    sizes = [len(self.order.windows[w]) for w in keep]
                    offsets = np.zeros(max(hi + 1, 1), dtype=np.int64)
                    offsets[lo:hi + 1] = np.cumsum([0] + sizes[:-1]) if sizes else []
                    buffer = {m: (loaded[lo][m] if lo == hi else torch.cat([loaded[w][m] for w in keep]))
                              for m in MODALITIES} if sizes else None
                local = torch.as_tensor(offsets[win] + self.order.slot_of[rows], device=self.device)
                yield {m: buffer[m][local] for m in MODALITIES} if buffer is not None else None
        finally:
            self.reader.close()


# ------------------------------------------------------------------------------------------------
# Moments
# ------------------------------------------------------------------------------------------------
class Moments:
    """Per-dimension count, mean and sum of squared deviations, merged block by block in float64 (Chan et
    al.); `mean_std()` gives float32 mean and population std, as numpy's mean(0) / std(0)."""

    def __init__(self, dim: int):
        self.n, self.mean, self.m2 = 0, np.zeros(dim), np.zeros(dim)

    def add(self, block: np.ndarray) -> None:
        if len(block) == 0:
            return
        block = block.astype(np.float64)
        n_b, mean_b = len(block), block.mean(0)
        m2_b = ((block - mean_b) ** 2).sum(0)
        n = self.n + n_b
        delta = mean_b - self.mean
        self.mean = self.mean + delta * (n_b / n)
        self.m2 = self.m2 + m2_b + delta ** 2 * (self.n * n_b / n)
        self.n = n

    def mean_std(self) -> tuple[np.ndarray, np.ndarray]:
        var = self.m2 / max(self.n, 1)
        return self.mean.astype(np.float32), np.sqrt(var).astype(np.float32)
