"""Shared-prompt rows on TransformerEngine's thd attention (GPU).

A shared-prompt row (``docs/data.md``) holds per pair the prompt (but its last token), then the
chosen response, then the rejected response, each starting with the prompt's last token. Causally,
the prompt's queries see the prompt, the chosen response's see the prompt and themselves, the
rejected response's see the prompt and themselves but not the chosen response. TE's thd attention
takes separate ``cu_seqlens_q`` and ``cu_seqlens_kv`` and a bottom-right aligned causal mask, but every
query sequence needs its keys contiguous in the key tensor, and the rejected response's keys (prompt,
then itself) are not contiguous in the row. So:

* the query sequences are the attention blocks of :func:`~megatron_tgdpo.models.layers.shared_prefix_blocks`:
  [prompt + chosen] as one causal sequence, [rejected] on its own (and any unshared segment as is);
  they tile the row in order, so queries and outputs stay where they are;
* the keys and values are gathered per block: [prompt + chosen] in place, then the prompt's keys
  again followed by the rejected response's (``index_select`` once per layer; its backward adds the
  two uses of the prompt's keys);
* TE runs ``padding_causal_bottom_right`` over ``cu_seqlens_q`` / ``cu_seqlens_kv``: a rejected token
  ``i`` sees the whole prompt and its own tokens up to ``i``; where query and key lengths are equal
  the mask is plain causal.

The gather indices and both ``cu_seqlens`` are built once per micro-batch (kept in the params'
``plans``) from the host bounds. Rows without a shared prompt go to megatron's TE attention unchanged.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch

from megatron_tgdpo.models.layers import shared_prefix_blocks

__all__ = ["TeQueryKeyPlan", "shared_prompt_te_attention"]


@dataclass(frozen=True)
class TeQueryKeyPlan:
    """Key gather index and the thd boundaries of queries and keys for one shared-prompt row."""

    kv_index: torch.Tensor
    cu_seqlens_q: torch.Tensor
    cu_seqlens_kv: torch.Tensor
    max_seqlen_q: int
    max_seqlen_kv: int

    @classmethod
    def build(cls, bounds: list[int], prefix_of: list[int], *, device: torch.device) -> "TeQueryKeyPlan":
        import numpy as np

        q_lengths, kv_lengths, kv_parts = [], [], []
        for block in shared_prefix_blocks(bounds, prefix_of):
            start, end = block[0], block[1]
            prefix = (block[2], block[3]) if len(block) == 4 else (start, start)
            kv_parts += [np.arange(*prefix), np.arange(start, end)]
            q_lengths.append(end - start)
            kv_lengths.append(end - start + prefix[1] - prefix[0])
        cu = lambda lengths: torch.tensor(np.concatenate([[0], np.cumsum(lengths)]), dtype=torch.int32)  # noqa: E731
        return cls(
            kv_index=torch.from_numpy(np.concatenate(kv_parts)).to(device),
            cu_seqlens_q=cu(q_lengths).to(device),
            cu_seqlens_kv=cu(kv_lengths).to(device),
            max_seqlen_q=max(q_lengths),
            max_seqlen_kv=max(kv_lengths),
        )


class _MaskType:
    """What megatron's TE wrapper reads of an ``AttnMaskType``: its ``name`` (megatron's enum has no
    padding_causal_bottom_right; TE takes the name as its ``attn_mask_type``)."""

    name = "padding_causal_bottom_right"


@functools.lru_cache(maxsize=None)
def shared_prompt_te_attention() -> type:
    """megatron-core's ``TEDotProductAttention`` that also runs shared-prompt rows (module docstring).
    Built on first use: TransformerEngine is imported only on GPU machines that have it."""
    from megatron.core.extensions.transformer_engine import TEDotProductAttention
    from megatron.core.packed_seq_params import PackedSeqParams

    class SharedPromptTEDotProductAttention(TEDotProductAttention):
        def forward(self, query, key, value, attention_mask, attn_mask_type, attention_bias=None,
                    packed_seq_params=None, **kwargs: Any):
            prefix_of = list(getattr(packed_seq_params, "prefix_of", ()) or ())
            if not any(p >= 0 for p in prefix_of):
                return super().forward(query, key, value, attention_mask, attn_mask_type,
                                       attention_bias=attention_bias, packed_seq_params=packed_seq_params, **kwargs)
            from megatron.core import parallel_state

            if parallel_state.get_context_parallel_world_size() > 1:
                raise NotImplementedError("shared-prompt rows with context parallelism on TransformerEngine "
                                          "attention (docs/data.md, \"Shared prompts\")")
            plans = packed_seq_params.plans
            plan = plans.get(("te", query.device))
            if plan is None:
                plan = plans[("te", query.device)] = TeQueryKeyPlan.build(
                    list(packed_seq_params.bounds), prefix_of, device=query.device)
            params = PackedSeqParams(
                qkv_format="thd", cu_seqlens_q=plan.cu_seqlens_q, cu_seqlens_kv=plan.cu_seqlens_kv,
                cu_seqlens_q_padded=plan.cu_seqlens_q, cu_seqlens_kv_padded=plan.cu_seqlens_kv,
                max_seqlen_q=plan.max_seqlen_q, max_seqlen_kv=plan.max_seqlen_kv,
            )
            key = key.index_select(0, plan.kv_index)
            value = value.index_select(0, plan.kv_index)
            return super().forward(query, key, value, attention_mask, _MaskType(),
                                   attention_bias=attention_bias, packed_seq_params=params, **kwargs)

    return SharedPromptTEDotProductAttention
