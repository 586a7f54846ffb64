"""Every `>>>` example in the package's docstrings runs and prints what it shows, and every public face
documents its arguments, return value, exceptions and an example in the Google style the API reference renders.
"""

import ast
import doctest
import importlib
import inspect
import logging
import pkgutil
import re
import textwrap
from pathlib import Path

import pytest

import tf_seqloss
import tf_seqloss.compat.tfa

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


# The command line's modules, without `__main__` (importing it runs the command). They need the `upgrade`
# extra (libcst), which the test environment installs.
UPGRADE_MODULES = ["tf_seqloss_upgrade.cli"]


@pytest.mark.parametrize("module_name", MODULES + UPGRADE_MODULES)
def test_docstring_examples_run(module_name):
    module = importlib.import_module(module_name)
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    for test in finder.find(module, module_name, globs={}):
        runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} docstring examples in {module_name} failed"


# ---------------------------------------------------------------------------------------------------------
# The API reference contract (issue 22): every public function, class and method documents `Args`,
# `Returns`, `Raises` and an `Example`, in the Google style mkdocstrings (griffe) renders without a warning.
#
# The inventory: every name in `tf_seqloss.__all__` and `tf_seqloss.compat.tfa.__all__`; for a class, its
# constructor (documented by the class docstring, as Keras and mkdocstrings' `merge_init_into_class` want)
# and every public method or property the class defines itself or takes from one of this package's private
# bases (`_TokenMetric`), plus `__call__` where the class overrides it. Methods Keras defines and the class
# does not override are Keras' to document. The constant `IMPLEMENTATIONS` has an attribute docstring,
# which only griffe sees: it is checked there.
# ---------------------------------------------------------------------------------------------------------
ROOT = Path(__file__).resolve().parent.parent

# Methods that may leave out the `Example` section, each with the reason.
NO_EXAMPLE = {
    "get_config": "a Keras-protocol override: returns the constructor's arguments; the class Example shows them",
    "from_config": "a Keras-protocol override: rebuilds the object from `get_config()`; Keras calls it on load",
    "compute_output_shape": "a Keras-protocol override that Keras calls while building a functional model",
    "compute_mask": "a Keras-protocol override that Keras calls to pass the mask on",
    "build": "a Keras-protocol override: the first call builds the layer, which the class Example shows",
    "reset_state": "Keras calls it at the start of every epoch and `evaluate`; the update_state Example shows it",
    "SequenceLoss.call": "Keras' `Loss.call`: the loss without `sample_weight`; `__call__`'s Example shows the loss",
    "TokenAccuracy.result": "the class Example reads `result()`",
    "TokenPerplexity.result": "the class Example reads `result()`",
}
# Methods and classes that raise nothing of their own, so have no `Raises` section, each with the reason.
NO_RAISES = {
    "get_config": "reads attributes that the constructor checked",
    "compute_output_shape": "shape arithmetic on shapes Keras already checked",
    "compute_mask": "passes the mask on",
    "reset_state": "assigns zeros to its own variables",
    "result": "divides its own running sums (`divide_no_nan`)",
    "Reduction": "a namespace of constants: nothing is constructed",
    "Reduction.all": "returns the constants",
    "TokenStats": "a NamedTuple of tensors that `linear_sequence_loss` fills: constructing one checks nothing",
}

_SECTION = re.compile(r"^(Args|Arguments|Returns|Raises|Example|Examples|Call arguments|Yields|Note|Notes):\s*$")
_ARG = re.compile(r"^    (\*{0,2}\w+)(?: \([^)]*\))?:(?:\s|$)")
_RAISE = re.compile(r"^    ([\w.]+):(?:\s|$)")


def _is_own(klass) -> bool:
    return klass.__module__.startswith("tf_seqloss")


def _inventory():
    """Returns `[(qualified name, short name, object, kind)]` with kind "function", "class", "method" or "property"."""
    items = []
    for module in (tf_seqloss, tf_seqloss.compat.tfa):
        for name in module.__all__:
            obj = getattr(module, name)
            if not (inspect.isclass(obj) or inspect.isfunction(obj)):
                continue  # IMPLEMENTATIONS: an attribute docstring, checked by griffe below
            qualified = f"{module.__name__}.{name}"
            items.append((qualified, name, obj, "class" if inspect.isclass(obj) else "function"))
            if not inspect.isclass(obj):
                continue
            seen = set()
            for klass in obj.__mro__:
                if not _is_own(klass):
                    break
                for attr, value in vars(klass).items():
                    if attr in seen or (attr.startswith("_") and attr != "__call__") or attr == "__init__":
                        continue
                    seen.add(attr)
                    if isinstance(value, property):
                        items.append((f"{qualified}.{attr}", f"{name}.{attr}", value, "property"))
                    elif isinstance(value, (classmethod, staticmethod)) or inspect.isfunction(value):
                        items.append((f"{qualified}.{attr}", f"{name}.{attr}", value, "method"))
    return items


INVENTORY = _inventory()


def _function_of(obj, kind):
    if kind == "class":
        return obj.__init__ if "__init__" in {k for c in obj.__mro__ if _is_own(c) for k in vars(c)} else None
    if kind == "property":
        return obj.fget
    return obj.__func__ if isinstance(obj, (classmethod, staticmethod)) else obj


def _docstring(obj, kind):
    if isinstance(obj, (classmethod, staticmethod)):
        obj = obj.__func__  # Python 3.9's classmethod does not carry its function's docstring
    raw = obj.__doc__ if kind != "property" else obj.fget.__doc__ or obj.__doc__
    return inspect.cleandoc(raw) if raw else ""


def _sections(doc: str) -> dict:
    """Returns `{section title: [its lines]}` of a cleaned Google-style docstring (the summary under "")."""
    sections, current = {"": []}, ""
    for line in doc.splitlines():
        match = _SECTION.match(line)
        if match:
            current = match.group(1)
            sections[current] = []
        elif line and not line[0].isspace() and current in ("Args", "Returns", "Raises", "Call arguments"):
            current = "after " + current  # text after a section at the docstring's own indentation
            sections.setdefault(current, []).append(line)
        else:
            sections.setdefault(current, []).append(line)
    return sections


def _parameters(function) -> list:
    names = []
    for parameter in list(inspect.signature(function).parameters.values()):
        if parameter.name in ("self", "cls"):
            continue
        prefix = {inspect.Parameter.VAR_POSITIONAL: "*", inspect.Parameter.VAR_KEYWORD: "**"}.get(parameter.kind, "")
        names.append(prefix + parameter.name)
    return names


def _ast_of(function):
    source = textwrap.dedent(inspect.getsource(function))
    tree = ast.parse(source)
    return tree.body[0]


def _own_nodes(node):
    """Yields the nodes of a function's body, not descending into nested functions or classes."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
            continue
        yield child
        yield from _own_nodes(child)


def _returns_value(function) -> bool:
    return any(isinstance(node, ast.Return) and node.value is not None
               and not (isinstance(node.value, ast.Constant) and node.value.value is None)
               for node in _own_nodes(_ast_of(function)))


def _raised_names(function) -> set:
    names = set()
    for node in _own_nodes(_ast_of(function)):
        if isinstance(node, ast.Raise) and node.exc is not None:
            exc = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
            names.add(ast.unparse(exc).rsplit(".", 1)[-1])
    return names


def _exempt(table, short):
    return short in table or short.rsplit(".", 1)[-1] in table


def _problems(qualified, short, obj, kind) -> list:
    doc = _docstring(obj, kind)
    if not doc:
        return ["no docstring"]
    problems = []
    sections = _sections(doc)
    if kind == "property":
        return []  # an attribute: its one-line docstring is what the reference shows
    function = _function_of(obj, kind)
    expected = _parameters(function) if function is not None else []
    documented = [m.group(1) for line in sections.get("Args", []) if (m := _ARG.match(line))]
    if expected and "Args" not in sections:
        problems.append("no Args")
    elif sorted(documented) != sorted(expected):
        missing = [p for p in expected if p not in documented]
        stale = [p for p in documented if p not in expected]
        problems.append(f"Args: missing {missing}, stale {stale}")
    if kind != "class" and function is not None and _returns_value(function) and "Returns" not in sections:
        problems.append("no Returns")
    if "Raises" not in sections:
        if not _exempt(NO_RAISES, short):
            problems.append("no Raises")
    else:
        listed = {m.group(1).rsplit(".", 1)[-1] for line in sections["Raises"] if (m := _RAISE.match(line))}
        if not listed:
            problems.append("Raises lists no exception")
        unknown = {name for name in listed if not name.endswith(("Error", "Exception"))}
        if unknown:
            problems.append(f"Raises names {sorted(unknown)}, which are not exceptions")
        raised = _raised_names(function) if function is not None else set()
        if raised - listed:
            problems.append(f"Raises misses {sorted(raised - listed)}, raised in the body")
    example = sections.get("Example", []) + sections.get("Examples", [])
    if not any(line.lstrip().startswith(">>> ") for line in example) and not _exempt(NO_EXAMPLE, short):
        problems.append("no Example with a `>>>` line")
    if any(line.lstrip().startswith("```") for line in example):
        problems.append("a fenced code block in Example, which no test runs: write it as `>>>` lines")
    return problems


def test_the_inventory_holds_every_public_face():
    names = {short for _, short, _, _ in INVENTORY}
    # The constructors are documented by their class; methods Keras defines and the class does not override
    # (e.g. `Layer.__call__`) are not listed, the overrides are.
    assert {"sequence_loss", "SequenceLoss", "SequenceLoss.__call__", "SequenceLoss.get_config",
            "SequenceLossLayer.call", "FusedLinearHead.build", "SequenceMask.call", "TokenAccuracy.update_state",
            "TokenPerplexity.result", "Reduction.validate", "compute_weighted_loss"} <= names
    assert not any(name.endswith(".__init__") for name in names)
    assert len([item for item in INVENTORY if item[3] == "function"]) == 7  # 6 in __all__, 1 in compat.tfa
    for table in (NO_EXAMPLE, NO_RAISES):
        for entry in table:
            assert any(short == entry or short.endswith("." + entry) for short in names), f"stale entry {entry}"


@pytest.mark.parametrize("qualified, short, obj, kind", INVENTORY, ids=[item[0] for item in INVENTORY])
def test_docstring_documents_args_returns_raises_and_an_example(qualified, short, obj, kind):
    assert _problems(qualified, short, obj, kind) == []


def test_the_checker_catches_what_it_is_for():
    """The checks above on docstrings made wrong on purpose: each defect must be reported."""
    def sample(logits, targets, weights=None, **kwargs):
        """Returns a loss.

        Args:
            logits: logits.
            target: a stale name.

        Example:

        This example has no doctest line.
        """
        if logits is None:
            raise ValueError("no logits")
        return logits

    problems = _problems("sample", "sample", sample, "function")
    assert problems == ["Args: missing ['targets', 'weights', '**kwargs'], stale ['target']", "no Returns",
                        "no Raises", "no Example with a `>>>` line"]

    def raises_the_wrong_thing(x):
        """Returns `x`.

        Args:
            x: anything.

        Returns:
            `x`.

        Raises:
            TypeError: never.

        Example:

        >>> 1
        1
        """
        raise ValueError(x)

    assert _problems("f", "f", raises_the_wrong_thing, "function") == [
        "Raises misses ['ValueError'], raised in the body"]


def _griffe_warnings(paths) -> dict:
    """Returns `{object path: [griffe warnings]}` for parsing the docstrings of `paths` and their members."""
    griffe = pytest.importorskip("griffe", reason="griffe comes with the docs extra (mkdocstrings-python)")
    records = []

    class Collect(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    handler = Collect(level=logging.DEBUG)
    logger = logging.getLogger("griffe")
    logger.addHandler(handler)
    found = {}
    try:
        loader = griffe.GriffeLoader(search_paths=[str(ROOT)], docstring_parser="google",
                                     docstring_options={"warn_missing_types": False})
        for package in ("tf_seqloss", "tf_seqloss_upgrade"):
            loader.load(package)
        loader.resolve_aliases(implicit=False, external=False)
        modules = loader.modules_collection
        for path in paths:
            obj = modules[path]
            objects = [obj] + [member for name, member in obj.members.items()
                               if not member.is_alias and (not name.startswith("_") or name == "__call__")]
            for item in objects:
                if item.docstring is None:
                    continue
                del records[:]
                item.docstring.parse("google", warn_missing_types=False)
                found[item.path] = list(records)
    finally:
        logger.removeHandler(handler)
    return found


# What the API reference renders: the public names, where they are defined, and the modules of the two
# pages that render a module (the TFA drop-in, the command line).
def _reference_paths():
    paths = ["tf_seqloss", "tf_seqloss.compat.tfa", "tf_seqloss_upgrade.cli",
             "tf_seqloss._cross_entropy.IMPLEMENTATIONS"]
    for module in (tf_seqloss, tf_seqloss.compat.tfa):
        for name in module.__all__:
            obj = getattr(module, name)
            if inspect.isclass(obj) or inspect.isfunction(obj):
                paths.append(f"{obj.__module__}.{obj.__qualname__}")
    return paths


def test_griffe_parses_every_reference_docstring_without_a_warning():
    # `warn_missing_types=False`: types come from the signatures' annotations, which are not all written yet.
    warnings_by_path = _griffe_warnings(_reference_paths())
    assert "tf_seqloss._sequence_loss.sequence_loss" in warnings_by_path
    assert {path: found for path, found in warnings_by_path.items() if found} == {}


# The private functions every public face runs through: Args and Returns (no Example: they are not API).
# The head's kernels (`_linear_head`, `_fused`, `_cross_entropy`) are not listed yet.
PRIVATE_MAIN = [
    "tf_seqloss._sequence_loss.compute_sequence_loss", "tf_seqloss._sequence_loss.token_losses",
    "tf_seqloss._options.reduce_tokens", "tf_seqloss._options.reduce_for_keras", "tf_seqloss._options.for_add_loss",
    "tf_seqloss._padding.token_weights", "tf_seqloss._padding.densify_ragged", "tf_seqloss._distribute.normalise",
    "tf_seqloss._checks.invalid_value", "tf_seqloss._keras.serialize_function",
    "tf_seqloss._keras.deserialize_function", "tf_seqloss._keras_loss.reduced_loss",
    "tf_seqloss._keras_loss.standardize_targets", "tf_seqloss._cross_entropy.choose_implementation",
]


@pytest.mark.parametrize("path", PRIVATE_MAIN)
def test_private_main_functions_document_args_and_returns(path):
    module, name = path.rsplit(".", 1)
    function = getattr(importlib.import_module(module), name)
    problems = [problem for problem in _problems(path, name, function, "function")
                if problem not in ("no Raises", "no Example with a `>>>` line")]
    assert problems == []
    assert "Returns" in _sections(_docstring(function, "function"))


def test_the_command_line_help_documents_usage_options_exit_statuses_and_examples(capsys):
    from tf_seqloss_upgrade import cli

    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: tf-seqloss-upgrade [-h] [--write] [--contrib-version {1.4,1.15}]")
    for option in ("--write", "--contrib-version", "PATH"):
        assert re.search(rf"^  {re.escape(option)}\b.*\S", text, re.M), option
    for status in ("0 when nothing was refused", "1 when something was", "2 for a bad command line"):
        assert status in text
    examples = text.split("\nexamples:\n", 1)[1]
    commands = [line.split()[0] for line in examples.splitlines() if line.startswith("  ")]
    assert commands.count("tf-seqloss-upgrade") >= 4 and "python" in commands
    assert 'pip install "tf_seqloss[upgrade]"' in text
