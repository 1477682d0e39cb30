"""``megatron-tgdpo demo``: the TGDPO method end to end in about two minutes on two CPU cores.

    megatron-tgdpo demo            # SFT -> on-policy pairs -> DPO -> TGDPO -> held-out scores
    megatron-tgdpo demo --full     # the full comparison (= megatron-tgdpo replicate)

A short run of the replication pipeline (``megatron_tgdpo.pipeline``, preset ``demo``) with the tiny
model on digit sorting (``sort: 7 2 9 4 =`` -> `` 2 4 7 9``): SFT on prompts and their answers, 30% of
them with one digit wrong (an imperfect teacher); the SFT model samples 8 answers per preference prompt;
the task's verifier scores them; best vs worst form the pairs; DPO trains from the SFT model and TGDPO,
guided by that DPO model, trains from the SFT model again; all three answer the same held-out prompts
greedily, and the table gives each one's mean verifier score, exact-match rate and win rate against
DPO. Everything lands under ``--workdir`` (default ``runs/demo``); a rerun reuses every finished stage.
One seed at this size is an illustration, not a measurement: docs/results.md has the multi-seed
comparison (``--full``).
"""
from __future__ import annotations

import sys
from typing import Optional, Sequence

from megatron_tgdpo.replicate import build_parser, run

__all__ = ["main"]


def main(argv: Optional[Sequence[str]] = None, *, prog: str = "python -m megatron_tgdpo.demo") -> int:
    parser = build_parser(prog=prog, doc=__doc__, default_workdir="runs/demo",
                          default_preset="demo")
    parser.add_argument("--full", action="store_true",
                        help="run the full replication instead (--preset full, --workdir runs/replicate)")
    args = parser.parse_args(argv)
    if args.full:
        args.preset = "full"
        if args.workdir == "runs/demo":
            args.workdir = "runs/replicate"
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
