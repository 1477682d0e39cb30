"""``python -m megatron_tgdpo.train``: DPO / TGDPO training of a megatron-core GPT policy.

Launch with ``torchrun --nproc-per-node N -m megatron_tgdpo.train ...`` or ``srun python -m
megatron_tgdpo.train ...``. One iteration:

1. every DP rank collates its micro-batches of the global batch (``[chosen rows; rejected rows]``);
2. the frozen reference (and, for TGDPO, guidance) model scores them forward-only;
3. the policy runs forward+backward through megatron-core's pipeline schedule, the loss at the last
   stage only; megatron-core DDP reduces gradients; the optimizer steps; the LR scheduler steps;
4. metrics are averaged over micro-batches and DP ranks and logged on rank 0.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from megatron_tgdpo import checkpointing, compat, distributed
from megatron_tgdpo.config import TrainConfig, parse_args, validate
from megatron_tgdpo.losses import preference_loss
from megatron_tgdpo.models import llama
from megatron_tgdpo.models.state_dict import seeded_init
from megatron_tgdpo.monitoring import FlopModel, MetricsLogger, peak_tflops
from megatron_tgdpo.scoring import run_schedule, score_logps

EXIT_REQUEUE = 75  # EX_TEMPFAIL: saved on a signal or time budget; requeue the job to continue
BASE_METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracy", "rewards/margin",
                "logps/chosen", "logps/rejected", "logits/mean", "logratio/abs_max")
TGDPO_METRICS = ("weights/chosen_mean", "weights/rejected_mean", "weights/negative_fraction")


class ConfigError(SystemExit):
    """Raised before any compute when the configuration cannot work; the message says what to change."""


@dataclass
class Models:
    policy: list
    reference: list
    guidance: Optional[list]
    cache: Optional[object] = None  # logprob_cache.LogprobCache: offline reference/guidance log-probs


# ------------------------------------------------------------------------------------------------
# set-up
# ------------------------------------------------------------------------------------------------


def resolve_data(cfg: TrainConfig) -> tuple[str, Optional[str], int, int]:
    """(train prefix, eval prefix, tokenizer vocab size, pad id); prepares the built-in set on rank 0."""
    from megatron_tgdpo.data import PreferenceDataset, load_tokenizer

    if cfg.data_path is None:
        from megatron_tgdpo.data.builtin import builtin_dataset

        if dist.get_rank() == 0:
            builtin_dataset(cfg.data_cache_dir)
        dist.barrier()
        info = builtin_dataset(cfg.data_cache_dir)
        train, evaluation, tok_path = info["train_prefix"], info["eval_prefix"], info["tokenizer"]
    else:
        train, evaluation = cfg.data_path, cfg.eval_data_path
        tok_path = cfg.tokenizer or PreferenceDataset(train).manifest.get("tokenizer", {}).get("path")
        if tok_path is None:
            raise ConfigError("--tokenizer is needed: the dataset manifest does not name its tokenizer")
    tokenizer = load_tokenizer(tok_path)
    return str(train), (str(evaluation) if evaluation else None), tokenizer.vocab_size, tokenizer.pad_id


def model_arch(cfg: TrainConfig, tokenizer_vocab: int) -> llama.LlamaArch:
    """The network to build: what ``--ref-load`` records (HF, converted or our checkpoint), else the preset."""
    if cfg.ref_load is not None:
        arch = checkpointing.checkpoint_arch(cfg.ref_load)
        if arch is not None:
            if tokenizer_vocab > arch.vocab_size:
                raise ConfigError(f"tokenizer has {tokenizer_vocab} tokens but --ref-load {cfg.ref_load} only "
                                  f"{arch.vocab_size}; use the tokenizer of that model")
            return arch
    arch = llama.preset(cfg.model)
    if cfg.model == "tiny":
        # Trained from scratch: size the vocabulary to the tokenizer (rounded for any TP <= 8).
        return llama.preset(cfg.model, vocab_size=-(-tokenizer_vocab // 64) * 64)
    if tokenizer_vocab > arch.vocab_size:
        raise ConfigError(f"tokenizer has {tokenizer_vocab} tokens but --model {cfg.model} only {arch.vocab_size}")
    return arch


def init_parallel(cfg: TrainConfig) -> None:
    """megatron-core parallel groups and seeded RNG tracker for ``cfg``'s layout."""
    distributed.init_model_parallel(
        tensor_model_parallel_size=cfg.tensor_model_parallel_size,
        pipeline_model_parallel_size=cfg.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=cfg.virtual_pipeline_model_parallel_size,
        context_parallel_size=cfg.context_parallel_size,
        seed=cfg.seed,
    )


def layout_of(cfg: TrainConfig) -> llama.ParallelLayout:
    return llama.ParallelLayout(
        tensor_model_parallel_size=cfg.tensor_model_parallel_size,
        pipeline_model_parallel_size=cfg.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=cfg.virtual_pipeline_model_parallel_size,
        context_parallel_size=cfg.context_parallel_size,
        sequence_parallel=cfg.sequence_parallel,
    )


def build_frozen(arch, cfg: TrainConfig, path: Optional[str]) -> list:
    precision = llama.Precision(bf16=cfg.bf16, fp8_format=cfg.fp8_format)
    chunks = llama.build_model(arch, llama.transformer_config(arch, layout_of(cfg), precision))
    if path is not None:
        checkpointing.load_model_weights(path, chunks)
    else:
        seeded_init(chunks, seed=cfg.seed, std=chunks[0].config.init_method_std)
    for chunk in chunks:
        chunk.eval()
        chunk.requires_grad_(False)
    return chunks


def build_models(cfg: TrainConfig, arch: llama.LlamaArch) -> Models:
    # The reference is built first from the seed (or loaded), and the policy starts as its exact copy.
    reference = build_frozen(arch, cfg, cfg.ref_load)
    precision = llama.Precision(bf16=cfg.bf16, fp8_format=cfg.fp8_format)
    policy = llama.build_model(arch, llama.transformer_config(arch, layout_of(cfg), precision))
    from megatron_tgdpo import convert

    if cfg.load is not None and (convert.is_hf_directory(cfg.load) or convert.is_converted_directory(cfg.load)):
        # A model directory (not a training checkpoint): the policy starts from it, at iteration 0.
        checkpointing.load_model_weights(cfg.load, policy)
    else:
        for dst, src in zip(policy, reference):
            dst.load_state_dict(src.state_dict())
    guidance = None
    if cfg.loss_type == "tgdpo" and cfg.guidance_load is not None and cfg.logprob_cache is None:
        guidance = build_frozen(arch, cfg, cfg.guidance_load)
    return Models(policy=policy, reference=reference, guidance=guidance)


def wrap_policy(cfg: TrainConfig, chunks: list, train_iters: int):
    """megatron-core DDP + optimizer + LR scheduler for the policy chunks."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

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
        lr=cfg.lr,
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
        init_lr=0.0 if warmup else cfg.lr,
        max_lr=cfg.lr,
        min_lr=cfg.min_lr,
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
    return wrapped, optimizer, scheduler


# ------------------------------------------------------------------------------------------------
# data
# ------------------------------------------------------------------------------------------------


class BatchSource:
    """This DP rank's micro-batches of each global batch, resumable from a consumed-samples count."""

    def __init__(self, cfg: TrainConfig, prefix: str, pad_id: int, *, consumed_samples: int, shuffle: bool):
        from megatron.core import parallel_state as ps

        from megatron_tgdpo.data import PreferenceCollator, PreferenceDataset, PreferenceSampler

        self.dataset = PreferenceDataset(prefix)
        self.dp = ps.get_data_parallel_world_size()
        self.sampler = PreferenceSampler(
            len(self.dataset),
            micro_batch_size=cfg.micro_batch_size,
            data_parallel_rank=ps.get_data_parallel_rank(),
            data_parallel_size=self.dp,
            consumed_samples=consumed_samples,
            seed=cfg.seed,
            shuffle=shuffle,
        )
        self.iterator = iter(self.sampler)
        fixed = cfg.seq_length if cfg.pipeline_model_parallel_size > 1 else None
        self.collate = PreferenceCollator(
            pad_id=pad_id,
            pad_to_multiple_of=cfg.pad_to_multiple_of,
            context_parallel_size=cfg.context_parallel_size,
            fixed_length=fixed,
        )
        self.num_micro = cfg.global_batch_size // (cfg.micro_batch_size * self.dp)
        self.max_len = cfg.seq_length
        self.device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")

    def next_global_batch(self) -> list[dict[str, torch.Tensor]]:
        batches = []
        for _ in range(self.num_micro):
            batch = self.collate([self.dataset[i] for i in next(self.iterator)])
            if batch["input_ids"].shape[1] > self.max_len:
                raise RuntimeError(
                    f"a micro-batch is {batch['input_ids'].shape[1]} tokens long, over --seq-length {self.max_len}; "
                    "prepare the data with --max-seq-length <= --seq-length"
                )
            batches.append({k: v.to(self.device, non_blocking=True) for k, v in batch.items()})
        return batches


# ------------------------------------------------------------------------------------------------
# one step
# ------------------------------------------------------------------------------------------------


def metric_keys(cfg: TrainConfig, *, guided: bool) -> tuple[str, ...]:
    return BASE_METRICS + (TGDPO_METRICS if cfg.loss_type == "tgdpo" and guided else ())


def loss_options(cfg: TrainConfig) -> dict:
    options = dict(beta=cfg.beta, alpha=cfg.alpha, loss_type=cfg.loss_type)
    if cfg.label_smoothing:
        options["label_smoothing"] = cfg.label_smoothing
    if cfg.weight_clamp() is not None:
        options["weight_clamp"] = cfg.weight_clamp()
    if cfg.loss_type == "simpo":
        options["simpo_gamma"] = cfg.simpo_gamma
    return options


def _reporting_rank() -> bool:
    """One rank per DP replica holds each micro-batch's metrics: last PP stage, TP rank 0, CP rank 0."""
    from megatron.core import parallel_state as ps

    return (ps.is_pipeline_last_stage(ignore_virtual=True) and ps.get_tensor_model_parallel_rank() == 0
            and ps.get_context_parallel_rank() == 0)


def reduce_metrics(per_micro: list[dict], keys: tuple[str, ...]) -> dict[str, float]:
    """Mean over every micro-batch of every DP replica, gathered on all ranks with one all-reduce."""
    vec = torch.zeros(len(keys) + 1, dtype=torch.float64)
    if _reporting_rank():
        for m in per_micro:
            vec[:-1] += torch.tensor([float(m.get(k, 0.0)) for k in keys], dtype=torch.float64)
        vec[-1] = len(per_micro)
    if torch.cuda.is_available():
        vec = vec.cuda()
    dist.all_reduce(vec)
    count = max(vec[-1].item(), 1.0)
    return {k: vec[i].item() / count for i, k in enumerate(keys)}


def _cp_group():
    from megatron.core import parallel_state as ps

    return ps.get_context_parallel_group() if ps.get_context_parallel_world_size() > 1 else None


def train_step(cfg: TrainConfig, models: Models, optimizer, batches: list[dict]) -> dict[str, float]:
    if models.cache is not None:
        from megatron_tgdpo.logprob_cache import cached_logps

        ref, guide = cached_logps(models.cache, batches)
    else:
        ref = score_logps(models.reference, batches, logits_chunk_size=cfg.logits_chunk_size)
        guide = None
        if models.guidance is not None:
            guide = score_logps(models.guidance, batches, logits_chunk_size=cfg.logits_chunk_size)
    options = loss_options(cfg)  # tgdpo without guidance (alpha == 0) is exactly DPO inside the loss
    per_micro: list[dict] = []

    def loss_fn(index: int, batch: dict, logps: torch.Tensor):
        mask = batch["loss_mask"]
        loss, metrics = preference_loss(
            logps, ref[index], mask, guide_logps=None if guide is None else guide[index],
            cp_group=_cp_group(), **options,
        )
        report = {k: float(v) for k, v in metrics.items()}
        report["loss"] = float(loss.detach())
        diff = ((logps.detach() - ref[index]) * mask).abs().max()
        group = _cp_group()
        if group is not None:
            dist.all_reduce(diff, op=dist.ReduceOp.MAX, group=group)
        report["logratio/abs_max"] = float(diff)
        per_micro.append(report)
        # megatron-core's schedule divides by the number of micro-batches and multiplies by the CP size
        # (DDP averages over DP x CP while each CP rank holds the partial gradient of its own tokens).
        return loss, {}

    for chunk in models.policy:
        chunk.train()
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    run_schedule(models.policy, batches, loss_fn, forward_only=False, logits_chunk_size=cfg.logits_chunk_size)
    _, grad_norm, _ = optimizer.step()
    out = reduce_metrics(per_micro, metric_keys(cfg, guided=guide is not None))
    out["grad_norm"] = float(grad_norm) if grad_norm is not None else float("nan")
    return out


def evaluate(cfg: TrainConfig, models: Models, source: Optional[BatchSource], iters: int) -> Optional[dict]:
    """Held-out DPO implicit-reward metrics of the current policy against the reference."""
    if source is None or iters <= 0:
        return None
    keys = BASE_METRICS
    per_micro: list[dict] = []
    for _ in range(iters):
        batches = source.next_global_batch()
        ref = score_logps(models.reference, batches, logits_chunk_size=cfg.logits_chunk_size)
        pol = score_logps(models.policy, batches, logits_chunk_size=cfg.logits_chunk_size)
        for index, logps in pol.items():
            loss, metrics = preference_loss(logps, ref[index], batches[index]["loss_mask"], beta=cfg.beta,
                                            loss_type="dpo", cp_group=_cp_group())
            per_micro.append({"loss": float(loss), **{k: float(v) for k, v in metrics.items()}})
    return reduce_metrics(per_micro, keys)


# ------------------------------------------------------------------------------------------------
# stop requests (SLURM preemption, time budget)
# ------------------------------------------------------------------------------------------------


class StopRequest:
    """SIGTERM / SIGUSR1 set a flag; ranks agree on it at the next step boundary (one all-reduce)."""

    def __init__(self, exit_after_minutes: Optional[float]):
        self.flag = False
        self.reason = ""
        self.deadline = time.monotonic() + exit_after_minutes * 60 if exit_after_minutes else None
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handler)

    def _handler(self, signum, _frame) -> None:
        self.flag = True
        self.reason = signal.Signals(signum).name

    def should_stop(self) -> Optional[str]:
        local = self.flag or (self.deadline is not None and time.monotonic() > self.deadline)
        if local and not self.reason:
            self.reason = "--exit-duration-in-mins"
        t = torch.tensor([1.0 if local else 0.0], device="cuda" if torch.cuda.is_available() else "cpu")
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return (self.reason or "a signal on another rank") if t.item() > 0 else None


# ------------------------------------------------------------------------------------------------
# the loop
# ------------------------------------------------------------------------------------------------


def total_iterations(cfg: TrainConfig, dataset_len: int) -> int:
    if cfg.train_iters is not None:
        return cfg.train_iters
    return max(1, math.ceil(cfg.train_epochs * dataset_len / cfg.global_batch_size))


def declared_arch(cfg: TrainConfig) -> llama.LlamaArch:
    """The architecture to validate the layout against: the one ``--ref-load`` records, else the preset."""
    if cfg.ref_load is not None and os.path.exists(cfg.ref_load):
        try:
            arch = checkpointing.checkpoint_arch(cfg.ref_load)
        except Exception as exc:  # noqa: BLE001 - reported as a configuration error
            raise ConfigError(f"--ref-load {cfg.ref_load}: cannot read the model architecture ({exc})") from None
        if arch is not None:
            return arch
    return llama.preset(cfg.model)


def check_config(cfg: TrainConfig, arch: llama.LlamaArch) -> None:
    problems = validate(cfg, world_size=dist.get_world_size(), num_heads=arch.num_attention_heads,
                        num_query_groups=arch.num_query_groups, num_layers=arch.num_layers)
    try:
        llama.check_layout(arch, layout_of(cfg))
    except ValueError as exc:
        problems.extend(line.strip() for line in str(exc).splitlines()[1:])
    if problems:
        raise ConfigError("configuration error(s), nothing was run:\n  - " + "\n  - ".join(dict.fromkeys(problems)))


def run(cfg: TrainConfig) -> int:
    rank0 = dist.get_rank() == 0
    check_config(cfg, declared_arch(cfg))  # before touching data or building anything
    train_prefix, eval_prefix, vocab, pad_id = resolve_data(cfg)
    arch = model_arch(cfg, vocab)
    init_parallel(cfg)
    from megatron.core import parallel_state as ps

    from megatron_tgdpo.data import PreferenceDataset

    iters = total_iterations(cfg, len(PreferenceDataset(train_prefix)))
    models = build_models(cfg, arch)
    if cfg.logprob_cache:
        from megatron_tgdpo.logprob_cache import LogprobCache, LogprobCacheError

        try:
            models.cache = LogprobCache(
                cfg.logprob_cache, dataset_prefix=train_prefix, ref_load=cfg.ref_load, guidance_load=cfg.guidance_load,
                seed=cfg.seed, need_guidance=cfg.loss_type == "tgdpo" and cfg.alpha != 0, model=cfg.model,
            )
        except LogprobCacheError as exc:
            raise ConfigError(str(exc)) from None
    models.policy, optimizer, scheduler = wrap_policy(cfg, models.policy, iters)

    start_iteration, consumed = 0, 0
    if cfg.load is not None and checkpointing.find_latest(cfg.load) is not None:
        meta = checkpointing.load_checkpoint(cfg.load, chunks=models.policy, optimizer=optimizer, scheduler=scheduler,
                                             load_optimizer=cfg.load_optim, load_rng=cfg.load_rng)
        if meta is not None:
            start_iteration, consumed = meta["iteration"], meta["consumed_samples"]

    logger = MetricsLogger(log_dir=cfg.log_dir, enabled=rank0, total_iters=iters, tensorboard=cfg.tensorboard)
    logger.info(
        f"megatron_tgdpo: {cfg.loss_type} | model {cfg.model} ({arch.num_parameters() / 1e6:.1f}M params) | "
        f"world {dist.get_world_size()} = TP {cfg.tensor_model_parallel_size} x PP {cfg.pipeline_model_parallel_size}"
        f" x CP {cfg.context_parallel_size} x DP {ps.get_data_parallel_world_size()} | "
        f"megatron-core {compat.mcore_version()} | {'TE' if compat.te_available() else 'local'} layers | "
        f"iterations {start_iteration + 1}..{iters}"
    )
    if start_iteration:
        logger.info(f"resumed from {meta['path']} (iteration {start_iteration}, {consumed} samples consumed)")

    source = BatchSource(cfg, train_prefix, pad_id, consumed_samples=consumed, shuffle=True)

    def held_out() -> Optional[dict]:
        if eval_prefix is None:
            return None
        return evaluate(cfg, models, BatchSource(cfg, eval_prefix, pad_id, consumed_samples=0, shuffle=False),
                        cfg.eval_iters)

    def save(iteration: int) -> None:
        state = {"consumed_samples": consumed, "config": cfg.to_dict(), "arch": dataclasses.asdict(arch)}
        path = checkpointing.save_checkpoint(cfg.save, iteration=iteration, chunks=models.policy, optimizer=optimizer,
                                             scheduler=scheduler, state=state, keep_last=cfg.keep_last)
        logger.info(f"saved {path}")

    before = held_out() if start_iteration == 0 else None
    if before:
        logger.info("held-out before training: " + _summary_line(before))

    flops = FlopModel(arch.num_layers, arch.hidden_size, arch.ffn_hidden_size, arch.num_attention_heads,
                      arch.num_query_groups, arch.vocab_size)
    frozen = 0 if models.cache is not None else 1 + (models.guidance is not None)
    peak = peak_tflops()
    stop = StopRequest(cfg.exit_duration_in_mins)
    iteration, last_saved = start_iteration, start_iteration
    while iteration < iters:
        t0 = time.monotonic()
        batches = source.next_global_batch()
        lr = optimizer.param_groups[0]["lr"]  # the rate this step used
        metrics = train_step(cfg, models, optimizer, batches)
        scheduler.step(increment=1)
        iteration += 1
        consumed += cfg.global_batch_size
        elapsed = time.monotonic() - t0
        tokens = sum(b["input_ids"].numel() for b in batches) * ps.get_data_parallel_world_size()
        tflops = flops.step_flops(tokens=tokens, seq_length=batches[0]["input_ids"].shape[1], frozen_models=frozen)
        metrics.update(lr=lr, tokens_per_s=tokens / elapsed, tflops=tflops / elapsed / 1e12 / dist.get_world_size(),
                       step_time_s=elapsed, consumed_samples=consumed)
        if peak:
            metrics["mfu"] = metrics["tflops"] / peak
        if iteration % cfg.log_interval == 0 or iteration == iters:
            logger.log_step(iteration, metrics)
        if cfg.eval_interval and iteration % cfg.eval_interval == 0 and iteration < iters:
            mid = held_out()
            if mid:
                logger.info(f"held-out at iteration {iteration}: " + _summary_line(mid))
        reason = stop.should_stop()
        if cfg.save and ((cfg.save_interval and iteration % cfg.save_interval == 0) or reason):
            save(iteration)
            last_saved = iteration
        if reason:
            logger.info(f"stopping after iteration {iteration} ({reason}); exit code {EXIT_REQUEUE} = requeue")
            logger.close()
            return EXIT_REQUEUE

    if cfg.save and iteration != last_saved:
        save(iteration)
    after = held_out()
    if after:
        logger.info("held-out after training: " + _summary_line(after))
        if rank0 and cfg.log_dir:
            summary = {"loss_type": cfg.loss_type, "iterations": iteration, "before": before, "after": after}
            with open(os.path.join(cfg.log_dir, "summary.json"), "w") as fh:
                json.dump(summary, fh, indent=2)
    logger.close()
    return 0


def _summary_line(m: dict) -> str:
    return (f"reward accuracy {m['rewards/accuracy']:.3f} | margin {m['rewards/margin']:+.4f} | "
            f"chosen {m['rewards/chosen']:+.4f} | rejected {m['rewards/rejected']:+.4f}")


def main(argv: Optional[list[str]] = None) -> None:
    cfg = parse_args(argv)
    launch = distributed.read_launch_env()
    distributed.init_process_group(launch)
    code = 1
    try:
        code = run(cfg)
    except ConfigError as exc:
        if dist.get_rank() == 0:
            print(exc.code if isinstance(exc.code, str) else exc, file=sys.stderr, flush=True)
        code = 2
    finally:
        distributed.destroy()
    sys.exit(code)


if __name__ == "__main__":
    main()
