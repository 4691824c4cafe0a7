"""Import layering, read from the source (AST, nothing is imported).

- The runtime package `raddino_jax` never imports the offline `data_prep` package (data_prep
  holds command lines over raddino_jax's libraries, never the reverse). One exception: the
  command lines that honour `data.builtin` (main, scaling) import the sample generator's
  `data_prep.samples.builtin`, and nothing else of data_prep.
- Lower layers (models, ssl, parallel, data, train, eval) never import a command-line module
  (main, evaluate, extract, sweep, convert.__main__): shared code lives in a library module.
- Nothing in `raddino_jax` outside `raddino_jax.reference` (the train step in PyTorch, the
  `torch` extra) imports it: only the tests and the benchmarks do.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "raddino_jax"
BUILTIN_DRIVERS = ("raddino_jax.main", "raddino_jax.scaling")  # data.builtin's command lines
LOWER_LAYERS = ("models", "ssl", "parallel", "data", "train", "eval")
CLI_MODULES = (
    "raddino_jax.main",
    "raddino_jax.evaluate",
    "raddino_jax.extract",
    "raddino_jax.sweep",
    "raddino_jax.convert.__main__",
)


def module_name(path: pathlib.Path) -> str:
    """raddino_jax/data/records.py -> raddino_jax.data.records (a package -> its name)."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(path: pathlib.Path) -> set[str]:
    """Every module `path` imports anywhere (also inside functions), as absolute names.

    `from a import b` yields both `a` and `a.b` (b may be a submodule); relative imports are
    resolved against the file's package.
    """
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


def is_within(name: str, module: str) -> bool:
    return name == module or name.startswith(module + ".")


SOURCES = sorted(PACKAGE.rglob("*.py"))


def test_the_walk_sees_the_package_and_its_imports():
    """Guards against a vacuous pass: the files and a known import are found."""
    assert len(SOURCES) > 30
    features = imported_modules(PACKAGE / "eval" / "features.py")
    assert "raddino_jax.models" in features and "raddino_jax.data.records" in features


def test_relative_imports_are_resolved(tmp_path, monkeypatch):
    package = tmp_path / "raddino_jax" / "data"
    package.mkdir(parents=True)
    source = package / "pipeline.py"
    source.write_text("from . import augment\nfrom ..main import run\n")
    monkeypatch.setitem(globals(), "ROOT", tmp_path)
    assert {"raddino_jax.data.augment", "raddino_jax.main.run"} <= imported_modules(source)


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_runtime_package_never_imports_data_prep(path):
    allowed = set()
    if module_name(path) in BUILTIN_DRIVERS:
        allowed = {"data_prep.samples.builtin", "data_prep.samples.builtin.builtin_dataset"}
    imported = imported_modules(path) - allowed
    offending = sorted(n for n in imported if is_within(n, "data_prep"))
    assert not offending, f"{module_name(path)} imports {offending}; move the code into raddino_jax"


LOWER_SOURCES = [p for p in SOURCES if p.relative_to(PACKAGE).parts[0] in LOWER_LAYERS]


@pytest.mark.parametrize("path", LOWER_SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_lower_layers_never_import_command_line_modules(path):
    imported = imported_modules(path)
    offending = sorted(n for n in imported if any(is_within(n, cli) for cli in CLI_MODULES))
    offending += sorted(n for n in imported if n.split(".")[-1] == "__main__")
    assert not offending, f"{module_name(path)} imports command-line modules {offending}"


def test_only_tests_and_benchmarks_import_the_torch_reference():
    reference = PACKAGE / "reference"
    offending = {
        module_name(path): sorted(
            n for n in imported_modules(path) if is_within(n, "raddino_jax.reference")
        )
        for path in SOURCES
        if reference not in path.parents
    }
    assert not {k: v for k, v in offending.items() if v}
    assert any(
        is_within(n, "raddino_jax.reference")
        for n in imported_modules(ROOT / "tests" / "test_step_reference.py")
    ), "the walk must see an import of the reference"
