"""SFT data: ``{"prompt", "response"}`` / ``{"messages"}`` records, prepared (``--format sft``) into the
preference layout with an empty rejected response and ``kind: "sft"``; the kind check trainers run."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from megatron_tgdpo.data.builtin import SYNTHETIC_DIR
from megatron_tgdpo.data.dataset import PreferenceDataset
from megatron_tgdpo.data.encode import encode_record, encode_sft_record
from megatron_tgdpo.data.errors import BadRecordsError, DataFormatError
from megatron_tgdpo.data.manifest import (FORMAT_VERSION, SFT_FORMAT_VERSION, dataset_kind, kind_problem,
                                          manifest_path, read_manifest)
from megatron_tgdpo.data.prepare import PrepareConfig, prepare_preference_data, sft_length_policy
from megatron_tgdpo.data.records import PROBLEM_CODES, Message, Problem, SFTRecord, parse_record, parse_sft_record
from megatron_tgdpo.data.tokenizer import load_tokenizer
from megatron_tgdpo.data.truncation import LengthPolicy

from suite import ROOT, side_by_side

SP_MODEL = SYNTHETIC_DIR / "tokenizer.model"
U = {"role": "user", "content": "sort: 3 1 ="}
A = {"role": "assistant", "content": " 1 3"}
S = {"role": "system", "content": "sort"}


def _parse(obj: object):
    return parse_sft_record(json.dumps(obj), source="f.jsonl", line=4)


def _write(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def _config(inputs, prefix, **overrides) -> PrepareConfig:
    settings = dict(inputs=tuple(str(p) for p in inputs), output_prefix=str(prefix), tokenizer=str(SP_MODEL),
                    chat_template="plain", max_seq_length=64, min_prompt_tokens=4, workers=1, kind="sft")
    settings.update(overrides)
    return PrepareConfig(**settings)


# ------------------------------------------------------------------------------------------ records


def test_prompt_response_forms():
    record = _parse({"prompt": "sort: 3 1 =", "response": " 1 3", "id": 7})
    assert record == SFTRecord((Message("user", "sort: 3 1 ="),), (Message("assistant", " 1 3"),))
    assert _parse({"prompt": "sort: 3 1 =", "completion": " 1 3"}) == record  # TRL's name
    assert _parse({"prompt": [U], "response": [A]}) == record


def test_messages_form_splits_at_the_final_assistant_run():
    record = _parse({"messages": [S, U, A]})
    assert record.prompt == (Message("system", "sort"), Message("user", "sort: 3 1 ="))
    assert record.response == (Message("assistant", " 1 3"),)
    # Earlier assistant turns are context: only the final run of assistant messages is the response.
    record = _parse({"messages": [U, A, U, A, A]})
    assert record.prompt == tuple(Message(**m) for m in (U, A, U)) and len(record.response) == 2


BAD = [
    ({"prompt": "x", "chosen": " 1", "rejected": " 2"}, "chosen", "wrong_format"),
    ({"prompt": "x"}, "response", "missing_field"),
    ({"response": " 1"}, "prompt", "missing_field"),
    ({"prompt": "x", "response": " 1", "completion": " 1"}, "response", "wrong_format"),
    ({"messages": [U, A], "prompt": "x"}, "messages", "wrong_format"),
    ({"prompt": "  ", "response": " 1"}, "prompt", "empty_prompt"),
    ({"prompt": "x", "response": ""}, "response", "empty_response"),
    ({"prompt": "x", "response": 3}, "response", "wrong_type"),
    ({"prompt": "x", "response": [U]}, "response[0].role", "response_last_role"),
    ({"messages": [U, A, U]}, "messages[2].role", "response_last_role"),
    ({"messages": [A]}, "messages", "empty_prompt"),
    ({"messages": [S, A]}, "messages[0].role", "prompt_last_role"),
    ({"messages": "hi"}, "messages", "wrong_type"),
    ({"messages": []}, "messages", "empty_list"),
    ({"prompt": "x\u0000", "response": " 1"}, "prompt", "nul_character"),
    ("[1, 2]", "<record>", "not_an_object"),
]


@pytest.mark.parametrize("obj,field,code", BAD)
def test_bad_sft_records_are_reported_precisely(obj, field, code):
    problem = parse_sft_record(obj if isinstance(obj, str) else json.dumps(obj), source="f.jsonl", line=4)
    assert isinstance(problem, Problem), problem
    assert (problem.field, problem.code) == (field, code), str(problem)
    assert str(problem).startswith(f"f.jsonl:4: {field}: ")
    assert code in PROBLEM_CODES


def test_preference_parser_points_sft_records_to_format_sft():
    problem = parse_record(json.dumps({"prompt": "x", "response": " 1"}), source="f.jsonl", line=2)
    assert problem.code == "wrong_format" and "--format sft" in str(problem)
    assert parse_sft_record("   \n", source="f", line=1) is None


def test_sft_ids_are_the_chosen_ids_of_the_same_pair():
    tokenizer = load_tokenizer(SP_MODEL, chat_template="plain")
    sft = encode_sft_record(_parse({"prompt": "sort: 3 1 =", "response": " 1 3"}), tokenizer)
    pair = encode_record(parse_record(json.dumps({"prompt": "sort: 3 1 =", "chosen": " 1 3", "rejected": " 3 1"}),
                                      source="x", line=1), tokenizer)
    assert (sft.prompt, sft.chosen, sft.rejected) == (pair.prompt, pair.chosen, [])


def test_sft_length_policy_is_the_chosen_side_of_a_pair():
    policy = LengthPolicy(max_seq_length=8, min_prompt_tokens=2)
    prompt, response = [1, 10, 11, 12, 13, 14], [20, 21, 22, 2]
    out = sft_length_policy(prompt, response, policy=policy, bos_id=1)
    assert (out.prompt, out.chosen, out.rejected, out.dropped) == ([1, 12, 13, 14], response, [], None)
    assert out.prompt_truncated and out.responses_truncated == 0
    # A response too long for any prompt is cut (the pair policy would drop the pair as identical after the cut).
    out = sft_length_policy(prompt, list(range(20, 30)), policy=policy, bos_id=1)
    assert out.dropped is None and out.responses_truncated == 1 and len(out.prompt) + len(out.chosen) == 8
    assert sft_length_policy(prompt, response, policy=LengthPolicy(max_seq_length=8, min_prompt_tokens=2,
                                                                   truncation="drop"), bos_id=1).dropped == "too_long"


# ------------------------------------------------------------------------------------------ prepare


def test_prepare_sft_layout_and_manifest(tmp_path):
    source = _write(tmp_path / "sft.jsonl", [{"prompt": "sort: 3 1 =", "response": " 1 3"}, "",
                                             {"messages": [U, {"role": "assistant", "content": " 1 3 3"}]}])
    prefix = tmp_path / "out" / "sft"
    manifest = prepare_preference_data(_config([source], prefix))
    assert manifest["kind"] == "sft" and manifest["format_version"] == SFT_FORMAT_VERSION
    assert manifest["num_pairs"] == 2 and manifest["records"]["blank_lines"] == 1
    assert manifest["layout"]["sequences"] == ["prompt", "response", "empty"]
    assert manifest["tokens"]["rejected"] == 0
    dataset = PreferenceDataset(prefix)
    tokenizer = load_tokenizer(SP_MODEL, chat_template="plain")
    assert tokenizer.decode(np.concatenate([dataset[0]["prompt"], dataset[0]["chosen"]])) == "<s>sort: 3 1 = 1 3</s>"
    assert dataset[1]["rejected"].size == 0 and dataset.lengths[:, 2].tolist() == [0, 0]
    assert dataset_kind(read_manifest(prefix)) == "sft"


def test_preference_sets_stay_version_1_and_say_their_kind(tmp_path):
    source = _write(tmp_path / "p.jsonl", [{"prompt": "sort: 3 1 =", "chosen": " 1 3", "rejected": " 3 1"}])
    manifest = prepare_preference_data(_config([source], tmp_path / "p", kind="preference"))
    assert manifest["format_version"] == FORMAT_VERSION == 1 and manifest["kind"] == "preference"
    # A version-1 manifest written before kinds existed reads as a preference set.
    path = manifest_path(tmp_path / "p")
    old = {k: v for k, v in json.loads(path.read_text()).items() if k != "kind"}
    path.write_text(json.dumps(old))
    assert dataset_kind(read_manifest(tmp_path / "p")) == "preference"
    path.write_text(json.dumps({**old, "kind": "rlhf"}))
    with pytest.raises(DataFormatError, match="kind 'rlhf'"):
        read_manifest(tmp_path / "p")


def test_prepare_sft_refuses_pairs_and_reports_every_bad_line(tmp_path):
    source = _write(tmp_path / "mixed.jsonl", [{"prompt": "sort: 3 1 =", "response": " 1 3"},
                                               {"prompt": "sort: 3 1 =", "chosen": " 1 3", "rejected": " 3 1"},
                                               {"messages": [U]}])
    with pytest.raises(BadRecordsError) as info:
        prepare_preference_data(_config([source], tmp_path / "out" / "x"))
    text = str(info.value)
    assert "mixed.jsonl:2: chosen: not an SFT field" in text and "mixed.jsonl:3: messages[0].role" in text
    assert not (tmp_path / "out").exists()
    manifest = prepare_preference_data(_config([source], tmp_path / "out" / "x", on_bad_record="skip"))
    assert manifest["num_pairs"] == 1 and manifest["records"]["bad_by_reason"] == {"response_last_role": 1,
                                                                                    "wrong_format": 1}


def test_output_is_identical_for_any_number_of_workers(tmp_path):
    lines = [{"prompt": f"sort: {i % 10} {(i * 7) % 10} =", "response": f" {i % 10}"} for i in range(40)]
    source = _write(tmp_path / "many.jsonl", lines)
    prepare_preference_data(_config([source], tmp_path / "one", workers=1, chunk_lines=7))
    prepare_preference_data(_config([source], tmp_path / "two", workers=2, chunk_lines=7))
    for ext in ("bin", "idx"):
        assert (tmp_path / f"one.{ext}").read_bytes() == (tmp_path / f"two.{ext}").read_bytes()


def test_cli_format_sft(tmp_path):
    source = _write(tmp_path / "sft.jsonl", [{"prompt": "sort: 3 1 =", "response": " 1 3"}])
    base = [sys.executable, str(ROOT / "tools" / "prepare_data.py"), "--input", str(source), "--tokenizer",
            str(SP_MODEL), "--chat-template", "plain", "--workers", "1", "--quiet", "--min-prompt-tokens", "4"]
    done, wrong = side_by_side(  # two independent processes: one on each core
        lambda: subprocess.run(base + ["--format", "sft", "--output-prefix", str(tmp_path / "s")],
                               capture_output=True, text=True),
        lambda: subprocess.run(base + ["--output-prefix", str(tmp_path / "p")], capture_output=True, text=True))
    assert done.returncode == 0, done.stderr
    assert json.loads(manifest_path(tmp_path / "s").read_text())["kind"] == "sft"
    assert wrong.returncode == 1 and "--format sft" in wrong.stderr


# ------------------------------------------------------------------------------------------ kinds


def test_kind_problem_lets_sft_train_on_anything_and_preference_losses_only_on_pairs():
    sft, pairs = {"kind": "sft"}, {"kind": "preference"}
    assert kind_problem(sft, loss_type="sft", prefix="d/s") is None
    assert kind_problem(pairs, loss_type="sft", prefix="d/p") is None
    assert kind_problem({}, loss_type="dpo", prefix="d/p") is None  # version 1 without a kind
    for loss in ("dpo", "tgdpo", "ipo", "simpo"):
        message = kind_problem(sft, loss_type=loss, prefix="d/s")
        assert message.startswith("--data-path d/s: an SFT data set") and f"--loss-type {loss} needs" in message
    assert kind_problem(sft, loss_type="dpo", prefix="d/e", flag="--eval-data-path").startswith("--eval-data-path")
