"""Set-up shared by every trainer and tool: data, the architecture, the layout, models and their wrapping.

Everything here runs before the first step and decides things once: which data and tokenizer, which
architecture (:func:`resolve_architecture`, the one resolver), which parallel layout, which device.
"""
from __future__ import annotations

import os
import random
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from megatron_tgdpo import distributed
from megatron_tgdpo.checkpointing import CheckpointError, CheckpointPart
from megatron_tgdpo.config import ConfigError, TrainConfig, validate
from megatron_tgdpo.convert import ConversionError
from megatron_tgdpo.models import llama
from megatron_tgdpo.models.sources import ModelSource, resolve_arch
from megatron_tgdpo.runtime import path_checks

__all__ = [
    "DataSpec",
    "build_frozen",
    "build_chunks",
    "check_config",
    "declared_architecture",
    "init_parallel",
    "layout_of",
    "policy_start",
    "resolve_architecture",
    "resolve_data",
    "seed_everything",
    "wrap_trained",
]


@dataclass(frozen=True)
class DataSpec:
    train_prefix: str
    eval_prefix: Optional[str]
    tokenizer: str
    vocab_size: int
    pad_id: int
    eos_id: Optional[int]


def resolve_data(cfg: TrainConfig) -> DataSpec:
    """The prepared train/eval sets and their tokenizer; prepares the built-in set (rank 0) if none given."""
    from megatron_tgdpo.data import PreferenceDataset, load_tokenizer

    if cfg.data_path is None:
        from megatron_tgdpo.data.builtin import builtin_dataset

        if dist.get_rank() == 0:
            builtin_dataset(cfg.data_cache_dir)
        dist.barrier()
        info = builtin_dataset(cfg.data_cache_dir)
        train, evaluation, tok_path = info["train_prefix"], info["eval_prefix"], info["tokenizer"]
    else:
        from megatron_tgdpo.data.errors import DataFormatError, TokenizerError
        from megatron_tgdpo.data.manifest import kind_problem, manifest_path, read_manifest
        from megatron_tgdpo.data.tokenizer import resolve_dataset_tokenizer

        train, evaluation = cfg.data_path, cfg.eval_data_path
        named = f"--data-path {train}"  # which flag an unreadable data set or tokenizer came from
        try:
            train_manifest = PreferenceDataset(train).manifest  # opened now: a broken set fails before compute
            tok_path = resolve_dataset_tokenizer(train_manifest, override=cfg.tokenizer,
                                                 manifest_path=manifest_path(train))
            # A preference loss on an SFT set would train on empty rejected responses: refuse before compute.
            manifests = [("--data-path", train, train_manifest)]
            if evaluation:
                named = f"--eval-data-path {evaluation}"
                manifests.append(("--eval-data-path", evaluation, read_manifest(evaluation)))
            for flag, prefix, manifest in manifests:
                problem = kind_problem(manifest, loss_type=cfg.loss_type, prefix=prefix, flag=flag)
                if problem:
                    raise ConfigError(problem)
        except (TokenizerError, DataFormatError) as exc:
            raise ConfigError(f"{named}: {exc}") from None
    tokenizer = load_tokenizer(tok_path)
    return DataSpec(str(train), str(evaluation) if evaluation else None, str(tok_path), tokenizer.vocab_size,
                    tokenizer.pad_id, tokenizer.eos_id)


def _arch_sources(cfg: TrainConfig) -> list[ModelSource]:
    """Where the architecture can come from, in order: the reference, then ``--load`` (a model
    directory, or the checkpoint being resumed)."""
    sources = []

    def usable(path: Optional[str], **kind) -> bool:  # missing: validate() says so; wrong kind: path_checks
        return path is not None and os.path.exists(path) and not path_checks.model_dir_problem("", path, **kind)

    if usable(cfg.ref_load):
        sources.append(ModelSource.of(cfg.ref_load, seed=cfg.seed))
    if usable(cfg.load, checkpoint_root_ok=False):
        load = ModelSource.of(cfg.load, seed=cfg.seed)
        from megatron_tgdpo import checkpointing

        if load.is_model_directory or checkpointing.iteration_dirs(cfg.load) or checkpointing.is_iteration_dir(cfg.load):
            sources.append(load)
    return sources


def resolve_architecture(cfg: TrainConfig, *, tokenizer_vocab: Optional[int]) -> tuple[llama.LlamaArch, str]:
    """(architecture, its name): what ``--ref-load`` / ``--load`` record, else the ``--model`` preset."""
    try:
        return resolve_arch(model=cfg.model, sources=_arch_sources(cfg), tokenizer_vocab=tokenizer_vocab)
    except (CheckpointError, ConversionError, ValueError, OSError) as exc:
        raise ConfigError(f"cannot determine the model architecture: {exc}") from None


def declared_architecture(cfg: TrainConfig) -> tuple[llama.LlamaArch, str]:
    """The architecture to validate the layout against, before the data is looked at."""
    if cfg.model not in llama.PRESETS and not _arch_sources(cfg):
        return llama.preset("tiny"), "unknown preset"  # validate() names the bad --model
    return resolve_architecture(cfg, tokenizer_vocab=None)


def layout_of(cfg: TrainConfig) -> llama.ParallelLayout:
    return llama.ParallelLayout(
        tensor_model_parallel_size=cfg.tensor_model_parallel_size,
        pipeline_model_parallel_size=cfg.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=cfg.virtual_pipeline_model_parallel_size,
        context_parallel_size=cfg.context_parallel_size,
        sequence_parallel=cfg.sequence_parallel,
    )


def check_config(cfg: TrainConfig, arch: llama.LlamaArch, *, name: str) -> None:
    """Every configuration problem, before data or models are touched; raises ConfigError."""
    problems = validate(cfg, world_size=dist.get_world_size(), num_heads=arch.num_attention_heads,
                        num_query_groups=arch.num_query_groups, num_layers=arch.num_layers)
    problems.extend(path_checks.config_problems(cfg))
    try:
        llama.check_layout(arch, layout_of(cfg))
    except ValueError as exc:
        # validate() already names heads, layers and --sequence-parallel problems: say each one once
        covered = [topic for topic in ("heads", "layers", "--sequence-parallel needs") if any(topic in p for p in problems)]
        problems.extend(f"{line.strip()} of {name}" for line in str(exc).splitlines()[1:]
                        if not any(topic in line for topic in covered))
    if cfg.seq_length > arch.max_position_embeddings:
        problems.append(f"--seq-length {cfg.seq_length} exceeds the {arch.max_position_embeddings} positions of "
                        f"{name}")
    if problems:
        raise ConfigError(problems)


def init_parallel(cfg: TrainConfig) -> None:
    """megatron-core parallel groups and the seeded model-parallel RNG tracker for ``cfg``'s layout."""
    distributed.init_model_parallel(
        tensor_model_parallel_size=cfg.tensor_model_parallel_size,
        pipeline_model_parallel_size=cfg.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=cfg.virtual_pipeline_model_parallel_size,
        context_parallel_size=cfg.context_parallel_size,
        seed=cfg.seed,
    )


def seed_everything(seed: int) -> None:
    """Python's and numpy's global RNGs (torch's and megatron's tracker are seeded by init_parallel)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)


def variable_row_lengths(cfg: TrainConfig) -> bool:
    """Packed rows have the length of what they hold; pipeline stages then exchange every micro-batch's
    shape (megatron-core's ``variable_seq_lengths``). Not with virtual stages: the interleaved
    schedule's shape exchange deadlocked on gloo's unbatched p2p here, so all rows of a step share one
    length, that of its fullest bin (``runtime.data.BatchSource``)."""
    return cfg.pack_sequences and cfg.virtual_pipeline_model_parallel_size is None


def build_chunks(arch: llama.LlamaArch, cfg: TrainConfig) -> list:
    precision = llama.Precision(bf16=cfg.bf16, fp8_format=cfg.fp8_format)
    variable = variable_row_lengths(cfg) and cfg.pipeline_model_parallel_size > 1
    return llama.build_model(arch, llama.transformer_config(arch, layout_of(cfg), precision,
                                                            variable_seq_lengths=variable))


def build_frozen(arch: llama.LlamaArch, cfg: TrainConfig, source: ModelSource) -> list:
    """A frozen (eval, no grad) model at the run's layout, loaded from ``source``."""
    chunks = build_chunks(arch, cfg)
    source.load_into(chunks)
    for chunk in chunks:
        chunk.eval()
        chunk.requires_grad_(False)
    return chunks


def policy_start(cfg: TrainConfig) -> ModelSource:
    """Where a fresh run's policy starts: ``--load`` when it names a model directory (Hugging Face or
    converted), else the reference (``--ref-load``, or the seeded init)."""
    if cfg.load is not None:
        load = ModelSource.of(cfg.load, seed=cfg.seed)
        if load.is_model_directory:
            return load
    return ModelSource.of(cfg.ref_load, seed=cfg.seed)


def wrap_trained(cfg: TrainConfig, chunks: list, *, train_iters: int, lr: Optional[float] = None) -> CheckpointPart:
    """megatron-core DDP + optimizer + LR scheduler around trained model chunks."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    lr = cfg.lr if lr is None else lr
    tconfig = chunks[0].config
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=cfg.use_distributed_optimizer,
    )
    wrapped = [
        DistributedDataParallel(config=tconfig, ddp_config=ddp_config, module=chunk, disable_bucketing=i > 0)
        for i, chunk in enumerate(chunks)
    ]
    opt_config = OptimizerConfig(
        optimizer="adam",
        lr=lr,
        min_lr=cfg.min_lr,
        weight_decay=cfg.weight_decay,
        adam_beta1=cfg.adam_beta1,
        adam_beta2=cfg.adam_beta2,
        clip_grad=cfg.clip_grad,
        bf16=cfg.bf16,
        params_dtype=tconfig.params_dtype,
        use_distributed_optimizer=cfg.use_distributed_optimizer,
    )
    optimizer = get_megatron_optimizer(opt_config, wrapped)
    warmup = int(cfg.lr_warmup_fraction * train_iters)
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if warmup else lr,
        max_lr=lr,
        min_lr=min(cfg.min_lr, lr),
        lr_warmup_steps=warmup,
        lr_decay_steps=train_iters,
        lr_decay_style=cfg.lr_decay_style,
        start_wd=cfg.weight_decay,
        end_wd=cfg.weight_decay,
        wd_incr_steps=train_iters,
        wd_incr_style="constant",
    )
    for chunk_config in {id(c.config): c.config for c in wrapped}.values():
        chunk_config.finalize_model_grads_func = finalize_model_grads
        chunk_config.no_sync_func = [c.no_sync for c in wrapped] if len(wrapped) > 1 else wrapped[0].no_sync
        chunk_config.grad_scale_func = optimizer.scale_loss
    return CheckpointPart(chunks=wrapped, optimizer=optimizer, scheduler=scheduler)


def device() -> torch.device:
    """This rank's device, decided once by :func:`megatron_tgdpo.distributed.init_process_group`."""
    return distributed.current_device()
