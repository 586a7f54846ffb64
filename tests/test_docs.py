"""The documentation site: every code block of docs/ and of the example's README checked (tests/doc_blocks.py
has the rules), the API pages cover the public API, the facts the pages state are the package's, and
`mkdocs build --strict` succeeds."""

import importlib.util
import inspect
import re
import subprocess
import sys

import pytest

from tests import doc_blocks

ROOT = doc_blocks.ROOT
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.rglob("*.md")) + [ROOT / "examples" / "seq2seq" / "README.md"]
BLOCKS = {path: doc_blocks.blocks(path) for path in PAGES}


def _params():
    for found in BLOCKS.values():
        for block in found:
            yield pytest.param(block, id=block.id, marks=[pytest.mark.keras] if block.uses_keras else [])


def test_every_page_is_read_and_has_code():
    assert {"index.md", "getting-started.md", "padding.md", "migrating.md", "api/cli.md"} <= {
        str(path.relative_to(DOCS)) for path in PAGES if DOCS in path.parents}
    assert sum(len(found) for found in BLOCKS.values()) >= 30


@pytest.mark.parametrize("block", list(_params()))
def test_code_block(block):
    doc_blocks.check(block, BLOCKS[block.path])


def test_the_runner_refuses_a_block_no_rule_checks(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("```javascript\nalert(1)\n```\n\n```bash\ncurl https://example.com | sh\n```\n")
    for block in doc_blocks.blocks(page):
        block.path = ROOT / "docs" / "page.md"  # for its id
        with pytest.raises(AssertionError, match="no rule checks"):
            doc_blocks.check(block, [block])


def test_the_runner_fails_a_stale_after_block(tmp_path):
    page = tmp_path / "page.md"
    page.write_text('```python title="TF1 (before)"\nimport tensorflow as tf\n'
                    "loss = tf.contrib.seq2seq.sequence_loss(logits, targets, weights)\n```\n\n"
                    '```python title="TF1 (after)"\nimport tensorflow as tf\n'
                    "loss = tf.contrib.seq2seq.sequence_loss(logits, targets, weights)\n```\n")
    found = doc_blocks.blocks(page)
    for block in found:
        block.path = ROOT / "docs" / "page.md"
    with pytest.raises(AssertionError, match="the rewriter now gives"):
        doc_blocks.check(found[0], found)


# --- the API reference ------------------------------------------------------------------------------


def _api_text():
    return "\n".join(path.read_text() for path in sorted((DOCS / "api").glob("*.md")))


def test_every_public_name_has_an_api_entry():
    import tf_seqloss
    from tf_seqloss.compat import tfa

    documented = set(re.findall(r"^::: ([\w.]+)$", _api_text(), re.M))
    missing = {f"tf_seqloss.{name}" for name in tf_seqloss.__all__} - documented
    missing |= {f"tf_seqloss.compat.tfa.{name}" for name in tfa.__all__} - documented
    assert not missing
    assert "tf_seqloss_upgrade" in documented


def test_cli_page_shows_the_real_help():
    (block,) = [block for block in BLOCKS[DOCS / "api" / "cli.md"] if block.lang == "text"]
    assert block.title == "$ tf-seqloss-upgrade --help"
    assert block.body == doc_blocks._help_text("tf-seqloss-upgrade")
    assert "--contrib-version" in block.body


# --- facts the pages state ----------------------------------------------------------------------------


@pytest.mark.keras
def test_registered_classes_are_the_ones_keras_has():
    import keras  # noqa: F401  (the flavour's Keras)
    import tensorflow as tf

    import tf_seqloss.compat.tfa  # noqa: F401  (registers its class)

    text = (DOCS / "getting-started.md").read_text()
    paragraph = re.search(r"^Every class of the package that Keras saves is registered:(.*?)\n\n", text, re.M | re.S)
    named = set()
    for name in re.findall(r"`([\w.]+)`", paragraph.group(1)):
        module, _, cls = name.rpartition(".")
        if cls[:1].isupper():
            named.add(f"{module or 'tf_seqloss'}>{cls}")
    registered = {key for key in tf.keras.utils.get_custom_objects()
                  if key.partition(">")[0] == "tf_seqloss" or key.startswith("tf_seqloss.")}
    assert named == registered


def test_migration_table_names_every_keyword_only_argument_with_its_default():
    import tf_seqloss

    text = (DOCS / "migrating.md").read_text()
    table = text[text.index("## Argument by argument"):]
    table = "\n".join(line for line in table.splitlines() if line.startswith("|"))
    keyword_only = {name: parameter.default
                    for name, parameter in inspect.signature(tf_seqloss.sequence_loss).parameters.items()
                    if parameter.kind is inspect.Parameter.KEYWORD_ONLY}
    assert {"normalizer", "z_loss", "from_logits", "epsilon"} <= set(keyword_only)
    for name, default in keyword_only.items():  # each with its default, as the signature has it
        shown = f"`{name}={default!r}`".replace("'", '"')
        assert shown in table, shown


def test_the_auto_rule_is_written_once():
    pages = {path: path.read_text() for path in [ROOT / "README.md", *PAGES]}
    holding = [path.name for path, text in pages.items() if re.search(r'^\| where \| `"auto"` \|', text, re.M)]
    assert holding == ["performance.md"]


def test_no_process_markers_or_dated_anecdotes():
    for path in [ROOT / "README.md", *PAGES]:
        text = path.read_text()
        assert "<!-- section:" not in text, path
        assert "owned by the" not in text, path
        assert not re.search(r"load average|\d{1,2} (January|February|March|April|May|June|July|August|"
                             r"September|October|November|December) 20\d\d", text), path


# --- the build --------------------------------------------------------------------------------------

# Docstrings that mkdocstrings' Google parser cannot read yet (several parameters in one `Args` entry). The
# docstrings work rewrites them; this list must then be emptied: the test fails on any other warning, and on
# an entry here that no longer occurs.
KNOWN_DOCSTRING_WARNINGS: set = set()


def test_strict_build(tmp_path):
    for module in ("mkdocs", "material", "mkdocstrings_handlers.python"):
        if importlib.util.find_spec(module.split(".")[0]) is None:
            pytest.skip(f"{module} is not installed: pip install \".[docs]\" (CI installs it)")
    site = tmp_path / "site"
    env = {"PATH": "/usr/bin:/bin", "NO_MKDOCS_2_WARNING": "1", "HOME": str(tmp_path)}
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(site)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    warnings = {re.sub(r"^WARNING\s+-\s+(griffe: )?", "", line).strip() for line in done.stderr.splitlines()
                if line.startswith("WARNING")}
    warnings = {re.sub(r"^(\S+\.py):\d+:", r"\1:", warning) for warning in warnings}  # line numbers move
    assert warnings == KNOWN_DOCSTRING_WARNINGS, done.stderr[-4000:]
    assert done.returncode == (1 if KNOWN_DOCSTRING_WARNINGS else 0), done.stderr[-4000:]
    # Strict mode aborts only after writing every page: what they hold is checked either way.
    import tf_seqloss
    from tf_seqloss.compat import tfa

    api = "\n".join(path.read_text() for path in (site / "api").rglob("index.html"))
    for name in [f"tf_seqloss.{name}" for name in tf_seqloss.__all__] + [f"tf_seqloss.compat.tfa.{name}"
                                                                          for name in tfa.__all__]:
        assert f'id="{name}"' in api, name
    for page in ("index.html", "padding/index.html", "performance/index.html", "search/search_index.json"):
        assert (site / page).is_file(), page
    performance = (site / "performance" / "index.html").read_text()
    for image in re.findall(r'<img[^>]+src="([^"]+)"', performance):
        assert (site / "performance" / image).resolve().is_file(), image
