"""The whole training step at TP=2, PP=2, CP=2, DP=2 (distributed optimizer) and TP2xPP2 reproduces
the single-rank run step for step; TGDPO with alpha=0 is DPO; step-0 policy == reference exactly."""
from __future__ import annotations

from pathlib import Path

import pytest

from megatron_tgdpo.testing import read_metrics, run_on_ranks, run_train

STEPS = 5


def _common(tmp: Path, name: str, data_cache: Path) -> list[str]:
    return [
        "--model", "tiny", "--train-iters", str(STEPS), "--micro-batch-size", "2", "--global-batch-size", "8",
        "--seq-length", "64", "--lr", "3e-3", "--clip-grad", "1.0", "--seed", "11",
        "--data-cache-dir", str(data_cache), "--log-dir", str(tmp / name), "--eval-iters", "0",
        "--no-tensorboard", "--no-pack-sequences",
    ]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A guidance model (3 DPO steps, single rank) and the single-rank TGDPO reference run."""
    tmp = tmp_path_factory.mktemp("train")
    cache = tmp / "data"
    guide = tmp / "guide"
    argv = _common(tmp, "guide-log", cache) + ["--loss-type", "dpo", "--save", str(guide), "--train-iters", "3"]
    assert run_on_ranks(1, run_train, argv, model_parallel=False) == [0]
    ref_argv = _common(tmp, "single", cache) + ["--loss-type", "tgdpo", "--guidance-load", str(guide)]
    assert run_on_ranks(1, run_train, ref_argv, model_parallel=False) == [0]
    return tmp, cache, guide, read_metrics(tmp / "single")


LAYOUTS = {
    "tp2": ["--tensor-model-parallel-size", "2"],
    "tp2-sp": ["--tensor-model-parallel-size", "2", "--sequence-parallel"],
    "pp2": ["--pipeline-model-parallel-size", "2"],
    "cp2": ["--context-parallel-size", "2"],
    "dp2-distopt": ["--use-distributed-optimizer"],
    "tp2pp2": ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"],
    "pp2-vpp2": ["--pipeline-model-parallel-size", "2", "--virtual-pipeline-model-parallel-size", "2"],
    "tp2cp2": ["--tensor-model-parallel-size", "2", "--context-parallel-size", "2"],
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_parallel_layout_matches_single_rank(workspace, layout):
    tmp, cache, guide, reference = workspace
    world = 4 if layout in ("tp2pp2", "tp2cp2") else 2
    argv = _common(tmp, layout, cache) + ["--loss-type", "tgdpo", "--guidance-load", str(guide)] + LAYOUTS[layout]
    assert run_on_ranks(world, run_train, argv, model_parallel=False) == [0] * world
    got = read_metrics(tmp / layout)
    assert [r["iteration"] for r in got] == list(range(1, STEPS + 1))
    for ours, ref in zip(got, reference):
        for key in ("loss", "rewards/margin", "rewards/accuracy", "weights/chosen_mean"):
            assert abs(ours[key] - ref[key]) < 1e-4, f"{layout} iteration {ours['iteration']} {key}: {ours[key]} vs {ref[key]}"
    # The optimisation actually moved: otherwise equal losses would prove little.
    assert abs(reference[-1]["loss"] - reference[0]["loss"]) > 1e-3


def test_step_zero_policy_equals_reference_exactly(workspace):
    _, _, _, reference = workspace
    assert reference[0]["logratio/abs_max"] == 0.0
    assert reference[1]["logratio/abs_max"] > 0.0


def test_tgdpo_alpha_zero_is_dpo_step_for_step(workspace):
    tmp, cache, guide, _ = workspace
    a = _common(tmp, "alpha0", cache) + ["--loss-type", "tgdpo", "--alpha", "0", "--guidance-load", str(guide)]
    b = _common(tmp, "dpo", cache) + ["--loss-type", "dpo"]
    assert run_on_ranks(1, run_train, a, model_parallel=False) == [0]
    assert run_on_ranks(1, run_train, b, model_parallel=False) == [0]
    for x, y in zip(read_metrics(tmp / "alpha0"), read_metrics(tmp / "dpo")):
        for key in ("loss", "rewards/margin", "grad_norm"):
            assert x[key] == y[key], f"iteration {x['iteration']} {key}: {x[key]} != {y[key]}"


def test_bf16_tracks_fp32(workspace):
    """bf16 weights (fp32 main params in the optimizer, fp32 log-probs and loss) follow the fp32 run."""
    tmp, cache, guide, reference = workspace
    argv = _common(tmp, "bf16", cache) + ["--loss-type", "tgdpo", "--guidance-load", str(guide), "--bf16",
                                          "--tensor-model-parallel-size", "2", "--use-distributed-optimizer"]
    assert run_on_ranks(2, run_train, argv, model_parallel=False) == [0, 0]
    got = read_metrics(tmp / "bf16")
    assert got[0]["logratio/abs_max"] == 0.0
    for ours, ref in zip(got, reference):
        assert abs(ours["loss"] - ref["loss"]) < 1e-2, (ours["iteration"], ours["loss"], ref["loss"])
