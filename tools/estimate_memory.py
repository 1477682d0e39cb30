#!/usr/bin/env python
"""``python tools/estimate_memory.py ...`` is ``megatron-tgdpo estimate-memory ...`` (``megatron_tgdpo/cli/estimate_memory.py``); kept so that
existing command lines keep working."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # runnable from a checkout without installing

from megatron_tgdpo.cli.estimate_memory import main, parse, tool_parser  # noqa: E402,F401

if __name__ == "__main__":
    sys.exit(main(prog="estimate_memory.py"))
