"""File layout and manifest of a prepared preference data set.

A data set at ``PREFIX`` is three files:

* ``PREFIX.bin`` / ``PREFIX.idx``: a megatron-core ``IndexedDataset`` with three sequences per pair
  (prompt, chosen response, rejected response) and one document per pair;
* ``PREFIX.manifest.json``: what was prepared from what, and how. It is published last, so its
  presence means the ``.bin``/``.idx`` next to it are complete; their sizes and sha256 are in it.

``kind`` says what the set holds: ``"preference"`` pairs, or ``"sft"`` examples (one response per
prompt, stored as the chosen response with an empty rejected one). Preference sets are written as
format version 1 (``kind`` is optional there and means preference), SFT sets as version 2, so a reader
that predates kinds refuses an SFT set instead of training a preference loss on empty responses.
:func:`kind_problem` is the check a trainer runs: SFT trains on either kind (on the chosen responses of
pairs), the preference losses only on pairs.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from megatron_tgdpo.data.errors import DataFormatError

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "SEQUENCES_PER_PAIR",
    "bin_path",
    "check_data_files",
    "dataset_kind",
    "format_version_for",
    "idx_path",
    "kind_problem",
    "manifest_path",
    "read_manifest",
    "sha256_file",
]

FORMAT_NAME = "megatron_tgdpo.preference_pairs"
FORMAT_VERSION = 1  # of a preference set; an SFT set is version SFT_FORMAT_VERSION (see format_version_for)
SFT_FORMAT_VERSION = 2  # 2: "kind" is recorded (required); version-1 readers refuse such sets
SUPPORTED_VERSIONS = (1, 2)
SEQUENCES_PER_PAIR = 3  # prompt, chosen response, rejected response (empty in an SFT set)
KINDS = ("preference", "sft")  # = records.RECORD_KINDS


def bin_path(prefix: str | Path) -> Path:
    return Path(f"{prefix}.bin")


def idx_path(prefix: str | Path) -> Path:
    return Path(f"{prefix}.idx")


def manifest_path(prefix: str | Path) -> Path:
    return Path(f"{prefix}.manifest.json")


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file (the shared :func:`megatron_tgdpo.integrity.file_checksum`)."""
    from megatron_tgdpo.integrity import file_checksum

    return file_checksum(path, algorithm="sha256")


def write_manifest(prefix: str | Path, manifest: dict[str, Any]) -> None:
    """Write ``manifest`` as ``PREFIX.manifest.json`` (indented, keys in the order given)."""
    manifest_path(prefix).write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def read_manifest(prefix: str | Path) -> dict[str, Any]:
    """The manifest of ``prefix``; raises :class:`DataFormatError` saying what is wrong and what to do."""
    path = manifest_path(prefix)
    if not path.is_file():
        present = [p.name for p in (bin_path(prefix), idx_path(prefix)) if p.exists()]
        state = (
            f"{' and '.join(present)} exist but no manifest: the preparation did not finish"
            if present
            else "no prepared data set there"
        )
        raise DataFormatError(
            f"{path}: missing ({state}); prepare the data with "
            f"`megatron-tgdpo prepare --input ... --output-prefix {prefix} --tokenizer ...`"
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DataFormatError(f"{path}: unreadable manifest ({exc}); prepare the data again") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise DataFormatError(f"{path}: not a preference data manifest (format {found!r}, expected {FORMAT_NAME!r})")
    version = manifest.get("format_version")
    if version not in SUPPORTED_VERSIONS:
        raise DataFormatError(
            f"{path}: unknown format_version {version!r}; this code reads version(s) "
            f"{', '.join(map(str, SUPPORTED_VERSIONS))}. Prepare the data again with this version of "
            "megatron-tgdpo prepare, or use the version of megatron_tgdpo that wrote it"
        )
    kind = manifest.get("kind", "preference" if version == 1 else None)
    if kind not in KINDS:
        raise DataFormatError(f"{path}: kind {manifest.get('kind')!r} is not one of {', '.join(KINDS)}; prepare "
                              "the data again")
    return manifest


def format_version_for(kind: str) -> int:
    """The format version a set of ``kind`` is written as: the oldest that readers interpret correctly."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    return SFT_FORMAT_VERSION if kind == "sft" else FORMAT_VERSION


def dataset_kind(manifest: dict[str, Any]) -> str:
    """``"preference"`` or ``"sft"`` (a manifest read by :func:`read_manifest`; version 1 without a kind: preference)."""
    return manifest.get("kind", "preference")


def kind_problem(manifest: dict[str, Any], *, loss_type: str, prefix: str | Path, flag: str = "--data-path") -> str | None:
    """Why ``--loss-type loss_type`` cannot train on this set, or ``None`` when it can. SFT trains on any
    set (the chosen responses of pairs); PPO reads only its tokenizer and chat template; the preference
    losses need pairs."""
    if loss_type in ("sft", "ppo") or dataset_kind(manifest) == "preference":
        return None
    return (f"{flag} {prefix}: an SFT data set (one response per prompt, kind \"sft\" in "
            f"{manifest_path(prefix).name}); --loss-type {loss_type} needs preference pairs (chosen and rejected). "
            "Train it with --loss-type sft, or prepare pairs: megatron-tgdpo prepare without --format sft")


def check_data_files(prefix: str | Path, manifest: dict[str, Any], *, verify_sha256: bool = False) -> None:
    """The .bin/.idx exist and match the sizes (and, if asked, the sha256) recorded in the manifest
    (the project's one integrity check, :func:`megatron_tgdpo.integrity.verify_files`)."""
    from megatron_tgdpo.integrity import verify_files

    files = manifest.get("files", {})
    listed = {path.name: files.get(kind) for kind, path in (("bin", bin_path(prefix)), ("idx", idx_path(prefix)))}
    problem = verify_files(Path(prefix).parent, listed, checksums=verify_sha256)
    if problem is None:
        return
    path = Path(prefix).parent / problem.name
    name = manifest_path(prefix).name
    if problem.kind == "size":
        detail = (f"{problem.found} bytes, but the manifest says {problem.expected}: the file was changed or "
                  "replaced after preparation")
    elif problem.kind == "checksum":
        detail = "sha256 differs from the manifest: the file is corrupt"
    elif problem.kind == "missing":
        detail = f"missing, though {name} lists it"
    else:
        detail = f"its entry in {name} is malformed"
    raise DataFormatError(f"{path}: {detail}; prepare the data again")
