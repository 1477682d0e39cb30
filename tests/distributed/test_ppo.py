"""The PPO trainer (``python -m megatron_tgdpo.ppo``) end to end on tiny models through the shared loop:

* the rollout's token rewards are RTO's dense DPO reward ``beta * (log pi_dpo - log pi_ref)`` plus the
  verifier score at the last token minus the KL penalty, with every log-prob recomputed by a plain
  single-rank forward (full-vocabulary log-softmax), and the sampler's log-probs agree;
* two iterations at TP=2 with sequence parallelism, at PP=2 and at DP=2 with the distributed optimizer
  give the single-rank run's rollout, losses and metrics (within 1e-5);
* a DP=2 run stopped by SIGTERM and resumed from its checkpoint (actor, critic, both optimizers, the
  prompt stream) logs bit-identical metrics and held-out results.
"""
from __future__ import annotations

import dataclasses
import json
import os
import signal
from pathlib import Path

import pytest
import torch

from megatron_tgdpo.testing import read_metrics, run_on_ranks

BETA, KL_COEF, DENSE_SCALE = 0.1, 0.05, 2.0
# One mini-batch per epoch: each rank shuffles its own rollout rows, so with several mini-batches their
# composition depends on the data-parallel size; one mini-batch is the whole rollout at any size.
SINGLE = ["--ppo-mini-batches", "1"]
# Throughput and wall-clock figures differ between runs by nature; padding efficiency between layouts.
TIMING = ("time/", "rollout/tokens_per_s", "tokens_per_s", "real_tokens_per_s", "pairs_per_s", "tflops",
          "step_time_s", "mfu", "token_efficiency")


def _save_seeded_model(path: str, seed: int, data_dir: str) -> None:
    """A torch_dist checkpoint of the seeded tiny model sized to the built-in tokenizer (one rank)."""
    from megatron_tgdpo import checkpointing
    from megatron_tgdpo.config import TrainConfig
    from megatron_tgdpo.models.sources import ModelSource
    from megatron_tgdpo.runtime import setup

    cfg = TrainConfig(data_cache_dir=data_dir, seed=seed, train_iters=1)
    data = setup.resolve_data(cfg)
    arch, name = setup.resolve_architecture(cfg, tokenizer_vocab=data.vocab_size)
    chunks = setup.build_chunks(arch, cfg)
    ModelSource.of(None, seed=seed).load_into(chunks)
    checkpointing.save_checkpoint(path, iteration=1, parts={"policy": checkpointing.CheckpointPart(chunks)},
                                  state={"arch": dataclasses.asdict(arch), "model_name": name, "config": cfg.to_dict()})


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from megatron_tgdpo.tasks import get_task, make_prompts, write_jsonl_atomic

    root = tmp_path_factory.mktemp("ppo_assets")
    data = str(root / "data")
    run_on_ranks(1, _save_seeded_model, str(root / "dpo"), 12, data)
    write_jsonl_atomic(root / "prompts.jsonl", make_prompts(get_task("addition"), num=24, seed=3))
    write_jsonl_atomic(root / "heldout.jsonl", make_prompts(get_task("addition"), num=6, seed=4))
    return root


def _argv(assets: Path, log_dir: Path, *extra: str, iters: int = 2) -> list[str]:
    return ["--prompts", str(assets / "prompts.jsonl"), "--reward", "dense-dpo+sparse",
            "--reward-model-load", str(assets / "dpo"),  # reference, actor and critic: the seeded init of --seed
            "--data-cache-dir", str(assets / "data"), "--beta", str(BETA), "--kl-coef", str(KL_COEF),
            "--dense-reward-scale", str(DENSE_SCALE), "--dense-reward-clip", "0",  # the unclipped reward is checked
            "--global-batch-size", "4", "--samples-per-prompt", "2",
            "--micro-batch-size", "2", "--ppo-epochs", "2", "--seq-length", "32",
            "--max-new-tokens", "6", "--train-iters", str(iters), "--lr", "1e-3", "--critic-lr", "2e-4",
            "--value-head-init-std", "0.02", "--seed", "5", "--log-dir", str(log_dir), "--no-tensorboard", *extra]


def _algorithm(argv, stop_at=None, capture=False):
    import torch.distributed as dist

    from megatron_tgdpo.algorithms.ppo.algorithm import PPOAlgorithm
    from megatron_tgdpo.ppo.cli import parse

    _, cfg = parse(argv)  # cfg.ppo: the PPO section

    class Instrumented(PPOAlgorithm):
        captured = None

        def train_step(self, batches):
            result = super().train_step(batches)
            if capture and self.iteration == 1 and self.last_rollout.tensors:
                r = self.last_rollout
                type(self).captured = {"rows": {k: v.cpu() for k, v in r.rows.items()},
                                       "tensors": {k: v.cpu() for k, v in r.tensors.items()},
                                       "responses": r.responses, "finish": r.finish, "records": r.records,
                                       "sampler_logps": r.sampler_logps, "prompts": r.prompts}
            if self.iteration == stop_at and dist.get_rank() == 0:
                os.kill(os.getpid(), signal.SIGTERM)  # a preemption
            return result

    return cfg, Instrumented


def _train(argv, stop_at=None):
    from megatron_tgdpo.runtime import loop

    cfg, cls = _algorithm(argv, stop_at)
    return loop.run(cfg, cls)


def _train_and_recompute(argv, dpo_path):
    """One rank: train, keep iteration 1's rollout, then score it again with plain forwards."""
    from megatron_tgdpo.models import llama
    from megatron_tgdpo.models.sources import ModelSource
    from megatron_tgdpo.runtime import loop

    cfg, cls = _algorithm(argv, capture=True)
    assert loop.run(cfg, cls) == 0
    got = cls.captured
    rows = got["rows"]
    plain = {}
    arch = ModelSource.of(dpo_path).arch()
    for role, source in (("ref", ModelSource.of(None, seed=cfg.seed)), ("dpo", ModelSource.of(dpo_path))):
        (model,) = llama.build_model(arch, llama.transformer_config(arch, llama.ParallelLayout()))
        source.load_into([model])
        model.eval()
        with torch.no_grad():
            logits = model(rows["input_ids"], rows["position_ids"], attention_mask=None).double()
        logps = torch.log_softmax(logits, dim=-1).gather(-1, rows["labels"].unsqueeze(-1)).squeeze(-1)
        plain[role] = logps * rows["loss_mask"].double()
    got["plain"] = plain
    return got


def _critic_head(ckpt: str, data_dir: str, seed: int):
    """A critic built with a PPO checkpoint as --critic-load (one rank): its value head."""
    from megatron_tgdpo.algorithms.ppo.critic import build_critic
    from megatron_tgdpo.config import TrainConfig
    from megatron_tgdpo.models.state_dict import unwrap
    from megatron_tgdpo.models.value_head import attach_value_head
    from megatron_tgdpo.runtime import setup

    cfg = TrainConfig(data_cache_dir=data_dir, train_iters=1)
    data = setup.resolve_data(cfg)
    arch, _ = setup.resolve_architecture(cfg, tokenizer_vocab=data.vocab_size)
    part = build_critic(arch, cfg, load=ckpt, lr=1e-3, train_iters=1, head_init_std=0.0, seed=0)
    (fresh,) = setup.build_chunks(arch, cfg)
    attach_value_head(fresh, init_std=0.02, seed=seed)  # what the PPO run's head started as
    return unwrap(part.chunks[-1]).value_head.weight.detach().clone(), fresh.value_head.weight.detach().clone()


def _metrics(log_dir: Path) -> dict[int, dict]:
    return {r["iteration"]: {k: v for k, v in r.items() if not k.startswith(TIMING)} for r in read_metrics(log_dir)}


@pytest.fixture(scope="module")
def single_rank(assets, tmp_path_factory):
    log = tmp_path_factory.mktemp("ppo_single")
    (got,) = run_on_ranks(1, _train_and_recompute, _argv(assets, log, *SINGLE), str(assets / "dpo"),
                          model_parallel=False)
    return got, _metrics(log)


def test_token_rewards_are_dense_dpo_plus_sparse_minus_kl_from_plain_forwards(single_rank):
    from megatron_tgdpo.tasks import get_task

    got, _ = single_rank
    mask = got["rows"]["loss_mask"].double()
    t = {k: v.double() for k, v in got["tensors"].items()}
    ref, dpo = got["plain"]["ref"], got["plain"]["dpo"]
    assert torch.allclose(t["ref_logps"], ref, atol=1e-5)
    assert torch.allclose(t["dpo_logps"], dpo, atol=1e-5)
    assert torch.allclose(t["old_logps"], ref, atol=1e-5)  # iteration 1: the actor is the reference
    # the sampler's log-probs (cached decode) are the trainer's
    for i, (prompt, logps) in enumerate(zip(got["prompts"], got["sampler_logps"])):
        start = len(prompt) - 1
        assert torch.allclose(torch.tensor(logps, dtype=torch.float64), t["old_logps"][i, start:start + len(logps)],
                              atol=1e-5)
    dense = DENSE_SCALE * BETA * (dpo - ref)
    kl = t["old_logps"] - ref
    from megatron_tgdpo.data.builtin import SYNTHETIC_DIR
    from megatron_tgdpo.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(SYNTHETIC_DIR / "tokenizer.model", chat_template="plain")
    sparse = torch.zeros_like(mask)
    for i, (tokens, finish, record) in enumerate(zip(got["responses"], got["finish"], got["records"])):
        text = tokenizer.decode(tokens[:-1] if finish == "eos" else tokens)
        last = int(mask[i].nonzero().max())
        sparse[i, last] = get_task(record["task"]).score(text, record["answer"])
    want = (dense - KL_COEF * kl) * mask + sparse
    assert (dense.abs() > 1e-3).any()  # the two models differ: the dense reward is not trivially zero
    assert torch.allclose(t["rewards"], want, atol=1e-5)
    # the returns of the first token add up the rewards of the whole response (gamma 1) minus nothing:
    # returns = advantages(before whitening) + values, checked in the unit tests; here: masked and finite
    assert torch.isfinite(t["returns"]).all() and (t["returns"][mask == 0] == 0).all()


def test_metrics_are_recorded(single_rank):
    _, metrics = single_rank
    assert sorted(metrics) == [1, 2]
    first = metrics[1]
    for key in ("reward/total", "reward/dense", "reward/sparse", "kl", "entropy", "ppo/clip_fraction",
                "ppo/value_loss", "ppo/explained_variance", "response_length", "ppo/policy_loss", "score"):
        assert key in first and first[key] == first[key], key
    assert first["rollout/samples"] == 8 and metrics[2]["rollout/samples"] == 16
    assert first["kl"] == 0.0  # the actor starts as the reference
    assert first["rollout/logprob_gap"] < 1e-4


@pytest.mark.parametrize("layout", [["--tensor-model-parallel-size", "2", "--sequence-parallel"],
                                    ["--pipeline-model-parallel-size", "2"],
                                    ["--use-distributed-optimizer"]], ids=["tp2-sp", "pp2", "dp2-distopt"])
def test_ppo_at_tp2_pp2_and_dp2_equals_one_rank(single_rank, assets, tmp_path, layout):
    _, want = single_rank
    assert run_on_ranks(2, _train, _argv(assets, tmp_path / "log", *SINGLE, *layout), model_parallel=False) == [0, 0]
    got = _metrics(tmp_path / "log")
    assert sorted(got) == sorted(want)
    for it in want:
        assert sorted(got[it]) == sorted(want[it])
        for key, value in want[it].items():
            assert got[it][key] == pytest.approx(value, abs=1e-5, rel=1e-5), f"iteration {it}: {key}"


@pytest.mark.parametrize("layout", [[], ["--use-distributed-optimizer"]], ids=["dp2", "dp2-distopt"])
def test_kill_and_resume_is_bit_identical(assets, tmp_path, layout):
    from megatron_tgdpo.runtime.signals import EXIT_REQUEUE

    layout = [*layout, "--ppo-mini-batches", "2", "--eval-prompts", str(assets / "heldout.jsonl"), "--eval-iters",
              "1", "--eval-interval", "2"]
    ckpt = tmp_path / "ckpt"
    full, first, second = tmp_path / "full", tmp_path / "first", tmp_path / "second"
    stopped = run_on_ranks(2, _train, _argv(assets, first, *layout, "--save", str(ckpt), iters=3), 2,
                           model_parallel=False)
    assert stopped == [EXIT_REQUEUE] * 2
    meta = json.loads((ckpt / "iter_0000002" / "tgdpo_checkpoint.json").read_text())
    assert meta["parts"] == ["critic", "policy"] and meta["consumed_samples"] == 8
    assert run_on_ranks(2, _train, _argv(assets, second, *layout, "--save", str(ckpt), "--load", str(ckpt), iters=3),
                        model_parallel=False) == [0, 0]
    assert run_on_ranks(2, _train, _argv(assets, full, *layout, iters=3), model_parallel=False) == [0, 0]
    want, a, b = _metrics(full), _metrics(first), _metrics(second)
    assert sorted(a) == [1, 2] and sorted(b) == [3]
    for it in range(1, 4):
        got = a[it] if it <= 2 else b[it]
        assert got == want[it], f"iteration {it}: {got} != uninterrupted {want[it]}"
    heldout = [json.loads(line) for line in (full / "heldout.jsonl").read_text().splitlines()]
    resumed = [json.loads(line) for d in (first, second) for line in (d / "heldout.jsonl").read_text().splitlines()]
    assert [h["iteration"] for h in heldout] == [0, 2, 3]
    assert resumed == heldout
    # the checkpoint as --critic-load: the critic's part, value head included (not a zero head)
    ((loaded, initial),) = run_on_ranks(1, _critic_head, str(ckpt), str(assets / "data"), 5)
    assert loaded.abs().sum() > 0 and not torch.equal(loaded, initial)
