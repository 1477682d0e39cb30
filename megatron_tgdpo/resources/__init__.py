"""Files the package ships and reads at run time (package data, installed with the wheel).

``synthetic/``: the built-in synthetic preference set (digit sorting: ``train.jsonl``, ``eval.jsonl``) and
its sentencepiece ``tokenizer.model``, used by the built-in data set, the demo, the replication pipeline
and the RTO comparison. ``megatron-tgdpo synthetic-data`` regenerates them byte for byte.

Read through :func:`resource_path`, never relative to a checkout: an installed package has no
``examples/`` beside it.
"""
from __future__ import annotations

from importlib import resources
from pathlib import Path

__all__ = ["resource_path"]


def resource_path(*parts: str) -> Path:
    """A shipped file or directory as a filesystem path (pip installs the package as files, never zipped;
    callers check the files they need and say what is missing)."""
    return Path(str(resources.files(__name__).joinpath(*parts)))
