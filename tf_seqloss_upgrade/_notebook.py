"""Jupyter notebooks: the code cells rewritten as one program; everything else kept byte for byte.

The code cells are joined, in order, into one module (so that `import tensorflow as tf` in the first cell
resolves `tf.contrib...` in the tenth, and an import is only dropped when no cell uses it), rewritten, and
split back. Only the `source` values of the cells that changed are replaced in the file's own JSON text,
written the way that text writes them (a string or a list of lines, its indent, its line ends, escaped or
raw non-ASCII); metadata, outputs and every other cell keep their bytes. The result is parsed again and
checked to differ from the original in those sources only.

IPython syntax: a cell that starts with a cell magic (`%%time`, `%%bash`, ...) is left alone; when its
body is Python that the tool would change, a WARNING says so. Line magics, shell escapes and help
(`%matplotlib inline`, `!pip install ...`, `files = !ls`, `obj?`) are masked with placeholder names
while the cell is parsed and put back verbatim; they are never rewritten.
"""

from __future__ import annotations

import bisect
import codecs
import copy
import dataclasses
import json
import keyword
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

from tf_seqloss_upgrade._bytes import FileResult
from tf_seqloss_upgrade._rewriter import KEEP_NAMES, Finding, _upgrade_text, python_syntax_error, split_lines

_PREFIX = "__tf_seqloss_upgrade_"  # no cell may contain it: the placeholders and cell markers use it
_DECODER = json.JSONDecoder()
_WHITESPACE = " \t\n\r"


@dataclasses.dataclass
class _Cell:
    index: int                 # position in the notebook's `cells`, 0-based
    text: str                  # the code as parsed: the stored source, magics masked
    original: str              # the stored source
    first_line: int = 1        # the cell line of `text`'s first line (2 for the body of a cell magic)
    masks: Dict[str, str] = dataclasses.field(default_factory=dict)  # placeholder statement -> original line


def upgrade_notebook_bytes(data: bytes, path: str, contrib_version: str) -> FileResult:
    """Rewrites the code cells of one `.ipynb` file given as bytes; see the module docstring."""
    bom = codecs.BOM_UTF8 if data.startswith(codecs.BOM_UTF8) else b""
    try:
        text = data[len(bom):].decode("utf-8")
    except UnicodeDecodeError as err:
        return _refuse(data, path, f"not a notebook: not UTF-8 (byte 0x{data[len(bom) + err.start]:02x} at "
                                   f"offset {len(bom) + err.start}), left unchanged")
    try:
        notebook = json.loads(text)
    except json.JSONDecodeError as err:
        return FileResult(data, [Finding(path, err.lineno, err.colno, "ERROR",
                                         f"not a notebook: invalid JSON ({err.msg}), left unchanged")])
    except RecursionError:
        return _refuse(data, path, "not a notebook this tool can read: its JSON is nested too deeply, left unchanged")
    problem = _structure_problem(notebook)
    if problem:
        return _refuse(data, path, f"not a notebook this tool can read: {problem}; left unchanged")
    language = _language(notebook)
    if language is not None and not language.lower().startswith("python"):
        return FileResult(data, [], skipped="not a Python notebook")
    if _PREFIX in text:
        return _refuse(data, path, f"left unchanged: it contains `{_PREFIX}`, which this tool uses for its "
                                   "own placeholders")

    cells: List[_Cell] = []
    frozen: List[_Cell] = []
    findings: List[Finding] = []
    unseen: List[str] = []  # code the rewriter does not see: magics, cells left alone
    for index, cell in enumerate(notebook["cells"]):
        if cell["cell_type"] != "code":
            continue
        source = _joined(cell["source"])
        if not source.strip():
            continue
        magic = _cell_magic(source)
        if magic is not None:
            unseen.append(source)
            body = _parsable(path, _Cell(index, "", source, first_line=magic + 2),
                             "".join(split_lines(source)[magic + 1:]))
            if isinstance(body, _Cell):  # a cell magic's body is a cell or None, never a Finding
                frozen.append(body)
            continue
        parsed = _parsable(path, _Cell(index, "", source), source)
        if isinstance(parsed, Finding):
            findings.append(parsed)
            unseen.append(source)
        elif parsed is not None:
            cells.append(parsed)
            unseen.extend(parsed.masks.values())

    changes: Dict[int, str] = {}
    if cells:
        joined, starts = _join(cells, _identifiers(unseen))
        result = _upgrade_text(joined, path, contrib_version, top_level_await=True)
        # Each cell parsed alone; the joined cells may not (a `from __future__` import in a later cell).
        findings += [dataclasses.replace(finding, message=finding.message.replace(
                         "parse this file", "parse the code cells joined", 1)) if "parse this file" in finding.message
                     else finding for finding in _in_cells(result.findings, cells, starts)]
        if result.code is not joined:
            pieces = _split(result.code, len(cells) + 1)
            restored = [_restore(piece, cell) for piece, cell in zip(pieces, cells)] if pieces else [None]
            if any(piece is None for piece in restored):
                return _refuse(data, path, "left unchanged: the rewritten code could not be split back into its "
                                           "cells exactly")
            changes = {cell.index: new for cell, new in zip(cells, restored)
                       if new is not None and new != cell.original}
    if frozen:
        findings += _frozen_warnings(path, contrib_version, cells, frozen)
    findings.sort(key=lambda f: (f.cell or 0, f.line, f.column))
    if not changes:
        return FileResult(data, findings)
    new_text = _splice(text, notebook, changes)
    if new_text is None:
        return _refuse(data, path, "left unchanged: the rewritten notebook did not check out as the original with "
                                   "only its code changed (please report this)")
    return FileResult(bom + new_text.encode("utf-8"), findings)


def _refuse(data: bytes, path: str, message: str) -> FileResult:
    return FileResult(data, [Finding(path, 1, 1, "ERROR", message)])


def _structure_problem(notebook: Any) -> Optional[str]:
    """What keeps `notebook` (parsed JSON) from being an nbformat 4 notebook this tool can rewrite, or None."""
    if not isinstance(notebook, dict):
        return "the top level is not a JSON object"
    version = notebook.get("nbformat")
    if not isinstance(version, int) or isinstance(version, bool):
        return "no `nbformat` version number"
    if version != 4:
        return (f"it is an nbformat {version} notebook; this tool reads nbformat 4 (convert it with "
                "`jupyter nbconvert --to notebook --inplace NOTEBOOK.ipynb`)")
    cells = notebook.get("cells")
    if not isinstance(cells, list):
        return "no list of `cells`"
    for number, cell in enumerate(cells, 1):
        if not isinstance(cell, dict) or not isinstance(cell.get("cell_type"), str):
            return f"cell {number} is not an object with a `cell_type`"
        source = cell.get("source")
        if cell["cell_type"] == "code" and not (
                isinstance(source, str) or (isinstance(source, list) and all(isinstance(s, str) for s in source))):
            return f"code cell {number} has no `source` string or list of strings"
    return None


def _language(notebook: dict) -> Optional[str]:
    metadata = notebook.get("metadata")
    if not isinstance(metadata, dict):
        return None
    for holder, key in ((metadata.get("kernelspec"), "language"), (metadata.get("language_info"), "name")):
        if isinstance(holder, dict) and isinstance(holder.get(key), str):
            return holder[key]
    return None


def _joined(source: Any) -> str:
    return source if isinstance(source, str) else "".join(source)


def _cell_magic(source: str) -> Optional[int]:
    """The index of the line holding the cell's `%%magic` if it starts with one, else None."""
    for number, line in enumerate(split_lines(source)):
        if line.strip():
            return number if line.lstrip().startswith("%%") else None
    return None


def _parsable(path: str, cell: _Cell, text: str) -> Union[_Cell, Finding, None]:
    """`cell` with its code `text` (magics masked if it needs that to parse), or an ERROR Finding, or None.

    None stands for a cell magic's body that is not Python: nothing to say about it.
    """
    problem = python_syntax_error(text, "", top_level_await=True)
    if problem is None:
        cell.text = text
        return cell
    masked, masks = _mask(text)
    if masks and python_syntax_error(masked, "", top_level_await=True) is None:
        cell.text, cell.masks = masked, masks
        return cell
    if cell.first_line > 1:
        return None
    message = problem.message.replace("cannot parse this file", "cannot parse this cell")
    return Finding(path, problem.line, problem.column, "ERROR", message, cell=cell.index + 1)


def _is_magic(stripped: str) -> bool:
    """Whether a line, stripped of its indent, is IPython's: `%magic`, `!shell`, `x = !shell`, `obj?`, `?obj`."""
    if stripped.startswith(("%", "!", "?")):
        return True
    if stripped.endswith("?") and all(part.isidentifier() for part in stripped.rstrip("?").split(".")):
        return True
    targets, equals, value = stripped.partition("=")
    return bool(equals) and all(t.strip().isidentifier() for t in targets.split(",")) and value.lstrip().startswith(
        ("!", "%"))


def _mask(text: str) -> Tuple[str, Dict[str, str]]:
    """Replaces each IPython line (and the lines it continues onto with `\\`) by a placeholder statement.

    Each physical line gets its own placeholder, at the indent of the magic, so that the line numbers of
    the findings stay those of the cell. The placeholder is an import of a module that cannot exist: a
    statement valid anywhere, which the rewriter never touches, and which keeps a new `import tf_seqloss`
    after a cell's leading `%matplotlib inline` / `!pip install` lines rather than before them.
    """
    lines = split_lines(text)
    masks: Dict[str, str] = {}
    out: List[str] = []
    number = 0
    while number < len(lines):
        content = lines[number].rstrip("\r\n")
        stripped = content.lstrip()
        if not _is_magic(stripped):
            out.append(lines[number])
            number += 1
            continue
        indent = content[: len(content) - len(stripped)]
        while True:
            line = lines[number]
            placeholder = f"import {_PREFIX}magic_{len(masks)}__"
            masks[placeholder] = line
            out.append(indent + placeholder + line[len(line.rstrip("\r\n")):])
            number += 1
            if not line.rstrip("\r\n").endswith("\\") or number == len(lines):
                break
    return "".join(out), masks


def _restore(piece: str, cell: _Cell) -> Optional[str]:
    """The cell's new source from its piece of the rewritten module, or None if that cannot be done exactly."""
    # The joined module ends each cell with a line end; the rewrite may add a blank line after a new
    # import. The cell keeps its own trailing line ends.
    trailing = cell.text[len(cell.text.rstrip("\r\n")):]
    piece = piece.rstrip("\r\n") + trailing
    if not cell.masks:
        return piece
    lines, found = [], 0
    for line in split_lines(piece):
        statement = line.strip()
        if statement in cell.masks:
            lines.append(cell.masks[statement])
            found += 1
        else:
            lines.append(line)
    return "".join(lines) if found == len(cell.masks) else None


def _identifiers(texts: List[str]) -> List[str]:
    """The names `texts` may use: the identifier-like words in them, but keywords and attributes (`.name`)."""
    names = set()
    for text in texts:
        word: List[str] = []
        attribute = previous = False
        for character in text + " ":
            if character.isalnum() or character == "_":
                if not word:
                    attribute = previous
                word.append(character)
                continue
            if word and not attribute:
                names.add("".join(word))
            word = []
            if not character.isspace():
                previous = character == "."
    return sorted(name for name in names if name.isidentifier() and not keyword.iskeyword(name))


def _join(cells: List[_Cell], unseen_names: Sequence[str] = ()) -> Tuple[str, List[int]]:
    """One module of the cells' code, a marker statement between cells; and the line each cell starts on.

    After the last cell, behind one more marker, a `KEEP_NAMES(...)` call names what the code the
    rewriter does not see may use, so that an import it needs is not dropped as unused.
    """
    parts: List[str] = []
    starts: List[int] = []
    line = 1
    for number, cell in enumerate(cells):
        if number:
            parts.append(f"{_PREFIX}cell_{number}__\n")
            line += 1
        starts.append(line)
        text = cell.text if cell.text.endswith(("\n", "\r")) else cell.text + "\n"
        parts.append(text)
        line += len(split_lines(text))
    parts.append(f"{_PREFIX}cell_{len(cells)}__\n{KEEP_NAMES}({', '.join(unseen_names)})\n")
    return "".join(parts), starts


def _split(code: str, count: int) -> Optional[List[str]]:
    pieces: List[List[str]] = [[]]
    for line in split_lines(code):
        if line.rstrip("\r\n") == f"{_PREFIX}cell_{len(pieces)}__":
            pieces.append([])
        else:
            pieces[-1].append(line)
    return ["".join(piece) for piece in pieces[:-1]] if len(pieces) == count else None


def _in_cells(findings: List[Finding], cells: List[_Cell], starts: List[int]) -> List[Finding]:
    """The joined module's findings, placed in their cells."""
    placed = []
    for finding in findings:
        number = max(bisect.bisect_right(starts, finding.line) - 1, 0)
        cell = cells[number]
        placed.append(dataclasses.replace(finding, line=finding.line - starts[number] + cell.first_line,
                                          cell=cell.index + 1))
    return placed


def _frozen_warnings(path: str, contrib_version: str, cells: List[_Cell], frozen: List[_Cell]) -> List[Finding]:
    """WARNINGs for the cells left alone behind a cell magic, where their body holds code to migrate."""
    everything = sorted([*cells, *frozen], key=lambda cell: cell.index)
    joined, starts = _join(everything)
    result = _upgrade_text(joined, path, contrib_version, top_level_await=True)
    frozen_indices = {cell.index for cell in frozen}
    warnings = []
    for finding in _in_cells(result.findings, everything, starts):
        if finding.cell is not None and finding.cell - 1 in frozen_indices:
            warnings.append(dataclasses.replace(
                finding, level="WARNING",
                message="left alone, as the cell starts with a cell magic; edit it by hand: " + finding.message))
    return warnings


def _splice(text: str, notebook: dict, changes: Dict[int, str]) -> Optional[str]:
    """`text` with the `source` values of the cells in `changes` replaced; None if the result does not check out."""
    spans = _source_spans(text)
    ascii_only = text.isascii()  # non-ASCII code in an all-ASCII file was written as \u escapes
    for index in sorted(changes, reverse=True):
        start, end = spans[index]
        text = text[:start] + _encode(changes[index], text[start:end], ascii_only) + text[end:]
    expected = copy.deepcopy(notebook)
    for index, source in changes.items():
        cell = expected["cells"][index]
        cell["source"] = source if isinstance(cell["source"], str) else source.splitlines(True)
    try:
        return text if json.loads(text) == expected else None
    except ValueError:
        return None


def _encode(source: str, original: str, ascii_only: bool) -> str:
    """`source` as JSON, in the form and layout of the `original` value: a string, or a list of lines."""
    if original.startswith('"'):
        return json.dumps(source, ensure_ascii=ascii_only)
    lines = source.splitlines(True)  # as nbformat splits
    if not lines:
        return "[]"
    elements = list(_elements(original, 0))
    opening = original[1: elements[0][0]] if elements else "\n"
    closing = original[elements[-1][1]: -1] if elements else "\n"
    separator = original[elements[0][1]: elements[1][0]] if len(elements) > 1 else "," + opening
    return "[" + opening + separator.join(json.dumps(line, ensure_ascii=ascii_only) for line in lines) + closing + "]"


def _skip(text: str, position: int) -> int:
    while position < len(text) and text[position] in _WHITESPACE:
        position += 1
    return position


def _members(text: str, position: int) -> Iterator[Tuple[str, int, int]]:
    """`(key, value start, value end)` of each member of the (valid) JSON object at `text[position]`."""
    position = _skip(text, position + 1)
    while text[position] != "}":
        # Public in json.decoder (and documented in its module), missing from typeshed's stub.
        key, position = json.decoder.scanstring(text, position + 1)  # type: ignore[attr-defined]
        start = _skip(text, _skip(text, position) + 1)  # past the colon
        _, end = _DECODER.raw_decode(text, start)
        yield key, start, end
        position = _skip(text, end)
        if text[position] == ",":
            position = _skip(text, position + 1)


def _elements(text: str, position: int) -> Iterator[Tuple[int, int]]:
    """`(start, end)` of each element of the (valid) JSON array at `text[position]`."""
    position = _skip(text, position + 1)
    while text[position] != "]":
        _, end = _DECODER.raw_decode(text, position)
        yield position, end
        position = _skip(text, end)
        if text[position] == ",":
            position = _skip(text, position + 1)


def _source_spans(text: str) -> Dict[int, Tuple[int, int]]:
    """Where each cell's `source` value lies in the notebook's text, by cell index (the last key wins, as in
    `json.loads`)."""
    top = _skip(text, 0)
    cells = [start for key, start, _ in _members(text, top) if key == "cells"][-1]
    spans = {}
    for index, (start, _) in enumerate(_elements(text, cells)):
        sources = [(s, e) for key, s, e in _members(text, start) if key == "source"]
        if sources:
            spans[index] = sources[-1]
    return spans
