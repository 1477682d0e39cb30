"""Verifiable tasks: seeded prompt generation, exact scorers with positional partial credit, the samples
schema, scoring and evaluation, and the ``python -m megatron_tgdpo.tasks`` command line."""
from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_tgdpo.data.builtin import SYNTHETIC_DIR
from megatron_tgdpo.data.synthetic import SPECIAL_IDS
from megatron_tgdpo.data.tokenizer import load_tokenizer
from megatron_tgdpo.tasks import (
    TASKS,
    BadLinesError,
    get_task,
    head_to_head,
    load_sample_records,
    make_prompts,
    parse_response,
    prompt_id,
    summarize,
)
from megatron_tgdpo.tasks.cli import main
from megatron_tgdpo.tasks.prompts import is_heldout

from suite import ROOT

TOKENIZER = SYNTHETIC_DIR / "tokenizer.model"


def _write(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _digits(text: str) -> list[int]:
    return [int(t) for t in text.split()]


# ------------------------------------------------------------------------------------------ generation


@pytest.mark.parametrize("name", sorted(TASKS))
def test_generation_is_deterministic_per_seed_and_differs_across_seeds(name):
    task = get_task(name)
    first = make_prompts(task, num=50, seed=1)
    assert first == make_prompts(task, num=50, seed=1)
    other = make_prompts(task, num=50, seed=2)
    assert [r["prompt"] for r in first] != [r["prompt"] for r in other]
    assert len({r["prompt"] for r in first}) == 50  # distinct prompts
    for record in first:
        assert set(record) == {"id", "prompt", "task", "answer"}
        assert record["task"] == name and record["id"] == prompt_id(name, record["prompt"])
        assert record["answer"].startswith(" ") and task.check_answer(record["answer"]) is None


def test_answers_are_correct():
    for record in make_prompts(get_task("addition", num_digits=3), num=200, seed=3):
        a, b = record["prompt"].removeprefix("tot: ").removesuffix(" =").split(" : ")
        assert max(len(a.split()), len(b.split())) <= 3
        assert int(a.replace(" ", "")) + int(b.replace(" ", "")) == int(record["answer"].replace(" ", ""))
    for record in make_prompts(get_task("sort", min_length=2, max_length=5), num=200, seed=3):
        given = _digits(record["prompt"].removeprefix("sort: ").removesuffix(" ="))
        assert 2 <= len(given) <= 5 and _digits(record["answer"]) == sorted(given)
    for record in make_prompts(get_task("reverse"), num=200, seed=3):
        given = _digits(record["prompt"].removeprefix("tros: ").removesuffix(" ="))
        assert 4 <= len(given) <= 8 and _digits(record["answer"]) == given[::-1]


def test_train_and_heldout_splits_are_disjoint_whatever_the_seed():
    task = get_task("addition")
    train = make_prompts(task, num=400, seed=1, split="train", heldout_fraction=0.2, split_seed=7)
    heldout = make_prompts(task, num=100, seed=5, split="heldout", heldout_fraction=0.2, split_seed=7)
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in heldout}
    everything = make_prompts(task, num=1000, seed=9)
    share = sum(is_heldout(r["prompt"], task="addition", split_seed=7, heldout_fraction=0.2) for r in everything)
    assert 130 < share < 270  # ~20%
    # Another split seed is another split.
    moved = make_prompts(task, num=100, seed=5, split="heldout", heldout_fraction=0.2, split_seed=8)
    assert {r["prompt"] for r in moved} != {r["prompt"] for r in heldout}


def test_asking_for_more_prompts_than_exist_fails_clearly():
    with pytest.raises(ValueError, match=r"found only 100 distinct prompts.*--num-digits"):
        make_prompts(get_task("addition", num_digits=1), num=101, seed=0)


def test_registry_errors_name_the_task_and_parameters():
    with pytest.raises(ValueError, match="unknown task 'mul'.*addition, reverse, sort"):
        get_task("mul")
    with pytest.raises(ValueError, match="no parameter 'max_length'.*num_digits"):
        get_task("addition", max_length=3)
    with pytest.raises(ValueError, match="min_length <= max_length"):
        get_task("sort", min_length=5, max_length=4)


@pytest.mark.parametrize(
    "name, params", [("addition", {}), ("addition", {"num_digits": 5}), ("sort", {}), ("reverse", {"max_length": 16})]
)
def test_every_prompt_and_answer_tokenizes_with_the_builtin_tokenizer(name, params):
    tokenizer = load_tokenizer(TOKENIZER)
    for record in make_prompts(get_task(name, **params), num=300, seed=11):
        for text in (record["prompt"], record["answer"], record["prompt"] + record["answer"]):
            ids = tokenizer.encode(text)
            assert SPECIAL_IDS["unk_id"] not in ids, (text, ids)
            assert tokenizer.decode(ids) == text
        # Each answer digit is one "▁d" token, as in the built-in data's responses.
        assert len(tokenizer.encode(record["answer"])) == len(record["answer"].split())


# ------------------------------------------------------------------------------------------ verifiers


@pytest.mark.parametrize(
    "text, score, exact",
    [
        (" 1 0 5", 1.0, True),
        ("1  0 5 ", 1.0, True),  # whitespace is not significant
        (" 1 0 5\n 9 9", 1.0, True),  # only the first line counts
        (" 2 0 5", 2 / 3, False),
        (" 0 5", 2 / 3, False),  # aligned from the right: the units and tens are right
        (" 1 0 x", 2 / 3, False),
        (" 1 0 5 0", 0.0, False),  # an extra digit shifts every place
        (" 1 0 5 =", 0.0, False),  # trailing junk counts too
        (" 105", 0.0, False),  # one item, not three digits
        ("", 0.0, False),
        ("\n 1 0 5", 0.0, False),
        ("garbage", 0.0, False),
    ],
)
def test_addition_scorer(text, score, exact):
    task = get_task("addition")
    assert task.score(text, " 1 0 5") == pytest.approx(score)
    assert task.exact_match(text, " 1 0 5") is exact


@pytest.mark.parametrize(
    "text, score, exact",
    [
        (" 2 4 7 9", 1.0, True),
        (" 2 4 9 7", 0.5, False),
        (" 2 4 7", 0.75, False),  # aligned from the left, over the longer length
        (" 2 4 7 9 9", 0.8, False),
        (" 4 7 9", 0.0, False),
        (" 9 7 4 2", 0.0, False),
        (" ", 0.0, False),
        ("sort: 2 4 7 9", 0.0, False),
    ],
)
def test_sort_scorer(text, score, exact):
    task = get_task("sort")
    assert task.score(text, " 2 4 7 9") == pytest.approx(score)
    assert task.exact_match(text, " 2 4 7 9") is exact


def test_reverse_scorer_and_scores_stay_in_unit_interval():
    task = get_task("reverse")
    assert task.score(" 4 9 2 7", " 4 9 2 7") == 1.0
    assert task.score(" 4 9 2", " 4 9 2 7") == 0.75
    rng = random.Random(0)
    alphabet = "0123456789 =sx\n"
    for name in TASKS:
        for _ in range(300):
            text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(12)))
            assert 0.0 <= get_task(name).score(text, " 1 2 3") <= 1.0


def test_check_answer_and_parse_response():
    task = get_task("sort")
    assert task.check_answer(" 1 2") is None
    assert task.check_answer("  ") == "empty answer"
    assert "'12' is not a single digit" in task.check_answer(" 12 3")
    assert parse_response(" 1 2\n3") == ["1", "2"]


# ------------------------------------------------------------------------------------------ samples files


def _samples_record(prompt_id_: str, texts: list[str], *, answer: str = " 1 2", **extra) -> dict:
    samples = [{"text": t, "num_tokens": len(t.split()), "finish_reason": "eos"} for t in texts]
    return {"id": prompt_id_, "prompt": "sort: 2 1 =", "task": "sort", "answer": answer, "samples": samples, **extra}


def test_score_cli_adds_scores_and_passes_fields_through(tmp_path):
    source = _write(tmp_path / "samples.jsonl", [
        _samples_record("a", [" 1 2", " 2 1", ""], meta={"k": 1}),
        _samples_record("b", [" 1"]),
    ])
    assert main(["score", "--samples", str(source), "--output", str(tmp_path / "scored.jsonl")]) == 0
    scored = _read(tmp_path / "scored.jsonl")
    assert [s["score"] for s in scored[0]["samples"]] == [1.0, 0.0, 0.0]
    assert [s["score"] for s in scored[1]["samples"]] == [0.5]
    assert scored[0]["meta"] == {"k": 1} and scored[0]["samples"][0]["finish_reason"] == "eos"
    # Rescoring in place replaces the scores atomically and leaves no temporary file behind.
    assert main(["score", "--samples", str(tmp_path / "scored.jsonl"), "--output", str(tmp_path / "scored.jsonl")]) == 0
    assert _read(tmp_path / "scored.jsonl") == scored
    assert sorted(p.name for p in tmp_path.iterdir()) == ["samples.jsonl", "scored.jsonl"]


def test_score_cli_reports_every_bad_line_and_writes_nothing(tmp_path, capsys):
    source = _write(tmp_path / "samples.jsonl", [
        _samples_record("ok", [" 1 2"]),
        {"id": "x", "prompt": "p", "samples": []},
        "not json",
        "[1, 2]",
        _samples_record("y", [" 1"], task="mul"),
        _samples_record("z", [" 1"], answer=" 1 x"),
        {**_samples_record("w", []), "samples": [{"text": 3}]},
        {**_samples_record("v", []), "samples": [{"text": "1", "finish_reason": "stop"}]},
        {**_samples_record("u", []), "samples": [{"text": "1", "num_tokens": -1}]},
        {**_samples_record("t", []), "samples": [{"text": "1", "score": "high"}]},
        _samples_record("ok", [" 1 2"]),
        {"prompt": "p", "samples": []},
        {**_samples_record("s", []), "id": True},
        {**_samples_record("r", [" 1 2"]), "id": 7},  # integer ids are fine, as generation accepts them
    ])
    output = tmp_path / "scored.jsonl"
    assert main(["score", "--samples", str(source), "--output", str(output)]) == 1
    err = capsys.readouterr().err
    expected = [
        ":2: task: missing",
        ":3: <record>: invalid JSON",
        ":4: <record>: expected a JSON object, got array",
        ":5: task: unknown task 'mul'",
        ":6: answer: 'x' is not a single digit",
        ":7: samples[0].text: expected a string, got number",
        ":8: samples[0].finish_reason: expected one of eos, length, got 'stop'",
        ":9: samples[0].num_tokens: expected a non-negative integer, got -1",
        ":10: samples[0].score: expected a number, got string",
        ":11: id: duplicate of",
        ":12: id: missing",
        ":13: id: expected a non-empty string or an integer, got boolean True",
    ]
    for fragment in expected:
        assert f"{source}{fragment}" in err, fragment
    assert "12 bad lines" in err and ":14:" not in err and "nothing was written" in err
    assert not output.exists()
    assert main(["score", "--samples", str(tmp_path / "missing.jsonl"), "--output", str(output)]) == 2
    assert "missing.jsonl: no such file" in capsys.readouterr().err


def test_non_finite_scores_are_refused(tmp_path):
    source = _write(tmp_path / "s.jsonl", ['{"id": "a", "prompt": "p", "samples": [{"text": "x", "score": NaN}]}'])
    with pytest.raises(BadLinesError, match=r"s.jsonl:1: <record>: NaN is not valid JSON"):
        load_sample_records(source, require_scores=True)


# ------------------------------------------------------------------------------------------ evaluation


def _scored(path: Path, rows: dict[str, list[tuple[str, float]]], *, verified: bool = True) -> Path:
    records = []
    for prompt_id_, samples in rows.items():
        record = {"id": prompt_id_, "prompt": f"sort: {prompt_id_} =",
                  "samples": [{"text": t, "score": s} for t, s in samples]}
        if verified:
            record.update(task="sort", answer=" 1 2")
        records.append(record)
    return _write(path, records)


def test_summary_arithmetic(tmp_path):
    path = _scored(tmp_path / "a.jsonl", {
        "p1": [(" 1 2", 1.0), (" 2 1", 0.0)],
        "p2": [(" 1", 0.5), (" 1 3", 0.5)],
    })
    summary = summarize(load_sample_records(path, require_scores=True))
    assert (summary.prompts, summary.samples, summary.min_k, summary.max_k) == (2, 4, 2, 2)
    assert summary.mean_score == pytest.approx(0.5)
    assert summary.exact_match == pytest.approx(0.25)
    assert summary.best_of_k_score == pytest.approx(0.75)
    assert summary.best_of_k_exact == pytest.approx(0.5)
    external = _scored(tmp_path / "b.jsonl", {"p1": [("anything", 0.3)]}, verified=False)
    assert summarize(load_sample_records(external, require_scores=True)).exact_match is None


def test_head_to_head_arithmetic(tmp_path):
    a = load_sample_records(_scored(tmp_path / "a.jsonl", {
        "p1": [("x", 1.0), ("y", 0.0)],   # mean 0.5, first 1.0
        "p2": [("x", 0.5)],
        "p3": [("x", 0.0), ("y", 1.0)],   # mean 0.5, first 0.0
        "p4": [("x", 0.2)],
    }), require_scores=True)
    b = load_sample_records(_scored(tmp_path / "b.jsonl", {
        "p4": [("x", 0.1)],
        "p3": [("x", 0.5)],
        "p2": [("x", 0.5)],
        "p1": [("x", 0.75)],
    }), require_scores=True)
    by_mean = head_to_head(a, b, per_prompt="mean")
    assert (by_mean.wins, by_mean.ties, by_mean.losses) == (1, 2, 1)
    assert by_mean.win_rate == pytest.approx(0.5)
    by_first = head_to_head(a, b, per_prompt="first")
    assert (by_first.wins, by_first.ties, by_first.losses) == (2, 1, 1)
    assert by_first.win_rate == pytest.approx(2.5 / 4)
    reverse = head_to_head(b, a, per_prompt="first")
    assert (reverse.wins, reverse.losses) == (1, 2)


def test_head_to_head_refuses_different_prompts(tmp_path):
    a = load_sample_records(_scored(tmp_path / "a.jsonl", {"p1": [("x", 1.0)], "p2": [("x", 1.0)]}), require_scores=True)
    b = load_sample_records(_scored(tmp_path / "b.jsonl", {"p1": [("x", 1.0)], "p3": [("x", 1.0)]}), require_scores=True)
    with pytest.raises(ValueError, match=r"1 ids only in .*a.jsonl \(e.g. 'p2'\); 1 ids only in .*b.jsonl \(e.g. 'p3'\)"):
        head_to_head(a, b)


def test_evaluate_cli(tmp_path, capsys):
    a = _scored(tmp_path / "a.jsonl", {"p1": [(" 1 2", 1.0)], "p2": [(" 2 1", 0.0)]})
    b = _scored(tmp_path / "b.jsonl", {"p1": [(" 2 1", 0.0)], "p2": [(" 2 1", 0.0)]})
    assert main(["evaluate", "--samples", str(a), "--against", str(b), "--json", str(tmp_path / "r.json")]) == 0
    out = capsys.readouterr().out
    assert "mean score" in out and "exact match" in out and "best-of-k" in out
    assert "wins 1, ties 1, losses 0 of 2; win rate 0.7500" in out
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["head_to_head"]["win_rate"] == 0.75 and result["files"][str(a)]["mean_score"] == 0.5

    other = _scored(tmp_path / "c.jsonl", {"p1": [(" 1 2", 1.0)]})
    assert main(["evaluate", "--samples", str(a), "--against", str(other)]) == 1
    assert "do not hold the same prompts" in capsys.readouterr().err
    unscored = _write(tmp_path / "u.jsonl", [_samples_record("a", [" 1 2"])])
    assert main(["evaluate", "--samples", str(unscored)]) == 1
    err = capsys.readouterr().err
    assert f"{unscored}:1: samples[0].score: missing" in err and "megatron_tgdpo.tasks score" in err


# ------------------------------------------------------------------------------------------ command line


def test_make_prompts_cli(tmp_path, capsys):
    out = tmp_path / "p.jsonl"
    args = ["make-prompts", "--task", "addition", "--num", "20", "--seed", "1", "--output", str(out)]
    assert main([*args, "--check-tokenizer", str(TOKENIZER)]) == 0
    first = out.read_bytes()
    assert main(args) == 0 and out.read_bytes() == first
    assert len(_read(out)) == 20

    assert main([*args[:-2], "--output", str(tmp_path / "x.jsonl"), "--max-length", "3"]) == 2
    assert "--max-length does not apply to --task addition (its flags: --num-digits)" in capsys.readouterr().err
    assert main([*args[:-2], "--output", str(tmp_path / "x.jsonl"), "--num-digits", "0"]) == 2
    assert "num_digits must be between 1 and 18" in capsys.readouterr().err
    too_many = ["make-prompts", "--task", "sort", "--num", "50", "--min-length", "1", "--max-length", "1",
                "--output", str(tmp_path / "x.jsonl")]
    assert main(too_many) == 1
    assert "found only 10 distinct prompts" in capsys.readouterr().err
    assert not (tmp_path / "x.jsonl").exists()


def test_module_entry_point_and_no_torch_import(tmp_path):
    code = (
        "import sys, megatron_tgdpo.tasks, megatron_tgdpo.tasks.cli, megatron_tgdpo.tasks.pairs; "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=120)
    run = subprocess.run(
        [sys.executable, "-m", "megatron_tgdpo.tasks", "make-prompts", "--task", "reverse", "--num", "3",
         "--output", str(tmp_path / "p.jsonl")],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert run.returncode == 0, run.stderr
    assert len(_read(tmp_path / "p.jsonl")) == 3


def test_no_heldout_problem_is_a_reordering_of_a_training_problem():
    from megatron_tgdpo.tasks.prompts import canonical_prompt
    from megatron_tgdpo.tasks.registry import get_task

    assert canonical_prompt("addition", "tot: 4 7 : 3 5 =") == canonical_prompt("addition", "tot: 3 5 : 4 7 =")
    assert canonical_prompt("addition", "tot: 4 7 : 3 5 =") != canonical_prompt("addition", "tot: 4 7 : 3 6 =")
    assert canonical_prompt("sort", "sort: 7 2 9 2 =") == canonical_prompt("sort", "sort: 2 9 2 7 =") == "sort: 2 2 7 9 ="
    assert canonical_prompt("reverse", "tros: 7 2 9 =") == "tros: 7 2 9 ="  # an order is the problem itself
    for name, params in (("addition", {"num_digits": 1}), ("sort", {"min_length": 2, "max_length": 3})):
        task = get_task(name, **params)
        train = make_prompts(task, num=40, seed=1, split="train", heldout_fraction=0.3)
        heldout = make_prompts(task, num=15, seed=2, split="heldout", heldout_fraction=0.3)
        train_forms = {canonical_prompt(name, r["prompt"]) for r in train}
        assert not train_forms & {canonical_prompt(name, r["prompt"]) for r in heldout}
        # the split by prompt text, as before canonical forms, leaks reordered problems
        old_train = make_prompts(task, num=40, seed=1, split="train", heldout_fraction=0.3, split_by="prompt")
        old_heldout = make_prompts(task, num=15, seed=2, split="heldout", heldout_fraction=0.3, split_by="prompt")
        assert {canonical_prompt(name, r["prompt"]) for r in old_train} & {
            canonical_prompt(name, r["prompt"]) for r in old_heldout}
