"""The samples file: the one schema between generation, verifiers, pair building and evaluation.

Generation (``tools/generate.py``) writes one JSON object per prompt, in prompt-file order: every field
of the prompt record passed through unchanged, plus ``samples``::

    {"id": "addition-3f9c0a1b2d4e", "prompt": "tot: 4 7 : 3 5 =", "task": "addition", "answer": " 8 2",
     "samples": [{"text": " 8 2", "num_tokens": 3, "finish_reason": "eos"},
                 {"text": " 7 2", "num_tokens": 3, "finish_reason": "eos"},
                 {"text": " 8 2 = 1", "num_tokens": 4, "finish_reason": "length"}]}

* ``id`` (a string or an integer, unique across the files read together) and ``prompt`` (a string, or a list of chat
  messages as in :mod:`megatron_tgdpo.data.records`) are required.
* ``samples`` is a list (possibly empty) of objects with ``text`` (the decoded response, without the
  prompt and without the stop token), ``num_tokens`` (tokens generated, the stop token included, as
  :mod:`megatron_tgdpo.generation.output` counts them) and ``finish_reason``: ``"eos"`` (the model
  ended the response) or ``"length"`` (cut at the generation limit). ``num_tokens`` and
  ``finish_reason`` are checked when present, so files from other generators without them are
  accepted; other sample keys are passed through.
* ``score`` (a finite number) on each sample: added by ``python -m megatron_tgdpo.tasks score`` from the
  record's ``task`` and ``answer`` (both then required), or already present from any external reward
  model. Pair building and evaluation need it.

Every problem is reported as ``file:line: field: reason``; the first problem of each bad line is
reported, for all bad lines at once.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from megatron_tgdpo.tasks.jsonl import BadLinesError, LineProblem, json_type, read_jsonl
from megatron_tgdpo.tasks.registry import TASKS, get_task

__all__ = [
    "FINISH_REASONS",
    "SampleRecord",
    "load_sample_records",
    "score_records",
    "sample_scores",
]

FINISH_REASONS = ("eos", "length")

SCORE_HINT = "Samples need scores: run `python -m megatron_tgdpo.tasks score --samples IN --output OUT` first."


@dataclass(frozen=True)
class SampleRecord:
    """One validated line of a samples file; ``record`` is the parsed object (mutable, so scoring can
    add ``score`` to its samples and write it back out unchanged otherwise)."""

    source: str
    line: int
    record: dict[str, Any]

    @property
    def id(self) -> str | int:
        return self.record["id"]

    @property
    def prompt(self) -> Any:
        return self.record["prompt"]

    @property
    def samples(self) -> list[dict[str, Any]]:
        return self.record["samples"]

    def where(self) -> str:
        return f"{self.source}:{self.line}"


class _Bad(Exception):
    def __init__(self, field: str, reason: str) -> None:
        super().__init__(reason)
        self.field, self.reason = field, reason


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_verifier(obj: dict[str, Any]) -> None:
    for key in ("task", "answer"):
        if key not in obj:
            raise _Bad(key, "missing (a verifier needs the record's task and answer, passed through from the prompt file)")
        if not isinstance(obj[key], str):
            raise _Bad(key, f"expected a string, got {json_type(obj[key])}")
    if obj["task"] not in TASKS:
        raise _Bad("task", f"unknown task {obj['task']!r} (known tasks: {', '.join(sorted(TASKS))})")
    reason = get_task(obj["task"]).check_answer(obj["answer"])
    if reason:
        raise _Bad("answer", reason)


def _check_sample(field: str, sample: Any, *, require_score: bool) -> None:
    if not isinstance(sample, dict):
        raise _Bad(field, f'expected an object with "text", got {json_type(sample)}')
    if "text" not in sample:
        raise _Bad(f"{field}.text", "missing")
    if not isinstance(sample["text"], str):
        raise _Bad(f"{field}.text", f"expected a string, got {json_type(sample['text'])}")
    if "num_tokens" in sample:
        n = sample["num_tokens"]
        if not (isinstance(n, int) and not isinstance(n, bool) and n >= 0):
            raise _Bad(f"{field}.num_tokens", f"expected a non-negative integer, got {n!r}")
    if "finish_reason" in sample and sample["finish_reason"] not in FINISH_REASONS:
        raise _Bad(
            f"{field}.finish_reason", f"expected one of {', '.join(FINISH_REASONS)}, got {sample['finish_reason']!r}"
        )
    if "score" in sample:
        score = sample["score"]
        if not _is_number(score):
            raise _Bad(f"{field}.score", f"expected a number, got {json_type(score)}")
        if not math.isfinite(score):
            raise _Bad(f"{field}.score", f"not finite ({score})")
    elif require_score:
        raise _Bad(f"{field}.score", "missing")


def _check_record(obj: dict[str, Any], *, require_scores: bool, require_verifier: bool) -> None:
    if "id" not in obj:
        raise _Bad("id", "missing (every record needs its prompt's id)")
    prompt_id = obj["id"]
    # As the generation tool accepts: a string or an integer (never a boolean, which JSON keeps apart).
    if isinstance(prompt_id, bool) or not isinstance(prompt_id, (str, int)) or prompt_id == "":
        raise _Bad("id", f"expected a non-empty string or an integer, got {json_type(prompt_id)} {prompt_id!r}")
    if "prompt" not in obj:
        raise _Bad("prompt", "missing")
    if not isinstance(obj["prompt"], (str, list)):
        raise _Bad("prompt", f"expected a string or a list of messages, got {json_type(obj['prompt'])}")
    if require_verifier:
        _check_verifier(obj)
    if "samples" not in obj:
        raise _Bad("samples", "missing (a list of {text, num_tokens, finish_reason} objects)")
    if not isinstance(obj["samples"], list):
        raise _Bad("samples", f"expected a list, got {json_type(obj['samples'])}")
    for i, sample in enumerate(obj["samples"]):
        _check_sample(f"samples[{i}]", sample, require_score=require_scores)


def load_sample_records(
    paths: Sequence[str | Path] | str | Path, *, require_scores: bool = False, require_verifier: bool = False
) -> list[SampleRecord]:
    """Read and validate samples files (in order). Raises :class:`BadLinesError` listing every bad
    line (a duplicate id, within or across files, counts as bad), ``FileNotFoundError`` for a missing
    file."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    records: list[SampleRecord] = []
    problems: list[tuple[int, LineProblem]] = []
    first_seen: dict[str | int, tuple[int, int]] = {}  # id -> (file index, line): a file given twice repeats every id
    for index, path in enumerate(paths):
        lines, bad_lines = read_jsonl(path)
        problems.extend((index, p) for p in bad_lines)
        for line in lines:
            try:
                _check_record(line.value, require_scores=require_scores, require_verifier=require_verifier)
                earlier = first_seen.setdefault(line.value["id"], (index, line.number))
                if earlier != (index, line.number):
                    where = f"{Path(paths[earlier[0]])}:{earlier[1]}"
                    raise _Bad("id", f"duplicate of {where} ({line.value['id']!r}); each prompt must appear once")
            except _Bad as bad:
                problems.append((index, LineProblem(line.source, line.number, bad.field, bad.reason)))
                continue
            records.append(SampleRecord(line.source, line.number, line.value))
    if problems:
        # Input order (file, then line): unreadable lines and invalid records were found in two passes.
        problems.sort(key=lambda item: (item[0], item[1].line))
        found = [p for _, p in problems]
        hint = SCORE_HINT if any(p.field.endswith(".score") and p.reason == "missing" for p in found) else ""
        raise BadLinesError(found, what_to_do=hint)
    return records


def score_records(records: Iterable[SampleRecord]) -> tuple[int, int]:
    """Add ``score`` to every sample with the record's task verifier (records must have been loaded
    with ``require_verifier=True``). Returns ``(samples scored, existing scores replaced)``."""
    scored = replaced = 0
    for item in records:
        task = get_task(item.record["task"])
        answer = item.record["answer"]
        for sample in item.samples:
            replaced += "score" in sample
            sample["score"] = task.score(sample["text"], answer)
            scored += 1
    return scored, replaced


def sample_scores(item: SampleRecord) -> list[float]:
    return [float(sample["score"]) for sample in item.samples]
