import sys

from megatron_tgdpo.tasks.cli import main

sys.exit(main())
