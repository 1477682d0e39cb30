"""The tokenizer stored inside a GGUF file, as Hugging Face tokenizer files.

A GGUF file (llama.cpp's format) carries its tokenizer as metadata: the vocabulary, the BPE merges,
each token's type (normal / control / user-defined), the special ids and the chat template. This
module rebuilds from them the files a Hugging Face model directory would hold (``tokenizer.json``,
``tokenizer_config.json``), so the rest of the project reads a GGUF tokenizer exactly like any other.

Supported: byte-level BPE vocabularies (``tokenizer.ggml.model = gpt2``) with the pre-tokenizers
listed in :data:`PRE_TOKENIZERS`; anything else is refused by name (pass ``--tokenizer`` with the
model's own tokenizer files instead). The pre-tokenizer is the piece GGUF stores only by name
(``tokenizer.ggml.pre``), so each supported name maps to the splitting llama.cpp applies for it.

:func:`gguf_tokenizer_dir` writes the files once into the user cache, in a directory named after
their content, so a prepared data set that records that directory keeps a stable identity.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from megatron_tgdpo.data.errors import TokenizerError
from megatron_tgdpo.data.gguf_file import GGUF_MAGIC, GGUFFile, GGUFFormatError

__all__ = [
    "PRE_TOKENIZERS",
    "gguf_tokenizer_dir",
    "gguf_tokenizer_files",
    "is_gguf_file",
    "read_gguf_fields",
    "user_cache_dir",
]

# llama.cpp's token types (tokenizer.ggml.token_type).
_CONTROL, _USER_DEFINED = 3, 4

# GPT-2's word split (llama.cpp applies it, or a variant, before byte-level BPE).
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# tokenizer.ggml.pre -> (split every digit on its own first, word split regex).
PRE_TOKENIZERS: dict[str, tuple[bool, str]] = {
    "default": (False, _GPT2_SPLIT),
    "gpt2": (False, _GPT2_SPLIT),
    "smollm": (True, _GPT2_SPLIT),  # SmolLM / SmolLM2: digits one by one, then GPT-2's split
    "llama-bpe": (False, _LLAMA3_SPLIT),
    "llama3": (False, _LLAMA3_SPLIT),
}


def user_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/megatron_tgdpo`` (default ``~/.cache/megatron_tgdpo``)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "megatron_tgdpo"


def is_gguf_file(path: str | Path) -> bool:
    """A regular file that starts with the GGUF magic bytes."""
    path = Path(path)
    if not path.is_file():
        return False
    with open(path, "rb") as handle:
        return handle.read(4) == GGUF_MAGIC


def read_gguf_fields(path: str | Path) -> dict[str, Any]:
    """Every metadata key of a GGUF file with its value (strings decoded, arrays as lists)."""
    try:
        return GGUFFile(path).fields
    except GGUFFormatError as exc:
        raise TokenizerError(str(exc)) from None


def _tokenizer_json(fields: dict[str, Any], *, where: str) -> str:
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    model = fields.get("tokenizer.ggml.model")
    if model != "gpt2":
        raise TokenizerError(
            f"{where}: its tokenizer is {model!r}; only byte-level BPE ('gpt2') tokenizers are read from GGUF "
            "files, pass --tokenizer with the model's tokenizer.json instead"
        )
    pre = fields.get("tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZERS:
        raise TokenizerError(
            f"{where}: pre-tokenizer {pre!r} is not supported (supported: {', '.join(sorted(PRE_TOKENIZERS))}); "
            "pass --tokenizer with the model's tokenizer.json instead"
        )
    tokens: list[str] = list(fields["tokenizer.ggml.tokens"])
    merges = [tuple(merge.split(" ", 1)) for merge in fields.get("tokenizer.ggml.merges", [])]
    types = list(fields.get("tokenizer.ggml.token_type") or [1] * len(tokens))
    tokenizer = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False))
    digits, split = PRE_TOKENIZERS[pre]
    steps = [pre_tokenizers.Digits(individual_digits=True)] if digits else []
    steps += [pre_tokenizers.Split(Regex(split), behavior="isolated"),
              pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(steps)
    tokenizer.decoder = decoders.ByteLevel()
    # Control tokens (<|im_start|>) are special; user-defined ones are matched whole but not special.
    tokenizer.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k == _CONTROL]
    )
    tokenizer.add_tokens(
        [AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types) if k == _USER_DEFINED]
    )
    if tokenizer.get_vocab_size(with_added_tokens=True) != len(tokens):
        raise TokenizerError(f"{where}: the rebuilt tokenizer does not have the file's {len(tokens)} tokens")
    return tokenizer.to_str(pretty=False)


def gguf_tokenizer_files(path: str | Path, *, fields: dict[str, Any] | None = None) -> dict[str, str]:
    """``{file name: text}`` of ``tokenizer.json`` and ``tokenizer_config.json`` for the GGUF file at
    ``path`` (``fields``: its metadata, if already read)."""
    path = Path(path)
    fields = fields if fields is not None else read_gguf_fields(path)
    if "tokenizer.ggml.tokens" not in fields:
        raise TokenizerError(f"{path}: this GGUF file holds no tokenizer; pass --tokenizer")
    tokens = fields["tokenizer.ggml.tokens"]

    def token(key: str) -> str | None:
        token_id = fields.get(f"tokenizer.ggml.{key}_token_id")
        return tokens[int(token_id)] if token_id is not None and 0 <= int(token_id) < len(tokens) else None

    config: dict[str, Any] = {
        "tokenizer_class": "GPT2Tokenizer",
        "bos_token": token("bos"),
        "eos_token": token("eos"),
        "pad_token": token("padding"),
        "unk_token": token("unknown"),
        # llama.cpp's own flag; absent means "no BOS" for byte-level BPE vocabularies.
        "add_bos_token": bool(fields.get("tokenizer.ggml.add_bos_token", False)),
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
    }
    context = next((v for k, v in fields.items() if k.endswith(".context_length")), None)
    if context is not None:
        config["model_max_length"] = int(context)
    template = fields.get("tokenizer.chat_template")
    if isinstance(template, str) and template:
        config["chat_template"] = template
    config = {k: v for k, v in config.items() if v is not None}
    return {
        "tokenizer.json": _tokenizer_json(fields, where=str(path)),
        "tokenizer_config.json": json.dumps(config, indent=2, ensure_ascii=False) + "\n",
    }


def gguf_tokenizer_dir(path: str | Path, *, fields: dict[str, Any] | None = None) -> Path:
    """A directory holding the tokenizer files of the GGUF file at ``path``: written once under
    :func:`user_cache_dir` ``/gguf-tokenizers/<sha256 of the files>`` and reused."""
    files = gguf_tokenizer_files(path, fields=fields)
    digest = hashlib.sha256()
    for name in sorted(files):
        digest.update(name.encode() + b"\0" + files[name].encode("utf-8") + b"\0")
    out = user_cache_dir() / "gguf-tokenizers" / digest.hexdigest()[:32]
    if not all((out / name).is_file() for name in files):
        tmp = out.with_name(f"{out.name}.tmp{os.getpid()}")
        tmp.mkdir(parents=True, exist_ok=True)
        for name, text in files.items():
            (tmp / name).write_text(text, encoding="utf-8")
        try:
            os.replace(tmp, out)
        except OSError:  # another process published it first: theirs is identical
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    return out
