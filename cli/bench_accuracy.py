"""`embcache bench accuracy`: predict vs zero vs mean fill, on stores, synthetic caches or the paper's datasets."""
from __future__ import annotations

import dataclasses
import os

import click

from embcache.cli.common import parse_options, user_errors
from embcache.cli.extract import encoder_options
from embcache.config import MISSING_TYPES, FitConfig

D = FitConfig()
# FitConfig fields the grid sets itself, or that have their own flag here.
GRID_FIELDS = {**{k: "set by the grid" for k in ("impute", "seed", "train_missing_rate", "train_missing_type",
                                                 "test_missing_rate", "test_missing_type")},
               **{k: f"a flag of its own (--{k.replace('_', '-')})" for k in ("epochs", "device", "missing_seed")}}


def _seeds(ctx, param, value: str) -> list[int]:
    try:
        seeds = sorted({int(s) for s in value.split(",") if s.strip()})
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of integers") from None
    if len(seeds) < 1:
        raise click.BadParameter("give at least one seed")
    return seeds


def _fit_options(ctx, param, value: tuple[str, ...]) -> dict:
    """KEY=VALUE pairs -> FitConfig field overrides, each cast to the field's type."""
    fields = {f.name: f for f in dataclasses.fields(FitConfig)}
    out = {}
    for key, raw in parse_options(value).items():
        if key not in fields or key in ("store", "val_store", "test_store"):
            raise click.BadParameter(f"{key!r} is not a fit setting; see `embcache fit --help` "
                                     "(e.g. predictor_hidden=256, classifier_dropout=0.2)")
        if key in GRID_FIELDS:
            raise click.BadParameter(f"{key} is {GRID_FIELDS[key]}")
        default, text = getattr(D, key), str(raw)
        if isinstance(default, bool):
            if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise click.BadParameter(f"{key}={text}: expected true or false")
            out[key] = text.lower() in ("true", "1", "yes")
        elif isinstance(default, int) and not isinstance(raw, int):
            raise click.BadParameter(f"{key}={text}: expected an integer")
        elif isinstance(default, float) and not isinstance(raw, (int, float)):
            raise click.BadParameter(f"{key}={text}: expected a number")
        else:
            out[key] = type(default)(raw) if default is not None else raw
    return out


def _test_types(ctx, param, value: str) -> tuple[str, ...]:
    types = tuple(t.strip() for t in value.split(",") if t.strip())
    unknown = [t for t in types if t not in MISSING_TYPES]
    if not types or unknown:
        raise click.BadParameter(f"{value!r}: give one or more of {', '.join(MISSING_TYPES)}")
    return types


@click.command("accuracy")
@click.option("--dataset", "datasets", multiple=True, metavar="NAME",
              help="A dataset to extract and benchmark, with its --root (repeatable, in pairs): mmimdb, food101, "
                   "hateful_memes or manifest. Writes the paper-style table (paper.md, paper.json).")
@click.option("--root", "roots", multiple=True, metavar="PATH",
              help="The folder (or manifest file) of the --dataset at the same position.")
@click.option("--store", "stores", multiple=True, help="A feature store to benchmark (repeatable).")
@click.option("--synthetic", "synthetic_names", multiple=True,
              type=click.Choice(["synthetic-predictable", "synthetic-weak"]),
              help="A built-in synthetic cache (repeatable): cross-modal R2 about 0.6 (predictable) or 0.1 (weak).")
@click.option("--draws", type=click.IntRange(1), default=None,
              help="With --synthetic: run the first N draws (data seeds) of each synthetic cache [default: all].")
@click.option("--splits", type=click.IntRange(1), default=1, show_default=True,
              help="With --store: run each store on N partitions of its rows into train / val / test (the store's "
                   "own, then N-1 deals of the same rows into splits of the same sizes) and summarise over them: on "
                   "a few hundred test rows one split's differences move by a point. The rows must fit in memory.")
@click.option("--seeds", default="0,1,2", show_default=True, callback=_seeds, help="Training seeds.")
@click.option("--test-types", default=",".join(MISSING_TYPES), show_default=True, callback=_test_types,
              help="Missing types of the grid (comma-separated; missing training uses the same type).")
@click.option("--test-rate", type=click.FloatRange(0, 1), default=D.test_missing_rate, show_default=True)
@click.option("--train-rate", type=click.FloatRange(0, 1), default=D.train_missing_rate, show_default=True,
              help="Missing rate of the 'missing' training setting (the 'complete' setting uses 0).")
@click.option("--labeled-fraction", type=click.FloatRange(0, 1, min_open=True), default=1.0, show_default=True,
              help="Keep the labels of this fraction of the training rows only (the same rows in every run); the "
                   "others stay as unlabeled pairs, which the predictors learn from: many pairs, few labels. "
                   "Multiclass and binary tasks.")
@click.option("--missing-seed", type=int, default=D.missing_seed, show_default=True,
              help="Seed of the missing-modality assignment (the same rows go missing in every run).")
@click.option("--epochs", type=click.IntRange(1), default=D.epochs, show_default=True)
@click.option("--fit-option", "fit_options", multiple=True, metavar="KEY=VALUE", callback=_fit_options,
              help="Any other fit setting, e.g. predictor_hidden=256 (repeatable; names as in FitConfig).")
@click.option("--device", default=D.device, show_default=True)
@click.option("--threads", type=click.IntRange(1), default=None,
              help="CPU threads for torch, per job (default: torch's; with --jobs N, the cores over N).")
@click.option("--jobs", type=click.IntRange(1), default=1, show_default=True,
              help="Worker processes, each training the runs of one (training setting, test type, seed) at a "
                   "time: the same runs, sooner on a machine with cores to spare.")
@encoder_options
@click.option("--cache", default="bench-cache", show_default=True, type=click.Path(file_okay=False),
              help="With --dataset: folder of the extracted stores, one per dataset and encoder settings; a "
                   "finished one is reused.")
@click.option("--batch-size", type=click.IntRange(1), default=None,
              help="With --dataset: extraction batch size (default: 64 on CPU, 256 on GPU).")
@click.option("--workers", type=click.IntRange(0), default=2, show_default=True,
              help="With --dataset: extraction loader processes (decode, tokenize); 0 = in the main process.")
@click.option("--tune-epochs", type=click.IntRange(0), default=0, show_default=True,
              help="With --dataset: BitFit-tune both encoders for this many epochs before extracting, as the paper "
                   "adapts them: once per training protocol, on the training rows it keeps (complete: all; "
                   "missing: per test type), one store each. 0: the encoders as given.")
@click.option("--overwrite", is_flag=True, help="With --dataset: re-extract even where the cache has the store.")
@click.option("--out", default="bench-accuracy", show_default=True, type=click.Path(file_okay=False),
              help="Folder for accuracy.json, accuracy.txt and accuracy.png (with --dataset: paper.md, paper.json).")
@user_errors
def accuracy_command(datasets, roots, stores, synthetic_names, draws, splits, seeds, test_types, test_rate, train_rate,
                     labeled_fraction, missing_seed, epochs,
                     fit_options, device, threads, jobs, cache, batch_size, workers, tune_epochs, overwrite, out,
                     **encoders):
    """Predict vs zero vs mean fill, in complete and missing training.

    With --store / --synthetic: against a linear probe, on feature stores or synthetic caches. With --dataset NAME
    --root PATH (repeatable): extract each dataset once into --cache with the encoder options, run the same grid
    and write the paper-style table (per dataset the metrics of its task: F1-macro and F1-micro, accuracy, or
    AUROC and accuracy).
    """
    import torch

    if threads or jobs > 1:  # the jobs inherit this process's thread count
        torch.set_num_threads(threads or max(1, (os.cpu_count() or 1) // jobs))
    base = FitConfig(**{**dict(epochs=epochs, device=device, missing_seed=missing_seed), **fit_options})
    log = lambda m: click.echo(m, err=True)  # noqa: E731
    if tune_epochs and not (datasets or roots):
        raise click.ClickException("--tune-epochs applies to --dataset (it tunes the encoders before extracting); "
                                   "a --store is extracted already")
    if datasets or roots:
        from embcache.bench.paper import pair_sources, run_paper

        if stores or synthetic_names:
            raise click.ClickException("--dataset cannot be combined with --store or --synthetic; run them apart")
        if labeled_fraction < 1:
            raise click.ClickException("--labeled-fraction applies to --store and --synthetic, not to --dataset")
        if splits > 1:
            raise click.ClickException("--splits applies to --store (a --dataset keeps its published splits)")
        pairs = pair_sources(datasets, roots)  # a PaperError (an EmbcacheError): one line, through user_errors
        report = run_paper(pairs, base, seeds=seeds, encoders=encoders, cache=cache, out=out, test_rate=test_rate,
                           test_types=test_types,
                           train_rate=train_rate, batch_size=batch_size, workers=workers, overwrite=overwrite,
                           tune_epochs=tune_epochs, jobs=jobs, log=log)
        click.echo("\n".join(report["markdown"]))
        click.echo(f"wrote {out}/paper.md, paper.json")
        return
    from embcache.bench.accuracy import run_bench

    if not stores and not synthetic_names:
        raise click.UsageError("give at least one --dataset NAME --root PATH, --store or --synthetic")
    report = run_bench(list(stores), list(synthetic_names), base, seeds=seeds, out=out, test_rate=test_rate,
                       train_rate=train_rate, test_types=test_types, draws=draws, splits=splits,
                       labeled_fraction=labeled_fraction, jobs=jobs, log=log)
    click.echo("\n".join(report["table"]))
    click.echo(f"wrote {out}/accuracy.json, accuracy.txt, accuracy.png")
