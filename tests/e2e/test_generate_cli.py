"""``tools/generate.py`` as users run it: prompt JSONL in, samples JSONL out; bad input refused up front.

The model is a tiny random Llama in Hugging Face layout (``convert.write_synthetic_hf``) with a
Llama-3-style tokenizer and chat template beside it, so the tool finds tokenizer, template and stop ids
on its own. Its vocabulary (448) is larger than the tokenizer's, as padded vocabularies are.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_tgdpo.testing import free_port

from suite import side_by_side

ROOT = Path(__file__).resolve().parents[2]
TOOL = ROOT / "tools" / "generate.py"
PROMPTS = [
    {"id": "a", "prompt": "What is the capital of France?", "task": "demo", "meta": {"k": [1, 2]}},
    {"id": "b", "prompt": [{"role": "system", "content": "You are a helpful assistant."},
                           {"role": "user", "content": "Sort 7 2 9 4"}]},
    {"id": "c", "prompt": "Hello there"},
    {"id": "d", "prompt": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                           {"role": "user", "content": "How are you doing today?"}]},
]
SAMPLING = ["--num-samples", "3", "--temperature", "1.0", "--top-p", "0.9", "--max-new-tokens", "6", "--seed", "5"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    from megatron_tgdpo.convert.synthetic import write_synthetic_hf
    from megatron_tgdpo.data.toy_tokenizers import write_llama3_style_tokenizer
    from megatron_tgdpo.models.llama import LlamaArch

    import torch

    out = tmp_path_factory.mktemp("gen_cli") / "model"
    arch = LlamaArch(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=128,
                     vocab_size=448, max_position_embeddings=128, rope_theta=10000.0)
    write_synthetic_hf(out, arch, dtype=torch.float32, seed=1)
    write_llama3_style_tokenizer(out)
    (out / "generation_config.json").write_text(json.dumps({"bos_token_id": 0, "eos_token_id": [4]}))
    return out


@pytest.fixture()
def prompt_file(tmp_path) -> Path:
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    return path


def _run(args: list[str], *, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout,
                          start_new_session=True)


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_samples_file_and_data_parallel_run_agree(model_dir, prompt_file, tmp_path):
    from megatron_tgdpo.tasks.samples import load_sample_records

    # One process, and two data-parallel ranks through torchrun with another micro-batch size: independent
    # commands, run side by side; they must write the same file.
    one, two = tmp_path / "one.jsonl", tmp_path / "two.jsonl"
    single, dp2 = side_by_side(
        lambda: _run([sys.executable, str(TOOL), "--load", str(model_dir), "--input", str(prompt_file),
                      "--output", str(one), "--micro-batch-size", "3", *SAMPLING]),
        lambda: _run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
                      f"--master-port={free_port()}", str(TOOL), "--load", str(model_dir), "--input",
                      str(prompt_file), "--output", str(two), "--micro-batch-size", "1", *SAMPLING]))
    assert single.returncode == 0, single.stderr[-3000:]
    assert "tokens/s" in single.stdout and f"wrote {one}" in single.stdout
    rows = _read(one)
    assert [r["id"] for r in rows] == [p["id"] for p in PROMPTS]
    for row, prompt in zip(rows, PROMPTS):
        assert {k: v for k, v in row.items() if k != "samples"} == prompt  # every input field passed through
        assert len(row["samples"]) == 3
        for sample in row["samples"]:
            assert set(sample) == {"text", "num_tokens", "finish_reason"}
            assert sample["finish_reason"] in ("eos", "length") and isinstance(sample["text"], str)
            # "length": all 6 tokens; "eos": the stop token (one of the 6) is not counted.
            assert sample["num_tokens"] == 6 if sample["finish_reason"] == "length" else sample["num_tokens"] <= 5
    assert len(load_sample_records(one)) == len(PROMPTS)  # the verifier/pair-building reader accepts it

    # The data-parallel run: the same file.
    assert dp2.returncode == 0, dp2.stderr[-3000:]
    assert "DP 2" in dp2.stdout
    assert two.read_text() == one.read_text()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary file left behind"


def test_prompts_are_rendered_as_the_data_tool_renders_them(model_dir):
    from megatron_tgdpo.data.encode import encode_record
    from megatron_tgdpo.data.records import Message, PreferenceRecord
    from megatron_tgdpo.data.tokenizer import load_tokenizer
    from megatron_tgdpo.generation.prompts import encode_prompt, stop_token_ids
    from megatron_tgdpo.data.records import parse_prompt  # the data tool's prompt parser

    reply = (Message("assistant", "fine"),)
    other = (Message("assistant", "bad"),)
    for template in ("auto", "llama3", "plain"):
        tokenizer = load_tokenizer(model_dir, chat_template=template)
        for p in PROMPTS:
            messages = parse_prompt(p["prompt"])
            want = encode_record(PreferenceRecord(messages, reply, other), tokenizer)
            assert encode_prompt(messages, tokenizer) == want.prompt, (template, p["id"])
            assert want.chosen[-1] in stop_token_ids(tokenizer)
    eot = load_tokenizer(model_dir).token_to_id("<|eot_id|>")
    assert eot in stop_token_ids(load_tokenizer(model_dir, chat_template="llama3"))


def _main(argv: list[str], capsys) -> tuple[int, str]:
    """The tool's ``main`` in this process (usage errors stop before any process group or model)."""
    import importlib.util

    tool = sys.modules.get("generate_tool")
    if tool is None:
        spec = importlib.util.spec_from_file_location("generate_tool", TOOL)
        tool = importlib.util.module_from_spec(spec)
        sys.modules["generate_tool"] = tool  # dataclasses look their module up there
        spec.loader.exec_module(tool)
    code = tool.main(argv)
    return code, capsys.readouterr().err


def test_bad_prompt_lines_are_all_reported(model_dir, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join([
        json.dumps({"id": "ok", "prompt": "fine"}),
        "not json",
        json.dumps({"id": 7, "prompt": "x"}),
        json.dumps({"id": "ok", "prompt": "again"}),
        json.dumps({"id": "e", "prompt": [{"role": "assistant", "content": "x"}]}),
        json.dumps({"id": "f"}),
        json.dumps({"id": "g", "prompt": "y", "samples": []}),
    ]) + "\n")
    out = tmp_path / "out.jsonl"
    code, err = _main(["--load", str(model_dir), "--input", str(bad), "--output", str(out)], capsys)
    assert code == 2
    for expected in (f"{bad}:2: <record>: invalid JSON", f"{bad}:3: id: expected a non-empty string",
                     f"{bad}:4: id: duplicate of line 1", f"{bad}:5: prompt[0].role: the prompt must end with a user",
                     f"{bad}:6: prompt: missing", f"{bad}:7: samples: reserved"):
        assert expected in err, (expected, err)
    assert not out.exists()


def test_flag_problems_are_reported_together_before_compute(model_dir, prompt_file, tmp_path, capsys):
    out = tmp_path / "out.jsonl"
    code, err = _main(["--load", str(model_dir), "--input", str(prompt_file), "--output", str(out),
                       "--num-samples", "0", "--top-p", "1.5", "--max-new-tokens", "120"], capsys)
    assert code == 2
    assert "--num-samples 0: must be >= 1" in err and "--top-p 1.5" in err
    # The longest prompt (id b) plus 120 new tokens does not fit the model's 128 positions.
    assert "--max-new-tokens 120: the longest prompt" in err and "id 'b'" in err and "128 positions" in err
    assert not out.exists()


def test_missing_checkpoint_exits_2_and_writes_nothing(prompt_file, tmp_path):
    out = tmp_path / "out.jsonl"
    result = _run([sys.executable, str(TOOL), "--load", str(tmp_path / "nowhere"), "--input", str(prompt_file),
                   "--output", str(out)])
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"--load {tmp_path / 'nowhere'}: no such checkpoint or model directory" in result.stderr
    assert not out.exists()
