"""The training worker: several ``megatron_tgdpo.train`` runs, one after another, in one process.

    python -m megatron_tgdpo.pipeline.train_jobs JOBS.json        # or under torchrun, every rank alike

``JOBS.json`` is a list of flag lists, exactly what ``python -m megatron_tgdpo.train`` takes. Each run
goes through the same runtime loop as the command line (set-up, seeding, training, saving); only the
process start (importing torch and megatron-core, the process group, the checkpoint writer's helper)
is shared, which on a small model costs more than the training itself. A run sees the state a fresh
process would: the loop re-creates the parallel groups and re-seeds every generator.
Exit status: 0 when every run finished, else the first failing run's code (later runs are not started).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional, Sequence

__all__ = ["main"]


def main(argv: Optional[Sequence[str]] = None) -> int:
    from megatron_tgdpo.config import ConfigError, parse_args

    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        print("usage: python -m megatron_tgdpo.pipeline.train_jobs JOBS.json", file=sys.stderr)
        return 2
    jobs = json.loads(Path(args[0]).read_text())
    try:
        configs = [parse_args(flags) for flags in jobs]  # every job's flags checked before the first runs
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return 2

    import torch.distributed as dist

    from megatron_tgdpo import distributed
    from megatron_tgdpo.algorithms import algorithm_for
    from megatron_tgdpo.runtime import loop
    from megatron_tgdpo.runtime.console import quiet_library_warnings

    quiet_library_warnings(verbose=False)
    distributed.init_process_group(distributed.read_launch_env())
    try:
        for index, (flags, cfg) in enumerate(zip(jobs, configs), start=1):
            if dist.get_rank() == 0:
                print(f"=== run {index}/{len(jobs)}: megatron_tgdpo.train {' '.join(flags)}", flush=True)
            try:
                code = loop.run(cfg, algorithm_for(cfg.loss_type))
            except ConfigError as exc:
                if dist.get_rank() == 0:
                    print(str(exc), file=sys.stderr, flush=True)
                code = 2
            if code != 0:
                return code
    finally:
        distributed.destroy()
    return 0


if __name__ == "__main__":  # megatron's checkpoint code spawns processes that re-import __main__
    sys.exit(main())
