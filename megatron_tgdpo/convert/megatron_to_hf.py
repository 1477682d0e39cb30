"""megatron checkpoint (converted format or torch_dist at any TP/PP) -> Hugging Face Llama directory.

Writes ``model-0000i-of-0000n.safetensors`` shards of at most ``max_shard_size`` bytes,
``model.safetensors.index.json``, ``config.json``, tokenizer files and ``generation_config.json``. From a
training checkpoint these come from the origin it records (:mod:`.origin`): the start model's
config.json and generation_config.json, and the run's tokenizer (checked against its content hash), so
no extra flag is needed. Streaming: each HF tensor is
assembled from row ranges of one megatron tensor and appended to its shard; memory is one megatron
tensor (a torch_dist region is cached while its q/k/v or gate/up are written) plus one HF tensor.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch

from megatron_tgdpo.convert.errors import ConversionError
from megatron_tgdpo.convert.files import copy_tokenizer_files, staged_output, write_json
from megatron_tgdpo.convert.hf_config import arch_to_hf_config, config_dtype, set_dtype
from megatron_tgdpo.convert.layout import hf_from_megatron, hf_groups
from megatron_tgdpo.convert.origin import GENERATION_CONFIG, checked_tokenizer_dir
from megatron_tgdpo.convert.safetensors_io import HF_INDEX, SafetensorsWriter, tensor_bytes
from megatron_tgdpo.convert.megatron_source import open_megatron_source
from megatron_tgdpo.convert.views import ConcatRows, TensorView

DEFAULT_MAX_SHARD_SIZE = 5 * 10**9  # what transformers' save_pretrained uses
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
Progress = Optional[Callable[[str], None]]


def parse_dtype(name: Optional[str]) -> Optional[torch.dtype]:
    if name is None:
        return None
    if name not in _DTYPES:
        raise ConversionError(f"dtype {name!r} is not one of {sorted(_DTYPES)}")
    return _DTYPES[name]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def plan_shards(sizes: dict[str, int], max_shard_size: int) -> list[list[str]]:
    """Consecutive names packed into shards of at most ``max_shard_size`` bytes (a bigger tensor alone)."""
    shards: list[list[str]] = [[]]
    used = 0
    for name, size in sizes.items():
        if shards[-1] and used + size > max_shard_size:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += size
    return shards


def _cast(blocks: Iterator[torch.Tensor], dtype: torch.dtype) -> Iterator[torch.Tensor]:
    for block in blocks:
        yield block.to(dtype)


def megatron_to_hf(
    ckpt: str | Path,
    out_dir: str | Path,
    *,
    hf_config=None,
    tokenizer_dir: Optional[str | Path] = None,
    dtype: Optional[str] = None,
    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
    overwrite: bool = False,
    progress: Progress = None,
) -> Path:
    """Export ``ckpt`` as a Hugging Face ``LlamaForCausalLM`` directory at ``out_dir``.

    ``hf_config``: the model's config.json (dict, file or directory); needed only for a torch_dist
    checkpoint that records neither its start model's config nor its architecture (older checkpoints).
    ``tokenizer_dir``: copy tokenizer files from here (default: the tokenizer the checkpoint records, else
    the converted / ``hf_config`` directory). ``dtype``: cast to bfloat16/float16/float32 (default: keep
    the stored dtype; the config's dtype entry always names what was written).
    """
    out_dir = Path(out_dir)
    say = progress or (lambda message: None)
    cast_to = parse_dtype(dtype)
    src = open_megatron_source(ckpt, hf_config=hf_config)
    arch = src.arch
    # Checked before any weight is written: a moved or changed tokenizer stops the export at once.
    origin = src.origin or {}
    tok_dir = checked_tokenizer_dir(origin.get("tokenizer"), given=Path(tokenizer_dir) if tokenizer_dir else None,
                                    where=f"{src.label}/tgdpo_checkpoint.json", say=say)
    if tok_dir is None and tokenizer_dir is None and not origin.get("tokenizer"):
        tok_dir = src.tokenizer_dir
    generation = origin.get("generation_config") if origin.get("model") else None
    views: dict[str, TensorView] = {
        name: ConcatRows([(src.views[r.name], r.start, r.stop) for r in rows], label=f"{name} (from {src.label})")
        for name, rows in hf_from_megatron(arch).items()
    }
    out_dtypes = {name: cast_to or view.dtype for name, view in views.items()}
    shards = plan_shards({n: tensor_bytes(v.shape, out_dtypes[n]) for n, v in views.items()}, max_shard_size)
    last_of_group = {list(names)[-1]: (k, group) for k, (group, names) in enumerate(hf_groups(arch), start=1)}
    total_groups = len(last_of_group)
    say(f"{src.label}: {arch.num_layers} layers, hidden {arch.hidden_size}, vocab {arch.vocab_size} -> "
        f"{len(shards)} shard(s)")

    weight_map, total = {}, 0
    with staged_output(out_dir, overwrite=overwrite) as tmp:
        start = time.monotonic()
        for s, names in enumerate(shards, start=1):
            file = f"model-{s:05d}-of-{len(shards):05d}.safetensors"
            entries = [(n, out_dtypes[n], views[n].shape) for n in names]
            with SafetensorsWriter(tmp / file, entries) as writer:
                for name in names:
                    blocks = views[name].blocks()
                    total += writer.write(name, _cast(blocks, cast_to) if cast_to else blocks)
                    weight_map[name] = file
                    if name in last_of_group:
                        k, group = last_of_group[name]
                        say(f"[{k}/{total_groups}] {group} -> {file} ({time.monotonic() - start:.1f}s)")
        write_json(tmp / HF_INDEX, {"metadata": {"total_size": total}, "weight_map": weight_map})

        written = {out_dtypes[n] for n in views}
        written_name = _dtype_name(written.pop()) if len(written) == 1 else None
        config = src.hf_config
        if config is None:
            say("no config.json to start from: writing one from the architecture; bos/eos/pad token ids are "
                "not set (pass --hf-config with the original config.json to keep them)")
            config = arch_to_hf_config(arch, dtype=written_name or "float32")
        else:
            changed = []
            if written_name and config_dtype(config) != written_name:
                changed.append(f"dtype {config_dtype(config)} -> {written_name} (the weights' dtype)")
                config = set_dtype(config, written_name)
            source = origin.get("model") or ("--hf-config" if hf_config is not None else src.label)
            say(f"config.json: that of {source}" + (f"; changed: {', '.join(changed)}" if changed else ", unchanged"))
        write_json(tmp / "config.json", config)
        copied = copy_tokenizer_files(tok_dir, tmp, skip=(GENERATION_CONFIG,) if origin.get("model") else ())
        say(f"copied {', '.join(copied)} from {tok_dir}" if copied else
            "no tokenizer files copied (pass --tokenizer-dir)")
        if generation is not None:
            write_json(tmp / GENERATION_CONFIG, generation)
            say(f"{GENERATION_CONFIG}: that of {origin['model']}")
    say(f"wrote {out_dir}")
    return out_dir
