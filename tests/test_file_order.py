"""The suite's file order (``support.file_order``): longest files first, whole files, each
file's tests in their own order, and the measured seconds read back from a report."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from support import file_order


@dataclass(frozen=True)
class Item:
    nodeid: str


FILES = ["tests/a/test_a.py", "tests/a/test_b.py", "tests/b/test_c.py", "tests/test_d.py"]


@given(st.lists(st.tuples(st.sampled_from(FILES), st.integers(0, 5)), max_size=30),
       st.dictionaries(st.sampled_from(FILES), st.floats(0, 1000), max_size=4))
def test_longest_first_moves_whole_files_and_keeps_each_files_order(
        picks: list[tuple[str, int]], seconds: dict[str, float]) -> None:
    items = [Item("%s::test_%d[%d]" % (f, n, i)) for i, (f, n) in enumerate(picks)]
    out = file_order.longest_first(items, seconds)
    assert sorted(out, key=id) == sorted(items, key=id)  # a permutation
    files = [file_order.file_of(i.nodeid) for i in out]
    runs = [f for k, f in enumerate(files) if k == 0 or files[k - 1] != f]
    assert len(runs) == len(set(runs))  # each file in one piece
    weights = [seconds.get(f, file_order.NEW_FILE_SECONDS) for f in runs]
    assert weights == sorted(weights, reverse=True)
    for f in runs:  # a file's tests in their collected order
        assert [i for i in out if file_order.file_of(i.nodeid) == f] == \
            [i for i in items if file_order.file_of(i.nodeid) == f]


def test_an_unmeasured_file_starts_before_the_short_ones() -> None:
    items = [Item("tests/test_short.py::t"), Item("tests/test_new.py::t"),
             Item("tests/test_long.py::t")]
    out = file_order.longest_first(items, {"tests/test_short.py": 1.0,
                                           "tests/test_long.py": 90.0})
    assert [i.nodeid for i in out] == ["tests/test_long.py::t", "tests/test_new.py::t",
                                       "tests/test_short.py::t"]


def test_seconds_from_a_junit_report_are_summed_per_file(tmp_path: Path) -> None:
    report = tmp_path / "r.xml"
    report.write_text(
        '<testsuites><testsuite>'
        '<testcase classname="tests.fleet.test_x" name="a" time="1.5"/>'
        '<testcase classname="tests.fleet.test_x.TestGroup" name="b" time="2.0"/>'
        '<testcase classname="tests.test_y" name="c" time="0.25"/>'
        '</testsuite></testsuites>')
    assert file_order.seconds_from_junit(report) == {"tests/fleet/test_x.py": 3.5,
                                                     "tests/test_y.py": 0.25}
    out = tmp_path / "seconds.txt"
    out.write_text("# comment\n3.5 tests/fleet/test_x.py\n\n0.2 tests/test_y.py\n")
    assert file_order.read_seconds(out) == {"tests/fleet/test_x.py": 3.5,
                                            "tests/test_y.py": 0.2}


def test_a_bad_line_in_the_seconds_file_is_named(tmp_path: Path) -> None:
    bad = tmp_path / "seconds.txt"
    bad.write_text("3.5 tests/ok.py\nfast tests/bad.py\n")
    with pytest.raises(ValueError, match=r"seconds.txt:2: expected"):
        file_order.read_seconds(bad)


def test_the_projects_seconds_file_names_only_files_that_exist() -> None:
    root = Path(__file__).resolve().parent.parent
    seconds = file_order.read_seconds()
    assert seconds, "tests/file_seconds.txt is missing or empty"
    missing = sorted(f for f in seconds if not (root / f).exists())
    assert not missing, "stale entries in tests/file_seconds.txt: %s" % missing
