"""`FusedLinearHead`: logits for inference, the fused loss for training (in `fit`), `.keras` round trips."""

import os
import tempfile

import numpy as np
import pytest
import tensorflow as tf

import tf_seqloss
from tests import reference
from tests.child import run_script
from tf_seqloss._keras import keras

VOCAB, TIME, FEATURES = 37, 6, 8
LENGTHS = np.array([6, 2, 4, 5], np.int32)


def _batch(seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, VOCAB, size=(len(LENGTHS), TIME)).astype(np.int32)
    targets = rng.integers(1, VOCAB, size=(len(LENGTHS), TIME)).astype(np.int32)
    return tokens, targets, LENGTHS


def _mask(lengths, time=TIME):
    return (np.arange(time)[None, :] < np.asarray(lengths)[:, None]).astype(np.float32)


def _models(**head_kwargs):
    """A trainer (fused loss, no logits) and a predictor (logits) sharing every layer."""
    tokens = keras.Input((None,), dtype="int32", name="tokens")
    targets = keras.Input((None,), dtype="int32", name="targets")
    lengths = keras.Input((), dtype="int32", name="lengths")
    hidden = keras.layers.Dense(FEATURES, activation="tanh")(keras.layers.Embedding(VOCAB, FEATURES)(tokens))
    head = tf_seqloss.FusedLinearHead(VOCAB, chunk_size=5, name="head", **head_kwargs)
    trainer = keras.Model([tokens, targets, lengths], head(hidden, targets, lengths=lengths))
    predictor = keras.Model(tokens, head(hidden))
    return trainer, predictor, head


def test_logits_and_top_k_are_the_projection():
    hidden = tf.random.stateless_normal([2, 3, FEATURES], seed=[1, 2])
    head = tf_seqloss.FusedLinearHead(VOCAB, bias_initializer="random_normal")
    logits = head(hidden)
    expected = hidden.numpy() @ head.kernel.numpy() + head.bias.numpy()
    np.testing.assert_allclose(logits.numpy(), expected, rtol=1e-5, atol=1e-5)
    top = tf_seqloss.FusedLinearHead(VOCAB, top_k=3)
    top.build(hidden.shape)
    top.set_weights(head.get_weights())
    values, ids = top(hidden)
    np.testing.assert_array_equal(ids.numpy(), np.argsort(-expected, axis=-1)[..., :3])
    np.testing.assert_allclose(values.numpy(), np.sort(expected, axis=-1)[..., ::-1][..., :3], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("z_loss", [0.0, 0.01])
def test_training_call_adds_the_sequence_loss_of_the_logits(z_loss):
    hidden = tf.random.stateless_normal([len(LENGTHS), TIME, FEATURES], seed=[3, 4])
    _, targets, lengths = _batch()
    head = tf_seqloss.FusedLinearHead(VOCAB, bias_initializer="random_normal", z_loss=z_loss, label_smoothing=0.1)
    log_sum_exp = head(hidden, targets, lengths=lengths)
    assert len(head.losses) == 1
    added = float(head.losses[0])
    logits = head(hidden)  # a new call: Keras forgets the previous call's losses
    expected = reference.sequence_loss(logits.numpy(), targets, _mask(lengths), z_loss=z_loss, label_smoothing=0.1)
    np.testing.assert_allclose(added, expected, rtol=1e-5)
    assert log_sum_exp.shape == (len(LENGTHS), TIME)
    np.testing.assert_allclose(log_sum_exp.numpy() * _mask(lengths),
                               tf.reduce_logsumexp(logits, -1).numpy() * _mask(lengths), rtol=1e-5)


def test_keras_mask_of_hidden_marks_padding():
    tokens, targets, lengths = _batch(seed=1)
    tokens = tokens * _mask(lengths).astype(np.int32)  # 0 pads the inputs
    embedding = keras.layers.Embedding(VOCAB, FEATURES, mask_zero=True)
    head = tf_seqloss.FusedLinearHead(VOCAB)
    hidden = embedding(tokens)
    head(hidden, targets)
    added = float(head.losses[0])
    expected = reference.sequence_loss(head(hidden).numpy(), targets, _mask(lengths))
    np.testing.assert_allclose(added, expected, rtol=1e-5)


class Tagger(keras.Model):
    """A subclassed model: `Embedding(mask_zero=True)`, then the head's logits (as the example's decoder)."""

    def __init__(self):
        super().__init__()
        self.embedding = keras.layers.Embedding(VOCAB, FEATURES, mask_zero=True)
        self.head = tf_seqloss.FusedLinearHead(VOCAB, bias_initializer="random_normal")

    def call(self, tokens):
        return self.head(self.embedding(tokens))


def test_logits_keep_the_keras_mask_so_token_metrics_leave_padding_out():
    tokens, targets, lengths = _batch(seed=2)
    tokens = tokens * _mask(lengths).astype(np.int32)  # 0 pads the inputs
    real = _mask(lengths).astype(bool)
    model = Tagger()
    logits = model(tokens)
    np.testing.assert_array_equal(np.asarray(tf_seqloss._keras.get_mask(logits)), real)
    predicted = logits.numpy().argmax(-1)
    wrong = ~real | (np.arange(TIME)[None, :] % 2 == 1)  # every padded token, and every other real one
    targets = np.where(wrong, (predicted + 1) % VOCAB, predicted).astype(np.int32)
    expected = (predicted == targets)[real].mean()
    assert not np.isclose(expected, (logits.numpy().argmax(-1) == targets).mean())  # padding would change it

    accuracy = tf_seqloss.TokenAccuracy()

    def accuracy_of(tokens, targets):  # as the example's evaluation step: the mask lives inside the trace
        accuracy.update_state(targets, model(tokens))
        return accuracy.result()

    for run in (accuracy_of, tf.function(accuracy_of)):
        accuracy.reset_state()
        np.testing.assert_allclose(float(run(tokens, targets)), expected, rtol=1e-6)
    top = tf_seqloss.FusedLinearHead(VOCAB, top_k=2)
    assert tf_seqloss._keras.get_mask(top(model.embedding(tokens))[0]) is None  # top-k: no mask


def test_trainer_fits_on_the_fused_loss_and_predictor_decodes_with_the_same_weights():
    tokens, targets, lengths = _batch(seed=2)
    keras.utils.set_random_seed(2)
    trainer, predictor, _ = _models()
    trainer.compile(optimizer=keras.optimizers.Adam(0.05))
    logits = predictor.predict(tokens, verbose=0)
    expected = reference.sequence_loss(logits, targets, _mask(lengths))
    history = trainer.fit([tokens, targets, lengths], batch_size=len(tokens), epochs=4, verbose=0, shuffle=False)
    np.testing.assert_allclose(history.history["loss"][0], expected, rtol=1e-5)
    assert history.history["loss"][-1] < expected
    trained = reference.sequence_loss(predictor.predict(tokens, verbose=0), targets, _mask(lengths))
    np.testing.assert_allclose(trainer.evaluate([tokens, targets, lengths], batch_size=len(tokens), verbose=0),
                               trained, rtol=1e-5)


def test_training_step_builds_no_logits_sized_tensor():
    batch, time, vocab = 4, 16, 97
    head = tf_seqloss.FusedLinearHead(vocab, chunk_size=8)
    head.build((None, None, FEATURES))

    @tf.function
    def step(hidden, targets):
        with tf.GradientTape() as tape:
            head(hidden, targets)
            loss = head.losses[-1]
        return tape.gradient(loss, head.trainable_variables)

    graph = step.get_concrete_function(tf.TensorSpec([batch, time, FEATURES]),
                                       tf.TensorSpec([batch, time], tf.int32)).graph
    sizes = [output.shape.num_elements() or 0 for op in graph.get_operations() for output in op.outputs]
    for function in graph._functions.values():  # the loop bodies
        sizes += [output.shape.num_elements() or 0 for op in function.graph.get_operations()
                  for output in op.outputs]
    assert max(sizes) < batch * time * vocab
    assert max(sizes) >= 8 * vocab  # a chunk's logits


def test_models_round_trip_through_a_keras_file():
    tokens, targets, lengths = _batch(seed=3)
    keras.utils.set_random_seed(3)
    trainer, predictor, head = _models(label_smoothing=0.1, z_loss=1e-3, padding_id=-1, top_k=None)
    trainer.compile(optimizer="adam")
    trainer.fit([tokens, targets, lengths], batch_size=len(tokens), epochs=1, verbose=0)
    value = trainer.evaluate([tokens, targets, lengths], batch_size=len(tokens), verbose=0)
    directory = tempfile.mkdtemp()
    trainer.save(os.path.join(directory, "trainer.keras"))
    predictor.save(os.path.join(directory, "predictor.keras"))
    loaded = keras.models.load_model(os.path.join(directory, "trainer.keras"))  # registered: no custom_objects
    layer = next(layer for layer in loaded.layers if isinstance(layer, tf_seqloss.FusedLinearHead))
    assert layer.get_config() == head.get_config()
    np.testing.assert_allclose(loaded.evaluate([tokens, targets, lengths], batch_size=len(tokens), verbose=0),
                               value, rtol=1e-6)
    loaded_predictor = keras.models.load_model(os.path.join(directory, "predictor.keras"))
    np.testing.assert_allclose(loaded_predictor.predict(tokens, verbose=0), predictor.predict(tokens, verbose=0),
                               rtol=1e-6)
    loaded.fit([tokens, targets, lengths], batch_size=len(tokens), epochs=1, verbose=0)  # still trains


def test_config_has_every_argument_and_bad_arguments_are_refused():
    arguments = dict(units=11, use_bias=False, average_across_timesteps=False, average_across_batch=False,
                     sum_over_timesteps=True, sum_over_batch=True, padding_id=0, label_smoothing=0.1,
                     z_loss=0.01, epsilon=1e-12, chunk_size=32, top_k=2, reduction="sum")
    head = tf_seqloss.FusedLinearHead(**arguments)
    config = head.get_config()
    for key, value in arguments.items():
        assert getattr(head, key) == value and config[key] == value
    assert tf_seqloss.FusedLinearHead.from_config(config).get_config() == config
    with pytest.raises(ValueError, match="Invalid value for argument `units`. Expected a positive int"):
        tf_seqloss.FusedLinearHead(0)
    with pytest.raises(ValueError, match="Invalid value for argument `top_k`. Expected None or an int"):
        tf_seqloss.FusedLinearHead(5, top_k=6)
    with pytest.raises(ValueError, match="`reduction` of `FusedLinearHead`"):
        tf_seqloss.FusedLinearHead(5, reduction="none")
    with pytest.raises(ValueError, match="Invalid value for argument `z_loss`. Expected a number in"):
        tf_seqloss.FusedLinearHead(5, z_loss=-0.1)


_DISTRIBUTED = '''
import json
import numpy as np
import tensorflow as tf

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

import tf_seqloss
from tests import reference
from tf_seqloss._keras import keras

VOCAB, TIME = 7, 6
rng = np.random.default_rng(1)
lengths = np.array([6, 1, 5, 4])  # 7 tokens on the first replica, 9 on the second
mask = (np.arange(TIME) < lengths[:, None]).astype("float32")
tokens = (rng.integers(1, VOCAB, size=mask.shape) * mask).astype("int32")
targets = (rng.integers(1, VOCAB, size=mask.shape) * mask).astype("int32")


def build():
    inputs = [keras.Input((TIME,), dtype="int32"), keras.Input((TIME,), dtype="int32")]
    normal = keras.initializers.RandomNormal(stddev=1.0)
    hidden = keras.layers.Embedding(VOCAB, 4, embeddings_initializer=normal, name="embedding")(inputs[0])
    head = tf_seqloss.FusedLinearHead(VOCAB, padding_id=0, kernel_initializer=normal, chunk_size=3)
    return keras.Model(inputs, head(hidden, inputs[1])), head


keras.utils.set_random_seed(0)
single, _ = build()
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
with strategy.scope():
    model, _ = build()
    model.set_weights(single.get_weights())
    model.compile(optimizer=keras.optimizers.SGD(1.0))
evaluated = model.evaluate([tokens, targets], batch_size=4, verbose=0)
model.fit([tokens, targets], batch_size=4, epochs=1, verbose=0, shuffle=False)
# The expected loss and SGD(1.0) step in NumPy float64: each replica's token mean, averaged over the two.
embedding, kernel, bias = (w.astype(np.float64) for w in single.get_weights())
hidden = embedding[tokens]
logits = hidden @ kernel + bias
halves = [slice(0, 2), slice(2, 4)]
expected = sum(reference.sequence_loss(logits[h], targets[h], mask[h]) for h in halves) / 2
d_logits = np.concatenate([reference.sequence_loss_grad(logits[h], targets[h], mask[h]) for h in halves]) / 2
d_embedding = np.zeros_like(embedding)
np.add.at(d_embedding, tokens, d_logits @ kernel.T)
stepped = [embedding - d_embedding, kernel - np.einsum("btf,btc->fc", hidden, d_logits), bias - d_logits.sum((0, 1))]
print("RESULT " + json.dumps(dict(
    evaluated=float(evaluated), expected=float(expected),
    weight_error=max(float(np.max(np.abs(a - b))) for a, b in zip(model.get_weights(), stepped)))))
'''


@pytest.mark.slow
def test_replicas_average_their_own_token_means_under_mirrored_strategy():
    result = run_script(_DISTRIBUTED, marker="RESULT ", timeout=600)
    np.testing.assert_allclose(result["evaluated"], result["expected"], rtol=1e-5)
    assert result["weight_error"] < 1e-5
