"""SFT through the trainer (--loss-type sft): learns, and TP=2 / PP=2 / CP=2 reproduce the single-rank run."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from megatron_tgdpo.testing import read_metrics, run_on_ranks, run_train

STEPS = 5


def _argv(tmp: Path, name: str, *extra: str) -> list[str]:
    return ["--model", "tiny", "--loss-type", "sft", "--train-iters", str(STEPS), "--micro-batch-size", "2",
            "--global-batch-size", "8", "--seq-length", "64", "--no-pack-sequences", "--lr", "3e-3", "--seed", "3",
            "--data-cache-dir", str(tmp.parent / "data"), "--log-dir", str(tmp / name), "--eval-iters", "2",
            "--no-tensorboard", *extra]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sft")
    assert run_on_ranks(1, run_train, _argv(tmp, "single"), model_parallel=False) == [0]
    rows = read_metrics(tmp / "single")
    assert [r["iteration"] for r in rows] == list(range(1, STEPS + 1))
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.1  # it learns
    summary = json.loads((tmp / "single" / "summary.json").read_text())
    assert summary["after"]["loss"] < summary["before"]["loss"]  # held-out NLL falls too
    return tmp, rows


@pytest.mark.parametrize("layout", [["--tensor-model-parallel-size", "2"], ["--pipeline-model-parallel-size", "2"],
                                    ["--context-parallel-size", "2"]], ids=["tp2", "pp2", "cp2"])
def test_sft_layouts_match_single_rank(single, layout):
    tmp, reference = single
    name = layout[0].strip("-")
    assert run_on_ranks(2, run_train, _argv(tmp, name, *layout), model_parallel=False) == [0, 0]
    for ours, ref in zip(read_metrics(tmp / name), reference):
        for key in ("loss", "grad_norm"):
            assert abs(ours[key] - ref[key]) < 1e-5, f"{name} iteration {ours['iteration']} {key}: {ours[key]} vs {ref[key]}"
