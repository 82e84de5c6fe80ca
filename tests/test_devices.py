"""The one device rule."""

from __future__ import annotations

import pytest
import torch

from wsi_encoder.devices import resolve_device
from wsi_encoder.errors import InvalidParameterError


def test_auto_follows_what_the_machine_has(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr("wsi_encoder.devices._mps_available", lambda: False)
    assert resolve_device("auto") == resolve_device(None) == torch.device("cpu")
    monkeypatch.setattr("wsi_encoder.devices._mps_available", lambda: True)
    assert resolve_device("auto") == torch.device("mps")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("AUTO") == torch.device("cuda")


def test_names_are_checked_against_the_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(InvalidParameterError, match="has 2 CUDA device"):
        resolve_device("cuda:2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(InvalidParameterError, match="CUDA is not available"):
        resolve_device("cuda")
    monkeypatch.setattr("wsi_encoder.devices._mps_available", lambda: False)
    with pytest.raises(InvalidParameterError, match="MPS is not available"):
        resolve_device("mps")


@pytest.mark.parametrize("bad", ["gpu", "cuda:x", "tpu", ""])
def test_a_bad_name_is_one_clear_line(bad: str) -> None:
    with pytest.raises(InvalidParameterError, match="is not one of auto, cpu, cuda, cuda:N, mps") as info:
        resolve_device(bad)
    assert "\n" not in str(info.value)


def test_cpu_and_devices_pass_through() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    dev = torch.device("cpu")
    assert resolve_device(dev) is dev
