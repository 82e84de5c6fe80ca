"""What every ``wsienc`` command shares: the --device rule, the progress bar, defaults from config objects."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from wsi_encoder.cli import main
from wsi_encoder.cli.common import Progress
from wsi_encoder.devices import DEVICE_CHOICES


def _commands_with_device(tmp: Path) -> dict[str, list[str]]:
    """Each command that runs torch, with the least arguments that would otherwise start work."""
    folder = tmp / "data"
    folder.mkdir(exist_ok=True)
    out = str(tmp / "out")
    return {
        "train-encoder": ["train-encoder", "--device", "bogus", "--task", f"kather-crc={folder}", "--out", out],
        "encode": ["encode", "--device", "bogus", str(tmp / "p.zarr"), "--encoder", "nic", "--out", out],
        "predict": ["predict", "--device", "bogus", str(folder), "--model", str(folder), "--out", out],
        "classify train": ["classify", "train", "--device", "bogus", str(tmp / "e.zarr"), "--labels",
                           str(tmp / "l.csv"), "--model", "linear", "--out", out],
        "classify predict": ["classify", "predict", "--device", "bogus", str(tmp / "e.zarr"), "--model",
                             str(folder), "--out", str(tmp / "o.csv")],
        "lomo": ["lomo", "--device", "bogus", str(folder), "--out", out],
        "demo": ["demo", "--device", "bogus", "--out", out],
    }  # fmt: skip


@pytest.mark.parametrize(
    "command", ["train-encoder", "encode", "predict", "classify train", "classify predict", "lomo", "demo"]
)
def test_a_bad_device_is_one_line_before_any_work(command: str, tmp_path: Path) -> None:
    args = _commands_with_device(tmp_path)[command]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1, result.output
    assert result.output.strip() == f"Error: device 'bogus' is not one of {DEVICE_CHOICES}"
    assert not (tmp_path / "out").exists()


def test_every_device_option_is_the_same_and_defaults_to_auto() -> None:
    from wsi_encoder.cli import COMMANDS, LazyGroup

    found = {}
    for name in COMMANDS:
        command = LazyGroup._load(name)
        subcommands = command.commands.values() if isinstance(command, click.Group) else [command]
        for sub in subcommands:
            for param in sub.params:
                if param.name == "device":
                    found[sub.name] = param
    assert set(found) == {"train-encoder", "encode", "predict", "train", "lomo", "demo"}  # classify train/predict
    for param in found.values():
        assert isinstance(param, click.Option)
        assert param.default == "auto"
        assert DEVICE_CHOICES in (param.help or "")  # the help names exactly what resolve_device accepts


def test_a_missing_cuda_device_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    args = _commands_with_device(tmp_path)["lomo"]
    args[args.index("bogus")] = "cuda:1"
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1
    assert result.output.strip() == "Error: device 'cuda:1': CUDA is not available here; use --device cpu or auto"


def test_lomo_gpu_is_one_line(tmp_path: Path) -> None:
    args = _commands_with_device(tmp_path)["lomo"]
    args[args.index("bogus")] = "gpu"
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.output.strip() == f"Error: device 'gpu' is not one of {DEVICE_CHOICES}"


# ---- one progress helper ---------------------------------------------------------------------
@click.command()
@click.option("--items", type=int, default=3)
@click.option("--grow", is_flag=True)
def _work(items: int, grow: bool) -> None:
    with Progress("working", unit="thing") as bar:
        if grow:
            bar.add_total(2)
            bar.update(2)
            bar.add_total(items)
        bar.write("a line above the bar")
        for _ in bar.iterate(range(items)):
            bar.postfix("postfix-text")
    click.echo(f"total {bar.total}")


@pytest.fixture
def work_group() -> click.Group:
    @click.group()
    @click.option("-q", "quiet", is_flag=True)
    @click.pass_context
    def root(ctx: click.Context, quiet: bool) -> None:
        ctx.obj = {"verbosity": -1 if quiet else 0}

    root.add_command(_work, "work")
    return root


def test_progress_draws_on_stderr_with_total_postfix_and_lines(work_group: click.Group) -> None:
    result = CliRunner().invoke(work_group, ["work", "--items", "4"])
    assert result.exit_code == 0, result.output
    assert result.stdout == "total 4\n"  # the bar never touches stdout (pipes stay clean)
    assert "working" in result.stderr and "4/4" in result.stderr and "thing" in result.stderr
    assert "postfix-text" in result.stderr and "a line above the bar" in result.stderr


def test_progress_total_grows(work_group: click.Group) -> None:
    result = CliRunner().invoke(work_group, ["work", "--items", "3", "--grow"])
    assert result.exit_code == 0, result.output
    assert "5/5" in result.stderr and result.stdout == "total 5\n"


def test_progress_is_silent_under_quiet(work_group: click.Group, monkeypatch: pytest.MonkeyPatch) -> None:
    import tqdm

    monkeypatch.setattr(tqdm, "tqdm", lambda *a, **k: pytest.fail("a bar was made under -q"))  # nor imported: start-up
    result = CliRunner().invoke(work_group, ["-q", "work", "--items", "4"])
    assert result.exit_code == 0
    assert result.stderr == "" and result.stdout == "total 4\n"
    grown = CliRunner().invoke(work_group, ["-q", "work", "--items", "4", "--grow"])
    assert grown.exit_code == 0, grown.output
    assert grown.stderr == "" and grown.stdout == "total 6\n"


def test_progress_draws_nothing_until_work_is_reported(work_group: click.Group) -> None:
    result = CliRunner().invoke(work_group, ["work", "--items", "0"])
    assert result.exit_code == 0
    assert "working" not in result.stderr and "a line above the bar" in result.stderr


def test_no_command_wraps_tqdm_or_click_progressbar_itself() -> None:
    cli = Path(__file__).resolve().parents[1] / "wsi_encoder" / "cli"
    for path in cli.glob("*.py"):
        text = path.read_text()
        if path.name != "common.py":
            assert "tqdm" not in text and "progressbar" not in text, path.name


# ---- defaults come from the library's config objects ----------------------------------------
def _options(command: click.Command) -> dict[str, click.Parameter]:
    return {p.name: p for p in command.params if p.name}


def test_train_encoder_defaults_are_train_config_defaults() -> None:
    from wsi_encoder.cli.train import train_encoder
    from wsi_encoder.training.train_config import TrainConfig

    params = _options(train_encoder)
    checked = 0
    for f in fields(TrainConfig):
        if f.name in params and f.name not in ("embed_dim", "weights", "augment", "device"):
            assert params[f.name].default == f.default, f.name
            checked += 1
    assert checked >= 17
    assert "128" in (params["embed_dim"].help or "") and TrainConfig().embed_dim == 128


def test_train_encoder_options_reach_the_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import wsi_encoder.pipelines.train_encoder as pipeline

    seen = {}

    def fake(tasks, out_dir, config, **kwargs):  # type: ignore[no-untyped-def]
        seen["config"], seen["resume"] = config, kwargs["resume"]
        raise click.ClickException("stopped")

    monkeypatch.setattr(pipeline, "train_encoder", fake)
    (tmp_path / "d").mkdir()
    args = ["train-encoder", "--task", f"kather-crc={tmp_path / 'd'}", "--out", str(tmp_path / "o"), "--epochs", "3",
            "--lr", "0.01", "--no-augment", "--backbone", "resnet18", "--unfreeze-last", "1", "--overwrite"]  # fmt: skip
    CliRunner().invoke(main, args)
    config = seen["config"]
    assert (config.epochs, config.lr, config.backbone, config.unfreeze_last) == (3, 0.01, "resnet18", 1)
    assert config.embed_dim == 128 and config.augment.flips is False and seen["resume"] is False
    assert config.device == "auto"


def test_lomo_options_reach_the_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import wsi_encoder.pipelines.lomo as pipeline
    from wsi_encoder.pipelines.lomo_config import LomoConfig

    seen = {}

    def fake(data, out_dir, config, **kwargs):  # type: ignore[no-untyped-def]
        seen["config"], seen["kwargs"] = config, kwargs
        raise click.ClickException("stopped")

    monkeypatch.setattr(pipeline, "run_lomo", fake)
    args = ["lomo", str(tmp_path), "--out", str(tmp_path / "o"), "--arms", "gan,grl", "--gan-ratio", "0.5",
            "--patient-key", "token", "--select-epoch", "last", "--bootstrap", "200", "--patient-folds", "3",
            "--max-images-per-split", "7", "--allow-contaminated-backbone", "--device", "cpu"]  # fmt: skip
    CliRunner().invoke(main, args)
    config = seen["config"]
    assert config == LomoConfig(
        gan_ratio=0.5, patient_key="token", select_epoch="last", n_bootstrap=200, patient_folds=3,
        max_images_per_split=7, allow_contaminated_backbone=True,
    )  # fmt: skip
    assert seen["kwargs"]["arms"] == ["gan", "grl"] and seen["kwargs"]["device"] == "cpu"
    CliRunner().invoke(main, ["lomo", str(tmp_path), "--out", str(tmp_path / "o"), "--test-fraction", "0.4"])
    assert seen["config"].test_fraction == 0.4 and seen["config"].patient_folds is None


def test_demo_defaults_are_demo_config_defaults() -> None:
    from wsi_encoder.cli.demo import demo
    from wsi_encoder.pipelines.demo import DemoConfig

    params = _options(demo)
    default = DemoConfig()
    for option, field_name in [("n_slides", "n_slides"), ("classifier", "classifier"), ("encoder_steps", "encoder_steps"),
                               ("workers", "workers"), ("seed", "seed"), ("device", "device")]:  # fmt: skip
        assert params[option].default == getattr(default, field_name), option


@pytest.mark.parametrize(
    "args", [["--help"], ["tile", "--help"], ["encode", "--help"], ["predict", "--help"],
             ["classify", "train", "--help"], ["train-encoder", "--help"], ["lomo", "--help"]],
)  # fmt: skip
def test_help_imports_neither_torch_nor_numpy(args: list[str]) -> None:
    # a command's heavy imports (imports_first, the --device check) come after its arguments are parsed
    code = (
        "import sys\nfrom click.testing import CliRunner\nfrom wsi_encoder.cli import main\n"
        f"assert CliRunner().invoke(main, {args!r}).exit_code == 0\n"
        "print(','.join(m for m in ('torch', 'numpy', 'zarr', 'skimage') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "", f"wsienc {' '.join(args)} pulled in: {out}"


def _library_defaults(target: object) -> dict[str, object]:
    import dataclasses
    import inspect

    if dataclasses.is_dataclass(target):
        return {f.name: f.default for f in dataclasses.fields(target) if f.default is not dataclasses.MISSING}
    assert callable(target)
    return {
        name: p.default for name, p in inspect.signature(target).parameters.items() if p.default is not p.empty
    }


@pytest.mark.parametrize(
    ("command", "targets", "renamed"),
    [
        ("tile", ["wsi_encoder.tiling:TileSpec", "wsi_encoder.pipelines.tile_cohort:tile_cohort"],
         {"mpp": "target_mpp", "mpp_tolerance": "tolerance"}),
        ("encode", ["wsi_encoder.pipelines.encode_store:encode_store"], {"compile_model": "compile"}),
        ("predict", ["wsi_encoder.pipelines.predict:predict_slides"], {}),
        ("classify train", ["wsi_encoder.pipelines.classify:train_classifier"], {}),
        ("classify predict", ["wsi_encoder.pipelines.classify_predict:predict"], {}),
        ("signatures", ["wsi_encoder.evaluation.signatures:SignatureSpec",
                        "wsi_encoder.pipelines.signatures:run_signatures"], {}),
    ],
)  # fmt: skip
def test_cli_defaults_equal_the_library_defaults(command: str, targets: list[str], renamed: dict[str, str]) -> None:
    """Commands whose modules stay import-light (for a fast --help) repeat a default: it must be the library's."""
    import importlib

    from wsi_encoder.cli import LazyGroup

    head, *sub = command.split()
    cmd = LazyGroup._load(head)
    if sub:
        assert isinstance(cmd, click.Group)
        cmd = cmd.commands[sub[0]]
    assert cmd is not None
    library: dict[str, object] = {}
    for target in targets:
        module, name = target.split(":")
        library.update(_library_defaults(getattr(importlib.import_module(module), name)))
    compared = []
    ctx = click.Context(cmd)
    for param in cmd.params:
        name = renamed.get(param.name or "", param.name or "")
        default = param.get_default(ctx, call=False)
        if name in library and library[name] is not None and default is not None and not param.required:
            assert default == library[name], f"{command} --{name}: {default!r} != {library[name]!r}"
            compared.append(name)
    assert compared, f"no default of {command} compared"


_GC_WATCH = """
import gc, json, sys
HEAVY = {heavy!r}
during = set()

def watch(phase, info):  # a collection while a heavy module is being imported
    if phase == "start":
        during.update(m for m in HEAVY if getattr(getattr(sys.modules.get(m), "__spec__", None), "_initializing", False))

gc.callbacks.append(watch)
from wsi_encoder.cli import main
try:
    main({args!r})
except SystemExit:
    pass
print(json.dumps([sorted(during), [m for m in HEAVY if m in sys.modules], gc.isenabled(), gc.get_freeze_count()]))
"""


def _start_up(args: list[str], heavy: list[str]) -> tuple[list[str], list[str], bool, int]:
    """Run ``wsienc ARGS`` in a fresh interpreter: the heavy modules whose import the collector interrupted,
    those imported, whether the collector runs at the end, how many objects are frozen."""
    code = _GC_WATCH.format(heavy=heavy, args=args)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    during, imported, enabled, frozen = json.loads(out.strip().splitlines()[-1])
    return during, imported, enabled, frozen


@pytest.mark.parametrize(
    "command", ["tile", "train-encoder", "encode", "predict", "classify train", "classify predict", "lomo", "demo"]
)
def test_commands_import_their_libraries_with_the_collector_paused_then_frozen(command: str, tmp_path: Path) -> None:
    # Without the pause, CPython's collector runs ~400 times inside `import torch` alone and then traverses its
    # million objects in every full collection and at exit (0.5-0.7 s of a short command).
    if command == "tile":
        args, heavy = ["tile", str(tmp_path / "missing.svs"), "--out", str(tmp_path / "out")], ["numpy", "zarr", "scipy"]
    else:
        args = [a if a != "bogus" else "cpu" for a in _commands_with_device(tmp_path)[command]]
        args += ["--slides", "1"] if command == "demo" else []
        heavy = ["torch", "numpy"]
    during, imported, enabled, frozen = _start_up(args, heavy)
    assert imported == heavy
    assert during == [], f"{command}: the collector ran while importing {during}"
    assert enabled
    assert frozen > 100_000
    assert not (tmp_path / "out").exists()


def test_import_frozen_collects_old_garbage_pauses_the_collector_and_restores_it(tmp_path: Path) -> None:
    (tmp_path / "heavy_module.py").write_text(
        "import gc\nPAUSED = not gc.isenabled()\nTABLES = [[i] for i in range(50_000)]\n"
    )
    code = f"""
import gc, json, sys, weakref
sys.path.insert(0, {str(tmp_path)!r})
from wsi_encoder.cli.common import import_frozen

class Node:
    pass

def cycle():
    node = Node()
    node.me = node  # garbage only a collection frees
    return weakref.ref(node)

old = cycle()
import_frozen("heavy_module")
import heavy_module
first = [heavy_module.PAUSED, gc.isenabled(), old() is None, gc.get_freeze_count()]
young = cycle()
import_frozen("heavy_module", "json")  # both imported already: nothing collected, nothing frozen
second = [young() is None, gc.get_freeze_count() == first[3]]
gc.disable()
open(sys.path[0] + "/other_module.py", "w").write("X = 1")
import_frozen("other_module")
print(json.dumps([first, second, gc.isenabled()]))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    first, second, enabled_after_disabled = json.loads(out.strip().splitlines()[-1])
    paused, enabled, old_collected, frozen = first
    assert paused and enabled and old_collected
    assert frozen >= 50_000
    assert second == [False, True]
    assert enabled_after_disabled is False


def test_a_reader_that_leaves_early_is_not_an_error() -> None:
    # `wsienc encoders | head -1`: the pipe closes before wsienc writes; no traceback or "Error:" line follows
    process = subprocess.Popen([sys.executable, "-c", "from wsi_encoder.cli import main; main()", "encoders"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    assert process.stdout is not None
    process.stdout.close()
    _, err = process.communicate(timeout=120)
    assert err == ""
    assert process.returncode == 1
