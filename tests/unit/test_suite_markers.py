"""The suite's own markers: what a SLOW entry names, and that each names a test file that exists."""
from __future__ import annotations

from suite import DIRECTORY_MARKERS, ROOT, SLOW, slow_entry_matches


def test_an_entry_names_a_file_a_test_or_one_case():
    file, test = "tests/e2e/test_x.py", "tests/e2e/test_x.py::test_run"
    assert slow_entry_matches(file, test) and slow_entry_matches(file, test + "[a]")
    assert not slow_entry_matches(file, "tests/e2e/test_x2.py::test_run")
    assert slow_entry_matches(test, test) and slow_entry_matches(test, test + "[tp2-sp]")
    assert not slow_entry_matches(test, test + "_again")
    assert slow_entry_matches(test + "[a]", test + "[a]") and not slow_entry_matches(test + "[a]", test + "[ab]")


def test_every_slow_entry_is_a_test_file_of_the_suite():
    """A typo in a file name would mark nothing (the collection check sees only collected files)."""
    missing = [entry for entry in SLOW if not (ROOT / entry.split("::")[0]).is_file()]
    assert not missing, missing
    assert len(set(SLOW)) == len(SLOW), "an entry is listed twice"


def test_directory_markers_are_registered(pytestconfig):
    registered = {line.split(":")[0] for line in pytestconfig.getini("markers")}
    assert set(DIRECTORY_MARKERS.values()) | {"slow"} <= registered
