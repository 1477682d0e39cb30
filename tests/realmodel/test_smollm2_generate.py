"""``tools/generate.py --load <SmolLM2 .gguf>`` at temperature 0 gives transformers' greedy tokens.

Reference: ``transformers.generate`` (greedy, fp32) on the dequantized Hugging Face directory, with
prompt ids from transformers' own ``apply_chat_template``. The tool finds the tokenizer, the chat
template and the stop id in the GGUF file itself.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
NEW_TOKENS = 8
# Five prompts, each for its own case: the answer ends at EOS within NEW_TOKENS (finish "eos"; the others
# end at "length"), the shortest and the longest prompt (rows of different lengths in one micro-batch), a
# byte-level token cut mid-character (the decoded text ends in U+FFFD), a newline in the answer.
PROMPTS = [
    "What is the capital of France?",
    "Name a color.",
    "Say hello in Spanish.",
    "Sort these numbers: 9 3 7 1",
    "Count from 1 to 5.",
]


def test_greedy_generation_from_the_gguf_equals_transformers(smollm2, hf_model, hf_tokenizer, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": str(i), "prompt": p}) + "\n" for i, p in enumerate(PROMPTS)))
    out = tmp_path / "samples.jsonl"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    run = subprocess.run([sys.executable, str(ROOT / "tools" / "generate.py"), "--load", str(smollm2.gguf),
                          "--input", str(prompts), "--output", str(out), "--temperature", "0",
                          "--max-new-tokens", str(NEW_TOKENS), "--micro-batch-size", str(len(PROMPTS))],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    for row, prompt in zip(rows, PROMPTS):
        ids = hf_tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                               tokenize=True, return_dict=True, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            full = hf_model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False,
                                     eos_token_id=hf_tokenizer.eos_token_id, pad_token_id=hf_tokenizer.pad_token_id)
        new = full[0, ids.shape[1]:].tolist()
        stopped = new[-1] == hf_tokenizer.eos_token_id
        sample = row["samples"][0]
        assert sample["finish_reason"] == ("eos" if stopped else "length"), (prompt, sample, new)
        kept = new[:-1] if stopped else new
        assert sample["num_tokens"] == len(kept), (prompt, sample, new)
        assert sample["text"] == hf_tokenizer.decode(kept), (prompt, sample["text"], hf_tokenizer.decode(kept))
