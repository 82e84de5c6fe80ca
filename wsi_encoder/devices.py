"""The one device rule: every command's ``--device`` goes through :func:`resolve_device`."""

from __future__ import annotations

import re

import torch

from wsi_encoder.errors import InvalidParameterError

__all__ = ["DEVICE_CHOICES", "resolve_device"]

DEVICE_CHOICES = "auto, cpu, cuda, cuda:N, mps"
_NAME = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """The torch device for ``device``: ``auto`` (or ``None``) is CUDA when present, then Apple MPS, else CPU.

    ``cpu``, ``cuda``, ``cuda:N`` and ``mps`` are taken as given once checked to exist here; a
    :class:`torch.device` passes through unchanged.

    Raises
    ------
    InvalidParameterError
        The name is not one of auto, cpu, cuda, cuda:N, mps, or that device is not available on this
        machine (the message says which and what to use instead).
    """
    if isinstance(device, torch.device):
        return device
    name = "auto" if device is None else str(device).strip().lower()
    if not _NAME.match(name):
        raise InvalidParameterError(f"device {device!r} is not one of {DEVICE_CHOICES}")
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if _mps_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise InvalidParameterError(f"device {name!r}: CUDA is not available here; use --device cpu or auto")
        index = int(name.split(":")[1]) if ":" in name else 0
        if index >= torch.cuda.device_count():
            raise InvalidParameterError(
                f"device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s) (cuda:0 ...)"
            )
    if name == "mps" and not _mps_available():
        raise InvalidParameterError("device 'mps': Apple MPS is not available here; use --device cpu or auto")
    return torch.device(name)
