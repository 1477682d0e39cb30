"""Per-token guidance scores from a file (``--guidance-source score-file --guidance-scores FILE``).

Format: JSONL, one object per preference pair::

    {"index": 12, "chosen": [0.3, -0.1, 0.0], "rejected": [-0.4, 0.2, 0.1, 0.0]}

``index`` is the pair's index in the prepared data set (0-based, the order ``prepare`` wrote the pairs:
the ``sample_idx`` of a batch); ``chosen`` / ``rejected`` hold one finite number per trained response
token of that side, in order (the response's tokens as prepared: after the template, truncation included,
ending with the end-of-sequence token when the data set has one). The numbers are r̂ as they are: the
weight function applies alpha (``--token-weight``). Every line is checked when the file is read (bad
JSON, a missing or mistyped field, a repeated index: ``file:line: field: reason``); a pair the file lacks,
or a list whose length differs from the response's, stops the run at the batch that holds it.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from megatron_tgdpo.guidance.layout import ResponseLayout

__all__ = ["ScoreFileError", "read_score_file", "scores_tensor"]

MAX_REPORTED = 5


class ScoreFileError(ValueError):
    """A score file cannot be used; the message has one ``file:line: field: reason`` per problem."""


def _numbers(value: Any) -> str | None:
    if not isinstance(value, list):
        return f"expected a list of numbers, got {type(value).__name__}"
    for i, item in enumerate(value):
        if isinstance(item, bool) or not isinstance(item, (int, float)):
            return f"item {i} is {item!r}, not a number"
        if not math.isfinite(item):
            return f"item {i} is {item!r}, not a finite number"
    return None


def read_score_file(path: str | Path) -> dict[int, tuple[list[float], list[float]]]:
    """``index -> (chosen scores, rejected scores)``; raises :class:`ScoreFileError` on any bad line."""
    out: dict[int, tuple[list[float], list[float]]] = {}
    problems: list[str] = []
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ScoreFileError(f"{path}: cannot be read ({exc})") from None
    for number, line in enumerate(text.splitlines(), start=1):
        where = f"{path}:{number}"
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            problems.append(f"{where}: not valid JSON ({exc.msg})")
            continue
        if not isinstance(record, dict):
            problems.append(f"{where}: expected a JSON object with index, chosen, rejected")
            continue
        index = record.get("index")
        if isinstance(index, bool) or not isinstance(index, int) or index < 0:
            problems.append(f"{where}: index: expected a pair index (an integer >= 0), got {index!r}")
            continue
        bad = [f"{where}: {side}: {reason}" for side in ("chosen", "rejected")
               for reason in [("missing" if side not in record else _numbers(record[side]))] if reason]
        unknown = sorted(set(record) - {"index", "chosen", "rejected"})
        if unknown:
            bad.append(f"{where}: {unknown[0]}: unknown field (a line holds index, chosen, rejected)")
        if index in out:
            bad.append(f"{where}: index: pair {index} appears twice")
        if bad:
            problems.extend(bad)
            continue
        out[index] = ([float(x) for x in record["chosen"]], [float(x) for x in record["rejected"]])
    if problems:
        more = f" (and {len(problems) - MAX_REPORTED} more)" if len(problems) > MAX_REPORTED else ""
        raise ScoreFileError("; ".join(problems[:MAX_REPORTED]) + more)
    if not out:
        raise ScoreFileError(f"{path}: holds no scores")
    return out


def scores_tensor(scores: dict[int, tuple[list[float], list[float]]], layout: ResponseLayout, *, path: Any,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The full micro-batch's ``[R, S]`` r̂ from ``scores`` (0 off the response)."""
    response = layout.full_response()
    ids = layout.full_sequence_ids()
    samples, side = layout.sequence_samples()
    out = torch.zeros(response.shape, dtype=dtype)
    host_response, host_ids = response.cpu(), ids.cpu()
    for sequence, (sample, rejected) in enumerate(zip(samples.tolist(), side.tolist())):
        name = "rejected" if rejected else "chosen"
        if sample not in scores:
            raise ScoreFileError(f"{path}: index: no line for pair {sample} (the data set has it); score every pair")
        values = scores[sample][rejected]
        where = host_response & (host_ids == sequence)
        tokens = int(where.sum())
        if tokens != len(values):
            raise ScoreFileError(f"{path}: {name}: pair {sample} has {len(values)} scores, its {name} response "
                                 f"{tokens} trained tokens; give one score per token")
        out[where] = torch.tensor(values, dtype=dtype)
    return out.to(response.device)
