"""tools/plot_metrics.py: tolerant reading of metrics.jsonl (missing keys, "nan" strings, a torn last
line, resumed runs), a real PNG out, and clear errors for missing or unusable input."""
from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import pytest

from suite import load_tool

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tool():
    return load_tool("plot_metrics")


def _metrics(path: Path, lines: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def _run(tmp_path: Path, name: str, *, offset: float = 0.0) -> Path:
    lines: list = []
    for i in range(1, 31):
        row = {"iteration": i, "loss": 0.7 * math.exp(-i / 10) + offset, "rewards/margin": i / 30 + offset,
               "rewards/accuracy": min(1.0, i / 20), "lr": 1e-3}
        if i == 7:
            row["loss"] = "nan"
            del row["rewards/margin"]
        if i % 10 == 0:
            row["eval/score"] = i / 40 + offset
        lines.append(row)
    lines.append('{"iteration": 31, "lo')  # the half-written last line of a running job
    return _metrics(tmp_path / name / "metrics.jsonl", lines)


def test_read_metrics(tool, tmp_path):
    warnings: list[str] = []
    series = tool.read_metrics(_run(tmp_path, "dpo"), warn=warnings.append)
    assert [x for x, _ in series["loss"]] == list(range(1, 31))
    assert math.isnan(dict(series["loss"])[7])
    assert 7 not in dict(series["rewards/margin"])
    assert [x for x, _ in series["eval/score"]] == [10, 20, 30]
    assert len(warnings) == 1 and "metrics.jsonl:31: invalid JSON" in warnings[0]
    assert tool.default_keys([series]) == ["loss", "rewards/margin", "rewards/accuracy", "eval/score"]


def test_resumed_run_keeps_the_newest_history(tool, tmp_path):
    lines = [{"iteration": i, "loss": 1.0} for i in range(1, 6)]  # first run got to 5
    lines += [{"iteration": i, "loss": 2.0} for i in (4, 5, 6)]    # resumed from a checkpoint at 3
    lines += [{"iteration": 6, "eval/score": 0.5}]                 # held-out line of the same iteration
    series = tool.read_metrics(_metrics(tmp_path / "r" / "metrics.jsonl", lines))
    assert series["loss"] == [(1, 1.0), (2, 1.0), (3, 1.0), (4, 2.0), (5, 2.0), (6, 2.0)]
    assert series["eval/score"] == [(6, 0.5)]
    rewound = lines[:5] + [{"iteration": 3, "loss": 3.0}]           # resumed from 2, died at 3
    series = tool.read_metrics(_metrics(tmp_path / "w" / "metrics.jsonl", rewound))
    assert series["loss"] == [(1, 1.0), (2, 1.0), (3, 3.0)]


def test_writes_a_png_with_one_line_per_run(tool, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    dpo, tgdpo = _run(tmp_path, "dpo"), _run(tmp_path, "tgdpo", offset=0.1)
    output = tmp_path / "plots" / "curves.png"
    assert tool.main([str(dpo), str(tgdpo), "--output", str(output), "--smoothing", "0.5"]) == 0
    data = output.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    width, height = struct.unpack(">II", data[16:24])  # IHDR
    assert width >= 600 and height >= 300 and len(data) > 20_000
    err = capsys.readouterr().err
    assert "loss, rewards/margin, rewards/accuracy, eval/score; 2 runs" in err
    assert sorted(p.name for p in output.parent.iterdir()) == ["curves.png"]
    # Default output beside the first file; chosen keys and labels.
    assert tool.main([str(dpo), "--keys", "lr", "--label", "baseline"]) == 0
    assert (dpo.parent / "metrics.png").read_bytes()[:8] == PNG_SIGNATURE


def test_labels(tool, tmp_path):
    paths = [tmp_path / "a" / "run" / "metrics.jsonl", tmp_path / "b" / "run" / "metrics.jsonl",
             tmp_path / "dpo" / "metrics.jsonl"]
    assert tool.labels_for(paths, None) == [str(paths[0].parent), str(paths[1].parent), "dpo"]
    with pytest.raises(tool.MetricsError, match="--label was given 1 times for 3 files"):
        tool.labels_for(paths, ["x"])


def test_errors(tool, tmp_path, capsys):
    good = _run(tmp_path, "dpo")
    out = str(tmp_path / "o.png")
    assert tool.main([str(tmp_path / "missing" / "metrics.jsonl"), "--output", out]) == 2
    assert "missing/metrics.jsonl: no such file" in capsys.readouterr().err
    empty = _metrics(tmp_path / "empty" / "metrics.jsonl", ["", "not json", {"loss": 1.0}, {"iteration": 1, "note": "x"}])
    assert tool.main([str(good), str(empty), "--output", out]) == 1
    assert "empty/metrics.jsonl: no usable lines" in capsys.readouterr().err
    assert tool.main([str(good), "--keys", "loss", "rewards/nope", "--output", out]) == 1
    assert "nothing to plot: rewards/nope in none of the files; available: eval/score, loss, lr" in capsys.readouterr().err
    other = _metrics(tmp_path / "other" / "metrics.jsonl", [{"iteration": 1, "lr": 0.1}])
    assert tool.main([str(other), "--output", out]) == 1
    assert "none of the default metrics present" in capsys.readouterr().err
    assert tool.main([str(good), "--smoothing", "1.0", "--output", out]) == 2
    assert not Path(out).exists()
