"""The public surface, and no dependency on TensorFlow Addons (which cannot import on TF >= 2.16)."""

import pkgutil
import re
import subprocess
import sys

import pytest

import tf_seqloss
from tests._pyproject import ROOT, pyproject


def test_public_surface_is_all_and_importable():
    for name in tf_seqloss.__all__:
        assert getattr(tf_seqloss, name) is not None, name
    assert {"sequence_loss", "SequenceLoss", "softmax_cross_entropy", "sparse_softmax_cross_entropy",
            "Reduction"} <= set(tf_seqloss.__all__)


@pytest.mark.slow
def test_importing_the_package_never_imports_tensorflow_addons():
    code = ("import sys, tf_seqloss, tf_seqloss._keras_loss, tf_seqloss._layers, tf_seqloss.compat.tfa; "
            "print([m for m in sys.modules if m.startswith('tensorflow_addons')])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"


def test_compat_and_the_rewriter_are_importable_modules():
    from tf_seqloss.compat import tfa
    from tf_seqloss.upgrade import cli

    assert callable(tfa.sequence_loss) and callable(cli.main)


@pytest.mark.slow
def test_the_rewriter_console_script_answers_help():
    out = subprocess.run([sys.executable, "-m", "tf_seqloss.upgrade", "--help"], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0 and "--contrib-version" in out.stdout


def test_the_public_surface_is_exactly_all_and_the_modules_behind_it_are_private():
    # Subpackages appear as attributes once imported (other tests import them): they are the public ones below.
    public = sorted(name for name in dir(tf_seqloss)
                    if not name.startswith("_") and name not in ("compat", "keras_hub", "upgrade"))
    assert public == sorted(tf_seqloss.__all__)
    modules = [name for _, name, _ in pkgutil.iter_modules(tf_seqloss.__path__)]
    assert sorted(name for name in modules if not name.startswith("_")) == ["compat", "keras_hub", "upgrade"]


# --- the release metadata (pyproject.toml), the changelog and the support table --------------------------

# The project's canonical addresses; pyproject.toml's [project.urls] states them once, the rest must agree.
REPOSITORY = "https://github.com/tf-seqloss/tf_seqloss"
SITE = "https://tf-seqloss.github.io/tf_seqloss/"


def test_project_urls_are_the_canonical_addresses_and_everything_else_agrees():
    urls = pyproject()["project"]["urls"]
    assert urls["Homepage"] == urls["Source"] == REPOSITORY
    assert urls["Documentation"] == SITE
    assert urls["Changelog"] == REPOSITORY + "/blob/main/CHANGELOG.md"
    changelog = (ROOT / "CHANGELOG.md").read_text()
    for link in re.findall(r"\]: (\S+)$", changelog, re.M):
        assert link.startswith(REPOSITORY + "/"), link
    mkdocs = ROOT / "mkdocs.yml"
    if mkdocs.exists():  # the documentation site's settings, once they exist
        text = mkdocs.read_text()
        assert re.search(rf"^site_url: {re.escape(SITE)}$", text, re.M)
        assert re.search(rf"^repo_url: {re.escape(REPOSITORY)}$", text, re.M)


def test_the_version_is_tf_seqloss_version_and_the_changelog_has_its_section():
    project = pyproject()
    assert "version" not in project["project"] and project["project"]["dynamic"] == ["version"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "tf_seqloss.__version__"}
    assert re.fullmatch(r"\d+\.\d+\.\d+", tf_seqloss.__version__)
    changelog = (ROOT / "CHANGELOG.md").read_text()
    sections = re.findall(r"^## \[(\d+\.\d+\.\d+)\] - (\d{4}-\d\d-\d\d)$", changelog, re.M)
    assert sections[0][0] == tf_seqloss.__version__  # the newest release comes first
    assert [version for version, _ in sections] == ["1.0.0", "0.1.0"]
    for heading in re.findall(r"^### (.+)$", changelog, re.M):
        assert heading in ("Added", "Changed", "Deprecated", "Removed", "Fixed", "Security"), heading


def test_classifiers_say_typed_stable_tensorflow_and_the_license_expression_is_apache():
    project = pyproject()["project"]
    classifiers = set(project["classifiers"])
    assert {"Typing :: Typed", "Framework :: TensorFlow", "Development Status :: 5 - Production/Stable"} <= classifiers
    assert (ROOT / "tf_seqloss" / "py.typed").exists()
    assert project["license"] == "Apache-2.0"
    # PEP 639: the expression replaces the License classifier, which setuptools refuses beside it.
    assert not [classifier for classifier in classifiers if classifier.startswith("License ::")]
    assert pyproject()["tool"]["setuptools"]["package-data"] == {"tf_seqloss": ["py.typed"]}
    assert not (ROOT / "setup.cfg").exists()


def test_the_support_table_lists_every_pinned_combination():
    support = (ROOT / "docs" / "support.md").read_text()
    rows = re.findall(r"^\| `([\w-]+)`[^|]*\| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|", support, re.M)
    table = {name: (python, tensorflow, keras, tf_keras) for name, python, tensorflow, keras, tf_keras in rows}
    pinned = {}
    for path in (ROOT / "constraints").glob("*.txt"):
        text = path.read_text()
        pins = dict(re.findall(r"^([A-Za-z_]+)==([\d.]+)$", text, re.M))
        python = re.search(r"^# python: (\d+\.\d+)\.\d+$", text, re.M).group(1)
        pinned[path.stem] = (python, pins["tensorflow"], pins["keras"], pins["tf_keras"])
    assert table == pinned


def readme_links(text):
    """The targets of the Markdown links and images of `text` (inline and reference style), outside code."""
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    text = re.sub(r"`[^`\n]*`", "", text)
    inline = re.findall(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)", text)
    references = re.findall(r"^\s*\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)", text, re.M)
    html = re.findall(r"""(?:href|src)=["']([^"']+)["']""", text)
    return inline + references + html


def test_readme_link_reader_finds_relative_links():
    found = readme_links("[a](LICENSE) ![b](docs/x.png) [c](#quick-start) `[d](no)`\n[e]: CHANGELOG.md\n"
                         '<img src="x.svg"> [f](https://example.org/y)\n```\n[g](code)\n```\n')
    assert found == ["LICENSE", "docs/x.png", "#quick-start", "https://example.org/y", "CHANGELOG.md", "x.svg"]


def test_every_readme_link_works_on_a_package_index():
    # The README is the long description: on a package index a relative link points nowhere.
    links = readme_links((ROOT / "README.md").read_text())
    assert links
    relative = [link for link in links if not re.match(r"(https?://|#)", link)]
    assert relative == []


def test_ci_runs_the_release_check_and_a_short_run_on_the_oldest_combination():
    text = (ROOT / ".ci" / "run").read_text().replace("\\\n", " ")
    steps = [" ".join(line.split()) for line in text.splitlines() if line.startswith("bash ")]
    # Every step runs, and any failure counts: in the foreground through `|| status=1`, in the background
    # through its `wait`.
    background = [step for step in steps if step.endswith(" &")]
    assert all(step.endswith(" || status=1") for step in steps if step not in background), steps
    assert len(re.findall(r'^wait "\$\w+" \|\| \{ status=1;', text, re.M)) == len(background) == 3
    assert any(step.startswith("bash scripts/check_release.sh") for step in steps)
    # The oldest combination's environment is made beside the first step (which makes ./.venv), its tests later.
    install = steps.index('bash scripts/test_versions.sh oldest --install-only > "$logs/oldest.log" 2>&1 &')
    assert install < steps.index("bash scripts/test.sh || status=1")
    oldest = [step for step in steps if step.startswith("bash scripts/test_versions.sh oldest tests/")]
    assert len(oldest) == 1
    for selected in ("tests/test_sequence_loss.py", "tests/test_keras_loss.py", "tests/test_keras_distribute.py"):
        assert f" {selected} " in oldest[0], selected
    assert "bash scripts/test.sh || status=1" in steps and "bash scripts/test.sh -m slow || status=1" in steps
    assert text.rstrip().endswith('exit "$status"')
