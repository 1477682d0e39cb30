r"""``megatron-tgdpo estimate-memory``: per-GPU memory estimate of DPO / TGDPO training under a parallel
layout, before you queue the job.

    megatron-tgdpo estimate-memory --model llama3-8b --num-gpus 16 --tensor-model-parallel-size 4 \
        --sequence-parallel --use-distributed-optimizer --bf16 --micro-batch-size 1 --seq-length 2048
    megatron-tgdpo estimate-memory --config examples/configs/llama3_70b_tgdpo.yaml --num-gpus 64
    megatron-tgdpo estimate-memory --hf-config /models/Llama-3.1-8B/config.json --num-gpus 8 ...

Takes the training flags (and ``--config`` YAML) of ``megatron-tgdpo train``; the model, layout,
precision, batch and ``--loss-type`` ones matter (TGDPO holds three models: policy + frozen reference
+ frozen guidance; the other losses two). The formulas are in ``megatron_tgdpo/memory.py``; how to
read the table is in ``docs/scaling.md``. Prints the first and the last pipeline stage; exit status 0,
1 when the worst stage does not fit ``--gpu-memory-gib``, 2 on a usage error.
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from megatron_tgdpo.config import ConfigError, TrainConfig, parse_tool_args
from megatron_tgdpo.memory import GIB, estimate, format_table
from megatron_tgdpo.models import llama

__all__ = ["main", "parse", "tool_parser"]


def tool_parser(*, prog: str = "megatron-tgdpo estimate-memory") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, add_help=False, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-gpus", type=int, required=True, help="GPUs in the job (DP = num-gpus / (TP x PP x CP))")
    parser.add_argument("--hf-config", help="a Hugging Face config.json (or its directory) instead of --model")
    parser.add_argument("--gpu-memory-gib", type=float, default=80.0, help="memory per GPU (H100 80GB: 80)")
    parser.add_argument("--reserve-gib", type=float, default=4.0,
                        help="headroom for CUDA context, NCCL buffers and fragmentation: warn when less is left")
    parser.add_argument("--no-flash-attention", dest="flash_attention", action="store_false",
                        help="count the softmax probabilities (attention without a flash kernel; torch's CPU "
                             "attention is one)")
    parser.add_argument("--local-layers", action="store_true",
                        help="megatron's local layers (no TransformerEngine, as every CPU run): count what they save "
                             "on top of the fused ones (fp32 norm intermediates, SwiGLU halves, RoPE tables)")
    return parser


def parse(argv: Optional[Sequence[str]] = None, *, prog: str = "megatron-tgdpo estimate-memory"
          ) -> tuple[argparse.Namespace, TrainConfig]:
    return parse_tool_args(tool_parser(prog=prog), argv, applies="model, layout, precision, batch and --loss-type")


def model_of(args: argparse.Namespace, cfg: TrainConfig) -> tuple[str, llama.LlamaArch]:
    if args.hf_config:
        from megatron_tgdpo.convert import hf_config_to_arch, read_hf_config

        return args.hf_config, hf_config_to_arch(read_hf_config(args.hf_config))
    return cfg.model, llama.preset(cfg.model)


def describe(name: str, arch: llama.LlamaArch, cfg: TrainConfig, *, num_gpus: int, dp: int, frozen: int) -> str:
    vpp = f" (VPP {cfg.virtual_pipeline_model_parallel_size})" if cfg.virtual_pipeline_model_parallel_size else ""
    precision = "bf16" if cfg.bf16 else "fp32"
    if cfg.fp8_format:
        precision += f" + fp8 {cfg.fp8_format}"
    return (
        f"{name}: {arch.num_parameters() / 1e9:.2f}B parameters | {num_gpus} GPUs = TP {cfg.tensor_model_parallel_size}"
        f"{' (SP)' if cfg.sequence_parallel else ''} x PP {cfg.pipeline_model_parallel_size}{vpp} x "
        f"CP {cfg.context_parallel_size} x DP {dp} | {precision} | "
        f"{'distributed' if cfg.use_distributed_optimizer else 'replicated'} optimizer | {cfg.loss_type}: policy + "
        f"{frozen} frozen | micro-batch {cfg.micro_batch_size} pairs ({2 * cfg.micro_batch_size} rows) x "
        f"{cfg.seq_length} tokens | global batch {cfg.global_batch_size}"
    )


def main(argv: Optional[Sequence[str]] = None, *, prog: str = "megatron-tgdpo estimate-memory") -> int:
    try:
        args, cfg = parse(argv, prog=prog)
    except ConfigError as exc:  # a flag out of range or a bad --config: exit 2 like every configuration error
        print(f"estimate-memory: {exc}", file=sys.stderr)
        return 2
    try:
        name, arch = model_of(args, cfg)
        est = estimate(
            arch,
            num_gpus=args.num_gpus,
            micro_batch_size=cfg.micro_batch_size,
            seq_length=cfg.seq_length,
            tensor_model_parallel_size=cfg.tensor_model_parallel_size,
            pipeline_model_parallel_size=cfg.pipeline_model_parallel_size,
            virtual_pipeline_model_parallel_size=cfg.virtual_pipeline_model_parallel_size,
            context_parallel_size=cfg.context_parallel_size,
            sequence_parallel=cfg.sequence_parallel,
            use_distributed_optimizer=cfg.use_distributed_optimizer,
            bf16=cfg.bf16,
            fp8_format=cfg.fp8_format,
            loss_type=cfg.loss_type,
            global_batch_size=cfg.global_batch_size,
            logits_chunk_size=cfg.logits_chunk_size,
            flash_attention=args.flash_attention,
            fused_logprobs=cfg.fused_logprobs,
            logprob_cache=cfg.logprob_cache is not None,
            local_layers=args.local_layers,
        )
        llama.check_layout(arch, llama.ParallelLayout(
            tensor_model_parallel_size=cfg.tensor_model_parallel_size,
            pipeline_model_parallel_size=cfg.pipeline_model_parallel_size,
            virtual_pipeline_model_parallel_size=cfg.virtual_pipeline_model_parallel_size,
            context_parallel_size=cfg.context_parallel_size,
            sequence_parallel=cfg.sequence_parallel,
        ))
    except ValueError as exc:  # includes ConversionError from --hf-config
        print(f"estimate_memory: {exc}", file=sys.stderr)
        return 2
    print(describe(name, arch, cfg, num_gpus=args.num_gpus, dp=est.data_parallel_size, frozen=est.frozen_models))
    table, warnings = format_table(est, capacity_gib=args.gpu_memory_gib, reserve_gib=args.reserve_gib)
    print(table)
    for warning in warnings:
        print(f"WARNING: {warning}")
    return 1 if est.worst.total / GIB > args.gpu_memory_gib else 0

