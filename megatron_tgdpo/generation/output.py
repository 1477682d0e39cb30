"""Samples JSONL out, in the schema shared with verifiers and pair building (``tasks/samples.py``).

One line per prompt, in prompt-file order: the input object with ``"samples": [{"text", "num_tokens",
"finish_reason"}, ...]`` added (``num_samples`` entries, in sample order). ``text`` is the decoded
continuation without the stop token that ended it; ``num_tokens`` counts the generated tokens without
that stop token; ``finish_reason`` is ``"eos"`` or ``"length"``. Written through
``tasks.jsonl.write_jsonl_atomic`` (a temporary sibling, then ``os.replace``): readers see the old file
or the complete new one, never a partial one.
"""
from __future__ import annotations

from typing import Any

from megatron_tgdpo.data.tokenizer import Tokenizer
from megatron_tgdpo.generation.config import GeneratedSequence
from megatron_tgdpo.generation.prompts import OUTPUT_FIELD
from megatron_tgdpo.tasks.jsonl import write_jsonl_atomic

__all__ = ["output_record", "sample_record", "write_jsonl_atomic"]


def sample_record(seq: GeneratedSequence, tokenizer: Tokenizer) -> dict[str, Any]:
    ids = seq.tokens[:-1] if seq.finish_reason == "eos" else seq.tokens
    return {"text": tokenizer.decode(ids), "num_tokens": len(ids), "finish_reason": seq.finish_reason}


def output_record(fields: dict[str, Any], samples: list[dict[str, Any]]) -> dict[str, Any]:
    return {**fields, OUTPUT_FIELD: samples}
