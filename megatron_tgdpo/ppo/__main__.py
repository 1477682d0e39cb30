if __name__ == "__main__":  # before any heavy import: from here a stop signal only sets a flag
    from megatron_tgdpo.runtime.signals import install_stop_handler

    install_stop_handler()

import sys  # noqa: E402

from megatron_tgdpo.ppo.cli import main  # noqa: E402

if __name__ == "__main__":  # megatron's checkpoint code spawns processes that re-import __main__
    sys.exit(main())
