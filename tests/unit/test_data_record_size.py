"""The record-size limit of data preparation: a line over --max-record-bytes is a bad record named by
file:line, and it is read past without ever being held whole."""
from __future__ import annotations

import dataclasses
import io
import json
import tracemalloc
from pathlib import Path

import pytest

from megatron_tgdpo.data.builtin import SYNTHETIC_DIR
from megatron_tgdpo.data.errors import BadRecordsError
from megatron_tgdpo.data.prepare import PrepareConfig, prepare_preference_data
from megatron_tgdpo.data.records import MAX_RECORD_BYTES, PROBLEM_CODES, OversizeLine, read_lines

MIB = 2**20


def _pair(prompt: str) -> str:
    return json.dumps({"prompt": prompt, "chosen": "yes it is", "rejected": "no it is not"}) + "\n"


def _write_with_huge_line(path: Path, *, huge_bytes: int) -> Path:
    """Three records, the second a single line of ``huge_bytes`` (written in pieces: the test itself
    never holds it either)."""
    head = '{"prompt": "'
    tail = '", "chosen": "a", "rejected": "b"}\n'
    with open(path, "w", encoding="utf-8") as out:
        out.write(_pair("what is the first question here"))
        out.write(head)
        remaining = huge_bytes - len(head) - len(tail) + 1  # +1: the newline is not counted
        while remaining > 0:
            piece = min(remaining, MIB)
            out.write("x" * piece)
            remaining -= piece
        out.write(tail)
        out.write(_pair("what is the third question here"))
    return path


def test_read_lines_splits_like_iteration_and_stands_in_for_long_lines():
    data = b"short\n" + b"y" * 10 + b"\n" + b"z" * 11 + b"\n" + b"exact\n" + b"last"
    got = list(read_lines(io.BytesIO(data), max_bytes=10))
    assert got[0] == b"short\n" and got[1] == b"y" * 10 + b"\n"  # exactly at the limit: kept
    assert got[2] == OversizeLine(size=11, limit=10)
    assert got[3:] == [b"exact\n", b"last"]
    plain = b"a\nbb\n\nccc"
    assert list(read_lines(io.BytesIO(plain), max_bytes=10)) == list(io.BytesIO(plain))
    tail = list(read_lines(io.BytesIO(b"ok\n" + b"w" * 25), max_bytes=10))  # long last line, no newline
    assert tail == [b"ok\n", OversizeLine(size=25, limit=10)]


def test_a_50_mb_record_is_refused_with_its_line_and_memory_stays_small(tmp_path):
    source = _write_with_huge_line(tmp_path / "big.jsonl", huge_bytes=50 * MIB)
    config = PrepareConfig(inputs=(str(source),), output_prefix=str(tmp_path / "out" / "train"),
                           tokenizer=str(SYNTHETIC_DIR / "tokenizer.model"), max_seq_length=64,
                           min_prompt_tokens=1, workers=1)
    assert config.max_record_bytes == MAX_RECORD_BYTES < 50 * MIB
    # One small preparation first: the modules it imports on first use are not what is measured.
    small = tmp_path / "small.jsonl"
    small.write_text(_pair("a short warm-up question"))
    prepare_preference_data(dataclasses.replace(config, inputs=(str(small),), output_prefix=str(tmp_path / "warm")))
    tracemalloc.start()
    try:
        with pytest.raises(BadRecordsError) as info:
            prepare_preference_data(config)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    text = str(info.value)
    assert f"{source}:2: <record>: record of 50.0 MiB exceeds the limit of 8.0 MiB" in text
    assert "--max-record-bytes" in text
    assert ":1:" not in text and ":3:" not in text  # the records around it are fine
    # Python's allocations peak at a small multiple of the limit (a read of max_record_bytes + 1 and its
    # copy, the 8 MiB blocks of the input's checksum), not at the record's size (over 3 GB parsed whole).
    assert peak < 3 * MAX_RECORD_BYTES < 50 * MIB, f"peak {peak / MIB:.1f} MiB"
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_skip_mode_counts_the_oversize_record_and_keeps_the_others(tmp_path):
    source = _write_with_huge_line(tmp_path / "big.jsonl", huge_bytes=2 * MIB)
    config = PrepareConfig(inputs=(str(source),), output_prefix=str(tmp_path / "out" / "train"),
                           tokenizer=str(SYNTHETIC_DIR / "tokenizer.model"), max_seq_length=64,
                           min_prompt_tokens=1, workers=1, on_bad_record="skip", max_record_bytes=MIB)
    manifest = prepare_preference_data(config)
    assert manifest["records"]["bad_by_reason"] == {"record_too_large": 1}
    assert "record_too_large" in PROBLEM_CODES
    assert manifest["num_pairs"] == 2
