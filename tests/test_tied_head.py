"""`FusedLinearHead(embedding=...)`: the output projection tied to the token embedding (issue 21).

The head creates no kernel and reads the embedding's `[classes, features]` variable as it is. Checked
against NumPy float64: the loss of `E[tokens] @ E^T + b`, and the embedding's gradient as the sum of the
lookup's (rows of the hidden gradient scattered to their tokens) and the head's (`d_logits^T @ hidden`).
"""

import numpy as np
import pytest
import tensorflow as tf

import tf_seqloss
from tests import reference
from tf_seqloss._keras import IS_KERAS_3, keras

VOCAB, FEATURES, BATCH, TIME = 23, 6, 3, 5
CAP = 1.5


def _batch(seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, VOCAB, size=(BATCH, TIME)).astype(np.int32)
    targets = rng.integers(1, VOCAB, size=(BATCH, TIME)).astype(np.int32)
    targets[2, 3:] = 0  # padding_id=0
    return tokens, targets


def _numpy_tied(embeddings, bias, tokens, targets, *, cap=None, label_smoothing=0.0, z_loss=0.0):
    """`(loss, d_embeddings, d_bias)` of the tied head on `hidden = E[tokens]`, in float64."""
    embeddings, bias = np.asarray(embeddings, np.float64), np.asarray(bias, np.float64)
    hidden = embeddings[tokens]
    raw = hidden @ embeddings.T + bias
    tanh = np.tanh(raw / cap) if cap else None
    logits = cap * tanh if cap else raw
    weights = (targets != 0).astype(np.float64)
    options = dict(label_smoothing=label_smoothing, z_loss=z_loss)
    loss = reference.sequence_loss(logits, targets, weights, **options)
    d_logits = reference.sequence_loss_grad(logits, targets, weights, **options)
    if cap:
        d_logits = d_logits * (1 - tanh ** 2)
    d_hidden = d_logits @ embeddings
    d_embeddings = np.einsum("btc,btf->cf", d_logits, hidden)  # the head's share
    np.add.at(d_embeddings, tokens, d_hidden)  # the lookup's share
    return loss, d_embeddings, d_logits.sum(axis=(0, 1))


def _embedding_layers():
    layers = {"Embedding": lambda **kw: keras.layers.Embedding(VOCAB, FEATURES, **kw)}
    if hasattr(keras.layers, "ReversibleEmbedding"):  # Keras 3.13+
        layers["ReversibleEmbedding"] = lambda **kw: keras.layers.ReversibleEmbedding(VOCAB, FEATURES, **kw)
    return layers


@pytest.mark.parametrize("kind", sorted(_embedding_layers()))
@pytest.mark.parametrize("cap, label_smoothing, z_loss", [(None, 0.0, 0.0), (CAP, 0.1, 0.01)],
                         ids=["plain", "capped-ls-z"])
def test_tied_head_value_and_embedding_gradient_equal_numpy_float64(kind, cap, label_smoothing, z_loss):
    tokens, targets = _batch()
    embedding = _embedding_layers()[kind](dtype="float64")
    head = tf_seqloss.FusedLinearHead(VOCAB, embedding=embedding, padding_id=0, logit_soft_cap=cap,
                                      label_smoothing=label_smoothing, z_loss=z_loss, chunk_size=4,
                                      bias_initializer="random_normal", dtype="float64")
    with tf.GradientTape() as tape:
        head(embedding(tokens), targets)
        loss = head.losses[0]
    assert head.kernel is embedding.embeddings
    d_embeddings, d_bias = tape.gradient(loss, [embedding.embeddings, head.bias])
    expected = _numpy_tied(embedding.embeddings.numpy(), head.bias.numpy(), tokens, targets, cap=cap,
                           label_smoothing=label_smoothing, z_loss=z_loss)
    np.testing.assert_allclose(float(loss), expected[0], rtol=1e-12)
    np.testing.assert_allclose(tf.convert_to_tensor(d_embeddings).numpy(), expected[1], rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(d_bias.numpy(), expected[2], rtol=1e-10, atol=1e-13)
    # Inference: the capped logits of the same variable, without a transposed copy of it.
    logits = head(embedding(tokens)).numpy()
    raw = embedding.embeddings.numpy()[tokens] @ embedding.embeddings.numpy().T + head.bias.numpy()
    np.testing.assert_allclose(logits, cap * np.tanh(raw / cap) if cap else raw, rtol=1e-12)


def _tied_model():
    embedding = keras.layers.Embedding(VOCAB, FEATURES, name="tokens_embedding")
    head = tf_seqloss.FusedLinearHead(VOCAB, embedding=embedding, padding_id=0, logit_soft_cap=CAP, chunk_size=4,
                                      name="tied_head")
    tokens = keras.Input((None,), dtype="int32")
    targets = keras.Input((None,), dtype="int32")
    hidden = keras.layers.Dense(FEATURES, activation="tanh", name="mixer")(embedding(tokens))
    model = keras.Model([tokens, targets], head(hidden, targets))
    model.compile(optimizer=keras.optimizers.SGD(0.5))
    return model, embedding, head


def test_the_head_adds_no_kernel_and_units_come_from_the_embedding():
    model, embedding, head = _tied_model()
    # The embedding (shared), the Dense layer, the head's bias; no `[features, vocab]` kernel.
    assert model.count_params() == VOCAB * FEATURES + FEATURES * FEATURES + FEATURES + VOCAB
    assert head.kernel is embedding.embeddings
    assert tf_seqloss.FusedLinearHead(None, embedding=keras.layers.Embedding(VOCAB, FEATURES)).units == VOCAB


def test_one_fit_step_moves_the_one_variable():
    model, embedding, head = _tied_model()
    tokens, targets = _batch()
    before = embedding.embeddings.numpy().copy()
    model.fit([tokens, targets], epochs=1, batch_size=BATCH, verbose=0)
    after = embedding.embeddings.numpy()
    assert np.any(after != before)
    np.testing.assert_array_equal(tf.convert_to_tensor(head.kernel).numpy(), after)


@pytest.mark.skipif(not IS_KERAS_3, reason="tf_keras' .keras loader drops the sharing of its built-in layers")
def test_keras_file_round_trip_keeps_the_tie(tmp_path):
    model, _, _ = _tied_model()
    tokens, targets = _batch()
    model.fit([tokens, targets], epochs=1, batch_size=BATCH, verbose=0)
    path = str(tmp_path / "tied.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    embedding, head = loaded.get_layer("tokens_embedding"), loaded.get_layer("tied_head")
    assert head.embedding is embedding and head.kernel is embedding.embeddings
    assert loaded.count_params() == model.count_params()
    np.testing.assert_allclose(loaded.predict([tokens, targets], verbose=0),
                               model.predict([tokens, targets], verbose=0), rtol=1e-6)
    # Assigning one changes what the other computes: the head's logits follow the embedding.
    embedding.embeddings.assign(np.zeros([VOCAB, FEATURES], np.float32))
    logits = head(tf.ones([1, 2, FEATURES]))
    capped_bias = CAP * np.tanh(head.bias.numpy() / CAP)
    np.testing.assert_allclose(logits.numpy(), np.broadcast_to(capped_bias, (1, 2, VOCAB)), rtol=1e-6)
    # One fit step moves both identically (one variable).
    loaded.fit([tokens, targets], epochs=1, batch_size=BATCH, verbose=0)
    np.testing.assert_array_equal(tf.convert_to_tensor(head.kernel).numpy(), embedding.embeddings.numpy())
    assert np.any(embedding.embeddings.numpy() != 0)


@pytest.mark.skipif(IS_KERAS_3, reason="tf_keras only")
def test_tf_keras_keras_file_refuses_to_load_an_untied_copy(tmp_path):
    # tf_keras rebuilds its built-in layers without their shared-object id, so the head would get a second
    # embedding; loading fails loudly (the second embedding finds no saved weights) rather than untie.
    model, _, _ = _tied_model()
    path = str(tmp_path / "tied.keras")
    model.save(path)
    with pytest.raises(ValueError, match="expected 1 variables, but received 0"):
        keras.models.load_model(path)


def test_weights_round_trip_into_a_rebuilt_model_keeps_the_tie(tmp_path):
    # Either Keras: a model rebuilt by code and `load_weights` (the tf_keras route).
    model, _, _ = _tied_model()
    model.fit([*_batch()], epochs=1, batch_size=BATCH, verbose=0)
    path = str(tmp_path / ("tied.weights.h5" if IS_KERAS_3 else "tied_ckpt"))
    model.save_weights(path)
    rebuilt, embedding, head = _tied_model()
    rebuilt.load_weights(path)
    assert head.kernel is embedding.embeddings
    np.testing.assert_array_equal(embedding.embeddings.numpy(), model.get_layer("tokens_embedding").embeddings.numpy())


def test_an_embedding_of_the_wrong_shape_is_refused_naming_the_argument():
    head = tf_seqloss.FusedLinearHead(VOCAB + 1, embedding=keras.layers.Embedding(VOCAB, FEATURES))
    with pytest.raises(ValueError, match=r"Invalid value for argument `embedding` of `FusedLinearHead`. Expected a "
                                         r"layer whose `embeddings` variable is \[units, features\]"):
        head(tf.zeros([1, 2, FEATURES]))
    with pytest.raises(TypeError, match=r"Invalid value for argument `embedding`.*Received: embedding='emb'"):
        tf_seqloss.FusedLinearHead(VOCAB, embedding="emb")


def test_tied_training_step_is_gpu_ready_and_compiles_with_xla():
    from tests.graph_checks import all_nodes, ops_without_gpu_kernel
    tokens, targets = _batch()
    embedding = keras.layers.Embedding(VOCAB, FEATURES)
    head = tf_seqloss.FusedLinearHead(VOCAB, embedding=embedding, padding_id=0, logit_soft_cap=CAP, chunk_size=4)
    head(embedding(tokens), targets)  # builds both

    def step(tokens, targets):
        with tf.GradientTape() as tape:
            head(embedding(tokens), targets)
            loss = head.losses[-1]
        return [loss] + tape.gradient(loss, [embedding.embeddings, head.bias])

    signature = [tf.TensorSpec([None, None], tf.int32)] * 2
    traced = tf.function(step, input_signature=signature)
    concrete = traced.get_concrete_function()
    assert ops_without_gpu_kernel(concrete) == []
    assert [n.op for n in all_nodes(concrete.graph.as_graph_def()) if n.op == "Transpose"] == []
    compiled = tf.function(step, input_signature=signature, jit_compile=True)
    for a, b in zip(compiled(tokens, targets), traced(tokens, targets)):
        np.testing.assert_allclose(tf.convert_to_tensor(a).numpy(), tf.convert_to_tensor(b).numpy(),
                                   rtol=1e-5, atol=1e-6)



def test_tied_inference_reads_the_embedding_without_a_transposed_copy():
    from tests.graph_checks import all_nodes
    embedding = keras.layers.Embedding(VOCAB, FEATURES)
    head = tf_seqloss.FusedLinearHead(VOCAB, embedding=embedding, top_k=3)
    infer = tf.function(lambda tokens: head(embedding(tokens)))
    concrete = infer.get_concrete_function(tf.TensorSpec([None, None], tf.int32))
    assert [n.op for n in all_nodes(concrete.graph.as_graph_def()) if n.op == "Transpose"] == []
    tokens, _ = _batch()
    values, ids = infer(tf.constant(tokens))
    logits = embedding.embeddings.numpy()[tokens] @ embedding.embeddings.numpy().T + head.bias.numpy()
    np.testing.assert_allclose(values.numpy(), -np.sort(-logits, axis=-1)[..., :3], rtol=1e-5, atol=1e-6)
