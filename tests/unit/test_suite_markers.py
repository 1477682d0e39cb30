"""The suite's own markers: what a SLOW entry names, and that each names a test file that exists; the work
units two workers take (``pytest -n 2``) and their order."""
from __future__ import annotations

from suite import DIRECTORY_MARKERS, FIRST, ROOT, SESSION_GROUPS, SLOW, schedule_rank, slow_entry_matches, work_unit


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


def test_files_sharing_a_session_fixture_are_one_work_unit():
    assert work_unit("tests/e2e/test_replicate.py::test_a") == work_unit("tests/e2e/test_replicate_controls.py::t")
    assert work_unit("tests/realmodel/test_smollm2_generate.py::t[x]") == "realmodel"
    assert work_unit("tests/unit/test_losses.py::test_a[1]") == work_unit("tests/unit/test_losses.py::test_b")
    assert work_unit("tests/unit/test_losses.py::test_a") != work_unit("tests/unit/test_pairs.py::test_a")


def test_first_names_work_units_of_the_suite_and_comes_before_the_rest():
    missing = [unit for unit in FIRST if unit not in SESSION_GROUPS.values() and not (ROOT / unit).is_file()]
    assert not missing, missing
    assert all((ROOT / prefix).exists() for prefix in SESSION_GROUPS), SESSION_GROUPS
    ranks = [schedule_rank(unit, slow=False) for unit in FIRST]
    assert ranks == sorted(ranks) and len(set(FIRST)) == len(FIRST)
    assert max(ranks) < schedule_rank("tests/unit/test_x.py", slow=True) < schedule_rank("tests/unit/test_x.py",
                                                                                        slow=False)
