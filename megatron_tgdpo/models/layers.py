"""Local (non-TransformerEngine) layers that megatron-core lacks for CPU runs.

* :class:`RMSNorm` supports sequence parallelism: megatron-core's torch-norm fallback asserts
  ``sequence_parallel=False``. With SP each rank normalises its own sequence slice, so the weight's
  gradient is partial per rank; marking the weight ``sequence_parallel`` makes megatron-core's
  ``finalize_model_grads`` all-reduce it over the TP group, exactly as it does for TE's norms.
* :class:`ContextParallelAttention` supports context parallelism: megatron-core's local
  ``DotProductAttention`` asserts ``context_parallel_size == 1`` (only TE attention does CP). Each CP
  rank holds two chunks of the sequence in megatron's load-balanced layout (sequence cut into 2*CP
  chunks, rank r holds chunks r and 2*CP-1-r, see ``megatron.core.utils.get_batch_on_this_cp_rank``);
  we all-gather K and V over the CP group and apply the causal mask on *global* positions. Simple and
  exact; TE's ring attention is the fast path on GPU.
"""
from __future__ import annotations

import math
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig


class RMSNorm(torch.nn.Module):
    """RMSNorm in fp32 math, weight marked for sequence-parallel gradient reduction."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **_: Any):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        # finalize_model_grads all-reduces params with this flag over TP when SP is on.
        setattr(self.weight, "sequence_parallel", config.sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed * self.weight.float()).to(x.dtype)


def cp_chunk_positions(*, local_len: int, cp_rank: int, cp_size: int, device: torch.device) -> torch.Tensor:
    """Global token positions held by ``cp_rank`` in the load-balanced CP layout."""
    if cp_size == 1:
        return torch.arange(local_len, device=device)
    chunk = local_len // 2
    first = torch.arange(cp_rank * chunk, (cp_rank + 1) * chunk, device=device)
    mirror = 2 * cp_size - 1 - cp_rank
    second = torch.arange(mirror * chunk, (mirror + 1) * chunk, device=device)
    return torch.cat([first, second])


class _GatherSeqOverCP(torch.autograd.Function):
    """All-gather along dim 0 over the CP group; backward keeps this rank's slice of the summed grad."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        ctx.rank = dist.get_rank(group)
        ctx.local = x.shape[0]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        # Every rank's queries contributed to every rank's K/V gradient: sum, then keep ours.
        dist.all_reduce(grad, group=ctx.group)
        return grad[ctx.rank * ctx.local : (ctx.rank + 1) * ctx.local], None


class ContextParallelAttention(MegatronModule):
    """Causal core attention (GQA) for the local spec, exact under context parallelism."""

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: Any,
        attention_type: str,
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        **_: Any,
    ):
        super().__init__(config=config)
        tp = parallel_state.get_tensor_model_parallel_world_size()
        self.heads = config.num_attention_heads // tp
        self.groups = config.num_query_groups // tp
        self.head_dim = config.kv_channels
        self.softmax_scale = softmax_scale or 1.0 / math.sqrt(self.head_dim)
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(
        self,
        query: torch.Tensor,  # [sq, b, heads, d]
        key: torch.Tensor,  # [sk, b, groups, d]
        value: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,  # noqa: ARG002 - causal only, built below
        attn_mask_type: Any = None,
        attention_bias: Any = None,
        packed_seq_params: Any = None,
    ) -> torch.Tensor:
        if packed_seq_params is not None or attention_bias is not None:
            raise NotImplementedError("packed sequences / attention bias need the TransformerEngine spec")
        cp_size = parallel_state.get_context_parallel_world_size()
        cp_rank = parallel_state.get_context_parallel_rank()
        local = query.shape[0]
        q_pos = cp_chunk_positions(local_len=local, cp_rank=cp_rank, cp_size=cp_size, device=query.device)
        if cp_size > 1:
            group = parallel_state.get_context_parallel_group()
            key = _GatherSeqOverCP.apply(key, group)
            value = _GatherSeqOverCP.apply(value, group)
            k_pos = torch.cat(
                [cp_chunk_positions(local_len=local, cp_rank=r, cp_size=cp_size, device=query.device)
                 for r in range(cp_size)]
            )
        else:
            k_pos = q_pos
        mask = q_pos[:, None] >= k_pos[None, :]  # True = may attend
        rep = self.heads // self.groups
        # [s, b, h, d] -> [b, h, s, d]
        q = query.permute(1, 2, 0, 3)
        k = key.permute(1, 2, 0, 3).repeat_interleave(rep, dim=1)
        v = value.permute(1, 2, 0, 3).repeat_interleave(rep, dim=1)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0, scale=self.softmax_scale
        )
        # [b, h, sq, d] -> [sq, b, h*d]
        return out.permute(2, 0, 1, 3).reshape(local, query.shape[1], self.heads * self.head_dim)
