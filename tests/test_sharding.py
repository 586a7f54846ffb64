"""scripts/test.sh splits the flavour-free tests between its two suites: together they run every test."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = (ROOT / "scripts" / "test.sh").read_text()


# One child collects the suite under each setting in turn (pytest.main reads TF_SEQLOSS_SHARD anew each time):
# one interpreter importing TensorFlow and the test modules instead of three.
COLLECT = """
import contextlib, io, json, os, sys
import pytest

found = []
for shard, marks in json.loads(sys.argv[1]):
    os.environ.pop("TF_SEQLOSS_SHARD", None)
    if shard:
        os.environ["TF_SEQLOSS_SHARD"] = shard
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = pytest.main(["-q", "-p", "no:cacheprovider", "--collect-only", "tests"]
                           + (["-m", marks] if marks else []))
    if code:
        sys.exit(out.getvalue())
    found.append(sorted(line for line in out.getvalue().splitlines() if "::" in line))
print("COLLECTED" + json.dumps(found))
"""


def _collected(*shards, marks=None):
    """The test ids collected under each TF_SEQLOSS_SHARD of `shards` (None: unset), then, if `marks` is
    given, those selected by that marker expression (`-m`) with the variable unset."""
    env = {key: value for key, value in os.environ.items() if key != "TF_SEQLOSS_SHARD"}
    runs = [(shard, None) for shard in shards] + ([(None, marks)] if marks else [])
    out = subprocess.run([sys.executable, "-c", COLLECT, json.dumps(runs)], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    lines = [line for line in out.stdout.splitlines() if line.startswith("COLLECTED")]
    assert out.returncode == 0 and lines, out.stderr[-3000:]
    return [set(tests) for tests in json.loads(lines[-1][len("COLLECTED"):])]


def test_the_two_suites_of_test_sh_together_run_every_test_and_flavour_free_ones_once():
    shards = re.findall(r"TF_SEQLOSS_SHARD=(\S+)", SCRIPT)
    assert len(shards) == 2, shards
    everything, first, second, keras = _collected(None, *shards, marks="keras")
    assert first | second == everything
    both = first & second
    # Tests run by both suites in a flavour-free file must be the ones marked `keras` (as pytest sees the marks,
    # whether on the function or on one of its parameters).
    assert both and all(Path(test.split("::")[0]).name not in _flavour_free() or test in keras for test in both)


def _flavour_free():
    from tests.conftest import FLAVOUR_FREE_FILES
    return FLAVOUR_FREE_FILES


class _Item:
    """What `_shard_of` reads of a collected test: its id and its `duration` mark, if any."""

    def __init__(self, nodeid, seconds=None):
        self.nodeid, self.seconds = nodeid, seconds

    def get_closest_marker(self, name):
        assert name == "duration"
        return None if self.seconds is None else pytest.mark.duration(self.seconds).mark


def test_long_slow_tests_are_dealt_out_longest_first_and_cases_take_turns():
    from tests.conftest import _shard_of

    timed = [_Item(f"tests/test_a.py::test_{seconds}", seconds) for seconds in (9, 47, 21, 35, 10)]
    cases = [_Item(f"tests/test_b.py::test_cases[{i}]") for i in range(5)]
    shards = _shard_of(timed + cases, 2)
    # Loads after each: 47 -> 0 (47, 0); 35 -> 1 (47, 35); 21 -> 1 (47, 56); 10 -> 0 (57, 56); 9 -> 1 (57, 65).
    assert {item.seconds: shards[item.nodeid] for item in timed} == {47: 0, 35: 1, 21: 1, 10: 0, 9: 1}
    assert _shard_of(list(reversed(timed)) + cases, 2) == shards  # by duration, whatever the collection order
    first = shards[cases[0].nodeid]  # a stable hash of the function's id; its cases take turns
    assert [shards[case.nodeid] for case in cases] == [(first + i) % 2 for i in range(5)]
    # With shard 1 given a 60 s head start: 47 -> 0 (47, 60); 35 -> 0 (82, 60); 21 -> 1 (82, 81); 10 -> 1
    # (82, 91); 9 -> 0 (91, 91).
    started = _shard_of(timed + cases, 2, {1: 60})
    assert {item.seconds: started[item.nodeid] for item in timed} == {47: 0, 35: 0, 21: 1, 10: 1, 9: 0}


def test_the_head_start_is_for_the_suite_test_sh_runs_under_tf_keras():
    from tests.conftest import SLOW_HEAD_START

    assert set(SLOW_HEAD_START) == {1}
    assert re.search(r"^TF_USE_LEGACY_KERAS=1 TF_SEQLOSS_SHARD=1/2 ", SCRIPT, re.M)
