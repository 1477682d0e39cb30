"""What the whole suite shares: where the repository is, how a test loads a command from ``tools/``, and
the markers that let a contributor run it in parts.

Markers (registered in ``pytest.ini``), given here by directory so that no test file has to repeat them:

    multirank   tests/distributed/  functions on forked gloo ranks (``megatron_tgdpo.testing.run_on_ranks``)
    e2e         tests/e2e/          commands run as a user runs them, in child processes
    gpu         tests/gpu/          needs CUDA (skipped without it)
    slow        the tests in SLOW below: what ``pytest -m "not slow"`` leaves out

Helpers that start ranks or commands (``run_on_ranks``, ``run_train``, ``run_command``, ``torchrun``,
``read_metrics``) live in ``megatron_tgdpo.testing``: the benchmarks use them too.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / "tests"

DIRECTORY_MARKERS = {"distributed": "multirank", "e2e": "e2e", "gpu": "gpu"}

#: The longest tests (seconds measured one directory at a time on a loaded 2-core machine), as node-id
#: prefixes: a file, or a file and a test name (parametrised cases included). Together they are most of
#: the suite's time; what is left still runs every subsystem (see README, Testing).
SLOW: tuple[str, ...] = ()


def load_tool(name: str) -> ModuleType:
    """``tools/NAME.py`` imported as module ``NAME`` (once: later calls return the same module)."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[name]
            raise
    return sys.modules[name]


def _matches(entry: str, nodeid: str) -> bool:
    return nodeid == entry or nodeid.startswith(entry + ("[" if "::" in entry else "::"))


@pytest.hookimpl(tryfirst=True)  # before ``-m`` deselects by marker
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    collected_files = set()
    for item in items:
        path = Path(str(item.path)).resolve()
        if TESTS in path.parents:
            marker = DIRECTORY_MARKERS.get(path.relative_to(TESTS).parts[0])
            if marker:
                item.add_marker(marker)
        collected_files.add(item.nodeid.split("::")[0])
        if any(_matches(entry, item.nodeid) for entry in SLOW):
            item.add_marker(pytest.mark.slow)
    # An entry whose file was collected whole but that matches no test names a renamed or removed test:
    # the fast subset would silently grow by it.
    if any("::" in arg for arg in config.args):
        return
    stale = [entry for entry in SLOW if entry.split("::")[0] in collected_files
             and not any(_matches(entry, item.nodeid) for item in items)]
    if stale:
        raise pytest.UsageError(f"tests/conftest.py: SLOW names no collected test: {', '.join(stale)}; "
                                "update the list")
