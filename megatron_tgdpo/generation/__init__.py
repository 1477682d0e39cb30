"""Sampling from megatron-core GPT policies: batched, KV-cached, at the model's TP/PP layout.

API::

    Sampler.load(load, ...) / Sampler(chunks, tokenizer, stop_ids)   # the sampler every command uses
        .sample(prompt_token_ids, *, sampling, max_new_tokens, seed, ...) -> [GeneratedSequence]
    stop_ids(tokenizer, *, model_dir)                                 # the one rule for what ends a response
    generate(chunks, prompt_token_ids, *, sampling, eos_ids, max_new_tokens, seed, ...)  # the loop underneath
    SamplingConfig(temperature, top_p, top_k, num_samples, return_logprobs)

The command is ``megatron_tgdpo.generation.cli`` (``tools/generate.py``); formats, the KV cache and the
vLLM route: ``docs/generation.md``.
"""
from megatron_tgdpo.generation.config import GeneratedSequence, GenerationError, SamplingConfig
from megatron_tgdpo.generation.engine import Progress, generate
from megatron_tgdpo.generation.sampler import Sampler, stop_ids

__all__ = ["GeneratedSequence", "GenerationError", "Progress", "Sampler", "SamplingConfig", "generate", "stop_ids"]
