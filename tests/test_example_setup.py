"""The set-up around the package: its licence, the parity data the suite carries, and the scripts."""

import hashlib
import os
import queue
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests import conftest
from tests._pyproject import pyproject, requirement_minimums

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data"
# sha256 of https://www.apache.org/licenses/LICENSE-2.0.txt, the text the ASF publishes (the same bytes as
# Debian's /usr/share/common-licenses/Apache-2.0).
APACHE_2_0_SHA256 = "cfc7749b96f63bd31c3c42b5c471bf756814053e847c10f3eb003417bc523d30"


# --- licence ----------------------------------------------------------------------------------------


def test_license_file_is_the_apache_2_0_text_that_pyproject_declares():
    project = pyproject()["project"]
    assert (project["license"], project["license-files"]) == ("Apache-2.0", ["LICENSE"])
    text = (ROOT / "LICENSE").read_bytes()
    assert hashlib.sha256(text).hexdigest() == APACHE_2_0_SHA256
    assert b"Apache License\n                           Version 2.0, January 2004" in text


# --- parity data ------------------------------------------------------------------------------------


def recorded_hashes():
    """Returns `{file name: sha256}` from the table of tests/data/README.md."""
    rows = re.findall(r"^\| `(\w+\.npz)` \| `([0-9a-f]{64})` \| (\d+) \|", (DATA / "README.md").read_text(), re.M)
    return {name: (digest, int(cases)) for name, digest, cases in rows}


def test_suite_carries_the_recorded_peer_outputs(monkeypatch):
    monkeypatch.delenv("TF_SEQLOSS_ORACLE", raising=False)
    assert conftest.oracle_dir() == DATA
    recorded = recorded_hashes()
    assert set(recorded) == {"tfa_sequence_loss.npz", "contrib_sequence_loss.npz"}
    for name, (digest, cases) in recorded.items():
        assert hashlib.sha256((DATA / name).read_bytes()).hexdigest() == digest, name
        assert len(conftest.oracle_cases(name[:-len(".npz")])) == cases, name


def test_oracle_override_is_read_and_a_missing_file_fails_rather_than_skips(tmp_path, monkeypatch):
    shutil.copy(DATA / "contrib_sequence_loss.npz", tmp_path)
    monkeypatch.setenv("TF_SEQLOSS_ORACLE", str(tmp_path))
    assert len(conftest.oracle_cases("contrib_sequence_loss")) == 80
    try:
        conftest.oracle_cases("tfa_sequence_loss")
    except pytest.skip.Exception:
        pytest.fail("a missing oracle file skipped the test instead of failing it")
    except FileNotFoundError as error:
        assert str(tmp_path / "tfa_sequence_loss.npz") in str(error)
        assert "TF_SEQLOSS_ORACLE" in str(error)
    else:
        pytest.fail("a missing oracle file raised nothing")


# --- scripts/test.sh --------------------------------------------------------------------------------

FAKE_TESTS = '''
import os
import time
from pathlib import Path


def test_quick():
    pass


def test_waits_until_the_progress_was_seen():
    # However long the other suite takes to get here: the test that runs test.sh bounds the whole run and
    # kills it. The deadline only keeps an orphan from polling forever.
    go = Path(__file__).resolve().parents[1] / "go"
    deadline = time.monotonic() + 3600
    while not go.exists():
        assert time.monotonic() < deadline, "scripts/test.sh showed no progress while the suites ran"
        time.sleep(0.1)


def test_runs_under_keras_3():
    assert os.environ.get("TF_USE_LEGACY_KERAS") != "1"
'''


# The settings of scripts/_venv.sh, which a caller's environment must not pass to the fake checkouts' scripts.
VENV_SETTINGS = ("PYTHON", "TF_SEQLOSS_VENV", "TF_SEQLOSS_CONSTRAINTS")


def script_env(**settings):
    """This process's environment without VENV_SETTINGS, with `settings`."""
    return dict({key: value for key, value in os.environ.items() if key not in VENV_SETTINGS}, **settings)


def fake_checkout(tmp_path):
    """A copy of the scripts in a folder whose `.venv` is this interpreter and whose suite is FAKE_TESTS."""
    for name in ("pyproject.toml", "scripts/_venv.sh", "scripts/test.sh"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / name, tmp_path / name)
    python = tmp_path / ".venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} \"$@\"\n")
    python.chmod(0o755)
    stamp = hashlib.sha1((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    (tmp_path / ".venv" / f".installed-{stamp[:12]}").touch()  # as _venv.sh marks an installed .venv
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_fake.py").write_text(FAKE_TESTS)
    return tmp_path


def output_lines(process, deadline):
    """Yields `process`'s output lines as they come; fails with those seen if it is still writing at `deadline`."""
    lines = queue.Queue()
    threading.Thread(target=lambda: [*map(lines.put, process.stdout), lines.put(None)], daemon=True).start()
    seen = []
    while True:
        try:
            line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            pytest.fail("still running at the deadline; its output so far:\n" + "\n".join(seen))
        if line is None:
            return
        seen.append(line.rstrip("\n"))
        yield seen[-1]


# The script passes -q itself: a caller's -q used to make it -qq, at which pytest prints no summary line.
QUIETER = [[], ["-q"], ["--quiet", "-qq"]]


@pytest.mark.parametrize("extra", QUIETER + [["-v"], ["-vv"]], ids=lambda extra: " ".join(extra) or "none")
def test_test_sh_streams_progress_and_prints_both_results(tmp_path, extra):
    root = fake_checkout(tmp_path)
    # TF_USE_LEGACY_KERAS=1 in the caller's environment must reach the tf_keras suite only.
    env = script_env(TF_SEQLOSS_PROGRESS_SECONDS="1", TF_USE_LEGACY_KERAS="1")
    # Nothing here depends on when the ticker fires: both suites stop in their second test until the
    # progress line that shows both of them there has been seen, however many ticks that takes.
    process = subprocess.Popen(["bash", "scripts/test.sh", "tests", *extra], cwd=root, env=env, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    # Up to -v the waiting test's dot may be out, its line not yet counted; from -vv a test has a line.
    started = r"1/3" if extra == ["-vv"] else r"[12]/\?"
    lines = []
    try:
        for line in output_lines(process, time.monotonic() + 300):
            lines.append(line)
            if re.fullmatch(rf"\[test\.sh\] \d+ s: keras3 {started} tests run \(0 failed\); "
                            rf"tf_keras {started} tests run \(0 failed\)", line):
                (root / "go").touch()
        assert process.wait(timeout=60) == 1, "\n".join(lines)  # the tf_keras suite failed
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)  # test.sh and both suites
            process.wait()
    assert (root / "go").exists(), "\n".join(lines)
    if extra == ["-vv"]:
        assert re.search(r"^\[tf_keras\] tests/test_fake\.py::test_runs_under_keras_3 FAILED +\[3/3\]$",
                         "\n".join(lines), re.M), lines
    else:  # -v (verbosity 0 with the script's -q) puts the file's name before the dots
        assert re.search(r"^\[keras3\] (tests/test_fake\.py )?\.\.\. +\[3/3\]$", "\n".join(lines), re.M), lines
        assert re.search(r"^\[tf_keras\] (tests/test_fake\.py )?\.\.F +\[3/3\]$", "\n".join(lines), re.M), lines
    keras3 = lines.index("== Keras 3 ==")
    tf_keras = lines.index("== tf_keras (TF_USE_LEGACY_KERAS=1) ==")
    assert keras3 < tf_keras
    # pytest's closing summary line, framed by `=` from verbosity 0 on.
    assert re.fullmatch(r"(=+ )?3 passed in [\d.]+s( =+)?", lines[tf_keras - 1]), lines[keras3:]
    assert re.fullmatch(r"(=+ )?1 failed, 2 passed in [\d.]+s( =+)?", lines[-1]), lines[tf_keras:]
    assert "AssertionError" in "\n".join(lines[tf_keras:])  # the full result, failure included


SLOW_AND_QUICK = '''
import pytest


@pytest.mark.slow
def test_slow():
    pass


def test_quick():
    pass
'''


@pytest.mark.parametrize("args, ran", [([], {"test_quick"}), (["-m", "slow"], {"test_slow"})], ids=["default", "slow"])
def test_test_sh_leaves_out_the_slow_tests_unless_asked_and_ci_runs_both(tmp_path, args, ran):
    root = fake_checkout(tmp_path)
    (root / "tests" / "test_fake.py").write_text(SLOW_AND_QUICK)
    (root / "tests" / "conftest.py").write_text(  # as tests/conftest.py registers it
        "def pytest_configure(config):\n    config.addinivalue_line('markers', 'slow: slow')\n")
    done = subprocess.run(["bash", "scripts/test.sh", "tests", "-vv", *args], cwd=root, capture_output=True,
                          text=True, timeout=300, env=script_env(TF_SEQLOSS_PROGRESS_SECONDS="3600"))
    assert done.returncode == 0, done.stdout + done.stderr
    results = done.stdout[done.stdout.index("== Keras 3 =="):]
    for name in ("test_quick", "test_slow"):  # under each flavour, or under neither
        assert results.count(f"test_fake.py::{name} PASSED") == (2 if name in ran else 0), results
    commands = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if "scripts/test.sh" in line]
    assert [line.split("||")[0].strip() for line in commands] == ["bash scripts/test.sh", "bash scripts/test.sh -m slow"]


# --- scripts/test_versions.sh ------------------------------------------------------------------------


def fake_interpreter(path):
    """A script at `path` that runs this interpreter."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} \"$@\"\n")
    path.chmod(0o755)
    return path


def versions_checkout(tmp_path, python_version):
    """The fake checkout with scripts/test_versions.sh and one combination, `fake`, of `python_version`."""
    root = fake_checkout(tmp_path / "checkout")
    shutil.rmtree(root / ".venv")  # the combination must use its own folder
    shutil.copy(ROOT / "scripts" / "test_versions.sh", root / "scripts")
    (root / "constraints").mkdir()
    (root / "constraints" / "fake.txt").write_text(f"# a test's combination\n# python: {python_version}\n")
    (root / "go").touch()  # FAKE_TESTS' waiting test need not wait
    # The scripts' settings stay out of the suite: its own tests of the scripts would inherit them.
    (root / "tests" / "test_environment.py").write_text(
        f"import os\n\n\ndef test_no_venv_settings():\n    assert not set({VENV_SETTINGS}) & set(os.environ)\n")
    return root


def run_test_versions(root, *args, **env):
    return subprocess.run(["bash", "scripts/test_versions.sh", *args], cwd=root, capture_output=True, text=True,
                          timeout=300, env=script_env(**env))


def test_test_versions_sh_runs_the_suite_in_the_combinations_own_environment(tmp_path):
    from importlib.metadata import version

    python_version = "%d.%d.%d" % sys.version_info[:3]
    root = versions_checkout(tmp_path, python_version)
    fake_interpreter(root / ".venv-fake" / "bin" / "python")
    constraints = (root / "constraints" / "fake.txt").read_bytes()
    stamp = hashlib.sha1((ROOT / "pyproject.toml").read_bytes() + constraints)
    (root / ".venv-fake" / f".installed-{stamp.hexdigest()[:12]}").touch()  # as _venv.sh marks it installed
    pyenv = tmp_path / "pyenv"  # whatever Pythons the machine has
    fake_interpreter(pyenv / "versions" / python_version / "bin" / "python")
    done = run_test_versions(root, "fake", "tests", "-q", PYENV_ROOT=str(pyenv), TF_USE_LEGACY_KERAS="1")
    assert done.returncode == 1, done.stdout + done.stderr  # the tf_keras suite fails, as FAKE_TESTS says
    lines = done.stdout.splitlines()
    assert lines[0] == (f"[test_versions.sh] fake in ./.venv-fake: Python {python_version}, "
                        + ", ".join(f"{name} {version(name)}" for name in ("tensorflow", "keras", "tf_keras")))
    assert lines[1].startswith("[test.sh] running the suite")
    assert re.fullmatch(r"4 passed in [\d.]+s", lines[lines.index("== tf_keras (TF_USE_LEGACY_KERAS=1) ==") - 1])
    assert re.fullmatch(r"1 failed, 3 passed in [\d.]+s", lines[-1]), lines
    assert not (root / ".venv").exists()
    # `--install-only` (CI makes this environment beside ./.venv): the same environment named, no suite run.
    only = run_test_versions(root, "fake", "--install-only", PYENV_ROOT=str(pyenv))
    assert (only.returncode, only.stdout.splitlines()) == (0, lines[:1]), only.stdout + only.stderr


@pytest.mark.parametrize("case", ["unknown combination", "no interpreter", "another interpreter's folder"])
def test_test_versions_sh_says_what_is_wrong_in_one_line(tmp_path, case):
    root = versions_checkout(tmp_path, "3.99.1" if case == "no interpreter" else "3.98.1")
    pyenv = tmp_path / "pyenv"
    fake_interpreter(pyenv / "versions" / "3.98.1" / "bin" / "python")
    fake_interpreter(root / ".venv-fake" / "bin" / "python")  # this interpreter's version, not 3.98
    done = run_test_versions(root, "nonesuch" if case == "unknown combination" else "fake", PYENV_ROOT=str(pyenv))
    expected = {
        "unknown combination": (2, "Invalid value for argument `COMBINATION`. Expected oldest, newest or one of: "
                                   "fake. Received: nonesuch"),
        "no interpreter": (1, f"The combination fake needs Python 3.99: neither {pyenv}/versions/3.99.1/bin/python "
                              "nor python3.99 on PATH was found (e.g. `pyenv install 3.99.1`)."),
        "another interpreter's folder": (1, f"./.venv-fake holds Python {sys.version_info[0]}.{sys.version_info[1]}, "
                                            "not 3.98: remove it (rm -rf .venv-fake) and run again."),
    }[case]
    assert (done.returncode, done.stderr.splitlines()) == (expected[0], [expected[1]])


def test_pyproject_minimums_are_the_oldest_tested_combination_and_the_readme_names_each():
    project = pyproject()["project"]
    requirements = requirement_minimums(project["dependencies"] + project["optional-dependencies"]["test"])
    classifiers = "\n".join(project["classifiers"])
    readme = (ROOT / "README.md").read_text()
    combinations = {}
    for path in sorted((ROOT / "constraints").glob("*.txt")):
        text = path.read_text()
        pins = dict(re.findall(r"^([A-Za-z_]+)==([\d.]+)$", text, re.M))
        python = re.search(r"^# python: (\d+\.\d+)\.\d+$", text, re.M).group(1)
        combinations[path.stem] = (tuple(map(int, python.split("."))), pins)
        assert f"Programming Language :: Python :: {python}\n" in classifiers + "\n", path.name
        assert set(pins) == {"tensorflow", "tf_keras", "keras"}, path.name
        assert re.search(rf"^bash scripts/test_versions\.sh .*(?<![\w-]){path.stem}(?![\w-])", readme, re.M), path.name
    oldest_python, oldest_pins = min(combinations.values(), key=lambda combination: combination[0])
    assert combinations["py39-tf216"] == (oldest_python, oldest_pins)  # the README's `oldest`
    assert project["requires-python"] == ">=%d.%d" % oldest_python
    for name in ("tensorflow", "tf_keras"):
        assert oldest_pins[name].startswith(requirements[name] + "."), name


# --- what git keeps -----------------------------------------------------------------------------------


def git_ignores(path):
    result = subprocess.run(["git", "check-ignore", "--no-index", "-q", path], cwd=ROOT)
    assert result.returncode in (0, 1), f"git check-ignore failed on {path}"
    return result.returncode == 0


@pytest.mark.keras
@pytest.mark.parametrize("flavour", ["keras3", "tf_keras"])
@pytest.mark.parametrize("route", ["fit", "loop"])
def test_gitignore_covers_what_the_example_writes_and_keeps_what_is_committed(flavour, route):
    from examples.seq2seq import train

    config = train.Config(route=route)
    route_dir = Path(config.run_dir) / flavour / route  # as Config.route_dir, for either flavour
    assert config.route_dir == Path(config.run_dir) / train.FLAVOUR / route
    models = Path(config.saved_models_dir) / flavour
    for written in (route_dir / "config.json", route_dir / "history.csv", route_dir / "loss.png",
                    route_dir / "checkpoints" / "ckpt-1.index", models / f"{config.model_name}_{route}.keras",
                    models / f"{config.model_name}_{route}_savedmodel" / "saved_model.pb"):
        assert git_ignores(str(written)), written
    for committed in ("saved_models/README.md", f"saved_models/fixture/{flavour}/seq2seq.keras",
                      "saved_models/fixture/saved_model/saved_model.pb", "tests/data/tfa_sequence_loss.npz",
                      "tests/data/README.md", "LICENSE", "examples/seq2seq/train.py"):
        assert not git_ignores(committed), committed


# --- README -------------------------------------------------------------------------------------------


def test_readme_install_section_names_each_extra_and_what_it_brings():
    readme = (ROOT / "README.md").read_text()
    install = readme[readme.index("## Install"):readme.index("## Set-up")]
    for extra, requirements in pyproject()["project"]["optional-dependencies"].items():
        assert f'pip install ".[{extra}]"' in install, extra
        for requirement in requirements:
            name = re.match(r"[A-Za-z0-9_.-]+", requirement).group()
            assert re.search(rf"\b{re.escape(name)}\b", install, re.I), (extra, name)


# --- the example's start-up log filter ----------------------------------------------------------------

# What TensorFlow 2.21 printed at start-up on a 2-core CPU-only machine with TF_CPP_MIN_LOG_LEVEL=2.
START_UP = b"""WARNING: All log messages before absl::InitializeLog() is called are written to STDERR
I0000 00:00:1795519591.467491    3867 port.cc:153] oneDNN custom operations are on. You may see slightly different numerical results.
I0000 00:00:1795519591.467782    3867 cudart_stub.cc:31] Could not find cuda drivers on your machine, GPU will not be used.
I0000 00:00:1795519564.548646    3688 cpu_feature_guard.cc:227] This TensorFlow binary is optimized to use available CPU instructions in performance-critical operations.
To enable the following instructions: AVX2 AVX512F AVX512_VNNI AVX512_BF16 FMA, in other operations, rebuild TensorFlow with the appropriate compiler flags.
E0000 00:00:1795519593.469245    3867 cuda_platform.cc:52] failed call to cuInit: INTERNAL: CUDA error: Failed call to cuInit: UNKNOWN ERROR (303)
E0000 00:00:1795519593.621306    3867 util.cc:131] oneDNN supports DT_INT64 only on platforms with AVX-512. Falling back to the default Eigen-based implementation if present.
E0000 00:00:1763000000.000001    4242 computation_placer.cc:177] computation placer already registered. Please check linkage and avoid linking the same target more than once.
""".splitlines(keepends=True)
# Lines that are no start-up noise, in both of TensorFlow's formats (absl's, 2.21; dated, 2.16-2.20). The
# two W lines are recorded (an out-of-bounds `tf.strided_slice` on 2.21 and on 2.16).
REAL = b"""W0000 00:00:1795519593.700000    3867 op_kernel.cc:1857] OP_REQUIRES failed at strided_slice_op.cc:117 : INVALID_ARGUMENT: slice index 5 of dimension 0 out of bounds.
E0000 00:00:1795519593.700001    3867 op_kernel.cc:1830] OpKernel ('op: "Foo"') for unknown op: Foo
F0000 00:00:1795519593.700002    3867 tensor.cc:1111] Check failed: NDims() == 2 (3 vs. 2)
2026-12-02 02:47:11.927716: W tensorflow/core/framework/op_kernel.cc:1839] OP_REQUIRES failed at strided_slice_op.cc:117 : INVALID_ARGUMENT: slice index 5 of dimension 0 out of bounds.
2026-12-02 02:47:11.927717: E tensorflow/core/framework/op_kernel.cc:1830] OpKernel ('op: "Foo"') for unknown op: Foo
2026-12-02 02:47:11.927718: F tensorflow/core/framework/tensor.cc:1111] Check failed: NDims() == 2 (3 vs. 2)
Traceback (most recent call last):
  File "x.py", line 1, in <module>
ValueError: `epochs` must be non-negative. Received: epochs=-1
To enable the following instructions: not after a kept line
""".splitlines(keepends=True)
# The test's own reading of a log line's severity, in either format (None: not a log line).
SEVERITY = re.compile(rb"^(?:([IWEF])\d{4} \d\d:\d\d:[\d.]+ +\d+ |\d{4}-\d\d-\d\d \d\d:\d\d:[\d.]+: ([IWEF]) )\S+:\d+\] ")


def severity_of(line):
    match = SEVERITY.match(line)
    return match and (match.group(1) or match.group(2))


@pytest.mark.parametrize("level", [0, 1, 2, 3])
def test_start_up_filter_applies_the_log_level_and_keeps_real_errors(level):
    from examples.seq2seq._startup_log import filter_lines

    kept = list(filter_lines(START_UP + REAL, level))
    severity = {0: b"IWEF", 1: b"WEF", 2: b"EF", 3: b"F"}[level]
    expected = [line for line in REAL if severity_of(line) is None or severity_of(line) in severity]
    if level == 0:
        assert kept == START_UP + REAL  # nothing dropped
    elif level == 1:  # the preamble, the I lines and the cpu_feature_guard line's continuation go
        assert kept == [START_UP[i] for i in (5, 6, 7)] + expected
    else:
        assert kept == expected


def test_a_failed_cu_init_is_dropped_only_where_there_is_no_cuda_driver():
    from examples.seq2seq._startup_log import filter_lines

    # 303 is the answer of TensorFlow's CUDA stub when it found no driver library to load (recorded on 2.21
    # and, where TensorFlow does not first say so at level 2, on 2.18).
    dated = next(line for line in recorded_start_up("2.18.1", "keras3", 2) if b"failed call to cuInit" in line)
    assert list(filter_lines([START_UP[5]], 2)) == list(filter_lines([dated], 2)) == []
    # With a driver, a failed cuInit is a real error (no GPU, a driver too old, ...).
    for line in (START_UP[5], dated):
        no_device = line.replace(b"UNKNOWN ERROR (303)", b"CUDA_ERROR_NO_DEVICE: no CUDA-capable device is detected")
        assert list(filter_lines([no_device], 2)) == [no_device]
    # After TensorFlow said there is no CUDA driver, whatever the code.
    no_driver = [START_UP[2], no_device]
    assert list(filter_lines(no_driver, 2)) == []
    assert list(filter_lines(no_driver, 1)) == [no_device]


# What the example printed on stderr on a 2-core CPU-only machine, one epoch with tiny settings, per
# TensorFlow version and Keras flavour: at TF_CPP_MIN_LOG_LEVEL=0 (nothing filtered), and at 2 (the
# example's default) with the filter off (see its README).
START_UP_LOGS = DATA / "startup_log"
RECORDED_VERSIONS = ("2.16.2", "2.18.1", "2.20.0", "2.21.0")


def recorded_start_up(version, flavour, level):
    path = START_UP_LOGS / f"tensorflow-{version}-{flavour}-level{level}.txt"
    return path.read_bytes().splitlines(keepends=True)


def test_recorded_start_up_logs_hold_only_log_lines_in_both_formats():
    assert {path.name for path in START_UP_LOGS.glob("*.txt")} == {
        f"tensorflow-{version}-{flavour}-level{level}.txt"
        for version in RECORDED_VERSIONS for flavour in ("keras3", "tf_keras") for level in (0, 2)}
    dated = re.compile(rb"^\d{4}-\d\d-\d\d ")
    for version in RECORDED_VERSIONS:
        for level in (0, 2):
            lines = recorded_start_up(version, "keras3", level)
            # Besides log lines, only absl's preamble and the continuation of cpu_feature_guard's line.
            assert all(severity_of(line) or line.startswith((b"WARNING: All log messages before absl",
                                                             b"To enable ")) for line in lines), (version, level)
        lines = recorded_start_up(version, "keras3", 0)
        has_dated, has_absl = any(map(dated.match, lines)), any(line[:1] in b"IWEF" for line in lines)
        assert (has_dated, has_absl) == {"2.16.2": (True, False), "2.18.1": (True, True), "2.20.0": (True, False),
                                         "2.21.0": (False, True)}[version]


@pytest.mark.parametrize("flavour", ["keras3", "tf_keras"])
@pytest.mark.parametrize("version", RECORDED_VERSIONS)
@pytest.mark.parametrize("level", [0, 1, 2, 3])
def test_start_up_filter_silences_what_each_tensorflow_version_printed(level, version, flavour):
    from examples.seq2seq._startup_log import filter_lines

    lines = recorded_start_up(version, flavour, 0)
    kept = list(filter_lines(lines, level))
    if level == 0:
        assert kept == lines
    elif level == 1:  # warnings and errors stay; the start-up errors that are no errors go from level 2
        assert kept == [line for line in lines if severity_of(line) in (b"W", b"E")]
    else:
        assert kept == []
    # What reaches the filter at the example's default level: nothing of it reaches the user.
    printed = recorded_start_up(version, flavour, 2)
    assert printed and list(filter_lines(printed, 2)) == []
