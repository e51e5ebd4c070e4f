"""`embcache bench fit`: fit-loop speed on a synthetic MM-IMDb-sized cache (options default to FitBenchConfig)."""
from __future__ import annotations

import json

import click

from embcache.cli.common import user_errors
from embcache.config import IMPUTE_MODES, PREDICTORS, FitBenchConfig
from embcache.kernels import BACKENDS, FP32_PRECISIONS

D = FitBenchConfig()


@click.command("fit")
@click.option("--n-train", type=click.IntRange(100), default=D.n_train, show_default=True,
              help="Training rows (val and test keep MM-IMDb's proportions).")
@click.option("--dim", type=click.IntRange(2), default=D.dim, show_default=True, help="Embedding width per modality.")
@click.option("--classes", "n_classes", type=click.IntRange(2), default=D.n_classes, show_default=True)
@click.option("--epochs", type=click.IntRange(1), default=D.epochs, show_default=True)
@click.option("--batch-size", type=click.IntRange(1), default=D.batch_size, show_default=True)
@click.option("--impute", type=click.Choice(IMPUTE_MODES), default=D.impute, show_default=True)
@click.option("--device", default=D.device, show_default=True)
@click.option("--compile/--no-compile", "compile_", default=D.compile, show_default=True)
@click.option("--threads", type=click.IntRange(1), default=D.threads,
              help="CPU threads for torch (default: torch's). 1 gives steady numbers on a busy machine.")
@click.option("--predictor", type=click.Choice(PREDICTORS), default=D.predictor, show_default=True,
              help="prompts: text -> image by read-only prompts in MiniLM's last blocks on synthetic hidden states "
                   "(text is then 384 wide); also reports the MLP predictor's step time on the same data.")
@click.option("--prompts", type=click.IntRange(1), default=D.prompts, show_default=True)
@click.option("--cache-layers", type=click.IntRange(1), default=D.cache_layers, show_default=True)
@click.option("--tokens", type=click.IntRange(1), default=D.tokens, show_default=True, help="Text tokens per row (T).")
@click.option("--vicreg-backend", type=click.Choice(BACKENDS), default=D.vicreg_backend,
              help="VICReg loss backend of the fit (default: FitConfig's, auto). triton: no fallback.")
@click.option("--vicreg-precision", type=click.Choice(FP32_PRECISIONS), default=D.vicreg_precision,
              help="tl.dot precision for fp32 inputs on the Triton path (default: FitConfig's).")
@click.option("--json", "json_path", default=None, type=click.Path(dir_okay=False), help="Also write the figures here.")
@user_errors
def fit_bench_command(compile_, json_path, **kw):
    """Fit loop epochs/s on a synthetic MM-IMDb-sized cache, beside the model's pure compute time."""
    from embcache.bench.fit import run_fit_bench

    result = run_fit_bench(compile=compile_, **kw)
    for line in result["table"]:
        click.echo(line)
    if json_path:
        with open(json_path, "w") as fh:
            json.dump({k: v for k, v in result.items() if k != "table"}, fh, indent=2)
