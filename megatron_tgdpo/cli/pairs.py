"""``megatron-tgdpo pairs``: build on-policy preference pairs from scored samples: per prompt, best sample vs worst sample.

    megatron-tgdpo pairs --input scored.jsonl [more.jsonl ...] --output pairs.jsonl

The input is the samples file of megatron_tgdpo/tasks/samples.py with a "score" on every sample (from
`megatron-tgdpo score`, or any external reward model). The output feeds
`megatron-tgdpo prepare`. Selection and drop rules: megatron_tgdpo/tasks/pairs.py.

Exit status: 0 on success; 1 when input lines are bad or no pair is left (nothing is written);
2 for usage errors and missing files.
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from megatron_tgdpo.tasks.pairs import build_pairs
from megatron_tgdpo.tasks.jsonl import BadLinesError, write_jsonl_atomic
from megatron_tgdpo.tasks.samples import load_sample_records


def build_parser(*, prog: Optional[str] = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="+", required=True, metavar="JSONL", help="scored samples files, in order")
    parser.add_argument("--output", required=True, metavar="JSONL", help="preference pairs (written atomically)")
    parser.add_argument("--stats-output", metavar="JSON", help="also write the summary counts as JSON")
    parser.add_argument("--quiet", action="store_true", help="print only errors")
    return parser


def main(argv: Optional[Sequence[str]] = None, *, prog: Optional[str] = None) -> int:
    args = build_parser(prog=prog).parse_args(argv)
    try:
        records = load_sample_records(args.input, require_scores=True)
        pairs, stats = build_pairs(records)
    except BadLinesError as exc:
        print(f"error: {exc}\nnothing was written", file=sys.stderr)
        return 1
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not args.quiet or not pairs:
        print(stats.summary(), file=sys.stderr)
    if not pairs:
        print("error: no pairs: every prompt was dropped (see the counts above); nothing was written", file=sys.stderr)
        return 1
    write_jsonl_atomic(args.output, pairs)
    if args.stats_output:
        write_jsonl_atomic(args.stats_output, [stats.as_dict()])
    if not args.quiet:
        print(f"wrote {len(pairs)} pairs to {args.output}", file=sys.stderr)
    return 0

