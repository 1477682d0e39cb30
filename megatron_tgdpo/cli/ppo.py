"""``megatron-tgdpo ppo``: PPO with DPO's dense token reward (RTO) and/or a sparse score (``megatron_tgdpo.ppo``)."""
from __future__ import annotations

from typing import Sequence


def main(argv: Sequence[str], *, prog: str) -> int:
    from megatron_tgdpo.ppo.cli import main as ppo_main

    return ppo_main(list(argv))
