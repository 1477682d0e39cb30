"""Small Llama-3-style Hugging Face tokenizers built locally, for tests and examples (no downloads).

The tokenizer has the structure of Llama-3's: the same pre-tokenization pattern (numbers in groups of
up to three, newlines split off as their own pieces), byte-level BPE, and the Llama-3 chat special
tokens. Its BPE merges are learned from a tiny corpus, so its ids mean nothing outside the tests.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

__all__ = ["LLAMA3_STYLE_JINJA", "write_llama3_style_tokenizer"]

# The split pattern of Llama-3's tokenizer (a fact about that tokenizer, needed to mimic its boundaries).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

_SPECIALS = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
)

# A Jinja chat template with the behaviour of Llama-3 instruct's (written for this project): BOS once,
# one header + stripped content + <|eot_id|> per message, assistant header as generation prompt.
LLAMA3_STYLE_JINJA = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + (message['content'] | trim) + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)

_DEFAULT_CORPUS = (
    "You are a helpful assistant.\n\nWhat is the capital of France?\n\nThe capital of France is Paris.",
    "Sort the numbers 7 2 9 4 1234 56789 in order, please!\nAnswer: 2 4 7 9",
    "Hello there. How are you doing today? I'm fine, thanks; and you're welcome.",
    "Les élèves étudient à l'école. Ünïcödé text, emojis 🙂 and tabs\tare here.\n\n\n",
    "def add(a, b):\n    return a + b  # code, too\n",
)


def write_llama3_style_tokenizer(
    directory: str | Path,
    *,
    corpus: Iterable[str] = _DEFAULT_CORPUS,
    vocab_size: int = 400,
    chat_template: str | None = LLAMA3_STYLE_JINJA,
    eos_token: str = "<|eot_id|>",
) -> Path:
    """Write ``tokenizer.json`` (and ``tokenizer_config.json`` naming bos/eos and, unless
    ``chat_template`` is None, the Jinja template) into ``directory``; returns the directory."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(_SPECIALS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(list(corpus) * 4, trainer)
    tokenizer.save(str(out / "tokenizer.json"))
    config: dict = {"bos_token": "<|begin_of_text|>", "eos_token": eos_token}
    if chat_template is not None:
        config["chat_template"] = chat_template
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return out
