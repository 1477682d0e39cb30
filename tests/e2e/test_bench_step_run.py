"""tools/bench_step.py end to end on CPU: one short run (forked gloo rank, tiny model, packed vs padded)
prints the table and writes JSON whose figures are consistent."""
from __future__ import annotations

import json

from suite import load_tool


def test_short_cpu_run_writes_the_table_and_json(tmp_path, capsys):
    bs = load_tool("bench_step")
    out = tmp_path / "bench.json"
    code = bs.main(["--model", "tiny", "--compare", "packing", "--steps", "1", "--warmup", "0", "--micro-batch-size",
                    "1", "--global-batch-size", "2", "--seq-length", "64", "--length-scale", "0.03",
                    "--work-dir", str(tmp_path / "work"), "--output", str(out), "--rounds", "1"])
    assert code == 0
    report = json.loads(out.read_text())
    packed, padded = report["results"]["tgdpo online"], report["results"]["tgdpo online, padded"]
    assert packed["real_tokens_per_step"] == padded["real_tokens_per_step"] > 0  # the same pairs
    assert 1.0 <= packed["computed_per_real"] <= padded["computed_per_real"]
    assert packed["all_updated"] and packed["peak_memory_bytes"] > 0
    assert "packed vs padded" in capsys.readouterr().out
