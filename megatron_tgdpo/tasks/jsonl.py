"""JSONL in and out for the task tools: every bad line reported as ``file:line: field: reason``, and
outputs published atomically (a temporary file beside the target, then ``os.replace``), so a crash or
a validation failure never leaves a half-written file that a later pipeline stage would trust."""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

__all__ = ["BadLinesError", "Line", "LineProblem", "json_type", "read_jsonl", "write_jsonl_atomic"]


class BadLinesError(ValueError):
    """Input lines failed validation; ``problems`` holds one ``file:line: field: reason`` per bad line."""

    def __init__(self, problems: Sequence[object], *, what_to_do: str = "") -> None:
        self.problems = [str(p) for p in problems]
        self.what_to_do = what_to_do
        noun = "line" if len(self.problems) == 1 else "lines"
        text = f"{len(self.problems)} bad {noun} in the input:\n" + "\n".join(f"  {p}" for p in self.problems)
        super().__init__(text + (f"\n{what_to_do}" if what_to_do else ""))


@dataclass(frozen=True)
class Line:
    """A parsed JSON object and where it came from."""

    source: str
    number: int
    value: dict[str, Any]

    def where(self) -> str:
        return f"{self.source}:{self.number}"


@dataclass(frozen=True, order=True)
class LineProblem:
    """Why one input line was rejected; ``str()`` gives ``file:line: field: reason``."""

    source: str
    line: int
    field: str
    reason: str

    def __str__(self) -> str:
        return f"{self.source}:{self.line}: {self.field}: {self.reason}"


def json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object" if isinstance(value, dict) else type(value).__name__


def _reject_constant(name: str) -> float:
    # Python's json accepts NaN/Infinity, which no other JSON reader does; a score must be a real number.
    raise ValueError(f"{name} is not valid JSON")


def read_jsonl(path: str | Path) -> tuple[list[Line], list[LineProblem]]:
    """The objects of a JSONL file (blank lines skipped) and a problem line for each line that is not
    valid UTF-8, not valid JSON or not an object. Raises ``FileNotFoundError`` with the path."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    source = str(path)
    lines: list[Line] = []
    problems: list[LineProblem] = []
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                problems.append(LineProblem(source, number, "<record>", f"not valid UTF-8 (byte {exc.start})"))
                continue
            if number == 1:
                text = text.removeprefix("\ufeff")
            if not text.strip():
                continue
            try:
                value = json.loads(text, parse_constant=_reject_constant)
            except ValueError as exc:
                reason = f"invalid JSON: {exc.msg} (column {exc.colno})" if isinstance(exc, json.JSONDecodeError) else str(exc)
                problems.append(LineProblem(source, number, "<record>", reason))
                continue
            if not isinstance(value, dict):
                problems.append(LineProblem(source, number, "<record>", f"expected a JSON object, got {json_type(value)}"))
                continue
            lines.append(Line(source, number, value))
    return lines, problems


def write_jsonl_atomic(path: str | Path, records: Iterable[dict[str, Any]]) -> int:
    """Write ``records`` one per line to ``path`` via a temporary sibling and ``os.replace``; returns
    the number of lines. Missing parent directories are created; a non-finite float raises ValueError
    (JSON has no NaN) and leaves the target untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    count = 0
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            for record in records:
                handle.write(json.dumps(record, ensure_ascii=False, allow_nan=False) + "\n")
                count += 1
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return count
