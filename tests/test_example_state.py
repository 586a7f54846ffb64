"""The example's state survives any interruption: files written in one step, damaged state rebuilt from the
checkpoint, leftovers of a killed save removed, and `--decode` input checked (issue 18, items 16-18).

Interruptions are made deterministic: a hook on `open` lets a write go half way, then either stops the
process there (it waits on a pipe that is never written; the test kills it with SIGKILL) or raises the
error a full disk gives. The references are the files as the trained run wrote them, and the weights it
trained, both taken before anything was damaged.
"""

import builtins
import dataclasses
import errno
import io
import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

pytest.importorskip("babel")

from examples.seq2seq import train  # noqa: E402
from tests.test_example_seq2seq import ABSL_LINE, ROOT, config_of, quiet, run_example, tiny_args  # noqa: E402

PROG = "python -m examples.seq2seq"


# --- a write that stops half way ----------------------------------------------------------------------


class _HalfWrite:
    """A file whose first `write` writes half its data, flushes it, then calls `then()`."""

    def __init__(self, file, then):
        self._file, self._then, self._done = file, then, False

    def write(self, data):
        if self._done:
            return self._file.write(data)
        self._done = True
        half = len(data) // 2
        self._file.write(data[:half])
        self._file.flush()
        self._then()
        return half + self._file.write(data[half:])

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        return self._file.__exit__(*exc_info)

    def __iter__(self):
        return iter(self._file)

    def __getattr__(self, name):
        return getattr(self._file, name)


def hooked_open(real_open, name, then):
    """Returns an `open` that gives `_HalfWrite` files for writes to the file `name` or to a temporary
    copy of it (`.<name>.*`), wherever the writer opens them: by path (`open`, `Path.write_text`) or by
    descriptor (`os.fdopen`)."""

    def hooked(file, mode="r", *args, **kwargs):
        opened = real_open(file, mode, *args, **kwargs)
        path = os.readlink(f"/proc/self/fd/{file}") if isinstance(file, int) else os.fspath(file)
        base = os.path.basename(path)
        if any(flag in mode for flag in "wax+") and (base == name or base.startswith(f".{name}.")):
            return _HalfWrite(opened, then)
        return opened

    return hooked


# Runs in a child: writes the run's `name` as `stage` does (`prepare_run_dir` for config.json, an epoch
# of training for history.csv) and stops at `point` (half way through the write, or just before the
# rename that would publish it), printing STOPPED; the parent then kills it with SIGKILL.
CHILD = r"""
import builtins, io, json, os, sys
from examples.seq2seq import train
from tests.test_example_state import hooked_open

name, point, config = sys.argv[1], sys.argv[2], train.Config(**json.loads(sys.argv[3]))

def stop_here():
    print("STOPPED", flush=True)
    sys.stdin.read()  # never written to: SIGKILL ends the process here

if point == "write":
    builtins.open = io.open = hooked_open(io.open, name, stop_here)
else:
    real_replace = os.replace
    def replace(source, destination, *args, **kwargs):
        if os.path.basename(destination) == name:
            stop_here()
        return real_replace(source, destination, *args, **kwargs)
    os.replace = replace
if name == "config.json":
    train.prepare_run_dir(config)
else:
    train.train(config, save=False, log=lambda line: None)
print("FINISHED", flush=True)
"""


def kill_while_writing(config, name, point, tmp_path):
    """Runs `CHILD` until it stops at `point` of writing `name`, then kills it with SIGKILL."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=str(ROOT))
    stderr = open(tmp_path / "child.err", "w+")
    child = subprocess.Popen([sys.executable, "-c", CHILD, name, point, json.dumps(dataclasses.asdict(config))],
                             cwd=ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr,
                             text=True)
    try:
        deadline, seen = time.monotonic() + 600, ""
        while True:
            ready, _, _ = select.select([child.stdout], [], [], max(0.0, deadline - time.monotonic()))
            line = child.stdout.readline() if ready else ""
            if line.strip() in ("STOPPED", "FINISHED") or not line:
                break
            seen += line
        stderr.seek(0)
        assert line.strip() == "STOPPED", f"the child did not stop while writing {name}: {line!r}\n{seen}" \
                                          f"{stderr.read()[-3000:]}"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=60)
        child.stdin.close()
        child.stdout.close()
        stderr.close()


# --- a trained run to damage --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished 1-epoch run of the smallest settings, with its files and weights as it wrote them."""
    folder = tmp_path_factory.mktemp("trained")
    args = tiny_args(folder, "--no-save")
    config = config_of(args)
    result = train.train(config, save=False, log=quiet)
    files = {name: (config.route_dir / name).read_bytes() for name in ("config.json", "history.csv")}
    weights = [w.numpy() for w in result.model.weights]
    return dict(folder=folder, config=config, files=files, weights=weights, history=result.history)


def copy_of(trained, tmp_path, **changes):
    """Copies the trained run into `tmp_path`; returns the `Config` of the copy and its command line."""
    shutil.copytree(trained["folder"] / "runs", tmp_path / "runs", symlinks=True)
    args = tiny_args(tmp_path, "--no-save")
    config = dataclasses.replace(trained["config"], run_dir=str(tmp_path / "runs"),
                                 saved_models_dir=str(tmp_path / "saved_models"), **changes)
    return config, args


def state_warnings(record):
    return [str(w.message) for w in record if issubclass(w.category, train.RunStateWarning)]


def assert_restored_weights(run, trained):
    for weight, expected in zip(run.model.weights, trained["weights"]):
        np.testing.assert_array_equal(weight.numpy(), expected)
    assert len(run.model.weights) == len(trained["weights"])


# --- item 16: a write killed half way -----------------------------------------------------------------


@pytest.mark.parametrize("name, point", [
    pytest.param("config.json", "write", marks=pytest.mark.duration(10)),
    pytest.param("config.json", "replace", marks=pytest.mark.duration(9)),
    pytest.param("history.csv", "write", marks=pytest.mark.duration(24))])  # it trains an epoch more
@pytest.mark.slow
def test_a_write_killed_half_way_leaves_the_previous_file_and_the_next_run_resumes(trained, tmp_path, name, point):
    config, _ = copy_of(trained, tmp_path, epochs=2)  # history.csv is written at the end of epoch 2
    kill_while_writing(config, name, point, tmp_path)
    path = config.route_dir / name
    assert path.read_bytes() == trained["files"][name]  # old code: empty
    leftovers = sorted(p for p in config.route_dir.iterdir() if p.name.startswith(f".{name}."))
    assert len(leftovers) == 1  # the temporary copy, half written (or complete, before its rename)

    lines = []
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        result = train.train(config, save=False, log=lines.append)
    assert state_warnings(record) == []  # nothing was damaged, so nothing is rebuilt
    assert f"removed {leftovers[0]}: a partial copy of {name} left by an interrupted write" in lines
    assert not leftovers[0].exists()
    assert result.resumed_from_epoch == 1 and [row["epoch"] for row in result.history] == [1, 2]
    assert result.history[0] == trained["history"][0]
    assert json.loads((config.route_dir / "config.json").read_text()) == json.loads(trained["files"]["config.json"])


# --- item 16: damaged state files rebuilt from the checkpoint -----------------------------------------

DAMAGE = {
    "empty": lambda original: b"",
    "cut": lambda original: original[:len(original) // 2],
    "garbage": lambda original: b"\x00\xff\xfe garbage \x80" * 7,
    "missing": None,
}


def damage(path, how):
    if DAMAGE[how] is None:
        path.unlink()
    else:
        path.write_bytes(DAMAGE[how](path.read_bytes()))


@pytest.mark.parametrize("how", [*DAMAGE, "a list"])
def test_a_damaged_config_json_is_rebuilt_from_the_checkpoint(trained, tmp_path, how):
    config, _ = copy_of(trained, tmp_path)
    path = config.route_dir / "config.json"
    if how == "a list":
        path.write_text("[1, 2]\n")
    else:
        damage(path, how)
    damaged = path.read_bytes() if path.exists() else None

    # `--decode` reads the settings from the checkpoint and writes nothing.
    with pytest.warns(train.RunStateWarning) as record:
        run = train.restore_run(config, write=False)
    message, = state_warnings(record)
    assert message.startswith(f"{path} ") and "; read (not rewritten: `--decode` writes nothing) from the " \
                                                "settings recorded in " in message
    assert (path.read_bytes() if path.exists() else None) == damaged
    assert run.done == 1

    with pytest.warns(train.RunStateWarning) as record:
        run = train.restore_run(config)
    message, = state_warnings(record)
    assert re.fullmatch(rf"{re.escape(str(path))} (is empty|is missing|is damaged \(.+\)); rebuilt from the settings "
                        rf"recorded in {re.escape(str(config.route_dir / 'checkpoints' / 'ckpt-1'))}\.", message)
    assert path.read_bytes() == trained["files"]["config.json"]
    assert run.done == 1 and run.state.history == trained["history"]
    assert_restored_weights(run, trained)


def test_a_rebuilt_config_json_still_refuses_other_settings(trained, tmp_path):
    config, _ = copy_of(trained, tmp_path)
    (config.route_dir / "config.json").write_bytes(b"")
    with pytest.warns(train.RunStateWarning), \
            pytest.raises(train.RunSettingsError, match=r"num_lstm_units=12 \(was 8\).*`--fresh`"):
        train.restore_run(dataclasses.replace(config, num_lstm_units=12))
    with pytest.warns(train.RunStateWarning), \
            pytest.raises(train.RunSettingsError, match=r"seed=5 \(was 0\).*`--fresh`"):
        train.restore_run(dataclasses.replace(config, seed=5))  # not visible in the weights: the record has it


@pytest.mark.parametrize("how", [*DAMAGE, "header only", "other header", "a changed loss", "torn last line"])
def test_a_damaged_history_csv_is_rebuilt_from_the_checkpoint(trained, tmp_path, how):
    config, _ = copy_of(trained, tmp_path)
    path = config.route_dir / "history.csv"
    original = path.read_bytes()
    if how == "header only":
        path.write_bytes(original.splitlines(keepends=True)[0])
    elif how == "other header":
        path.write_bytes(original.replace(b"val_loss", b"validation"))
    elif how == "a changed loss":
        path.write_bytes(original.replace(f"{trained['history'][0]['loss']!r}".encode(), b"0.5"))
    elif how == "torn last line":
        path.write_bytes(original.rstrip(b"\r\n")[:-1])  # the row looks whole but its last digit is gone
    else:
        damage(path, how)
    assert path.read_bytes() != original if path.exists() else True
    damaged = path.read_bytes() if path.exists() else None

    with pytest.warns(train.RunStateWarning) as record:
        run = train.restore_run(config, write=False)
    message, = state_warnings(record)
    assert message.startswith(f"{path} ") and message.endswith(
        f"; its 1 epoch rows are read (not rewritten: `--decode` writes nothing) from "
        f"{config.route_dir / 'checkpoints' / 'ckpt-1'}.")
    assert (path.read_bytes() if path.exists() else None) == damaged
    assert run.done == 1 and run.state.history == trained["history"]

    with pytest.warns(train.RunStateWarning) as record:
        run = train.restore_run(config)
    message, = state_warnings(record)
    assert message.endswith(f"; its 1 epoch rows are rebuilt from {config.route_dir / 'checkpoints' / 'ckpt-1'}.")
    assert path.read_bytes() == original
    assert run.done == 1 and run.state.history == trained["history"]
    assert_restored_weights(run, trained)


def test_the_command_line_warns_in_one_line_each_and_resumes(trained, tmp_path, capsys):
    config, args = copy_of(trained, tmp_path)
    (config.route_dir / "config.json").write_bytes(b"")
    (config.route_dir / "history.csv").write_bytes(b"")
    other_head = config.route_dir.parent / "fit_fused" / "metrics.json"  # what the run compares itself with
    other_head.parent.mkdir()
    other_head.write_bytes(b'{"token_acc')
    result = train.main(args + ["--epochs", "2"])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    checkpoint = config.route_dir / "checkpoints" / "ckpt-1"
    assert [line for line in err.splitlines() if line.startswith(f"{PROG}: warning:")] == [
        f"{PROG}: warning: {config.route_dir / 'config.json'} is empty; rebuilt from the settings recorded in "
        f"{checkpoint}.",
        f"{PROG}: warning: {config.route_dir / 'history.csv'} is empty; its 1 epoch rows are rebuilt from "
        f"{checkpoint}.",
        f"{PROG}: warning: {other_head} is damaged; it is rewritten when that run is evaluated again."]
    assert result.resumed_from_epoch == 1 and [row["epoch"] for row in result.history] == [1, 2]
    assert result.history[0] == trained["history"][0]


def write_checkpoint_of_an_earlier_version(config):
    """Rewrites the run's checkpoint as the example wrote it before it recorded its settings and history:
    model, optimizer and epoch only."""
    run = train.restore_run(config)
    old = tf.train.Checkpoint(model=run.model, optimizer=run.optimizer, epoch=run.state.epoch)
    manager = tf.train.CheckpointManager(old, str(config.route_dir / "checkpoints"), max_to_keep=2)
    manager.save(checkpoint_number=1)
    assert not tf.train.load_checkpoint(manager.latest_checkpoint).has_tensor("run_record/.ATTRIBUTES/VARIABLE_VALUE")


@pytest.mark.slow
@pytest.mark.duration(13)
def test_a_checkpoint_of_an_earlier_version_resumes_and_says_what_cannot_be_rebuilt(trained, tmp_path):
    config, _ = copy_of(trained, tmp_path)
    write_checkpoint_of_an_earlier_version(config)
    with warnings.catch_warnings(record=True) as record:  # intact files: resumes as before, silently
        warnings.simplefilter("always")
        run = train.restore_run(config)
    assert state_warnings(record) == [] and run.done == 1 and run.state.history == trained["history"]

    (config.route_dir / "config.json").write_bytes(b"")
    (config.route_dir / "history.csv").write_bytes(b"")
    checkpoint = config.route_dir / "checkpoints" / "ckpt-1"
    with pytest.warns(train.RunStateWarning) as record:
        run = train.restore_run(config)
    assert state_warnings(record) == [
        f"{config.route_dir / 'config.json'} is empty; rebuilt from these settings: {checkpoint} was written by "
        "an earlier version of the example, which recorded none, so only the model's shape is checked against it.",
        f"{config.route_dir / 'history.csv'} is empty, and {checkpoint} (written by an earlier version of the "
        "example) does not record the losses: epoch 1 cannot be rebuilt and is kept as rows without values "
        "(nan). Training continues from the checkpoint."]
    assert (config.route_dir / "config.json").read_bytes() == trained["files"]["config.json"]
    assert (config.route_dir / "history.csv").read_text().splitlines() == ["epoch,loss,val_loss,seconds",
                                                                          "1,nan,nan,nan"]
    assert run.done == 1
    assert_restored_weights(run, trained)
    # Another model shape is still refused by the checkpoint itself.
    (config.route_dir / "config.json").unlink()
    with pytest.warns(train.RunStateWarning), pytest.raises(train.RunSettingsError, match="does not fit the model"):
        train.restore_run(dataclasses.replace(config, num_lstm_units=12))

    result = train.train(dataclasses.replace(config, epochs=2), save=False, log=quiet)
    assert result.resumed_from_epoch == 1 and result.plot_path.exists()
    assert np.isnan(result.history[0]["loss"]) and np.isfinite(result.history[1]["loss"])


# --- item 16: a full disk, a read-only folder ---------------------------------------------------------


def no_space(*args):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.slow
@pytest.mark.parametrize("name", [pytest.param("config.json", marks=pytest.mark.duration(10)),
                                  pytest.param("history.csv", marks=pytest.mark.duration(20))])
def test_a_full_disk_keeps_the_previous_state_and_says_so_in_one_line(trained, tmp_path, capsys, monkeypatch, name):
    config, args = copy_of(trained, tmp_path)
    path = config.route_dir / name
    hooked = hooked_open(io.open, name, no_space)
    monkeypatch.setattr(io, "open", hooked)
    monkeypatch.setattr(builtins, "open", hooked)
    with pytest.raises(SystemExit) as exit_info:
        train.main(args + ["--epochs", "2"])  # config.json: at the start; history.csv: after epoch 2
    monkeypatch.undo()
    err = capsys.readouterr().err
    assert exit_info.value.code == 1
    assert "Traceback" not in err
    assert err.splitlines()[-1] == (f"{PROG}: error: Could not write {path}: No space left on device. The previous "
                                    "version, if any, is unchanged.")
    assert path.read_bytes() == trained["files"][name]
    assert not [p for p in config.route_dir.iterdir() if p.name.startswith(".")]  # the partial copy is gone
    assert tf.train.latest_checkpoint(str(config.route_dir / "checkpoints")).endswith("ckpt-1")

    result = train.main(args + ["--epochs", "2"])  # with space again: resumes after epoch 1
    assert result.resumed_from_epoch == 1 and result.history[0] == trained["history"][0]


@pytest.mark.parametrize("how", ["chmod", "EROFS"])
def test_a_read_only_run_folder_keeps_the_previous_state_and_says_so_in_one_line(trained, tmp_path, capsys,
                                                                                 monkeypatch, how):
    config, args = copy_of(trained, tmp_path)
    before = {p.name: p.read_bytes() for p in config.route_dir.iterdir() if p.is_file()}
    if how == "chmod":
        if os.geteuid() == 0:
            pytest.skip("root writes to read-only folders; the EROFS case covers it")
        config.route_dir.chmod(0o555)
        reason = os.strerror(errno.EACCES)
    else:  # as a read-only mount answers: every open for writing in the folder is refused
        real_os_open, real_open = os.open, io.open

        def refuse(path):
            if Path(os.path.abspath(path)).parent == config.route_dir:
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))

        def os_open(path, flags, *args, **kwargs):
            if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
                refuse(path)
            return real_os_open(path, flags, *args, **kwargs)

        def open_(file, mode="r", *args, **kwargs):
            if not isinstance(file, int) and any(flag in mode for flag in "wax+"):
                refuse(file)
            return real_open(file, mode, *args, **kwargs)

        monkeypatch.setattr(os, "open", os_open)  # `tempfile.mkstemp` opens through it
        monkeypatch.setattr(io, "open", open_)
        monkeypatch.setattr(builtins, "open", open_)
        reason = os.strerror(errno.EROFS)
    try:
        with pytest.raises(SystemExit) as exit_info:
            train.main(args)
    finally:
        config.route_dir.chmod(0o755)
        monkeypatch.undo()
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and "Traceback" not in err
    assert err.splitlines()[-1] == (f"{PROG}: error: Could not write {config.route_dir / 'config.json'}: {reason}. "
                                    "The previous version, if any, is unchanged.")
    assert {p.name: p.read_bytes() for p in config.route_dir.iterdir() if p.is_file()} == before


# --- item 17: what `--decode` accepts -----------------------------------------------------------------


def test_decode_refuses_text_that_is_not_utf8_in_one_line(trained, tmp_path):
    config, args = copy_of(trained, tmp_path)
    from examples.seq2seq.model import FLAVOUR

    process = run_example(args + ["--decode", "3 mars 1999", b"3 mars \xff1999"], FLAVOUR, tmp_path)
    out, err = process.communicate(timeout=600)
    assert process.returncode == 2, err
    assert "Traceback" not in err and not ABSL_LINE.search(err), err
    assert err.splitlines()[-1] == (f"{PROG}: error: Invalid value for argument `--decode`. Expected UTF-8 text. "
                                    r"Received: text 2 = b'3 mars \xff1999' (byte 0xff at position 7 is not UTF-8)")
    # Through the API, a lone surrogate that no command line produces is refused as well.
    with pytest.raises(train.InvalidTextError, match=r"Expected UTF-8 text. Received: text 1 = b'a\\\\ud800'$"):
        train.decode(config, ["a\ud800"], log=quiet)
    with pytest.raises(train.InvalidTextError, match=r"Received: text 2 = b'\\xc3\(' \(byte 0xc3 at position 0 is"):
        train.decode(config, [b"1999", b"\xc3("], log=quiet)


def test_decode_refuses_a_text_longer_than_the_cap_in_one_line(trained, tmp_path, capsys):
    config, args = copy_of(trained, tmp_path)
    cap = train.MAX_DECODE_CHARS
    # The cap is a few times the longest input the generator writes, so no real date comes near it.
    longest = max(len(e.source) for e in train.data.generate_examples(3000, seed=1))
    assert 4 * longest <= cap <= 10 * longest
    assert f"UTF-8 of at most {cap} characters" in " ".join(train.make_parser().format_help().split())

    text = "3 mars 1999 " * 100
    with pytest.raises(SystemExit) as exit_info:
        train.main(args + ["--decode", "3 mars 1999", text])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.splitlines()[-1] == (f"{PROG}: error: Invalid value for argument `--decode`. Expected at most {cap} "
                                    "characters per text (about five times the longest date the model is trained "
                                    f"on). Received: text 2 of 1200 characters, {text[:60]!r}...")
    at_the_cap = ("1" * cap)
    result = train.main(args + ["--decode", at_the_cap])
    assert [text for text, _ in result.decoded] == [at_the_cap]


# --- item 18: leftovers of an interrupted checkpoint save ---------------------------------------------


def test_a_leftover_checkpoint_temp_folder_is_removed_at_start_and_nothing_else(trained, tmp_path):
    config, _ = copy_of(trained, tmp_path)
    checkpoints = config.route_dir / "checkpoints"
    # What a save killed before its merge leaves: the shards TensorFlow writes to `ckpt-2_temp/`.
    tf.train.Checkpoint(v=tf.Variable([1.0, 2.0])).write(str(checkpoints / "ckpt-2_temp" / "part-00000-of-00001"))
    shards = sorted(p.name for p in (checkpoints / "ckpt-2_temp").iterdir())
    assert shards == ["part-00000-of-00001.data-00000-of-00001", "part-00000-of-00001.index"]
    (checkpoints / ("checkpoint.tmp" + "0123456789abcdef" * 2)).write_text("model_checkpoint_path: 'ckpt-2'\n")
    (config.route_dir / ".history.csv.abcd_123.partial.csv").write_text("epoch,lo")
    # Not leftovers, though named alike: each must stay as it is.
    keep = {
        checkpoints / "ckpt-3_temp" / "notes.txt": "mine",
        checkpoints / "ckpt-4_temp": "a file",
        checkpoints / "my-ckpt-5_temp" / "part-00000-of-00001.index": "x",
        checkpoints / "ckpt-6_temp.bak" / "part-00000-of-00001.index": "x",
        config.route_dir / "ckpt-7_temp" / "part-00000-of-00001.index": "x",
        tmp_path / "elsewhere" / "part-00000-of-00001.index": "the target of a link",
        checkpoints / "checkpoint.tmp-notes": "x",
        config.route_dir / ".history.csv.bak": "x",
        config.route_dir / ".history.csv.abcd_123.partial.txt": "x",
    }
    for path, text in keep.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    (checkpoints / "ckpt-8_temp").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    leftovers = [checkpoints / "ckpt-2_temp", checkpoints / ("checkpoint.tmp" + "0123456789abcdef" * 2),
                 config.route_dir / ".history.csv.abcd_123.partial.csv"]

    train.decode(config, ["3 mars 1999"], log=quiet)  # `--decode` removes nothing either
    assert all(path.exists() for path in leftovers)

    lines = []
    with pytest.warns(train.RunStateWarning) as record:
        result = train.train(config, save=False, log=lines.append)
    assert state_warnings(record) == [f"{checkpoints / 'ckpt-3_temp'} is named like the temporary folder of a "
                                      "checkpoint save but holds other files; it is left as it is."]
    assert [line for line in lines if line.startswith("removed ")] == [
        f"removed {checkpoints / 'checkpoint.tmp0123456789abcdef0123456789abcdef'}: left by a checkpoint save that "
        "was interrupted",
        f"removed {checkpoints / 'ckpt-2_temp'}: left by a checkpoint save that was interrupted",
        f"removed {config.route_dir / '.history.csv.abcd_123.partial.csv'}: a partial copy of history.csv left by "
        "an interrupted write"]
    assert not any(path.exists() for path in leftovers)
    assert {path: path.read_text() for path in keep} == keep
    assert (checkpoints / "ckpt-8_temp").is_symlink()
    assert result.resumed_from_epoch == 1 and result.history == trained["history"]


# --- the writer itself ----------------------------------------------------------------------------------


def test_write_atomically_keeps_the_mode_and_replaces_in_one_step(tmp_path):
    from examples.seq2seq import files

    path = tmp_path / "a.json"
    path.write_text("old")
    path.chmod(0o640)
    files.write_atomically(path, "new \u00e9")
    assert path.read_bytes() == "new \u00e9".encode() and path.stat().st_mode & 0o777 == 0o640
    files.write_atomically(tmp_path / "b.png", lambda temp: Path(temp).write_bytes(b"\x89PNG"))
    assert (tmp_path / "b.png").read_bytes() == b"\x89PNG"
    umask = os.umask(0o027)
    try:
        files.write_atomically(tmp_path / "c.csv", b"x")
    finally:
        os.umask(umask)
    assert (tmp_path / "c.csv").stat().st_mode & 0o777 == 0o640

    def fails(temp):
        Path(temp).write_bytes(b"half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(files.RunFileError, match=r"^Could not write .*a\.json: No space left on device\. "):
        files.write_atomically(path, fails)
    with pytest.raises(KeyboardInterrupt):
        files.write_atomically(path, lambda temp: (_ for _ in ()).throw(KeyboardInterrupt))
    assert path.read_bytes() == "new \u00e9".encode()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.png", "c.csv"]


def test_replace_folder_and_an_interrupted_replacement_are_recovered(tmp_path):
    from examples.seq2seq import files

    target = tmp_path / "model_savedmodel"

    def export(text):
        return lambda temp: (Path(temp) / "saved_model.pb").write_text(text)

    files.replace_folder(target, export("one"))
    files.replace_folder(target, export("two"))
    assert (target / "saved_model.pb").read_text() == "two"
    with pytest.raises(files.RunFileError):
        files.replace_folder(target, lambda temp: no_space())
    assert (target / "saved_model.pb").read_text() == "two"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model_savedmodel"]
    # Killed between its two renames: the previous folder is under `.old`, and is moved back.
    old = tmp_path / ".model_savedmodel.k2j4_x9z.old"
    target.rename(old)
    partial = tmp_path / ".model_savedmodel.a1b2c3d4.partial"
    partial.mkdir()
    lines = []
    files.remove_leftovers(tmp_path / "checkpoints", folders=[target], log=lines.append)
    assert (target / "saved_model.pb").read_text() == "two" and not old.exists() and not partial.exists()
    assert lines == [f"removed {partial}: a partial copy of model_savedmodel left by an interrupted write",
                     f"moved {old} back to {target}: a write was interrupted as it replaced it"]
