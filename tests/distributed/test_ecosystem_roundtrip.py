"""A Hugging Face model goes in and a complete, identical-behaving one comes out.

A tiny Llama chat model written by ``transformers`` itself (config.json, generation_config.json, a
tokenizer.json + tokenizer_config.json with a chat template) -> data prepared with its tokenizer -> DPO
at TP=2 -> ``tools/convert_checkpoint.py megatron-to-hf`` with no extra flags -> ``transformers`` loads
the model and the tokenizer, and everything but the trained weights is the source's: config.json,
tokenizer files, the rendered chat template, generation_config.json; the log-probs ``transformers``
computes with the export are ours. A moved or edited tokenizer stops the export with the remedy named.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

from megatron_tgdpo.config import parse_args
from megatron_tgdpo.testing import run_on_ranks

from suite import ROOT

SOURCE = "tiny-chat-llama"
# What training may change in config.json: only the dtype entry, and only when the weights are cast
# (--dtype at export, or a bf16 checkpoint of an fp32 model). Everything else is the source's.
CHANGED_BY_TRAINING = {"dtype", "torch_dtype"}
CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 12 + 30?"},
                {"role": "assistant", "content": "42"}]


def _write_source(directory: Path) -> Path:
    from megatron_tgdpo.data.toy_tokenizers import write_llama3_style_tokenizer

    write_llama3_style_tokenizer(directory, vocab_size=300)
    tok_config = json.loads((directory / "tokenizer_config.json").read_text())
    tok_config.update(tokenizer_class="PreTrainedTokenizerFast", model_max_length=256,
                      clean_up_tokenization_spaces=False)
    (directory / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2))
    config = transformers.LlamaConfig(
        vocab_size=320, hidden_size=96, intermediate_size=160, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=4, max_position_embeddings=256, bos_token_id=0, eos_token_id=4,
        tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():  # larger than the 0.02-std init, so log-probs are far from uniform
        for param in model.parameters():
            if param.dim() == 2:
                param.normal_(0.0, param.shape[-1] ** -0.5)
    model.generation_config = transformers.GenerationConfig(
        bos_token_id=0, eos_token_id=[4, 1], do_sample=True, temperature=0.6, top_p=0.9, max_new_tokens=32)
    model.save_pretrained(directory)
    return directory


def _write_pairs(path: Path, n: int = 48) -> Path:
    rng = random.Random(0)
    with open(path, "w") as fh:
        for _ in range(n):
            a, b = rng.randint(0, 99), rng.randint(0, 99)
            fh.write(json.dumps({
                "prompt": [{"role": "system", "content": "Be brief."},
                           {"role": "user", "content": f"What is {a} + {b}?"}],
                "chosen": [{"role": "assistant", "content": str(a + b)}],
                "rejected": [{"role": "assistant", "content": str(a + b + rng.randint(1, 9))}],
            }) + "\n")
    return path


def _train(argv):
    """One rank's run; returns (exit code, what it printed)."""
    from megatron_tgdpo import train

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = train.run(parse_args(argv))
    return code, out.getvalue()


def _megatron_logps(ckpt, tokens):
    """Log-probs of the trained checkpoint by our own stack at TP=1."""
    from megatron_tgdpo.models import llama
    from megatron_tgdpo.models.sources import ModelSource

    arch = ModelSource.of(ckpt).arch()
    chunks = llama.build_model(arch, llama.transformer_config(arch, llama.ParallelLayout()))
    ModelSource.of(ckpt).load_into(chunks)
    logits = chunks[0](tokens, torch.arange(tokens.shape[1]).expand_as(tokens), attention_mask=None).double()
    return torch.log_softmax(logits[:, :-1], -1).gather(-1, tokens[:, 1:, None])[..., 0]


def _hf_logps(model, tokens):
    with torch.no_grad():
        logits = model(tokens).logits.double()
    return torch.log_softmax(logits[:, :-1], -1).gather(-1, tokens[:, 1:, None])[..., 0]


def _export(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(ROOT / "tools" / "convert_checkpoint.py"), "megatron-to-hf", *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from megatron_tgdpo.data.prepare import PrepareConfig, prepare_preference_data

    tmp = tmp_path_factory.mktemp("ecosystem")
    source = _write_source(tmp / SOURCE)
    prefix = tmp / "data" / "pairs"
    prefix.parent.mkdir()
    prepare_preference_data(PrepareConfig(inputs=(str(_write_pairs(tmp / "pairs.jsonl")),), output_prefix=str(prefix),
                                          tokenizer=str(source), chat_template="auto", max_seq_length=64,
                                          min_prompt_tokens=4))
    ckpt = tmp / "ckpt"
    argv = ["--ref-load", str(source), "--data-path", str(prefix), "--loss-type", "dpo", "--train-iters", "2",
            "--micro-batch-size", "2", "--global-batch-size", "4", "--seq-length", "64", "--lr", "1e-2",
            "--tensor-model-parallel-size", "2", "--eval-iters", "0", "--no-tensorboard",
            "--log-dir", str(tmp / "log"), "--save", str(ckpt)]
    results = run_on_ranks(2, _train, argv, model_parallel=False)
    assert [code for code, _ in results] == [0, 0]
    exported = _export("--load", str(ckpt), "--output", str(tmp / "hf-out"))
    assert exported.returncode == 0, exported.stderr[-3000:]
    return {"tmp": tmp, "source": source, "ckpt": ckpt, "out": tmp / "hf-out", "console": results[0][1],
            "export_log": exported.stdout}


def test_startup_line_names_the_model_by_its_own_name(run):
    line = next(line for line in run["console"].splitlines() if line.startswith("megatron_tgdpo:"))
    assert f"model {SOURCE} (hf: {run['source']})" in line, line
    assert "iterations 1..2" in line, line
    meta = json.loads((run["ckpt"] / "iter_0000002" / "tgdpo_checkpoint.json").read_text())
    assert meta["model_name"] == SOURCE
    assert meta["hf_config"] == json.loads((run["source"] / "config.json").read_text())
    assert meta["origin"]["generation_config"] == json.loads((run["source"] / "generation_config.json").read_text())
    assert meta["origin"]["tokenizer"]["path"] == os.path.abspath(run["source"])


def test_export_is_the_source_model_with_trained_weights(run):
    source, out = run["source"], run["out"]
    # config.json: the source's, field for field (this run kept float32, so not even the dtype changed)
    src_config, out_config = (json.loads((d / "config.json").read_text()) for d in (source, out))
    assert {k: v for k, v in out_config.items() if k not in CHANGED_BY_TRAINING} == \
        {k: v for k, v in src_config.items() if k not in CHANGED_BY_TRAINING}
    assert out_config == src_config
    assert "config.json: that of" in run["export_log"] and "unchanged" in run["export_log"]
    # tokenizer files byte for byte, generation config equal
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (source / name).read_bytes(), name
    assert json.loads((out / "generation_config.json").read_text()) == \
        json.loads((source / "generation_config.json").read_text())
    assert transformers.GenerationConfig.from_pretrained(out).to_dict() == \
        transformers.GenerationConfig.from_pretrained(source).to_dict()

    # transformers loads both; the chat template renders identically, to the same ids
    src_tok, out_tok = transformers.AutoTokenizer.from_pretrained(source), transformers.AutoTokenizer.from_pretrained(out)
    for generation_prompt in (False, True):
        conversation = CONVERSATION if not generation_prompt else CONVERSATION[:-1]
        text = out_tok.apply_chat_template(conversation, tokenize=False, add_generation_prompt=generation_prompt)
        assert text == src_tok.apply_chat_template(conversation, tokenize=False,
                                                   add_generation_prompt=generation_prompt)
        assert text.startswith("<|begin_of_text|><|start_header_id|>system")
    assert (out_tok.bos_token_id, out_tok.eos_token_id) == (src_tok.bos_token_id, src_tok.eos_token_id)
    model = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    assert type(model).__name__ == "LlamaForCausalLM" and model.dtype == torch.float32

    # its log-probs are ours (a chat-rendered conversation and random ids), and training moved them
    ids = out_tok.apply_chat_template(CONVERSATION, tokenize=True, return_dict=True)["input_ids"]
    chat = torch.tensor([ids])
    noise = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    for tokens in (chat, noise):
        exported = _hf_logps(model, tokens)
        ours = run_on_ranks(1, _megatron_logps, run["ckpt"], tokens)[0]
        torch.testing.assert_close(exported, ours, atol=1e-4, rtol=0)
    original = transformers.AutoModelForCausalLM.from_pretrained(source, attn_implementation="eager").eval()
    assert (_hf_logps(original, chat) - _hf_logps(model, chat)).abs().max() > 1e-3


def test_a_cast_is_the_only_config_change_and_is_named(run):
    from megatron_tgdpo.convert import megatron_to_hf

    said = []
    megatron_to_hf(run["ckpt"], run["tmp"] / "hf-bf16", dtype="bfloat16", progress=said.append)
    assert any("changed: dtype float32 -> bfloat16" in line for line in said), said
    src_config = json.loads((run["source"] / "config.json").read_text())
    out_config = json.loads((run["tmp"] / "hf-bf16" / "config.json").read_text())
    assert {k for k in src_config.keys() | out_config.keys() if src_config.get(k) != out_config.get(k)} == {"dtype"}
    assert out_config["dtype"] == "bfloat16"


def test_a_moved_or_edited_tokenizer_stops_the_export_with_the_remedy(run):
    from megatron_tgdpo.convert import ConversionError, megatron_to_hf

    source, moved = run["source"], run["tmp"] / "moved-away"
    out = run["tmp"] / "hf-again"
    shutil.move(source, moved)
    try:
        result = _export("--load", str(run["ckpt"]), "--output", str(out))  # the CLI: status 2, the remedy named
        assert result.returncode == 2
        assert "has moved or been deleted" in result.stderr and "--tokenizer-dir" in result.stderr, result.stderr
        assert not out.exists()  # refused before writing anything
        megatron_to_hf(run["ckpt"], out, tokenizer_dir=moved)  # the remedy works
        assert (out / "tokenizer.json").read_bytes() == (moved / "tokenizer.json").read_bytes()
    finally:
        shutil.move(moved, source)
    config_file = source / "tokenizer_config.json"
    original = config_file.read_bytes()
    try:
        config_file.write_text(json.dumps(dict(json.loads(original), chat_template="{{ messages }}")))
        with pytest.raises(ConversionError, match="changed since training.*--tokenizer-dir"):
            megatron_to_hf(run["ckpt"], out, overwrite=True)
    finally:
        config_file.write_bytes(original)
