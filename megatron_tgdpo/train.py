"""``python -m megatron_tgdpo.train``: DPO / TGDPO / IPO / SimPO (and SFT) training on megatron-core.

Launch with ``torchrun --nproc-per-node N -m megatron_tgdpo.train ...`` or ``srun python -m
megatron_tgdpo.train ...``. This module is the entry point: it parses the flags, picks the algorithm
for ``--loss-type`` and hands both to the shared runtime loop (``megatron_tgdpo.runtime.loop``).

Exit codes: 0 finished; 2 configuration error (nothing was run); 75 stopped on SIGTERM/SIGUSR1 or the
time budget after saving (requeue; ``<save>/REQUEUE`` says the same for launchers that hide the 75);
1 anything else (the error is printed).
"""
from __future__ import annotations

import sys
from typing import Optional

import torch.distributed as dist

from megatron_tgdpo import distributed
from megatron_tgdpo.config import ConfigError, TrainConfig, parse_args
from megatron_tgdpo.runtime.signals import EXIT_REQUEUE

__all__ = ["EXIT_REQUEUE", "algorithm_for", "main", "run"]


def algorithm_for(cfg: TrainConfig):
    """The algorithm class that trains ``cfg.loss_type``."""
    if cfg.loss_type == "sft":
        from megatron_tgdpo.algorithms.sft import SFTAlgorithm

        return SFTAlgorithm
    from megatron_tgdpo.algorithms.preference import PreferenceAlgorithm

    return PreferenceAlgorithm


def run(cfg: TrainConfig) -> int:
    """Train on every rank of an initialised process group; returns the exit code."""
    from megatron_tgdpo.runtime import loop

    return loop.run(cfg, algorithm_for(cfg))


def _say(text: str) -> None:
    if distributed.launch_rank() == 0:
        print(text, file=sys.stderr, flush=True)


def main(argv: Optional[list[str]] = None) -> None:
    from megatron_tgdpo import compat
    from megatron_tgdpo.runtime.console import quiet_library_warnings

    if distributed.read_launch_env().launcher != "single":
        compat.set_parent_death_signal()  # before the slow imports: a launcher killed now leaves no worker
    try:
        cfg = parse_args(argv)
    except ConfigError as exc:
        _say(str(exc))
        sys.exit(2)
    quiet_library_warnings(verbose=cfg.verbose)
    distributed.init_process_group(distributed.read_launch_env())
    code = 1
    try:
        code = run(cfg)
    except ConfigError as exc:
        if dist.get_rank() == 0:
            print(str(exc), file=sys.stderr, flush=True)
        code = 2
    except Exception as exc:  # noqa: BLE001 - one line per rank with the cause; the traceback with --verbose
        from megatron_tgdpo.runtime.loop import NonFiniteError
        from megatron_tgdpo.checkpointing import CheckpointError

        if isinstance(exc, (NonFiniteError, CheckpointError)) and not cfg.verbose:
            if dist.get_rank() == 0:
                print(f"error: {exc}", file=sys.stderr, flush=True)
        else:
            raise
    finally:
        distributed.destroy()
    sys.exit(code)


if __name__ == "__main__":  # megatron's checkpoint code spawns processes that re-import __main__
    main()
