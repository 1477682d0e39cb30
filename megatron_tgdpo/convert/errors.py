"""The one exception type conversion raises: the CLI turns it into a message and a non-zero exit."""
from __future__ import annotations


class ConversionError(RuntimeError):
    """A checkpoint cannot be converted or loaded: unsupported architecture, missing file or tensor,
    shape mismatch. The message names the file/tensor and what to change."""
