"""A console that shows the run, not the libraries' internals.

megatron-core, torch and TransformerEngine print deprecation and fallback notices on every rank (six
blocks in a two-minute CPU run). The ones below are known and harmless for this project; they are
filtered here, in one place, once per process, each by its exact message. ``--verbose`` (or
``MEGATRON_TGDPO_VERBOSE=1``) shows them all. Anything not listed still prints: a new library notice is
added here, with why it is harmless, only once it has been read. ``HARMLESS_ON_CPU`` holds advice that
only matters with CUDA (filtered only when there is none).
"""
from __future__ import annotations

import logging
import warnings

from megatron_tgdpo.monitoring import verbose_requested

__all__ = ["HARMLESS_ON_CPU", "KNOWN_HARMLESS", "quiet_library_warnings", "verbose_requested"]

# (category, message regex, why it is harmless here)
KNOWN_HARMLESS: tuple[tuple[type[Warning], str, str], ...] = (
    (UserWarning, r".*Transformer Engine and Apex are not installed.*",
     "CPU runs use megatron-core's torch fallbacks on purpose"),
    (UserWarning, r".*Apex is not installed.*", "apex is never required"),
    (Warning, r".*GPTModel.*deprecated.*", "GPTModel is the model class for megatron-core 0.16-0.19"),
    (Warning, r".*HybridModel.*", "as above"),
    (FutureWarning, r".*torch\.distributed\._.*", "megatron-core's use of torch internals"),
    (FutureWarning, r".*`torch\.cuda\.amp\..*` is deprecated.*", "megatron-core's autocast calls"),
    (FutureWarning, r".*all_gather_into_tensor.*|.*reduce_scatter_tensor.*", "renamed collectives in torch 2.13"),
    (UserWarning, r".*TypedStorage is deprecated.*", "torch checkpoint internals"),
    (UserWarning, r".*c10d::allreduce_: an autograd kernel was not registered.*", "gloo collectives in autograd"),
    (UserWarning, r".*No device id is provided via `init_process_group` or `barrier`.*", "CPU/gloo start-up"),
    (DeprecationWarning, r".*", "library deprecations (the test-suite shows them)"),
    (UserWarning, r".*torch\.distributed\.checkpoint.*", "torch_dist writer internals"),
    (UserWarning, r".*Detected .* 'load_state_dict'.*", "dist_checkpointing internals"),
    (FutureWarning, r"Please use DTensor instead and we are deprecating ShardedTensor\.",
     "megatron-core's dist_checkpointing loads torch_dist checkpoints through torch's ShardedTensor"),
    (FutureWarning, r"`load_state_dict` is deprecated and will be removed in future versions\. Please use `load` "
                    r"instead\.", "megatron-core 0.16's torch_dist loader calls torch.distributed.checkpoint's old name"),
    (UserWarning, r"full scope is deprecated\. Use empty cuda_graph_scope to capture the whole layer\.",
     "megatron-core 0.16's own TransformerConfig default (cuda_graph_scope='full'); no CUDA graphs are used"),
)

# Harmless only without CUDA: on GPUs they are real advice (the sbatch examples follow it).
HARMLESS_ON_CPU: tuple[tuple[type[Warning], str, str], ...] = (
    (UserWarning, r"When using (async grad allreduce|sequence parallelism) it is recommended to set the environment "
                  r"variable CUDA_DEVICE_MAX_CONNECTIONS to 1 for maximum speedup",
     "CUDA stream advice; gloo on CPU has no CUDA connections"),
)

_APPLIED = False


def quiet_library_warnings(*, verbose: bool = False) -> None:
    """Install the filters (idempotent). Call before megatron-core is imported.

    Verbose: the opposite, every listed warning is shown (once per place, Python's default), even where
    an earlier filter (the package's import-time one for the fallback notice) would hide it."""
    global _APPLIED
    if _APPLIED:
        return
    if verbose_requested(verbose):
        for category, pattern, _why in KNOWN_HARMLESS + HARMLESS_ON_CPU:
            if category is not DeprecationWarning:  # that entry matches everything; Python's own default stays
                warnings.filterwarnings("default", message=pattern, category=category)
        _APPLIED = True
        return
    import torch

    for category, pattern, _why in KNOWN_HARMLESS + (() if torch.cuda.is_available() else HARMLESS_ON_CPU):
        warnings.filterwarnings("ignore", message=pattern, category=category)
    # megatron-core logs INFO/WARNING lines through `logging` on every rank (e.g. its optimizer set-up).
    logging.getLogger("megatron.core").setLevel(logging.ERROR)
    _APPLIED = True
