"""The printed tables: one row per model, each cell the mean over seeds ± their standard deviation.

The spread is the sample standard deviation over seeds (n − 1 in the denominator), shown when there is
more than one seed. Differences to DPO are paired by seed and summarised by :func:`format_comparison_table`
(``statistics.py``): mean, sample SD, 95 % t and bootstrap intervals, wins / ties / losses, and whether the
t interval excludes 0.
"""
from __future__ import annotations

import math
from statistics import fmean, stdev
from typing import Any, Optional, Sequence

__all__ = ["COLUMNS", "aggregate", "differences", "format_alpha_table", "format_comparison_table",
           "format_difference_table", "format_main_table", "label", "paired_comparisons"]

# (metrics key, column header)
COLUMNS = (
    ("greedy_score", "greedy score"),
    ("greedy_exact", "greedy exact"),
    ("sampled_score", "sampled score"),
    ("sampled_exact", "sampled exact"),
    ("win_vs_dpo", "win vs DPO (greedy)"),
    ("sampled_win_vs_dpo", "win vs DPO (sampled)"),
)


def label(model: str) -> str:
    if model.startswith("tgdpo-a"):
        return f"TGDPO (alpha {model.removeprefix('tgdpo-a')})"
    from megatron_tgdpo.pipeline.control_methods import LABELS

    return {"sft": "SFT", "dpo": "DPO", "simpo": "SimPO", "ipo": "IPO", **LABELS}.get(model, model)


def aggregate(per_seed: Sequence[dict[str, dict[str, Any]]]) -> dict[str, dict[str, tuple[float, float, int]]]:
    """model -> metric -> (mean, spread, seeds) over the seeds that have it (spread NaN for one seed)."""
    out: dict[str, dict[str, tuple[float, float, int]]] = {}
    for results in per_seed:
        for model, metrics in results.items():
            for key, value in metrics.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and value is not None:
                    out.setdefault(model, {}).setdefault(key, []).append(float(value))  # type: ignore[arg-type]
    return {model: {key: (fmean(v), stdev(v) if len(v) > 1 else math.nan, len(v)) for key, v in metrics.items()}
            for model, metrics in out.items()}


def _cell(value: Optional[tuple[float, float, int]]) -> str:
    if value is None:
        return "-"
    mean, spread, _ = value
    return f"{mean:.3f}" if math.isnan(spread) else f"{mean:.3f} ± {spread:.3f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = [list(header), *map(list, rows)]
    widths = [max(len(row[i]) for row in lines) for i in range(len(header))]
    text = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
            for row in lines]
    text.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(text)


def format_main_table(agg: dict[str, dict[str, tuple[float, float, int]]], models: Sequence[str]) -> str:
    columns = [(key, head) for key, head in COLUMNS if any(key in agg.get(m, {}) for m in models)]
    rows = [[label(m), *(_cell(agg.get(m, {}).get(key)) for key, _ in columns)] for m in models]
    return _table(["model", *(head for _, head in columns)], rows)


def format_alpha_table(agg: dict[str, dict[str, tuple[float, float, int]]], alphas: Sequence[float]) -> str:
    """One row per alpha; alpha = 0 is DPO exactly (every token weight 1), so its row is the DPO model."""
    models = ["dpo", *(f"tgdpo-a{alpha:g}" for alpha in sorted(alphas))]
    columns = [(key, head) for key, head in COLUMNS if any(key in agg.get(m, {}) for m in models)]
    rows = [[f"{alpha:g}" if m != "dpo" else "0 (= DPO)", *(_cell(agg.get(m, {}).get(key)) for key, _ in columns)]
            for alpha, m in zip((0.0, *sorted(alphas)), models)]
    return _table(["alpha", *(head for _, head in columns)], rows)


DIFFERENCE_KEYS = ("greedy_score", "greedy_exact", "sampled_score", "sampled_exact")


def differences(per_seed: Sequence[dict[str, dict[str, Any]]], *, baseline: str = "dpo") -> list[dict[str, dict[str, Any]]]:
    """Per seed, each model's metrics minus the baseline's of the same seed (same SFT model, same pairs):
    paired differences, which the seed-to-seed spread of the SFT model does not blur."""
    out = []
    for results in per_seed:
        base = results.get(baseline)
        if base is None:
            continue
        out.append({model: {key: metrics[key] - base[key] for key in DIFFERENCE_KEYS
                            if isinstance(metrics.get(key), (int, float)) and isinstance(base.get(key), (int, float))}
                    for model, metrics in results.items() if model != baseline})
    return out


def _signed(value: Optional[tuple[float, float, int]]) -> str:
    if value is None:
        return "-"
    mean, spread, _ = value
    return f"{mean:+.3f}" if math.isnan(spread) else f"{mean:+.3f} ± {spread:.3f}"


def format_difference_table(diffs: dict[str, dict[str, tuple[float, float, int]]], models: Sequence[str]) -> str:
    heads = dict(COLUMNS)
    columns = [key for key in DIFFERENCE_KEYS if any(key in diffs.get(m, {}) for m in models)]
    rows = [[label(m), *(_signed(diffs.get(m, {}).get(key)) for key in columns)] for m in models if m in diffs]
    return _table(["model - DPO", *(heads[key] for key in columns)], rows)


def paired_comparisons(per_seed: Sequence[dict[str, dict[str, Any]]], models: Sequence[str], *,
                       baseline: str = "dpo") -> dict[str, dict[str, Any]]:
    """model -> metric -> :class:`statistics.Comparison` of its per-seed differences to ``baseline``."""
    from megatron_tgdpo.pipeline.statistics import compare

    out: dict[str, dict[str, Any]] = {}
    diffs = differences(per_seed, baseline=baseline)
    for model in models:
        for key in DIFFERENCE_KEYS:
            values = [d[model][key] for d in diffs if key in d.get(model, {})]
            if values:
                out.setdefault(model, {})[key] = compare(values)
    return out


def _interval(low: float, high: float) -> str:
    return "-" if math.isnan(low) else f"[{low:+.3f}, {high:+.3f}]"


def format_comparison_table(per_seed: Sequence[dict[str, dict[str, Any]]], models: Sequence[str], *,
                            baseline: str = "dpo") -> str:
    """One row per model and metric: the mean paired difference to ``baseline`` over seeds, its sample SD,
    95 % t and percentile-bootstrap intervals, wins/ties/losses over seeds, and the verdict; then one line
    naming the significant differences."""
    heads = dict(COLUMNS)
    found = paired_comparisons(per_seed, models, baseline=baseline)
    rows, significant = [], []
    for model in models:
        for key, c in found.get(model, {}).items():
            verdict = {True: "yes", False: "no", None: "n/a (1 seed)"}[c.significant]
            rows.append([label(model), heads[key], f"{c.mean:+.3f}", "-" if math.isnan(c.sd) else f"{c.sd:.3f}",
                         _interval(c.t_low, c.t_high), _interval(c.boot_low, c.boot_high),
                         f"{c.wins}/{c.ties}/{c.losses}", verdict])
            if c.significant:
                significant.append(f"{label(model)} {heads[key]} {c.mean:+.3f}")
    table = _table([f"model - {label(baseline)}", "metric", "mean", "SD", "95% t interval", "95% bootstrap",
                    "W/T/L", "significant"], rows)
    verdict = ("significant (t interval excludes 0): " + "; ".join(significant)) if significant else \
        "no difference is significant (every 95% t interval includes 0, or there is one seed)"
    return table + "\n" + verdict
