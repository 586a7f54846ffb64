"""`tf_seqloss.compat.tfa` against recorded TFA 0.23 outputs, TFA's error texts, and Keras `compile`."""

import functools

import numpy as np
import pytest
import tensorflow as tf

from tests import reference
from tests.conftest import FLAG_NAMES, LEGAL_FLAGS, oracle_cases
from tf_seqloss.compat import tfa

TFA_CASES = 140


@functools.lru_cache(maxsize=None)
def _cases():
    return oracle_cases("tfa_sequence_loss")


def _tolerance(dtype):
    return dict(rtol=2e-5, atol=2e-6) if dtype == np.float32 else dict(rtol=1e-9, atol=1e-12)


def _reference(logits, targets, weights, flags):
    """NumPy float64 TFA: per-token cross-entropy times weights, reduced as TFA's flags say."""
    logits = logits.astype(np.float64)
    log_probs = logits - logits.max(-1, keepdims=True)
    log_probs -= np.log(np.exp(log_probs).sum(-1, keepdims=True))
    ce = -np.take_along_axis(log_probs, targets[..., None], -1)[..., 0]
    weighted = ce * weights

    def ratio(axis, denominator):
        numerator = weighted.sum(axis=axis)
        return np.where(denominator == 0, 0.0, numerator / np.where(denominator == 0, 1, denominator))

    if flags["average_across_timesteps"] and flags["average_across_batch"]:
        return ratio(None, weights.sum())
    if flags["sum_over_timesteps"] and flags["sum_over_batch"]:
        return ratio(None, np.count_nonzero(weights))
    for average, total, axis in (("average_across_timesteps", "sum_over_timesteps", 1),
                                 ("average_across_batch", "sum_over_batch", 0)):
        if flags[average]:
            return ratio(axis, weights.sum(axis=axis))
        if flags[total]:
            return ratio(axis, np.count_nonzero(weights, axis=axis))
    return weighted


@pytest.mark.parametrize("index", range(TFA_CASES))
def test_function_matches_recorded_tfa_loss_and_gradient(index):
    _, meta, case = _cases()[index]
    flags = {flag: meta[flag] for flag in FLAG_NAMES}
    logits = tf.constant(case["logits"])
    with tf.GradientTape() as tape:
        tape.watch(logits)
        loss = tfa.sequence_loss(logits, case["targets"], case["weights"], **flags)
        total = tf.reduce_sum(loss)
    tol = _tolerance(case["logits"].dtype)
    assert loss.shape == case["loss"].shape and loss.dtype == case["loss"].dtype
    np.testing.assert_allclose(loss.numpy(), case["loss"], **tol)
    np.testing.assert_allclose(tape.gradient(total, logits).numpy(), case["grad"], **tol)


@pytest.mark.keras
@pytest.mark.parametrize("index", range(TFA_CASES))
def test_class_default_matches_recorded_tfa_class(index):
    _, _, case = _cases()[index]
    loss = tfa.SequenceLoss()(case["targets"], case["logits"], sample_weight=case["weights"])
    np.testing.assert_allclose(loss.numpy(), case["class_default_loss"], **_tolerance(case["logits"].dtype))


@pytest.mark.keras
@pytest.mark.parametrize("flags", LEGAL_FLAGS, ids=lambda f: "-".join(k for k, v in f.items() if v) or "none")
def test_class_returns_what_the_flags_leave_unreduced_traced(flags):
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(3, 5, 7)).astype("float32")
    targets = rng.integers(0, 7, size=(3, 5))
    weights = (np.arange(5) < np.array([[5], [2], [0]])).astype("float32")
    loss_fn = tfa.SequenceLoss(**flags)
    loss = tf.function(loss_fn.__call__)(targets, logits, weights)
    expected = _reference(logits, targets, weights, flags)
    assert loss.shape == expected.shape  # [], [batch], [time] or [batch, time], never reduced by Keras
    np.testing.assert_allclose(loss.numpy(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.keras
def test_class_defaults_are_tfa_class_defaults_and_function_defaults_are_the_averages():
    loss = tfa.SequenceLoss()
    assert (loss.average_across_timesteps, loss.average_across_batch, loss.sum_over_timesteps,
            loss.sum_over_batch, loss.softmax_loss_function) == (False, False, True, True, None)
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 4, 5)).astype("float32")
    targets = rng.integers(0, 5, size=(2, 4))
    weights = rng.uniform(size=(2, 4)).astype("float32")
    np.testing.assert_allclose(tfa.sequence_loss(logits, targets, weights).numpy(),
                               _reference(logits, targets, weights, LEGAL_FLAGS[0]), rtol=1e-5)


_DATA = (np.zeros([2, 3, 4], "float32"), np.zeros([2, 3], "int32"), np.ones([2, 3], "float32"))


@pytest.mark.parametrize("flags,message", [
    (dict(average_across_timesteps=True, sum_over_timesteps=True),
     "average_across_timesteps and sum_over_timesteps cannot be set to True at same time."),
    (dict(average_across_batch=True, sum_over_batch=True),
     "average_across_batch and sum_over_batch cannot be set to True at same time."),
    (dict(average_across_timesteps=False, average_across_batch=True, sum_over_timesteps=True),
     "average_across_batch and sum_over_timesteps cannot be set to True at same time because of ambiguous order."),
    (dict(average_across_timesteps=True, average_across_batch=False, sum_over_batch=True),
     "sum_over_batch and average_across_timesteps cannot be set to True at same time because of ambiguous order."),
])
def test_conflicting_flags_raise_tfa_messages(flags, message):
    with pytest.raises(ValueError) as raised:
        tfa.sequence_loss(*_DATA, **flags)
    assert str(raised.value) == message


@pytest.mark.parametrize("argument,value,start", [
    (0, np.zeros([2, 3], "float32"), "Logits must be a [batch_size x sequence_length x logits] tensor"),
    (1, np.zeros([2], "int32"), "Targets must be either a [batch_size x sequence_length] tensor"),
    (2, np.ones([2, 3, 1], "float32"), "Weights must be a [batch_size x sequence_length] tensor"),
])
def test_bad_ranks_raise_tfa_messages(argument, value, start):
    args = list(_DATA)
    args[argument] = value
    with pytest.raises(ValueError) as raised:
        tfa.sequence_loss(*args)
    assert str(raised.value).startswith(start)


@pytest.mark.keras
def test_class_checks_flags_when_called_as_tfa_did():
    loss = tfa.SequenceLoss(average_across_batch=True, sum_over_timesteps=True, sum_over_batch=False)
    with pytest.raises(ValueError, match="because of ambiguous order"):
        loss(_DATA[1], _DATA[0], _DATA[2])


@pytest.mark.keras
def test_class_rejects_non_bool_flag_naming_it():
    with pytest.raises(TypeError, match=r"`sum_over_batch` must be a bool. Received: sum_over_batch=1"):
        tfa.SequenceLoss(sum_over_batch=1)


@pytest.mark.keras
def test_missing_weights_mean_all_ones_where_tfa_crashed():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(2, 3, 4)).astype("float32")
    targets = rng.integers(0, 4, size=(2, 3))
    np.testing.assert_allclose(tfa.SequenceLoss()(targets, logits).numpy(),
                               tfa.sequence_loss(logits, targets, np.ones([2, 3], "float32")).numpy())


@pytest.mark.keras
def test_config_round_trip():
    loss = tfa.SequenceLoss(sum_over_batch=False, name="seq")
    restored = tfa.SequenceLoss.from_config(loss.get_config())
    assert restored.get_config() == loss.get_config()
    assert restored.sum_over_batch is False and restored.reduction == "none"


def _constant_logits_model(logits):
    # A model without weights that always outputs `logits` (as TFA's Keras test builds), so that the loss
    # `fit` reports is the loss of known logits.
    inputs = tf.keras.Input(shape=(logits.shape[1],))
    outputs = tf.keras.layers.Lambda(
        lambda x: tf.tile(tf.constant(logits)[:1], [tf.shape(x)[0], 1, 1]),
        output_shape=logits.shape[1:])(inputs)
    return tf.keras.Model(inputs, outputs)


@pytest.mark.keras
@pytest.mark.parametrize("dense_targets", [False, True], ids=["ids", "one_hot"])
def test_compile_reports_tfa_class_default_loss(dense_targets):
    rng = np.random.default_rng(2)
    logits = np.repeat(rng.normal(size=(1, 4, 6)), 3, axis=0).astype("float32")
    targets = rng.integers(0, 6, size=(3, 4))
    weights = (np.arange(4) < np.array([[4], [2], [1]])).astype("float32")
    model = _constant_logits_model(logits)
    model.compile(optimizer="sgd", loss=tfa.SequenceLoss())
    y = np.eye(6, dtype="float32")[targets] if dense_targets else targets
    history = model.fit(np.ones([3, 4], "float32"), y, sample_weight=weights, batch_size=3, verbose=0)
    expected = _reference(logits, targets, weights, dict(zip(FLAG_NAMES, (False, False, True, True))))
    np.testing.assert_allclose(history.history["loss"][0], expected, rtol=1e-5)


@pytest.mark.keras
def test_a_non_scalar_loss_in_compile_is_reported_as_its_mean_under_either_keras():
    from tf_seqloss._keras import keras

    rng = np.random.default_rng(11)
    x = rng.normal(size=(4, 3, 8)).astype("float32")
    y = rng.integers(0, 5, size=(4, 3))
    inputs = keras.Input((3, 8))
    model = keras.Model(inputs, keras.layers.Dense(5)(inputs))
    model.compile(optimizer="sgd", loss=tfa.SequenceLoss(average_across_timesteps=True, sum_over_timesteps=False,
                                                         sum_over_batch=False))
    reported = model.evaluate(x, y, batch_size=4, verbose=0)
    per_sequence = reference.sequence_loss(model.predict(x, verbose=0), y, np.ones((4, 3)),
                                           average_across_timesteps=True, average_across_batch=False)
    np.testing.assert_allclose(reported, per_sequence.mean(), rtol=1e-5)
