"""A PPO critic from a megatron-core ``GPTModel``: the same backbone, a scalar value head on the last stage.

    chunks = llama.build_model(arch, config)      # the critic's backbone, any TP/PP/VPP/SP layout
    source.load_into(chunks)                      # backbone weights (an SFT or reference checkpoint)
    for chunk in chunks:
        attach_value_head(chunk, init_std=0.0)    # before DDP wrapping, so DDP and the optimizer see it
    ...
    output = model(input_ids, position_ids, attention_mask=None)   # last stage: hidden states
    values = value_output(model, output)          # fp32 [b, s] (this CP rank's positions)

**How.** The last stage's LM head is switched to return its input (the final, normed hidden states)
with :func:`megatron_tgdpo.models.fused_head.enable_fused_head` — the seam that keeps every parameter
name, state dict and checkpoint key as they were. A ``value_head`` (``Linear(H, 1)`` with bias) is added
as a child of that ``GPTModel``, so its weights live in the model's (sharded) state dict as
``value_head.weight`` / ``value_head.bias`` (``critic.value_head.*`` in a PPO checkpoint) and DDP and the
optimizer treat them like any parameter. The LM head's own weight is then unused: it is frozen (no
gradient buffer, no optimizer state) unless it is tied to the input embedding, which is still trained.

**Parallelism.** The value head is replicated over tensor-parallel ranks. Without sequence parallelism
every TP rank holds the same full hidden states, hence the same values, loss and value-head gradient
(megatron's usual treatment of replicated parameters, e.g. norms). With sequence parallelism each TP
rank holds a slice of the sequence; it is all-gathered first, with a backward that only takes this
rank's slice of the (identical) incoming gradient — so again every TP rank computes the same loss and
the backbone gets exactly its gradient. Context parallelism needs nothing: the positions are this CP
rank's. Only the last pipeline stage has a head; on other stages ``attach_value_head`` is a no-op.

**Initialisation.** ``init_std`` 0 (the default) gives a zero head: the critic starts predicting 0
everywhere, whatever the backbone. Otherwise the weight is drawn from a generator keyed by ``seed``
(the same on every rank and layout) with that standard deviation; the bias starts at 0.
"""
from __future__ import annotations

import torch

from megatron_tgdpo.models.fused_head import enable_fused_head
from megatron_tgdpo.models.state_dict import gpt_model, unwrap

__all__ = ["VALUE_HEAD", "attach_value_head", "has_value_head", "rescale_value_head", "value_output"]

VALUE_HEAD = "value_head"


def has_value_head(model: torch.nn.Module) -> bool:
    return isinstance(getattr(gpt_model(model), VALUE_HEAD, None), torch.nn.Linear)


def attach_value_head(model: torch.nn.Module, *, init_std: float = 0.0, seed: int = 0) -> torch.nn.Module:
    """Turn this (unwrapped, not yet DDP-wrapped) GPTModel chunk into a critic chunk; returns it.

    A no-op on a chunk that is not the last pipeline stage. Raises if the chunk already has a head or
    is DDP-wrapped (DDP would not know the new parameters)."""
    if unwrap(model) is not model:
        raise ValueError("attach the value head before wrapping the chunk in DDP (the optimizer must see it)")
    gpt = gpt_model(model)
    if not gpt.post_process:
        return model
    if has_value_head(gpt):
        raise ValueError("this chunk already has a value head")
    from megatron.core import tensor_parallel

    enable_fused_head(gpt)
    config = gpt.config
    weight_source = gpt.output_layer.weight if getattr(gpt.output_layer, "weight", None) is not None else None
    device = next(gpt.parameters()).device
    head = torch.nn.Linear(config.hidden_size, 1, bias=True, device=device, dtype=config.params_dtype)
    with torch.no_grad():
        head.bias.zero_()
        if init_std:
            generator = torch.Generator().manual_seed(int(seed) % (2**63))
            head.weight.copy_(torch.randn(head.weight.shape, generator=generator) * init_std)
        else:
            head.weight.zero_()
    for param in head.parameters():
        tensor_parallel.set_defaults_if_not_set_tensor_model_parallel_attributes(param)
    gpt.add_module(VALUE_HEAD, head)
    if weight_source is not None and not gpt.share_embeddings_and_output_weights:
        weight_source.requires_grad_(False)  # the LM head is not used by a critic
    return model


def rescale_value_head(model: torch.nn.Module, *, mean: float, std: float) -> None:
    """Make this chunk's head output ``(v - mean) / std`` instead of ``v`` (weight / std, (bias - mean) / std);
    a no-op off the last stage."""
    gpt = gpt_model(model)
    if not has_value_head(gpt):
        return
    head = getattr(gpt, VALUE_HEAD)
    with torch.no_grad():
        head.weight.div_(std)
        head.bias.sub_(mean).div_(std)


def value_output(model: torch.nn.Module, output: torch.Tensor) -> torch.Tensor:
    """fp32 ``[b, s]`` values from what the critic's last stage returned (``[b, s, H]``, or with
    sequence parallelism this TP rank's ``[b, s/tp, H]``); see the module docstring for the gradients."""
    gpt = gpt_model(model)
    if not has_value_head(gpt):
        raise ValueError("value_output needs a chunk with attach_value_head applied (the last pipeline stage)")
    head = getattr(gpt, VALUE_HEAD)
    if output.dim() != 3 or output.shape[-1] != head.in_features:
        raise ValueError(f"expected hidden states [b, s, {head.in_features}], got {tuple(output.shape)}")
    if getattr(gpt.output_layer, "sequence_parallel", False):
        from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

        # [b, s/tp, H] -> [s/tp, b, H] -> all-gather over TP (backward: this rank's slice) -> [b, s, H]
        full = gather_from_sequence_parallel_region(output.transpose(0, 1).contiguous(),
                                                    tensor_parallel_output_grad=False)
        output = full.transpose(0, 1)
    return head(output).squeeze(-1).float()
