"""``python -m megatron_tgdpo.replicate`` end to end at the smoke size: every stage runs, the table has
every model's row, and a rerun skips every stage (resumes) and prints the same table."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from megatron_tgdpo.testing import run_command, user_env

from suite import ROOT

ROWS = ("SFT", "DPO", "TGDPO (alpha 0.5)", "SimPO", "IPO")


def _replicate(workdir: Path, *flags: str) -> subprocess.CompletedProcess:
    # The user's environment: no PYTHONWARNINGS, so a library warning would reach the console.
    return run_command([sys.executable, "-m", "megatron_tgdpo.replicate", "--preset", "smoke", "--workdir",
                        str(workdir), *flags], cwd=ROOT, env=user_env(), timeout=1200)


def _table(stdout: str) -> list[str]:
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("model "))
    return lines[start:start + 2 + len(ROWS)]


def test_smoke_run_prints_every_row_then_resumes(tmp_path):
    first = _replicate(tmp_path / "work")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    table = _table(first.stdout)
    assert [line.split("  ")[0].strip() for line in table[2:]] == list(ROWS), "\n".join(table)
    for header in ("greedy score", "greedy exact", "sampled score", "win vs DPO (greedy)"):
        assert header in table[0]
    results = json.loads((tmp_path / "work" / "results.json").read_text())
    assert set(results["per_seed"]["1"]) == {"sft", "dpo", "tgdpo-a0.5", "simpo", "ipo"}
    assert results["pairs"]["1"]["pairs"] >= 1
    assert "[run ] seed1.tgdpo-a0.5" in first.stdout and "[skip]" not in first.stdout
    assert "Warning" not in first.stdout + first.stderr, (first.stdout + first.stderr)[:3000]

    again = _replicate(tmp_path / "work")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "[run ]" not in again.stdout and again.stdout.count("[skip]") == len(results["timings"])
    assert _table(again.stdout) == table
