"""Adversarial inputs: extremes against NumPy float64, degenerate shapes, hostile dtypes and values.

Every implementation must give the float64 reference's value and gradient at extreme scales, degenerate
shapes must give 0 (never NaN) with finite gradients, and wrong inputs must fail with an error that names
the argument, what was expected and what was received.
"""

import numpy as np
import pytest
import tensorflow as tf

import tf_seqloss
from tests import reference
from tests.conftest import LEGAL_FLAGS
from tests.test_sequence_loss import _loss_and_grad as sequence_loss_and_grad

IMPLEMENTATIONS = tf_seqloss.IMPLEMENTATIONS


def _loss_and_grad(logits, targets, weights=None, **kwargs):
    loss, grad = sequence_loss_and_grad(logits, targets, weights, **kwargs)
    return loss.numpy(), grad


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("scale", [1e-30, 1e-3, 1.0, 50.0, 1e4, 1e30])
def test_extreme_logit_scales_match_float64(implementation, scale):
    rng = np.random.default_rng(int(np.log10(scale)) + 40)
    logits = (rng.normal(size=(2, 3, 9)) * scale).astype(np.float32)
    targets = rng.integers(0, 9, size=(2, 3))
    weights = rng.uniform(0.1, 1.0, size=(2, 3)).astype(np.float32)
    loss, grad = _loss_and_grad(logits, targets, weights, implementation=implementation)
    np.testing.assert_allclose(loss, reference.sequence_loss(logits, targets, weights), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(grad.numpy(), reference.sequence_loss_grad(logits, targets, weights),
                               rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("dtype", [tf.float16, tf.bfloat16])
def test_half_precision_logits_at_their_maximum_do_not_overflow(implementation, dtype):
    # Losses up to about the half type's maximum, which float32 holds (twice the bfloat16 maximum it does not).
    top = float(dtype.max)
    logits = np.array([[[top, 0.0, -top], [0.0, top, top], [top / 2, 0.0, 0.0]]])
    targets = np.array([[0, 1, 1]])
    loss, grad = _loss_and_grad(tf.cast(logits, dtype), targets, implementation=implementation)
    # Represented exactly in float32, where the loss is computed.
    as_float = tf.cast(tf.cast(logits, dtype), tf.float64).numpy()
    np.testing.assert_allclose(loss, reference.sequence_loss(as_float, targets, np.ones((1, 3))), rtol=1e-6)
    assert np.isfinite(tf.cast(grad, tf.float32).numpy()).all()


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("shape", [(0, 3, 5), (2, 0, 5), (0, 0, 5)])
@pytest.mark.parametrize("flags", LEGAL_FLAGS[:5])
def test_empty_batch_or_time_gives_zero_not_nan(implementation, shape, flags):
    loss, grad = _loss_and_grad(np.zeros(shape, np.float32), np.zeros(shape[:2], np.int32),
                                implementation=implementation, **flags)
    assert np.all(loss == 0) and grad.shape == shape


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_a_single_class_has_zero_loss_and_gradient(implementation):
    loss, grad = _loss_and_grad(np.random.default_rng(1).normal(size=(2, 3, 1)).astype(np.float32),
                                np.zeros((2, 3), np.int32), implementation=implementation)
    assert loss == 0 and np.all(grad.numpy() == 0)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_all_padding_gives_zero_loss_and_exactly_zero_gradient(implementation):
    logits = np.full((2, 3, 4), np.nan, np.float32)
    loss, grad = _loss_and_grad(logits, np.full((2, 3), -1), lengths=[0, 0], implementation=implementation)
    assert loss == 0 and np.all(grad.numpy() == 0)


@pytest.mark.parametrize("weights_value", [np.nan, np.inf, -np.inf])
def test_hostile_weights_at_positions_masked_by_lengths_are_ignored(weights_value):
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(2, 4, 5)).astype(np.float32)
    targets = rng.integers(0, 5, size=(2, 4))
    weights = np.ones((2, 4), np.float32)
    weights[1, 2:] = weights_value
    loss, grad = _loss_and_grad(logits, targets, weights, lengths=[4, 2])
    mask = np.array([[1, 1, 1, 1], [1, 1, 0, 0]], np.float64)
    np.testing.assert_allclose(loss, reference.sequence_loss(logits, targets, mask), rtol=1e-5)
    assert np.all(grad.numpy()[1, 2:] == 0)


def test_tiny_weights_keep_full_relative_precision_in_float64():
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(2, 3, 4))
    targets = rng.integers(0, 4, size=(2, 3))
    weights = rng.uniform(size=(2, 3)) * 1e-300
    loss, grad = _loss_and_grad(logits, targets, weights)
    np.testing.assert_allclose(loss, reference.sequence_loss(logits, targets, weights), rtol=1e-12)
    np.testing.assert_allclose(grad.numpy(), reference.sequence_loss_grad(logits, targets, weights), rtol=1e-10)


@pytest.mark.parametrize("dtype", [np.int8, np.uint8, np.int16, np.uint16, np.int32, np.int64])
def test_every_integer_target_dtype_gives_the_same_loss(dtype):
    rng = np.random.default_rng(4)
    logits = rng.normal(size=(2, 3, 6)).astype(np.float32)
    targets = rng.integers(0, 6, size=(2, 3))
    np.testing.assert_allclose(tf_seqloss.sequence_loss(logits, targets.astype(dtype)),
                               reference.sequence_loss(logits, targets, np.ones((2, 3))), rtol=1e-5)


def test_python_lists_are_accepted():
    logits = [[[0.0, 1.0, 2.0], [1.0, 0.0, -1.0]]]
    targets = [[2, 0]]
    np.testing.assert_allclose(tf_seqloss.sequence_loss(logits, targets, [[1.0, 0.5]]),
                               reference.sequence_loss(logits, targets, [[1.0, 0.5]]), rtol=1e-6)


@pytest.mark.parametrize("call,error,pattern", [
    (lambda: tf_seqloss.sequence_loss(tf.zeros([2, 3, 4], tf.int32), tf.zeros([2, 3], tf.int32)), TypeError,
     r"`logits` must be a floating-point tensor.*Received: logits.dtype=int32"),
    (lambda: tf_seqloss.sequence_loss(tf.zeros([2, 3, 4]), tf.constant([["a", "b", "c"]] * 2)), TypeError,
     r"`targets` must hold integer class ids.*Received: targets.dtype=string"),
    (lambda: tf_seqloss.sequence_loss(tf.zeros([2, 3, 4]), tf.zeros([2, 3])), TypeError,
     r"`targets` must hold integer class ids.*float32"),
    (lambda: tf_seqloss.sequence_loss(tf.zeros([2, 3, 4]), tf.zeros([2, 3, 5])), ValueError,
     r"`logits` and `targets` must agree in the classes dimension.*\(2, 3, 4\).*\(2, 3, 5\)"),
    (lambda: tf_seqloss.sequence_loss(tf.zeros([2, 3, 4]), tf.zeros([3, 3], tf.int32)), ValueError,
     r"`logits` and `targets` must agree in the batch dimension"),
    (lambda: tf_seqloss.sequence_loss(tf.zeros([2, 3, 4]), tf.zeros([2, 3], tf.int32), tf.ones([2, 4])), ValueError,
     r"`logits` and `weights` must agree in the time dimension"),
    (lambda: tf_seqloss.sequence_loss(tf.zeros([2, 3, 4]), tf.zeros([2, 3], tf.int32), lengths=[[1, 2]]), ValueError,
     r"`lengths` must have rank 1"),
    (lambda: tf_seqloss.sequence_loss(tf.zeros([2, 3, 4]), tf.zeros([2, 3], tf.int32), lengths=[1, 2, 3]),
     ValueError, r"`logits` and `lengths` must agree in the batch dimension"),
    (lambda: tf_seqloss.sequence_loss(tf.zeros([6, 4]), tf.zeros([6], tf.int32)), ValueError,
     r"`logits` must have rank 3 \(\[batch, time, classes\]\)"),
    (lambda: tf_seqloss.sequence_loss(tf.zeros([2, 3, 4]), tf.zeros([2, 3], tf.int32), padding_id=True), TypeError,
     r"Invalid value for argument `padding_id`. Expected None or an integer"),
    (lambda: tf_seqloss.sequence_loss(tf.zeros([2, 3, 4]), tf.zeros([2, 3], tf.int32), epsilon=float("nan")),
     ValueError, r"Invalid value for argument `epsilon`. Expected None or a non-negative number"),
    (lambda: tf_seqloss.sequence_loss(tf.zeros([2, 3, 4]), tf.zeros([2, 3], tf.int32),
                                      label_smoothing=tf.constant([0.1, 0.2])), TypeError,
     r"scalar float tensor"),
    (lambda: tf_seqloss.SequenceLoss()(tf.zeros([2, 3], tf.int32), tf.zeros([2, 3, 4]),
                                       sample_weight=tf.ones([2, 3, 4, 1])), ValueError, r"`sample_weight` must be"),
    (lambda: tf_seqloss.SequenceLoss()(tf.zeros([2, 3], tf.int32), tf.zeros([2, 3, 4]),
                                       sample_weight=tf.ones([2, 5])), ValueError,
     r"`logits` and `sample_weight` must agree in the time dimension"),
    (lambda: tf_seqloss.SequenceLoss(label_smoothing=tf.constant(0.1)), TypeError,
     r"Invalid value for argument `label_smoothing`. Expected a Python or NumPy number in \[0, 1\]"),
])
@pytest.mark.keras
def test_wrong_inputs_fail_naming_the_argument(call, error, pattern):
    with pytest.raises(error, match=pattern):
        call()


def test_epsilon_as_a_numpy_number_is_accepted():
    rng = np.random.default_rng(5)
    logits, targets = rng.normal(size=(2, 3, 4)), rng.integers(0, 4, size=(2, 3))
    weights = rng.uniform(size=(2, 3)) * 1e-13
    np.testing.assert_allclose(tf_seqloss.sequence_loss(logits, targets, weights, epsilon=np.float64(1e-12)),
                               reference.sequence_loss(logits, targets, weights, epsilon=1e-12), rtol=1e-9)
