"""Micro-batches through megatron-core's pipeline schedules, with per-count losses.

One forward path serves every model and every algorithm: the policy (forward + backward, the loss at
the last stage), the frozen reference and guidance models (forward only), the log-prob cache tool,
evaluation. Same micro-batch shapes, same model call, same vocab-parallel log-prob op: that is what
makes step-0 policy and reference log-probs identical when both start from one checkpoint.

**The loss contract.** A :data:`LossFn` gets ``(index, batch, logps)`` on the last pipeline stage —
``batch`` is this context-parallel rank's slice and ``logps`` its fp32 ``[R, S_local]`` token log-probs
(read them where ``loss_mask`` is set: where the batch knows its trained positions, ``loss_positions``,
the LM head computes only those and the rest are 0) — and returns ``(loss, count, report)``:

* ``loss``: this rank's share of the global *numerator*: summing the gradients of every rank's
  ``loss`` over data- and context-parallel ranks must give the gradient of the numerator;
* ``count``: this rank's share of the global *denominator* (pairs, tokens), summed the same way;
* ``report``: anything (metric sums, log-probs), handed back in micro-batch order.

The models are built with megatron-core's ``calculate_per_token_loss``: the schedule neither divides by
the number of micro-batches nor multiplies by the CP size, DDP sums gradients over DP x CP, and
``finalize_model_grads`` divides them by the global count. The gradient is therefore that of
``sum(numerator) / sum(count)`` over the whole global batch, exactly, whatever the number of
micro-batches and whatever each one holds (``docs/loss.md``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import torch

from megatron_tgdpo import compat
from megatron_tgdpo.data.batch import Batch
from megatron_tgdpo.data.packing import packed_seq_params_for
from megatron_tgdpo.models.fused_head import disable_fused_head, enable_fused_head, output_logprobs
from megatron_tgdpo.runtime.frozen import FrozenScorer, call_groups, logps_key

__all__ = ["Head", "LogprobSettings", "LossFn", "context_parallel", "local_batch", "run_schedule", "score_frozen",
           "score_logps"]

LossFn = Callable[[int, Batch, torch.Tensor], tuple[torch.Tensor, Any, Any]]
#: What the last stage computes from the model's output before the loss: ``(model, batch, output)`` ->
#: the tensor the :data:`LossFn` gets (default: the token log-probs; the PPO critic: its values).
Head = Callable[[torch.nn.Module, Batch, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class LogprobSettings:
    """How the last stage turns the model output into token log-probs.

    ``fused``: the last stage returns final hidden states and the LM head is computed chunk by chunk
    inside the log-prob op, so the ``[tokens, V/tp]`` logits never exist (``models/fused_head.py``);
    otherwise megatron's output layer produces vocab-sharded logits and the plain op reads them.
    ``chunk_size``: tokens per chunk, ``None`` for one chunk, ``"auto"`` for chunks whose fp32 work
    buffer is ``ops.DEFAULT_CHUNK_BYTES`` (128 MiB). ``frozen_per_call``: micro-batches a frozen model
    scores per call, ``0`` automatic (``runtime/frozen.py``, "Several micro-batches per call")."""

    fused: bool = True
    chunk_size: Union[int, None, str] = "auto"
    frozen_per_call: int = 0

    @classmethod
    def of(cls, cfg) -> "LogprobSettings":
        return cls(fused=cfg.fused_logprobs, chunk_size=cfg.logits_chunk_size or "auto",
                   frozen_per_call=getattr(cfg, "frozen_micro_batches_per_call", 0))


def context_parallel() -> tuple[int, int, Any]:
    """(CP rank, CP size, CP group or None)."""
    from megatron.core import parallel_state as ps

    size = ps.get_context_parallel_world_size()
    group = ps.get_context_parallel_group() if size > 1 else None
    return ps.get_context_parallel_rank(), size, group


def local_batch(batch: Batch) -> Batch:
    """This context-parallel rank's slice of a full micro-batch (what ``score_logps`` values align with)."""
    cp_rank, cp_size, _ = context_parallel()
    return batch.for_context_parallel(cp_rank=cp_rank, cp_size=cp_size)


def run_schedule(
    chunks: list[torch.nn.Module],
    microbatches: list[Batch],
    loss_fn: LossFn,
    *,
    forward_only: bool,
    logprobs: LogprobSettings = LogprobSettings(),
    head: Head | None = None,
    frozen: Optional[Mapping[str, Sequence[torch.nn.Module]]] = None,
) -> list[Any]:
    """Run every micro-batch through megatron-core's schedule (1F1B, interleaved with virtual stages);
    returns the ``report`` of each micro-batch on the last pipeline stage (an empty list elsewhere).

    ``head`` replaces the token log-probs (``logprobs`` then does not apply): the loss function gets
    what it returns, under the same ``(numerator, count, report)`` contract.

    ``frozen``: role -> chunks of models scored forward-only in the same schedule, inside each
    micro-batch's forward step (``runtime/frozen.py``: one pipeline pass for all models); the loss
    function's batch then carries each one's ``logps * loss_mask`` under ``frozen.logps_key(role)``.

    ``microbatches`` hold full sequences (all of one shape when pipeline-parallel); each rank takes its
    context-parallel slice here, so ``loss_fn`` sees this rank's tokens."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    cp_rank, cp_size, _ = context_parallel()
    scorer = None
    if frozen:
        from megatron.core import parallel_state as ps

        from megatron_tgdpo.models.state_dict import gpt_model

        groups = call_groups(microbatches, per_call=logprobs.frozen_per_call, cuda=torch.cuda.is_available(),
                             pipeline_shapes_vary=bool(getattr(gpt_model(chunks[0]).config, "variable_seq_lengths", False)),
                             pipeline_parallel=ps.get_pipeline_model_parallel_world_size(), context_parallel=cp_size)
        scorer = FrozenScorer(frozen, chunks=chunks, chunk_size=logprobs.chunk_size, microbatches=microbatches,
                              groups=groups)
        for models in scorer.models.values():
            for chunk in models:
                (enable_fused_head if logprobs.fused else disable_fused_head)(chunk)
    if head is None:
        for chunk in chunks:  # cheap and idempotent: generation may have switched the head back meanwhile
            (enable_fused_head if logprobs.fused else disable_fused_head)(chunk)

        def head(model: torch.nn.Module, batch: Batch, output: torch.Tensor) -> torch.Tensor:
            return output_logprobs(model, output, batch["labels"], chunk_size=logprobs.chunk_size,
                                   positions=batch.loss_positions)

    def forward_step(data_iterator, model):
        index = next(data_iterator)
        batch = microbatches[index].for_context_parallel(cp_rank=cp_rank, cp_size=cp_size)
        kwargs = {}
        packed = packed_seq_params_for(batch)
        if packed is not None:
            kwargs["packed_seq_params"] = packed
        inputs = (batch["input_ids"], batch["position_ids"])
        with compat.hot_path(context_parallel_size=cp_size):
            if scorer is not None:  # the frozen models first: their transient memory is gone before ours exists
                frozen_outputs, scored = scorer.forward(scorer.split_input(model, index), batch, inputs,
                                                        dict(kwargs, attention_mask=None), index)
                if scored:
                    batch = batch.with_per_token(**scored)
            output = model(*inputs, attention_mask=None, **kwargs)
        if scorer is not None:
            output = scorer.join_output(output, frozen_outputs)

        def loss_func(last_stage_output: torch.Tensor):
            with compat.hot_path(context_parallel_size=cp_size):
                loss, count, report = loss_fn(index, batch, head(model, batch, last_stage_output))
            return loss, torch.as_tensor(count, dtype=torch.int, device=loss.device), report

        return output, loss_func

    n = len(microbatches)
    iterators = [iter(range(n)) for _ in chunks] if len(chunks) > 1 else iter(range(n))
    rows, seq = microbatches[0].shape
    parts = scorer.parts if scorer is not None else 1
    with torch.no_grad() if forward_only else torch.enable_grad():
        reports = get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iterators,
            model=chunks,
            num_microbatches=n,
            # full length (megatron divides by CP, and TP with SP, itself), times the models whose
            # activations one pipeline message holds
            seq_length=seq * parts,
            micro_batch_size=rows,
            forward_only=forward_only,
        )
    return list(reports or [])


def score_logps(
    chunks: list[torch.nn.Module],
    microbatches: list[Batch],
    *,
    logprobs: LogprobSettings = LogprobSettings(),
) -> list[torch.Tensor]:
    """Forward-only token log-probs ``logps * loss_mask`` (fp32, this CP rank's ``[R, S_local]``), one
    per micro-batch, on the last pipeline stage; an empty list on other stages."""

    def collect(index: int, batch: Batch, logps: torch.Tensor):
        return logps.new_zeros(()), 0, logps.detach() * batch["loss_mask"]

    for chunk in chunks:
        chunk.eval()
    return run_schedule(chunks, microbatches, collect, forward_only=True, logprobs=logprobs)


def score_frozen(
    models: Mapping[str, Sequence[torch.nn.Module]],
    microbatches: list[Batch],
    *,
    logprobs: LogprobSettings = LogprobSettings(),
) -> dict[str, list[torch.Tensor]]:
    """:func:`score_logps` of several models in one forward-only schedule (one pipeline pass): role ->
    one ``logps * loss_mask`` per micro-batch on the last pipeline stage, empty lists elsewhere."""
    roles = list(models)
    first, others = roles[0], {role: models[role] for role in roles[1:]}

    def collect(index: int, batch: Batch, logps: torch.Tensor):
        values = {first: logps.detach() * batch["loss_mask"]}
        values.update({role: batch[logps_key(role)] for role in others})
        return logps.new_zeros(()), 0, values

    for chunk in models[first]:
        chunk.eval()
    reports = run_schedule(list(models[first]), microbatches, collect, forward_only=True, logprobs=logprobs,
                           frozen=others)
    return {role: [report[role] for report in reports] for role in roles}
