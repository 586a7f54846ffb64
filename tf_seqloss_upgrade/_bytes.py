"""A Python file's bytes to text and back, as Python reads it: a UTF-8 BOM or a PEP 263 coding cookie."""

from __future__ import annotations

import codecs
import dataclasses
import io
import tokenize
from typing import List, Optional

from tf_seqloss_upgrade._rewriter import Finding, _upgrade_text, split_lines


@dataclasses.dataclass
class FileResult:
    """What the command does with one file's bytes.

    Attributes:
        data: the new bytes; the very same object as the old ones when nothing changes.
        findings: the report lines, in order.
        skipped: why the file is not for this tool (a notebook of another language), or None.
    """

    data: bytes
    findings: List[Finding]
    skipped: Optional[str] = None


def upgrade_python_bytes(data: bytes, path: str, contrib_version: str) -> FileResult:
    """Rewrites one Python file given as bytes, in its own encoding; a file it cannot decode is refused."""
    try:
        # The same rules as the interpreter's: a BOM means UTF-8, else a cookie on line 1 or 2, else UTF-8.
        encoding, _ = tokenize.detect_encoding(io.BytesIO(data).readline)
    except SyntaxError as err:  # "unknown encoding: ...", a BOM with another cookie, undecodable lines 1-2
        return FileResult(data, [Finding(path, 1, 1, "ERROR", f"cannot read this file, left unchanged: its encoding "
                                                              f"declaration is not one Python reads ({err.msg})")])
    try:
        text = data.decode(encoding)
    except UnicodeDecodeError as err:
        line = len(split_lines(data[: err.start].decode("latin-1"))) or 1
        if data[: err.start].endswith((b"\n", b"\r")):
            line += 1
        return FileResult(data, [Finding(
            path, line, 1, "ERROR",
            f"cannot read this file as {_name(encoding)} (byte 0x{data[err.start]:02x} on this line), left "
            "unchanged; if it is in another encoding, say so on its first line, e.g. `# -*- coding: latin-1 -*-`")])
    if text.encode(encoding) != data:
        return FileResult(data, [Finding(path, 1, 1, "ERROR",
                                         f"left unchanged: its bytes do not come back the same after decoding and "
                                         f"encoding them as {_name(encoding)}, so it cannot be rewritten safely")])
    result = _upgrade_text(text, path, contrib_version)
    if result.code == text:
        return FileResult(data, result.findings)
    try:
        return FileResult(result.code.encode(encoding), result.findings)
    except UnicodeEncodeError as err:  # The rewriter adds ASCII only; kept as a guard, not a path.
        return FileResult(data, [Finding(path, 1, 1, "ERROR", f"left unchanged: the rewritten text cannot be "
                                                              f"encoded as {_name(encoding)}: {err.reason}")])


def _name(encoding: str) -> str:
    """`utf-8-sig` is UTF-8 with a BOM; the others by the name Python knows them by."""
    return "UTF-8 (with a BOM)" if encoding == "utf-8-sig" else codecs.lookup(encoding).name
