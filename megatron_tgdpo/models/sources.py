"""Where a model's weights come from: the one answer to "what is this path?".

Every flag that names weights (``--ref-load``, ``--guidance-load``, ``--load`` as a model, the cache
tool, generation, export) goes through :class:`ModelSource`:

============  ==============================================================  =====================
kind          what                                                            architecture from
============  ==============================================================  =====================
``hf``        a Hugging Face model directory (config.json + weights)          its config.json
``converted`` our converted format (``tgdpo_converted.json``)                 its metadata
``gguf``      a llama.cpp GGUF file (dequantized to fp32 when read; its       its metadata
              tokenizer and chat template come from the file too)
``torch_dist``a training checkpoint: a save root or one ``iter_*`` directory  its tgdpo_checkpoint.json
``seeded``    no path: the layout-independent seeded initialisation           the preset (``--model``)
============  ==============================================================  =====================

It builds on :mod:`megatron_tgdpo.checkpointing` (torch_dist) and :mod:`megatron_tgdpo.convert`
(Hugging Face and converted); neither imports this module, so there is no import circle.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from megatron_tgdpo import checkpointing, convert
from megatron_tgdpo.data.gguf_file import GGUFFile
from megatron_tgdpo.data.gguf_tokenizer import is_gguf_file
from megatron_tgdpo.integrity import file_checksum
from megatron_tgdpo.models.llama import LlamaArch, preset

__all__ = ["ModelSource", "is_reward_model_checkpoint", "resolve_arch"]

# What identifies a Hugging Face / converted directory without hashing tens of GB of weights.
_MODEL_METADATA = ("tgdpo_converted.json", "config.json", "model.safetensors.index.json", "generation_config.json")
_WEIGHT_SUFFIXES = (".safetensors", ".bin")


@dataclass(frozen=True)
class ModelSource:
    kind: str  # "hf" | "converted" | "gguf" | "torch_dist" | "seeded"
    path: Optional[Path] = None
    seed: int = 0

    @classmethod
    def of(cls, path: Optional[str | Path], *, seed: int = 0) -> "ModelSource":
        """Classify ``path`` (None: seeded). A torch_dist root is resolved when weights are read, so a
        checkpoint published meanwhile is picked up."""
        if path is None:
            return cls("seeded", None, seed)
        path = Path(path)
        if is_gguf_file(path):
            return cls("gguf", path, seed)
        if convert.is_converted_directory(path):
            return cls("converted", path, seed)
        if convert.is_hf_directory(path):
            return cls("hf", path, seed)
        return cls("torch_dist", path, seed)

    @property
    def is_model_directory(self) -> bool:
        """A Hugging Face or converted directory or a GGUF file (weights only, no training state)."""
        return self.kind in ("hf", "converted", "gguf")

    # ---- architecture ------------------------------------------------------------------------
    def arch(self) -> Optional[LlamaArch]:
        """The architecture this source records (None for seeded, or a checkpoint that records none)."""
        if self.is_model_directory:
            return convert.checkpoint_arch(self.path)
        if self.kind == "torch_dist":
            recorded = checkpointing.read_metadata(checkpointing.resolve(self.path)).get("arch")
            return LlamaArch(**recorded) if isinstance(recorded, dict) else None
        return None

    def label(self) -> str:
        """A human name: the model's own name where its config gives one, else the directory."""
        if self.kind == "seeded":
            return f"seeded init (seed {self.seed})"
        name = self.path.name
        config = None
        if self.kind == "gguf":
            return f"{name} (gguf: {self.path})"
        if self.kind == "hf":
            config = convert.read_hf_config(self.path)
        elif self.kind == "converted":
            from megatron_tgdpo.convert.converted import read_metadata

            config = read_metadata(self.path).get("hf_config")
        elif self.kind == "torch_dist":
            meta = checkpointing.read_metadata(checkpointing.resolve(self.path))
            config = meta.get("hf_config")
            name = meta.get("model_name") or name
        if isinstance(config, dict):
            name = str(config.get("_name_or_path") or name).rstrip("/").split("/")[-1] or name
        return f"{name} ({self.kind}: {self.path})"

    # ---- weights -----------------------------------------------------------------------------
    def load_into(self, chunks: list[torch.nn.Module], *, init_std: Optional[float] = None) -> Optional[Path]:
        """Fill this rank's ``chunks`` (any TP/PP layout); returns the checkpoint directory read."""
        if self.kind == "seeded":
            from megatron_tgdpo.models.state_dict import seeded_init

            seeded_init(chunks, seed=self.seed, std=init_std if init_std is not None else chunks[0].config.init_method_std)
            return None
        if self.is_model_directory:
            convert.load_into_model(self.path, chunks)
            return self.path
        return checkpointing.load_model_weights(self.path, chunks)

    def fingerprint(self) -> str:
        """What the weights come from, as one comparable string (the log-prob cache keys on it).

        torch_dist: the resolved ``iter_*`` directory and the sha256 of its metadata (iteration,
        consumed samples, config, per-file checksums). HF / converted: config/metadata files and the
        names and sizes of the weight files (hashing tens of GB of weights would take minutes; a
        directory overwritten in place with same-shaped weights is therefore not detected)."""
        if self.kind == "seeded":
            return f"seeded-init:{int(self.seed)}"
        if self.kind == "gguf":  # the header (metadata, tensor names, types, offsets) and the file size
            with open(self.path, "rb") as handle:
                header = handle.read(GGUFFile(self.path).header_bytes)
            size = self.path.stat().st_size
            return f"gguf:{self.path.resolve()}:size={size}:sha256={hashlib.sha256(header).hexdigest()}"
        if self.kind == "torch_dist":
            ckpt = checkpointing.resolve(self.path)
            digest = file_checksum(ckpt / checkpointing.METADATA, algorithm="sha256")
            return f"torch_dist:{ckpt.resolve()}:sha256={digest}"
        digest = hashlib.sha256()
        for name in _MODEL_METADATA:
            if (self.path / name).is_file():
                digest.update(f"{name}={file_checksum(self.path / name, algorithm='sha256')}\n".encode())
        for weight in sorted(p for p in self.path.iterdir() if p.suffix in _WEIGHT_SUFFIXES and p.is_file()):
            digest.update(f"{weight.name}:{weight.stat().st_size}\n".encode())
        return f"{self.kind}:{self.path.resolve()}:sha256={digest.hexdigest()}"


def resolve_arch(
    *, model: str, sources: list[ModelSource], tokenizer_vocab: Optional[int] = None
) -> tuple[LlamaArch, str]:
    """(architecture, its name) for a run: the first of ``sources`` that records one, else the preset.

    The one architecture resolver (training, the cache tool, generation). A from-scratch ``tiny``
    model sizes its vocabulary to the tokenizer (rounded up to a multiple of 64, so any TP <= 8
    divides it)."""
    for source in sources:
        arch = source.arch()
        if arch is not None:
            if tokenizer_vocab is not None and tokenizer_vocab > arch.vocab_size:
                raise ValueError(f"the tokenizer has {tokenizer_vocab} tokens but {source.label()} only "
                                 f"{arch.vocab_size}; use the tokenizer of that model")
            return arch, source.label()
    arch = preset(model)
    if model == "tiny" and tokenizer_vocab is not None:
        return preset(model, vocab_size=-(-tokenizer_vocab // 64) * 64), "preset tiny"
    if tokenizer_vocab is not None and tokenizer_vocab > arch.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer_vocab} tokens but --model {model} only {arch.vocab_size}")
    return arch, f"preset {model}"


def is_reward_model_checkpoint(path: Optional[str]) -> bool:
    """Whether ``path`` is a torch_dist checkpoint saved by ``--loss-type rm`` (a value head where a
    language model has its output layer): what reward-model flags take and language-model flags must not."""
    if path is None or ModelSource.of(path).kind != "torch_dist":
        return False
    try:
        meta = checkpointing.read_metadata(checkpointing.resolve(path))
    except checkpointing.CheckpointError:
        return False
    return (meta.get("config") or {}).get("loss_type") == "rm"
