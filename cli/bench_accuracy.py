"""`embcache bench accuracy`."""
from __future__ import annotations

import click

from embcache.cli.common import user_errors
from embcache.models import FitConfig, FitError

D = FitConfig()


def _seeds(ctx, param, value: str) -> list[int]:
    try:
        seeds = sorted({int(s) for s in value.split(",") if s.strip()})
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of integers") from None
    if len(seeds) < 1:
        raise click.BadParameter("give at least one seed")
    return seeds


@click.command("accuracy")
@click.option("--store", "stores", multiple=True, help="A feature store to benchmark (repeatable).")
@click.option("--synthetic", "synthetic_names", multiple=True,
              type=click.Choice(["synthetic-predictable", "synthetic-weak"]),
              help="A built-in synthetic cache (repeatable): cross-modal R2 about 0.6 (predictable) or 0.1 (weak).")
@click.option("--seeds", default="0,1,2", show_default=True, callback=_seeds, help="Training seeds.")
@click.option("--test-rate", type=click.FloatRange(0, 1), default=D.test_missing_rate, show_default=True)
@click.option("--train-rate", type=click.FloatRange(0, 1), default=D.train_missing_rate, show_default=True,
              help="Missing rate of the 'missing' training setting (the 'complete' setting uses 0).")
@click.option("--epochs", type=click.IntRange(1), default=D.epochs, show_default=True)
@click.option("--device", default=D.device, show_default=True)
@click.option("--threads", type=click.IntRange(1), default=None, help="CPU threads for torch (default: torch's).")
@click.option("--out", default="bench-accuracy", show_default=True, type=click.Path(file_okay=False),
              help="Folder for accuracy.json, accuracy.txt and accuracy.png.")
@user_errors(FitError)
def accuracy_command(stores, synthetic_names, seeds, test_rate, train_rate, epochs, device, threads, out):
    """Predict vs zero vs mean fill, in complete and missing training, against a linear probe."""
    import torch

    from embcache.bench_accuracy import run_bench

    if threads:
        torch.set_num_threads(threads)
    if not stores and not synthetic_names:
        raise click.UsageError("give at least one --store or --synthetic")
    report = run_bench(list(stores), list(synthetic_names), FitConfig(epochs=epochs, device=device), seeds=seeds,
                       out=out, test_rate=test_rate, train_rate=train_rate, log=lambda m: click.echo(m, err=True))
    click.echo("\n".join(report["table"]))
    click.echo(f"wrote {out}/accuracy.json, accuracy.txt, accuracy.png")
