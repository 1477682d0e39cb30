"""Per-token log-probabilities from vocab-parallel logits, plain and fused with the LM head.

DPO and TGDPO need ``log p(target_t | prefix)`` for every token, not a cross-entropy mean, and they
need it from logits that megatron-core leaves sharded over the vocabulary (rank ``r`` of the
tensor-parallel group holds vocab rows ``[r * V/tp, (r + 1) * V/tp)``). The vocabulary is never
gathered: each rank reduces its shard to three numbers per token and the group combines those.

Forward, for every token (all statistics in fp32 whatever the logits dtype):

    m_local  = max_j x_j                           over this rank's shard
    s_local  = sum_j exp(x_j - m_local)            one read of the shard
    t_local  = x_target if the target is in this shard else 0
    m        = all-reduce MAX (m_local)            collective 1
    [s, t]   = all-reduce SUM ([s_local * exp(m_local - m), t_local])     collective 2
    logprob  = (t - m) - log(s)

Taking the local sum-exp against the *local* max and moving it to the global max afterwards (one
multiply per token) means the logits are read once in forward instead of twice, and the two
collectives cover all tokens at once however many chunks the shard is processed in.

Backward needs no communication: ``d logprob / d x_j = onehot_j - softmax_j`` and the softmax of this
shard is recomputed from the saved input and the saved per-token global max and sum-exp.

The input is never modified (megatron-core's ``vocab_parallel_cross_entropy`` subtracts the max from
an fp32 input in place), and with ``chunk_size`` the extra memory is one fp32 ``[chunk, V/tp]`` buffer
instead of an fp32 copy of the whole shard.

The fused variant computes ``hidden @ weight.T`` one tile at a time, so the full ``[tokens, V/tp]``
logits never exist, in forward or backward: forward goes through ``[chunk, V/tp]`` token chunks,
backward recomputes the logits in ``[tokens, block]`` vocab blocks, writes each block's weight-gradient
rows once (into megatron DDP's ``main_grad`` when the weight has one) and sums the ``[tokens, H]``
hidden gradient over blocks. Chunks are sized by bytes (:func:`chunk_tokens`, :data:`DEFAULT_CHUNK_BYTES`).
"""
from __future__ import annotations

from typing import Optional, Union

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "chunk_tokens",
    "fused_vocab_parallel_logprobs",
    "resolve_tp_group",
    "vocab_parallel_logprobs",
]

ProcessGroup = dist.ProcessGroup if dist.is_available() else object


# --------------------------------------------------------------------------------------------
# Process group: explicit everywhere below; ``None`` means "no communication, world size 1".
# --------------------------------------------------------------------------------------------


def resolve_tp_group(tp_group: Optional[ProcessGroup] = None) -> Optional[ProcessGroup]:
    """The group to reduce over: ``tp_group`` if given, else megatron-core's tensor-parallel group,
    else ``None`` (torch.distributed or model parallel not initialised: a single-process run)."""
    if tp_group is not None:
        return tp_group
    if not (dist.is_available() and dist.is_initialized()):
        return None
    from megatron.core import parallel_state

    return parallel_state.get_tensor_model_parallel_group(check_initialized=False)


def _group_size(group: Optional[ProcessGroup]) -> int:
    return 1 if group is None else dist.get_world_size(group=group)


def _group_rank(group: Optional[ProcessGroup]) -> int:
    return 0 if group is None else dist.get_rank(group=group)


def _all_gather_dim0(tensor: torch.Tensor, *, group: ProcessGroup) -> torch.Tensor:
    """Concatenate every rank's ``tensor`` along dim 0 (sequence-parallel input of the LM head)."""
    world = _group_size(group)
    out = torch.empty((tensor.shape[0] * world, *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
    # torch >= 2.13 renamed all_gather_into_tensor (now deprecated) to all_gather_single.
    all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    all_gather_single(out, tensor.contiguous(), group=group)
    return out


def _reduce_scatter_dim0(tensor: torch.Tensor, *, group: ProcessGroup) -> torch.Tensor:
    """Sum over ranks and keep this rank's slice of dim 0 (sequence-parallel input gradient)."""
    world = _group_size(group)
    out = torch.empty((tensor.shape[0] // world, *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
    # torch >= 2.13 renamed reduce_scatter_tensor (now deprecated) to reduce_scatter_single.
    reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    reduce_scatter_single(out, tensor.contiguous(), op=dist.ReduceOp.SUM, group=group)
    return out


# --------------------------------------------------------------------------------------------
# Vocab-parallel math on one chunk of tokens: logits [n, V/tp], targets already shard-local.
# --------------------------------------------------------------------------------------------


def _shard_local_targets(
    target: torch.Tensor, *, vocab_start: int, shard_vocab: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Target ids relative to this shard (0 where the target lives on another rank) and the mask of
    tokens whose target is in this shard. Both ``[n]``; computed once for all tokens."""
    local = target.long() - vocab_start
    in_shard = (local >= 0) & (local < shard_vocab)
    return local.masked_fill(~in_shard, 0), in_shard


def _fp32_scratch(num_rows: int, shard_vocab: int, *, device: torch.device) -> torch.Tensor:
    """The one fp32 ``[rows, V/tp]`` work buffer, allocated once per call and reused by every chunk (on
    CPU each fresh large block is a new mmap whose pages fault in again)."""
    return torch.empty((num_rows, shard_vocab), dtype=torch.float32, device=device)


def _shifted_fp32(logits: torch.Tensor, shift: torch.Tensor, *, out: torch.Tensor) -> torch.Tensor:
    """``out = float32(logits) - shift[:, None]``; ``logits`` itself is never written.

    With a 16-bit input on CPU, a mixed-dtype subtraction first materialises an fp32 copy of the whole
    input and then the result (two buffers); copy-then-subtract in ``out`` needs none. CUDA kernels cast
    on the fly, so there a single pass does it."""
    if logits.dtype == out.dtype or logits.device.type == "cuda":
        return torch.sub(logits, shift.unsqueeze(-1), out=out)
    return out.copy_(logits).sub_(shift.unsqueeze(-1))


def _chunk_local_stats(
    logits: torch.Tensor, local_target: torch.Tensor, in_shard: torch.Tensor, *, scratch: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per token of one chunk: (local max, sum of exp(x - local max), target logit or 0), fp32 ``[n]``.

    ``scratch`` is an fp32 buffer of the chunk's shape; it is overwritten. It may be ``logits`` itself
    (fp32 logits the caller no longer needs): everything read from the logits is read before."""
    local_max = logits.amax(dim=-1).float()  # max of bf16 values is exact, so reduce before upcasting
    target_logit = logits.gather(-1, local_target.unsqueeze(-1)).squeeze(-1).float()
    # A shard that is all -inf (masked padding) would give (-inf) - (-inf) = nan; shift it by 0
    # instead: its sum-exp is then 0 and it contributes nothing after the rescale.
    shift = local_max.masked_fill(torch.isneginf(local_max), 0.0)
    sum_exp = _shifted_fp32(logits, shift, out=scratch).exp_().sum(dim=-1)
    return local_max, sum_exp, target_logit.masked_fill_(~in_shard, 0.0)


def _reduce_stats(
    local_max: torch.Tensor,
    sum_exp: torch.Tensor,
    target_logit: torch.Tensor,
    *,
    group: Optional[ProcessGroup],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Combine per-shard statistics of all tokens into (global max, global sum-exp, target logit).

    Exactly two collectives whatever the number of tokens or chunks: MAX of the local maxima, then one
    SUM of the stacked ``[sum-exp, target-logit]``."""
    if _group_size(group) == 1:
        return local_max, sum_exp, target_logit
    global_max = local_max.clone()
    dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=group)
    # Move each shard's sum-exp from its own max to the global one; exp(-inf - m) = 0 drops an all -inf shard.
    stacked = torch.stack((sum_exp * torch.exp(local_max - global_max), target_logit))
    dist.all_reduce(stacked, op=dist.ReduceOp.SUM, group=group)
    return global_max, stacked[0], stacked[1]


def _logprobs_from_stats(
    global_max: torch.Tensor, sum_exp: torch.Tensor, target_logit: torch.Tensor
) -> torch.Tensor:
    # (t - m) first: both are logits of similar size, so the difference is exact or nearly so and the
    # result keeps full fp32 precision for confident tokens (logprob close to 0).
    return (target_logit - global_max) - torch.log(sum_exp)


def _chunk_grad_logits(
    logits: torch.Tensor,
    local_target: torch.Tensor,
    in_shard: torch.Tensor,
    global_max: torch.Tensor,
    sum_exp: torch.Tensor,
    grad_output: torch.Tensor,
    *,
    out: torch.Tensor,
) -> torch.Tensor:
    """``g * (onehot - softmax)`` for one chunk into the fp32 buffer ``out`` (returned; it may be ``logits``
    itself when those are fp32), with the softmax recomputed from the saved per-token global max and
    sum-exp. ``local_target`` / ``in_shard`` are relative to the columns of ``logits``.

    Written as ``exp(x - m) * (-g / s)`` plus ``g`` at the target: no ``log(s)`` subtraction that would
    cost precision for peaked distributions."""
    grad = _shifted_fp32(logits, global_max, out=out)
    grad.exp_().mul_((-grad_output / sum_exp).unsqueeze(-1))
    onehot_grad = torch.where(in_shard, grad_output, torch.zeros_like(grad_output))
    return grad.scatter_add_(-1, local_target.unsqueeze(-1), onehot_grad.unsqueeze(-1))


def _chunk_bounds(num_tokens: int, chunk_size: Optional[int]) -> list[tuple[int, int]]:
    step = num_tokens if chunk_size is None else chunk_size
    return [(start, min(start + step, num_tokens)) for start in range(0, num_tokens, max(step, 1))]


def _max_chunk(bounds: list[tuple[int, int]]) -> int:
    return max((end - start for start, end in bounds), default=0)


# --------------------------------------------------------------------------------------------
# Plain op: logits already materialised.
# --------------------------------------------------------------------------------------------


class _VocabParallelLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, group, chunk_size):  # noqa: D102 - see vocab_parallel_logprobs
        shard_vocab = logits.shape[-1]
        logits_2d = logits.reshape(-1, shard_vocab)
        local_target, in_shard = _shard_local_targets(
            target.reshape(-1), vocab_start=_group_rank(group) * shard_vocab, shard_vocab=shard_vocab
        )
        bounds = _chunk_bounds(logits_2d.shape[0], chunk_size)
        stats = torch.empty((3, logits_2d.shape[0]), dtype=torch.float32, device=logits.device)
        scratch = _fp32_scratch(_max_chunk(bounds), logits_2d.shape[1], device=logits.device)
        for start, end in bounds:
            chunk = slice(start, end)
            chunk_stats = _chunk_local_stats(
                logits_2d[chunk], local_target[chunk], in_shard[chunk], scratch=scratch[: end - start]
            )
            for row, value in zip(stats, chunk_stats):
                row[chunk] = value
        del scratch
        global_max, sum_exp, target_logit = _reduce_stats(stats[0], stats[1], stats[2], group=group)

        ctx.save_for_backward(logits, local_target, in_shard, global_max, sum_exp)
        ctx.chunk_size = chunk_size
        return _logprobs_from_stats(global_max, sum_exp, target_logit).reshape(target.shape)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):  # noqa: D102
        logits, local_target, in_shard, global_max, sum_exp = ctx.saved_tensors
        logits_2d = logits.reshape(-1, logits.shape[-1])
        grad_2d = grad_output.reshape(-1).float()
        bounds = _chunk_bounds(logits_2d.shape[0], ctx.chunk_size)
        grad_logits = torch.empty_like(logits_2d)
        # An fp32 gradient is computed in place in its own rows; other dtypes go through one fp32 chunk
        # buffer and are rounded once when copied in.
        scratch = None
        if logits.dtype != torch.float32:
            scratch = _fp32_scratch(_max_chunk(bounds), logits_2d.shape[1], device=logits.device)
        for start, end in bounds:
            chunk = slice(start, end)
            out = grad_logits[chunk] if scratch is None else scratch[: end - start]
            out = _chunk_grad_logits(
                logits_2d[chunk], local_target[chunk], in_shard[chunk], global_max[chunk], sum_exp[chunk],
                grad_2d[chunk], out=out,
            )
            if scratch is not None:
                grad_logits[chunk] = out
        return grad_logits.reshape(logits.shape), None, None, None


def _check_chunk_size(chunk_size: Optional[int]) -> None:
    is_int = isinstance(chunk_size, int) and not isinstance(chunk_size, bool)
    if not (chunk_size is None or (is_int and chunk_size >= 1)):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")


def _check_target(target: torch.Tensor, expected_shape: tuple[int, ...], *, what: str) -> None:
    if (
        not isinstance(target, torch.Tensor)
        or target.dtype.is_floating_point
        or target.dtype.is_complex
        or target.dtype == torch.bool
    ):
        got = getattr(target, "dtype", type(target))
        raise TypeError(f"target must be an integer tensor of token ids, got {got}")
    if tuple(target.shape) != tuple(expected_shape):
        raise ValueError(f"target shape {tuple(target.shape)} does not match {what} {tuple(expected_shape)}")


def vocab_parallel_logprobs(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    tp_group: Optional[ProcessGroup] = None,
    chunk_size: Optional[int] = None,
) -> torch.Tensor:
    """Log-probability of ``target`` under vocab-sharded ``logits``, fp32, differentiable w.r.t. ``logits``.

    Args:
        logits: ``[..., V/tp]``, this rank's vocab shard (rank ``r`` holds ids ``[r*V/tp, (r+1)*V/tp)``);
            any floating dtype. Not modified.
        target: ``[...]`` (the leading dims of ``logits``), global token ids in ``[0, V)``. Ids are not
            range-checked (that would synchronise the device); an id outside every shard yields garbage.
        tp_group: group the vocabulary is split over; ``None`` means megatron-core's tensor-parallel
            group, or no communication when torch.distributed / model parallel is not initialised.
        chunk_size: process this many tokens (of the flattened leading dims) at a time, so the extra
            memory is ``O(chunk_size * V/tp)`` instead of an fp32 copy of the whole shard. ``None``: one chunk.

    Returns:
        fp32 ``[...]``. Forward issues two collectives in total (all-reduce MAX, all-reduce SUM); backward none.
        The gradient has the dtype of ``logits``.
    """
    if not isinstance(logits, torch.Tensor) or not logits.dtype.is_floating_point:
        raise TypeError(f"logits must be a floating-point tensor, got {getattr(logits, 'dtype', type(logits))}")
    if logits.dim() < 1 or logits.shape[-1] == 0:
        raise ValueError(f"logits must have a non-empty last (vocab) dim, got shape {tuple(logits.shape)}")
    _check_target(target, tuple(logits.shape[:-1]), what="the leading dims of logits")
    if target.device != logits.device:
        raise ValueError(f"target is on {target.device} but logits on {logits.device}")
    _check_chunk_size(chunk_size)
    return _VocabParallelLogprobs.apply(logits, target, resolve_tp_group(tp_group), chunk_size)


# --------------------------------------------------------------------------------------------
# Chunk size by bytes
# --------------------------------------------------------------------------------------------

# Default size of the fp32 [chunk, V/tp] work buffer. 128 MiB is ~261 tokens of Llama 3's 128,256-entry
# vocabulary at TP=1 (2,092 at TP=8): big enough that the elementwise passes and the chunked GEMMs run
# at full speed, small next to everything else a training step holds. The fused op's 16-bit path adds a
# same-shaped 16-bit buffer (1.5x the budget in all).
DEFAULT_CHUNK_BYTES = 128 * 2**20


def chunk_tokens(shard_vocab: int, *, budget_bytes: int = DEFAULT_CHUNK_BYTES) -> int:
    """Tokens per chunk such that one fp32 ``[chunk, shard_vocab]`` buffer takes at most ``budget_bytes``
    (at least one token). ``shard_vocab`` is this rank's vocab shard, ``V / tp``.

    Size chunks with this rather than by a token count: the buffer is what costs memory, and a fixed
    token count is 8x more memory at TP=1 than at TP=8, or at a 128k than at a 16k vocabulary."""
    for name, value in (("shard_vocab", shard_vocab), ("budget_bytes", budget_bytes)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    return max(1, budget_bytes // (4 * shard_vocab))


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


def _vocab_block(num_tokens: int, shard_vocab: int, chunk_size: Optional[int]) -> int:
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
        gather = sequence_parallel and _group_size(group) > 1
        full_hidden = _all_gather_dim0(hidden, group=group) if gather else hidden
        shard_vocab = weight.shape[0]
        hidden_2d = full_hidden.reshape(-1, full_hidden.shape[-1])
        local_target, in_shard = _shard_local_targets(
            target.reshape(-1), vocab_start=_group_rank(group) * shard_vocab, shard_vocab=shard_vocab
        )
        bounds = _chunk_bounds(hidden_2d.shape[0], chunk_size)
        stats = torch.empty((3, hidden_2d.shape[0]), dtype=torch.float32, device=hidden.device)
        logits_flat, scratch_flat = _tile_buffers(_max_chunk(bounds) * shard_vocab, weight.dtype, device=weight.device)
        for start, end in bounds:
            chunk, tile = slice(start, end), (end - start, shard_vocab)
            # Logits of one chunk in the compute dtype, as the unfused LM head would produce them.
            logits = torch.mm(hidden_2d[chunk], weight.t(), out=logits_flat[: tile[0] * tile[1]].view(tile))
            chunk_stats = _chunk_local_stats(
                logits, local_target[chunk], in_shard[chunk], scratch=scratch_flat[: tile[0] * tile[1]].view(tile)
            )
            for row, value in zip(stats, chunk_stats):
                row[chunk] = value
        del logits_flat, scratch_flat
        global_max, sum_exp, target_logit = _reduce_stats(stats[0], stats[1], stats[2], group=group)

        # The gathered hidden is saved rather than re-gathered in backward: it is [tokens, H] with
        # H << V/tp, small next to the logits this op avoids, and it saves a collective.
        ctx.save_for_backward(hidden_2d, weight, local_target, in_shard, global_max, sum_exp)
        ctx.group, ctx.gather, ctx.chunk_size = group, gather, chunk_size
        ctx.full_hidden_shape, ctx.hidden_shape = full_hidden.shape, hidden.shape
        return _logprobs_from_stats(global_max, sum_exp, target_logit).reshape(target.shape)

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

        block = _vocab_block(num_tokens, shard_vocab, ctx.chunk_size)
        if num_tokens:
            logits_flat, scratch_flat = _tile_buffers(num_tokens * block, weight.dtype, device=device)
            weight_tmp = weight.new_empty((block, hidden_size)) if weight_block_tmp else None
            for v0 in range(0, shard_vocab, block):
                v1 = min(v0 + block, shard_vocab)
                cols, w_block = v1 - v0, weight[v0:v1]
                logits = torch.mm(hidden_2d, w_block.t(), out=logits_flat[: num_tokens * cols].view(num_tokens, cols))
                in_block = in_shard & (local_target >= v0) & (local_target < v1)
                grad = _chunk_grad_logits(
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
                grad_hidden = _reduce_scatter_dim0(grad_hidden, group=ctx.group)
            elif _group_size(ctx.group) > 1:
                dist.all_reduce(grad_hidden, op=dist.ReduceOp.SUM, group=ctx.group)
            grad_hidden = grad_hidden.to(weight.dtype).reshape(ctx.hidden_shape)
        return grad_hidden, grad_weight, None, None, None, None


def _resolve_fused_chunk(chunk_size: Union[int, None, str], shard_vocab: int) -> Optional[int]:
    if isinstance(chunk_size, str):
        if chunk_size != "auto":
            raise ValueError(f'chunk_size must be a positive int, None or "auto", got {chunk_size!r}')
        return chunk_tokens(shard_vocab)
    _check_chunk_size(chunk_size)
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
        expected = (hidden.shape[0] * _group_size(group), *hidden.shape[1:-1])
        what = f"the gathered leading dims of hidden ([s/tp * tp, ...] with tp = {_group_size(group)})"
    _check_target(target, expected, what=what)
    if weight.device != hidden.device or target.device != hidden.device:
        devices = f"{hidden.device}, {weight.device}, {target.device}"
        raise ValueError(f"hidden, weight and target must be on one device, got {devices}")
    return _FusedVocabParallelLogprobs.apply(hidden, weight, target, group, bool(sequence_parallel), chunk_size)
