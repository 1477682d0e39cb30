"""The command line as users run it: torchrun + python -m megatron_tgdpo.train."""
from __future__ import annotations

import json
import subprocess
import sys

from megatron_tgdpo.testing import read_metrics, run_command, torchrun

from suite import ROOT


def _torchrun(nproc: int, *flags: str) -> subprocess.CompletedProcess:
    return run_command([*torchrun(nproc), "-m", "megatron_tgdpo.train", *flags], cwd=ROOT)


def test_bad_configuration_fails_before_compute_with_the_flag_named(tmp_path):
    result = run_command([sys.executable, "-m", "megatron_tgdpo.train", "--tensor-model-parallel-size", "3",
                          "--global-batch-size", "7", "--loss-type", "dpo", "--train-iters", "2",
                          "--ref-load", str(tmp_path / "missing"), "--log-dir", str(tmp_path / "log")], cwd=ROOT)
    assert result.returncode == 2, result.stderr[-2000:]
    err = result.stderr
    assert "nothing was run" in err
    assert "not divisible by TP*PP*CP" in err
    assert f"--ref-load {tmp_path / 'missing'}: does not exist" in err
    assert not (tmp_path / "log").exists()  # no compute, no output


def test_dpo_then_tgdpo_through_torchrun(tmp_path):
    common = ["--model", "tiny", "--micro-batch-size", "2", "--global-batch-size", "8", "--seq-length", "64",
              "--lr", "1e-3", "--eval-iters", "2", "--data-cache-dir", str(tmp_path / "data"), "--no-tensorboard"]
    dpo = _torchrun(2, *common, "--loss-type", "dpo", "--train-iters", "6", "--save", str(tmp_path / "dpo"),
                    "--log-dir", str(tmp_path / "dpo-log"))
    assert dpo.returncode == 0, dpo.stderr[-3000:]
    assert "iter      6/6" in dpo.stdout and "held-out after training" in dpo.stdout
    tgdpo = _torchrun(2, *common, "--loss-type", "tgdpo", "--train-iters", "4", "--guidance-load",
                      str(tmp_path / "dpo"), "--tensor-model-parallel-size", "2", "--log-dir", str(tmp_path / "tg-log"))
    assert tgdpo.returncode == 0, tgdpo.stderr[-3000:]
    rows = read_metrics(tmp_path / "tg-log")
    assert [r["iteration"] for r in rows] == [1, 2, 3, 4]
    for key in ("loss", "rewards/accuracy", "rewards/margin", "rewards/chosen", "rewards/rejected", "lr",
                "grad_norm", "tokens_per_s", "weights/chosen_mean", "weights/rejected_mean",
                "weights/negative_fraction"):
        assert key in rows[0], key
    # The guidance model differs from the reference, so the token weights are not all 1.
    assert abs(rows[0]["weights/chosen_mean"] - 1.0) > 1e-6
    summary = json.loads((tmp_path / "tg-log" / "summary.json").read_text())
    assert summary["loss_type"] == "tgdpo" and summary["iterations"] == 4
