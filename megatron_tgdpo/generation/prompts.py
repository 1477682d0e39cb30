"""Prompt JSONL in, token ids out, rendered exactly as the data tool renders a training prompt.

Input: one JSON object per line, ``{"id": str, "prompt": str | [messages], ...}`` (the prompt files of
``python -m megatron_tgdpo.tasks make-prompts`` have this form); every other field is carried through
to the output untouched. A string prompt is one user message. All lines are validated up front and
every bad one is reported as ``file:line: field: reason`` (blank lines are skipped). The prompt rules
are the data tool's own (``data.records``), so a prompt accepted here is one ``tools/prepare_data.py``
accepts, and its ids are the ones training puts before the response: the chat template's prompt
rendering with the generation prompt (``ChatTemplate.render_prompt``), tokenized, with BOS prepended
when the template leaves BOS to an id (``data.encode.encode_record``'s prompt rule).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from megatron_tgdpo.data.records import Message, PreferenceRecord
# The data tool's prompt validation: a prompt accepted here is one prepare_data accepts.
from megatron_tgdpo.data.records import InvalidField, parse_prompt
from megatron_tgdpo.data.tokenizer import Tokenizer
from megatron_tgdpo.tasks.jsonl import BadLinesError, LineProblem, json_type, read_jsonl

OUTPUT_FIELD = "samples"


@dataclass(frozen=True)
class PromptRecord:
    line: int
    fields: dict[str, Any]  # the input object as read, written back with the samples added
    messages: tuple[Message, ...]


def _messages(obj: dict[str, Any]) -> tuple[Message, ...]:
    """The record's prompt messages; raises ``InvalidField`` for the first problem."""
    for key in ("id", "prompt"):
        if key not in obj:
            raise InvalidField(key, "missing", "missing_field")
    if not isinstance(obj["id"], str) or not obj["id"]:
        raise InvalidField("id", f"expected a non-empty string, got {json_type(obj['id'])} {obj['id']!r}", "wrong_type")
    if OUTPUT_FIELD in obj:
        raise InvalidField(OUTPUT_FIELD, "reserved: generation adds this field (rename it in the input)", "reserved")
    return parse_prompt(obj["prompt"])


def read_prompt_file(path: str | Path) -> list[PromptRecord]:
    """Every prompt of ``path``, in file order. Raises :class:`BadLinesError` listing every bad line
    (unreadable, invalid prompt, duplicate id) and ``FileNotFoundError`` for a missing file."""
    lines, problems = read_jsonl(path)
    records: list[PromptRecord] = []
    first_line: dict[str, int] = {}
    for line in lines:
        try:
            messages = _messages(line.value)
            earlier = first_line.setdefault(line.value["id"], line.number)
            if earlier != line.number:
                raise InvalidField("id", f"duplicate of line {earlier} ({line.value['id']!r}); each prompt must appear once",
                               "duplicate")
        except InvalidField as bad:
            problems.append(LineProblem(line.source, line.number, bad.field, bad.reason))
            continue
        records.append(PromptRecord(line=line.number, fields=line.value, messages=messages))
    if problems:
        raise BadLinesError(sorted(problems, key=lambda p: p.line), what_to_do="Nothing was generated; fix those lines.")
    if not records:
        raise BadLinesError([f"{path}: no prompts (the file is empty or blank)"])
    return records


def encode_prompt(messages: Sequence[Message], tokenizer: Tokenizer) -> list[int]:
    """The prompt ids training uses (``data.encode.encode_record``'s prompt rule)."""
    ids = tokenizer.encode(tokenizer.chat_template.render_prompt(messages))
    if tokenizer.chat_template.prepend_bos and tokenizer.add_bos:
        ids.insert(0, tokenizer.bos_id)  # type: ignore[arg-type]  # add_bos implies bos_id is set
    return ids


def stop_token_ids(tokenizer: Tokenizer) -> list[int]:
    """What ends a response in training data: the tokenizer's EOS and the id the chat template closes
    an assistant turn with (``<|eot_id|>`` for Llama-3), found by encoding a one-turn record the way the
    data tool does and taking its last response id."""
    from megatron_tgdpo.data.encode import encode_record

    probe = PreferenceRecord(prompt=(Message("user", "hi"),), chosen=(Message("assistant", "a"),),
                             rejected=(Message("assistant", "b"),))
    end = encode_record(probe, tokenizer).chosen[-1]
    return sorted({tokenizer.eos_id, end})
