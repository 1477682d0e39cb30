#!/usr/bin/env python
"""Sample responses to a prompt file from a checkpoint: ``megatron_tgdpo.generation.cli`` (``--help``
and docs/generation.md describe it); kept so existing commands keep working.

    torchrun --nproc-per-node 8 tools/generate.py --load runs/sft/checkpoints --input prompts.jsonl \\
        --output samples.jsonl --num-samples 8 --temperature 0.8 --max-new-tokens 512
"""
from __future__ import annotations

import sys
from pathlib import Path

# Runnable from a checkout without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from megatron_tgdpo.generation.cli import main  # noqa: E402

__all__ = ["main"]

if __name__ == "__main__":  # megatron's checkpoint code spawns processes that re-import __main__
    sys.exit(main())
