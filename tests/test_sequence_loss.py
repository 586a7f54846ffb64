"""`sequence_loss` against the NumPy float64 reference, and its documented behaviours and errors."""

import numpy as np
import pytest
import tensorflow as tf
from hypothesis import given, settings
from hypothesis import strategies as st

import tf_seqloss
from tests import reference
from tests.conftest import LEGAL_FLAGS


def _loss_and_grad(logits, targets, weights=None, **kwargs):
    logits = tf.constant(logits)
    with tf.GradientTape() as tape:
        tape.watch(logits)
        loss = tf_seqloss.sequence_loss(logits, targets, weights, **kwargs)
        total = tf.reduce_sum(loss)
    return loss, tape.gradient(total, logits)


@st.composite
def batches(draw):
    batch, time, classes = draw(st.integers(1, 4)), draw(st.integers(1, 6)), draw(st.integers(2, 12))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    logits = (rng.normal(size=(batch, time, classes)) * draw(st.sampled_from([0.1, 3.0, 30.0]))).astype(dtype)
    if draw(st.booleans()):
        targets = rng.integers(0, classes, size=(batch, time)).astype(draw(st.sampled_from([np.int32, np.int64])))
    else:
        targets = rng.dirichlet(np.ones(classes), size=(batch, time)).astype(dtype)
    kind = draw(st.sampled_from(["ones", "lengths", "random", "zeros"]))
    if kind == "ones":
        weights = np.ones((batch, time))
    elif kind == "lengths":
        weights = (np.arange(time) < rng.integers(0, time + 1, size=(batch, 1))).astype(np.float64)
    elif kind == "random":
        weights = rng.uniform(size=(batch, time)) * (rng.uniform(size=(batch, time)) > 0.3)
    else:
        weights = np.zeros((batch, time))
    return logits, targets, weights.astype(draw(st.sampled_from([np.float32, np.float64])))


@settings(max_examples=60, deadline=None)
@given(batches(), st.sampled_from(LEGAL_FLAGS), st.sampled_from([0.0, 0.1, 0.37]))
def test_matches_numpy_float64_reference(batch, flags, label_smoothing):
    logits, targets, weights = batch
    loss, grad = _loss_and_grad(logits, targets, weights, label_smoothing=label_smoothing, **flags)
    expected = reference.sequence_loss(logits, targets, weights, label_smoothing=label_smoothing, **flags)
    expected_grad = reference.sequence_loss_grad(logits, targets, weights, label_smoothing=label_smoothing, **flags)
    tol = dict(rtol=1e-4, atol=1e-5) if logits.dtype == np.float32 else dict(rtol=1e-10, atol=1e-10)
    assert loss.dtype == logits.dtype
    assert loss.shape == np.shape(expected)
    np.testing.assert_allclose(loss.numpy(), expected, **tol)
    np.testing.assert_allclose(grad.numpy(), expected_grad, **tol)


@pytest.mark.parametrize("flags", LEGAL_FLAGS)
@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
def test_gradient_matches_finite_differences(flags, label_smoothing):
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 3, 4))
    targets = rng.integers(0, 4, size=(2, 3))
    weights = np.array([[1.0, 0.5, 0.0], [2.0, 0.0, 0.0]])
    theoretical, numerical = tf.test.compute_gradient(
        lambda x: tf_seqloss.sequence_loss(x, targets, weights, label_smoothing=label_smoothing, **flags),
        [tf.constant(logits)])
    np.testing.assert_allclose(theoretical[0], numerical[0], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("flags,shape", [
    (LEGAL_FLAGS[0], ()), (LEGAL_FLAGS[1], (3,)), (LEGAL_FLAGS[2], (5,)), (LEGAL_FLAGS[3], (3, 5)),
    (LEGAL_FLAGS[4], ()), (LEGAL_FLAGS[5], (3,)), (LEGAL_FLAGS[6], (5,)),
])
def test_output_shape_follows_flags(flags, shape):
    loss = tf_seqloss.sequence_loss(tf.zeros([3, 5, 7]), tf.zeros([3, 5], tf.int32), **flags)
    assert loss.shape == shape


def test_defaults_are_the_contrib_weighted_mean():
    rng = np.random.default_rng(1)
    logits, targets = rng.normal(size=(3, 4, 6)), rng.integers(0, 6, size=(3, 4))
    weights = rng.uniform(size=(3, 4))
    ce = reference.token_cross_entropy(logits, targets)
    np.testing.assert_allclose(tf_seqloss.sequence_loss(logits, targets, weights),
                               (ce * weights).sum() / weights.sum(), rtol=1e-12)


def test_all_zero_weights_give_zero_not_nan():
    for flags in LEGAL_FLAGS:
        loss, grad = _loss_and_grad(np.ones((2, 3, 4)), np.zeros((2, 3), np.int32), np.zeros((2, 3)), **flags)
        assert np.all(loss.numpy() == 0) and np.all(grad.numpy() == 0)


def test_weights_none_means_all_ones():
    rng = np.random.default_rng(2)
    logits, targets = rng.normal(size=(2, 5, 3)), rng.integers(0, 3, size=(2, 5))
    for flags in LEGAL_FLAGS:
        np.testing.assert_allclose(tf_seqloss.sequence_loss(logits, targets, **flags),
                                   reference.sequence_loss(logits, targets, np.ones((2, 5)), **flags), rtol=1e-12)


def test_lengths_equal_a_prefix_mask_and_combine_with_weights():
    rng = np.random.default_rng(3)
    logits, targets = rng.normal(size=(3, 5, 4)), rng.integers(0, 4, size=(3, 5))
    lengths = np.array([5, 2, 0])
    mask = np.array([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [0, 0, 0, 0, 0]], np.float64)
    weights = rng.uniform(size=(3, 5))
    for flags in LEGAL_FLAGS:
        np.testing.assert_allclose(tf_seqloss.sequence_loss(logits, targets, lengths=lengths, **flags),
                                   reference.sequence_loss(logits, targets, mask, **flags), rtol=1e-12)
        np.testing.assert_allclose(tf_seqloss.sequence_loss(logits, targets, weights, lengths=lengths, **flags),
                                   reference.sequence_loss(logits, targets, mask * weights, **flags), rtol=1e-12)


@pytest.mark.parametrize("padding_id", [0, 3, -1, -100])
def test_padding_id_masks_its_positions(padding_id):
    rng = np.random.default_rng(4)
    logits = rng.normal(size=(2, 4, 4))
    targets = np.array([[1, 2, padding_id, padding_id], [padding_id, 1, 1, padding_id]])
    keep = (targets != padding_id).astype(np.float64)
    safe_targets = np.where(keep > 0, targets, 0)
    for flags in LEGAL_FLAGS:
        np.testing.assert_allclose(tf_seqloss.sequence_loss(logits, targets, padding_id=padding_id, **flags),
                                   reference.sequence_loss(logits, safe_targets, keep, **flags), rtol=1e-12)


def test_sparse_label_smoothing_equals_smoothed_one_hot_targets():
    rng = np.random.default_rng(5)
    logits = tf.constant(rng.normal(size=(2, 3, 5)))
    targets = rng.integers(0, 5, size=(2, 3))
    onehot = tf.one_hot(targets, 5, dtype=tf.float64)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(logits)
        sparse = tf_seqloss.sequence_loss(logits, targets, label_smoothing=0.3)
        dense = tf_seqloss.sequence_loss(logits, onehot, label_smoothing=0.3)
    np.testing.assert_allclose(sparse, dense, rtol=1e-12)
    np.testing.assert_allclose(tape.gradient(sparse, logits), tape.gradient(dense, logits), rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("dtype", [tf.float16, tf.bfloat16])
def test_half_precision_logits_are_computed_in_float32_without_overflow(dtype):
    rng = np.random.default_rng(6)
    logits = tf.cast(rng.uniform(-6e4, 6e4, size=(2, 3, 8)), dtype)
    targets = rng.integers(0, 8, size=(2, 3))
    with tf.GradientTape() as tape:
        tape.watch(logits)
        loss = tf_seqloss.sequence_loss(logits, targets, label_smoothing=0.1)
    grad = tape.gradient(loss, logits)
    assert loss.dtype == tf.float32 and grad.dtype == dtype
    expected = reference.sequence_loss(tf.cast(logits, tf.float64).numpy(), targets, np.ones((2, 3)),
                                       label_smoothing=0.1)
    assert np.isfinite(loss.numpy()) and np.all(np.isfinite(tf.cast(grad, tf.float32).numpy()))
    np.testing.assert_allclose(loss.numpy(), expected, rtol=1e-6)


def test_weights_of_another_float_dtype_are_accepted():
    rng = np.random.default_rng(7)
    logits, targets = rng.normal(size=(2, 3, 4)).astype(np.float32), rng.integers(0, 4, size=(2, 3))
    weights = rng.uniform(size=(2, 3))
    for wdtype in (np.float16, np.float64):
        loss = tf_seqloss.sequence_loss(logits, targets, weights.astype(wdtype))
        assert loss.dtype == tf.float32
        np.testing.assert_allclose(loss, reference.sequence_loss(logits, targets, weights.astype(wdtype)), rtol=1e-5)


@pytest.mark.parametrize("mode", ["eager", "function", "xla"])
@pytest.mark.parametrize("bad_id", [5, 99, -1])
def test_out_of_range_ids_give_nan_where_weighted_and_are_ignored_where_not(mode, bad_id):
    def run(logits, targets, weights, **flags):
        return tf_seqloss.sequence_loss(logits, targets, weights, **flags)
    if mode != "eager":
        run = tf.function(run, jit_compile=(mode == "xla"))
    rng = np.random.default_rng(8)
    logits = tf.constant(rng.normal(size=(2, 3, 5)).astype(np.float32))
    targets = tf.constant([[1, bad_id, 2], [0, 4, bad_id]])
    weights = tf.constant([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    assert np.isnan(run(logits, targets, weights).numpy())
    elementwise = run(logits, targets, weights, average_across_timesteps=False, average_across_batch=False).numpy()
    assert np.isnan(elementwise[0, 1]) and np.isfinite(np.delete(elementwise.ravel(), 1)).all()
    # The out-of-range id of row 1 sits at weight 0: dropping it from the weights leaves a finite loss.
    weights = tf.constant([[1.0, 0.0, 1.0], [1.0, 1.0, 0.0]])
    safe = np.where((targets.numpy() >= 0) & (targets.numpy() < 5), targets.numpy(), 0)
    np.testing.assert_allclose(run(logits, targets, weights).numpy(),
                               reference.sequence_loss(logits.numpy(), safe, weights.numpy()), rtol=1e-5)


def test_custom_softmax_loss_function_gets_flat_keywords():
    rng = np.random.default_rng(9)
    logits, targets = rng.normal(size=(2, 3, 4)), rng.integers(0, 4, size=(2, 3))
    weights = rng.uniform(size=(2, 3))
    seen = {}

    def log_softmax_loss(labels, logits):
        seen["shapes"] = (labels.shape.as_list(), logits.shape.as_list())
        return -tf.gather(tf.nn.log_softmax(logits), labels, batch_dims=1)

    for flags in LEGAL_FLAGS:
        loss = tf_seqloss.sequence_loss(logits, targets, weights, softmax_loss_function=log_softmax_loss, **flags)
        np.testing.assert_allclose(loss, reference.sequence_loss(logits, targets, weights, **flags), rtol=1e-12)
    assert seen["shapes"] == ([6], [6, 4])


def test_softmax_loss_function_with_another_signature_gets_a_type_error_saying_how_to_wrap():
    with pytest.raises(TypeError, match=r"labels=.*logits=.*sampled_sequence_loss.*Wrap any other"):
        tf_seqloss.sequence_loss(tf.zeros([2, 3, 4]), tf.zeros([2, 3], tf.int32),
                                 softmax_loss_function=tf.nn.sampled_softmax_loss)


def test_name_scopes_the_graph_ops():
    with tf.Graph().as_default():
        loss = tf_seqloss.sequence_loss(tf.zeros([2, 3, 4]), tf.zeros([2, 3], tf.int32), name="my_loss")
        assert loss.op.name.startswith("my_loss/")


# -- errors ---------------------------------------------------------------------------------------------

L, T = tf.zeros([2, 3, 4]), tf.zeros([2, 3], tf.int32)


@pytest.mark.parametrize("call,error,pattern", [
    (lambda: tf_seqloss.sequence_loss(tf.zeros([2, 4]), T), ValueError, r"`logits` must have rank 3"),
    (lambda: tf_seqloss.sequence_loss(L, tf.zeros([2], tf.int32)), ValueError, r"`targets` must have rank 2 or 3"),
    (lambda: tf_seqloss.sequence_loss(L, tf.zeros([3, 3], tf.int32)), ValueError, r"batch dimension.*\(3, 3\)"),
    (lambda: tf_seqloss.sequence_loss(L, tf.zeros([2, 5], tf.int32)), ValueError, r"time dimension"),
    (lambda: tf_seqloss.sequence_loss(L, tf.zeros([2, 3, 5])), ValueError, r"classes dimension"),
    (lambda: tf_seqloss.sequence_loss(L, T, tf.ones([2, 4])), ValueError, r"`logits` and `weights`.*time"),
    (lambda: tf_seqloss.sequence_loss(L, T, tf.ones([2])), ValueError, r"`weights` must have rank 2"),
    (lambda: tf_seqloss.sequence_loss(L, T, lengths=[1, 2, 3]), ValueError, r"`lengths`.*batch"),
    (lambda: tf_seqloss.sequence_loss(L, tf.zeros([2, 3])), TypeError, r"integer class ids.*float32"),
    (lambda: tf_seqloss.sequence_loss(tf.zeros([2, 3, 4], tf.int32), T), TypeError, r"`logits` must be a floating"),
    (lambda: tf_seqloss.sequence_loss(L, T, tf.ones([2, 3], tf.int32)), TypeError, r"`weights` must be a floating"),
    (lambda: tf_seqloss.sequence_loss(L, T, lengths=[1.0, 2.0]), TypeError, r"`lengths` must hold integer"),
    (lambda: tf_seqloss.sequence_loss(L, T, average_across_timesteps=True, sum_over_timesteps=True),
     ValueError, r"`average_across_timesteps` and `sum_over_timesteps` cannot both be True"),
    (lambda: tf_seqloss.sequence_loss(L, T, average_across_batch=True, sum_over_batch=True,
                                      average_across_timesteps=False), ValueError, r"average_across_batch"),
    (lambda: tf_seqloss.sequence_loss(L, T, average_across_timesteps=False, sum_over_timesteps=True),
     ValueError, r"`average_across_batch` and `sum_over_timesteps`"),
    (lambda: tf_seqloss.sequence_loss(L, T, average_across_batch=False, sum_over_batch=True),
     ValueError, r"`average_across_timesteps` and `sum_over_batch`"),
    (lambda: tf_seqloss.sequence_loss(L, T, average_across_batch=1), TypeError,
     r"argument `average_across_batch`. Expected True or False"),
    (lambda: tf_seqloss.sequence_loss(L, T, label_smoothing=1.5), ValueError,
     r"argument `label_smoothing`. Expected a number in"),
    (lambda: tf_seqloss.sequence_loss(L, T, label_smoothing=0.1, softmax_loss_function=lambda labels, logits: 0),
     ValueError, r"cannot be combined"),
    (lambda: tf_seqloss.sequence_loss(L, tf.zeros([2, 3, 4]), padding_id=0), ValueError, r"`padding_id` needs sparse"),
    (lambda: tf_seqloss.sequence_loss(L, T, padding_id=0.5), TypeError,
     r"argument `padding_id`. Expected None or an integer"),
    (lambda: tf_seqloss.sequence_loss(L, T, epsilon=-1.0), ValueError, r"argument `epsilon`. Expected None"),
    (lambda: tf_seqloss.sequence_loss(L, T, implementation="fastest"), ValueError, r"`implementation`"),
])
def test_bad_input_raises_a_clear_error_before_computing(call, error, pattern):
    with pytest.raises(error, match=pattern):
        call()


def test_mismatch_hidden_by_none_dims_raises_when_the_graph_runs():
    spec = tf.TensorSpec([None, None, None]), tf.TensorSpec([None, None], tf.int32)
    loss = tf.function(tf_seqloss.sequence_loss, input_signature=spec)
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"`logits` and `targets` must agree in the time"):
        loss(tf.zeros([2, 3, 4]), tf.zeros([2, 5], tf.int32))


def test_unknown_rank_is_refused_while_tracing():
    loss = tf.function(tf_seqloss.sequence_loss, input_signature=(
        tf.TensorSpec(None), tf.TensorSpec([None, None], tf.int32)))
    with pytest.raises(ValueError, match=r"rank of `logits` must be known"):
        loss.get_concrete_function()


@pytest.mark.parametrize("lengths", [[4, 1], [-1, 2]])
def test_lengths_outside_zero_to_time_raise(lengths):
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"`lengths` must"):
        tf_seqloss.sequence_loss(L, T, lengths=lengths)
