"""`embcache tune`: BitFit bias tuning of one encoder, before extraction (options default to TuneConfig)."""
from __future__ import annotations

import click

from embcache.cli.common import protocol_options, parse_options, user_errors
from embcache.cli.extract import base_encoder_options
from embcache.config import TuneConfig
from embcache.datasets import DATASET_NAMES

# Option defaults are the config dataclass's field defaults (class attributes: TuneConfig has required fields).
D = TuneConfig


@click.command("tune")
@click.option("--dataset", type=click.Choice(DATASET_NAMES), required=True,
              help="Reader for the dataset layout (manifest = your own JSONL/CSV).")
@click.option("--root", required=True, type=click.Path(exists=True),
              help="Dataset folder (or the manifest file for --dataset manifest).")
@click.option("--modality", type=click.Choice(["image", "text"]), required=True, help="The encoder to tune.")
@base_encoder_options
@click.option("--epochs", type=click.IntRange(1), default=D.epochs, show_default=True)
@click.option("--lr", type=float, default=D.lr, show_default=True, help="Learning rate of the biases.")
@click.option("--head-lr", type=float, default=D.head_lr, show_default=True,
              help="Learning rate of the temporary linear head.")
@click.option("--batch-size", type=click.IntRange(1), default=D.batch_size, show_default=True)
@click.option("--seed", type=int, default=D.seed, show_default=True)
@click.option("--device", default=D.device, show_default=True)
@click.option("--workers", type=click.IntRange(0), default=D.workers, show_default=True,
              help="Loader processes (decode, tokenize).")
@protocol_options
@click.option("--out", required=True, help="BitFit file to write (safetensors, docs/bitfit-format.md).")
@click.option("--resume/--no-resume", default=D.resume,
              help="Continue from <out>.state.pt. Default: continue when it was made with the same arguments.")
@click.option("--option", multiple=True, metavar="KEY=VALUE", help="Reader option, e.g. val_fraction=0.1.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@user_errors
def tune_command(dataset, root, modality, out, option, quiet, **kw):
    """Tune the bias terms of one frozen encoder on the task (BitFit) and write the bias deltas.

    Only the training rows that have the modality are used, so unpaired data helps; "have" under the
    missing-modality protocol fit trains with (same rate, type and seed; --train-missing-rate 0 for all rows).
    Apply the result with `embcache extract --image-bitfit OUT` (or --text-bitfit) on the same base checkpoint.
    """
    from embcache.tune import tune

    cfg = TuneConfig(dataset=dataset, root=root, modality=modality, out=out, dataset_options=parse_options(option),
                     **kw)
    report = tune(cfg, progress=not quiet, log=click.echo)
    best = "-" if report.best_val is None else f"{report.best_val:.4f}"
    click.echo(f"wrote {report.out}: best epoch {report.best_epoch}, val {report.metric} {best}")
    if report.unreadable:
        click.echo(f"  {report.unreadable} rows skipped: their image did not decode")
