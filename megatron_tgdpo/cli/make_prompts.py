"""``megatron-tgdpo make-prompts``: a prompt file of a verifiable task (``megatron_tgdpo.tasks``)."""
from __future__ import annotations

from typing import Sequence


def main(argv: Sequence[str], *, prog: str) -> int:
    from megatron_tgdpo.tasks.cli import main as tasks_main

    return tasks_main(["make-prompts", *argv], prog=prog.rpartition(" ")[0])
