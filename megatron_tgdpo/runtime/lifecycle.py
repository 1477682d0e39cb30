"""Process lifecycle of a training worker: it dies with its launcher, and so does everything it starts.

* :func:`set_parent_death_signal` — Linux ``PR_SET_PDEATHSIG``: SIGKILL this process when its parent
  (torchrun, srun's step daemon) dies, so a SIGKILLed launcher leaves no worker behind.
* :func:`start_checkpoint_writer_helper` — the helper process megatron-core's torch_dist writer needs,
  started so that it ignores the job-wide stop signals *before it can receive one* and dies with the
  worker; the processes the worker forks from then on (the file writers) die with it too.

Stop signals themselves (the flag, the agreement between ranks, exit 75) are ``runtime.signals``.

This module depends on the standard library only (megatron-core is imported inside the helper start):
``distributed`` (the foundation layer) calls :func:`set_parent_death_signal` when a launcher started
the process.
"""
from __future__ import annotations

import contextlib
import functools
import os
import signal
import threading
import warnings
from typing import Iterator, Optional

__all__ = ["HELPER_IGNORED_SIGNALS", "set_parent_death_signal", "start_checkpoint_writer_helper",
           "stop_signals_blocked"]

#: What a helper ignores: the launchers' stop signals (SLURM, torchrun) and the terminal's interrupt.
#: The worker decides when to stop; a helper that died with them would break the save they ask for.
HELPER_IGNORED_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)

_WRITER_MANAGER = None  # kept alive for the life of the process
_FORK_PARENT: Optional[int] = None  # set just before each fork of this process (see _forked_children_die_with_us)


@functools.lru_cache(maxsize=None)
def _prctl():
    """libc's prctl, looked up once: a forked child calls it without loading anything (no dlopen after a
    fork of a multi-threaded process)."""
    import ctypes

    return ctypes.CDLL(None, use_errno=True).prctl


def set_parent_death_signal(*, expected_parent: Optional[int] = None) -> None:
    """Linux: SIGKILL this process when its parent (the launcher) dies. A no-op elsewhere.

    The kernel only signals a death that happens after this call; a parent that is already gone is
    detected by comparing the current parent with ``expected_parent`` (default: the parent seen just
    before the call), and then this process kills itself."""
    try:
        parent = os.getppid() if expected_parent is None else expected_parent
        _prctl()(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the parent died before prctl: nobody will signal us
            os.kill(os.getpid(), signal.SIGKILL)
    except (OSError, AttributeError):
        pass


def _note_fork_parent() -> None:
    global _FORK_PARENT
    # Only forks from the main thread: the kernel's parent-death signal follows the forking *thread*.
    _FORK_PARENT = os.getpid() if threading.current_thread() is threading.main_thread() else None


def _die_with_fork_parent() -> None:
    if _FORK_PARENT is not None:
        set_parent_death_signal(expected_parent=_FORK_PARENT)


def _forked_children_die_with_us() -> None:
    """Every process this worker forks from now on gets SIGKILL when the worker dies.

    megatron-core's torch_dist writer forks one process per file it writes. A worker killed during a
    save (its launcher SIGKILLed: the worker gets its parent-death signal) left those children
    blocked for ever on a lock the worker held, and with them the spawn resource tracker, which waits
    for every holder of its pipe to exit."""
    try:
        _prctl()  # resolved here, in the parent
    except (OSError, AttributeError):
        return  # not Linux: no parent-death signal to set
    os.register_at_fork(before=_note_fork_parent, after_in_child=_die_with_fork_parent)


@contextlib.contextmanager
def stop_signals_blocked() -> Iterator[None]:
    """Hold back :data:`HELPER_IGNORED_SIGNALS` in the calling thread while processes are started.

    The signal mask is inherited through fork and exec, so a helper started in here cannot be killed
    by a job-wide signal before its own code has set the signals to ignored (which discards one that
    is pending, then unblocks). In this process a signal that arrived meanwhile is delivered when the
    block ends (or to another thread at once): the stop handler still sees it."""
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, HELPER_IGNORED_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _shield_helper_process() -> None:
    """Runs inside the helper, started with the stop signals blocked: ignore them (a pending one is
    discarded), unblock them, and die with the worker (a parent-death signal), so the helper neither
    breaks a preemption save nor lingers."""
    import multiprocessing

    for sig in HELPER_IGNORED_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, HELPER_IGNORED_SIGNALS)
    # spawn records the worker's pid: a worker that died while this helper was starting is noticed too
    worker = multiprocessing.parent_process()
    set_parent_death_signal(expected_parent=worker.pid if worker is not None else None)


def start_checkpoint_writer_helper() -> bool:
    """Start the helper process megatron-core's torch_dist writer uses for its write results, shielded.

    megatron-core (0.16 and 0.19, ``dist_checkpointing/strategies/filesystem_async.py``) creates a
    spawn-context ``multiprocessing`` Manager on the first save and keeps it in the module-global
    ``_results_queue``. It sits in the worker's process group, so SIGTERM/SIGUSR1 sent to the job's
    processes (what SLURM and torchrun do) killed it and the preemption save then failed with
    BrokenPipeError. We create that queue ourselves, from a Manager whose process ignores those signals
    from its first instruction on (it starts with them blocked: :func:`stop_signals_blocked`; the spawn
    resource tracker started with it inherits the block too) and dies with the worker; the writer
    processes the worker forks die with it too. Returns False (nothing changed) if the global is not
    where we expect."""
    global _WRITER_MANAGER
    if _WRITER_MANAGER is not None:
        return True
    import multiprocessing as mp
    from multiprocessing import resource_tracker
    from multiprocessing.managers import SyncManager

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if not hasattr(filesystem_async, "_results_queue"):
        warnings.warn("megatron-core's checkpoint writer changed; its helper process is not shielded from "
                      "job-wide signals", RuntimeWarning)
        return False
    if filesystem_async._results_queue is not None:
        return True  # already created (unshielded) by an earlier save; leave it
    manager = SyncManager(ctx=mp.get_context("spawn"))
    with stop_signals_blocked():
        # spawn's resource tracker, started with the first spawned process, unblocks SIGINT/SIGTERM in the
        # starting thread once it runs (it ignores them itself): start it first, then block again.
        resource_tracker.ensure_running()
        if hasattr(signal, "pthread_sigmask"):
            signal.pthread_sigmask(signal.SIG_BLOCK, HELPER_IGNORED_SIGNALS)
        manager.start(initializer=_shield_helper_process)
    filesystem_async._results_queue = manager.Queue()
    _WRITER_MANAGER = manager
    _forked_children_die_with_us()
    return True
