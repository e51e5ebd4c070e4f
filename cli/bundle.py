"""`embcache export` and `embcache predict`: bundle a trained run, and apply a bundle to raw inputs."""
from __future__ import annotations

import click

from embcache.cli.common import user_errors


@click.command("export")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--out", required=True, help="Bundle file to write, e.g. model.embcache.")
@click.option("--seed", type=int, default=None, help="Which run of a --seeds run (default: the first).")
@user_errors
def export_command(run_dir, out, seed):
    """Bundle a trained run for `embcache predict` (docs/bundle-format.md)."""
    from embcache.bundle import export_bundle

    click.echo(f"wrote {export_bundle(run_dir, out, seed)}")


@click.command("predict")
@click.argument("bundle", type=click.Path(exists=True, dir_okay=False))
@click.option("--manifest", required=True, type=click.Path(exists=True, dir_okay=False),
              help="JSONL or CSV with id, image, text (an empty field = absent); label and split are ignored.")
@click.option("--out", required=True, help="Predictions (JSONL): id, labels, scores, present.")
@click.option("--image-checkpoint", default=None, help="Where the image encoder's base weights are now.")
@click.option("--text-checkpoint", default=None, help="Where the text encoder's model folder is now.")
@click.option("--batch-size", type=int, default=64, show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option("--quiet", is_flag=True)
@user_errors
def predict_command(bundle, manifest, out, image_checkpoint, text_checkpoint, batch_size, device, quiet):
    """Run the encoders on raw images and texts and classify; an absent modality is predicted."""
    from embcache.bundle import load

    model = load(bundle, device=device, image_checkpoint=image_checkpoint, text_checkpoint=text_checkpoint)
    n = model.predict_manifest(manifest, out, batch_size=batch_size, progress=not quiet)
    click.echo(f"wrote {n} predictions to {out}")
