"""The built-in synthetic data set: the shipped files are what the generator makes, the task's error is
local and systematic, and builtin_dataset prepares once and reuses a matching cache."""
from __future__ import annotations

import json

import pytest

from megatron_tgdpo.data import builtin
from megatron_tgdpo.data.builtin import SYNTHETIC_DIR, builtin_dataset
from megatron_tgdpo.data.dataset import PreferenceDataset
from megatron_tgdpo.data.manifest import manifest_path
from megatron_tgdpo.data.synthetic import write_synthetic_dataset
from megatron_tgdpo.data.tokenizer import load_tokenizer


def _digits(text: str) -> list[int]:
    return [int(t) for t in text.split()]


def _records(name: str) -> list[dict]:
    return [json.loads(line) for line in (SYNTHETIC_DIR / name).read_text().splitlines()]


def test_shipped_files_are_regenerated_exactly_by_the_generator(tmp_path):
    paths = write_synthetic_dataset(tmp_path, seed=1234)
    for name, path in paths.items():
        assert path.read_bytes() == (SYNTHETIC_DIR / path.name).read_bytes(), f"{name} differs from the shipped file"
    assert sum(p.stat().st_size for p in SYNTHETIC_DIR.iterdir() if p.is_file()) < 1_000_000


def test_task_is_verifiable_and_the_error_is_one_adjacent_swap():
    train, evaluation = _records("train.jsonl"), _records("eval.jsonl")
    assert len(train) == 4000 and len(evaluation) == 500
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in evaluation}
    for record in train + evaluation:
        assert record["prompt"].startswith("sort: ") and record["prompt"].endswith(" =")
        given = _digits(record["prompt"][len("sort: ") : -2])
        chosen, rejected = _digits(record["chosen"]), _digits(record["rejected"])
        assert chosen == sorted(given) and sorted(rejected) == chosen
        descents = [i for i in range(len(rejected) - 1) if rejected[i] > rejected[i + 1]]
        assert len(descents) == 1
        i = descents[0]
        assert rejected[:i] + [rejected[i + 1], rejected[i]] + rejected[i + 2 :] == chosen


def test_tokenizer_is_small_with_explicit_special_ids():
    tokenizer = load_tokenizer(SYNTHETIC_DIR / "tokenizer.model")
    assert tokenizer.vocab_size <= 256
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (1, 2, 3)
    # Every answer digit is one token, so the swapped pair is two neighbouring tokens.
    assert len(tokenizer.encode(" 0 1 2 3 4 5 6 7 8 9")) == 10


def test_builtin_dataset_prepares_once_and_reuses(tmp_path, monkeypatch):
    info = builtin_dataset(tmp_path / "cache")
    assert set(info) >= {"train_prefix", "eval_prefix", "tokenizer"}
    train, evaluation = PreferenceDataset(info["train_prefix"]), PreferenceDataset(info["eval_prefix"])
    assert (len(train), len(evaluation)) == (4000, 500)
    tokenizer = load_tokenizer(info["tokenizer"], chat_template=info["chat_template"])
    assert train.manifest["tokenizer"]["fingerprint"] == tokenizer.fingerprint()
    assert train.row_lengths.max() <= info["max_seq_length"]

    def must_not_run(*args, **kwargs):
        raise AssertionError("prepared again although the cache matches")

    monkeypatch.setattr(builtin, "prepare_preference_data", must_not_run)
    assert builtin_dataset(tmp_path / "cache") == info

    # A manifest that no longer matches (here: another length policy) is prepared again.
    path = manifest_path(info["eval_prefix"])
    stale = json.loads(path.read_text())
    stale["length_policy"]["max_seq_length"] = 1000
    path.write_text(json.dumps(stale))
    with pytest.raises(AssertionError, match="prepared again"):
        builtin_dataset(tmp_path / "cache")
    monkeypatch.undo()
    builtin_dataset(tmp_path / "cache")
    assert json.loads(path.read_text())["length_policy"]["max_seq_length"] == info["max_seq_length"]
