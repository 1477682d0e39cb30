"""Offline reference / guidance log-probs: a cache directory keyed by sample index, checked on open.

Made once by ``tools/precompute_logprobs.py`` (the frozen models run forward-only over the data set in
order), then read by training instead of scoring the frozen models every step. Layout::

    <cache>/
      manifest.json     format + version, fingerprints (data set; checkpoint per role), the files with
                        their sizes and sha256. Written last: a directory without it is incomplete.
      offsets.npy       int64 [2K + 1]. Sequence 2s is the chosen response of sample s, 2s + 1 its
                        rejected response; sequence q's tokens are values[offsets[q]:offsets[q + 1]].
      reference.npy     float32 [T]: the reference model's log-prob of every response token
      guidance.npy      float32 [T]: the same for the guidance model (present when it was given)

"Response tokens" are exactly the positions where the collated ``loss_mask`` is 1, in order, so a
row of any batch is rebuilt by scattering its span onto its mask: the cache does not depend on
padding, micro-batch composition or the parallel layout. Plain ``.npy`` files: ``np.load(...,
mmap_mode="r")`` reads them without loading a multi-GB file. The directory is built under
``<cache>.tmp`` and renamed into place when complete.

The manifest fingerprints what the log-probs depend on: the prepared data set (sha256 of its manifest
and its sample count) and, per role, the checkpoint (resolved path + sha256 of its metadata) or
``seeded-init:<seed>``. ``beta``/``alpha`` are not in it: log-probs do not depend on them.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

__all__ = [
    "CacheFormatError",
    "CacheMismatchError",
    "LogprobCache",
    "LogprobCacheError",
    "ROLES",
    "cached_logps",
    "fingerprint_checkpoint",
    "fingerprint_dataset",
    "publish_cache",
    "staging_dir",
    "write_shard",
]

FORMAT = "megatron_tgdpo.logprob_cache"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
OFFSETS = "offsets.npy"
ROLES = ("reference", "guidance")
SHARDS = "shards"
RERUN = "re-run tools/precompute_logprobs.py"


class LogprobCacheError(RuntimeError):
    """Base class: the cache cannot be used; the message says why and what to do."""


class CacheFormatError(LogprobCacheError):
    """Missing, incomplete (interrupted or truncated) or unreadable cache directory."""


class CacheMismatchError(LogprobCacheError):
    """The cache was made for another data set, checkpoint, seed or model, or lacks a role."""


# ------------------------------------------------------------------------------------------------
# fingerprints
# ------------------------------------------------------------------------------------------------


def _sha256(path: Path, *, chunk_bytes: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk_bytes):
            digest.update(block)
    return digest.hexdigest()


def fingerprint_dataset(prefix: str | os.PathLike) -> str:
    """``sha256=<manifest sha256>;samples=<pairs>`` of a prepared data set.

    The data manifest records the sha256 of the ``.bin``/``.idx`` files, the tokenizer and the length
    policy, so hashing it covers all of them without reading gigabytes. The path is left out on
    purpose: moving a data set does not change its samples."""
    from megatron_tgdpo.data.manifest import manifest_path, read_manifest

    manifest = read_manifest(prefix)  # DataFormatError with the fix if it is not a prepared set
    return f"sha256={_sha256(manifest_path(prefix))};samples={int(manifest['num_pairs'])}"


# What identifies a Hugging Face / converted directory without hashing tens of GB of weights.
_MODEL_METADATA = ("tgdpo_converted.json", "config.json", "model.safetensors.index.json", "generation_config.json")
_WEIGHT_SUFFIXES = (".safetensors", ".bin")


def fingerprint_checkpoint(path: Optional[str | os.PathLike], *, seed: int) -> str:
    """What a frozen model's weights come from, as one comparable string.

    * ``None`` (no checkpoint): ``seeded-init:<seed>`` (the layout-independent seeded initialisation);
    * a torch_dist save root or ``iter_*`` directory: ``torch_dist:<resolved iter dir>:sha256=<sha256
      of tgdpo_checkpoint.json>`` (it holds the iteration, consumed samples and the run's config);
    * a Hugging Face or converted directory: ``hf:`` / ``converted:<path>:sha256=<digest>`` over its
      config/metadata files and the names and sizes of its weight files. The weights themselves are
      not hashed (minutes for 70B); overwriting a directory in place with same-shaped weights is
      therefore not detected: give a new model a new directory.
    """
    if path is None:
        return f"seeded-init:{int(seed)}"
    from megatron_tgdpo import checkpointing
    from megatron_tgdpo.convert import is_converted_directory, is_hf_directory

    src = Path(path)
    if is_hf_directory(src) or is_converted_directory(src):
        kind = "converted" if is_converted_directory(src) else "hf"
        digest = hashlib.sha256()
        for name in _MODEL_METADATA:
            if (src / name).is_file():
                digest.update(f"{name}={_sha256(src / name)}\n".encode())
        for weight in sorted(p for p in src.iterdir() if p.suffix in _WEIGHT_SUFFIXES and p.is_file()):
            digest.update(f"{weight.name}:{weight.stat().st_size}\n".encode())
        return f"{kind}:{src.resolve()}:sha256={digest.hexdigest()}"
    ckpt = checkpointing.resolve(src)  # CheckpointError naming the flag when absent or incomplete
    return f"torch_dist:{ckpt.resolve()}:sha256={_sha256(ckpt / checkpointing.METADATA)}"


# ------------------------------------------------------------------------------------------------
# writing (tools/precompute_logprobs.py): one shard per scoring rank, merged and published by rank 0
# ------------------------------------------------------------------------------------------------


def staging_dir(output: str | os.PathLike) -> Path:
    output = Path(output)
    return output.with_name(output.name + ".tmp")


def write_shard(
    staging: Path,
    *,
    rank: int,
    samples: Sequence[int],
    counts: np.ndarray,
    values: dict[str, np.ndarray],
) -> Path:
    """One scoring rank's samples: ids, [n, 2] response-token counts (chosen, rejected) and, per role,
    their log-probs concatenated in the same order (chosen then rejected per sample)."""
    shard_dir = staging / SHARDS
    shard_dir.mkdir(parents=True, exist_ok=True)
    final = shard_dir / f"rank{rank:05d}.npz"
    part = shard_dir / f"rank{rank:05d}.part.npz"
    arrays = {"samples": np.asarray(samples, dtype=np.int64),
              "counts": np.asarray(counts, dtype=np.int64).reshape(-1, 2)}
    arrays.update({role: np.asarray(v, dtype=np.float32) for role, v in values.items()})
    np.savez(part, **arrays)
    os.replace(part, final)  # the merger never sees a half-written shard
    return final


def _read_shards(staging: Path, *, num_samples: int, roles: Sequence[str]) -> tuple[np.ndarray, list[dict]]:
    """Response-token counts [K, 2] of every sample and the loaded shards; each sample exactly once."""
    counts = np.full((num_samples, 2), -1, dtype=np.int64)
    shards = []
    for path in sorted((staging / SHARDS).glob("rank*.npz")):
        if path.name.endswith(".part.npz"):
            continue
        with np.load(path) as data:
            shard = {key: data[key] for key in data.files}
        missing = [r for r in roles if r not in shard]
        if missing:
            raise CacheFormatError(f"{path}: shard lacks role(s) {missing}; the scoring run was inconsistent, {RERUN}")
        samples, shard_counts = shard["samples"], shard["counts"]
        if samples.size and (samples.min() < 0 or samples.max() >= num_samples):
            raise CacheFormatError(f"{path}: sample ids outside 0..{num_samples - 1}; {RERUN}")
        counts[samples] = shard_counts  # duplicates (the wrapped last batch) carry equal counts
        shards.append(shard)
    absent = np.flatnonzero(counts[:, 0] < 0)
    if absent.size:
        raise CacheFormatError(
            f"{staging}: {absent.size} of {num_samples} samples were not scored (first: {absent[:5].tolist()}); "
            f"a scoring rank did not write its shard, {RERUN}"
        )
    return counts, shards


def publish_cache(
    output: str | os.PathLike,
    *,
    num_samples: int,
    roles: Sequence[str],
    manifest: dict[str, Any],
    overwrite: bool = False,
) -> Path:
    """Merge the shards in ``<output>.tmp`` into the cache files, write the manifest last and rename
    the directory to ``output``. Single process (global rank 0), after every shard is written."""
    output = Path(output)
    staging = staging_dir(output)
    counts, shards = _read_shards(staging, num_samples=num_samples, roles=roles)
    offsets = np.zeros(2 * num_samples + 1, dtype=np.int64)
    np.cumsum(counts.reshape(-1), out=offsets[1:])
    total = int(offsets[-1])
    outputs = {role: np.lib.format.open_memmap(staging / f"{role}.npy", mode="w+", dtype=np.float32, shape=(total,))
               for role in roles}
    done = np.zeros(num_samples, dtype=bool)
    for shard in shards:
        starts = np.concatenate([[0], np.cumsum(shard["counts"].sum(axis=1))])
        for i, sample in enumerate(shard["samples"].tolist()):
            if done[sample]:
                continue  # scored twice (padding of the last global batch): keep the first
            done[sample] = True
            dst = slice(int(offsets[2 * sample]), int(offsets[2 * sample + 2]))
            for role in roles:
                outputs[role][dst] = shard[role][starts[i] : starts[i + 1]]
    for array in outputs.values():
        array.flush()
    del outputs
    np.save(staging / OFFSETS, offsets)
    shutil.rmtree(staging / SHARDS)
    files = {name: {"bytes": (staging / name).stat().st_size, "sha256": _sha256(staging / name)}
             for name in [OFFSETS] + [f"{role}.npy" for role in roles]}
    full = {"format": FORMAT, "format_version": FORMAT_VERSION, **manifest, "num_samples": num_samples,
            "num_tokens": total, "roles": {role: {**manifest["roles"][role], "file": f"{role}.npy"} for role in roles},
            "files": files, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    part = staging / (MANIFEST + ".part")
    with open(part, "w") as handle:
        json.dump(full, handle, indent=2)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(part, staging / MANIFEST)
    if output.exists():
        if not overwrite:
            raise CacheFormatError(f"{output} already exists; pass --overwrite or choose another --output")
        old = output.with_name(f"{output.name}.old-{os.getpid()}")
        os.replace(output, old)  # the old cache goes only once the new one is complete
        os.replace(staging, output)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, output)
    return output


# ------------------------------------------------------------------------------------------------
# reading
# ------------------------------------------------------------------------------------------------


def read_cache_manifest(path: Path) -> dict:
    """The manifest of a complete cache; CacheFormatError saying what is wrong otherwise."""
    if not path.is_dir():
        raise CacheFormatError(f"--logprob-cache {path}: no such directory; make it with tools/precompute_logprobs.py")
    file = path / MANIFEST
    if not file.is_file():
        raise CacheFormatError(
            f"{file}: missing: {path} is not a complete log-prob cache (the precompute run was interrupted, or "
            f"this is its staging directory); {RERUN} --output {path}"
        )
    try:
        manifest = json.loads(file.read_text())
    except (OSError, ValueError) as exc:
        raise CacheFormatError(f"{file}: unreadable ({exc}); {RERUN}") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise CacheFormatError(f"{file}: not a log-prob cache manifest (format {found!r}, expected {FORMAT!r})")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CacheFormatError(
            f"{file}: format_version {manifest.get('format_version')!r}, this code reads {FORMAT_VERSION}; {RERUN}"
        )
    missing = [key for key in ("dataset", "roles", "num_samples", "files") if key not in manifest]
    if missing or "reference" not in manifest["roles"]:
        raise CacheFormatError(
            f"{file}: lacks {missing or ['roles.reference']}; the manifest was edited or cut, {RERUN}"
        )
    return manifest


def _check_files(path: Path, manifest: dict, *, verify_sha256: bool) -> None:
    for name, expected in manifest.get("files", {}).items():
        file = path / name
        if not file.is_file():
            raise CacheFormatError(f"{file}: missing, though {MANIFEST} lists it (incomplete copy?); {RERUN}")
        size = file.stat().st_size
        if size != expected.get("bytes"):
            raise CacheFormatError(
                f"{file}: {size} bytes, but {MANIFEST} says {expected.get('bytes')}: truncated or replaced; {RERUN}"
            )
        if verify_sha256 and _sha256(file) != expected.get("sha256"):
            raise CacheFormatError(f"{file}: sha256 differs from {MANIFEST}: the file is corrupt; {RERUN}")


class LogprobCache:
    """A complete cache checked against what this run would compute; raises on any difference.

    ``ref_load``/``guidance_load``/``seed``/``dataset_prefix`` are the training run's flags. The
    reference is always checked (``ref_load=None`` means ``seeded-init:<seed>``). The guidance role
    is needed when ``need_guidance``; with ``guidance_load`` given its fingerprint must match, with
    ``guidance_load=None`` the cache's guidance log-probs stand in for the guidance model (no
    guidance checkpoint needs to be present at training time). ``model`` (the preset name), when
    given, must be the one the cache was made with. A cache that covers only the first samples
    (``--limit-samples``) is refused unless ``allow_partial``.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        dataset_prefix: str | os.PathLike,
        ref_load: Optional[str | os.PathLike],
        guidance_load: Optional[str | os.PathLike],
        seed: int,
        need_guidance: bool,
        model: Optional[str] = None,
        allow_partial: bool = False,
        verify_sha256: bool = False,
    ) -> None:
        self.path = Path(path)
        self.manifest = read_cache_manifest(self.path)
        _check_files(self.path, self.manifest, verify_sha256=verify_sha256)
        self.need_guidance = bool(need_guidance)
        self._check_fingerprints(dataset_prefix=dataset_prefix, ref_load=ref_load, guidance_load=guidance_load,
                                 seed=seed, model=model)
        self.num_samples = int(self.manifest["num_samples"])
        dataset_samples = int(self.manifest["dataset"]["num_samples"])
        if self.num_samples < dataset_samples and not allow_partial:
            raise CacheMismatchError(
                f"{self.path}: covers only samples 0..{self.num_samples - 1} of the {dataset_samples} in the data set "
                f"(made with --limit-samples); training draws from all of them: {RERUN} without --limit-samples"
            )
        self.offsets = np.load(self.path / OFFSETS)
        if self.offsets.shape != (2 * self.num_samples + 1,):
            raise CacheFormatError(
                f"{self.path / OFFSETS}: shape {self.offsets.shape}, expected ({2 * self.num_samples + 1},); {RERUN}"
            )
        self.roles = tuple(r for r in ROLES if r in self.manifest["roles"] and (r == "reference" or self.need_guidance))
        self._values = {r: np.load(self.path / self.manifest["roles"][r]["file"], mmap_mode="r") for r in self.roles}

    def _check_fingerprints(self, *, dataset_prefix, ref_load, guidance_load, seed: int, model: Optional[str]) -> None:
        cached_roles = self.manifest.get("roles", {})
        differences = []
        expected_data = fingerprint_dataset(dataset_prefix)
        cached_data = self.manifest["dataset"]
        if cached_data["fingerprint"] != expected_data:
            differences.append(
                f"dataset: the cache was made from {cached_data.get('prefix')} ({cached_data['fingerprint']}), "
                f"this run uses {dataset_prefix} ({expected_data})"
            )
        wanted = {"reference": ref_load}
        if self.need_guidance:
            if "guidance" not in cached_roles:
                raise CacheMismatchError(
                    f"{self.path}: the cache has no guidance log-probs (roles: {sorted(cached_roles)}), but this "
                    f"TGDPO run needs them: {RERUN} with --guidance-load, or use --loss-type dpo"
                )
            if guidance_load is not None:
                wanted["guidance"] = guidance_load
        for role, load in wanted.items():
            expected = fingerprint_checkpoint(load, seed=seed)
            cached = cached_roles[role]["checkpoint"]
            if cached != expected:
                flag = "--ref-load" if role == "reference" else "--guidance-load"
                differences.append(
                    f"{role} checkpoint ({flag}, --seed): the cache has {cached}, this run has {expected}"
                )
        if model is not None and self.manifest.get("model") != model:
            differences.append(
                f"model preset (--model): the cache has {self.manifest.get('model')!r}, this run has {model!r}"
            )
        if differences:
            raise CacheMismatchError(
                f"{self.path}: this log-prob cache does not match the run:\n  - " + "\n  - ".join(differences)
                + f"\n{RERUN} with this run's --data-path/--ref-load/--guidance-load/--seed/--model "
                "(--output a new directory), or pass the --logprob-cache that was made for them"
            )

    def sample_logps(self, sample: int, role: str) -> tuple[np.ndarray, np.ndarray]:
        """(chosen, rejected) response-token log-probs of one sample, fp32 copies."""
        if role not in self._values:
            raise CacheMismatchError(f"{self.path}: role {role!r} not available (opened roles: {list(self.roles)})")
        if not 0 <= sample < self.num_samples:
            raise CacheMismatchError(
                f"{self.path}: sample {sample} is not in the cache (it covers 0..{self.num_samples - 1}); "
                f"{RERUN} over the whole data set"
            )
        o = self.offsets
        values = self._values[role]
        return (np.array(values[o[2 * sample] : o[2 * sample + 1]], dtype=np.float32),
                np.array(values[o[2 * sample + 1] : o[2 * sample + 2]], dtype=np.float32))

    def batch_logps(self, batch: dict[str, torch.Tensor], role: str) -> torch.Tensor:
        """fp32 ``[2B, S]`` (full sequence) log-probs of ``role`` for a collated batch, zero where
        ``loss_mask == 0``; rows follow the batch layout (chosen rows, then rejected rows)."""
        samples = batch["sample_idx"].tolist()
        mask = batch["loss_mask"]
        rows = len(samples)
        if mask.shape[0] != 2 * rows:
            raise ValueError(f"loss_mask has {mask.shape[0]} rows for {rows} samples; expected 2 x samples")
        on = mask.detach().to("cpu") != 0
        out = torch.zeros(mask.shape, dtype=torch.float32)
        for row in range(2 * rows):
            sample = samples[row % rows]
            side = 0 if row < rows else 1
            values = self.sample_logps(sample, role)[side]
            positions = on[row].nonzero().squeeze(1)
            if positions.numel() != values.size:
                raise CacheMismatchError(
                    f"{self.path}: sample {sample} ({'chosen' if side == 0 else 'rejected'}) has {positions.numel()} "
                    f"response tokens in this batch but {values.size} in the cache: the data were prepared or "
                    f"truncated differently from when the cache was made; {RERUN} on this data set"
                )
            out[row, positions] = torch.from_numpy(values)
        return out.to(mask.device)


# ------------------------------------------------------------------------------------------------
# training-side entry point: the same structure as scoring.score_logps
# ------------------------------------------------------------------------------------------------


def cached_logps(
    cache: LogprobCache, batches: list[dict[str, torch.Tensor]]
) -> tuple[dict[int, torch.Tensor], Optional[dict[int, torch.Tensor]]]:
    """(reference, guidance or None): ``{micro-batch index: fp32 [2B, S_local] logps * loss_mask}`` on
    this rank's context-parallel slice, on the batch's device; empty dicts off the last pipeline stage
    (as :func:`~megatron_tgdpo.scoring.score_logps`). Guidance is None when the cache was opened
    without ``need_guidance``."""
    from megatron.core import parallel_state as ps

    from megatron_tgdpo.scoring import slice_for_context_parallel

    ref: dict[int, torch.Tensor] = {}
    guide: Optional[dict[int, torch.Tensor]] = {} if cache.need_guidance else None
    if not ps.is_pipeline_last_stage(ignore_virtual=True):
        return ref, guide
    for index, batch in enumerate(batches):
        for role, out in (("reference", ref), ("guidance", guide)):
            if out is None:
                continue
            local = slice_for_context_parallel({**batch, "_cached_logps": cache.batch_logps(batch, role)})
            out[index] = local["_cached_logps"] * local["loss_mask"]
    return ref, guide
