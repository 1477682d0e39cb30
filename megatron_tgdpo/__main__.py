"""``python -m megatron_tgdpo <command>``: the same command line as the ``megatron-tgdpo`` console script."""
import sys

from megatron_tgdpo.cli import main

if __name__ == "__main__":  # megatron's checkpoint code spawns processes that re-import __main__
    sys.exit(main())
