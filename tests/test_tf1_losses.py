"""The TF1 family against `tf.compat.v1.losses` itself, run side by side in the same process."""

import numpy as np
import pytest
import tensorflow as tf

import tf_seqloss

REDUCTIONS = [
    tf_seqloss.Reduction.NONE, tf_seqloss.Reduction.SUM, tf_seqloss.Reduction.MEAN,
    tf_seqloss.Reduction.SUM_OVER_BATCH_SIZE, tf_seqloss.Reduction.SUM_BY_NONZERO_WEIGHTS,
    tf_seqloss.Reduction.SUM_OVER_NONZERO_WEIGHTS,
]
rng = np.random.default_rng(0)


def _weights(kind, shape):
    if kind == "scalar":
        return 0.7
    if kind == "zeros":
        return np.zeros(shape)
    weights = rng.uniform(size=shape) * (rng.uniform(size=shape) > 0.3)
    if kind == "unit_last":
        weights = weights[..., :1]
    return weights


def _assert_same_as_tf1(ours, tf1, args, kwargs, dtype):
    logits = tf.constant(args[1])
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(logits)
        expected = tf1(args[0], logits, *args[2:], **kwargs)
        actual = ours(args[0], logits, *args[2:], **kwargs)
    tol = dict(rtol=2e-6, atol=1e-6)  # TF1 reduces in float32 even for float64 input
    assert actual.shape == expected.shape
    assert actual.dtype == expected.dtype == dtype
    np.testing.assert_allclose(actual, expected, **tol)
    np.testing.assert_allclose(tape.gradient(actual, logits), tape.gradient(expected, logits), **tol)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("weight_kind", ["scalar", "full", "zeros", "unit_last"])
@pytest.mark.parametrize("label_smoothing", [0, 0.2])
@pytest.mark.parametrize("dtype,leading", [(tf.float32, (5,)), (tf.float64, (3, 4))])
def test_softmax_cross_entropy_equals_tf1(reduction, weight_kind, label_smoothing, dtype, leading):
    classes = 6
    logits = rng.normal(size=leading + (classes,)).astype(dtype.as_numpy_dtype)
    onehot = np.eye(classes)[rng.integers(0, classes, size=leading)].astype(dtype.as_numpy_dtype)
    weights = _weights(weight_kind, leading)
    _assert_same_as_tf1(tf_seqloss.softmax_cross_entropy, tf.compat.v1.losses.softmax_cross_entropy,
                        (onehot, logits, weights), dict(label_smoothing=label_smoothing, reduction=reduction), dtype)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("weight_kind", ["scalar", "full", "zeros", "unit_last"])
@pytest.mark.parametrize("dtype,leading", [(tf.float32, (3, 4)), (tf.float64, (5,))])
def test_sparse_softmax_cross_entropy_equals_tf1(reduction, weight_kind, dtype, leading):
    classes = 6
    logits = rng.normal(size=leading + (classes,)).astype(dtype.as_numpy_dtype)
    labels = rng.integers(0, classes, size=leading)
    weights = _weights(weight_kind, leading)
    _assert_same_as_tf1(tf_seqloss.sparse_softmax_cross_entropy, tf.compat.v1.losses.sparse_softmax_cross_entropy,
                        (labels, logits, weights), dict(reduction=reduction), dtype)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_sparse_labels_and_weights_with_a_trailing_unit_dimension_are_squeezed_as_tf1(reduction):
    logits = rng.normal(size=(5, 4)).astype(np.float32)
    labels = rng.integers(0, 4, size=(5, 1))
    weights = rng.uniform(size=(5, 1)).astype(np.float32)
    _assert_same_as_tf1(tf_seqloss.sparse_softmax_cross_entropy, tf.compat.v1.losses.sparse_softmax_cross_entropy,
                        (labels, logits, weights), dict(reduction=reduction), tf.float32)


def test_reduction_keys_are_tf1_keys():
    tf1 = tf.compat.v1.losses.Reduction
    for key in ("NONE", "SUM", "MEAN", "SUM_OVER_BATCH_SIZE", "SUM_BY_NONZERO_WEIGHTS", "SUM_OVER_NONZERO_WEIGHTS"):
        assert getattr(tf_seqloss.Reduction, key) == getattr(tf1, key)
    assert set(tf_seqloss.Reduction.all()) == set(tf1.all())


def test_out_of_range_label_with_weight_gives_nan_without_weight_is_ignored():
    logits = tf.zeros([3, 4])
    assert np.isnan(tf_seqloss.sparse_softmax_cross_entropy([0, 7, 1], logits).numpy())
    loss = tf_seqloss.sparse_softmax_cross_entropy([0, 7, 1], logits, weights=[1.0, 0.0, 1.0])
    np.testing.assert_allclose(loss, np.log(4.0), rtol=1e-6)


def test_float16_logits_reduce_in_float32():
    logits = tf.constant([[6e4, -6e4, 0.0]], tf.float16)
    loss = tf_seqloss.softmax_cross_entropy([[0.0, 1.0, 0.0]], logits)
    assert loss.dtype == tf.float32
    np.testing.assert_allclose(loss, 1.2e5, rtol=1e-6)


@pytest.mark.parametrize("call,pattern", [
    (lambda: tf_seqloss.softmax_cross_entropy(None, tf.zeros([2, 3])), r"`onehot_labels` must not be None"),
    (lambda: tf_seqloss.softmax_cross_entropy(tf.zeros([2, 3]), None), r"`logits` must not be None"),
    (lambda: tf_seqloss.softmax_cross_entropy(tf.zeros([2, 3]), tf.zeros([2, 3]), weights=None),
     r"`weights` must not be None"),
    (lambda: tf_seqloss.softmax_cross_entropy(tf.zeros([2, 4]), tf.zeros([2, 3])), r"same shape"),
    (lambda: tf_seqloss.softmax_cross_entropy(tf.zeros([2, 3]), tf.zeros([2, 3]), weights=tf.ones([3])),
     r"broadcastable"),
    (lambda: tf_seqloss.softmax_cross_entropy(tf.zeros([2, 3]), tf.zeros([2, 3]), weights=tf.ones([2, 2])),
     r"scalar or have the rank"),
    (lambda: tf_seqloss.softmax_cross_entropy(tf.zeros([2, 3]), tf.zeros([2, 3]), label_smoothing=2),
     r"`label_smoothing`"),
    (lambda: tf_seqloss.softmax_cross_entropy(tf.zeros([2, 3]), tf.zeros([2, 3]), reduction="mean"),
     r"Invalid value for argument `reduction`"),
    (lambda: tf_seqloss.sparse_softmax_cross_entropy(None, tf.zeros([2, 3])), r"`labels` must not be None"),
    (lambda: tf_seqloss.sparse_softmax_cross_entropy([0, 1], None), r"`logits` must not be None"),
    (lambda: tf_seqloss.sparse_softmax_cross_entropy([0, 1], tf.zeros([2, 3]), weights=None),
     r"`weights` must not be None"),
    (lambda: tf_seqloss.sparse_softmax_cross_entropy([0, 1, 2], tf.zeros([2, 3])), r"`logits` and `labels`"),
    (lambda: tf_seqloss.sparse_softmax_cross_entropy([[0, 1]], tf.zeros([2, 3])), r"one dimension fewer"),
    (lambda: tf_seqloss.sparse_softmax_cross_entropy([0, 1], tf.zeros([2, 3]), weights=[1.0, 1.0, 1.0]),
     r"broadcastable"),
])
def test_errors_are_the_value_errors_tf1_documents(call, pattern):
    with pytest.raises(ValueError, match=pattern):
        call()


def test_float_labels_for_sparse_are_a_type_error():
    with pytest.raises(TypeError, match=r"integer class ids"):
        tf_seqloss.sparse_softmax_cross_entropy([0.0, 1.0], tf.zeros([2, 3]))
