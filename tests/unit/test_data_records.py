"""Record validation: accepted forms normalise correctly; 20 kinds of malformed records are each
reported as one precise ``file:line: field: reason`` line, with nothing written (error) or counted (skip)."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from megatron_tgdpo.data.builtin import SYNTHETIC_DIR
from megatron_tgdpo.data.errors import BadRecordsError
from megatron_tgdpo.data.prepare import PrepareConfig, prepare_preference_data
from megatron_tgdpo.data.records import PROBLEM_CODES, Message, Problem, parse_record

U = {"role": "user", "content": "hi"}
A = {"role": "assistant", "content": "hello"}
B = {"role": "assistant", "content": "go away"}


def _parse(obj: object):
    return parse_record(json.dumps(obj), source="f.jsonl", line=3)


# ------------------------------------------------------------------------------------------ forms


def test_string_form_becomes_messages():
    record = _parse({"prompt": "Q: 2+2 =", "chosen": " 4", "rejected": " 5", "score": 3})
    assert record.prompt == (Message("user", "Q: 2+2 ="),)
    assert record.chosen == (Message("assistant", " 4"),)
    assert record.rejected == (Message("assistant", " 5"),)


def test_conversational_form_with_string_prompt():
    record = _parse({"prompt": "hi", "chosen": [A], "rejected": [B]})
    assert record.prompt == (Message("user", "hi"),)
    assert record.chosen == (Message("assistant", "hello"),)


def test_ultrafeedback_layout_strips_repeated_prompt():
    record = _parse({"prompt": "hi", "chosen": [U, A], "rejected": [U, B]})
    assert record.prompt == (Message("user", "hi"),)
    assert record.chosen == (Message("assistant", "hello"),)
    assert record.rejected == (Message("assistant", "go away"),)


def test_shared_prefix_form_takes_longest_common_prefix():
    system = {"role": "system", "content": "be nice"}
    u2 = {"role": "user", "content": "again?"}
    record = _parse({"chosen": [system, U, A, u2, A], "rejected": [system, U, A, u2, B, B]})
    assert [m.role for m in record.prompt] == ["system", "user", "assistant", "user"]
    assert record.chosen == (Message("assistant", "hello"),)
    assert record.rejected == (Message("assistant", "go away"), Message("assistant", "go away"))


def test_blank_line_is_not_a_record():
    assert parse_record(b"  \n", source="f", line=2) is None


def test_bom_on_first_line_is_ignored():
    raw = "\ufeff" + json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"})
    assert not isinstance(parse_record(raw.encode("utf-8"), source="f", line=1), Problem)


# ------------------------------------------------------------------------------- malformed records

_M = {"role": "user", "content": "q"}
# (line text, field, code, words the reason must contain): twenty different ways to be wrong.
MALFORMED: list[tuple[str | bytes, str, str, str]] = [
    ('{"prompt": "a", "chosen": "b", "rejected": "c"', "<record>", "invalid_json", "invalid JSON"),
    (b'{"prompt": "\xff\xfe", "chosen": "b", "rejected": "c"}', "<record>", "invalid_utf8", "UTF-8"),
    ("[1, 2, 3]", "<record>", "not_an_object", "got array"),
    ('{"prompt": "a", "rejected": "c"}', "chosen", "missing_field", "missing"),
    ('{"prompt": "a", "chosen": "b"}', "rejected", "missing_field", "missing"),
    ('{"prompt": 5, "chosen": "b", "rejected": "c"}', "prompt", "wrong_type", "got number"),
    ('{"prompt": "   ", "chosen": "b", "rejected": "c"}', "prompt", "empty_prompt", "empty prompt"),
    ('{"prompt": "a", "chosen": " \\n", "rejected": "c"}', "chosen", "empty_response", "empty response"),
    ('{"prompt": "a", "chosen": "b", "rejected": []}', "rejected", "empty_list", "empty list"),
    ('{"prompt": "a", "chosen": "same", "rejected": "same"}', "rejected", "identical_responses", "same as chosen"),
    ('{"prompt": "a", "chosen": ["b"], "rejected": "c"}', "chosen[0]", "not_a_message", "got string"),
    ('{"prompt": [{"from": "human", "value": "a"}], "chosen": "b", "rejected": "c"}', "prompt[0].role", "missing_field", "missing"),
    ('{"prompt": [{"role": "bot", "content": "a"}], "chosen": "b", "rejected": "c"}', "prompt[0].role", "unknown_role", "'bot'"),
    ('{"prompt": [{"role": "user", "content": ["a"]}], "chosen": "b", "rejected": "c"}', "prompt[0].content", "wrong_type", "got array"),
    (
        json.dumps({"prompt": [_M], "chosen": [{"role": "assistant", "content": "b"}, _M], "rejected": "c"}),
        "chosen[1].role",
        "response_last_role",
        "must end with an assistant message",
    ),
    (
        json.dumps({"prompt": [_M, {"role": "assistant", "content": "x"}], "chosen": "b", "rejected": "c"}),
        "prompt[1].role",
        "prompt_last_role",
        "must end with a user message",
    ),
    (
        json.dumps({"prompt": "a", "chosen": [_M, {"role": "assistant", "content": "b"}], "rejected": "c"}),
        "chosen[0].role",
        "response_role",
        "only assistant messages",
    ),
    (
        json.dumps({"chosen": [U, A], "rejected": [_M, B]}),
        "chosen/rejected",
        "no_shared_prompt",
        "no shared prompt",
    ),
    (
        json.dumps({"chosen": [U, A], "rejected": [U, A, _M, B]}),
        "chosen",
        "no_response",
        "nothing after the prompt",
    ),
    ('{"chosen": "b", "rejected": "c"}', "prompt", "missing_field", "missing"),
]
assert len(MALFORMED) == 20
assert {code for _, _, code, _ in MALFORMED} <= set(PROBLEM_CODES)

GOOD = [
    {"prompt": "sort: 3 1 2 =", "chosen": " 1 2 3", "rejected": " 2 1 3"},
    {"prompt": [{"role": "user", "content": "sort: 5 4 ="}], "chosen": [{"role": "assistant", "content": " 4 5"}],
     "rejected": [{"role": "assistant", "content": " 5 4"}]},
    {"chosen": [{"role": "user", "content": "sort: 9 0 ="}, {"role": "assistant", "content": " 0 9"}],
     "rejected": [{"role": "user", "content": "sort: 9 0 ="}, {"role": "assistant", "content": " 9 0"}]},
]


def _write_mixed(path: Path) -> dict[int, tuple[str, str, str]]:
    """Good and bad records interleaved (plus a blank line); returns line -> expectation for the bad ones."""
    expected: dict[int, tuple[str, str, str]] = {}
    lines: list[bytes] = []
    for i, (text, field, code, words) in enumerate(MALFORMED):
        lines.append(json.dumps(GOOD[i % len(GOOD)]).encode())
        if i == 5:
            lines.append(b"")
        raw = text if isinstance(text, bytes) else text.encode()
        lines.append(raw)
        expected[len(lines)] = (field, code, words)
    path.write_bytes(b"\n".join(lines) + b"\n")
    return expected


def _config(path: Path, out: Path, **overrides) -> PrepareConfig:
    settings = dict(
        inputs=(str(path),),
        output_prefix=str(out / "sub" / "train"),
        tokenizer=str(SYNTHETIC_DIR / "tokenizer.model"),
        chat_template="plain",
        max_seq_length=64,
        min_prompt_tokens=4,
    )
    settings.update(overrides)
    return PrepareConfig(**settings)


def test_error_mode_reports_each_bad_record_precisely_and_writes_nothing(tmp_path):
    source = tmp_path / "mixed.jsonl"
    expected = _write_mixed(source)
    out = tmp_path / "out"
    with pytest.raises(BadRecordsError) as caught:
        prepare_preference_data(_config(source, out, max_errors_shown=5))
    problems = caught.value.problems
    assert [p.line for p in problems] == sorted(expected)
    for problem in problems:
        field, code, words = expected[problem.line]
        assert (problem.field, problem.code) == (field, code), str(problem)
        assert words in problem.reason, str(problem)
        assert str(problem).startswith(f"{source}:{problem.line}: {field}: ")
    message = str(caught.value)
    assert message.count(f"{source}:") == 5 and "... and 15 more" in message
    assert "--on-bad-record skip" in message
    assert not out.exists(), "nothing may be written, not even the output directory"


def test_skip_mode_counts_bad_records_by_reason(tmp_path):
    source = tmp_path / "mixed.jsonl"
    expected = _write_mixed(source)
    manifest = prepare_preference_data(_config(source, tmp_path / "out", on_bad_record="skip"))
    records = manifest["records"]
    assert manifest["num_pairs"] == len(MALFORMED)  # one good record before each bad one
    assert records["bad"] == 20 and records["blank_lines"] == 1 and records["valid"] == 20
    assert records["bad_by_reason"] == dict(Counter(code for _, code, _ in expected.values()))
    assert len(records["bad_examples"]) == 20
    assert records["lines"] == 41


def test_template_failures_are_record_problems(tmp_path):
    tokenizer_dir = tmp_path / "tok"
    from megatron_tgdpo.data.toy_tokenizers import write_llama3_style_tokenizer

    strict = "{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system messages') }}{% endif %}" + (
        "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    )
    write_llama3_style_tokenizer(tokenizer_dir, chat_template=strict)
    source = tmp_path / "in.jsonl"
    rows = [
        {"prompt": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}], "chosen": "a", "rejected": "b"},
        {"prompt": "u", "chosen": "a", "rejected": "b"},
    ]
    source.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(BadRecordsError) as caught:
        prepare_preference_data(_config(source, tmp_path / "out", tokenizer=str(tokenizer_dir), chat_template="auto"))
    (problem,) = caught.value.problems
    assert (problem.line, problem.field, problem.code) == (1, "<template>", "template_error")
    assert "no system messages" in problem.reason


def test_template_whose_prompt_is_not_a_prefix_is_reported(tmp_path):
    from megatron_tgdpo.data.toy_tokenizers import write_llama3_style_tokenizer

    # Renders a different header when a generation prompt is asked for: the prompt is no prefix.
    odd = "{% if add_generation_prompt %}Q:{% else %}Question:{% endif %}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    tokenizer_dir = write_llama3_style_tokenizer(tmp_path / "tok", chat_template=odd)
    source = tmp_path / "in.jsonl"
    source.write_text(json.dumps({"prompt": "u", "chosen": "a", "rejected": "b"}) + "\n")
    with pytest.raises(BadRecordsError) as caught:
        prepare_preference_data(_config(source, tmp_path / "out", tokenizer=str(tokenizer_dir), chat_template="auto"))
    assert caught.value.problems[0].code == "template_mismatch"
