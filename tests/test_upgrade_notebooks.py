"""`tf-seqloss-upgrade` on Jupyter notebooks: code cells rewritten, everything else byte for byte.

The notebooks are written here with `json.dumps` in the layouts real tools use (nbformat/Jupyter:
indent 1, sorted keys, raw UTF-8, a final newline; Colab-like: indent 2, keys in order, `\\u` escapes, no
final newline; and the same with CRLF line ends). The expected file is the expected notebook object
dumped the same way: an independent reference, byte for byte.
"""

import copy
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("libcst", reason='the rewriter needs the `upgrade` extra: pip install "tf_seqloss[upgrade]"')

from tf_seqloss_upgrade.cli import main  # noqa: E402

ENV = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]), PYTHONDONTWRITEBYTECODE="1")

NOTEBOOK_FINDING = re.compile(r"^(?P<path>[^:\n]+):cell (?P<cell>\d+):(?P<line>\d+):(?P<col>\d+): "
                              r"(?P<level>INFO|WARNING|ERROR): (?P<message>.+)$")

LAYOUTS = {
    "jupyter": dict(indent=1, sort_keys=True, ensure_ascii=False, end="\n", newline="\n"),
    "colab": dict(indent=2, sort_keys=False, ensure_ascii=True, end="", newline="\n"),
    "crlf": dict(indent=1, sort_keys=True, ensure_ascii=False, end="\r\n", newline="\r\n"),
}


def _dump(notebook, indent, sort_keys, ensure_ascii, end, newline):
    text = json.dumps(notebook, indent=indent, sort_keys=sort_keys, ensure_ascii=ensure_ascii) + end
    return text.replace("\n", newline).encode("utf-8") if newline != "\n" else text.encode("utf-8")


def _code(source, outputs=(), count=None, as_string=False):
    lines = source.splitlines(True)
    return {"cell_type": "code", "execution_count": count, "metadata": {"id": "x1"}, "outputs": list(outputs),
            "source": source if as_string else lines}


def _markdown(source):
    return {"cell_type": "markdown", "metadata": {}, "source": source.splitlines(True)}


def _notebook(cells, language="python"):
    return {"cells": cells, "metadata": {
        "kernelspec": {"display_name": "Python 3", "language": language, "name": "python3"},
        "language_info": {"name": language, "version": "3.6.9"}}, "nbformat": 4, "nbformat_minor": 4}


PNG = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
OUTPUTS = [{"name": "stdout", "output_type": "stream", "text": ["loss: 0.596759 — step 1\n", "\u001b[0;31mdone\n"]},
           {"data": {"image/png": PNG, "text/plain": ["<Figure size 432x288 with 1 Axes>"]}, "metadata": {},
            "output_type": "display_data"}]


def _tutorial(as_string=False):
    """A TF1 tutorial notebook, before and after (the rewrites as the corpus pins them for .py files)."""
    before = _notebook([
        _markdown("# Séquence — un tutoriel\nTF 1.x"),
        _code("%matplotlib inline\nimport tensorflow as tf\nfrom tensorflow.contrib.seq2seq import sequence_loss",
              count=1),
        _code("!pip install tensorflow==1.15\nlogits = tf.placeholder(tf.float32, [None, 3, 5])", count=2),
        _code("weights = tf.ones([2, 3])  # poids\nloss = sequence_loss(\n    logits=logits, targets=Y, "
              "weights=weights)\nprint(loss)", outputs=OUTPUTS, count=3, as_string=as_string),
        _markdown("Fin."),
    ])
    after = copy.deepcopy(before)
    after["cells"][1]["source"] = "%matplotlib inline\nimport tensorflow as tf\nimport tf_seqloss".splitlines(True)
    source = ("weights = tf.ones([2, 3])  # poids\nloss = tf_seqloss.sequence_loss(\n    logits=logits, targets=Y, "
              "weights=weights)\nprint(loss)")
    after["cells"][3]["source"] = source if as_string else source.splitlines(True)
    return before, after


@pytest.mark.parametrize("as_string", [False, True], ids=["list-source", "string-source"])
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_code_cells_are_rewritten_and_every_other_byte_kept(layout, as_string, tmp_path, capsys):
    before, after = _tutorial(as_string)
    target = tmp_path / "tutorial.ipynb"
    target.write_bytes(_dump(before, **LAYOUTS[layout]))
    assert main([str(target), "--write"]) == 0
    _, err = capsys.readouterr()
    assert target.read_bytes() == _dump(after, **LAYOUTS[layout])
    lines = err.splitlines()
    assert lines[0] == (f"{target}:cell 4:2:8: INFO: `sequence_loss` -> `tf_seqloss.sequence_loss` "
                        "(contrib 1.14+ semantics)")
    assert all(NOTEBOOK_FINDING.match(line) for line in lines[:-1])
    assert lines[-1] == "tf-seqloss-upgrade: 1 file scanned, 1 rewritten, 0 unchanged, 0 refused, 0 skipped"
    # Once is enough: a second run changes nothing.
    assert main([str(target), "--write"]) == 0
    assert target.read_bytes() == _dump(after, **LAYOUTS[layout])


def test_a_utf8_bom_before_the_json_is_kept(tmp_path, capsys):
    before, after = _tutorial()
    target = tmp_path / "n.ipynb"
    target.write_bytes(b"\xef\xbb\xbf" + _dump(before, **LAYOUTS["jupyter"]))
    assert main([str(target), "--write"]) == 0
    assert target.read_bytes() == b"\xef\xbb\xbf" + _dump(after, **LAYOUTS["jupyter"])


def test_the_dry_run_diff_is_of_the_json_and_changes_nothing(tmp_path, capsys, monkeypatch):
    before, after = _tutorial()
    monkeypatch.chdir(tmp_path)
    (tmp_path / "n.ipynb").write_bytes(_dump(before, **LAYOUTS["jupyter"]))
    assert main(["n.ipynb"]) == 0
    out, err = capsys.readouterr()
    assert (tmp_path / "n.ipynb").read_bytes() == _dump(before, **LAYOUTS["jupyter"])
    assert out.startswith("--- a/n.ipynb\n+++ b/n.ipynb\n")
    assert '-    "loss = sequence_loss(\\n",\n+    "loss = tf_seqloss.sequence_loss(\\n",\n' in out
    assert "1 would be rewritten" in err.splitlines()[-1]


def test_an_import_stays_while_another_cell_uses_it(tmp_path, capsys):
    # Cells are one program: `tf` from the first cell resolves `tf.contrib` in the third, and the first
    # cell's `import tensorflow as tf` stays because the second still uses `tf`.
    before = _notebook([_code("import tensorflow as tf\n"), _code("x = tf.placeholder(tf.float32)\n"),
                        _code("loss = tf.contrib.seq2seq.sequence_loss(x, y, w)\n")])
    after = copy.deepcopy(before)
    after["cells"][0]["source"] = ["import tensorflow as tf\n", "import tf_seqloss\n"]
    after["cells"][2]["source"] = ["loss = tf_seqloss.sequence_loss(x, y, w)\n"]
    target = tmp_path / "n.ipynb"
    target.write_bytes(_dump(before, **LAYOUTS["jupyter"]))
    assert main([str(target), "--write"]) == 0
    assert target.read_bytes() == _dump(after, **LAYOUTS["jupyter"])


def test_magics_and_shell_lines_are_kept_verbatim_and_cell_magics_left_alone(tmp_path, capsys):
    line_magics = ("import tensorflow as tf\n"
                   "!pip install foo \\\n"
                   "    bar\n"
                   "for step in range(2):\n"
                   "    !echo $step\n"
                   "    %time loss = tf.contrib.seq2seq.sequence_loss(a, b, c)\n"
                   "files = !ls\n"
                   "tf.contrib.seq2seq.sequence_loss?\n"
                   "loss = tf.contrib.seq2seq.sequence_loss(a, b, c)\n")
    cell_magic = "%%time\nloss = tf.contrib.seq2seq.sequence_loss(a, b, c)\n"
    shell = "%%bash\necho tf.contrib.seq2seq.sequence_loss\n"
    before = _notebook([_code(line_magics), _code(cell_magic), _code(shell)])
    after = copy.deepcopy(before)
    # The new import goes after the cell's leading imports and magic lines (a blank line after it, as in
    # .py files); `tf` stays imported because the lines the tool cannot rewrite use it.
    after["cells"][0]["source"] = ("import tensorflow as tf\n"
                                   "!pip install foo \\\n"
                                   "    bar\n"
                                   "import tf_seqloss\n"
                                   "\n"
                                   "for step in range(2):\n"
                                   "    !echo $step\n"
                                   "    %time loss = tf.contrib.seq2seq.sequence_loss(a, b, c)\n"
                                   "files = !ls\n"
                                   "tf.contrib.seq2seq.sequence_loss?\n"
                                   "loss = tf_seqloss.sequence_loss(a, b, c)\n").splitlines(True)
    target = tmp_path / "n.ipynb"
    target.write_bytes(_dump(before, **LAYOUTS["jupyter"]))
    assert main([str(target), "--write"]) == 0
    _, err = capsys.readouterr()
    assert target.read_bytes() == _dump(after, **LAYOUTS["jupyter"])
    findings = [NOTEBOOK_FINDING.match(line).groupdict() for line in err.splitlines()[:-1]]
    assert [(f["cell"], f["line"], f["col"], f["level"]) for f in findings] == [
        ("1", "9", "8", "INFO"), ("2", "2", "8", "WARNING")]
    # An import only the unseen lines use is kept; one nothing uses any more goes.
    before["cells"][0]["source"] = ["from tensorflow.contrib.seq2seq import sequence_loss\n", "%time x = f(1)\n",
                                    "loss = sequence_loss(a, b, c)\n"]
    target.write_bytes(_dump(before, **LAYOUTS["jupyter"]))
    assert main([str(target), "--write"]) == 0
    assert json.loads(target.read_bytes())["cells"][0]["source"] == [
        "%time x = f(1)\n", "import tf_seqloss\n", "\n", "loss = tf_seqloss.sequence_loss(a, b, c)\n"]
    before["cells"][0]["source"][1] = "%time x = sequence_loss(1)\n"
    target.write_bytes(_dump(before, **LAYOUTS["jupyter"]))
    assert main([str(target), "--write"]) == 0
    assert json.loads(target.read_bytes())["cells"][0]["source"] == [
        "from tensorflow.contrib.seq2seq import sequence_loss\n", "%time x = sequence_loss(1)\n", "import tf_seqloss\n",
        "\n", "loss = tf_seqloss.sequence_loss(a, b, c)\n"]
    assert findings[1]["message"].startswith("left alone, as the cell starts with a cell magic; edit it by hand: ")


def test_a_cell_that_does_not_parse_is_an_error_and_the_others_are_rewritten(tmp_path, capsys):
    before = _notebook([_code("import tensorflow as tf\n"), _code("x = 1\ny = = 2\n"),
                        _code("loss = tf.contrib.seq2seq.sequence_loss(a, b, c)")])
    after = copy.deepcopy(before)
    after["cells"][0]["source"] = ["import tf_seqloss\n"]  # `tf` is no longer used: its import goes, as in .py files
    after["cells"][2]["source"] = ["loss = tf_seqloss.sequence_loss(a, b, c)"]
    target = tmp_path / "n.ipynb"
    target.write_bytes(_dump(before, **LAYOUTS["colab"]))
    assert main([str(target), "--write"]) == 1
    _, err = capsys.readouterr()
    assert target.read_bytes() == _dump(after, **LAYOUTS["colab"])
    assert err.splitlines()[0] == (f"{target}:cell 2:2:5: ERROR: cannot parse this cell (Python "
                                   f"{sys.version_info[0]}.{sys.version_info[1]}), left unchanged: invalid syntax")


@pytest.mark.parametrize("content,expected", [
    (b'{"cells": [}', ":1:12: ERROR: not a notebook: invalid JSON"),
    (b'{"nbformat": 3, "worksheets": []}', ":1:1: ERROR: not a notebook this tool can read: it is an nbformat 3"),
    (b'[1, 2]', ":1:1: ERROR: not a notebook this tool can read: the top level is not a JSON object"),
    (b'{"nbformat": 4, "cells": [{"cell_type": "code", "source": 7}]}', ":1:1: ERROR: not a notebook this tool can "
                                                                          "read: code cell 1 has no `source`"),
    (b'\xff\xfe{}', ":1:1: ERROR: not a notebook: not UTF-8"),
])
def test_a_file_that_is_not_a_notebook_is_refused_with_one_line(content, expected, tmp_path, capsys):
    target, other = tmp_path / "a.ipynb", tmp_path / "b.py"
    target.write_bytes(content)
    other.write_text("import tensorflow as tf\nx = tf.losses.sparse_softmax_cross_entropy(y, z)\n")
    assert main([str(tmp_path), "--write"]) == 1
    _, err = capsys.readouterr()
    assert target.read_bytes() == content
    assert err.splitlines()[0].startswith(f"{target}{expected}"), err
    assert other.read_text().startswith("import tf_seqloss\n")


def test_a_notebook_in_another_language_is_skipped(tmp_path, capsys):
    notebook = _notebook([_code("library(tensorflow)\n")], language="R")
    (tmp_path / "r.ipynb").write_bytes(_dump(notebook, **LAYOUTS["jupyter"]))
    (tmp_path / "m.py").write_text("x = 1\n")
    assert main([str(tmp_path)]) == 0
    _, err = capsys.readouterr()
    assert err.splitlines()[-1].endswith("1 file scanned, 0 would be rewritten, 1 unchanged, 0 refused, 1 skipped "
                                         "(1 not a Python notebook)")


def test_the_module_entry_point_rewrites_a_named_notebook(tmp_path):
    before, after = _tutorial()
    target = tmp_path / "n.ipynb"
    target.write_bytes(_dump(before, **LAYOUTS["jupyter"]))
    run = subprocess.run([sys.executable, "-m", "tf_seqloss_upgrade", str(target), "--write"], env=ENV,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert target.read_bytes() == _dump(after, **LAYOUTS["jupyter"])
