"""Per-token log-probs of the response tokens through megatron-core's pipeline schedules.

One forward path serves the policy (forward + backward, loss at the last stage), the frozen reference
and guidance models (forward only, online before each policy step) and the offline cache tool: the
same micro-batch shapes, the same model call, the same vocab-parallel log-prob op. That is what makes
step-0 policy and reference log-probs identical when both start from one checkpoint.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from megatron_tgdpo.ops import vocab_parallel_logprobs

Batch = dict[str, torch.Tensor]
# (micro-batch index, batch, fp32 log-probs [2B, S_local]) -> (loss, report dict)
LossFn = Callable[[int, Batch, torch.Tensor], tuple[torch.Tensor, dict]]


def slice_for_context_parallel(batch: Batch) -> Batch:
    """This CP rank's two sequence chunks (megatron's load-balanced layout) of every [rows, S] tensor."""
    from megatron.core import parallel_state as ps

    from megatron_tgdpo.models.layers import cp_chunk_positions

    cp = ps.get_context_parallel_world_size()
    if cp == 1:
        return batch
    seq = batch["input_ids"].shape[1]
    if seq % (2 * cp):
        raise ValueError(f"sequence length {seq} is not divisible by 2 x context-parallel size {2 * cp}; "
                         "pad batches to a multiple of 2*CP (--pad-to-multiple-of)")
    idx = cp_chunk_positions(local_len=seq // cp, cp_rank=ps.get_context_parallel_rank(), cp_size=cp,
                             device=batch["input_ids"].device)
    return {k: (v[:, idx] if v.dim() == 2 and v.shape[1] == seq else v) for k, v in batch.items()}


def run_schedule(
    chunks: list[torch.nn.Module],
    microbatches: list[Batch],
    loss_fn: LossFn,
    *,
    forward_only: bool,
    logits_chunk_size: Optional[int] = None,
) -> None:
    """Run every micro-batch through megatron-core's schedule (1F1B, interleaved with virtual stages).

    ``microbatches`` hold full sequences (all of one shape when pipeline-parallel); each rank takes its
    context-parallel slice here, so ``loss_fn`` sees this rank's tokens. It is called on the last
    pipeline stage only, once per micro-batch.
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func

    def forward_step(data_iterator, model):
        index = next(data_iterator)
        batch = slice_for_context_parallel(microbatches[index])
        output = model(batch["input_ids"], batch["position_ids"], attention_mask=None)

        def loss_func(logits: torch.Tensor):
            logps = vocab_parallel_logprobs(logits, batch["labels"], chunk_size=logits_chunk_size)
            return loss_fn(index, batch, logps)

        return output, loss_func

    n = len(microbatches)
    iterators = [iter(range(n)) for _ in chunks] if len(chunks) > 1 else iter(range(n))
    rows, seq = microbatches[0]["input_ids"].shape
    with torch.no_grad() if forward_only else torch.enable_grad():
        get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iterators,
            model=chunks,
            num_microbatches=n,
            seq_length=seq,
            micro_batch_size=rows,
            forward_only=forward_only,
        )


def score_logps(
    chunks: list[torch.nn.Module],
    microbatches: list[Batch],
    *,
    logits_chunk_size: Optional[int] = None,
) -> dict[int, torch.Tensor]:
    """Forward-only per-token log-probs ``{micro-batch index: [2B, S_local]}`` (last stage only;
    other pipeline stages get an empty dict)."""
    out: dict[int, torch.Tensor] = {}

    def collect(index: int, batch: Batch, logps: torch.Tensor):
        out[index] = logps.detach() * batch["loss_mask"]
        return logps.new_zeros(()), {}

    for chunk in chunks:
        chunk.eval()
    run_schedule(chunks, microbatches, collect, forward_only=True, logits_chunk_size=logits_chunk_size)
    return out
