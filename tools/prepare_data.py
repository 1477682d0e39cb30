#!/usr/bin/env python
"""``python tools/prepare_data.py ...`` is ``megatron-tgdpo prepare ...`` (``megatron_tgdpo/cli/prepare.py``); kept so that
existing command lines keep working."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # runnable from a checkout without installing

from megatron_tgdpo.cli.prepare import build_parser, main  # noqa: E402,F401

if __name__ == "__main__":
    sys.exit(main())
