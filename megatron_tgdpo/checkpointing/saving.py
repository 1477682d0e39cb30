"""Writing a checkpoint: guards (finite state, free disk), the staged write, per-file checksums in
parallel, the metadata, one rename, the tracker, pruning."""
from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

from megatron_tgdpo import integrity
from megatron_tgdpo.checkpointing.contents import PROGRESS, progress_state
from megatron_tgdpo.checkpointing.index import (
    FORMAT,
    FORMAT_VERSION,
    METADATA,
    TRACKER,
    CheckpointError,
    CheckpointPart,
    cheap_problem,
    rank_and_world,
    current_layout,
    iteration_dir,
    iteration_dirs,
)
from megatron_tgdpo.checkpointing.state import (
    per_rank_object,
    sharded_state,
    rng_state,
)

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------
# save
# ----------------------------------------------------------------------------------------------


def _all_reduce_max(value: float) -> float:
    if rank_and_world()[1] == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.float64,
                          device="cuda" if torch.cuda.is_available() else "cpu")
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return float(tensor.item())


def _all_reduce_sum(value: float) -> float:
    if rank_and_world()[1] == 1:
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
    if rank_and_world()[1] == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _describe_in_parallel(directory: Path) -> dict:
    rank, world = rank_and_world()
    names = sorted(f.name for f in directory.iterdir() if f.is_file())
    mine = integrity.describe_files(directory, names[rank::world])
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
    rank, _ = rank_and_world()
    final = iteration_dir(root, iteration)
    tmp = final.with_name(final.name + ".tmp")
    if not _all_finite(parts):
        raise CheckpointError(f"refusing to save {final}: the model holds NaN/Inf weights; the previous "
                              "checkpoint is kept")
    sharded = sharded_state(parts, is_loading=False, optimizer=True)
    # Per-rank state (RNG) is kept per rank: a resumed run at the same layout continues bit-exactly.
    sharded["rng_state"] = per_rank_object("rng_state", rng_state())
    # A second record of the data position, written with the tensors: the manifest is checked against it.
    sharded[PROGRESS] = progress_state(iteration=iteration, consumed_samples=(state or {}).get("consumed_samples"))
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
        if rank_and_world()[1] > 1:
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
        integrity.write_json_atomic(tmp / METADATA, integrity.seal(meta))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _write_tracker(root, iteration)
        if keep_last:
            _prune(root, keep_last, newest=iteration)
    if rank_and_world()[1] > 1:
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
    done = [path for it, path in iteration_dirs(root) if it <= newest and cheap_problem(path) is None]
    for old in done[:-keep_last]:
        trash = old.with_name(old.name + _DELETING)
        try:
            os.replace(old, trash)
        except OSError as exc:  # pruning must never fail the save that was just published
            log.warning("could not remove the old checkpoint %s (%s); it stays", old, exc)
            continue
        shutil.rmtree(trash, ignore_errors=True)
