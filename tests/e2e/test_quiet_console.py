"""The console shows the run, not library warnings, on every rank; ``--verbose`` shows them.

Through the real CLI (torchrun, 2 ranks, TP=2): a DPO run that saves, then a TGDPO run that loads that
torch_dist checkpoint as its guidance model (the paths that print megatron-core's and torch's notices:
TP linear layers, the optimizer fallback, the torch_dist loader). Python's own warning settings are left
at their defaults (no PYTHONWARNINGS), as a user has them.
"""
from __future__ import annotations

import subprocess
import sys

from megatron_tgdpo.testing import run_command, torchrun, user_env

from suite import ROOT, side_by_side

FALLBACK_NOTICE = "Transformer Engine and Apex are not installed. Falling back to Torch optimizers."


def _torchrun(*flags: str) -> subprocess.CompletedProcess:
    env = user_env(OMP_NUM_THREADS="1")  # as the demo sets it (torchrun itself warns when it is unset)
    return run_command([*torchrun(2), "-m", "megatron_tgdpo.train", *flags], cwd=ROOT, env=env)


def _warning_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if "Warning" in line or "warnings.warn" in line]


def test_no_library_warning_on_any_rank_unless_verbose(tmp_path):
    common = ["--model", "tiny", "--micro-batch-size", "2", "--global-batch-size", "4", "--seq-length", "64",
              "--tensor-model-parallel-size", "2", "--eval-iters", "1", "--data-cache-dir", str(tmp_path / "data"),
              "--no-tensorboard"]
    dpo = _torchrun(*common, "--loss-type", "dpo", "--train-iters", "2", "--save", str(tmp_path / "dpo"))
    assert dpo.returncode == 0, dpo.stderr[-3000:]
    guided = [*common, "--loss-type", "tgdpo", "--train-iters", "1", "--guidance-load", str(tmp_path / "dpo")]
    # The same guided run without and with --verbose: both only read the DPO run's files, so side by side.
    tgdpo, verbose = side_by_side(lambda: _torchrun(*guided), lambda: _torchrun(*guided, "--verbose"))
    assert tgdpo.returncode == 0, tgdpo.stderr[-3000:]
    for run in (dpo, tgdpo):
        assert _warning_lines(run.stderr) == [], run.stderr[-3000:]
        assert _warning_lines(run.stdout) == [], run.stdout[-3000:]
    assert "iter      1/1" in tgdpo.stdout

    assert verbose.returncode == 0, verbose.stderr[-3000:]
    assert verbose.stderr.count(FALLBACK_NOTICE) == 2, verbose.stderr[-3000:]  # one per rank
    assert "deprecating ShardedTensor" in verbose.stderr  # the torch_dist loader's notice, hidden above


def test_the_environment_variable_is_verbose_too():
    """``MEGATRON_TGDPO_VERBOSE=1`` does what ``--verbose`` does (the entry point's filter set-up, then
    megatron-core's optimizer import, which prints the fallback notice on CPU)."""
    code = ("from megatron_tgdpo.runtime.console import quiet_library_warnings; quiet_library_warnings(); "
            "import megatron.core.optimizer")
    env = user_env()
    quiet, loud = side_by_side(  # two independent processes: one on each core
        lambda: subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                               timeout=120),
        lambda: subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=dict(env, MEGATRON_TGDPO_VERBOSE="1"),
                               capture_output=True, text=True, timeout=120))
    assert quiet.returncode == 0 and loud.returncode == 0, quiet.stderr + loud.stderr
    assert _warning_lines(quiet.stderr) == [], quiet.stderr
    assert FALLBACK_NOTICE in loud.stderr, loud.stderr
