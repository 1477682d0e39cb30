"""The printed tables: one row per model, each cell the mean over seeds ± their standard deviation.

The spread is the sample standard deviation over seeds (n − 1 in the denominator), shown when there is
more than one seed; with three seeds it is a rough figure, so read differences smaller than it as ties.
"""
from __future__ import annotations

import math
from statistics import fmean, stdev
from typing import Any, Optional, Sequence

__all__ = ["COLUMNS", "aggregate", "differences", "format_alpha_table", "format_difference_table", "format_main_table",
           "label"]

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
    from megatron_tgdpo.pipeline.controls import LABELS

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
