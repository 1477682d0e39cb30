"""Output directories published atomically, and the tokenizer files that travel with a model."""
from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path
from typing import Iterator, Optional

from megatron_tgdpo.convert.errors import ConversionError
from megatron_tgdpo.integrity import publish_directory

# What a Hugging Face model directory carries besides weights and config.json.
TOKENIZER_PATTERNS = (
    "tokenizer*", "special_tokens_map.json", "added_tokens.json", "generation_config.json",
    "chat_template*", "*.jinja", "*.tiktoken", "vocab.*", "merges.txt",
)


def tokenizer_files(src: Path) -> list[Path]:
    found = {p for pattern in TOKENIZER_PATTERNS for p in Path(src).glob(pattern) if p.is_file()}
    return sorted(found)


def copy_tokenizer_files(src: Optional[Path], dst: Path, *, skip: tuple[str, ...] = ()) -> list[str]:
    """Copy ``src``'s tokenizer files (``TOKENIZER_PATTERNS``, less the names in ``skip``) into ``dst``."""
    if src is None:
        return []
    src = Path(src)
    if not src.is_dir():
        raise ConversionError(f"{src}: tokenizer directory does not exist")
    copied = []
    for path in tokenizer_files(src):
        if path.name in skip:
            continue
        shutil.copy2(path, dst / path.name)
        copied.append(path.name)
    return copied


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


@contextlib.contextmanager
def staged_output(out: Path, *, overwrite: bool) -> Iterator[Path]:
    """Yield ``<out>.tmp`` to write into; rename it to ``out`` only when the block completes.

    A failed or killed conversion never leaves a directory at ``out`` that looks complete: the
    staging directory is removed on error (and replaced by the next attempt if the process died).
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise ConversionError(f"{out} already exists; choose another --output or pass --overwrite")
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)  # left by an interrupted run
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    # --overwrite: the old output goes only once the new one is complete
    publish_directory(tmp, out, overwrite=True)
