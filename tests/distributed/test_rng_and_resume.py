"""Every RNG the run uses is seeded at start and travels with the checkpoint; the console tells the
truth about which iterations a (resumed, finished) run trains.

A DPO algorithm that also draws from python's ``random``, numpy's global RNG, torch's CPU generator and
megatron-core's model-parallel tracker at every step (as dropout or sampling code would) records the
draws. Two runs with one seed draw the same; a run stopped after a save and resumed draws, after the
resume, exactly what the uninterrupted run drew (and without the RNG restore, ``--no-load-rng``, it does
not: the control that shows the restore is what makes it so). CUDA's generator is covered by the same
save/restore code (``checkpointing.rng_state``) and needs a GPU to check.
"""
from __future__ import annotations

import contextlib
import io
import random

import numpy as np
import torch

from megatron_tgdpo.config import parse_args
from megatron_tgdpo.testing import read_metrics, run_on_ranks

STEPS = 4


def _drawing_algorithm():
    from megatron.core import tensor_parallel

    from megatron_tgdpo.algorithms.preference import PreferenceAlgorithm

    class Drawing(PreferenceAlgorithm):
        draws: list = []

        def train_step(self, batches):
            with tensor_parallel.get_cuda_rng_tracker().fork():
                tracker = torch.rand(1).item()
            type(self).draws.append((random.random(), float(np.random.rand()), torch.rand(1).item(), tracker))
            return super().train_step(batches)

    return Drawing


def _run(argv):
    """(exit code, draws, RNG states after the run, console text) of one rank."""
    from megatron.core import tensor_parallel

    from megatron_tgdpo.runtime import loop

    algorithm = _drawing_algorithm()
    algorithm.draws = []
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = loop.run(parse_args(argv), algorithm)
    states = {"python": random.getstate(), "numpy": [np.asarray(x).tolist() for x in np.random.get_state()],
              "torch": torch.get_rng_state().tolist(),
              "tracker": {k: v.tolist() for k, v in tensor_parallel.get_cuda_rng_tracker().get_states().items()}}
    return code, algorithm.draws, states, out.getvalue()


def _argv(tmp, name, *extra, seed="7", iters=STEPS):
    return ["--model", "tiny", "--loss-type", "dpo", "--train-iters", str(iters), "--micro-batch-size", "2",
            "--global-batch-size", "8", "--seq-length", "64", "--no-pack-sequences", "--lr", "1e-3", "--seed", seed,
            "--data-cache-dir", str(tmp / "data"), "--log-dir", str(tmp / name), "--eval-iters", "0",
            "--no-tensorboard", *extra]


def _ranks(argv):
    results = run_on_ranks(2, _run, argv, model_parallel=False)
    assert [r[0] for r in results] == [0, 0], results[0][3][-2000:]
    return results


def _startup(console: str) -> str:
    return next(line for line in console.splitlines() if line.startswith("megatron_tgdpo:"))


def test_one_seed_one_stream_and_a_resume_restores_it(tmp_path):
    full = _ranks(_argv(tmp_path, "full"))
    again = _ranks(_argv(tmp_path, "again"))
    for a, b in zip(full, again):
        assert len(a[1]) == STEPS and a[1] == b[1]  # the same draws at every step, on every rank
        assert a[2] == b[2]  # and the same python/numpy/torch/tracker states after the run
    other = _ranks(_argv(tmp_path, "other", seed="8"))
    assert other[0][1] != full[0][1]  # the seed decides them

    ckpt = str(tmp_path / "ckpt")
    first = _ranks(_argv(tmp_path, "first", "--save", ckpt, iters=STEPS // 2))
    assert "iterations 1..2" in _startup(first[0][3])
    resumed = _ranks(_argv(tmp_path, "resumed", "--save", ckpt, "--load", ckpt))
    for f, r, u in zip(first, resumed, full):
        assert f[1] + r[1] == u[1]  # steps 1-2 before the save, 3-4 after the resume: the uninterrupted draws
        assert r[2] == u[2]
    console = resumed[0][3]
    assert "iterations 3..4" in _startup(console), _startup(console)
    assert f"resumed from {ckpt}/iter_0000002 (iteration 2, 16 samples consumed)" in console
    steps = [line.split("|")[0].split()[1] for line in console.splitlines() if line.startswith("iter ")]
    assert steps == ["3/4", "4/4"], steps
    rows = read_metrics(tmp_path / "resumed")
    assert [r["iteration"] for r in rows] == [3, 4]

    # Control: without the RNG restore the resumed run re-draws the seeded stream.
    unrestored = _ranks(_argv(tmp_path, "unrestored", "--load", f"{ckpt}/iter_0000002", "--no-load-rng"))
    assert unrestored[0][1] != full[0][1][2:]
    assert unrestored[0][1] == full[0][1][:2]

    # A finished run says so and trains nothing.
    done = _ranks(_argv(tmp_path, "done", "--save", ckpt, "--load", ckpt))
    assert "already at iteration 4 of 4: nothing to train" in _startup(done[0][3])
    assert done[0][1] == [] and not any(line.startswith("iter ") for line in done[0][3].splitlines())
