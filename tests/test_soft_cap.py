"""`logit_soft_cap` and `transpose_kernel` (issue 21) against NumPy float64.

The reference caps the float64 logits as `cap * tanh(logits / cap)` and takes the closed-form gradient of
`tests/reference.py` at the capped logits, times the tanh's derivative `1 - tanh^2` (the chain rule), then
through `logits = hidden @ kernel + bias` (or `hidden @ kernel^T + bias` for a `[classes, features]`
kernel). Nothing here is compared with the code under test.
"""

import numpy as np
import pytest
import tensorflow as tf

import tf_seqloss
from tests import reference
from tests.conftest import LEGAL_FLAGS
from tests.graph_checks import all_nodes, ops_without_gpu_kernel
from tf_seqloss import _linear_head

BATCH, TIME, FEATURES = 3, 7, 5
CAP = 2.5  # the logits below reach about +-8: the cap bends most of them


def _inputs(classes=13, dtype=tf.float64, seed=0):
    rng = np.random.default_rng(seed)
    hidden = rng.normal(size=(BATCH, TIME, FEATURES)) * 1.5
    kernel = rng.normal(size=(FEATURES, classes)) * 1.5
    bias = rng.normal(size=(classes,))
    targets = rng.integers(1, classes, size=(BATCH, TIME)).astype(np.int32)
    targets[1, 5:] = 0  # padding_id=0 has something to mask
    weights = rng.uniform(0.5, 2.0, size=(BATCH, TIME)) * (rng.uniform(size=(BATCH, TIME)) > 0.3)
    lengths = np.array([TIME, 4, 0], np.int32)
    return dict(hidden=tf.cast(hidden, dtype), kernel=tf.cast(kernel, dtype), bias=tf.cast(bias, dtype),
                targets=tf.constant(targets), weights=tf.constant(weights, dtype), lengths=tf.constant(lengths))


def _token_weights(x, padding_id=0):
    weights = x["weights"].numpy().astype(np.float64)
    weights = weights * (np.arange(TIME)[None, :] < x["lengths"].numpy()[:, None])
    return weights * (x["targets"].numpy() != padding_id)


def _numpy_head(x, *, cap, **options):
    """`[loss, d_hidden, d_kernel ([features, classes]), d_bias]` of the capped head, in float64."""
    hidden, kernel, bias = (x[k].numpy().astype(np.float64) for k in ("hidden", "kernel", "bias"))
    targets, weights = x["targets"].numpy(), _token_weights(x)
    raw = hidden @ kernel + bias
    tanh = np.tanh(raw / cap) if cap else None
    logits = cap * tanh if cap else raw
    loss = reference.sequence_loss(logits, targets, weights, **options)
    d_logits = reference.sequence_loss_grad(logits, targets, weights, **options)
    d_raw = d_logits * (1.0 - tanh ** 2) if cap else d_logits
    return [loss, d_raw @ kernel.T, np.einsum("btf,btc->fc", hidden, d_raw), d_raw.sum(axis=(0, 1))]


def _fused_head(x, *, transpose_kernel, cap, chunk_size, **options):
    kernel = tf.transpose(x["kernel"]) if transpose_kernel else x["kernel"]  # the input, not the path
    with tf.GradientTape() as tape:
        tape.watch([x["hidden"], kernel, x["bias"]])
        loss = tf_seqloss.linear_sequence_loss(
            x["hidden"], kernel, x["targets"], x["weights"], bias=x["bias"], lengths=x["lengths"], padding_id=0,
            chunk_size=chunk_size, transpose_kernel=transpose_kernel, logit_soft_cap=cap, **options)
    d_hidden, d_kernel, d_bias = tape.gradient(loss, [x["hidden"], kernel, x["bias"]])
    assert d_kernel.shape == kernel.shape  # the gradient has the kernel's own layout
    return [loss, d_hidden, tf.transpose(d_kernel) if transpose_kernel else d_kernel, d_bias]


def _assert_close(actual, expected, tol):
    for name, a, e in zip(("loss", "d_hidden", "d_kernel", "d_bias"), actual, expected):
        np.testing.assert_allclose(np.asarray(tf.cast(a, tf.float64)), e, rtol=tol, atol=tol, err_msg=name)


def _flag_id(flags):
    return "-".join(name for name, on in flags.items() if on) or "elementwise"


@pytest.mark.parametrize("transpose_kernel", [False, True], ids=["kernel", "transposed"])
@pytest.mark.parametrize("cap", [None, CAP], ids=["uncapped", "capped"])
@pytest.mark.parametrize("label_smoothing, z_loss", [(0.0, 0.0), (0.1, 0.01)], ids=["plain", "ls-z"])
@pytest.mark.parametrize("flags", [LEGAL_FLAGS[0], LEGAL_FLAGS[3], LEGAL_FLAGS[5]], ids=_flag_id)
def test_fused_head_value_and_gradients_equal_numpy_float64(transpose_kernel, cap, label_smoothing, z_loss, flags):
    x = _inputs()
    options = dict(flags, label_smoothing=label_smoothing, z_loss=z_loss)
    fused = _fused_head(x, transpose_kernel=transpose_kernel, cap=cap, chunk_size=4, **options)
    _assert_close(fused, _numpy_head(x, cap=cap, **options), 1e-11)


@pytest.mark.parametrize("transpose_kernel", [False, True], ids=["kernel", "transposed"])
@pytest.mark.parametrize("mode", ["eager", "function", "xla"])
def test_fused_head_with_class_slices_equals_numpy_float64(transpose_kernel, mode, monkeypatch):
    # Three slices of classes for the kernel gradient: separate accumulators, or XLA's in-place update.
    monkeypatch.setattr(_linear_head, "CLASS_SLICE", 4)
    x = _inputs(classes=11)
    options = dict(label_smoothing=0.1, z_loss=0.01)

    def step(hidden, kernel, bias):
        return _fused_head(dict(x, hidden=hidden, kernel=kernel, bias=bias), transpose_kernel=transpose_kernel,
                           cap=CAP, chunk_size=4, **options)

    if mode != "eager":
        step = tf.function(step, jit_compile=mode == "xla")
    _assert_close(step(x["hidden"], x["kernel"], x["bias"]), _numpy_head(x, cap=CAP, **options), 1e-11)


def test_capped_log_sum_exp_is_of_the_capped_logits():
    x = _inputs()
    _, lse = tf_seqloss.linear_sequence_loss(x["hidden"], x["kernel"], x["targets"], bias=x["bias"],
                                             logit_soft_cap=CAP, chunk_size=4, return_log_sum_exp=True)
    raw = x["hidden"].numpy() @ x["kernel"].numpy() + x["bias"].numpy()
    np.testing.assert_allclose(lse.numpy(), reference.log_sum_exp(CAP * np.tanh(raw / CAP)), rtol=1e-12)


def test_padded_hidden_states_stay_inert_under_the_cap():
    # inf and NaN hidden states at padded tokens: the tanh never sees them, so no NaN reaches a gradient.
    x = _inputs()
    padded = np.where((np.arange(TIME)[None, :] < x["lengths"].numpy()[:, None])[..., None],
                      x["hidden"].numpy(), np.nan)
    padded[2, 0] = np.inf
    fused = _fused_head(dict(x, hidden=tf.constant(padded)), transpose_kernel=True, cap=CAP, chunk_size=4)
    expected = _numpy_head(x, cap=CAP)
    _assert_close(fused, expected, 1e-11)
    assert np.all(fused[1].numpy()[2] == 0)


@pytest.mark.parametrize("implementation", tf_seqloss.IMPLEMENTATIONS)
@pytest.mark.parametrize("mode", ["eager", "xla"])
def test_every_implementation_caps_exactly_and_keeps_padding_inert(implementation, mode):
    # 1030 classes, so that "auto" picks the fused formulations on a CPU-only machine.
    x = _inputs(classes=1030)
    raw = tf.matmul(x["hidden"], x["kernel"]) + x["bias"]
    active = np.arange(TIME)[None, :] < x["lengths"].numpy()[:, None]
    padded = tf.where(active[..., None], raw, tf.constant(np.nan, tf.float64))  # NaN logits past the lengths

    def step(logits):
        with tf.GradientTape() as tape:
            tape.watch(logits)
            loss = tf_seqloss.sequence_loss(logits, x["targets"], x["weights"], lengths=x["lengths"], padding_id=0,
                                            label_smoothing=0.1, z_loss=0.01, logit_soft_cap=CAP,
                                            implementation=implementation)
        return loss, tape.gradient(loss, logits)

    step = step if mode == "eager" else tf.function(step, jit_compile=True)
    loss, grad = step(padded)
    expected = _numpy_head(x, cap=CAP, label_smoothing=0.1, z_loss=0.01)
    np.testing.assert_allclose(float(loss), expected[0], rtol=1e-11)
    tanh = np.tanh(raw.numpy() / CAP)
    d_logits = reference.sequence_loss_grad(CAP * tanh, x["targets"].numpy(), _token_weights(x),
                                            label_smoothing=0.1, z_loss=0.01) * (1 - tanh ** 2)
    np.testing.assert_allclose(grad.numpy(), d_logits, rtol=1e-10, atol=1e-13)
    assert np.all(grad.numpy()[~active] == 0)


@pytest.mark.parametrize("implementation", ["fused", "fused_xla"])
def test_second_order_with_the_cap_equals_the_reference_formulation(implementation):
    # The cap acts on the logits before the kernel, so second order goes through the tanh by autodiff:
    # a Hessian-vector product equal to the reference implementation's.
    x = _inputs(classes=9)
    logits = tf.matmul(x["hidden"], x["kernel"]) + x["bias"]
    vector = tf.constant(np.random.default_rng(3).normal(size=logits.shape))

    def hvp(impl):
        with tf.GradientTape() as outer:
            outer.watch(logits)
            with tf.GradientTape() as inner:
                inner.watch(logits)
                loss = tf_seqloss.sequence_loss(logits, x["targets"], x["weights"], label_smoothing=0.1, z_loss=0.01,
                                                logit_soft_cap=CAP, implementation=impl)
            dot = tf.reduce_sum(inner.gradient(loss, logits) * vector)
        return outer.gradient(dot, logits).numpy()

    expected = hvp("reference")
    assert np.any(expected != 0)
    np.testing.assert_allclose(hvp(implementation), expected, rtol=1e-10, atol=1e-13)


def test_fused_head_still_refuses_second_order_with_the_cap():
    x = _inputs()
    with tf.GradientTape() as outer:
        outer.watch(x["hidden"])
        with tf.GradientTape() as inner:
            inner.watch(x["hidden"])
            loss = tf_seqloss.linear_sequence_loss(x["hidden"], x["kernel"], x["targets"], logit_soft_cap=CAP)
        penalty = tf.reduce_sum(tf.square(inner.gradient(loss, x["hidden"])))
    with pytest.raises(NotImplementedError, match="first-order gradients only"):
        outer.gradient(penalty, x["hidden"])


_SIGNATURE = (tf.TensorSpec([None, None, FEATURES]), tf.TensorSpec([None, FEATURES]), tf.TensorSpec([None]),
              tf.TensorSpec([None, None], tf.int32), tf.TensorSpec([None], tf.int32))


def _transposed_step(hidden, embeddings, bias, targets, lengths):
    with tf.GradientTape() as tape:
        tape.watch([hidden, embeddings, bias])
        loss = tf_seqloss.linear_sequence_loss(hidden, embeddings, targets, bias=bias, lengths=lengths, chunk_size=4,
                                               label_smoothing=0.1, z_loss=0.01, transpose_kernel=True,
                                               logit_soft_cap=CAP)
    return [loss] + tape.gradient(loss, [hidden, embeddings, bias])


def test_transposed_capped_step_is_gpu_ready_without_a_transpose_and_compiles_with_xla():
    traced = tf.function(_transposed_step, input_signature=_SIGNATURE)
    concrete = traced.get_concrete_function()
    assert ops_without_gpu_kernel(concrete) == []
    # No transposed copy of the kernel, forward or backward: no Transpose op at all outside XLA.
    assert [n.op for n in all_nodes(concrete.graph.as_graph_def()) if n.op == "Transpose"] == []
    x = _inputs(dtype=tf.float32)
    args = (x["hidden"], tf.transpose(x["kernel"]), x["bias"], x["targets"], x["lengths"])
    compiled = tf.function(_transposed_step, input_signature=_SIGNATURE, jit_compile=True)
    for a, b in zip(compiled(*args), traced(*args)):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6)


def test_transposed_kernel_errors_name_the_layout():
    x = _inputs()
    with pytest.raises(ValueError, match=r"`hidden` and `kernel` must agree in the features.*transpose_kernel=True, "
                                         r"`kernel` is expected as \[classes, features\]"):
        tf_seqloss.linear_sequence_loss(x["hidden"], x["kernel"], x["targets"], transpose_kernel=True)
    with pytest.raises(ValueError, match=r"`kernel` and `bias` must agree in the classes.*transpose_kernel=False"):
        tf_seqloss.linear_sequence_loss(x["hidden"], x["kernel"], x["targets"], bias=x["bias"][1:])
    with pytest.raises(TypeError, match=r"Invalid value for argument `transpose_kernel`.*Received: transpose_kernel=1"):
        tf_seqloss.linear_sequence_loss(x["hidden"], x["kernel"], x["targets"], transpose_kernel=1)


def test_sampled_loss_takes_a_transposed_kernel_as_is():
    # The same candidates: the loss of a `[classes, features]` kernel equals that of its transpose.
    x = _inputs(classes=40, dtype=tf.float32)
    candidates = tf.random.log_uniform_candidate_sampler(
        tf.cast(tf.reshape(x["targets"], [-1, 1]), tf.int64), 1, 8, True, 40, seed=1)
    common = dict(bias=x["bias"], num_sampled=8, sampled_values=candidates, lengths=x["lengths"])
    plain = tf_seqloss.sampled_sequence_loss(x["hidden"], x["kernel"], x["targets"], **common)
    transposed = tf_seqloss.sampled_sequence_loss(x["hidden"], tf.transpose(x["kernel"]), x["targets"],
                                                  transpose_kernel=True, **common)
    np.testing.assert_allclose(transposed.numpy(), plain.numpy(), rtol=1e-6)


@pytest.mark.parametrize("fn", [tf_seqloss.sequence_loss, tf_seqloss.linear_sequence_loss,
                                tf_seqloss.sampled_sequence_loss, tf_seqloss.SequenceLoss.__init__,
                                tf_seqloss.SequenceLossLayer.__init__, tf_seqloss.FusedLinearHead.__init__,
                                tf_seqloss.FusedLinearHead.call], ids=lambda f: f.__qualname__)
def test_entry_points_annotate_every_parameter_and_the_return(fn):
    import inspect
    signature = inspect.signature(fn)
    missing = [name for name, p in signature.parameters.items()
               if name != "self" and p.kind != p.VAR_KEYWORD and p.annotation is p.empty]
    assert missing == [] and signature.return_annotation is not signature.empty, missing
    assert "logit_soft_cap" in signature.parameters or fn is tf_seqloss.FusedLinearHead.call
