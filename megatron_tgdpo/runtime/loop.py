"""The training loop every algorithm shares: it schedules a :class:`~megatron_tgdpo.runtime.trainer.Trainer`.

The Trainer sets up, resumes, steps, evaluates and saves; the loop decides when (the save, eval and log
cadence, the stop request, the non-finite guard's patience) and reports (metrics, console lines).
:func:`run` takes a configuration and an algorithm class and returns the process exit code: 0 when the
run finished, :data:`~megatron_tgdpo.runtime.signals.EXIT_REQUEUE` (75) after a preemption save.
Configuration problems raise :class:`~megatron_tgdpo.config.ConfigError` before any compute.
"""
from __future__ import annotations

import time
from typing import Optional

import torch.distributed as dist

from megatron_tgdpo import compat, safe_pickle
from megatron_tgdpo.config import ConfigError, TrainConfig, shares_prompt
from megatron_tgdpo.monitoring import FlopModel, MetricsLogger, peak_tflops
from megatron_tgdpo.runtime import save_dir
from megatron_tgdpo.runtime.algorithm import Algorithm, format_summary
from megatron_tgdpo.runtime.signals import EXIT_REQUEUE, StopRequest
from megatron_tgdpo.runtime.trainer import Trainer

__all__ = ["NonFiniteError", "run"]


class NonFiniteError(RuntimeError):
    """Too many consecutive steps had a NaN/Inf loss or gradient norm."""


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


def run(cfg: TrainConfig, algorithm_cls: type[Algorithm]) -> int:
    """Train ``cfg`` with ``algorithm_cls`` on every rank; returns the exit code."""
    rank0 = dist.get_rank() == 0
    safe_pickle.trust_checkpoints(cfg.trust_checkpoint)  # before any checkpoint is read
    # A stop signal only sets a flag (the entry point's, from the command's first line): acted on once
    # --save is claimed, before the first step (exit 75, nothing new to save) and at every step boundary.
    stop = StopRequest.for_run(cfg.exit_duration_in_mins)
    lock = None
    try:
        Trainer.check(cfg)  # before touching data or building anything
        lock = _claim_save_dir(cfg)
        if (code := stop.stop_before_training(save=cfg.save, say=print if rank0 else lambda _: None)) is not None:
            return code
        return _train(cfg, algorithm_cls, rank0=rank0, stop=stop)
    finally:
        stop.restore()
        if lock is not None:
            lock.release()


def _rows(cfg: TrainConfig) -> str:
    """How the step lays out its sequences, for the start-up line (sharing changes the positions computed)."""
    if not cfg.pack_sequences:
        return "padded rows"
    return "packed rows, prompts shared" if shares_prompt(cfg) else "packed rows"


def _train(cfg: TrainConfig, algorithm_cls: type[Algorithm], *, rank0: bool, stop: StopRequest) -> int:
    trainer = Trainer(cfg, algorithm_cls)
    algorithm = trainer.setup()
    arch, arch_name, iters = trainer.run.arch, trainer.run.arch_name, trainer.iterations
    logger = MetricsLogger.for_run(cfg, enabled=rank0, total_iters=iters)
    trainer.say, trainer.log_sink = logger.info, logger
    meta = trainer.resume()
    start_iteration = trainer.iteration
    if cfg.load is not None:
        logger.drop_rows_after(start_iteration)  # the steps after the checkpoint are redone: one row each
    dp = trainer.data_parallel_size
    span = f"iterations {start_iteration + 1}..{iters}" if start_iteration < iters else \
        f"already at iteration {start_iteration} of {iters}: nothing to train"
    logger.info(
        f"megatron_tgdpo: {algorithm.describe()} | model {arch_name} ({arch.num_parameters() / 1e6:.1f}M params) | "
        f"world {dist.get_world_size()} = TP {cfg.tensor_model_parallel_size} x PP {cfg.pipeline_model_parallel_size}"
        f" x CP {cfg.context_parallel_size} x DP {dp} | megatron-core {compat.mcore_version()} | "
        f"{'TE' if compat.te_available() else 'local'} layers | {_rows(cfg)} | {span}"
    )
    if meta is not None:
        logger.info(f"resumed from {meta['path']} (iteration {start_iteration}, {trainer.consumed_samples} samples "
                    "consumed)")

    def held_out(when: str) -> Optional[dict]:
        values = trainer.evaluate()
        if values is not None:
            logger.info(f"held-out {when}: " + format_summary(values, algorithm.heldout_summary))
        return values

    def save() -> None:
        logger.info(f"saved {trainer.save()}")

    if (code := stop.stop_before_training(save=cfg.save, say=logger.info)) is not None:
        logger.close()
        return code
    before = held_out("before training") if start_iteration == 0 else None

    flops = FlopModel(arch.num_layers, arch.hidden_size, arch.ffn_hidden_size, arch.num_attention_heads,
                      arch.num_query_groups, arch.vocab_size)
    peak = peak_tflops()
    last_saved, nonfinite = start_iteration, 0
    try:
        while trainer.iteration < iters:
            t0 = time.monotonic()
            result = trainer.step()
            iteration = trainer.iteration
            nonfinite = 0 if result.updated else nonfinite + 1
            elapsed = time.monotonic() - t0
            if iteration % cfg.log_interval == 0 or iteration == iters or not result.updated:
                metrics = result.metrics.reduce(means=algorithm.means, maxima=algorithm.maxima)
                # This rank's micro-batches x DP: computed positions (padding included) and real tokens.
                tokens, real = result.tokens * dp, result.real_tokens * dp
                step_flops = flops.step_flops(tokens=tokens, seq_length=result.attention_span,
                                              frozen_models=algorithm.passes_per_token - 3.0)
                metrics.update(lr=result.lr, grad_norm=result.grad_norm, tokens_per_s=tokens / elapsed,
                               real_tokens_per_s=real / elapsed, pairs_per_s=cfg.global_batch_size / elapsed,
                               token_efficiency=real / tokens if tokens else float("nan"),
                               tflops=step_flops / elapsed / 1e12 / dist.get_world_size(),
                               step_time_s=elapsed, consumed_samples=trainer.consumed_samples,
                               skipped=int(not result.updated))
                if peak:
                    metrics["mfu"] = metrics["tflops"] / peak
                logger.log_step(iteration, metrics)
                if algorithm.step_summary:
                    logger.info(f"  {algorithm.name} {iteration:>6} | " + format_summary(metrics, algorithm.step_summary,
                                                                                         skip_nan=True))
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
                held_out(f"at iteration {iteration}")
            reason = stop.should_stop()
            # No checkpoint while steps are being skipped: the newest one stays from before the streak.
            if cfg.save and nonfinite == 0 and ((cfg.save_interval and iteration % cfg.save_interval == 0) or reason):
                if iteration != last_saved:
                    save()
                    last_saved = iteration
            if reason:
                if cfg.save and rank0:
                    save_dir.write_requeue_marker(cfg.save, iteration=last_saved, reason=reason)
                dist.barrier()  # the marker is on disk before any rank exits (srun may then kill the rest)
                logger.info(f"stopping after iteration {iteration} ({reason}); exit code {EXIT_REQUEUE} = requeue"
                            + ("" if cfg.save else " (no --save: nothing was saved)"))
                return EXIT_REQUEUE
        if cfg.save and trainer.iteration != last_saved:
            save()
        after = held_out("after training")
        if after:
            logger.write_json("summary.json", {"loss_type": cfg.loss_type, "iterations": trainer.iteration,
                                               "before": before, "after": after})  # rank 0 with --log-dir; a full disk only warns
        return 0
    finally:
        logger.close()
