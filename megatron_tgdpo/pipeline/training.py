"""The ``megatron_tgdpo.train`` flags of each model of a run.

* ``sft``: token cross-entropy on the SFT set (kind ``sft``), from the seeded initialisation.
* ``dpo``: DPO on the on-policy pairs; reference and starting point: the SFT model. It is also the
  guidance model of TGDPO.
* ``tgdpo``: TGDPO on the same pairs, reference and start the SFT model, guided by the DPO model, with
  the token weights ``1 ± alpha * beta * (log pi_guide - log pi_ref)`` (the guidance reward uses the
  run's ``beta``, as the loss does).
* With a pretrained ``base`` and no SFT stage, the base model stands where the SFT model does above;
  with one, SFT starts from the base.
* ``simpo``: SimPO (no reference) and ``ipo``: IPO, both starting from the SFT model.

Every preference model gets the same schedule, data order (the seed) and batch size; only the loss
and its own coefficients differ.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from megatron_tgdpo.pipeline.config import PipelineConfig, TrainSettings

__all__ = ["model_name", "preference_flags", "reward_model_flags", "sft_flags"]


def model_name(method: str, alpha: Optional[float] = None) -> str:
    """Directory / row name: ``tgdpo-a0.5`` for TGDPO at alpha 0.5, the method otherwise."""
    return f"tgdpo-a{alpha:g}" if method == "tgdpo" else method


def _common(cfg: PipelineConfig, settings: TrainSettings, *, seed: int, data: Path, save: Path, log_dir: Path,
            save_interval: int = 0) -> list[str]:
    # A pretrained base names its own architecture (and the policy starts from it unless it resumes).
    model = ["--load", cfg.base] if cfg.base else ["--model", cfg.model]
    flags = [
        *model, "--seq-length", str(cfg.seq_length), "--data-path", str(data),
        "--micro-batch-size", str(settings.micro_batch_size), "--global-batch-size", str(settings.global_batch_size),
        "--lr", str(settings.lr), "--min-lr", str(settings.min_lr), "--lr-warmup-fraction", str(settings.warmup_fraction),
        "--train-iters", str(settings.iters), "--seed", str(seed), "--eval-iters", "0",
        "--log-interval", str(max(1, min(10, settings.iters // 20 or 1))), "--save", str(save),
        "--log-dir", str(log_dir), "--no-tensorboard",
    ]
    if save_interval:
        flags += ["--save-interval", str(save_interval)]
    # Named either way: packed runs keep the specs they had, padded ones say so (the trainer packs by default).
    flags += ["--pack-sequences" if cfg.pack_sequences else "--no-pack-sequences"]
    if cfg.share_prompt is not None:
        flags += ["--share-prompt" if cfg.share_prompt else "--no-share-prompt"]
    if cfg.pad_to_multiple_of != 16:  # the trainer's default; left out so specs of earlier runs still match
        flags += ["--pad-to-multiple-of", str(cfg.pad_to_multiple_of)]
    return flags


def sft_flags(cfg: PipelineConfig, *, seed: int, data: Path, save: Path, log_dir: Path) -> list[str]:
    return _common(cfg, cfg.sft, seed=seed, data=data, save=save, log_dir=log_dir) + ["--loss-type", "sft"]


def preference_flags(cfg: PipelineConfig, method: str, *, seed: int, data: Path, sft: Path, save: Path,
                     log_dir: Path, guidance: Optional[Path] = None, alpha: Optional[float] = None,
                     save_interval: int = 0) -> list[str]:
    flags = _common(cfg, cfg.preference, seed=seed, data=data, save=save, log_dir=log_dir,
                    save_interval=save_interval)
    flags += ["--loss-type", method, "--ref-load", str(sft)]  # SimPO reads no reference: it only starts there
    if method in ("dpo", "tgdpo"):
        flags += ["--beta", str(cfg.beta)]
    if method == "tgdpo":
        if guidance is None or alpha is None:
            raise ValueError("tgdpo needs a guidance model and an alpha")
        flags += ["--guidance-load", str(guidance), "--alpha", str(alpha)]
    elif method == "simpo":
        flags += ["--beta", str(cfg.simpo_beta), "--simpo-gamma", str(cfg.simpo_gamma)]
    elif method == "ipo":
        flags += ["--beta", str(cfg.ipo_beta)]
    return flags


def reward_model_flags(cfg: PipelineConfig, *, seed: int, data: Path, sft: Path, save: Path,
                       log_dir: Path) -> list[str]:
    """A Bradley-Terry reward model (``--loss-type rm``) on the preference pairs, with its own schedule
    (``cfg.reward_model``; the preference schedule when unset); its backbone starts from the SFT model (the
    base without one), as every preference model does."""
    return _common(cfg, cfg.reward_model_settings, seed=seed, data=data, save=save, log_dir=log_dir) + [
        "--loss-type", "rm", "--ref-load", str(sft)]
