"""Integrity of what the project writes: per-file size and checksum, one version policy, atomic publish.

Used by every artefact that is written once and read later — prepared data, the log-prob cache,
training checkpoints and the converted model format — so they share one definition of "complete and
intact":

* :func:`describe_files` records ``{"bytes": n, "crc32": "xxxxxxxx"}`` per file. CRC-32 (zlib) runs at
  disk speed (~2 GB/s per core here, above SHA-256's 1.4 and BLAKE2's 0.5) and catches bit rot and
  same-size overwrites; it is not a defence against a crafted file (``docs/checkpoints.md``, Trust: the
  allow-listed unpickler of :mod:`megatron_tgdpo.safe_pickle` is). Entries written by earlier versions
  carry ``sha256``; both are verified.
* :func:`verify_files` returns the first reason an artefact cannot be trusted (missing, truncated,
  checksum mismatch), or None. ``share=(rank, world)`` checks only every world-th file, so the ranks of
  a job verify a checkpoint in parallel and exchange the reasons.
* :func:`check_format` is the one version policy: a reader accepts every version up to the one it
  writes and refuses newer ones with the remedy.
* :func:`seal` / :func:`seal_problem`: a metadata file's own SHA-256 over its canonical JSON (every field
  but the digest, the file list included), so an edit of any field, or bit rot in it, is caught like
  damage to the files it lists. Like the CRC-32s it is recomputable: it detects accidents and hand
  edits, not a forger. :func:`unlisted_files` finds files a metadata file does not cover.
* :func:`write_json_atomic` / :func:`publish_directory` write under a temporary name and rename, so a
  reader never sees half an artefact.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

__all__ = [
    "FileProblem",
    "FormatError",
    "check_format",
    "describe_files",
    "file_checksum",
    "publish_directory",
    "read_json",
    "seal",
    "seal_problem",
    "unlisted_files",
    "verify_files",
    "write_json_atomic",
]

CHECKSUM = "crc32"
DIGEST = "manifest_sha256"
_BLOCK = 8 << 20


class FormatError(ValueError):
    """An artefact's metadata is unreadable or of an unsupported format/version."""


def file_checksum(path: str | os.PathLike, *, algorithm: str = CHECKSUM) -> str:
    """Hex digest of a file's bytes (``crc32`` or ``sha256``), read in 8 MiB blocks."""
    with open(path, "rb") as handle:
        if algorithm == "crc32":
            value = 0
            while block := handle.read(_BLOCK):
                value = zlib.crc32(block, value)
            return f"{value:08x}"
        if algorithm == "sha256":
            digest = hashlib.sha256()
            while block := handle.read(_BLOCK):
                digest.update(block)
            return digest.hexdigest()
    raise ValueError(f"unknown checksum algorithm {algorithm!r}")


def describe_files(
    directory: str | os.PathLike, names: Iterable[str], *, algorithm: str = CHECKSUM
) -> dict[str, dict[str, Any]]:
    """``{name: {"bytes", algorithm}}`` for files under ``directory`` (names relative to it).

    CRC-32 (the default) for artefacts verified on every load (checkpoints); SHA-256 where the
    artefact promises it (prepared data, the log-prob cache: verified on request)."""
    directory = Path(directory)
    return {name: {"bytes": (directory / name).stat().st_size, algorithm: file_checksum(directory / name,
                                                                                         algorithm=algorithm)}
            for name in names}


@dataclass(frozen=True)
class FileProblem:
    """Why one listed file cannot be trusted."""

    name: str
    kind: str  # "missing" | "size" | "checksum" | "malformed"
    found: Any = None
    expected: Any = None
    algorithm: str = ""

    def describe(self, *, listed_in: str, prefix: str | os.PathLike | None = None) -> str:
        where = f"{Path(prefix) / self.name}" if prefix is not None else self.name
        if self.kind == "missing":
            return f"{where}: missing, though {listed_in} lists it (incomplete copy?)"
        if self.kind == "size":
            return f"{where}: {self.found} bytes, but {listed_in} says {self.expected}: truncated or replaced"
        if self.kind == "checksum":
            return f"{where}: {self.algorithm} differs from {listed_in}: the file is corrupt"
        return f"{where}: its entry in {listed_in} is malformed"

    def __str__(self) -> str:
        return self.describe(listed_in="the manifest")


def _entry_problem(path: Path, name: str, entry: Any, *, checksums: bool) -> Optional[FileProblem]:
    if isinstance(entry, int) and not isinstance(entry, bool):  # size-only entries of earlier checkpoints
        entry = {"bytes": entry}
    if not isinstance(entry, Mapping) or not isinstance(entry.get("bytes"), int):
        return FileProblem(name, "malformed")
    if not path.is_file():
        return FileProblem(name, "missing")
    size = path.stat().st_size
    if size != entry["bytes"]:
        return FileProblem(name, "size", found=size, expected=entry["bytes"])
    if checksums:
        for algorithm in (CHECKSUM, "sha256"):
            if algorithm in entry:
                if file_checksum(path, algorithm=algorithm) != entry[algorithm]:
                    return FileProblem(name, "checksum", algorithm=algorithm)
                break
    return None


def verify_files(
    directory: str | os.PathLike,
    files: Mapping[str, Any],
    *,
    checksums: bool = True,
    share: tuple[int, int] = (0, 1),
) -> Optional[FileProblem]:
    """First problem found among ``files`` (as written by :func:`describe_files`), or None.

    ``share=(i, n)``: check only files ``i, i + n, ...`` of the sorted names (parallel verification)."""
    if not isinstance(files, Mapping):
        return FileProblem("(file list)", "malformed")
    directory = Path(directory)
    index, count = share
    for position, name in enumerate(sorted(files)):
        if position % count != index:
            continue
        if not isinstance(name, str) or Path(name).is_absolute() or ".." in Path(name).parts:
            return FileProblem(str(name), "malformed")
        found = _entry_problem(directory / name, name, files[name], checksums=checksums)
        if found:
            return found
    return None


def unlisted_files(directory: str | os.PathLike, files: Mapping[str, Any], *, ignore: Iterable[str] = ()) -> list[str]:
    """Regular files directly in ``directory`` that ``files`` does not list (``ignore``: the metadata
    file itself), sorted."""
    skip = set(ignore)
    return sorted(entry.name for entry in os.scandir(directory)
                  if entry.is_file(follow_symlinks=False) and entry.name not in files and entry.name not in skip)


def _canonical_digest(meta: Mapping[str, Any]) -> str:
    body = {k: v for k, v in meta.items() if k != DIGEST}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def seal(meta: Mapping[str, Any]) -> dict:
    """``meta`` as it reads back from JSON, plus ``DIGEST``: the SHA-256 of its canonical JSON."""
    plain = json.loads(json.dumps(dict(meta), default=str))
    plain.pop(DIGEST, None)
    plain[DIGEST] = _canonical_digest(plain)
    return plain


def seal_problem(meta: Mapping[str, Any], *, path: str | os.PathLike) -> Optional[str]:
    """Why ``meta`` (read from ``path``) does not match its own digest, or None."""
    found = meta.get(DIGEST)
    if not isinstance(found, str):
        return f"{path}: has no {DIGEST} (its own checksum): damaged or edited"
    if found != _canonical_digest(meta):
        return f"{path}: its content does not match its {DIGEST}: the file was edited or is corrupt"
    return None


def read_json(path: str | os.PathLike) -> dict:
    """A JSON object from ``path``; FormatError (never a raw decode error) when it is not one."""
    path = Path(path)
    try:
        value = json.loads(path.read_bytes().decode("utf-8"))
    except OSError as exc:
        raise FormatError(f"{path}: cannot be read ({exc.strerror or exc})") from exc
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise FormatError(f"{path}: not valid JSON ({type(exc).__name__})") from exc
    if not isinstance(value, dict):
        raise FormatError(f"{path}: expected a JSON object, found {type(value).__name__}")
    return value


def check_format(meta: Mapping[str, Any], *, path: str | os.PathLike, name: str, version: int, remedy: str) -> int:
    """The one version policy: ``meta["format"] == name`` and ``1 <= format_version <= version``.

    Older versions are read (every reader keeps what it needs to); a newer one means the artefact was
    written by a newer megatron_tgdpo."""
    found = meta.get("format")
    if found != name:
        raise FormatError(f"{path}: format {found!r}, expected {name!r}; {remedy}")
    got = meta.get("format_version")
    if not isinstance(got, int) or isinstance(got, bool) or got < 1:
        raise FormatError(f"{path}: format_version {got!r} is not a version number; {remedy}")
    if got > version:
        raise FormatError(f"{path}: format_version {got} is newer than this megatron_tgdpo reads ({version}); "
                          "upgrade megatron_tgdpo")
    return got


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on directories
        pass
    finally:
        os.close(fd)


def write_json_atomic(path: str | os.PathLike, obj: Any, *, unique: bool = True) -> None:
    """Write JSON to a temporary sibling, fsync, rename over ``path``.

    The temporary name includes the host and PID (``unique``), so two writers never collide on it."""
    path = Path(path)
    suffix = f".{os.uname().nodename}.{os.getpid()}.part" if unique else ".part"
    part = path.with_name(path.name + suffix)
    try:
        with open(part, "w", encoding="utf-8") as handle:
            handle.write(json.dumps(obj, indent=2, default=str) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(part, path)
    except BaseException:
        part.unlink(missing_ok=True)
        raise


def publish_directory(staging: str | os.PathLike, final: str | os.PathLike, *, overwrite: bool) -> Path:
    """Rename a complete ``staging`` directory to ``final``; an existing ``final`` is replaced only
    with ``overwrite``, and removed only after the new one is in place."""
    staging, final = Path(staging), Path(final)
    _fsync_path(staging)
    if final.exists():
        if not overwrite:
            raise FileExistsError(f"{final} already exists")
        old = final.with_name(f"{final.name}.old-{os.getpid()}")
        os.replace(final, old)
        os.replace(staging, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, final)
    _fsync_path(final.parent)
    return final
