"""Summaries of scored samples on held-out prompts, and head-to-head win rates of two models.

* ``mean_score``: mean over all samples of all prompts.
* ``exact_match``: fraction of all samples whose answer is exactly right; only when every record
  names a known task and its answer (otherwise ``None``: scores from an external reward model say
  nothing about exactness).
* ``best_of_k_score`` / ``best_of_k_exact``: per prompt, the best sample's score / whether any sample is
  exact, averaged over prompts (with one sample per prompt they equal the two above).
* :func:`head_to_head`: per prompt, model A's score against model B's (the first sample's, or the mean
  over samples); a tie counts half a win. Both files must hold the same prompts.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from statistics import fmean
from typing import Any, Literal, Sequence

from megatron_tgdpo.tasks.registry import TASKS, get_task
from megatron_tgdpo.tasks.samples import SampleRecord, sample_scores

__all__ = ["HeadToHead", "Summary", "format_head_to_head", "format_table", "head_to_head", "summarize"]

PerPrompt = Literal["mean", "first"]


@dataclass(frozen=True)
class Summary:
    prompts: int
    samples: int
    min_k: int  # fewest samples of a prompt
    max_k: int
    mean_score: float
    exact_match: float | None
    best_of_k_score: float
    best_of_k_exact: float | None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _has_verifier(item: SampleRecord) -> bool:
    return item.record.get("task") in TASKS and isinstance(item.record.get("answer"), str)


def summarize(records: Sequence[SampleRecord]) -> Summary:
    """Records must carry scores (loaded with ``require_scores=True``) and at least one sample in all."""
    scores = [s for item in records for s in sample_scores(item)]
    if not scores:
        raise ValueError("no samples to evaluate (every record has an empty samples list)")
    with_samples = [item for item in records if item.samples]
    verified = all(_has_verifier(item) for item in records)
    exact: list[list[bool]] = []
    if verified:
        for item in records:
            task, answer = get_task(item.record["task"]), item.record["answer"]
            exact.append([task.exact_match(s["text"], answer) for s in item.samples])
    sizes = [len(item.samples) for item in records]
    return Summary(
        prompts=len(records),
        samples=len(scores),
        min_k=min(sizes),
        max_k=max(sizes),
        mean_score=fmean(scores),
        exact_match=fmean(e for row in exact for e in row) if verified else None,
        best_of_k_score=fmean(max(sample_scores(item)) for item in with_samples),
        best_of_k_exact=fmean(any(row) for row in exact if row) if verified else None,
    )


@dataclass(frozen=True)
class HeadToHead:
    wins: int
    ties: int
    losses: int
    per_prompt: str

    @property
    def prompts(self) -> int:
        return self.wins + self.ties + self.losses

    @property
    def win_rate(self) -> float:
        """Wins plus half the ties, over all prompts."""
        return (self.wins + 0.5 * self.ties) / self.prompts

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "prompts": self.prompts, "win_rate": self.win_rate}


def _prompt_score(item: SampleRecord, per_prompt: PerPrompt) -> float:
    scores = sample_scores(item)
    return scores[0] if per_prompt == "first" else fmean(scores)


def head_to_head(
    a: Sequence[SampleRecord], b: Sequence[SampleRecord], *, per_prompt: PerPrompt = "mean"
) -> HeadToHead:
    """A's wins, ties and losses against B, prompt by prompt (matched by id). Raises ``ValueError``
    when the two hold different prompt ids, a shared id has different prompts, or a prompt has no
    samples: a win rate over different prompts would compare nothing."""
    if per_prompt not in ("mean", "first"):
        raise ValueError(f"per_prompt must be 'mean' or 'first', got {per_prompt!r}")
    by_id_a = {item.id: item for item in a}
    by_id_b = {item.id: item for item in b}
    name_a = a[0].source if a else "A"
    name_b = b[0].source if b else "B"
    only_a = sorted(set(by_id_a) - set(by_id_b), key=str)
    only_b = sorted(set(by_id_b) - set(by_id_a), key=str)
    if only_a or only_b or not by_id_a:
        parts = []
        for name, ids in ((name_a, only_a), (name_b, only_b)):
            if ids:
                parts.append(f"{len(ids)} ids only in {name} (e.g. {', '.join(map(repr, ids[:3]))})")
        raise ValueError(
            f"{name_a} and {name_b} do not hold the same prompts: {'; '.join(parts) or 'no prompts'}; "
            "sample both models on the same prompt file"
        )
    wins = ties = losses = 0
    for prompt_id, item_a in by_id_a.items():
        item_b = by_id_b[prompt_id]
        if item_a.prompt != item_b.prompt:
            raise ValueError(f"{item_a.where()} and {item_b.where()}: id {prompt_id!r} has different prompts")
        for item in (item_a, item_b):
            if not item.samples:
                raise ValueError(f"{item.where()}: samples: empty, so prompt {prompt_id!r} cannot be compared")
        score_a, score_b = _prompt_score(item_a, per_prompt), _prompt_score(item_b, per_prompt)
        if score_a > score_b:
            wins += 1
        elif score_a < score_b:
            losses += 1
        else:
            ties += 1
    return HeadToHead(wins=wins, ties=ties, losses=losses, per_prompt=per_prompt)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def format_table(rows: Sequence[tuple[str, Summary]]) -> str:
    header = ("samples file", "prompts", "samples", "k", "mean score", "exact match", "best-of-k score", "best-of-k exact")
    lines = [header]
    for label, s in rows:
        k = str(s.min_k) if s.min_k == s.max_k else f"{s.min_k}-{s.max_k}"
        lines.append((label, str(s.prompts), str(s.samples), k, _fmt(s.mean_score), _fmt(s.exact_match),
                      _fmt(s.best_of_k_score), _fmt(s.best_of_k_exact)))
    widths = [max(len(row[i]) for row in lines) for i in range(len(header))]
    out = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
           for row in lines]
    return "\n".join(out)


def format_head_to_head(label_a: str, label_b: str, result: HeadToHead) -> str:
    return (
        f"{label_a} vs {label_b} (per prompt: {result.per_prompt} sample score): "
        f"wins {result.wins}, ties {result.ties}, losses {result.losses} of {result.prompts}; "
        f"win rate {result.win_rate:.4f} (ties count half)"
    )
