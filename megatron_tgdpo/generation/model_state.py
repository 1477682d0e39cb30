"""Put already-built (possibly DDP-wrapped, possibly training) model chunks into generation mode and back.

Generation may run inside a training process (PPO, or sampling between DPO rounds) on the very chunks
being trained, so everything changed here is restored on exit: the train/eval flag of every module
and the sequence-parallel switches.

Sequence parallelism is switched off while generating: a decode step has one token per row, which
cannot be split over TP ranks, and megatron-core's own inference does the same for dense models.
We record and restore each attribute megatron-core consults (``config.sequence_parallel`` and the
modules' ``sequence_parallel`` / ``scatter_to_sequence_parallel`` / ``reduce_scatter_embeddings``)
rather than using megatron's ``set_model_to_sequence_parallel``, which restores to one value for all.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from megatron_tgdpo.generation.config import GenerationError
from megatron_tgdpo.models.fused_head import disable_fused_head, enable_fused_head, is_fused_head_enabled
from megatron_tgdpo.models.state_dict import unwrap

_SP_ATTRS = ("sequence_parallel", "scatter_to_sequence_parallel", "reduce_scatter_embeddings")


def check_supported(chunks: list[torch.nn.Module]) -> None:
    """Refuse layouts and models generation cannot serve, before any compute."""
    from megatron.core import parallel_state as ps

    if not chunks:
        raise GenerationError("generate() needs this rank's model chunks; got an empty list")
    if ps.get_context_parallel_world_size() > 1:
        raise GenerationError(
            "generation does not support context parallelism (a decode step has one token per row, "
            "which cannot be split over CP ranks); run it with --context-parallel-size 1, e.g. in a "
            "separate job from the trained checkpoint, or export to Hugging Face and use vLLM"
        )
    for chunk in chunks:
        if not hasattr(unwrap(chunk), "decoder"):
            raise GenerationError(f"generate() expects megatron-core GPTModel chunks, got {type(chunk).__name__}")


@contextlib.contextmanager
def generation_mode(chunks: list[torch.nn.Module]) -> Iterator[None]:
    """eval mode, no autograd, sequence parallelism off, the normal LM head (generation samples from
    logits); everything restored afterwards."""
    modules = [m for chunk in chunks for m in chunk.modules()]
    fused = [chunk for chunk in chunks if is_fused_head_enabled(chunk)]
    training = [m.training for m in modules]
    configs = {id(unwrap(c).config): unwrap(c).config for c in chunks}
    saved_sp = [(m, a, getattr(m, a)) for m in modules for a in _SP_ATTRS if isinstance(getattr(m, a, None), bool)]
    saved_cfg = [(c, c.sequence_parallel) for c in configs.values()]
    try:
        for chunk in fused:
            disable_fused_head(chunk)
        for chunk in chunks:
            chunk.eval()
        for module, attr, _ in saved_sp:
            setattr(module, attr, False)
        for config, _ in saved_cfg:
            config.sequence_parallel = False
        with torch.no_grad():
            yield
    finally:
        for chunk in fused:
            enable_fused_head(chunk)
        for module, attr, value in saved_sp:
            setattr(module, attr, value)
        for config, value in saved_cfg:
            config.sequence_parallel = value
        for module, flag in zip(modules, training):
            module.training = flag
