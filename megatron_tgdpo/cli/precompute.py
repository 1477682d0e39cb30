"""``megatron-tgdpo precompute``: the frozen models' log-probs, once, for ``--logprob-cache``."""
from __future__ import annotations

from typing import Sequence

from megatron_tgdpo.cli.dispatch import run_module_main

# Named by string: imported only when this command runs.
TARGET = "megatron_tgdpo.precompute"


def main(argv: Sequence[str], *, prog: str) -> int:
    return run_module_main(TARGET, argv)
