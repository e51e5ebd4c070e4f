"""The feature predictors and the late-fusion classifier (their settings, FitConfig: embcache/config.py).

Everything works on *standardised* embeddings: each modality is shifted and scaled per dimension by
the mean and std of the training rows that have it (buffers of the model, saved in the checkpoint), so
that encoders of different scales are comparable, VICReg's variance hinge (target std 1) matches the
real targets, and "mean imputation" is simply 0. The model takes raw cached embeddings as input.
"""
from __future__ import annotations

from dataclasses import replace
from typing import NamedTuple

import torch
from torch import nn

from embcache.config import FitConfig
from embcache.kernels import vicreg_loss
from embcache.missing import MODALITIES

# direction name -> (source modality, target modality)
DIRECTIONS = {"image_to_text": ("image", "text"), "text_to_image": ("text", "image")}
# presence patterns of a row that has something: only the image, only the text, both
PATTERNS = ("image", "text", "both")


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


def fallback_config(cfg: FitConfig) -> FitConfig:
    """The settings of the mean-fill model inside a run (FitConfig.mean_fallback): its raw answer; the run itself
    averages in the pair head and calibrates, once, whichever model answers."""
    return replace(cfg, impute="mean", calibrate=False, pair_head="off")


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
        d_in = sum(dims[m] for m in MODALITIES) + (len(MODALITIES) if cfg.indicators else 0)
        self.classifier = mlp(d_in, n_outputs, cfg.classifier_hidden, cfg.classifier_depth, cfg.classifier_dropout,
                              cfg.input_dropout)
        if cfg.linear_head:  # fitted by `train.fit_linear_head`, not by the optimiser
            self.linear = nn.Linear(d_in, n_outputs)
            self.linear.requires_grad_(False)
            with torch.no_grad():  # epoch 0 = the linear head alone
                for layer in (self.linear, self.classifier[-1]):
                    layer.weight.zero_()
                    layer.bias.zero_()
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
        if cfg.mean_fallback != "off" and cfg.impute != "mean":
            # mean fill's model, for the presence patterns where it did better on val: loaded by the trainer, frozen
            self.fallback = FusionModel(dims, n_outputs, fallback_config(cfg))
            self.fallback.requires_grad_(False)
            # per pattern (PATTERNS): set by the trainer (train.choose_fallback); off while it fits this model
            self.register_buffer("fallback_on", torch.zeros(len(PATTERNS), dtype=torch.bool))
        if cfg.pair_head != "off":  # a regression on the standardised real pair, set by `train.fit_pair_head`
            # skip_init: no draw from the random stream, so every other weight starts as without it
            self.pair = nn.utils.skip_init(nn.Linear, dims["image"] + dims["text"], n_outputs)
            self.pair.requires_grad_(False)
            with torch.no_grad():
                self.pair.weight.zero_()
                self.pair.bias.zero_()
            self.register_buffer("pair_on", torch.zeros((), dtype=torch.bool))  # off until the trainer decides
        if cfg.calibrate:  # per pattern (PATTERNS): set by the trainer (train.calibrate); 1 = the logits as they are
            self.register_buffer("temperature", torch.ones(len(PATTERNS)))

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
        inputs, z, pred = self.inputs(x, has, hide, first)
        logits = self.head(inputs)
        if self.training or not any(hasattr(self, name) for name in ("fallback", "pair", "temperature")):
            return FusionOutput(logits, z, pred)  # nothing below applies: skip the presence patterns
        shown = has if hide is None else {m: has[m] & ~hide[m] for m in MODALITIES}
        image, text = shown["image"], shown["text"]
        pattern = torch.stack([image & ~text, ~image & text, image & text], 1)  # PATTERNS order
        if hasattr(self, "fallback") and bool(self.fallback_on.any()):
            # Inference: a row whose presence pattern falls back gets mean fill's answer. (Training fits this
            # classifier on every row; while it is selected nothing falls back, so the second model is skipped.)
            falls_back = (pattern & self.fallback_on).any(1)
            logits = torch.where(falls_back.unsqueeze(1), self.fallback(x, has, hide).logits, logits)
        if hasattr(self, "pair") and bool(self.pair_on):  # rows shown with both: the pair regression averaged in
            logits = torch.where(pattern[:, 2:], 0.5 * (logits + self.pair_logits(z)), logits)
        if hasattr(self, "temperature"):  # rows with neither modality keep temperature 1
            temperature = (pattern.to(logits.dtype) @ self.temperature.to(logits.dtype)).masked_fill(~pattern.any(1), 1)
            logits = logits / temperature.unsqueeze(1)
        return FusionOutput(logits, z, pred)

    def pair_logits(self, z: dict[str, torch.Tensor]) -> torch.Tensor:
        """The pair regression's logits on standardised embeddings (meaningful on rows that have both)."""
        return self.pair(torch.cat([z[m] for m in MODALITIES], dim=1))

    @property
    def falls_back(self) -> dict[str, bool]:
        """Pattern -> whether its rows get the mean-fill model's answer (FitConfig.mean_fallback)."""
        on = self.fallback_on.tolist() if hasattr(self, "fallback") else [False] * len(PATTERNS)
        return dict(zip(PATTERNS, on))

    @falls_back.setter
    def falls_back(self, on: dict[str, bool]) -> None:
        self.fallback_on.copy_(torch.tensor([bool(on.get(p, False)) for p in PATTERNS]))

    def head(self, inputs: torch.Tensor) -> torch.Tensor:
        """The classifier's logits (+ the linear head's) on the inputs that `inputs` builds."""
        logits = self.classifier(inputs)
        if hasattr(self, "linear"):
            logits = logits + self.linear(inputs)
        return logits

    def inputs(self, x: dict[str, torch.Tensor], has: dict[str, torch.Tensor],
               hide: dict[str, torch.Tensor] | None = None, first: dict[str, torch.Tensor] | None = None
               ) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """`forward` up to the classifier: (its input [image, text(, indicators)], z, pred)."""
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
        return torch.cat(inputs, dim=1), z, pred

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
