"""Stop requests: SLURM preemption (SIGTERM / SIGUSR1), a time budget, and the launcher's death.

How a cluster stops a job: SLURM sends ``--signal`` (e.g. USR1 120 s before the end) and SIGTERM at
preemption to every task; torchrun forwards SIGTERM to its workers; a signal sent to a worker's process
group reaches its helper processes too. So:

* the handler only sets a flag; the ranks agree on it at the next step boundary (one all-reduce),
  save, and exit with :data:`EXIT_REQUEUE` (75, EX_TEMPFAIL);
* the checkpoint writer's helper process ignores these signals and dies with its worker
  (``compat.start_checkpoint_writer_helper``), so the save it is needed for can complete;
* workers die with their launcher (``compat.set_parent_death_signal``): a SIGKILLed torchrun leaves
  no worker writing checkpoints behind.
"""
from __future__ import annotations

import signal
import time
from typing import Optional

import torch
import torch.distributed as dist

__all__ = ["EXIT_REQUEUE", "STOP_SIGNALS", "StopRequest"]

EXIT_REQUEUE = 75  # EX_TEMPFAIL: saved on a signal or time budget; requeue the job to continue
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequest:
    """SIGTERM / SIGUSR1 (or the time budget) set a flag; :meth:`should_stop` is the agreement."""

    def __init__(self, exit_after_minutes: Optional[float]):
        self.flag = False
        self.reason = ""
        self.deadline = time.monotonic() + exit_after_minutes * 60 if exit_after_minutes else None
        self._previous = {sig: signal.signal(sig, self._handler) for sig in STOP_SIGNALS}

    def _handler(self, signum, _frame) -> None:
        self.flag = True
        self.reason = self.reason or signal.Signals(signum).name

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def should_stop(self) -> Optional[str]:
        """Collective: the reason if any rank was asked to stop (or ran out of time), else None."""
        local = self.flag or (self.deadline is not None and time.monotonic() > self.deadline)
        if local and not self.reason:
            self.reason = "--exit-duration-in-mins"
        t = torch.tensor([1.0 if local else 0.0], device="cuda" if torch.cuda.is_available() else "cpu")
        if dist.is_initialized():
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return (self.reason or "a signal on another rank") if t.item() > 0 else None
