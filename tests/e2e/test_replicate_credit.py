"""``replicate --preset credit`` (the long-answer table of docs/results.md) at the smoke size: one seed
drawing its own prompts and SFT data (data seed = seed), the paired-difference table with intervals and W/T/L counts,
and a rerun that resumes without running anything. Only SFT and DPO train here: every other method of
the preset runs in the smoke pipeline tests (test_replicate.py, test_replicate_controls.py)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from megatron_tgdpo.testing import run_command, user_env

from suite import ROOT

SMOKE_SIZES = ("--seed-list", "2", "--sft-prompts", "48", "--pref-prompts", "24", "--heldout-prompts", "12",
               "--sft-iters", "4", "--pref-iters", "2", "--num-samples", "4", "--curves", "0",
               "--methods", "sft,dpo")


def _replicate(workdir: Path) -> subprocess.CompletedProcess:
    return run_command([sys.executable, "-m", "megatron_tgdpo.replicate", "--preset", "credit", "--workdir",
                        str(workdir), *SMOKE_SIZES], cwd=ROOT, env=user_env(), timeout=1200)


def test_credit_preset_smoke_draws_the_seeds_own_data_and_resumes(tmp_path):
    work = tmp_path / "work"
    first = _replicate(work)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "each seed its own prompts and SFT data" in first.stdout
    # Seed 2 draws its prompts with data seed 2 (tests/unit/test_pipeline.py checks that seeds differ).
    heldout = work / "seed2" / "data" / "heldout_prompts.jsonl"
    prompts = [json.loads(line)["prompt"] for line in heldout.read_text().splitlines()]
    assert not (work / "data").exists()
    # The long-answer task: 12-24 digits to reverse.
    assert prompts and all(12 <= len(p.split()) - 2 <= 24 for p in prompts)
    lines = first.stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("model - DPO"))
    rows = lines[start + 2:start + 4]
    assert [row.split("  ")[0].strip() for row in rows] == ["SFT", "SFT"]
    for header in ("95% t interval", "95% bootstrap", "W/T/L", "significant"):
        assert header in lines[start]
    for row in rows:  # one seed: W/T/L sums to 1
        wins, ties, losses = (int(x) for x in next(c for c in row.split() if c.count("/") == 2).split("/"))
        assert wins + ties + losses == 1
    results = json.loads((work / "results.json").read_text())
    assert set(results["per_seed"]) == {"2"} and results["config"]["vary_data_seed"] is True

    again = _replicate(work)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "[run ]" not in again.stdout
