"""The runtime takes any algorithm: a toy one (token cross-entropy on the chosen rows of the preference
batches, written here against the public interface only) trains, checkpoints, stops on SIGTERM and
resumes bit-identically at TP=2 and PP=2 — the proof that SFT and PPO trainers fit the same loop."""
from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch

from megatron_tgdpo.config import parse_args
from megatron_tgdpo.testing import read_metrics, run_on_ranks

STEPS = 6


def _toy_algorithm():
    from megatron_tgdpo.checkpointing import POLICY
    from megatron_tgdpo.runtime import setup
    from megatron_tgdpo.runtime.algorithm import Algorithm, StepResult, optimizer_step
    from megatron_tgdpo.runtime.metrics import StepMetrics
    from megatron_tgdpo.runtime.schedule import run_schedule

    class ChosenRowsCrossEntropy(Algorithm):
        name = "toy: cross-entropy on chosen rows"
        means = ("loss",)
        stop_at = None  # iteration at which rank 0 sends itself SIGTERM (a preemption)

        def build(self):
            chunks = setup.build_chunks(self.ctx.arch, self.cfg)
            setup.policy_start(self.cfg).load_into(chunks)
            self.policy = setup.wrap_trained(self.cfg, chunks, train_iters=self.ctx.train_iters)
            self.calls = 0

        def parts(self):
            return {POLICY: self.policy}

        def train_step(self, batches):
            metrics = StepMetrics()

            def loss_fn(index, batch, logps):
                mask = batch["loss_mask"].clone()
                mask[batch.num_pairs:] = 0  # rows [chosen; rejected]: keep the chosen ones
                nll = -(logps * mask).sum()
                tokens = mask.sum()
                metrics.add({"loss": (nll.detach(), tokens)}, cp_local=True)
                return nll, tokens.to(torch.int), None

            for chunk in self.policy.chunks:
                chunk.train()
                chunk.zero_grad_buffer()
            self.policy.optimizer.zero_grad()
            run_schedule(self.policy.chunks, batches, loss_fn, forward_only=False)
            updated, grad_norm = optimizer_step(self.policy, metrics)
            self.calls += 1
            if self.calls == type(self).stop_at and torch.distributed.get_rank() == 0:
                os.kill(os.getpid(), signal.SIGTERM)
            return StepResult(metrics=metrics, grad_norm=grad_norm, updated=updated)

    return ChosenRowsCrossEntropy


def _run(argv, stop_at=None):
    from megatron_tgdpo.runtime import loop

    algorithm = _toy_algorithm()
    algorithm.stop_at = stop_at
    return loop.run(parse_args(argv), algorithm)


def _argv(tmp: Path, name: str, layout: list[str], *extra: str) -> list[str]:
    return ["--model", "tiny", "--loss-type", "dpo", "--train-iters", str(STEPS), "--micro-batch-size", "2",
            "--global-batch-size", "8", "--seq-length", "64", "--no-pack-sequences", "--lr", "3e-3", "--seed", "7",
            "--data-cache-dir", str(tmp / "data"), "--log-dir", str(tmp / name), "--eval-iters", "0",
            "--no-tensorboard", *layout, *extra]


def _losses(log_dir: Path) -> dict[int, float]:
    return {r["iteration"]: r["loss"] for r in read_metrics(log_dir)}


@pytest.mark.parametrize("layout", [["--tensor-model-parallel-size", "2"], ["--pipeline-model-parallel-size", "2"]],
                         ids=["tp2", "pp2"])
def test_toy_algorithm_trains_checkpoints_and_resumes_bit_identically(tmp_path, layout):
    from megatron_tgdpo.runtime.signals import EXIT_REQUEUE

    assert run_on_ranks(2, _run, _argv(tmp_path, "full", layout), model_parallel=False) == [0, 0]
    full = _losses(tmp_path / "full")
    assert sorted(full) == list(range(1, STEPS + 1))
    assert full[STEPS] < full[1] - 0.05, full  # it learns

    ckpt = tmp_path / "ckpt"
    stopped = run_on_ranks(2, _run, _argv(tmp_path, "first", layout, "--save", str(ckpt)), 3, model_parallel=False)
    assert stopped == [EXIT_REQUEUE] * 2
    assert (ckpt / "iter_0000003").is_dir() and (ckpt / "REQUEUE").is_file()
    resumed_codes = run_on_ranks(2, _run, _argv(tmp_path, "second", layout, "--save", str(ckpt), "--load", str(ckpt)),
                                 model_parallel=False)
    assert resumed_codes == [0, 0]
    assert not (ckpt / "REQUEUE").exists()  # cleared when the resumed run started
    first, second = _losses(tmp_path / "first"), _losses(tmp_path / "second")
    assert sorted(first) == [1, 2, 3] and sorted(second) == [4, 5, 6]
    for it in range(1, STEPS + 1):
        got = first[it] if it <= 3 else second[it]
        assert got == full[it], f"iteration {it}: {got!r} != uninterrupted {full[it]!r}"
