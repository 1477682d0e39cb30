"""GPU-only checks: TransformerEngine layers (bf16 and FP8) and NCCL, through the real CLI.

Skipped on machines without CUDA. Runs use ``torchrun`` subprocesses: the test process never touches
CUDA itself, and forking after CUDA initialisation is unsafe, so the fork-based harness is not used here.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from megatron_tgdpo.testing import read_metrics, run_command, torchrun

from suite import ROOT

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (GPU machines only)")


def _te_installed() -> bool:
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:  # noqa: BLE001
        return False
    return True


def _train(tmp: Path, name: str, *flags: str, nproc: int = 1) -> list[dict]:
    cmd = [*torchrun(nproc), "-m", "megatron_tgdpo.train", "--model", "tiny", "--loss-type", "dpo", "--train-iters",
           "20", "--micro-batch-size", "4", "--global-batch-size", "16", "--seq-length", "64", "--lr", "1e-3",
           "--eval-iters", "0", "--data-cache-dir", str(tmp / "data"), "--log-dir", str(tmp / name),
           "--no-tensorboard", "--no-pack-sequences", *flags]
    result = run_command(cmd, cwd=ROOT, timeout=600, env=dict(os.environ, CUDA_DEVICE_MAX_CONNECTIONS="1"))
    assert result.returncode == 0, result.stderr[-4000:]
    return read_metrics(tmp / name)


def test_bf16_training_learns(tmp_path):
    rows = _train(tmp_path, "bf16", "--bf16")
    assert rows[0]["logratio/abs_max"] == 0.0
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.05


@pytest.mark.skipif(not _te_installed(), reason="needs TransformerEngine (pip install -e '.[te]')")
def test_fp8_tracks_bf16(tmp_path):
    bf16 = _train(tmp_path, "bf16", "--bf16")
    fp8 = _train(tmp_path, "fp8", "--bf16", "--fp8-format", "hybrid")
    assert all(abs(a["loss"] - b["loss"]) < 0.05 for a, b in zip(bf16, fp8))
    assert fp8[-1]["loss"] < fp8[0]["loss"] - 0.05


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_tensor_parallel_matches_single_gpu(tmp_path):
    one = _train(tmp_path, "tp1")
    two = _train(tmp_path, "tp2", "--tensor-model-parallel-size", "2", nproc=2)
    assert all(abs(a["loss"] - b["loss"]) < 1e-3 for a, b in zip(one, two))
