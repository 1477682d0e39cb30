"""Path flags that point at the wrong kind of thing, and flags this machine cannot run, found before any compute.

Each problem is one line naming the flag, the path and what the flag expects: a model flag given a
file, an empty directory or a Hugging Face directory whose weights cannot be read; a log-prob cache
flag given a directory that is not one; ``--fp8-format`` on a machine without CUDA and
TransformerEngine. A path that does not exist is not reported here: :func:`megatron_tgdpo.config.validate`
says so already.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

__all__ = ["CACHE_FORMAT", "CACHE_MANIFEST", "MODEL_DIRECTORY", "config_problems", "logprob_cache_problem", "model_dir_problem",
           "reward_model_problem"]

#: what every model flag (--ref-load, --guidance-load, --reward-model-load, --critic-load) accepts
MODEL_DIRECTORY = ("a checkpoint directory (a --save root with iter_* directories, or one iter_* directory) or a "
                   "model directory (Hugging Face with safetensors weights, or converted), or a .gguf model file")

#: the manifest a complete log-prob cache holds (written last by tools/precompute_logprobs.py) and its format
#: name: ``logprob_cache.MANIFEST`` and ``logprob_cache.FORMAT``, a layer above this one (a test keeps them equal)
CACHE_MANIFEST = "manifest.json"
CACHE_FORMAT = "megatron_tgdpo.logprob_cache"


def _reason(exc: Exception, path: Path) -> str:
    """An error's text without the path it starts with (the caller's line names it already)."""
    text = str(exc)
    for prefix in (f"{path}: ", f"{path}/"):
        if text.startswith(prefix):
            return text[len(prefix):] if prefix.endswith(": ") else text
    return text


def model_dir_problem(flag: str, path: Optional[str], *, checkpoint_root_ok: bool = True) -> Optional[str]:
    """Why ``path`` cannot be what model flag ``flag`` loads, or None (also for no path or a missing one).

    ``checkpoint_root_ok=False`` (``--load``): only a model directory is judged; whether a directory
    holds a checkpoint to resume is decided when resuming."""
    if path is None or not os.path.exists(path):
        return None
    from megatron_tgdpo import checkpointing
    from megatron_tgdpo.convert import ConversionError
    from megatron_tgdpo.convert.safetensors_io import hf_weight_map
    from megatron_tgdpo.models.sources import ModelSource

    if os.path.isfile(path):
        from megatron_tgdpo.data.gguf_tokenizer import is_gguf_file

        return None if is_gguf_file(path) else f"{flag} {path}: is a file; expected {MODEL_DIRECTORY}"
    source = ModelSource.of(path)
    if source.kind == "hf":
        try:
            hf_weight_map(Path(path))
        except (ConversionError, OSError) as exc:
            return f"{flag} {path}: a Hugging Face directory whose weights cannot be read: {_reason(exc, Path(path))}"
        return None
    if source.kind == "converted" or not checkpoint_root_ok:
        return None
    if checkpointing.is_iteration_dir(path) or checkpointing.iteration_dirs(path):
        return None  # whether that checkpoint is intact is decided (with fallback) when it is loaded
    return f"{flag} {path}: holds no checkpoint (no iter_* directory) and no model (no config.json); expected " \
           f"{MODEL_DIRECTORY}"


def logprob_cache_problem(path: Optional[str]) -> Optional[str]:
    """Why ``--logprob-cache path`` is no log-prob cache at all, or None; whether it fits the run (data
    set, checkpoints, seed) is checked when it is opened."""
    if path is None or not os.path.exists(path):
        return None
    from megatron_tgdpo import integrity

    expected = "expected a directory made by tools/precompute_logprobs.py"
    if not os.path.isdir(path):
        return f"--logprob-cache {path}: is a file; {expected}"
    file = Path(path) / CACHE_MANIFEST
    if not file.is_file():
        return f"--logprob-cache {path}: has no {CACHE_MANIFEST} (not a log-prob cache, or its precompute run " \
               f"did not finish); {expected}"
    try:
        meta = integrity.read_json(file)
    except integrity.FormatError as exc:
        return f"--logprob-cache {path}: not a log-prob cache ({exc}); {expected}"
    if meta.get("format") != CACHE_FORMAT:
        return f"--logprob-cache {path}: {CACHE_MANIFEST} is not a log-prob cache manifest (format " \
               f"{meta.get('format')!r}); {expected}"
    return None


def _fp8_problem(fp8_format: Optional[str]) -> Optional[str]:
    if fp8_format is None:
        return None
    import torch

    from megatron_tgdpo import compat

    if not torch.cuda.is_available():
        return f"--fp8-format {fp8_format}: FP8 needs a CUDA GPU and TransformerEngine; this machine has no CUDA " \
               "device: drop the flag"
    if not compat.te_available():
        return f"--fp8-format {fp8_format}: FP8 needs TransformerEngine, which is not importable here: install " \
               "transformer-engine or drop the flag"
    return None


def reward_model_problem(flag: str, path: Optional[str], *, takes: str) -> Optional[str]:
    """A reward-model checkpoint given to a flag that loads a language model (its log-probs are read),
    or None."""
    from megatron_tgdpo.models.sources import is_reward_model_checkpoint

    if path is None or not os.path.exists(path) or not is_reward_model_checkpoint(path):
        return None
    return f"{flag} {path}: a reward model checkpoint (saved by --loss-type rm), not a language model; {takes}"


def config_problems(cfg: Any) -> list[str]:
    """Every wrong-kind path and unrunnable flag of a training configuration, one line each."""
    found = [model_dir_problem(flag, getattr(cfg, name, None)) for flag, name in
             (("--ref-load", "ref_load"), ("--guidance-load", "guidance_load"))]
    found.append(reward_model_problem("--ref-load", getattr(cfg, "ref_load", None),
                                      takes="--ref-load takes the reference policy (the model training starts from)"))
    from megatron_tgdpo.guidance import DEFAULT_SOURCE, DpoModelSource

    if getattr(cfg, "guidance_source", DEFAULT_SOURCE) == DpoModelSource.name:  # reads --guidance-load's log-probs
        found.append(reward_model_problem(
            "--guidance-load", getattr(cfg, "guidance_load", None),
            takes="add --guidance-source reward-model to guide with it, or give a DPO-trained model"))
    found.append(model_dir_problem("--load", getattr(cfg, "load", None), checkpoint_root_ok=False))
    found.append(logprob_cache_problem(getattr(cfg, "logprob_cache", None)))
    found.append(_fp8_problem(getattr(cfg, "fp8_format", None)))
    return [line for line in found if line]
