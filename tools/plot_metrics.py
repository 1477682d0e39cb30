#!/usr/bin/env python
"""``python tools/plot_metrics.py ...`` is ``megatron-tgdpo plot ...`` (``megatron_tgdpo/cli/plot.py``); kept so that
existing command lines keep working."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # runnable from a checkout without installing

from megatron_tgdpo.cli.plot import build_parser, main  # noqa: E402,F401
from megatron_tgdpo.plotting import (DEFAULT_KEYS, MetricsError, default_keys, labels_for, plot,  # noqa: E402,F401
                                     read_metrics)

if __name__ == "__main__":
    sys.exit(main())
