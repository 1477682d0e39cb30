#!/usr/bin/env python
"""Markdown tables of a finished ``megatron-tgdpo replicate`` work directory: per-seed greedy held-out
scores, their means, paired differences with 95% t-intervals, and win / tie / loss counts.

    python tools/seed_table.py runs/smollm2 [--pair tgdpo-a0.5:dpo --pair dpo:base ...]

Two views of each paired difference ``A - B``:

* over seeds: ``d_s = metric_s(A) - metric_s(B)`` per seed (same seed: same reference model, pairs and
  data order), interval ``mean(d) ± t(0.975, n-1) * sd(d) / sqrt(n)`` with the sample standard deviation
  (n - 1) and Student's t quantile (from megatron_tgdpo.pipeline.statistics, no scipy needed). With three seeds t(0.975, 2) = 4.30: wide, and honest
  about what three training runs can tell.
* over held-out prompts: each prompt's greedy score difference averaged over the seeds, the same
  interval over the prompts: how much the prompt sample moves the mean (the training runs' variation
  is averaged in, not measured).

Win / tie / loss: prompt by prompt (greedy score of A against B's on the same prompt and seed), summed
over the seeds.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from statistics import fmean

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # runnable from a checkout without installing

from megatron_tgdpo.pipeline import statistics as paired_stats  # noqa: E402
from megatron_tgdpo.pipeline.report import label  # noqa: E402

DEFAULT_PAIRS = ("tgdpo-a0.5:dpo", "dpo:base", "tgdpo-a0.5:base")


def t_quantile_975(df: int) -> float:
    """The 97.5% quantile of Student's t (the half-width factor of a two-sided 95% interval)."""
    return paired_stats.t_quantile(0.975, df)


def t_interval(values: list[float]) -> tuple[float, float, float]:
    """(mean, low, high) of the 95% Student-t interval of the mean (``pipeline.statistics.t_interval``:
    the sample standard deviation); NaN bounds for fewer than 2 values."""
    return (fmean(values), *paired_stats.t_interval(values))


def greedy_scores(workdir: Path, seed: str, model: str) -> dict[str, float]:
    """prompt id -> the greedy response's score (scored samples file of the evaluation stage)."""
    path = workdir / f"seed{seed}" / "eval" / f"{model}.greedy.jsonl"
    out = {}
    for line in path.read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            out[record["id"]] = float(record["samples"][0]["score"])
    return out


def _fmt(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:+.3f}"


def tables(workdir: Path, pairs: list[tuple[str, str]]) -> str:
    summary = json.loads((workdir / "results.json").read_text())
    per_seed: dict[str, dict[str, dict]] = summary["per_seed"]
    seeds = sorted(per_seed, key=int)
    models = list(per_seed[seeds[0]])
    lines = ["| seed | " + " | ".join(f"{label(m)} score | {label(m)} exact" for m in models) + " |",
             "|---|" + "---:|" * (2 * len(models))]
    for seed in seeds:
        cells = [f"{per_seed[seed][m]['greedy_score']:.3f} | {per_seed[seed][m]['greedy_exact']:.3f}" for m in models]
        lines.append(f"| {seed} | " + " | ".join(cells) + " |")
    means = [f"{fmean(per_seed[s][m]['greedy_score'] for s in seeds):.3f} | "
             f"{fmean(per_seed[s][m]['greedy_exact'] for s in seeds):.3f}" for m in models]
    lines.append("| **mean** | " + " | ".join(means) + " |")

    lines += ["", f"| difference | metric | per seed | mean over {len(seeds)} seeds | 95% t-interval (seeds) | "
              "95% t-interval (prompts) | win / tie / loss (prompts x seeds) |", "|---|---|---|---:|---|---|---|"]
    for a, b in pairs:
        scores_a = {s: greedy_scores(workdir, s, a) for s in seeds}
        scores_b = {s: greedy_scores(workdir, s, b) for s in seeds}
        wins = ties = losses = 0
        for s in seeds:
            for pid, value in scores_a[s].items():
                other = scores_b[s][pid]
                wins, ties, losses = wins + (value > other), ties + (value == other), losses + (value < other)
        # With --vary-data-seed every seed has its own held-out prompts: a per-prompt mean over seeds does
        # not exist, and that column is left empty (the seed-level interval is the measurement).
        same_prompts = all(scores_a[s].keys() == scores_a[seeds[0]].keys() for s in seeds)
        prompt_diffs = ([fmean(scores_a[s][pid] - scores_b[s][pid] for s in seeds) for pid in scores_a[seeds[0]]]
                        if same_prompts else [])
        for key, name in (("greedy_score", "score"), ("greedy_exact", "exact match")):
            diffs = [per_seed[s][a][key] - per_seed[s][b][key] for s in seeds]
            mean, low, high = t_interval(diffs)
            by_prompt = ""
            record = ""
            if key == "greedy_score":
                if prompt_diffs:
                    _, plow, phigh = t_interval(prompt_diffs)
                    by_prompt = f"[{_fmt(plow)}, {_fmt(phigh)}] (n={len(prompt_diffs)})"
                else:
                    by_prompt = "— (each seed its own prompts)"
                record = f"{wins} / {ties} / {losses}"
            lines.append(f"| {label(a)} − {label(b)} | {name} | {', '.join(_fmt(d) for d in diffs)} | {_fmt(mean)} | "
                         f"[{_fmt(low)}, {_fmt(high)}] | {by_prompt} | {record} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("workdir", type=Path)
    parser.add_argument("--pair", action="append", metavar="A:B",
                        help=f"a paired difference A - B of two models' rows (default {', '.join(DEFAULT_PAIRS)})")
    args = parser.parse_args(argv)
    if not (args.workdir / "results.json").is_file():
        print(f"error: {args.workdir}/results.json: missing; run megatron-tgdpo replicate --workdir {args.workdir} "
              "to the end first", file=sys.stderr)
        return 2
    pairs = [tuple(p.split(":", 1)) for p in (args.pair or DEFAULT_PAIRS)]
    print(tables(args.workdir, pairs))  # type: ignore[arg-type]
    return 0


if __name__ == "__main__":
    sys.exit(main())
