"""How the example writes its files: each replaced in one step, and the leftovers of an interrupted run removed.

`write_atomically(path, content)` writes a temporary file beside `path`, syncs it to disk and renames it
over `path`, so that a run killed at any moment leaves either the previous file or the complete new one,
never an empty or cut one; `replace_folder` does the same for a folder (the SavedModel export). A failure
(read-only folder, full disk) raises `RunFileError` with a one-line message and leaves `path` as it was.

`remove_leftovers` removes, on the next start, what a killed run leaves behind: the temporary copies of
those writes, and the `ckpt-N_temp/` folder of an interrupted `tf.train.CheckpointManager` save. It
recognises each by its exact name and contents, and touches nothing else.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Callable, List, Sequence, Union


class RunFileError(RuntimeError):
    """A file of the run could not be written; the version there before is unchanged."""


class RunStateWarning(UserWarning):
    """A file of the run directory was found damaged, missing or out of place, and is rebuilt or left alone."""


def _file_mode() -> int:
    """Returns the mode a new file gets under the process umask (`mkstemp` would give 0o600)."""
    try:  # Linux reports the umask without setting it (which would race with other threads' files)
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


def _fsync_folder(folder) -> None:
    """Makes a rename in `folder` durable, where the system lets a folder be opened (not on Windows)."""
    try:
        descriptor = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def _fsync_file(path) -> None:
    descriptor = os.open(path, os.O_RDWR)  # writable: Windows syncs only what it may write
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _cannot_write(path: Path, error: OSError) -> RunFileError:
    reason = error.strerror or str(error) or type(error).__name__
    return RunFileError(f"Could not write {path}: {reason}. The previous version, if any, is unchanged.")


def temp_pattern(name: str, kind: str = "partial") -> "re.Pattern[str]":
    """Returns the pattern of the names that `write_atomically` (`kind="partial"`) and `replace_folder`
    (`"partial"`, `"old"`) give their temporary copies of `name`: `.<name>.<8 characters>.<kind>`, and for
    a file `name`'s extension after it. `tempfile` draws the 8 characters."""
    suffix = Path(name).suffix if kind == "partial" else ""
    return re.compile(rf"\.{re.escape(name)}\.[a-z0-9_]{{8}}\.{kind}{re.escape(suffix)}")


def write_atomically(path, content: Union[str, bytes, Callable[[Path], None]]) -> Path:
    """Replaces the file `path` with `content` in one step: a reader, or a run killed at any moment, finds
    either the previous file or the complete new one.

    The new file is written to a temporary file in the same folder, flushed and synced to disk, given the
    previous file's mode (a new file gets the umask's), renamed over `path` (`os.replace`, atomic on POSIX
    and Windows), and the folder is synced where the system allows. The temporary file keeps `path`'s
    extension (Keras and Matplotlib choose the format by it) and is removed on failure; one left by a
    killed process is removed by the next run (`remove_leftovers`).

    Args:
        path: the file to replace or create.
        content: `str` (written as UTF-8), `bytes`, or a callable `write(temporary_path)` that writes the
            file itself (`figure.savefig`, `model.save`).

    Returns:
        `path`, as a `Path`.

    Raises:
        RunFileError: the file could not be written (read-only folder, full disk...); `path` is unchanged.
    """
    path = Path(path)
    try:
        mode = path.stat().st_mode & 0o7777 if path.exists() else _file_mode()
        descriptor, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".partial{path.suffix}",
                                            dir=path.parent)
    except OSError as error:
        raise _cannot_write(path, error) from None
    temp = Path(temp)
    try:
        if callable(content):
            os.close(descriptor)
            descriptor = -1
            content(temp)
            _fsync_file(temp)
        else:
            with os.fdopen(descriptor, "wb") as file:
                descriptor = -1  # the file object closes it
                file.write(content.encode("utf-8") if isinstance(content, str) else content)
                file.flush()
                os.fsync(file.fileno())
        os.chmod(temp, mode)
        os.replace(temp, path)
    except BaseException as error:
        if descriptor >= 0:
            os.close(descriptor)
        with contextlib.suppress(OSError):
            temp.unlink()
        if isinstance(error, OSError):
            raise _cannot_write(path, error) from None
        raise
    _fsync_folder(path.parent)
    return path


def replace_folder(path, write: Callable[[Path], None]) -> Path:
    """`write_atomically` for a folder: `write(temporary_folder)` fills a new folder beside `path`, whose
    files are synced to disk; it then takes `path`'s place. The previous folder is renamed aside first and
    removed last: a run killed between the two renames leaves it as `.<name>.<8 characters>.old`, which
    `remove_leftovers` moves back.

    Returns:
        `path`, as a `Path`.

    Raises:
        RunFileError: the folder could not be written; `path` is unchanged.
    """
    path = Path(path)
    try:
        temp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent))
    except OSError as error:
        raise _cannot_write(path, error) from None
    old = None
    try:
        write(temp)
        for folder, _, files in os.walk(temp):
            for name in files:
                _fsync_file(os.path.join(folder, name))
            _fsync_folder(folder)
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.rmdir(old)  # only its unused name is wanted
            os.rename(path, old)
        os.rename(temp, path)
    except BaseException as error:
        if old is not None and old.exists() and not path.exists():
            with contextlib.suppress(OSError):
                os.rename(old, path)
                old = None
        shutil.rmtree(temp, ignore_errors=True)
        if isinstance(error, OSError):
            raise _cannot_write(path, error) from None
        raise
    _fsync_folder(path.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return path


# What `tf.train.CheckpointManager` leaves when a save is killed: the shards written to `ckpt-N_temp/` are
# merged into `ckpt-N.index` and `ckpt-N.data-*`, and the folder removed, only at the end of the save
# (TensorFlow's functional_saver.py: "an outdated and orphaned temporary directory can be safely removed");
# the `checkpoint` file is rewritten through `checkpoint.tmp<uuid4 hex>`.
CHECKPOINT_TEMP_FOLDER = re.compile(r"ckpt-\d+_temp")
_CHECKPOINT_SHARD = re.compile(r"part-\d+-of-\d+\.(index|data-\d+-of-\d+)(\.tempstate\d+)?")
_CHECKPOINT_STATE_TEMP = re.compile(r"checkpoint\.tmp[0-9a-f]{32}")


def _is_real(path: Path, folder: bool) -> bool:
    return not path.is_symlink() and (path.is_dir() if folder else path.is_file())


def _holds_only_shards(folder: Path) -> bool:
    return all(_is_real(entry, False) and _CHECKPOINT_SHARD.fullmatch(entry.name) for entry in folder.iterdir())


def remove_leftovers(checkpoints: Path, files: Sequence[Path] = (), folders: Sequence[Path] = (),
                     log: Callable[[str], None] = print) -> List[Path]:
    """Removes what an interrupted run left behind, logging one line for each; returns what it removed.

    Only these are touched, each recognised by its exact name, and never through a symbolic link:

    - in `checkpoints`, `ckpt-N_temp/` folders holding nothing but checkpoint shards
      (`part-00000-of-00001.index`...), and `checkpoint.tmp<32 hex digits>` files. A `ckpt-N_temp` that
      holds anything else is left alone, with a `RunStateWarning`;
    - beside each of `files`, the temporary copies `write_atomically` makes of it;
    - beside each of `folders`, the temporary folders of `replace_folder`; its `.old` folder (the previous
      version) is removed if the folder is in place, and otherwise moved back to it.

    Raises:
        RunFileError: a leftover could not be removed.
    """
    removed: List[Path] = []

    def remove(path: Path, what: str) -> None:
        try:
            if _is_real(path, True):
                shutil.rmtree(path)
            else:
                path.unlink()
        except OSError as error:
            raise RunFileError(f"Could not remove {path} ({what}): {error.strerror or error}.") from None
        removed.append(path)
        log(f"removed {path}: {what}")

    if checkpoints.is_dir():
        for entry in sorted(checkpoints.iterdir()):
            if CHECKPOINT_TEMP_FOLDER.fullmatch(entry.name) and _is_real(entry, True):
                if _holds_only_shards(entry):
                    remove(entry, "left by a checkpoint save that was interrupted")
                else:
                    warnings.warn(f"{entry} is named like the temporary folder of a checkpoint save but holds "
                                  "other files; it is left as it is.", RunStateWarning, stacklevel=2)
            elif _CHECKPOINT_STATE_TEMP.fullmatch(entry.name) and _is_real(entry, False):
                remove(entry, "left by a checkpoint save that was interrupted")
    for target in files:
        if target.parent.is_dir():
            pattern = temp_pattern(target.name)
            for entry in sorted(target.parent.iterdir()):
                if pattern.fullmatch(entry.name) and _is_real(entry, False):
                    remove(entry, f"a partial copy of {target.name} left by an interrupted write")
    for target in folders:
        if target.parent.is_dir():
            partial, old = temp_pattern(target.name), temp_pattern(target.name, "old")
            for entry in sorted(target.parent.iterdir()):
                if partial.fullmatch(entry.name) and _is_real(entry, True):
                    remove(entry, f"a partial copy of {target.name} left by an interrupted write")
                elif old.fullmatch(entry.name) and _is_real(entry, True):
                    if target.exists() or target.is_symlink():
                        remove(entry, f"the previous {target.name}, left by an interrupted write")
                    else:
                        try:
                            os.rename(entry, target)
                        except OSError as error:
                            raise RunFileError(f"Could not move {entry} back to {target}: "
                                               f"{error.strerror or error}.") from None
                        log(f"moved {entry} back to {target}: a write was interrupted as it replaced it")
    return removed


__all__ = ["RunFileError", "RunStateWarning", "remove_leftovers", "replace_folder", "temp_pattern",
           "write_atomically"]
