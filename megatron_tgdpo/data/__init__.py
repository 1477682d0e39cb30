"""Preference data: JSONL -> validated, tokenized pairs in megatron-core indexed files -> batches.

Public names are loaded lazily, so importing a light module (the tokenizer, the record parser) does
not import torch or megatron-core; the preparation workers rely on that to start quickly.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "BadRecordsError": "errors",
    "DataFormatError": "errors",
    "TokenizerError": "errors",
    "Message": "records",
    "PreferenceRecord": "records",
    "Problem": "records",
    "parse_record": "records",
    "Tokenizer": "tokenizer",
    "load_tokenizer": "tokenizer",
    "ChatTemplate": "templates",
    "encode_record": "encode",
    "render_record": "encode",
    "LengthPolicy": "truncation",
    "apply_length_policy": "truncation",
    "PrepareConfig": "prepare",
    "prepare_preference_data": "prepare",
    "read_manifest": "manifest",
    "PreferenceDataset": "dataset",
    "PreferenceSampler": "sampler",
    "PreferenceCollator": "collate",
    "builtin_dataset": "builtin",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
