"""An encoder prepared for fast inference: eval mode, device, memory format, precision, compilation.

:class:`InferenceModel` is what the encoding loop calls: ``model(x)`` with ``x`` float ``(B, 3, S, S)``
in [0, 1] on the model's device returns float32 features ``(B, C)``. It runs under
``torch.inference_mode``; CNN trunks get ``channels_last`` weights and inputs; ``precision`` chooses
``torch.autocast`` to bfloat16 or float16 where the device supports it; ``compile=True`` wraps the
encoder in ``torch.compile`` (first batches are slower while it compiles).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from wsi_encoder.errors import InvalidParameterError

logger = logging.getLogger(__name__)

PRECISIONS = ("fp32", "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def check_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``precision`` on ``device`` (None: full float32).

    Raises
    ------
    InvalidParameterError
        Unknown precision, or float16 asked for on a CPU (use bf16 there).
    """
    if precision not in PRECISIONS:
        raise InvalidParameterError(f"--precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    if precision == "fp32":
        return None
    if device.type == "cpu" and precision == "fp16":
        raise InvalidParameterError("--precision fp16 needs a CUDA device; on a CPU use --precision bf16 (or fp32)")
    if device.type == "cpu" and precision == "bf16":
        native = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
        if native is not None and not native():
            logger.warning("this CPU has no native bfloat16 support: --precision bf16 will be emulated and slow")
    if device.type == "cuda" and precision == "bf16" and not torch.cuda.is_bf16_supported():
        raise InvalidParameterError("--precision bf16: this GPU does not support bfloat16; use fp16")
    return _DTYPES[precision]


class InferenceModel:
    """Callable ``x -> float32 features`` around an encoder; see the module docstring.

    Parameters
    ----------
    encoder
        Any module mapping ``(B, 3, H, W)`` in [0, 1] to ``(B, C)``; an :class:`Encoder` with
        ``channels_last=True`` runs in that memory format.
    device
        Where it runs (the module is moved there).
    precision
        ``fp32``, ``bf16`` or ``fp16`` (autocast; features are returned in float32).
    compile
        Wrap the module in ``torch.compile``.
    """

    def __init__(self, encoder: nn.Module, device: torch.device, *, precision: str = "fp32", compile: bool = False) -> None:
        self.device = torch.device(device)
        self.precision = precision
        self.autocast_dtype = check_precision(precision, self.device)
        self.channels_last = bool(getattr(encoder, "channels_last", False))
        encoder = encoder.eval().to(self.device)
        if self.channels_last:
            encoder = encoder.to(memory_format=torch.channels_last)
        self.module = encoder
        self._forward: Any = torch.compile(encoder, dynamic=False) if compile else encoder

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Embed a batch (call it under ``torch.inference_mode``)."""
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.autocast_dtype is None:
            return self._forward(x)
        with torch.autocast(self.device.type, dtype=self.autocast_dtype):
            return self._forward(x).float()
