"""Exact resume after SIGKILL, preemption by SIGTERM, and truncated checkpoints never loaded.

All runs: 4 ranks = TP 2 x DP 2 with the distributed optimizer, DPO on the built-in data.
"""
from __future__ import annotations

import logging
import os
import shutil
import signal
from pathlib import Path

import pytest

from megatron_tgdpo.testing import RankFailure, read_metrics, run_on_ranks, run_train

N = 6


def _argv(tmp: Path, name: str, *extra: str) -> list[str]:
    return [
        "--model", "tiny", "--loss-type", "dpo", "--train-iters", str(N), "--micro-batch-size", "2",
        "--global-batch-size", "8", "--seq-length", "64", "--lr", "3e-3", "--seed", "5",
        "--tensor-model-parallel-size", "2", "--use-distributed-optimizer",
        "--data-cache-dir", str(tmp / "data"), "--log-dir", str(tmp / name), "--eval-iters", "0", "--no-tensorboard",
        *extra,
    ]


def _run_killed_after_save(argv, kill_at: int):
    """SIGKILL every rank right after the checkpoint of ``kill_at`` is published (the worst moment)."""
    from megatron_tgdpo import checkpointing

    original = checkpointing.save_checkpoint

    def save_then_die(*args, **kwargs):
        path = original(*args, **kwargs)
        if kwargs["iteration"] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return path

    checkpointing.save_checkpoint = save_then_die
    return run_train(argv)


def _run_sigterm_at(argv, iteration: int):
    """Rank 1 alone receives SIGTERM during ``iteration`` (as from SLURM); all ranks must stop together."""
    import torch.distributed as dist

    from megatron_tgdpo.algorithms.preference import PreferenceAlgorithm

    original, calls = PreferenceAlgorithm.train_step, [0]

    def step(*args, **kwargs):
        out = original(*args, **kwargs)
        calls[0] += 1
        if calls[0] == iteration and dist.get_rank() == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return out

    PreferenceAlgorithm.train_step = step
    return run_train(argv)


def _losses(log_dir: Path) -> dict[int, float]:
    return {r["iteration"]: r["loss"] for r in read_metrics(log_dir)}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("resume")
    assert run_on_ranks(4, run_train, _argv(tmp, "full"), model_parallel=False) == [0] * 4
    losses = _losses(tmp / "full")
    assert sorted(losses) == list(range(1, N + 1))
    return tmp, losses


def test_resume_after_sigkill_is_exact(uninterrupted):
    tmp, full = uninterrupted
    ckpt = tmp / "killed-ckpt"
    with pytest.raises(RankFailure, match="died without reporting"):
        run_on_ranks(4, _run_killed_after_save, _argv(tmp, "killed", "--save", str(ckpt), "--save-interval", "3"), 3,
                     model_parallel=False)
    assert (ckpt / "iter_0000003").is_dir()
    assert run_on_ranks(4, run_train, _argv(tmp, "resumed", "--load", str(ckpt), "--save", str(ckpt)),
                        model_parallel=False) == [0] * 4
    resumed = _losses(tmp / "resumed")
    assert sorted(resumed) == [4, 5, 6]
    for it in (4, 5, 6):
        assert resumed[it] == full[it], f"iteration {it}: resumed {resumed[it]!r} != uninterrupted {full[it]!r}"


def test_sigterm_saves_exits_for_requeue_and_resumes(uninterrupted):
    from megatron_tgdpo.train import EXIT_REQUEUE

    tmp, full = uninterrupted
    ckpt = tmp / "term-ckpt"
    codes = run_on_ranks(4, _run_sigterm_at, _argv(tmp, "term", "--save", str(ckpt)), 2, model_parallel=False)
    assert codes == [EXIT_REQUEUE] * 4
    assert (ckpt / "iter_0000002").is_dir() and not (ckpt / "iter_0000003").exists()
    assert sorted(_losses(tmp / "term")) == [1, 2]
    assert run_on_ranks(4, run_train, _argv(tmp, "term-resumed", "--load", str(ckpt), "--save", str(ckpt)),
                        model_parallel=False) == [0] * 4
    resumed = _losses(tmp / "term-resumed")
    assert sorted(resumed) == [3, 4, 5, 6]
    assert all(resumed[it] == full[it] for it in resumed), (resumed, full)


def test_truncated_checkpoint_is_skipped_with_a_message(uninterrupted, caplog):
    from megatron_tgdpo import checkpointing

    tmp, _ = uninterrupted
    ckpt = tmp / "killed-ckpt"  # iter 3 (from the SIGKILL run) and iter 6 (the resumed run's final save)
    assert checkpointing.find_latest(ckpt).name == "iter_0000006"
    victim = max((ckpt / "iter_0000006").glob("*.distcp"), key=lambda p: p.stat().st_size)
    with open(victim, "r+b") as fh:
        fh.truncate(victim.stat().st_size // 2)
    # An interrupted save (never published) and a stale temporary directory are ignored as well.
    shutil.copytree(ckpt / "iter_0000003", ckpt / "iter_0000009")
    (ckpt / "iter_0000009" / checkpointing.METADATA).unlink()
    (ckpt / "iter_0000012.tmp").mkdir()
    with caplog.at_level(logging.WARNING, logger="megatron_tgdpo.checkpointing"):
        latest = checkpointing.find_latest(ckpt)
    assert latest.name == "iter_0000003"
    text = caplog.text
    assert "iter_0000009" in text and "interrupted" in text
    assert "iter_0000006" in text and "truncated" in text
    with pytest.raises(checkpointing.CheckpointError, match="truncated"):
        checkpointing.resolve(ckpt / "iter_0000006")


def test_optimizer_state_refuses_a_tp_change_with_advice(uninterrupted):
    tmp, _ = uninterrupted
    ckpt = tmp / "term-ckpt"
    argv = _argv(tmp, "relayout", "--load", str(ckpt))
    argv[argv.index("--tensor-model-parallel-size") + 1] = "1"
    with pytest.raises(RankFailure, match="--no-load-optim"):
        run_on_ranks(4, run_train, argv, model_parallel=False)
    # Model weights reshard TP2 -> TP1 when the optimizer starts fresh.
    assert run_on_ranks(4, run_train, argv + ["--no-load-optim", "--train-iters", "7"], model_parallel=False) == [0] * 4
