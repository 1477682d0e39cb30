"""``megatron-tgdpo replicate``: the full comparison (``megatron_tgdpo.replicate``)."""
from __future__ import annotations

from typing import Sequence


def main(argv: Sequence[str], *, prog: str) -> int:
    from megatron_tgdpo.replicate import main as replicate_main

    return replicate_main(list(argv), prog=prog)
