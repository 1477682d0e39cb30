"""Frozen models scored inside another model's schedule: one pipeline pass for all of them.

The reference and guidance models of DPO / TGDPO run forward-only over exactly the micro-batches the
policy trains on. Scoring each one in its own forward-only schedule costs a schedule per model: its own
pipeline fill and drain (bubble), its own per-micro-batch schedule bookkeeping. Here every frozen model
runs *inside the policy's forward step of the same micro-batch*, so a step has one schedule and one
bubble whatever the number of frozen models, and each frozen forward sees the same micro-batch, the same
context-parallel slice and the same ``PackedSeqParams`` as the policy (its log-probs are bit-identical
to a separate forward-only pass: same shapes, same ops).

**Pipeline stages.** A frozen model is split into the same stages as the policy, so its activations
must travel between stages too. They travel *with* the policy's: a stage sends
``cat([policy, frozen_1, ..., frozen_k])`` along the sequence dimension (``k + 1`` times the usual
message; the schedule is told the sequence is ``k + 1`` times longer, which keeps megatron-core's fixed
and variable shape exchanges right, sequence and context parallelism included), and the next stage
splits what it received into the policy's input and each frozen model's input. In the backward pass
the frozen parts carry zero gradient: the policy's gradient is the same tensor as without them.

**Memory.** Frozen forwards run under ``torch.no_grad`` before the policy's forward of the same
micro-batch: what they allocate is freed before the policy's activations of that micro-batch exist, and
nothing of theirs is kept for a backward pass. What stays per in-flight micro-batch is the frozen
models' stage outputs inside the concatenated message (``k`` hidden-state tensors ``[s, b, h]``), and on
the last stage each one's ``[R, S]`` fp32 log-probs until the loss has read them.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

from megatron_tgdpo.data.batch import Batch
from megatron_tgdpo.models.fused_head import output_logprobs
from megatron_tgdpo.models.state_dict import gpt_model

__all__ = ["FrozenScorer", "logps_key"]


def logps_key(role: str) -> str:
    """The per-token key of a frozen model's log-probs (``logps * loss_mask``) in the loss's batch."""
    return f"{role}_logps"


class FrozenScorer:
    """Runs frozen model chunks beside the trained chunks of one schedule.

    ``models``: role -> that model's chunks, chunk ``i`` the same (virtual) pipeline stage as the
    schedule's chunk ``i``. ``chunks``: the schedule's own chunks (to tell which stage a call is)."""

    def __init__(self, models: Mapping[str, Sequence[torch.nn.Module]], *, chunks: Sequence[torch.nn.Module],
                 chunk_size: Any):
        self.roles = tuple(models)
        self.models = {role: list(models[role]) for role in self.roles}
        for role, frozen in self.models.items():
            if len(frozen) != len(chunks):
                raise ValueError(f"the {role} model has {len(frozen)} chunks, the trained model {len(chunks)}")
        self.stage = {id(chunk): i for i, chunk in enumerate(chunks)}
        self.chunk_size = chunk_size
        for frozen in self.models.values():
            for chunk in frozen:
                chunk.eval()

    @property
    def parts(self) -> int:
        """How many models' activations one pipeline message holds (the trained one included)."""
        return 1 + len(self.roles)

    def split_input(self, model: torch.nn.Module) -> list[torch.nn.Module]:
        """This stage's frozen chunks, each given its part of the activations the stage received (on the
        first stage there are none: every model embeds the tokens itself). Call before the forward."""
        index = self.stage[id(model)]
        frozen = [self.models[role][index] for role in self.roles]
        gpt = gpt_model(model)
        if not gpt.pre_process:
            received = gpt.decoder.input_tensor
            parts = received.chunk(self.parts, dim=0)  # views: the policy's part keeps its autograd path
            gpt.set_input_tensor(parts[0])
            for chunk, part in zip(frozen, parts[1:]):
                gpt_model(chunk).set_input_tensor(part)
        return frozen

    def forward(self, frozen: list[torch.nn.Module], batch: Batch, inputs: tuple, kwargs: dict
                ) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
        """Every frozen chunk on this micro-batch, without autograd: (stage outputs to send on, empty on
        the last stage; ``{key: logps * loss_mask}`` on the last stage, empty elsewhere)."""
        outputs, scored = [], {}
        with torch.no_grad():
            for role, chunk in zip(self.roles, frozen):
                output = chunk(*inputs, **kwargs)
                if gpt_model(chunk).post_process:
                    logps = output_logprobs(chunk, output, batch["labels"], chunk_size=self.chunk_size)
                    scored[logps_key(role)] = logps * batch["loss_mask"]
                    del output  # the last stage's hidden states: only the log-probs are kept
                else:
                    outputs.append(output)
        return outputs, scored

    @staticmethod
    def join_output(output: torch.Tensor, frozen_outputs: list[torch.Tensor]) -> torch.Tensor:
        """The message to the next stage: the trained model's output, then each frozen model's."""
        return torch.cat([output, *frozen_outputs], dim=0) if frozen_outputs else output
