"""The type checker: mypy, with pyproject.toml's settings, is clean on tf_seqloss and tf_seqloss_upgrade.

Flavour-free (no `keras` mark), so scripts/test.sh runs it once, in one of its two suites.
"""

import subprocess
import sys

from tests._pyproject import ROOT, pyproject

# The public surface's modules that must stay fully annotated (`disallow_untyped_defs`).
ANNOTATED = ["tf_seqloss", "tf_seqloss.compat.tfa", "tf_seqloss._checks", "tf_seqloss._distribute",
             "tf_seqloss._metrics", "tf_seqloss._padding", "tf_seqloss._tf1_losses", "tf_seqloss_upgrade",
             "tf_seqloss_upgrade.cli", "tf_seqloss_upgrade._notebook", "tf_seqloss_upgrade._rewriter"]


def mypy(*args, cache):
    return subprocess.run([sys.executable, "-m", "mypy", "--cache-dir", str(cache), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)


def test_mypy_is_clean_on_both_packages(tmp_path):
    run = mypy(cache=tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.splitlines()[-1].startswith("Success: no issues found in"), run.stdout


def test_the_settings_require_annotations_and_catch_a_missing_one(tmp_path):
    config = pyproject()["tool"]["mypy"]
    assert config["files"] == ["tf_seqloss", "tf_seqloss_upgrade"]
    assert config["disallow_untyped_defs"] is True and config["disallow_incomplete_defs"] is True
    relaxed = {module for override in config.get("overrides", []) if override.get("disallow_untyped_defs") is False
               for module in override["module"]}
    assert not relaxed & set(ANNOTATED)
    # The same settings on a module with an unannotated function and a wrong type: both reported.
    (tmp_path / "sample.py").write_text("def untyped(x):\n    return x\n\n\ndef wrong() -> int:\n    return 'a'\n")
    run = mypy("--config-file", str(ROOT / "pyproject.toml"), str(tmp_path / "sample.py"), cache=tmp_path / "cache")
    assert run.returncode == 1, run.stdout + run.stderr
    assert "sample.py:1: error: Function is missing a type annotation  [no-untyped-def]" in run.stdout
    assert "sample.py:6: error: Incompatible return value type" in run.stdout
