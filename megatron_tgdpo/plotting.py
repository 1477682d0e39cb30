"""Training curves from metrics.jsonl files: reading them, choosing panels and labels, and drawing one
PNG (one line per file, one panel per metric). The command is ``megatron-tgdpo plot`` (``cli/plot.py``).

Reading is forgiving where training logs are messy and strict where a plot would lie: a line without an
iteration, or one that is not JSON (e.g. the half-written last line of a running job), is skipped with a
warning; "nan"/"inf" strings (how the trainer writes non-finite values) become gaps; after a resume the
log goes back to the checkpoint's iteration (the file is appended to), and what the abandoned run logged
from that iteration on is dropped; consecutive lines of one iteration (training, then held-out) merge. A file
that is missing (``FileNotFoundError``) or has no usable line (:class:`MetricsError`) is an error.
Drawing needs matplotlib.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

__all__ = ["DEFAULT_KEYS", "HELDOUT_PREFIXES", "MetricsError", "Series", "default_keys", "labels_for", "plot",
           "read_metrics"]

DEFAULT_KEYS = ("loss", "rewards/margin", "rewards/accuracy")
HELDOUT_PREFIXES = ("eval/", "heldout/")

Series = dict[str, list[tuple[int, float]]]  # metric -> [(iteration, value)], sorted by iteration


class MetricsError(ValueError):
    """A metrics file cannot be plotted; the message names the file and what to do."""


def _number(value: Any) -> float | None:
    """A plottable float, NaN for non-finite values (a gap), ``None`` for anything else."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value) if math.isfinite(value) else math.nan
    if isinstance(value, str) and value.strip().lower() in ("nan", "inf", "-inf", "+inf", "infinity", "-infinity"):
        return math.nan
    return None


def read_metrics(path: str | Path, *, warn: Any = None) -> Series:
    """Per-metric series of one metrics.jsonl. ``warn(message)`` is told about skipped lines."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    by_iteration: dict[int, dict[str, float]] = {}
    last = 0
    skipped: list[str] = []
    with open(path, encoding="utf-8", errors="replace") as handle:
        for number, text in enumerate(handle, start=1):
            if not text.strip():
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as exc:
                skipped.append(f"{path}:{number}: invalid JSON ({exc.msg})")
                continue
            iteration = row.get("iteration") if isinstance(row, dict) else None
            if isinstance(iteration, bool) or not isinstance(iteration, int):
                skipped.append(f"{path}:{number}: no integer \"iteration\"")
                continue
            values = {k: v for k, v in ((k, _number(v)) for k, v in row.items() if k != "iteration") if v is not None}
            if by_iteration and iteration < last:
                # A resumed run appends from its checkpoint's iteration on: what the abandoned run logged
                # from there is superseded, including iterations the new run has not reached yet.
                for stale in [i for i in by_iteration if i >= iteration]:
                    del by_iteration[stale]
            # The same iteration twice in a row (e.g. a held-out line after the training line) merges.
            by_iteration.setdefault(iteration, {}).update(values)
            last = iteration
    if warn is not None:
        for line in skipped[:5]:
            warn(f"warning: skipped {line}")
        if len(skipped) > 5:
            warn(f"warning: ... and {len(skipped) - 5} more skipped lines in {path}")
    series: Series = {}
    for iteration in sorted(by_iteration):
        for key, value in by_iteration[iteration].items():
            series.setdefault(key, []).append((iteration, value))
    if not series:
        raise MetricsError(f"{path}: no usable lines (each needs an integer \"iteration\" and at least one numeric metric)")
    return series


def default_keys(runs: Sequence[Series]) -> list[str]:
    present = set().union(*runs)
    heldout = sorted(k for k in present if k.startswith(HELDOUT_PREFIXES))
    return [k for k in DEFAULT_KEYS if k in present] + heldout


def labels_for(paths: Sequence[Path], given: Sequence[str] | None) -> list[str]:
    if given:
        if len(given) != len(paths):
            raise MetricsError(f"--label was given {len(given)} times for {len(paths)} files; give one per file or none")
        return list(given)
    names = [p.resolve().parent.name or str(p) for p in paths]
    counts = Counter(names)
    # Two runs in directories of the same name (a/run/, b/run/) need the longer path to be told apart.
    return [name if counts[name] == 1 else str(p.parent) for name, p in zip(names, paths)]


def _smooth(values: list[float], alpha: float) -> list[float]:
    """Exponential moving average, restarting after gaps so a NaN does not poison the rest."""
    out, state = [], None
    for value in values:
        if math.isnan(value):
            state = None
            out.append(value)
            continue
        state = value if state is None else alpha * state + (1 - alpha) * value
        out.append(state)
    return out


def plot(runs: Sequence[Series], labels: Sequence[str], keys: Sequence[str], output: str | Path, *,
         smoothing: float = 0.0, title: str | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = 1 if len(keys) == 1 else 2
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 3.6 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        for series, label in zip(runs, labels):
            points = series.get(key)
            if not points:
                continue
            xs = [x for x, _ in points]
            ys = [y for _, y in points]
            ax.plot(xs, _smooth(ys, smoothing) if smoothing else ys, label=label,
                    marker="o" if len(points) == 1 else None, linewidth=1.2)
        ax.set_title(key)
        ax.set_xlabel("iteration")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(keys):]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    # Render to a temporary sibling, then rename: a viewer polling the file never sees half a PNG.
    fd, tmp = tempfile.mkstemp(prefix=f".{output.name}.tmp-", suffix=".png", dir=output.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, format="png", dpi=100)
        os.replace(tmp, output)
    finally:
        plt.close(fig)
        Path(tmp).unlink(missing_ok=True)
