"""Sampling from megatron-core GPT policies: batched, KV-cached, at the model's TP/PP layout.

API::

    generate(chunks, prompt_token_ids, *, sampling, eos_ids, max_new_tokens, seed, ...) -> [GeneratedSequence]
    SamplingConfig(temperature, top_p, top_k, num_samples, return_logprobs)

The CLI is ``tools/generate.py``; formats, the KV cache and the vLLM route: ``docs/generation.md``.
"""
from megatron_tgdpo.generation.config import GeneratedSequence, GenerationError, SamplingConfig
from megatron_tgdpo.generation.engine import Progress, generate

__all__ = ["GeneratedSequence", "GenerationError", "Progress", "SamplingConfig", "generate"]
