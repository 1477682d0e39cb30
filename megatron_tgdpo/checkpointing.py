"""Checkpoints: megatron-core ``dist_checkpointing`` (torch_dist), published atomically.

Layout of a save directory::

    <save>/
      latest_checkpointed_iteration.txt     # tracker: the newest *complete* iteration, written last
      iter_0000100/                         # one torch_dist checkpoint (any TP/PP can load it)
        tgdpo_checkpoint.json               # iteration, consumed samples, config; marks it complete
        ...                                 # dist_checkpointing files (model, optimizer, scheduler)

A checkpoint is written to ``iter_0000100.tmp`` and renamed only after every rank finished and the
metadata is on disk; the tracker is replaced after that. A directory without ``tgdpo_checkpoint.json``
(killed mid-write, truncated copy) is never loaded: loading falls back to the newest complete one and
says so.
"""
from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

TRACKER = "latest_checkpointed_iteration.txt"
METADATA = "tgdpo_checkpoint.json"
FORMAT_VERSION = 1
_ITER_DIR = re.compile(r"^iter_(\d{7})$")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or does not fit the model."""


def iteration_dir(root: str | os.PathLike, iteration: int) -> Path:
    return Path(root) / f"iter_{iteration:07d}"


def incomplete_reason(path: Path) -> Optional[str]:
    """Why ``path`` is not a complete checkpoint, or None when it is.

    Complete means: our metadata (written after every rank finished) is there, and every file it
    lists has the size recorded at publish time, so a copy truncated later is caught too."""
    if not (path / METADATA).is_file():
        return f"no {METADATA} (the save was interrupted before it was published)"
    try:
        meta = json.loads((path / METADATA).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        return f"unreadable {METADATA} ({exc})"
    for name, size in meta.get("files", {}).items():
        f = path / name
        if not f.is_file():
            return f"missing file {name}"
        if f.stat().st_size != size:
            return f"file {name} has {f.stat().st_size} bytes, {size} were written (truncated copy?)"
    return None


def is_complete(path: Path) -> bool:
    return incomplete_reason(path) is None


def read_metadata(path: Path) -> dict:
    try:
        return json.loads((path / METADATA).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: unreadable {METADATA} ({exc}); the checkpoint is incomplete") from exc


def _rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def find_latest(root: str | os.PathLike) -> Optional[Path]:
    """Newest complete checkpoint under ``root`` (None if there is none); warns when it had to skip."""
    root = Path(root)
    if not root.is_dir():
        return None
    candidates = sorted(
        (int(m.group(1)), root / name) for name in os.listdir(root) if (m := _ITER_DIR.match(name))
    )
    tracked = None
    if (root / TRACKER).is_file():
        text = (root / TRACKER).read_text().strip()
        tracked = int(text) if text.isdigit() else None
    for iteration, path in reversed(candidates):
        if is_complete(path):
            if tracked is not None and iteration != tracked:
                log.warning("%s names iteration %s but the newest complete checkpoint is %s; using it",
                            root / TRACKER, tracked, path.name)
            return path
        log.warning("skipping %s: incomplete checkpoint: %s; falling back to an older one",
                    path, incomplete_reason(path))
    return None


def resolve(path: str | os.PathLike) -> Path:
    """A checkpoint root (uses its newest complete iteration) or one ``iter_*`` directory."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint directory; check --load / --ref-load / --guidance-load")
    if _ITER_DIR.match(path.name):
        if not is_complete(path):
            raise CheckpointError(f"{path}: incomplete checkpoint ({incomplete_reason(path)}); "
                                  "pick another iteration or the save root to use the newest complete one")
        return path
    latest = find_latest(path)
    if latest is None:
        raise CheckpointError(f"{path}: contains no complete checkpoint (iter_XXXXXXX with {METADATA})")
    return latest


def current_layout() -> dict:
    """The parallel layout that decides whether optimizer and RNG state can be restored as saved."""
    from megatron.core import parallel_state as ps

    return {
        "world_size": dist.get_world_size() if dist.is_initialized() else 1,
        "tensor_model_parallel_size": ps.get_tensor_model_parallel_world_size(),
        "pipeline_model_parallel_size": ps.get_pipeline_model_parallel_world_size(),
        "virtual_pipeline_model_parallel_size": ps.get_virtual_pipeline_model_parallel_world_size(),
        "context_parallel_size": ps.get_context_parallel_world_size(),
        "data_parallel_size": ps.get_data_parallel_world_size(),
    }


# ----------------------------------------------------------------------------------------------
# sharded state dicts
# ----------------------------------------------------------------------------------------------


def model_sharded_state_dict(chunks: list[torch.nn.Module]) -> dict:
    """megatron-core sharded state dict of the model chunks (unwrapping DDP)."""
    from megatron_tgdpo.models.state_dict import unwrap

    if len(chunks) == 1:
        return {"model": unwrap(chunks[0]).sharded_state_dict()}
    return {f"model{i}": unwrap(c).sharded_state_dict() for i, c in enumerate(chunks)}


def rng_state() -> dict:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": _tracker_states(),
    }


def _tracker_states() -> dict:
    from megatron.core import tensor_parallel

    return tensor_parallel.get_cuda_rng_tracker().get_states()


def set_rng_state(state: dict) -> None:
    from megatron.core import tensor_parallel

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


# ----------------------------------------------------------------------------------------------
# save
# ----------------------------------------------------------------------------------------------


def save_checkpoint(
    root: str | os.PathLike,
    *,
    iteration: int,
    chunks: list[torch.nn.Module],
    optimizer=None,
    scheduler=None,
    state: Optional[dict] = None,
    keep_last: Optional[int] = None,
) -> Path:
    """Write ``root/iter_<iteration>`` atomically on all ranks; returns the published path."""
    from megatron.core import dist_checkpointing

    root = Path(root)
    final = iteration_dir(root, iteration)
    tmp = final.with_name(final.name + ".tmp")
    if _rank0():
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    _barrier()

    sharded = model_sharded_state_dict(chunks)
    if optimizer is not None:
        from megatron_tgdpo import compat

        sharded["optimizer"] = compat.optimizer_sharded_state_dict(optimizer, sharded, is_loading=False)
    if scheduler is not None:
        sharded["opt_param_scheduler"] = scheduler.state_dict()
    # Per-rank state (RNG) is kept per rank: a resumed run at the same layout continues bit-exactly.
    sharded["rng_state"] = _per_rank_object("rng_state", rng_state())
    dist_checkpointing.save(sharded, str(tmp))
    _barrier()

    if _rank0():
        files = {f.name: f.stat().st_size for f in sorted(tmp.iterdir()) if f.is_file()}
        meta = {"format_version": FORMAT_VERSION, "iteration": iteration, "layout": current_layout(),
                **(state or {}), "files": files}
        _write_atomic(tmp / METADATA, json.dumps(meta, indent=2, default=str))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _write_atomic(root / TRACKER, str(iteration))
        if keep_last:
            _prune(root, keep_last)
    _barrier()
    return final


def _write_atomic(path: Path, text: str) -> None:
    part = path.with_name(path.name + ".part")
    with open(part, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(part, path)


def _prune(root: Path, keep_last: int) -> None:
    done = sorted(p for p in root.iterdir() if _ITER_DIR.match(p.name) and is_complete(p))
    for old in done[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def _per_rank_object(key: str, obj: Any):
    """A ShardedObject holding ``obj`` for this global rank (one entry per rank in the checkpoint)."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    return ShardedObject(key, obj, (world,), (rank,), replica_id=0)


# ----------------------------------------------------------------------------------------------
# load
# ----------------------------------------------------------------------------------------------


def load_model_weights(path: str | os.PathLike, chunks: list[torch.nn.Module]) -> Path:
    """Fill ``chunks`` from a checkpoint at any TP/PP layout (resharding as needed).

    ``path`` may be a save root, an ``iter_*`` directory, a Hugging Face model directory or a
    converted checkpoint (see :mod:`megatron_tgdpo.convert`)."""
    from megatron_tgdpo import convert

    src = Path(path)
    if convert.is_hf_directory(src) or convert.is_converted_directory(src):
        convert.load_into_model(src, chunks)
        return src
    ckpt = resolve(src)
    from megatron.core import dist_checkpointing

    sharded = model_sharded_state_dict(chunks)
    try:
        loaded = dist_checkpointing.load(sharded, str(ckpt))
    except Exception as exc:  # noqa: BLE001 - re-raised with the path and what to check
        raise CheckpointError(f"{ckpt}: could not load model weights into this model ({exc}); "
                              "check that --model/preset and vocab size match the checkpoint") from exc
    _assign_model(chunks, loaded)
    return ckpt


def checkpoint_arch(path: str | os.PathLike):
    """The ``LlamaArch`` a checkpoint records (HF, converted, or ours), or None if it records none."""
    from megatron_tgdpo import convert
    from megatron_tgdpo.models.llama import LlamaArch

    src = Path(path)
    if convert.is_hf_directory(src) or convert.is_converted_directory(src):
        return convert.checkpoint_arch(src)
    arch = read_metadata(resolve(src)).get("arch")
    return LlamaArch(**arch) if arch else None


def _assign_model(chunks: list[torch.nn.Module], loaded: dict) -> None:
    from megatron_tgdpo.models.state_dict import unwrap

    for i, chunk in enumerate(chunks):
        key = "model" if len(chunks) == 1 else f"model{i}"
        unwrap(chunk).load_state_dict(loaded[key], strict=False)


def load_checkpoint(
    root: str | os.PathLike,
    *,
    chunks: list[torch.nn.Module],
    optimizer=None,
    scheduler=None,
    load_optimizer: bool = True,
    load_rng: bool = True,
) -> Optional[dict]:
    """Resume from the newest complete checkpoint under ``root``; None if there is none yet.

    Model weights reshard to any TP/PP/CP/DP layout. Optimizer state reshards across DP sizes only
    (see ``compat.OPTIMIZER_SHARDING``): a TP/PP change raises with what to do. RNG state is restored
    only at the same world size and layout (it is per rank)."""
    from megatron.core import dist_checkpointing

    ckpt = find_latest(root)
    if ckpt is None:
        return None
    meta = read_metadata(ckpt)
    saved, now = meta.get("layout", {}), current_layout()
    model_axes = ("tensor_model_parallel_size", "pipeline_model_parallel_size", "virtual_pipeline_model_parallel_size")
    changed = [f"{k.replace('_', '-')} {saved.get(k)} -> {now[k]}" for k in model_axes if saved.get(k) != now[k]]
    if optimizer is not None and load_optimizer and changed:
        raise CheckpointError(
            f"{ckpt}: optimizer state was saved at a different layout ({', '.join(changed)}) and cannot be "
            "resharded across tensor/pipeline parallelism; pass --no-load-optim to load the model weights "
            "(resharded) with a fresh optimizer, or resume at the saved layout"
        )
    sharded = model_sharded_state_dict(chunks)
    if optimizer is not None and load_optimizer:
        from megatron_tgdpo import compat

        sharded["optimizer"] = compat.optimizer_sharded_state_dict(optimizer, sharded, is_loading=True)
    restore_rng = load_rng and saved == now
    if restore_rng:
        sharded["rng_state"] = _per_rank_object("rng_state", None)
    elif load_rng:
        log.warning("%s: saved at layout %s, now %s: RNG state is not restored (it is per rank)", ckpt, saved, now)
    loaded = dist_checkpointing.load(sharded, str(ckpt))
    _assign_model(chunks, loaded)
    if "optimizer" in sharded:
        from megatron_tgdpo import compat

        compat.load_optimizer_state(optimizer, loaded["optimizer"])
    if scheduler is not None and "opt_param_scheduler" in loaded:
        scheduler.load_state_dict(loaded["opt_param_scheduler"])
    if restore_rng:
        set_rng_state(loaded["rng_state"])
    meta["path"] = str(ckpt)
    return meta
