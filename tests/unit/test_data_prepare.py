"""Preparation end to end: round trip for both tokenizer kinds, manifest contents, determinism across
worker counts, atomic publishing, the CLI, and PreferenceDataset's checks on what it opens."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from megatron_tgdpo.data import publish
from megatron_tgdpo.data.builtin import SYNTHETIC_DIR
from megatron_tgdpo.data.dataset import PreferenceDataset
from megatron_tgdpo.data.encode import render_record
from megatron_tgdpo.data.errors import DataFormatError
from megatron_tgdpo.data.manifest import FORMAT_VERSION, manifest_path
from megatron_tgdpo.data.prepare import PrepareConfig, prepare_preference_data
from megatron_tgdpo.data.records import parse_record
from megatron_tgdpo.data.tokenizer import load_tokenizer
from megatron_tgdpo.data.toy_tokenizers import write_llama3_style_tokenizer

from suite import load_tool

SP_MODEL = SYNTHETIC_DIR / "tokenizer.model"

CHAT_RECORDS = [
    {"prompt": "What is the capital of France?", "chosen": "Paris.", "rejected": "Lyon, I think."},
    {
        "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Sort 7 2 9 4, please!"}],
        "chosen": [{"role": "assistant", "content": "2 4 7 9"}],
        "rejected": [{"role": "assistant", "content": "2 7 4 9"}],
    },
    {
        "chosen": [
            {"role": "user", "content": "Hello there."},
            {"role": "assistant", "content": "Hi!"},
            {"role": "user", "content": "How are you doing today?"},
            {"role": "assistant", "content": "Fine, thanks; and you're welcome. 🙂"},
        ],
        "rejected": [
            {"role": "user", "content": "Hello there."},
            {"role": "assistant", "content": "Hi!"},
            {"role": "user", "content": "How are you doing today?"},
            {"role": "assistant", "content": "Les élèves étudient."},
        ],
    },
]


def _write(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def _first_lines(path: Path, n: int) -> list[dict]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(next(handle)) for _ in range(n)]


def _config(inputs, prefix, tokenizer, **overrides) -> PrepareConfig:
    settings = dict(
        inputs=tuple(str(p) for p in inputs),
        output_prefix=str(prefix),
        tokenizer=str(tokenizer),
        max_seq_length=256,
        min_prompt_tokens=4,
    )
    settings.update(overrides)
    return PrepareConfig(**settings)


def _check_round_trip(dataset: PreferenceDataset, records: list[dict], tokenizer, *, bos_text: str, eos_text: str):
    assert len(dataset) == len(records)
    for i, raw in enumerate(records):
        rendered = render_record(parse_record(json.dumps(raw), source="x", line=1), tokenizer)
        item = dataset[i]
        assert item["index"] == i
        assert all(item[k].dtype == np.int32 for k in ("prompt", "chosen", "rejected"))
        assert tokenizer.decode(item["prompt"]) == bos_text + rendered.prompt
        assert tokenizer.decode(np.concatenate([item["prompt"], item["chosen"]])) == (
            bos_text + rendered.prompt + rendered.chosen + eos_text
        )
        assert tokenizer.decode(item["rejected"]) == rendered.rejected + eos_text


def test_round_trip_sentencepiece_plain(tmp_path):
    records = _first_lines(SYNTHETIC_DIR / "train.jsonl", 50)
    source = _write(tmp_path / "in.jsonl", records)
    prepare_preference_data(_config([source], tmp_path / "out" / "sp", SP_MODEL, chat_template="plain"))
    tokenizer = load_tokenizer(SP_MODEL, chat_template="plain")
    _check_round_trip(PreferenceDataset(tmp_path / "out" / "sp"), records, tokenizer, bos_text="<s>", eos_text="</s>")


def test_round_trip_huggingface_llama3(tmp_path):
    tokenizer_dir = write_llama3_style_tokenizer(tmp_path / "tok")
    source = _write(tmp_path / "in.jsonl", CHAT_RECORDS)
    for template in ("llama3", "auto"):
        prefix = tmp_path / "out" / template
        manifest = prepare_preference_data(_config([source], prefix, tokenizer_dir, chat_template=template))
        tokenizer = load_tokenizer(tokenizer_dir, chat_template=template)
        assert manifest["tokenizer"]["fingerprint"] == tokenizer.fingerprint()
        # Llama-3 renders BOS and the end of turn as text, so nothing is added around the rendering.
        _check_round_trip(PreferenceDataset(prefix), CHAT_RECORDS, tokenizer, bos_text="", eos_text="")


def test_manifest_records_inputs_tokenizer_and_policy(tmp_path):
    records = _first_lines(SYNTHETIC_DIR / "train.jsonl", 30)
    first = _write(tmp_path / "a.jsonl", records[:20])
    second = _write(tmp_path / "b.jsonl", records[20:])
    prefix = tmp_path / "out" / "train"
    manifest = prepare_preference_data(_config([first, second], prefix, SP_MODEL, chat_template="plain"))
    on_disk = json.loads(manifest_path(prefix).read_text())
    assert on_disk == manifest
    assert manifest["format_version"] == FORMAT_VERSION and manifest["num_pairs"] == 30
    assert [e["pairs"] for e in manifest["inputs"]] == [20, 10]
    import hashlib

    assert manifest["inputs"][0]["sha256"] == hashlib.sha256(first.read_bytes()).hexdigest()
    assert manifest["tokenizer"]["fingerprint"] == load_tokenizer(SP_MODEL, chat_template="plain").fingerprint()
    assert manifest["chat_template"]["name"] == "plain"
    assert manifest["length_policy"] == {
        "max_seq_length": 256,
        "truncation": "truncate_prompt",
        "min_response_tokens": 1,
        "min_prompt_tokens": 4,
    }
    lengths = PreferenceDataset(prefix).lengths
    assert manifest["tokens"]["prompt"] == lengths[:, 0].sum() and manifest["tokens"]["max_row"] == (
        lengths[:, 0] + lengths[:, 1:].max(axis=1)
    ).max()
    assert manifest["files"]["bin"]["bytes"] == Path(f"{prefix}.bin").stat().st_size
    assert sorted(p.name for p in prefix.parent.iterdir()) == ["train.bin", "train.idx", "train.manifest.json"]


def test_length_policy_counts_in_manifest(tmp_path):
    records = [
        {"prompt": "sort: " + " ".join("9876543210" * 3) + " =", "chosen": " 0 1 2", "rejected": " 2 1 0"},  # long prompt
        {"prompt": "sort: 1 2 =", "chosen": " " + " ".join("0123456789" * 3), "rejected": " 9 8"},  # long response
        {"prompt": "sort: 2 1 =", "chosen": " 1 2", "rejected": " 2 1"},  # fits
    ]
    source = _write(tmp_path / "in.jsonl", records)
    truncated = prepare_preference_data(
        _config([source], tmp_path / "t" / "x", SP_MODEL, chat_template="plain", max_seq_length=20, min_prompt_tokens=5)
    )
    assert truncated["num_pairs"] == 3
    assert truncated["length_stats"] == {"dropped": {}, "prompt_truncated": 2, "responses_truncated": 1}
    rows = PreferenceDataset(tmp_path / "t" / "x").row_lengths
    assert rows.max() <= 20
    dropped = prepare_preference_data(
        _config([source], tmp_path / "d" / "x", SP_MODEL, chat_template="plain", max_seq_length=20, truncation="drop")
    )
    assert dropped["num_pairs"] == 1 and dropped["length_stats"]["dropped"] == {"too_long": 2}


def test_output_is_identical_for_any_number_of_workers(tmp_path):
    records = _first_lines(SYNTHETIC_DIR / "train.jsonl", 300)
    source = _write(tmp_path / "in.jsonl", records)
    outputs = []
    for workers in (1, 2):
        prefix = tmp_path / f"w{workers}" / "data"
        manifest = prepare_preference_data(
            _config([source, source], prefix, SP_MODEL, chat_template="plain", workers=workers, chunk_lines=37)
        )
        assert [(e["lines"], e["pairs"]) for e in manifest["inputs"]] == [(300, 300), (300, 300)]
        outputs.append((Path(f"{prefix}.bin").read_bytes(), Path(f"{prefix}.idx").read_bytes()))
    assert outputs[0] == outputs[1]


def test_crash_while_publishing_never_leaves_a_complete_looking_set(tmp_path, monkeypatch):
    records = _first_lines(SYNTHETIC_DIR / "train.jsonl", 10)
    source = _write(tmp_path / "in.jsonl", records)
    prefix = tmp_path / "out" / "train"
    prepare_preference_data(_config([source], prefix, SP_MODEL, chat_template="plain"))
    assert len(PreferenceDataset(prefix)) == 10

    real_replace = publish.os.replace
    calls = []

    def crash_after_first(src, dst):
        calls.append(dst)
        if len(calls) > 1:
            raise OSError("simulated crash")
        real_replace(src, dst)

    monkeypatch.setattr(publish.os, "replace", crash_after_first)
    with pytest.raises(OSError, match="simulated crash"):
        prepare_preference_data(_config([source], prefix, SP_MODEL, chat_template="plain", max_seq_length=200))
    with pytest.raises(DataFormatError, match="did not finish"):
        PreferenceDataset(prefix)
    assert not [p for p in prefix.parent.iterdir() if ".tmp-" in p.name], "staging directory left behind"


def test_dataset_refuses_missing_corrupt_or_unknown_files(tmp_path):
    with pytest.raises(DataFormatError, match="no prepared data set there"):
        PreferenceDataset(tmp_path / "nothing")
    source = _write(tmp_path / "in.jsonl", _first_lines(SYNTHETIC_DIR / "train.jsonl", 10))
    prefix = tmp_path / "out" / "train"
    prepare_preference_data(_config([source], prefix, SP_MODEL, chat_template="plain"))
    manifest_file = manifest_path(prefix)
    original = json.loads(manifest_file.read_text())

    manifest_file.write_text(json.dumps({**original, "format_version": 99}))
    with pytest.raises(DataFormatError, match="unknown format_version 99"):
        PreferenceDataset(prefix)
    manifest_file.write_text(json.dumps({**original, "format": "something_else"}))
    with pytest.raises(DataFormatError, match="not a preference data manifest"):
        PreferenceDataset(prefix)
    manifest_file.write_text(json.dumps({**original, "num_pairs": 9}))
    with pytest.raises(DataFormatError, match="do not belong together"):
        PreferenceDataset(prefix)
    manifest_file.write_text(json.dumps(original))

    bin_file = Path(f"{prefix}.bin")
    data = bytearray(bin_file.read_bytes())
    data[0] ^= 0xFF
    bin_file.write_bytes(bytes(data))
    assert len(PreferenceDataset(prefix)) == 10  # sizes match: the cheap check passes
    with pytest.raises(DataFormatError, match="sha256 differs"):
        PreferenceDataset(prefix, verify_sha256=True)
    bin_file.write_bytes(bytes(data[:-2]))
    with pytest.raises(DataFormatError, match="changed or replaced"):
        PreferenceDataset(prefix)
    bin_file.unlink()
    with pytest.raises(DataFormatError, match="missing"):
        PreferenceDataset(prefix)


def test_dataset_indexing_and_pickling(tmp_path):
    import pickle

    source = _write(tmp_path / "in.jsonl", _first_lines(SYNTHETIC_DIR / "train.jsonl", 5))
    prefix = tmp_path / "out" / "train"
    prepare_preference_data(_config([source], prefix, SP_MODEL, chat_template="plain"))
    dataset = PreferenceDataset(prefix)
    assert dataset[-1]["index"] == 4
    with pytest.raises(IndexError):
        dataset[5]
    clone = pickle.loads(pickle.dumps(dataset))
    assert all(np.array_equal(clone[3][k], dataset[3][k]) for k in ("prompt", "chosen", "rejected"))


def test_cli_flags_and_exit_codes(tmp_path, capsys):
    cli = load_tool("prepare_data")
    good = _write(tmp_path / "good.jsonl", _first_lines(SYNTHETIC_DIR / "train.jsonl", 5))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "chosen": "b"}\nnot json\n')
    common = ["--tokenizer", str(SP_MODEL), "--chat-template", "plain", "--max-seq-length", "32",
              "--truncation", "drop", "--min-response-tokens", "2", "--min-prompt-tokens", "4", "--workers", "1"]
    prefix = tmp_path / "out" / "cli"
    assert cli.main(["--input", str(good), str(bad), "--output-prefix", str(prefix), *common]) == 1
    err = capsys.readouterr().err
    assert f"{bad}:1: rejected: missing" in err and f"{bad}:2: <record>: invalid JSON" in err
    assert not prefix.parent.exists()
    assert cli.main(["--input", str(good), str(bad), "--output-prefix", str(prefix), "--on-bad-record", "skip", *common]) == 0
    manifest = json.loads(manifest_path(prefix).read_text())
    assert manifest["num_pairs"] == 5 and manifest["records"]["bad_by_reason"] == {"invalid_json": 1, "missing_field": 1}
    assert cli.main(["--input", str(tmp_path / "absent.jsonl"), "--output-prefix", str(prefix), *common]) == 2
