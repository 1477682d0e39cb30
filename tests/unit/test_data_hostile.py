"""Hostile input never crashes preparation: lone surrogates, NUL escapes, 100,000-deep nesting, huge
numbers, and a tokenizer or chat template that raises on one record are each reported as that record's
``file:line: field: reason`` while every good record is kept (skip) or nothing is written (error), for
sentencepiece and Hugging Face tokenizers, in-process and in worker processes, and through the CLI."""
from __future__ import annotations

import json
import pickle
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from megatron_tgdpo.data.builtin import SYNTHETIC_DIR
from megatron_tgdpo.data.dataset import PreferenceDataset
from megatron_tgdpo.data.encode import TokenizeError
from megatron_tgdpo.data.errors import BadRecordsError
from megatron_tgdpo.data.manifest import manifest_path
from megatron_tgdpo.data.prepare import PrepareConfig, prepare_preference_data
from megatron_tgdpo.data.records import MAX_JSON_DEPTH, PROBLEM_CODES, Problem, parse_record
from megatron_tgdpo.data.templates import TemplateRenderError
from megatron_tgdpo.data.tokenizer import HFTokenizer, SentencePieceTokenizer, load_tokenizer
from megatron_tgdpo.data.toy_tokenizers import write_llama3_style_tokenizer

from suite import ROOT, load_tool

SP_MODEL = SYNTHETIC_DIR / "tokenizer.model"
TRIGGER = "§"  # the injected tokenizers fail on text containing it
DEEP = "[" * 100_000 + "]" * 100_000


def _msg(role: str, content: str) -> dict:
    return {"role": role, "content": content}


def _rec(prompt: object = "sort: 2 1 =", chosen: object = " 1 2", rejected: object = " 2 1") -> dict:
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def _line(obj: dict) -> str:
    # ensure_ascii (the default) writes a lone surrogate as "\ud800" and NUL as "\u0000": valid JSON.
    return json.dumps(obj)


# (line, field, code): every hostile input, each in a different place of a record.
HOSTILE: list[tuple[str, str, str]] = [
    (_line(_rec("sort: 2 \ud800 1 =")), "prompt", "invalid_unicode"),
    (_line(_rec(chosen=" 1\udc00 2")), "chosen", "invalid_unicode"),
    (_line(_rec(rejected=" 2 1\udbff")), "rejected", "invalid_unicode"),
    (_line(_rec([_msg("system", "be brief"), _msg("user", "sort: \ud83d 2 1 =")])), "prompt[1].content", "invalid_unicode"),
    (_line(_rec([_msg("us\ud800er", "sort: 2 1 =")])), "prompt[0].role", "invalid_unicode"),
    (
        _line({"chosen": [_msg("user", "q"), _msg("assistant", "a\ude42")],
               "rejected": [_msg("user", "q"), _msg("assistant", "b")]}),
        "chosen[1].content",
        "invalid_unicode",
    ),
    (_line(_rec(rejected=[_msg("assistant", "2 \udfff 1")])), "rejected[0].content", "invalid_unicode"),
    (DEEP, "<record>", "too_deep"),
    ('{"meta": ' + DEEP + ', "prompt": "sort: 2 1 =", "chosen": " 1 2", "rejected": " 2 1"}', "<record>", "too_deep"),
    ('{"meta": ' + '{"a": ' * 100_000 + "1" + "}" * 100_000 + "}", "<record>", "too_deep"),
    (_line(_rec("sort: 2\u0000 1 =")), "prompt", "nul_character"),
    (_line(_rec(chosen=[_msg("assistant", "\u0000")])), "chosen[0].content", "nul_character"),
    (_line(_rec([_msg("user\u0000", "sort: 2 1 =")])), "prompt[0].role", "nul_character"),
    ('{"id": ' + "9" * 5000 + ', "prompt": "sort: 2 1 =", "chosen": " 1 2", "rejected": " 2 1"}', "<record>", "invalid_json"),
    (_line(_rec("sort: 3 1 =", chosen=f" 1 {TRIGGER} 3", rejected=" 3 1")), "chosen", "tokenizer_error"),
]
assert {code for _, _, code in HOSTILE} <= set(PROBLEM_CODES)

GOOD: list[dict] = [
    _rec("sort: 7 2 9 4 =", " 2 4 7 9", " 2 7 4 9"),
    _rec("sort: 5 3 =", " 3 5", " 5 3"),
    _rec([_msg("system", "sort"), _msg("user", "sort: 8 1 =")], [_msg("assistant", " 1 8")], [_msg("assistant", " 8 1")]),
    _rec("sort: 6 0 =", " 0 6", " 6 0"),
    # Written as the surrogate *pair* escape "\\ud83d\\ude42": one valid character, kept.
    _rec("sort: 4 2 = 🙂", " 2 4", " 4 2"),
]


def _write_mixed(path: Path) -> tuple[dict[int, tuple[str, str]], list[dict]]:
    """Hostile and good lines interleaved; returns {line: (field, code)} for the bad ones, and the good
    records in file order."""
    expected: dict[int, tuple[str, str]] = {}
    good: list[dict] = []
    lines: list[str] = []
    for i, (text, field, code) in enumerate(HOSTILE):
        if i % 3 == 0:
            record = GOOD[len(good) % len(GOOD)]
            lines.append(_line(record))
            good.append(record)
        lines.append(text)
        expected[len(lines)] = (field, code)
    lines.append(_line(GOOD[-1]))
    good.append(GOOD[-1])
    path.write_text("\n".join(lines) + "\n", encoding="ascii")  # every hostile character is an escape
    return expected, good


# ------------------------------------------------------------------------------------ tokenizers


def _write_fragile_tokenizer(directory: Path) -> Path:
    """A tokenizer.json whose vocabulary holds only the characters of GOOD and whose unknown token is not
    in it: the ``tokenizers`` library raises on any other character (TRIGGER), in any process."""
    from tokenizers import Tokenizer, models

    alphabet = sorted({ch for record in GOOD for ch in json.dumps(record, ensure_ascii=False)} | set("\n"))
    specials = ["<s>", "</s>"]
    vocab = {token: i for i, token in enumerate([*specials, *alphabet])}
    assert TRIGGER not in vocab
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tokenizer.add_special_tokens(specials)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    return directory


def _raise_on_trigger(monkeypatch, cls) -> None:
    """Inject a failure into the tokenizer class used in-process (workers=1)."""
    real = cls.encode

    def encode(self, text: str) -> list[int]:
        if TRIGGER in text:
            raise RuntimeError(f"injected failure on {text!r}")
        return real(self, text)

    monkeypatch.setattr(cls, "encode", encode)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    return write_llama3_style_tokenizer(tmp_path_factory.mktemp("llama3_tok"))


@pytest.fixture(scope="module")
def fragile_dir(tmp_path_factory) -> Path:
    return _write_fragile_tokenizer(tmp_path_factory.mktemp("fragile_tok"))


# name -> (tokenizer path fixture, chat template, workers, class to inject a failure into, or None when the
# tokenizer fails on TRIGGER by itself)
SETUPS = {
    "sentencepiece-plain": ("sp", "plain", 1, SentencePieceTokenizer),
    "huggingface-llama3": ("llama", "llama3", 1, HFTokenizer),
    "huggingface-fragile-2-workers": ("fragile", "plain", 2, None),
}


def _setup(name: str, request, monkeypatch) -> tuple[str, str, int]:
    which, template, workers, inject = SETUPS[name]
    path = {"sp": SP_MODEL, "llama": None, "fragile": None}[which]
    if path is None:
        path = request.getfixturevalue(f"{which}_dir")
    if inject is not None:
        _raise_on_trigger(monkeypatch, inject)
    return str(path), template, workers


def _config(source: Path, prefix: Path, tokenizer: str, template: str, workers: int, **overrides) -> PrepareConfig:
    settings = dict(
        inputs=(str(source),),
        output_prefix=str(prefix),
        tokenizer=tokenizer,
        chat_template=template,
        max_seq_length=128,
        min_prompt_tokens=4,
        workers=workers,
        chunk_lines=4,  # problems and good records spread over several chunks (and workers)
        max_errors_shown=100,
    )
    settings.update(overrides)
    return PrepareConfig(**settings)


def _messages(value: object, role: str) -> list[dict]:
    return [_msg(role, value)] if isinstance(value, str) else list(value)  # type: ignore[arg-type]


def _expected_ids(tokenizer, template: str, record: dict) -> tuple[list[int], list[int], list[int]]:
    """Ids of a good record, from the tokenizer's own encode and the templates' documented formats."""
    prompt = _messages(record["prompt"], "user")
    sides = [_messages(record[k], "assistant") for k in ("chosen", "rejected")]
    if template == "plain":
        prompt_ids = [tokenizer.bos_id, *tokenizer.encode("\n\n".join(m["content"] for m in prompt))]
        responses = [tokenizer.encode("\n\n".join(m["content"] for m in side)) + [tokenizer.eos_id] for side in sides]
    else:
        turns = "".join(
            f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content'].strip()}<|eot_id|>" for m in prompt
        )
        prompt_ids = tokenizer.encode(f"<|begin_of_text|>{turns}<|start_header_id|>assistant<|end_header_id|>\n\n")
        responses = [tokenizer.encode(side[0]["content"].strip() + "<|eot_id|>") for side in sides]
    return prompt_ids, responses[0], responses[1]


# ------------------------------------------------------------------------------------ record level


@pytest.mark.parametrize("case", range(len(HOSTILE) - 1))  # the last one fails only at tokenization
def test_each_hostile_record_is_one_precise_problem(case):
    text, field, code = HOSTILE[case]
    problem = parse_record(text.encode("ascii"), source="in.jsonl", line=7)
    assert isinstance(problem, Problem), problem
    assert (problem.field, problem.code) == (field, code), str(problem)
    line = str(problem)
    assert line.startswith(f"in.jsonl:7: {field}: ")
    line.encode("utf-8")  # printable: no lone surrogate survives into the report
    assert "\n" not in line and "\x00" not in line


def test_escapes_are_really_in_the_input():
    # Guard against the test data silently losing what makes it hostile.
    assert "\\ud800" in HOSTILE[0][0] and "\\u0000" in HOSTILE[10][0] and DEEP.count("[") == 100_000
    assert "\\ud83d\\ude42" in _line(GOOD[-1])


def test_nesting_limit_is_exact_and_counts_levels_not_brackets():
    def nested(levels: int) -> str:  # the record object is level 1
        return '{"meta": ' + "[" * (levels - 1) + "]" * (levels - 1) + ', "prompt": "p", "chosen": "a", "rejected": "b"}'

    assert not isinstance(parse_record(nested(MAX_JSON_DEPTH), source="f", line=1), Problem)
    assert parse_record(nested(MAX_JSON_DEPTH + 1), source="f", line=1).code == "too_deep"
    many_flat = json.dumps({**_rec(), "meta": [[] for _ in range(3 * MAX_JSON_DEPTH)], "text": "[" * 500})
    assert not isinstance(parse_record(many_flat, source="f", line=1), Problem)


def test_other_control_characters_and_pairs_are_kept_verbatim():
    record = parse_record(json.dumps(_rec("tab\there\x1b[0m \x0c 🙂\r\n")), source="f", line=1)
    assert record.prompt[0].content == "tab\there\x1b[0m \x0c 🙂\r\n"


def test_problem_lines_escape_what_cannot_be_printed():
    problem = Problem("in\udcff.jsonl", 3, "chosen", "tokenizer said 'a\ud800\nb\x00'", "tokenizer_error")
    assert str(problem) == "in\\udcff.jsonl:3: chosen: tokenizer said 'a\\ud800\\nb\\x00'"


def test_per_record_errors_survive_pickling_across_processes():
    for exc in (TemplateRenderError("<template>", "boom", "template_error"), TokenizeError("chosen", "bad")):
        clone = pickle.loads(pickle.dumps(exc))
        assert (type(clone), vars(clone)) == (type(exc), vars(exc))


# ------------------------------------------------------------------------------------ preparation


@pytest.mark.parametrize("setup", list(SETUPS))
def test_skip_mode_reports_every_bad_line_and_keeps_every_good_one(setup, request, monkeypatch, tmp_path):
    tokenizer_path, template, workers = _setup(setup, request, monkeypatch)
    source = tmp_path / "mixed.jsonl"
    expected, good = _write_mixed(source)
    prefix = tmp_path / "out" / "train"
    manifest = prepare_preference_data(
        _config(source, prefix, tokenizer_path, template, workers, on_bad_record="skip")
    )
    records = manifest["records"]
    assert records["bad"] == len(expected) and records["lines"] == len(expected) + len(good)
    assert records["bad_by_reason"] == dict(Counter(code for _, code in expected.values()))
    reported = {int(line.split(":")[1]): line for line in records["bad_examples"]}
    assert sorted(reported) == sorted(expected)
    for number, (field, _code) in expected.items():
        assert reported[number].startswith(f"{source}:{number}: {field}: ")
    assert "Unk token" in reported[max(expected)] or "injected failure" in reported[max(expected)]

    assert manifest["num_pairs"] == len(good)
    dataset = PreferenceDataset(prefix)
    tokenizer = load_tokenizer(tokenizer_path, chat_template=template)
    for i, record in enumerate(good):
        prompt, chosen, rejected = _expected_ids(tokenizer, template, record)
        item = dataset[i]
        assert (item["prompt"].tolist(), item["chosen"].tolist(), item["rejected"].tolist()) == (prompt, chosen, rejected)


@pytest.mark.parametrize("setup", list(SETUPS))
def test_error_mode_lists_every_bad_line_and_writes_nothing(setup, request, monkeypatch, tmp_path):
    tokenizer_path, template, workers = _setup(setup, request, monkeypatch)
    source = tmp_path / "mixed.jsonl"
    expected, _good = _write_mixed(source)
    out = tmp_path / "out"
    out.mkdir()  # an existing directory: it must be left empty (no staging directory either)
    with pytest.raises(BadRecordsError) as caught:
        prepare_preference_data(_config(source, out / "train", tokenizer_path, template, workers))
    problems = caught.value.problems
    assert [(p.line, p.field, p.code) for p in problems] == [(n, f, c) for n, (f, c) in sorted(expected.items())]
    message = str(caught.value)
    for number, (field, _code) in expected.items():
        assert f"\n  {source}:{number}: {field}: " in message
    assert "... and" not in message
    assert list(out.iterdir()) == []


def test_a_template_raising_anything_is_that_records_problem(tmp_path):
    # `str + int` raises TypeError inside Jinja, which is no jinja2.TemplateError.
    odd = (
        "{% for m in messages %}{% if 'boom' in m['content'] %}{{ m['content'] + 1 }}{% endif %}"
        "{{ m['content'] }}<|eot_id|>{% endfor %}"
    )
    tokenizer_dir = write_llama3_style_tokenizer(tmp_path / "tok", chat_template=odd)
    source = tmp_path / "in.jsonl"
    source.write_text("\n".join(_line(r) for r in [_rec(), _rec("boom"), _rec(chosen="boom")]) + "\n")
    manifest = prepare_preference_data(
        _config(source, tmp_path / "out" / "x", str(tokenizer_dir), "auto", 1, on_bad_record="skip")
    )
    assert manifest["num_pairs"] == 1
    assert manifest["records"]["bad_by_reason"] == {"template_error": 2}
    assert all("TypeError" in line for line in manifest["records"]["bad_examples"])


# ------------------------------------------------------------------------------------ CLI


def test_cli_error_mode_in_worker_processes_exits_1_without_traceback(fragile_dir, tmp_path):
    source = tmp_path / "mixed.jsonl"
    expected, _good = _write_mixed(source)
    prefix = tmp_path / "out" / "cli"
    run = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "prepare_data.py"), "--input", str(source), "--output-prefix",
         str(prefix), "--tokenizer", str(fragile_dir), "--chat-template", "plain", "--max-seq-length", "128",
         "--min-prompt-tokens", "4", "--workers", "2", "--max-errors-shown", "100"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert run.returncode == 1, run.stderr
    assert "Traceback" not in run.stderr
    lines = [line.strip() for line in run.stderr.splitlines()]
    for number, (field, _code) in expected.items():
        assert sum(line.startswith(f"{source}:{number}: {field}: ") for line in lines) == 1, run.stderr
    assert not prefix.parent.exists()


def test_cli_skip_mode_exits_0_and_prints_each_skipped_line(tmp_path, capsys):
    cli = load_tool("prepare_data")
    source = tmp_path / "mixed.jsonl"
    expected, good = _write_mixed(source)
    prefix = tmp_path / "out" / "cli"
    code = cli.main(
        ["--input", str(source), "--output-prefix", str(prefix), "--tokenizer", str(SP_MODEL), "--chat-template",
         "plain", "--max-seq-length", "128", "--min-prompt-tokens", "4", "--workers", "1", "--on-bad-record", "skip",
         "--max-errors-shown", "100"]
    )
    err = capsys.readouterr().err
    assert code == 0, err
    # Without an injected failure the trigger record is good for sentencepiece (§ is just an unknown piece).
    bad = {n: fc for n, fc in expected.items() if fc[1] != "tokenizer_error"}
    for number, (field, _code) in bad.items():
        assert f"  {source}:{number}: {field}: " in err
    assert json.loads(manifest_path(prefix).read_text())["num_pairs"] == len(good) + 1
