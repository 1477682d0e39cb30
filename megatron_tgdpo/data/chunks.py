"""The per-chunk work of preparation: parse, validate, render, tokenize, apply the length policy.

One protocol for both kinds of records: preference pairs (prompt, chosen, rejected) and SFT examples
(prompt, response: stored as the chosen side, the rejected side empty, cut as the chosen side of a
pair would be, :func:`sft_length_policy`).

Runs in worker processes (or in-process with one worker), so it imports neither torch nor
megatron-core: a worker starts in milliseconds. Results come back in input order, which keeps the
output independent of the number of workers.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from megatron_tgdpo.data.encode import TokenizeError, encode_record, encode_sft_record
from megatron_tgdpo.data.records import Problem, parse_record, parse_sft_record
from megatron_tgdpo.data.templates import TemplateRenderError
from megatron_tgdpo.data.tokenizer import Tokenizer, load_tokenizer
from megatron_tgdpo.data.truncation import LengthOutcome, LengthPolicy, apply_length_policy

__all__ = ["Chunk", "ChunkResult", "init_worker", "process_chunk", "sft_length_policy", "use_tokenizer"]


@dataclass(frozen=True, slots=True)
class Chunk:
    input_index: int  # position of the file in the inputs (a file may be given twice)
    source: str  # the input path as the user gave it: problems are reported against it
    first_line: int  # 1-based line number of lines[0]
    lines: list[bytes]


@dataclass(slots=True)
class ChunkResult:
    input_index: int
    num_lines: int
    tokens: np.ndarray  # int32; per kept pair: prompt, chosen, rejected, concatenated
    lengths: np.ndarray  # int64 [pairs, 3]: prompt, chosen, rejected lengths
    problems: list[Problem] = field(default_factory=list)
    counts: Counter = field(default_factory=Counter)


def sft_length_policy(prompt: list[int], response: list[int], *, policy: LengthPolicy,
                      bos_id: int | None) -> LengthOutcome:
    """The pair length policy applied to one response (as a pair whose two sides are that response), so
    an SFT example is cut exactly as the chosen side of a pair would be. ``rejected`` is empty."""
    out = apply_length_policy(prompt, response, response, policy=policy, bos_id=bos_id)
    if out.dropped == "identical_after_truncation":  # both sides are the response by construction: kept
        return LengthOutcome(out.prompt, out.chosen, [], prompt_truncated=len(out.prompt) < len(prompt),
                             responses_truncated=1)
    return LengthOutcome(out.prompt, out.chosen, [], dropped=out.dropped, prompt_truncated=out.prompt_truncated,
                         responses_truncated=min(out.responses_truncated, 1))


def _fit_pair(encoded, policy: LengthPolicy, bos_id: int | None) -> LengthOutcome:
    return apply_length_policy(encoded.prompt, encoded.chosen, encoded.rejected, policy=policy, bos_id=bos_id)


def _fit_sft(encoded, policy: LengthPolicy, bos_id: int | None) -> LengthOutcome:
    return sft_length_policy(encoded.prompt, encoded.chosen, policy=policy, bos_id=bos_id)


# kind -> (parse a line, encode a record, apply the length policy)
_KINDS = {
    "preference": (parse_record, encode_record, _fit_pair),
    "sft": (parse_sft_record, encode_sft_record, _fit_sft),
}
_STATE: dict[str, object] = {}


def init_worker(tokenizer_path: str, chat_template: str | None, policy: LengthPolicy,
                kind: str = "preference", response_suffix: str = "eos") -> None:
    tokenizer = load_tokenizer(tokenizer_path, chat_template=chat_template, response_suffix=response_suffix)
    use_tokenizer(tokenizer, policy, kind=kind)


def use_tokenizer(tokenizer: Tokenizer, policy: LengthPolicy, *, kind: str = "preference") -> None:
    """In-process preparation: reuse an already-loaded tokenizer."""
    if kind not in _KINDS:
        raise ValueError(f"kind must be one of {', '.join(_KINDS)}, got {kind!r}")
    _STATE.update(tokenizer=tokenizer, policy=policy, kind=kind)


def process_chunk(chunk: Chunk) -> ChunkResult:
    tokenizer: Tokenizer = _STATE["tokenizer"]  # type: ignore[assignment]
    policy: LengthPolicy = _STATE["policy"]  # type: ignore[assignment]
    parse, encode, fit = _KINDS[_STATE["kind"]]  # type: ignore[index]
    flat: list[int] = []
    lengths: list[tuple[int, int, int]] = []
    problems: list[Problem] = []
    counts: Counter = Counter()
    for offset, raw in enumerate(chunk.lines):
        line = chunk.first_line + offset
        record = parse(raw, source=chunk.source, line=line)
        if record is None:
            counts["blank_lines"] += 1
            continue
        if isinstance(record, Problem):
            problems.append(record)
            continue
        try:
            encoded = encode(record, tokenizer)
        except (TemplateRenderError, TokenizeError) as exc:
            problems.append(Problem(chunk.source, line, exc.field, exc.reason, exc.code))
            continue
        counts["valid_records"] += 1
        out = fit(encoded, policy, tokenizer.bos_id)
        if out.dropped:
            counts[f"dropped_{out.dropped}"] += 1
            continue
        counts["prompt_truncated"] += out.prompt_truncated
        counts["responses_truncated"] += out.responses_truncated
        flat += out.prompt
        flat += out.chosen
        flat += out.rejected
        lengths.append((len(out.prompt), len(out.chosen), len(out.rejected)))
    return ChunkResult(
        input_index=chunk.input_index,
        num_lines=len(chunk.lines),
        tokens=np.array(flat, dtype=np.int32),
        lengths=np.array(lengths, dtype=np.int64).reshape(-1, 3),
        problems=problems,
        counts=counts,
    )
