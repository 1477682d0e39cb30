"""Stop requests: SLURM preemption (SIGTERM / SIGUSR1), a time budget, and the launcher's death.

How a cluster stops a job: SLURM sends ``--signal`` (e.g. USR1 120 s before the end) and SIGTERM at
preemption to every task; torchrun forwards SIGTERM to its workers; a signal sent to a worker's process
group reaches its helper processes too. So:

* the handler only sets a flag; the ranks agree on it at the next step boundary (one all-reduce),
  save, and exit with :data:`EXIT_REQUEUE` (75, EX_TEMPFAIL). The handler is installed when the run
  starts (``runtime.loop.run``, before data, models and checkpoints are loaded), so a job preempted
  while it loads still saves and requeues;
* once the ranks have agreed to stop, the stop signals stay ignored until the process has exited:
  launchers signal the job again while it exits (torchrun SIGTERMs the remaining workers as soon as
  one has exited 75; SLURM sends SIGTERM after its ``--signal`` warning), and a worker killed on its
  way out reports -15, not 75;
* the checkpoint writer's helper process ignores these signals and dies with its worker
  (``compat.start_checkpoint_writer_helper``), so the save it is needed for can complete;
* workers die with their launcher (``compat.set_parent_death_signal``), and the processes a worker
  forks (megatron-core's file writers) die with the worker: a SIGKILLed torchrun leaves no process
  writing checkpoints behind.
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
        self.stopping = False  # the ranks agreed to stop: the process is on its way out
        self.deadline = time.monotonic() + exit_after_minutes * 60 if exit_after_minutes else None
        self._previous = {sig: signal.signal(sig, self._handler) for sig in STOP_SIGNALS}

    def _handler(self, signum, _frame) -> None:
        self.flag = True
        self.reason = self.reason or signal.Signals(signum).name

    def restore(self) -> None:
        """The previous handlers back; after an agreed stop, SIG_IGN instead (see the module docstring).
        SIG_IGN rather than our handler: Python resets its own handlers to the default late in
        interpreter shutdown, an ignored signal stays ignored."""
        for sig, handler in self._previous.items():
            signal.signal(sig, signal.SIG_IGN if self.stopping else handler)

    def should_stop(self) -> Optional[str]:
        """Collective: the reason if any rank was asked to stop (or ran out of time), else None."""
        local = self.flag or (self.deadline is not None and time.monotonic() > self.deadline)
        if local and not self.reason:
            self.reason = "--exit-duration-in-mins"
        t = torch.tensor([1.0 if local else 0.0], device="cuda" if torch.cuda.is_available() else "cpu")
        if dist.is_initialized():
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        if t.item() == 0:
            return None
        self.stopping = True
        return self.reason or "a signal on another rank"
