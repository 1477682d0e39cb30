"""The Trainer: one set-up sequence, one step, evaluation and checkpoints, for every training method.

``Trainer(cfg, algorithm_cls)`` runs an :class:`~megatron_tgdpo.runtime.algorithm.Algorithm`:

* :meth:`Trainer.check` — every configuration problem, before data or models are touched;
* :meth:`Trainer.setup` — the one set-up sequence (:func:`set_up`: data, architecture, parallel groups,
  seeds, the checkpoint writer helper; then the algorithm's iterations and models);
* :meth:`Trainer.resume` — continue from ``--load`` (or start at iteration 0);
* :meth:`Trainer.step` — one iteration: a :class:`StepResult` with what the loop reports;
* :meth:`Trainer.evaluate` — held-out values (and the algorithm's ``heldout.jsonl`` row);
* :meth:`Trainer.save` — a checkpoint of the algorithm's parts at the current iteration.

The loop (:mod:`megatron_tgdpo.runtime.loop`) only schedules these. The log-prob precompute
(:mod:`megatron_tgdpo.precompute`) uses :func:`set_up` alone; the step benchmark
(``tools/bench_step.py``) a whole Trainer.
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional


from megatron_tgdpo import checkpointing
from megatron_tgdpo.config import ConfigError, TrainConfig
from megatron_tgdpo.models.llama import LlamaArch
from megatron_tgdpo.models.sources import ModelSource
from megatron_tgdpo.monitoring import MetricsLogger, attention_span
from megatron_tgdpo.runtime import lifecycle, setup
from megatron_tgdpo.runtime.algorithm import Algorithm, RunContext, StepResult
from megatron_tgdpo.runtime.prefetch import Prefetcher

__all__ = ["HELDOUT_FILE", "RunSetup", "Trainer", "set_up"]

#: ``<log-dir>/heldout.jsonl``: one row per evaluation, for algorithms that write one (``heldout_record``)
HELDOUT_FILE = "heldout.jsonl"


@dataclass(frozen=True)
class RunSetup:
    """What the set-up sequence decided."""

    data: setup.DataSpec
    arch: LlamaArch
    arch_name: str


def set_up(cfg: TrainConfig) -> RunSetup:
    """The set-up sequence every job shares (training, PPO, the log-prob precompute, the step benchmark),
    on every rank of an initialised process group: the data and tokenizer, the architecture, the
    megatron-core parallel groups, the seeds, and the checkpoint writer helper when ``--save`` is set."""
    data = setup.resolve_data(cfg)
    arch, arch_name = setup.resolve_architecture(cfg, tokenizer_vocab=data.vocab_size)
    setup.init_parallel(cfg)
    setup.seed_everything(cfg.seed)
    if cfg.save is not None:
        lifecycle.start_checkpoint_writer_helper()
    return RunSetup(data=data, arch=arch, arch_name=arch_name)


def _same_path(a: Optional[str], b: Optional[str]) -> bool:
    return a is not None and b is not None and os.path.abspath(a) == os.path.abspath(b)


class Trainer:
    """One training run of ``algorithm_cls`` under ``cfg`` (see the module docstring)."""

    def __init__(self, cfg: TrainConfig, algorithm_cls: type[Algorithm]):
        self.cfg = cfg
        self.algorithm_cls = algorithm_cls
        self.algorithm: Optional[Algorithm] = None
        self.run: Optional[RunSetup] = None
        self.origin: dict = {}
        self.iterations = 0
        self.iteration = 0  # iterations trained so far (resumed ones included)
        self.consumed_samples = 0
        self.data_parallel_size = 1
        self.batches: list = []  # the last step's micro-batches (this rank's)
        self.source = None
        #: where the Trainer's own lines go (the loop points it at its logger)
        self.say: Callable[[str], None] = lambda text: None
        #: where the held-out rows go (the loop's MetricsLogger: rank 0, --log-dir, write failures only warn)
        self.log_sink: Optional[MetricsLogger] = None

    # ---- set-up -------------------------------------------------------------------------------
    @staticmethod
    def check(cfg: TrainConfig) -> None:
        """Every configuration problem, before data or models are touched; raises ConfigError."""
        arch, arch_name = setup.declared_architecture(cfg)
        setup.check_config(cfg, arch, name=arch_name)

    def setup(self, *, iterations: Optional[int] = None) -> Algorithm:
        """:func:`set_up`, then the algorithm with its models built; ``iterations`` overrides what the
        algorithm's data gives (:meth:`Algorithm.iterations`)."""
        from megatron.core import parallel_state as ps

        from megatron_tgdpo.convert.origin import run_origin

        cfg = self.cfg
        self.run = run = set_up(cfg)
        self.origin = run_origin(load=cfg.load, ref_load=cfg.ref_load, tokenizer=run.data.tokenizer)  # megatron-to-hf
        self.iterations = iterations if iterations is not None else self.algorithm_cls.iterations(cfg, run.data)
        self.algorithm = self.algorithm_cls(RunContext(cfg=cfg, arch=run.arch, arch_name=run.arch_name, data=run.data,
                                                       train_iters=self.iterations))
        self.algorithm.build()
        self.data_parallel_size = ps.get_data_parallel_world_size()
        return self.algorithm

    def resume(self) -> Optional[dict]:
        """Continue from ``--load``: the checkpoint's metadata, or None for a fresh run (iteration 0).

        ``--load`` is a checkpoint root (its newest intact checkpoint), one ``iter_*`` directory (exactly
        that one), a model directory (a fresh run starting from it: see ``setup.policy_start``), or — only
        when it is also ``--save`` — a directory with no checkpoint yet (a fresh run, said on screen).
        Anything else is an error, never a silent fresh start; a root whose checkpoints are all damaged is
        an error too (nothing is loaded, nothing deleted)."""
        cfg = self.cfg
        self.iteration, self.consumed_samples = 0, 0
        if cfg.load is None or ModelSource.of(cfg.load, seed=cfg.seed).is_model_directory:
            return None
        path = Path(cfg.load)
        if not (checkpointing.is_iteration_dir(path) or checkpointing.iteration_dirs(path)):
            if _same_path(cfg.load, cfg.save):
                self.say(f"no checkpoint in {cfg.load} yet: starting from iteration 0")
                return None
            raise ConfigError(f"--load {cfg.load}: holds no checkpoint (no iter_* directory); to start a fresh run "
                              "drop --load, or pass the --save directory as --load")
        try:
            meta = checkpointing.load_checkpoint(cfg.load, parts=self.algorithm.parts(), load_optimizer=cfg.load_optim,
                                                 load_rng=cfg.load_rng)
        except checkpointing.CheckpointError as exc:
            raise ConfigError(str(exc)) from None
        self.iteration, self.consumed_samples = int(meta["iteration"]), int(meta.get("consumed_samples", 0))
        return meta

    # ---- the run ------------------------------------------------------------------------------
    def step(self) -> StepResult:
        """One iteration on the next global batch; the result with every count and the LR filled in."""
        if self.source is None:
            self.source = Prefetcher(self.algorithm.train_source(consumed_samples=self.consumed_samples),
                                     remaining=max(1, self.iterations - self.iteration))
        batches = self.source.next_global_batch()
        lr = self.algorithm.learning_rate()  # the rate this step uses (the scheduler advances in the step)
        result = self.algorithm.train_step(batches)
        self.iteration += 1
        self.consumed_samples += self.cfg.global_batch_size
        self.batches = batches
        return dataclasses.replace(
            result,
            tokens=result.tokens if result.tokens is not None else sum(b.num_tokens for b in batches),
            real_tokens=result.real_tokens if result.real_tokens is not None else sum(b.real_tokens for b in batches),
            attention_span=(result.attention_span if result.attention_span is not None
                            else attention_span(batches)),
            lr=result.lr if result.lr is not None else lr,
        )

    def evaluate(self) -> Optional[dict[str, float]]:
        """Held-out values (the algorithm's ``eval_means``) of the current policy; None when this run
        does not evaluate. Appends the algorithm's row, if any, to ``<log-dir>/heldout.jsonl``.
        Collective: every rank calls it."""
        algorithm = self.algorithm
        batches = algorithm.eval_batches()
        if batches is None:
            return None
        metrics = algorithm.evaluate(batches)
        if metrics is None:
            self.say(f"held-out evaluation skipped: {algorithm.no_evaluation}")
            return None
        values = metrics.reduce(means=algorithm.eval_means)
        record = algorithm.heldout_record(iteration=self.iteration, values=values)
        if record is not None and self.log_sink is not None:
            row = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in record.items()}
            self.log_sink.append_jsonl(HELDOUT_FILE, row)  # a full log disk only warns
        return values

    def save(self) -> Path:
        """A checkpoint of the algorithm's parts at the current iteration (every rank calls it)."""
        run = self.run
        state = {"consumed_samples": self.consumed_samples, "config": self.cfg.to_dict(),
                 "arch": dataclasses.asdict(run.arch), "model_name": run.arch_name, **self.origin}
        return checkpointing.save_checkpoint(self.cfg.save, iteration=self.iteration, parts=self.algorithm.parts(),
                                             state=state, keep_last=self.cfg.keep_last)
