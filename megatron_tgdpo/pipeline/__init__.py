"""The TGDPO method end to end, resumable: prompts -> SFT -> on-policy pairs -> DPO -> TGDPO (and SimPO,
IPO) -> held-out scores of every model, for one or more seeds.

Entry points: ``megatron-tgdpo replicate`` (the full comparison, docs/results.md) and
``megatron-tgdpo demo`` (the short version). One file per job:

* ``config.py``: the run's settings and presets (``full``, ``demo``, ``smoke``);
* ``stages.py``: fingerprinted, resumable stages (skipped while their outputs check out);
* ``prompts.py``: the prompt files (SFT / preference / held-out, disjoint) and the SFT data;
* ``training.py``: the trainer flags of each model; ``launch.py``: child processes;
* ``sample.py``: the sampling worker (many models, one process);
* ``evaluate.py``: scores and win rates; ``report.py``: the tables;
* ``run.py``: the stages wired together.
"""
from megatron_tgdpo.pipeline.config import PRESETS, PipelineConfig, TrainSettings, preset
from megatron_tgdpo.pipeline.run import Replication, run_replication
from megatron_tgdpo.pipeline.stages import PipelineError

__all__ = ["PRESETS", "PipelineConfig", "PipelineError", "Replication", "TrainSettings", "preset", "run_replication"]
