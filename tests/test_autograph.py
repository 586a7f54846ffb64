"""AutoGraph leaves the library's code alone in every `tf.function` that reaches it, `fit`'s included.

A `tf.function` converts, with AutoGraph, every function it calls that is not in TensorFlow's or Keras'
own packages: unmarked, `tf_seqloss`'s checks, chunk loop and helpers (about 40 functions for
`linear_sequence_loss`) were rewritten and reloaded at every trace, 3 of the 4 seconds of the fused
head's first call. The package has no Python control flow on tensors, so its entry points are marked
not to be converted (`tf.autograph.experimental.do_not_convert`, and `_keras.not_converted` for the
methods Keras calls). Each case below traces an entry point, or trains with it in `fit`, and records
what AutoGraph converted; the markers' own one-line wrappers (AutoGraph artifacts) do not count.

Run on both Kerases: tf_keras converts a layer's `call` and a metric's `update_state` itself.
"""

import numpy as np
import pytest
import tensorflow as tf

import tf_seqloss
from tests import reference
from tests.graph_checks import converted_library_functions
from tf_seqloss._keras import keras
from tf_seqloss.compat import tfa


def _inputs():
    rng = np.random.default_rng(0)
    logits = tf.constant(rng.standard_normal((2, 3, 5)), tf.float32)
    targets = tf.constant([[1, 2, 0], [3, 4, 2]])  # no run of one id at a row's end: no padding warning
    hidden = tf.constant(rng.standard_normal((2, 3, 4)), tf.float32)
    kernel = tf.constant(rng.standard_normal((4, 5)), tf.float32)
    return logits, targets, hidden, kernel


def _with_gradient(loss_fn, *watched):
    with tf.GradientTape() as tape:
        tape.watch(watched)
        loss = loss_fn()
    return loss, tape.gradient(loss, watched)


def _functions():
    logits, targets, hidden, kernel = _inputs()
    lengths = tf.constant([3, 1])
    cases = {f"sequence_loss[{implementation}]": lambda implementation=implementation: _with_gradient(
        lambda: tf_seqloss.sequence_loss(logits, targets, lengths=lengths, implementation=implementation), logits)
        for implementation in tf_seqloss.IMPLEMENTATIONS}
    cases.update({
        "linear_sequence_loss": lambda: _with_gradient(lambda: tf_seqloss.linear_sequence_loss(
            hidden, kernel, targets, lengths=lengths, label_smoothing=0.1, logit_soft_cap=3.0), hidden, kernel),
        "linear_sequence_loss[token stats, transposed]": lambda: tf_seqloss.linear_sequence_loss(
            hidden, tf.transpose(kernel), targets, lengths=lengths, transpose_kernel=True,
            return_token_stats=True)[1].predictions,
        "sampled_sequence_loss": lambda: _with_gradient(lambda: tf_seqloss.sampled_sequence_loss(
            hidden, tf.transpose(kernel), targets, lengths=lengths, num_sampled=2, transpose_kernel=True), hidden),
        "sparse_softmax_cross_entropy": lambda: tf_seqloss.sparse_softmax_cross_entropy(targets, logits),
        "softmax_cross_entropy": lambda: tf_seqloss.softmax_cross_entropy(tf.one_hot(targets, 5), logits),
        "compute_weighted_loss": lambda: tf_seqloss.compute_weighted_loss(tf.ones([2, 3])),
        "compat.tfa.sequence_loss": lambda: tfa.sequence_loss(logits, targets, tf.ones([2, 3])),
    })
    return cases


FUNCTIONS = sorted(_functions())


@pytest.mark.parametrize("case", FUNCTIONS)
def test_no_library_function_is_converted_when_a_function_is_traced(case):
    run = _functions()[case]
    with converted_library_functions() as converted:
        result = tf.function(run)()
    tf.nest.map_structure(lambda x: np.asarray(x), result)  # it ran
    assert converted == []


def test_no_keras_object_is_converted_when_called_in_a_traced_function():
    logits, targets, hidden, _ = _inputs()
    objects = dict(loss=tf_seqloss.SequenceLoss(), tfa_loss=tfa.SequenceLoss(),
                   layer=tf_seqloss.SequenceLossLayer(), mask=tf_seqloss.SequenceMask(),
                   head=tf_seqloss.FusedLinearHead(5, token_metrics=True),
                   accuracy=tf_seqloss.TokenAccuracy(), perplexity=tf_seqloss.TokenPerplexity())
    objects["head"](hidden, targets)  # built eagerly, as a model builds its layers

    @tf.function
    def step():
        o = objects
        values = [o["loss"](targets, logits), o["tfa_loss"](targets, logits), o["layer"](logits, targets),
                  o["mask"](tf.constant([3, 1])), o["head"](hidden, targets)]
        o["accuracy"].update_state(targets, logits)
        _, stats = tf_seqloss.linear_sequence_loss(hidden, o["head"].kernel, targets, return_token_stats=True)
        o["perplexity"].update_from_token_stats(stats)
        return values, o["accuracy"].result(), o["perplexity"].result()

    with converted_library_functions() as converted:
        step()
        objects["accuracy"].reset_state()
    assert converted == []


def test_fit_converts_no_library_function_and_still_learns_the_exact_loss():
    """`fit` with the loss, the metrics and the fused head; its first logged loss checked against NumPy."""
    rng = np.random.default_rng(1)
    features, classes = 4, 6
    hidden = rng.standard_normal((4, 3, features)).astype("float32")
    targets = (np.arange(12).reshape(4, 3) * 5 % classes).astype("int32")  # no run that looks like padding
    inputs = keras.Input([3, features])
    logits = keras.layers.Dense(classes, use_bias=False)(inputs)
    model = keras.Model(inputs, logits)
    model.compile(optimizer=keras.optimizers.SGD(0.0), loss=tf_seqloss.SequenceLoss(),
                  metrics=[tf_seqloss.TokenAccuracy(), tf_seqloss.TokenPerplexity()])
    ids = keras.Input([3], dtype="int32")
    head = tf_seqloss.FusedLinearHead(classes, use_bias=False, token_metrics=True)
    fused = keras.Model([inputs, ids], head(inputs, ids))
    fused.compile(optimizer=keras.optimizers.SGD(0.0))
    with converted_library_functions() as converted:
        history = model.fit(hidden, targets, batch_size=4, epochs=1, verbose=0)
        fused.fit([hidden, targets], batch_size=4, epochs=1, verbose=0)
    assert converted == []
    kernel = model.layers[-1].get_weights()[0].astype(np.float64)
    want = reference.sequence_loss(hidden.astype(np.float64) @ kernel, targets, np.ones(targets.shape))
    np.testing.assert_allclose(history.history["loss"][0], want, rtol=1e-5)
