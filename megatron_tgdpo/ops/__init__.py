"""Numerical kernels on megatron-core's tensor-parallel layout (vocab-sharded logits)."""
from megatron_tgdpo.ops.logprobs import fused_vocab_parallel_logprobs, vocab_parallel_logprobs

__all__ = ["fused_vocab_parallel_logprobs", "vocab_parallel_logprobs"]
