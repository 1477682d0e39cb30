import sys

from megatron_tgdpo.ppo.cli import main

if __name__ == "__main__":  # megatron's checkpoint code spawns processes that re-import __main__
    sys.exit(main())
