"""The package structure DESIGN.md asks for, checked on the source: no module imports a private
name of another package, ``pipeline/`` never imports ``detectors/`` (detectors import the records
from ``pipeline.records``: one direction only), and nothing installs a package named ``tests``."""

import ast
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("model", "pipeline", "detectors", "jobs", "sinks", "synth", "demo", "benchmarks", "tests")


def modules():
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            yield package, path


def imported(tree: ast.AST):
    """(module, name or None, node) for every import: ``import a.b`` gives ("a.b", None)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, None, alias.asname, node
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            for alias in node.names:
                yield node.module, alias.name, alias.asname, node


def private_uses(package: str, path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), str(path))
    found, module_aliases = [], {}
    for module, name, asname, node in imported(tree):
        top = module.split(".")[0]
        if top not in PACKAGES or top == package:
            continue
        if name is None:
            module_aliases[asname or top] = module
        elif name.startswith("_"):
            found.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {module}.{name}")
        else:
            module_aliases[asname or name] = f"{module}.{name}"  # may be a module; checked below if used so
    for node in ast.walk(tree):  # alias._private, e.g. `import jobs.caption as c; c._pack`
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in module_aliases
                and node.attr.startswith("_") and not node.attr.startswith("__")):
            found.append(f"{path.relative_to(ROOT)}:{node.lineno} uses {module_aliases[node.value.id]}.{node.attr}")
    return found


def test_no_module_imports_a_private_name_of_another_package():
    # tests/ is left out on purpose: a test module mirrors the module it tests and may check its
    # private helpers; the rule is for the product's packages, which must meet through public names.
    found = [use for package, path in modules() if package != "tests" for use in private_uses(package, path)]
    assert not found, "private names used across packages:\n" + "\n".join(found)


def test_the_check_catches_a_private_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("from jobs.caption import _pack\nimport pipeline.flow as flow\nflow._detect()\n")
    rel = ROOT / "model" / "bad_probe.py"  # as if it lived in model/
    rel.write_text(bad.read_text())
    try:
        found = private_uses("model", rel)
    finally:
        rel.unlink()
    assert len(found) == 2 and "jobs.caption._pack" in found[0] and "pipeline.flow._detect" in found[1]


@pytest.mark.parametrize("package, forbidden", [("pipeline", "detectors"), ("model", "pipeline"),
                                                 ("model", "detectors"), ("model", "jobs"), ("pipeline", "jobs"),
                                                 ("detectors", "jobs"), ("sinks", "jobs")])
def test_layers_import_downwards_only(package, forbidden):
    """pipeline/ never imports detectors/ (no cycle: detectors import pipeline.records); the model
    core imports no other package of ours; nothing below jobs/ imports jobs/."""
    found = [f"{path.relative_to(ROOT)}:{node.lineno} imports {module}"
             for pkg, path in modules() if pkg == package
             for module, _, _, node in imported(ast.parse(path.read_text()))
             if module.split(".")[0] == forbidden]
    assert not found, "\n".join(found)


def test_no_installed_package_is_named_tests():
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    assert "tests" not in packages and not any(p.startswith("tests.") for p in packages)
    assert set(packages) >= {"model", "pipeline", "detectors", "jobs", "sinks", "synth", "demo"}


def test_benchmarks_run_from_a_checkout_without_path_edits():
    """``python -m benchmarks.X`` from the repository root: no sys.path edits, no test imports."""
    for path in sorted((ROOT / "benchmarks").glob("*.py")):
        tree = ast.parse(path.read_text())
        assert not [m for m, *_ in imported(tree) if m.split(".")[0] == "tests"], f"{path.name} imports tests"
        assert "sys.path" not in path.read_text(), f"{path.name} edits sys.path"


def test_torch_is_required_at_a_version_whose_weights_only_load_is_safe():
    """torch.load(weights_only=True) is a full unpickle before torch 2.6 (CVE-2025-32434); every
    .pt/.bin roiscribe loads relies on it being safe."""
    import re

    import torch

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (spec,) = [d for d in deps if re.match(r"torch\s*[><=]", d)]
    low = tuple(int(x) for x in re.search(r">=\s*(\d+)\.(\d+)", spec).groups())
    assert low >= (2, 6), spec
    assert tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 6)
