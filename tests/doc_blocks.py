"""Finds the fenced code blocks of a Markdown file and checks each by the one rule that matches it.

Shared by tests/test_readme.py (README.md) and tests/test_docs.py (docs/**/*.md, examples/seq2seq/README.md),
so that no code block in the documentation can drift from the code. The convention, by fence info string:

- ```` ```python ```` (no title): runs, in a fresh namespace, from the repository root.
- ```` ```python title="NAME (before)" ```` (TF1 or TensorFlow Addons code, which cannot run on TensorFlow 2)
  must be followed by ```` ```python title="NAME (after)" ````: what `tf_seqloss_upgrade.upgrade_source`
  makes of the "before" block, byte for byte. The "after" block then runs like any python block.
- ```` ```python title="path/in/the/repository.py" ````: an excerpt of that file; its lines appear there in
  the same order (lines of the file may be left out between them, e.g. a docstring).
- ```` ```bash ````: every command names something that exists: `bash scripts/X.sh` an existing script (and,
  for scripts/example.sh, options the example's parser accepts), `pip install` the package or one of its
  extras, `tf-seqloss-upgrade` / `python -m tf_seqloss_upgrade` options its `--help` lists, `python
  benchmarks/X.py` an existing file, `mkdocs serve|build` this repository's mkdocs.yml. `VAR=value`
  prefixes and `# comments` are allowed.
- ```` ```text title="$ COMMAND --help" ````: the command's `--help` output, as it prints it 100 columns wide.
- Any block preceded by the line `<!-- doc-test: checked by tests/FILE.py::TEST -->`: that test, which
  must exist, checks it (e.g. the rewriter's diff of a corpus file).

A block that matches no rule fails, so a new kind of block needs a rule here first.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import io
import os
import re
import shlex
from pathlib import Path
from typing import List, Optional

ROOT = Path(__file__).resolve().parents[1]

_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,})(?P<info>[^`\n]*)\n(?P<body>.*?)^[ \t]*(?P=fence)[ \t]*$",
                    re.M | re.S)
_CHECKED_BY = re.compile(r"<!-- doc-test: checked by (tests/\w+\.py)::(\w+) -->\s*$")
# Blocks that touch Keras run under both flavours; the others once (see FLAVOUR_FREE_FILES in conftest).
_KERAS = re.compile(r"keras|SequenceLoss\b|SequenceLossLayer|SequenceMask|FusedLinearHead|Token(Perplexity|Accuracy)"
                    r"|examples\.seq2seq")


@dataclasses.dataclass
class Block:
    path: Path
    line: int             # 1-based line of the opening fence
    lang: str
    title: Optional[str]
    body: str
    checked_by: Optional[str]  # "tests/FILE.py::TEST" from a doc-test comment just above the fence

    @property
    def id(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"

    @property
    def uses_keras(self) -> bool:
        return bool(_KERAS.search(self.body))


def blocks(path: Path) -> List[Block]:
    """Returns the fenced code blocks of the Markdown file `path`, in order (indented ones dedented)."""
    text = path.read_text(encoding="utf-8")
    found = []
    for match in _FENCE.finditer(text):
        indent = match.group("indent")
        body = "".join(line[len(indent):] if line.startswith(indent) else line
                       for line in match.group("body").splitlines(keepends=True))
        info = match.group("info").strip()
        lang, _, rest = info.partition(" ")
        title = re.search(r'title="([^"]*)"', rest)
        if rest and not title:
            raise AssertionError(f"{path}: fence `{info}` has options other than title=\"...\"")
        line = text.count("\n", 0, match.start()) + 1
        previous = text[:match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        checked_by = _CHECKED_BY.search(previous)
        found.append(Block(path, line, lang, title and title.group(1), body,
                           checked_by and f"{checked_by.group(1)}::{checked_by.group(2)}"))
    return found


def check(block: Block, siblings: List[Block]) -> None:
    """Checks `block` (one of `siblings`, the blocks of its file) by its rule; fails if no rule matches."""
    if block.checked_by:
        test_file, test_name = block.checked_by.split("::")
        source = (ROOT / test_file).read_text()
        assert re.search(rf"^def {test_name}\(", source, re.M), f"{block.id}: {block.checked_by} does not exist"
    elif block.lang == "python" and block.title is None:
        _run_python(block)
    elif block.lang == "python" and block.title.endswith("(before)"):
        _check_rewrite(block, siblings)
    elif block.lang == "python" and block.title.endswith("(after)"):
        index = siblings.index(block)
        before = siblings[index - 1] if index else None
        assert before is not None and before.title == block.title.replace("(after)", "(before)"), (
            f"{block.id}: an (after) block must follow its (before) block")
        _run_python(block)
    elif block.lang == "python" and (ROOT / block.title).is_file():
        _check_excerpt(block, ROOT / block.title)
    elif block.lang == "bash" and block.title is None:
        for command in _commands(block.body):
            _check_command(block, command)
    elif block.lang == "text" and block.title and block.title.startswith("$ ") and block.title.endswith(" --help"):
        assert block.body == _help_text(block.title[2:-len(" --help")]), f"{block.id}: the --help text has changed"
    else:
        raise AssertionError(f"{block.id}: no rule checks a ```{block.lang} block titled {block.title!r} "
                             "(see tests/doc_blocks.py for the rules)")


def _run_python(block: Block) -> None:
    with _cwd(ROOT):
        exec(compile(block.body, block.id, "exec"), {"__name__": "__doc_block__"})


def _check_rewrite(block: Block, siblings: List[Block]) -> None:
    from tf_seqloss_upgrade import upgrade_source

    index = siblings.index(block)
    after = siblings[index + 1] if index + 1 < len(siblings) else None
    expected_title = block.title.replace("(before)", "(after)")
    assert after is not None and after.title == expected_title, f"{block.id}: no ```python title=\"{expected_title}\""
    result = upgrade_source(block.body, path="before.py")
    assert not [finding for finding in result.findings if finding.level == "ERROR"], result.findings
    assert result.code == after.body, f"{block.id}: the rewriter now gives\n{result.code}"


def _check_excerpt(block: Block, source: Path) -> None:
    lines = source.read_text().splitlines()
    position = 0
    for wanted in block.body.splitlines():
        if not wanted.strip():
            continue
        try:
            position = lines.index(wanted, position) + 1
        except ValueError:
            raise AssertionError(f"{block.id}: `{wanted.strip()}` is not in {block.title} (in this order)") from None


def _commands(body: str) -> List[List[str]]:
    commands = []
    for line in body.splitlines():
        words = shlex.split(line, comments=True)
        while words and re.match(r"^[A-Z_][A-Z0-9_]*=", words[0]):
            words = words[1:]
        if words:
            commands.append(words)
    return commands


def _check_command(block: Block, words: List[str]) -> None:
    where = f"{block.id}: `{' '.join(words)}`"
    if words[:1] == ["bash"]:
        assert (ROOT / words[1]).is_file() and words[1].startswith("scripts/"), f"{where}: no such script"
        if words[1] == "scripts/example.sh":
            from examples.seq2seq.train import make_parser

            with contextlib.redirect_stdout(io.StringIO()):
                try:
                    make_parser().parse_args(words[2:])
                except SystemExit as exit:
                    assert exit.code == 0, f"{where}: the example refuses these options"
    elif words[:2] == ["pip", "install"]:
        for spec in words[2:]:
            match = re.fullmatch(r"(\.|tf_seqloss)(?:\[([\w-]+)\])?", spec)
            assert match, f"{where}: installs something other than this package"
            assert match.group(2) is None or match.group(2) in _extras(), f"{where}: no extra {match.group(2)}"
    elif words[0] == "tf-seqloss-upgrade" or words[:3] == ["python", "-m", "tf_seqloss_upgrade"]:
        options = _help_text("tf-seqloss-upgrade")
        for word in words:
            if word.startswith("--"):
                assert re.search(rf"(?<![\w-]){re.escape(word)}(?![\w-])", options), f"{where}: no option {word}"
    elif words[:1] == ["python"] and words[1:2] != ["-m"]:
        assert (ROOT / words[1]).is_file(), f"{where}: no such file"
    elif words[:2] == ["python", "-m"]:
        assert importlib.util.find_spec(words[2]) is not None, f"{where}: no module {words[2]}"
    elif words[:1] == ["mkdocs"]:
        assert words[1] in ("serve", "build") and (ROOT / "mkdocs.yml").is_file(), where
    else:
        raise AssertionError(f"{where}: no rule checks this command (see tests/doc_blocks.py)")


def _extras() -> set:
    """The package's extras, from pyproject.toml's [project.optional-dependencies]."""
    from tests._pyproject import pyproject

    return set(pyproject()["project"].get("optional-dependencies", {}))


def _help_text(command: str) -> str:
    """Returns `command --help` as printed 100 columns wide (argparse reads COLUMNS)."""
    assert command == "tf-seqloss-upgrade", f"no rule runs `{command} --help`"
    from tf_seqloss_upgrade import main

    out = io.StringIO()
    saved = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "100"
    try:
        with contextlib.redirect_stdout(out):
            try:
                main(["--help"])
            except SystemExit as exit:
                assert exit.code == 0
    finally:
        if saved is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = saved
    # Python 3.9's argparse says "optional arguments:", 3.10 and later "options:".
    return out.getvalue().replace("\noptional arguments:\n", "\noptions:\n")


@contextlib.contextmanager
def _cwd(path: Path):
    previous = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(previous)
