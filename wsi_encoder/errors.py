"""The exception tree of wsi_encoder.

Every error raised on bad user input derives from :class:`WsiEncoderError` and from the builtin it
resembles, so callers can catch either. Messages quote the offending value and say the fix.
"""

from __future__ import annotations


class WsiEncoderError(Exception):
    """Root of all wsi_encoder errors."""


class SlideNotFoundError(WsiEncoderError, FileNotFoundError):
    """A slide path does not exist."""


class SlideReadError(WsiEncoderError, OSError):
    """A file exists but cannot be read as a slide (not a slide, truncated, corrupt, unsupported)."""


class MissingMppError(WsiEncoderError, ValueError):
    """A slide has no physical resolution (µm/px) and the operation needs one."""


class InvalidParameterError(WsiEncoderError, ValueError):
    """A parameter value is out of range or inconsistent with another."""


class StoreError(WsiEncoderError, OSError):
    """A zarr/h5 store is missing, malformed, locked or inconsistent."""


class DatasetError(WsiEncoderError, ValueError):
    """A labelled dataset or label table is missing, empty or malformed."""


class CheckpointError(WsiEncoderError, OSError):
    """A model checkpoint is missing or malformed."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name when it has none), at most 300 characters."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text[:300]
