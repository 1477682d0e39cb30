"""PPO with a learned sequence reward (``--learned-reward-load``): the rollout's sparse reward is the
reward model's score at each response's last token, normalised and clipped, and the critic starts as
the reward model with its head rescaled to the normalised score — both checked against a plain
single-rank forward of the saved reward model (hidden states times the saved head)."""
from __future__ import annotations

import dataclasses
import os

import pytest
import torch

from megatron_tgdpo.testing import run_on_ranks

MEAN, STD, CLIP = 0.05, 0.08, 1.5


def _save_reward_model(path: str, seed: int, data_dir: str) -> None:
    """A torch_dist ``--loss-type rm`` checkpoint: the seeded tiny model with a seeded head and a bias."""
    from megatron_tgdpo import checkpointing
    from megatron_tgdpo.config import TrainConfig
    from megatron_tgdpo.models.sources import ModelSource
    from megatron_tgdpo.models.value_head import attach_value_head
    from megatron_tgdpo.runtime import setup

    cfg = TrainConfig(data_cache_dir=data_dir, seed=seed, train_iters=1, loss_type="rm")
    data = setup.resolve_data(cfg)
    arch, name = setup.resolve_architecture(cfg, tokenizer_vocab=data.vocab_size)
    (chunk,) = setup.build_chunks(arch, cfg)
    ModelSource.of(None, seed=seed).load_into([chunk])
    attach_value_head(chunk, init_std=0.05, seed=seed)
    with torch.no_grad():
        chunk.value_head.bias.fill_(0.03)
    checkpointing.save_checkpoint(path, iteration=1, parts={"policy": checkpointing.CheckpointPart([chunk])},
                                  state={"arch": dataclasses.asdict(arch), "model_name": name, "config": cfg.to_dict()})


def _train_and_recompute(argv: list[str], rm_path: str) -> dict:
    from megatron_tgdpo.algorithms.ppo.algorithm import PPOAlgorithm
    from megatron_tgdpo.checkpointing import load_model_weights
    from megatron_tgdpo.models import llama
    from megatron_tgdpo.models.fused_head import enable_fused_head
    from megatron_tgdpo.models.sources import ModelSource
    from megatron_tgdpo.ppo.cli import parse
    from megatron_tgdpo.runtime import loop

    _, cfg = parse(argv)
    captured = {}

    class Instrumented(PPOAlgorithm):
        def train_step(self, batches):
            result = super().train_step(batches)
            if self.iteration == 1:
                r = self.last_rollout
                captured.update(rows={k: v.cpu() for k, v in r.rows.items()},
                                tensors={k: v.cpu() for k, v in r.tensors.items()})
            return result

    assert loop.run(cfg, Instrumented) == 0
    arch = ModelSource.of(rm_path).arch()
    (model,) = llama.build_model(arch, llama.transformer_config(arch, llama.ParallelLayout()))
    load_model_weights(rm_path, [model])  # the backbone's weights (the head is read below)
    head = torch.load(os.path.join(os.path.dirname(rm_path), "head.pt"))
    enable_fused_head(model)
    model.eval()
    rows = captured["rows"]
    with torch.no_grad():
        hidden = model(rows["input_ids"], rows["position_ids"], attention_mask=None).double()
    captured["plain_values"] = hidden @ head["weight"].double().T.squeeze(-1) + head["bias"].double()
    return captured


def _head_of(path: str, data_dir: str) -> dict:
    from megatron_tgdpo.algorithms.reward_model import build_reward_model
    from megatron_tgdpo.config import TrainConfig
    from megatron_tgdpo.runtime import setup

    cfg = TrainConfig(data_cache_dir=data_dir, train_iters=1)
    data = setup.resolve_data(cfg)
    arch, _ = setup.resolve_architecture(cfg, tokenizer_vocab=data.vocab_size)
    (chunk,) = build_reward_model(arch, cfg, load=path, seed=99)  # another seed: the head must come from the file
    return {k: v.detach().clone() for k, v in chunk.value_head.state_dict().items()}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from megatron_tgdpo.tasks import get_task, make_prompts, write_jsonl_atomic

    root = tmp_path_factory.mktemp("ppo_learned")
    data = str(root / "data")
    run_on_ranks(1, _save_reward_model, str(root / "rm" / "ckpt"), 12, data)
    (head,) = run_on_ranks(1, _head_of, str(root / "rm" / "ckpt"), data)
    torch.save(head, root / "rm" / "head.pt")
    write_jsonl_atomic(root / "prompts.jsonl", make_prompts(get_task("addition"), num=8, seed=3))
    argv = ["--prompts", str(root / "prompts.jsonl"), "--reward", "sparse", "--learned-reward-load",
            str(root / "rm" / "ckpt"), "--learned-reward-mean", str(MEAN), "--learned-reward-std", str(STD),
            "--learned-reward-clip", str(CLIP), "--data-cache-dir", data, "--global-batch-size", "4",
            "--samples-per-prompt", "2", "--micro-batch-size", "2", "--ppo-epochs", "1", "--seq-length", "32",
            "--max-new-tokens", "6", "--train-iters", "1", "--lr", "1e-3", "--seed", "5", "--log-dir",
            str(root / "log"), "--no-tensorboard"]
    (got,) = run_on_ranks(1, _train_and_recompute, argv, str(root / "rm" / "ckpt"), model_parallel=False,
                          timeout=600)
    return got, head


def test_sparse_reward_is_the_normalised_clipped_reward_model_score(run):
    got, head = run
    assert head["bias"].item() == pytest.approx(0.03)  # the saved head, not a fresh one
    mask = got["rows"]["loss_mask"].double()
    plain = got["plain_values"]
    want = torch.zeros_like(mask)
    raw = []
    for i in range(mask.shape[0]):
        last = int(mask[i].nonzero().max())
        score = plain[i, last + 1].item()  # the input position of the final response token
        raw.append(score)
        want[i, last] = min(max((score - MEAN) / STD, -CLIP), CLIP)
    normalised = [(s - MEAN) / STD for s in raw]
    assert any(abs(n) > CLIP for n in normalised) and any(abs(n) < CLIP for n in normalised)  # both sides
    # iteration 1: the actor is the reference, so the KL penalty is 0 and the reward is the sparse one
    assert torch.allclose(got["tensors"]["rewards"].double(), want, atol=1e-5)


def test_critic_starts_as_the_normalised_reward_model(run):
    got, _ = run
    mask = got["rows"]["loss_mask"].double()
    want = (got["plain_values"] - MEAN) / STD * mask
    assert torch.allclose(got["tensors"]["values"].double(), want, atol=1e-4)
