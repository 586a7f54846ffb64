"""`normalizer="global"` under `tf.distribute.MirroredStrategy` over two logical CPUs, and the token metrics.

Two replicas hold very unevenly padded halves of a batch (15 and 3 real tokens). With the global normaliser
the gradient the strategy sums, in a custom loop (`strategy.run`) and in `fit` (every padding route, the
layer), equals the NumPy float64 gradient of the global token mean of a linear model, and
`fit` logs that mean; the per-replica means (`normalizer=None`) are measured beside it in the loop. `evaluate` with
`TokenPerplexity` and `TokenAccuracy` over uneven batches gives the exact token-level values. Logical
devices must be set before TensorFlow starts, so all of it runs in one fresh, time-bounded interpreter.
"""

import textwrap

import numpy as np
import pytest

from tests import reference
from tests.child import run_script

# Several virtual devices in a child interpreter: in the slow set, which CI runs (README, Development).
pytestmark = pytest.mark.slow

SCRIPT = textwrap.dedent('''
    import json
    import numpy as np
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

    import tf_seqloss
    from tf_seqloss._keras import IS_KERAS_3, keras

    DIM, VOCAB, TIME = 3, 5, 8
    rng = np.random.default_rng(3)
    lengths = np.array([8, 7, 1, 2, 5, 1, 8, 3])  # Replica 0 holds 15 tokens of the first batch, replica 1 holds 3.
    mask = (np.arange(TIME) < lengths[:, None]).astype("float32")
    features = (rng.normal(size=(8, TIME, DIM)) * mask[..., None]).astype("float32")  # Zero vectors pad.
    targets = (rng.integers(1, VOCAB, size=mask.shape) * mask).astype("int32")        # Id 0 pads.
    kernel = rng.normal(size=(DIM, VOCAB)).astype("float32")
    x, y, w = features[:4], targets[:4], mask[:4]
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    out = dict(keras_3=IS_KERAS_3, features=features.tolist(), targets=targets.tolist(), mask=mask.tolist(),
               kernel=kernel.tolist())

    def build(route):
        inputs = keras.Input((TIME, DIM))
        hidden = keras.layers.Masking(0.0)(inputs) if route == "mask" else inputs
        dense = keras.layers.Dense(VOCAB, use_bias=False)
        logits = dense(hidden)
        if route == "layer":
            target_input = keras.Input((TIME,), dtype="int32")
            logits = tf_seqloss.SequenceLossLayer(padding_id=0, normalizer="global")(logits, target_input)
            model = keras.Model([inputs, target_input], logits)
        else:
            model = keras.Model(inputs, logits)
        dense.set_weights([kernel])
        return model

    # Custom loop: each replica's share, the replicas' gradients summed as the strategy sums them.
    with strategy.scope():
        loop_model = build("plain")

    @tf.function
    def grads_of(normalizer):
        def step(xr, yr, wr):
            with tf.GradientTape() as tape:
                loss = tf_seqloss.sequence_loss(loop_model(xr), yr, wr, normalizer=normalizer)
            return loss, tape.gradient(loss, loop_model.trainable_weights)[0]
        dist = strategy.experimental_distribute_values_from_function(
            lambda ctx: tuple(a[2 * ctx.replica_id_in_sync_group: 2 * ctx.replica_id_in_sync_group + 2]
                              for a in (x, y, w)))
        loss, grad = strategy.run(step, args=dist)
        return strategy.reduce("SUM", loss, axis=None), strategy.reduce("SUM", grad, axis=None)

    for name, normalizer in (("loop_global", "global"), ("loop_local", None)):
        loss, grad = grads_of(normalizer)
        out[name] = dict(loss=float(loss), grad=grad.numpy().tolist())
    with strategy.scope():  # Cross-replica context: the call holds the whole batch.
        out["cross_replica"] = float(tf_seqloss.sequence_loss(loop_model(x), y, w, normalizer="global"))

    # fit: one SGD(1) step, so the kernel moves by minus the gradient the strategy summed.
    for route in ("sample_weight", "mask", "padding_id", "layer"):
        with strategy.scope():
            model = build(route)
            loss = None if route == "layer" else tf_seqloss.SequenceLoss(
                padding_id=0 if route == "padding_id" else None, normalizer="global")
            metrics = [tf_seqloss.TokenPerplexity(padding_id=0), tf_seqloss.TokenAccuracy(padding_id=0)]
            model.compile(optimizer=keras.optimizers.SGD(1.0), loss=loss, metrics=metrics if route == "mask" else None)
        inputs = [x, y] if route == "layer" else x
        history = model.fit(inputs, None if route == "layer" else y, batch_size=4, epochs=1, verbose=0,
                            sample_weight=w if route == "sample_weight" else None, shuffle=False)
        out[f"fit_{route}_global"] = dict(loss=float(history.history["loss"][0]),
                                          grad=(kernel - model.get_weights()[0]).tolist())
        if route == "mask":  # evaluate: token metrics over two uneven batches of four sequences.
            out["evaluate"] = model.evaluate(features, targets, batch_size=4, verbose=0, return_dict=True)
    print("RESULTS" + json.dumps(out))
''')


@pytest.fixture(scope="module")
def results():
    out = run_script(SCRIPT, marker="RESULTS", timeout=240)
    for key in ("features", "targets", "mask", "kernel"):
        out[key] = np.array(out[key])
    return out


def _first_batch(results):
    return (results["features"][:4], results["kernel"], results["targets"][:4], results["mask"][:4])


def _per_replica_means(results):
    x, kernel, y, w = _first_batch(results)
    halves = [reference.linear_token_mean(x[i:i + 2], kernel, y[i:i + 2], w[i:i + 2]) for i in (0, 2)]
    return np.mean([h[0] for h in halves]), np.mean([h[1] for h in halves], axis=0)


def test_the_replicas_hold_very_uneven_token_counts(results):
    counts = results["mask"][:4].reshape(2, -1).sum(axis=1)
    assert counts.tolist() == [15, 3]
    loss, _ = reference.linear_token_mean(*_first_batch(results))
    assert abs(_per_replica_means(results)[0] - loss) > 0.05 * loss


@pytest.mark.parametrize("key", ["loop_global", "fit_sample_weight_global", "fit_mask_global",
                                 "fit_padding_id_global", "fit_layer_global"])
def test_global_normalizer_gives_the_single_device_gradient_of_the_global_token_mean(results, key):
    loss, grad = reference.linear_token_mean(*_first_batch(results))
    np.testing.assert_allclose(results[key]["grad"], grad, rtol=1e-5, atol=1e-5)
    if key == "fit_layer_global" and results["keras_3"]:
        # Keras 3 keeps `add_loss` losses in a list the replica threads share, and the all-reduce inside the
        # call lets the second replica's total include the first's loss: the logged value (only) is off.
        # The layer warns about it (tf_seqloss/layers.py); the gradient, checked above, is exact.
        pytest.xfail("Keras 3 logs a shared-list sum for add_loss under MirroredStrategy; the gradient is exact")
    np.testing.assert_allclose(results[key]["loss"], loss, rtol=1e-5)


def test_without_it_the_replicas_sum_their_own_means(results):
    # `fit` divides this by the replicas (tests/test_keras_distribute.py): the mean of the replicas' means.
    loss, grad = _per_replica_means(results)
    np.testing.assert_allclose(results["loop_local"]["grad"], 2 * grad, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(results["loop_local"]["loss"], 2 * loss, rtol=1e-5)


def test_cross_replica_context_uses_the_whole_batch(results):
    loss, _ = reference.linear_token_mean(*_first_batch(results))
    np.testing.assert_allclose(results["cross_replica"], loss, rtol=1e-5)


def test_token_metrics_are_exact_over_uneven_batches_and_replicas(results):
    features, targets, mask = (results[k] for k in ("features", "targets", "mask"))
    kernel = results["kernel"] - np.array(results["fit_mask_global"]["grad"])  # After the step.
    logits = features @ kernel
    ce = -np.take_along_axis(reference.log_softmax(logits), targets[..., None], -1)[..., 0]
    correct = logits.argmax(-1) == targets
    evaluated = results["evaluate"]
    np.testing.assert_allclose(evaluated["token_perplexity"], np.exp((mask * ce).sum() / mask.sum()), rtol=1e-5)
    np.testing.assert_allclose(evaluated["token_accuracy"], (mask * correct).sum() / mask.sum(), rtol=1e-5)
