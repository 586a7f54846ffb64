"""Runs a test's Python script in a fresh process (a strategy or a device layout of its own) for its result."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_script(script: str, *, marker: str, timeout: float) -> dict:
    """Returns the JSON that `script` prints after `marker` on its last such line.

    The script runs from the repository root with `tf_seqloss` importable; the test fails with the end of
    its stderr if it exits with an error or prints no result.
    """
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line for line in done.stdout.splitlines() if line.startswith(marker)]
    assert lines, done.stderr[-3000:]
    return json.loads(lines[-1][len(marker):])
