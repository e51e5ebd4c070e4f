"""Synthetic feature caches with a known latent structure, for tests and `embcache bench fit`.

Each sample has a latent vector z = [z_shared, z_image_only, z_text_only] (standard normal). The image
embedding is a random linear map of [z_shared, z_image_only] plus noise and an offset, the text embedding
likewise from [z_shared, z_text_only]. So:

- text is predictable from the image (and back) only through z_shared: the best predictor is linear and
  its R2 is set by `shared_dim`, `private_dim` and `noise` (a ridge regression gets close to it);
- labels depend on all of z, so each modality carries information the other lacks and late fusion helps;
- embeddings have a non-zero mean, so "zero" and "mean" imputation differ, as with real encoders.

The draw keeps its generative model (`meta["latent"]`), so a multiclass cache knows the best accuracy any
classifier can reach on rows that show a given subset of the modalities (`bayes_accuracy`): the ceiling against
which a margin over zero / mean fill can be read.
"""
from __future__ import annotations

import hashlib

import numpy as np

from embcache.hidden import HIDDEN_KEY, MASK_KEY, PromptError
from embcache.store import SPLIT_CODES, CachedFeatures, create_store, mark_complete, write_rows

REASONS = ["present", "missing_field", "missing_file", "empty_text"]
LABEL_NOISE = 0.3  # std of the noise added to the class scores before the argmax / thresholds
MMIMDB_SIZES = {"n_train": 15_552, "n_val": 2_608, "n_test": 7_799}


def _orthonormal_rows(rng: np.random.Generator, k: int, d: int) -> np.ndarray:
    """k orthonormal rows in R^d (k <= d), scaled so the signal per dimension is about 1."""
    q, _ = np.linalg.qr(rng.standard_normal((d, k)))
    return q.T * np.sqrt(d / k)


def encoder_attrs(modality: str, dim: int, dtype: str, seed: int) -> dict:
    sha = hashlib.sha256(f"synthetic-{modality}-{dim}-{seed}".encode()).hexdigest()
    return {"backend": "synthetic", "model": f"synthetic-{modality}-{dim}", "checkpoint_sha256": sha,
            "bitfit_sha256": None, "preprocess": {}, "pooling": "none", "dim": dim, "dtype": dtype,
            "versions": {}}


def make_features(*, n_train: int = 2000, n_val: int = 500, n_test: int = 1000,
                  d_image: int = 64, d_text: int = 48, n_classes: int = 8, task_type: str = "multilabel",
                  shared_dim: int = 16, private_dim: int = 4, noise: float = 0.2,
                  absent_image: float = 0.0, absent_text: float = 0.0, absent_both: float = 0.0,
                  seed: int = 0) -> CachedFeatures:
    """An in-memory cache (what `FeatureStore.load()` returns); `write_store` puts it on disk.

    absent_*: fractions of rows the *data* lacks (image only, text only, both), before any protocol.
    """
    if shared_dim + private_dim > min(d_image, d_text):
        raise ValueError(f"shared_dim + private_dim = {shared_dim + private_dim} must not exceed the "
                         f"embedding widths ({d_image}, {d_text})")
    rng = np.random.default_rng(seed)
    n = n_train + n_val + n_test
    k = shared_dim + 2 * private_dim
    z = rng.standard_normal((n, k)).astype(np.float64)
    z_shared, z_img, z_txt = np.split(z, [shared_dim, shared_dim + private_dim], axis=1)
    emb = {}
    latent = {"noise": noise, "maps": {}, "offsets": {}}  # embedding = z @ maps[m] + offsets[m] + noise * N(0, I)
    for m, private, dim in (("image", z_img, d_image), ("text", z_txt, d_text)):
        rows = _orthonormal_rows(rng, shared_dim + private_dim, dim)
        signal = np.concatenate([z_shared, private], axis=1) @ rows
        offset = rng.normal(0.5, 0.5, size=dim)
        emb[m] = (signal + noise * rng.standard_normal((n, dim)) + offset).astype(np.float32)
        latent["maps"][m] = np.zeros((k, dim))  # the same map on all of z: zero rows for the other's private part
        latent["maps"][m][:shared_dim] = rows[:shared_dim]
        start = shared_dim if m == "image" else shared_dim + private_dim
        latent["maps"][m][start:start + private_dim] = rows[shared_dim:]
        latent["offsets"][m] = offset

    # Labels from all of z (shared and both private parts), with label noise.
    latent["score"] = rng.standard_normal((k, n_classes)) / np.sqrt(k)
    score = z @ latent["score"] + LABEL_NOISE * rng.standard_normal((n, n_classes))
    if task_type == "multilabel":
        prevalence = rng.uniform(0.1, 0.4, size=n_classes)
        thresholds = [np.quantile(score[:, c], 1 - prevalence[c]) for c in range(n_classes)]
        labels = (score > np.array(thresholds)).astype(np.uint8)
    elif task_type == "multiclass":
        labels = score.argmax(axis=1).astype(np.int64)
    elif task_type == "binary":
        labels = (score[:, 0] > 0).astype(np.int64)
        n_classes = 2
    else:
        raise ValueError(f"unknown task type {task_type!r}")

    # Which modalities the data itself lacks; mutually exclusive groups.
    u = rng.random(n)
    lacks_both = u < absent_both
    lacks_image = (u >= absent_both) & (u < absent_both + absent_image)
    lacks_text = (u >= absent_both + absent_image) & (u < absent_both + absent_image + absent_text)
    present = {"image": ~(lacks_both | lacks_image), "text": ~(lacks_both | lacks_text)}
    for m in present:
        emb[m][~present[m]] = 0.0  # the cache's contract: absent rows hold zeros

    split = np.repeat(np.array([SPLIT_CODES["train"], SPLIT_CODES["val"], SPLIT_CODES["test"]], dtype=np.int8),
                      [n_train, n_val, n_test])
    rng.shuffle(split)
    return CachedFeatures(
        ids=np.array([f"syn{seed}-{i:07d}" for i in range(n)], dtype=object), split=split, labels=labels,
        task_type=task_type, classes=[f"class{c}" for c in range(n_classes)], emb=emb, present=present,
        encoders={m: encoder_attrs(m, emb[m].shape[1], "float32", seed) for m in ("image", "text")},
        meta={"dataset": {"name": "synthetic", "n_rows": n}, "latent": latent},
    )


def label_shared_share(features: CachedFeatures) -> float:
    """How much of the label lives in what the two modalities share: of the class scores' variance between classes
    (`make_features`' score map, centred over classes; the latent is standard normal), the share on the latent
    dimensions both modalities see. A prediction of one modality from the other carries that part and none of the
    other's private dimensions, so predict's margin follows it across draws of one config (BENCHMARKS.md, stop 33)."""
    latent = features.meta["latent"]
    seen = {m: np.abs(latent["maps"][m]).sum(axis=1) > 0 for m in ("image", "text")}
    score = latent["score"] - latent["score"].mean(axis=1, keepdims=True)
    per_dim = (score ** 2).sum(axis=1)
    return float(per_dim[seen["image"] & seen["text"]].sum() / per_dim.sum())


def bayes_accuracy(features: CachedFeatures, rows: np.ndarray, show: dict[str, np.ndarray], *,
                   samples: int = 2000, seed: int = 0) -> float:
    """The Bayes-optimal accuracy of a multiclass synthetic cache (`make_features`) on `rows` (indices), each row
    showing the modalities `show` marks (bool, aligned with `rows`): for each row, the exact Gaussian posterior
    of the latent given what it shows, the class probabilities under it by Monte Carlo (`samples` draws), and
    the most probable class. No classifier trained on the cache can beat it but by luck."""
    if features.task_type != "multiclass":
        raise ValueError(f"bayes_accuracy needs a multiclass cache, not {features.task_type}")
    latent, rng = features.meta["latent"], np.random.default_rng(seed)
    k = latent["score"].shape[0]
    rows = np.asarray(rows)
    right = 0
    for pattern in ((), ("image",), ("text",), ("image", "text")):
        mask = np.ones(len(rows), dtype=bool)
        for m in ("image", "text"):
            mask &= np.asarray(show[m]) == (m in pattern)
        picked = rows[mask]
        if not len(picked):
            continue
        maps = np.concatenate([latent["maps"][m] for m in pattern], axis=1) if pattern else np.zeros((k, 0))
        # z ~ N(0, I), x = z @ maps + noise: posterior precision I + maps maps^T / noise^2
        cov = np.linalg.inv(np.eye(k) + maps @ maps.T / latent["noise"] ** 2)
        centred = (np.concatenate([features.emb[m][picked].astype(np.float64) - latent["offsets"][m] for m in pattern],
                                  axis=1) if pattern else np.zeros((len(picked), 0)))
        mean = centred @ maps.T @ cov / latent["noise"] ** 2
        root = np.linalg.cholesky(cov)
        for start in range(0, len(picked), 64):  # rows in blocks: (block, samples, classes) stays small
            block = slice(start, start + 64)
            z = mean[block, None, :] + rng.standard_normal((len(mean[block]), samples, k)) @ root.T
            scores = z @ latent["score"] + LABEL_NOISE * rng.standard_normal(z.shape[:2] + latent["score"].shape[1:])
            votes = np.eye(scores.shape[-1], dtype=np.int32)[scores.argmax(-1)].sum(1)
            right += int((votes.argmax(1) == features.labels[picked[block]]).sum())
    return right / len(rows)


def write_store(url: str, features: CachedFeatures, *, dtype: str = "float32", overwrite: bool = True) -> str:
    """Write `features` as a complete embcache store (docs/cache-format.md)."""
    encoders = {m: {**enc, "dtype": dtype} for m, enc in features.encoders.items()}
    root = create_store(url, ids=list(features.ids), split=features.split, labels=features.labels,
                        dataset={"name": "synthetic", "source": "embcache.bench.synthetic"},
                        task={"type": features.task_type, "classes": features.classes},
                        encoders=encoders, reasons=REASONS, overwrite=overwrite)
    problems = {}
    for m, emb in features.emb.items():
        present = features.present[m]
        reason = np.where(present, 0, REASONS.index("missing_file")).astype(np.uint8)
        write_rows(root, m, 0, emb, present, reason)
        problems[f"{m}_missing_file"] = int((~present).sum())
    mark_complete(root, problems)
    return url


def make_store(url: str, *, dtype: str = "float32", **kw) -> str:
    """`make_features(**kw)` written to `url`."""
    return write_store(url, make_features(**kw), dtype=dtype)


def synthetic_hidden(features, modality: str, tokens: int, width: int, *, seed: int = 0,
                     noise: float = 0.3, min_tokens: int | None = None) -> None:
    """Add hidden states that carry the modality's embedding to in-memory features (tests, `bench fit`).

    Token t of a row is its standardised embedding through a fixed random map R_t (W x D), plus noise, layer-
    normalised like BERT's hidden states; text rows get random real lengths in [min_tokens, tokens]. The
    encoder attrs are left to the caller (they must name a real encoder with `cache_layers`).
    """
    rng = np.random.default_rng(seed)
    emb = features.emb[modality]
    present = features.present[modality]
    z = ((emb - emb[present].mean(0)) / emb[present].std(0).clip(1e-6)).astype(np.float32)
    maps = rng.standard_normal((tokens, emb.shape[1], width)).astype(np.float32) / np.sqrt(emb.shape[1])
    n = len(emb)
    lengths = rng.integers(min_tokens or tokens, tokens + 1, size=n)
    mask = (np.arange(tokens)[None, :] < lengths[:, None]) & present[:, None]
    states = np.zeros((n, tokens, width), dtype=np.float16)
    for start in range(0, n, 2048):  # in row blocks: float32 temporaries stay small
        rows = slice(start, start + 2048)
        block = np.einsum("nd,tdw->ntw", z[rows], maps)
        block += noise * rng.standard_normal(block.shape).astype(np.float32)
        block = (block - block.mean(-1, keepdims=True)) / block.std(-1, keepdims=True)
        block[~mask[rows]] = 0.0
        states[rows] = block
    features.emb[HIDDEN_KEY.format(modality)] = states
    if modality == "text":
        features.emb[MASK_KEY.format(modality)] = mask


def add_bench_text_states(features, tokens: int, k: int) -> dict:
    """`embcache bench fit --predictor prompts`: synthetic text states for the last k blocks of the default
    text encoder (MiniLM-L6, width 384, shipped on PyPI); the text embeddings must be 384 wide. Returns its attrs."""
    from embcache.encoders import load_text_encoder

    text = load_text_encoder()
    n_layers = int(text.module.config.num_hidden_layers)
    if not 1 <= k <= n_layers:
        raise PromptError(f"--cache-layers {k}: {text.attrs['model']} has {n_layers} blocks")
    synthetic_hidden(features, "text", tokens=tokens, width=int(text.module.config.hidden_size),
                     min_tokens=max(1, tokens // 4))
    features.encoders["text"] = {**text.attrs, "cache_layers": k, "hidden_layer_index": n_layers - k}
    return features.encoders["text"]

