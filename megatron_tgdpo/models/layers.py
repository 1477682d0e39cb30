"""Local (non-TransformerEngine) layers that megatron-core lacks for CPU runs.

* :class:`RMSNorm` supports sequence parallelism: megatron-core's torch-norm fallback asserts
  ``sequence_parallel=False``. With SP each rank normalises its own sequence slice, so the weight's
  gradient is partial per rank; marking the weight ``sequence_parallel`` makes megatron-core's
  ``finalize_model_grads`` all-reduce it over the TP group, exactly as it does for TE's norms.
* :class:`ContextParallelAttention` is the causal core attention (GQA) of the local spec, with what
  megatron-core's local ``DotProductAttention`` refuses (it asserts ``context_parallel_size == 1`` and
  ``packed_seq_params is None``; only TE attention does these):

  - **context parallelism**: each CP rank holds two chunks of every sequence in megatron's
    load-balanced layout (a sequence cut into 2*CP chunks, rank r holds chunks r and 2*CP-1-r, see
    :func:`megatron_tgdpo.data.batch.cp_chunk_positions`); we all-gather K and V over the CP group and
    mask on *global* positions. Simple and exact; TE's ring attention is the fast path on GPU.
  - **packed sequences** (``packed_seq_params.qkv_format == "thd"``): megatron then passes
    ``[t, heads, d]`` tensors (batch dimension squeezed) and reshapes our ``[t, heads * d]`` output
    back to ``[t, 1, h]``. The mask is block-diagonal causal over the segments of ``cu_seqlens``: a
    token sees earlier tokens of its own segment only. Without CP each segment is attended on its own
    (segments of similar length batched into one padded causal call, :class:`BlockPlan`), so a row of
    short sequences costs about the sum of their squares; under CP one masked ``[local, row]`` score
    matrix is used. The segment bounds come from the batch as host ints (no device-to-host copy per
    layer), and the per-micro-batch gather plan is built by the first layer and reused by the others.
  - **shared-prompt rows** (``docs/data.md``): a response segment also attends to all of its prompt
    segment's keys. Without CP it runs as blocks (:func:`shared_prefix_blocks`); under CP the mask on
    global positions lets a query see its own segment causally and its prefix segment whole
    (:meth:`ContextParallelAttention.allowed`): the all-gathered keys already hold every rank's chunks
    of the prompt. Under CP every segment is split into 2*CP chunks on its own
    (:func:`megatron_tgdpo.data.batch.cp_row_positions`), as TE and megatron's thd RoPE do. RoPE
    itself needs nothing here (``models/rope_positions.py`` hands megatron's RoPE the row's positions).
  - **KV-cache decoding** (static batching, CP=1, not packed): megatron passes the cached keys plus the
    new ones (``sk``) and only the new queries (``sq < sk``); those are the *last* ``sq`` positions,
    so the causal mask is offset by ``sk - sq``.

Segments are the *padded* boundaries (``cu_seqlens_q_padded`` when set, else ``cu_seqlens_q``), the
same choice megatron's thd RoPE makes, so mask and positions always agree. A segment's padding sits
after its tokens, so causally no real token ever sees it: the real tokens' outputs equal TE's with
``pad_between_seqs``; padding outputs are junk either way and carry no loss.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_tgdpo.compat import causal_sdpa, grouped_query_sdpa

# Re-exported: existing callers import the CP position helper from here (one definition, in batch.py).
from megatron_tgdpo.data.batch import cp_chunk_positions, cp_row_positions

__all__ = [
    "AttentionLayout",
    "BlockPlan",
    "ContextParallelAttention",
    "RMSNorm",
    "cp_chunk_positions",
    "cp_row_positions",
    "packed_segment_bounds",
    "shared_prefix_blocks",
]


class RMSNorm(torch.nn.Module):
    """RMSNorm in fp32 math, weight marked for sequence-parallel gradient reduction."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **_: Any):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        # finalize_model_grads all-reduces params with this flag over TP when SP is on.
        setattr(self.weight, "sequence_parallel", config.sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = _row_major(x).float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed * self.weight.float()).to(x.dtype)


def _row_major(x: torch.Tensor) -> torch.Tensor:
    """``x`` with row-major strides (a copy only where they are not). A packed row ``[t, 1, h]`` comes
    out of the embedding's transpose with stride ``t * h`` on its size-one batch dimension: torch calls
    that contiguous, and the norm's output inherits it. ``torch.matmul`` of such a 3-D input by a weight
    folds it into one ``mm`` when the weight requires grad, but runs a batched kernel when it does not
    (its strides do not allow the fold as a view): a frozen model and a trained one from the same
    weights would then round the next linear layer differently. Row-major strides fold in both."""
    expected, step = [], 1
    for size in reversed(x.shape):
        expected.append(step)
        step *= size
    if x.stride() == tuple(reversed(expected)):
        return x
    return x.clone(memory_format=torch.contiguous_format)


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


def packed_segment_bounds(packed_seq_params: Any) -> Optional[list[int]]:
    """Host list of the segment boundaries of a thd ``PackedSeqParams`` (None when not packed).

    The host ints the batch carries (:class:`~megatron_tgdpo.data.packed_params.RowSeqParams`) are
    used as they are; plain ``PackedSeqParams`` are read from their tensors (a device-to-host copy).
    Padded boundaries win (megatron's thd RoPE makes the same choice); queries and keys must share
    them because this is self-attention over one packed row."""
    if packed_seq_params is None:
        return None
    if packed_seq_params.qkv_format != "thd":
        raise NotImplementedError(
            f"packed_seq_params with qkv_format={packed_seq_params.qkv_format!r}: the local attention supports 'thd'"
        )
    host = getattr(packed_seq_params, "bounds", ())
    if host:
        return list(host)
    q = packed_seq_params.cu_seqlens_q_padded
    q = packed_seq_params.cu_seqlens_q if q is None else q
    kv = packed_seq_params.cu_seqlens_kv_padded
    kv = packed_seq_params.cu_seqlens_kv if kv is None else kv
    if q is None:
        raise ValueError("thd packed_seq_params need cu_seqlens_q (or cu_seqlens_q_padded)")
    bounds = [int(x) for x in q.tolist()]
    if kv is not None and kv is not q and [int(x) for x in kv.tolist()] != bounds:
        raise NotImplementedError("packed self-attention needs the same cu_seqlens for queries and keys")
    if not bounds or bounds[0] != 0 or any(b <= a for a, b in zip(bounds[:-1], bounds[1:])):
        raise ValueError(f"cu_seqlens must start at 0 and increase strictly, got {bounds}")
    return bounds


def shared_prefix_blocks(bounds: list[int], prefix_of: list[int]) -> list[tuple[int, int, int, int]]:
    """Attention blocks ``(start, end, prefix_start, prefix_end)`` of a shared-prompt row: the queries
    ``[start, end)`` attend to the keys ``[prefix_start, prefix_end)`` and, causally, to their own.

    A segment whose prefix segment directly precedes it (a pair's prompt, then its chosen response)
    is merged with it into one plain causal block: the prompt's queries see only the prompt, the
    response's see the prompt and themselves, exactly as the two segments would. A later segment of
    the same prefix (the rejected response) keeps the prefix as extra keys."""
    segments = list(zip(bounds[:-1], bounds[1:]))
    if len(prefix_of) != len(segments):
        raise ValueError(f"prefix_of names {len(prefix_of)} segments, cu_seqlens {len(segments)}")
    merged_into_next = {p for n, p in enumerate(prefix_of) if p >= 0 and p == n - 1}
    blocks = []
    for n, (start, end) in enumerate(segments):
        if n in merged_into_next:
            continue
        p = prefix_of[n]
        if p < 0:
            blocks.append((start, end, start, start))
        elif p == n - 1:
            blocks.append((segments[p][0], end, start, start))
        elif p < n:
            blocks.append((start, end, *segments[p]))
        else:
            raise ValueError(f"segment {n}'s prompt is segment {p}: a prompt must precede its responses")
    return blocks


@dataclass(frozen=True)
class AttentionLayout:
    """Where this rank's queries and the keys it attends over sit in the full (unsliced) row.

    ``*_pos`` are row positions; ``*_seg`` the packed segment of each position, or None when the row
    is one sequence (then every position is in the same segment); ``q_prefix`` (shared-prompt rows) the
    segment whose keys each query also sees whole, -1 for none."""

    q_pos: torch.Tensor
    k_pos: torch.Tensor
    q_seg: Optional[torch.Tensor] = None
    k_seg: Optional[torch.Tensor] = None
    q_prefix: Optional[torch.Tensor] = None


def _segments(positions: torch.Tensor, bounds: list[int]) -> torch.Tensor:
    """Segment index of each row position (``bounds``: cu_seqlens as a list)."""
    inner = torch.tensor(bounds[1:], dtype=positions.dtype, device=positions.device)
    return torch.bucketize(positions, inner, right=True)


def _packed_layout(*, sq: int, sk: int, bounds: list[int], cp_rank: int, cp_size: int,
                   device: torch.device, prefix_of: Optional[list[int]] = None) -> AttentionLayout:
    if sq != sk or sq * cp_size != bounds[-1]:
        raise ValueError(
            f"packed row of {bounds[-1]} tokens (cu_seqlens) does not match {sq} local queries / {sk} keys "
            f"at context-parallel size {cp_size}"
        )
    if cp_size == 1:  # no CP split, so segments of any length (cp_row_positions wants 2*CP multiples)
        q_pos = k_pos = torch.arange(sq, device=device)
    else:
        q_pos = cp_row_positions(bounds, cp_rank=cp_rank, cp_size=cp_size, device=device)
        # K/V are all-gathered in rank order: their positions are every rank's, concatenated.
        k_pos = torch.cat(
            [cp_row_positions(bounds, cp_rank=r, cp_size=cp_size, device=device) for r in range(cp_size)]
        )
    q_seg = _segments(q_pos, bounds)
    q_prefix = None
    if prefix_of and any(p >= 0 for p in prefix_of):
        q_prefix = torch.tensor(prefix_of, dtype=q_seg.dtype, device=device)[q_seg]
    return AttentionLayout(q_pos, k_pos, q_seg, _segments(k_pos, bounds), q_prefix)


def _sequence_layout(*, sq: int, sk: int, cp_rank: int, cp_size: int, device: torch.device) -> AttentionLayout:
    if sq < sk:
        if cp_size > 1:
            raise NotImplementedError("KV-cache attention (fewer queries than keys) with context parallelism")
        # Cached prefix plus new tokens: the queries are the last sq positions of the keys.
        return AttentionLayout(torch.arange(sk - sq, sk, device=device), torch.arange(sk, device=device))
    if sq > sk:
        raise ValueError(f"more queries ({sq}) than keys ({sk})")
    q_pos = cp_chunk_positions(local_len=sq, cp_rank=cp_rank, cp_size=cp_size, device=device)
    k_pos = torch.cat(
        [cp_chunk_positions(local_len=sq, cp_rank=r, cp_size=cp_size, device=device) for r in range(cp_size)]
    )
    return AttentionLayout(q_pos, k_pos)


class ContextParallelAttention(MegatronModule):
    """Causal core attention (GQA) for the local spec: exact under context parallelism, for packed
    (thd) rows and for KV-cache decoding (see the module docstring)."""

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

    def allowed(self, layout: AttentionLayout) -> torch.Tensor:
        """``[sq, sk]`` bool, True where a query may attend to a key: causal, within its own segment, and
        every key of the query's prefix segment (shared prompts; it precedes the query's segment).
        (A method so that a test can swap in a deliberately leaky mask and show its checks catch it.)"""
        mask = layout.q_pos[:, None] >= layout.k_pos[None, :]
        if layout.q_seg is not None:
            mask &= layout.q_seg[:, None] == layout.k_seg[None, :]
        if layout.q_prefix is not None:
            mask |= layout.q_prefix[:, None] == layout.k_seg[None, :]
        return mask

    def forward(
        self,
        query: torch.Tensor,  # [sq, b, heads, d]; thd: [t, heads, d]
        key: torch.Tensor,  # [sk, b, groups, d]; thd: [t, groups, d]
        value: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,  # noqa: ARG002 - causal only, built below
        attn_mask_type: Any = None,  # noqa: ARG002 - always causal (megatron says no_mask when decoding)
        attention_bias: Any = None,
        packed_seq_params: Any = None,
    ) -> torch.Tensor:
        if attention_bias is not None:
            raise NotImplementedError("attention bias needs the TransformerEngine spec")
        # The value is a view into the fused QKV projection's output (query and key are RoPE's new
        # tensors): saved for backward as a view, it would keep that whole [s, b, (heads + 2 groups) d]
        # buffer alive. Its own copy (groups x d per token) is what backward needs.
        value = value.contiguous()
        bounds = packed_segment_bounds(packed_seq_params)
        prefix_of = list(getattr(packed_seq_params, "prefix_of", ()) or ())
        if bounds is not None:  # thd: give the tensors back their batch dimension of one
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
        cp_size = parallel_state.get_context_parallel_world_size()
        if bounds is not None and cp_size == 1:
            if query.shape[0] != bounds[-1] or key.shape[0] != bounds[-1]:
                raise ValueError(f"packed row of {bounds[-1]} tokens (cu_seqlens) does not match {query.shape[0]} "
                                 f"queries / {key.shape[0]} keys")
            # Packed, no CP split: attend per block (sum of n_i^2 scores, not row^2), see blocks().
            plans = getattr(packed_seq_params, "plans", None)
            if any(p >= 0 for p in prefix_of):
                # the row's blocks follow from its params alone: built by the first layer, kept for the others
                blocks_key = ("shared_prefix_blocks", tuple(bounds), tuple(prefix_of))
                blocks = plans.get(blocks_key) if plans is not None else None
                if blocks is None:
                    blocks = shared_prefix_blocks(bounds, prefix_of)
                    if plans is not None:
                        plans[blocks_key] = blocks
            else:
                blocks = self.blocks(bounds)
            return self._attend_blocks(query, key, value, blocks, plans=plans).squeeze(1)
        if bounds is None and cp_size == 1 and query.shape[0] == key.shape[0]:
            # Rows of one sequence each, whole on this rank: plain causal attention. The causal kernel
            # skips the masked half and needs no [s, s] mask per layer (a row's padding sits after its
            # tokens, so no real token sees it).
            return self._attend(query, key, value)
        where = dict(sq=query.shape[0], sk=key.shape[0], cp_rank=parallel_state.get_context_parallel_rank(),
                     cp_size=cp_size, device=query.device)
        if bounds is None:
            layout = _sequence_layout(**where)
        else:
            layout = _packed_layout(bounds=bounds, prefix_of=prefix_of, **where)
        if cp_size > 1:
            group = parallel_state.get_context_parallel_group()
            key = _GatherSeqOverCP.apply(key, group)
            value = _GatherSeqOverCP.apply(value, group)
        out = self._attend(query, key, value, self.allowed(layout))  # [sq, b, heads * d]
        return out.squeeze(1) if bounds is not None else out

    def blocks(self, bounds: list[int]) -> list[tuple[int, int]]:
        """``[start, end)`` of each causal block of a packed row at CP=1: its segments, which tile the row.
        The same semantics as :meth:`allowed` (causal within a segment) without the ``[row, row]`` mask:
        a row of many short sequences costs the sum of their squares. (A method so that a test can
        merge blocks and show its checks catch it.)"""
        return list(zip(bounds[:-1], bounds[1:]))

    def _attend_blocks(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        blocks: list[tuple[int, ...]],
        *,
        plans: Optional[dict] = None,
    ) -> torch.Tensor:
        """Causal attention within each block of a ``[t, 1, heads, d]`` row. A block is ``(start, end)``
        (its own tokens) or ``(start, end, prefix_start, prefix_end)`` (the prefix's keys, then its own:
        see :class:`BlockPlan`); the blocks tile the row in order. Blocks of similar length run as one
        padded batch (:class:`BlockPlan`). Returns ``[t, 1, heads * d]``. ``plans``: a per-micro-batch
        dict where the plan is kept for the other layers (built once per micro-batch, not per layer)."""
        plan_key = ("blocks", tuple(blocks), query.device)
        plan = plans.get(plan_key) if plans is not None else None
        if plan is None:
            plan = BlockPlan.build(blocks, device=query.device)
            if plans is not None:
                plans[plan_key] = plan
        pieces = []
        for group in plan.groups:
            if group.span is not None:  # one contiguous block: views, no gather
                start, end = group.span
                pieces.append(self._attend(query[start:end], key[start:end], value[start:end])[:, 0])
                continue
            n, length = group.index.shape
            flat = group.index.view(-1)

            # index_select, not advanced indexing: one gather kernel forward and an index_add backward,
            # where x[index, 0] takes torch's general indexing path (and an accumulating index_put back)
            def as_batch(x: torch.Tensor) -> torch.Tensor:  # [t, 1, h, d] -> [L, n, h, d]: n blocks of L
                return x[:, 0].index_select(0, flat).view(n, length, *x.shape[2:]).transpose(0, 1)

            out = self._attend(as_batch(query), as_batch(key), as_batch(value))  # [L, n, heads * d]
            pieces.append(out.transpose(0, 1).reshape(n * length, -1).index_select(0, group.keep))
        out = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
        return (out if plan.order is None else out.index_select(0, plan.order)).unsqueeze(1)

    def _attend(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """``[s, b, heads|groups, d]`` -> ``[sq, b, heads * d]``: attention under ``mask`` (True = may
        attend; ``[sq, sk]`` or ``[b, 1, sq, sk]``), or plain causal without one (``compat.causal_sdpa``:
        on CPU in query chunks). Grouped-query K/V are broadcast over the heads inside the kernel where
        torch can (``compat.grouped_query_sdpa``)."""
        # [s, b, h, d] -> [b, h, s, d]
        q = query.permute(1, 2, 0, 3)
        k = key.permute(1, 2, 0, 3)
        v = value.permute(1, 2, 0, 3)
        dropout_p = self.dropout if self.training else 0.0
        if mask is None:
            out = causal_sdpa(q, k, v, scale=self.softmax_scale, dropout_p=dropout_p)
        else:
            out = grouped_query_sdpa(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=self.softmax_scale)
        # [b, h, sq, d] -> [sq, b, h*d]
        return out.permute(2, 0, 1, 3).reshape(query.shape[0], query.shape[1], self.heads * self.head_dim)


@dataclass(frozen=True)
class BlockGroup:
    """Blocks run as one attention call: ``span`` (one contiguous block, sliced), or ``index`` ``[n, L]``
    (row positions of n blocks, each padded at its end to L) and ``keep`` (the rows of the flattened
    ``[n * L]`` output that are real queries of the block itself, in order)."""

    span: Optional[tuple[int, int]] = None
    index: Optional[torch.Tensor] = None
    keep: Optional[torch.Tensor] = None


@dataclass(frozen=True)
class BlockPlan:
    """How :meth:`ContextParallelAttention._attend_blocks` runs the blocks of a packed row (CP = 1).

    Every block becomes one plain causal sequence of row positions: its own tokens, or for a
    shared-prompt block ``(start, end, prefix_start, prefix_end)`` the prompt's positions followed by
    its own. The prompt's queries are then computed again inside that block and their outputs dropped:
    causal attention over "prompt, then own tokens" is exactly what each response needs (bottom-right
    aligned: a response token sees the whole prompt and its own earlier tokens), and it runs on the
    causal kernel without a mask, which on CPU is about twice as fast as the masked kernel a query-only
    gather would need; the cost is the prompt's share of that block's scores.

    Blocks are sorted by length and cut into groups whose padded cost (``n * longest^2``) stays within
    ``SLACK`` of their own (``sum of length^2``); a group is one batched call, padded at the end (a
    real query never sees padding under causal attention). ``order`` puts the groups' outputs back in
    row order (None when they already are)."""

    groups: tuple[BlockGroup, ...]
    order: Optional[torch.Tensor]

    SLACK = 1.25

    @classmethod
    def build(cls, blocks: list[tuple[int, ...]], *, device: torch.device) -> "BlockPlan":
        import numpy as np

        sequences, drops = [], []
        for block in blocks:
            start, end = block[0], block[1]
            prefix = range(block[2], block[3]) if len(block) == 4 else range(0)
            sequences.append(np.concatenate([np.arange(prefix.start, prefix.stop), np.arange(start, end)]))
            drops.append(len(prefix))
        by_length = sorted(range(len(blocks)), key=lambda b: (len(sequences[b]), b))
        cuts, group = [], []
        for b in by_length:
            trial = group + [b]
            longest = len(sequences[b])
            if group and len(trial) * longest**2 > cls.SLACK * sum(len(sequences[i]) ** 2 for i in trial):
                cuts.append(group)
                trial = [b]
            group = trial
        cuts.append(group)
        groups, emitted = [], []
        for members in cuts:
            if len(members) == 1 and drops[members[0]] == 0:
                b = members[0]
                groups.append(BlockGroup(span=(blocks[b][0], blocks[b][1])))
                emitted.append(sequences[b])
                continue
            length = max(len(sequences[b]) for b in members)
            index = np.empty((len(members), length), dtype=np.int64)
            keep = []
            for row, b in enumerate(members):
                seq = sequences[b]
                index[row] = seq[0]
                index[row, : len(seq)] = seq
                keep.append(row * length + np.arange(drops[b], len(seq)))
                emitted.append(seq[drops[b]:])
            groups.append(BlockGroup(index=torch.from_numpy(index).to(device),
                                     keep=torch.from_numpy(np.concatenate(keep)).to(device)))
        positions = np.concatenate(emitted)
        order = None
        if not np.array_equal(positions, np.arange(len(positions))):
            inverse = np.empty_like(positions)
            inverse[positions] = np.arange(len(positions))
            order = torch.from_numpy(inverse).to(device)
        return cls(tuple(groups), order)
