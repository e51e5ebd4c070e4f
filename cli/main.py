"""The `embcache` command line: one job per command, each in its own module."""
from __future__ import annotations

import click

from embcache.cli.bench_accuracy import accuracy_command
from embcache.cli.bench_fit import fit_bench_command
from embcache.cli.bench_kernels import kernels_command
from embcache.cli.bundle import export_command, predict_command
from embcache.cli.extract import extract_bench_command, extract_command
from embcache.cli.fit import eval_command, fit_command
from embcache.cli.interchange import export_features_command, import_features_command
from embcache.cli.tune import tune_command


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="embcache")
def main() -> None:
    """Cache frozen-encoder features once, then train missing-modality predictors and fusion on them."""


@main.group()
def bench() -> None:
    """Benchmarks: accuracy (predict vs zero vs mean), extract throughput, fit speed, VICReg kernels."""


main.add_command(tune_command)
main.add_command(extract_command)
main.add_command(fit_command)
main.add_command(eval_command)
main.add_command(export_command)
main.add_command(predict_command)
main.add_command(export_features_command)
main.add_command(import_features_command)
bench.add_command(accuracy_command)
bench.add_command(extract_bench_command)
bench.add_command(fit_bench_command)
bench.add_command(kernels_command)

if __name__ == "__main__":
    main()
