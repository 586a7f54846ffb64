"""The public surface, and no dependency on TensorFlow Addons (which cannot import on TF >= 2.16)."""

import pkgutil
import subprocess
import sys

import pytest

import tf_seqloss


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
