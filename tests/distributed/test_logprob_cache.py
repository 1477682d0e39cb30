"""Offline log-prob cache: tools/precompute_logprobs.py writes what online scoring computes (bit-exact
at the same layout, < 1e-5 across layouts), and a cache that does not fit the run is refused with a
message naming the difference; truncated or half-written caches are never read."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_tgdpo import integrity
from megatron_tgdpo.config import parse_args
from megatron_tgdpo.logprob_cache import CacheFormatError, CacheMismatchError, LogprobCache
from megatron_tgdpo.testing import read_metrics, run_on_ranks, run_train

from suite import load_tool

LIMIT = 64  # pairs scored: enough for several steps per rank, fast on 2 CPU cores
SEED = 11


TOOL = load_tool("precompute_logprobs")


def _argv(data_cache: Path, *extra: str) -> list[str]:
    return ["--model", "tiny", "--seq-length", "64", "--no-pack-sequences", "--micro-batch-size", "8", "--seed", str(SEED),
            "--data-cache-dir", str(data_cache), "--log-interval", "1000", *extra]


# ------------------------------------------------------------------------------------------------
# rank functions (run inside forked gloo ranks)
# ------------------------------------------------------------------------------------------------


def _save_seeded_checkpoint(argv: list[str], root: str) -> str:
    """A torch_dist checkpoint of the seeded-init tiny model (a stand-in guidance model)."""
    from megatron_tgdpo import checkpointing, distributed
    from megatron_tgdpo.models.sources import ModelSource
    from megatron_tgdpo.runtime import setup

    cfg = parse_args(argv)
    data = setup.resolve_data(cfg)
    distributed.init_model_parallel(seed=cfg.seed)
    arch, _ = setup.resolve_architecture(cfg, tokenizer_vocab=data.vocab_size)
    chunks = setup.build_frozen(arch, cfg, ModelSource.of(None, seed=cfg.seed))
    return str(checkpointing.save_checkpoint(root, iteration=1, parts={"policy": checkpointing.CheckpointPart(chunks)},
                                             state={"config": cfg.to_dict()}))


def _precompute_and_compare(argv: list[str], output: str) -> dict:
    """Run the tool, then score the same batches online in this layout and compare with the cache."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_tgdpo.logprob_cache import cached_logps
    from megatron_tgdpo.models.sources import ModelSource
    from megatron_tgdpo.runtime import setup
    from megatron_tgdpo.runtime.data import BatchSource
    from megatron_tgdpo.runtime.schedule import LogprobSettings, score_logps

    tool_args, cfg = TOOL.parse(argv + ["--output", output, "--limit-samples", str(LIMIT)])
    TOOL.run(cfg, output=tool_args.output, limit_samples=tool_args.limit_samples)

    cfg = TOOL.scoring_config(cfg, dist.get_world_size())  # the tool's batch size: the same batches
    data = setup.resolve_data(cfg)
    prefix, pad_id = data.train_prefix, data.pad_id
    arch, _ = setup.resolve_architecture(cfg, tokenizer_vocab=data.vocab_size)
    models = {"reference": setup.build_frozen(arch, cfg, ModelSource.of(cfg.ref_load, seed=cfg.seed))}
    if cfg.guidance_load:
        models["guidance"] = setup.build_frozen(arch, cfg, ModelSource.of(cfg.guidance_load, seed=cfg.seed))
    cache = LogprobCache(output, dataset_prefix=prefix, ref_load=cfg.ref_load, guidance_load=cfg.guidance_load,
                         seed=cfg.seed, need_guidance="guidance" in models, model=cfg.model, allow_partial=True)
    source = BatchSource(cfg, prefix, pad_id, consumed_samples=0, shuffle=False)
    compared, mismatched = 0, []
    for _ in range(math.ceil(LIMIT / cfg.global_batch_size)):
        batches = source.next_global_batch()
        online = {role: score_logps(chunks, batches, logprobs=LogprobSettings.of(cfg))
                  for role, chunks in models.items()}
        cached = cached_logps(cache, batches)
        for role in models:
            for index, value in enumerate(online[role]):
                compared += 1
                if not torch.equal(cached[role][index], value) or cached[role][index].dtype != torch.float32:
                    mismatched.append((role, index, float((cached[role][index] - value).abs().max())))
    last = ps.is_pipeline_last_stage(ignore_virtual=True)
    return {"compared": compared, "mismatched": mismatched, "last_stage": last}


# ------------------------------------------------------------------------------------------------
# fixtures
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """The built-in data, a guidance checkpoint, and the single-rank cache (reference + guidance)."""
    tmp = tmp_path_factory.mktemp("logprob_cache")
    data = tmp / "data"
    guide = run_on_ranks(1, _save_seeded_checkpoint, _argv(data, "--seed", "99"), str(tmp / "guide"),
                         model_parallel=False)[0]
    single = tmp / "cache-single"
    result = run_on_ranks(1, _precompute_and_compare, _argv(data, "--guidance-load", guide), str(single),
                          model_parallel=False)[0]
    from megatron_tgdpo.data.builtin import builtin_dataset

    info = builtin_dataset(data)
    return {"tmp": tmp, "data": data, "guide": guide, "single": single, "single_result": result,
            "train": info["train_prefix"], "eval": info["eval_prefix"]}


def _open(ws: dict, path=None, **overrides) -> LogprobCache:
    kwargs = dict(dataset_prefix=ws["train"], ref_load=None, guidance_load=ws["guide"], seed=SEED,
                  need_guidance=True, model="tiny", allow_partial=True)
    kwargs.update(overrides)
    return LogprobCache(path or ws["single"], **kwargs)


def _copy(ws: dict, name: str) -> Path:
    dst = ws["tmp"] / name
    shutil.copytree(ws["single"], dst)
    return dst


# ------------------------------------------------------------------------------------------------
# values
# ------------------------------------------------------------------------------------------------


def test_single_rank_cache_equals_online_scoring_bit_exact(workspace):
    result = workspace["single_result"]
    # 64 pairs / 8 per micro-batch = 8 micro-batches, two roles each.
    assert result["compared"] == 2 * LIMIT // 8
    assert result["mismatched"] == []
    manifest = json.loads((workspace["single"] / "manifest.json").read_text())
    assert manifest["num_samples"] == LIMIT and set(manifest["roles"]) == {"reference", "guidance"}
    assert manifest["roles"]["reference"]["checkpoint"] == f"seeded-init:{SEED}"
    assert manifest["roles"]["guidance"]["checkpoint"].startswith("torch_dist:")
    assert "beta" not in json.dumps(manifest)
    cache = _open(workspace)
    # The two models differ (otherwise the role bookkeeping would go untested) and values are log-probs.
    ref, guide = cache._values["reference"], cache._values["guidance"]
    assert ref.dtype == np.float32 and np.all(ref <= 0) and not np.array_equal(ref, guide)


def test_cache_spans_are_the_loss_mask_positions(workspace):
    """Every sample's span length is its number of response tokens under the collator's mask."""
    from megatron_tgdpo.data import PreferenceCollator, PreferenceDataset

    cache = _open(workspace)
    dataset = PreferenceDataset(workspace["train"])
    batch = PreferenceCollator(pad_id=0)([dataset[i] for i in (5, 3, 60)])
    full = cache.batch_logps(batch, "reference")
    assert full.shape == batch["loss_mask"].shape and full.dtype == torch.float32
    assert torch.all(full[batch["loss_mask"] == 0] == 0) and torch.all(full[batch["loss_mask"] == 1] < 0)
    chosen, rejected = cache.sample_logps(3, "reference")
    assert torch.equal(full[1][batch["loss_mask"][1] == 1], torch.from_numpy(chosen))
    assert torch.equal(full[4][batch["loss_mask"][4] == 1], torch.from_numpy(rejected))


def _reversed_segments(batch):
    """The same packed row with its sequences' segments in reverse order (the tail stays last): the
    sequence ids then descend along the row."""
    from megatron_tgdpo.data.batch import Batch

    bounds = batch.segment_bounds()
    segments = [(bounds[n], bounds[n + 1]) for n in range(batch.num_sequences)][::-1]
    tail = [(bounds[batch.num_sequences], bounds[-1])] if bounds[-1] > bounds[batch.num_sequences] else []
    order = torch.cat([torch.arange(a, b) for a, b in segments + tail])
    lengths = [b - a for a, b in segments + tail]
    tensors = {k: (v[:, order] if k in batch.per_token else v) for k, v in batch.tensors.items()}
    tensors["cu_seqlens"] = torch.tensor([0, *np.cumsum(lengths).tolist()], dtype=torch.int32)
    return Batch.from_packed(tensors, num_pairs=batch.num_pairs, num_sequences=batch.num_sequences)


def test_every_layout_gets_each_sequences_cached_span(workspace):
    """Rows, packed rows and packed rows whose sequences are out of order: each sequence's loss-mask
    positions hold exactly its sample's cached span (read one sample at a time), zero elsewhere."""
    from megatron_tgdpo.data import PreferenceCollator, PreferenceDataset
    from megatron_tgdpo.data.packing import PackedPreferenceCollator

    cache = _open(workspace)
    dataset = PreferenceDataset(workspace["train"])
    items = [dataset[i] for i in (9, 2, 41)]
    packed = PackedPreferenceCollator(pad_id=0, pad_to_multiple_of=64)(items)
    for batch in (PreferenceCollator(pad_id=0)(items), packed, _reversed_segments(packed)):
        full = cache.batch_logps(batch, "guidance")
        mask = batch["loss_mask"] == 1
        owners = batch["sequence_ids"] if "sequence_ids" in batch else torch.arange(6)[:, None].expand_as(mask)
        assert full.dtype == torch.float32 and torch.all(full[~mask] == 0)
        for sequence in range(6):
            want = cache.sample_logps(int(items[sequence % 3]["index"]), "guidance")[sequence // 3]
            assert torch.equal(full[mask & (owners == sequence)], torch.from_numpy(want)), sequence


def test_a_steps_batches_and_roles_at_once_get_each_sequences_cached_span(workspace):
    """A step's micro-batches placed in one call for both roles (rows, and packed rows with sequences in
    and out of order): each batch's loss-mask positions hold its own samples' spans, read one sample at
    a time, zero elsewhere; a count that differs in a later batch names that batch's sample."""
    from megatron_tgdpo.data import PreferenceCollator, PreferenceDataset
    from megatron_tgdpo.data.batch import Batch
    from megatron_tgdpo.data.packing import PackedPreferenceCollator
    from megatron_tgdpo.logprob_cache import cached_step_logps

    cache = _open(workspace)
    dataset = PreferenceDataset(workspace["train"])
    groups = [(9, 2, 41), (17, 5), (30, 11, 4)]
    packer = PackedPreferenceCollator(pad_id=0, pad_to_multiple_of=64)
    layouts = {
        "rows": [Batch.from_rows(PreferenceCollator(pad_id=0)([dataset[i] for i in g]), num_pairs=len(g))
                 for g in groups],
        "packed": [packer([dataset[i] for i in g]) for g in groups],
    }
    layouts["packed, reordered"] = [_reversed_segments(b) if n != 1 else b for n, b in enumerate(layouts["packed"])]
    for name, batches in layouts.items():
        placed = cached_step_logps(cache, batches, ("reference", "guidance"))
        for role in ("reference", "guidance"):
            assert len(placed[role]) == len(batches)
            for group, batch, full in zip(groups, batches, placed[role]):
                mask = batch["loss_mask"] == 1
                n = 2 * len(group)
                owners = batch["sequence_ids"] if "sequence_ids" in batch else torch.arange(n)[:, None].expand_as(mask)
                assert full.shape == mask.shape and full.dtype == torch.float32 and torch.all(full[~mask] == 0)
                for sequence in range(n):
                    want = cache.sample_logps(group[sequence % len(group)], role)[sequence // len(group)]
                    assert torch.equal(full[mask & (owners == sequence)], torch.from_numpy(want)), (name, role, sequence)
    batches = layouts["rows"]
    first = int(batches[2]["loss_mask"][4].nonzero()[0])
    batches[2]["loss_mask"][4, first] = 0  # as if the rejected response of sample 11 were one token shorter
    with pytest.raises(CacheMismatchError, match=r"sample 11 \(rejected\) has \d+ response tokens in this batch"):
        cached_step_logps(cache, batches, ("reference",))


def test_tensor_parallel_cache_bit_exact_online_and_close_to_single_rank(workspace):
    ws = workspace
    out = ws["tmp"] / "cache-tp2"
    argv = _argv(ws["data"], "--guidance-load", ws["guide"], "--tensor-model-parallel-size", "2")
    results = run_on_ranks(2, _precompute_and_compare, argv, str(out), model_parallel=False)
    for rank, result in enumerate(results):
        assert result["compared"] == 2 * LIMIT // 8 and result["mismatched"] == [], f"rank {rank}: {result}"
    single = np.load(ws["single"] / "offsets.npy")
    assert np.array_equal(np.load(out / "offsets.npy"), single)
    for role in ("reference", "guidance"):
        a, b = np.load(ws["single"] / f"{role}.npy"), np.load(out / f"{role}.npy")
        assert a.shape == b.shape and float(np.abs(a - b).max()) < 1e-5, role


def test_context_data_pipeline_parallel_caches_close_to_single_rank(workspace):
    """CP=2 (chunks gathered on the last stage), DP=2 (two shards merged) and PP=2 (rank 0, on the first
    stage, publishes what the last stage scored), reference only."""
    ws = workspace
    layouts = (("cache-cp2", ["--context-parallel-size", "2"]), ("cache-dp2", []),
               ("cache-pp2", ["--pipeline-model-parallel-size", "2"]))
    for name, extra in layouts:
        out = ws["tmp"] / name
        results = run_on_ranks(2, _precompute_and_compare, _argv(ws["data"], *extra), str(out), model_parallel=False)
        assert all(r["compared"] > 0 for r in results if r["last_stage"]), (name, results)
        assert all(r["mismatched"] == [] for r in results), (name, results)
        manifest = json.loads((out / "manifest.json").read_text())
        assert set(manifest["roles"]) == {"reference"}
        a, b = np.load(ws["single"] / "reference.npy"), np.load(out / "reference.npy")
        assert a.shape == b.shape and float(np.abs(a - b).max()) < 1e-5, name
    with pytest.raises(CacheMismatchError, match=r"has no guidance log-probs \(roles: \['reference'\]\).*needs them"):
        _open(ws, ws["tmp"] / "cache-cp2")
    assert _open(ws, ws["tmp"] / "cache-cp2", need_guidance=False, guidance_load=None).roles == ("reference",)


# ------------------------------------------------------------------------------------------------
# refusals
# ------------------------------------------------------------------------------------------------


def test_different_seed_is_refused_naming_both_fingerprints(workspace):
    with pytest.raises(CacheMismatchError) as info:
        _open(workspace, seed=12)
    text = str(info.value)
    assert "reference checkpoint (--ref-load, --seed): the cache has seeded-init:11, this run has seeded-init:12" in text
    assert "re-run tools/precompute_logprobs.py" in text
    assert "dataset:" not in text and "guidance checkpoint" not in text  # only the difference is listed


def test_different_reference_checkpoint_is_refused(workspace):
    ws = workspace
    with pytest.raises(CacheMismatchError, match=r"the cache has seeded-init:11, this run has torch_dist:.*iter_0000001:sha256="):
        _open(ws, ref_load=ws["guide"])


def test_different_guidance_checkpoint_is_refused(workspace):
    ws = workspace
    other = ws["tmp"] / "guide-copy" / "iter_0000001"
    shutil.copytree(ws["guide"], other)
    meta = json.loads((other / "tgdpo_checkpoint.json").read_text())
    # Another checkpoint: its manifest differs (and stays consistent with itself, so it is not damaged).
    integrity.write_json_atomic(other / "tgdpo_checkpoint.json", integrity.seal({**meta, "copied_from": ws["guide"]}))
    with pytest.raises(CacheMismatchError) as info:
        _open(ws, guidance_load=str(other.parent))
    text = str(info.value)
    assert f"guidance checkpoint (--guidance-load, --seed): the cache has torch_dist:{Path(ws['guide']).resolve()}" in text
    assert f"this run has torch_dist:{other.resolve()}:sha256=" in text
    # Without --guidance-load the cache's guidance log-probs stand in for the guidance model.
    assert _open(ws, guidance_load=None).roles == ("reference", "guidance")


def test_different_dataset_is_refused(workspace):
    ws = workspace
    with pytest.raises(CacheMismatchError) as info:
        _open(ws, dataset_prefix=ws["eval"])
    text = str(info.value)
    assert f"dataset: the cache was made from {ws['train']} (sha256=" in text
    assert f";samples=4000), this run uses {ws['eval']} (sha256=" in text and ";samples=500)" in text


def test_model_preset_and_partial_coverage_are_refused(workspace):
    with pytest.raises(CacheMismatchError, match=r"model preset \(--model\): the cache has 'tiny', this run has 'llama3-8b'"):
        _open(workspace, model="llama3-8b")
    with pytest.raises(CacheMismatchError, match=r"covers only samples 0..63 of the 4000 .* without --limit-samples"):
        _open(workspace, allow_partial=False)
    cache = _open(workspace)
    with pytest.raises(CacheMismatchError, match=r"sample 64 is not in the cache \(it covers 0..63\)"):
        cache.sample_logps(64, "reference")


def test_truncated_or_partial_cache_directories_are_not_accepted(workspace):
    ws = workspace
    truncated = _copy(ws, "truncated")
    with open(truncated / "guidance.npy", "r+b") as handle:
        handle.truncate((truncated / "guidance.npy").stat().st_size - 8)
    with pytest.raises(CacheFormatError, match=r"guidance.npy: \d+ bytes, but manifest.json says \d+: truncated"):
        _open(ws, truncated)

    no_manifest = _copy(ws, "no-manifest")
    (no_manifest / "manifest.json").unlink()
    with pytest.raises(CacheFormatError, match=r"manifest.json: missing: .* not a complete log-prob cache"):
        _open(ws, no_manifest)

    torn = _copy(ws, "torn-manifest")
    text = (torn / "manifest.json").read_text()
    (torn / "manifest.json").write_text(text[: len(text) // 2])
    with pytest.raises(CacheFormatError, match=r"manifest.json: unreadable"):
        _open(ws, torn)

    missing = _copy(ws, "missing-file")
    (missing / "offsets.npy").unlink()
    with pytest.raises(CacheFormatError, match=r"offsets.npy: missing, though manifest.json lists it"):
        _open(ws, missing)

    corrupt = _copy(ws, "corrupt")
    values = np.load(corrupt / "reference.npy")
    values[0] += 1.0
    np.save(corrupt / "reference.npy", values)  # same size: only the sha256 check finds it
    with pytest.raises(CacheFormatError, match=r"reference.npy: sha256 differs"):
        _open(ws, corrupt, verify_sha256=True)


def test_interrupted_precompute_leaves_nothing_that_opens(workspace, monkeypatch):
    """A run killed before publishing leaves only ``<output>.tmp`` with shards: refused, and the
    would-be output does not exist."""
    from megatron_tgdpo import logprob_cache

    ws = workspace
    out = ws["tmp"] / "interrupted"
    staging = logprob_cache.staging_dir(out)
    logprob_cache.write_shard(staging, rank=0, samples=[0, 1], counts=np.array([[2, 3], [1, 1]]),
                              values={"reference": np.zeros(7, dtype=np.float32)})
    with pytest.raises(CacheFormatError, match=r"62 of 64 samples were not scored"):
        logprob_cache.publish_cache(out, num_samples=LIMIT, roles=["reference"], manifest={})
    assert not out.exists()
    with pytest.raises(CacheFormatError, match="not a complete log-prob cache"):
        _open(ws, staging)
    with pytest.raises(CacheFormatError, match="no such directory"):
        _open(ws, out)


def test_token_count_mismatch_is_refused(workspace):
    from megatron_tgdpo.data import PreferenceCollator, PreferenceDataset

    cache = _open(workspace)
    dataset = PreferenceDataset(workspace["train"])
    batch = PreferenceCollator(pad_id=0)([dataset[i] for i in (7, 8)])
    first = int(batch["loss_mask"][2].nonzero()[0])
    batch["loss_mask"][2, first] = 0  # as if the rejected response of sample 7 were one token shorter
    with pytest.raises(CacheMismatchError, match=r"sample 7 \(rejected\) has \d+ response tokens in this batch but \d+ in the cache"):
        cache.batch_logps(batch, "reference")


def test_existing_output_needs_overwrite(workspace):
    tool_args, cfg = TOOL.parse(_argv(workspace["data"], "--output", str(workspace["single"])))
    with pytest.raises(TOOL.ToolError, match="already exists; pass --overwrite"):
        TOOL.run(cfg, output=tool_args.output)


# ------------------------------------------------------------------------------------------------
# training with the cache (runs once train.py reads --logprob-cache)
# ------------------------------------------------------------------------------------------------

def _small_dataset(ws: dict, pairs: int) -> tuple[str, str]:
    """The first ``pairs`` built-in training pairs prepared as their own data set (prefix, tokenizer):
    a cache covering all of it takes a second to make."""
    from megatron_tgdpo.data.builtin import BUILTIN_CHAT_TEMPLATE, BUILTIN_MAX_SEQ_LENGTH, SYNTHETIC_DIR
    from megatron_tgdpo.data.prepare import PrepareConfig, prepare_preference_data

    source = ws["tmp"] / "small.jsonl"
    lines = (SYNTHETIC_DIR / "train.jsonl").read_text().splitlines()[:pairs]
    source.write_text("\n".join(lines) + "\n")
    tokenizer = str(SYNTHETIC_DIR / "tokenizer.model")
    prefix = ws["tmp"] / "small" / "train"
    prepare_preference_data(PrepareConfig(inputs=(str(source),), output_prefix=str(prefix), tokenizer=tokenizer,
                                          chat_template=BUILTIN_CHAT_TEMPLATE, max_seq_length=BUILTIN_MAX_SEQ_LENGTH,
                                          truncation="drop", min_prompt_tokens=8, workers=1))
    return str(prefix), tokenizer


def _precompute(argv: list[str], output: str) -> None:
    tool_args, cfg = TOOL.parse(argv + ["--output", output])
    TOOL.run(cfg, output=tool_args.output)


def test_training_with_cache_matches_online(workspace):
    from megatron_tgdpo.testing import RankFailure

    ws = workspace
    prefix, tokenizer = _small_dataset(ws, 48)
    data = ["--data-path", prefix, "--tokenizer", tokenizer]
    cache = ws["tmp"] / "cache-small"
    run_on_ranks(1, _precompute, _argv(ws["data"], *data, "--guidance-load", ws["guide"]), str(cache),
                 model_parallel=False)
    common = ["--model", "tiny", "--train-iters", "3", "--micro-batch-size", "2", "--global-batch-size", "8",
              "--seq-length", "64", "--no-pack-sequences", "--lr", "3e-3", "--seed", str(SEED), "--eval-iters", "0",
              "--no-tensorboard",
              "--loss-type", "tgdpo", "--guidance-load", ws["guide"], *data]
    logs = {}
    for name, extra in (("online", []), ("cached", ["--logprob-cache", str(cache)])):
        logs[name] = ws["tmp"] / f"train-{name}"
        assert run_on_ranks(1, run_train, common + ["--log-dir", str(logs[name])] + extra, model_parallel=False) == [0]
    rows = {k: read_metrics(v) for k, v in logs.items()}
    assert len(rows["online"]) == len(rows["cached"]) == 3
    for a, b in zip(rows["online"], rows["cached"]):
        for key in ("loss", "rewards/margin", "weights/chosen_mean", "grad_norm"):
            assert abs(a[key] - b[key]) < 1e-5, f"iteration {a['iteration']} {key}: {a[key]} vs {b[key]}"
    # The cache is really consulted: the same cache with another --seed (another reference) is refused.
    with pytest.raises(RankFailure, match="the cache has seeded-init:11, this run has seeded-init:12"):
        run_on_ranks(1, run_train, common + ["--logprob-cache", str(cache), "--seed", "12"], model_parallel=False)


def test_cache_made_with_packed_rows_serves_packed_and_padded_training(workspace):
    """The default layout end to end: the cache tool packs (as training does by default) and stores each
    sample's response log-probs, which serve a packed run and a padded one alike (no layout in the key)."""
    ws = workspace
    prefix, tokenizer = _small_dataset(ws, 48)
    data = ["--data-path", prefix, "--tokenizer", tokenizer]
    cache = ws["tmp"] / "cache-packed"
    argv = [a for a in _argv(ws["data"], *data, "--guidance-load", ws["guide"]) if a != "--no-pack-sequences"]
    run_on_ranks(1, _precompute, argv, str(cache), model_parallel=False)
    common = ["--model", "tiny", "--train-iters", "3", "--micro-batch-size", "2", "--global-batch-size", "8",
              "--seq-length", "64", "--lr", "3e-3", "--seed", str(SEED), "--eval-iters", "0", "--no-tensorboard",
              "--loss-type", "tgdpo", "--guidance-load", ws["guide"], *data]
    runs = {"online": [], "cached": ["--logprob-cache", str(cache)],
            "cached-padded": ["--logprob-cache", str(cache), "--no-pack-sequences"]}
    rows = {}
    for name, extra in runs.items():
        log = ws["tmp"] / f"train-packed-{name}"
        assert run_on_ranks(1, run_train, common + ["--log-dir", str(log)] + extra, model_parallel=False) == [0]
        rows[name] = read_metrics(log)
    assert len(rows["online"]) == 3
    for name in ("cached", "cached-padded"):
        for a, b in zip(rows["online"], rows[name]):
            for key in ("loss", "rewards/margin", "weights/chosen_mean", "grad_norm"):
                assert abs(a[key] - b[key]) < 1e-5, f"{name} iteration {a['iteration']} {key}: {a[key]} vs {b[key]}"
    assert rows["online"][0]["token_efficiency"] > rows["cached-padded"][0]["token_efficiency"]  # really packed
