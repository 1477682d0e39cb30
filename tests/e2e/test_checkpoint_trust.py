"""A checkpoint that lies is not used, and loading one runs no code.

One short training run (the real command line, one process) writes ``iter_0000001`` and
``iter_0000002``; each test damages a copy of them the way a hand edit, a bad copy or an attacker
would, and updates the manifest's checksums (and, where the point is the cross-checks, its own digest)
so that only the check under test stands in the way:

* manifest edits (iteration, consumed samples, the file list) -> the newest checkpoint is skipped with
  the reason and the older one is used, as for bit rot;
* a truncated ``.distcp`` and a garbled ``.metadata`` that pass their checksums -> skipped the same way;
* a pickle payload (``__reduce__`` -> ``exec`` writing a marker file) in each pickled file the loaders
  read (``.metadata``, ``common.pt``, a byte item in a ``.distcp``) and in the log-prob cache's arrays ->
  refused, naming the file; the marker never appears, through ``--load``, ``--ref-load``,
  ``--guidance-load``, ``megatron-to-hf`` and the cache. With ``--trust-checkpoint`` the same payload
  does run (the control that shows the payload is live), and a legitimate checkpoint loads.

The ``--load`` / ``--ref-load`` / ``--guidance-load`` cases run the real command line; the rest call
the same functions the commands call, in this process.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import io
import json
import logging
import pickle
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pytest
import torch

from megatron_tgdpo import checkpointing, integrity, safe_pickle
from megatron_tgdpo.testing import TrainingJob

ROOT = Path(__file__).resolve().parents[2]
SEED = 7
BASE = ["--model", "tiny", "--micro-batch-size", "2", "--global-batch-size", "4", "--seq-length", "64",
        "--lr", "3e-3", "--seed", SEED, "--eval-iters", "0", "--no-tensorboard"]
TIMEOUT = 300.0
REFUSED = "refused to unpickle builtins.exec"


class _Payload:
    """Unpickling this writes ``path``: code run by loading a file."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (exec, (f"open({self.path!r}, 'w').close()",))


# ----------------------------------------------------------------------------------------------
# the checkpoints, and ways to damage a copy
# ----------------------------------------------------------------------------------------------


def _job(work: Path, name: str, *flags) -> tuple[int, str]:
    job = TrainingJob([*BASE, "--data-cache-dir", work / "data", "--log-dir", work / name, *flags],
                      out=work / f"{name}.out", nproc=0, cwd=ROOT)
    try:
        code = job.proc.wait(TIMEOUT)
    except subprocess.TimeoutExpired:
        job.kill_all()
        raise AssertionError(f"{name}: still running after {TIMEOUT:.0f} s\n{job.output[-3000:]}") from None
    return code, job.output


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("trust")


@pytest.fixture(scope="module")
def saved(work: Path) -> Path:
    """A save root with iter_0000001 and iter_0000002 (global batch 4: 4 and 8 samples consumed)."""
    save = work / "save"
    code, out = _job(work, "first", "--loss-type", "dpo", "--train-iters", 2, "--save", save, "--save-interval", 1)
    assert code == 0, out[-3000:]
    return save


@pytest.fixture
def copy(saved: Path, tmp_path: Path) -> Path:
    root = tmp_path / "save"
    shutil.copytree(saved, root)
    return root


def _meta(ckpt: Path) -> dict:
    return json.loads((ckpt / checkpointing.METADATA).read_text())


def _write_meta(ckpt: Path, meta: dict, *, seal: bool) -> None:
    integrity.write_json_atomic(ckpt / checkpointing.METADATA, integrity.seal(meta) if seal else meta)


def _relist(ckpt: Path, *names: str) -> None:
    """The manifest's size and CRC-32 of ``names`` updated, and its digest: only the content checks remain."""
    meta = _meta(ckpt)
    meta["files"].update(integrity.describe_files(ckpt, names))
    _write_meta(ckpt, meta, seal=True)


def _edit(field: str, value) -> Callable[[Path], None]:
    def edit(ckpt: Path, *, seal: bool) -> None:
        meta = _meta(ckpt)
        meta[field] = value
        _write_meta(ckpt, meta, seal=seal)
    return edit


def _plain_metadata(ckpt: Path):
    with open(ckpt / ".metadata", "rb") as handle:
        return pickle.load(handle)


def _payload_in_metadata(ckpt: Path, marker: Path) -> str:
    metadata = _plain_metadata(ckpt)
    metadata.__dict__["note"] = _Payload(marker)  # restored by setattr after the payload ran
    (ckpt / ".metadata").write_bytes(pickle.dumps(metadata))
    _relist(ckpt, ".metadata")
    return ".metadata"


def _payload_in_common(ckpt: Path, marker: Path) -> str:
    common = torch.load(ckpt / "common.pt", weights_only=False)
    common["note"] = _Payload(marker)
    torch.save(common, ckpt / "common.pt")
    _relist(ckpt, "common.pt")
    return "common.pt"


def _payload_in_byte_item(ckpt: Path, marker: Path) -> str:
    """The RNG state (a pickled byte item) rewritten with a payload, appended to its .distcp file, and
    the .metadata entry pointed at it."""
    metadata = _plain_metadata(ckpt)
    index, info = next((i, s) for i, s in metadata.storage_data.items() if i.fqn.startswith("rng_state"))
    shard = ckpt / info.relative_path
    with open(shard, "rb") as handle:
        handle.seek(info.offset)
        state = torch.load(io.BytesIO(handle.read(info.length)), weights_only=False)
    state[0]["note"] = _Payload(marker)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    offset = shard.stat().st_size
    with open(shard, "ab") as handle:
        handle.write(buffer.getvalue())
    metadata.storage_data[index] = dataclasses.replace(info, offset=offset, length=len(buffer.getvalue()))
    (ckpt / ".metadata").write_bytes(pickle.dumps(metadata))
    _relist(ckpt, ".metadata", info.relative_path)
    return info.relative_path


PAYLOADS = {"metadata": _payload_in_metadata, "common": _payload_in_common, "byte-item": _payload_in_byte_item}


@contextlib.contextmanager
def _trusting(enabled: bool) -> Iterator[None]:
    before = safe_pickle.trusted()
    safe_pickle.trust_checkpoints(enabled)
    try:
        yield
    finally:
        safe_pickle.trust_checkpoints(before)


def _newest_usable(root: Path, caplog) -> tuple[str, str]:
    """(the checkpoint a load of ``root`` would use, the warnings saying why others were skipped)."""
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="megatron_tgdpo.checkpointing"):
        found = checkpointing.find_latest(root, verify="checksums")
    return (found.name if found else "none"), caplog.text


# ----------------------------------------------------------------------------------------------
# the manifest checks itself and is checked against the checkpoint
# ----------------------------------------------------------------------------------------------

EDITS = {
    "iteration 2 -> 1": (_edit("iteration", 1), "says iteration 1, the directory is iter_0000002"),
    "consumed_samples 8 -> 0": (_edit("consumed_samples", 0),
                                "says consumed_samples 0, the checkpoint's own state"),
    "files {}": (_edit("files", {}), "lists no files, though the directory holds .metadata, __0_0.distcp"),
}


def test_the_intact_checkpoints_are_used_as_they_are(saved, caplog):
    assert _newest_usable(saved, caplog) == ("iter_0000002", "")
    meta = _meta(saved / "iter_0000002")
    assert meta["format_version"] == checkpointing.FORMAT_VERSION == 3
    assert meta["iteration"] == 2 and meta["consumed_samples"] == 8
    assert integrity.seal_problem(meta, path="m") is None


@pytest.mark.parametrize("case", sorted(EDITS))
def test_an_edited_manifest_is_damage_and_the_older_checkpoint_is_used(copy, caplog, case):
    edit, cross_check = EDITS[case]
    newest = copy / "iter_0000002"
    edit(newest, seal=False)  # a plain edit: the manifest's own digest no longer matches
    assert _newest_usable(copy, caplog) == ("iter_0000001", caplog.text)
    assert f"skipping {newest}: {newest / checkpointing.METADATA}: its content does not match its manifest_sha256" \
        in caplog.text
    edit(newest, seal=True)  # the digest recomputed too: the cross-check still catches it
    name, text = _newest_usable(copy, caplog)
    assert name == "iter_0000001" and f"skipping {newest}:" in text and cross_check in text, text
    with pytest.raises(checkpointing.CheckpointError, match="cannot be used"):
        checkpointing.resolve(newest, verify="checksums")


def test_a_file_list_that_leaves_a_file_out_is_damage(copy, caplog):
    newest = copy / "iter_0000002"
    meta = _meta(newest)
    del meta["files"]["common.pt"]
    _write_meta(newest, meta, seal=True)
    name, text = _newest_usable(copy, caplog)
    assert name == "iter_0000001"
    assert f"{newest}: holds files tgdpo_checkpoint.json does not list (common.pt)" in text, text


def test_a_checkpoint_of_the_previous_format_is_read_with_a_note(copy, caplog):
    """Version policy: format 2 (no digest, no progress record) still loads; it is said once."""
    newest = copy / "iter_0000002"
    meta = _meta(newest)
    meta["format_version"] = 2
    del meta[integrity.DIGEST]
    _write_meta(newest, meta, seal=False)
    common = torch.load(newest / "common.pt", weights_only=False)
    del common["tgdpo_progress"]
    torch.save(common, newest / "common.pt")
    meta["files"].update(integrity.describe_files(newest, ["common.pt"]))
    _write_meta(newest, meta, seal=False)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="megatron_tgdpo.checkpointing"):
        assert checkpointing.resolve(copy, verify="checksums") == newest
    assert "format_version 2" in caplog.text and "carries no digest" in caplog.text, caplog.text


# ----------------------------------------------------------------------------------------------
# damage that passes the checksums
# ----------------------------------------------------------------------------------------------


def _truncate_shard(ckpt: Path) -> str:
    victim = max(ckpt.glob("*.distcp"), key=lambda p: p.stat().st_size)
    with open(victim, "r+b") as handle:
        handle.truncate(victim.stat().st_size // 2)
    _relist(ckpt, victim.name)
    return f"{victim}: {victim.stat().st_size} bytes, but .metadata places data up to byte"


def _garble_metadata(ckpt: Path) -> str:
    (ckpt / ".metadata").write_bytes(np.random.default_rng(3).bytes(4096))
    _relist(ckpt, ".metadata")
    return f"{ckpt / '.metadata'}: not a readable pickle"


@pytest.mark.parametrize("damage", [_truncate_shard, _garble_metadata], ids=["truncated-distcp", "garbage-metadata"])
def test_damage_with_matching_checksums_falls_back_to_the_older_checkpoint(copy, caplog, damage):
    newest = copy / "iter_0000002"
    reason = damage(newest)
    name, text = _newest_usable(copy, caplog)
    assert name == "iter_0000001" and f"skipping {newest}: {reason}" in text, text


# ----------------------------------------------------------------------------------------------
# pickles run no code
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(PAYLOADS))
def test_a_payload_is_refused_and_never_runs_unless_trusted(copy, tmp_path, caplog, kind):
    newest, marker = copy / "iter_0000002", tmp_path / "ran"
    where = PAYLOADS[kind](newest, marker)
    name, text = _newest_usable(copy, caplog)
    assert name == "iter_0000001", text
    assert f"skipping {newest}: {newest / where}" in text and REFUSED in text and "--trust-checkpoint" in text, text
    assert not marker.exists()
    with _trusting(True):  # the control: the opt-out reads it with the plain loaders, and the payload runs
        assert _newest_usable(copy, caplog)[0] == "iter_0000002"
    assert marker.exists()


def test_ranks_share_the_pickled_items_and_together_check_every_one(copy, tmp_path):
    """A load verifies in parallel (``share=(rank, world)``): each byte item is read by one rank."""
    from megatron_tgdpo.checkpointing.contents import contents_problem

    newest, marker = copy / "iter_0000002", tmp_path / "ran"
    clean = [contents_problem(newest, _meta(newest), share=(i, 3)) for i in range(3)]
    assert clean == [None] * 3
    where = _payload_in_byte_item(newest, marker)
    for world in (1, 2, 3, 7):
        reasons = [contents_problem(newest, _meta(newest), share=(i, world)) for i in range(world)]
        refused = [r for r in reasons if r is not None]
        assert len(refused) == 1 and f"{newest / where} (item rng_state" in refused[0] and REFUSED in refused[0], reasons
    assert not marker.exists()


def _converter():
    spec = importlib.util.spec_from_file_location("convert_checkpoint_tool", ROOT / "tools" / "convert_checkpoint.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("kind", sorted(PAYLOADS))
def test_megatron_to_hf_refuses_a_payload(copy, tmp_path, capsys, kind):
    newest, marker = copy / "iter_0000002", tmp_path / "ran"
    PAYLOADS[kind](newest, marker)
    code = _converter().main(["megatron-to-hf", "--load", str(newest), "--output", str(tmp_path / "hf")])
    err = capsys.readouterr().err
    assert code == 2 and REFUSED in err and "Traceback" not in err, err
    assert not marker.exists() and not (tmp_path / "hf").exists()
    # The older checkpoint of the same root converts.
    assert _converter().main(["megatron-to-hf", "--load", str(copy / "iter_0000001"),
                              "--output", str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "config.json").is_file()


def test_load_skips_a_checkpoint_with_a_payload_and_resumes_the_older_one(copy, work, tmp_path):
    newest, marker = copy / "iter_0000002", tmp_path / "ran"
    _payload_in_metadata(newest, marker)
    code, out = _job(work, "load-payload", "--loss-type", "dpo", "--train-iters", 2, "--load", copy)
    assert code == 0, out[-3000:]
    assert f"skipping {newest}: {newest / '.metadata'}: {REFUSED}" in out, out[-3000:]
    assert f"resumed from {copy / 'iter_0000001'} (iteration 1, 4 samples consumed)" in out, out[-3000:]
    assert out.count(REFUSED) == 1, out[-3000:]  # said once, though the run resolves the root several times
    assert not marker.exists()


@pytest.mark.parametrize("flag, loss, kind", [("--ref-load", "dpo", "common"),
                                              ("--guidance-load", "tgdpo", "byte-item")])
def test_ref_and_guidance_load_refuse_a_payload(copy, work, tmp_path, flag, loss, kind):
    newest, marker = copy / "iter_0000002", tmp_path / "ran"
    where = PAYLOADS[kind](newest, marker)
    code, out = _job(work, f"{flag[2:]}-payload", "--loss-type", loss, "--train-iters", 1, flag, newest)
    assert code != 0 and f"{newest / where}" in out and REFUSED in out, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    assert not marker.exists()


def test_trust_checkpoint_loads_a_legitimate_checkpoint(copy, work):
    code, out = _job(work, "trusted", "--loss-type", "dpo", "--train-iters", 2, "--load", copy, "--trust-checkpoint")
    assert code == 0, out[-3000:]
    assert f"resumed from {copy / 'iter_0000002'} (iteration 2, 8 samples consumed)" in out, out[-3000:]


# ----------------------------------------------------------------------------------------------
# the log-prob cache
# ----------------------------------------------------------------------------------------------


def _cache(work: Path, out: Path) -> tuple[Path, Path]:
    """A small cache (reference role, seeded init) over the built-in data set the run prepared."""
    from megatron_tgdpo import logprob_cache

    prefix = work / "data" / "synthetic_train"
    samples = 4
    staging = logprob_cache.staging_dir(out)
    logprob_cache.write_shard(staging, rank=0, samples=range(samples), counts=np.full((samples, 2), 3),
                              values={"reference": -np.arange(6 * samples, dtype=np.float32)})
    info = {"dataset": {"prefix": str(prefix), "fingerprint": logprob_cache.fingerprint_dataset(prefix),
                        "num_samples": samples},
            "roles": {"reference": {"checkpoint": logprob_cache.fingerprint_model(None, seed=SEED)}}}
    logprob_cache.publish_cache(out, num_samples=samples, roles=["reference"], manifest=info)
    return out, prefix


@pytest.mark.parametrize("victim", ["offsets.npy", "reference.npy"])
def test_logprob_cache_refuses_pickled_arrays(saved, work, tmp_path, victim):
    from megatron_tgdpo.logprob_cache import CacheFormatError, LogprobCache

    cache, prefix = _cache(work, tmp_path / "cache")

    def open_cache() -> LogprobCache:
        return LogprobCache(cache, dataset_prefix=prefix, ref_load=None, guidance_load=None, seed=SEED,
                            need_guidance=False, allow_partial=True, verify_sha256=True)

    assert open_cache().sample_logps(1, "reference")[0].tolist() == [-6.0, -7.0, -8.0]
    marker = tmp_path / "ran"
    np.save(cache / victim, np.array([_Payload(marker)], dtype=object), allow_pickle=True)
    meta = json.loads((cache / "manifest.json").read_text())
    meta["files"].update(integrity.describe_files(cache, [victim], algorithm="sha256"))
    integrity.write_json_atomic(cache / "manifest.json", meta)
    with _trusting(True):  # the cache never holds objects: no flag makes it unpickle one
        with pytest.raises(CacheFormatError, match=f"{cache / victim}: refused"):
            open_cache()
    assert not marker.exists()


def test_a_cache_of_another_run_is_a_flag_error_not_a_traceback(saved, work, tmp_path):
    """A real cache made for another reference (here: another seed's init) stops the run before any
    step with exit 2 and one line naming --logprob-cache and the mismatch."""
    cache, _ = _cache(work, tmp_path / "cache")
    code, out = _job(work, "other-cache", "--loss-type", "dpo", "--train-iters", 1, "--logprob-cache", cache,
                     "--seed", SEED + 1)
    assert code == 2, out[-3000:]
    assert f"--logprob-cache {cache}:" in out and "seeded-init:" in out, out[-3000:]
    assert "Traceback" not in out, out[-3000:]


def test_trust_checkpoint_is_a_flag_of_the_trainer():
    from megatron_tgdpo.config import parse_args

    assert parse_args(["--trust-checkpoint"]).trust_checkpoint is True
    assert parse_args([]).trust_checkpoint is False


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
