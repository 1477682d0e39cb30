"""First training steps on SmolLM2 loaded from its GGUF file, against float64 references.

* DPO (``--load`` and ``--ref-load`` the GGUF file): the logged chosen / rejected sequence log-probs equal sums
  of transformers' float64 token log-probs over the response tokens (prompt ids from transformers'
  ``apply_chat_template``, response = the assistant turn through ``<|im_end|>``), and the loss is
  exactly -log sigmoid(0) = log 2, as the DPO formula gives for equal policy and reference.
* The same step at TP3 with ``--sequence-parallel`` and the default ``--pad-to-multiple-of 16``:
  rows are padded to a multiple of 48 automatically and the step equals the single-rank one.
* SFT: the first loss equals a float64 masked cross-entropy (per-token mean over the batch).
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_tgdpo.config import parse_args
from megatron_tgdpo.testing import run_on_ranks

ROOT = Path(__file__).resolve().parents[2]
PAIRS = [
    ("Reverse: cat dog bird", "bird dog cat", "cat dog bird"),
    ("What is 2 + 2?", "2 + 2 = 4.", "2 + 2 = 5."),
    ("Name a fruit.", "An apple.", "A hammer."),
    ("Sort: b a c", "a b c", "c b a"),
]


def _train(argv: list[str]) -> int:
    from megatron_tgdpo import train

    return train.run(parse_args(argv))


def _prepare(tmp: Path, gguf: Path, fmt: str) -> Path:
    rows = []
    for prompt, chosen, rejected in PAIRS:
        if fmt == "sft":
            rows.append({"prompt": prompt, "response": chosen})
        else:
            rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    src = tmp / f"{fmt}.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    prefix = tmp / fmt
    run = subprocess.run([sys.executable, str(ROOT / "tools" / "prepare_data.py"), "--input", str(src),
                          "--output-prefix", str(prefix), "--tokenizer", str(gguf), "--format", fmt,
                          "--workers", "1", "--quiet"], capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-2000:]
    return prefix


def _argv(tmp: Path, name: str, gguf: Path, data: Path, loss: str) -> list[str]:
    return ["--load", str(gguf), "--ref-load", str(gguf), "--data-path", str(data), "--loss-type", loss, "--train-iters", "1",
            "--micro-batch-size", "4", "--global-batch-size", "4", "--seq-length", "144", "--lr", "1e-6",
            "--seed", "3", "--log-dir", str(tmp / name), "--eval-iters", "0", "--no-tensorboard",
            "--no-pack-sequences"]


def _first_step(log_dir: Path) -> dict:
    return json.loads((log_dir / "metrics.jsonl").read_text().splitlines()[0])


def _response_logps(hf_model, hf_tokenizer, prompt: str, response: str) -> tuple[float, torch.Tensor]:
    """float64 sum of log p(response tokens) and the token log-probs; the response ends at <|im_end|>."""
    user = [{"role": "user", "content": prompt}]
    head = list(hf_tokenizer.apply_chat_template(user, add_generation_prompt=True, tokenize=True,
                                                 return_dict=True)["input_ids"])
    full = list(hf_tokenizer.apply_chat_template(user + [{"role": "assistant", "content": response}],
                                                 tokenize=True, return_dict=True)["input_ids"])
    assert full[: len(head)] == head
    end = full.index(hf_tokenizer.convert_tokens_to_ids("<|im_end|>"), len(head)) + 1
    ids = torch.tensor([full[:end]])
    with torch.no_grad():
        logits = hf_model(input_ids=ids).logits.double()
    token = torch.log_softmax(logits[0, :-1], dim=-1).gather(-1, ids[0, 1:, None]).squeeze(-1)
    response = token[len(head) - 1:]
    return response.sum().item(), response


@pytest.fixture(scope="module")
def float64_model(hf_model):
    import copy

    return copy.deepcopy(hf_model).double()


@pytest.fixture(scope="module")
def dpo_run(smollm2, tmp_path_factory):
    """One DPO step at TP1 from the GGUF file, saved: (workspace, prepared data, first-step metrics)."""
    tmp = tmp_path_factory.mktemp("dpo")
    data = _prepare(tmp, smollm2.gguf, "preference")
    single = _argv(tmp, "tp1", smollm2.gguf, data, "dpo") + ["--save", str(tmp / "save")]
    assert run_on_ranks(1, _train, single, model_parallel=False, timeout=900) == [0]
    return tmp, data, _first_step(tmp / "tp1")


def test_dpo_first_step_matches_float64_and_tp3_sequence_parallel_trains(smollm2, hf_tokenizer, float64_model,
                                                                          dpo_run):
    tmp_path, data, step = dpo_run
    chosen = [_response_logps(float64_model, hf_tokenizer, p, c)[0] for p, c, _ in PAIRS]
    rejected = [_response_logps(float64_model, hf_tokenizer, p, r)[0] for p, _, r in PAIRS]
    assert step["logps/chosen"] == pytest.approx(sum(chosen) / len(PAIRS), abs=2e-3)
    assert step["logps/rejected"] == pytest.approx(sum(rejected) / len(PAIRS), abs=2e-3)
    assert step["loss"] == pytest.approx(math.log(2.0), abs=1e-6)

    # TP3 + sequence parallelism with the default --pad-to-multiple-of 16 (rows become multiples of 48)
    sp = _argv(tmp_path, "tp3sp", smollm2.gguf, data, "dpo") + ["--tensor-model-parallel-size", "3",
                                                              "--sequence-parallel"]
    assert run_on_ranks(3, _train, sp, model_parallel=False, timeout=900) == [0, 0, 0]
    step_sp = _first_step(tmp_path / "tp3sp")
    for key in ("loss", "logps/chosen", "logps/rejected"):
        assert step_sp[key] == pytest.approx(step[key], abs=2e-4), key


def test_sft_first_loss_is_the_float64_masked_cross_entropy(smollm2, hf_tokenizer, float64_model, tmp_path):
    data = _prepare(tmp_path, smollm2.gguf, "sft")
    assert run_on_ranks(1, _train, _argv(tmp_path, "sft", smollm2.gguf, data, "sft"),
                        model_parallel=False, timeout=900) == [0]
    got = _first_step(tmp_path / "sft")["loss"]
    tokens = torch.cat([_response_logps(float64_model, hf_tokenizer, p, c)[1] for p, c, _ in PAIRS])
    want = -tokens.sum().item() / tokens.numel()
    assert got == pytest.approx(want, abs=1e-5)


def test_export_after_dpo_loads_in_transformers_tied_with_the_files_tokenizer(smollm2, dpo_run, tmp_path):
    """megatron-to-hf of the DPO checkpoint: config, generation config, tokenizer and template as the
    fetched directory's; transformers loads it tied with no missing or unexpected keys."""
    workspace, _, _ = dpo_run
    out = tmp_path / "export"
    run = subprocess.run([sys.executable, str(ROOT / "tools" / "convert_checkpoint.py"), "megatron-to-hf",
                          "--load", str(workspace / "save"), "--output", str(out)],
                         capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-2000:]
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / name).read_bytes() == (smollm2.hf_dir / name).read_bytes(), name
    exported, fetched = (json.loads((d / "config.json").read_text()) for d in (out, smollm2.hf_dir))
    assert {k: v for k, v in exported.items() if k not in ("torch_dtype", "dtype")} == \
        {k: v for k, v in fetched.items() if k not in ("torch_dtype", "dtype")}
    transformers = pytest.importorskip("transformers")
    model, info = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32,
                                                                    output_loading_info=True)
    assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied
    start = transformers.AutoModelForCausalLM.from_pretrained(smollm2.hf_dir, dtype=torch.float32)
    moved = max((a - b).abs().max().item() for a, b in zip(model.parameters(), start.parameters()))
    assert 0 < moved < 1e-4  # one step at lr 1e-6 away from the start model


def test_a_layout_the_model_cannot_split_is_named_once(smollm2, dpo_run):
    """TP2 cannot split SmolLM2's 9 heads: refused before compute, exit 2, the heads problem said once
    (the flag check and the model's layout check both find it)."""
    workspace, data, _ = dpo_run
    argv = _argv(workspace, "tp2", smollm2.gguf, data, "dpo") + ["--tensor-model-parallel-size", "2"]
    run = subprocess.run([sys.executable, "-m", "megatron_tgdpo.train", *argv],
                         capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert run.returncode == 2, run.stderr[-3000:]
    assert sum("heads" in line for line in run.stderr.splitlines()) == 1, run.stderr[-3000:]
    assert "Traceback" not in run.stderr, run.stderr[-3000:]
