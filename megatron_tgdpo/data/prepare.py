"""Prepare JSONL preference (or SFT) data into megatron-core indexed files plus a manifest.

``kind="sft"`` prepares SFT records (:func:`~.records.parse_sft_record`) into the same layout: each
response stored as the chosen response, the rejected one empty, the manifest's ``kind`` ``"sft"``; the
length policy is the pair policy applied to the one response.

Flow: load the tokenizer (fails fast on a bad tokenizer/template) -> hash the inputs -> stream the
input lines in chunks through workers (:mod:`.chunks`), in input order -> write kept pairs into a
staged ``IndexedDataset`` -> if ``on_bad_record="error"`` and any record was bad, discard everything
and raise :class:`BadRecordsError` listing them -> write the manifest -> publish atomically.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import time
from collections import Counter, deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Literal

import numpy as np

from megatron_tgdpo.data.chunks import Chunk, ChunkResult, init_worker, process_chunk, use_tokenizer
from megatron_tgdpo.data.chunks import sft_length_policy  # noqa: F401 - re-exported (part of this module's API)
from megatron_tgdpo.data.errors import BadRecordsError
from megatron_tgdpo.data.manifest import (
    FORMAT_NAME,
    SEQUENCES_PER_PAIR,
    bin_path,
    format_version_for,
    idx_path,
    sha256_file,
    write_manifest,
)
from megatron_tgdpo.data.publish import StagedOutput
from megatron_tgdpo.data.records import MAX_RECORD_BYTES, RECORD_KINDS, Problem, read_lines
from megatron_tgdpo.data.tokenizer import Tokenizer, load_tokenizer, tokenizer_content_hash
from megatron_tgdpo.data.truncation import LengthPolicy

__all__ = ["PrepareConfig", "build_manifest", "prepare_preference_data"]

OnBadRecord = Literal["error", "skip"]


@dataclass(frozen=True, kw_only=True)
class PrepareConfig:
    inputs: tuple[str, ...]
    output_prefix: str
    tokenizer: str
    chat_template: str | None = None
    response_suffix: Literal["eos", "template"] = "eos"  # "template": keep ChatML's "\n" after <|im_end|> (TRL)
    max_seq_length: int = 4096
    truncation: Literal["truncate_prompt", "drop"] = "truncate_prompt"
    min_response_tokens: int = 1
    min_prompt_tokens: int = 16
    on_bad_record: OnBadRecord = "error"
    max_errors_shown: int = 20
    workers: int = 1
    chunk_lines: int = 2000  # lines per task sent to a worker
    max_record_bytes: int = MAX_RECORD_BYTES  # a longer line is a bad record (record_too_large), never read whole
    kind: Literal["preference", "sft"] = "preference"  # what the records are (and the manifest's "kind")
    extra: dict[str, Any] = field(default_factory=dict)  # copied into the manifest as "extra"

    def length_policy(self) -> LengthPolicy:
        return LengthPolicy(
            max_seq_length=self.max_seq_length,
            truncation=self.truncation,
            min_response_tokens=self.min_response_tokens,
            min_prompt_tokens=self.min_prompt_tokens,
        )


def _chunks(paths: Iterable[str], *, chunk_lines: int, max_record_bytes: int = MAX_RECORD_BYTES) -> Iterator[Chunk]:
    for input_index, source in enumerate(paths):
        with open(source, "rb") as handle:
            lines: list = []
            first = 1
            for number, raw in enumerate(read_lines(handle, max_bytes=max_record_bytes), start=1):
                lines.append(raw)
                if len(lines) == chunk_lines:
                    yield Chunk(input_index, source, first, lines)
                    lines, first = [], number + 1
            if lines:
                yield Chunk(input_index, source, first, lines)


def _ordered_results(config: PrepareConfig, policy: LengthPolicy, tokenizer: Tokenizer) -> Iterator[ChunkResult]:
    tasks = _chunks(config.inputs, chunk_lines=config.chunk_lines, max_record_bytes=config.max_record_bytes)
    if config.workers <= 1:
        use_tokenizer(tokenizer, policy, kind=config.kind)
        yield from map(process_chunk, tasks)
        return
    # forkserver, not fork: the caller may be a training process with threads (torch, gloo, CUDA), and
    # forking those is unsafe. Workers import only the light modules of this package (no torch, no
    # megatron-core), so starting them costs well under a second.
    method = "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"
    context = mp.get_context(method)
    window = 2 * config.workers  # bounded read-ahead: memory stays flat however large the input
    with context.Pool(config.workers, init_worker,
                      (config.tokenizer, config.chat_template, policy, config.kind, config.response_suffix)) as pool:
        pending: deque = deque()
        for task in tasks:
            pending.append(pool.apply_async(process_chunk, (task,)))
            if len(pending) >= window:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def _input_entries(paths: Iterable[str]) -> list[dict[str, Any]]:
    entries = []
    for path in paths:
        entries.append({"path": str(path), "bytes": os.path.getsize(path), "sha256": sha256_file(path)})
    return entries


def _package_version() -> str:
    try:
        from importlib.metadata import version

        return version("megatron_tgdpo")
    except Exception:  # noqa: BLE001 - not installed (running from a checkout): not worth failing over
        return "unknown"


def prepare_preference_data(config: PrepareConfig, *, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Prepare ``config.inputs`` into ``config.output_prefix``{.bin,.idx,.manifest.json}; returns the manifest.

    Raises :class:`BadRecordsError` (nothing written) when ``on_bad_record="error"`` and any record is
    bad, ``ValueError`` when no pair is left, ``FileNotFoundError`` for missing inputs, and
    :class:`~.errors.TokenizerError` for an unusable tokenizer or template.
    """
    say = log or (lambda _msg: None)
    started = time.perf_counter()
    if not config.inputs:
        raise ValueError("no input files given")
    missing = [p for p in config.inputs if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"input file(s) not found: {', '.join(missing)}")
    if config.on_bad_record not in ("error", "skip"):
        raise ValueError(f"on_bad_record must be 'error' or 'skip', got {config.on_bad_record!r}")
    if config.kind not in RECORD_KINDS:
        raise ValueError(f"kind must be one of {', '.join(RECORD_KINDS)}, got {config.kind!r}")
    policy = config.length_policy()
    tokenizer = load_tokenizer(config.tokenizer, chat_template=config.chat_template,
                               response_suffix=config.response_suffix)
    tokenizer_sha256 = tokenizer_content_hash(tokenizer.path)
    say(f"tokenizer: {tokenizer}")
    inputs = _input_entries(config.inputs)

    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder  # heavy import: only here

    dtype = DType.optimal_dtype(tokenizer.vocab_size)
    problems: list[Problem] = []
    counts: Counter = Counter()
    lines_per_input: Counter = Counter()
    pairs_per_input: Counter = Counter()
    token_totals = np.zeros(3, dtype=np.int64)
    max_lengths = np.zeros(3, dtype=np.int64)
    max_row = 0
    num_pairs = 0
    with StagedOutput(config.output_prefix) as out:
        builder = IndexedDatasetBuilder(str(bin_path(out.stage_prefix)), dtype=dtype)
        try:
            for task_result in _ordered_results(config, policy, tokenizer):
                problems.extend(task_result.problems)
                counts.update(task_result.counts)
                lines_per_input[task_result.input_index] += task_result.num_lines
                if problems and config.on_bad_record == "error":
                    continue  # keep validating to report every problem, but stop writing
                lengths = task_result.lengths
                if not len(lengths):
                    continue
                ends = np.cumsum(lengths.sum(axis=1))
                starts = ends - lengths.sum(axis=1)
                for start, end, row in zip(starts.tolist(), ends.tolist(), lengths.tolist()):
                    builder.add_document(task_result.tokens[start:end], row)
                pairs_per_input[task_result.input_index] += len(lengths)
                num_pairs += len(lengths)
                token_totals += lengths.sum(axis=0)
                max_lengths = np.maximum(max_lengths, lengths.max(axis=0))
                max_row = max(max_row, int((lengths[:, 0] + lengths[:, 1:].max(axis=1)).max()))
        finally:
            builder.data_file.close()  # on any error too, before the staging directory is removed
        builder.finalize(str(idx_path(out.stage_prefix)))
        if problems and config.on_bad_record == "error":
            raise BadRecordsError(problems, max_shown=config.max_errors_shown)
        if num_pairs == 0:
            raise ValueError(
                f"no {'examples' if config.kind == 'sft' else 'pairs'} left to write ({len(problems)} bad records, "
                f"{sum(v for k, v in counts.items() if k.startswith('dropped_'))} dropped by the length policy)"
            )
        for index, entry in enumerate(inputs):
            entry["lines"] = lines_per_input[index]
            entry["pairs"] = pairs_per_input[index]
        manifest = build_manifest(
            config=config,
            policy=policy,
            tokenizer=tokenizer,
            tokenizer_sha256=tokenizer_sha256,
            inputs=inputs,
            problems=problems,
            counts=counts,
            num_pairs=num_pairs,
            token_totals=token_totals,
            max_lengths=max_lengths,
            max_row=max_row,
            dtype_name=np.dtype(dtype).name,
            stage_prefix=out.stage_prefix,
        )
        write_manifest(out.stage_prefix, manifest)
        out.publish()
    elapsed = time.perf_counter() - started
    say(
        f"wrote {num_pairs} {'SFT examples' if config.kind == 'sft' else 'pairs'} to {config.output_prefix}.{{bin,idx,manifest.json}} in {elapsed:.1f}s; "
        f"bad records skipped: {len(problems)}; dropped (length policy): "
        f"{sum(v for k, v in counts.items() if k.startswith('dropped_'))}; prompts truncated: "
        f"{counts['prompt_truncated']}; responses truncated: {counts['responses_truncated']}"
    )
    return manifest


def build_manifest(
    *,
    config: PrepareConfig,
    policy: LengthPolicy,
    tokenizer: Tokenizer,
    tokenizer_sha256: str,
    inputs: list[dict[str, Any]],
    problems: list[Problem],
    counts: Counter,
    num_pairs: int,
    token_totals: np.ndarray,
    max_lengths: np.ndarray,
    max_row: int,
    dtype_name: str,
    stage_prefix: Path,
) -> dict[str, Any]:
    """The manifest of a prepared set (what ``PREFIX.manifest.json`` holds), from the preparation's counts.
    Public so that a tool writing a set by other means (``tools/bench_step.py``) writes the same manifest."""
    by_reason = Counter(p.code for p in problems)
    dropped = {k.removeprefix("dropped_"): v for k, v in sorted(counts.items()) if k.startswith("dropped_")}
    sft = config.kind == "sft"
    return {
        "format": FORMAT_NAME,
        "format_version": format_version_for(config.kind),
        "kind": config.kind,
        "created_by": f"megatron_tgdpo {_package_version()}",
        "layout": {
            "sequences_per_pair": SEQUENCES_PER_PAIR,
            "sequences": ["prompt", "response", "empty"] if sft else ["prompt", "chosen_response", "rejected_response"],
            "documents": "one per example" if sft else "one per pair",
            "dtype": dtype_name,
        },
        "num_pairs": num_pairs,
        "inputs": inputs,
        "tokenizer": {
            # Absolute, so training from another directory finds it; not symlink-resolved, because a
            # Hugging Face cache links each file to a blob, away from its tokenizer_config.json.
            "path": os.path.abspath(tokenizer.path),
            "kind": tokenizer.kind,
            "content_sha256": tokenizer_sha256,  # see tokenizer_content_hash / resolve_dataset_tokenizer
            "fingerprint": tokenizer.fingerprint(),
            "vocab_size": tokenizer.vocab_size,
            "bos_id": tokenizer.bos_id,
            "eos_id": tokenizer.eos_id,
            "pad_id": tokenizer.pad_id,
        },
        "chat_template": {
            "name": tokenizer.chat_template.name,
            "end_of_response": tokenizer.chat_template.end_of_response,
            "response_suffix": tokenizer.chat_template.response_suffix,
        },
        "length_policy": asdict(policy),
        "records": {
            "lines": sum(entry["lines"] for entry in inputs),
            "blank_lines": counts.get("blank_lines", 0),
            "valid": counts.get("valid_records", 0),
            "bad": len(problems),
            "bad_by_reason": dict(sorted(by_reason.items())),
            "bad_examples": [str(p) for p in problems[: config.max_errors_shown]],
            "on_bad_record": config.on_bad_record,
        },
        "length_stats": {
            "dropped": dropped,
            "prompt_truncated": counts.get("prompt_truncated", 0),
            "responses_truncated": counts.get("responses_truncated", 0),
        },
        "tokens": {
            "prompt": int(token_totals[0]),
            "chosen": int(token_totals[1]),
            "rejected": int(token_totals[2]),
            "max_prompt": int(max_lengths[0]),
            "max_chosen": int(max_lengths[1]),
            "max_rejected": int(max_lengths[2]),
            "max_row": max_row,
        },
        "files": {
            "bin": {
                "name": bin_path(config.output_prefix).name,
                "bytes": bin_path(stage_prefix).stat().st_size,
                "sha256": sha256_file(bin_path(stage_prefix)),
            },
            "idx": {
                "name": idx_path(config.output_prefix).name,
                "bytes": idx_path(stage_prefix).stat().st_size,
                "sha256": sha256_file(idx_path(stage_prefix)),
            },
        },
        "extra": config.extra,
    }
