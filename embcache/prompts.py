"""Read-only prompts on the last k transformer blocks of a frozen encoder, run from cached hidden states.

The source paper (Kim & Kim, ECCV 2024) predicts the missing modality's embedding with read-only prompts
(Lee et al., "Read-only Prompt Optimization", ICCV 2023) inside the encoder of the available modality: K
learnable tokens that attend to the real tokens while no token attends to a prompt, so the encoder's own
outputs stay exactly as they were. `embcache extract --cache-layers k` stores the hidden states entering the
last k blocks; here we run only those blocks.

Read-only *by construction*: each block runs on the real tokens with the very module call the encoder makes
(same inputs, same shapes), so the real-token outputs are bit-identical with or without prompts. The prompts
take a separate path through the same block, built from the block's own sub-modules: prompt queries attend to
the keys and values of the real tokens only (not to other prompts, not to themselves), then the block's output
projection, residuals, norms and MLP, per token. The prompts' outputs, averaged over the K prompts (and put
through the encoder's final norm where it has one), go through a small head to the other modality's
standardised embedding.

The blocks, their capture at extract time and the runner that replays them are in `embcache.hidden`.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from embcache.hidden import HIDDEN_KEY, MASK_KEY, PromptError, TopKRunner, runner_from_attrs

PROMPT_INIT_NOISE = 0.02          # prompts start at the mean [CLS] state + this * its scale * N(0, 1)


# ------------------------------------------------------------------------------------------------
# The predictor
# ------------------------------------------------------------------------------------------------
class PromptPredictor(nn.Module):
    """Cached hidden states of the source modality -> standardised embedding of the target modality.

    Trainable: the K prompts, the head and, with `bitfit`, the biases of the k blocks. Called with the batch
    dict of FusionModel (`x[f"{source}/hidden"]`, float16 or float32, and `x[f"{source}/hidden_mask"]` for text).
    """

    reads_cache = True   # FusionModel hands it the whole batch dict instead of the source embedding

    def __init__(self, source: str, runner: TopKRunner, n_prompts: int, head: nn.Module,
                 init: torch.Tensor | None = None, bitfit: bool = False, noise: float = PROMPT_INIT_NOISE):
        super().__init__()
        if n_prompts < 1:
            raise PromptError(f"--prompts must be >= 1, got {n_prompts}")
        self.source = source
        self.runner = runner
        self.head = head
        init = torch.zeros(runner.width) if init is None else init.detach().float().reshape(runner.width)
        scale = init.std().clamp(min=1e-3) if init.abs().sum() > 0 else torch.tensor(1.0)
        self.prompts = nn.Parameter(init.expand(n_prompts, -1) + noise * scale * torch.randn(n_prompts, runner.width))
        for p in runner.bias_parameters():
            p.requires_grad_(bitfit)

    def forward(self, x: dict[str, torch.Tensor]) -> torch.Tensor:
        hidden = x[HIDDEN_KEY.format(self.source)].float()
        out = self.runner(hidden, x.get(MASK_KEY.format(self.source)), self.prompts, real_output=False)
        return self.head(out.prompt_pooled)


def hidden_sources(data) -> list[str]:
    """Modalities whose hidden states the loaded data holds."""
    return [m for m in ("image", "text") if HIDDEN_KEY.format(m) in data.splits["train"].emb]


def cls_init(data, source: str) -> torch.Tensor:
    """Mean [CLS] (first-token) state entering the cached blocks over the training rows that have the source."""
    train = data.splits["train"]
    rows = np.flatnonzero(train.present[source])
    states = train.emb[HIDDEN_KEY.format(source)]
    return torch.as_tensor(np.asarray(states[rows, 0], dtype=np.float32).mean(0))


def attach_prompt_predictors(model: nn.Module, encoders: dict[str, dict], cfg, data=None) -> dict[str, str]:
    """Replace the MLP of every direction whose source has cached states by a PromptPredictor.

    `encoders`: modality -> the store's encoder attrs (with `cache_layers`). `data`: the loaded FeatureSet, for the
    prompts' [CLS] initialisation (None when a saved run is rebuilt: its weights are loaded afterwards).
    Returns direction -> "prompts" or "mlp".
    """
    from embcache.models import DIRECTIONS, mlp

    used = {}
    for name, (src, dst) in DIRECTIONS.items():
        if name not in model.predictors or not (encoders.get(src) or {}).get("cache_layers"):
            used[name] = "mlp"
            continue
        runner = runner_from_attrs(encoders[src])
        head = mlp(runner.width, model.dims[dst], cfg.predictor_hidden, cfg.predictor_depth, cfg.predictor_dropout)
        init = cls_init(data, src) if data is not None else None
        device = next(model.parameters()).device
        model.predictors[name] = PromptPredictor(src, runner, cfg.prompts, head, init,
                                                 cfg.prompt_bitfit).to(device)
        used[name] = "prompts"
    return used


def resolve_predictors(data, cfg) -> dict:
    """Which predictor each direction uses under `--predictor prompts`, checked before training.

    Returns {"predictors": direction -> "prompts" | "mlp", "prompt_encoders": source modality -> encoder attrs}
    for config.json's `resolved` block (a saved run rebuilds its prompt predictors from it).
    """
    from embcache.config import FitError
    from embcache.models import DIRECTIONS

    if cfg.predictor != "prompts" or cfg.impute != "predict":
        return {}
    sources = hidden_sources(data)
    encoders = {m: dict(data.encoders[m]) for m in sources}
    for name, split in data.splits.items():
        lacking = [m for m in sources if HIDDEN_KEY.format(m) not in split.emb]
        if lacking:
            raise FitError(f"{data.sources[name]} ({name}) holds no {', '.join(lacking)} hidden states; "
                           "--predictor prompts needs them in every split (extract with --cache-layers k)")
    used = {name: "prompts" if src in sources else "mlp" for name, (src, _) in DIRECTIONS.items()}
    if not sources:
        raise FitError(f"{data.sources['train']}: --predictor prompts needs hidden states, and no encoder of this "
                       "store has them; extract with --cache-layers k (BERT-like text or open_clip ViT encoders)")
    return {"predictors": used, "prompt_encoders": encoders}


def describe_predictors(resolved: dict, cfg) -> list[str]:
    """One line per direction saying which predictor it used (for the fit command's output)."""
    from embcache.models import DIRECTIONS

    lines = []
    for name, kind in (resolved.get("predictors") or {}).items():
        src = DIRECTIONS[name][0]
        if kind == "prompts":
            enc = resolved["prompt_encoders"][src]
            lines.append(f"predictor {name}: read-only prompts (K = {cfg.prompts}) in the last "
                         f"{enc['cache_layers']} blocks of {enc['model']}"
                         + (", BitFit biases" if cfg.prompt_bitfit else ""))
        else:
            lines.append(f"predictor {name}: MLP (the {src} encoder has no cached hidden states)")
    return lines

