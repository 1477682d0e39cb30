"""The fused LM head inside whole training steps: losses and grad norms equal the plain output layer's
(megatron's logits, then the vocab-parallel op) at TP=1, TP=4, TP=2+SP with CP=2, and PP=2 with tied
embeddings (megatron's last-stage copy of the embedding, its gradient all-reduced with the first stage)."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from megatron_tgdpo.testing import read_metrics, run_on_ranks, run_train

STEPS = 4


@pytest.fixture(scope="module")
def tied_model(tmp_path_factory):
    """A tiny Llama with tied embeddings as a Hugging Face directory (the reference and start model)."""
    from megatron_tgdpo.convert.synthetic import write_synthetic_hf
    from megatron_tgdpo.models import llama

    tmp = tmp_path_factory.mktemp("fused")
    arch = dataclasses.replace(llama.preset("tiny"), tie_word_embeddings=True)
    return tmp, write_synthetic_hf(tmp / "tied-hf", arch, dtype=torch.float32, seed=5)


LAYOUTS = {
    "tp1": (1, []),
    "tp4": (4, ["--tensor-model-parallel-size", "4"]),
    "tp2-sp-cp2": (4, ["--tensor-model-parallel-size", "2", "--sequence-parallel", "--context-parallel-size", "2"]),
    "pp2-tied": (2, ["--pipeline-model-parallel-size", "2"]),
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_fused_head_step_equals_plain_head(tied_model, layout):
    tmp, tied = tied_model
    world, flags = LAYOUTS[layout]
    common = ["--loss-type", "dpo", "--train-iters", str(STEPS), "--micro-batch-size", "2", "--global-batch-size", "8",
              "--seq-length", "64", "--no-pack-sequences", "--lr", "3e-3", "--seed", "2", "--data-cache-dir", str(tmp / "data"),
              "--eval-iters", "0", "--no-tensorboard", "--logits-chunk-size", "24", *flags]
    if layout == "pp2-tied":
        common += ["--ref-load", str(tied)]
    for head in ("fused", "plain"):
        extra = [] if head == "fused" else ["--no-fused-logprobs"]
        argv = common + extra + ["--log-dir", str(tmp / f"{layout}-{head}")]
        assert run_on_ranks(world, run_train, argv, model_parallel=False) == [0] * world
    fused, plain = read_metrics(tmp / f"{layout}-fused"), read_metrics(tmp / f"{layout}-plain")
    assert [r["iteration"] for r in fused] == list(range(1, STEPS + 1))
    for a, b in zip(fused, plain):
        for key in ("loss", "grad_norm", "rewards/margin"):
            assert abs(a[key] - b[key]) <= 1e-5 * max(1.0, abs(b[key])), f"{layout} it {a['iteration']} {key}: {a[key]} vs {b[key]}"
    assert abs(fused[-1]["loss"] - fused[0]["loss"]) > 1e-3  # the weights moved, so the gradients mattered
