#!/usr/bin/env python
"""Score a prepared data set once with the frozen reference (and guidance) model -> log-prob cache.

The command is ``python -m megatron_tgdpo.precompute`` (see that module for the flags and what the cache
holds); this file runs it from a checkout and keeps the older invocation working:

    torchrun --nproc-per-node 8 tools/precompute_logprobs.py --data-path data/prepared/train \\
        --ref-load /ckpt/sft --guidance-load /ckpt/dpo --output /cache/train-logps
"""
from __future__ import annotations

import sys
from pathlib import Path

# Runnable from a checkout without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from megatron_tgdpo.precompute import (MICRO_BATCHES_PER_STAGE, ShardCollector, ToolError, main, parse,  # noqa: E402,F401
                                       run, scoring_config, tool_parser)

if __name__ == "__main__":  # megatron's checkpoint code spawns processes that re-import __main__
    sys.exit(main())
