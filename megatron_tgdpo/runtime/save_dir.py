"""The ``--save`` directory of a running job: writable, owned by one job, and the requeue marker.

* :func:`check_writable` creates ``--save``/``--log-dir`` and writes a probe file before any compute,
  so a read-only or missing mount fails at start, not at the first save hours later.
* :class:`SaveLock` — a POSIX record lock on ``<save>/.megatron_tgdpo.lock`` held by global rank 0 for
  the whole run. A second job on the same ``--save`` (a restart while the old job's workers still run)
  is refused with the holder's host, PID and job id. The kernel releases the lock when its holder dies,
  so a stale lock from a dead job is taken over without any clean-up. POSIX locks (``lockf``) work on
  NFS; on a file system without locking the lock is reported as unsupported and not enforced.
* ``<save>/REQUEUE`` — written by rank 0 when the job stops on a signal or time budget, after saving,
  or without saving when it stopped before its first step (exit code 75 on every worker; every rank
  waits for the marker before it exits). Launchers that
  report their own exit code (torchrun exits 1 when a worker exits 75; ``srun --kill-on-bad-exit`` may
  report another task's) hide the 75; the sbatch examples requeue when this file exists. It names the
  iteration of the newest checkpoint and the reason. Removed when a run starts, so a run that finishes,
  fails or is killed leaves none.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Optional

from megatron_tgdpo.integrity import write_json_atomic

__all__ = ["LOCK_FILE", "REQUEUE_MARKER", "SaveDirInUse", "SaveLock", "check_writable", "clear_requeue_marker",
           "write_requeue_marker"]

LOCK_FILE = ".megatron_tgdpo.lock"
REQUEUE_MARKER = "REQUEUE"


class SaveDirInUse(RuntimeError):
    """Another live job holds the ``--save`` directory."""


def check_writable(path: str | os.PathLike, *, flag: str) -> Optional[str]:
    """None if ``path`` is (made) a writable directory, else the problem, naming ``flag``."""
    path = Path(path)
    probe = path / f".write-probe.{socket.gethostname()}.{os.getpid()}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"ok")
    except OSError as exc:
        return f"{flag} {path}: not writable ({exc.strerror or exc}); choose a writable directory"
    finally:
        # A full disk creates the file and then fails the write: remove it either way.
        with contextlib.suppress(OSError):
            probe.unlink()
    return None


def _job_id() -> Optional[str]:
    for var in ("SLURM_JOB_ID", "TORCHELASTIC_RUN_ID"):
        if os.environ.get(var):
            return f"{var}={os.environ[var]}"
    return None


class SaveLock:
    """Exclusive ownership of a save directory for this process (global rank 0 of a job)."""

    def __init__(self, root: str | os.PathLike):
        self.path = Path(root) / LOCK_FILE
        self._fd: Optional[int] = None

    def acquire(self) -> None:
        """Take the lock or raise :class:`SaveDirInUse` naming the holder."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)  # closing any descriptor of the file would drop our own lock: we hold none
            if exc.errno in (errno.EACCES, errno.EAGAIN):
                raise SaveDirInUse(f"--save {self.path.parent} is in use by another job ({self._holder()}); wait for "
                                   "it to finish or stop it, or save elsewhere") from None
            if exc.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                return  # no locking on this file system: nothing to enforce with
            raise
        holder = {"host": socket.gethostname(), "pid": os.getpid(), "job": _job_id(),
                  "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
        os.fsync(fd)
        self._fd = fd

    def _holder(self) -> str:
        try:
            info = json.loads(self.path.read_text(encoding="utf-8"))
            parts = [f"host {info.get('host')}", f"pid {info.get('pid')}"]
            if info.get("job"):
                parts.append(str(info["job"]))
            parts.append(f"since {info.get('since')}")
            return ", ".join(parts)
        except (OSError, ValueError):
            return "holder unknown"

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # releases the lock; the file stays (taking it over needs no clean-up)
            self._fd = None


def write_requeue_marker(root: str | os.PathLike, *, iteration: int, reason: str, saved: bool = True) -> Path:
    """``<root>/REQUEUE``: resume from ``iteration`` (the newest checkpoint); written atomically.
    ``saved``: this run wrote that checkpoint (False: it stopped before it had anything new to save)."""
    path = Path(root) / REQUEUE_MARKER
    write_json_atomic(path, {"iteration": iteration, "reason": reason, "saved": saved, "host": socket.gethostname(),
                             "job": _job_id(), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "exit_code": 75})
    return path


def clear_requeue_marker(root: str | os.PathLike) -> None:
    (Path(root) / REQUEUE_MARKER).unlink(missing_ok=True)
