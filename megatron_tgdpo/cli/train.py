"""``megatron-tgdpo train``: DPO / TGDPO / IPO / SimPO / SFT training (``megatron_tgdpo.train``)."""
from __future__ import annotations

from typing import Sequence


def main(argv: Sequence[str], *, prog: str) -> int:
    from megatron_tgdpo.train import main as train_main

    train_main(list(argv))  # exits with the trainer's code (0, 2, 75 or 1)
    return 0
