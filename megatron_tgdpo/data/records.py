"""Parse and validate one JSONL preference record into a normalised :class:`PreferenceRecord`.

Accepted forms (one JSON object per line; other top-level keys are ignored):

* ``{"prompt": str, "chosen": str, "rejected": str}`` (completion style, as TRL's "standard" form);
* ``{"prompt": [messages] | str, "chosen": [messages] | str, "rejected": [messages] | str}``
  (conversational); when both responses repeat the prompt messages at their start (the
  UltraFeedback-binarized layout), the repeat is removed;
* ``{"chosen": [conversation], "rejected": [conversation]}``: the prompt is the longest common
  message prefix, the responses are what follows it (assistant messages only).

SFT records (``megatron-tgdpo prepare --format sft``; :func:`parse_sft_record`) are one response per
prompt, in TRL's two SFT forms:

* ``{"prompt": str | [messages], "response": str | [messages]}`` (``"completion"`` is accepted for
  ``"response"``, TRL's name);
* ``{"messages": [conversation]}`` ending with an assistant turn: the response is the final run of
  assistant messages, the prompt everything before it (earlier assistant turns are context, not trained).

A string prompt becomes one user message, a string response one assistant message, so everything
downstream sees messages only. Validation stops at the first problem of a record and reports it as
``file:line: field: reason``: one precise line per bad record is more useful than a cascade.

Hostile input is a problem of its record, never a crash: JSON nested deeper than
:data:`MAX_JSON_DEPTH` (``too_deep``), numbers Python refuses to convert (``invalid_json``), and in
the text fields that are used (prompt, chosen, rejected, every message's role and content):

* a lone UTF-16 surrogate (``"\\ud800"``, valid JSON) is rejected (``invalid_unicode``): it is not a
  character, cannot be encoded as UTF-8, so no tokenizer can take it; it is what is left of a
  character cut in half upstream, and guessing a replacement would train on altered text;
* NUL (``"\\u0000"``) is rejected (``nul_character``): it never occurs in natural text and marks binary
  or corrupt data; C-string based tools cut text at it, so they could see other text than was trained on;
* everything else is kept exactly as written (no Unicode normalisation, other control characters such
  as tab, form feed or ESC kept): the tokenizer's own normaliser decides, so ids stay those of
  ``transformers`` for the same text, and such characters do occur in real text (code, logs).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, BinaryIO, Iterator

__all__ = [
    "MAX_JSON_DEPTH",
    "MAX_RECORD_BYTES",
    "OversizeLine",
    "PROBLEM_CODES",
    "ROLES",
    "InvalidField",
    "Message",
    "PreferenceRecord",
    "Problem",
    "RECORD_KINDS",
    "SFTRecord",
    "parse_prompt",
    "parse_record",
    "parse_sft_record",
    "printable",
    "read_lines",
]

# What a prepared data set holds (its manifest's "kind"): pairs, or one response per prompt.
RECORD_KINDS = ("preference", "sft")

ROLES = ("system", "user", "assistant")

# Deeper JSON is rejected. A record needs 3 levels (object, message list, message); the limit leaves
# room for metadata under ignored keys, and being far below Python's recursion limit it makes the
# verdict the same in every process (the parser's own RecursionError depends on the caller's stack).
MAX_JSON_DEPTH = 100

# Longest JSONL line (bytes, without its newline) data preparation accepts; a longer one is refused as
# ``record_too_large`` with its line number and never held in memory whole (:func:`read_lines`). Parsing
# and tokenizing a record takes about 70 times its size at the peak (a 50 MB line: over 3 GB), so the
# limit bounds the memory of preparation; 8 MiB is some two million tokens of text, far beyond any
# sequence length a record is cut to. ``tools/prepare_data.py --max-record-bytes`` changes it.
MAX_RECORD_BYTES = 8 * 2**20

# What :func:`read_lines` reads past at a time while skipping a line over the limit.
_SKIP_BLOCK = 2**20

# Every reason code a bad record can be counted under in the manifest, with what it means.
PROBLEM_CODES: dict[str, str] = {
    "invalid_utf8": "the line is not valid UTF-8",
    "invalid_json": "the line is not valid JSON (or holds a number too long to convert)",
    "too_deep": f"the JSON is nested deeper than {MAX_JSON_DEPTH} levels",
    "not_an_object": "the line is JSON but not an object",
    "missing_field": "a required field (chosen, rejected, prompt, role, content) is absent",
    "wrong_type": "a field has the wrong JSON type",
    "invalid_unicode": "a text field holds a lone UTF-16 surrogate (a \\ud800-\\udfff escape without its pair)",
    "nul_character": "a text field holds a NUL character (\\u0000)",
    "empty_prompt": "the prompt is empty or whitespace only",
    "empty_list": "a message list is empty",
    "empty_response": "a response has no text",
    "not_a_message": "a list element is not a {role, content} object",
    "unknown_role": "a role other than system, user, assistant",
    "prompt_last_role": "the prompt does not end with a user message",
    "response_role": "a response contains a non-assistant message",
    "response_last_role": "a response does not end with an assistant message",
    "no_shared_prompt": "full conversations that share no first message",
    "no_response": "nothing follows the prompt on one side",
    "identical_responses": "chosen and rejected are the same",
    "template_error": "the chat template failed to render the record",
    "template_mismatch": "the rendered prompt is not a prefix of the rendered conversation",
    "tokenizer_error": "the tokenizer raised an error on the rendered text of the record",
    "wrong_format": "the record is of the other format (preference pair vs SFT response): check --format",
    "record_too_large": "the line is longer than the record-size limit (--max-record-bytes)",
}

# Characters that would make a report line unreadable or unwritable (newlines split it, surrogates
# cannot be encoded as UTF-8): shown as escapes.
_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
# What a used text field may not contain (see the module docstring).
_FORBIDDEN_IN_TEXT = re.compile(r"[\x00\ud800-\udfff]")


def printable(text: str) -> str:
    """``text`` with control characters and lone surrogates written as escapes: safe to print or log."""
    return _UNPRINTABLE.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)


@dataclass(frozen=True, slots=True)
class Message:
    role: str
    content: str


@dataclass(frozen=True, slots=True)
class PreferenceRecord:
    """One validated pair: a shared prompt and two responses, all as messages."""

    prompt: tuple[Message, ...]
    chosen: tuple[Message, ...]
    rejected: tuple[Message, ...]


@dataclass(frozen=True, slots=True)
class SFTRecord:
    """One validated SFT example: a prompt and the response to train on, as messages."""

    prompt: tuple[Message, ...]
    response: tuple[Message, ...]


@dataclass(frozen=True, slots=True)
class Problem:
    """Why one input record was rejected; ``str()`` gives the ``file:line: field: reason`` line."""

    source: str
    line: int
    field: str
    reason: str
    code: str
    hint: str = ""

    def __str__(self) -> str:
        text = f"{self.source}:{self.line}: {self.field}: {self.reason}"
        # Reasons may quote the input or a tokenizer's message: escaped, the line always prints.
        return printable(f"{text} ({self.hint})" if self.hint else text)


class InvalidField(Exception):
    """One field of a record is unusable: ``field``, ``reason``, a ``code`` from PROBLEM_CODES, ``hint``."""

    def __init__(self, field: str, reason: str, code: str, hint: str = "") -> None:
        super().__init__(reason)
        self.field, self.reason, self.code, self.hint = field, reason, code, hint


@dataclass(frozen=True, slots=True)
class OversizeLine:
    """Stands in for a line longer than the record-size limit (its bytes were skipped, never kept)."""

    size: int  # bytes of the line, its newline excluded
    limit: int

    def problem(self) -> InvalidField:
        return InvalidField("<record>", f"record of {_mib(self.size)} exceeds the limit of {_mib(self.limit)}",
                            "record_too_large", "--max-record-bytes raises the limit")


def _mib(size: int) -> str:
    return f"{size / 2**20:.1f} MiB" if size >= 2**20 else f"{size} bytes"


def read_lines(handle: BinaryIO, *, max_bytes: int = MAX_RECORD_BYTES) -> Iterator[bytes | OversizeLine]:
    """The lines of a binary file (newline included, as iterating the file gives them), except that a line
    longer than ``max_bytes`` comes as an :class:`OversizeLine`: it is read past in 1 MiB blocks, so memory
    stays about ``max_bytes`` whatever the input holds."""
    while True:
        line = handle.readline(max_bytes + 1)
        if not line:
            return
        if line.endswith(b"\n") or len(line) <= max_bytes:
            yield line
            continue
        size = len(line)
        while True:
            block = handle.readline(_SKIP_BLOCK)
            size += len(block)
            if not block or block.endswith(b"\n"):
                break
        yield OversizeLine(size - (1 if block.endswith(b"\n") else 0), max_bytes)


def _json_type(value: Any) -> str:
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


def _text(field: str, value: str) -> str:
    """``value`` if it is usable text; else the record is bad (see the module docstring for why)."""
    if value.isascii() and "\x00" not in value:
        return value  # the common case, checked at C speed
    bad = _FORBIDDEN_IN_TEXT.search(value)
    if bad is None:
        return value
    position = bad.start()
    if bad.group() == "\x00":
        raise InvalidField(
            field,
            f"NUL character (\\u0000) at character {position}",
            "nul_character",
            "NUL never occurs in text and C-string based tools cut the text at it; remove it",
        )
    raise InvalidField(
        field,
        f"lone UTF-16 surrogate \\u{ord(bad.group()):04x} at character {position} (not a character, "
        "cannot be encoded as UTF-8)",
        "invalid_unicode",
        "probably a character cut in half upstream; fix or remove the record",
    )


def _depth_exceeds(value: Any, limit: int) -> bool:
    """Whether parsed JSON nests deeper than ``limit`` (the top level is 1); iterative, so any depth is safe."""
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            return True
        children = node.values() if isinstance(node, dict) else node
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return False


def _too_deep() -> InvalidField:
    return InvalidField("<record>", f"JSON nested deeper than {MAX_JSON_DEPTH} levels", "too_deep")


def _load_json(text: str) -> Any:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidField("<record>", f"invalid JSON: {exc.msg} (column {exc.colno})", "invalid_json") from None
    except RecursionError:
        raise _too_deep() from None  # the C parser recurses per level and gives up cleanly
    except ValueError as exc:  # an integer of more than sys.get_int_max_str_digits() digits
        raise InvalidField("<record>", f"invalid JSON: {exc}", "invalid_json") from None
    # Each level opens a bracket, so their count bounds the depth: only a line with many needs the walk.
    if isinstance(obj, (dict, list)) and text.count("[") + text.count("{") > MAX_JSON_DEPTH:
        if _depth_exceeds(obj, MAX_JSON_DEPTH):
            raise _too_deep()
    return obj


def _message(field: str, obj: Any) -> Message:
    if not isinstance(obj, dict):
        raise InvalidField(
            field, f'expected a message object with "role" and "content", got {_json_type(obj)}', "not_a_message"
        )
    if "role" not in obj:
        hint = 'ShareGPT-style {"from", "value"} messages must be converted to {"role", "content"}' if "from" in obj else ""
        raise InvalidField(f"{field}.role", "missing", "missing_field", hint)
    role = obj["role"]
    if not isinstance(role, str):
        raise InvalidField(f"{field}.role", f"expected a string, got {_json_type(role)}", "wrong_type")
    _text(f"{field}.role", role)
    if role not in ROLES:
        raise InvalidField(f"{field}.role", f"unknown role {role!r} (expected one of {', '.join(ROLES)})", "unknown_role")
    if "content" not in obj:
        raise InvalidField(f"{field}.content", "missing", "missing_field")
    content = obj["content"]
    if not isinstance(content, str):
        hint = "multimodal content parts are not supported; give the text as one string" if isinstance(content, list) else ""
        raise InvalidField(f"{field}.content", f"expected a string, got {_json_type(content)}", "wrong_type", hint)
    return Message(role, _text(f"{field}.content", content))


def _messages(field: str, value: list) -> tuple[Message, ...]:
    if not value:
        raise InvalidField(field, "empty list of messages", "empty_list")
    return tuple(_message(f"{field}[{i}]", m) for i, m in enumerate(value))


def parse_prompt(value: Any) -> tuple[Message, ...]:
    if isinstance(value, str):
        if not _text("prompt", value).strip():
            raise InvalidField("prompt", "empty prompt", "empty_prompt")
        return (Message("user", value),)
    if not isinstance(value, list):
        raise InvalidField("prompt", f"expected a string or a list of messages, got {_json_type(value)}", "wrong_type")
    if not value:
        raise InvalidField("prompt", "empty prompt", "empty_prompt")
    messages = _messages("prompt", value)
    if not any(m.content.strip() for m in messages):
        raise InvalidField("prompt", "empty prompt (every message is blank)", "empty_prompt")
    if messages[-1].role != "user":
        raise InvalidField(
            f"prompt[{len(messages) - 1}].role",
            f"the prompt must end with a user message, got {messages[-1].role!r}",
            "prompt_last_role",
        )
    return messages


def _response_messages(field: str, value: Any) -> tuple[Message, ...]:
    """Structure only: a string becomes one assistant message; a list is checked message by message."""
    if isinstance(value, str):
        return (Message("assistant", _text(field, value)),)
    if not isinstance(value, list):
        raise InvalidField(field, f"expected a string or a list of messages, got {_json_type(value)}", "wrong_type")
    return _messages(field, value)


def _check_response(field: str, messages: tuple[Message, ...], *, offset: int, why: str = "") -> None:
    """``offset``: index of ``messages[0]`` in the record's original list, so fields name real positions."""
    if not messages:
        raise InvalidField(field, "nothing after the prompt", "no_response", why)
    last = len(messages) - 1
    for i, m in enumerate(messages):
        if m.role == "assistant":
            continue
        where = f"{field}[{offset + i}].role"
        if i == last:
            raise InvalidField(where, f"a response must end with an assistant message, got {m.role!r}", "response_last_role", why)
        raise InvalidField(
            where,
            f"a response may contain only assistant messages, got {m.role!r}",
            "response_role",
            why or "the prompt's turns belong in the prompt",
        )
    if not any(m.content.strip() for m in messages):
        raise InvalidField(field, "empty response", "empty_response", "give a non-empty response or remove the record")


def _with_prompt(obj: dict) -> PreferenceRecord:
    prompt = parse_prompt(obj["prompt"])
    chosen = _response_messages("chosen", obj["chosen"])
    rejected = _response_messages("rejected", obj["rejected"])
    n = len(prompt)
    # UltraFeedback-binarized repeats the prompt at the start of both conversations.
    offset = 0
    if len(chosen) > n and len(rejected) > n and chosen[:n] == prompt and rejected[:n] == prompt:
        chosen, rejected, offset = chosen[n:], rejected[n:], n
    why = "" if offset else "a response that repeats the conversation must start with the whole prompt, on both sides"
    _check_response("chosen", chosen, offset=offset, why=why if chosen[0].role != "assistant" else "")
    _check_response("rejected", rejected, offset=offset, why=why if rejected[0].role != "assistant" else "")
    return PreferenceRecord(prompt, chosen, rejected)


def _shared_prefix(obj: dict) -> PreferenceRecord:
    chosen_raw, rejected_raw = obj["chosen"], obj["rejected"]
    for field, value in (("chosen", chosen_raw), ("rejected", rejected_raw)):
        if not isinstance(value, (str, list)):
            raise InvalidField(field, f"expected a string or a list of messages, got {_json_type(value)}", "wrong_type")
    if not (isinstance(chosen_raw, list) and isinstance(rejected_raw, list)):
        raise InvalidField(
            "prompt",
            "missing",
            "missing_field",
            'without "prompt", chosen and rejected must be full conversations (lists of messages) sharing the prompt',
        )
    chosen = _messages("chosen", chosen_raw)
    rejected = _messages("rejected", rejected_raw)
    if chosen == rejected:
        raise InvalidField("rejected", "same as chosen", "identical_responses", "a preference pair needs two different responses")
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    if n == 0:
        raise InvalidField(
            "chosen/rejected",
            "the conversations differ from their first message, so there is no shared prompt",
            "no_shared_prompt",
            'give the prompt in a "prompt" field',
        )
    for field, side, other in (("chosen", chosen, "rejected"), ("rejected", rejected, "chosen")):
        if n == len(side):
            raise InvalidField(field, "nothing after the prompt", "no_response", f"this conversation is a prefix of {other}")
    prompt = chosen[:n]
    if prompt[-1].role != "user":
        raise InvalidField(
            f"chosen[{n - 1}].role",
            f"the shared prompt (the first {n} messages) must end with a user message, got {prompt[-1].role!r}",
            "prompt_last_role",
        )
    why = f"the conversations diverge at message {n}; everything after the shared prompt is the response"
    _check_response("chosen", chosen[n:], offset=n, why=why)
    _check_response("rejected", rejected[n:], offset=n, why=why)
    return PreferenceRecord(prompt, chosen[n:], rejected[n:])


_SFT_KEYS = frozenset(("response", "completion", "messages"))


def _object(raw: bytes | str | OversizeLine, *, line: int) -> dict | None:
    """The JSON object of one line (``None`` for a blank line); InvalidField when it is not one."""
    if isinstance(raw, OversizeLine):
        raise raw.problem()
    if isinstance(raw, bytes):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidField("<record>", f"not valid UTF-8 (byte {exc.start})", "invalid_utf8") from None
    else:
        text = raw
    if line == 1:
        text = text.removeprefix("\ufeff")
    if not text.strip():
        return None
    obj = _load_json(text)
    if not isinstance(obj, dict):
        raise InvalidField("<record>", f"expected a JSON object, got {_json_type(obj)}", "not_an_object")
    return obj


def parse_record(raw: bytes | str | OversizeLine, *, source: str, line: int) -> PreferenceRecord | Problem | None:
    """Parse one JSONL line. Returns the record, the first :class:`Problem` found, or ``None`` for a blank line."""
    try:
        obj = _object(raw, line=line)
        if obj is None:
            return None
        if "chosen" not in obj and "rejected" not in obj and _SFT_KEYS & obj.keys():
            raise InvalidField("chosen", "missing", "wrong_format",
                               "this is an SFT record (one response per prompt); prepare it with --format sft")
        for key in ("chosen", "rejected"):
            if key not in obj:
                raise InvalidField(key, "missing", "missing_field", 'every record needs "chosen" and "rejected"')
        record = _with_prompt(obj) if "prompt" in obj else _shared_prefix(obj)
        if record.chosen == record.rejected:
            raise InvalidField("rejected", "same as chosen", "identical_responses", "a preference pair needs two different responses")
        return record
    except InvalidField as bad:
        return Problem(source, line, bad.field, bad.reason, bad.code, bad.hint)


def _sft_from_messages(value: Any) -> SFTRecord:
    if not isinstance(value, list):
        raise InvalidField("messages", f"expected a list of messages, got {_json_type(value)}", "wrong_type")
    messages = _messages("messages", value)
    last = len(messages) - 1
    if messages[last].role != "assistant":
        raise InvalidField(f"messages[{last}].role",
                           f"the conversation must end with an assistant message (the response), got "
                           f"{messages[last].role!r}", "response_last_role")
    start = last
    while start > 0 and messages[start - 1].role == "assistant":
        start -= 1
    if start == 0:
        raise InvalidField("messages", "no prompt: the conversation has only assistant messages", "empty_prompt",
                           "an SFT conversation needs a user message before the response")
    prompt = messages[:start]
    if prompt[-1].role != "user":
        raise InvalidField(f"messages[{start - 1}].role",
                           f"the message before the response must be a user message, got {prompt[-1].role!r}",
                           "prompt_last_role")
    if not any(m.content.strip() for m in prompt):
        raise InvalidField("messages", "empty prompt (every message before the response is blank)", "empty_prompt")
    response = messages[start:]
    _check_response("messages", response, offset=start)
    return SFTRecord(prompt, response)


def _sft_with_prompt(obj: dict) -> SFTRecord:
    keys = [key for key in ("response", "completion") if key in obj]
    if len(keys) == 2:
        raise InvalidField("response", 'both "response" and "completion" given', "wrong_format",
                           "they name the same thing; keep one")
    if not keys:
        raise InvalidField("response", "missing", "missing_field",
                           'an SFT record is {"prompt", "response"} or {"messages": [...]}')
    prompt = parse_prompt(obj["prompt"])
    field = keys[0]
    response = _response_messages(field, obj[field])
    _check_response(field, response, offset=0)
    return SFTRecord(prompt, response)


def parse_sft_record(raw: bytes | str | OversizeLine, *, source: str, line: int) -> SFTRecord | Problem | None:
    """Parse one JSONL line of SFT data (forms in the module docstring). Returns the record, the first
    :class:`Problem` found, or ``None`` for a blank line. A preference pair is refused (``wrong_format``),
    not silently trained on its chosen side: prepare pairs as pairs, SFT trains on their chosen responses."""
    try:
        obj = _object(raw, line=line)
        if obj is None:
            return None
        if "chosen" in obj or "rejected" in obj:
            raise InvalidField("chosen" if "chosen" in obj else "rejected", "not an SFT field", "wrong_format",
                               "this is a preference record; prepare it without --format sft (SFT can train on "
                               "the chosen responses of a prepared preference set)")
        if "messages" in obj:
            if "prompt" in obj or "response" in obj or "completion" in obj:
                raise InvalidField("messages", '"messages" together with "prompt"/"response"', "wrong_format",
                                   'give either {"messages": [...]} or {"prompt", "response"}')
            return _sft_from_messages(obj["messages"])
        if "prompt" not in obj:
            raise InvalidField("prompt", "missing", "missing_field",
                               'an SFT record is {"prompt", "response"} or {"messages": [...]}')
        return _sft_with_prompt(obj)
    except InvalidField as bad:
        return Problem(source, line, bad.field, bad.reason, bad.code, bad.hint)
