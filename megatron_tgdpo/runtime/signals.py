"""Stop requests: SLURM preemption (SIGTERM / SIGUSR1), a time budget, and the launcher's death.

How a cluster stops a job: SLURM sends ``--signal`` (e.g. USR1 120 s before the end) and SIGTERM at
preemption to every task; torchrun forwards SIGTERM to its workers; a signal sent to a worker's process
group reaches its helper processes too. So, from the first line of the command to the last:

* the handler only sets a flag. It is installed by the command's entry point before anything heavy is
  imported (:func:`install_stop_handler`, first statement of ``megatron_tgdpo.train`` and
  ``megatron_tgdpo.ppo`` run as ``__main__``) and handed to the loop, so a job stopped while it imports,
  parses, loads data, models or checkpoints, or starts its helpers is neither killed nor loses the
  request. The ranks agree on the flag at fixed points (one all-reduce): right after ``--save`` is
  claimed and before the first step (stopped before there is anything new to save: ``<save>/REQUEUE``
  is written, nothing is saved, exit :data:`EXIT_REQUEUE`), and at every step boundary (save, then exit
  75). EX_TEMPFAIL, 75, means "requeue the job to continue";
* once the run's outcome is decided (the ranks agreed to stop, or the loop returned), the stop signals
  stay ignored until the process has exited: launchers signal the job again while it exits (torchrun
  SIGTERMs the remaining workers as soon as one has exited 75; SLURM sends SIGTERM after its
  ``--signal`` warning), and a worker killed on its way out reports -15, not 75 (or 0 after the final
  save);
* the handler restarts interrupted system calls (``SA_RESTART``), so a signal that lands inside a
  library's blocking call (a rendezvous, a socket read in C++) does not turn into an error there;
* the checkpoint writer's helper process ignores these signals from its first instruction and dies
  with its worker (``runtime.lifecycle.start_checkpoint_writer_helper``), so the save it is needed for
  can complete;
* workers die with their launcher (``runtime.lifecycle.set_parent_death_signal``), and the processes a
  worker forks (megatron-core's file writers) die with the worker: a SIGKILLed torchrun leaves no
  process writing checkpoints behind.

Only the standard library is imported at module level: the entry point imports this module first.
"""
from __future__ import annotations

import signal
import time
from typing import Callable, Optional

__all__ = ["EXIT_REQUEUE", "STOP_SIGNALS", "StopRequest", "install_stop_handler"]

EXIT_REQUEUE = 75  # EX_TEMPFAIL: saved on a signal or time budget; requeue the job to continue
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

_PROCESS_REQUEST: Optional["StopRequest"] = None  # installed by the command's entry point


class StopRequest:
    """SIGTERM / SIGUSR1 (or the time budget) set a flag; :meth:`should_stop` is the agreement.

    Two owners: the command's entry point (:func:`install_stop_handler`: for the life of the process,
    handed to the loop by :meth:`for_run`), or a loop run without one (a library call, the tests'
    forked ranks), which installs it for the run and puts the previous handlers back afterwards."""

    def __init__(self, exit_after_minutes: Optional[float] = None, *, whole_process: bool = False):
        self.flag = False
        self.reason = ""
        self.stopping = False  # the ranks agreed to stop: the process is on its way out
        self.whole_process = whole_process
        self.deadline: Optional[float] = None
        self.set_time_budget(exit_after_minutes)
        self._previous = {}
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handler)
            signal.siginterrupt(sig, False)  # SA_RESTART: a blocking call in C/C++ code is resumed, not failed

    @classmethod
    def for_run(cls, exit_after_minutes: Optional[float]) -> "StopRequest":
        """The request a training run acts on: the entry point's (with the run's time budget), or a new
        one installed for this run."""
        if _PROCESS_REQUEST is not None:
            _PROCESS_REQUEST.set_time_budget(exit_after_minutes)
            return _PROCESS_REQUEST
        return cls(exit_after_minutes)

    def set_time_budget(self, exit_after_minutes: Optional[float]) -> None:
        self.deadline = time.monotonic() + exit_after_minutes * 60 if exit_after_minutes else None

    def _handler(self, signum, _frame) -> None:
        self.flag = True
        self.reason = self.reason or signal.Signals(signum).name

    def ignore_from_now(self) -> None:
        """The outcome is decided: the stop signals are ignored until the process exits. SIG_IGN rather
        than our handler: Python resets its own handlers to the default late in interpreter shutdown,
        an ignored signal stays ignored."""
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)

    def restore(self) -> None:
        """End of a run: the previous handlers back (a run-owned request) or, after an agreed stop,
        SIG_IGN (see :meth:`ignore_from_now`). The entry point's request stays until the entry point
        decides (it ignores the signals once the exit code is known)."""
        if self.stopping:
            self.ignore_from_now()
        elif not self.whole_process:
            for sig, handler in self._previous.items():
                signal.signal(sig, handler)

    def should_stop(self) -> Optional[str]:
        """Collective: the reason if any rank was asked to stop (or ran out of time), else None."""
        import torch
        import torch.distributed as dist

        local = self.flag or (self.deadline is not None and time.monotonic() > self.deadline)
        if local and not self.reason:
            self.reason = "--exit-duration-in-mins"
        t = torch.tensor([1.0 if local else 0.0], device="cuda" if torch.cuda.is_available() else "cpu")
        if dist.is_initialized():
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        if t.item() == 0:
            return None
        self.stopping = True
        self.ignore_from_now()
        return self.reason or "a signal on another rank"

    def stop_before_training(self, *, save: Optional[str], say: Callable[[str], None]) -> Optional[int]:
        """Collective, before the first step: if the ranks agree to stop, there is nothing new to save
        (the state is what was loaded); rank 0 writes ``<save>/REQUEUE`` naming the newest checkpoint
        there, every rank waits for it, and :data:`EXIT_REQUEUE` is returned. None: go on."""
        import torch.distributed as dist

        reason = self.should_stop()
        if reason is None:
            return None
        if save is not None and (not dist.is_initialized() or dist.get_rank() == 0):
            from megatron_tgdpo import checkpointing
            from megatron_tgdpo.runtime import save_dir

            newest = max((it for it, _ in checkpointing.iteration_dirs(save)), default=0)
            save_dir.write_requeue_marker(save, iteration=newest, reason=reason, saved=False)
        if dist.is_initialized():
            dist.barrier()  # the marker is on disk before any rank exits (srun may then kill the rest)
        say(f"stopping before training ({reason}): nothing new to save; exit code {EXIT_REQUEUE} = requeue"
            + ("" if save else " (no --save)"))
        return EXIT_REQUEUE


def install_stop_handler() -> StopRequest:
    """The process-wide stop request (installed once; later calls return it). A command's entry point
    calls this as its first statement, before the heavy imports."""
    global _PROCESS_REQUEST
    if _PROCESS_REQUEST is None:
        _PROCESS_REQUEST = StopRequest(whole_process=True)
    return _PROCESS_REQUEST
