"""Generate the built-in synthetic preference data set (digit sorting) and its tokenizer.

    python tools/make_synthetic_data.py --output-dir examples/data/synthetic --seed 1234

Writes train.jsonl, eval.jsonl (prompts disjoint from train) and tokenizer.model; the same --seed gives
byte-identical files. See megatron_tgdpo/data/synthetic.py for the task and why it is learnable.
"""
from __future__ import annotations

import argparse
import sys

from megatron_tgdpo.data.synthetic import write_synthetic_dataset


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default="examples/data/synthetic")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--num-train", type=int, default=4000)
    parser.add_argument("--num-eval", type=int, default=500)
    args = parser.parse_args(argv)
    paths = write_synthetic_dataset(args.output_dir, seed=args.seed, num_train=args.num_train, num_eval=args.num_eval)
    for name, path in paths.items():
        print(f"{name}: {path} ({path.stat().st_size} bytes)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
