"""`tf-seqloss-upgrade` and the user's files: atomic writes (killed, full disk, read-only), every byte but
the change kept (line endings, BOM, encodings), which paths a run looks at, the summary line, hostile
input, and a start-up without TensorFlow.

The expected bytes are built independently of the tool: from the text the corpus tests already pin, with
the file's own line ends, BOM or encoding put in by hand; diffs are checked by GNU `patch`. Kernel-level
failures are real where the machine allows (a SIGKILL, a file-size limit, a full tmpfs and a read-only
bind mount in a private mount namespace, an immutable file) and monkeypatched where it does not.
"""

import contextlib
import errno
import fnmatch
import json
import os
import re
import resource
import select
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("libcst", reason='the rewriter needs the `upgrade` extra: pip install "tf_seqloss[upgrade]"')

from tests._pyproject import pyproject  # noqa: E402
from tf_seqloss_upgrade import upgrade_source  # noqa: E402
from tf_seqloss_upgrade.cli import main  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, PYTHONPATH=str(REPO), TF_CPP_MIN_LOG_LEVEL="2", PYTHONDONTWRITEBYTECODE="1")
SUMMARY = re.compile(r"^tf-seqloss-upgrade: (\d+) files? scanned, (\d+) (?:would be )?rewritten, (\d+) unchanged, "
                     r"(\d+) refused, (\d+) skipped(?: \((.*)\))?$")

# One call to migrate, and what the rewriter makes of it (as test_upgrade.py's module test pins it).
BEFORE = ["import tensorflow as tf", "x = tf.losses.sparse_softmax_cross_entropy(y, z)"]
AFTER = ["import tf_seqloss", "", "x = tf_seqloss.sparse_softmax_cross_entropy(y, z)"]


def _lines(lines, end="\n", last=True):
    return end.join(lines) + (end if last else "")


def _big(size):
    """`BEFORE` and then a string literal, `size` bytes in all (a literal: libcst is slow on many comment lines)."""
    head = (_lines(BEFORE) + 'BLOB = """\n').encode()
    return head + b"y" * (size - len(head) - 4) + b'"""\n'


def _run(*args, cwd=None, timeout=120, **kwargs):
    """Runs the command in a fresh interpreter."""
    return subprocess.run([sys.executable, "-m", "tf_seqloss_upgrade", *map(str, args)], cwd=cwd, env=ENV,
                          capture_output=True, timeout=timeout, **kwargs)


def _summary(err):
    line = err.strip().splitlines()[-1]
    match = SUMMARY.match(line)
    assert match, line
    scanned, rewritten, unchanged, refused, skipped = map(int, match.groups()[:5])
    reasons = dict((reason, int(count)) for count, reason in
                   (part.split(" ", 1) for part in match.group(6).split(", "))) if match.group(6) else {}
    return dict(scanned=scanned, rewritten=rewritten, unchanged=unchanged, refused=refused, skipped=skipped,
                reasons=reasons)


def _errors(err):
    return [line for line in err.splitlines() if ": ERROR: " in line]


def _temporary_files(folder):
    return [p for p in Path(folder).iterdir() if p.name.endswith(".tf-seqloss-upgrade.tmp")]


# -- atomic writes ----------------------------------------------------------------------------------------

KILLED_MID_WRITE = textwrap.dedent(r"""
    import os, sys
    from tf_seqloss_upgrade.cli import main

    system = sys.modules[os.name]  # os.write's module (posix)
    stop_at, writes = int(sys.argv.pop(1)), 0

    def block_at_a_file_write(frame, event, function):
        # When a write to the file being rewritten (the temporary one, or the original) is about to
        # start, the `stop_at`-th time, tell the parent and wait there, forever: the parent kills this
        # process with SIGKILL.
        global writes
        if event != "c_call" or getattr(function, "__name__", None) != "write":
            return
        owner = getattr(function, "__self__", None)
        if owner is system or str(getattr(owner, "name", "")).endswith(".py"):
            writes += 1
            if writes == stop_at:
                sys.setprofile(None)
                os.write(1, b"blocked\n")
                os.read(0, 1)

    sys.setprofile(block_at_a_file_write)
    sys.exit(main(sys.argv[1:]))
""")


@pytest.mark.parametrize("stop_at", [1, 2], ids=["before-the-first-write", "after-the-first-megabyte"])
def test_sigkill_in_the_middle_of_a_write_leaves_the_original_byte_identical(stop_at, tmp_path):
    # 2.4 MB, so that the rewrite is written in several chunks and the kill can land between two.
    (tmp_path / "work").mkdir()
    target = tmp_path / "work" / "big.py"
    before = _big(2_400_000)
    target.write_bytes(before)
    child = tmp_path / "child.py"
    child.write_text(KILLED_MID_WRITE)
    process = subprocess.Popen([sys.executable, str(child), str(stop_at), str(target), "--write"], env=ENV,
                               cwd=tmp_path, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        ready, _, _ = select.select([process.stdout], [], [], 300)
        said = os.read(process.stdout.fileno(), 100) if ready else b""
    finally:
        process.kill()  # SIGKILL
        process.wait(timeout=60)
    assert said == b"blocked\n", process.stderr.read()[-3000:]
    assert process.returncode == -signal.SIGKILL
    assert target.read_bytes() == before
    # Killed mid-write, a hidden temporary file (empty, or the first megabyte) is all that is left.
    leftovers = _temporary_files(target.parent)
    assert len(leftovers) == 1 and leftovers[0].name.startswith(".big.py.")
    assert leftovers[0].stat().st_size == (stop_at - 1) * 2**20
    # The next run ignores the leftover and does the job.
    run = _run(target.parent, "--write", timeout=300)
    assert run.returncode == 0, run.stderr
    assert target.read_bytes() == _lines(AFTER).encode() + before[len(_lines(BEFORE)):]
    assert _summary(run.stderr.decode())["scanned"] == 1


def _no_bigger_than(limit):
    def limit_file_size():
        # Writing past the limit then fails with EFBIG (File too large), as a full disk fails with ENOSPC.
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return limit_file_size


def test_a_write_that_fails_midway_leaves_the_original_and_the_run_goes_on(tmp_path):
    big, small = tmp_path / "a_big.py", tmp_path / "b_small.py"
    big_before = _big(200_000)
    big.write_bytes(big_before)
    small.write_text(_lines(BEFORE))
    run = subprocess.run([sys.executable, "-m", "tf_seqloss_upgrade", str(tmp_path), "--write"], env=ENV,
                         capture_output=True, timeout=120, preexec_fn=_no_bigger_than(100_000))
    err = run.stderr.decode()
    assert run.returncode == 1, err
    assert big.read_bytes() == big_before
    assert small.read_text() == _lines(AFTER)
    [error] = _errors(err)
    assert error.startswith(f"{big}:1:1: ERROR: cannot write this file") and "(EFBIG)" in error, err
    assert "Traceback" not in err
    assert _temporary_files(tmp_path) == []
    assert _summary(err) == dict(scanned=2, rewritten=1, unchanged=1, refused=1, skipped=0, reasons={})


def _private_mount_namespace():
    """Whether this process may run commands in a mount namespace of their own (as root, or not at all)."""
    if shutil.which("unshare") is None or shutil.which("mount") is None or os.geteuid() != 0:
        return False
    probe = subprocess.run(["unshare", "--mount", "--propagation", "private", "true"], capture_output=True)
    return probe.returncode == 0


FULL_DISK = textwrap.dedent(r"""
    import json, os, shutil, subprocess, sys
    disk, source, python = sys.argv[1:4]
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", disk]).returncode:
        sys.exit(77)
    for name in sorted(os.listdir(source)):
        shutil.copy(os.path.join(source, name), disk)
    filler = os.open(os.path.join(disk, "filler.bin"), os.O_WRONLY | os.O_CREAT)
    try:
        while True:  # page by page, until not one is left
            os.write(filler, b"\0" * 4096)
    except OSError:
        pass
    os.close(filler)
    run = subprocess.run([python, "-m", "tf_seqloss_upgrade", disk, "--write"], capture_output=True, text=True)
    files = {name: open(os.path.join(disk, name), "rb").read().hex() for name in os.listdir(disk)
             if name != "filler.bin"}
    print(json.dumps(dict(returncode=run.returncode, stderr=run.stderr, files=files)))
""")


def _grows_by_a_page():
    """A file of exactly 25 pages whose rewrite needs a 26th: rewritten in place on a disk with no page
    left, it is cut (the space of its old pages is reused until the last one); a temporary file cannot
    even start."""
    head = "import tensorflow_addons as tfa\n" + "".join(f"l{i} = tfa.seq2seq.sequence_loss(a, b, c)\n"
                                                       for i in range(100))
    pad = 25 * 4096 - len(head) - len('BLOB = """"""\n')
    before = (head + 'BLOB = """' + "y" * pad + '"""\n').encode()
    assert len(before) == 25 * 4096 and len(upgrade_source(before.decode()).code) > len(before)
    return before


@pytest.mark.skipif(not _private_mount_namespace(), reason="needs root and `unshare --mount` to mount a tmpfs")
def test_a_full_disk_leaves_the_original_and_the_run_goes_on(tmp_path):
    source, disk = tmp_path / "source", tmp_path / "disk"
    source.mkdir()
    disk.mkdir()
    big_before = _grows_by_a_page()
    (source / "a_big.py").write_bytes(big_before)
    (source / "b_small.py").write_text(_lines(BEFORE))
    (source / "c_clean.py").write_text("x = 1\n")
    driver = tmp_path / "driver.py"
    driver.write_text(FULL_DISK)
    # The tmpfs lives and dies with the namespace: nothing to clean up, even if the test is killed.
    run = subprocess.run(["unshare", "--mount", "--propagation", "private", sys.executable, str(driver), str(disk),
                          str(source), sys.executable], env=ENV, capture_output=True, text=True, timeout=300)
    if run.returncode == 77:
        pytest.skip("cannot mount a tmpfs here")
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    assert bytes.fromhex(report["files"]["a_big.py"]) == big_before
    assert bytes.fromhex(report["files"]["b_small.py"]) == _lines(BEFORE).encode()
    assert sorted(report["files"]) == ["a_big.py", "b_small.py", "c_clean.py"]  # no temporary file left
    assert report["returncode"] == 1, report["stderr"]
    errors = _errors(report["stderr"])
    assert [e.split(":")[0] for e in errors] == [f"{disk}/a_big.py", f"{disk}/b_small.py"]
    assert all(": ERROR: cannot write this file" in e and e.endswith("(ENOSPC)") for e in errors), errors
    assert _summary(report["stderr"]) == dict(scanned=3, rewritten=0, unchanged=3, refused=2, skipped=0, reasons={})


def test_enospc_from_the_system_leaves_the_original(tmp_path, capsys, monkeypatch):
    # A portable stand-in for the full disk: the second chunk's write fails as a full disk fails it.
    target, other = tmp_path / "a.py", tmp_path / "b.py"
    before = _big(3_000_000)
    target.write_bytes(before)
    other.write_text(_lines(BEFORE))
    real_write, calls = os.write, []

    def write(descriptor, data):
        calls.append(len(data))
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(descriptor, data)

    monkeypatch.setattr(os, "write", write)
    assert main([str(target), str(other), "--write"]) == 1
    _, err = capsys.readouterr()
    assert target.read_bytes() == before
    assert other.read_text() == _lines(AFTER)
    [error] = _errors(err)
    assert error == (f"{target}:1:1: ERROR: cannot write this file, so none of the changes below were made; it is "
                     "unchanged: No space left on device (ENOSPC)")
    assert _temporary_files(tmp_path) == []


def test_a_failing_rename_leaves_the_original_and_no_temporary_file(tmp_path, capsys, monkeypatch):
    target = tmp_path / "a.py"
    target.write_text(_lines(BEFORE))

    def replace(source, destination):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

    monkeypatch.setattr(os, "replace", replace)
    assert main([str(target), "--write"]) == 1
    _, err = capsys.readouterr()
    assert target.read_text() == _lines(BEFORE)
    assert _errors(err)[0].endswith("it is unchanged: Permission denied (EACCES)")
    assert _temporary_files(tmp_path) == []


@pytest.mark.skipif(not _private_mount_namespace(), reason="needs root and `unshare --mount` for a read-only mount")
def test_a_read_only_folder_is_reported_and_the_run_goes_on(tmp_path):
    # Root ignores permission bits, so the folder is made read-only by a read-only bind mount, in a mount
    # namespace of the command's own.
    locked, free = tmp_path / "locked", tmp_path / "free"
    locked.mkdir()
    free.mkdir()
    (locked / "a.py").write_text(_lines(BEFORE))
    (locked / "b.py").write_text(_lines(BEFORE))
    (free / "c.py").write_text(_lines(BEFORE))
    script = ('mount --bind "$1" "$1" && mount -o remount,ro,bind "$1" && '
              'exec "$2" -m tf_seqloss_upgrade "$1" "$3" --write')
    run = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", str(locked),
                          sys.executable, str(free)], env=ENV, capture_output=True, text=True, timeout=120)
    assert run.returncode == 1, run.stderr
    assert (locked / "a.py").read_text() == (locked / "b.py").read_text() == _lines(BEFORE)
    assert (free / "c.py").read_text() == _lines(AFTER)
    errors = _errors(run.stderr)
    assert [e.split(":")[0] for e in errors] == [str(locked / "a.py"), str(locked / "b.py")]
    assert all("it is unchanged: Read-only file system (EROFS)" in e for e in errors)
    assert _summary(run.stderr) == dict(scanned=3, rewritten=1, unchanged=2, refused=2, skipped=0, reasons={})


def test_a_read_only_folder_is_reported_without_root(tmp_path, capsys):
    if os.geteuid() == 0:
        pytest.skip("root writes into a folder without write permission; the read-only mount test covers root")
    locked = tmp_path / "locked"
    locked.mkdir()
    (locked / "a.py").write_text(_lines(BEFORE))
    locked.chmod(0o555)
    try:
        assert main([str(locked), "--write"]) == 1
    finally:
        locked.chmod(0o755)
    _, err = capsys.readouterr()
    assert (locked / "a.py").read_text() == _lines(BEFORE)
    assert "it is unchanged: Permission denied (EACCES)" in _errors(err)[0]


def test_an_immutable_file_is_reported_even_for_root(tmp_path):
    if shutil.which("chattr") is None:
        pytest.skip("no chattr")
    target, other = tmp_path / "a.py", tmp_path / "b.py"
    target.write_text(_lines(BEFORE))
    other.write_text(_lines(BEFORE))
    if subprocess.run(["chattr", "+i", str(target)], capture_output=True).returncode:
        pytest.skip("cannot make a file immutable here (not root, or the file system has no such flag)")
    try:
        run = _run(target, other, "--write")
    finally:
        subprocess.run(["chattr", "-i", str(target)], check=True)
    err = run.stderr.decode()
    assert run.returncode == 1, err
    assert target.read_text() == _lines(BEFORE) and other.read_text() == _lines(AFTER)
    [error] = _errors(err)
    assert error.startswith(f"{target}:1:1: ERROR: cannot write this file") and "(EPERM)" in error
    assert _temporary_files(tmp_path) == []


def test_the_file_keeps_its_mode_and_owner(tmp_path, capsys):
    target = tmp_path / "tool.py"
    target.write_text(_lines(BEFORE))
    target.chmod(0o751)
    owner = (os.getuid(), os.getgid())
    if os.geteuid() == 0:
        owner = (1234, 5678)
        os.chown(target, *owner)
    assert main([str(target), "--write"]) == 0
    info = target.stat()
    assert target.read_text() == _lines(AFTER)
    assert stat.S_IMODE(info.st_mode) == 0o751 and (info.st_uid, info.st_gid) == owner


def test_a_file_changed_while_it_was_rewritten_is_not_overwritten(tmp_path, capsys, monkeypatch):
    from tf_seqloss_upgrade import _files, cli

    target = tmp_path / "a.py"
    target.write_text(_lines(BEFORE))
    real_read = _files.read

    def read_then_someone_edits(candidate):
        result = real_read(candidate)
        target.write_text("# edited meanwhile\n" + _lines(BEFORE))
        return result

    monkeypatch.setattr(cli, "read", read_then_someone_edits)
    assert main([str(target), "--write"]) == 1
    _, err = capsys.readouterr()
    assert target.read_text() == "# edited meanwhile\n" + _lines(BEFORE)
    assert "it changed on disk while it was being rewritten" in _errors(err)[0]


def test_a_hard_linked_file_is_rewritten_with_a_warning_for_its_other_names(tmp_path, capsys):
    target, other_name = tmp_path / "m.py", tmp_path / "alias.txt"
    target.write_text(_lines(BEFORE))
    os.link(target, other_name)
    assert main([str(target), "--write"]) == 0
    _, err = capsys.readouterr()
    assert target.read_text() == _lines(AFTER) and other_name.read_text() == _lines(BEFORE)
    assert f"{target}:1:1: WARNING: it had 2 hard links: it is now a new file, and its other names still show the " \
           "old text" in err.splitlines()


def test_a_symbolic_link_named_on_the_command_line_is_followed_and_kept(tmp_path, capsys):
    real, link = tmp_path / "real.py", tmp_path / "link.py"
    real.write_text(_lines(BEFORE))
    link.symlink_to(real)
    assert main([str(link), "--write"]) == 0
    assert link.is_symlink() and os.readlink(link) == str(real)
    assert real.read_text() == _lines(AFTER)


# -- every byte but the change ----------------------------------------------------------------------------

ENDINGS = {
    "crlf": (_lines(BEFORE, "\r\n"), _lines(AFTER, "\r\n")),
    "lone cr": (_lines(BEFORE, "\r"), _lines(AFTER, "\r")),
    "no final newline": (_lines(BEFORE, last=False), _lines(AFTER, last=False)),
    "crlf without a final one": (_lines(BEFORE, "\r\n", last=False), _lines(AFTER, "\r\n", last=False)),
    # A line the tool adds takes the file's first line ending; the others keep theirs.
    "mixed": ("import tensorflow as tf\r\n# note\rx = tf.losses.sparse_softmax_cross_entropy(y, z)\n",
              "import tf_seqloss\r\n\r\n# note\rx = tf_seqloss.sparse_softmax_cross_entropy(y, z)\n"),
}


@pytest.mark.parametrize("bom", [False, True], ids=["no-bom", "bom"])
@pytest.mark.parametrize("case", sorted(ENDINGS))
def test_line_endings_and_bom_survive_the_rewrite_and_the_diff(case, bom, tmp_path, capsysbinary, monkeypatch):
    before, after = (("\ufeff" if bom else "") + text for text in ENDINGS[case])
    monkeypatch.chdir(tmp_path)
    Path("src").mkdir()
    Path("src/m.py").write_bytes(before.encode())
    assert main(["src/m.py"]) == 0
    diff, _ = capsysbinary.readouterr()
    assert Path("src/m.py").read_bytes() == before.encode()  # a dry run changes nothing
    # The diff is the file's bytes: GNU patch applied to a copy gives exactly what --write writes.
    Path("copy/src").mkdir(parents=True)
    Path("copy/src/m.py").write_bytes(before.encode())
    patched = subprocess.run(["patch", "-p1", "--quiet", "-d", "copy"], input=diff, capture_output=True)
    assert patched.returncode == 0, patched.stdout + patched.stderr
    assert main(["src/m.py", "--write"]) == 0
    assert Path("src/m.py").read_bytes() == after.encode()
    assert Path("copy/src/m.py").read_bytes() == after.encode()


def test_the_upgrade_source_api_keeps_line_endings_too():
    for before, after in ENDINGS.values():
        assert upgrade_source(before).code == after


def test_a_latin_1_file_is_read_and_written_in_latin_1(tmp_path, capsys):
    target = tmp_path / "m.py"
    header = "# -*- coding: latin-1 -*-\n# Caf\xe9 na\xefve, \xa9 2017\n"
    target.write_bytes((header + _lines(BEFORE)).encode("latin-1"))
    assert main([str(target), "--write"]) == 0
    assert target.read_bytes() == (header + _lines(AFTER)).encode("latin-1")
    assert b"\xe9" in target.read_bytes()


def test_a_cp1252_cookie_after_a_shebang_is_honoured(tmp_path, capsys):
    target = tmp_path / "m.py"
    header, tail = "#!/usr/bin/env python\n# vim: set fileencoding=cp1252 :\n", "s = '\u201cquoted\u201d \u20ac'\n"
    target.write_bytes((header + _lines(BEFORE) + tail).encode("cp1252"))
    assert main([str(target), "--write"]) == 0
    assert target.read_bytes() == (header + _lines(AFTER) + tail).encode("cp1252")


@pytest.mark.parametrize("content,line,expected", [
    (b"# -*- coding: klingon -*-\nx = 1\n", 1, "its encoding declaration is not one Python reads"),
    (b"\xef\xbb\xbf# -*- coding: latin-1 -*-\nx = 1\n", 1, "its encoding declaration is not one Python reads"),
    (b"import tensorflow as tf\nx = 1\ns = '\xe9'\n", 3, "cannot read this file as utf-8 (byte 0xe9 on this line)"),
])
def test_a_file_that_cannot_be_decoded_is_refused_with_one_line(content, line, expected, tmp_path, capsys):
    bad, good = tmp_path / "a.py", tmp_path / "b.py"
    bad.write_bytes(content)
    good.write_text(_lines(BEFORE))
    assert main([str(tmp_path), "--write"]) == 1
    _, err = capsys.readouterr()
    assert bad.read_bytes() == content and good.read_text() == _lines(AFTER)
    [error] = _errors(err)
    assert error.startswith(f"{bad}:{line}:1: ERROR: ") and expected in error, error


def test_a_form_feed_is_not_silently_dropped(tmp_path, capsys):
    # libcst drops a form feed at the start of a line; the tool refuses rather than lose it, and says
    # nothing about files it does not need to change.
    target, quiet = tmp_path / "a.py", tmp_path / "b.py"
    before = _lines([BEFORE[0], "\x0c" + BEFORE[1]])
    target.write_text(before)
    quiet.write_text("x = 1\n\x0cy = 2\n")
    assert main([str(target), "--write"]) == 1
    _, err = capsys.readouterr()
    assert target.read_text() == before
    [error] = _errors(err)
    assert error.startswith(f"{target}:2:1: ERROR: left unchanged: libcst"), error
    assert main([str(quiet), "--write"]) == 0
    assert quiet.read_text() == "x = 1\n\x0cy = 2\n"


@pytest.mark.parametrize("source,line", [
    ("import tensorflow as tf\ny = = 2\nz = 3\n", 2),   # was reported on line 3
    ("x = 1\nloss = f(a,\n", 2),
    ("x = 1\n  y = 2\n", 2),
    ("x = 1\r\ny = = 2\r\n", 2),
])
def test_a_syntax_error_is_reported_on_its_own_line(source, line, tmp_path, capsys):
    with pytest.raises(SyntaxError) as raised:  # where CPython's own parser puts it
        compile(source, "m.py", "exec")
    assert raised.value.lineno == line
    column = raised.value.offset
    assert [(f.line, f.column, f.level) for f in upgrade_source(source).findings] == [(line, column, "ERROR")]
    target = tmp_path / "m.py"
    target.write_text(source)
    assert main([str(target)]) == 1
    _, err = capsys.readouterr()
    assert _errors(err)[0].startswith(f"{target}:{line}:{column}: ERROR: cannot parse this file")


# -- which paths a run looks at ---------------------------------------------------------------------------

def _tree(root, files):
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_dot_dot_and_absolute_paths_with_dot_dot_are_searched(tmp_path, capsys, monkeypatch):
    _tree(tmp_path, {"proj/src/m.py": _lines(BEFORE), "proj/tools/here.txt": ""})
    monkeypatch.chdir(tmp_path / "proj" / "tools")
    assert main([".."]) == 0
    _, err = capsys.readouterr()
    assert "../src/m.py:2:5: INFO:" in err
    assert main([f"{tmp_path}/proj/tools/../src"]) == 0
    _, err = capsys.readouterr()
    assert f"{tmp_path}/proj/tools/../src/m.py:2:5: INFO:" in err
    assert _summary(err)["scanned"] == 1


def test_a_tree_under_a_hidden_folder_is_searched_but_hidden_entries_below_are_not(tmp_path, capsys):
    root = tmp_path / ".cache" / "proj"
    _tree(root, {"m.py": _lines(BEFORE), ".git/hook.py": _lines(BEFORE), ".ipynb_checkpoints/n.ipynb": "{}",
                 "pkg/.hidden.py": _lines(BEFORE), "pkg/.notes.txt": ""})
    assert main([str(root), "--write"]) == 0
    _, err = capsys.readouterr()
    assert (root / "m.py").read_text() == _lines(AFTER)
    assert (root / ".git/hook.py").read_text() == (root / "pkg/.hidden.py").read_text() == _lines(BEFORE)
    assert _summary(err) == dict(scanned=1, rewritten=1, unchanged=0, refused=0, skipped=3, reasons={"hidden": 3})
    # A hidden folder or file named on the command line is taken as it is.
    assert main([str(root / ".git"), str(root / "pkg" / ".hidden.py"), "--write"]) == 0
    assert (root / ".git/hook.py").read_text() == (root / "pkg/.hidden.py").read_text() == _lines(AFTER)


def test_a_command_line_that_finds_nothing_says_so_and_does_not_succeed(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("")
    assert main([str(tmp_path)]) == 2
    _, err = capsys.readouterr()
    assert err.splitlines() == [f"tf-seqloss-upgrade: no Python files or notebooks found under {tmp_path}",
                                "tf-seqloss-upgrade: 0 files scanned, 0 would be rewritten, 0 unchanged, 0 refused, "
                                "0 skipped"]
    assert main([str(tmp_path / "missing.py")]) == 2
    _, err = capsys.readouterr()
    assert err.splitlines()[0] == f"{tmp_path}/missing.py:1:1: ERROR: no such file or folder"


def test_a_missing_path_beside_real_files_is_an_error_line(tmp_path, capsys):
    (tmp_path / "m.py").write_text(_lines(BEFORE))
    assert main([str(tmp_path / "m.py"), str(tmp_path / "gone")]) == 1
    _, err = capsys.readouterr()
    assert f"{tmp_path}/gone:1:1: ERROR: no such file or folder" in err.splitlines()


def test_a_walk_skips_environments_installed_packages_and_build_output(tmp_path, capsys):
    source = _lines(BEFORE)
    _tree(tmp_path, {
        "src/m.py": source,
        "env/pyvenv.cfg": "home = /usr/bin\n", "env/lib/python3.11/site-packages/dep/x.py": source,
        "conda/conda-meta/history": "", "conda/lib/y.py": source,
        "vendor/site-packages/z.py": source, "vendor/dist-packages/z.py": source,
        "build/lib/m.py": source, "dist/m.py": source, "web/node_modules/pkg/gyp.py": source,
        "src/__pycache__/m.py": source,
    })
    assert main([str(tmp_path), "--write"]) == 0
    _, err = capsys.readouterr()
    assert (tmp_path / "src/m.py").read_text() == _lines(AFTER)
    untouched = [p for p in tmp_path.rglob("*.py") if p.read_text() == source]
    assert len(untouched) == 8
    assert _summary(err) == dict(scanned=1, rewritten=1, unchanged=0, refused=0, skipped=7, reasons={
        "build or dist output": 2, "node_modules": 1, "site-packages": 2, "virtual environment": 2})
    # Named on the command line, such a folder is searched (its own skipping rules still apply below).
    assert main([str(tmp_path / "build"), "--write"]) == 0
    assert (tmp_path / "build/lib/m.py").read_text() == _lines(AFTER)


def test_a_walk_follows_no_symbolic_link(tmp_path, capsys):
    outside, tree = tmp_path / "outside", tmp_path / "tree"
    _tree(outside, {"victim.py": _lines(BEFORE), "pkg/deep.py": _lines(BEFORE)})
    _tree(tree, {"m.py": _lines(BEFORE)})
    (tree / "link.py").symlink_to(outside / "victim.py")
    (tree / "linked_pkg").symlink_to(outside / "pkg")
    (tree / "dangling.py").symlink_to(tmp_path / "nothing.py")
    assert main([str(tree), "--write"]) == 0
    _, err = capsys.readouterr()
    assert (outside / "victim.py").read_text() == (outside / "pkg/deep.py").read_text() == _lines(BEFORE)
    assert (tree / "link.py").is_symlink() and (tree / "m.py").read_text() == _lines(AFTER)
    assert _summary(err)["reasons"] == {"symbolic link": 3}


def test_a_tree_deeper_than_the_recursion_limit_is_walked(tmp_path, capsys):
    folders = [tmp_path / "deep"]
    for _ in range(sys.getrecursionlimit() + 100):  # pathlib's and os's makedirs, walk and rmtree recurse
        folders.append(folders[-1] / "d")
    try:
        for folder in folders:
            folder.mkdir()
        (folders[-1] / "m.py").write_text(_lines(BEFORE))
        assert main([str(tmp_path), "--write"]) == 0
        assert (folders[-1] / "m.py").read_text() == _lines(AFTER)
    finally:
        # Removed here, bottom up: pytest's own clean-up of old temporary folders would recurse too deep.
        with contextlib.suppress(FileNotFoundError):
            (folders[-1] / "m.py").unlink()
        for folder in reversed(folders):
            with contextlib.suppress(FileNotFoundError):
                folder.rmdir()


def test_a_file_with_a_long_name_is_rewritten(tmp_path, capsys):
    target = tmp_path / ("n" * 240 + ".py")
    target.write_text(_lines(BEFORE))
    assert main([str(tmp_path), "--write"]) == 0
    assert target.read_text() == _lines(AFTER) and _temporary_files(tmp_path) == []


def test_a_file_reached_twice_is_read_once(tmp_path, capsys):
    (tmp_path / "m.py").write_text(_lines(BEFORE))
    assert main([str(tmp_path / "m.py"), str(tmp_path)]) == 0
    out, err = capsys.readouterr()
    assert out.count("+++ ") == 1 and _summary(err)["scanned"] == 1


def test_a_fifo_named_like_a_python_file_does_not_hang_the_run(tmp_path):
    (tmp_path / "a.py").write_text(_lines(BEFORE))
    os.mkfifo(tmp_path / "x.py")
    os.mkfifo(tmp_path / "y.ipynb")
    try:
        walked = _run(tmp_path, "--write", timeout=60)
        named = _run(tmp_path / "x.py", timeout=60)
    except subprocess.TimeoutExpired as timeout:
        pytest.fail(f"the run hung on a FIFO: {timeout}")
    assert walked.returncode == 0, walked.stderr
    assert (tmp_path / "a.py").read_text() == _lines(AFTER)
    assert _summary(walked.stderr.decode())["reasons"] == {"not a regular file": 2}
    assert named.returncode == 2
    assert named.stderr.decode().splitlines()[0] == (
        f"{tmp_path}/x.py:1:1: ERROR: not a regular file (a FIFO), left alone")


def test_the_summary_counts_scanned_rewritten_unchanged_refused_and_skipped(tmp_path, capsys):
    refusal = "import tensorflow as tf\nx = tf.contrib.legacy_seq2seq.sequence_loss(a, b, c)\n"
    _tree(tmp_path, {"a.py": _lines(BEFORE), "b.py": "x = 1\n", "c.py": refusal,
                     "d.py": _lines(BEFORE) + refusal.split("\n")[1] + "\n", ".e.py": "", "venv/pyvenv.cfg": ""})
    assert main([str(tmp_path)]) == 1
    _, err = capsys.readouterr()
    assert err.splitlines()[-1] == ("tf-seqloss-upgrade: 4 files scanned, 2 would be rewritten, 2 unchanged, "
                                    "2 refused, 2 skipped (1 hidden, 1 virtual environment)")
    assert main([str(tmp_path), "--write"]) == 1
    _, err = capsys.readouterr()
    assert err.splitlines()[-1] == ("tf-seqloss-upgrade: 4 files scanned, 2 rewritten, 2 unchanged, 2 refused, "
                                    "2 skipped (1 hidden, 1 virtual environment)")


# -- hostile input ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("content", [
    b"x = " + b"(" * 5000 + b"1" + b")" * 5000 + b"\n",     # crashed libcst's native parser (a segfault)
    b"x = " + b"[" * 150 + b"]" * 150 + b"\n",               # libcst's RecursionError
    b"x = " + b"+".join([b"a"] * 3000) + b"\n",
    b"import tensorflow as tf\x00\nx = 1\n",
    bytes(range(256)) * 40,
], ids=["deep-parens", "deep-lists", "long-sum", "null-byte", "binary"])
def test_hostile_input_costs_one_error_line_not_the_run(content, tmp_path):
    (tmp_path / "a_hostile.py").write_bytes(content)
    (tmp_path / "b.py").write_text(_lines(BEFORE))
    run = _run(tmp_path, "--write", timeout=120)
    err = run.stderr.decode()
    assert run.returncode == 1, err
    assert (tmp_path / "a_hostile.py").read_bytes() == content
    assert (tmp_path / "b.py").read_text() == _lines(AFTER)
    [error] = _errors(err)
    assert error.startswith(f"{tmp_path}/a_hostile.py:") and "Traceback" not in err


# -- start-up ---------------------------------------------------------------------------------------------

def test_the_command_runs_without_importing_tensorflow(tmp_path):
    target = tmp_path / "m.py"
    target.write_text(_lines(BEFORE))
    code = ("import runpy, sys\n"
            f"sys.argv = ['tf-seqloss-upgrade', {str(target)!r}, '--write']\n"
            "try:\n    runpy.run_module('tf_seqloss_upgrade', run_name='__main__', alter_sys=True)\n"
            "except SystemExit as exit:\n    status = exit.code\n"
            "print(status, sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'keras', 'tf_keras', "
            "'tf_seqloss')))\n")
    run = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True, timeout=120)
    assert run.stdout.splitlines()[-1] == "0 []", run.stdout + run.stderr
    assert target.read_text() == _lines(AFTER)
    assert "oneDNN" not in run.stderr and "absl" not in run.stderr


def test_the_console_script_is_a_module_that_does_not_import_tensorflow():
    config = pyproject()
    module, function = config["project"]["scripts"]["tf-seqloss-upgrade"].split(":")
    # The distribution ships the module's package.
    assert any(fnmatch.fnmatch(module.split(".")[0], pattern)
               for pattern in config["tool"]["setuptools"]["packages"]["find"]["include"])
    code = (f"import sys, {module}; assert callable({module}.{function}); "
            "print([m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'tf_seqloss')])")
    run = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True, timeout=120)
    assert run.stdout.strip() == "[]", run.stderr


def test_tf_seqloss_upgrade_is_tf_seqloss_upgrade_the_package():
    import tf_seqloss.upgrade
    import tf_seqloss_upgrade

    assert tf_seqloss.upgrade.upgrade_source is tf_seqloss_upgrade.upgrade_source
    assert tf_seqloss.upgrade.main is tf_seqloss_upgrade.main


@pytest.mark.keras
def test_importing_tf_seqloss_still_registers_its_keras_classes_eagerly():
    # The README's promise: a `.keras` file reloads with no custom_objects once tf_seqloss is imported.
    code = ("import tf_seqloss\n"
            "from tf_seqloss._keras import keras\n"
            "names = ['tf_seqloss>SequenceLoss', 'tf_seqloss>SequenceLossLayer']\n"
            "print([keras.saving.get_registered_object(n) is not None for n in names])\n")
    run = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True, timeout=300)
    assert run.stdout.strip().splitlines()[-1] == "[True, True]", run.stderr[-2000:]
