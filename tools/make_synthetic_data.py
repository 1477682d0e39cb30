#!/usr/bin/env python
"""``python tools/make_synthetic_data.py ...`` is ``megatron-tgdpo synthetic-data ...`` (``megatron_tgdpo/cli/synthetic_data.py``); kept so that
existing command lines keep working."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # runnable from a checkout without installing

from megatron_tgdpo.cli.synthetic_data import main  # noqa: E402,F401

if __name__ == "__main__":
    sys.exit(main(default_output_dir="examples/data/synthetic"))
