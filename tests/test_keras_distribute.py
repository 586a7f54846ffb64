"""`SequenceLoss` and `SequenceLossLayer` under `tf.distribute.MirroredStrategy` over two logical CPUs.

Each replica normalises by its own tokens and the replicas' losses are averaged: the logged loss is the
mean of `sequence_loss` on each replica's half of the batch, and one SGD step moves the weights as a
single device would on that mean. The logical devices must be set before TensorFlow starts, so the check
runs in a fresh interpreter.
"""

import textwrap

import numpy as np
import pytest

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
    from tf_seqloss._keras import keras

    VOCAB, TIME = 7, 6
    rng = np.random.default_rng(1)
    lengths = np.array([6, 1, 5, 4])  # 7 tokens on the first replica, 9 on the second.
    mask = (np.arange(TIME) < lengths[:, None]).astype("float32")
    tokens = (rng.integers(1, VOCAB, size=mask.shape) * mask).astype("int32")
    targets = (rng.integers(1, VOCAB, size=mask.shape) * mask).astype("int32")

    def build(with_layer):
        # The targets are an input of the model with the layer only: an input that no output uses is an
        # error on Keras 3.10 and 3.12 (3.15 lets it pass).
        tokens_in = keras.Input((TIME,), dtype="int32")
        normal = keras.initializers.RandomNormal(stddev=1.0)  # Logits of O(1): token losses differ.
        hidden = keras.layers.Embedding(VOCAB, 4, embeddings_initializer=normal)(tokens_in)
        logits = keras.layers.Dense(VOCAB, kernel_initializer=normal)(hidden)
        if not with_layer:
            return keras.Model(tokens_in, logits)
        targets_in = keras.Input((TIME,), dtype="int32")
        return keras.Model([tokens_in, targets_in], tf_seqloss.SequenceLossLayer(padding_id=0)(logits, targets_in))

    results = {}
    for route in ("loss", "layer"):
        keras.utils.set_random_seed(0)
        single = build(with_layer=False)
        strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
        with strategy.scope():
            model = build(with_layer=route == "layer")
            model.set_weights(single.get_weights())
            model.compile(optimizer=keras.optimizers.SGD(1.0),
                          loss=tf_seqloss.SequenceLoss(padding_id=0) if route == "loss" else None)
        x, y = (tokens, targets) if route == "loss" else ([tokens, targets], None)
        evaluated = model.evaluate(x, y, batch_size=4, verbose=0)
        fitted = model.fit(x, y, batch_size=4, epochs=1, verbose=0, shuffle=False)
        with tf.GradientTape() as tape:
            logits = single(tokens)
            halves = [tf_seqloss.sequence_loss(logits[i:i + 2], targets[i:i + 2], mask[i:i + 2]) for i in (0, 2)]
            mean = (halves[0] + halves[1]) / 2
        grads = tape.gradient(mean, single.trainable_weights)
        keras.optimizers.SGD(1.0).apply_gradients(zip(grads, single.trainable_weights))
        results[route] = dict(
            evaluated=float(evaluated), fitted=float(fitted.history["loss"][0]),
            halves=[float(h) for h in halves], pooled=float(tf_seqloss.sequence_loss(logits, targets, mask)),
            weight_error=max(float(np.max(np.abs(a - b))) for a, b in zip(model.get_weights(), single.get_weights())),
        )
    print("RESULTS" + json.dumps(results))
''')


@pytest.fixture(scope="module")
def results():
    return run_script(SCRIPT, marker="RESULTS", timeout=600)


@pytest.mark.parametrize("route", ["loss", "layer"])
def test_replicas_average_their_own_token_means(results, route):
    result = results[route]
    expected = np.mean(result["halves"])
    assert abs(expected - result["pooled"]) > 1e-3  # The halves hold unequal token counts.
    np.testing.assert_allclose(result["evaluated"], expected, rtol=1e-5)
    np.testing.assert_allclose(result["fitted"], expected, rtol=1e-5)


@pytest.mark.parametrize("route", ["loss", "layer"])
def test_one_step_matches_a_single_device_step_on_the_replica_mean(results, route):
    # Without the division by the number of replicas the step would be twice as long (error ~1e-1).
    assert results[route]["weight_error"] < 1e-5
