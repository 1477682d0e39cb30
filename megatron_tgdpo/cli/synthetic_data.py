"""``megatron-tgdpo synthetic-data``: generate the built-in synthetic preference data set (digit
sorting) and its tokenizer.

    megatron-tgdpo synthetic-data --output-dir synthetic --seed 1234

Writes train.jsonl, eval.jsonl (prompts disjoint from train) and tokenizer.model; the same --seed gives
byte-identical files (the package ships the set made with --seed 1234 in ``megatron_tgdpo/resources``).
See megatron_tgdpo/data/synthetic.py for the task and why it is learnable.
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from megatron_tgdpo import flag_checks
from megatron_tgdpo.data.synthetic import write_synthetic_dataset

#: the allowed values of this command's numeric flags (see megatron_tgdpo.flag_checks)
BOUNDS = {
    "--seed": flag_checks.BOUNDS["--seed"],
    "--num-train": flag_checks.Bound(1, 10**8, integer=True),
    "--num-eval": flag_checks.Bound(1, 10**8, integer=True),
}


def main(argv: Optional[Sequence[str]] = None, *, prog: Optional[str] = None,
         default_output_dir: str = "synthetic") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default=default_output_dir, help=f"default {default_output_dir}")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--num-train", type=int, default=4000)
    parser.add_argument("--num-eval", type=int, default=500)
    args = flag_checks.checked_parser(parser, bounds=BOUNDS).parse_args(argv)
    for problem in flag_checks.config_problems(args, bounds=BOUNDS):
        parser.exit(2, f"{parser.prog}: {problem}\n")
    paths = write_synthetic_dataset(args.output_dir, seed=args.seed, num_train=args.num_train, num_eval=args.num_eval)
    for name, path in paths.items():
        print(f"{name}: {path} ({path.stat().st_size} bytes)", file=sys.stderr)
    return 0

