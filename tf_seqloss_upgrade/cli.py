"""The `tf-seqloss-upgrade` command line: a diff (or, with `--write`, the files rewritten), a report, a summary.

Usage:

```text
tf-seqloss-upgrade [-h] [--write] [--contrib-version {1.4,1.15}] PATH [PATH ...]
python -m tf_seqloss_upgrade ...      # the same command
```

`PATH` is a Python file, a notebook or a folder searched for both. Without `--write` the command
changes nothing and prints a unified diff on standard output (apply it with `patch -p1`); with `--write`
it rewrites each changed file atomically. It prints a report on standard error, one
`path:line:col: LEVEL: message` line per finding, then a one-line summary, and exits with 0 when nothing
was refused, 1 when something was, and 2 for a bad command line or when it found nothing to look at.
`tf-seqloss-upgrade --help` prints all of this, with examples. Needs the `upgrade` extra
(`pip install "tf_seqloss[upgrade]"`).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import difflib
import io
import sys
from pathlib import PurePath
from typing import Counter, Iterable, List, Optional, Set, Tuple

from tf_seqloss_upgrade._bytes import FileResult, upgrade_python_bytes
from tf_seqloss_upgrade._files import (
    Candidate,
    NotARegularFile,
    Problem,
    Skipped,
    describe,
    read,
    walk,
    write_atomically,
)
from tf_seqloss_upgrade._notebook import upgrade_notebook_bytes
from tf_seqloss_upgrade._rewriter import CONTRIB_VERSIONS, Finding

PROG = "tf-seqloss-upgrade"
EXIT_OK = 0        # nothing refused (files may have been rewritten, or need nothing)
EXIT_REFUSED = 1   # at least one ERROR line: a call left unchanged, a file not read, parsed or written
EXIT_USAGE = 2     # a bad command line, or one that names no Python file or notebook to look at

_DESCRIPTION = """\
Rewrites tf.contrib.seq2seq.sequence_loss, tfa.seq2seq.sequence_loss / SequenceLoss and the TF1
tf.losses softmax cross-entropy family to tf_seqloss, in Python files and in the code cells of Jupyter
notebooks, keeping comments, formatting, line endings and encoding. Without --write it prints a unified
diff on standard output; with it, it replaces each changed file atomically (a failure leaves the file as
it was). Either way it prints a report on standard error, one line per finding:
path:line:col: LEVEL: message (path:cell N:line:col: in a notebook), where LEVEL is INFO (rewritten),
WARNING (rewritten or left, worth a look) or ERROR (refused or failed, left unchanged), then a summary.
Folders are searched for *.py and *.ipynb, skipping hidden entries, virtual environments,
site-packages, node_modules, build/dist output and symbolic links.
Exit status: 0 when nothing was refused, 1 when something was, 2 for a bad command line or when no
Python file or notebook was found."""

_EPILOG = """examples:
  tf-seqloss-upgrade train.py                    print the diff of one file, change nothing
  tf-seqloss-upgrade src/ notebooks/ > up.diff   the diff of every *.py and *.ipynb under two folders
  patch -p1 < up.diff                            apply that diff (it reproduces --write exactly)
  tf-seqloss-upgrade --write src/                rewrite the files in place
  tf-seqloss-upgrade --contrib-version 1.4 old/  code written for TensorFlow 1.4 to 1.13
  python -m tf_seqloss_upgrade --write src/      the same command, without the console script

What is rewritten, with its imports: tf.contrib.seq2seq.sequence_loss to tf_seqloss.sequence_loss;
tfa.seq2seq.sequence_loss and tfa.seq2seq.SequenceLoss to tf_seqloss.compat.tfa (TFA 0.23's semantics);
tf.losses / tf.compat.v1.losses softmax_cross_entropy, sparse_softmax_cross_entropy,
compute_weighted_loss and Reduction to tf_seqloss's TF1 family. A call that cannot be translated exactly
(e.g. contrib.legacy_seq2seq.sequence_loss, which takes lists of per-step tensors) is left unchanged with
an ERROR line saying why.
Needs the upgrade extra: pip install "tf_seqloss[upgrade]"."""


@dataclasses.dataclass
class _Tally:
    scanned: int = 0
    rewritten: int = 0
    unchanged: int = 0
    refused: int = 0     # files with an ERROR line; each is also counted as rewritten or unchanged
    errors: int = 0      # ERROR lines of any kind, paths that are not files included
    skipped: Counter[str] = dataclasses.field(default_factory=collections.Counter)


def main(argv: Optional[List[str]] = None) -> int:
    """Runs the command on `argv` (default `sys.argv[1:]`) and returns its exit status.

    Args:
        argv: the command-line arguments, without the program name; `None` reads `sys.argv[1:]`.

    Returns:
        The exit status: `EXIT_OK` (0) when nothing was refused, `EXIT_REFUSED` (1) when a call was left
            unchanged or a file could not be read, parsed or written, `EXIT_USAGE` (2) when no Python
            file or notebook was found.

    Raises:
        SystemExit: for `--help` (status 0) and a bad command line (status 2), as `argparse` does.

    Example:

    >>> import pathlib, tempfile
    >>> from tf_seqloss_upgrade import main
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "model.py"
    >>> _ = path.write_text("import tensorflow_addons as tfa\\n"
    ...                     "loss = tfa.seq2seq.sequence_loss(logits, targets, weights)\\n")
    >>> main([str(path)])   # the diff on standard output; the report and summary go to standard error
    --- a/.../model.py
    +++ b/.../model.py
    @@ -1,2 +1,3 @@
    -import tensorflow_addons as tfa
    -loss = tfa.seq2seq.sequence_loss(logits, targets, weights)
    +import tf_seqloss.compat.tfa
    +
    +loss = tf_seqloss.compat.tfa.sequence_loss(logits, targets, weights)
    0
    >>> import shutil; shutil.rmtree(path.parent)
    """
    parser = argparse.ArgumentParser(prog=PROG, description=_DESCRIPTION, epilog=_EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="+", metavar="PATH",
                        help="Python files and notebooks, or folders to search for *.py and *.ipynb")
    parser.add_argument("--write", action="store_true", help="rewrite the files in place instead of printing a diff")
    parser.add_argument("--contrib-version", choices=CONTRIB_VERSIONS, default="1.15",
                        help="the contrib release the code was written for: 1.4 covers 1.4 to 1.13 (their "
                             "positional order, and epsilon=1e-12 to keep their numbers); 1.15 covers 1.14 "
                             "and later (default)")
    args = parser.parse_args(argv)

    tally = _Tally()
    seen: Set[Tuple[int, int]] = set()
    for item in walk(args.paths):
        if isinstance(item, Skipped):
            tally.skipped[item.reason] += 1
        elif isinstance(item, Problem):
            _report([Finding(item.path, 1, 1, "ERROR", item.message)])
            tally.errors += 1
        else:
            _process(item, args.write, args.contrib_version, tally, seen)
    if tally.scanned == 0:
        print(f"{PROG}: no Python files or notebooks found under {' '.join(args.paths)}", file=sys.stderr)
    print(_summary(tally, args.write), file=sys.stderr)
    if tally.scanned == 0:
        return EXIT_USAGE
    return EXIT_REFUSED if tally.errors else EXIT_OK


def _process(candidate: Candidate, write: bool, contrib_version: str, tally: _Tally,
             seen: Set[Tuple[int, int]]) -> None:
    path = candidate.path
    try:
        data, info = read(candidate)
    except NotARegularFile as err:
        tally.skipped["not a regular file"] += 1
        _report([Finding(path, 1, 1, "ERROR", str(err))])
        tally.errors += 1
        return
    except OSError as err:
        _report([Finding(path, 1, 1, "ERROR", f"cannot read this file, left unchanged: {describe(err)}")])
        tally.scanned += 1
        tally.unchanged += 1
        tally.refused += 1
        tally.errors += 1
        return
    if (info.st_dev, info.st_ino) in seen:  # named twice, or named and found in a named folder
        return
    seen.add((info.st_dev, info.st_ino))
    upgrade = upgrade_notebook_bytes if path.lower().endswith(".ipynb") else upgrade_python_bytes
    try:
        result = upgrade(data, path, contrib_version)
    except Exception as err:  # A bug must cost one file, not the run (and never the file).
        result = FileResult(data, [Finding(path, 1, 1, "ERROR", f"left unchanged: the rewriter failed on this file "
                                                                f"({type(err).__name__}: {err}); please report it")])
    if result.skipped:
        tally.skipped[result.skipped] += 1
        return
    tally.scanned += 1
    findings = list(result.findings)
    changed = result.data != data
    if changed and write:
        try:
            write_atomically(path, result.data, info)
        except OSError as err:
            findings.insert(0, Finding(path, 1, 1, "ERROR", "cannot write this file, so none of the changes below "
                                                            f"were made; it is unchanged: {describe(err)}"))
            changed = False
        else:
            if info.st_nlink > 1:
                findings.append(Finding(path, 1, 1, "WARNING", f"it had {info.st_nlink} hard links: it is now a new "
                                                               "file, and its other names still show the old text"))
    elif changed:
        _print_diff(path, data, result.data)
    _report(findings)
    errors = sum(finding.level == "ERROR" for finding in findings)
    tally.errors += errors
    tally.refused += bool(errors)
    if changed:
        tally.rewritten += 1
    else:
        tally.unchanged += 1


def _report(findings: Iterable[Finding]) -> None:
    for finding in findings:
        print(finding, file=sys.stderr)


def _summary(tally: _Tally, write: bool) -> str:
    skipped = sum(tally.skipped.values())
    text = (f"{PROG}: {tally.scanned} file{'' if tally.scanned == 1 else 's'} scanned, {tally.rewritten} "
            f"{'rewritten' if write else 'would be rewritten'}, {tally.unchanged} unchanged, {tally.refused} "
            f"refused, {skipped} skipped")
    if skipped:
        text += " (" + ", ".join(f"{count} {reason}" for reason, count in sorted(tally.skipped.items())) + ")"
    return text


def _print_diff(path: str, before: bytes, after: bytes) -> None:
    """Prints a unified diff of the file's bytes: its line ends, BOM and encoding as they are.

    Lines end at `\\n`, as for `diff`, `git diff` and `patch` (a `\\r` before it, or alone, is part of the
    line), so the diff applies with `patch -p1` and reproduces `--write` exactly.
    """
    name = PurePath(path).as_posix().lstrip("/").encode("utf-8", "surrogateescape")
    out = []
    for line in difflib.diff_bytes(difflib.unified_diff, io.BytesIO(before).readlines(), io.BytesIO(after).readlines(),
                                   b"a/" + name, b"b/" + name):
        out.append(line)
        if not line.endswith(b"\n"):
            out.append(b"\n\\ No newline at end of file\n")
    sys.stdout.flush()
    buffer = getattr(sys.stdout, "buffer", None)
    if buffer is not None:
        buffer.write(b"".join(out))
        buffer.flush()
    else:  # a stream without bytes underneath (a test's StringIO)
        sys.stdout.write(b"".join(out).decode("utf-8", "replace"))
