"""Loading a model runs no code the user did not allow: the callables in `SequenceLoss`/`SequenceLossLayer` configs.

A crafted `.keras` file is a real saved model whose `softmax_loss_function` config is edited to name a
module of the test's own, placed in a temporary folder on `sys.path`, that writes a marker file when it is
imported and another when its function is called. Safe mode must refuse the file before either happens,
under Keras 3 and tf_keras alike (tf_keras' generic deserialiser imports any module a config names).
"""

import json
import sys
import uuid
import zipfile

import numpy as np
import pytest
import tensorflow as tf

import tf_seqloss
from tests import reference
from tf_seqloss import _keras
from tf_seqloss._keras import IS_KERAS_3, keras

VOCAB, TIME = 7, 5
LENGTHS = np.array([5, 2, 4])


@keras.saving.register_keras_serializable(package="tf_seqloss_safe_tests")
def doubled_xent(labels, logits):
    return 2.0 * tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits)


def tripled_xent(labels, logits):  # Not registered: loads only through `custom_objects`.
    return 3.0 * tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits)


@keras.saving.register_keras_serializable(package="tf_seqloss_safe_tests")
class ScaledXent:
    """A registered callable object: its class is found by its registered name."""

    def __init__(self, scale=1.0):
        self.scale = scale

    def __call__(self, labels, logits):
        return self.scale * tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits)

    def get_config(self):
        return {"scale": self.scale}

    @classmethod
    def from_config(cls, config):
        return cls(**config)


HOSTILE_SOURCE = '''
import pathlib

_HERE = pathlib.Path(__file__).parent
(_HERE / "imported.marker").write_text("imported")


def hook(labels=None, logits=None, **kwargs):
    (_HERE / "called.marker").write_text("called")
    import tensorflow as tf
    return tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits)


class Hook:
    def __init__(self, **kwargs):
        (_HERE / "called.marker").write_text("called")

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def get_config(self):
        return {}

    def __call__(self, labels=None, logits=None):
        return hook(labels=labels, logits=logits)
'''


class Hostile:
    """A module of the test's own on `sys.path`; its marker files say whether it was imported or called."""

    def __init__(self, folder, name):
        self.folder, self.name = folder, name

    @property
    def imported(self) -> bool:
        return (self.folder / "imported.marker").exists()

    @property
    def called(self) -> bool:
        return (self.folder / "called.marker").exists()

    def assert_never_ran(self):
        assert not self.imported and not self.called and self.name not in sys.modules

    def configs(self):
        """Configs naming the module's code in every shape a `.keras` file can hold, by case name."""
        module = self.name
        return {
            "function_of_its_module": {"module": module, "class_name": "function", "config": "hook",
                                       "registered_name": None},
            "function_as_keras_saves_one": {"module": module, "class_name": "function", "config": "hook",
                                            "registered_name": "function"},
            "unregistered_registered_name": {"module": module, "class_name": "function", "config": "hook",
                                             "registered_name": "tf_seqloss_safe_tests>hook"},
            "class_of_its_module": {"module": module, "class_name": "Hook", "config": {},
                                    "registered_name": None},
            "class_with_an_unregistered_name": {"module": module, "class_name": "Hook", "config": {},
                                                "registered_name": "tf_seqloss_safe_tests>Hook"},
            "dotted_string": f"{module}.hook",
        }


CASES = ["function_of_its_module", "function_as_keras_saves_one", "unregistered_registered_name",
         "class_of_its_module", "class_with_an_unregistered_name", "dotted_string"]
STDLIB_CONFIGS = {
    "os_system_string": "os.system",
    "os_system_function": {"module": "os", "class_name": "function", "config": "system", "registered_name": None},
    "subprocess_run": {"module": "subprocess", "class_name": "function", "config": "run",
                       "registered_name": None},
    "builtins_exec": {"module": "builtins", "class_name": "function", "config": "exec",
                      "registered_name": "function"},
}
REFUSED = r"`softmax_loss_function` of `SequenceLoss(Layer)?` in safe mode(.|\n)*safe_mode=False"


@pytest.fixture
def hostile(tmp_path, monkeypatch):
    folder = tmp_path / "hostile"
    folder.mkdir()
    name = f"tf_seqloss_hostile_{uuid.uuid4().hex}"
    (folder / f"{name}.py").write_text(HOSTILE_SOURCE)
    monkeypatch.syspath_prepend(str(folder))
    yield Hostile(folder, name)
    sys.modules.pop(name, None)


def _batch():
    rng = np.random.default_rng(0)
    mask = (np.arange(TIME) < LENGTHS[:, None]).astype(np.float32)
    tokens = rng.integers(1, VOCAB, size=mask.shape).astype(np.int32)
    targets = rng.integers(1, VOCAB, size=mask.shape).astype(np.int32)
    return tokens, targets, mask


def _loss_model(fn):
    """A model compiled with `SequenceLoss(softmax_loss_function=fn)`."""
    keras.utils.set_random_seed(0)
    tokens = keras.Input((TIME,), dtype="int32")
    logits = keras.layers.Dense(VOCAB)(keras.layers.Embedding(VOCAB, 4)(tokens))
    model = keras.Model(tokens, logits)
    model.compile(optimizer="sgd", loss=tf_seqloss.SequenceLoss(softmax_loss_function=fn))
    return model


def _layer_model(fn):
    """A model ending in `SequenceLossLayer(softmax_loss_function=fn)`, compiled without a loss."""
    keras.utils.set_random_seed(0)
    tokens = keras.Input((TIME,), dtype="int32")
    targets = keras.Input((TIME,), dtype="int32")
    weights = keras.Input((TIME,), dtype="float32")
    logits = keras.layers.Dense(VOCAB)(keras.layers.Embedding(VOCAB, 4)(tokens))
    outputs = tf_seqloss.SequenceLossLayer(softmax_loss_function=fn)(logits, targets, weights=weights)
    model = keras.Model([tokens, targets, weights], outputs)
    model.compile(optimizer="sgd")
    return model


MODELS = {"loss": _loss_model, "layer": _layer_model}


def _evaluate(model, kind):
    tokens, targets, mask = _batch()
    if kind == "loss":
        return model.evaluate(tokens, targets, sample_weight=mask, batch_size=len(tokens), verbose=0)
    return model.evaluate([tokens, targets, mask], batch_size=len(tokens), verbose=0)


def _save(model, folder):
    path = folder / "model.keras"
    model.save(str(path))
    return path


def _replace_softmax_loss_function(node, replacement) -> int:
    count = 0
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "softmax_loss_function" and value is not None:
                node[key] = replacement
                count += 1
            else:
                count += _replace_softmax_loss_function(value, replacement)
    elif isinstance(node, list):
        for value in node:
            count += _replace_softmax_loss_function(value, replacement)
    return count


def _craft(path, replacement):
    """Returns a copy of the `.keras` file at `path` whose `softmax_loss_function` configs are `replacement`."""
    with zipfile.ZipFile(path) as archive:
        entries = {name: archive.read(name) for name in archive.namelist()}
    config = json.loads(entries["config.json"])
    assert _replace_softmax_loss_function(config, replacement) >= 1
    entries["config.json"] = json.dumps(config).encode("utf-8")
    crafted = path.with_name("crafted.keras")
    with zipfile.ZipFile(crafted, "w") as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    return crafted


def test_the_hostile_module_writes_its_markers_when_imported_and_called(hostile):
    # The markers the tests below look for do appear when the module runs: their absence means something.
    hostile.assert_never_ran()
    module = __import__(hostile.name)
    assert hostile.imported and not hostile.called
    module.hook(labels=tf.constant([0]), logits=tf.zeros([1, 2]))
    assert hostile.called


@pytest.mark.parametrize("kind", sorted(MODELS))
@pytest.mark.parametrize("case", CASES)
def test_safe_mode_refuses_a_keras_file_naming_any_module(hostile, tmp_path, kind, case):
    crafted = _craft(_save(MODELS[kind](doubled_xent), tmp_path), hostile.configs()[case])
    with pytest.raises(ValueError, match=REFUSED):
        keras.models.load_model(str(crafted))
    hostile.assert_never_ran()


@pytest.mark.parametrize("kind", sorted(MODELS))
@pytest.mark.parametrize("case", sorted(STDLIB_CONFIGS))
def test_safe_mode_refuses_standard_library_functions(tmp_path, kind, case):
    crafted = _craft(_save(MODELS[kind](doubled_xent), tmp_path), STDLIB_CONFIGS[case])
    with pytest.raises(ValueError, match=REFUSED):
        keras.models.load_model(str(crafted))


@pytest.mark.parametrize("owner", [tf_seqloss.SequenceLoss, tf_seqloss.SequenceLossLayer])
@pytest.mark.parametrize("case", CASES)
def test_from_config_outside_a_load_is_safe_mode(hostile, owner, case):
    # Outside `load_model` no Keras scope sets safe mode, and unset means safe, as in Keras' own deserialiser.
    config = {**owner().get_config(), "softmax_loss_function": hostile.configs()[case]}
    with pytest.raises(ValueError, match=REFUSED):
        owner.from_config(config)
    with pytest.raises(ValueError, match=REFUSED):  # Keras' deserialiser, safe by default.
        keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(owner()) | {"config": config})
    hostile.assert_never_ran()


def test_a_lambda_is_refused_in_safe_mode_and_loads_when_safe_mode_is_off():
    with pytest.warns(UserWarning, match="lambda"):
        config = tf_seqloss.SequenceLoss(
            # No globals: Keras 3 rebuilds a lambda's bytecode with its own module's globals.
            softmax_loss_function=lambda labels, logits: logits[:, 0] * 0.0 + 4.0).get_config()
    assert config["softmax_loss_function"]["class_name"] == "__lambda__"
    with pytest.raises(ValueError, match=r"in safe mode: its saved config names a lambda"):
        tf_seqloss.SequenceLoss.from_config(config)
    serialized = keras.saving.serialize_keras_object(tf_seqloss.SequenceLoss()) | {"config": config}
    with pytest.raises(ValueError, match="a lambda"):
        keras.saving.deserialize_keras_object(serialized)
    loaded = keras.saving.deserialize_keras_object(serialized, safe_mode=False)  # Keras' safe-mode scope.
    logits, targets = np.zeros([1, 2, 3], np.float32), np.array([[0, 1]])
    assert float(loaded(targets, logits)) == 4.0


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_safe_mode_off_loads_a_trusted_module_function_as_keras_allows(hostile, tmp_path, kind):
    crafted = _craft(_save(MODELS[kind](doubled_xent), tmp_path), hostile.configs()["function_of_its_module"])
    if IS_KERAS_3:
        # Keras 3 itself never imports a module outside Keras for a function, safe mode or not.
        with pytest.raises(ValueError, match="Could not restore `softmax_loss_function`"):
            keras.models.load_model(str(crafted), safe_mode=False)
        hostile.assert_never_ran()
        return
    loaded = keras.models.load_model(str(crafted), safe_mode=False)  # tf_keras: the user trusts the file.
    assert hostile.imported
    _evaluate(loaded, kind)
    assert hostile.called


@pytest.mark.parametrize("kind", sorted(MODELS))
@pytest.mark.parametrize("fn", [doubled_xent, ScaledXent(2.0)], ids=["function", "callable_object"])
def test_registered_callables_round_trip_in_safe_mode(tmp_path, kind, fn):
    model = MODELS[kind](fn)
    value = _evaluate(model, kind)
    loaded = keras.models.load_model(str(_save(model, tmp_path)))
    np.testing.assert_allclose(_evaluate(loaded, kind), value, rtol=1e-6)
    tokens, targets, mask = _batch()
    logits = model.predict([tokens, targets, mask] if kind == "layer" else tokens, verbose=0)
    np.testing.assert_allclose(value, 2.0 * reference.sequence_loss(logits, targets, mask), rtol=1e-5)


def test_custom_objects_make_an_unregistered_function_load_in_safe_mode(tmp_path):
    model = _loss_model(tripled_xent)
    value = _evaluate(model, "loss")
    path = _save(model, tmp_path)
    with pytest.raises(ValueError, match=r"the function 'tripled_xent'"):
        keras.models.load_model(str(path))
    loaded = keras.models.load_model(str(path), custom_objects={"tripled_xent": tripled_xent})
    assert loaded.loss.softmax_loss_function is tripled_xent
    np.testing.assert_allclose(_evaluate(loaded, "loss"), value, rtol=1e-6)


def test_keras_built_in_functions_are_accepted_by_name():
    for config in ("softmax", {"module": "builtins", "class_name": "function", "config": "softmax",
                               "registered_name": "function"}):
        assert _keras.deserialize_function(config, "SequenceLoss", "softmax_loss_function") \
            is keras.activations.softmax
    for name in ("get", "deserialize", "_private", "os.system"):
        with pytest.raises(ValueError, match="in safe mode"):
            _keras.deserialize_function(name, "SequenceLoss", "softmax_loss_function")


def test_a_crafted_fused_linear_head_initializer_imports_nothing(hostile, tmp_path):
    # The initializers go through `keras.initializers.get`, which looks only among Keras' initializers and
    # registered objects in both Kerases; this checks that it stays so.
    keras.utils.set_random_seed(0)
    tokens = keras.Input((TIME,), dtype="int32")
    hidden = keras.layers.Embedding(VOCAB, 4)(tokens)
    model = keras.Model(tokens, tf_seqloss.FusedLinearHead(VOCAB)(hidden))
    path = _save(model, tmp_path)
    with zipfile.ZipFile(path) as archive:
        entries = {name: archive.read(name) for name in archive.namelist()}
    config = json.loads(entries["config.json"])
    head = next(layer for layer in config["config"]["layers"] if layer["class_name"] == "FusedLinearHead")
    head["config"]["kernel_initializer"] = hostile.configs()["class_of_its_module"]
    entries["config.json"] = json.dumps(config).encode("utf-8")
    crafted = path.with_name("crafted.keras")
    with zipfile.ZipFile(crafted, "w") as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    with pytest.raises((ValueError, TypeError)):
        keras.models.load_model(str(crafted))
    hostile.assert_never_ran()


def test_a_registered_function_is_saved_under_its_registered_name_on_every_keras():
    # tf_keras 2.16 saves the bare `__name__`; the package writes the registered name whatever Keras runs.
    config = tf_seqloss.SequenceLoss(softmax_loss_function=doubled_xent).get_config()["softmax_loss_function"]
    assert config["class_name"] == "function"
    assert config["config"] == "tf_seqloss_safe_tests>doubled_xent"


def test_a_bare_registered_name_as_tf_keras_2_16_saved_it_loads_in_safe_mode_unless_ambiguous():
    legacy = {"module": "builtins", "class_name": "function", "config": "doubled_xent", "registered_name": "function"}
    loss = tf_seqloss.SequenceLoss.from_config(dict(tf_seqloss.SequenceLoss().get_config(),
                                                    softmax_loss_function=legacy))
    assert loss.softmax_loss_function is doubled_xent
    # The same bare name registered by a second package: which one the file meant is unknown, so it is refused.
    twin_key = "tf_seqloss_safe_tests_twin>doubled_xent"
    keras.saving.get_custom_objects()[twin_key] = tripled_xent
    try:
        with pytest.raises(ValueError, match=r"Refused to load `softmax_loss_function` of `SequenceLoss` in safe mode"):
            tf_seqloss.SequenceLoss.from_config(dict(tf_seqloss.SequenceLoss().get_config(),
                                                     softmax_loss_function=legacy))
    finally:
        del keras.saving.get_custom_objects()[twin_key]
