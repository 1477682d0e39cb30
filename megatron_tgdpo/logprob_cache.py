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

import os
import shutil
import time
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import torch

from megatron_tgdpo import compat, integrity
from megatron_tgdpo.data.batch import Batch

__all__ = [
    "attach_cached_logps",
    "CacheFormatError",
    "CacheMismatchError",
    "LogprobCache",
    "LogprobCacheError",
    "ROLES",
    "cached_logps",
    "cached_role_logps",
    "cached_step_logps",
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


def _sha256(path: Path) -> str:
    return integrity.file_checksum(path, algorithm="sha256")


def fingerprint_dataset(prefix: str | os.PathLike) -> str:
    """``sha256=<manifest sha256>;samples=<pairs>`` of a prepared data set.

    The data manifest records the sha256 of the ``.bin``/``.idx`` files, the tokenizer and the length
    policy, so hashing it covers all of them without reading gigabytes. The path is left out on
    purpose: moving a data set does not change its samples."""
    from megatron_tgdpo.data.manifest import manifest_path, read_manifest

    manifest = read_manifest(prefix)  # DataFormatError with the fix if it is not a prepared set
    return f"sha256={_sha256(manifest_path(prefix))};samples={int(manifest['num_pairs'])}"


def fingerprint_model(path: Optional[str | os.PathLike], *, seed: int) -> str:
    """What a frozen model's weights come from (``ModelSource.fingerprint``: seeded init, a torch_dist
    checkpoint, a Hugging Face or converted directory)."""
    from megatron_tgdpo.models.sources import ModelSource

    return ModelSource.of(path, seed=seed).fingerprint()


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
        try:
            with np.load(path, allow_pickle=False) as data:
                shard = {key: data[key] for key in data.files}
        except (ValueError, OSError, EOFError) as exc:
            raise CacheFormatError(f"{path}: not a readable shard ({exc}); {RERUN}") from None
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
    files = integrity.describe_files(staging, [OFFSETS] + [f"{role}.npy" for role in roles], algorithm="sha256")
    full = {"format": FORMAT, "format_version": FORMAT_VERSION, **manifest, "num_samples": num_samples,
            "num_tokens": total, "roles": {role: {**manifest["roles"][role], "file": f"{role}.npy"} for role in roles},
            "files": files, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    integrity.write_json_atomic(staging / MANIFEST, full)
    if output.exists() and not overwrite:
        raise CacheFormatError(f"{output} already exists; pass --overwrite or choose another --output")
    return integrity.publish_directory(staging, output, overwrite=overwrite)


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
        manifest = integrity.read_json(file)
        integrity.check_format(manifest, path=file, name=FORMAT, version=FORMAT_VERSION,
                               remedy=f"not a log-prob cache manifest; {RERUN}")
    except integrity.FormatError as exc:
        raise CacheFormatError(f"{file}: unreadable ({exc}); {RERUN}") from None
    missing = [key for key in ("dataset", "roles", "num_samples", "files") if key not in manifest]
    if missing or "reference" not in manifest["roles"]:
        raise CacheFormatError(
            f"{file}: lacks {missing or ['roles.reference']}; the manifest was edited or cut, {RERUN}"
        )
    return manifest


def _load_array(path: Path, *, mmap_mode: Optional[str] = None) -> np.ndarray:
    """A plain ``.npy`` array. Never unpickled: an object array (which would run its pickle) is refused,
    whatever --trust-checkpoint says, since the cache only ever holds numbers."""
    try:
        value = np.load(path, mmap_mode=mmap_mode, allow_pickle=False)
    except ValueError as exc:
        what = "holds pickled objects, which a log-prob cache never does" if "pickle" in str(exc) else str(exc)
        raise CacheFormatError(f"{path}: refused: {what}; {RERUN}") from None
    except (OSError, EOFError) as exc:
        raise CacheFormatError(f"{path}: not a readable .npy array ({exc}); {RERUN}") from None
    if not isinstance(value, np.ndarray) or value.dtype.hasobject:
        raise CacheFormatError(f"{path}: not a plain numeric array; {RERUN}")
    return value


def _check_files(path: Path, manifest: dict, *, verify_sha256: bool) -> None:
    problem = integrity.verify_files(path, manifest.get("files", {}), checksums=verify_sha256)
    if problem:
        raise CacheFormatError(f"{problem.describe(listed_in=MANIFEST, prefix=path)}; {RERUN}")


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
        self.offsets = _load_array(self.path / OFFSETS)
        if self.offsets.shape != (2 * self.num_samples + 1,):
            raise CacheFormatError(
                f"{self.path / OFFSETS}: shape {self.offsets.shape}, expected ({2 * self.num_samples + 1},); {RERUN}"
            )
        self.roles = tuple(r for r in ROLES if r in self.manifest["roles"] and (r == "reference" or self.need_guidance))
        self._values = {r: _load_array(self.path / self.manifest["roles"][r]["file"], mmap_mode="r") for r in self.roles}

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
            expected = fingerprint_model(load, seed=seed)
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
        self._check_role(role)
        self._check_samples(np.asarray([sample], dtype=np.int64))
        o = self.offsets
        values = self._values[role]
        return (np.array(values[o[2 * sample] : o[2 * sample + 1]], dtype=np.float32),
                np.array(values[o[2 * sample + 1] : o[2 * sample + 2]], dtype=np.float32))

    def _check_role(self, role: str) -> None:
        if role not in self._values:
            raise CacheMismatchError(f"{self.path}: role {role!r} not available (opened roles: {list(self.roles)})")

    def _check_samples(self, samples: np.ndarray) -> None:
        outside = samples[(samples < 0) | (samples >= self.num_samples)]
        if outside.size:
            raise CacheMismatchError(
                f"{self.path}: sample {int(outside[0])} is not in the cache (it covers 0..{self.num_samples - 1}); "
                f"{RERUN} over the whole data set"
            )

    def sequence_spans(self, samples: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(start, length) in the values files of each sequence of a batch of pairs whose dataset indices
        are ``samples`` (``[P]``): the batch contract's order, the chosen responses of the ``P`` pairs, then
        their rejected responses (int64 ``[2P]`` each)."""
        samples = np.asarray(samples, dtype=np.int64).reshape(-1)
        self._check_samples(samples)
        sequences = np.concatenate([2 * samples, 2 * samples + 1])
        starts = self.offsets[sequences]
        return starts, self.offsets[sequences + 1] - starts

    def value_index(self, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """Indices into a values file of the spans ``[starts[i], starts[i] + lengths[i])`` back to back
        (the same for every role: the roles share the offsets)."""
        total = int(lengths.sum())
        first = np.concatenate([[0], np.cumsum(lengths)[:-1]]) if lengths.size else lengths
        return np.arange(total, dtype=np.int64) + np.repeat(starts - first, lengths)

    def read_values(self, role: str, index: np.ndarray) -> np.ndarray:
        """fp32 values of ``role`` at ``index`` (:meth:`value_index`), in one indexed read of the
        (memory-mapped) values file."""
        self._check_role(role)
        return np.asarray(self._values[role][index], dtype=np.float32)

    def batch_logps(self, batch: Mapping[str, torch.Tensor], role: str) -> torch.Tensor:
        """fp32 full-length log-probs of ``role`` for a collated batch (a :class:`Batch`, or the rows
        layout's tensors), shaped like its ``loss_mask`` and zero where ``loss_mask == 0``. Sequences
        are found through the batch contract, so rows and packed layouts are served alike."""
        if not isinstance(batch, Batch):
            batch = Batch.from_rows(batch, num_pairs=len(batch["sample_idx"]))
        return cached_role_logps(self, [batch], role)[0]


def _check_pairs(batch: Batch) -> None:
    pairs = batch.num_pairs
    if int(batch["sample_idx"].numel()) != pairs or batch.num_sequences != 2 * pairs:
        raise ValueError(f"a batch of {int(batch['sample_idx'].numel())} pairs holds {batch.num_sequences} sequences; "
                         "expected 2 x pairs")


def _owners(batch: Batch) -> torch.Tensor:
    """Which sequence each position belongs to, flattened (-1: none)."""
    if batch.packed:
        return batch["sequence_ids"].reshape(-1)
    rows, seq = batch.shape
    device = batch["loss_mask"].device
    return torch.arange(rows, device=device).repeat_interleave(seq)


def _response_counts(batch: Batch, owners: torch.Tensor, on: torch.Tensor) -> torch.Tensor:
    """Response tokens of each sequence, on the batch's device without a host round trip ([N], int64)."""
    counts = torch.zeros(batch.num_sequences + 1, dtype=torch.int64, device=on.device)
    return counts.index_add_(0, owners + 1, on.to(torch.int64))[1:]  # slot 0 collects the tail (-1)


def _count_mismatch(cache: LogprobCache, batch: Batch, samples: np.ndarray, expected: np.ndarray) -> str:
    """The message for the first sequence whose response-token count differs from the cache's span."""
    owners = _owners(batch)
    on = batch["loss_mask"].reshape(-1) != 0
    got = _response_counts(batch, owners, on).cpu().numpy()
    sequence = int(np.flatnonzero(got != expected)[0])
    pairs = len(samples)
    sample, side = int(samples[sequence % pairs]), sequence // pairs
    return (f"{cache.path}: sample {sample} ({'chosen' if side == 0 else 'rejected'}) has {int(got[sequence])} "
            f"response tokens in this batch but {int(expected[sequence])} in the cache: the data were prepared or "
            f"truncated differently from when the cache was made; {RERUN} on this data set")


def _slot_layout(batches: Sequence[Batch]) -> tuple[np.ndarray, int]:
    """(each batch's first slot, the number of slots) of a step (see :func:`_step_slots`): batch ``b``
    has ``1 + N_b`` slots."""
    ends = np.cumsum([1 + batch.num_sequences for batch in batches]).astype(np.int64)
    return np.concatenate([[0], ends[:-1]]).astype(np.int64), int(ends[-1])


def _step_slots(batches: Sequence[Batch], firsts: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Every position of the step's batches, flattened and concatenated: (its slot, whether it is a
    response token, whether any batch is packed). Batch ``b``'s sequence ``n`` is slot
    ``firsts[b] + 1 + n``; its first slot ``firsts[b]`` collects positions of no sequence (the packed
    tail), so slots ascend in (batch, sequence) order: the order of the cache's values for the step."""
    device = batches[0]["loss_mask"].device
    owners = torch.cat([_owners(batch) for batch in batches])
    on = torch.cat([batch["loss_mask"].reshape(-1) for batch in batches]) != 0
    if len(batches) == 1:
        return owners + 1, on, batches[0].packed
    sizes = torch.tensor([batch.num_tokens for batch in batches], device=device)
    base = torch.from_numpy(firsts).to(device).repeat_interleave(sizes)
    return owners + 1 + base, on, any(batch.packed for batch in batches)


def _place_step(slots: torch.Tensor, on: torch.Tensor, values: torch.Tensor, *, packed: bool) -> torch.Tensor:
    """``values`` (``[R, V]``: per role, the step's response-token log-probs back to back in slot order)
    put at their positions (``[R, positions]``): the k-th response position in (slot, position) order
    gets ``values[:, k]``, every other position 0.

    Positions are ordered by a stable sort on the slot, so any layout whose sequences keep their own
    tokens in order works (rows, packed segments in any order); all on device, no host synchronisation."""
    if packed:
        order = torch.sort(slots, stable=True).indices
        sorted_on = on[order]
    else:  # row n of each batch is its sequence n: the concatenation is already in slot order
        order, sorted_on = None, on
    if values.shape[1] == 0:
        picked = torch.zeros((values.shape[0], on.numel()), dtype=torch.float32, device=on.device)
    else:
        rank = torch.cumsum(sorted_on.to(torch.int64), 0) - 1
        picked = values[:, rank.clamp(min=0, max=values.shape[1] - 1)]
        picked = torch.where(sorted_on, picked, torch.zeros((), dtype=torch.float32, device=on.device))
    if order is not None:
        picked = torch.empty_like(picked).index_copy_(1, order, picked)
    return picked


def cached_step_logps(cache: LogprobCache, batches: Sequence[Batch], roles: Sequence[str]
                      ) -> dict[str, list[torch.Tensor]]:
    """``{role: [fp32 full-length log-probs per batch]}`` (each shaped like its ``loss_mask``, zero where
    it is 0), on the batches' device.

    Per step, not per batch or sequence: one host read of the batches' sample ids, one indexed read of
    each role's values file, one copy to the device, one synchronisation for the token-count check,
    and one placement of every role on all the batches' positions at once (:func:`_place_step`), without
    touching a mask on the host. Per batch only its owners and mask are concatenated in and its
    views cut out."""
    for role in roles:
        cache._check_role(role)
    if not batches:
        return {role: [] for role in roles}
    for batch in batches:
        _check_pairs(batch)
    ids = torch.cat([batch["sample_idx"].reshape(-1) for batch in batches]).cpu().numpy()
    splits = np.cumsum([batch.num_pairs for batch in batches])[:-1]
    samples = np.split(ids, splits)
    spans = [cache.sequence_spans(s) for s in samples]
    starts = np.concatenate([start for start, _ in spans])
    lengths = np.concatenate([length for _, length in spans])
    index = cache.value_index(starts, lengths)
    device = batches[0]["loss_mask"].device
    values = torch.from_numpy(np.stack([cache.read_values(role, index) for role in roles])).to(device)
    firsts, slot_count = _slot_layout(batches)
    slots, on, packed = _step_slots(batches, firsts)
    expected = torch.from_numpy(lengths).to(device)
    counts = torch.zeros(slot_count, dtype=torch.int64, device=device).index_add_(0, slots, on.to(torch.int64))
    sequence_slots = np.ones(slot_count, dtype=bool)
    sequence_slots[firsts] = False  # each batch's first slot collects positions of no sequence
    if not bool(torch.equal(counts[torch.from_numpy(sequence_slots).to(device)], expected)):  # one synchronisation
        for batch, sample_ids, (_, length) in zip(batches, samples, spans):
            if not torch.equal(_response_counts(batch, _owners(batch), batch["loss_mask"].reshape(-1) != 0).cpu(),
                               torch.from_numpy(length)):
                raise CacheMismatchError(_count_mismatch(cache, batch, sample_ids, length))
    placed = _place_step(slots, on, values, packed=packed)
    sizes = [batch.num_tokens for batch in batches]
    out = {role: [] for role in roles}
    for r, role in enumerate(roles):
        for part, batch in zip(placed[r].split(sizes), batches):
            out[role].append(part.reshape(batch["loss_mask"].shape))
    return out


def cached_role_logps(cache: LogprobCache, batches: Sequence[Batch], role: str) -> list[torch.Tensor]:
    """fp32 full-length log-probs of ``role`` for each batch (shaped like its ``loss_mask``, zero where it
    is 0), on the batch's device: :func:`cached_step_logps` of one role."""
    return cached_step_logps(cache, batches, (role,))[role]


# ------------------------------------------------------------------------------------------------
# training-side entry point: the same structure as runtime.schedule.score_logps
# ------------------------------------------------------------------------------------------------


def attach_cached_logps(cache: LogprobCache, batches: list[Batch]) -> list[Batch]:
    """The micro-batches carrying each cached role's full-length log-probs under
    ``runtime.frozen.logps_key(role)``, where online scoring puts them for the loss (the schedule slices
    them for context parallelism with the other per-token tensors). Only the last pipeline stage reads
    them: elsewhere the batches are returned unchanged."""
    from megatron.core import parallel_state as ps

    from megatron_tgdpo.runtime.frozen import logps_key

    if not ps.is_pipeline_last_stage(ignore_virtual=True):
        return list(batches)
    with compat.cpu_device_hook_paused():  # device arguments here are the batches' own: nothing to rewrite
        per_role = cached_step_logps(cache, batches, cache.roles)
    return [batch.with_per_token(**{logps_key(role): per_role[role][i] for role in cache.roles})
            for i, batch in enumerate(batches)]


def cached_logps(cache: LogprobCache, batches: list[Batch]) -> dict[str, list[torch.Tensor]]:
    """``{role: [fp32 logps * loss_mask per micro-batch]}`` on this rank's context-parallel slice, on
    the batch's device; empty lists off the last pipeline stage (as ``score_logps``)."""
    from megatron.core import parallel_state as ps

    from megatron_tgdpo.runtime.frozen import logps_key
    from megatron_tgdpo.runtime.schedule import context_parallel

    out: dict[str, list[torch.Tensor]] = {role: [] for role in cache.roles}
    if not ps.is_pipeline_last_stage(ignore_virtual=True):
        return out
    cp_rank, cp_size, _ = context_parallel()
    for batch in attach_cached_logps(cache, batches):
        local = batch.for_context_parallel(cp_rank=cp_rank, cp_size=cp_size)
        for role in cache.roles:
            out[role].append(local[logps_key(role)] * local["loss_mask"])
    return out
