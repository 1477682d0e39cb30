"""Child processes of the pipeline: training jobs (1 rank, or N gloo/NCCL ranks under torchrun) and
the sampling worker. Each writes its output to a log file; a failure raises with the log's tail."""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Optional, Sequence

from megatron_tgdpo.distributed import free_port
from megatron_tgdpo.pipeline.stages import PipelineError

__all__ = ["run_logged", "run_module", "train_jobs"]


def _tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# A launcher's rank variables: a child started here is a job of its own (torchrun or one process).
_RANK_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS")


def run_logged(cmd: Sequence[str], *, log: Path, what: Optional[str] = None, cwd: Optional[Path] = None,
               **env: str) -> None:
    """``cmd`` as a job of its own (a free ``MASTER_PORT`` on the loopback, no inherited rank variables,
    ``env`` added), its command line and output in ``log``. Raises :class:`PipelineError` naming ``what``
    (default: the command) with the log's tail when it fails."""
    environ = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), **env)
    for key in _RANK_VARIABLES:
        environ.pop(key, None)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as handle:
        handle.write("$ " + " ".join(shlex.quote(str(c)) for c in cmd) + "\n")
        handle.flush()
        result = subprocess.run(list(cmd), stdout=handle, stderr=subprocess.STDOUT, env=environ, cwd=cwd)
    if result.returncode != 0:
        what = what or f"`{' '.join(map(str, cmd[1:4]))} ...`"
        raise PipelineError(f"{what} exited with code {result.returncode}; log {log}:\n{_tail(log)}")


def run_module(module: str, args: Sequence[str], *, log: Path, nproc: int = 1, threads: int = 1) -> None:
    """``python -m module args`` (``nproc`` > 1: under ``torch.distributed.run``), output to ``log``;
    ``OMP_NUM_THREADS`` splits ``threads`` among the ranks (one rank still gets its own free port: its
    process group is a world of one, and the default port could be taken by another job)."""
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
               f"--master-port={free_port()}", "-m", module, *args]
    else:
        cmd = [sys.executable, "-m", module, *args]
    run_logged(cmd, log=log, OMP_NUM_THREADS=str(max(1, threads // nproc)), PYTHONWARNINGS="ignore")


def train_jobs(jobs: Sequence[Sequence[str]], *, log: Path, nproc: int, threads: int) -> None:
    """Training runs (``megatron_tgdpo.train`` flag lists), in order, in one worker process (``train_jobs.py``)."""
    spec = log.with_suffix(".jobs.json")
    spec.parent.mkdir(parents=True, exist_ok=True)
    spec.write_text(json.dumps([list(flags) for flags in jobs], indent=1))
    run_module("megatron_tgdpo.pipeline.train_jobs", [str(spec)], log=log, nproc=nproc, threads=threads)
