"""``embcache bench kernels``: time the VICReg loss implementations (logic in embcache.bench.kernels)."""
from __future__ import annotations

import click
import torch

from embcache.bench import kernels as bk


@click.command("kernels")
@click.option("--sizes", default=None, metavar="NxD[,NxD...]",
              help="Problem sizes. Default: six sizes from 256x768 to 8192x8192 on CUDA (docs/vicreg-kernel.md), "
                   "three small ones on CPU.")
@click.option("--dtypes", default="fp32,bf16", show_default=True,
              help="Comma-separated: fp32 (TF32 off), tf32 (fp32 inputs, TF32 matmuls), bf16.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--variants", default=",".join(bk.VARIANTS), show_default=True)
@click.option("--repeat", type=int, default=5, show_default=True,
              help="CPU: timed runs per case (median). CUDA: do_bench runs for 20*repeat ms.")
@click.option("--compile/--no-compile", "compile_", default=True, show_default=True,
              help="Include torch.compile of the reference.")
@click.option("--compile-budget", type=float, default=120.0, show_default=True,
              help="Seconds of compile time in total; later compiled cases are skipped with a note.")
@click.option("--threads", type=int, default=None,
              help="torch.set_num_threads for the CPU variants (default: torch's choice).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None,
              help="Write environment, settings and every row to this JSON file.")
def kernels_command(sizes, dtypes, device, variants, repeat, compile_, compile_budget, threads, seed, json_path):
    """Forward+backward time, peak extra memory and float64 error of the VICReg loss variants."""
    if threads:
        torch.set_num_threads(threads)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise click.UsageError("--device cuda, but CUDA is not available")
    dtype_list = tuple(t.strip() for t in dtypes.split(","))
    variant_list = tuple(v.strip() for v in variants.split(","))
    for name, given, allowed in (("dtype", dtype_list, bk.DTYPE_MODES), ("variant", variant_list, bk.VARIANTS)):
        unknown = [v for v in given if v not in allowed]
        if unknown:
            raise click.BadParameter(f"unknown {name}(s) {unknown}; choose from {list(allowed)}")
    settings = bk.BenchSettings(
        sizes=bk.parse_sizes(sizes) if sizes else (bk.GPU_SIZES if device == "cuda" else bk.CPU_SIZES),
        dtypes=dtype_list, device=device, variants=variant_list, repeat=repeat, compile=compile_,
        compile_budget_s=compile_budget, seed=seed)
    env = bk.environment()
    click.echo(f"# torch {env['torch']}, triton {env['triton']}, device {device}"
               f" ({env.get('gpu') or env['processor'] or env['machine']}, {env['cpu_threads']} threads)")
    click.echo(bk.HEADER)
    rows = bk.run_bench(settings, echo=click.echo)
    if json_path:
        bk.write_json(json_path, settings, rows)
        click.echo(f"# wrote {json_path}")


if __name__ == "__main__":  # python -m embcache.cli.bench_kernels (before it is registered in cli/main.py)
    kernels_command()
