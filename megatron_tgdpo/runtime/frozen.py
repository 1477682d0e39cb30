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

**Several micro-batches per call.** A small model's forward costs mostly per-call host work (each
layer's Python, one RoPE and attention call per segment), not per token. With ``per_call`` > 1 (or
``0``, automatic: micro-batches up to :data:`AUTO_TOKENS_PER_CALL` positions per call on CPU without
pipeline parallelism, one per call otherwise) a frozen model scores consecutive packed micro-batches as one longer packed row: the
rows side by side, every segment still attending only to itself. It runs in the forward step of the
group's first micro-batch; on the last stage each member's log-probs are split off and kept until its
own forward step; under pipeline parallelism the whole group's frozen activations travel in the first
micro-batch's message (the others carry only the policy's), which needs stages that exchange shapes
(packed rows without virtual stages). Rows layouts and context parallelism score one micro-batch per
call; shared-prompt rows group like the others (each response keeps its own prompt segment). On CPU the log-probs are bit-identical to one call per micro-batch (every
op is row- or segment-local; ``tests/distributed/test_frozen_grouping.py``); on a GPU a longer row may
select other kernels, so that is not promised there and CUDA runs keep one call per micro-batch
unless asked.
"""
from __future__ import annotations

import dataclasses
import itertools
from typing import Any, Mapping, Optional, Sequence

import torch

from megatron_tgdpo.data.batch import Batch
from megatron_tgdpo.data.packing import packed_seq_params_for
from megatron_tgdpo.models.fused_head import output_logprobs
from megatron_tgdpo.models.state_dict import gpt_model

__all__ = ["AUTO_TOKENS_PER_CALL", "FrozenScorer", "call_groups", "joined_batch", "logps_key"]

#: Automatic grouping on CPU: consecutive micro-batches share a frozen call while their row positions
#: add up to at most this many (a micro-batch longer than that is a call of its own).
AUTO_TOKENS_PER_CALL = 4096


def logps_key(role: str) -> str:
    """The per-token key of a frozen model's log-probs (``logps * loss_mask``) in the loss's batch."""
    return f"{role}_logps"


def call_groups(microbatches: Sequence[Batch], *, per_call: int, cuda: bool,
                pipeline_shapes_vary: bool, pipeline_parallel: int, context_parallel: int) -> list[list[int]]:
    """Which micro-batches each frozen call scores (consecutive indices, in order), or one each.

    ``per_call``: micro-batches per call, ``0`` for automatic (one pipeline stage on CPU: up to
    :data:`AUTO_TOKENS_PER_CALL` row positions; with CUDA or pipeline parallelism: one). Groups only where it stays exact and the schedule can carry it: packed
    rows (shared prompts included), no context parallelism, and under pipeline parallelism stages that
    exchange each message's shape."""
    single = [[i] for i in range(len(microbatches))]
    if per_call == 1 or context_parallel > 1:
        return single
    # Automatic: one stage on CPU only. Under PP a group's first micro-batch makes a long forward step
    # on every stage while the others wait, and on CPU that measured no cheaper than one call each.
    if per_call == 0 and (cuda or pipeline_parallel > 1):
        return single
    if pipeline_parallel > 1 and not pipeline_shapes_vary:
        return single
    if not all(b.packed and b.num_sequences > 0 for b in microbatches):
        return single
    groups: list[list[int]] = []
    tokens = 0
    for i, batch in enumerate(microbatches):
        full = groups and (len(groups[-1]) >= per_call if per_call else tokens + batch.num_tokens > AUTO_TOKENS_PER_CALL)
        if not groups or full:
            groups.append([])
            tokens = 0
        groups[-1].append(i)
        tokens += batch.num_tokens
    return groups


def joined_batch(batches: Sequence[Batch]) -> Batch:
    """Packed micro-batches as one packed row: the rows side by side, every segment its own (what a
    frozen model's forward reads: token ids, positions, labels, segment bounds, and for shared-prompt
    rows the prompt segment each response also attends to, renumbered in the joined row)."""
    if len(batches) == 1:
        return batches[0]
    bounds, offset, prefix_of = [0], 0, []
    for batch in batches:
        own = batch.segment_bounds()
        segments_before = len(bounds) - 1
        prefix_of += [p + segments_before if p >= 0 else -1 for p in (batch.prefix_of or (-1,) * (len(own) - 1))]
        bounds += [offset + b for b in own[1:]]
        offset += batch.shape[1]
    first = batches[0]
    tensors = {key: torch.cat([b[key] for b in batches], dim=1) for key in ("input_ids", "position_ids", "labels")}
    tensors["cu_seqlens"] = torch.tensor(bounds, dtype=first["cu_seqlens"].dtype, device=first["cu_seqlens"].device)
    joined = Batch.from_packed(tensors, num_pairs=sum(b.num_pairs for b in batches),
                               num_sequences=sum(b.num_sequences for b in batches),
                               real_tokens=sum(b.real_tokens for b in batches),
                               prefix_of=tuple(prefix_of) if any(p >= 0 for p in prefix_of) else None)
    if any(b.loss_positions is None for b in batches):
        return joined
    # one row each, side by side: a member's flat positions move by the row positions before it
    starts = [0, *itertools.accumulate(b.shape[1] for b in batches)][:-1]
    return dataclasses.replace(joined, loss_positions=torch.cat([b.loss_positions + start
                                                                 for b, start in zip(batches, starts)]))


class FrozenScorer:
    """Runs frozen model chunks beside the trained chunks of one schedule.

    ``models``: role -> that model's chunks, chunk ``i`` the same (virtual) pipeline stage as the
    schedule's chunk ``i``. ``chunks``: the schedule's own chunks (to tell which stage a call is).
    ``groups``: the micro-batch indices each frozen call scores (:func:`call_groups`; default one each),
    with ``microbatches`` the schedule's (full, unsliced) micro-batches."""

    def __init__(self, models: Mapping[str, Sequence[torch.nn.Module]], *, chunks: Sequence[torch.nn.Module],
                 chunk_size: Any, microbatches: Sequence[Batch] = (), groups: Sequence[Sequence[int]] = ()):
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
        self.microbatches = list(microbatches)
        #: micro-batch index -> the members of its group, for the first member of a group of several
        self.group_of = {group[0]: list(group) for group in groups if len(group) > 1}
        self.grouped = {i for group in self.group_of.values() for i in group[1:]}
        #: (stage, micro-batch) -> log-probs scored in an earlier micro-batch's call (last stage only)
        self.kept: dict[tuple[int, int], dict[str, torch.Tensor]] = {}

    def _frozen_tokens(self, index: int) -> int:
        """Sequence positions of the frozen models' parts in micro-batch ``index``'s message, per model."""
        if index in self.grouped:
            return 0
        members = self.group_of.get(index, [index])
        return sum(self.microbatches[i].shape[1] for i in members)

    @property
    def parts(self) -> int:
        """How many models' activations one pipeline message holds (the trained one included)."""
        return 1 + len(self.roles)

    def split_input(self, model: torch.nn.Module, index: Optional[int] = None) -> list[torch.nn.Module]:
        """This stage's frozen chunks, each given its part of the activations the stage received for
        micro-batch ``index`` (on the first stage there are none: every model embeds the tokens itself).
        Call before the forward."""
        stage = self.stage[id(model)]
        frozen = [self.models[role][stage] for role in self.roles]
        gpt = gpt_model(model)
        if not gpt.pre_process:
            received = gpt.decoder.input_tensor
            if index is None or not self.group_of:
                parts = received.chunk(self.parts, dim=0)  # views: the policy's part keeps its autograd path
            else:
                own = self.microbatches[index].shape[1]
                frozen_tokens = self._frozen_tokens(index)
                # the message's local length (SP divides every part alike) in proportion to full lengths
                scale = received.shape[0] / (own + len(self.roles) * frozen_tokens)
                sizes = [round(own * scale)] + [round(frozen_tokens * scale)] * len(self.roles)
                parts = received.split(sizes, dim=0) if frozen_tokens else (received,)
            gpt.set_input_tensor(parts[0])
            for chunk, part in zip(frozen, parts[1:]):
                gpt_model(chunk).set_input_tensor(part)
        return frozen

    def forward(self, frozen: list[torch.nn.Module], batch: Batch, inputs: tuple, kwargs: dict,
                index: Optional[int] = None) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
        """Every frozen chunk on micro-batch ``index`` (``batch``, with the model's ``inputs`` and
        ``kwargs``), without autograd: (stage outputs to send on, empty on the last stage;
        ``{key: logps * loss_mask}`` on the last stage, empty elsewhere). A micro-batch that an earlier
        one's call scored gets what that call kept for it."""
        if index is not None and index in self.grouped:
            if not gpt_model(frozen[0]).post_process:
                return [], {}  # the group's activations went on in its first micro-batch's message
            kept = self.kept.pop((self._stage_of(frozen), index), None)
            if kept is None:  # a schedule that runs micro-batches out of order would land here
                raise RuntimeError(f"micro-batch {index}'s frozen log-probs were not scored with its group's first")
            return [], kept
        if index is not None and index in self.group_of:
            return self._forward_group(frozen, index)
        outputs, logps = self._run(frozen, inputs, kwargs, batch)
        return outputs, {logps_key(role): value * batch["loss_mask"] for role, value in logps.items()}

    def _run(self, frozen: list[torch.nn.Module], inputs: tuple, kwargs: dict, batch: Batch
             ) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
        """Every frozen chunk on ``inputs`` (``batch``'s), without autograd: (stage outputs to send on,
        empty on the last stage; ``{role: log-probs of its labels}`` on the last stage, empty elsewhere)."""
        outputs, logps = [], {}
        with torch.no_grad():
            for role, chunk in zip(self.roles, frozen):
                output = chunk(*inputs, **kwargs)
                if gpt_model(chunk).post_process:
                    logps[role] = output_logprobs(chunk, output, batch["labels"], chunk_size=self.chunk_size,
                                                  positions=batch.loss_positions)
                    del output  # the last stage's hidden states: only the log-probs are kept
                else:
                    outputs.append(output)
        return outputs, logps

    def _stage_of(self, frozen: list[torch.nn.Module]) -> int:
        return self.models[self.roles[0]].index(frozen[0])

    def _forward_group(self, frozen: list[torch.nn.Module], index: int
                       ) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
        """The frozen chunks on micro-batch ``index``'s whole group as one packed row; on the last stage
        the members' log-probs are split off, ``index``'s returned and the others' kept."""
        members = [self.microbatches[i] for i in self.group_of[index]]
        joined = joined_batch(members)
        kwargs = {"attention_mask": None, "packed_seq_params": packed_seq_params_for(joined)}
        outputs, logps = self._run(frozen, (joined["input_ids"], joined["position_ids"]), kwargs, joined)
        if not logps:
            return outputs, {}
        stage = self._stage_of(frozen)
        start = 0
        scored = {}
        for i, member in zip(self.group_of[index], members):
            end = start + member.shape[1]
            values = {logps_key(role): value[:, start:end] * member["loss_mask"] for role, value in logps.items()}
            if i == index:
                scored = values
            else:
                self.kept[(stage, i)] = values
            start = end
        return outputs, scored

    @staticmethod
    def join_output(output: torch.Tensor, frozen_outputs: list[torch.Tensor]) -> torch.Tensor:
        """The message to the next stage: the trained model's output, then each frozen model's."""
        return torch.cat([output, *frozen_outputs], dim=0) if frozen_outputs else output
