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

from megatron_tgdpo.data.synthetic import write_synthetic_dataset


def main(argv: Optional[Sequence[str]] = None, *, prog: Optional[str] = None,
         default_output_dir: str = "synthetic") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default=default_output_dir, help=f"default {default_output_dir}")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--num-train", type=int, default=4000)
    parser.add_argument("--num-eval", type=int, default=500)
    args = parser.parse_args(argv)
    paths = write_synthetic_dataset(args.output_dir, seed=args.seed, num_train=args.num_train, num_eval=args.num_eval)
    for name, path in paths.items():
        print(f"{name}: {path} ({path.stat().st_size} bytes)", file=sys.stderr)
    return 0

