"""The command-line shell of every trainer (``megatron_tgdpo.train``, ``megatron_tgdpo.ppo``): parse the
flags, start the process group, run, and turn what went wrong into an exit code and one line.

Exit codes: 0 finished; 2 configuration error (nothing was run, or the run refused before computing);
75 stopped for requeue (the loop's code, passed through); 1 anything else. Stop signals only set a flag
from the command's first statement on (``runtime.signals.install_stop_handler``; :func:`launch` installs
it too when a caller did not) and are ignored once the exit code is known, so a signal during the
teardown (destroying the process group, interpreter exit) changes nothing. Known failures (a
non-finite loss beyond the limit, no loadable checkpoint, and what the caller adds in ``expected``)
print one ``error:`` line from rank 0; others raise with their traceback, and ``--verbose`` gives the
traceback for all of them.
"""
from __future__ import annotations

import sys
from typing import Callable, TypeVar

import torch.distributed as dist

from megatron_tgdpo import distributed
from megatron_tgdpo.config import ConfigError
from megatron_tgdpo.runtime.lifecycle import set_parent_death_signal
from megatron_tgdpo.runtime.signals import install_stop_handler

__all__ = ["launch"]

Parsed = TypeVar("Parsed")


def _say(text: str) -> None:
    """Before the process group exists: only the launch's rank 0 speaks."""
    if distributed.launch_rank() == 0:
        print(text, file=sys.stderr, flush=True)


def launch(parse: Callable[[], Parsed], run: Callable[[Parsed], int], *, verbose: Callable[[Parsed], bool],
           expected: Callable[[], tuple[type[BaseException], ...]] = tuple) -> int:
    """``run(parse())`` on every rank of a fresh process group; returns the exit code. ``expected()``
    names the caller's own known failures (called only on failure, so their modules load late)."""
    stop = install_stop_handler()  # normally done already by the command's first statement: a no-op then
    from megatron_tgdpo.runtime.console import quiet_library_warnings

    if distributed.read_launch_env().launcher != "single":
        set_parent_death_signal()  # before the slow imports: a launcher killed now leaves no worker
    try:
        parsed = parse()
    except ConfigError as exc:
        _say(str(exc))
        return 2
    quiet_library_warnings(verbose=verbose(parsed))
    distributed.init_process_group(distributed.read_launch_env())
    code = 1
    try:
        code = run(parsed)
    except ConfigError as exc:
        if dist.get_rank() == 0:
            print(str(exc), file=sys.stderr, flush=True)
        code = 2
    except Exception as exc:  # noqa: BLE001 - one line per rank with the cause; the traceback with --verbose
        from megatron_tgdpo.checkpointing import CheckpointError
        from megatron_tgdpo.runtime.loop import NonFiniteError

        if isinstance(exc, (NonFiniteError, CheckpointError, *expected())) and not verbose(parsed):
            if dist.get_rank() == 0:
                print(f"error: {exc}", file=sys.stderr, flush=True)
        else:
            raise
    finally:
        stop.ignore_from_now()  # the outcome is decided: a signal during the teardown changes nothing
        distributed.destroy()
    return code
