"""Every command's settings as plain data: the config dataclasses, their defaults and allowed values.

Stdlib only, so that the command line takes its option defaults from here without importing torch.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields

from embcache.errors import EmbcacheError
from embcache.kernels._common import BACKENDS, FP32_PRECISIONS

DEFAULT_IMAGE_ENCODER = "timm:efficientnet_lite0"
DEFAULT_TEXT_ENCODER = "hf:sentence-transformers/all-MiniLM-L6-v2"
MISSING_TYPES = ("both", "image", "text")  # the missing-modality protocol's types (embcache/missing.py)
IMPUTE_MODES = ("predict", "zero", "mean")
PREDICTORS = ("mlp", "prompts")
SHUFFLES = ("global", "chunks")
PREDICTOR_TRAINING = ("staged", "joint")
SELECTIONS = ("loss", "metric")
MEAN_FALLBACKS = ("off", "complete", "every")  # FitConfig.mean_fallback
DISTILLS = ("auto", "on", "off")  # FitConfig.distill
PAIR_HEADS = ("auto", "on", "off")  # FitConfig.pair_head
# What a run saved before a setting existed did: FitConfig.from_dict fills these in for old config.json files.
LEGACY_SETTINGS = {"indicators": False, "substitute": 0.0, "predictor_training": "joint", "shrink": False,
                   "select": "metric", "input_dropout": 0.0, "cross_fit": 0, "vicreg_precision": "ieee",
                   "linear_head": False, "mean_fallback": "off", "distill": "off", "calibrate": False,
                   "pair_head": "off"}


def check_protocol(cfg, error: type[EmbcacheError]) -> None:
    """Raise `error` unless cfg's missing-modality protocol fields (train/test missing type and rate) are valid;
    fit and tune share them."""
    for name in ("train_missing_type", "test_missing_type"):
        if getattr(cfg, name) not in MISSING_TYPES:
            raise error(f"{name} must be one of {MISSING_TYPES}, got {getattr(cfg, name)!r}")
    for name in ("train_missing_rate", "test_missing_rate"):
        if not 0.0 <= getattr(cfg, name) <= 1.0:
            raise error(f"{name} must be in [0, 1], got {getattr(cfg, name)}")


class FitError(EmbcacheError):
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
    # impute predict and zero: rows of a presence pattern (image only, text only, both) are scored by mean fill's
    # model (trained first with the same seed, then frozen inside the run) where the run's own classifier did not
    # score better on val rows shown that way. complete: only rows with both modalities may fall back (so those
    # rows lose nothing to a classifier that learnt to read stand-ins); every: every pattern may; off: none
    mean_fallback: str = "complete"
    # After selection, one temperature per presence pattern (image only, text only, both) divides the logits at
    # inference, fitted on the val pairs shown as that pattern (least task loss), so the scores read as
    # probabilities. Argmax and the 0.5 threshold are unchanged; rankings across patterns (AUROC) may change.
    calibrate: bool = True
    # After selection (before calibration), rows with both modalities get the mean of the classifier's logits and
    # those of a logistic regression on the real pair alone (the linear probe: labeled training pairs, L-BFGS, L2
    # chosen on the val pairs). One classifier serves every presence pattern and pairs pay for it; where pairs are
    # most of the training rows the regression on them is the better answer for pairs, where they are few it is
    # not (docs/training.md). on | off | auto: on where the labeled training pairs are at least half of the labeled
    # training rows.
    pair_head: str = "auto"
    # The classifier's logits = a linear map of its inputs + the MLP. The linear map is a logistic regression fitted
    # first (full-batch L-BFGS, L2 weight chosen on val; docs/training.md) and then kept; the MLP starts at 0 and
    # learns what the linear map misses, and model selection may keep the linear map alone (best epoch 0).
    linear_head: bool = True
    # On training rows with both modalities, replace one of them (image or text, even odds) by its stand-in
    # with this probability, so the classifier learns what a stand-in is worth (every impute mode).
    substitute: float = 0.3
    # Substituted rows also learn what the classifier answers on the real pair (soft targets, labeled or not;
    # `distill_loss`), so unlabeled pairs teach the classifier too. on | off | auto: on when most training pairs
    # have no label (measured: a large gain for every impute mode with few labels, none with all; docs/training.md)
    distill: str = "auto"
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
    # VICReg's variance and covariance terms keep two trained branches from collapsing; a predictor regressing
    # fixed cached targets cannot collapse, and the terms pull its predictions off the conditional mean (lower
    # R2, and lower accuracy on the real sets: docs/training.md). So by default only the invariance term
    # trains; the paper's weights are --vicreg-std 25 --vicreg-cov 1 (needed with an expander, which can collapse).
    vicreg_std: float = 0.0
    vicreg_cov: float = 0.0
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
        check_protocol(self, FitError)
        if self.predictor not in PREDICTORS:
            raise FitError(f"predictor must be one of {PREDICTORS}, got {self.predictor!r}")
        if self.predictor_training not in PREDICTOR_TRAINING:
            raise FitError(f"predictor_training must be one of {PREDICTOR_TRAINING}, got {self.predictor_training!r}")
        if self.vicreg_backend not in BACKENDS:
            raise FitError(f"vicreg_backend must be one of {BACKENDS}, got {self.vicreg_backend!r}")
        if self.vicreg_precision not in FP32_PRECISIONS:
            raise FitError(f"vicreg_precision must be one of {FP32_PRECISIONS}, got {self.vicreg_precision!r}")
        if self.mean_fallback not in MEAN_FALLBACKS:
            raise FitError(f"mean_fallback must be one of {MEAN_FALLBACKS}, got {self.mean_fallback!r}")
        if self.distill not in DISTILLS:
            raise FitError(f"distill must be one of {DISTILLS}, got {self.distill!r}")
        if self.pair_head not in PAIR_HEADS:
            raise FitError(f"pair_head must be one of {PAIR_HEADS}, got {self.pair_head!r}")
        if self.select not in SELECTIONS:
            raise FitError(f"select must be one of {SELECTIONS}, got {self.select!r}")
        if not 0.0 <= self.substitute <= 1.0:
            raise FitError(f"substitute must be in [0, 1], got {self.substitute}")
        if self.shuffle not in SHUFFLES:
            raise FitError(f"shuffle must be one of {SHUFFLES}, got {self.shuffle!r}")
        if self.expander_dim > 0 and self.vicreg_std == 0 and self.vicreg_cov == 0:
            raise FitError("an expander trained on VICReg's invariance term alone collapses to a constant: with "
                           "--expander-dim give the variance and covariance weights too (the paper's: --vicreg-std "
                           "25 --vicreg-cov 1)")
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


@dataclass
class ExtractConfig:
    dataset: str
    root: str
    out: str
    image_encoder: str = DEFAULT_IMAGE_ENCODER
    image_checkpoint: str | None = None
    image_bitfit: str | None = None
    text_encoder: str = DEFAULT_TEXT_ENCODER
    text_pooling: str = "mean"
    text_max_length: int = 128
    text_bitfit: str | None = None
    batch_size: int | None = None      # None: 64 on the CPU, 256 on a GPU
    workers: int = 2
    device: str = "auto"
    dtype: str = "float16"
    chunk_rows: int | None = None
    overwrite: bool = False
    limit: int | None = None           # only the first `limit` samples (quick trials, benchmarks)
    cache_layers: int = 0              # > 0: also store the hidden states entering the last k blocks
    dataset_options: dict = field(default_factory=dict)


@dataclass
class TuneConfig:
    dataset: str
    root: str
    modality: str                      # image | text
    out: str
    image_encoder: str = DEFAULT_IMAGE_ENCODER
    image_checkpoint: str | None = None
    text_encoder: str = DEFAULT_TEXT_ENCODER
    text_pooling: str = "mean"
    text_max_length: int = 128
    epochs: int = 5
    lr: float = 1e-3                   # the biases
    head_lr: float = 1e-2              # the temporary linear head, which starts from scratch
    batch_size: int = 32
    workers: int = 2
    device: str = "auto"
    seed: int = 0
    resume: bool | None = None         # None: resume when a state made with the same arguments exists
    tune_biases: bool = True           # False: train the head alone on the frozen encoder (a linear probe)
    # missing-modality protocol (embcache/missing.py), as `fit` applies it: train rows keep the modality under
    # (train rate, train type, seed), val rows under fit's selection scenario (test rate, test type, seed)
    train_missing_rate: float = FitConfig.train_missing_rate
    train_missing_type: str = FitConfig.train_missing_type
    test_missing_rate: float = FitConfig.test_missing_rate
    test_missing_type: str = FitConfig.test_missing_type
    missing_seed: int = FitConfig.missing_seed
    dataset_options: dict = field(default_factory=dict)


@dataclass
class FitBenchConfig:
    """`embcache bench fit`: the synthetic cache's shape and the fit settings timed on it (`run_fit_bench`)."""

    n_train: int = 15_552               # MM-IMDb's train rows; val and test keep its proportions
    dim: int = 768                      # embedding width per modality
    n_classes: int = 23
    epochs: int = 20
    batch_size: int = FitConfig.batch_size
    impute: str = FitConfig.impute
    device: str = FitConfig.device
    compile: bool = FitConfig.compile
    threads: int | None = None          # torch CPU threads (None: torch's choice)
    predictor: str = FitConfig.predictor
    prompts: int = FitConfig.prompts
    cache_layers: int = 1               # predictor "prompts": synthetic hidden states of the last k text blocks
    tokens: int = 64                    # ... of this many text tokens per row
    vicreg_backend: str | None = None   # None: FitConfig's
    vicreg_precision: str | None = None
