"""Per-token log-probabilities fused with the (vocab-parallel) LM head: ``hidden @ weight.T`` one tile
at a time, so the full ``[tokens, V/tp]`` logits never exist, in forward or backward.

Forward goes through ``[chunk, V/tp]`` token chunks with the statistics of
:mod:`megatron_tgdpo.ops.logprobs` (local max, sum-exp and target logit, two collectives for all tokens).
Backward recomputes the logits in ``[tokens, block]`` vocab blocks, writes each block's weight-gradient
rows once (into megatron DDP's ``main_grad`` when the weight has one, so no weight-sized gradient is
allocated per chunk) and sums the ``[tokens, H]`` hidden gradient over blocks. Chunks are sized by
bytes (:func:`~megatron_tgdpo.ops.logprobs.chunk_tokens`).
"""
from __future__ import annotations

from typing import Optional, Union

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

from megatron_tgdpo.ops.logprobs import (  # the shared per-chunk math of the plain op
    all_gather_dim0,
    check_chunk_size,
    check_target,
    chunk_bounds,
    chunk_grad_logits,
    chunk_local_stats,
    chunk_tokens,
    group_rank,
    group_size,
    logprobs_from_stats,
    max_chunk,
    reduce_scatter_dim0,
    reduce_stats,
    resolve_tp_group,
    shard_local_targets,
)

__all__ = ["fused_vocab_parallel_logprobs"]

ProcessGroup = dist.ProcessGroup if dist.is_available() else object


# --------------------------------------------------------------------------------------------
# Fused op: LM head + log-probs, logits only ever exist one tile at a time.
# --------------------------------------------------------------------------------------------

_HALF = (torch.float16, torch.bfloat16)


def _tile_buffers(numel: int, dtype: torch.dtype, *, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits buffer in the compute dtype, fp32 work buffer), flat, reused by every tile.

    For fp32 they are one buffer: the statistics and the logits gradient are computed in place in the
    logits. A 16-bit GEMM writes 16-bit logits, so those need a separate fp32 buffer."""
    logits = torch.empty(numel, dtype=dtype, device=device)
    return logits, (logits if dtype == torch.float32 else torch.empty(numel, dtype=torch.float32, device=device))


_BLOCK_ALIGN = 64  # vocab rows; backward tiles [tokens, block] then have 256-byte (fp32) aligned rows


def vocab_block(num_tokens: int, shard_vocab: int, chunk_size: Optional[int]) -> int:
    """Vocab rows per backward tile ``[all tokens, block]``: at most as many elements as a forward tile
    ``[chunk_size tokens, V/tp]`` (the whole shard with ``chunk_size=None``).

    The blocks are made nearly equal (no small remainder block) and a multiple of 64 rows: the block is
    the leading dimension of the tile the GEMMs write and read, and an unaligned one (or, on CPUs, a
    large power of two) costs GEMM speed: ~50 instead of ~75 GFLOP/s for a row of 16,375 floats on the
    2-core development machine."""
    if chunk_size is None or num_tokens == 0:
        return shard_vocab
    limit = max(1, min(shard_vocab, min(chunk_size, num_tokens) * shard_vocab // num_tokens))
    if limit == shard_vocab or limit < 2 * _BLOCK_ALIGN:
        return limit
    base = limit // _BLOCK_ALIGN * _BLOCK_ALIGN
    blocks = -(-shard_vocab // base)
    per_block = -(-shard_vocab // blocks)
    # per_block <= base and base is a multiple of the alignment, so rounding up stays <= limit.
    return -(-per_block // _BLOCK_ALIGN) * _BLOCK_ALIGN


def _ddp_main_grad(weight: torch.Tensor) -> Optional[torch.Tensor]:
    """megatron DDP's gradient buffer view of ``weight`` if the weight gradient should go there directly.

    The contract (megatron-core 0.16 and 0.19 ``DistributedDataParallel``, ``overlap_grad_reduce=False``):

    * ``param.main_grad`` is this parameter's slice of DDP's grad buffer; it is zeroed by
      ``zero_grad_buffer()`` at the start of an iteration, accumulates every micro-batch, and is what
      ``finish_grad_sync`` reduces and the optimizer reads.
    * DDP's post-hook on the parameter's ``AccumulateGrad`` node (it runs even when autograd has no
      gradient for the parameter) adds ``param.grad`` to ``main_grad`` unless
      ``param.grad_added_to_main_grad`` is set (and ``zero_out_wgrad`` is not), then clears
      ``param.grad``. We return ``None`` for the weight, so autograd accumulates only the *other* uses
      of the parameter (the input embedding when embeddings are tied on one stage) and the hook adds
      exactly those. We never set ``grad_added_to_main_grad`` (megatron's fused-wgrad linear does, and
      returns a dummy gradient instead): we need the hook to keep adding the embedding's share.
    * Our addition happens inside backward, before the hook and long before ``finish_grad_sync``, so
      with ``overlap_grad_reduce=False`` it is always in the reduced buffer.
    * With ``overlap_grad_reduce=True`` the hook asserts ``param.grad is not None`` (it would fail
      loudly for an untied head); :mod:`megatron_tgdpo.models.fused_head` refuses that configuration.

    Megatron-FSDP parameters (``__fsdp_param__``) allocate ``main_grad`` lazily: not supported."""
    main_grad = getattr(weight, "main_grad", None)
    if main_grad is None or not weight.is_leaf:
        return None
    if hasattr(weight, "__fsdp_param__"):
        raise NotImplementedError("fused LM-head log-probs do not support megatron-FSDP parameters")
    if not isinstance(main_grad, torch.Tensor) or main_grad.shape != weight.shape or main_grad.device != weight.device:
        raise ValueError(
            f"weight.main_grad must be a tensor of the weight's shape {tuple(weight.shape)} on {weight.device}, "
            f"got {getattr(main_grad, 'shape', type(main_grad))} on {getattr(main_grad, 'device', '?')}"
        )
    return main_grad


class _FusedVocabParallelLogprobs(torch.autograd.Function):
    """Forward in token chunks ``[chunk, V/tp]``; backward in vocab blocks ``[tokens, block]``.

    Backward goes by vocab blocks because then each block of weight-gradient rows is one complete GEMM
    over all tokens, written once (into ``main_grad``, or into the one returned gradient) and never
    accumulated; what is accumulated over blocks instead is the hidden gradient, ``[tokens, H]``, which
    is ``V/tp / tokens`` times smaller than the weight gradient (16x for 8k tokens of a 128k vocab)."""

    @staticmethod
    def forward(ctx, hidden, weight, target, group, sequence_parallel, chunk_size):  # noqa: D102
        gather = sequence_parallel and group_size(group) > 1
        full_hidden = all_gather_dim0(hidden, group=group) if gather else hidden
        shard_vocab = weight.shape[0]
        hidden_2d = full_hidden.reshape(-1, full_hidden.shape[-1])
        local_target, in_shard = shard_local_targets(
            target.reshape(-1), vocab_start=group_rank(group) * shard_vocab, shard_vocab=shard_vocab
        )
        bounds = chunk_bounds(hidden_2d.shape[0], chunk_size)
        stats = torch.empty((3, hidden_2d.shape[0]), dtype=torch.float32, device=hidden.device)
        logits_flat, scratch_flat = _tile_buffers(max_chunk(bounds) * shard_vocab, weight.dtype, device=weight.device)
        for start, end in bounds:
            chunk, tile = slice(start, end), (end - start, shard_vocab)
            # Logits of one chunk in the compute dtype, as the unfused LM head would produce them.
            logits = torch.mm(hidden_2d[chunk], weight.t(), out=logits_flat[: tile[0] * tile[1]].view(tile))
            chunk_stats = chunk_local_stats(
                logits, local_target[chunk], in_shard[chunk], scratch=scratch_flat[: tile[0] * tile[1]].view(tile)
            )
            for row, value in zip(stats, chunk_stats):
                row[chunk] = value
        del logits_flat, scratch_flat
        global_max, sum_exp, target_logit = reduce_stats(stats[0], stats[1], stats[2], group=group)

        # The gathered hidden is saved rather than re-gathered in backward: it is [tokens, H] with
        # H << V/tp, small next to the logits this op avoids, and it saves a collective.
        ctx.save_for_backward(hidden_2d, weight, local_target, in_shard, global_max, sum_exp)
        ctx.group, ctx.gather, ctx.chunk_size = group, gather, chunk_size
        ctx.full_hidden_shape, ctx.hidden_shape = full_hidden.shape, hidden.shape
        return logprobs_from_stats(global_max, sum_exp, target_logit).reshape(target.shape)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):  # noqa: D102
        hidden_2d, weight, local_target, in_shard, global_max, sum_exp = ctx.saved_tensors
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_2d = grad_output.reshape(-1).float()
        (num_tokens, hidden_size), shard_vocab = hidden_2d.shape, weight.shape[0]
        device = weight.device

        # Weight gradient: straight into DDP's buffer when there is one, else into the one returned
        # tensor; rows of a block are complete after one GEMM, so neither is ever a partial sum.
        main_grad = _ddp_main_grad(weight) if need_weight else None
        grad_weight = None
        if need_weight and main_grad is None:
            grad_weight = torch.empty_like(weight) if num_tokens else torch.zeros_like(weight)
        # A 16-bit weight adds its 16-bit block gradient to a higher-precision main_grad through a
        # small [block, H] buffer: rounded once, as the unfused head's gradient is before DDP adds it.
        weight_block_tmp = main_grad is not None and main_grad.dtype != weight.dtype

        # Hidden gradient: a sum over vocab blocks, kept in fp32 for 16-bit weights (each block's GEMM
        # output goes through one [tokens, H] 16-bit buffer) and rounded once at the very end.
        acc_dtype = torch.float32 if weight.dtype in _HALF else weight.dtype
        grad_hidden = torch.zeros((num_tokens, hidden_size), dtype=acc_dtype, device=device) if need_hidden else None
        hidden_tmp = weight.new_empty((num_tokens, hidden_size)) if need_hidden and acc_dtype != weight.dtype else None

        block = vocab_block(num_tokens, shard_vocab, ctx.chunk_size)
        if num_tokens:
            logits_flat, scratch_flat = _tile_buffers(num_tokens * block, weight.dtype, device=device)
            weight_tmp = weight.new_empty((block, hidden_size)) if weight_block_tmp else None
            for v0 in range(0, shard_vocab, block):
                v1 = min(v0 + block, shard_vocab)
                cols, w_block = v1 - v0, weight[v0:v1]
                logits = torch.mm(hidden_2d, w_block.t(), out=logits_flat[: num_tokens * cols].view(num_tokens, cols))
                in_block = in_shard & (local_target >= v0) & (local_target < v1)
                grad = chunk_grad_logits(
                    logits, (local_target - v0).masked_fill_(~in_block, 0), in_block, global_max, sum_exp, grad_2d,
                    out=scratch_flat[: num_tokens * cols].view(num_tokens, cols),
                )
                if grad.dtype != weight.dtype:
                    # The unfused path's logits gradient has the logits dtype too; the logits are no longer
                    # needed, so their buffer takes it.
                    grad = logits.copy_(grad)
                if need_hidden:
                    if hidden_tmp is None:
                        grad_hidden.addmm_(grad, w_block)
                    else:
                        grad_hidden.add_(torch.mm(grad, w_block, out=hidden_tmp))
                if grad_weight is not None:
                    torch.mm(grad.t(), hidden_2d, out=grad_weight[v0:v1])
                elif main_grad is not None and weight_tmp is None:
                    main_grad[v0:v1].addmm_(grad.t(), hidden_2d)
                elif main_grad is not None:
                    main_grad[v0:v1].add_(torch.mm(grad.t(), hidden_2d, out=weight_tmp[:cols]))
            del logits_flat, scratch_flat, weight_tmp
        del hidden_tmp

        if need_hidden:
            grad_hidden = grad_hidden.reshape(ctx.full_hidden_shape)
            # Each rank only saw its vocab shard: the hidden gradient is the sum over the group (summed
            # before the 16-bit rounding).
            if ctx.gather:
                grad_hidden = reduce_scatter_dim0(grad_hidden, group=ctx.group)
            elif group_size(ctx.group) > 1:
                dist.all_reduce(grad_hidden, op=dist.ReduceOp.SUM, group=ctx.group)
            grad_hidden = grad_hidden.to(weight.dtype).reshape(ctx.hidden_shape)
        return grad_hidden, grad_weight, None, None, None, None


def _resolve_fused_chunk(chunk_size: Union[int, None, str], shard_vocab: int) -> Optional[int]:
    if isinstance(chunk_size, str):
        if chunk_size != "auto":
            raise ValueError(f'chunk_size must be a positive int, None or "auto", got {chunk_size!r}')
        return chunk_tokens(shard_vocab)
    check_chunk_size(chunk_size)
    return chunk_size


def fused_vocab_parallel_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    *,
    tp_group: Optional[ProcessGroup] = None,
    sequence_parallel: bool = False,
    chunk_size: Union[int, None, str] = "auto",
) -> torch.Tensor:
    """``vocab_parallel_logprobs(hidden @ weight.T, target)`` without materialising the logits.

    Args:
        hidden: ``[..., H]`` (megatron layout ``[s, b, H]``); with ``sequence_parallel`` this rank's
            sequence shard ``[s/tp, ..., H]``, all-gathered along dim 0 in forward.
        weight: ``[V/tp, H]``, this rank's shard of the output layer, same dtype as ``hidden``. If it is a
            leaf with megatron DDP's ``main_grad`` (see :func:`_ddp_main_grad` for the contract), backward
            adds its gradient to ``main_grad`` and returns none to autograd.
        target: global token ids with the (full, gathered) leading dims of ``hidden``: ``[s, b]``.
        tp_group: as for :func:`vocab_parallel_logprobs`.
        sequence_parallel: megatron's SP convention: gather ``hidden`` in forward, reduce-scatter its
            gradient in backward (instead of all-reducing it).
        chunk_size: tokens per forward chunk; the work tiles hold ``chunk_size * V/tp`` elements (in
            backward as ``[tokens, chunk_size * V/tp / tokens]`` vocab blocks). ``"auto"`` (default):
            :func:`chunk_tokens` with :data:`DEFAULT_CHUNK_BYTES`. ``None``: one tile of all logits.

    Returns:
        fp32 log-probs shaped like ``target``, identical on every rank of the group.

    Memory: one fp32 tile (plus a 16-bit one for 16-bit weights), the ``[tokens, H]`` hidden gradient
    (fp32 for 16-bit weights) and, without ``main_grad``, the returned weight gradient. Backward
    recomputes the logits (4 GEMMs instead of 3), reduces the hidden gradient over the group (one
    all-reduce, or one reduce-scatter with SP, in fp32 for 16-bit weights) and needs no other
    communication. Numerics: the logits and their gradient are rounded to the weight dtype exactly as
    on the unfused path; every weight-gradient row comes from one GEMM over all tokens and is rounded
    once; the 16-bit hidden gradient is summed over vocab blocks in fp32 and rounded once.
    """
    for name, tensor in (("hidden", hidden), ("weight", weight)):
        if not isinstance(tensor, torch.Tensor) or not tensor.dtype.is_floating_point:
            got = getattr(tensor, "dtype", type(tensor))
            raise TypeError(f"{name} must be a floating-point tensor, got {got}")
    if hidden.dim() < 1:
        raise ValueError("hidden must have a last (hidden-size) dim")
    if weight.dim() != 2 or weight.shape[0] == 0 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"weight must be [V/tp, H] with H = hidden.shape[-1] = {hidden.shape[-1]} and V/tp > 0, "
            f"got {tuple(weight.shape)}"
        )
    if weight.dtype != hidden.dtype:
        raise TypeError(f"hidden ({hidden.dtype}) and weight ({weight.dtype}) must have the same dtype")
    chunk_size = _resolve_fused_chunk(chunk_size, weight.shape[0])
    group = resolve_tp_group(tp_group)
    expected = tuple(hidden.shape[:-1])
    what = "the leading dims of hidden"
    if sequence_parallel:
        if hidden.dim() < 2:
            raise ValueError("sequence_parallel needs hidden with a sequence dim 0: [s/tp, ..., H]")
        expected = (hidden.shape[0] * group_size(group), *hidden.shape[1:-1])
        what = f"the gathered leading dims of hidden ([s/tp * tp, ...] with tp = {group_size(group)})"
    check_target(target, expected, what=what)
    if weight.device != hidden.device or target.device != hidden.device:
        devices = f"{hidden.device}, {weight.device}, {target.device}"
        raise ValueError(f"hidden, weight and target must be on one device, got {devices}")
    return _FusedVocabParallelLogprobs.apply(hidden, weight, target, group, bool(sequence_parallel), chunk_size)
