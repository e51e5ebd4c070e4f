"""`embcache export-features` and `embcache import-features` (layouts: docs/interchange.md)."""
from __future__ import annotations

import os

import click
from click.core import ParameterSource

from embcache.cli.common import user_errors
from embcache.interchange import export_features, import_clip_retrieval, import_hdf5, import_npy
from embcache.store import EMB_DTYPES, TASK_TYPES

HDF5_EXTENSIONS = (".h5", ".hdf5")


@click.command("export-features")
@click.argument("store")
@click.option("--to", "to", required=True, type=click.Path(dir_okay=False), help="HDF5 file to write.")
@click.option("--overwrite", is_flag=True, help="Replace an existing file.")
@user_errors
def export_features_command(store, to, overwrite):
    """Write a finished feature cache to one HDF5 file (streamed chunk by chunk)."""
    meta = export_features(store, to, overwrite=overwrite)
    click.echo(f"wrote {to}: {meta['dataset']['n_rows']} rows, modalities {', '.join(meta['modalities'])}")


def _classes(ctx, param, value: str | None) -> list[str] | None:
    return [c.strip() for c in value.split(",") if c.strip()] if value else None


@click.command("import-features")
@click.option("--from", "source", type=click.Path(exists=True),
              help="A features.h5 written by export-features, or a clip-retrieval output folder.")
@click.option("--image-npy", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="Image embeddings (N, D); repeat for several parts, concatenated in order.")
@click.option("--text-npy", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="Text embeddings (N, D); repeat for several parts.")
@click.option("--metadata", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="Metadata table(s), CSV or JSONL, one row per embedding row; repeat for several parts.")
@click.option("--out", required=True, help="Store to write (a path or fsspec URL).")
@click.option("--task", type=click.Choice(TASK_TYPES), default=None,
              help="Default: multilabel for a 'labels' column, binary for 2 classes, else multiclass.")
@click.option("--classes", callback=_classes, default=None,
              help="Comma-separated class names in label-index order (default: the sorted label names).")
@click.option("--val-fraction", type=click.FloatRange(0, 1, max_open=True), default=0.0, show_default=True,
              help="Move this share of the train rows to val (stable: a hash of seed and id).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the --val-fraction draw.")
@click.option("--image-model", default=None, help="Name recorded as the image encoder (default: the file name).")
@click.option("--text-model", default=None, help="Name recorded as the text encoder (default: the file name).")
@click.option("--dtype", type=click.Choice(EMB_DTYPES), default="float16", show_default=True)
@click.option("--chunk-rows", type=click.IntRange(1), default=None, help="Rows per chunk (default: about 4 MiB).")
@click.option("--overwrite", is_flag=True, help="Replace an existing store.")
@user_errors
def import_features_command(source, image_npy, text_npy, metadata, out, overwrite, **options):
    """Make a feature cache from embeddings computed elsewhere, ready for `embcache fit`.

    \b
    --from features.h5          restore a store written by export-features
    --from FOLDER               a clip-retrieval folder (img_emb/, text_emb/, metadata/ CSV or JSONL)
    --image-npy/--text-npy ...  .npy matrices, with --metadata
    """
    if source and os.path.isfile(source) and source.lower().endswith(HDF5_EXTENSIONS):
        ctx = click.get_current_context()
        given = [f"--{name.replace('_', '-')}" for name in ("image_npy", "text_npy", "metadata", *options)
                 if ctx.get_parameter_source(name) is not ParameterSource.DEFAULT]
        if given:
            raise click.UsageError(f"{', '.join(given)}: not used with an HDF5 file, which holds everything")
        meta = import_hdf5(source, out, overwrite=overwrite)
    elif source and os.path.isdir(source):
        if image_npy or text_npy:
            raise click.UsageError("--image-npy/--text-npy: give either a clip-retrieval folder or the files")
        meta = import_clip_retrieval(source, out, metadata=metadata, overwrite=overwrite, **options)
    elif source:
        raise click.UsageError(f"--from {source}: expected a .h5/.hdf5 file or a clip-retrieval folder")
    elif image_npy or text_npy:
        if not metadata:
            raise click.UsageError("--metadata is required with --image-npy/--text-npy")
        meta = import_npy(out, image=image_npy, text=text_npy, metadata=metadata, overwrite=overwrite, **options)
    else:
        raise click.UsageError("give --from, or --image-npy/--text-npy with --metadata")
    problems = ", ".join(f"{k} {v}" for k, v in meta["problems"].items()) or "none"
    click.echo(f"wrote {out}: {meta['dataset']['n_rows']} rows, task {meta['task']['type']} "
               f"({len(meta['task']['classes'])} classes); problems: {problems}")
