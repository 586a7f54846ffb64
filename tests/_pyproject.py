"""pyproject.toml, read for the tests of the packaging (tomllib from Python 3.11, the tomli backport before)."""

import re
import sys
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # the test extra installs it on 3.9 and 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]


def pyproject():
    """Returns pyproject.toml as a dict."""
    with open(ROOT / "pyproject.toml", "rb") as file:
        return tomllib.load(file)


def requirement_minimums(requirements):
    """Returns `{name: minimum}` for the `name>=X.Y` entries of a list of requirement strings."""

    found = {}
    for requirement in requirements:
        match = re.match(r"^([A-Za-z0-9_.-]+)(?:\[[^]]*\])?>=([\d.]+)(?:;.*)?$", requirement)
        if match:
            found[match.group(1)] = match.group(2)
    return found
