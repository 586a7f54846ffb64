"""Higher-order gradients and padding robustness of `_fused.fused_cross_entropy`.

References: `tf.nn.sparse_softmax_cross_entropy_with_logits` on the logits cast to float64 (its registered
gradient has a second derivative; TF1 label smoothing added as plain ops), and the NumPy float64 closed
forms, per row with `p = softmax(logits)`, upstream gradient `g` and cotangent `v`:
Hessian-vector product `g * (p * v - p * <p, v>)`, mixed derivative `<v, p> - (1 - ls) * v[label] -
ls * mean(v)`.
"""

import numpy as np
import pytest
import tensorflow as tf

from tests import reference
from tests.graph_checks import on_a_machine, ops_without_gpu_kernel
from tf_seqloss import _fused

MODES = ("eager", "function", "xla")
DTYPES = (tf.float32, tf.float64, tf.float16, tf.bfloat16)
# Second-order terms are computed in float32 for half logits and rounded to the logits' dtype.
TOL = {tf.float64: 1e-12, tf.float32: 2e-6, tf.float16: 2e-3, tf.bfloat16: 1.6e-2}


def _param_id(value):
    return getattr(value, "name", str(value))


def _inputs(shape, dtype=tf.float32, seed=0, scale=3.0):
    """Logits, ids, uneven upstream weights `w` and a cotangent `v` for the Hessian-vector product."""
    rng = np.random.default_rng(seed)
    logits = tf.cast(rng.normal(size=shape) * scale, dtype)
    ids = tf.constant(rng.integers(0, shape[-1], size=shape[:-1]), tf.int64)
    weights = tf.constant(rng.uniform(0.5, 2.0, size=shape[:-1]))
    cotangent = tf.constant(rng.normal(size=shape))
    return logits, ids, weights, cotangent


def _fused_loss(compiled, label_smoothing=0.0):
    def loss(logits, ids, active=None):
        return _fused.fused_cross_entropy(logits, ids, label_smoothing, compiled=compiled, active=active)
    return loss


def _reference_loss(label_smoothing=0.0):
    def loss(logits, ids, active=None):
        del active
        logits = tf.cast(logits, tf.float64)
        value = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=ids, logits=logits)
        if label_smoothing:
            target = tf.gather(logits, ids[..., None], batch_dims=ids.shape.rank)[..., 0]
            value += label_smoothing * (target - tf.reduce_mean(logits, axis=-1))
        return value
    return loss


def _second_order(loss_fn, logits, ids, weights, cotangent):
    """Returns `(grad, hvp, mixed)`: the gradient of `sum(w * loss)`, and of `<v, grad>` in logits and w."""
    with tf.GradientTape(persistent=True) as outer:
        outer.watch([logits, weights])
        with tf.GradientTape() as inner:
            inner.watch(logits)
            loss = loss_fn(logits, ids)
            total = tf.reduce_sum(tf.cast(weights, loss.dtype) * loss)
        grad = inner.gradient(total, logits)
        dot = tf.reduce_sum(tf.cast(grad, tf.float64) * cotangent)
    return grad, outer.gradient(dot, logits), outer.gradient(dot, weights)


def _in_mode(fn, mode):
    if mode == "eager":
        return fn
    if mode == "xla":
        return tf.function(fn, jit_compile=True)

    def run(*args):  # `None` sizes: nothing may rely on a static shape
        signature = [tf.TensorSpec([None] * len(arg.shape), arg.dtype) for arg in args]
        return tf.function(fn, input_signature=signature)(*args)
    return run


def _assert_close(actual, expected, tol):
    np.testing.assert_allclose(tf.cast(actual, tf.float64), tf.cast(expected, tf.float64), rtol=tol, atol=tol)


@pytest.mark.parametrize("compiled", (False, True), ids=("traced", "compiled"))
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES, ids=_param_id)
@pytest.mark.parametrize("label_smoothing", (0.0, 0.2))
def test_second_order_equals_reference(compiled, mode, dtype, label_smoothing):
    inputs = _inputs((3, 4, 9), dtype, seed=1)
    step = lambda loss_fn: lambda *args: _second_order(loss_fn, *args)
    grad, hvp, mixed = _in_mode(step(_fused_loss(compiled, label_smoothing)), mode)(*inputs)
    ref_grad, ref_hvp, ref_mixed = step(_reference_loss(label_smoothing))(*inputs)
    assert hvp.dtype == dtype and mixed.dtype == tf.float64
    _assert_close(grad, ref_grad, TOL[dtype])
    _assert_close(hvp, ref_hvp, TOL[dtype])
    # The mixed term is <v, dgrad/dw>: a sum over classes of terms rounded to the logits' dtype.
    _assert_close(mixed, ref_mixed, TOL[dtype] * 4)


@pytest.mark.parametrize("machine", ("cpu_only", "with_gpu"))
@pytest.mark.parametrize("dtype", (tf.float16, tf.bfloat16), ids=_param_id)
def test_half_precision_plain_ops_equal_reference_as_either_machine_traces_them(machine, dtype):
    # Op by op, the half-precision gradient is finished by a narrow scatter on CPU-only machines and by
    # the float32 one where a GPU is visible (see `_fused._gradient`).
    inputs = _inputs((3, 4, 1030), dtype, seed=7)
    step = lambda loss_fn: lambda *args: _second_order(loss_fn, *args)
    with on_a_machine(gpu=machine == "with_gpu"):
        grad, hvp, mixed = _in_mode(step(_fused_loss(False, 0.2)), "function")(*inputs)
    ref_grad, ref_hvp, ref_mixed = step(_reference_loss(0.2))(*inputs)
    assert grad.dtype == dtype
    _assert_close(grad, ref_grad, TOL[dtype])
    _assert_close(hvp, ref_hvp, TOL[dtype])
    _assert_close(mixed, ref_mixed, TOL[dtype] * 4)


@pytest.mark.parametrize("compiled", (False, True), ids=("traced", "compiled"))
@pytest.mark.parametrize("mode", MODES)
def test_second_order_equals_numpy_closed_form(compiled, mode, label_smoothing=0.15):
    # [batch, time, beam, classes], 1024 classes: the size at which the wrong Hessian was first seen.
    logits, ids, weights, cotangent = _inputs((2, 2, 2, 1024), tf.float64, seed=2)
    fn = _in_mode(lambda *args: _second_order(_fused_loss(compiled, label_smoothing), *args), mode)
    _, hvp, mixed = fn(logits, ids, weights, cotangent)
    p = np.exp(reference.log_softmax(logits.numpy()))
    v, w = cotangent.numpy(), weights.numpy()
    p_dot_v = np.sum(p * v, axis=-1)
    v_at_label = np.take_along_axis(v, ids.numpy()[..., None], axis=-1)[..., 0]
    np.testing.assert_allclose(hvp, w[..., None] * p * (v - p_dot_v[..., None]), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(
        mixed, p_dot_v - (1 - label_smoothing) * v_at_label - label_smoothing * v.mean(axis=-1),
        rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("compiled", (False, True), ids=("traced", "compiled"))
@pytest.mark.parametrize("mode", ("eager", "xla"))
def test_third_order_equals_reference(compiled, mode, label_smoothing=0.1):
    logits, ids, weights, cotangent = _inputs((2, 3, 7), tf.float64, seed=3)
    second_cotangent = tf.constant(np.random.default_rng(4).normal(size=(2, 3, 7)))

    def third(loss_fn, logits, ids, weights, cotangent):
        with tf.GradientTape() as tape:
            tape.watch(logits)
            _, hvp, _ = _second_order(loss_fn, logits, ids, weights, cotangent)
            dot = tf.reduce_sum(hvp * second_cotangent)
        return tape.gradient(dot, logits)

    fn = lambda *args: third(_fused_loss(compiled, label_smoothing), *args)
    fn = tf.function(fn, jit_compile=True) if mode == "xla" else fn
    expected = third(_reference_loss(label_smoothing), logits, ids, weights, cotangent)
    assert np.any(expected.numpy() != 0)
    _assert_close(fn(logits, ids, weights, cotangent), expected, 1e-12)


# Padded rows as attention masks leave them: every logit +inf, -inf or NaN, or a mixture.
PADDING = {"inf": [np.inf], "-inf": [-np.inf], "nan": [np.nan], "mixed": [np.inf, -np.inf, np.nan, 1.0]}


def _padded(dtype, fill, classes=6):
    """Logits `[3, 4, classes]` whose positions past each length hold `fill`, and the mask of the others."""
    logits, ids, weights, cotangent = _inputs((3, 4, classes), dtype, seed=5)
    active = tf.sequence_mask([4, 2, 1], 4)
    padding = np.resize(np.array(fill), classes)
    padded = tf.where(active[..., None], logits, tf.cast(padding, dtype))
    return padded, logits, ids, weights, cotangent, active


def _masked_second_order(loss_fn, logits, ids, weights, cotangent, active, pass_active):
    def masked(logits, ids):
        loss = loss_fn(logits, ids, active if pass_active else None)
        return tf.where(active, loss, tf.zeros_like(loss))  # what the per-token loss does with padding
    return _second_order(masked, logits, ids, weights, cotangent)


@pytest.mark.parametrize("compiled", (False, True), ids=("traced", "compiled"))
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("fill", sorted(PADDING))
@pytest.mark.parametrize("pass_active", (False, True), ids=("no_active", "active"))
def test_zero_upstream_rows_get_exactly_zero_gradients_whatever_their_logits(compiled, mode, fill, pass_active):
    padded, finite, ids, weights, cotangent, active = _padded(tf.float32, PADDING[fill])
    label_smoothing = 0.1

    def run(loss_fn, logits):
        fn = lambda *args: _masked_second_order(loss_fn, *args, active, pass_active)
        return _in_mode(fn, mode)(logits, ids, weights, cotangent)

    grad, hvp, mixed = run(_fused_loss(compiled, label_smoothing), padded)
    pad = ~active.numpy()
    assert np.all(grad.numpy()[pad] == 0) and np.all(hvp.numpy()[pad] == 0)
    # The other rows are those of the same logits without padding, and stay exact. The mixed term of a
    # padded row is NaN inside, but the `tf.where` that selected the row away passes 0 on to its weight.
    ref_grad, ref_hvp, ref_mixed = run(_reference_loss(label_smoothing), finite)
    _assert_close(grad, ref_grad, TOL[tf.float32])
    _assert_close(hvp, ref_hvp, TOL[tf.float32])
    _assert_close(mixed, ref_mixed, TOL[tf.float32] * 4)


@pytest.mark.parametrize("compiled", (False, True), ids=("traced", "compiled"))
@pytest.mark.parametrize("mode", ("eager", "xla"))
@pytest.mark.parametrize("dtype", (tf.float16, tf.bfloat16, tf.float64), ids=_param_id)
def test_zero_upstream_rows_are_exactly_zero_in_every_dtype(compiled, mode, dtype):
    # Under XLA, bfloat16 logits are read through their bit patterns (`_fused._kernel_input`) both ways.
    padded, _, ids, weights, cotangent, active = _padded(dtype, PADDING["mixed"], classes=1030)
    fn = lambda *args: _masked_second_order(_fused_loss(compiled, 0.2), *args, active, pass_active=True)
    grad, hvp, _ = _in_mode(fn, mode)(padded, ids, weights, cotangent)
    pad = ~active.numpy()
    for value in (grad, hvp):
        value = tf.cast(value, tf.float64).numpy()
        assert np.all(value[pad] == 0) and np.all(np.isfinite(value[~pad]))


@pytest.mark.parametrize("compiled", (False, True), ids=("traced", "compiled"))
@pytest.mark.parametrize("mode", MODES)
def test_nan_upstream_gives_a_nan_gradient_row(compiled, mode):
    logits, ids, weights, cotangent = _inputs((2, 3, 8), seed=6)
    weights = tf.tensor_scatter_nd_update(weights, [[1, 2]], [np.nan])
    nan_row = np.isnan(weights.numpy())
    step = lambda loss_fn: lambda *args: _second_order(loss_fn, *args)[:2]
    grad, hvp = _in_mode(step(_fused_loss(compiled, 0.1)), mode)(logits, ids, weights, cotangent)
    ref_grad, ref_hvp = step(_reference_loss(0.1))(logits, ids, weights, cotangent)
    for value, expected in ((grad, ref_grad), (hvp, ref_hvp)):
        assert np.all(np.isnan(value.numpy()[nan_row]))
        _assert_close(value.numpy()[~nan_row], expected.numpy()[~nan_row], TOL[tf.float32])


@pytest.mark.parametrize("compiled", (False, True), ids=("traced", "compiled"))
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", (tf.float32, tf.bfloat16), ids=_param_id)
def test_active_keeps_valid_losses_exact_next_to_non_finite_rows(compiled, mode, dtype):
    padded, finite, ids, _, _, active = _padded(dtype, PADDING["mixed"], classes=40)
    # One valid row far above its target logit, so that it needs the row maximum as its shift.
    padded = tf.tensor_scatter_nd_add(padded, [[0, 1, 3]], tf.constant([200.0], dtype))
    finite = tf.tensor_scatter_nd_add(finite, [[0, 1, 3]], tf.constant([200.0], dtype))
    fn = lambda logits, ids, active: _fused_loss(compiled, 0.1)(logits, ids, active)
    fn = fn if mode == "eager" else tf.function(fn, jit_compile=mode == "xla")
    expected = _reference_loss(0.1)(finite, ids).numpy()
    valid = active.numpy()
    for mask in (active, None):
        loss = fn(padded, ids, mask).numpy()
        np.testing.assert_allclose(loss[valid], expected[valid], rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("dtype", (tf.float32, tf.float64), ids=_param_id)
def test_inactive_non_finite_rows_do_not_force_the_row_maximum(dtype):
    # The forward pass shifts by the target logit unless an (active) row overflows; padding must not count.
    padded, _, ids, _, _, active = _padded(dtype, PADDING["-inf"])
    logits, labels, active = tf.reshape(padded, [-1, 6]), tf.reshape(ids, [-1]), tf.reshape(active, [-1])
    target = tf.gather(logits, labels[:, None], batch_dims=1)[:, 0].numpy()
    _, _, _, shift = _fused._forward(logits, labels, None, active)
    np.testing.assert_array_equal(shift.numpy()[active.numpy()], target[active.numpy()])
    _, _, _, shift = _fused._forward(logits, labels, None)
    np.testing.assert_array_equal(shift.numpy(), tf.reduce_max(logits, axis=-1).numpy())


@pytest.mark.parametrize("compiled", (False, True), ids=("traced", "compiled"))
@pytest.mark.parametrize("dtype", DTYPES, ids=_param_id)
def test_every_op_of_the_second_order_step_has_a_gpu_kernel(compiled, dtype):
    def step(logits, ids, weights, cotangent, active):
        loss_fn = _fused_loss(compiled, 0.1)
        return _masked_second_order(loss_fn, logits, ids, weights, cotangent, active, pass_active=True)

    with on_a_machine(gpu=True):
        concrete = tf.function(step).get_concrete_function(
            tf.TensorSpec([None, None, None], dtype), tf.TensorSpec([None, None], tf.int64),
            tf.TensorSpec([None, None], tf.float64), tf.TensorSpec([None, None, None], tf.float64),
            tf.TensorSpec([None, None], tf.bool))
    assert ops_without_gpu_kernel(concrete) == []
