"""Verifiable tasks for on-policy preference data: seeded prompts, exact scorers, evaluation.

The TGDPO pipeline on tiny models: an SFT model samples k responses per prompt (``megatron-tgdpo generate``),
the task verifier scores them (``megatron-tgdpo score``), the best and worst response
of each prompt form a preference pair (``megatron-tgdpo pairs``), DPO then TGDPO train on the pairs,
and every model is evaluated on held-out prompts (``megatron-tgdpo evaluate``).

Files (JSONL, one object per line):

* prompt file (:mod:`.prompts`): ``{"id", "prompt", "task", "answer"}``;
* samples file (:mod:`.samples`): the prompt record plus ``"samples": [{"text", "num_tokens",
  "finish_reason", "score"?}]``.

Tasks (:mod:`.registry`; the wording fits the built-in tokenizer, which knows only digits, space,
``s o r t : =``): ``addition`` (``"tot: 4 7 : 3 5 ="`` -> ``" 8 2"``), ``sort`` (``"sort: 7 2 9 4 ="``
-> ``" 2 4 7 9"``) and ``reverse`` (``"tros: 7 2 9 4 ="`` -> ``" 4 9 2 7"``); for a real chat model's
tokenizer, ``word-sort`` and ``word-reverse`` (lists of English words, scored by longest common
subsequence: :mod:`.words`). Nothing here imports torch.
"""
from megatron_tgdpo.tasks.base import Task, exact_match, parse_response, positional_score
from megatron_tgdpo.tasks.evaluate import HeadToHead, Summary, head_to_head, summarize
from megatron_tgdpo.tasks.jsonl import BadLinesError, write_jsonl_atomic
from megatron_tgdpo.tasks.prompts import make_prompts, prompt_id
from megatron_tgdpo.tasks.registry import TASKS, get_task
from megatron_tgdpo.tasks.samples import SampleRecord, load_sample_records, score_records

__all__ = [
    "BadLinesError",
    "HeadToHead",
    "SampleRecord",
    "Summary",
    "TASKS",
    "Task",
    "exact_match",
    "get_task",
    "head_to_head",
    "load_sample_records",
    "make_prompts",
    "parse_response",
    "positional_score",
    "prompt_id",
    "score_records",
    "summarize",
    "write_jsonl_atomic",
]
