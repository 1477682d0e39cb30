"""Applies the suite's markers (``tests/suite.py`` says which and why) to every collected test, and with
``-n N`` (pytest-xdist) hands the tests to the workers by work unit, longest first."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from suite import DIRECTORY_MARKERS, SLOW, TESTS, schedule_rank, slow_entry_matches, work_unit


# Set when the run's workers take the tests by work unit (below).
BY_WORK_UNIT = pytest.StashKey[bool]()


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist turns -n without --dist into "load"
def pytest_cmdline_main(config: pytest.Config) -> None:
    """``-n N`` (pytest-xdist) without ``--dist``: the workers take the tests by work unit
    (``suite.work_unit``: a file, or the files that share a session fixture), so that no module or session
    fixture is computed on both workers, in the order the workers' collection gives (longest first)."""
    if getattr(config.option, "numprocesses", None) and getattr(config.option, "dist", "no") == "no":
        config.option.dist = "loadscope"  # distributed by scope, the scope being the work unit
        config.option.loadscopereorder = False  # not reordered by test count
        config.stash[BY_WORK_UNIT] = True


def pytest_configure(config: pytest.Config) -> None:
    if hasattr(config, "workerinput"):  # a pytest-xdist worker
        # Its share of the cores for what a test computes in the worker itself (ranks and commands set
        # their own): two workers with two threads each would fight over two cores.
        import torch

        workers = int(config.workerinput.get("workercount", 1))
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // workers))


@pytest.hookimpl(optionalhook=True)  # a pytest-xdist hook: unknown without it
def pytest_xdist_make_scheduler(config: pytest.Config, log):
    if not config.stash.get(BY_WORK_UNIT, False):
        return None
    from xdist.scheduler import LoadScopeScheduling

    class WorkUnitScheduling(LoadScopeScheduling):
        """pytest-xdist's scheduling by scope (a whole scope to one worker, the scopes in collection order),
        with the suite's work units as the scopes."""

        def _split_scope(self, nodeid: str) -> str:
            return work_unit(nodeid)

    return WorkUnitScheduling(config, log)


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
    if hasattr(config, "workerinput"):  # a pytest-xdist worker: its order is the order the units go out in
        order_for_workers(items)
    # An entry whose file was collected whole but that matches no test names a renamed or removed test:
    # the fast subset would silently grow by it.
    if any("::" in arg for arg in config.args):
        return
    stale = [entry for entry in SLOW if entry.split("::")[0] in collected_files
             and not any(slow_entry_matches(entry, item.nodeid) for item in items)]
    if stale:
        raise pytest.UsageError(f"tests/suite.py: SLOW names no collected test: {', '.join(stale)}; "
                                "update the list")


def order_for_workers(items: list[pytest.Item]) -> None:
    """Sorts ``items`` so that the workers take the work units in ``suite.schedule_rank`` order; a unit's
    tests stay in their order, one after the other."""
    units = {item.nodeid: work_unit(item.nodeid) for item in items}
    slow_units = {units[item.nodeid] for item in items if item.get_closest_marker("slow")}
    first_seen = {unit: position for position, unit in reversed(list(enumerate(units.values())))}
    items.sort(key=lambda item: (schedule_rank(units[item.nodeid], slow=units[item.nodeid] in slow_units),
                                 first_seen[units[item.nodeid]]))
