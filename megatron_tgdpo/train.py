"""``python -m megatron_tgdpo.train``: DPO / TGDPO / IPO / SimPO (and SFT) training on megatron-core.

Launch with ``torchrun --nproc-per-node N -m megatron_tgdpo.train ...`` or ``srun python -m
megatron_tgdpo.train ...``. This module is the entry point: it parses the flags, picks the algorithm
for ``--loss-type`` and hands both to the shared runtime loop (``megatron_tgdpo.runtime.loop``), which
schedules a ``runtime.trainer.Trainer``.

Exit codes: 0 finished; 2 configuration error (nothing was run); 75 stopped on SIGTERM/SIGUSR1 or the
time budget after saving, or before the first step with nothing new to save (requeue; ``<save>/REQUEUE``
says the same for launchers that hide the 75); 1 anything else (the error is printed). The stop
handler is installed by this module's first statement when it runs as ``__main__``.
"""
from __future__ import annotations

if __name__ == "__main__":  # before any heavy import: from here a stop signal only sets a flag
    from megatron_tgdpo.runtime.signals import install_stop_handler

    install_stop_handler()

import sys  # noqa: E402
from typing import Optional  # noqa: E402

from megatron_tgdpo.algorithms import algorithm_for  # noqa: E402
from megatron_tgdpo.config import TrainConfig, parse_args  # noqa: E402
from megatron_tgdpo.runtime.signals import EXIT_REQUEUE  # noqa: E402

__all__ = ["EXIT_REQUEUE", "main", "run"]


def run(cfg: TrainConfig) -> int:
    """Train on every rank of an initialised process group; returns the exit code."""
    from megatron_tgdpo.runtime import loop

    return loop.run(cfg, algorithm_for(cfg.loss_type))


def main(argv: Optional[list[str]] = None) -> int:
    """Parse ``argv`` (default: the command line), train, and return the exit code."""
    from megatron_tgdpo.runtime.entry import launch

    return launch(lambda: parse_args(argv), run, verbose=lambda cfg: cfg.verbose)


if __name__ == "__main__":  # megatron's checkpoint code spawns processes that re-import __main__
    sys.exit(main())
