"""Scored samples -> preference pairs, as the TGDPO paper builds its on-policy data.

Per prompt, the highest-scored sample is ``chosen`` and the lowest-scored is ``rejected``; among equal
scores the first sample in file order wins, so the output is deterministic. A prompt gives no pair
(counted by reason) when it has fewer than two usable samples, when all its scores are equal (no
preference to learn), or when its best and worst samples have the same text (only possible with an
inconsistent external scorer). Samples whose text is empty or whitespace only are set aside first:
the preference-data validator (:mod:`megatron_tgdpo.data.records`) rejects empty responses, so such a
sample could never be trained on.

Output records (JSONL, ready for ``megatron-tgdpo prepare``; extra keys are ignored there)::

    {"prompt": "tot: 4 7 : 3 5 =", "chosen": " 8 2", "rejected": " 7 2",
     "id": "addition-3f9c0a1b2d4e", "chosen_score": 1.0, "rejected_score": 0.5}

``prompt`` is passed through as given (a string or a list of chat messages); every output record is
checked with :func:`~megatron_tgdpo.data.records.parse_record`, and a record it rejects is reported
against its input line.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Sequence

from megatron_tgdpo.data.records import Problem, parse_record
from megatron_tgdpo.tasks.jsonl import BadLinesError, LineProblem
from megatron_tgdpo.tasks.samples import SampleRecord

__all__ = ["DROP_REASONS", "PairStats", "build_pairs", "select_pair"]

DROP_REASONS: dict[str, str] = {
    "too_few_samples": "fewer than 2 samples with non-empty text",
    "all_equal": "all scores equal",
    "identical": "best and worst texts identical",
}


@dataclass
class PairStats:
    prompts: int = 0
    pairs: int = 0
    dropped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(DROP_REASONS, 0))
    empty_samples_skipped: int = 0
    chosen_score_sum: float = 0.0
    rejected_score_sum: float = 0.0

    @property
    def mean_chosen_score(self) -> float | None:
        return self.chosen_score_sum / self.pairs if self.pairs else None

    @property
    def mean_rejected_score(self) -> float | None:
        return self.rejected_score_sum / self.pairs if self.pairs else None

    def as_dict(self) -> dict[str, Any]:
        return {
            "prompts": self.prompts,
            "pairs": self.pairs,
            "dropped": dict(self.dropped),
            "empty_samples_skipped": self.empty_samples_skipped,
            "mean_chosen_score": self.mean_chosen_score,
            "mean_rejected_score": self.mean_rejected_score,
        }

    def summary(self) -> str:
        dropped = ", ".join(f"{self.dropped[k]} {text}" for k, text in DROP_REASONS.items())
        lines = [
            f"prompts: {self.prompts}",
            f"pairs written: {self.pairs}",
            f"dropped: {sum(self.dropped.values())} ({dropped})",
            f"empty samples set aside: {self.empty_samples_skipped}",
        ]
        if self.pairs:
            chosen, rejected = self.mean_chosen_score, self.mean_rejected_score
            lines.append(f"mean score: chosen {chosen:.4f}, rejected {rejected:.4f} (margin {chosen - rejected:.4f})")
        return "\n".join(lines)


def select_pair(samples: Sequence[dict[str, Any]]) -> tuple[int, int] | str:
    """Indices ``(chosen, rejected)`` into ``samples``, or the drop reason (a key of ``DROP_REASONS``).
    Samples with blank text are never picked."""
    usable = [i for i, s in enumerate(samples) if s["text"].strip()]
    if len(usable) < 2:
        return "too_few_samples"
    # max()/min() return the first of equal elements: the deterministic tie-break.
    best = max(usable, key=lambda i: samples[i]["score"])
    worst = min(usable, key=lambda i: samples[i]["score"])
    if samples[best]["score"] == samples[worst]["score"]:
        return "all_equal"
    if samples[best]["text"] == samples[worst]["text"]:
        return "identical"
    return best, worst


def build_pairs(records: Sequence[SampleRecord]) -> tuple[list[dict[str, Any]], PairStats]:
    """Pairs in input order and their statistics. ``records`` must carry scores (loaded with
    ``require_scores=True``). Raises :class:`BadLinesError` when a pair would not pass the preference
    record validator (e.g. a malformed message-list prompt), naming each input line."""
    stats = PairStats()
    pairs: list[dict[str, Any]] = []
    problems: list[LineProblem] = []
    for item in records:
        stats.prompts += 1
        stats.empty_samples_skipped += sum(1 for s in item.samples if not s["text"].strip())
        picked = select_pair(item.samples)
        if isinstance(picked, str):
            stats.dropped[picked] += 1
            continue
        chosen, rejected = item.samples[picked[0]], item.samples[picked[1]]
        pair = {
            "prompt": item.prompt,
            "chosen": chosen["text"],
            "rejected": rejected["text"],
            "id": item.id,
            "chosen_score": chosen["score"],
            "rejected_score": rejected["score"],
        }
        checked = parse_record(json.dumps(pair), source=item.source, line=item.line)
        if isinstance(checked, Problem):
            problems.append(LineProblem(item.source, item.line, checked.field, checked.reason))
            continue
        pairs.append(pair)
        stats.pairs += 1
        stats.chosen_score_sum += chosen["score"]
        stats.rejected_score_sum += rejected["score"]
    if problems:
        raise BadLinesError(problems, what_to_do="the pairs would be rejected by megatron-tgdpo prepare; fix the prompts")
    return pairs, stats
