"""A console that shows the run, not the libraries' internals.

megatron-core, torch and TransformerEngine print deprecation and fallback notices on every rank (six
blocks in a two-minute CPU run). The ones below are known and harmless for this project; they are
filtered here, in one place, once per process. ``--verbose`` (or ``MEGATRON_TGDPO_VERBOSE=1``) shows
everything. Anything not listed still prints.
"""
from __future__ import annotations

import logging
import os
import warnings

__all__ = ["KNOWN_HARMLESS", "quiet_library_warnings", "verbose_requested"]

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
)

_APPLIED = False


def verbose_requested(flag: bool = False) -> bool:
    return flag or os.environ.get("MEGATRON_TGDPO_VERBOSE", "") not in ("", "0", "false", "no")


def quiet_library_warnings(*, verbose: bool = False) -> None:
    """Install the filters (idempotent; a no-op when verbose). Call before megatron-core is imported."""
    global _APPLIED
    if _APPLIED or verbose_requested(verbose):
        return
    for category, pattern, _why in KNOWN_HARMLESS:
        warnings.filterwarnings("ignore", message=pattern, category=category)
    # megatron-core logs INFO/WARNING lines through `logging` on every rank (e.g. its optimizer set-up).
    logging.getLogger("megatron.core").setLevel(logging.ERROR)
    _APPLIED = True
