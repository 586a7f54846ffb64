"""Which files the command looks at, how it reads them, and how it writes them without ever losing one.

A folder walk enters neither hidden entries, virtual environments, installed packages nor build output,
and follows no symbolic link; only the paths typed on the command line are taken as they are (a hidden
folder, a symbolic link, `..` parts). Reading never blocks: a FIFO named `x.py` is reported, not opened
for a read that would wait forever. Writing goes through a temporary file in the same folder, synced to
disk, then renamed over the original: at every instant the file is either all old or all new.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import stat
import tempfile
from typing import Iterator, List, Sequence, Tuple, Union

SUFFIXES = (".py", ".ipynb")
# Folders a walk does not enter, by name, with the reason the summary gives. `__pycache__` holds no
# sources, so it is not worth a word in the summary.
_FOLDERS = {
    "site-packages": "site-packages", "dist-packages": "site-packages", "node_modules": "node_modules",
    "build": "build or dist output", "dist": "build or dist output", "__pycache__": None,
}
# A folder holding one of these is a virtual environment (venv, virtualenv) or a conda environment.
_ENVIRONMENT_MARKERS = ("pyvenv.cfg", "conda-meta")
TEMPORARY_SUFFIX = ".tf-seqloss-upgrade.tmp"
_CHUNK = 1 << 20


@dataclasses.dataclass(frozen=True)
class Candidate:
    """A file to read. `named`: typed on the command line, so a symbolic link to it is followed."""

    path: str
    named: bool


@dataclasses.dataclass(frozen=True)
class Skipped:
    """An entry a walk left alone, with the reason counted in the summary."""

    path: str
    reason: str


@dataclasses.dataclass(frozen=True)
class Problem:
    """A path that could not be looked at: a named path that does not exist, a folder that cannot be listed."""

    path: str
    message: str


def walk(paths: Sequence[str]) -> Iterator[Union[Candidate, Skipped, Problem]]:
    """Yields, in a stable order, the files under `paths` to read, and what was skipped.

    Args:
        paths: files and folders as typed. A named file is read whatever its name; a named folder is
            searched for `*.py` and `*.ipynb`. The skipping rules apply only below a named folder.
    """
    for name in paths:
        try:
            info = os.stat(name)  # follows a symbolic link: this one was named
        except FileNotFoundError:
            yield Problem(name, "no such file or folder" if not os.path.islink(name)
                          else "a symbolic link to nothing (its target does not exist)")
            continue
        except OSError as err:
            yield Problem(name, f"cannot look at this path: {describe(err)}")
            continue
        if stat.S_ISDIR(info.st_mode):
            yield from _walk_folder(name)
        else:
            yield Candidate(name, named=True)


def _walk_folder(root: str) -> Iterator[Union[Candidate, Skipped, Problem]]:
    # Depth first, in name order, with a stack of its own: a tree nested deeper than Python's recursion
    # limit is walked like any other.
    stack = [_listing(root)]
    while stack:
        try:
            folder, entry = next(stack[-1])
        except StopIteration:
            stack.pop()
            continue
        if isinstance(entry, Problem):
            yield entry
            continue
        path = os.path.join(folder, entry.name) if folder not in (".", "") else entry.name
        wanted = entry.name.endswith(SUFFIXES)
        try:
            is_link = entry.is_symlink()
            is_folder = not is_link and entry.is_dir(follow_symlinks=False)
            is_file = not is_link and entry.is_file(follow_symlinks=False)
        except OSError as err:
            yield Problem(path, f"cannot look at this path: {describe(err)}")
            continue
        if entry.name.startswith("."):
            if is_folder or wanted:
                yield Skipped(path, "hidden")
        elif is_link:
            # Its target may lie outside the tree, or be reached again through its real path.
            if wanted or os.path.isdir(path):
                yield Skipped(path, "symbolic link")
        elif is_folder:
            reason = _folder_reason(path, entry.name)
            if reason is None:
                stack.append(_listing(path))
            elif reason:
                yield Skipped(path, reason)
        elif wanted:
            yield Candidate(path, named=False) if is_file else Skipped(path, "not a regular file")


def _listing(folder: str) -> Iterator[Tuple[str, Union[os.DirEntry, Problem]]]:
    try:
        with os.scandir(folder) as listing:
            entries = sorted(listing, key=lambda entry: entry.name)
    except OSError as err:
        yield folder, Problem(folder, f"cannot list this folder: {describe(err)}")
        return
    for entry in entries:
        yield folder, entry


def _folder_reason(path: str, name: str) -> Union[str, None]:
    """Why a walk does not enter this folder ("" to say nothing), or None to enter it."""
    if name in _FOLDERS:
        return _FOLDERS[name] or ""
    if any(os.path.lexists(os.path.join(path, marker)) for marker in _ENVIRONMENT_MARKERS):
        return "virtual environment"
    return None


class NotARegularFile(OSError):
    """The path is a FIFO, a device, a socket or a folder: there is nothing to rewrite in place."""


def read(candidate: Candidate) -> Tuple[bytes, os.stat_result]:
    """Returns the file's bytes and its status, read without ever blocking.

    Raises:
        NotARegularFile: the path is not a regular file.
        OSError: it cannot be opened or read.
    """
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    if not candidate.named:
        # The walk saw a regular file; if a symbolic link took its place since, do not follow it.
        flags |= getattr(os, "O_NOFOLLOW", 0)
    descriptor = os.open(candidate.path, flags)
    try:
        info = os.fstat(descriptor)
        if not stat.S_ISREG(info.st_mode):
            raise NotARegularFile(f"not a regular file ({_kind(info.st_mode)}), left alone")
        chunks: List[bytes] = []
        while True:
            chunk = os.read(descriptor, _CHUNK)
            if not chunk:
                return b"".join(chunks), info
            chunks.append(chunk)
    finally:
        os.close(descriptor)


def _kind(mode: int) -> str:
    for test, kind in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return kind
    return "not a file"


class ChangedOnDisk(OSError):
    """The file changed between the read and the write: writing would lose someone else's change."""


def write_atomically(path: str, data: bytes, original: os.stat_result) -> None:
    """Replaces the file at `path` (a symbolic link's target, if it is one) with `data`, all or nothing.

    The bytes go to a temporary file in the same folder (so that the rename cannot cross file systems),
    which is flushed and synced to disk and given the original's mode (and owner, where allowed) before
    `os.replace` puts it in place in one step. Whatever fails (a read-only folder, a full disk, an
    interruption), the original is left as it was and the temporary file is removed; only a process killed
    outright can leave a `.NAME.*.tf-seqloss-upgrade.tmp` file behind, next to an intact original.

    Args:
        path: the file to replace.
        data: its new bytes.
        original: its status when it was read, to keep its mode and to notice a change since.

    Raises:
        OSError: the file was not replaced (and is unchanged). `ChangedOnDisk` if it changed since it
            was read.
    """
    target = os.path.realpath(path)
    folder, name = os.path.split(target)
    # Hidden, so that a folder walk passes over a leftover; the name cut so that the whole stays within
    # the usual 255-byte limit.
    descriptor, temporary = tempfile.mkstemp(prefix=f".{name[:150]}.", suffix=TEMPORARY_SUFFIX, dir=folder)
    try:
        try:
            _write_all(descriptor, data)
            _keep_mode_and_owner(descriptor, temporary, original)
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
        now = os.stat(target)
        if (now.st_dev, now.st_ino, now.st_size, now.st_mtime_ns) != (
                original.st_dev, original.st_ino, original.st_size, original.st_mtime_ns):
            raise ChangedOnDisk("it changed on disk while it was being rewritten; run the command again")
        os.replace(temporary, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    _sync_folder(folder)


def _write_all(descriptor: int, data: bytes) -> None:
    """Writes all of `data`, in chunks (`os.write` may write less than it is given)."""
    view = memoryview(data)
    while view:
        written = os.write(descriptor, view[:_CHUNK])
        view = view[written:]


def _keep_mode_and_owner(descriptor: int, temporary: str, original: os.stat_result) -> None:
    # The owner first: changing it clears set-user-ID and set-group-ID bits, which the mode then restores.
    if hasattr(os, "fchown"):
        # Only root may give a file away; for anyone else the new file is their own, as any file they
        # create in that folder would be.
        with contextlib.suppress(PermissionError):
            os.fchown(descriptor, original.st_uid, original.st_gid)
    mode = stat.S_IMODE(original.st_mode)
    if hasattr(os, "fchmod"):
        os.fchmod(descriptor, mode)
    else:  # Windows before Python 3.13
        os.chmod(temporary, mode)


def _sync_folder(folder: str) -> None:
    """Makes the rename itself durable; not every system can open a folder, so a failure is not an error."""
    with contextlib.suppress(OSError, AttributeError):
        descriptor = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


def describe(err: OSError) -> str:
    """`Permission denied (EACCES)`: the system's words and the errno name, without the repeated path."""
    name = errno.errorcode.get(err.errno) if err.errno is not None else None
    text = err.strerror or str(err)
    return f"{text} ({name})" if name else text

