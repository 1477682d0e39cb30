"""megatron-core's static KV cache (``StaticInferenceContext``) and the one version difference around it.

Why the static context: it is the KV cache that megatron-core's own attention fills and reads for
*any* core-attention module (TransformerEngine's on GPU, our local one on CPU): ``Attention`` appends
each step's keys/values to per-layer buffers ``[max_seq, max_batch, kv_heads/tp, head_dim]`` and hands
the core attention all keys so far. It exists with the same constructor in 0.16 and 0.19. The dynamic
context (paged, in-flight batching) needs flash-attention kernels and CUDA, so it cannot run the CPU
tests and is not used.

The static cache has one sequence offset for the whole batch, so every row of a batch advances one
position per step together (see ``engine``: rows whose prompt is longer than the batch's shortest one
are fed their own prompt tokens until they start generating).

Version difference: 0.16 treats a forward as inference when an ``inference_context`` is passed to a
model in eval mode; 0.19 additionally reads a process-wide flag (``InferenceMode``), without which it
would compute logits for every position instead of the last one. :func:`megatron_tgdpo.compat.inference_forward` sets it
around each forward on 0.19 only.
"""
from __future__ import annotations



def new_context(*, max_batch_size: int, max_sequence_length: int):
    """An empty static KV cache for ``max_batch_size`` rows of up to ``max_sequence_length`` tokens."""
    from megatron.core.inference.contexts import StaticInferenceContext

    return StaticInferenceContext(max_batch_size, max_sequence_length)


def advance(context, num_tokens: int) -> None:
    """Record that ``num_tokens`` more positions of every row are now in the cache."""
    context.sequence_len_offset += num_tokens
    # Attention needs nothing else; flash-decode and CUDA-graph paths (off for us) read this flag.
    context.enable_decode_mode()


