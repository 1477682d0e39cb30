"""Training on an SFT data set (``tools/prepare_data.py --format sft``): ``--loss-type sft`` trains on it;
every preference loss refuses it before any compute, saying what the set is and what to do."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_tgdpo.testing import read_metrics, run_command

from suite import ROOT

TOKENIZER = ROOT / "examples" / "data" / "synthetic" / "tokenizer.model"


def _run(args: list[str]) -> subprocess.CompletedProcess:
    return run_command(args, cwd=ROOT, timeout=600)


@pytest.fixture(scope="module")
def sft_set(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("sft")
    lines = [{"prompt": f"sort: {i % 10} {(3 * i) % 10} =", "response": " " + " ".join(sorted(f"{i % 10}{(3 * i) % 10}"))}
             for i in range(16)]
    lines.append({"messages": [{"role": "user", "content": "sort: 9 1 ="}, {"role": "assistant", "content": " 1 9"}]})
    source = tmp / "sft.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in lines))
    prefix = tmp / "prepared" / "sft"
    done = _run([sys.executable, "tools/prepare_data.py", "--format", "sft", "--input", str(source), "--output-prefix",
                 str(prefix), "--tokenizer", str(TOKENIZER), "--chat-template", "plain", "--max-seq-length", "32",
                 "--min-prompt-tokens", "4", "--workers", "1", "--quiet"])
    assert done.returncode == 0, done.stderr
    return prefix


COMMON = ["--model", "tiny", "--seq-length", "32", "--micro-batch-size", "4", "--global-batch-size", "4",
          "--train-iters", "2", "--eval-iters", "1", "--no-tensorboard"]


def test_sft_trains_on_an_sft_set(sft_set, tmp_path):
    result = _run([sys.executable, "-m", "megatron_tgdpo.train", *COMMON, "--loss-type", "sft", "--data-path",
                   str(sft_set), "--eval-data-path", str(sft_set), "--log-dir", str(tmp_path / "log")])
    assert result.returncode == 0, result.stderr[-3000:]
    rows = read_metrics(tmp_path / "log")
    assert [r["iteration"] for r in rows if "loss" in r][:2] == [1, 2]


@pytest.mark.parametrize("loss", ["dpo", "simpo"])
def test_preference_losses_refuse_an_sft_set(sft_set, tmp_path, loss):
    result = _run([sys.executable, "-m", "megatron_tgdpo.train", *COMMON, "--loss-type", loss, "--data-path",
                   str(sft_set), "--log-dir", str(tmp_path / "log")])
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert f"--data-path {sft_set}: an SFT data set" in result.stderr
    assert f"--loss-type {loss} needs preference pairs" in result.stderr
    assert "iter " not in result.stdout  # refused before training
