"""Measure preparation throughput: generate N synthetic sort pairs into a temp dir, prepare them, print pairs/s.

    python tools/bench_prepare.py --pairs 100000 --workers 2

The megatron-core import (several seconds on a cold start, paid once per process) is done and timed
before the clock starts for the preparation itself; both figures are printed.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

from megatron_tgdpo.data.builtin import SYNTHETIC_DIR
from megatron_tgdpo.data.prepare import PrepareConfig, prepare_preference_data
from megatron_tgdpo.data.synthetic import make_sort_pairs, write_jsonl


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=100_000)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--tokenizer", default=str(SYNTHETIC_DIR / "tokenizer.model"))
    parser.add_argument("--chat-template", default="plain")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="bench_prepare_") as tmp:
        source = Path(tmp) / "pairs.jsonl"
        t0 = time.perf_counter()
        write_jsonl(source, make_sort_pairs(args.pairs, seed=args.seed))
        t1 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import megatron.core.datasets.indexed_dataset  # noqa: F401 - timed apart from the preparation
        t2 = time.perf_counter()
        config = PrepareConfig(
            inputs=(str(source),),
            output_prefix=str(Path(tmp) / "out" / "bench"),
            tokenizer=args.tokenizer,
            chat_template=args.chat_template,
            max_seq_length=64,
            min_prompt_tokens=8,
            workers=args.workers,
        )
        manifest = prepare_preference_data(config)
        t3 = time.perf_counter()
    pairs = manifest["num_pairs"]
    print(f"generated {args.pairs} pairs ({source.name}) in {t1 - t0:.1f}s; megatron-core import {t2 - t1:.1f}s")
    print(f"prepared {pairs} pairs with {args.workers} worker(s) in {t3 - t2:.2f}s: {pairs / (t3 - t2):,.0f} pairs/s")
    print(f"total including import: {t3 - t1:.2f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
