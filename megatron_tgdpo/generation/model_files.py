"""What belongs to a model that generation samples from: its architecture, its weights, its
tokenizer and chat template, and the stop ids its directory declares. The one place that names the
loaders.

``load`` accepts what the trainer accepts (``models.sources.ModelSource``): our torch_dist
checkpoints (a save root or one ``iter_*`` directory), converted directories and Hugging Face model
directories. What is generation's own: finding the tokenizer and chat template that belong to a
checkpoint, and the stop ids a Hugging Face directory declares.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from megatron_tgdpo import checkpointing
from megatron_tgdpo.models.llama import LlamaArch
from megatron_tgdpo.models.sources import ModelSource, resolve_arch


def load_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean "this checkpoint cannot be used" (reported as a usage error)."""
    from megatron_tgdpo.convert import ConversionError

    return (checkpointing.CheckpointError, ConversionError, OSError, ValueError)


def model_arch(load: str | Path, *, model: str) -> tuple[LlamaArch, str]:
    """(architecture, label) of ``load``; the ``model`` preset when a checkpoint records none."""
    return resolve_arch(model=model, sources=[ModelSource.of(load)])


def load_weights(load: str | Path, chunks: list) -> None:
    ModelSource.of(load).load_into(chunks)


@dataclass(frozen=True)
class TokenizerSource:
    """Where the tokenizer of a checkpoint lives and which chat template its training data used."""

    path: Optional[str]
    chat_template: Optional[str]
    origin: str  # for messages: how it was found, or why nothing was


def default_tokenizer(load: str | Path) -> TokenizerSource:
    """The tokenizer that belongs to ``load``: a model directory's own files (HF / converted), else
    what the training run that wrote a torch_dist checkpoint recorded (its ``--tokenizer``, its data
    set's manifest, or the built-in data set)."""
    source = ModelSource.of(load)
    path = Path(load)
    if source.kind == "gguf":
        return TokenizerSource(str(path), None, f"the tokenizer stored in {path}")
    if source.is_model_directory:
        if (path / "tokenizer.json").is_file() or (path / "tokenizer.model").is_file():
            return TokenizerSource(str(path), None, f"the tokenizer files in {path}")
        return TokenizerSource(None, None, f"{path} has no tokenizer.json or tokenizer.model")
    config = checkpointing.read_metadata(checkpointing.resolve(path)).get("config") or {}
    if config.get("tokenizer"):
        return TokenizerSource(str(config["tokenizer"]), None, "the checkpoint's training --tokenizer")
    if config.get("data_path"):
        from megatron_tgdpo.data.manifest import read_manifest

        try:
            manifest = read_manifest(config["data_path"])
        except Exception as exc:  # noqa: BLE001 - only a default: say why it is unavailable
            return TokenizerSource(None, None, f"the training data {config['data_path']} is not readable ({exc})")
        return TokenizerSource(manifest.get("tokenizer", {}).get("path"),
                               manifest.get("chat_template", {}).get("name"),
                               f"the manifest of the training data {config['data_path']}")
    if "data_path" in config:  # trained on the built-in data set
        from megatron_tgdpo.data.builtin import BUILTIN_CHAT_TEMPLATE, SYNTHETIC_DIR

        return TokenizerSource(str(SYNTHETIC_DIR / "tokenizer.model"), BUILTIN_CHAT_TEMPLATE, "the built-in data set")
    return TokenizerSource(None, None, f"{path} records no tokenizer")


def generation_config_eos_ids(load: str | Path) -> list[int]:
    """``eos_token_id`` (one id or a list) of a model directory's ``generation_config.json``, if any:
    Hugging Face models list their end-of-turn ids there, and ``transformers`` and vLLM stop on them."""
    file = Path(load) / "generation_config.json"
    if not file.is_file():
        return []
    try:
        value = json.loads(file.read_text()).get("eos_token_id")
    except (OSError, ValueError, AttributeError):
        return []
    if isinstance(value, int):
        return [value]
    return [v for v in value if isinstance(v, int)] if isinstance(value, list) else []
