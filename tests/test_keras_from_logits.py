"""`from_logits` of `SequenceLoss`/`SequenceLossLayer`, against NumPy float64 references of Keras' formulas.

`from_logits=False` is Keras' `SparseCategoricalCrossentropy(from_logits=False)` for class ids and
`CategoricalCrossentropy(from_logits=False)` for probability targets; the references below are those
formulas written in NumPy from Keras' source (both Kerases compute the same), and are checked against
Keras' own losses on unpadded tokens. The warning for probabilities passed as logits is checked eagerly, in
`fit` with a final softmax, and never for logits.
"""

import os
import tempfile
import warnings

import numpy as np
import pytest
import tensorflow as tf

import tf_seqloss
from tests import reference
from tests.conftest import LEGAL_FLAGS
from tf_seqloss._keras import keras

EPS = 1e-7  # keras.backend.epsilon()
VOCAB, TIME = 6, 5
WARNING = r"received `from_logits=True`, but `y_pred`"


def keras_sparse_ce(probabilities, targets, eps=EPS):
    """Keras' SCCE(from_logits=False), float64: clip, take the log as logits: `log(sum q) - log q[t]`."""
    q = np.clip(np.asarray(probabilities, np.float64), eps, 1 - eps)
    return np.log(q.sum(-1)) - np.log(np.take_along_axis(q, np.asarray(targets)[..., None], -1)[..., 0])


def keras_sparse_ce_grad(probabilities, targets, eps=EPS):
    """d keras_sparse_ce / d probabilities: `(1 / sum q - onehot / q[t])` where the clip lets p through."""
    p = np.asarray(probabilities, np.float64)
    q = np.clip(p, eps, 1 - eps)
    onehot = np.eye(p.shape[-1])[np.asarray(targets)]
    inside = (p >= eps) & (p <= 1 - eps)
    q_target = np.take_along_axis(q, np.asarray(targets)[..., None], -1)
    return (1.0 / q.sum(-1, keepdims=True) - onehot / q_target) * inside


def keras_dense_ce(probabilities, labels, eps=EPS, label_smoothing=0.0):
    """Keras' CCE(from_logits=False), float64: divide each row by its sum, clip, `-sum(y * log q)`."""
    p = np.asarray(probabilities, np.float64)
    y = np.asarray(labels, np.float64)
    y = y * (1 - label_smoothing) + label_smoothing / y.shape[-1]
    q = np.clip(p / p.sum(-1, keepdims=True), eps, 1 - eps)
    return -(y * np.log(q)).sum(-1)


def keras_dense_ce_grad(probabilities, labels, eps=EPS, label_smoothing=0.0):
    """d keras_dense_ce / d p: `sum_j -y_j / q_j * [clip passes j] * (delta_jk / s - p_j / s**2)`, s = sum p."""
    p = np.asarray(probabilities, np.float64)
    y = np.asarray(labels, np.float64)
    y = y * (1 - label_smoothing) + label_smoothing / y.shape[-1]
    s = p.sum(-1, keepdims=True)
    normalised = p / s
    inside = (normalised >= eps) & (normalised <= 1 - eps)
    upstream = -y / np.clip(normalised, eps, 1 - eps) * inside
    return upstream / s - (upstream * p).sum(-1, keepdims=True) / s ** 2


def _token_mean(values, weights):
    weights = np.asarray(weights, np.float64)
    return (values * weights).sum() / weights.sum()


def _case(seed=0, dtype=np.float32):
    """Returns `(probabilities, targets, weights)`: softmax rows, a one-hot row (clipped at both ends), padding."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(3, TIME, VOCAB)) * 2
    probabilities = np.exp(reference.log_softmax(logits))
    probabilities[0, 1] = np.eye(VOCAB)[2]          # p = 1 and p = 0: both clipped.
    probabilities[1, 0, 4] = 0.0                    # One exact zero, row no longer summing to 1.
    targets = rng.integers(0, VOCAB, size=(3, TIME))
    targets[0, 1] = 2
    targets[1, 2] = 4
    weights = (rng.uniform(0.5, 2.0, size=(3, TIME)) * (np.arange(TIME) < np.array([5, 3, 4])[:, None]))
    return probabilities.astype(dtype), targets, weights.astype(np.float32)


def _with_garbage_padding(probabilities, weights):
    garbage = probabilities.copy()
    padded = weights == 0
    garbage[padded] = np.nan
    garbage[padded & (np.arange(TIME) % 2 == 0)] = np.inf
    return garbage


def _loss_and_grad(loss, targets, probabilities, weights):
    probabilities = tf.constant(probabilities)
    with tf.GradientTape() as tape:
        tape.watch(probabilities)
        value = loss(targets, probabilities, sample_weight=weights)
    return value.numpy(), tape.gradient(value, probabilities).numpy()


def test_the_references_are_keras_own_formulas():
    probabilities, targets, _ = _case()
    rows = probabilities.reshape(-1, VOCAB)
    ids = targets.reshape(-1)
    keras_sparse = keras.losses.SparseCategoricalCrossentropy(from_logits=False, reduction="none")
    # The clipped one-hot row's loss is ~5e-7, which float32 holds to ~1e-7 only: hence `atol`.
    np.testing.assert_allclose(keras_sparse(ids, rows).numpy(), keras_sparse_ce(rows, ids), rtol=1e-5, atol=2e-7)
    labels = np.random.default_rng(1).dirichlet(np.ones(VOCAB), size=len(rows))
    keras_dense = keras.losses.CategoricalCrossentropy(from_logits=False, reduction="none")
    np.testing.assert_allclose(keras_dense(labels, rows).numpy(), keras_dense_ce(rows, labels), rtol=1e-5, atol=2e-7)


@pytest.mark.parametrize("implementation", tf_seqloss.IMPLEMENTATIONS)
def test_probabilities_give_keras_value_and_gradient_with_inert_padding(implementation):
    probabilities, targets, weights = _case()
    loss = tf_seqloss.SequenceLoss(from_logits=False, implementation=implementation)
    value, grad = _loss_and_grad(loss, targets, probabilities, weights)
    np.testing.assert_allclose(value, _token_mean(keras_sparse_ce(probabilities, targets), weights), rtol=1e-5)
    expected_grad = keras_sparse_ce_grad(probabilities, targets) * (weights / weights.sum())[..., None]
    np.testing.assert_allclose(grad, expected_grad, rtol=1e-4, atol=1e-7)
    # Padded positions holding inf or NaN change neither the loss nor the gradient.
    garbage_value, garbage_grad = _loss_and_grad(loss, targets, _with_garbage_padding(probabilities, weights),
                                                 weights)
    np.testing.assert_array_equal(garbage_value, value)
    np.testing.assert_array_equal(garbage_grad, grad)
    assert not np.any(garbage_grad[weights == 0])


@pytest.mark.parametrize("flags", LEGAL_FLAGS, ids=lambda f: "-".join(k for k, v in f.items() if v) or "none")
def test_probabilities_reduce_as_the_flags_say(flags):
    probabilities, targets, weights = _case(seed=2)
    loss = tf_seqloss.SequenceLoss(from_logits=False, reduction="none", **flags)
    # `-log(q[t] / sum q)` is the cross-entropy of the logits `log q`; the reference reduces it by the flags.
    log_q = np.log(np.clip(probabilities.astype(np.float64), EPS, 1 - EPS))
    np.testing.assert_allclose(reference.token_cross_entropy(log_q, targets),
                               keras_sparse_ce(probabilities, targets), rtol=1e-12, atol=1e-15)
    expected = reference.sequence_loss(log_q, targets, weights, **flags)
    np.testing.assert_allclose(loss(targets, probabilities, sample_weight=weights).numpy(), expected,
                               rtol=1e-5, atol=1e-6)


def test_probability_targets_give_keras_categorical_crossentropy():
    probabilities, _, weights = _case(seed=3)
    labels = np.random.default_rng(3).dirichlet(np.ones(VOCAB), size=(3, TIME)).astype(np.float32)
    for label_smoothing in (0.0, 0.2):
        loss = tf_seqloss.SequenceLoss(from_logits=False, label_smoothing=label_smoothing)
        value, grad = _loss_and_grad(loss, labels, _with_garbage_padding(probabilities, weights), weights)
        expected = _token_mean(keras_dense_ce(probabilities, labels, label_smoothing=label_smoothing), weights)
        np.testing.assert_allclose(value, expected, rtol=1e-5)
        expected_grad = keras_dense_ce_grad(probabilities, labels, label_smoothing=label_smoothing)
        expected_grad = np.where((weights == 0)[..., None], 0.0, expected_grad * (weights / weights.sum())[..., None])
        np.testing.assert_allclose(grad, expected_grad, rtol=1e-4, atol=1e-6)
        assert not np.any(grad[weights == 0])


def test_label_smoothing_smooths_the_targets_against_the_clipped_probabilities():
    probabilities, targets, weights = _case(seed=4)
    loss = tf_seqloss.SequenceLoss(from_logits=False, label_smoothing=0.1)
    log_q = np.log(np.clip(probabilities.astype(np.float64), EPS, 1 - EPS))
    expected = reference.sequence_loss(log_q, targets, weights, label_smoothing=0.1)
    np.testing.assert_allclose(loss(targets, probabilities, sample_weight=weights).numpy(), expected, rtol=1e-5)


def test_half_and_double_precision_probabilities():
    probabilities, targets, weights = _case(seed=5)
    for dtype, rtol in ((np.float16, 1e-5), (np.float64, 1e-12)):
        given = probabilities.astype(dtype)
        result = tf_seqloss.SequenceLoss(from_logits=False, dtype="float64" if dtype == np.float64 else None)(
            targets, given, sample_weight=weights)
        assert result.dtype == (tf.float64 if dtype == np.float64 else tf.float32)
        # float16 is computed in float32 from the float16 values.
        np.testing.assert_allclose(result.numpy(), _token_mean(keras_sparse_ce(given, targets), weights), rtol=rtol)


def test_under_xla_probabilities_give_the_same_value():
    probabilities, targets, weights = _case(seed=6)
    loss = tf_seqloss.SequenceLoss(from_logits=False)
    compiled = tf.function(lambda p: loss(targets, p, sample_weight=weights), jit_compile=True)
    np.testing.assert_allclose(compiled(tf.constant(probabilities)).numpy(),
                               _token_mean(keras_sparse_ce(probabilities, targets), weights), rtol=1e-5)


def test_a_traced_softmax_is_read_back_to_its_logits_as_keras_does():
    # A target probability of e^-30 is clipped to 1e-7 eagerly (loss ~16.1); a traced graph sees the
    # `Softmax` op and, as Keras' own loss, computes from its input (loss ~30).
    logits = np.zeros([1, 2, 5], np.float32)
    logits[..., 0] = 30.0
    targets = np.array([[1, 0]])
    loss = tf_seqloss.SequenceLoss(False, False, from_logits=False, reduction="none")  # Token losses.
    eager = loss(targets, tf.nn.softmax(logits)).numpy()
    traced = tf.function(lambda z: loss(targets, tf.nn.softmax(z)))(tf.constant(logits)).numpy()
    # The second token's loss is ~4e-7, which float32 holds to ~1e-7 only: hence `atol`.
    np.testing.assert_allclose(eager, keras_sparse_ce(tf.nn.softmax(logits).numpy(), targets), rtol=1e-5,
                               atol=2e-7)
    np.testing.assert_allclose(traced, reference.token_cross_entropy(logits, targets), rtol=1e-5, atol=2e-7)
    assert traced[0, 0] > 29.0 and eager[0, 0] < 17.0
    keras_traced = tf.function(lambda z: keras.losses.sparse_categorical_crossentropy(
        targets, tf.nn.softmax(z)))(tf.constant(logits)).numpy()
    np.testing.assert_allclose(traced, keras_traced, rtol=1e-5, atol=2e-7)


def test_from_logits_is_checked_and_refused_with_softmax_loss_function():
    for owner in (tf_seqloss.SequenceLoss, tf_seqloss.SequenceLossLayer):
        with pytest.raises(TypeError, match=r"argument `from_logits`(.|\n)*Received: from_logits='no'"):
            owner(from_logits="no")
        with pytest.raises(ValueError, match="`from_logits=False` cannot be combined with `softmax_loss_function`"):
            owner(from_logits=False, softmax_loss_function=tf.nn.sparse_softmax_cross_entropy_with_logits)
    assert tf_seqloss.SequenceLoss(from_logits=np.bool_(False)).from_logits is False


def test_from_logits_round_trips_through_the_configs():
    loss = tf_seqloss.SequenceLoss(from_logits=False, padding_id=0)
    config = loss.get_config()
    assert config["from_logits"] is False and tf_seqloss.SequenceLoss().get_config()["from_logits"] is True
    assert tf_seqloss.SequenceLoss.from_config(config).get_config() == config
    layer = tf_seqloss.SequenceLossLayer(from_logits=False)
    assert layer.from_logits is False and layer.get_config()["from_logits"] is False
    assert tf_seqloss.SequenceLossLayer.from_config(layer.get_config()).get_config() == layer.get_config()
    older = {key: value for key, value in config.items() if key != "from_logits"}  # Saved before the option.
    assert tf_seqloss.SequenceLoss.from_config(older).from_logits is True


def test_the_layer_takes_probabilities_too():
    probabilities, targets, weights = _case(seed=7)
    layer = tf_seqloss.SequenceLossLayer(from_logits=False)
    out = layer(probabilities, targets, weights=weights)
    np.testing.assert_array_equal(out.numpy(), probabilities)
    np.testing.assert_allclose(layer.losses[0].numpy(), _token_mean(keras_sparse_ce(probabilities, targets), weights),
                               rtol=1e-5)


# ---- In models with a final softmax.

def _batch(seed=0):
    rng = np.random.default_rng(seed)
    mask = (np.arange(TIME) < np.array([5, 2, 4, 3])[:, None]).astype(np.float32)
    tokens = rng.integers(1, VOCAB, size=mask.shape).astype(np.int32)
    targets = rng.integers(0, VOCAB, size=mask.shape).astype(np.int32)
    return tokens, targets, mask


def _softmax_models(softmax=True):
    """Returns `(model, logits_model)`: `model` ends in a softmax (or not); `logits_model` shares its weights."""
    keras.utils.set_random_seed(0)
    tokens = keras.Input((TIME,), dtype="int32")
    logits = keras.layers.Dense(VOCAB)(keras.layers.Embedding(VOCAB, 4)(tokens))
    outputs = keras.layers.Activation("softmax")(logits) if softmax else logits
    return keras.Model(tokens, outputs), keras.Model(tokens, logits)


def _our_warnings(records):
    return [r for r in records if "from_logits=True" in str(r.message) and "y_pred" in str(r.message)]


def test_eager_probabilities_warn_once_and_logits_never():
    _, targets, weights = _case(seed=8)
    logits = np.random.default_rng(8).normal(size=(3, TIME, VOCAB)).astype(np.float32)
    probabilities = _with_garbage_padding(tf.nn.softmax(logits).numpy(), weights)  # NaN rows are not judged.
    non_negative = np.abs(logits)  # Non-negative logits whose rows do not sum to 1.
    loss = tf_seqloss.SequenceLoss()
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        value = loss(targets, probabilities, sample_weight=weights)
        loss(targets, probabilities, sample_weight=weights)
        for given in (logits, non_negative):
            tf_seqloss.SequenceLoss()(targets, given, sample_weight=weights)
        tf_seqloss.SequenceLoss(from_logits=False)(targets, probabilities, sample_weight=weights)
    assert len(_our_warnings(records)) == 1
    assert "`SequenceLoss` received" in str(_our_warnings(records)[0].message)
    # The warning changes nothing: probabilities are taken as logits, as asked.
    clean = np.where((weights == 0)[..., None], 0.0, probabilities)
    np.testing.assert_allclose(value.numpy(), reference.sequence_loss(clean, targets, weights), rtol=1e-5)


@pytest.mark.parametrize("jit_compile", [False, True], ids=["graph", "xla"])
def test_fit_with_a_final_softmax_warns_once_and_trains_unchanged(jit_compile):
    tokens, targets, mask = _batch()
    model, _ = _softmax_models()
    model.compile(optimizer="sgd", loss=tf_seqloss.SequenceLoss(), jit_compile=jit_compile)
    probabilities = model.predict(tokens, verbose=0)
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        history = model.fit(tokens, targets, sample_weight=mask, batch_size=len(tokens), epochs=2, verbose=0,
                            shuffle=False)
        model.evaluate(tokens, targets, sample_weight=mask, verbose=0)
    assert len(_our_warnings(records)) == 1
    np.testing.assert_allclose(history.history["loss"][0], reference.sequence_loss(probabilities, targets, mask),
                               rtol=1e-5)


def test_fit_on_logits_does_not_warn():
    tokens, targets, mask = _batch()
    model, _ = _softmax_models(softmax=False)
    model.compile(optimizer="sgd", loss=tf_seqloss.SequenceLoss())
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        model.fit(tokens, targets, sample_weight=mask, batch_size=len(tokens), verbose=0)
        tf_seqloss.SequenceLoss()(targets, model(tokens), sample_weight=mask)
    assert not _our_warnings(records)


def test_the_layer_warns_under_its_own_name_in_fit():
    tokens, targets, mask = _batch()
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        keras.utils.set_random_seed(0)
        inputs = [keras.Input((TIME,), dtype="int32"), keras.Input((TIME,), dtype="int32"),
                  keras.Input((TIME,), dtype="float32")]
        hidden = keras.layers.Embedding(VOCAB, 4)(inputs[0])
        probabilities = keras.layers.Dense(VOCAB, activation="softmax")(hidden)
        model = keras.Model(inputs, tf_seqloss.SequenceLossLayer()(probabilities, inputs[1], weights=inputs[2]))
        model.compile(optimizer="sgd")
        model.fit([tokens, targets, mask], batch_size=len(tokens), verbose=0)
    ours = _our_warnings(records)
    assert len(ours) == 1 and "`SequenceLossLayer` received" in str(ours[0].message)


def test_fit_with_from_logits_false_trains_on_the_softmax_logits_and_round_trips(tmp_path):
    tokens, targets, mask = _batch(seed=1)
    model, logits_model = _softmax_models()
    model.compile(optimizer="sgd", loss=tf_seqloss.SequenceLoss(from_logits=False))
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        value = model.evaluate(tokens, targets, sample_weight=mask, batch_size=len(tokens), verbose=0)
    assert not _our_warnings(records)
    logits = logits_model.predict(tokens, verbose=0)
    np.testing.assert_allclose(value, reference.sequence_loss(logits, targets, mask), rtol=1e-5)
    path = os.path.join(tempfile.mkdtemp(dir=tmp_path), "model.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert loaded.loss.from_logits is False
    np.testing.assert_allclose(loaded.evaluate(tokens, targets, sample_weight=mask, batch_size=len(tokens),
                                               verbose=0), value, rtol=1e-6)
