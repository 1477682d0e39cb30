#!/usr/bin/env python
"""``python tools/convert_checkpoint.py ...`` is ``megatron-tgdpo convert ...`` (``megatron_tgdpo/cli/convert.py``); kept so that
existing command lines keep working."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # runnable from a checkout without installing

from megatron_tgdpo.cli.convert import main, parse_args  # noqa: E402,F401

if __name__ == "__main__":
    sys.exit(main())
