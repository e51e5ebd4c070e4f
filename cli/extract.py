"""`embcache extract`, `embcache bench extract`, and the encoder flags tune shares (defaults: ExtractConfig)."""
from __future__ import annotations

import json

import click

from embcache.cli.common import parse_options, user_errors
from embcache.config import ExtractConfig
from embcache.datasets import DATASET_NAMES

# Option defaults are the config dataclass's field defaults (class attributes: ExtractConfig has required fields).
D = ExtractConfig


def _apply(options, fn):
    for option in reversed(options):
        fn = option(fn)
    return fn


def base_encoder_options(fn):
    """Flags that choose the base encoders (every command that builds them)."""
    return _apply([
        click.option("--image-encoder", default=D.image_encoder, show_default=True,
                     help="timm:<arch> or open_clip:<arch>."),
        click.option("--image-checkpoint", default=None,
                     help="Local weights file (timm), or an open_clip pretrained tag/file."),
        click.option("--text-encoder", default=D.text_encoder, show_default=True,
                     help="hf:<model id or local folder>."),
        click.option("--text-pooling", type=click.Choice(["mean", "cls"]), default=D.text_pooling, show_default=True),
        click.option("--text-max-length", type=click.IntRange(1), default=D.text_max_length, show_default=True),
    ], fn)


def bitfit_options(fn):
    """BitFit bias deltas (from `embcache tune`) to apply on top of the base encoders."""
    return _apply([
        click.option("--image-bitfit", default=None, type=click.Path(exists=True, dir_okay=False),
                     help="BitFit bias-delta file (safetensors) to apply to the image encoder."),
        click.option("--text-bitfit", default=None, type=click.Path(exists=True, dir_okay=False),
                     help="BitFit bias-delta file (safetensors) to apply to the text encoder."),
    ], fn)


def encoder_options(fn):
    return base_encoder_options(bitfit_options(fn))


def _config(dataset, root, out, option, **kw):
    return ExtractConfig(dataset=dataset, root=root, out=out, dataset_options=parse_options(option), **kw)


@click.command("extract")
@click.option("--dataset", type=click.Choice(DATASET_NAMES), required=True,
              help="Reader for the dataset layout (manifest = your own JSONL/CSV).")
@click.option("--root", required=True,  # not click.Path: webdataset/parquet/hf roots may be globs or URLs
              help="Dataset folder, or the manifest file (manifest), or files / a glob / a brace pattern / an "
                   "fsspec URL (webdataset, parquet, hf).")
@click.option("--out", required=True, help="Zarr store to write (path or fsspec URL).")
@encoder_options
@click.option("--batch-size", type=click.IntRange(1), default=None, help="Default: 64 on CPU, 256 on GPU.")
@click.option("--workers", type=click.IntRange(0), default=D.workers, show_default=True,
              help="Loader processes (decode, tokenize); 0 = in the main process.")
@click.option("--device", default=D.device, show_default=True)
@click.option("--dtype", type=click.Choice(["float16", "float32"]), default=D.dtype, show_default=True)
@click.option("--chunk-rows", type=click.IntRange(1), default=None,
              help="Rows per Zarr chunk (default: about 4 MB chunks).")
@click.option("--overwrite", is_flag=True, help="Replace a store made with other encoders or data.")
@click.option("--limit", type=click.IntRange(1), default=None, help="Only the first N samples (a quick trial).")
@click.option("--cache-layers", type=click.IntRange(0), default=D.cache_layers, show_default=True,
              help="Also store the hidden states entering the last K transformer blocks of each encoder that has "
                   "them (for `fit --predictor prompts`); prints the size and refuses when the disk lacks it.")
@click.option("--option", multiple=True, metavar="KEY=VALUE", help="Reader option, e.g. val_fraction=0.1.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@user_errors
def extract_command(dataset, root, out, option, quiet, **kw):
    """Run the frozen encoders once over a dataset and write the feature cache (docs/cache-format.md).

    Killed at any point, the same command resumes where it stopped. Under torchrun
    (`torchrun --nproc_per_node K -m embcache.cli extract ...`) each process writes its own whole chunks of
    one store. --out may be a path or an fsspec URL (file://, s3://, gs://, memory://).
    """
    from embcache.extract import extract

    report = extract(_config(dataset, root, out, option, **kw), progress=not quiet, log=click.echo)
    if report.skipped:
        return
    resumed = "" if report.written == report.n_rows else f" (this run: {report.written})"
    click.echo(f"wrote {report.n_rows} rows{resumed} to {report.out} in {report.seconds:.1f} s "
               f"({report.samples_per_s:.1f} samples/s)")
    for m, count in report.present.items():
        click.echo(f"  {m}: {count} present, {report.n_rows - count} absent")
    if report.problems:
        click.echo("  problems: " + ", ".join(f"{k} {v}" for k, v in report.problems.items()))


@click.command("extract")
@click.option("--dataset", type=click.Choice(DATASET_NAMES), default="manifest", show_default=True)
@click.option("--root", default=None, help="Default: data/demo/manifest.jsonl (webdataset: it, written as shards).")
@encoder_options
@click.option("--batch-size", type=click.IntRange(1), default=None)
@click.option("--workers", type=click.IntRange(0), default=D.workers, show_default=True)
@click.option("--device", default=D.device, show_default=True)
@click.option("--limit", type=click.IntRange(1), default=None, help="Use only the first N samples.")
@click.option("--processes", default=None, metavar="1,2",
              help="Instead: time whole extract commands run as this many cooperating processes.")
@click.option("--json", "json_path", default=None, help="Also write the figures here.")
@user_errors
def extract_bench_command(dataset, root, limit, processes, json_path, **kw):
    """Whole-pipeline samples/s against the encoders' pure forward throughput at the same batch size."""
    from embcache.bench.extract import run_extract_bench, run_process_scaling

    cfg = _config(dataset, root, "", (), **kw)
    if processes:
        result = run_process_scaling(cfg, [int(k) for k in processes.split(",")], limit=limit)
    else:
        result = run_extract_bench(cfg, limit=limit)
    for line in result["table"]:
        click.echo(line)
    if json_path:
        with open(json_path, "w") as fh:
            json.dump({k: v for k, v in result.items() if k != "table"}, fh, indent=2)
