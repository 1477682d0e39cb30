"""One-GPU parity through the real CLI (torchrun, NCCL, CUDA): packed rows train what padded rows train,
and the fused LM head trains what the plain output layer trains.

The multi-rank parity tests (tests/distributed) fork gloo ranks; on a GPU machine each rank would take
``cuda:<rank>`` under NCCL, and two ranks cannot share one GPU, so with one GPU only single-rank
comparisons run on the device: these. Runs use ``torchrun`` subprocesses (the test process never touches
CUDA; forking after CUDA initialisation is unsafe), fp32 so the comparison is tight.

Skipped without CUDA, unless ``MEGATRON_TGDPO_GPU_TESTS_ON_CPU=1`` (``tools/gpu_check.py --dry-run`` sets
it): then the same commands run on CPU with gloo, which rehearses the GPU check on a machine without one.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from megatron_tgdpo.testing import read_metrics, run_command, torchrun

from suite import ROOT

ON_CPU_ENV = "MEGATRON_TGDPO_GPU_TESTS_ON_CPU"
pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() or os.environ.get(ON_CPU_ENV) == "1"),
                                reason=f"needs CUDA (GPU machines only; {ON_CPU_ENV}=1 rehearses it on CPU)")
STEPS = 4
TOLERANCE = 1e-4  # relative; fp32 on one device, different shapes (and so summation orders) only


def _train(tmp: Path, name: str, *flags: str) -> list[dict]:
    cmd = [*torchrun(1), "-m", "megatron_tgdpo.train", "--model", "tiny", "--train-iters", str(STEPS),
           "--micro-batch-size", "2", "--global-batch-size", "8", "--seq-length", "64", "--lr", "3e-3", "--seed", "11",
           "--eval-iters", "0", "--data-cache-dir", str(tmp / "data"), "--log-dir", str(tmp / name), "--no-tensorboard",
           *flags]
    result = run_command(cmd, cwd=ROOT, timeout=600, env=dict(os.environ, CUDA_DEVICE_MAX_CONNECTIONS="1"))
    assert result.returncode == 0, result.stderr[-4000:]
    return read_metrics(tmp / name)


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= TOLERANCE * max(1.0, abs(b))


def _compare(ours: list[dict], ref: list[dict], keys: tuple[str, ...], what: str) -> None:
    assert [r["iteration"] for r in ours] == list(range(1, STEPS + 1))
    for a, b in zip(ours, ref):
        for key in keys:
            assert _close(a[key], b[key]), f"{what} iteration {a['iteration']} {key}: {a[key]} vs {b[key]}"
    assert abs(ref[-1]["loss"] - ref[0]["loss"]) > 1e-3  # it trained, so the gradients mattered


def test_packed_matches_unpacked_on_one_device(tmp_path):
    guide = tmp_path / "guide"
    _train(tmp_path, "guide-log", "--loss-type", "dpo", "--save", str(guide), "--no-pack-sequences")
    tgdpo = ("--loss-type", "tgdpo", "--guidance-load", str(guide))
    unpacked = _train(tmp_path, "unpacked", *tgdpo, "--no-pack-sequences")
    packed = _train(tmp_path, "packed", *tgdpo, "--pack-sequences")
    _compare(packed, unpacked, ("loss", "grad_norm", "rewards/margin", "weights/chosen_mean"), "packed vs unpacked")
    assert all(p["token_efficiency"] >= u["token_efficiency"] - 1e-9 for p, u in zip(packed, unpacked))


def test_fused_head_matches_plain_head_on_one_device(tmp_path):
    common = ("--loss-type", "dpo", "--logits-chunk-size", "24")
    fused = _train(tmp_path, "fused", *common, "--no-pack-sequences")
    plain = _train(tmp_path, "plain", *common, "--no-fused-logprobs", "--no-pack-sequences")
    _compare(fused, plain, ("loss", "grad_norm", "rewards/margin"), "fused vs plain head")


def test_shared_prompt_matches_unshared_on_one_device(tmp_path):
    """TransformerEngine's thd attention with different query and key boundaries (the rejected
    response's keys gathered as prompt + itself, bottom-right causal) and RoPE at the rows' positions
    train what the unshared packed rows train."""
    dpo = ("--loss-type", "dpo", "--pack-sequences")
    unshared = _train(tmp_path, "unshared", *dpo)
    shared = _train(tmp_path, "shared", *dpo, "--share-prompt")
    _compare(shared, unshared, ("loss", "grad_norm", "rewards/margin", "rewards/chosen"), "shared vs unshared prompt")
