"""Regression tests for the defects found by trying the package adversarially, one group per defect.

Each compares against an independent reference: NumPy float64 (`tests/reference.py`), TensorFlow's own
`tf.nn` ops in float64, or a second formulation of the same loss.
"""

import numpy as np
import pytest
import tensorflow as tf

import tf_seqloss
from tests import reference
from tf_seqloss._keras import keras

IMPLEMENTATIONS = tf_seqloss.IMPLEMENTATIONS
MODES = ["eager", "function", "xla"]


def _in_mode(fn, mode):
    if mode == "eager":
        return fn
    return tf.function(fn, jit_compile=mode == "xla")


def _inputs(shape=(3, 4, 5), seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    logits = (rng.normal(size=shape) * 2).astype(dtype)
    targets = rng.integers(0, shape[-1], size=shape[:2])
    weights = (rng.uniform(size=shape[:2]) * (rng.uniform(size=shape[:2]) > 0.25)).astype(dtype)
    return logits, targets, weights


# --- 1. Second-order gradients are the reference's for every implementation -----------------------------

def _numpy_hvp(logits, targets, weights, v):
    """The Hessian-vector product of the default (token-mean) loss, by its closed form in float64."""
    p = np.exp(reference.log_softmax(logits))
    pv = (p * v).sum(-1, keepdims=True)
    scale = weights / weights.sum()
    return scale[..., None] * p * (v - pv)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
def test_hessian_vector_products_equal_the_closed_form(implementation, mode, label_smoothing):
    logits, targets, weights = _inputs(seed=1)
    v = np.random.default_rng(2).normal(size=logits.shape).astype(np.float32)

    def hvp(logits, v):
        with tf.GradientTape() as outer:
            outer.watch(logits)
            with tf.GradientTape() as inner:
                inner.watch(logits)
                loss = tf_seqloss.sequence_loss(logits, targets, weights, label_smoothing=label_smoothing,
                                                implementation=implementation)
            grad = inner.gradient(loss, logits)
            directional = tf.reduce_sum(grad * v)
        return outer.gradient(directional, logits)

    result = _in_mode(hvp, mode)(tf.constant(logits), tf.constant(v))
    assert result is not None, "a second-order gradient must not be None"
    np.testing.assert_allclose(result.numpy(), _numpy_hvp(logits, targets, weights, v), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_full_hessian_equals_float64_tf_nn_reference(implementation):
    logits, targets, weights = _inputs(shape=(2, 2, 4), seed=3, dtype=np.float64)

    def hessian(loss_fn):
        x = tf.constant(logits)
        with tf.GradientTape() as outer:
            outer.watch(x)
            with tf.GradientTape() as inner:
                inner.watch(x)
                loss = loss_fn(x)
            grad = inner.gradient(loss, x)
        return outer.jacobian(grad, x).numpy()

    def by_tf_nn(x):
        ce = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=targets, logits=x)
        return tf.reduce_sum(ce * weights) / tf.reduce_sum(weights)

    ours = hessian(lambda x: tf_seqloss.sequence_loss(x, targets, weights, implementation=implementation))
    np.testing.assert_allclose(ours, hessian(by_tf_nn), rtol=1e-9, atol=1e-12)


# --- 3. Out-of-range ids: loss and gradient agree (both NaN) ---------------------------------------------

@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("bad_id", [-1, 5, 2**31 - 1])
def test_out_of_range_id_makes_loss_and_its_gradient_nan(implementation, mode, bad_id):
    logits, targets, _ = _inputs(seed=4)
    targets[1, 2] = bad_id

    def loss_and_grad(logits):
        with tf.GradientTape() as tape:
            tape.watch(logits)
            loss = tf_seqloss.sequence_loss(logits, targets, implementation=implementation)
        return loss, tape.gradient(loss, logits)

    loss, grad = _in_mode(loss_and_grad, mode)(tf.constant(logits))
    assert np.isnan(loss.numpy())
    assert np.isnan(grad.numpy()[1, 2]).all(), "the bad token's gradient must be NaN, not a finite step"


def test_out_of_range_id_in_the_tf1_family_makes_the_gradient_nan_too():
    logits = tf.constant(np.random.default_rng(5).normal(size=(3, 4)).astype(np.float32))
    with tf.GradientTape() as tape:
        tape.watch(logits)
        loss = tf_seqloss.sparse_softmax_cross_entropy([0, 9, 1], logits)
    assert np.isnan(loss.numpy()) and np.isnan(tape.gradient(loss, logits).numpy()[1]).all()


# --- 4. padding_id outside the targets' integer range is refused, never wrapped ------------------------

@pytest.mark.keras
@pytest.mark.parametrize("padding_id,dtype", [(2**32, tf.int32), (2**32 + 3, tf.int32), (-2**31 - 1, tf.int32),
                                              (300, tf.uint8), (-1, tf.uint8)])
def test_padding_id_that_targets_cannot_hold_is_refused(padding_id, dtype):
    logits = tf.zeros([1, 2, 3])
    targets = tf.constant([[0, 1]], dtype)
    with pytest.raises(ValueError, match=rf"argument `padding_id`. Expected a value {dtype.name} `targets` can hold.*"
                                         rf"padding_id={padding_id}"):
        tf_seqloss.sequence_loss(logits, targets, padding_id=padding_id)
    with pytest.raises(ValueError, match=r"Invalid value for argument `padding_id`. Expected a value"):
        tf_seqloss.SequenceLoss(padding_id=padding_id)(targets, logits)


@pytest.mark.keras
def test_padding_id_beyond_int64_is_refused_when_built():
    with pytest.raises(ValueError, match=r"argument `padding_id`. Expected a class id that fits in int64"):
        tf_seqloss.SequenceLoss(padding_id=2**63)


def test_numpy_integer_padding_id_is_accepted_and_masks_exactly_its_id():
    logits, targets, _ = _inputs(seed=6)
    targets[0, 1] = 3
    mask = (targets != 3).astype(np.float64)
    expected = reference.sequence_loss(logits, targets, mask)
    for padding_id in (np.int64(3), np.int32(3), 3):
        np.testing.assert_allclose(tf_seqloss.sequence_loss(logits, targets, padding_id=padding_id), expected,
                                   rtol=1e-5)


# --- 5. Narrow integer lengths ------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.uint16, np.int32, np.int64])
def test_narrow_lengths_work_when_time_exceeds_their_range(dtype):
    time = 300  # beyond int8 and uint8
    rng = np.random.default_rng(7)
    logits = rng.normal(size=(2, time, 3)).astype(np.float32)
    targets = rng.integers(0, 3, size=(2, time))
    lengths = np.array([min(100, np.iinfo(dtype).max), 7], dtype)
    mask = (np.arange(time)[None] < lengths[:, None].astype(np.int64)).astype(np.float64)
    np.testing.assert_allclose(tf_seqloss.sequence_loss(logits, targets, lengths=lengths),
                               reference.sequence_loss(logits, targets, mask), rtol=1e-5)


# --- 6. SequenceLossLayer checks lengths like the function ------------------------------------------------

@pytest.mark.keras
@pytest.mark.parametrize("lengths", [[7, 2, 1], [-2, 2, 1]])
def test_loss_layer_refuses_lengths_outside_zero_to_time(lengths):
    layer = tf_seqloss.SequenceLossLayer()
    logits, targets, _ = _inputs(seed=8)
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"`lengths` must"):
        layer(tf.constant(logits), tf.constant(targets), lengths=tf.constant(lengths))


@pytest.mark.keras
def test_loss_layer_refuses_float_lengths_naming_them():
    logits, targets, _ = _inputs(seed=8)
    with pytest.raises(TypeError, match=r"`lengths` must hold integer"):
        tf_seqloss.SequenceLossLayer()(tf.constant(logits), tf.constant(targets), lengths=tf.constant([1.0, 2.0, 3.0]))


# --- 7. Out-of-range lengths under XLA give NaN, not a clamped number --------------------------------------

@pytest.mark.parametrize("lengths", [[7, 2, 1], [-2, 2, 1]])
def test_out_of_range_lengths_under_xla_give_nan_loss_and_gradient(lengths):
    logits, targets, _ = _inputs(seed=9)

    @tf.function(jit_compile=True)
    def loss_and_grad(logits, lengths):
        with tf.GradientTape() as tape:
            tape.watch(logits)
            loss = tf_seqloss.sequence_loss(logits, targets, lengths=lengths)
        return loss, tape.gradient(loss, logits)

    loss, grad = loss_and_grad(tf.constant(logits), tf.constant(lengths))
    assert np.isnan(loss.numpy()) and np.isnan(grad.numpy()).any()


def test_out_of_range_lengths_raise_in_a_plain_function():
    logits, targets, _ = _inputs(seed=9)
    run = tf.function(lambda lengths: tf_seqloss.sequence_loss(logits, targets, lengths=lengths))
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"`lengths` must not exceed"):
        run(tf.constant([7, 2, 1]))


# --- 8. label_smoothing is checked whatever its type ---------------------------------------------------------

@pytest.mark.parametrize("value", [np.float32(1.5), np.float64(-0.1), tf.constant(1.5), float("nan"), 2])
def test_out_of_range_label_smoothing_is_refused_in_any_number_type(value):
    logits, targets, _ = _inputs(seed=10)
    with pytest.raises(ValueError, match=r"argument `label_smoothing`. Expected a number in \[0, 1\]"):
        tf_seqloss.sequence_loss(logits, targets, label_smoothing=value)


@pytest.mark.keras
@pytest.mark.parametrize("value", ["0.1", True, [0.1], None])
def test_label_smoothing_of_the_wrong_type_gets_a_type_error(value):
    logits, targets, _ = _inputs(seed=10)
    with pytest.raises(TypeError, match=r"Invalid value for argument `label_smoothing`. Expected"):
        tf_seqloss.sequence_loss(logits, targets, label_smoothing=value)
    with pytest.raises(TypeError, match=r"Invalid value for argument `label_smoothing`. Expected"):
        tf_seqloss.SequenceLoss(label_smoothing=value)


@pytest.mark.keras
def test_numpy_label_smoothing_is_accepted_by_the_class_like_the_function():
    logits, targets, weights = _inputs(seed=11)
    expected = reference.sequence_loss(logits, targets, weights, label_smoothing=0.1)
    loss = tf_seqloss.SequenceLoss(label_smoothing=np.float32(0.1))
    np.testing.assert_allclose(loss(targets, logits, sample_weight=weights), expected, rtol=1e-5)
    np.testing.assert_allclose(tf_seqloss.sequence_loss(logits, targets, weights, label_smoothing=np.float32(0.1)),
                               expected, rtol=1e-5)
    assert type(loss.get_config()["label_smoothing"]) is float


def test_tensor_label_smoothing_known_only_at_run_time_is_checked_there():
    logits, targets, weights = _inputs(seed=12)
    run = tf.function(lambda ls: tf_seqloss.sequence_loss(logits, targets, weights, label_smoothing=ls))
    np.testing.assert_allclose(run(tf.constant(0.3)), reference.sequence_loss(logits, targets, weights,
                                                                               label_smoothing=0.3), rtol=1e-5)
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"label_smoothing"):
        run(tf.constant(1.5))
    compiled = tf.function(lambda ls: tf_seqloss.sequence_loss(logits, targets, weights, label_smoothing=ls),
                           jit_compile=True)
    assert np.isnan(compiled(tf.constant(1.5)).numpy())


# --- 9. Ragged inputs --------------------------------------------------------------------------------------

def _ragged_case(seed=13):
    rng = np.random.default_rng(seed)
    lengths = np.array([4, 1, 3])
    logits = rng.normal(size=(3, 4, 6)).astype(np.float32)
    targets = rng.integers(0, 6, size=(3, 4))
    return logits, targets, lengths


@pytest.mark.parametrize("flags", [{}, dict(average_across_batch=False), dict(sum_over_timesteps=True,
                                   sum_over_batch=True, average_across_timesteps=False, average_across_batch=False)])
def test_ragged_logits_and_targets_equal_padded_inputs_with_lengths(flags):
    logits, targets, lengths = _ragged_case()
    mask = (np.arange(4)[None] < lengths[:, None]).astype(np.float64)
    ragged = tf_seqloss.sequence_loss(tf.RaggedTensor.from_tensor(logits, lengths=lengths),
                                      tf.RaggedTensor.from_tensor(targets, lengths=lengths), **flags)
    np.testing.assert_allclose(ragged, reference.sequence_loss(logits, targets, mask, **flags), rtol=1e-5)


def test_ragged_targets_with_dense_logits_use_their_row_lengths():
    logits, targets, lengths = _ragged_case()
    mask = (np.arange(4)[None] < lengths[:, None]).astype(np.float64)
    loss = tf_seqloss.sequence_loss(logits, tf.RaggedTensor.from_tensor(targets, lengths=lengths))
    np.testing.assert_allclose(loss, reference.sequence_loss(logits, targets, mask), rtol=1e-5)


@pytest.mark.keras
def test_ragged_class_call_equals_padded():
    logits, targets, lengths = _ragged_case()
    mask = (np.arange(4)[None] < lengths[:, None]).astype(np.float64)
    loss = tf_seqloss.SequenceLoss()(tf.RaggedTensor.from_tensor(targets, lengths=lengths),
                                     tf.RaggedTensor.from_tensor(logits, lengths=lengths))
    np.testing.assert_allclose(loss, reference.sequence_loss(logits, targets, mask), rtol=1e-5)


def test_ragged_row_lengths_that_disagree_raise():
    logits, targets, lengths = _ragged_case()
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"row lengths of the ragged `targets` must equal"):
        tf_seqloss.sequence_loss(tf.RaggedTensor.from_tensor(logits, lengths=lengths),
                                 tf.RaggedTensor.from_tensor(targets, lengths=[4, 2, 3]))


def test_ragged_targets_longer_than_dense_logits_raise():
    logits, targets, _ = _ragged_case()
    long_targets = tf.RaggedTensor.from_row_lengths(tf.zeros([9], tf.int32), [5, 2, 2])
    with pytest.raises((tf.errors.InvalidArgumentError, ValueError)):
        tf_seqloss.sequence_loss(logits, long_targets)


def test_doubly_ragged_logits_are_refused_naming_the_argument():
    values = tf.zeros([6, 3])
    inner = tf.RaggedTensor.from_row_lengths(values, [2, 2, 2])
    doubly = tf.RaggedTensor.from_row_lengths(inner, [2, 1])
    with pytest.raises(ValueError, match=r"ragged `logits` must be"):
        tf_seqloss.sequence_loss(doubly, tf.zeros([2, 2], tf.int32))


# --- Keras routes: the layer and the class take their padding through the same path ----------------------

@pytest.mark.keras
def test_layer_lengths_mask_and_weights_equal_the_function():
    logits, targets, weights = _inputs(seed=14)
    lengths = np.array([4, 2, 0])
    layer = tf_seqloss.SequenceLossLayer()
    layer(tf.constant(logits), tf.constant(targets), weights=tf.constant(weights), lengths=tf.constant(lengths))
    mask = (np.arange(4)[None] < lengths[:, None]) * weights
    np.testing.assert_allclose(layer.losses[-1], reference.sequence_loss(logits, targets, mask), rtol=1e-5)


@pytest.mark.keras
def test_keras_mask_from_a_masking_layer_is_read():
    logits, targets, _ = _inputs(seed=15)
    logits[1, 2:] = 0.0
    masked = keras.layers.Masking(mask_value=0.0)(tf.constant(logits))
    mask = np.any(logits != 0.0, axis=-1).astype(np.float64)
    np.testing.assert_allclose(tf_seqloss.SequenceLoss()(targets, masked),
                               reference.sequence_loss(logits, targets, mask), rtol=1e-5)
