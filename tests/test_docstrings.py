"""Every `>>>` example in the package's docstrings runs and prints what it shows."""

import doctest
import importlib
import pkgutil

import pytest

import tf_seqloss

MODULES = sorted(
    name for _, name, _ in pkgutil.walk_packages(tf_seqloss.__path__, prefix="tf_seqloss.")
    # The rewriter needs its optional extra; its own tests cover it.
    if not name.startswith("tf_seqloss.upgrade")
)


def test_every_module_is_collected_and_the_public_faces_have_examples():
    assert {"tf_seqloss._sequence_loss", "tf_seqloss._keras_loss", "tf_seqloss._layers"} <= set(MODULES)
    for name in ("tf_seqloss._sequence_loss", "tf_seqloss._keras_loss", "tf_seqloss._layers"):
        tests = doctest.DocTestFinder(exclude_empty=True).find(importlib.import_module(name), name, globs={})
        assert sum(len(test.examples) for test in tests) > 0, name


@pytest.mark.parametrize("module_name", MODULES)
def test_docstring_examples_run(module_name):
    module = importlib.import_module(module_name)
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    for test in finder.find(module, module_name, globs={}):
        runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} docstring examples in {module_name} failed"
