"""tools/profile_step.py end to end on CPU: one short run of the real trainer (forked gloo rank, tiny
model, DPO online) prints its table, with the frozen reference's forward as its own phase (it runs inside
the policy's schedule) and the policy's parts attributed."""
from __future__ import annotations

import re

from suite import load_tool


def _ms(table: str, row: str) -> float:
    match = re.search(rf"^\| {re.escape(row)} \|[^\n]*\| ([\d,.]+) \| ([\d.]+) \|$", table, flags=re.M)
    assert match, f"no row {row!r} in:\n{table}"
    return float(match.group(1).replace(",", ""))


def test_short_cpu_run_prints_phases_and_parts(tmp_path, capsys):
    tool = load_tool("profile_step")
    code = tool.main(["--model", "tiny", "--loss-type", "dpo", "--steps", "1", "--warmup", "0",
                      "--micro-batch-size", "1", "--global-batch-size", "2", "--seq-length", "64",
                      "--length-scale", "0.05", "--work-dir", str(tmp_path / "work")])
    out = capsys.readouterr().out
    assert code == 0, out
    assert _ms(out, "reference forward") > 0  # scored inside the policy's schedule, still found
    assert _ms(out, "policy forward + backward, total") > 0
    for part in ("attention", "mlp", "lm head + log-probs"):
        assert _ms(out, f"policy: {part}") > 0, part
