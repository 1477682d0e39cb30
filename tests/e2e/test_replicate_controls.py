"""``replicate --methods ...`` with TGDPO's controls, cross-fitted and reward-model guidance, at the smoke
size: every row is printed, the shuffled control applies TGDPO's weights (same per-response sums, so the
same logged weight means), the constant control's rejected weight is TGDPO's mean, cross-fitting scores
every pair, and TGDPO guided by the reward model trained on the pairs applies weights of its own.

The run starts from a copy of the smoke pipeline's finished work directory (the session fixture
``smoke_replication``, tests/e2e/conftest.py): its SFT model, samples, pairs, DPO and TGDPO runs have the
settings this run asks for, so they are resumed, and the controls are trained on them."""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from megatron_tgdpo.testing import run_command, user_env

from suite import ROOT

METHODS = "sft,dpo,tgdpo,tgdpo-shuffled,tgdpo-constant,tgdpo-crossfit,tgdpo-rm"
ROWS = ("SFT", "DPO", "TGDPO (alpha 0.5)", "TGDPO shuffled (control)", "DPO + constant f_l (control)",
        "TGDPO cross-fitted", "TGDPO guided by a reward model")


def _metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_controls_and_crossfit_run_end_to_end(smoke_replication, tmp_path):
    work = tmp_path / "work"
    if smoke_replication.again.returncode == 0:  # else from an empty directory: every stage runs here
        shutil.copytree(smoke_replication.work, work, symlinks=True)
    result = run_command([sys.executable, "-m", "megatron_tgdpo.replicate", "--preset", "smoke", "--workdir", str(work),
                          "--methods", METHODS, "--eval-samples", "0"], cwd=ROOT, env=user_env(), timeout=1800)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    lines = result.stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("model "))
    assert [line.split("  ")[0].strip() for line in lines[start + 2:start + 2 + len(ROWS)]] == list(ROWS)
    assert "95% t interval" in result.stdout
    logs = work / "seed1" / "logs"
    tgdpo, shuffled, constant = (_metrics(logs / m / "metrics.jsonl")
                                 for m in ("tgdpo-a0.5", "tgdpo-shuffled", "tgdpo-constant"))
    for a, b in zip(tgdpo, shuffled):
        for key in ("weights/chosen_mean", "weights/rejected_mean"):
            assert b[key] == pytest.approx(a[key], rel=1e-6)
    mean_rejected = sum(r["weights/rejected_mean"] for r in tgdpo) / len(tgdpo)
    assert all(r["weights/rejected_mean"] == pytest.approx(mean_rejected, rel=1e-6) for r in constant)
    assert all(r["weights/chosen_mean"] == 1.0 for r in constant)
    pairs = json.loads((work / "seed1" / "pairs.manifest.json").read_text())["num_pairs"]
    scores = (work / "seed1" / "crossfit" / "scores.jsonl").read_text().splitlines()
    assert len(scores) == pairs
    assert "weights/rejected_mean" in _metrics(logs / "tgdpo-crossfit" / "metrics.jsonl")[0]
    assert "rm/accuracy" in _metrics(logs / "rm" / "metrics.jsonl")[0]  # the reward model, trained on the pairs
    guided = _metrics(logs / "tgdpo-rm" / "metrics.jsonl")
    assert guided[0]["weights/rejected_mean"] != pytest.approx(tgdpo[0]["weights/rejected_mean"], rel=1e-6)
