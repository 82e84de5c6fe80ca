"""The layer rules of DESIGN.md, checked on the source: imports point down only."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "wsi_encoder"
LAYERS = {"cli": 5, "pipelines": 4, "io": 2, "errors": 1, "config": 1, "_types": 1, "__init__": 1}
SCIENCE = 3  # tissue, tiling, models, tasks, training, compression, evaluation, synthetic, ...


def _layer(module: str) -> int:
    parts = module.split(".")
    head = parts[1] if len(parts) > 1 else "__init__"
    return LAYERS.get(head, SCIENCE)


def _imports(path: Path) -> list[tuple[str, int]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.module, node.lineno))
    return found


def _modules() -> list[tuple[str, Path]]:
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__" and len(parts) > 1:
            parts = parts[:-1] if len(parts) > 2 else [*parts[:-1], "__init__"]
        out.append((".".join(parts), path))
    return out


@pytest.mark.parametrize(("module", "path"), _modules(), ids=[m for m, _ in _modules()])
def test_imports_point_down(module: str, path: Path) -> None:
    own = _layer(module)
    problems = []
    for name, line in _imports(path):
        top = name.split(".")[0]
        if top == "wsi_encoder" and name != "wsi_encoder":
            if _layer(name) > own:
                problems.append(f"line {line}: {module} (layer {own}) imports {name} (layer {_layer(name)})")
        if top == "click" and own != LAYERS["cli"]:
            problems.append(f"line {line}: only wsi_encoder.cli may import click")
        if name.startswith(("distributed", "dask.distributed")) and own != LAYERS["pipelines"]:
            problems.append(f"line {line}: only wsi_encoder.pipelines may use dask.distributed")
        head = module.split(".")[1] if "." in module else ""
        if top in ("torch", "torchvision") and head in ("io", "tissue", "tiling"):
            problems.append(f"line {line}: {module} must not import torch")
    assert not problems, "\n".join(problems)


def test_import_wsi_encoder_is_light() -> None:
    code = (
        "import sys, wsi_encoder, wsi_encoder.errors\n"
        "heavy = [m for m in ('torch', 'dask', 'openslide', 'tiffslide', 'zarr', 'sklearn') if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "", f"import wsi_encoder pulled in: {out}"
