"""Top-level parsing: ``--help`` / ``--version`` here, everything after the command name to its module."""
from __future__ import annotations

import difflib
import importlib
import sys
from typing import Optional, Sequence

from megatron_tgdpo.cli.commands import COMMANDS, find

__all__ = ["PROG", "main", "run_module_main", "usage"]

PROG = "megatron-tgdpo"


def usage() -> str:
    width = max(len(command.name) for command in COMMANDS)
    rows = "\n".join(f"  {command.name:<{width}}  {command.summary}" for command in COMMANDS)
    return (
        f"usage: {PROG} <command> [flags]\n"
        f"       {PROG} <command> --help\n\n"
        "DPO, TGDPO, IPO, SimPO, SFT and RTO preference training on megatron-core.\n\n"
        f"commands:\n{rows}\n\n"
        "The same as `python -m megatron_tgdpo <command>`; under a launcher:\n"
        "  torchrun --nproc-per-node 8 -m megatron_tgdpo train ...\n"
    )


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args:
        sys.stderr.write(usage())
        return 2
    if args[0] in ("-h", "--help", "help"):
        if len(args) > 1 and args[0] == "help":  # `megatron-tgdpo help train` = `megatron-tgdpo train --help`
            return main([args[1], "--help"])
        sys.stdout.write(usage())
        return 0
    if args[0] == "--version":
        from megatron_tgdpo import __version__

        print(f"{PROG} {__version__}")
        return 0
    name, rest = args[0], args[1:]
    command = find(name)
    if command is None:
        close = difflib.get_close_matches(name, [c.name for c in COMMANDS], n=1)
        hint = f"; did you mean `{close[0]}`?" if close else ""
        print(f"{PROG}: error: unknown command {name!r}{hint} (`{PROG} --help` lists them)", file=sys.stderr)
        return 2
    if command.saves_on_stop:  # before the command's (heavy) imports: a stop signal now only sets a flag
        from megatron_tgdpo.runtime.signals import install_stop_handler

        install_stop_handler()
    module = importlib.import_module(command.module)
    code = module.main(rest, prog=f"{PROG} {name}")
    return 0 if code is None else int(code)


def run_module_main(module_name: str, argv: Sequence[str]) -> int:
    """``module_name.main(argv)``, imported now: a module this installation lacks is one line and exit 2,
    not a traceback (any other import error is the module's own and propagates)."""
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is None or not module_name.startswith(exc.name):
            raise
        print(f"{PROG}: error: {module_name} is not part of this installation of megatron_tgdpo "
              f"({exc}); install a version that has it", file=sys.stderr)
        return 2
    code = module.main(list(argv))
    return 0 if code is None else int(code)
