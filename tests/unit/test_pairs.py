"""Pair building: best vs worst sample per prompt, deterministic ties, drops counted by reason, output
accepted by the preference-record validator, all bad lines reported and nothing written."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from megatron_tgdpo.tasks.pairs import build_pairs, select_pair
from megatron_tgdpo.data.records import Message, PreferenceRecord, parse_record
from megatron_tgdpo.tasks import BadLinesError, load_sample_records

from suite import load_tool


def _tool():
    return load_tool("build_pairs")


def _write(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def _record(prompt_id: str, samples: list[tuple[str, float]], *, prompt="sort: 2 1 =", **extra) -> dict:
    return {"id": prompt_id, "prompt": prompt, "task": "sort", "answer": " 1 2",
            "samples": [{"text": t, "num_tokens": 2, "finish_reason": "eos", "score": s} for t, s in samples], **extra}


def _samples(*pairs: tuple[str, float]) -> list[dict]:
    return [{"text": t, "score": s} for t, s in pairs]


def test_select_pair_rules():
    assert select_pair(_samples(("a", 0.5), ("b", 1.0), ("c", 0.0))) == (1, 2)
    # Equal best and equal worst scores: the first of each, in sample order.
    assert select_pair(_samples(("a", 1.0), ("b", 0.0), ("c", 1.0), ("d", 0.0))) == (0, 1)
    assert select_pair(_samples(("a", 0.5), ("b", 0.5))) == "all_equal"
    assert select_pair(_samples(("a", 1.0), ("a", 0.0))) == "identical"
    assert select_pair(_samples(("a", 1.0))) == "too_few_samples"
    assert select_pair([]) == "too_few_samples"
    # Blank texts are never picked (prepare_data rejects empty responses).
    assert select_pair(_samples(("", 0.0), ("a", 1.0), ("b", 0.5), ("  ", -1.0))) == (1, 2)
    assert select_pair(_samples(("", 0.0), ("a", 1.0))) == "too_few_samples"


HAND_MADE = [
    _record("p1", [(" 1 2", 1.0), (" 2 1", 0.0), (" 1 2", 1.0)]),
    _record("p2", [(" 1", 0.5), (" 2", 0.5)]),                        # all equal
    _record("p3", [(" 1 2", 1.0)]),                                   # one sample
    _record("p4", [(" 2 2", 0.5), ("", 0.0), (" 1 2", 1.0), (" 2 1", 0.0)]),
    _record("p5", [(" 1 2", 1.0), (" 1 2", 0.0)]),                    # inconsistent external scores
    _record("p6", [("x", 0.9), ("y", 0.1)], prompt=[{"role": "system", "content": "Be brief."},
                                                    {"role": "user", "content": "sort: 2 1 ="}]),
    _record("p7", []),
]


def test_build_pairs_on_a_hand_made_file(tmp_path):
    path = _write(tmp_path / "scored.jsonl", HAND_MADE)
    pairs, stats = build_pairs(load_sample_records(path, require_scores=True))
    assert pairs == [
        {"prompt": "sort: 2 1 =", "chosen": " 1 2", "rejected": " 2 1", "id": "p1", "chosen_score": 1.0, "rejected_score": 0.0},
        {"prompt": "sort: 2 1 =", "chosen": " 1 2", "rejected": " 2 1", "id": "p4", "chosen_score": 1.0, "rejected_score": 0.0},
        {"prompt": HAND_MADE[5]["prompt"], "chosen": "x", "rejected": "y", "id": "p6", "chosen_score": 0.9, "rejected_score": 0.1},
    ]
    assert stats.prompts == 7 and stats.pairs == 3
    assert stats.dropped == {"too_few_samples": 2, "all_equal": 1, "identical": 1}
    assert stats.empty_samples_skipped == 1
    assert stats.mean_chosen_score == pytest.approx(2.9 / 3)
    assert stats.mean_rejected_score == pytest.approx(0.1 / 3)
    # Every pair is a valid preference record, with the message-list prompt kept as messages.
    parsed = [parse_record(json.dumps(p), source="pairs.jsonl", line=i + 1) for i, p in enumerate(pairs)]
    assert all(isinstance(r, PreferenceRecord) for r in parsed)
    assert parsed[2].prompt == (Message("system", "Be brief."), Message("user", "sort: 2 1 ="))


def test_external_reward_scores_without_task_are_valid_input(tmp_path):
    record = {"id": "q", "prompt": "Capital of France?", "samples": [{"text": "Paris.", "score": 2.5},
                                                                     {"text": "Lyon.", "score": -1}]}
    pairs, _ = build_pairs(load_sample_records(_write(tmp_path / "rm.jsonl", [record]), require_scores=True))
    assert pairs[0]["chosen"] == "Paris." and pairs[0]["rejected_score"] == -1


def test_a_prompt_the_validator_rejects_is_reported_against_its_input_line(tmp_path):
    bad_prompt = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    path = _write(tmp_path / "s.jsonl", [HAND_MADE[0], _record("b", [("x", 1.0), ("y", 0.0)], prompt=bad_prompt)])
    with pytest.raises(BadLinesError, match=r"s.jsonl:2: prompt\[1\].role: the prompt must end with a user message"):
        build_pairs(load_sample_records(path, require_scores=True))


def test_cli_writes_pairs_and_prints_the_summary(tmp_path, capsys):
    source = _write(tmp_path / "scored.jsonl", HAND_MADE)
    output = tmp_path / "out" / "pairs.jsonl"
    stats_path = tmp_path / "stats.json"
    assert _tool().main(["--input", str(source), "--output", str(output), "--stats-output", str(stats_path)]) == 0
    err = capsys.readouterr().err
    assert "prompts: 7" in err and "pairs written: 3" in err
    assert "dropped: 4 (2 fewer than 2 samples with non-empty text, 1 all scores equal, 1 best and worst texts identical)" in err
    assert "mean score: chosen 0.9667, rejected 0.0333" in err
    assert [json.loads(line)["id"] for line in output.read_text().splitlines()] == ["p1", "p4", "p6"]
    assert json.loads(stats_path.read_text())["dropped"]["all_equal"] == 1
    assert sorted(p.name for p in output.parent.iterdir()) == ["pairs.jsonl"]  # no temporary file left


def test_cli_bad_lines_are_all_reported_and_nothing_is_written(tmp_path, capsys):
    unscored = _record("u", [("x", 0.0)])
    del unscored["samples"][0]["score"]
    source = _write(tmp_path / "scored.jsonl", [
        HAND_MADE[0],
        unscored,
        "{broken",
        _record("n", [("x", 1.0)], prompt=7),
        _record("p1", [("x", 1.0), ("y", 0.5)]),
    ])
    output = tmp_path / "pairs.jsonl"
    output.write_text("old\n")
    assert _tool().main(["--input", str(source), "--output", str(output)]) == 1
    err = capsys.readouterr().err
    assert f"{source}:2: samples[0].score: missing" in err
    assert f"{source}:3: <record>: invalid JSON" in err
    assert f"{source}:4: prompt: expected a string or a list of messages, got number" in err
    assert f"{source}:5: id: duplicate of {source}:1" in err
    assert "4 bad lines" in err and "nothing was written" in err and "megatron_tgdpo.tasks score" in err
    assert output.read_text() == "old\n"  # the previous output is untouched
    # The same file twice would double-weight every prompt.
    good = _write(tmp_path / "good.jsonl", HAND_MADE[:2])
    assert _tool().main(["--input", str(good), str(good), "--output", str(output)]) == 1
    assert f"{good}:1: id: duplicate of {good}:1" in capsys.readouterr().err


def test_cli_exit_codes_for_missing_input_and_no_pairs(tmp_path, capsys):
    tool = _tool()
    assert tool.main(["--input", str(tmp_path / "nope.jsonl"), "--output", str(tmp_path / "o.jsonl")]) == 2
    assert "nope.jsonl: no such file" in capsys.readouterr().err
    source = _write(tmp_path / "eq.jsonl", [HAND_MADE[1], HAND_MADE[2]])
    assert tool.main(["--input", str(source), "--output", str(tmp_path / "o.jsonl")]) == 1
    assert "no pairs: every prompt was dropped" in capsys.readouterr().err
    assert not (tmp_path / "o.jsonl").exists()
    with pytest.raises(SystemExit) as usage:
        tool.main(["--output", str(tmp_path / "o.jsonl")])
    assert usage.value.code == 2
