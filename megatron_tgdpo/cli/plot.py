"""``megatron-tgdpo plot``: training curves from one or more metrics.jsonl files (one line per file, one
panel per metric).

    megatron-tgdpo plot runs/dpo/metrics.jsonl runs/tgdpo/metrics.jsonl --output curves.png
    megatron-tgdpo plot runs/*/metrics.jsonl --keys loss rewards/accuracy --smoothing 0.9

Default panels: loss, rewards/margin, rewards/accuracy, and every held-out metric present (keys starting
with "eval/" or "heldout/"); panels no file has are left out. Lines are labelled by the file's parent
directory (runs/dpo/metrics.jsonl -> "dpo") unless --label is given once per file. How lines are read
(skipped, merged, resumed runs): ``megatron_tgdpo/plotting.py``. Exit status: 0 on success, 2 for a
missing file or a bad flag, 1 when a file has nothing to plot. Needs matplotlib.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from megatron_tgdpo.plotting import MetricsError, default_keys, labels_for, plot, read_metrics


def build_parser(*, prog: Optional[str] = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("metrics", nargs="+", metavar="METRICS_JSONL", help="metrics.jsonl files written by training")
    parser.add_argument("--keys", nargs="+", metavar="KEY", help="metrics to plot, one panel each (default: see above)")
    parser.add_argument("--label", action="append", metavar="NAME", help="legend name of each file, in order")
    parser.add_argument("--output", metavar="PNG", help="default: metrics.png beside the first file")
    parser.add_argument("--smoothing", type=float, default=0.0, metavar="ALPHA",
                        help="exponential moving average weight in [0, 1); 0 plots raw values")
    parser.add_argument("--title", help="figure title")
    return parser


def main(argv: Optional[Sequence[str]] = None, *, prog: Optional[str] = None) -> int:
    args = build_parser(prog=prog).parse_args(argv)
    if not 0.0 <= args.smoothing < 1.0:
        print(f"error: --smoothing must be in [0, 1), got {args.smoothing}", file=sys.stderr)
        return 2
    paths = [Path(p) for p in args.metrics]
    warn = lambda message: print(message, file=sys.stderr)  # noqa: E731
    try:
        labels = labels_for(paths, args.label)
        runs = [read_metrics(p, warn=warn) for p in paths]
        keys = args.keys or default_keys(runs)
        present = set().union(*runs)
        missing = [k for k in keys if k not in present]
        if not keys or missing:
            what = f"{', '.join(missing)} in none of the files" if missing else "none of the default metrics present"
            raise MetricsError(f"nothing to plot: {what}; available: {', '.join(sorted(present))}")
        output = Path(args.output) if args.output else paths[0].parent / "metrics.png"
        plot(runs, labels, keys, output, smoothing=args.smoothing, title=args.title)
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except MetricsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {output} ({', '.join(keys)}; {len(runs)} runs)", file=sys.stderr)
    return 0

