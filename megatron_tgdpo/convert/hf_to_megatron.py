"""Hugging Face Llama directory -> our converted format, streaming tensor by tensor.

Memory: one HF tensor (the largest is the embedding) plus the pages of it being read; the fused
megatron tensors (qkv, fc1) are never assembled, their row ranges are appended to the file in order.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Optional

from megatron_tgdpo.convert.converted import METADATA, group_file, metadata
from megatron_tgdpo.convert.files import copy_tokenizer_files, staged_output, write_json
from megatron_tgdpo.convert.hf_source import megatron_views_from_hf, open_hf
from megatron_tgdpo.convert.layout import megatron_groups
from megatron_tgdpo.convert.safetensors_io import SafetensorsWriter
from megatron_tgdpo.data.errors import TokenizerError
from megatron_tgdpo.data.gguf_tokenizer import gguf_tokenizer_dir, is_gguf_file

Progress = Optional[Callable[[str], None]]


def _tokenizer_source(path: Path, say: Callable[[str], None]) -> Optional[Path]:
    """Where the tokenizer files come from: the directory itself, or those rebuilt from a GGUF file."""
    if not is_gguf_file(path):
        return path
    try:
        return gguf_tokenizer_dir(path)
    except TokenizerError as exc:
        say(f"no tokenizer files written: {exc}")
        return None


def hf_to_megatron(
    hf_dir: str | Path, out_dir: str | Path, *, overwrite: bool = False, progress: Progress = None
) -> Path:
    """Convert ``hf_dir`` (LlamaForCausalLM, safetensors; or a GGUF file) into ``out_dir``; returns ``out_dir``."""
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    say = progress or (lambda message: None)
    config, arch, hf_views = open_hf(hf_dir)
    views = megatron_views_from_hf(arch, hf_views)
    groups = megatron_groups(arch)
    say(f"{hf_dir}: {arch.num_layers} layers, hidden {arch.hidden_size}, {arch.num_attention_heads} heads / "
        f"{arch.num_query_groups} KV groups, vocab {arch.vocab_size}, tied={arch.tie_word_embeddings}")
    files: dict[str, list[str]] = {}
    with staged_output(out_dir, overwrite=overwrite) as tmp:
        for k, (group, shapes) in enumerate(groups, start=1):
            start = time.monotonic()
            file = group_file(group)
            with SafetensorsWriter(tmp / file, [(n, views[n].dtype, views[n].shape) for n in shapes]) as writer:
                nbytes = sum(writer.write(name, views[name].blocks()) for name in shapes)
            files[file] = list(shapes)
            say(f"[{k}/{len(groups)}] {group}: {len(shapes)} tensors, {nbytes / 2**20:.1f} MiB, "
                f"{time.monotonic() - start:.1f}s")
        copied = copy_tokenizer_files(_tokenizer_source(hf_dir, say), tmp)
        if copied:
            say(f"copied {', '.join(copied)}")
        write_json(tmp / METADATA, metadata(arch=arch, hf_config=config, files=files, source=str(hf_dir.resolve())))
    say(f"wrote {out_dir}")
    return out_dir
