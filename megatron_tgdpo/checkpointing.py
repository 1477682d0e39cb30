"""Training checkpoints: megatron-core ``dist_checkpointing`` (torch_dist), intact or not used at all.

Layout of a save directory::

    <save>/
      latest_checkpointed_iteration.txt     # tracker: the newest published iteration, written last
      iter_0000100/                         # one torch_dist checkpoint (any TP/PP can load its weights)
        tgdpo_checkpoint.json               # iteration, state, layout, parts, every file's size + CRC-32
        ...                                 # dist_checkpointing files

A checkpoint is a dict of named **parts** (:class:`CheckpointPart`: model chunks with their optimizer
and LR scheduler), so a second trained model (a PPO critic) fits without a new API. The part named
``policy`` keeps megatron's plain keys (``model``, ``optimizer``, ``opt_param_scheduler``), which is
what conversion and older checkpoints use; any other part ``p`` is stored under ``p.*`` keys.

Writing: ``iter_N.tmp`` on every rank, then per-file checksums computed in parallel (each rank hashes
its share of the files), the metadata last, one rename, the tracker. Reading: a checkpoint is used only
if its metadata is readable and every file it lists has its size and checksum (verified in parallel
across the ranks that load it); otherwise it is skipped with the reason and the next older one is
tried. See ``docs/checkpoints.md``; torch_dist files are unpickled on load: load only your own.
"""
from __future__ import annotations

import logging
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist

from megatron_tgdpo import manifest

log = logging.getLogger(__name__)

TRACKER = "latest_checkpointed_iteration.txt"
METADATA = "tgdpo_checkpoint.json"
FORMAT = "megatron_tgdpo.checkpoint"
FORMAT_VERSION = 2  # 1: file sizes only; 2: + CRC-32 per file, named parts
POLICY = "policy"
_ITER_DIR = re.compile(r"^iter_(\d{7})$")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, damaged, or does not fit the model."""


@dataclass
class CheckpointPart:
    """One trained model's state: its (possibly DDP-wrapped) chunks, optimizer and LR scheduler."""

    chunks: list
    optimizer: Any = None
    scheduler: Any = None


def iteration_dir(root: str | os.PathLike, iteration: int) -> Path:
    return Path(root) / f"iter_{iteration:07d}"


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


# ----------------------------------------------------------------------------------------------
# integrity
# ----------------------------------------------------------------------------------------------


def read_metadata(path: Path) -> dict:
    """The metadata of checkpoint directory ``path``; CheckpointError when it is unreadable."""
    try:
        meta = manifest.read_json(Path(path) / METADATA)
        if "format" in meta:  # format 1 wrote only format_version
            manifest.check_format(meta, path=Path(path) / METADATA, name=FORMAT, version=FORMAT_VERSION,
                                  remedy="not a megatron_tgdpo checkpoint")
        elif meta.get("format_version") != 1:
            raise manifest.FormatError(f"{Path(path) / METADATA}: no format and format_version "
                                       f"{meta.get('format_version')!r}")
        if not isinstance(meta.get("iteration"), int) or not isinstance(meta.get("files"), dict):
            raise manifest.FormatError(f"{Path(path) / METADATA}: lacks iteration/files")
    except manifest.FormatError as exc:
        raise CheckpointError(f"unreadable {METADATA}: {exc}") from None
    return meta


def _cheap_problem(path: Path) -> Optional[str]:
    """Why ``path`` is not a usable checkpoint judging by metadata and file sizes (no data read)."""
    if not (path / METADATA).is_file():
        return f"no {METADATA} (the save was interrupted before it was published)"
    try:
        meta = read_metadata(path)
    except CheckpointError as exc:
        return str(exc)
    found = manifest.verify_files(path, meta["files"], checksums=False)
    return found.describe(listed_in=METADATA, prefix=path) if found else None


_VERIFIED: dict[tuple[str, int], Optional[str]] = {}


def _checksum_problem(path: Path, *, collective: bool) -> Optional[str]:
    """Full verification. ``collective``: each rank checks a share of the files and the ranks exchange
    reasons (every rank must call it); otherwise this process reads every file. Remembered per
    (directory, metadata mtime)."""
    key = (str(path.resolve()), (path / METADATA).stat().st_mtime_ns)
    if key in _VERIFIED:
        return _VERIFIED[key]
    rank, world = _world() if collective else (0, 1)
    found = manifest.verify_files(path, read_metadata(path)["files"], checksums=True, share=(rank, world))
    mine = found.describe(listed_in=METADATA, prefix=path) if found else None
    if world > 1:
        reasons: list[Optional[str]] = [None] * world
        dist.all_gather_object(reasons, mine)
        mine = next((r for r in reasons if r), None)
    _VERIFIED[key] = mine
    return mine


# How much of a checkpoint is checked before it is used:
#   "sizes"      metadata readable, every listed file present with its size (no data read; any rank alone)
#   "checksums"  + every file's checksum, read by this process alone (tools)
#   "collective" + every file's checksum, shared among all ranks (every rank must call; loads)
VERIFY_LEVELS = ("sizes", "checksums", "collective")


def problem(path: Path, *, verify: str = "sizes") -> Optional[str]:
    """Why checkpoint directory ``path`` cannot be used, or None (see ``VERIFY_LEVELS``)."""
    if verify not in VERIFY_LEVELS:
        raise ValueError(f"verify must be one of {VERIFY_LEVELS}, got {verify!r}")
    reason = _cheap_problem(path)
    if reason is None and verify != "sizes":
        reason = _checksum_problem(path, collective=verify == "collective")
    return reason


def is_iteration_dir(path: str | os.PathLike) -> bool:
    """``path`` names one checkpoint (``iter_XXXXXXX``) rather than a save root."""
    return bool(_ITER_DIR.match(Path(os.path.normpath(path)).name)) and Path(path).is_dir()


def iteration_dirs(root: str | os.PathLike) -> list[tuple[int, Path]]:
    """``(iteration, path)`` of every ``iter_*`` directory under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted((int(m.group(1)), root / name) for name in os.listdir(root) if (m := _ITER_DIR.match(name)))


def find_latest(root: str | os.PathLike, *, verify: str = "sizes") -> Optional[Path]:
    """Newest usable checkpoint under ``root`` (None if there is none); warns for each one skipped."""
    root = Path(root)
    tracked = None
    if (root / TRACKER).is_file():
        text = (root / TRACKER).read_bytes().decode("utf-8", "replace").strip()
        tracked = int(text) if text.isdigit() else None
    found = iteration_dirs(root)
    first = found[0][0] if found else 0
    for iteration, path in reversed(found):
        reason = problem(path, verify=verify)
        if reason is None:
            if tracked is not None and iteration != tracked and _world()[0] == 0:
                log.warning("%s names iteration %s but the newest intact checkpoint is %s; using it",
                            root / TRACKER, tracked, path.name)
            return path
        if _world()[0] == 0:
            log.warning("skipping %s: %s; %s", path, reason,
                        "trying the next older one" if iteration > first else "no older checkpoint")
    return None


def resolve(path: str | os.PathLike, *, verify: str = "sizes") -> Path:
    """A checkpoint root (its newest usable iteration) or one ``iter_*`` directory (exactly that one)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint directory; check --load / --ref-load / --guidance-load")
    if path.is_file():
        raise CheckpointError(f"{path}: is a file, not a checkpoint directory")
    if _ITER_DIR.match(path.name):
        reason = problem(path, verify=verify)
        if reason:
            raise CheckpointError(f"{path}: cannot be used: {reason}; pick another iteration, or the save root "
                                  "to use the newest intact one")
        return path
    latest = find_latest(path, verify=verify)
    if latest is None:
        found = iteration_dirs(path)
        if found:
            raise CheckpointError(f"{path}: none of its {len(found)} checkpoints is intact (reasons above); "
                                  "nothing was loaded and nothing was deleted")
        raise CheckpointError(f"{path}: contains no checkpoint (iter_XXXXXXX directories with {METADATA})")
    return latest


def current_layout() -> dict:
    """The parallel layout that decides whether optimizer and RNG state can be restored as saved."""
    from megatron.core import parallel_state as ps

    return {
        "world_size": _world()[1],
        "tensor_model_parallel_size": ps.get_tensor_model_parallel_world_size(),
        "pipeline_model_parallel_size": ps.get_pipeline_model_parallel_world_size(),
        "virtual_pipeline_model_parallel_size": ps.get_virtual_pipeline_model_parallel_world_size(),
        "context_parallel_size": ps.get_context_parallel_world_size(),
        "data_parallel_size": ps.get_data_parallel_world_size(),
    }


# ----------------------------------------------------------------------------------------------
# sharded state dicts
# ----------------------------------------------------------------------------------------------


def _keys(name: str) -> tuple[str, str]:
    """(dict prefix, sharded-tensor key prefix) of a part: none for the policy (megatron's plain keys)."""
    return ("", "") if name == POLICY else (f"{name}.", f"{name}.")


def _model_state(name: str, chunks: list) -> dict:
    from megatron_tgdpo.models.state_dict import unwrap

    dict_prefix, key_prefix = _keys(name)
    if len(chunks) == 1:
        return {f"{dict_prefix}model": unwrap(chunks[0]).sharded_state_dict(prefix=key_prefix)}
    return {f"{dict_prefix}model{i}": unwrap(c).sharded_state_dict(prefix=key_prefix) for i, c in enumerate(chunks)}


def _sharded_state(parts: dict[str, CheckpointPart], *, is_loading: bool, optimizer: bool) -> dict:
    from megatron_tgdpo import compat

    sharded: dict = {}
    for name, part in parts.items():
        dict_prefix, _ = _keys(name)
        models = _model_state(name, part.chunks)
        sharded.update(models)
        if optimizer and part.optimizer is not None:
            state = compat.optimizer_sharded_state_dict(part.optimizer, models, is_loading=is_loading)
            if name != POLICY:
                # The distributed optimizer names its objects "optimizer.distributed.dp_group_idx_*"
                # whatever the model: a second part's would collide with the policy's.
                from megatron.core.dist_checkpointing.utils import add_prefix_for_sharding

                add_prefix_for_sharding(state, f"{name}.")
            sharded[f"{dict_prefix}optimizer"] = state
        if part.scheduler is not None:
            sharded[f"{dict_prefix}opt_param_scheduler"] = part.scheduler.state_dict()
    return sharded


def _assign(parts: dict[str, CheckpointPart], loaded: dict, requested: set) -> None:
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


def _per_rank_object(key: str, obj: Any):
    """A ShardedObject holding ``obj`` for this global rank (one entry per rank in the checkpoint)."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    rank, world = _world()
    return ShardedObject(key, obj, (world,), (rank,), replica_id=0)


# ----------------------------------------------------------------------------------------------
# save
# ----------------------------------------------------------------------------------------------


def _all_reduce_max(value: float) -> float:
    if _world()[1] == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.float64,
                          device="cuda" if torch.cuda.is_available() else "cpu")
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return float(tensor.item())


def _all_reduce_sum(value: float) -> float:
    if _world()[1] == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.float64,
                          device="cuda" if torch.cuda.is_available() else "cpu")
    dist.all_reduce(tensor)
    return float(tensor.item())


def _all_finite(parts: dict[str, CheckpointPart]) -> bool:
    bad = 0.0
    for part in parts.values():
        for chunk in part.chunks:
            for param in chunk.parameters():
                if not torch.isfinite(param.detach()).all():
                    bad = 1.0
                    break
    return _all_reduce_max(bad) == 0.0


def _bytes_to_write(sharded: dict) -> int:
    """Bytes of the tensors this rank writes (main replicas only): the size check before saving."""
    from megatron.core.dist_checkpointing.mapping import is_main_replica

    total, stack = 0, [sharded]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
        elif hasattr(item, "replica_id") and isinstance(getattr(item, "data", None), torch.Tensor):
            if is_main_replica(item.replica_id):
                total += item.data.numel() * item.data.element_size()
    return total


def _free_bytes(path: Path) -> int:
    return shutil.disk_usage(path).free


def _size(nbytes: float) -> str:
    return f"{nbytes / 2**30:.2f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.1f} MiB"


def _from_rank0(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (a decision only rank 0 can take, such as the space check)."""
    if _world()[1] == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _describe_in_parallel(directory: Path) -> dict:
    rank, world = _world()
    names = sorted(f.name for f in directory.iterdir() if f.is_file())
    mine = manifest.describe_files(directory, names[rank::world])
    if world > 1:
        shares: list[dict] = [{} for _ in range(world)]
        dist.all_gather_object(shares, mine)
        mine = {k: v for share in shares for k, v in share.items()}
    return mine


def save_checkpoint(
    root: str | os.PathLike,
    *,
    iteration: int,
    parts: dict[str, CheckpointPart],
    state: Optional[dict] = None,
    keep_last: Optional[int] = None,
) -> Path:
    """Write ``root/iter_<iteration>`` on all ranks and publish it; returns the published path.

    Refuses (CheckpointError, nothing written) when any weight is NaN/Inf or the file system lacks the
    space; a failed write removes the partial directory and says how much space was left."""
    from megatron.core import dist_checkpointing

    root = Path(root)
    rank, _ = _world()
    final = iteration_dir(root, iteration)
    tmp = final.with_name(final.name + ".tmp")
    if not _all_finite(parts):
        raise CheckpointError(f"refusing to save {final}: the model holds NaN/Inf weights; the previous "
                              "checkpoint is kept")
    sharded = _sharded_state(parts, is_loading=False, optimizer=True)
    # Per-rank state (RNG) is kept per rank: a resumed run at the same layout continues bit-exactly.
    sharded["rng_state"] = _per_rank_object("rng_state", rng_state())
    need = _all_reduce_sum(float(_bytes_to_write(sharded)))
    short = None
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        free = _free_bytes(root)
        if need * 1.05 > free:
            short = (f"not enough space to save {final}: it needs about {_size(need)}, the file system has "
                     f"{_size(free)} free; free space or point --save elsewhere (the previous checkpoint is kept)")
        else:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir()
    short = _from_rank0(short)  # every rank raises the same message
    if short:
        raise CheckpointError(short)

    try:
        dist_checkpointing.save(sharded, str(tmp))
        if _world()[1] > 1:
            dist.barrier()
        files = _describe_in_parallel(tmp)
    except Exception as exc:  # noqa: BLE001 - reported with the disk state, partial output removed
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        free = _free_bytes(root)
        hint = (f"; the file system has only {free / 2**20:.1f} MiB free: no space left on device?"
                if free < max(need, 64 * 2**20) else "")
        raise CheckpointError(f"saving {final} failed ({type(exc).__name__}: {exc}){hint}; the partial "
                              "directory was removed and the previous checkpoint is kept") from exc

    if rank == 0:
        meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "iteration": iteration,
                "layout": current_layout(), "parts": sorted(parts), **(state or {}), "files": files}
        manifest.write_json_atomic(tmp / METADATA, meta)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _write_tracker(root, iteration)
        if keep_last:
            _prune(root, keep_last, newest=iteration)
    if _world()[1] > 1:
        dist.barrier()
    return final


def _write_tracker(root: Path, iteration: int) -> None:
    part = root / f"{TRACKER}.{os.uname().nodename}.{os.getpid()}.part"
    with open(part, "w") as fh:
        fh.write(str(iteration))
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(part, root / TRACKER)
    # Temporary trackers of jobs killed while writing theirs (this job holds the --save lock: no other
    # writer is at work).
    for stale in root.glob(f"{TRACKER}.*.part"):
        stale.unlink(missing_ok=True)


_DELETING = ".deleting"


def _prune(root: Path, keep_last: int, *, newest: int) -> None:
    """Keep the ``keep_last`` newest intact checkpoints up to ``newest`` (the one just written).

    Checkpoints after ``newest`` (left by a run whose later saves could not be read) and damaged ones
    are never touched: nothing is deleted because something else could not be read. A checkpoint is
    renamed to ``iter_*.deleting`` before it is removed, so a job killed while deleting leaves no
    half-deleted ``iter_*`` (which would then count as damaged and never be pruned); the next prune
    finishes the removal."""
    for leftover in root.glob(f"iter_*{_DELETING}"):
        shutil.rmtree(leftover, ignore_errors=True)
    done = [path for it, path in iteration_dirs(root) if it <= newest and _cheap_problem(path) is None]
    for old in done[:-keep_last]:
        trash = old.with_name(old.name + _DELETING)
        try:
            os.replace(old, trash)
        except OSError as exc:  # pruning must never fail the save that was just published
            log.warning("could not remove the old checkpoint %s (%s); it stays", old, exc)
            continue
        shutil.rmtree(trash, ignore_errors=True)


# ----------------------------------------------------------------------------------------------
# load
# ----------------------------------------------------------------------------------------------


def load_model_weights(path: str | os.PathLike, chunks: list[torch.nn.Module], *, part: str = POLICY) -> Path:
    """Fill ``chunks`` with part ``part``'s weights of a torch_dist checkpoint (root or ``iter_*``),
    at any TP/PP layout (resharding as needed). Collective: every rank that holds a chunk calls it."""
    from megatron.core import dist_checkpointing

    ckpt = resolve(path, verify="collective")
    sharded = _model_state(part, chunks)
    requested = set(sharded)
    try:
        loaded = dist_checkpointing.load(sharded, str(ckpt))
    except Exception as exc:  # noqa: BLE001 - re-raised with the path and what to check
        raise CheckpointError(f"{ckpt}: could not load model weights into this model ({exc}); "
                              "check that --model/preset and vocab size match the checkpoint") from exc
    _assign({part: CheckpointPart(chunks)}, loaded, requested)
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
    sharded = _sharded_state(parts, is_loading=True, optimizer=load_optimizer)
    restore_rng = load_rng and saved == now
    if restore_rng:
        sharded["rng_state"] = _per_rank_object("rng_state", None)
    elif load_rng and _world()[0] == 0:
        log.warning("%s: saved at layout %s, now %s: RNG state is not restored (it is per rank)", ckpt, saved, now)
    requested = set(sharded)
    try:
        loaded = dist_checkpointing.load(sharded, str(ckpt))
    except Exception as exc:  # noqa: BLE001 - the files passed their checksums: the model does not fit
        raise CheckpointError(f"{ckpt}: could not be loaded into this run ({type(exc).__name__}: {exc}); "
                              "check --model / --ref-load and the parallel layout") from exc
    _assign(parts, loaded, requested)
    if restore_rng:
        set_rng_state(loaded["rng_state"])
    meta["path"] = str(ckpt)
    return meta

