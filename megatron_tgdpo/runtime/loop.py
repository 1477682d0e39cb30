"""The training loop every algorithm shares: set-up, resume, steps, cadence, stop, save.

:func:`run` takes a configuration and an algorithm class and returns the process exit code: 0 when the
run finished, :data:`~megatron_tgdpo.runtime.signals.EXIT_REQUEUE` (75) after a preemption save.
Configuration problems raise :class:`~megatron_tgdpo.config.ConfigError` before any compute.
"""
from __future__ import annotations

import dataclasses
import math
import os
import time
from pathlib import Path
from typing import Iterator, Optional

import torch.distributed as dist

from megatron_tgdpo import checkpointing, compat, safe_pickle
from megatron_tgdpo.config import ConfigError, TrainConfig
from megatron_tgdpo.convert.origin import run_origin
from megatron_tgdpo.data.batch import Batch
from megatron_tgdpo.models.sources import ModelSource
from megatron_tgdpo.monitoring import FlopModel, MetricsLogger, attention_span, peak_tflops
from megatron_tgdpo.runtime import lifecycle, save_dir, setup
from megatron_tgdpo.runtime.algorithm import Algorithm, RunContext
from megatron_tgdpo.runtime.signals import EXIT_REQUEUE, StopRequest

__all__ = ["NonFiniteError", "run"]


class NonFiniteError(RuntimeError):
    """Too many consecutive steps had a NaN/Inf loss or gradient norm."""


def total_iterations(cfg: TrainConfig, dataset_len: int) -> int:
    if cfg.train_iters is not None:
        return cfg.train_iters
    return max(1, math.ceil(cfg.train_epochs * dataset_len / cfg.global_batch_size))


def _agree(problem: Optional[str]) -> Optional[str]:
    """Rank 0's problem (or None) on every rank: start-up checks that only rank 0 performs."""
    box = [problem]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _claim_save_dir(cfg: TrainConfig) -> Optional[save_dir.SaveLock]:
    """Writable ``--save``/``--log-dir``, and ``--save`` owned by this job (rank 0 holds the lock)."""
    lock, problems = None, []
    if dist.get_rank() == 0:
        for flag, path in (("--save", cfg.save), ("--log-dir", cfg.log_dir)):
            if path is not None and (problem := save_dir.check_writable(path, flag=flag)):
                problems.append(problem)
        if cfg.save is not None and not problems:
            lock = save_dir.SaveLock(cfg.save)
            try:
                lock.acquire()
                save_dir.clear_requeue_marker(cfg.save)
            except save_dir.SaveDirInUse as exc:
                problems.append(str(exc))
                lock = None
    problems_text = _agree("\n".join(problems) or None)
    if problems_text:
        raise ConfigError(problems_text.splitlines())
    return lock


def _same_path(a: Optional[str], b: Optional[str]) -> bool:
    return a is not None and b is not None and os.path.abspath(a) == os.path.abspath(b)


def _resume(cfg: TrainConfig, algorithm: Algorithm, logger: MetricsLogger) -> tuple[int, int, Optional[dict]]:
    """(iteration, consumed samples, metadata) to continue from; (0, 0, None) for a fresh run.

    ``--load`` is a checkpoint root (its newest intact checkpoint), one ``iter_*`` directory (exactly
    that one), a model directory (a fresh run starting from it: see ``setup.policy_start``), or — only
    when it is also ``--save`` — a directory with no checkpoint yet (a fresh run, said on screen).
    Anything else is an error, never a silent fresh start; a root whose checkpoints are all damaged is
    an error too (nothing is loaded, nothing deleted)."""
    if cfg.load is None or ModelSource.of(cfg.load, seed=cfg.seed).is_model_directory:
        return 0, 0, None
    path = Path(cfg.load)
    if not (checkpointing.is_iteration_dir(path) or checkpointing.iteration_dirs(path)):
        if _same_path(cfg.load, cfg.save):
            logger.info(f"no checkpoint in {cfg.load} yet: starting from iteration 0")
            return 0, 0, None
        raise ConfigError(f"--load {cfg.load}: holds no checkpoint (no iter_* directory); to start a fresh run drop "
                          "--load, or pass the --save directory as --load")
    try:
        meta = checkpointing.load_checkpoint(cfg.load, parts=algorithm.parts(), load_optimizer=cfg.load_optim,
                                             load_rng=cfg.load_rng)
    except checkpointing.CheckpointError as exc:
        raise ConfigError(str(exc)) from None
    return int(meta["iteration"]), int(meta.get("consumed_samples", 0)), meta


def _eval_batches(cfg: TrainConfig, algorithm: Algorithm, prefix: str) -> Iterator[list[Batch]]:
    source = algorithm.batch_source(prefix, consumed_samples=0, shuffle=False)
    for _ in range(cfg.eval_iters):
        yield source.next_global_batch()


def _summary_line(m: dict) -> str:
    return " | ".join(f"{k.split('/')[-1] if k.startswith('rewards/') else k} {v:+.4f}" if k != "rewards/accuracy"
                      else f"reward accuracy {v:.3f}" for k, v in m.items()
                      if k in ("rewards/accuracy", "rewards/margin", "rewards/chosen", "rewards/rejected", "loss"))


def run(cfg: TrainConfig, algorithm_cls: type[Algorithm]) -> int:
    """Train ``cfg`` with ``algorithm_cls`` on every rank; returns the exit code."""
    rank0 = dist.get_rank() == 0
    safe_pickle.trust_checkpoints(cfg.trust_checkpoint)  # before any checkpoint is read
    # A stop signal only sets a flag (the entry point's, from the command's first line): acted on once
    # --save is claimed, before the first step (exit 75, nothing new to save) and at every step boundary.
    stop = StopRequest.for_run(cfg.exit_duration_in_mins)
    lock = None
    try:
        arch, arch_name = setup.declared_architecture(cfg)
        setup.check_config(cfg, arch, name=arch_name)  # before touching data or building anything
        lock = _claim_save_dir(cfg)
        if (code := stop.stop_before_training(save=cfg.save, say=print if rank0 else lambda _: None)) is not None:
            return code
        return _train(cfg, algorithm_cls, rank0=rank0, stop=stop)
    finally:
        stop.restore()
        if lock is not None:
            lock.release()


def _train(cfg: TrainConfig, algorithm_cls: type[Algorithm], *, rank0: bool, stop: StopRequest) -> int:
    from megatron.core import parallel_state as ps

    from megatron_tgdpo.data import PreferenceDataset

    data = setup.resolve_data(cfg)
    origin = run_origin(load=cfg.load, ref_load=cfg.ref_load, tokenizer=data.tokenizer)  # for megatron-to-hf
    arch, arch_name = setup.resolve_architecture(cfg, tokenizer_vocab=data.vocab_size)
    setup.init_parallel(cfg)
    setup.seed_everything(cfg.seed)
    if cfg.save is not None:
        lifecycle.start_checkpoint_writer_helper()
    iters = total_iterations(cfg, len(PreferenceDataset(data.train_prefix)))
    algorithm = algorithm_cls(RunContext(cfg=cfg, arch=arch, arch_name=arch_name, data=data, train_iters=iters))
    algorithm.build()
    logger = MetricsLogger.for_run(cfg, enabled=rank0, total_iters=iters)
    start_iteration, consumed, meta = _resume(cfg, algorithm, logger)
    if cfg.load is not None:
        logger.drop_rows_after(start_iteration)  # the steps after the checkpoint are redone: one row each
    dp = ps.get_data_parallel_world_size()
    span = f"iterations {start_iteration + 1}..{iters}" if start_iteration < iters else \
        f"already at iteration {start_iteration} of {iters}: nothing to train"
    logger.info(
        f"megatron_tgdpo: {algorithm.describe()} | model {arch_name} ({arch.num_parameters() / 1e6:.1f}M params) | "
        f"world {dist.get_world_size()} = TP {cfg.tensor_model_parallel_size} x PP {cfg.pipeline_model_parallel_size}"
        f" x CP {cfg.context_parallel_size} x DP {dp} | megatron-core {compat.mcore_version()} | "
        f"{'TE' if compat.te_available() else 'local'} layers | {span}"
    )
    if meta is not None:
        logger.info(f"resumed from {meta['path']} (iteration {start_iteration}, {consumed} samples consumed)")

    def held_out() -> Optional[dict]:
        if data.eval_prefix is None or cfg.eval_iters <= 0:
            return None
        metrics = algorithm.evaluate(_eval_batches(cfg, algorithm, data.eval_prefix))
        if metrics is None:
            logger.info("held-out evaluation skipped: it needs the reference model, which this run does not build")
            return None
        return metrics.reduce(means=algorithm.eval_means)

    def save(iteration: int) -> None:
        state = {"consumed_samples": consumed, "config": cfg.to_dict(), "arch": dataclasses.asdict(arch),
                 "model_name": arch_name, **origin}
        path = checkpointing.save_checkpoint(cfg.save, iteration=iteration, parts=algorithm.parts(), state=state,
                                             keep_last=cfg.keep_last)
        logger.info(f"saved {path}")

    if (code := stop.stop_before_training(save=cfg.save, say=logger.info)) is not None:
        logger.close()
        return code
    before = held_out() if start_iteration == 0 else None
    if before:
        logger.info("held-out before training: " + _summary_line(before))

    source = algorithm.batch_source(data.train_prefix, consumed_samples=consumed, shuffle=True)
    flops = FlopModel(arch.num_layers, arch.hidden_size, arch.ffn_hidden_size, arch.num_attention_heads,
                      arch.num_query_groups, arch.vocab_size)
    peak = peak_tflops()
    iteration, last_saved, nonfinite = start_iteration, start_iteration, 0
    try:
        while iteration < iters:
            t0 = time.monotonic()
            batches = source.next_global_batch()
            lr = algorithm.parts()["policy"].optimizer.param_groups[0]["lr"]  # the rate this step used
            result = algorithm.train_step(batches)
            iteration += 1
            consumed += cfg.global_batch_size
            nonfinite = 0 if result.updated else nonfinite + 1
            elapsed = time.monotonic() - t0
            if iteration % cfg.log_interval == 0 or iteration == iters or not result.updated:
                metrics = result.metrics.reduce(means=algorithm.means, maxima=algorithm.maxima)
                # This rank's micro-batches x DP: computed positions (padding included) and real tokens.
                tokens = sum(b.num_tokens for b in batches) * dp
                real = sum(b.real_tokens for b in batches) * dp
                step_flops = flops.step_flops(tokens=tokens, seq_length=attention_span(batches),
                                              frozen_models=algorithm.passes_per_token - 3.0)
                metrics.update(lr=lr, grad_norm=result.grad_norm, tokens_per_s=tokens / elapsed,
                               real_tokens_per_s=real / elapsed, pairs_per_s=cfg.global_batch_size / elapsed,
                               token_efficiency=real / tokens if tokens else float("nan"),
                               tflops=step_flops / elapsed / 1e12 / dist.get_world_size(),
                               step_time_s=elapsed, consumed_samples=consumed, skipped=int(not result.updated))
                if peak:
                    metrics["mfu"] = metrics["tflops"] / peak
                logger.log_step(iteration, metrics)
            if not result.updated:
                logger.info(f"iteration {iteration}: non-finite loss or gradient norm ({result.grad_norm}); the "
                            f"update was skipped ({nonfinite} in a row, limit --skip-nonfinite-steps "
                            f"{cfg.skip_nonfinite_steps})")
                if nonfinite > cfg.skip_nonfinite_steps:
                    raise NonFiniteError(
                        f"{nonfinite} consecutive steps had a non-finite loss or gradient norm (last at iteration "
                        f"{iteration}); stopping without saving. The newest checkpoint is from before them; lower "
                        "--lr, check the data, or raise --skip-nonfinite-steps")
            if cfg.eval_interval and iteration % cfg.eval_interval == 0 and iteration < iters:
                mid = held_out()
                if mid:
                    logger.info(f"held-out at iteration {iteration}: " + _summary_line(mid))
            reason = stop.should_stop()
            # No checkpoint while steps are being skipped: the newest one stays from before the streak.
            if cfg.save and nonfinite == 0 and ((cfg.save_interval and iteration % cfg.save_interval == 0) or reason):
                if iteration != last_saved:
                    save(iteration)
                    last_saved = iteration
            if reason:
                if cfg.save and rank0:
                    save_dir.write_requeue_marker(cfg.save, iteration=last_saved, reason=reason)
                dist.barrier()  # the marker is on disk before any rank exits (srun may then kill the rest)
                logger.info(f"stopping after iteration {iteration} ({reason}); exit code {EXIT_REQUEUE} = requeue"
                            + ("" if cfg.save else " (no --save: nothing was saved)"))
                return EXIT_REQUEUE
        if cfg.save and iteration != last_saved:
            save(iteration)
        after = held_out()
        if after:
            logger.info("held-out after training: " + _summary_line(after))
            logger.write_json("summary.json", {"loss_type": cfg.loss_type, "iterations": iteration, "before": before,
                                               "after": after})  # rank 0 with --log-dir; a full disk only warns
        return 0
    finally:
        logger.close()
