"""The sharded state dict of a checkpoint's named parts (models, optimizers, LR schedulers) and the
RNG state."""
from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

from megatron_tgdpo.checkpointing.index import POLICY, CheckpointPart, rank_and_world

# ----------------------------------------------------------------------------------------------
# sharded state dicts
# ----------------------------------------------------------------------------------------------


def _keys(name: str) -> tuple[str, str]:
    """(dict prefix, sharded-tensor key prefix) of a part: none for the policy (megatron's plain keys)."""
    return ("", "") if name == POLICY else (f"{name}.", f"{name}.")


def model_state(name: str, chunks: list) -> dict:
    from megatron_tgdpo.models.state_dict import unwrap

    dict_prefix, key_prefix = _keys(name)
    if len(chunks) == 1:
        return {f"{dict_prefix}model": unwrap(chunks[0]).sharded_state_dict(prefix=key_prefix)}
    return {f"{dict_prefix}model{i}": unwrap(c).sharded_state_dict(prefix=key_prefix) for i, c in enumerate(chunks)}


def sharded_state(parts: dict[str, CheckpointPart], *, is_loading: bool, optimizer: bool) -> dict:
    from megatron_tgdpo import compat

    sharded: dict = {}
    for name, part in parts.items():
        dict_prefix, _ = _keys(name)
        models = model_state(name, part.chunks)
        sharded.update(models)
        if optimizer and part.optimizer is not None:
            state = compat.optimizer_sharded_state_dict(part.optimizer, models, is_loading=is_loading)
            if name != POLICY:
                # The distributed optimizer names its objects "optimizer.distributed.dp_group_idx_*"
                # whatever the model: a second part's would collide with the policy's.
                from megatron.core.dist_checkpointing.utils import (
                    add_prefix_for_sharding,
                )

                add_prefix_for_sharding(state, f"{name}.")
            sharded[f"{dict_prefix}optimizer"] = state
        if part.scheduler is not None:
            sharded[f"{dict_prefix}opt_param_scheduler"] = part.scheduler.state_dict()
    return sharded


def assign_state(parts: dict[str, CheckpointPart], loaded: dict, requested: set) -> None:
    """Copy what was ``requested`` (the sharded state dict handed to the load) into the parts; the
    common state dist_checkpointing returns besides is ignored unless requested."""
    from megatron_tgdpo import compat
    from megatron_tgdpo.models.state_dict import unwrap

    for name, part in parts.items():
        dict_prefix, _ = _keys(name)
        for i, chunk in enumerate(part.chunks):
            key = f"{dict_prefix}model" if len(part.chunks) == 1 else f"{dict_prefix}model{i}"
            unwrap(chunk).load_state_dict(loaded[key], strict=False)
        if f"{dict_prefix}optimizer" in requested:
            compat.load_optimizer_state(part.optimizer, loaded[f"{dict_prefix}optimizer"])
        if part.scheduler is not None and f"{dict_prefix}opt_param_scheduler" in loaded:  # common state
            part.scheduler.load_state_dict(loaded[f"{dict_prefix}opt_param_scheduler"])


def rng_state() -> dict:
    from megatron.core import tensor_parallel

    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }


def set_rng_state(state: dict) -> None:
    from megatron.core import tensor_parallel

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def per_rank_object(key: str, obj: Any):
    """A ShardedObject holding ``obj`` for this global rank (one entry per rank in the checkpoint)."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    rank, world = rank_and_world()
    return ShardedObject(key, obj, (world,), (rank,), replica_id=0)
