"""The project's built-in verifiable preference task: sort a list of single digits.

``{"prompt": "sort: 7 2 9 4 =", "chosen": " 2 4 7 9", "rejected": " 2 7 4 9"}``

The chosen response is the sorted list; the rejected one is the sorted list with one pair of adjacent,
distinct elements swapped, so it contains exactly one descent (a larger digit right before a smaller
one). That error is *local* (visible from two neighbouring tokens) and *systematic* (always the same
kind), which is what lets a tiny randomly initialised transformer learn the preference with DPO in a
few hundred steps. Responses start with a space so every answer digit is the same "▁d" token.

Python's ``random.Random`` (Mersenne Twister, ``randrange``) is used because its output for a seed is
stable across Python versions, so ``--seed`` fully determines the files.
"""
from __future__ import annotations

import io
import json
import random
from pathlib import Path
from typing import Iterable, Iterator

__all__ = [
    "SPECIAL_IDS",
    "make_sort_pairs",
    "sort_pair",
    "train_tokenizer",
    "write_jsonl",
    "write_synthetic_dataset",
]

# Explicit ids: unk 0, bos 1, eos 2, pad 3.
SPECIAL_IDS = {"unk_id": 0, "bos_id": 1, "eos_id": 2, "pad_id": 3}


def sort_pair(digits: list[int], rng: random.Random) -> dict[str, str]:
    """One record for ``digits`` (which must hold at least two distinct values)."""
    answer = sorted(digits)
    swappable = [i for i in range(len(answer) - 1) if answer[i] != answer[i + 1]]
    i = swappable[rng.randrange(len(swappable))]
    wrong = list(answer)
    wrong[i], wrong[i + 1] = wrong[i + 1], wrong[i]
    return {
        "prompt": "sort: " + " ".join(map(str, digits)) + " =",
        "chosen": " " + " ".join(map(str, answer)),
        "rejected": " " + " ".join(map(str, wrong)),
    }


def _digit_lists(rng: random.Random, *, min_len: int, max_len: int) -> Iterator[list[int]]:
    while True:
        digits = [rng.randrange(10) for _ in range(min_len + rng.randrange(max_len - min_len + 1))]
        if len(set(digits)) >= 2:
            yield digits


def make_sort_pairs(
    count: int, *, seed: int, min_len: int = 4, max_len: int = 8, exclude: set[tuple[int, ...]] | None = None
) -> list[dict[str, str]]:
    """``count`` records with distinct prompts, none of whose digit lists is in ``exclude`` (which is
    updated with the lists used, so successive calls give disjoint splits)."""
    rng = random.Random(seed)
    seen = exclude if exclude is not None else set()
    records: list[dict[str, str]] = []
    for digits in _digit_lists(rng, min_len=min_len, max_len=max_len):
        key = tuple(digits)
        if key in seen:
            continue
        seen.add(key)
        records.append(sort_pair(digits, rng))
        if len(records) == count:
            return records
    raise AssertionError("unreachable")


def write_jsonl(path: str | Path, records: Iterable[dict]) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")


def train_tokenizer(texts: Iterable[str], path: str | Path, *, vocab_size: int = 64) -> None:
    """A small sentencepiece BPE model over ``texts``.

    No normalisation and no dummy prefix, so the text of a prompt followed by the text of its response
    tokenizes the same whether encoded together or part by part; ``hard_vocab_limit=False`` lets the
    vocabulary stop short of ``vocab_size`` on this tiny alphabet.
    """
    import sentencepiece

    buffer = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(list(texts)),
        model_writer=buffer,
        model_type="bpe",
        vocab_size=vocab_size,
        hard_vocab_limit=False,
        character_coverage=1.0,
        normalization_rule_name="identity",
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        split_digits=False,
        byte_fallback=False,
        num_threads=1,
        minloglevel=2,
        **SPECIAL_IDS,
    )
    Path(path).write_bytes(buffer.getvalue())


def write_synthetic_dataset(out_dir: str | Path, *, seed: int = 1234, num_train: int = 4000, num_eval: int = 500) -> dict[str, Path]:
    """train.jsonl, eval.jsonl (prompts disjoint from train) and tokenizer.model in ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    used: set[tuple[int, ...]] = set()
    train = make_sort_pairs(num_train, seed=seed, exclude=used)
    evaluation = make_sort_pairs(num_eval, seed=seed + 1, exclude=used)
    paths = {"train": out / "train.jsonl", "eval": out / "eval.jsonl", "tokenizer": out / "tokenizer.model"}
    write_jsonl(paths["train"], train)
    write_jsonl(paths["eval"], evaluation)
    texts = [r["prompt"] + r["chosen"] for r in train] + [r["prompt"] + r["rejected"] for r in train]
    train_tokenizer(texts, paths["tokenizer"])
    return paths
