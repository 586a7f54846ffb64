"""`SequenceLoss` against the NumPy float64 reference, the recorded TFA class, and `sequence_loss` inside Keras.

Inside `compile`/`fit` the reference is the NumPy float64 one on the model's own logits.
"""

import doctest
import os
import tempfile

import numpy as np
import pytest
import tensorflow as tf

import tf_seqloss
from tests import reference
from tests.conftest import FLAG_NAMES, LEGAL_FLAGS, oracle_cases
from tf_seqloss import _keras_loss, _layers
from tf_seqloss._keras import IS_KERAS_3, keras

VOCAB, TIME = 9, 7
LENGTHS = np.array([7, 3, 5, 1])  # Uneven padding, one sequence full, one of a single token.


def _padded_batch(seed=0):
    """Returns `(inputs, targets, mask)`: right-padded with id 0, real ids in `[1, VOCAB)`."""
    rng = np.random.default_rng(seed)
    mask = (np.arange(TIME) < LENGTHS[:, None]).astype(np.float32)
    inputs = rng.integers(1, VOCAB, size=mask.shape) * mask.astype(np.int32)
    targets = rng.integers(1, VOCAB, size=mask.shape) * mask.astype(np.int32)
    return inputs.astype(np.int32), targets.astype(np.int32), mask


def _random_case(seed, batch=3, time=5, classes=6, dtype=np.float32):
    rng = np.random.default_rng(seed)
    logits = (rng.normal(size=(batch, time, classes)) * 3).astype(dtype)
    targets = rng.integers(0, classes, size=(batch, time))
    weights = (rng.uniform(size=(batch, time)) * (rng.uniform(size=(batch, time)) > 0.3)).astype(np.float32)
    return logits, targets, weights


def _keras_reduce(values, reduction):
    values = np.asarray(values)
    if values.ndim == 0 or reduction == "none":
        return values
    return values.sum() if reduction == "sum" else values.mean()


@pytest.mark.parametrize("flags", LEGAL_FLAGS, ids=lambda f: "-".join(k for k, v in f.items() if v) or "none")
@pytest.mark.parametrize("reduction", ["sum_over_batch_size", "sum", "none"])
def test_matches_numpy_reference_for_every_flag_and_reduction(flags, reduction):
    logits, targets, weights = _random_case(seed=1)
    loss = tf_seqloss.SequenceLoss(**flags, reduction=reduction)(targets, logits, sample_weight=weights)
    expected = _keras_reduce(reference.sequence_loss(logits, targets, weights, **flags), reduction)
    assert loss.dtype == tf.float32
    assert loss.shape == np.shape(expected)
    np.testing.assert_allclose(loss.numpy(), expected, rtol=1e-5, atol=1e-6)


def test_default_is_the_contrib_default_weighted_token_mean():
    logits, targets, weights = _random_case(seed=2)
    loss = tf_seqloss.SequenceLoss()(targets, logits, sample_weight=weights)
    ce = reference.token_cross_entropy(logits, targets)
    np.testing.assert_allclose(loss.numpy(), (weights * ce).sum() / weights.sum(), rtol=1e-5)


def test_tfa_class_defaults_reproduce_every_recorded_tfa_class_loss():
    # `class_default_loss` is `tfa.seq2seq.SequenceLoss()(targets, logits, sample_weight=weights)`.
    loss_fns = {np.dtype(np.float32): tf_seqloss.SequenceLoss(sum_over_timesteps=True, sum_over_batch=True),
                np.dtype(np.float64): tf_seqloss.SequenceLoss(sum_over_timesteps=True, sum_over_batch=True,
                                                              dtype="float64")}
    cases = oracle_cases("tfa_sequence_loss")
    for index, _, case in cases:
        logits = case["logits"]
        loss = loss_fns[logits.dtype](case["targets"], logits, sample_weight=case["weights"])
        tol = dict(rtol=2e-5, atol=2e-6) if logits.dtype == np.float32 else dict(rtol=1e-9, atol=1e-12)
        assert loss.dtype == logits.dtype, index
        np.testing.assert_allclose(loss.numpy(), case["class_default_loss"], err_msg=f"case {index}", **tol)


def test_sum_over_flags_turn_the_averaging_defaults_off():
    loss = tf_seqloss.SequenceLoss(sum_over_timesteps=True)
    assert (loss.average_across_timesteps, loss.average_across_batch) == (False, False)
    assert tf_seqloss.SequenceLoss().average_across_timesteps is True
    with pytest.raises(ValueError, match="`average_across_batch` and `sum_over_timesteps`"):
        tf_seqloss.SequenceLoss(average_across_batch=True, sum_over_timesteps=True)


@pytest.mark.parametrize("shape", ["scalar", "batch", "batch_time_1"])
def test_sample_weight_shapes_broadcast_as_token_weights(shape):
    logits, targets, _ = _random_case(seed=3)
    per_sequence = np.array([0.5, 0.0, 2.0], np.float32)
    sample_weight, weights = {
        "scalar": (np.float32(3.0), np.full(targets.shape, 3.0)),
        "batch": (per_sequence, np.broadcast_to(per_sequence[:, None], targets.shape)),
        "batch_time_1": (per_sequence[:, None, None] * np.ones(targets.shape + (1,)),
                         np.broadcast_to(per_sequence[:, None], targets.shape)),
    }[shape]
    flags = dict(average_across_timesteps=True, average_across_batch=False)
    loss = tf_seqloss.SequenceLoss(**flags, reduction="none")(targets, logits, sample_weight=sample_weight)
    np.testing.assert_allclose(loss.numpy(), reference.sequence_loss(logits, targets, weights, **flags),
                               rtol=1e-5, atol=1e-6)


def test_trailing_axis_and_float_ids_and_probability_targets_are_accepted():
    logits, targets, weights = _random_case(seed=4)
    loss = tf_seqloss.SequenceLoss()
    expected = reference.sequence_loss(logits, targets, weights)
    for y_true in (targets[..., None], targets.astype(np.float32), np.eye(logits.shape[-1])[targets]):
        np.testing.assert_allclose(loss(y_true, logits, weights).numpy(), expected, rtol=1e-5)


def test_padding_id_and_mask_multiply_into_sample_weight():
    logits, targets, weights = _random_case(seed=5)
    targets[:, -2:] = -1
    masked = tf.constant(logits)
    mask = np.ones(targets.shape, bool)
    mask[0, :2] = False
    masked._keras_mask = tf.constant(mask)  # As a masking layer leaves it on its output.
    loss = tf_seqloss.SequenceLoss(padding_id=-1)(targets, masked, sample_weight=weights)
    effective = weights * mask * (targets != -1)
    np.testing.assert_allclose(loss.numpy(), reference.sequence_loss(logits, np.maximum(targets, 0), effective),
                               rtol=1e-5)


def test_gradient_in_a_compiled_custom_loop_matches_reference():
    logits, targets, weights = _random_case(seed=6)
    loss_fn = tf_seqloss.SequenceLoss()

    @tf.function(jit_compile=True)
    def loss_and_grad(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = loss_fn(targets, x, sample_weight=weights)
        return loss, tape.gradient(loss, x)

    loss, grad = loss_and_grad(tf.constant(logits))
    np.testing.assert_allclose(loss.numpy(), reference.sequence_loss(logits, targets, weights), rtol=1e-5)
    np.testing.assert_allclose(grad.numpy(), reference.sequence_loss_grad(logits, targets, weights),
                               rtol=1e-4, atol=1e-6)


def test_dtype_sets_the_compute_and_output_dtype():
    logits, targets, weights = _random_case(seed=7, dtype=np.float64)
    loss = tf_seqloss.SequenceLoss(dtype="float64")
    assert loss.dtype == "float64"
    value = loss(targets, logits, sample_weight=weights)
    assert value.dtype == tf.float64
    np.testing.assert_allclose(value.numpy(), reference.sequence_loss(logits, targets, weights), rtol=1e-12)
    assert tf_seqloss.SequenceLoss()(targets, logits, weights).dtype == tf.float32
    assert tf_seqloss.SequenceLoss(dtype="mixed_float16").dtype == "float32"  # what it returns
    assert tf_seqloss.SequenceLoss(dtype="mixed_float16")(targets, logits.astype(np.float16)).dtype == tf.float32


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(padding_id=0.5), TypeError, "`padding_id`"),
    (dict(label_smoothing=1.5), ValueError, "`label_smoothing`"),
    (dict(softmax_loss_function="xent"), TypeError, "`softmax_loss_function`"),
    (dict(implementation="fast"), ValueError, "`implementation`"),
    (dict(epsilon=-1.0), ValueError, "`epsilon`"),
    (dict(dtype="int32"), ValueError, "`dtype`"),
    (dict(reduction="average"), ValueError, "average"),
])
def test_bad_arguments_are_refused_when_built(kwargs, error, match):
    with pytest.raises(error, match=match):
        tf_seqloss.SequenceLoss(**kwargs)


def test_call_gives_the_flags_output_weighted_by_padding_only():
    logits, targets, _ = _random_case(seed=9)
    loss = tf_seqloss.SequenceLoss(average_across_batch=False, padding_id=0)
    expected = reference.sequence_loss(logits, targets, (targets != 0).astype(np.float64),
                                       average_across_batch=False)
    np.testing.assert_allclose(loss.call(targets, logits).numpy(), expected, rtol=1e-5)


@pytest.mark.parametrize("module", [_keras_loss, _layers], ids=lambda module: module.__name__)
def test_docstring_examples_run(module):
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0


def test_bad_sample_weight_rank_names_the_argument():
    logits, targets, _ = _random_case(seed=8)
    with pytest.raises(ValueError, match="`sample_weight`"):
        tf_seqloss.SequenceLoss()(targets, logits, sample_weight=np.ones((3, 5, 2, 1)))


# ---- Inside `compile`: the three padding routes, `fit`, `evaluate`, `train_on_batch`, metrics, XLA.

def _seq_model(mask_zero, recurrent=False):
    """Embedding, then a recurrent or a dense layer, then logits: every layer propagates the Keras mask."""
    inputs = keras.Input((TIME,), dtype="int32")
    hidden = keras.layers.Embedding(VOCAB, 8, mask_zero=mask_zero)(inputs)
    if recurrent:
        hidden = keras.layers.SimpleRNN(8, return_sequences=True)(hidden)
    else:
        hidden = keras.layers.Dense(8, activation="tanh")(hidden)
    return keras.Model(inputs, keras.layers.Dense(VOCAB)(hidden))


def _masked_accuracy(logits, targets, weights):
    return float((weights * (np.argmax(logits, -1) == targets)).sum() / weights.sum())


def _route_model(route, recurrent, seed=0):
    """Returns `(model, plain, loss)`: `model` sees padding through `route`, `plain` shares its weights."""
    keras.utils.set_random_seed(seed)
    plain = _seq_model(mask_zero=False, recurrent=recurrent)
    model = _seq_model(mask_zero=True, recurrent=recurrent) if route == "keras_mask" else plain
    model.set_weights(plain.get_weights())  # Right padding: real positions see the same logits.
    return model, plain, tf_seqloss.SequenceLoss(padding_id=0 if route == "padding_id" else None)


ROUTES = ["sample_weight", "keras_mask", "padding_id"]
# Keras 3 before 3.12 (3.10 is the last for Python 3.9) applies a Keras mask to its own metrics
# (`MeanMetricWrapper.update_state`) only when a sample weight comes too; tf_keras and Keras 3.12 and later
# always apply it. The package's TokenAccuracy and TokenPerplexity read the mask themselves.
KERAS_METRICS_NEED_A_WEIGHT_FOR_THE_MASK = IS_KERAS_3 and tuple(map(int, keras.__version__.split(".")[:2])) < (3, 12)


@pytest.mark.parametrize("route", ROUTES)
def test_every_padding_route_gives_the_sequence_loss_in_evaluate_train_on_batch_and_fit(route):
    inputs, targets, mask = _padded_batch()
    # Seed 2: the untrained model gets some real tokens right under either flavour (seed 0 none under tf_keras),
    # so the accuracy over real tokens and that over every position differ.
    model, plain, loss = _route_model(route, recurrent=True, seed=2)
    padding_id = 0 if route == "padding_id" else None
    model.compile(optimizer=keras.optimizers.Adam(0.05), loss=loss,
                  weighted_metrics=["sparse_categorical_accuracy", tf_seqloss.TokenAccuracy(padding_id=padding_id),
                                    tf_seqloss.TokenPerplexity(padding_id=padding_id)])
    sample_weight = mask if route == "sample_weight" else None

    def expected():
        """The loss, token accuracy and token perplexity of the model as it is, in NumPy float64."""
        plain.set_weights(model.get_weights())
        logits = plain(inputs).numpy()
        token_loss = reference.sequence_loss(logits, targets, mask)
        return token_loss, _masked_accuracy(logits, targets, mask), np.exp(token_loss)

    before, accuracy, perplexity = expected()
    np.testing.assert_allclose(float(tf_seqloss.sequence_loss(plain(inputs), targets, mask)), before, rtol=1e-5)
    # Every position, padding included (the model's own logits there: a masked RNN carries its state on).
    every_position = float(np.mean(np.argmax(model(inputs).numpy(), -1) == targets))
    assert abs(every_position - accuracy) > 0.01
    results = model.evaluate(inputs, targets, sample_weight=sample_weight, batch_size=len(inputs),
                             verbose=0, return_dict=True)
    np.testing.assert_allclose(results["loss"], before, rtol=1e-5)
    np.testing.assert_allclose(results["token_accuracy"], accuracy, rtol=1e-6)
    np.testing.assert_allclose(results["token_perplexity"], perplexity, rtol=1e-5)
    # Keras' own metrics see padding through sample weights or masks, not `padding_id`.
    if route == "sample_weight" or route == "keras_mask" and not KERAS_METRICS_NEED_A_WEIGHT_FOR_THE_MASK:
        np.testing.assert_allclose(results["sparse_categorical_accuracy"], accuracy, rtol=1e-6)
    else:
        np.testing.assert_allclose(results["sparse_categorical_accuracy"], every_position, rtol=1e-6)
    step = model.train_on_batch(inputs, targets, sample_weight=sample_weight, return_dict=True)
    np.testing.assert_allclose(step["loss"], before, rtol=1e-5)  # Computed before the update.
    np.testing.assert_allclose(step["token_accuracy"], accuracy, rtol=1e-6)

    after, accuracy, perplexity = expected()
    assert after < before  # `train_on_batch` trained on it.
    history = model.fit(inputs, targets, sample_weight=sample_weight, batch_size=len(inputs), epochs=1,
                        verbose=0, shuffle=False)
    np.testing.assert_allclose(history.history["loss"][0], after, rtol=1e-5)
    np.testing.assert_allclose(history.history["token_accuracy"][0], accuracy, rtol=1e-6)
    np.testing.assert_allclose(history.history["token_perplexity"][0], perplexity, rtol=1e-5)


@pytest.mark.parametrize("route", ROUTES)
def test_every_padding_route_logs_the_sequence_loss_under_jit_compile(route):
    inputs, targets, mask = _padded_batch()
    model, plain, loss = _route_model(route, recurrent=False)  # XLA compiles recurrent layers slowly on CPU.
    model.compile(optimizer=keras.optimizers.Adam(0.05), loss=loss, jit_compile=True)
    expected = reference.sequence_loss(plain(inputs).numpy(), targets, mask)
    history = model.fit(inputs, targets, sample_weight=mask if route == "sample_weight" else None,
                        batch_size=len(inputs), epochs=2, verbose=0, shuffle=False)
    np.testing.assert_allclose(history.history["loss"][0], expected, rtol=1e-5)
    assert history.history["loss"][1] < expected


def test_fit_with_a_dataset_of_weighted_tuples_trains_on_the_sequence_loss():
    inputs, targets, mask = _padded_batch(seed=1)
    keras.utils.set_random_seed(1)
    model = _seq_model(mask_zero=False)
    model.compile(optimizer=keras.optimizers.SGD(0.5), loss=tf_seqloss.SequenceLoss())
    before = reference.sequence_loss(model(inputs).numpy(), targets, mask)
    dataset = tf.data.Dataset.from_tensor_slices((inputs, targets, mask)).batch(len(inputs))
    history = model.fit(dataset, epochs=3, verbose=0)
    np.testing.assert_allclose(history.history["loss"][0], before, rtol=1e-5)
    assert history.history["loss"][-1] < before


def test_multi_batch_evaluate_averages_batch_losses_weighted_by_batch_size():
    # Keras' loss tracker weights each batch's loss by its number of sequences, not of tokens.
    inputs, targets, mask = _padded_batch(seed=2)
    keras.utils.set_random_seed(2)
    model = _seq_model(mask_zero=False)
    model.compile(loss=tf_seqloss.SequenceLoss())
    logits = model(inputs).numpy()
    batch_losses = [reference.sequence_loss(logits[i:i + 3], targets[i:i + 3], mask[i:i + 3]) for i in (0, 3)]
    expected = (3 * batch_losses[0] + 1 * batch_losses[1]) / 4
    result = model.evaluate(inputs, targets, sample_weight=mask, batch_size=3, verbose=0)
    np.testing.assert_allclose(result, expected, rtol=1e-5)


class Seq2SeqSubclass(keras.Model):
    def __init__(self):
        super().__init__()
        self.embedding = keras.layers.Embedding(VOCAB, 8, mask_zero=True)
        self.dense = keras.layers.Dense(VOCAB)

    def call(self, inputs):
        return self.dense(self.embedding(inputs))


def test_subclassed_model_propagates_its_mask_to_the_loss():
    inputs, targets, mask = _padded_batch(seed=3)
    keras.utils.set_random_seed(3)
    model = Seq2SeqSubclass()
    model.compile(loss=tf_seqloss.SequenceLoss())
    logits = model(inputs).numpy()
    result = model.evaluate(inputs, targets, batch_size=len(inputs), verbose=0)
    np.testing.assert_allclose(result, reference.sequence_loss(logits, targets, mask), rtol=1e-5)


@pytest.mark.parametrize("flags", [LEGAL_FLAGS[1], LEGAL_FLAGS[3], LEGAL_FLAGS[4]],
                         ids=["average_across_timesteps", "none", "sum_over_both"])
def test_flags_inside_compile_train_on_their_keras_reduction(flags):
    inputs, targets, mask = _padded_batch(seed=4)
    keras.utils.set_random_seed(4)
    model = _seq_model(mask_zero=False)
    model.compile(loss=tf_seqloss.SequenceLoss(**flags))
    logits = model(inputs).numpy()
    expected = _keras_reduce(reference.sequence_loss(logits, targets, mask, **flags), "sum_over_batch_size")
    result = model.evaluate(inputs, targets, sample_weight=mask, batch_size=len(inputs), verbose=0)
    np.testing.assert_allclose(result, expected, rtol=1e-5)


# ---- Serialisation.

@keras.saving.register_keras_serializable(package="tf_seqloss_tests")
def registered_xent(labels, logits):
    return tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits) * 2.0


def test_config_round_trip_keeps_every_argument():
    loss = tf_seqloss.SequenceLoss(False, True, softmax_loss_function=registered_xent, padding_id=-1,
                                   epsilon=1e-12, implementation="reference", reduction="sum", name="seq",
                                   dtype="float64")
    config = loss.get_config()
    restored = tf_seqloss.SequenceLoss.from_config(config)
    assert restored.get_config() == config
    assert restored.softmax_loss_function is registered_xent
    expected = {**dict(zip(FLAG_NAMES, (False, True, False, False))), "padding_id": -1, "epsilon": 1e-12,
                "implementation": "reference", "reduction": "sum", "name": "seq", "dtype": "float64",
                "label_smoothing": 0.0}
    assert {key: config[key] for key in expected} == expected
    serialized = keras.saving.serialize_keras_object(loss)
    assert serialized["registered_name"] == "tf_seqloss>SequenceLoss"
    again = keras.saving.deserialize_keras_object(serialized)  # No `custom_objects`.
    assert isinstance(again, tf_seqloss.SequenceLoss) and again.get_config() == config


def _save_and_load(model, **kwargs):
    path = os.path.join(tempfile.mkdtemp(), "model.keras")
    model.save(path)
    return keras.models.load_model(path, **kwargs)


def test_keras_file_round_trip_reloads_the_loss_without_custom_objects():
    inputs, targets, mask = _padded_batch(seed=5)
    keras.utils.set_random_seed(5)
    model = _seq_model(mask_zero=True)
    model.compile(optimizer="adam", loss=tf_seqloss.SequenceLoss(
        softmax_loss_function=registered_xent, padding_id=0, epsilon=1e-12, name="seq"))
    value = model.evaluate(inputs, targets, batch_size=len(inputs), verbose=0)
    loaded = _save_and_load(model)
    loaded_loss = loaded.loss
    assert isinstance(loaded_loss, tf_seqloss.SequenceLoss)
    assert loaded_loss.get_config() == model.loss.get_config()
    assert loaded_loss.softmax_loss_function is registered_xent
    np.testing.assert_allclose(loaded.evaluate(inputs, targets, batch_size=len(inputs), verbose=0), value,
                               rtol=1e-6)
    np.testing.assert_allclose(value, 2 * reference.sequence_loss(model(inputs).numpy(), targets, mask),
                               rtol=1e-5)


def test_lambda_softmax_loss_function_is_refused_in_safe_mode_with_a_clear_error():
    keras.utils.set_random_seed(6)
    model = _seq_model(mask_zero=False)
    model.compile(loss=tf_seqloss.SequenceLoss(
        softmax_loss_function=lambda labels, logits: tf.nn.sparse_softmax_cross_entropy_with_logits(
            labels=labels, logits=logits)))
    with pytest.warns(UserWarning, match="lambda"):
        path = os.path.join(tempfile.mkdtemp(), "model.keras")
        model.save(path)
    with pytest.raises(ValueError, match=r"`softmax_loss_function`(.|\n)*register_keras_serializable"):
        keras.models.load_model(path)
    unsafe = keras.models.load_model(path, safe_mode=False)  # Loads when the file is trusted.
    assert callable(unsafe.loss.softmax_loss_function)


def test_keras_version_flag_matches_tf_keras():
    assert IS_KERAS_3 == (os.environ.get("TF_USE_LEGACY_KERAS", "0") not in ("1", "true", "True"))
