"""The layer rules of DESIGN.md, checked on the source: imports point down only."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "wsi_encoder"
LAYERS = {"cli": 5, "pipelines": 4, "io": 2, "errors": 1, "config": 1, "_types": 1, "__init__": 1}
SCIENCE = 3  # every other top-level module or package: the science, ordered by SCIENCE_ORDER
#: The order inside the science layer (docs/design.md, Layers): a package imports only packages of a
#: lower rank (and io/errors below). Training loops sit on top: they use models, tasks and the
#: evaluation metrics; evaluation fits and scores models; models never import training or evaluation.
SCIENCE_ORDER = {
    "devices": 0,
    "pictures": 0,
    "tissue": 0,
    "synthetic": 0,
    "tasks": 0,
    "tiling": 1,
    "qc": 1,
    "overlays": 1,
    "models": 2,
    "evaluation": 3,
    "compression": 3,
    "training": 4,
}


def _head(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _layer(module: str) -> int:
    return LAYERS.get(_head(module), SCIENCE)


def _science_problem(module: str, name: str) -> str | None:
    """Why ``module`` must not import ``name`` within the science layer (None when it may)."""
    own, target = _head(module), _head(name)
    if _layer(module) != SCIENCE or _layer(name) != SCIENCE or own == target:
        return None
    if own not in SCIENCE_ORDER or target not in SCIENCE_ORDER:
        missing = own if own not in SCIENCE_ORDER else target
        return f"wsi_encoder.{missing} has no place in SCIENCE_ORDER (tests/test_layers.py, docs/design.md)"
    if SCIENCE_ORDER[target] >= SCIENCE_ORDER[own]:
        return f"{module} ({own}, rank {SCIENCE_ORDER[own]}) imports {name} ({target}, rank {SCIENCE_ORDER[target]})"
    return None


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
            science = _science_problem(module, name)
            if science is not None:
                problems.append(f"line {line}: {science}")
        if top == "click" and own != LAYERS["cli"]:
            problems.append(f"line {line}: only wsi_encoder.cli may import click")
        if name.startswith(("distributed", "dask.distributed")) and own != LAYERS["pipelines"]:
            problems.append(f"line {line}: only wsi_encoder.pipelines may use dask.distributed")
        head = module.split(".")[1] if "." in module else ""
        if top in ("torch", "torchvision") and head in ("io", "tissue", "tiling"):
            problems.append(f"line {line}: {module} must not import torch")
    assert not problems, "\n".join(problems)


def test_every_science_module_has_a_rank() -> None:
    heads = {_head(m) for m, _ in _modules() if _layer(m) == SCIENCE}
    assert heads == set(SCIENCE_ORDER), f"unranked: {sorted(heads - set(SCIENCE_ORDER))}"


def test_science_order_catches_a_model_importing_training() -> None:
    assert _science_problem("wsi_encoder.models.heads", "wsi_encoder.training.multitask") is not None
    assert _science_problem("wsi_encoder.evaluation.crossval", "wsi_encoder.training.slide_trainer") is not None
    assert _science_problem("wsi_encoder.training.multitask", "wsi_encoder.evaluation.metrics") is None
    assert _science_problem("wsi_encoder.tiling", "wsi_encoder.tissue") is None
    assert _science_problem("wsi_encoder.tissue", "wsi_encoder.tiling") is not None


def test_import_wsi_encoder_is_light() -> None:
    code = (
        "import sys, wsi_encoder, wsi_encoder.errors\n"
        "heavy = [m for m in ('torch', 'dask', 'openslide', 'tiffslide', 'zarr', 'sklearn') if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "", f"import wsi_encoder pulled in: {out}"
