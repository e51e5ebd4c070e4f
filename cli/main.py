"""The `embcache` command line: a lazy group, each command in its own module, imported only when it runs or shows help."""
from __future__ import annotations

import ast
import importlib
import importlib.util

import click

# command name -> "module:function" of its click command
COMMANDS = {
    "tune": "embcache.cli.tune:tune_command",
    "extract": "embcache.cli.extract:extract_command",
    "fit": "embcache.cli.fit:fit_command",
    "eval": "embcache.cli.fit:eval_command",
    "compare": "embcache.cli.fit:compare_command",
    "export": "embcache.cli.bundle:export_command",
    "predict": "embcache.cli.bundle:predict_command",
    "export-features": "embcache.cli.interchange:export_features_command",
    "import-features": "embcache.cli.interchange:import_features_command",
}
BENCH_COMMANDS = {
    "accuracy": "embcache.cli.bench_accuracy:accuracy_command",
    "extract": "embcache.cli.extract:extract_bench_command",
    "fit": "embcache.cli.bench_fit:fit_bench_command",
    "kernels": "embcache.cli.bench_kernels:kernels_command",
}


def source_docstring(target: str) -> str:
    """The docstring of the function `target` ("module:function") names, read from its source file, not imported."""
    module, _, name = target.partition(":")
    tree = ast.parse(open(importlib.util.find_spec(module).origin, encoding="utf-8").read())
    node = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name)
    return (ast.get_docstring(node) or "").split("\f", 1)[0]


class LazyGroup(click.Group):
    """A group whose commands are imported on first use. Its own help lists them from their docstrings in the
    source, so `embcache --help` imports no command module, and `embcache fit --help` only cli/fit.py."""

    def __init__(self, *args, lazy_commands: dict[str, str], **kwargs):
        super().__init__(*args, **kwargs)
        self.lazy_commands = lazy_commands

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*self.commands, *self.lazy_commands})

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in self.commands and name in self.lazy_commands:
            module, _, attribute = self.lazy_commands[name].partition(":")
            self.add_command(getattr(importlib.import_module(module), attribute), name)
        return self.commands.get(name)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        names = self.list_commands(ctx)
        if not names:
            return
        limit = formatter.width - 6 - max(len(name) for name in names)  # what click.Group.format_commands gives
        rows = []
        for name in names:
            if name in self.commands:  # a subgroup, or a command already imported
                rows.append((name, self.commands[name].get_short_help_str(limit)))
            else:  # the help line click would give the command, from its docstring
                stub = click.Command(name, help=source_docstring(self.lazy_commands[name]))
                rows.append((name, stub.get_short_help_str(limit)))
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup, lazy_commands=COMMANDS,
             context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="embcache")
def main() -> None:
    """Cache frozen-encoder features once, then train missing-modality predictors and fusion on them."""


@main.group(cls=LazyGroup, lazy_commands=BENCH_COMMANDS)
def bench() -> None:
    """Benchmarks: accuracy (predict vs zero vs mean), extract throughput, fit speed, VICReg kernels."""


if __name__ == "__main__":
    main()
