"""Fixtures shared by more than one file of ``tests/e2e``.

``smoke_replication``: ``python -m megatron_tgdpo.replicate --preset smoke`` run once into a fresh work
directory and then again (the resume), for the whole session. ``test_replicate.py`` checks both runs;
``test_replicate_controls.py`` starts its controls run from a copy of the finished directory, so the SFT
model, the samples, the pairs, DPO and TGDPO (the same settings, so the same stage fingerprints) are
trained once for both files instead of twice.
"""
from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from megatron_tgdpo.testing import run_command, user_env

from suite import ROOT


@dataclass(frozen=True)
class SmokeReplication:
    work: Path  # the work directory, as the second run left it
    first: subprocess.CompletedProcess  # the run into the empty directory
    results_after_first: str  # results.json as the first run wrote it
    again: subprocess.CompletedProcess  # the second run: every stage done already


def replicate(workdir: Path, *flags: str, timeout: float) -> subprocess.CompletedProcess:
    """``replicate --preset smoke --workdir WORKDIR FLAGS`` in the user's environment (no PYTHONWARNINGS,
    so a library warning would reach the console)."""
    return run_command([sys.executable, "-m", "megatron_tgdpo.replicate", "--preset", "smoke", "--workdir",
                        str(workdir), *flags], cwd=ROOT, env=user_env(), timeout=timeout)


@pytest.fixture(scope="session")
def smoke_replication(tmp_path_factory: pytest.TempPathFactory) -> SmokeReplication:
    work = tmp_path_factory.mktemp("smoke_replication") / "work"
    first = replicate(work, timeout=1200)
    results = (work / "results.json").read_text() if first.returncode == 0 else ""
    again = replicate(work, timeout=1200) if first.returncode == 0 else first
    return SmokeReplication(work=work, first=first, results_after_first=results, again=again)
