"""`tf-seqloss-upgrade` on real code: a corpus of excerpts with expected rewrites and reports, runnable
TF1 scripts whose printed losses match the recorded (or NumPy float64) numbers after rewriting, the
refusals, idempotence, the CLI's diff / `--write` / exit codes, and the ImportError without libcst."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("libcst", reason='the rewriter needs the `upgrade` extra: pip install "tf_seqloss[upgrade]"')

import tf_seqloss  # noqa: E402
from tf_seqloss.upgrade import SOFTMAX_LOSS_FUNCTION_SUGGESTION, upgrade_source  # noqa: E402
from tf_seqloss.upgrade.cli import main  # noqa: E402

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
CORPUS = sorted(p.name[: -len(".before.py")] for p in (HERE / "upgrade_corpus").glob("*.before.py"))
SCRIPTS = sorted(p.name for p in (HERE / "upgrade_scripts").glob("*.py"))
FINDING = re.compile(r"^(?P<path>[^:\n]+):(?P<line>\d+):(?P<col>\d+): (?P<level>INFO|WARNING|ERROR): (?P<message>.+)$")


def _version(name):
    return "1.4" if "1_4" in name else "1.15"


def test_corpus_is_not_empty():
    assert len(CORPUS) >= 8 and len(SCRIPTS) >= 5


@pytest.mark.parametrize("name", CORPUS)
def test_corpus_rewrites_as_expected(name):
    before = (HERE / "upgrade_corpus" / f"{name}.before.py").read_text()
    result = upgrade_source(before, path=f"{name}.before.py", contrib_version=_version(name))
    assert result.code == (HERE / "upgrade_corpus" / f"{name}.after.py").read_text()
    report = "".join(f"{finding}\n" for finding in result.findings)
    assert report == (HERE / "upgrade_corpus" / f"{name}.report.txt").read_text()
    assert all(FINDING.match(line) for line in report.splitlines())
    compile(result.code, name, "exec")  # still Python


@pytest.mark.parametrize("name", CORPUS)
def test_rewriting_twice_changes_nothing_more(name):
    before = (HERE / "upgrade_corpus" / f"{name}.before.py").read_text()
    once = upgrade_source(before, contrib_version=_version(name))
    twice = upgrade_source(once.code, contrib_version=_version(name))
    assert twice.code == once.code
    assert twice.code.count("import tf_seqloss\n") <= 1
    # Only the refusals are reported again; nothing is rewritten a second time.
    assert [f.level for f in twice.findings if f.level != "WARNING"] == [
        f.level for f in once.findings if f.level == "ERROR"]


def test_refused_file_comes_back_unchanged_with_one_error_per_refusal():
    before = (HERE / "upgrade_corpus" / "refusals.before.py").read_text()
    result = upgrade_source(before)
    assert result.code == before and result.refused
    assert [f.line for f in result.findings if f.level == "ERROR"] == [3, 11, 12, 14, 15, 16, 17]


def test_sampled_softmax_suggestion_names_a_public_function():
    assert "`tf_seqloss.sampled_sequence_loss`" in SOFTMAX_LOSS_FUNCTION_SUGGESTION
    assert "sampled_sequence_loss" in tf_seqloss.__all__
    assert "`labels=`" in SOFTMAX_LOSS_FUNCTION_SUGGESTION


@pytest.mark.parametrize("function,ok", [
    ("lambda labels, logits: tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits)", True),
    ("lambda **kwargs: xent(**kwargs)", True),
    ("lambda logits, labels, scale=2.0: scale", True),
    ("tf.nn.sparse_softmax_cross_entropy_with_logits", True),
    ("lambda inputs, labels: inputs", False),
    ("functools.partial(xent, scale=2)", False),
    ("tf.nn.nce_loss", False),
])
def test_softmax_loss_function_is_rewritten_only_when_provably_labels_logits(function, ok):
    source = ("import tensorflow as tf\n"
              f"loss = tf.contrib.seq2seq.sequence_loss(a, b, c, softmax_loss_function={function})\n")
    result = upgrade_source(source)
    assert ("tf_seqloss.sequence_loss" in result.code) == ok
    assert result.refused == (not ok)


def test_contrib_1_4_flags_sum_over_as_a_version_mismatch():
    source = "import tensorflow as tf\nx = tf.contrib.seq2seq.sequence_loss(a, b, c, sum_over_batch=True)\n"
    result = upgrade_source(source, contrib_version="1.4")
    assert result.refused and "--contrib-version 1.15" in result.findings[0].message


def test_keras_reduction_is_left_alone_in_tf2_code():
    source = "import tensorflow as tf\nloss = tf.keras.losses.MeanSquaredError(reduction=tf.losses.Reduction.SUM)\n"
    result = upgrade_source(source)
    assert result.code == source and [f.level for f in result.findings] == ["WARNING"]


def test_bad_contrib_version_names_the_argument():
    message = r"`contrib_version` must be one of \('1.4', '1.15'\). Received: contrib_version='2.0'"
    with pytest.raises(ValueError, match=message):
        upgrade_source("", contrib_version="2.0")


def _run_python(path, cwd):
    env = dict(os.environ, PYTHONPATH=str(REPO), TF_CPP_MIN_LOG_LEVEL="2")
    return subprocess.run([sys.executable, str(path)], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.slow
@pytest.mark.keras
@pytest.mark.parametrize("script", SCRIPTS)
def test_rewritten_script_prints_the_recorded_loss(script, tmp_path):
    source = (HERE / "upgrade_scripts" / script).read_text()
    expected = [float(x) for x in re.search(r"^# expected: (.+)$", source, re.M).group(1).split()]
    version = re.search(r"^# contrib-version: (\S+)$", source, re.M)
    result = upgrade_source(source, path=script, contrib_version=version.group(1) if version else "1.15")
    assert not result.refused, result.findings
    code_lines = [line for line in result.code.splitlines() if not line.lstrip().startswith("#")]
    assert not [line for line in code_lines if "contrib" in line or "tensorflow_addons" in line]
    rewritten = tmp_path / script
    rewritten.write_text(result.code)
    run = _run_python(rewritten, tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    printed = [float(x) for x in re.findall(r"-?\d+\.\d+(?:e-?\d+)?", run.stdout)]
    # Recorded TF 1.x output has 6 significant digits; NumPy references are float64 of float32 inputs.
    assert printed == pytest.approx(expected, rel=2e-6, abs=1e-6)


def test_cli_prints_a_diff_and_report_without_changing_files(tmp_path, capsys):
    target = tmp_path / "model.py"
    before = (HERE / "upgrade_corpus" / "hunkim_hello_rnn.before.py").read_text()
    target.write_text(before)
    assert main([str(tmp_path)]) == 0
    out, err = capsys.readouterr()
    assert target.read_text() == before
    assert "-sequence_loss = tf.contrib.seq2seq.sequence_loss(" in out and "+import tf_seqloss" in out
    assert FINDING.match(err.splitlines()[0]).group("level") == "INFO"


def test_cli_write_rewrites_in_place_and_exits_1_on_a_refusal(tmp_path, capsys):
    good, bad = tmp_path / "good.py", tmp_path / "bad.py"
    good.write_text((HERE / "upgrade_corpus" / "ptb_word_lm.before.py").read_text())
    bad.write_text((HERE / "upgrade_corpus" / "refusals.before.py").read_text())
    assert main([str(good), str(bad), "--write"]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert good.read_text() == (HERE / "upgrade_corpus" / "ptb_word_lm.after.py").read_text()
    assert bad.read_text() == (HERE / "upgrade_corpus" / "refusals.before.py").read_text()
    assert sum(line.split(": ")[1] == "ERROR" for line in err.splitlines()) == 7


def test_cli_rejects_unknown_contrib_version_with_exit_2(capsys):
    with pytest.raises(SystemExit) as raised:
        main(["x.py", "--contrib-version", "1.10"])
    assert raised.value.code == 2


def test_module_entry_point_runs(tmp_path):
    target = tmp_path / "m.py"
    target.write_text("import tensorflow as tf\nx = tf.losses.sparse_softmax_cross_entropy(y, z)\n")
    env = dict(os.environ, PYTHONPATH=str(REPO), TF_CPP_MIN_LOG_LEVEL="2")
    run = subprocess.run([sys.executable, "-m", "tf_seqloss.upgrade", str(target), "--write"], env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert target.read_text() == "import tf_seqloss\n\nx = tf_seqloss.sparse_softmax_cross_entropy(y, z)\n"


def test_without_libcst_the_import_error_names_the_extra():
    code = ("import sys; sys.modules['libcst'] = None\n"
            "try:\n    import tf_seqloss.upgrade\nexcept ImportError as err:\n    print(err)\n")
    env = dict(os.environ, PYTHONPATH=str(REPO), TF_CPP_MIN_LOG_LEVEL="2")
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert 'pip install "tf_seqloss[upgrade]"' in run.stdout


def test_docs_before_and_after_is_what_the_tool_prints(tmp_path, capsys, monkeypatch):
    readme = (REPO / "docs" / "migrating.md").read_text()
    shown = re.search(r"```diff\n(.*?)```", readme, re.S).group(1)
    excerpt = (HERE / "upgrade_corpus" / "hunkim_hello_rnn.before.py").read_text().split("\n", 1)[1]
    (tmp_path / "lab.py").write_text(excerpt)
    monkeypatch.chdir(tmp_path)
    assert main(["lab.py"]) == 0
    out, err = capsys.readouterr()
    assert out == shown
    assert err.strip() in readme
