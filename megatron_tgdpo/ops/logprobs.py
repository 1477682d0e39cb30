"""Per-token log-probabilities from vocab-parallel logits.

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

The fused variant (LM head and log-probs in one op, the logits never materialised) is in
:mod:`megatron_tgdpo.ops.fused_logprobs`; it shares this module's per-chunk math. Chunks are sized by
bytes (:func:`chunk_tokens`, :data:`DEFAULT_CHUNK_BYTES`).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "chunk_tokens",
    "resolve_tp_group",
    "vocab_parallel_logprobs",
]
# The per-chunk pieces below (statistics, their reduction, the gradient of a chunk, chunk bounds and
# argument checks) are public too: ``ops.fused_logprobs`` computes the same math from hidden states.

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


def group_size(group: Optional[ProcessGroup]) -> int:
    return 1 if group is None else dist.get_world_size(group=group)


def group_rank(group: Optional[ProcessGroup]) -> int:
    return 0 if group is None else dist.get_rank(group=group)


def all_gather_dim0(tensor: torch.Tensor, *, group: ProcessGroup) -> torch.Tensor:
    """Concatenate every rank's ``tensor`` along dim 0 (sequence-parallel input of the LM head)."""
    world = group_size(group)
    out = torch.empty((tensor.shape[0] * world, *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
    # torch >= 2.13 renamed all_gather_into_tensor (now deprecated) to all_gather_single.
    all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    all_gather_single(out, tensor.contiguous(), group=group)
    return out


def reduce_scatter_dim0(tensor: torch.Tensor, *, group: ProcessGroup) -> torch.Tensor:
    """Sum over ranks and keep this rank's slice of dim 0 (sequence-parallel input gradient)."""
    world = group_size(group)
    out = torch.empty((tensor.shape[0] // world, *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
    # torch >= 2.13 renamed reduce_scatter_tensor (now deprecated) to reduce_scatter_single.
    reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    reduce_scatter_single(out, tensor.contiguous(), op=dist.ReduceOp.SUM, group=group)
    return out


# --------------------------------------------------------------------------------------------
# Vocab-parallel math on one chunk of tokens: logits [n, V/tp], targets already shard-local.
# --------------------------------------------------------------------------------------------


def shard_local_targets(
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


def chunk_local_stats(
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


def reduce_stats(
    local_max: torch.Tensor,
    sum_exp: torch.Tensor,
    target_logit: torch.Tensor,
    *,
    group: Optional[ProcessGroup],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Combine per-shard statistics of all tokens into (global max, global sum-exp, target logit).

    Exactly two collectives whatever the number of tokens or chunks: MAX of the local maxima, then one
    SUM of the stacked ``[sum-exp, target-logit]``."""
    if group_size(group) == 1:
        return local_max, sum_exp, target_logit
    global_max = local_max.clone()
    dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=group)
    # Move each shard's sum-exp from its own max to the global one; exp(-inf - m) = 0 drops an all -inf shard.
    stacked = torch.stack((sum_exp * torch.exp(local_max - global_max), target_logit))
    dist.all_reduce(stacked, op=dist.ReduceOp.SUM, group=group)
    return global_max, stacked[0], stacked[1]


def logprobs_from_stats(
    global_max: torch.Tensor, sum_exp: torch.Tensor, target_logit: torch.Tensor
) -> torch.Tensor:
    # (t - m) first: both are logits of similar size, so the difference is exact or nearly so and the
    # result keeps full fp32 precision for confident tokens (logprob close to 0).
    return (target_logit - global_max) - torch.log(sum_exp)


def chunk_grad_logits(
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


def chunk_bounds(num_tokens: int, chunk_size: Optional[int]) -> list[tuple[int, int]]:
    step = num_tokens if chunk_size is None else chunk_size
    return [(start, min(start + step, num_tokens)) for start in range(0, num_tokens, max(step, 1))]


def max_chunk(bounds: list[tuple[int, int]]) -> int:
    return max((end - start for start, end in bounds), default=0)


# --------------------------------------------------------------------------------------------
# Plain op: logits already materialised.
# --------------------------------------------------------------------------------------------


class _VocabParallelLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, group, chunk_size):  # noqa: D102 - see vocab_parallel_logprobs
        shard_vocab = logits.shape[-1]
        logits_2d = logits.reshape(-1, shard_vocab)
        local_target, in_shard = shard_local_targets(
            target.reshape(-1), vocab_start=group_rank(group) * shard_vocab, shard_vocab=shard_vocab
        )
        bounds = chunk_bounds(logits_2d.shape[0], chunk_size)
        stats = torch.empty((3, logits_2d.shape[0]), dtype=torch.float32, device=logits.device)
        scratch = _fp32_scratch(max_chunk(bounds), logits_2d.shape[1], device=logits.device)
        for start, end in bounds:
            chunk = slice(start, end)
            chunk_stats = chunk_local_stats(
                logits_2d[chunk], local_target[chunk], in_shard[chunk], scratch=scratch[: end - start]
            )
            for row, value in zip(stats, chunk_stats):
                row[chunk] = value
        del scratch
        global_max, sum_exp, target_logit = reduce_stats(stats[0], stats[1], stats[2], group=group)

        ctx.save_for_backward(logits, local_target, in_shard, global_max, sum_exp)
        ctx.chunk_size = chunk_size
        return logprobs_from_stats(global_max, sum_exp, target_logit).reshape(target.shape)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):  # noqa: D102
        logits, local_target, in_shard, global_max, sum_exp = ctx.saved_tensors
        logits_2d = logits.reshape(-1, logits.shape[-1])
        grad_2d = grad_output.reshape(-1).float()
        bounds = chunk_bounds(logits_2d.shape[0], ctx.chunk_size)
        grad_logits = torch.empty_like(logits_2d)
        # An fp32 gradient is computed in place in its own rows; other dtypes go through one fp32 chunk
        # buffer and are rounded once when copied in.
        scratch = None
        if logits.dtype != torch.float32:
            scratch = _fp32_scratch(max_chunk(bounds), logits_2d.shape[1], device=logits.device)
        for start, end in bounds:
            chunk = slice(start, end)
            out = grad_logits[chunk] if scratch is None else scratch[: end - start]
            out = chunk_grad_logits(
                logits_2d[chunk], local_target[chunk], in_shard[chunk], global_max[chunk], sum_exp[chunk],
                grad_2d[chunk], out=out,
            )
            if scratch is not None:
                grad_logits[chunk] = out
        return grad_logits.reshape(logits.shape), None, None, None


def check_chunk_size(chunk_size: Optional[int]) -> None:
    is_int = isinstance(chunk_size, int) and not isinstance(chunk_size, bool)
    if not (chunk_size is None or (is_int and chunk_size >= 1)):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")


def check_target(target: torch.Tensor, expected_shape: tuple[int, ...], *, what: str) -> None:
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
    check_target(target, tuple(logits.shape[:-1]), what="the leading dims of logits")
    if target.device != logits.device:
        raise ValueError(f"target is on {target.device} but logits on {logits.device}")
    check_chunk_size(chunk_size)
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
