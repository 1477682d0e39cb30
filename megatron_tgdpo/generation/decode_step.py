"""One generation step through this rank's (virtual) pipeline stages, and the sampled tokens back to all.

A decode step is a single micro-batch, so there is no pipelining to gain from megatron-core's
schedules; we pass activations stage to stage with plain point-to-point calls instead. That handles
virtual (interleaved) stages with one micro-batch, which the interleaved schedule does not (it wants
at least PP micro-batches), and keeps the KV-cache context in our hands. Order of work for one step
with PP ranks r = 0..P-1 and virtual stages v = 0..V-1: (v=0, r=0) → (0, 1) → … → (0, P-1) → (1, 0) → …;
each (v, r) receives from the previous one (the ring wraps from the last rank to rank 0 between
virtual stages), runs its chunk and sends to the next. Blocking send/recv in that order cannot
deadlock: every send is matched by the receive its peer posts next.

After the last stage has sampled, :func:`share_from_last_stage` gives every model-parallel rank the
same values: a broadcast over the last stage's TP group (so all TP ranks agree bit for bit, whatever
the kernels did), then over each pipeline group.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from megatron_tgdpo.compat import inference_forward
from megatron_tgdpo.models.state_dict import unwrap


def _pipeline_size() -> int:
    from megatron.core import parallel_state as ps

    return ps.get_pipeline_model_parallel_world_size()


def forward_step(
    chunks: list[torch.nn.Module],
    tokens: torch.Tensor,  # [b, s] the new positions of every row
    positions: torch.Tensor,  # [b, s]
    contexts: list,  # one static KV cache per chunk
) -> Optional[torch.Tensor]:
    """Logits [b, V] (full vocabulary, fp32) of each row's last new position on the last pipeline
    stage; None on other stages."""
    from megatron.core import parallel_state as ps

    pp = _pipeline_size()
    group = ps.get_pipeline_model_parallel_group() if pp > 1 else None
    logits = None
    for chunk, context in zip(chunks, contexts):
        model = unwrap(chunk)
        hidden = None
        if not model.pre_process:
            config = model.config
            hidden = torch.empty(
                (tokens.shape[1], tokens.shape[0], config.hidden_size),
                dtype=config.pipeline_dtype or config.params_dtype, device=tokens.device,
            )
            dist.recv(hidden, src=ps.get_pipeline_model_parallel_prev_rank(), group=group)
        model.set_input_tensor(hidden)
        with inference_forward():
            # runtime_gather_output: megatron-core requires full-vocabulary logits in inference mode
            # (0.16 asserts it); with the static context only the last position is materialised.
            output = chunk(tokens, positions, attention_mask=None, inference_context=context,
                           runtime_gather_output=True)
        if model.post_process:
            logits = output[:, -1, :].float()  # [b, 1 (or s), V] -> [b, V]
        else:
            dist.send(output.contiguous(), dst=ps.get_pipeline_model_parallel_next_rank(), group=group)
    return logits


def share_from_last_stage(values: Optional[torch.Tensor], *, shape: tuple[int, ...], device) -> torch.Tensor:
    """``values`` of TP rank 0 of the last pipeline stage, on every rank of this model-parallel group
    (other ranks pass None). float64 carries token ids (< 2**53) and fp32 log-probs exactly."""
    from megatron.core import parallel_state as ps

    buffer = values.to(torch.float64) if values is not None else torch.empty(shape, dtype=torch.float64, device=device)
    buffer = buffer.contiguous()
    if ps.is_pipeline_last_stage(ignore_virtual=True) and ps.get_tensor_model_parallel_world_size() > 1:
        dist.broadcast(buffer, src=ps.get_tensor_model_parallel_src_rank(), group=ps.get_tensor_model_parallel_group())
    if _pipeline_size() > 1:
        dist.broadcast(buffer, src=ps.get_pipeline_model_parallel_last_rank(), group=ps.get_pipeline_model_parallel_group())
    return buffer
