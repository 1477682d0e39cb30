"""Numerical kernels on megatron-core's tensor-parallel layout (vocab-sharded logits)."""
from megatron_tgdpo.ops.fused_logprobs import fused_vocab_parallel_logprobs
from megatron_tgdpo.ops.logprobs import DEFAULT_CHUNK_BYTES, chunk_tokens, vocab_parallel_logprobs

__all__ = ["DEFAULT_CHUNK_BYTES", "chunk_tokens", "fused_vocab_parallel_logprobs", "vocab_parallel_logprobs"]
