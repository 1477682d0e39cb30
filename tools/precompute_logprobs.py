#!/usr/bin/env python
r"""Score a prepared data set once with the frozen reference (and guidance) model -> log-prob cache.

    torchrun --nproc-per-node 8 tools/precompute_logprobs.py --model llama3-8b --bf16 \
        --data-path data/prepared/train --ref-load /ckpt/llama3-8b-sft --guidance-load /ckpt/llama3-8b-dpo \
        --tensor-model-parallel-size 2 --micro-batch-size 4 --seq-length 4096 --output /cache/train-logps

then train with the same --data-path/--ref-load/--guidance-load/--seed/--model plus
``--logprob-cache /cache/train-logps``. Training checks the cache's fingerprints and refuses a mismatch.

Takes every training flag (``--help`` lists them after this tool's own); only the model, data, layout
and precision flags matter. The data set is read in order, no shuffle: each global step hands every
data-parallel rank its micro-batches (``train.BatchSource``), the models score them through the same
megatron-core schedule as online training (``scoring.score_logps``), so the cache holds what online
scoring computes. ``--global-batch-size`` is not used: a step is 4 x PP micro-batches per DP rank with
pipeline parallelism (to fill the pipeline), one without.

Context parallelism: each CP rank scores its sequence chunks; the chunks are all-gathered over the CP
group on the last pipeline stage and the full rows are cut at the loss mask there (no recomputation,
and the cache does not depend on CP). The last stage's TP-rank-0 / CP-rank-0 rank of every DP replica
writes its samples to a shard under ``<output>.tmp``; global rank 0 merges the shards, writes the
manifest last and renames the directory to ``--output``. ``--output`` must be on a file system every
rank sees (as ``--save``). Exit status 0 on success, 2 on a configuration or cache error.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

# Runnable from a checkout without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from megatron_tgdpo.config import TrainConfig, parse_tool_args  # noqa: E402

MICRO_BATCHES_PER_STAGE = 4  # micro-batches per schedule call per pipeline stage: bubble (PP-1)/(4PP+PP-1)


def tool_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="precompute_logprobs.py", add_help=False, description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--output", required=True, help="cache directory to create (published atomically)")
    parser.add_argument("--limit-samples", type=int, default=None, metavar="K",
                        help="score only samples 0..K-1 (tests, quick looks); training refuses such a cache")
    parser.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    return parser


def parse(argv: Optional[Sequence[str]] = None) -> tuple[argparse.Namespace, TrainConfig]:
    """This tool's flags, then the training flags (``config.parse_args``) from the rest."""
    ours = tool_parser()
    tool_args, cfg = parse_tool_args(ours, argv, applies="model, data, layout and precision ones")
    if tool_args.limit_samples is not None and tool_args.limit_samples < 1:
        ours.error("--limit-samples must be >= 1")
    return tool_args, cfg


class ToolError(RuntimeError):
    """A configuration problem found before any compute."""


def scoring_config(cfg: TrainConfig, world_size: int) -> TrainConfig:
    """The run's config with the batch size this tool uses, checked like a training run."""
    from megatron_tgdpo import train
    from megatron_tgdpo.models import llama

    tp, pp, cp = cfg.tensor_model_parallel_size, cfg.pipeline_model_parallel_size, cfg.context_parallel_size
    dp = max(world_size // max(tp * pp * cp, 1), 1)
    micro = MICRO_BATCHES_PER_STAGE * pp if pp > 1 else 1
    # Training-only requirements do not apply: one iteration, DPO (the roles are set by the loads).
    checked = dataclasses.replace(cfg, global_batch_size=cfg.micro_batch_size * dp * micro, train_iters=1,
                                  train_epochs=None, loss_type="dpo", logprob_cache=None, load=None, save=None,
                                  save_interval=None)
    try:
        train.check_config(checked, llama.preset(cfg.model))
    except train.ConfigError as exc:
        raise ToolError(str(exc.code)) from None
    return checked


def _full_rows(logps: torch.Tensor, seq: int) -> torch.Tensor:
    """All-gather the context-parallel chunks of ``[rows, S/cp]`` log-probs into ``[rows, S]``."""
    from megatron.core import parallel_state as ps

    from megatron_tgdpo.models.layers import cp_chunk_positions

    cp = ps.get_context_parallel_world_size()
    if cp == 1:
        return logps
    parts = [torch.empty_like(logps) for _ in range(cp)]
    dist.all_gather(parts, logps.contiguous(), group=ps.get_context_parallel_group())
    full = logps.new_zeros(logps.shape[0], seq)
    for rank, part in enumerate(parts):
        full[:, cp_chunk_positions(local_len=seq // cp, cp_rank=rank, cp_size=cp, device=logps.device)] = part
    return full


class ShardCollector:
    """This rank's scored samples (first occurrence only), cut at the loss mask, in scoring order."""

    def __init__(self, roles: Sequence[str], *, limit: int) -> None:
        self.roles = tuple(roles)
        self.limit = limit
        self.samples: list[int] = []
        self.counts: list[tuple[int, int]] = []
        self.values: dict[str, list[np.ndarray]] = {r: [] for r in self.roles}
        self._seen: set[int] = set()

    def add(self, batch: dict[str, torch.Tensor], per_role: dict[str, torch.Tensor]) -> None:
        mask = batch["loss_mask"].detach().cpu() != 0
        rows = {r: t.detach().float().cpu() for r, t in per_role.items()}
        samples = batch["sample_idx"].tolist()
        pairs = len(samples)
        for j, sample in enumerate(samples):
            if sample >= self.limit or sample in self._seen:
                continue  # past --limit-samples, or the padded tail of the last step wrapping around
            self._seen.add(sample)
            self.samples.append(sample)
            self.counts.append((int(mask[j].sum()), int(mask[pairs + j].sum())))
            for role in self.roles:
                self.values[role].append(rows[role][j][mask[j]].numpy())
                self.values[role].append(rows[role][pairs + j][mask[pairs + j]].numpy())

    def arrays(self) -> dict[str, np.ndarray]:
        return {r: (np.concatenate(v) if v else np.zeros(0, dtype=np.float32)) for r, v in self.values.items()}


def _log(text: str) -> None:
    if dist.get_rank() == 0:
        print(text, flush=True)


def run(cfg: TrainConfig, *, output: str, limit_samples: Optional[int] = None, overwrite: bool = False) -> dict:
    """Score the training data set with the frozen model(s) and publish the cache at ``output``.

    Call on every rank after ``torch.distributed`` is initialised; returns a summary (every rank)."""
    from megatron.core import parallel_state as ps

    from megatron_tgdpo import compat, logprob_cache, train
    from megatron_tgdpo.data import PreferenceDataset
    from megatron_tgdpo.scoring import score_logps

    output_path = Path(output)
    if output_path.exists() and not overwrite:
        raise ToolError(f"--output {output} already exists; pass --overwrite to replace it, "
                        "or choose another directory")
    cfg = scoring_config(cfg, dist.get_world_size())
    prefix, _, vocab, pad_id = train.resolve_data(cfg)
    arch = train.model_arch(cfg, vocab)
    train.init_parallel(cfg)
    dataset_len = len(PreferenceDataset(prefix))
    limit = min(limit_samples or dataset_len, dataset_len)
    roles = {"reference": cfg.ref_load}
    if cfg.guidance_load is not None:
        roles["guidance"] = cfg.guidance_load
    # Fingerprints of what is loaded, taken before loading (a checkpoint written meanwhile would differ).
    fingerprints = {role: logprob_cache.fingerprint_checkpoint(load, seed=cfg.seed) for role, load in roles.items()}
    dataset_fp = logprob_cache.fingerprint_dataset(prefix)

    models = {role: train.build_frozen(arch, cfg, load) for role, load in roles.items()}
    staging = logprob_cache.staging_dir(output_path)
    if dist.get_rank() == 0:
        shutil.rmtree(staging, ignore_errors=True)  # left by an interrupted run
        staging.mkdir(parents=True)
    dist.barrier()

    source = train.BatchSource(cfg, prefix, pad_id, consumed_samples=0, shuffle=False)
    keeper = (ps.is_pipeline_last_stage(ignore_virtual=True) and ps.get_tensor_model_parallel_rank() == 0
              and ps.get_context_parallel_rank() == 0)
    collector = ShardCollector(list(roles), limit=limit)
    steps = math.ceil(limit / cfg.global_batch_size)
    dp = ps.get_data_parallel_world_size()
    _log(f"precompute_logprobs: {limit} pairs of {prefix} | roles {', '.join(roles)} | model {cfg.model} | "
         f"TP {cfg.tensor_model_parallel_size} x PP {cfg.pipeline_model_parallel_size} x "
         f"CP {cfg.context_parallel_size} x DP {dp} | {steps} steps of {cfg.global_batch_size} pairs")
    start = time.monotonic()
    tokens = 0
    for step in range(1, steps + 1):
        batches = source.next_global_batch()
        scored = {role: score_logps(chunks, batches, logits_chunk_size=cfg.logits_chunk_size)
                  for role, chunks in models.items()}
        if ps.is_pipeline_last_stage(ignore_virtual=True):
            for index, batch in enumerate(batches):
                seq = batch["input_ids"].shape[1]
                full = {role: _full_rows(scored[role][index], seq) for role in roles}
                if keeper:
                    collector.add(batch, full)
        tokens += sum(int(b["loss_mask"].sum()) for b in batches) * dp
        if step % max(cfg.log_interval, 1) == 0 or step == steps:
            elapsed = time.monotonic() - start
            done = min(step * cfg.global_batch_size, limit)
            _log(f"  step {step}/{steps} | {done}/{limit} pairs | {done / elapsed:.1f} pairs/s | "
                 f"{tokens / elapsed:.0f} response tokens/s | eta {elapsed / step * (steps - step):.0f}s")
    if keeper:
        counts = np.asarray(collector.counts, dtype=np.int64).reshape(-1, 2)
        logprob_cache.write_shard(staging, rank=dist.get_rank(), samples=collector.samples, counts=counts,
                                  values=collector.arrays())
    dist.barrier()
    elapsed = time.monotonic() - start
    failed = None
    if dist.get_rank() == 0:
        manifest = {
            "dataset": {"fingerprint": dataset_fp, "prefix": str(prefix), "num_samples": dataset_len},
            "roles": {role: {"checkpoint": fingerprints[role], "load": None if load is None else str(load)}
                      for role, load in roles.items()},
            "model": cfg.model,
            "arch": dataclasses.asdict(arch),
            "seed": cfg.seed,
            # Informational: log-probs differ by rounding across precision and layout, not by meaning.
            "precision": {"bf16": cfg.bf16, "fp8_format": cfg.fp8_format},
            "layout": {"tensor_model_parallel_size": cfg.tensor_model_parallel_size,
                       "pipeline_model_parallel_size": cfg.pipeline_model_parallel_size,
                       "context_parallel_size": cfg.context_parallel_size, "data_parallel_size": dp,
                       "micro_batch_size": cfg.micro_batch_size, "seq_length": cfg.seq_length},
            "megatron_core": str(compat.mcore_version()),
            "seconds": round(elapsed, 3),
        }
        try:
            logprob_cache.publish_cache(output_path, num_samples=limit, roles=list(roles), manifest=manifest,
                                        overwrite=overwrite)
        except Exception as exc:  # noqa: BLE001 - re-raised below, after telling the other ranks
            failed = exc
        else:
            _log(f"wrote {output_path}: {limit} pairs, roles {', '.join(roles)}, {elapsed:.1f}s "
                 f"({limit / max(elapsed, 1e-9):.1f} pairs/s)")
    # Every rank learns whether rank 0 published (instead of waiting on a barrier it never reaches).
    status = torch.tensor([1.0 if failed is not None else 0.0], device=source.device)
    dist.all_reduce(status, op=dist.ReduceOp.MAX)
    if failed is not None:
        raise failed
    if status.item() > 0:
        raise logprob_cache.CacheFormatError(f"rank 0 could not publish {output_path}; see its error")
    return {"output": str(output_path), "num_samples": limit, "roles": list(roles), "seconds": elapsed}


def main(argv: Optional[Sequence[str]] = None) -> int:
    from megatron_tgdpo import distributed
    from megatron_tgdpo.checkpointing import CheckpointError
    from megatron_tgdpo.train import ConfigError
    from megatron_tgdpo.data.errors import DataFormatError
    from megatron_tgdpo.logprob_cache import LogprobCacheError

    tool_args, cfg = parse(argv)
    distributed.init_process_group(distributed.read_launch_env())
    code = 1
    try:
        run(cfg, output=tool_args.output, limit_samples=tool_args.limit_samples, overwrite=tool_args.overwrite)
        code = 0
    except (ToolError, ConfigError, LogprobCacheError, CheckpointError, DataFormatError) as exc:
        if dist.get_rank() == 0:
            text = exc.code if isinstance(exc, SystemExit) else exc
            print(f"precompute_logprobs: {text}", file=sys.stderr, flush=True)
        code = 2
    finally:
        distributed.destroy()
    return code


if __name__ == "__main__":  # megatron's checkpoint code spawns processes that re-import __main__
    sys.exit(main())
