"""The fit configuration, the feature predictors and the late-fusion classifier.

Everything works on *standardised* embeddings: each modality is shifted and scaled per dimension by
the mean and std of the training rows that have it (buffers of the model, saved in the checkpoint), so
that encoders of different scales are comparable, VICReg's variance hinge (target std 1) matches the
real targets, and "mean imputation" is simply 0. The model takes raw cached embeddings as input.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import NamedTuple

import torch
from torch import nn

from embcache.kernels import BACKENDS, FP32_PRECISIONS, vicreg_loss
from embcache.missing import MISSING_TYPES, MODALITIES

IMPUTE_MODES = ("predict", "zero", "mean")
PREDICTORS = ("mlp", "prompts")
SHUFFLES = ("global", "chunks")
PREDICTOR_TRAINING = ("staged", "joint")
SELECTIONS = ("loss", "metric")
# What a run saved before a setting existed did: FitConfig.from_dict fills these in for old config.json files.
LEGACY_SETTINGS = {"indicators": False, "substitute": 0.0, "predictor_training": "joint", "shrink": False,
                   "select": "metric", "input_dropout": 0.0, "cross_fit": 0, "vicreg_precision": "ieee"}
# direction name -> (source modality, target modality)
DIRECTIONS = {"image_to_text": ("image", "text"), "text_to_image": ("text", "image")}


class FitError(ValueError):
    """Input or settings that `embcache fit` / `eval` cannot use; the message names the problem."""


@dataclass
class FitConfig:
    """Everything `embcache fit` needs, as plain data (saved as config.json in the run)."""

    store: str = ""
    val_store: str | None = None        # all rows of this store are the val split (else split == 1)
    test_store: str | None = None       # all rows of this store are the test split (else split == 2)
    impute: str = "predict"             # predict | zero | mean: what stands in for an absent modality
    # missing-modality protocol (embcache/missing.py)
    train_missing_rate: float = 0.7
    train_missing_type: str = "both"
    test_missing_rate: float = 0.7
    test_missing_type: str = "both"     # also the val scenario that selects the best epoch
    missing_seed: int = 0               # fixed across --seeds, so every run sees the same rows missing
    # predictors: MLP from the available modality's embedding to the other's
    predictor_hidden: int = 1024
    predictor_depth: int = 2            # number of linear layers (1 = linear map)
    predictor_dropout: float = 0.1
    # "prompts": read-only prompts in the last k blocks of the source encoder, run from the hidden states the
    # cache holds (extract --cache-layers k; embcache/prompts.py), for the directions whose source has them;
    # their head is an MLP of predictor_hidden / predictor_depth / predictor_dropout. The others keep the MLP.
    predictor: str = "mlp"
    prompts: int = 8                    # K prompt tokens
    prompt_bitfit: bool = False         # also train the biases of the k blocks
    expander_dim: int = 0               # > 0: VICReg on a shared 2-layer expander's outputs
    # late-fusion classifier on [image, text] (+ the two presence indicators)
    classifier_hidden: int = 512
    classifier_depth: int = 2
    classifier_dropout: float = 0.1
    input_dropout: float = 0.3          # dropout on the classifier's input features (a strong regulariser for wide
                                        # embeddings on small sets)
    indicators: bool = True             # the classifier also sees which modalities are real (every impute mode)
    # On training rows with both modalities, replace one of them (image or text, even odds) by its stand-in
    # with this probability, so the classifier learns what a stand-in is worth (every impute mode).
    substitute: float = 0.3
    # how the predictors train (impute predict; docs/training.md):
    #   staged: first alone on the paired rows (VICReg, early stopping on val R2, predictor_epochs at most),
    #           then frozen while the classifier trains on the task loss;
    #   joint:  together with the classifier, on task loss + alpha * VICReg (the paper's objective).
    predictor_training: str = "staged"
    predictor_epochs: int = 100
    predictor_patience: int = 5         # staged: stop after this many epochs without a better val R2
    cross_fit: int = 3                  # staged: K folds of out-of-fold predictions for substitution (< 2: off)
    # staged: scale the predictions by their least-squares factor on val pairs, clipped to [0, 1], so a
    # prediction that knows little falls back towards the train mean
    shrink: bool = True
    # objective: task loss + alpha * (VICReg(image->text) + VICReg(text->image))
    alpha: float = 1.0
    vicreg_sim: float = 25.0
    vicreg_std: float = 25.0
    vicreg_cov: float = 1.0
    detach_target: bool = True          # no gradient through the target branch (matters with an expander)
    # VICReg's implementation (embcache.kernels, docs/vicreg-kernel.md): auto = the Triton kernels on CUDA once
    # they pass their self-check, else the PyTorch closed form; triton = no fallback (raise); torch = PyTorch.
    vicreg_backend: str = "auto"
    vicreg_precision: str = "tf32"      # fp32 dot precision on the Triton path: ieee | tf32 | tf32x3
    # model selection: the epoch with the best val task loss ("loss") or val main metric ("metric"), under the
    # selection scenario
    select: str = "metric"
    # optimisation
    epochs: int = 30
    batch_size: int = 256               # upper bound; small train sets use smaller batches
    lr: float = 1e-3
    weight_decay: float = 1e-2
    seed: int = 0
    device: str = "auto"
    compile: bool = False               # torch.compile the model; pays off only for long GPU runs
    # scale (README "Scaling out"): partial stores, caches larger than memory, several processes
    allow_partial: bool = False         # fit an unfinished store on the rows of its written chunks
    stream: bool = False                # read the embeddings chunk by chunk instead of loading them
    memory_budget_gb: float = 0.0       # stream automatically above this; 0 = half the available memory
    shuffle: str = "global"             # global: uniform permutation; chunks: chunk order, then rows within
                                        # windows of shuffle_window chunks (the order streaming uses)
    shuffle_window: int = 4
    read_ahead: int = 2                 # windows of chunks a background thread reads ahead (streaming)

    def __post_init__(self) -> None:
        if self.impute not in IMPUTE_MODES:
            raise FitError(f"impute must be one of {IMPUTE_MODES}, got {self.impute!r}")
        for name in ("train_missing_type", "test_missing_type"):
            if getattr(self, name) not in MISSING_TYPES:
                raise FitError(f"{name} must be one of {MISSING_TYPES}, got {getattr(self, name)!r}")
        for name in ("train_missing_rate", "test_missing_rate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise FitError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.predictor not in PREDICTORS:
            raise FitError(f"predictor must be one of {PREDICTORS}, got {self.predictor!r}")
        if self.predictor_training not in PREDICTOR_TRAINING:
            raise FitError(f"predictor_training must be one of {PREDICTOR_TRAINING}, got {self.predictor_training!r}")
        if self.vicreg_backend not in BACKENDS:
            raise FitError(f"vicreg_backend must be one of {BACKENDS}, got {self.vicreg_backend!r}")
        if self.vicreg_precision not in FP32_PRECISIONS:
            raise FitError(f"vicreg_precision must be one of {FP32_PRECISIONS}, got {self.vicreg_precision!r}")
        if self.select not in SELECTIONS:
            raise FitError(f"select must be one of {SELECTIONS}, got {self.select!r}")
        if not 0.0 <= self.substitute <= 1.0:
            raise FitError(f"substitute must be in [0, 1], got {self.substitute}")
        if self.shuffle not in SHUFFLES:
            raise FitError(f"shuffle must be one of {SHUFFLES}, got {self.shuffle!r}")
        if self.memory_budget_gb < 0:
            raise FitError(f"memory_budget_gb must be >= 0, got {self.memory_budget_gb}")
        for name in ("epochs", "batch_size", "predictor_depth", "classifier_depth", "prompts", "shuffle_window",
                     "read_ahead", "predictor_epochs", "predictor_patience"):
            if getattr(self, name) < 1:
                raise FitError(f"{name} must be >= 1, got {getattr(self, name)}")

    @classmethod
    def from_dict(cls, data: dict) -> "FitConfig":
        """Inverse of dataclasses.asdict; unknown keys (e.g. the `resolved` block) are ignored, and settings a
        run saved before they existed take the behaviour of that time (`LEGACY_SETTINGS`)."""
        names = {f.name for f in fields(cls)}
        return cls(**{**LEGACY_SETTINGS, **{k: v for k, v in data.items() if k in names}})


def mlp(d_in: int, d_out: int, hidden: int, depth: int, dropout: float, input_dropout: float = 0.0) -> nn.Sequential:
    """`depth` linear layers with GELU and dropout between them (depth 1 = a linear map); input_dropout > 0 puts a
    dropout on the input first."""
    widths = [d_in] + [hidden] * (depth - 1) + [d_out]
    layers: list[nn.Module] = [nn.Dropout(input_dropout)] if input_dropout > 0 else []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        if i > 0:
            layers += [nn.GELU(), nn.Dropout(dropout)]
        layers.append(nn.Linear(a, b))
    return nn.Sequential(*layers)


class FusionOutput(NamedTuple):
    logits: torch.Tensor                 # (B, n_outputs)
    z: dict[str, torch.Tensor]           # standardised real embeddings, 0 where absent
    pred: dict[str, torch.Tensor]        # direction -> standardised prediction of the target modality


class FusionModel(nn.Module):
    """Two predictors (one per direction) and a classifier on the concatenated embeddings."""

    def __init__(self, dims: dict[str, int], n_outputs: int, cfg: FitConfig):
        super().__init__()
        self.impute = cfg.impute
        self.dims = dict(dims)
        self.vicreg_weights = dict(sim=cfg.vicreg_sim, std=cfg.vicreg_std, cov=cfg.vicreg_cov,
                                   backend=cfg.vicreg_backend, fp32_precision=cfg.vicreg_precision)
        self.detach_target = cfg.detach_target
        for m in MODALITIES:
            self.register_buffer(f"mean_{m}", torch.zeros(dims[m]))
            self.register_buffer(f"std_{m}", torch.ones(dims[m]))
        # The classifier first: its initial weights are then the same for every impute mode (paired comparisons)
        self.indicators = cfg.indicators
        self.classifier = mlp(sum(dims[m] for m in MODALITIES) + (len(MODALITIES) if cfg.indicators else 0),
                              n_outputs, cfg.classifier_hidden, cfg.classifier_depth, cfg.classifier_dropout,
                              cfg.input_dropout)
        self.predictors = nn.ModuleDict()
        self.expanders = nn.ModuleDict()
        if cfg.impute == "predict":
            for name, (src, dst) in DIRECTIONS.items():
                self.predictors[name] = mlp(dims[src], dims[dst], cfg.predictor_hidden,
                                            cfg.predictor_depth, cfg.predictor_dropout)
            if cfg.expander_dim > 0:
                for m in MODALITIES:  # one per target modality, shared by prediction and target
                    self.expanders[m] = mlp(dims[m], cfg.expander_dim, cfg.expander_dim, 2, 0.0)
            if cfg.shrink and cfg.predictor_training == "staged":  # one factor per direction, set by the trainer
                for name in DIRECTIONS:
                    self.register_buffer(f"shrink_{name}", torch.ones(()))

    @torch.no_grad()
    def set_normalization(self, mean: dict[str, torch.Tensor], std: dict[str, torch.Tensor]) -> None:
        for m in MODALITIES:
            getattr(self, f"mean_{m}").copy_(mean[m])
            getattr(self, f"std_{m}").copy_(std[m])

    def standardize(self, m: str, x: torch.Tensor) -> torch.Tensor:
        return (x - getattr(self, f"mean_{m}")) / getattr(self, f"std_{m}")

    def unstandardize(self, m: str, z: torch.Tensor) -> torch.Tensor:
        return z * getattr(self, f"std_{m}") + getattr(self, f"mean_{m}")

    def embed(self, x: dict[str, torch.Tensor], has: dict[str, torch.Tensor]
              ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """(standardised real embeddings, 0 where absent; direction -> prediction of its target)."""
        # Absent rows hold meaningless values: mask them (not index, so shapes stay static: no host sync).
        z = {m: torch.where(has[m].unsqueeze(1), self.standardize(m, x[m]), 0.0) for m in MODALITIES}
        # a prompt predictor (embcache/prompts.py) reads the source's cached hidden states from the batch dict
        pred = {name: net(x) if getattr(net, "reads_cache", False) else net(z[DIRECTIONS[name][0]])
                for name, net in self.predictors.items()}
        return z, pred

    def forward(self, x: dict[str, torch.Tensor], has: dict[str, torch.Tensor],
                hide: dict[str, torch.Tensor] | None = None,
                first: dict[str, torch.Tensor] | None = None) -> FusionOutput:
        """x: raw embeddings per modality (B, D_m); has: bool (B,) per modality; hide: bool (B,) per modality,
        rows whose real embedding the classifier gets the stand-in for instead (training substitution); first:
        direction -> predictions that replace the predictor's on the first rows (cross-fitted, training)."""
        z, pred = self.embed(x, has)
        if first:
            pred = {name: torch.cat([first[name], p[len(first[name]):]]) if name in first else p
                    for name, p in pred.items()}
        shown = has if hide is None else {m: has[m] & ~hide[m] for m in MODALITIES}
        filled = {dst: torch.where(shown[dst].unsqueeze(1), z[dst], self.fill(dst, pred.get(name), shown[src], name))
                  for name, (src, dst) in DIRECTIONS.items()}
        inputs = [filled[m] for m in MODALITIES]
        if self.indicators:  # 1 = real embedding, 0 = stand-in: zero/mean fill carry this for free, a prediction not
            inputs += [shown[m].unsqueeze(1).to(filled[m].dtype) for m in MODALITIES]
        logits = self.classifier(torch.cat(inputs, dim=1))
        return FusionOutput(logits, z, pred)

    def freeze_predictors(self) -> None:
        """Staged training: the predictors keep their weights and stay in eval mode (no dropout) from now on."""
        for p in list(self.predictors.parameters()) + list(self.expanders.parameters()):
            p.requires_grad_(False)
        self.predictors_frozen = True
        self.train(self.training)

    def train(self, mode: bool = True) -> "FusionModel":
        super().train(mode)
        if getattr(self, "predictors_frozen", False):
            self.predictors.eval()
        return self

    def fill(self, m: str, prediction: torch.Tensor | None, has_source: torch.Tensor,
             direction: str | None = None) -> torch.Tensor:
        """What stands in for modality m where it is absent (broadcasts against (B, D_m))."""
        if self.impute == "zero":  # a raw zero vector, in standardised coordinates
            return -getattr(self, f"mean_{m}") / getattr(self, f"std_{m}")
        if self.impute == "mean" or prediction is None:
            return torch.zeros((), device=has_source.device)
        shrink = getattr(self, f"shrink_{direction}", None) if direction else None
        if shrink is not None:  # towards the train mean (0) where the prediction knows little
            prediction = prediction * shrink
        # predict; a row with neither modality gets the train mean (0), not a prediction from nothing
        return prediction * has_source.unsqueeze(1)

    def vicreg(self, out: FusionOutput, n_paired: int) -> torch.Tensor:
        """Sum over both directions of VICReg(prediction, real) on the first n_paired rows of the batch.

        The caller puts the rows that have both modalities first, so the slice has a static shape.
        """
        total = torch.zeros((), device=next(iter(out.z.values())).device)
        for name, (_, dst) in DIRECTIONS.items():
            x, y = out.pred[name][:n_paired], out.z[dst][:n_paired]
            if dst in self.expanders:
                x, y = self.expanders[dst](x), self.expanders[dst](y)
            if self.detach_target:  # a no-op without an expander: cached features carry no gradient
                y = y.detach()
            total = total + vicreg_loss(x, y, **self.vicreg_weights)
        return total
