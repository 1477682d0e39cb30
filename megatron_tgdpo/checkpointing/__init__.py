"""Training checkpoints: megatron-core ``dist_checkpointing`` (torch_dist), intact or not used at all.

Layout of a save directory::

    <save>/
      latest_checkpointed_iteration.txt     # tracker: the newest published iteration, written last
      iter_0000100/                         # one torch_dist checkpoint (any TP/PP can load its weights)
        tgdpo_checkpoint.json               # iteration, state, layout, parts, every file's size + CRC-32
        ...                                 # dist_checkpointing files

A checkpoint is a dict of named **parts** (:class:`CheckpointPart`: model chunks with their optimizer
and LR scheduler), so a second trained model (a PPO critic) fits without a new API. The part named
``policy`` keeps megatron's plain keys (``model``, ``optimizer``, ``opt_param_scheduler``), which is
what conversion and older checkpoints use; any other part ``p`` is stored under ``p.*`` keys.

Writing: ``iter_N.tmp`` on every rank, then per-file checksums computed in parallel (each rank hashes
its share of the files), the metadata last, one rename, the tracker. Reading: a checkpoint is used only
if its metadata is readable and matches its own digest, the directory name, the directory's files and
the progress recorded inside the checkpoint, every file it lists has its size and checksum (verified in
parallel across the ranks that load it), and its pickles read through the allow-list of
``megatron_tgdpo.safe_pickle``; otherwise it is skipped with the reason and the next older one is
tried. See ``docs/checkpoints.md`` (Integrity, Trust).

The package: ``index`` (types, names, metadata, checking and finding checkpoints), ``contents`` (what
the torch_dist files hold, checked before megatron-core reads them), ``state`` (the sharded state of the
parts, RNG state), ``saving`` and ``loading``. Import from the package.
"""
from megatron_tgdpo.checkpointing.index import (
    FORMAT,
    FORMAT_VERSION,
    METADATA,
    POLICY,
    TRACKER,
    CheckpointError,
    CheckpointPart,
    current_layout,
    find_latest,
    is_iteration_dir,
    iteration_dir,
    iteration_dirs,
    problem,
    read_metadata,
    resolve,
)
from megatron_tgdpo.checkpointing.loading import load_checkpoint, load_model_weights
from megatron_tgdpo.checkpointing.saving import save_checkpoint
from megatron_tgdpo.checkpointing.state import rng_state, set_rng_state

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "METADATA",
    "POLICY",
    "TRACKER",
    "CheckpointError",
    "CheckpointPart",
    "current_layout",
    "find_latest",
    "is_iteration_dir",
    "iteration_dir",
    "iteration_dirs",
    "load_checkpoint",
    "load_model_weights",
    "problem",
    "read_metadata",
    "resolve",
    "rng_state",
    "save_checkpoint",
    "set_rng_state",
]
