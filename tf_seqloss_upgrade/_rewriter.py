"""The libcst transform behind `tf-seqloss-upgrade`: TF1 contrib, TFA and `tf.losses` calls to `tf_seqloss`.

Names are resolved through the file's own imports and aliases (libcst's `QualifiedNameProvider`), so
`tf.contrib.seq2seq.sequence_loss`, `from tensorflow.contrib.seq2seq import sequence_loss as sl` and
`import tensorflow.contrib.seq2seq as s2s; s2s.sequence_loss` are the same function. A call is either
rewritten whole or left exactly as it was with an ERROR finding: nothing is half-migrated.

This module imports only libcst and the standard library: the command must not pay for (or print the log
lines of) TensorFlow.
"""

from __future__ import annotations

import ast
import dataclasses
import io
import re
import sys
from typing import Any, Container, Dict, List, Optional, Sequence, Set

try:
    import libcst as cst
    from libcst.codemod import CodemodContext, VisitorBasedCodemodCommand
    from libcst.codemod.visitors import AddImportsVisitor, RemoveImportsVisitor
    from libcst.metadata import PositionProvider, QualifiedNameProvider, ScopeProvider
except ImportError as err:  # The rewriter is an optional extra; the losses never need libcst.
    raise ImportError(
        "The `tf-seqloss-upgrade` command (tf_seqloss_upgrade, also reached as tf_seqloss.upgrade) needs "
        'libcst, which is not installed. Install it with: pip install "tf_seqloss[upgrade]"'
    ) from err

CONTRIB_VERSIONS = ("1.4", "1.15")

# Where `sequence_loss`'s positional arguments land in each contrib release: 1.4 to 1.13 had no
# `sum_over_*` flags, so their sixth positional argument is `softmax_loss_function`.
_CONTRIB_PARAMS = {
    "1.4": ("logits", "targets", "weights", "average_across_timesteps", "average_across_batch",
            "softmax_loss_function", "name"),
    "1.15": ("logits", "targets", "weights", "average_across_timesteps", "average_across_batch",
             "sum_over_timesteps", "sum_over_batch", "softmax_loss_function", "name"),
}
# Position of `loss_collection` in the TF1 family, for calls that pass it positionally.
_LOSS_COLLECTION_POSITION = {"softmax_cross_entropy": 5, "sparse_softmax_cross_entropy": 4,
                             "compute_weighted_loss": 3}

_CONTRIB = {"tensorflow.contrib.seq2seq.sequence_loss",
            "tensorflow.contrib.seq2seq.python.ops.loss.sequence_loss"}
_LEGACY = {"tensorflow.contrib.legacy_seq2seq.sequence_loss",
           "tensorflow.contrib.legacy_seq2seq.python.ops.seq2seq.sequence_loss",
           "tensorflow.nn.seq2seq.sequence_loss"}
_TFA = {f"tensorflow_addons.seq2seq{module}.{name}": name
        for module in ("", ".loss") for name in ("sequence_loss", "SequenceLoss")}
_TF1_PREFIXES = ("tensorflow.losses", "tensorflow.compat.v1.losses", "tensorflow.python.ops.losses.losses")
_TF1 = {f"{prefix}.{name}": name for prefix in _TF1_PREFIXES
        for name in ("softmax_cross_entropy", "sparse_softmax_cross_entropy", "compute_weighted_loss",
                     "Reduction")}


def _with_compat_v1(names: Any) -> Any:
    """Adds the `tensorflow.compat.v1.` spelling of every `tensorflow.` name (`import tensorflow.compat.v1 as tf`)."""
    if isinstance(names, dict):
        return {**names, **{"tensorflow.compat.v1." + k[len("tensorflow."):]: v for k, v in names.items()
                            if k.startswith("tensorflow.") and not k.startswith("tensorflow.compat.")}}
    return set(names) | {"tensorflow.compat.v1." + k[len("tensorflow."):] for k in names
                         if k.startswith("tensorflow.") and not k.startswith("tensorflow.compat.")}


_CONTRIB, _LEGACY = _with_compat_v1(_CONTRIB), _with_compat_v1(_LEGACY)
# In TF2, `tf.losses` is Keras' losses module and `tf.losses.Reduction` Keras' reduction keys, whose
# `SUM` is not TF1's `SUM`; only the `compat.v1` spelling is unambiguous.
_AMBIGUOUS = {"tensorflow.losses.Reduction"}
_COLLECTION_READERS = _with_compat_v1(
    {"tensorflow.losses.get_total_loss", "tensorflow.losses.get_losses", "tensorflow.GraphKeys.LOSSES"})

# Functions known to take `labels=` and `logits=` keywords, as `softmax_loss_function` is called.
_LABELS_LOGITS_FUNCTIONS = {f"{prefix}.{name}" for prefix in ("tensorflow.nn", "tensorflow.compat.v1.nn")
                            for name in ("sparse_softmax_cross_entropy_with_logits",
                                         "softmax_cross_entropy_with_logits",
                                         "softmax_cross_entropy_with_logits_v2",
                                         "sigmoid_cross_entropy_with_logits")}
_SAMPLED = {f"{prefix}.{name}" for prefix in ("tensorflow.nn", "tensorflow.compat.v1.nn")
            for name in ("sampled_softmax_loss", "nce_loss")}

# A call to this name marks names used by code the rewriter cannot see (a notebook's magic lines): its
# arguments are never rewritten, and being used, they keep their imports.
KEEP_NAMES = "__tf_seqloss_upgrade_uses__"

# The one place that says what to do with a `softmax_loss_function` the rewriter refuses.
SOFTMAX_LOSS_FUNCTION_SUGGESTION = (
    "For sampled softmax use `tf_seqloss.sampled_sequence_loss`; otherwise pass a function taking "
    "`labels=` and `logits=`."
)

@dataclasses.dataclass(frozen=True, order=True)
class Finding:
    """One report line: `path:line:col: LEVEL: message`, or `path:cell N:line:col: LEVEL: message` in a notebook.

    Line and column are 1-based; in a notebook they count within the code cell `cell`, the notebook's
    `cell`-th cell (1-based, every kind of cell counted).
    """

    path: str
    line: int
    column: int
    level: str
    message: str
    cell: Optional[int] = None

    def __str__(self) -> str:
        where = f"cell {self.cell}:" if self.cell is not None else ""
        return f"{self.path}:{where}{self.line}:{self.column}: {self.level}: {self.message}"


@dataclasses.dataclass
class UpgradeResult:
    """The rewritten source and the findings; `refused` is True when any finding is an ERROR."""

    code: str
    findings: List[Finding]

    @property
    def refused(self) -> bool:
        return any(finding.level == "ERROR" for finding in self.findings)


def upgrade_source(source: str, path: str = "<string>", contrib_version: str = "1.15") -> UpgradeResult:
    """Returns `source` with the calls this tool migrates rewritten to `tf_seqloss`, and the findings.

    Everything but the rewritten calls and imports comes back character for character: line endings
    (`\\n`, `\\r\\n`, `\\r`, mixed), a leading BOM, comments and layout. A file that Python cannot parse,
    or that libcst would not give back exactly, comes back unchanged with one ERROR finding.

    Args:
        source: the text of one Python file.
        path: the name used in the findings.
        contrib_version: `"1.4"` for code written for contrib 1.4 to 1.13 (its positional order, and
            `epsilon=1e-12` to keep its numbers), `"1.15"` for 1.14 and later.

    Returns:
        An `UpgradeResult`: the new text (`source` itself when nothing changes) and the findings, sorted.

    Raises:
        ValueError: `contrib_version` is not one of `CONTRIB_VERSIONS`.
    """
    return _upgrade_text(source, path, contrib_version)


def _upgrade_text(source: str, path: str, contrib_version: str, top_level_await: bool = False) -> UpgradeResult:
    """`upgrade_source`, with IPython's top-level `await` allowed for notebook cells."""
    if contrib_version not in CONTRIB_VERSIONS:
        raise ValueError(f"`contrib_version` must be one of {CONTRIB_VERSIONS}. "
                         f"Received: contrib_version={contrib_version!r}")
    # A BOM is not Python (CPython refuses it in text), and libcst drops a lone `\r` that ends the file:
    # both are set aside and put back.
    bom = "\ufeff" if source.startswith("\ufeff") else ""
    end = "\r" if source.endswith("\r") else ""
    body = source[len(bom): len(source) - len(end)]
    problem = python_syntax_error(body, path, top_level_await)
    if problem is not None:
        return UpgradeResult(source, [problem])
    # CPython accepted the file, so it is not nested deeper than CPython's own limits, which keep libcst's
    # native parser (which can crash the interpreter on very deep nesting) within its stack.
    try:
        module = cst.parse_module(body)
    except cst.ParserSyntaxError as err:
        return UpgradeResult(source, [Finding(
            path, err.raw_line, err.raw_column + 1, "ERROR",
            f"libcst cannot parse this file (Python {_PYTHON} can), left unchanged: {err.message}")])
    except RecursionError:
        return UpgradeResult(source, [Finding(path, 1, 1, "ERROR", _TOO_DEEP)])
    try:
        command = _Upgrader(CodemodContext(filename=path), path, contrib_version, body)
        rewritten = command.transform_module(module).code
    except RecursionError:
        return UpgradeResult(source, [Finding(path, 1, 1, "ERROR", _TOO_DEEP)])
    findings = sorted(set(command.findings))
    if rewritten == module.code:
        return UpgradeResult(source, findings)
    if module.code != body:
        # libcst dropped something (a form feed, say): writing its text would change more than the calls.
        kept = [finding for finding in findings if finding.level != "INFO"]
        return UpgradeResult(source, sorted([_first_difference(body, module.code, path), *kept]))
    return UpgradeResult(bom + rewritten + end, findings)


_PYTHON = f"{sys.version_info[0]}.{sys.version_info[1]}"
_TOO_DEEP = "left unchanged: its code is nested too deeply for libcst, the parser this tool rewrites with"


def python_syntax_error(source: str, path: str, top_level_await: bool = False) -> Optional[Finding]:
    """Returns an ERROR finding where CPython's own parser stops on `source`, or None when it parses.

    CPython's position is exact (libcst's parser reports the token after the error, often a line late),
    and its nesting limits keep hostile input away from libcst.
    """
    flags = ast.PyCF_ONLY_AST | (ast.PyCF_ALLOW_TOP_LEVEL_AWAIT if top_level_await else 0)
    try:
        compile(source, path, "exec", flags, dont_inherit=True)
    except SyntaxError as err:  # IndentationError and TabError included
        return Finding(path, err.lineno or 1, max(err.offset or 1, 1), "ERROR",
                       f"cannot parse this file (Python {_PYTHON}), left unchanged: {err.msg}")
    except (ValueError, MemoryError, RecursionError) as err:  # null bytes (before 3.12); too deep or long
        return Finding(path, 1, 1, "ERROR", f"cannot parse this file (Python {_PYTHON}), left unchanged: "
                                            f"{type(err).__name__}: {err}")
    return None


def split_lines(text: str) -> List[str]:
    """Splits `text` after each `\\r\\n`, `\\r` or `\\n`, Python's line ends (and not `\\f` or `\\x85`)."""
    return io.StringIO(text, newline="").readlines()


def _first_difference(expected: str, produced: str, path: str) -> Finding:
    """The ERROR for a file that libcst parses but would not give back byte for byte (a form feed, say)."""
    lines, others = split_lines(expected), split_lines(produced)
    line = next((i for i, (a, b) in enumerate(zip(lines, others)) if a != b), min(len(lines), len(others)))
    return Finding(path, line + 1, 1, "ERROR",
                   "left unchanged: libcst, the parser this tool rewrites with, would not give this line back "
                   "exactly as it is (a form feed or another character it drops?), so the file is not rewritten")


def _code(node: cst.CSTNode) -> str:
    return cst.Module([]).code_for_node(node)


def _short(node: cst.CSTNode, limit: int = 60) -> str:
    text = " ".join(_code(node).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


class _Upgrader(VisitorBasedCodemodCommand):
    METADATA_DEPENDENCIES = (PositionProvider, QualifiedNameProvider, ScopeProvider)

    def __init__(self, context: CodemodContext, path: str, contrib_version: str, source: str) -> None:
        super().__init__(context)
        self.path = path
        self.contrib_version = contrib_version
        self.findings: List[Finding] = []
        # Calls whose function reference is replaced by `leave_Attribute`/`leave_Name`, by the id of the
        # original function node, with the new dotted name; and the refused ones, left alone.
        self._replace: Dict[int, str] = {}
        self._refused: Set[int] = set()
        self._call_funcs: Set[int] = set()
        self._new_args: Dict[int, List[cst.Arg]] = {}
        self._collection_readers: List[cst.CSTNode] = []
        self._tf1_rewritten = False
        # A file that calls the TF1 losses or contrib is TF1 code, where `tf.losses.Reduction` is TF1's.
        self._tf1_file = bool(re.search(r"losses\.(sparse_)?softmax_cross_entropy|compute_weighted_loss"
                                        r"|\bcontrib\b|Session\(|placeholder\(", source))

    # -- helpers ------------------------------------------------------------------------------------
    def _names(self, node: cst.CSTNode) -> Set[str]:
        return {name.name for name in self.get_metadata(QualifiedNameProvider, node, set())}

    def _report(self, node: cst.CSTNode, level: str, message: str) -> None:
        position = self.get_metadata(PositionProvider, node).start
        self.findings.append(Finding(self.path, position.line, position.column + 1, level, message))

    def _match(self, node: cst.CSTNode, table: Container[str]) -> Optional[str]:
        for name in self._names(node):
            if name in table:
                return name
        return None

    # -- star imports -------------------------------------------------------------------------------
    def visit_ImportFrom(self, node: cst.ImportFrom) -> None:
        if not isinstance(node.names, cst.ImportStar) or node.module is None or node.relative:
            return
        module = _code(node.module)
        targets = _CONTRIB | _LEGACY | set(_TFA) | set(_TF1)
        if any(target.startswith(module + ".") for target in targets):
            self._report(node, "ERROR",
                         f"`from {module} import *`: the names it provides cannot be resolved, so nothing "
                         "called through it is rewritten; import the names you use explicitly and run again")

    # -- calls ----------------------------------------------------------------------------------------
    def visit_Call(self, node: cst.Call) -> None:
        func = node.func
        self._call_funcs.add(id(func))
        if isinstance(func, cst.Name) and func.value == KEEP_NAMES:
            self._refused.update(id(arg.value) for arg in node.args)
        elif self._match(func, _LEGACY):
            self._refuse(func, f"`{_short(func)}` is the legacy seq2seq loss, which takes lists of [batch] "
                               "tensors, one per time step, not [batch, time] tensors; stack them "
                               "(`tf.stack(logits, axis=1)` and so on) and call `tf_seqloss.sequence_loss`")
        elif self._match(func, _CONTRIB):
            self._plan_contrib(node)
        elif tfa_name := self._match(func, _TFA):
            target = f"tf_seqloss.compat.tfa.{_TFA[tfa_name]}"
            self._replace[id(func)] = target
            self._report(func, "INFO", f"`{_short(func)}` -> `{target}` (TFA 0.23 semantics)")
        elif self._match(func, _TF1):
            self._plan_tf1(node)

    def _refuse(self, node: cst.CSTNode, message: str) -> None:
        self._refused.add(id(node))
        self._report(node, "ERROR", "left unchanged: " + message)

    def _plan_contrib(self, call: cst.Call) -> None:
        func = call.func
        if any(arg.star for arg in call.args):
            return self._refuse(func, f"`{_short(func)}` called with `*`/`**` arguments: the rewriter cannot "
                                      "see which are positional or check `softmax_loss_function`")
        params = _CONTRIB_PARAMS[self.contrib_version]
        positional = [arg for arg in call.args if arg.keyword is None]
        keywords = {arg.keyword.value: arg for arg in call.args if arg.keyword is not None}
        if len(positional) > len(params):
            return self._refuse(func, f"`{_short(func)}` has {len(positional)} positional arguments; contrib "
                                      f"{self.contrib_version} takes at most {len(params)}")
        named = dict(keywords)
        named.update({params[i]: arg for i, arg in enumerate(positional)})
        if self.contrib_version == "1.4" and {"sum_over_timesteps", "sum_over_batch"} & set(keywords):
            return self._refuse(func, "`sum_over_timesteps`/`sum_over_batch` arrived in contrib 1.14, but "
                                      "--contrib-version 1.4 was given; run with --contrib-version 1.15")
        function = named.get("softmax_loss_function")
        if function is not None:
            problem = self._softmax_loss_function_problem(function.value)
            if problem:
                return self._refuse(
                    function, f"`softmax_loss_function={_short(function.value)}` {problem}; tf_seqloss calls it "
                              "as `softmax_loss_function(labels=..., logits=...)` with [batch * time] labels and "
                              f"[batch * time, classes] logits. {SOFTMAX_LOSS_FUNCTION_SUGGESTION}")
        args = list(call.args)
        if self.contrib_version == "1.4":
            # Positional arguments after the fifth mean something else to tf_seqloss: name them.
            args = [arg.with_changes(keyword=cst.Name(params[i]), equal=cst.AssignEqual(
                        whitespace_before=cst.SimpleWhitespace(""), whitespace_after=cst.SimpleWhitespace("")))
                    if arg.keyword is None and i >= 5 else arg
                    for i, arg in enumerate(args)]
            if "epsilon" not in keywords:
                args = _append_keyword(args, "epsilon", cst.Float("1e-12"))
            self._new_args[id(call)] = args
            detail = "contrib 1.4 numbers kept with `epsilon=1e-12`"
        else:
            if len(positional) > 5:
                self._report(func, "WARNING", "positional arguments after `average_across_batch` are read in "
                                              "contrib 1.14+ order (`sum_over_timesteps`, `sum_over_batch`, "
                                              "`softmax_loss_function`, `name`); for 1.4 to 1.13 code run with "
                                              "--contrib-version 1.4")
            detail = "contrib 1.14+ semantics"
        self._replace[id(func)] = "tf_seqloss.sequence_loss"
        self._report(func, "INFO", f"`{_short(func)}` -> `tf_seqloss.sequence_loss` ({detail})")

    def _softmax_loss_function_problem(self, value: cst.BaseExpression) -> Optional[str]:
        """Returns why `value` is not provably callable as `f(labels=..., logits=...)`, or None if it is."""
        if isinstance(value, cst.Name) and value.value == "None":
            return None
        if isinstance(value, cst.Lambda):
            return _params_problem(value.params)
        names = self._names(value)
        if names & _SAMPLED:
            return "is a sampled loss, whose arguments are not `labels=` and `logits=`"
        if names & _LABELS_LOGITS_FUNCTIONS:
            return None
        if isinstance(value, cst.Name):
            scope = self.get_metadata(ScopeProvider, value, None)
            assignments = list(scope[value.value]) if scope is not None else []
            nodes = [getattr(assignment, "node", None) for assignment in assignments]
            if len(nodes) == 1 and isinstance(nodes[0], cst.FunctionDef):
                return _params_problem(nodes[0].params)
        return "cannot be proven to take `labels=` and `logits=` keywords (it is not a function defined in this file)"

    def _plan_tf1(self, call: cst.Call) -> None:
        func = call.func
        qualified = self._match(func, _TF1)
        assert qualified is not None  # called on a match only
        name = _TF1[qualified]
        if name == "Reduction":
            return
        position = _LOSS_COLLECTION_POSITION[name]
        for i, arg in enumerate(call.args):
            if arg.star:
                return self._refuse(func, f"`{_short(func)}` called with `*`/`**` arguments: the rewriter cannot "
                                          "check `loss_collection`")
            is_collection = (arg.keyword is not None and arg.keyword.value == "loss_collection") or (
                arg.keyword is None and i == position)
            if is_collection and not (isinstance(arg.value, cst.Name) and arg.value.value == "None"):
                return self._refuse(arg, f"`loss_collection={_short(arg.value)}` adds the loss to a graph "
                                         "collection, which TF2 does not have (tf_seqloss ignores the argument); "
                                         "use the returned loss directly, remove the argument and run again")
        self._tf1_rewritten = True
        self._replace[id(func)] = f"tf_seqloss.{name}"
        self._report(func, "INFO", f"`{_short(func)}` -> `tf_seqloss.{name}`")

    # -- references ---------------------------------------------------------------------------------
    def _reference(self, original: cst.BaseExpression, updated: cst.BaseExpression) -> cst.BaseExpression:
        key = id(original)
        if key in self._refused:
            return updated
        if key in self._replace:
            target = self._replace[key]
        elif key in self._call_funcs:
            target = None  # A call this tool does not migrate, or one `visit_Call` refused.
        else:
            target = self._plan_reference(original)
        if target is None:
            if self._match(original, _COLLECTION_READERS):
                self._collection_readers.append(original)
            return updated
        AddImportsVisitor.add_needed_import(
            self.context, "tf_seqloss.compat.tfa" if target.startswith("tf_seqloss.compat.") else "tf_seqloss")
        RemoveImportsVisitor.remove_unused_import_by_node(self.context, original)
        return cst.parse_expression(target)

    def _plan_reference(self, node: cst.BaseExpression) -> Optional[str]:
        """Returns the new name of a reference that is not a call (or of `Reduction` anywhere), or None."""
        if self._match(node, _LEGACY):
            self._refuse(node, f"`{_short(node)}` is the legacy seq2seq loss (lists of per-step tensors)")
            return None
        if self._match(node, _CONTRIB):
            if self.contrib_version == "1.4":
                self._refuse(node, f"`{_short(node)}` is passed on, not called, so its 1.4 numbers "
                                   "(`epsilon=1e-12`) cannot be added; pass "
                                   "`functools.partial(tf_seqloss.sequence_loss, epsilon=1e-12)` yourself")
                return None
            self._report(node, "WARNING", f"`{_short(node)}` is passed on, not called: "
                                          "`tf_seqloss.sequence_loss` takes the same arguments, but the calls' "
                                          "`softmax_loss_function` was not checked")
            return "tf_seqloss.sequence_loss"
        qualified = self._match(node, _TFA)
        if qualified:
            self._report(node, "INFO", f"`{_short(node)}` -> `tf_seqloss.compat.tfa.{_TFA[qualified]}`")
            return f"tf_seqloss.compat.tfa.{_TFA[qualified]}"
        qualified = self._match(node, _TF1)
        if qualified:
            name = _TF1[qualified]
            if name == "Reduction" and qualified in _AMBIGUOUS and not self._tf1_file:
                self._report(node, "WARNING", f"`{_short(node)}` is Keras' reduction in TF2 and TF1's in TF1; "
                                              "this file shows no other TF1 code, so it is left alone")
                return None
            self._report(node, "INFO", f"`{_short(node)}` -> `tf_seqloss.{name}`")
            return f"tf_seqloss.{name}"
        return None

    def leave_Attribute(self, original_node: cst.Attribute, updated_node: cst.Attribute) -> cst.BaseExpression:
        return self._reference(original_node, updated_node)

    def leave_Name(self, original_node: cst.Name, updated_node: cst.Name) -> cst.BaseExpression:
        return self._reference(original_node, updated_node)

    def leave_Call(self, original_node: cst.Call, updated_node: cst.Call) -> cst.Call:
        args = self._new_args.get(id(original_node))
        if args is not None and id(original_node.func) not in self._refused:
            # Keep the rewritten function reference, with the argument list planned in `visit_Call`.
            return updated_node.with_changes(args=args)
        return updated_node

    def leave_Module(self, original_node: cst.Module, updated_node: cst.Module) -> cst.Module:
        if self._tf1_rewritten:
            for node in self._collection_readers:
                self._report(node, "WARNING", f"`{_short(node)}` reads the graph collection of losses, which "
                                              "the rewritten `tf_seqloss` calls no longer add to; sum the "
                                              "returned losses yourself")
        return updated_node

    def transform_module_impl(self, tree: cst.Module) -> cst.Module:
        return tree.visit(self)


def _params_problem(params: cst.Parameters) -> Optional[str]:
    if isinstance(params.star_kwarg, cst.Param):
        return None
    names = [param.name.value for param in (*params.posonly_params, *params.params, *params.kwonly_params)]
    named = [param.name.value for param in (*params.params, *params.kwonly_params)]
    missing = [name for name in ("labels", "logits") if name not in named]
    if missing:
        return f"takes `({', '.join(names)})`, without {' and '.join(f'`{m}=`' for m in missing)}"
    required = [param.name.value for param in (*params.posonly_params, *params.params, *params.kwonly_params)
                if param.default is None and param.name.value not in ("labels", "logits")]
    if required:
        return f"also requires `{', '.join(required)}`"
    return None


def _append_keyword(args: Sequence[cst.Arg], keyword: str, value: cst.BaseExpression) -> List[cst.Arg]:
    """Appends `keyword=value`, keeping a multi-line call's layout (and its trailing comma, if any)."""
    args = list(args)
    new = cst.Arg(value=value, keyword=cst.Name(keyword), equal=cst.AssignEqual(
        whitespace_before=cst.SimpleWhitespace(""), whitespace_after=cst.SimpleWhitespace("")))
    if not args:
        return [new]
    last = args[-1]
    if isinstance(last.comma, cst.Comma):
        # `f(a,\n    b,\n)`: the new argument goes on its own line, with the same comma and indent.
        previous_comma = args[-2].comma if len(args) > 1 and isinstance(args[-2].comma, cst.Comma) else None
        comma = previous_comma if previous_comma is not None else last.comma
        args[-1] = last.with_changes(comma=comma)
        args.append(new.with_changes(comma=last.comma))
    else:
        separator = args[-2].comma if len(args) > 1 and isinstance(args[-2].comma, cst.Comma) else None
        args[-1] = last.with_changes(comma=separator or cst.Comma(whitespace_after=cst.SimpleWhitespace(" ")))
        args.append(new)
    return args
