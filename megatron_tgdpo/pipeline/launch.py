"""Child processes of the pipeline: training jobs (1 rank, or N gloo/NCCL ranks under torchrun) and
the sampling worker. Each writes its output to a log file; a failure raises with the log's tail."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Sequence

from megatron_tgdpo.distributed import free_port
from megatron_tgdpo.pipeline.stages import PipelineError

__all__ = ["run_module", "train_jobs"]


def _tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def run_module(module: str, args: Sequence[str], *, log: Path, nproc: int = 1, threads: int = 1) -> None:
    """``python -m module args`` (``nproc`` > 1: under ``torch.distributed.run``), output to ``log``.

    One rank gets a free ``MASTER_PORT`` (its process group is a world of one; the default port could be
    taken by another job on the machine); ``OMP_NUM_THREADS`` splits ``threads`` among the ranks."""
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
               f"--master-port={free_port()}", "-m", module, *args]
    else:
        cmd = [sys.executable, "-m", module, *args]
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, threads // nproc)), PYTHONWARNINGS="ignore",
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):  # never inherit a launcher's rank
        env.pop(key, None)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as handle:
        handle.write("$ " + " ".join(cmd) + "\n")
        handle.flush()
        result = subprocess.run(cmd, stdout=handle, stderr=subprocess.STDOUT, env=env)
    if result.returncode != 0:
        raise PipelineError(f"`{' '.join(cmd[1:4])} ...` exited with code {result.returncode}; log {log}:\n"
                            f"{_tail(log)}")


def train_jobs(jobs: Sequence[Sequence[str]], *, log: Path, nproc: int, threads: int) -> None:
    """Training runs (``megatron_tgdpo.train`` flag lists), in order, in one worker process (``train_jobs.py``)."""
    spec = log.with_suffix(".jobs.json")
    spec.parent.mkdir(parents=True, exist_ok=True)
    spec.write_text(json.dumps([list(flags) for flags in jobs], indent=1))
    run_module("megatron_tgdpo.pipeline.train_jobs", [str(spec)], log=log, nproc=nproc, threads=threads)
