"""Every public function: eager, `tf.function` with `None` sizes, and XLA agree; and it is GPU-ready."""

import numpy as np
import pytest
import tensorflow as tf

import tf_seqloss
from tests.graph_checks import on_a_machine, ops_without_gpu_kernel
from tf_seqloss import _cross_entropy as _xent


def _sequence_loss(**kwargs):
    def loss(logits, targets, lengths):
        return tf_seqloss.sequence_loss(logits, targets, lengths=lengths, **kwargs)
    return loss


def _dense_sequence_loss(logits, targets, lengths):
    probs = tf.one_hot(targets, tf.shape(logits)[-1], dtype=logits.dtype)
    return tf_seqloss.sequence_loss(logits, probs * 0.9 + 0.1 / 7.0, lengths=lengths)


def _tf1(fn):
    def loss(logits, targets, lengths):
        weights = tf.sequence_mask(lengths, tf.shape(logits)[1], dtype=tf.float32)
        if fn is tf_seqloss.softmax_cross_entropy:
            targets = tf.one_hot(targets, tf.shape(logits)[-1], dtype=logits.dtype)
            return fn(targets, logits, weights, label_smoothing=0.1)
        return fn(targets, logits, weights)
    return loss


LOSSES = {
    **{f"sequence_loss[{impl}]": _sequence_loss(implementation=impl) for impl in _xent.IMPLEMENTATIONS},
    **{f"sequence_loss_smoothed[{impl}]": _sequence_loss(implementation=impl, label_smoothing=0.1)
       for impl in _xent.IMPLEMENTATIONS},
    "sequence_loss_elementwise": _sequence_loss(average_across_timesteps=False, average_across_batch=False),
    "sequence_loss_sum_over": _sequence_loss(average_across_timesteps=False, average_across_batch=False,
                                             sum_over_timesteps=True, sum_over_batch=True),
    "sequence_loss_per_step": _sequence_loss(average_across_timesteps=False),
    "sequence_loss_padding_id": lambda logits, targets, lengths: tf_seqloss.sequence_loss(
        logits, targets, padding_id=0),
    "sequence_loss_dense": _dense_sequence_loss,
    "softmax_cross_entropy": _tf1(tf_seqloss.softmax_cross_entropy),
    "sparse_softmax_cross_entropy": _tf1(tf_seqloss.sparse_softmax_cross_entropy),
    "SequenceLoss": lambda logits, targets, lengths: tf_seqloss.SequenceLoss(label_smoothing=0.1)(
        targets, logits, sample_weight=tf.sequence_mask(lengths, tf.shape(logits)[1], dtype=tf.float32)),
}


def _keras_marked(cases):
    """`cases` as pytest params, those of the Keras loss marked `keras` (the file is flavour-free otherwise)."""
    name = lambda case: case[0] if isinstance(case, tuple) else case
    return [pytest.param(*(case if isinstance(case, tuple) else (case,)),
                         marks=[pytest.mark.keras] if name(case) == "SequenceLoss" else [])
            for case in cases]


def _signature(dtype=tf.float32, id_dtype=tf.int32):
    return (tf.TensorSpec([None, None, None], dtype), tf.TensorSpec([None, None], id_dtype),
            tf.TensorSpec([None], tf.int32))


def _step(loss_fn):
    def step(logits, targets, lengths):
        with tf.GradientTape() as tape:
            tape.watch(logits)
            loss = loss_fn(logits, targets, lengths)
        return loss, tape.gradient(loss, logits)
    return step


def _inputs(batch, time, classes, seed=0):
    rng = np.random.default_rng(seed)
    return (tf.constant(rng.normal(size=(batch, time, classes)).astype(np.float32)),
            tf.constant(rng.integers(0, classes, size=(batch, time)).astype(np.int32)),
            tf.constant(rng.integers(1, time + 1, size=batch).astype(np.int32)))


@pytest.mark.parametrize("name", _keras_marked(sorted(LOSSES)))
def test_eager_function_and_xla_agree_in_value_and_gradient(name):
    step = _step(LOSSES[name])
    graph = tf.function(step, input_signature=_signature())
    xla = tf.function(step, input_signature=_signature(), jit_compile=True)
    for shape in [(3, 5, 7), (2, 9, 11)]:
        inputs = _inputs(*shape)
        eager_loss, eager_grad = step(*inputs)
        for loss, grad in (graph(*inputs), xla(*inputs)):
            np.testing.assert_allclose(loss, eager_loss, rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(grad, eager_grad, rtol=1e-5, atol=1e-6)
        assert np.all(np.isfinite(eager_grad.numpy())) and np.any(eager_grad.numpy() != 0)
    # Only the sizes changed between the calls: one trace each.
    assert graph.experimental_get_tracing_count() == 1
    assert xla.experimental_get_tracing_count() == 1


# Every loss in float32; the dtype-specific kernels (cross-entropy, casts) in every float dtype.
GPU_CASES = [(name, tf.float32) for name in sorted(LOSSES)] + [
    (name, dtype) for dtype in (tf.float16, tf.bfloat16, tf.float64) for name in sorted(LOSSES)
    if name.startswith(("sequence_loss[", "sequence_loss_smoothed[", "sequence_loss_dense",
                        "softmax_cross_entropy", "sparse_softmax_cross_entropy", "SequenceLoss"))]


@pytest.mark.parametrize("name,dtype", _keras_marked(GPU_CASES))
def test_every_op_of_forward_and_backward_has_a_gpu_kernel(name, dtype):
    step = tf.function(_step(LOSSES[name]))
    with on_a_machine(gpu=True):
        concrete = step.get_concrete_function(*_signature(dtype, tf.int64 if dtype == tf.float64 else tf.int32))
    assert ops_without_gpu_kernel(concrete) == []


def test_gpu_check_flags_an_op_without_a_gpu_kernel():
    # The check itself must be able to fail: a CPU-only op (string formatting) is reported.
    step = tf.function(lambda x: tf.strings.as_string(x))
    concrete = step.get_concrete_function(tf.TensorSpec([None], tf.float32))
    assert any(op.startswith("AsString") for op in ops_without_gpu_kernel(concrete))


@pytest.mark.parametrize("name", ["sequence_loss[reference]", "softmax_cross_entropy"])
def test_xla_lowers_the_step_to_hlo(name):
    xla = tf.function(_step(LOSSES[name]), jit_compile=True)
    hlo = xla.experimental_get_compiler_ir(*_inputs(2, 3, 5))(stage="hlo")
    assert "ENTRY" in hlo
