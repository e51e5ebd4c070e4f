"""The import structure: no import cycle in the package, and a command line that starts without the heavy libraries."""
import ast
import json
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
# source folder -> installed package (setup.cfg package_dir)
PACKAGES = {"embcache": "embcache", "kernels": "embcache.kernels", "cli": "embcache.cli"}


def module_files() -> dict[str, pathlib.Path]:
    files = {}
    for folder, package in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            files[".".join((package, *parts))] = path
    return files


def import_graph() -> dict[str, set[str]]:
    """module -> the package modules it imports, at the top or inside a function (a lazy import is still a
    dependency: two modules that import each other, one of them lazily, are a cycle)."""
    files = module_files()
    graph = {}
    for name, path in files.items():
        package = name if path.stem == "__init__" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from .x import y, from . import y
                    parts = package.split(".")
                    base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
                targets |= {f"{base}.{alias.name}" if f"{base}.{alias.name}" in files else base
                            for alias in node.names}
        graph[name] = (targets & set(files)) - {name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def test_the_graph_sees_the_imports_it_should():
    graph = import_graph()
    assert "embcache.kernels._common" in graph["embcache.kernels.vicreg"]  # a relative import
    assert "embcache.kernels.vicreg_triton" in graph["embcache.kernels.vicreg"]  # `from . import x` in a function
    assert "embcache.store" in graph["embcache.interchange"]  # `from embcache import store as st`
    assert "embcache.kernels" in graph["embcache.cli.bench_fit"]  # `from embcache.kernels import BACKENDS`
    assert "embcache.cli.fit" not in graph["embcache.cli.main"]  # lazy group: only a string in main.py
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycle():
    assert cycles(import_graph()) == []


# The library's modules in the order the data flows (README "Layout"): each may import only those before it.
STAGES = ("errors", "config", "runtime", "metrics", "datasets", "dataset_formats", "missing", "images", "encoders",
          "hidden", "store", "extract", "tune", "stream", "interchange", "data", "models", "prompts", "plots",
          "evaluate", "runs", "train", "bundle")


def test_no_module_imports_a_later_stage():
    graph = import_graph()
    library = {f"embcache.{name}" for name in STAGES}
    assert library <= set(graph), library - set(graph)  # the list names real modules
    unlisted = {m for m in graph if m.count(".") == 1 and m.startswith("embcache.")
                and not m.startswith(("embcache.kernels", "embcache.cli", "embcache.bench"))} - library
    assert unlisted == set(), f"add {sorted(unlisted)} to STAGES"
    for i, name in enumerate(STAGES):
        later = {f"embcache.{n}" for n in STAGES[i + 1:]}
        assert not graph[f"embcache.{name}"] & later, (name, sorted(graph[f"embcache.{name}"] & later))


def test_only_the_benchmarks_and_the_command_line_load_the_benchmarks():
    graph = import_graph()
    users = {m for m, targets in graph.items() if any(t.startswith("embcache.bench") for t in targets)}
    assert users and all(m.startswith(("embcache.bench", "embcache.cli.")) for m in users), sorted(users)


def test_the_format_readers_build_on_the_datasets_module():
    """dataset_formats.py imports datasets.py; datasets.py finds the format readers by module name, never by an
    import, so the two run one way."""
    graph = import_graph()
    assert "embcache.datasets" in graph["embcache.dataset_formats"]
    assert "embcache.dataset_formats" not in graph["embcache.datasets"]


def test_the_kernels_do_not_import_each_other():
    graph = import_graph()
    assert "embcache.kernels.vicreg" not in graph["embcache.kernels.vicreg_triton"]
    assert graph["embcache.kernels._common"] == set() and "embcache.kernels.vicreg" not in graph["embcache.kernels"]


HEAVY = ("torch", "zarr", "h5py", "safetensors", "numpy")
PROBE = """
import json, sys
from click.testing import CliRunner
from embcache.cli.main import main
outputs = [CliRunner().invoke(main, args) for args in {args}]
assert all(r.exit_code == 0 for r in outputs), [r.output for r in outputs]
print(json.dumps({{"loaded": [m for m in {heavy!r} if m in sys.modules], "help": [r.output for r in outputs]}}))
"""


def _probe(*args: list[str]) -> dict:
    done = subprocess.run([sys.executable, "-c", PROBE.format(args=repr(list(args)), heavy=HEAVY)],
                          capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_the_help_imports_no_heavy_library():
    probe = _probe(["--help"], ["fit", "--help"], ["bench", "--help"], ["eval", "--help"])
    assert probe["loaded"] == [], probe["loaded"]
    main_help, fit_help = probe["help"][:2]
    assert "fit" in main_help and "Train the missing-modality predictors" in main_help and "bench" in main_help
    assert "--vicreg-backend [auto|torch|triton]" in fit_help and "[default: 30; x>=1]" in fit_help  # FitConfig.epochs


def test_the_lazy_listing_matches_the_imported_commands():
    """`embcache --help` reads each command's help line from its source; it must be what click shows once the
    commands are imported."""
    import click
    from click.testing import CliRunner

    from embcache.cli.main import BENCH_COMMANDS, COMMANDS, bench, main

    lazy = _probe(["--help"], ["bench", "--help"])["help"]
    for group, table in ((main, COMMANDS), (bench, BENCH_COMMANDS)):
        for name in table:
            assert group.get_command(click.Context(group), name).name == name
    imported = [CliRunner().invoke(main, args).output for args in (["--help"], ["bench", "--help"])]
    assert lazy == imported and "import-features" in lazy[0] and "kernels" in lazy[1]


@pytest.mark.parametrize("name", ["extract", "tune"])
def test_other_command_help_keeps_torch_out(name):
    assert "torch" not in _probe([name, "--help"])["loaded"]
