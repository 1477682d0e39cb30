"""What the files of a torch_dist checkpoint hold, checked before megatron-core reads them.

Checksums say the files are the ones the manifest lists; they cannot say the checkpoint loads (a
truncated shard whose manifest entry was rewritten passes them) or that reading it runs no code. So,
before a load:

* ``.metadata`` is read through :func:`megatron_tgdpo.safe_pickle.load_pickle` (an allow-list of DCP
  metadata classes); a garbled one is damage, a crafted one is refused;
* every stored item lies inside a listed file (offset + length within the file's size);
* every pickled byte item (RNG state, optimizer groups, extra state) and ``common.pt`` unpickles
  through :func:`megatron_tgdpo.safe_pickle.torch_load`;
* the progress the checkpoint's own state records (``common.pt``: iteration and consumed samples,
  written with the tensors) equals its manifest's.

megatron-core then reads exactly these bytes (the files are checksummed in the same pass). Ranks
share the work: ``share=(i, n)`` reads the byte items of every n-th listed file; every rank reads
``.metadata`` (each will unpickle it in the load) and the first also ``common.pt``.
"""
from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any, Mapping, Optional

from megatron_tgdpo import safe_pickle

DCP_METADATA = ".metadata"
COMMON = "common.pt"
REQUIRED_FILES = (DCP_METADATA, COMMON)
# The second copy of the data position, inside the checkpoint's own state (common.pt).
PROGRESS = "tgdpo_progress"


class ContentsProblem(ValueError):
    """A checkpoint whose files pass their checksums but cannot be loaded as they are."""


def progress_state(*, iteration: int, consumed_samples: Optional[int]) -> dict:
    """What a checkpoint stores under ``PROGRESS`` next to its tensors."""
    return {"iteration": int(iteration), "consumed_samples": consumed_samples}


def read_dcp_metadata(path: Path) -> Any:
    """``path/.metadata`` through the restricted unpickler (UnreadablePickleError otherwise)."""
    file = Path(path) / DCP_METADATA
    with open(file, "rb") as handle:
        return safe_pickle.load_pickle(handle, source=str(file))


def _check_storage(path: Path, metadata: Any, files: Mapping[str, Any], *, share: tuple[int, int]) -> None:
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    storage = getattr(metadata, "storage_data", None)
    described = getattr(metadata, "state_dict_metadata", None)
    if not isinstance(storage, dict) or not isinstance(described, dict):
        raise ContentsProblem(f"{path / DCP_METADATA}: holds no storage index (not torch_dist metadata)")
    byte_keys = {key for key, md in described.items() if isinstance(md, BytesStorageMetadata)}
    names = sorted(files)
    mine = set(names[share[0]::share[1]])
    sizes: dict[str, int] = {}
    pickled: dict[str, list] = {}
    for index, info in storage.items():
        name = getattr(info, "relative_path", None)
        if not isinstance(name, str) or name not in files or os.sep in name:
            raise ContentsProblem(f"{path / DCP_METADATA}: places {getattr(index, 'fqn', index)} in {name!r}, "
                                  "which the manifest does not list")
        if name not in sizes:
            sizes[name] = (path / name).stat().st_size
        offset, length = getattr(info, "offset", None), getattr(info, "length", None)
        if not (isinstance(offset, int) and isinstance(length, int) and offset >= 0 and length >= 0):
            raise ContentsProblem(f"{path / DCP_METADATA}: malformed location for {getattr(index, 'fqn', index)}")
        if offset + length > sizes[name]:
            raise ContentsProblem(f"{path / name}: {sizes[name]} bytes, but {DCP_METADATA} places data up to byte "
                                  f"{offset + length}: the file was cut short")
        if getattr(index, "fqn", None) in byte_keys and name in mine:
            pickled.setdefault(name, []).append((offset, length, info, index.fqn))
    for name, items in pickled.items():
        with open(path / name, "rb") as handle:
            for offset, length, info, fqn in sorted(items, key=lambda item: item[0]):
                source = f"{path / name} (item {fqn})"
                if getattr(info, "transform_descriptors", None) and not safe_pickle.trusted():
                    raise safe_pickle.PickleRefusedError(
                        f"{source}: stored with transforms {list(info.transform_descriptors)} and cannot be "
                        f"checked before it is unpickled; load it only if you trust it: {safe_pickle.TRUST_FLAG}")
                handle.seek(offset)
                safe_pickle.torch_load(io.BytesIO(handle.read(length)), source=source)


def _check_progress(path: Path, meta: Mapping[str, Any]) -> None:
    common = safe_pickle.torch_load(str(path / COMMON), source=str(path / COMMON))
    if not isinstance(common, dict):
        raise ContentsProblem(f"{path / COMMON}: holds a {type(common).__name__}, not megatron's common state")
    saved = common.get(PROGRESS)
    if saved is None:
        if meta.get("format_version", 1) >= 3:
            raise ContentsProblem(f"{path / COMMON}: lacks the {PROGRESS} record a format-3 checkpoint holds")
        return  # written before the record existed
    for key in ("iteration", "consumed_samples"):
        if not isinstance(saved, dict) or saved.get(key) != meta.get(key):
            inside = saved.get(key) if isinstance(saved, dict) else saved
            raise ContentsProblem(f"tgdpo_checkpoint.json says {key} {meta.get(key)!r}, the checkpoint's own state "
                                  f"({path / COMMON}) says {inside!r}: the manifest was edited or is damaged")


def contents_problem(path: Path, meta: Mapping[str, Any], *, share: tuple[int, int] = (0, 1)) -> Optional[str]:
    """Why checkpoint ``path`` (manifest ``meta``, files verified) cannot be loaded as it is, or None."""
    path = Path(path)
    files = meta.get("files", {})
    missing = [name for name in REQUIRED_FILES if name not in files]
    if missing:
        return f"{path}: its manifest does not list {', '.join(missing)}: not a complete torch_dist checkpoint"
    try:
        metadata = read_dcp_metadata(path)
        _check_storage(path, metadata, files, share=share)
        if share[0] == 0:
            _check_progress(path, meta)
    except (ContentsProblem, safe_pickle.UnreadablePickleError) as exc:
        return str(exc)
    except OSError as exc:
        return f"{path}: cannot be read ({exc.strerror or exc})"
    return None
