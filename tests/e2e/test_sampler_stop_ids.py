"""One stop rule for every sampler: the pipeline's sampling worker stops at an id that only the model
directory's ``generation_config.json`` declares, exactly where the generate command stops.

The model is a tiny random Llama in Hugging Face layout with a Llama-3-style tokenizer beside it. The
reference is ``transformers``: the same directory loaded as ``LlamaForCausalLM``, continued greedily one
token at a time (a full forward per step, argmax over the tokenizer's ids), cut at the first stop id.
The extra stop id is one that greedy decoding emits part way through a response and that neither the
tokenizer's EOS nor the chat template's end of turn is, so a sampler that ignores
``generation_config.json`` runs past it.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_tgdpo.testing import free_port

from suite import side_by_side

transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[2]
MAX_NEW = 10
PROMPTS = ["Sort 7 2 9 4", "What is the capital of France?", "Hello there", "Count to five", "Reverse 1 2 3",
           "Name a colour", "Add 3 and 4", "Tell me a story"]


def _greedy(model, prompt: list[int], *, stops: set[int], vocab_limit: int) -> tuple[list[int], float]:
    """Greedy continuation of ``prompt`` (cut after the first id in ``stops``) and the smallest
    top-1/top-2 logit gap met on the way (how far each choice is from a tie)."""
    ids, gap = list(prompt), float("inf")
    for _ in range(MAX_NEW):
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, -1, :vocab_limit].double()
        top = torch.topk(logits, 2).values
        gap = min(gap, float(top[0] - top[1]))
        ids.append(int(logits.argmax()))
        if ids[-1] in stops:
            break
    return ids[len(prompt):], gap


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    from megatron_tgdpo.convert.synthetic import write_synthetic_hf
    from megatron_tgdpo.data.tokenizer import load_tokenizer
    from megatron_tgdpo.data.toy_tokenizers import write_llama3_style_tokenizer
    from megatron_tgdpo.generation.prompts import encode_prompt, stop_token_ids
    from megatron_tgdpo.data.records import parse_prompt
    from megatron_tgdpo.models.llama import LlamaArch

    work = tmp_path_factory.mktemp("stop_ids")
    model_dir = work / "model"
    arch = LlamaArch(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=128,
                     vocab_size=448, max_position_embeddings=128, rope_theta=10000.0)
    write_synthetic_hf(model_dir, arch, dtype=torch.float32, seed=3)
    write_llama3_style_tokenizer(model_dir)
    tokenizer = load_tokenizer(model_dir)
    prompts = [encode_prompt(parse_prompt(p), tokenizer) for p in PROMPTS]
    model = transformers.LlamaForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32,
                                                          attn_implementation="eager").eval()
    own = set(stop_token_ids(tokenizer))
    free = [_greedy(model, p, stops=own, vocab_limit=tokenizer.vocab_size) for p in prompts]
    # The extra stop id: the most common token greedy emits after the first one of a response.
    later = [t for seq, _ in free for t in seq[1:] if t not in own]
    assert later, f"greedy responses too short to place a stop id in: {free}"
    extra = max(set(later), key=later.count)
    (model_dir / "generation_config.json").write_text(json.dumps({"bos_token_id": 0, "eos_token_id": [extra]}))
    stopped = [_greedy(model, p, stops=own | {extra}, vocab_limit=tokenizer.vocab_size) for p in prompts]
    inputs = work / "prompts.jsonl"
    inputs.write_text("".join(json.dumps({"id": f"p{i}", "prompt": p}) + "\n" for i, p in enumerate(PROMPTS)))
    return dict(work=work, model=model_dir, inputs=inputs, tokenizer=tokenizer, own=own, extra=extra,
                free=[seq for seq, _ in free], ref=[seq for seq, _ in stopped],
                gap=min(g for _, g in free + stopped))


def _run(args: list[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(free_port()))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS"):
        env.pop(key, None)
    return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
                          start_new_session=True)


def _samples(path: Path) -> list[dict]:
    return [json.loads(line)["samples"][0] for line in path.read_text().splitlines()]


def test_pipeline_sample_stage_stops_at_generation_config_eos_like_the_generate_command(setup):
    assert setup["gap"] > 1e-3, "a greedy choice is a near-tie; the reference cannot decide it"
    assert setup["extra"] not in setup["own"]
    # The extra id ends some response early: without it, greedy runs on past it.
    cut = [i for i, (free, ref) in enumerate(zip(setup["free"], setup["ref"])) if free != ref]
    assert cut and all(setup["ref"][i][-1] == setup["extra"] for i in cut), (setup["free"], setup["ref"])

    work = setup["work"]
    by_command = work / "generate.jsonl"
    by_worker = work / "worker.jsonl"
    jobs = work / "jobs.json"
    jobs.write_text(json.dumps([{"load": str(setup["model"]), "input": str(setup["inputs"]), "output": str(by_worker),
                                 "temperature": 0.0, "num_samples": 1, "max_new_tokens": MAX_NEW, "seed": 1}]))
    command, worker = side_by_side(  # independent processes: one on each core
        lambda: _run([sys.executable, str(ROOT / "tools" / "generate.py"), "--load", str(setup["model"]), "--input",
                      str(setup["inputs"]), "--output", str(by_command), "--temperature", "0", "--num-samples", "1",
                      "--max-new-tokens", str(MAX_NEW), "--micro-batch-size", "3"]),
        lambda: _run([sys.executable, "-m", "megatron_tgdpo.pipeline.sample", str(jobs)]))
    for result in (command, worker):
        assert result.returncode == 0, result.stderr[-3000:]

    tokenizer = setup["tokenizer"]
    stops = setup["own"] | {setup["extra"]}
    expected = []
    for ref in setup["ref"]:
        eos = ref[-1] in stops
        body = ref[:-1] if eos else ref
        expected.append({"text": tokenizer.decode(body), "num_tokens": len(body),
                         "finish_reason": "eos" if eos else "length"})
    assert _samples(by_worker) == expected
    assert _samples(by_command) == expected
