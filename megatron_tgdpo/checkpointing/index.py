"""What is on disk: the checkpoint types and names, reading a checkpoint's metadata, checking it,
and finding the newest usable one."""
from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch.distributed as dist

from megatron_tgdpo import integrity, safe_pickle
from megatron_tgdpo.checkpointing.contents import contents_problem

log = logging.getLogger(__name__)

TRACKER = "latest_checkpointed_iteration.txt"
METADATA = "tgdpo_checkpoint.json"
FORMAT = "megatron_tgdpo.checkpoint"
# 1: file sizes only; 2: + CRC-32 per file, named parts; 3: + the manifest's own digest and a copy of
# the data position inside the checkpoint's state (common.pt). Versions 1-2 are still read (see
# docs/checkpoints.md, Integrity): their manifest cannot be checked against itself.
FORMAT_VERSION = 3
SEALED_SINCE = 3
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


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1



# ----------------------------------------------------------------------------------------------
# integrity
# ----------------------------------------------------------------------------------------------


def read_metadata(path: Path) -> dict:
    """The metadata of checkpoint directory ``path``; CheckpointError when it is unreadable."""
    try:
        meta = integrity.read_json(Path(path) / METADATA)
        if "format" in meta:  # format 1 wrote only format_version
            integrity.check_format(meta, path=Path(path) / METADATA, name=FORMAT, version=FORMAT_VERSION,
                                  remedy="not a megatron_tgdpo checkpoint")
        elif meta.get("format_version") != 1:
            raise integrity.FormatError(f"{Path(path) / METADATA}: no format and format_version "
                                       f"{meta.get('format_version')!r}")
        if not isinstance(meta.get("iteration"), int) or not isinstance(meta.get("files"), dict):
            raise integrity.FormatError(f"{Path(path) / METADATA}: lacks iteration/files")
    except integrity.FormatError as exc:
        raise CheckpointError(f"unreadable {METADATA}: {exc}") from None
    return meta


def cheap_problem(path: Path) -> Optional[str]:
    """Why ``path`` is not a usable checkpoint judging by metadata and file sizes (no data read)."""
    if not (path / METADATA).is_file():
        return f"no {METADATA} (the save was interrupted before it was published)"
    try:
        meta = read_metadata(path)
    except CheckpointError as exc:
        return str(exc)
    reason = _manifest_problem(path, meta)
    if reason:
        return reason
    found = integrity.verify_files(path, meta["files"], checksums=False)
    return found.describe(listed_in=METADATA, prefix=path) if found else None


def _manifest_problem(path: Path, meta: dict) -> Optional[str]:
    """The manifest checked against itself (its digest), the directory's name and the directory's files."""
    if meta.get("format_version", 1) >= SEALED_SINCE:
        reason = integrity.seal_problem(meta, path=path / METADATA)
        if reason:
            return reason
    named = _ITER_DIR.match(path.name)
    if named and int(named.group(1)) != meta["iteration"]:
        return (f"{path / METADATA} says iteration {meta['iteration']}, the directory is {path.name}: "
                "the manifest was edited or belongs elsewhere")
    # Every file must be listed (so verified); a list without the torch_dist files is caught before a load
    # (contents.REQUIRED_FILES), while a metadata-only directory still tells its origin.
    unlisted = integrity.unlisted_files(path, meta["files"], ignore=(METADATA,))
    if unlisted:
        shown = ", ".join(unlisted[:3]) + (f" and {len(unlisted) - 3} more" if len(unlisted) > 3 else "")
        if not meta["files"]:
            return f"{path / METADATA} lists no files, though the directory holds {shown}: nothing could be verified"
        return f"{path}: holds files {METADATA} does not list ({shown}): the manifest was edited or the directory changed"
    return None


_VERIFIED: dict[tuple[str, int, bool], Optional[str]] = {}


def _checksum_problem(path: Path, *, collective: bool) -> Optional[str]:
    """Full verification. ``collective``: each rank checks a share of the files and the ranks exchange
    reasons (every rank must call it); otherwise this process reads every file. Remembered per
    (directory, metadata mtime)."""
    key = (str(path.resolve()), (path / METADATA).stat().st_mtime_ns, safe_pickle.trusted())
    if key in _VERIFIED:
        return _VERIFIED[key]
    rank, world = rank_and_world() if collective else (0, 1)
    meta = read_metadata(path)
    found = integrity.verify_files(path, meta["files"], checksums=True, share=(rank, world))
    mine = found.describe(listed_in=METADATA, prefix=path) if found else None
    if mine is None:  # the files are the listed ones: do they load, without running code?
        mine = contents_problem(path, meta, share=(rank, world))
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
    reason = cheap_problem(path)
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
            if tracked is not None and iteration != tracked and rank_and_world()[0] == 0:
                log.warning("%s names iteration %s but the newest intact checkpoint is %s; using it",
                            root / TRACKER, tracked, path.name)
            return path
        _warn_once(f"skipping {path}: {reason}; "
                   f"{'trying the next older one' if iteration > first else 'no older checkpoint'}")
    return None


_WARNED: set[str] = set()


def _warn_once(message: str) -> None:
    """Rank 0 warns, once per process: a run resolves the same checkpoint for several purposes."""
    if rank_and_world()[0] == 0 and message not in _WARNED:
        _WARNED.add(message)
        log.warning("%s", message)


def _note_format(path: Path) -> Path:
    """Say once that a checkpoint of an earlier format is used with fewer checks (see FORMAT_VERSION)."""
    version = read_metadata(path).get("format_version", 1)
    if version < SEALED_SINCE:
        _warn_once(f"{path}: written by an earlier megatron_tgdpo (format_version {version}): its "
                   f"{METADATA} carries no digest of its own, so edits to it (consumed_samples, config) "
                   "cannot be detected; checkpoints saved from now on carry one")
    return path


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
        return _note_format(path)
    latest = find_latest(path, verify=verify)
    if latest is None:
        found = iteration_dirs(path)
        if found:
            raise CheckpointError(f"{path}: none of its {len(found)} checkpoints is intact (reasons above); "
                                  "nothing was loaded and nothing was deleted")
        raise CheckpointError(f"{path}: contains no checkpoint (iter_XXXXXXX directories with {METADATA})")
    return _note_format(latest)


def current_layout() -> dict:
    """The parallel layout that decides whether optimizer and RNG state can be restored as saved."""
    from megatron.core import parallel_state as ps

    return {
        "world_size": rank_and_world()[1],
        "tensor_model_parallel_size": ps.get_tensor_model_parallel_world_size(),
        "pipeline_model_parallel_size": ps.get_pipeline_model_parallel_world_size(),
        "virtual_pipeline_model_parallel_size": ps.get_virtual_pipeline_model_parallel_world_size(),
        "context_parallel_size": ps.get_context_parallel_world_size(),
        "data_parallel_size": ps.get_data_parallel_world_size(),
    }
