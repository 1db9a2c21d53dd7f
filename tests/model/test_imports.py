"""model/ must run on a GPU box that has only torch, torchvision and transformers."""

import ast
import subprocess
import sys
from pathlib import Path

import model

ALLOWED = {"torch", "torchvision", "transformers", "safetensors", "numpy"} | set(sys.stdlib_module_names)


def _module_level_imports(path: Path) -> set[str]:
    roots = set()
    for node in ast.parse(path.read_text()).body:  # top-level statements only
        if isinstance(node, ast.Import):
            roots |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


def test_model_imports_only_the_core_stack_at_module_level():
    for path in Path(model.__file__).parent.glob("*.py"):
        extra = _module_level_imports(path) - ALLOWED
        assert not extra, f"{path.name} imports {sorted(extra)} at module level"


def test_importing_model_pulls_in_no_pipeline_dependency():
    code = ("import sys, pkgutil, importlib, model\n"
            "[importlib.import_module('model.' + m.name) for m in pkgutil.iter_modules(model.__path__)]\n"
            "print(' '.join(sorted(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    for banned in ("ray", "ultralytics", "label_studio_sdk", "cv2"):
        assert banned not in out, f"importing model/ imported {banned}"
