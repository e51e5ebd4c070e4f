"""`embcache fit` and `embcache eval`: train on a feature cache, score a run (options default to FitConfig)."""
from __future__ import annotations

import json

import click

from embcache.cli.common import protocol_options, user_errors
from embcache.kernels import BACKENDS, FP32_PRECISIONS
from embcache.config import (DISTILLS, IMPUTE_MODES, MEAN_FALLBACKS, PAIR_HEADS, PREDICTOR_TRAINING, PREDICTORS,
                              SELECTIONS, SHUFFLES, FitConfig)

D = FitConfig()  # defaults shown in --help come from the config dataclass, the single source


def _seeds(ctx, param, value: str) -> list[int]:
    try:
        seeds = [int(s) for s in value.split(",") if s.strip()]
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of integers") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise click.BadParameter(f"{value!r}: give one or more distinct seeds, e.g. 0,1,2")
    return seeds


RATE = click.FloatRange(0.0, 1.0)


@click.command("fit")
@click.argument("store")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run folder to write.")
@click.option("--impute", type=click.Choice(IMPUTE_MODES), default=D.impute, show_default=True,
              help="What stands in for an absent modality: the predicted embedding, zeros, or the train mean.")
@click.option("--val-store", default=None, help="Use all rows of this store as the val split.")
@click.option("--test-store", default=None, help="Use all rows of this store as the test split.")
@protocol_options
@click.option("--seeds", default=str(D.seed), show_default=True, callback=_seeds,
              help="Comma-separated training seeds; several give RUN/seed-<s>/ and a mean/std summary.")
@click.option("--epochs", type=click.IntRange(1), default=D.epochs, show_default=True)
@click.option("--batch-size", type=click.IntRange(1), default=D.batch_size, show_default=True,
              help="Upper bound; small train sets get smaller batches.")
@click.option("--lr", type=float, default=D.lr, show_default=True)
@click.option("--weight-decay", type=float, default=D.weight_decay, show_default=True)
@click.option("--alpha", type=float, default=D.alpha, show_default=True, help="Weight of VICReg in the loss.")
@click.option("--vicreg-sim", type=float, default=D.vicreg_sim, show_default=True)
@click.option("--vicreg-std", type=float, default=D.vicreg_std, show_default=True,
              help="Weight of VICReg's variance term; off by default: fixed targets cannot collapse, and the term "
                   "pulls predictions off the conditional mean (docs/training.md). The paper's: 25.")
@click.option("--vicreg-cov", type=float, default=D.vicreg_cov, show_default=True,
              help="Weight of VICReg's covariance term (off by default, as --vicreg-std). The paper's: 1.")
@click.option("--detach-target/--no-detach-target", default=D.detach_target, show_default=True)
@click.option("--vicreg-backend", type=click.Choice(BACKENDS), default=D.vicreg_backend, show_default=True,
              help="auto: the Triton kernels on CUDA once they pass a self-check against the PyTorch closed form "
                   "(else PyTorch, with one warning); triton: no fallback; torch: the PyTorch closed form.")
@click.option("--vicreg-precision", type=click.Choice(FP32_PRECISIONS), default=D.vicreg_precision,
              show_default=True, help="fp32 dot precision of the Triton kernels (tf32 operands are rounded to "
                                      "nearest; ieee is exact fp32).")
@click.option("--predictor-training", type=click.Choice(PREDICTOR_TRAINING), default=D.predictor_training,
              show_default=True, help="staged: predictors first (VICReg, early stopping on val R2, cross-fitted, "
                                      "shrunk), then frozen; joint: with the classifier on task + alpha * VICReg.")
@click.option("--predictor-epochs", type=click.IntRange(1), default=D.predictor_epochs, show_default=True,
              help="Most epochs of staged predictor training.")
@click.option("--predictor-patience", type=click.IntRange(1), default=D.predictor_patience, show_default=True)
@click.option("--cross-fit", type=click.IntRange(0), default=D.cross_fit, show_default=True,
              help="Folds of out-of-fold predictions that training substitution uses (< 2: off).")
@click.option("--shrink/--no-shrink", default=D.shrink, show_default=True,
              help="Scale predictions towards the train mean by their least-squares factor on val pairs.")
@click.option("--substitute", type=click.FloatRange(0, 1), default=D.substitute, show_default=True,
              help="Probability that a training row with both modalities gets one replaced by its stand-in.")
@click.option("--distill", type=click.Choice(DISTILLS), default=D.distill, show_default=True,
              help="Substituted rows also learn the classifier's answer on the real pair, labeled or not "
                   "(auto: on when most training pairs have no label).")
@click.option("--indicators/--no-indicators", default=D.indicators, show_default=True,
              help="Give the classifier the two presence bits (real embedding or stand-in).")
@click.option("--mean-fallback", type=click.Choice(MEAN_FALLBACKS), default=D.mean_fallback, show_default=True,
              help="Which presence patterns may use the mean-fill model (trained first) where this run's "
                   "classifier did not do better on val: rows with both modalities (complete), every pattern, "
                   "or none (impute predict, zero).")
@click.option("--pair-head", type=click.Choice(PAIR_HEADS), default=D.pair_head, show_default=True,
              help="Average a logistic regression on the real pair (fitted on the labeled training pairs, L2 on val) "
                   "into the answer for rows with both modalities (auto: where the labeled training pairs are at "
                   "least half of the labeled training rows).")
@click.option("--calibrate/--no-calibrate", default=D.calibrate, show_default=True,
              help="Divide the logits by one temperature per presence pattern, fitted on val, so the scores read "
                   "as probabilities (the argmax is unchanged).")
@click.option("--linear-head/--no-linear-head", default=D.linear_head, show_default=True,
              help="Fit a logistic regression on the classifier's inputs first (L-BFGS, L2 on val); the MLP adds to it.")
@click.option("--input-dropout", type=click.FloatRange(0, 1), default=D.input_dropout, show_default=True,
              help="Dropout on the classifier's input features.")
@click.option("--select", type=click.Choice(SELECTIONS), default=D.select, show_default=True,
              help="Keep the epoch with the best val main metric or the lowest val task loss.")
@click.option("--expander-dim", type=click.IntRange(0), default=D.expander_dim, show_default=True,
              help="> 0: apply VICReg after a 2-layer expander of this width.")
@click.option("--predictor", type=click.Choice(PREDICTORS), default=D.predictor, show_default=True,
              help="prompts: read-only prompts in the last k blocks of the source encoder, from the hidden states "
                   "of `extract --cache-layers k`, for the directions whose source has them (MLP for the others).")
@click.option("--prompts", type=click.IntRange(1), default=D.prompts, show_default=True,
              help="Number of prompt tokens K (--predictor prompts).")
@click.option("--prompt-bitfit/--no-prompt-bitfit", default=D.prompt_bitfit, show_default=True,
              help="Also train the biases of the k blocks (--predictor prompts).")
@click.option("--predictor-hidden", type=click.IntRange(1), default=D.predictor_hidden, show_default=True)
@click.option("--predictor-depth", type=click.IntRange(1), default=D.predictor_depth, show_default=True)
@click.option("--predictor-dropout", type=click.FloatRange(0, 1), default=D.predictor_dropout,
              show_default=True)
@click.option("--classifier-hidden", type=click.IntRange(1), default=D.classifier_hidden, show_default=True)
@click.option("--classifier-depth", type=click.IntRange(1), default=D.classifier_depth, show_default=True)
@click.option("--classifier-dropout", type=click.FloatRange(0, 1), default=D.classifier_dropout,
              show_default=True)
@click.option("--device", default=D.device, show_default=True)
@click.option("--compile/--no-compile", "compile_", default=D.compile, show_default=True,
              help="torch.compile the model (pays off only for long GPU runs).")
@click.option("--allow-partial", is_flag=True, default=D.allow_partial,
              help="Fit a store whose extraction did not finish, on the rows of its written chunks.")
@click.option("--stream", is_flag=True, default=D.stream,
              help="Read the embeddings chunk by chunk (read ahead in a background thread) instead of loading "
                   "them; automatic above --memory-budget-gb. Implies --shuffle chunks.")
@click.option("--memory-budget-gb", type=click.FloatRange(0), default=D.memory_budget_gb, show_default=True,
              help="Stream when the embeddings would need more; 0 = half the available memory.")
@click.option("--shuffle", type=click.Choice(SHUFFLES), default=D.shuffle, show_default=True,
              help="Epoch order. global: a uniform permutation; chunks: permute the store's chunks, then the "
                   "rows within windows of --shuffle-window chunks (the order streaming uses).")
@click.option("--shuffle-window", type=click.IntRange(1), default=D.shuffle_window, show_default=True,
              help="Chunks whose rows are mixed together (--shuffle chunks, streaming).")
@click.option("--read-ahead", type=click.IntRange(1), default=D.read_ahead, show_default=True,
              help="Windows of chunks read ahead by a background thread (streaming).")
@click.option("--overwrite", is_flag=True, help="Replace an existing run folder.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@user_errors
def fit_command(store, out, seeds, compile_, overwrite, quiet, **options):
    """Train the missing-modality predictors and the late-fusion classifier on a feature cache."""
    from embcache.runs import format_table
    from embcache.train import fit

    cfg = FitConfig(store=store, seed=seeds[0], compile=compile_, **options)
    metrics = fit(cfg, out, seeds=seeds, overwrite=overwrite, progress=not quiet, log=click.echo)
    if metrics is None:  # not rank 0 of a torchrun fit: rank 0 reports and writes
        return
    click.echo(format_table(metrics))
    if cfg.predictor == "prompts":
        from pathlib import Path

        from embcache.runs import seed_dirs
        from embcache.prompts import describe_predictors

        saved = json.loads((seed_dirs(Path(out))[0] / "config.json").read_text())
        for line in describe_predictors(saved["resolved"], cfg):
            click.echo(line)
    click.echo(f"wrote {out}")


@click.command("compare")
@click.argument("run_a", type=click.Path(exists=True, file_okay=False))
@click.argument("run_b", type=click.Path(exists=True, file_okay=False))
@click.option("--store", default=None, help="Score both on this store (default: RUN_A's; each run's fingerprint "
                                            "must match it).")
@click.option("--rate", type=RATE, default=None, help="Missing rate of the scenarios (default: RUN_A's).")
@click.option("--resamples", type=click.IntRange(100), default=1000, show_default=True,
              help="Bootstrap resamples of the test rows.")
@click.option("--device", default="auto", show_default=True)
@click.option("--json", "json_path", default=None, type=click.Path(dir_okay=False),
              help="Also write the comparison here.")
@user_errors
def compare_command(run_a, run_b, store, rate, resamples, device, json_path):
    """Is run B better than run A beyond the test rows' noise? Both scored on the same rows, every scenario."""
    from embcache.runs import compare_runs, format_comparison

    result = compare_runs(run_a, run_b, store=store, rate=rate, resamples=resamples, device=device)
    click.echo(format_comparison(result))
    if json_path:  # temp file then rename: never a half-written JSON
        from embcache.runtime import staged_file

        with staged_file(json_path) as tmp, open(tmp, "w") as fh:
            json.dump(result, fh, indent=2)


@click.command("eval")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--store", default=None, help="Score on this store instead of the one the run was fit on "
                                            "(it must have the same fingerprint).")
@click.option("--rate", type=RATE, default=None, help="Missing rate of the scenarios (default: the run's).")
@click.option("--device", default="auto", show_default=True)
@click.option("--json", "json_path", default=None, type=click.Path(dir_okay=False),
              help="Also write the results here (metrics.json layout).")
@user_errors
def eval_command(run_dir, store, rate, device, json_path):
    """Score a fitted run under every test scenario: full, missing-image, missing-text, missing-both."""
    from embcache.runs import evaluate_run, format_table

    metrics = evaluate_run(run_dir, store=store, rate=rate, device=device)
    click.echo(format_table(metrics))
    if json_path:  # temp file then rename: never a half-written JSON
        from embcache.runtime import staged_file

        with staged_file(json_path) as tmp, open(tmp, "w") as fh:
            json.dump(metrics, fh, indent=2)
