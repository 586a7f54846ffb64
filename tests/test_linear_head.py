"""`linear_sequence_loss` against NumPy float64 (`tests/reference.py` on `hidden @ kernel + bias`).

Values and gradients (hidden, kernel, bias, weights) over every flag combination, padding route, label
smoothing, z-loss, dtype and mode, with chunk sizes that do not divide the number of tokens; padding
inert (padded hidden states may hold inf or NaN), bad ids NaN, second-order gradients refused.
"""

import numpy as np
import pytest
import tensorflow as tf

import tf_seqloss
from tests import reference
from tests.conftest import LEGAL_FLAGS
from tests.graph_checks import ops_without_gpu_kernel
from tf_seqloss import _linear_head

BATCH, TIME, FEATURES, CLASSES = 3, 7, 5, 13  # 21 tokens: chunks of 4 and 8 leave a partial chunk


def _inputs(dtype=tf.float32, seed=0, classes=CLASSES):
    rng = np.random.default_rng(seed)
    hidden = rng.normal(size=(BATCH, TIME, FEATURES))
    kernel = rng.normal(size=(FEATURES, classes))
    bias = rng.normal(size=(classes,))
    targets = rng.integers(1, classes, size=(BATCH, TIME)).astype(np.int32)
    lengths = np.array([TIME, 3, 0], np.int32)
    weights = (rng.uniform(0.5, 2.0, size=(BATCH, TIME)) * (rng.uniform(size=(BATCH, TIME)) > 0.3))
    return dict(hidden=tf.cast(hidden, dtype), kernel=tf.cast(kernel, dtype), bias=tf.cast(bias, dtype),
                targets=tf.constant(targets), lengths=tf.constant(lengths),
                weights=tf.constant(weights, tf.float32))


ROUTES = {
    "none": lambda x: {},
    "weights": lambda x: dict(weights=x["weights"]),
    "lengths": lambda x: dict(lengths=x["lengths"]),
    "padding_id": lambda x: dict(padding_id=0),
    "all": lambda x: dict(weights=x["weights"], lengths=x["lengths"], padding_id=0),
}


def _with_padding_ids(x):
    targets = x["targets"].numpy()
    targets[1, 4:] = 0
    targets[0, 2] = 0
    return dict(x, targets=tf.constant(targets))


def _fused_and_grads(x, route, **kwargs):
    with tf.GradientTape() as tape:
        tape.watch([x["hidden"], x["kernel"], x["bias"]])
        loss = tf_seqloss.linear_sequence_loss(x["hidden"], x["kernel"], x["targets"], bias=x["bias"],
                                               **route, **kwargs)
    return [loss] + tape.gradient(loss, [x["hidden"], x["kernel"], x["bias"]])


def _numpy_and_grads(x, route, *, label_smoothing=0.0, z_loss=0.0, **flags):
    """`[loss, d_hidden, d_kernel, d_bias]` in NumPy float64 (`tests/reference.py`): the expected values.

    The padding routes become one set of token weights (`weights`, times the length mask, times
    `targets != padding_id`); the gradients are those of `sum(loss)`, by the chain rule through
    `logits = hidden @ kernel + bias` from the closed-form gradient of the logits.
    """
    hidden, kernel, bias = (x[name].numpy().astype(np.float64) for name in ("hidden", "kernel", "bias"))
    targets = x["targets"].numpy()
    weights = np.asarray(route.get("weights", np.ones(targets.shape)), np.float64)
    if "lengths" in route:
        weights = weights * (np.arange(targets.shape[1])[None, :] < np.asarray(route["lengths"])[:, None])
    if route.get("padding_id") is not None:
        weights = weights * (targets != route["padding_id"])
    logits = hidden @ kernel + bias
    options = dict(flags, label_smoothing=label_smoothing, z_loss=z_loss)
    loss = reference.sequence_loss(logits, targets, weights, **options)
    d_logits = reference.sequence_loss_grad(logits, targets, weights, **options)
    return [loss, d_logits @ kernel.T, np.einsum("btf,btc->fc", hidden, d_logits), d_logits.sum(axis=(0, 1))]


def _assert_all_close(actual, expected, tol):
    for name, a, e in zip(("loss", "d_hidden", "d_kernel", "d_bias"), actual, expected):
        np.testing.assert_allclose(np.asarray(tf.cast(a, tf.float64)), np.asarray(e, np.float64),
                                   rtol=tol, atol=tol, err_msg=name)


def _flag_id(flags):
    return "-".join(name for name, on in flags.items() if on) or "elementwise"


@pytest.mark.parametrize("flags", LEGAL_FLAGS, ids=_flag_id)
@pytest.mark.parametrize("route", sorted(ROUTES))
@pytest.mark.parametrize("chunk_size", [4, 64])
def test_value_and_gradients_equal_numpy_float64(flags, route, chunk_size):
    x = _with_padding_ids(_inputs())
    fused = _fused_and_grads(x, ROUTES[route](x), chunk_size=chunk_size, **flags)
    materialised = _numpy_and_grads(x, ROUTES[route](x), **flags)
    _assert_all_close(fused, materialised, 1e-5)


@pytest.mark.parametrize("label_smoothing, z_loss", [(0.1, 0.0), (0.0, 1e-2), (0.2, 0.5)])
@pytest.mark.parametrize("flags", [LEGAL_FLAGS[0], LEGAL_FLAGS[3], LEGAL_FLAGS[5]], ids=_flag_id)
def test_label_smoothing_and_z_loss_equal_numpy_float64(label_smoothing, z_loss, flags):
    x = _with_padding_ids(_inputs())
    route = ROUTES["all"](x)
    options = dict(label_smoothing=label_smoothing, z_loss=z_loss, **flags)
    _assert_all_close(_fused_and_grads(x, route, chunk_size=5, **options),
                      _numpy_and_grads(x, route, **options), 2e-5)


def _numpy_loss(x, label_smoothing=0.0, z_loss=0.0):
    logits = (x["hidden"].numpy().astype(np.float64) @ x["kernel"].numpy().astype(np.float64)
              + x["bias"].numpy().astype(np.float64))
    loss = reference.sequence_loss(logits, x["targets"].numpy(), x["weights"].numpy(),
                                   label_smoothing=label_smoothing, z_loss=z_loss)
    return loss, reference.log_sum_exp(logits)


@pytest.mark.parametrize("flags", [LEGAL_FLAGS[0], LEGAL_FLAGS[3], LEGAL_FLAGS[5]], ids=_flag_id)
def test_numpy_gradient_with_z_loss_matches_finite_differences(flags):
    # The expected gradients here come from `reference.sequence_loss_grad`'s closed form: check its z-loss
    # and label-smoothing terms against central differences of `reference.sequence_loss`.
    rng = np.random.default_rng(5)
    logits = rng.normal(size=(2, 3, 4)) * 2
    targets = rng.integers(0, 4, size=(2, 3))
    weights = np.array([[1.0, 0.5, 0.0], [2.0, 0.0, 0.0]])
    options = dict(flags, label_smoothing=0.1, z_loss=0.3)
    step, numeric = 1e-6, np.zeros_like(logits)
    for index in np.ndindex(logits.shape):
        up, down = logits.copy(), logits.copy()
        up[index] += step
        down[index] -= step
        numeric[index] = (reference.sequence_loss(up, targets, weights, **options).sum()
                          - reference.sequence_loss(down, targets, weights, **options).sum()) / (2 * step)
    np.testing.assert_allclose(reference.sequence_loss_grad(logits, targets, weights, **options), numeric,
                               rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("dtype", [tf.float64, tf.float32])
def test_value_equals_numpy_float64(dtype):
    x = _inputs(dtype)
    loss, lse = tf_seqloss.linear_sequence_loss(
        x["hidden"], x["kernel"], x["targets"], x["weights"], bias=x["bias"], label_smoothing=0.1,
        z_loss=0.01, chunk_size=4, return_log_sum_exp=True)
    expected, expected_lse = _numpy_loss(x, label_smoothing=0.1, z_loss=0.01)
    tol = 1e-12 if dtype == tf.float64 else 1e-5
    np.testing.assert_allclose(float(loss), expected, rtol=tol)
    active = x["weights"].numpy() != 0
    np.testing.assert_allclose(lse.numpy()[active], expected_lse[active], rtol=tol)
    np.testing.assert_array_equal(lse.numpy()[~active], 0.0)


def test_z_loss_on_sequence_loss_equals_numpy_float64():
    x = _inputs(tf.float64)
    logits = tf.matmul(x["hidden"], x["kernel"]) + x["bias"]
    expected, _ = _numpy_loss(x, label_smoothing=0.1, z_loss=0.3)
    for implementation in tf_seqloss.IMPLEMENTATIONS:
        loss = tf_seqloss.sequence_loss(logits, x["targets"], x["weights"], label_smoothing=0.1, z_loss=0.3,
                                        implementation=implementation)
        np.testing.assert_allclose(float(loss), expected, rtol=1e-12, err_msg=implementation)


@pytest.mark.parametrize("dtype", [tf.float16, tf.bfloat16])
def test_half_precision_computes_in_float32(dtype):
    x = _inputs(dtype)
    route = ROUTES["lengths"](x)
    fused = _fused_and_grads(x, route, chunk_size=4, z_loss=0.01)
    assert fused[0].dtype == tf.float32
    assert [g.dtype for g in fused[1:]] == [dtype] * 3
    upcast = {k: tf.cast(v, tf.float32) if v.dtype == dtype else v for k, v in x.items()}
    materialised = _numpy_and_grads(upcast, route, z_loss=0.01)
    # Both compute the same float32 loss; the gradients differ by one rounding to `dtype`.
    np.testing.assert_allclose(float(fused[0]), float(materialised[0]), rtol=1e-5)
    tol = 1e-2 if dtype == tf.float16 else 5e-2
    _assert_all_close(fused[1:], materialised[1:], tol)


def _step(chunk_size=None, **kwargs):
    def step(hidden, kernel, bias, targets, lengths):
        with tf.GradientTape() as tape:
            tape.watch([hidden, kernel, bias])
            loss = tf_seqloss.linear_sequence_loss(hidden, kernel, targets, bias=bias, lengths=lengths,
                                                   chunk_size=chunk_size, **kwargs)
        return [loss] + tape.gradient(loss, [hidden, kernel, bias])
    return step


_SIGNATURE = (tf.TensorSpec([None, None, None]), tf.TensorSpec([None, None]), tf.TensorSpec([None]),
              tf.TensorSpec([None, None], tf.int32), tf.TensorSpec([None], tf.int32))


@pytest.mark.parametrize("flags", [LEGAL_FLAGS[0], LEGAL_FLAGS[3]], ids=_flag_id)
def test_eager_function_with_none_sizes_and_xla_agree(flags):
    x = _inputs()
    args = (x["hidden"], x["kernel"], x["bias"], x["targets"], x["lengths"])
    step = _step(chunk_size=4, label_smoothing=0.1, z_loss=0.01, **flags)
    eager = step(*args)
    for compiled in (tf.function(step, input_signature=_SIGNATURE),
                     tf.function(step, input_signature=_SIGNATURE, jit_compile=True)):
        _assert_all_close(compiled(*args), eager, 1e-5)
    materialised = _numpy_and_grads(x, ROUTES["lengths"](x), label_smoothing=0.1, z_loss=0.01, **flags)
    _assert_all_close(eager, materialised, 1e-5)


def test_gradient_taken_outside_the_function_recomputes_and_agrees():
    x = _inputs()
    loss_fn = tf.function(lambda h, k, b: tf_seqloss.linear_sequence_loss(
        h, k, x["targets"], bias=b, lengths=x["lengths"], chunk_size=4))
    with tf.GradientTape() as tape:
        tape.watch([x["hidden"], x["kernel"], x["bias"]])
        loss = loss_fn(x["hidden"], x["kernel"], x["bias"])
    fused = [loss] + tape.gradient(loss, [x["hidden"], x["kernel"], x["bias"]])
    _assert_all_close(fused, _numpy_and_grads(x, ROUTES["lengths"](x)), 1e-5)


def test_gradient_with_respect_to_weights_equals_numpy_float64():
    # `x["weights"]` holds zeros: there the gradient is `-loss / sum(w)` (a padded token's loss is 0).
    x = _inputs()
    logits = x["hidden"].numpy().astype(np.float64) @ x["kernel"].numpy() + x["bias"].numpy()
    for flags in (LEGAL_FLAGS[0], LEGAL_FLAGS[3]):
        weights = tf.Variable(x["weights"])
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(tf_seqloss.linear_sequence_loss(x["hidden"], x["kernel"], x["targets"], weights,
                                                                 bias=x["bias"], chunk_size=4, **flags))
        expected = reference.sequence_loss_weights_grad(logits, x["targets"].numpy(), x["weights"].numpy(), **flags)
        np.testing.assert_allclose(tape.gradient(loss, weights).numpy(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("poison", [np.nan, np.inf, -np.inf])
def test_padded_hidden_states_are_inert(poison):
    x = _inputs()
    hidden = x["hidden"].numpy()
    hidden[1, 3:] = poison
    hidden[2, :] = poison  # length 0
    poisoned = dict(x, hidden=tf.constant(hidden))
    route = ROUTES["lengths"](x)
    for flags in (LEGAL_FLAGS[0], LEGAL_FLAGS[3]):
        fused = _fused_and_grads(poisoned, route, chunk_size=4, **flags)
        clean = _fused_and_grads(x, route, chunk_size=4, **flags)
        _assert_all_close(fused, clean, 0.0)
        assert np.all(fused[1].numpy()[1, 3:] == 0) and np.all(fused[1].numpy()[2] == 0)


def test_without_bias_equals_numpy_float64():
    x = _inputs()
    with tf.GradientTape() as tape:
        tape.watch([x["hidden"], x["kernel"]])
        fused = tf_seqloss.linear_sequence_loss(x["hidden"], x["kernel"], x["targets"], chunk_size=8)
    fused_grads = tape.gradient(fused, [x["hidden"], x["kernel"]])
    expected = _numpy_and_grads(dict(x, bias=tf.zeros_like(x["bias"])), {})
    _assert_all_close([fused] + fused_grads, expected[:3], 1e-5)


@pytest.mark.parametrize("mode", ["eager", "xla"])
def test_out_of_range_id_is_nan_where_weighted_and_ignored_where_padded(mode):
    x = _inputs()
    targets = x["targets"].numpy()
    targets[0, 1] = CLASSES  # a real token
    bad = dict(x, targets=tf.constant(targets))
    step = _step(chunk_size=4)
    if mode == "xla":
        step = tf.function(step, jit_compile=True)
    loss, d_hidden, d_kernel, d_bias = step(bad["hidden"], bad["kernel"], bad["bias"], bad["targets"],
                                            bad["lengths"])
    assert np.isnan(float(loss)) and np.isnan(d_kernel.numpy()).all() and np.isnan(d_hidden.numpy()[0, 1]).all()
    targets = x["targets"].numpy()
    targets[1, 5] = -7  # past length 3: padding
    ignored = step(x["hidden"], x["kernel"], x["bias"], tf.constant(targets), x["lengths"])
    _assert_all_close(ignored, step(x["hidden"], x["kernel"], x["bias"], x["targets"], x["lengths"]), 0.0)


def test_all_padding_gives_zero_loss_and_gradients():
    x = _inputs()
    fused = _fused_and_grads(x, dict(lengths=tf.zeros([BATCH], tf.int32)), chunk_size=4)
    for value in fused:
        assert not np.any(value.numpy())


@pytest.mark.parametrize("flags", [LEGAL_FLAGS[0], LEGAL_FLAGS[3]], ids=_flag_id)
@pytest.mark.parametrize("traced", [False, True])
def test_second_order_gradients_are_refused(flags, traced):
    x = _inputs()

    def penalty_gradient(hidden, kernel):
        with tf.GradientTape() as outer:
            outer.watch(kernel)
            with tf.GradientTape() as inner:
                inner.watch(kernel)
                loss = tf.reduce_sum(tf_seqloss.linear_sequence_loss(hidden, kernel, x["targets"], chunk_size=4,
                                                                     **flags))
            penalty = tf.reduce_sum(tf.square(inner.gradient(loss, kernel)))
        return outer.gradient(penalty, kernel)

    with pytest.raises(NotImplementedError, match="first-order gradients only"):
        (tf.function(penalty_gradient) if traced else penalty_gradient)(x["hidden"], x["kernel"])


def test_traced_step_is_gpu_ready():
    step = tf.function(_step(chunk_size=4, label_smoothing=0.1, z_loss=0.01), input_signature=_SIGNATURE)
    assert ops_without_gpu_kernel(step.get_concrete_function()) == []


@pytest.mark.parametrize("flags", [LEGAL_FLAGS[0], LEGAL_FLAGS[3]], ids=_flag_id)
def test_traced_step_with_class_slices_is_gpu_ready(flags, monkeypatch):
    # Static classes: the kernel gradient in slices, with an accumulator each (the path of known shapes).
    monkeypatch.setattr(_linear_head, "CLASS_SLICE", 4)
    x = _inputs()
    step = tf.function(_step(chunk_size=4, label_smoothing=0.1, z_loss=0.01, **flags))
    concrete = step.get_concrete_function(x["hidden"], x["kernel"], x["bias"], x["targets"], x["lengths"])
    nodes = {node.op for node in concrete.graph.as_graph_def().node} | {
        node.op for f in concrete.graph.as_graph_def().library.function for node in f.node_def}
    assert "ConcatV2" in nodes and "BatchMatMulV2" in nodes  # the slices were traced
    assert ops_without_gpu_kernel(concrete) == []


@pytest.mark.parametrize("classes, expected", [(13, 4096), (8192, 256), (32768, 128), (131072, 128),
                                               (10 ** 7, 128), (None, 256)])
def test_automatic_chunk_size(classes, expected):
    assert _linear_head.auto_chunk_size(classes) == expected


def test_errors_name_the_argument():
    x = _inputs()
    with pytest.raises(TypeError, match="`kernel` must have the dtype of `hidden`"):
        tf_seqloss.linear_sequence_loss(x["hidden"], tf.cast(x["kernel"], tf.float64), x["targets"])
    with pytest.raises(ValueError, match="`hidden` and `kernel` must agree in the features"):
        tf_seqloss.linear_sequence_loss(x["hidden"], x["kernel"][1:], x["targets"])
    with pytest.raises(ValueError, match="`kernel` and `bias` must agree in the classes"):
        tf_seqloss.linear_sequence_loss(x["hidden"], x["kernel"], x["targets"], bias=x["bias"][1:])
    with pytest.raises(ValueError, match="Invalid value for argument `chunk_size`. Expected None or a positive int"):
        tf_seqloss.linear_sequence_loss(x["hidden"], x["kernel"], x["targets"], chunk_size=0)
    with pytest.raises(ValueError, match=r"Invalid value for argument `z_loss`. Expected a number in \[0, inf\)"):
        tf_seqloss.linear_sequence_loss(x["hidden"], x["kernel"], x["targets"], z_loss=-1.0)
    with pytest.raises(TypeError, match="Invalid value for argument `z_loss`. Expected a Python or NumPy number"):
        tf_seqloss.sequence_loss(tf.zeros([1, 2, 3]), tf.zeros([1, 2], tf.int32), z_loss=tf.constant(0.1))
    with pytest.raises(ValueError, match="`hidden` must have rank 3"):
        tf_seqloss.linear_sequence_loss(x["hidden"][0], x["kernel"], x["targets"])


@pytest.mark.parametrize("class_slice", [4, 5, 13])  # 13 classes: slices 4+4+4+1, 5+5+3, and one slice
@pytest.mark.parametrize("mode", ["eager", "function", "xla"])
@pytest.mark.parametrize("flags", [LEGAL_FLAGS[0], LEGAL_FLAGS[3]], ids=_flag_id)
def test_kernel_gradient_summed_in_class_slices_equals_numpy_float64(class_slice, mode, flags,
                                                                            monkeypatch):
    # Slices of accumulators outside XLA; one buffer updated slice by slice in a loop under XLA; the
    # second flags give a per-token upstream gradient (the backward pass runs the loop again).
    monkeypatch.setattr(_linear_head, "CLASS_SLICE", class_slice)
    x = _inputs()
    step = _step(chunk_size=8, label_smoothing=0.1, z_loss=0.01, **flags)
    if mode != "eager":
        step = tf.function(step, jit_compile=mode == "xla")
    fused = step(x["hidden"], x["kernel"], x["bias"], x["targets"], x["lengths"])
    _assert_all_close(fused, _numpy_and_grads(x, ROUTES["lengths"](x), label_smoothing=0.1, z_loss=0.01,
                                                     **flags), 1e-5)


@pytest.mark.parametrize("classes, expected", [
    (None, None), (13, [(0, 13)]), (1024, [(0, 1024)]), (2049, [(0, 1024), (1024, 1024), (2048, 1)]),
    (32768, [(i, 1024) for i in range(0, 32768, 1024)]), (131072, [(i, 4096) for i in range(0, 131072, 4096)])])
def test_class_slices_cover_the_classes(classes, expected):
    assert _linear_head.class_slices(classes) == expected
