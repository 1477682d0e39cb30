"""``megatron-tgdpo demo``: the method end to end at a size two CPU cores run in minutes (``megatron_tgdpo.demo``)."""
from __future__ import annotations

from typing import Sequence


def main(argv: Sequence[str], *, prog: str) -> int:
    from megatron_tgdpo.demo import main as demo_main

    return demo_main(list(argv), prog=prog)
