"""``megatron-tgdpo evaluate``: summarise scored samples, head-to-head with ``--against`` (``megatron_tgdpo.tasks``)."""
from __future__ import annotations

from typing import Sequence


def main(argv: Sequence[str], *, prog: str) -> int:
    from megatron_tgdpo.tasks.cli import main as tasks_main

    return tasks_main(["evaluate", *argv], prog=prog.rpartition(" ")[0])
