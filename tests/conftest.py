"""Applies the suite's markers (``tests/suite.py`` says which and why) to every collected test."""
from __future__ import annotations

from pathlib import Path

import pytest

from suite import DIRECTORY_MARKERS, SLOW, TESTS, slow_entry_matches


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
        if any(slow_entry_matches(entry, item.nodeid) for entry in SLOW):
            item.add_marker(pytest.mark.slow)
    # An entry whose file was collected whole but that matches no test names a renamed or removed test:
    # the fast subset would silently grow by it.
    if any("::" in arg for arg in config.args):
        return
    stale = [entry for entry in SLOW if entry.split("::")[0] in collected_files
             and not any(slow_entry_matches(entry, item.nodeid) for item in items)]
    if stale:
        raise pytest.UsageError(f"tests/suite.py: SLOW names no collected test: {', '.join(stale)}; "
                                "update the list")
