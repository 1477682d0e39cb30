"""The built-in synthetic data set (package data: ``megatron_tgdpo/resources/synthetic``), prepared on first use.

``builtin_dataset(cache_dir)`` prepares the shipped ``train.jsonl`` / ``eval.jsonl`` with the shipped
tokenizer into ``cache_dir`` unless a complete manifest matching the current inputs, tokenizer and
settings is already there. A file lock serialises concurrent callers (several ranks, several test
processes), so each split is prepared once and nobody reads a half-published set.
"""
from __future__ import annotations

import fcntl
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from megatron_tgdpo.data.errors import DataFormatError
from megatron_tgdpo.data.manifest import check_data_files, read_manifest, sha256_file
from megatron_tgdpo.data.prepare import PrepareConfig, prepare_preference_data
from megatron_tgdpo.data.tokenizer import load_tokenizer
from megatron_tgdpo.resources import resource_path

__all__ = ["BUILTIN_CHAT_TEMPLATE", "BUILTIN_MAX_SEQ_LENGTH", "SYNTHETIC_DIR", "builtin_dataset"]

# Shipped with the package (importlib.resources), so an installed wheel has it too.
SYNTHETIC_DIR = resource_path("synthetic")
BUILTIN_CHAT_TEMPLATE = "plain"
BUILTIN_MAX_SEQ_LENGTH = 64  # the longest synthetic row is ~21 tokens


@contextmanager
def _locked(directory: Path) -> Iterator[None]:
    with open(directory / ".builtin.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _config(source: Path, prefix: Path, tokenizer: Path) -> PrepareConfig:
    return PrepareConfig(
        inputs=(str(source),),
        output_prefix=str(prefix),
        tokenizer=str(tokenizer),
        chat_template=BUILTIN_CHAT_TEMPLATE,
        max_seq_length=BUILTIN_MAX_SEQ_LENGTH,
        truncation="drop",
        min_prompt_tokens=8,
        workers=1,
    )


def _is_current(config: PrepareConfig, fingerprint: str) -> bool:
    """A complete manifest whose inputs, tokenizer and length policy are the ones we would use now."""
    try:
        manifest = read_manifest(config.output_prefix)
        check_data_files(config.output_prefix, manifest)
    except DataFormatError:
        return False
    shas = [entry.get("sha256") for entry in manifest.get("inputs", [])]
    return (
        shas == [sha256_file(p) for p in config.inputs]
        and manifest.get("tokenizer", {}).get("fingerprint") == fingerprint
        and manifest.get("length_policy") == {
            "max_seq_length": config.max_seq_length,
            "truncation": config.truncation,
            "min_response_tokens": config.min_response_tokens,
            "min_prompt_tokens": config.min_prompt_tokens,
        }
    )


def builtin_dataset(cache_dir: str | Path, *, source_dir: str | Path | None = None) -> dict[str, Any]:
    """Prepare (if needed) and describe the built-in synthetic data set.

    Returns ``{"train_prefix", "eval_prefix", "tokenizer", "chat_template", "max_seq_length"}``:
    prefixes for :class:`~.dataset.PreferenceDataset`, and the tokenizer path and template name for
    :func:`~.tokenizer.load_tokenizer`.
    """
    source = Path(source_dir) if source_dir is not None else SYNTHETIC_DIR
    tokenizer_path = source / "tokenizer.model"
    for needed in (tokenizer_path, source / "train.jsonl", source / "eval.jsonl"):
        if not needed.is_file():
            raise FileNotFoundError(
                f"{needed}: missing; the built-in data set ships with the package in megatron_tgdpo/resources/"
                "synthetic (regenerate it with `megatron-tgdpo synthetic-data --output-dir DIR`)"
            )
    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    fingerprint = load_tokenizer(tokenizer_path, chat_template=BUILTIN_CHAT_TEMPLATE).fingerprint()
    prefixes = {}
    with _locked(cache):
        for split in ("train", "eval"):
            prefix = cache / f"synthetic_{split}"
            config = _config(source / f"{split}.jsonl", prefix, tokenizer_path)
            if not _is_current(config, fingerprint):
                prepare_preference_data(config)
            prefixes[split] = str(prefix)
    return {
        "train_prefix": prefixes["train"],
        "eval_prefix": prefixes["eval"],
        "tokenizer": str(tokenizer_path),
        "chat_template": BUILTIN_CHAT_TEMPLATE,
        "max_seq_length": BUILTIN_MAX_SEQ_LENGTH,
    }
