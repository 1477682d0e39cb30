"""A user's path end to end: a Hugging Face Llama directory as --ref-load (converted on the fly, its
architecture taken from config.json, not the preset), DPO at TP=2, export of the trained torch_dist
checkpoint back to Hugging Face, and `transformers` reproducing the trained model's log-probs."""
from __future__ import annotations

import json

import torch
import transformers

from megatron_tgdpo.models.llama import LlamaArch
from megatron_tgdpo.testing import run_on_ranks, run_train

# Deliberately unlike the "tiny" preset: 2 layers, 8 heads over 4 KV groups, 96 wide, vocab 128.
ARCH = LlamaArch(num_layers=2, hidden_size=96, num_attention_heads=8, num_query_groups=4, ffn_hidden_size=160,
                 vocab_size=128, max_position_embeddings=256, rope_theta=10000.0)


def _megatron_logps(ckpt, tokens):
    """Log-probs of the trained checkpoint computed by our own stack at TP=1 (reference for the export)."""
    from megatron_tgdpo.models import llama
    from megatron_tgdpo.models.sources import ModelSource

    arch = ModelSource.of(ckpt).arch()
    chunks = llama.build_model(arch, llama.transformer_config(arch, llama.ParallelLayout()))
    ModelSource.of(ckpt).load_into(chunks)
    logits = chunks[0](tokens, torch.arange(tokens.shape[1]).expand_as(tokens), attention_mask=None).double()
    return torch.log_softmax(logits[:, :-1], -1).gather(-1, tokens[:, 1:, None])[..., 0], arch


def test_hf_in_train_tp2_export_to_hf(tmp_path):
    from megatron_tgdpo.convert import megatron_to_hf
    from megatron_tgdpo.convert.synthetic import write_synthetic_hf

    hf_in = write_synthetic_hf(tmp_path / "hf-in", ARCH, dtype=torch.float32, seed=3)
    ckpt = tmp_path / "ckpt"
    argv = ["--ref-load", str(hf_in), "--load", str(hf_in), "--loss-type", "dpo", "--train-iters", "3", "--micro-batch-size", "2",
            "--global-batch-size", "4", "--seq-length", "64", "--lr", "1e-2", "--tensor-model-parallel-size", "2",
            "--data-cache-dir", str(tmp_path / "data"), "--log-dir", str(tmp_path / "log"), "--eval-iters", "0",
            "--no-tensorboard", "--save", str(ckpt)]
    assert run_on_ranks(2, run_train, argv, model_parallel=False) == [0, 0]
    first = json.loads((tmp_path / "log" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["iteration"] == 1 and first["logratio/abs_max"] == 0.0  # policy (--load) == reference

    hf_out = tmp_path / "hf-out"
    megatron_to_hf(ckpt, hf_out)
    model = transformers.LlamaForCausalLM.from_pretrained(hf_out, torch_dtype=torch.float32,
                                                          attn_implementation="eager").eval()
    assert model.config.num_hidden_layers == 2 and model.config.hidden_size == 96
    tokens = torch.randint(0, ARCH.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hf_logps = torch.log_softmax(model(tokens).logits.double()[:, :-1], -1).gather(-1, tokens[:, 1:, None])[..., 0]
    ours, arch = run_on_ranks(1, _megatron_logps, ckpt, tokens)[0]
    assert arch == ARCH
    torch.testing.assert_close(hf_logps, ours, atol=1e-4, rtol=0)
    # Training moved the weights: the export is not just the input model.
    original = transformers.LlamaForCausalLM.from_pretrained(hf_in, torch_dtype=torch.float32,
                                                             attn_implementation="eager").eval()
    with torch.no_grad():
        before = torch.log_softmax(original(tokens).logits.double()[:, :-1], -1).gather(-1, tokens[:, 1:, None])[..., 0]
    assert (before - hf_logps).abs().max() > 1e-3
