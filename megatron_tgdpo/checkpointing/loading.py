"""Loading a checkpoint into model chunks (weights only, or the whole training state)."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from megatron_tgdpo.checkpointing.index import (
    POLICY,
    CheckpointError,
    CheckpointPart,
    rank_and_world,
    current_layout,
    read_metadata,
    resolve,
)
from megatron_tgdpo.checkpointing.state import (
    assign_state,
    model_state,
    per_rank_object,
    sharded_state,
    set_rng_state,
)

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------
# load
# ----------------------------------------------------------------------------------------------


def load_model_weights(path: str | os.PathLike, chunks: list[torch.nn.Module], *, part: str = POLICY) -> Path:
    """Fill ``chunks`` with part ``part``'s weights of a torch_dist checkpoint (root or ``iter_*``),
    at any TP/PP layout (resharding as needed). Collective: every rank that holds a chunk calls it."""
    from megatron.core import dist_checkpointing

    ckpt = resolve(path, verify="collective")
    sharded = model_state(part, chunks)
    requested = set(sharded)
    try:
        loaded = dist_checkpointing.load(sharded, str(ckpt))
    except Exception as exc:  # noqa: BLE001 - re-raised with the path and what to check
        raise CheckpointError(f"{ckpt}: could not load model weights into this model ({exc}); "
                              "check that --model/preset and vocab size match the checkpoint") from exc
    assign_state({part: CheckpointPart(chunks)}, loaded, requested)
    return ckpt


def load_checkpoint(
    path: str | os.PathLike,
    *,
    parts: dict[str, CheckpointPart],
    load_optimizer: bool = True,
    load_rng: bool = True,
) -> dict:
    """Resume every part from ``path`` (a save root: its newest intact checkpoint; or one ``iter_*``).

    Model weights reshard to any TP/PP/CP/DP layout. Optimizer state reshards across DP sizes only
    (see ``compat.OPTIMIZER_SHARDING``): a TP/PP change raises with what to do. RNG state is restored
    only at the same world size and layout (it is per rank). Returns the checkpoint's metadata plus
    ``path``."""
    from megatron.core import dist_checkpointing

    ckpt = resolve(path, verify="collective")
    meta = read_metadata(ckpt)
    saved, now = meta.get("layout", {}), current_layout()
    model_axes = ("tensor_model_parallel_size", "pipeline_model_parallel_size", "virtual_pipeline_model_parallel_size")
    changed = [f"{k.replace('_', '-')} {saved.get(k)} -> {now[k]}" for k in model_axes if saved.get(k) != now[k]]
    has_optimizer = any(p.optimizer is not None for p in parts.values())
    if has_optimizer and load_optimizer and changed:
        raise CheckpointError(
            f"{ckpt}: optimizer state was saved at a different layout ({', '.join(changed)}) and cannot be "
            "resharded across tensor/pipeline parallelism; pass --no-load-optim to load the model weights "
            "(resharded) with a fresh optimizer, or resume at the saved layout"
        )
    missing = [name for name in parts if name not in meta.get("parts", [POLICY])]
    if missing:
        raise CheckpointError(f"{ckpt}: holds no {', '.join(missing)} (parts: {meta.get('parts', [POLICY])})")
    sharded = sharded_state(parts, is_loading=True, optimizer=load_optimizer)
    restore_rng = load_rng and saved == now
    if restore_rng:
        sharded["rng_state"] = per_rank_object("rng_state", None)
    elif load_rng and rank_and_world()[0] == 0:
        log.warning("%s: saved at layout %s, now %s: RNG state is not restored (it is per rank)", ckpt, saved, now)
    requested = set(sharded)
    try:
        loaded = dist_checkpointing.load(sharded, str(ckpt))
    except Exception as exc:  # noqa: BLE001 - the files passed their checksums: the model does not fit
        raise CheckpointError(f"{ckpt}: could not be loaded into this run ({type(exc).__name__}: {exc}); "
                              "check --model / --ref-load and the parallel layout") from exc
    assign_state(parts, loaded, requested)
    if restore_rng:
        set_rng_state(loaded["rng_state"])
    meta["path"] = str(ckpt)
    return meta
