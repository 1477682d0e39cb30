"""``python -m megatron_tgdpo.replicate`` end to end at the smoke size: every stage runs, the table has
every model's row, and a rerun skips every stage (resumes) and prints the same table.

Both runs are the session fixture ``smoke_replication`` (tests/e2e/conftest.py): the controls test starts
from a copy of the same work directory."""
from __future__ import annotations

import json

ROWS = ("SFT", "DPO", "TGDPO (alpha 0.5)", "SimPO", "IPO")


def _table(stdout: str) -> list[str]:
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("model "))
    return lines[start:start + 2 + len(ROWS)]


def test_smoke_run_prints_every_row_then_resumes(smoke_replication):
    first = smoke_replication.first  # the run into an empty work directory (tests/e2e/conftest.py)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    table = _table(first.stdout)
    assert [line.split("  ")[0].strip() for line in table[2:]] == list(ROWS), "\n".join(table)
    for header in ("greedy score", "greedy exact", "sampled score", "win vs DPO (greedy)"):
        assert header in table[0]
    results = json.loads(smoke_replication.results_after_first)
    assert set(results["per_seed"]["1"]) == {"sft", "dpo", "tgdpo-a0.5", "simpo", "ipo"}
    assert results["pairs"]["1"]["pairs"] >= 1
    assert "[run ] seed1.tgdpo-a0.5" in first.stdout and "[skip]" not in first.stdout
    assert "Warning" not in first.stdout + first.stderr, (first.stdout + first.stderr)[:3000]

    again = smoke_replication.again  # the same command on the same work directory
    assert again.returncode == 0, again.stderr[-3000:]
    assert "[run ]" not in again.stdout and again.stdout.count("[skip]") == len(results["timings"])
    assert _table(again.stdout) == table
