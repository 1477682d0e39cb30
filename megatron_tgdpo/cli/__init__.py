"""``megatron-tgdpo <command>``: one command line for every job of the package.

    megatron-tgdpo --help                 # every command, one line each
    megatron-tgdpo <command> --help       # that command's flags
    python -m megatron_tgdpo <command>    # the same, without the console script
    torchrun --nproc-per-node 8 -m megatron_tgdpo train ...

The commands are the rows of :data:`COMMANDS` (``commands.py``). Each row names a module of this package
with ``main(argv, *, prog) -> int``; dispatch imports only the chosen one, so ``--help`` stays fast and a
command whose dependencies are missing fails only when it runs. Adding a command: one file here with
``main`` (parse the flags, call package code) and one row in ``commands.py``.
"""
from __future__ import annotations

from megatron_tgdpo.cli.dispatch import main

__all__ = ["main"]
