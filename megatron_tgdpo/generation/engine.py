"""``generate``: batched sampling from megatron-core GPT chunks with a static KV cache, at any TP/PP.

How a batch runs (the scheme of megatron-core's static text-generation controller): there is no
padding; every row keeps its own tokens at their true positions. The first
forward (prefill) feeds positions ``[0, shortest prompt)`` of all rows; then each step feeds one
position of every row. A row whose prompt is longer than the current position is fed its next
*prompt* token (its sampled token is discarded); once past its prompt, it is fed what it sampled.
No row ever attends to padding, so there is no attention mask to get right, and a row's tokens are
the same whatever else is in its batch (rows are sorted by prompt length, so batches are homogeneous
and the one-token-at-a-time tail is short). A row stops at any of ``eos_ids`` or after
``max_new_tokens``; the batch stops when every row has.

Randomness is keyed by (seed, prompt key, sample index, step) (see ``sampling``), so results do not
depend on batch composition, data-parallel split or the TP/PP layout.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Sequence

import torch

from megatron_tgdpo.generation import decode_step, kv_cache
from megatron_tgdpo.generation.config import GeneratedSequence, GenerationError, SamplingConfig
from megatron_tgdpo.generation.model_state import check_supported, generation_mode
from megatron_tgdpo.generation.sampling import keyed_uniforms, sample_tokens, token_logprobs
from megatron_tgdpo.models.state_dict import unwrap


@dataclass(frozen=True)
class Progress:
    """Reported after each batch (every rank; the CLI prints rank 0's)."""

    rows_done: int
    rows_total: int
    new_tokens: int  # generated tokens so far, all rows of this call


@dataclass(frozen=True)
class _Row:
    prompt_index: int
    sample_index: int
    key: int
    prompt: list[int]


def _device(chunks) -> torch.device:
    return next(unwrap(chunks[0]).parameters()).device


def _check_prompts(prompts: Sequence[Sequence[int]], *, vocab_size: int, max_positions: int,
                   max_new_tokens: int) -> None:
    problems = []
    for i, prompt in enumerate(prompts):
        if len(prompt) == 0:
            problems.append(f"prompt {i} is empty (give at least one token, e.g. BOS)")
        elif min(prompt) < 0 or max(prompt) >= vocab_size:
            problems.append(f"prompt {i} has token ids outside [0, {vocab_size})")
        elif len(prompt) + max_new_tokens > max_positions:
            problems.append(
                f"prompt {i}: {len(prompt)} tokens + max_new_tokens {max_new_tokens} = "
                f"{len(prompt) + max_new_tokens} > the model's {max_positions} positions")
    if problems:
        shown = problems[:10] + ([f"... and {len(problems) - 10} more"] if len(problems) > 10 else [])
        raise GenerationError("cannot generate:\n  " + "\n  ".join(shown))


def generate(
    chunks: list[torch.nn.Module],
    prompt_token_ids: Sequence[Sequence[int]],
    *,
    sampling: SamplingConfig,
    eos_ids: Iterable[int],
    max_new_tokens: int,
    seed: int,
    micro_batch_size: int = 8,
    prompt_keys: Optional[Sequence[int]] = None,
    vocab_limit: Optional[int] = None,
    progress: Optional[Callable[[Progress], None]] = None,
) -> list[GeneratedSequence]:
    """Sample ``sampling.num_samples`` continuations of every prompt; call on every rank of the
    model-parallel group with the same arguments (each data-parallel replica with its own prompts).

    ``chunks``: this rank's model chunks as built by ``models.llama.build_model`` (DDP-wrapped or not,
    at their trained TP/PP/VPP layout; CP must be 1). Their train/eval mode and sequence-parallel
    settings are restored on return. ``micro_batch_size``: sequences (rows) per forward.
    ``prompt_keys``: a stable integer per prompt that keys its randomness, e.g. its index in the whole
    data set when prompts are split over data-parallel ranks (default: its position in this list).
    ``vocab_limit``: never sample ids >= this (the tokenizer's size when the model's vocabulary is padded).

    Returns, on every rank, one :class:`GeneratedSequence` per (prompt, sample), prompt-major.
    """
    sampling.validate()
    check_supported(chunks)
    if max_new_tokens < 1:
        raise GenerationError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if micro_batch_size < 1:
        raise GenerationError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
    keys = list(range(len(prompt_token_ids))) if prompt_keys is None else [int(k) for k in prompt_keys]
    if len(keys) != len(prompt_token_ids):
        raise GenerationError(f"{len(keys)} prompt_keys for {len(prompt_token_ids)} prompts")
    model = unwrap(chunks[0])
    _check_prompts(prompt_token_ids, vocab_size=model.vocab_size, max_positions=model.max_sequence_length,
                   max_new_tokens=max_new_tokens)
    stop = frozenset(int(e) for e in eos_ids)

    rows = [_Row(i, j, keys[i], [int(t) for t in p]) for i, p in enumerate(prompt_token_ids)
            for j in range(sampling.num_samples)]
    # Similar lengths together: a batch's one-token-at-a-time stretch is (longest - shortest) prompt.
    order = sorted(range(len(rows)), key=lambda r: (len(rows[r].prompt), r))
    results: dict[int, GeneratedSequence] = {}
    new_tokens = 0
    with generation_mode(chunks):
        for start in range(0, len(order), micro_batch_size):
            batch = [rows[r] for r in order[start:start + micro_batch_size]]
            for r, seq in zip(order[start:start + micro_batch_size],
                              _generate_batch(chunks, batch, sampling=sampling, stop=stop,
                                              max_new_tokens=max_new_tokens, seed=seed, vocab_limit=vocab_limit)):
                results[r] = seq
                new_tokens += len(seq.tokens)
            if progress is not None:
                progress(Progress(rows_done=len(results), rows_total=len(rows), new_tokens=new_tokens))
    return [results[r] for r in range(len(rows))]


def _generate_batch(
    chunks: list[torch.nn.Module],
    batch: list[_Row],
    *,
    sampling: SamplingConfig,
    stop: frozenset[int],
    max_new_tokens: int,
    seed: int,
    vocab_limit: Optional[int],
) -> list[GeneratedSequence]:
    from megatron.core import parallel_state as ps

    device = _device(chunks)
    b = len(batch)
    lengths = [len(row.prompt) for row in batch]
    total = max(lengths) + max_new_tokens
    tokens = torch.zeros((b, total), dtype=torch.long, device=device)
    for i, row in enumerate(batch):
        tokens[i, : lengths[i]] = torch.tensor(row.prompt, dtype=torch.long)
    contexts = [kv_cache.new_context(max_batch_size=b, max_sequence_length=total) for _ in chunks]
    samples_here = ps.is_pipeline_last_stage(ignore_virtual=True)

    generated: list[list[int]] = [[] for _ in batch]
    logprobs: list[list[float]] = [[] for _ in batch]
    finish: list[Optional[str]] = [None] * b
    prev, cur = 0, min(lengths)
    while cur < total:
        positions = torch.arange(prev, cur, device=device).unsqueeze(0).expand(b, -1)
        logits = decode_step.forward_step(chunks, tokens[:, prev:cur], positions, contexts)
        for context in contexts:
            kv_cache.advance(context, cur - prev)
        # Rows past their prompt draw token (cur - length) of their continuation; others ignore the draw.
        steps = [max(cur - n, 0) for n in lengths]
        picked = None
        if samples_here:
            uniforms = keyed_uniforms(seed=seed, prompt_keys=[r.key for r in batch],
                                      sample_indices=[r.sample_index for r in batch], steps=steps)
            chosen = sample_tokens(logits, uniforms, sampling, vocab_limit=vocab_limit)
            picked = torch.stack([chosen.double(), token_logprobs(logits, chosen).double()])
        shared = decode_step.share_from_last_stage(picked, shape=(2, b), device=device).cpu()
        chosen_ids = shared[0].long().tolist()
        chosen_lp = shared[1].tolist()
        writes = []
        for i in range(b):
            if finish[i] is not None or cur < lengths[i]:
                continue  # finished, or still reading its prompt (the prompt token is already in place)
            token = chosen_ids[i]
            writes.append(i)
            generated[i].append(token)
            logprobs[i].append(chosen_lp[i])
            if token in stop:
                finish[i] = "eos"
            elif len(generated[i]) == max_new_tokens:
                finish[i] = "length"
        if writes:
            tokens[writes, cur] = torch.tensor([chosen_ids[i] for i in writes], device=device)
        if all(f is not None for f in finish):
            break
        prev, cur = cur, cur + 1
    return [
        GeneratedSequence(prompt_index=row.prompt_index, sample_index=row.sample_index, tokens=generated[i],
                          finish_reason=finish[i], logprobs=logprobs[i] if sampling.return_logprobs else None)
        for i, row in enumerate(batch)
    ]
