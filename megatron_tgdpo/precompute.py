r"""Score a prepared data set once with the frozen reference (and guidance) model -> log-prob cache.

    torchrun --nproc-per-node 8 -m megatron_tgdpo.precompute --model llama3-8b --bf16 \
        --data-path data/prepared/train --ref-load /ckpt/llama3-8b-sft --guidance-load /ckpt/llama3-8b-dpo \
        --tensor-model-parallel-size 2 --micro-batch-size 4 --seq-length 4096 --output /cache/train-logps

then train with the same --data-path/--ref-load/--guidance-load/--seed/--model plus
``--logprob-cache /cache/train-logps``. Training checks the cache's fingerprints and refuses a mismatch.

Takes every training flag (``--help`` lists them after this tool's own); only the model, data, layout
and precision flags matter. The set-up is the Trainer's (``runtime.trainer.set_up``: data, architecture,
parallel groups, seeds). The data set is read in order, no shuffle: each global step hands every
data-parallel rank its micro-batches (``runtime.data.BatchSource``), the models score them through the
same megatron-core schedule and model calls as online training, all frozen models in one pass
(``runtime.schedule.score_frozen``), so the cache holds what online scoring computes. ``--global-batch-size`` is not used: a step is 4 x PP micro-batches per DP rank with
pipeline parallelism (to fill the pipeline), one without.

Context parallelism: each CP rank scores its sequence chunks; the chunks are all-gathered over the CP
group on the last pipeline stage and the full rows are cut at the loss mask there (no recomputation,
and the cache does not depend on CP). The last stage's TP-rank-0 / CP-rank-0 rank of every DP replica
writes its samples to a shard under ``<output>.tmp``; global rank 0 merges the shards, writes the
manifest last and renames the directory to ``--output``. ``--output`` must be on a file system every
rank sees (as ``--save``). Exit status 0 on success, 2 on a configuration or cache error.
``tools/precompute_logprobs.py`` runs :func:`main`.
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

import numpy as np
import torch
import torch.distributed as dist

from megatron_tgdpo.config import TrainConfig, parse_tool_args

__all__ = ["MICRO_BATCHES_PER_STAGE", "ShardCollector", "ToolError", "main", "parse", "run", "scoring_config",
           "tool_parser"]

MICRO_BATCHES_PER_STAGE = 4  # micro-batches per schedule call per pipeline stage: bubble (PP-1)/(4PP+PP-1)


def tool_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m megatron_tgdpo.precompute", add_help=False, description=__doc__,
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
    from megatron_tgdpo.config import ConfigError
    from megatron_tgdpo.runtime import setup

    tp, pp, cp = cfg.tensor_model_parallel_size, cfg.pipeline_model_parallel_size, cfg.context_parallel_size
    dp = max(world_size // max(tp * pp * cp, 1), 1)
    micro = MICRO_BATCHES_PER_STAGE * pp if pp > 1 else 1
    # Training-only requirements do not apply: one iteration, DPO (the roles are set by the loads).
    checked = dataclasses.replace(cfg, global_batch_size=cfg.micro_batch_size * dp * micro, train_iters=1,
                                  train_epochs=None, loss_type="dpo", load=None, save=None, save_interval=None,
                                  keep_last=None, preference=dataclasses.replace(cfg.preference, logprob_cache=None))
    try:
        arch, name = setup.declared_architecture(checked)  # the architecture --ref-load records
        setup.check_config(checked, arch, name=name)
    except ConfigError as exc:
        raise ToolError(str(exc)) from None
    return checked


class ShardCollector:
    """This rank's scored samples (first occurrence only), cut at the loss mask, in scoring order."""

    def __init__(self, roles: Sequence[str], *, limit: int) -> None:
        self.roles = tuple(roles)
        self.limit = limit
        self.samples: list[int] = []
        self.counts: list[tuple[int, int]] = []
        self.values: dict[str, list[np.ndarray]] = {r: [] for r in self.roles}
        self._seen: set[int] = set()

    def add(self, batch, per_role: dict[str, torch.Tensor]) -> None:
        """``batch``: a full (not CP-sliced) :class:`Batch`; ``per_role``: its full-length log-probs."""
        mask = batch["loss_mask"].detach().cpu() != 0
        rows = {r: t.detach().float().cpu() for r, t in per_role.items()}
        owner = (batch["sequence_ids"].cpu() if batch.packed
                 else torch.arange(mask.shape[0]).unsqueeze(1).expand_as(mask))
        samples = batch["sample_idx"].tolist()
        pairs = batch.num_pairs
        for j, sample in enumerate(samples):
            if sample >= self.limit or sample in self._seen:
                continue  # past --limit-samples, or the padded tail of the last step wrapping around
            self._seen.add(sample)
            self.samples.append(sample)
            chosen, rejected = mask & (owner == j), mask & (owner == pairs + j)
            self.counts.append((int(chosen.sum()), int(rejected.sum())))
            for role in self.roles:
                self.values[role].append(rows[role][chosen].numpy())
                self.values[role].append(rows[role][rejected].numpy())

    def arrays(self) -> dict[str, np.ndarray]:
        return {r: (np.concatenate(v) if v else np.zeros(0, dtype=np.float32)) for r, v in self.values.items()}


def _log(text: str) -> None:
    if dist.get_rank() == 0:
        print(text, flush=True)


def run(cfg: TrainConfig, *, output: str, limit_samples: Optional[int] = None, overwrite: bool = False) -> dict:
    """Score the training data set with the frozen model(s) and publish the cache at ``output``.

    Call on every rank after ``torch.distributed`` is initialised; returns a summary (every rank)."""
    from megatron.core import parallel_state as ps

    from megatron_tgdpo import compat, logprob_cache, safe_pickle
    from megatron_tgdpo.data import PreferenceDataset
    from megatron_tgdpo.models.sources import ModelSource
    from megatron_tgdpo.runtime import setup
    from megatron_tgdpo.runtime.data import BatchSource
    from megatron_tgdpo.runtime.metrics import holds_metrics
    from megatron_tgdpo.runtime.schedule import LogprobSettings, context_parallel, score_frozen
    from megatron_tgdpo.runtime.trainer import set_up

    output_path = Path(output)
    if output_path.exists() and not overwrite:
        raise ToolError(f"--output {output} already exists; pass --overwrite to replace it, "
                        "or choose another directory")
    cfg = scoring_config(cfg, dist.get_world_size())
    safe_pickle.trust_checkpoints(cfg.trust_checkpoint)  # before --ref-load / --guidance-load are read
    run_setup = set_up(cfg)  # the Trainer's sequence: data, architecture, parallel groups, seeds
    data, arch, arch_name = run_setup.data, run_setup.arch, run_setup.arch_name
    prefix = data.train_prefix
    dataset_len = len(PreferenceDataset(prefix))
    limit = min(limit_samples or dataset_len, dataset_len)
    roles = {"reference": ModelSource.of(cfg.ref_load, seed=cfg.seed)}
    if cfg.preference.guidance_load is not None:
        roles["guidance"] = ModelSource.of(cfg.preference.guidance_load, seed=cfg.seed)
    # Fingerprints of what is loaded, taken before loading (a checkpoint written meanwhile would differ).
    fingerprints = {role: source.fingerprint() for role, source in roles.items()}
    dataset_fp = logprob_cache.fingerprint_dataset(prefix)

    models = {role: setup.build_frozen(arch, cfg, source) for role, source in roles.items()}
    staging = logprob_cache.staging_dir(output_path)
    if dist.get_rank() == 0:
        shutil.rmtree(staging, ignore_errors=True)  # left by an interrupted run
        staging.mkdir(parents=True)
    dist.barrier()

    source = BatchSource(cfg, prefix, data.pad_id, consumed_samples=0, shuffle=False)
    keeper = holds_metrics(cp_local=False)  # one rank per DP replica keeps what it scored
    collector = ShardCollector(list(roles), limit=limit)
    steps = math.ceil(limit / cfg.global_batch_size)
    dp = ps.get_data_parallel_world_size()
    _, _, cp_group = context_parallel()
    settings = LogprobSettings.of(cfg)
    _log(f"precompute_logprobs: {limit} pairs of {prefix} | roles {', '.join(roles)} | model {arch_name} | "
         f"TP {cfg.tensor_model_parallel_size} x PP {cfg.pipeline_model_parallel_size}"
         f"{f' (x {vpp} virtual stages)' if (vpp := cfg.virtual_pipeline_model_parallel_size) else ''} x "
         f"CP {cfg.context_parallel_size} x DP {dp}{' (sequence parallel)' if cfg.sequence_parallel else ''} | "
         f"{steps} steps of {cfg.global_batch_size} pairs")
    start = time.monotonic()
    tokens = 0
    for step in range(1, steps + 1):
        batches = source.next_global_batch()
        scored = score_frozen(models, batches, logprobs=settings)  # every role in one forward-only pass
        if ps.is_pipeline_last_stage(ignore_virtual=True):
            cp_rank, cp_size, _ = context_parallel()
            for index, batch in enumerate(batches):
                local = batch.for_context_parallel(cp_rank=cp_rank, cp_size=cp_size)
                full = {role: local.gather_context_parallel(scored[role][index], group=cp_group) for role in roles}
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
            "roles": {role: {"checkpoint": fingerprints[role], "load": None if src.path is None else str(src.path)}
                      for role, src in roles.items()},
            "model": cfg.model,
            "model_name": arch_name,
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
    from megatron_tgdpo.config import ConfigError
    from megatron_tgdpo.data.errors import DataFormatError
    from megatron_tgdpo.logprob_cache import LogprobCacheError

    try:
        tool_args, cfg = parse(argv)
    except ConfigError as exc:  # a flag out of range or a bad --config: exit 2 like every configuration error
        if distributed.launch_rank() == 0:
            print(f"precompute: {exc}", file=sys.stderr, flush=True)
        return 2
    from megatron_tgdpo.runtime.console import quiet_library_warnings

    quiet_library_warnings(verbose=cfg.verbose)
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
