"""Fused LM head for megatron-core ``GPTModel``: the last pipeline stage never materialises logits.

    enable_fused_head(chunk)                     # every model chunk; a no-op where there is no LM head
    output = model(input_ids, position_ids, attention_mask=None)   # [b, s, H] instead of [b, s, V/tp]
    logps = fused_logprobs(model, output, labels, chunk_size="auto")  # fp32 [b, s], as the plain path

or, for code that serves both paths, ``output_logprobs(model, output, labels, chunk_size=...)``.

**The seam.** ``GPTModel`` builds its output layer itself (a ``ColumnParallelLinear``, not a
submodule spec we could swap) and, without labels, its ``_postprocess`` ends in
``logits, _ = self.output_layer(hidden, weight=output_weight, runtime_gather_output=...)`` followed by
``logits.transpose(0, 1).contiguous()``. Overriding ``forward`` of that one *instance* so that it returns
``(hidden, None)`` is the smallest change that makes the model return hidden states:

* the module, its parameter and every name stay where they are, so ``named_parameters``,
  ``state_dict``, ``sharded_state_dict`` (distributed checkpoints), DDP's grad buckets and the
  optimizer see exactly the model they would see without it;
* the module is still *called*, so module hooks (e.g. DDP's forward pre-hooks that wait for the
  parameter all-gather of the distributed optimizer) still run;
* nothing version-specific is copied: ``GPTModel.forward`` / ``_postprocess`` differ a lot between
  megatron-core 0.16 and 0.19 (MTP, MuP scaling, ``output_processor``), and overriding them would mean
  re-implementing that code; the output layer's call signature is the same in both.

What ``_postprocess`` does with the returned tensor when ``labels`` is ``None`` is a transpose to
``[b, s, ...]`` (0.19 also applies MuP logit scaling, refused below). So the model returns
``[b, s, H]``, or with sequence parallelism this rank's sequence shard ``[b, s/tp, H]`` (the plain output
layer would have all-gathered it; the fused op does that itself). Context parallelism needs nothing:
the model and the labels already hold this CP rank's slice of the sequence. Only the last pipeline stage
has an output layer; elsewhere everything here is a no-op or refuses to run.

**Weight gradients.** The output weight is ``output_layer.weight``, or with tied embeddings the
embedding weight on a stage that has both, and on the last stage at PP>1 megatron's copy of it (whose
``main_grad`` ``finalize_model_grads`` all-reduces with the first stage's). Under megatron DDP the fused
op adds its gradient to ``main_grad`` directly (see ``megatron_tgdpo.ops.fused_logprobs._ddp_main_grad``); that
relies on ``overlap_grad_reduce=False``, which is checked here for DDP-wrapped models.
"""
from __future__ import annotations

import types
from typing import Optional, Union

import torch

from megatron_tgdpo.models.state_dict import gpt_model
from megatron_tgdpo.ops import chunk_tokens, fused_vocab_parallel_logprobs, vocab_parallel_logprobs

__all__ = [
    "disable_fused_head",
    "enable_fused_head",
    "fused_logprobs",
    "is_fused_head_enabled",
    "output_logprobs",
    "output_weight",
]

ChunkSize = Union[int, None, str]


def _hidden_passthrough(self, input_: torch.Tensor, weight: Optional[torch.Tensor] = None,
                        runtime_gather_output: Optional[bool] = None):
    """Stands in for ``ColumnParallelLinear.forward``: the LM head's input, unchanged, and no bias."""
    if runtime_gather_output:
        # Inference asks for gathered full-vocab logits; that path needs the real output layer.
        raise RuntimeError("the fused LM head returns hidden states, not logits: call disable_fused_head(model) "
                           "before inference or generation")
    return input_, None


def _check_wrappers(model: torch.nn.Module) -> None:
    """Refuse DDP settings under which adding to ``main_grad`` inside backward would be wrong."""
    module = model
    while True:
        ddp_config = getattr(module, "ddp_config", None)
        if ddp_config is not None:
            if getattr(ddp_config, "overlap_grad_reduce", False):
                raise NotImplementedError(
                    "the fused LM head adds the output-weight gradient to DDP's main_grad and hands autograd "
                    "no gradient; with overlap_grad_reduce=True DDP's hook requires param.grad: use "
                    "overlap_grad_reduce=False"
                )
            if getattr(ddp_config, "use_megatron_fsdp", False) or getattr(ddp_config, "use_custom_fsdp", False):
                raise NotImplementedError("the fused LM head does not support megatron-FSDP")
        if hasattr(module, "decoder") or not hasattr(module, "module"):
            return
        module = module.module


def _check_config(config) -> None:
    """Model features whose ``_postprocess`` would do more with the output layer's result than transpose it."""
    if getattr(config, "mtp_num_layers", None):
        raise NotImplementedError("the fused LM head does not support multi-token prediction (mtp_num_layers)")
    if getattr(config, "use_mup", False):
        raise NotImplementedError("the fused LM head does not support MuP logit scaling (use_mup)")
    if getattr(config, "defer_embedding_wgrad_compute", False):
        raise NotImplementedError("the fused LM head does not support defer_embedding_wgrad_compute")


def is_fused_head_enabled(model: torch.nn.Module) -> bool:
    """Whether this model chunk's output layer returns hidden states (False on stages without one)."""
    layer = getattr(gpt_model(model), "output_layer", None)
    forward = None if layer is None else layer.__dict__.get("forward")
    return getattr(forward, "__func__", None) is _hidden_passthrough


def enable_fused_head(model: torch.nn.Module) -> torch.nn.Module:
    """Make this model chunk return final hidden states instead of logits; returns ``model``.

    Parameters, names, state dicts and checkpoints are unchanged. A no-op on a chunk without an output
    layer (not the last pipeline stage) and when already enabled. Call with or without the DDP wrapper."""
    gpt = gpt_model(model)
    _check_wrappers(model)
    if not gpt.post_process or is_fused_head_enabled(gpt):
        return model
    _check_config(gpt.config)
    if getattr(gpt, "mtp_process", False):
        raise NotImplementedError("the fused LM head does not support multi-token prediction")
    layer = gpt.output_layer
    layer.forward = types.MethodType(_hidden_passthrough, layer)  # instance attribute: shadows the class's
    return model


def disable_fused_head(model: torch.nn.Module) -> torch.nn.Module:
    """Undo :func:`enable_fused_head`: the model returns logits again. Returns ``model``."""
    gpt = gpt_model(model)
    if is_fused_head_enabled(gpt):
        del gpt.output_layer.forward
    return model


def output_weight(model: torch.nn.Module) -> torch.nn.Parameter:
    """The ``[V/tp, H]`` weight the LM head of this (last-stage) chunk multiplies by: ``output_layer.weight``,
    or with tied embeddings what ``GPTModel`` passes to its output layer (the embedding weight when this
    stage also embeds, else megatron's last-stage copy of it)."""
    gpt = gpt_model(model)
    if not gpt.post_process:
        raise ValueError("this model chunk has no LM head (not the last pipeline stage)")
    if gpt.share_embeddings_and_output_weights:
        weight = gpt.shared_embedding_or_output_weight()
    else:
        weight = gpt.output_layer.weight
    if weight is None:
        raise ValueError("the model has no output weight on this stage")
    return weight


def fused_logprobs(
    model: torch.nn.Module,
    output: torch.Tensor,
    labels: torch.Tensor,
    *,
    chunk_size: ChunkSize = "auto",
    positions: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """fp32 ``[b, s]`` log-probs of ``labels`` from a fused-head model's ``output``, equal to
    ``vocab_parallel_logprobs(logits, labels)`` of the same model with its normal head (at ``positions``
    only, when given: see :func:`output_logprobs`).

    Args:
        model: the (possibly DDP-wrapped) last-stage ``GPTModel`` chunk that produced ``output``, with
            :func:`enable_fused_head` applied.
        output: what the model returned: ``[b, s, H]``; with sequence parallelism ``[b, s/tp, H]``.
        labels: ``[b, s]`` global token ids of this rank's (CP-local) sequence.
        chunk_size: as for :func:`megatron_tgdpo.ops.fused_vocab_parallel_logprobs` (``"auto"``: sized by
            :data:`megatron_tgdpo.ops.DEFAULT_CHUNK_BYTES`).
    """
    gpt = gpt_model(model)
    if not is_fused_head_enabled(gpt):
        raise ValueError("fused_logprobs needs a model with enable_fused_head applied (its output are logits)")
    _check_wrappers(model)
    weight = output_weight(gpt)
    layer = gpt.output_layer
    group = getattr(layer, "tp_group", None)
    if output.dim() != 3 or output.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"expected the fused head's hidden states [b, s, {weight.shape[1]}], got {tuple(output.shape)}"
        )
    if getattr(layer, "sequence_parallel", False):
        # Megatron's SP shards dim 0 of [s, b, H]; the op gathers along dim 0, so go back to that layout.
        # Every position is computed: this rank holds a sequence shard, the positions index the whole row.
        logps = fused_vocab_parallel_logprobs(
            output.transpose(0, 1), weight, labels.t(), tp_group=group, sequence_parallel=True, chunk_size=chunk_size
        )
        return _only_at(logps.t().contiguous(), positions)
    if positions is None or positions.numel() == 0:  # none trained (a filler micro-batch): zeros, still in the graph
        return _only_at(fused_vocab_parallel_logprobs(output, weight, labels, tp_group=group, chunk_size=chunk_size),
                        positions)
    # The head's GEMMs and log-softmax for the positions the loss reads only (the responses): a prompt's
    # and the padding's logits are never used.
    hidden = output.reshape(-1, output.shape[-1]).index_select(0, positions)
    picked = fused_vocab_parallel_logprobs(hidden, weight, labels.reshape(-1).index_select(0, positions),
                                           tp_group=group, chunk_size=chunk_size)
    return _placed(picked, positions, labels.shape)


def _placed(values: torch.Tensor, positions: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """A zero tensor of ``shape`` holding ``values[k]`` at flat position ``positions[k]``."""
    return values.new_zeros(shape.numel()).index_copy(0, positions, values).view(shape)


def _only_at(logps: torch.Tensor, positions: Optional[torch.Tensor]) -> torch.Tensor:
    """``logps`` where ``positions`` (flat indices) say, 0 elsewhere; all of it for None."""
    if positions is None:
        return logps
    return _placed(logps.reshape(-1).index_select(0, positions), positions, logps.shape)


def output_logprobs(
    model: torch.nn.Module,
    output: torch.Tensor,
    labels: torch.Tensor,
    *,
    chunk_size: ChunkSize = "auto",
    positions: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """fp32 ``[b, s]`` log-probs from ``model``'s output, fused head or not: what a schedule's loss
    function calls. ``chunk_size``: tokens per chunk, ``None`` for one chunk, or ``"auto"`` (by bytes,
    :func:`megatron_tgdpo.ops.chunk_tokens`) for either path.

    ``positions``: flat indices into ``labels`` (a batch's ``loss_positions``): the log-probs there, 0
    everywhere else. The fused head without sequence parallelism then runs its GEMMs and log-softmax
    on those positions alone; the other paths compute every position and zero the rest."""
    if is_fused_head_enabled(model):
        return fused_logprobs(model, output, labels, chunk_size=chunk_size, positions=positions)
    if isinstance(chunk_size, str) and chunk_size == "auto":
        chunk_size = chunk_tokens(output.shape[-1])
    return _only_at(vocab_parallel_logprobs(output, labels, chunk_size=chunk_size), positions)
