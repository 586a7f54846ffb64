"""`tf_seqloss.keras_hub.fused_causal_lm`: a keras-hub GPT2CausalLM trained through the fused head.

Tiny backbones built from config with random weights (nothing downloaded). The reference is NumPy float64
masked cross-entropy of the task's own logits (`causal_lm(x)`), and TensorFlow's gradient of that mean on
the materialised logits, with the preprocessor's padding mask as the weights.
"""

import os
import tempfile
import textwrap

import numpy as np
import pytest
import tensorflow as tf

from tests import reference
from tests.child import run_script
from tests.graph_checks import converted_library_functions

pytestmark = pytest.mark.skipif(os.environ.get("TF_USE_LEGACY_KERAS") == "1",
                                reason="keras-hub runs on Keras 3 only, not tf_keras (TF_USE_LEGACY_KERAS=1)")
keras_hub = pytest.importorskip("keras_hub", reason='keras-hub is not installed: pip install "tf_seqloss[keras-hub]"')

import keras  # noqa: E402  (keras-hub's Keras, after the skips)

from tf_seqloss import keras_hub as fused_hub  # noqa: E402
from tf_seqloss._options import LossOptions  # noqa: E402

VOCAB, TIME = 50, 8


def _backbone(seed=0):
    keras.utils.set_random_seed(seed)
    return keras_hub.models.GPT2Backbone(vocabulary_size=VOCAB, num_layers=1, num_heads=2, hidden_dim=8,
                                         intermediate_dim=16, max_sequence_length=16, dropout=0.0)


def _batch(seed=0, batch=4):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(2, TIME + 1, size=batch)
    lengths[0] = TIME
    padding = np.arange(TIME) < lengths[:, None]
    ids = (rng.integers(1, VOCAB, size=padding.shape) * padding).astype("int32")
    x = {"token_ids": ids[:, :-1], "padding_mask": padding[:, :-1]}
    return x, ids[:, 1:], padding[:, 1:].astype("float32")


def _reference(causal_lm, x, y, weights):
    logits = keras.ops.convert_to_numpy(causal_lm(x)).astype("float64")
    ce = reference.token_cross_entropy(logits, y)
    return (weights * ce).sum() / weights.sum(), logits


def _gemma():
    keras.utils.set_random_seed(0)
    backbone = keras_hub.models.GemmaBackbone(vocabulary_size=VOCAB, num_layers=1, num_query_heads=2,
                                              num_key_value_heads=1, hidden_dim=8, intermediate_dim=16, head_dim=4,
                                              dropout=0.0)
    return keras_hub.models.GemmaCausalLM(backbone, preprocessor=None)


def _llama_untied():
    keras.utils.set_random_seed(0)
    backbone = keras_hub.models.LlamaBackbone(vocabulary_size=VOCAB, num_layers=1, num_query_heads=2, hidden_dim=8,
                                              intermediate_dim=16, num_key_value_heads=1, tie_word_embeddings=False)
    return keras_hub.models.LlamaCausalLM(backbone, preprocessor=None)


@pytest.mark.parametrize("task", ["gpt2", "gemma", "gemma_soft_capped", "llama_untied", "bart"])
def test_loss_and_gradients_equal_the_materialised_model(task):
    tasks = dict(gpt2=lambda: keras_hub.models.GPT2CausalLM(_backbone(), preprocessor=None), llama_untied=_llama_untied,
                 bart=_bart)   # keras-hub's Seq2SeqLM is a CausalLM: the decoder's states are the hidden
    causal_lm = tasks.get(task, _gemma)()
    if task == "llama_untied":   # the output projection is `reverse_embeddings`, a variable of its own
        assert not causal_lm.backbone.token_embedding.tie_weights
    if task == "gemma_soft_capped":
        # Gemma 2's cap, small enough to bend these tiny logits: the materialised reference caps them too.
        causal_lm.backbone.token_embedding.logit_soft_cap = 0.05
    causal_lm = fused_hub.fused_causal_lm(causal_lm, chunk_size=4)
    x, y, weights = _bart_batch() if task == "bart" else _batch()
    trainer = fused_hub._FusedTrainer(LossOptions(), 4)   # the loss `fit` steps take
    variables = causal_lm.trainable_weights
    with tf.GradientTape() as tape:
        loss, stats = trainer.loss(causal_lm, x, y, weights, training=True)
    fused_grads = tape.gradient(loss, variables)
    expected, logits = _reference(causal_lm, x, y, weights)
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
    np.testing.assert_array_equal(stats.predictions.numpy(), np.where(weights > 0, logits.argmax(-1), 0))
    # TensorFlow's gradient of the same token mean on the materialised logits (no tf_seqloss code).
    with tf.GradientTape() as tape:
        materialised = causal_lm(x, training=True)
        ce = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=materialised)
        mean = tf.reduce_sum(weights * ce) / tf.reduce_sum(weights)
    materialised_grads = tape.gradient(mean, variables)
    assert len(variables) == len(fused_grads) and all(g is not None for g in fused_grads)
    for variable, fused, expected_grad in zip(variables, fused_grads, materialised_grads):
        np.testing.assert_allclose(tf.convert_to_tensor(fused).numpy(), tf.convert_to_tensor(expected_grad).numpy(),
                                   rtol=1e-4, atol=1e-6, err_msg=variable.path)


def test_fit_logs_the_exact_first_step_then_trains_and_generate_still_works():
    causal_lm = fused_hub.fused_causal_lm(keras_hub.models.GPT2CausalLM(_backbone(1), preprocessor=None))
    x, y, weights = _batch(1)
    expected, logits = _reference(causal_lm, x, y, weights)
    causal_lm.compile(optimizer=keras.optimizers.SGD(0.0), sampler="greedy")   # fixed weights: exact logs
    with converted_library_functions() as converted:  # AutoGraph leaves the fused step's code alone
        history = causal_lm.fit(x, y, sample_weight=weights, batch_size=2, epochs=1, verbose=0, shuffle=False)
    assert converted == []
    ce = reference.token_cross_entropy(logits, y)
    mask = weights > 0
    np.testing.assert_allclose(history.history["token_perplexity"][0], np.exp(ce[mask].mean()), rtol=1e-5)
    np.testing.assert_allclose(history.history["token_accuracy"][0], (logits.argmax(-1) == y)[mask].mean(),
                               rtol=1e-6)
    causal_lm.compile(optimizer=keras.optimizers.Adam(0.05), sampler="greedy")
    fused_hub.fused_causal_lm(causal_lm)   # again after compile: harmless
    first = causal_lm.evaluate(x, y, sample_weight=weights, batch_size=4, verbose=0, return_dict=True)
    np.testing.assert_allclose(first["loss"], expected, rtol=1e-5)
    history = causal_lm.fit(x, y, sample_weight=weights, batch_size=4, epochs=3, verbose=0)
    losses = history.history["loss"]
    assert np.isfinite(losses).all() and losses[-1] < losses[0]
    # generate() is the task's own, on the trained weights: greedy continues with the logits' argmax.
    prompt = {"token_ids": np.array([[5, 9, 3, 0, 0, 0]], "int32"),
              "padding_mask": np.array([[1, 1, 1, 0, 0, 0]], bool)}
    out = causal_lm.generate(prompt, stop_token_ids=None)
    logits = keras.ops.convert_to_numpy(causal_lm({"token_ids": prompt["token_ids"][:, :3],
                                                   "padding_mask": prompt["padding_mask"][:, :3]}))
    assert out["token_ids"].shape == (1, 6) and list(out["token_ids"][0, :3]) == [5, 9, 3]
    assert out["token_ids"][0, 3] == logits[0, -1].argmax()


def _preprocessor():
    # A byte-pair vocabulary of single characters plus the merges' results: every id below VOCAB.
    merges = ["Ġ q", "u i", "c k", "ui ck", "Ġq uick", "Ġ f", "o x", "Ġf ox"]
    tokens = ["<|endoftext|>"] + list("aĠquickfoxjmped!") + [a + b for a, b in (m.split() for m in merges)]
    vocab = {token: i for i, token in enumerate(dict.fromkeys(tokens))}
    assert len(vocab) < VOCAB
    tokenizer = keras_hub.models.GPT2Tokenizer(vocabulary=vocab, merges=merges)
    return keras_hub.models.GPT2CausalLMPreprocessor(tokenizer=tokenizer, sequence_length=TIME)


@pytest.mark.slow  # 20 s (three fits and a save/load): with the slow set, where CI has a core to spare
def test_the_preprocessor_feeds_fit_and_generate_and_the_keras_file_keeps_the_tie():
    causal_lm = keras_hub.models.GPT2CausalLM(_backbone(2), preprocessor=_preprocessor())
    causal_lm = fused_hub.fused_causal_lm(causal_lm)
    # Not XLA-compiled, to keep the test short (the fit test above runs Keras' default).
    causal_lm.compile(optimizer=keras.optimizers.Adam(0.01), sampler="greedy", jit_compile=False)
    texts = ["a quick fox jumped!", "a fox!", "a quick fox!", "a fox jumped!"]
    history = causal_lm.fit(texts, batch_size=2, epochs=2, verbose=0)
    assert np.isfinite(history.history["loss"]).all() and 0 <= history.history["token_accuracy"][-1] <= 1
    text = causal_lm.generate("a quick", max_length=TIME)
    assert isinstance(text, str) and text.startswith("a quick")

    path = os.path.join(tempfile.mkdtemp(), "lm.keras")
    causal_lm.save(path)
    loaded = keras.saving.load_model(path)
    assert type(loaded) is keras_hub.models.GPT2CausalLM and loaded.backbone.token_embedding.tie_weights
    assert len(loaded.trainable_weights) == len(causal_lm.trainable_weights)
    x, _, _ = causal_lm.preprocessor(texts)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(loaded(x)), keras.ops.convert_to_numpy(causal_lm(x)))
    # Still tied: one table for the input embedding and the output projection, fused again after loading.
    loaded = fused_hub.fused_causal_lm(loaded)
    loaded.compile(optimizer=keras.optimizers.SGD(0.5), jit_compile=False)
    before = loaded.backbone.token_embedding.embeddings.numpy().copy()
    loaded.fit(texts, batch_size=4, epochs=1, verbose=0)
    after = loaded.backbone.token_embedding.embeddings.numpy()
    logits = keras.ops.convert_to_numpy(loaded(x))
    hidden = keras.ops.convert_to_numpy(loaded.backbone(x))
    np.testing.assert_allclose(logits, hidden @ after.T, rtol=1e-4, atol=1e-5)
    assert not np.allclose(before, after)


def test_under_mixed_bfloat16_the_fused_loss_is_float32_and_matches_the_tasks_own_logits():
    """The policy's bfloat16 states and embedding: the fused loop reduces in float32 from the rounded values."""
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        causal_lm = fused_hub.fused_causal_lm(keras_hub.models.GPT2CausalLM(_backbone(5), preprocessor=None))
    finally:
        keras.config.set_dtype_policy(previous)
    x, y, weights = _batch(5)
    variables = causal_lm.trainable_weights
    with tf.GradientTape() as tape:
        loss, _ = fused_hub._FusedTrainer(LossOptions(), None).loss(causal_lm, x, y, weights, training=True)
    grads = tape.gradient(loss, variables)
    assert loss.dtype == tf.float32
    assert all(g is not None and tf.convert_to_tensor(g).dtype == v.dtype == "float32"
               for g, v in zip(grads, variables))
    expected, _ = _reference(causal_lm, x, y, weights)   # the task's own bfloat16 logits, in float64
    np.testing.assert_allclose(float(loss), expected, rtol=2e-2)


def _bart():
    keras.utils.set_random_seed(3)
    backbone = keras_hub.models.BartBackbone(vocabulary_size=VOCAB, num_layers=1, num_heads=2, hidden_dim=8,
                                             intermediate_dim=16, max_sequence_length=16, dropout=0.0)
    return keras_hub.models.BartSeq2SeqLM(backbone, preprocessor=None)


def _bart_batch(seed=3, batch=4):
    rng = np.random.default_rng(seed)
    source_lengths = rng.integers(2, TIME + 1, size=batch)
    source = np.arange(TIME) < source_lengths[:, None]
    decoder_x, y, weights = _batch(seed, batch)
    x = {"encoder_token_ids": (rng.integers(3, VOCAB, size=source.shape) * source).astype("int32"),
         "encoder_padding_mask": source.astype("int32"),
         "decoder_token_ids": decoder_x["token_ids"], "decoder_padding_mask": decoder_x["padding_mask"].astype("int32")}
    return x, y, weights


def test_a_bart_seq2seq_lm_trains_fused_exactly_and_still_generates_and_saves():
    """BART in `fit` (its loss and gradients: `test_loss_and_gradients_equal_the_materialised_model[bart]`)."""
    seq2seq = fused_hub.fused_causal_lm(_bart(), chunk_size=4)
    x, y, weights = _bart_batch()
    expected, logits = _reference(seq2seq, x, y, weights)
    seq2seq.compile(optimizer=keras.optimizers.SGD(0.0), sampler="greedy", jit_compile=False)
    history = seq2seq.fit(x, y, sample_weight=weights, batch_size=4, epochs=1, verbose=0)
    mask = weights > 0
    np.testing.assert_allclose(history.history["loss"][0], expected, rtol=1e-5)
    np.testing.assert_allclose(history.history["token_accuracy"][0], (logits.argmax(-1) == y)[mask].mean(),
                               rtol=1e-6)
    prompt = {"encoder_token_ids": x["encoder_token_ids"][:1], "encoder_padding_mask": x["encoder_padding_mask"][:1],
              "decoder_token_ids": np.array([[5, 9, 0, 0]], "int32"),
              "decoder_padding_mask": np.array([[1, 1, 0, 0]], "int32")}
    out = seq2seq.generate(prompt, stop_token_ids=None)
    assert out["decoder_token_ids"].shape == (1, 4) and list(out["decoder_token_ids"][0, :2]) == [5, 9]

    path = os.path.join(tempfile.mkdtemp(), "seq2seq.keras")
    seq2seq.save(path)
    loaded = keras.saving.load_model(path)
    assert type(loaded) is keras_hub.models.BartSeq2SeqLM
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(loaded(x)), keras.ops.convert_to_numpy(seq2seq(x)))


def test_a_seq2seq_lm_whose_logits_are_not_the_embedding_over_the_decoder_states_is_refused():
    keras.utils.set_random_seed(0)
    backbone = keras_hub.models.T5Backbone(vocabulary_size=VOCAB, num_layers=1, num_heads=2, hidden_dim=8,
                                           intermediate_dim=16, key_value_dim=4, dropout=0.0)
    t5 = keras_hub.models.T5Seq2SeqLM(backbone, preprocessor=None)   # rescales the decoder's states when tied
    with pytest.raises(TypeError, match=r"`causal_lm` of `fused_causal_lm`.*decoder's states.*T5Seq2SeqLM with "
                                        r"logits [0-9.e+-]+ away from the fused head's"):
        fused_hub.fused_causal_lm(t5)
    assert t5.train_step.__func__ is type(t5).train_step   # left as it was


@pytest.mark.parametrize("after", ["scaled", "dense"])
def test_a_task_with_a_layer_of_its_own_after_the_backbone_is_refused(after):
    """The task's graph, not its class, decides: a `CausalLM` whose logits pass one more layer."""
    backbone = _backbone()
    hidden = backbone(backbone.input)
    if after == "scaled":   # same shape, other values: caught by the values
        logits = keras.layers.Rescaling(0.5)(backbone.token_embedding(hidden, reverse=True))
    else:                   # another output layer: caught by the shape
        logits = keras.layers.Dense(VOCAB + 1)(hidden)
    task = keras_hub.models.CausalLM(inputs=backbone.input, outputs=logits)
    task.backbone = backbone
    with pytest.raises(TypeError, match=r"`fused_causal_lm`.*Received: causal_lm=a CausalLM with logits"):
        fused_hub.fused_causal_lm(task)
    assert task.train_step.__func__ is type(task).train_step


def test_refusals_name_the_argument():
    with pytest.raises(TypeError, match="Invalid value for argument `causal_lm` of `fused_causal_lm`"):
        fused_hub.fused_causal_lm(keras.Sequential())
    causal_lm = keras_hub.models.GPT2CausalLM(_backbone(), preprocessor=None)
    with pytest.raises(ValueError, match="chunk_size"):
        fused_hub.fused_causal_lm(causal_lm, chunk_size=0)


def test_a_missing_keras_hub_says_how_to_install_it():
    script = textwrap.dedent('''
        import json, sys
        sys.modules["keras_hub"] = None   # as if not installed
        from tf_seqloss import keras_hub
        try:
            keras_hub.fused_causal_lm(object())
        except ImportError as error:
            print("RESULTS" + json.dumps(str(error)))
    ''')
    message = run_script(script, marker="RESULTS", timeout=120)
    assert 'pip install "tf_seqloss[keras-hub]"' in message


STRATEGY_SCRIPT = textwrap.dedent('''
    import json
    import numpy as np
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

    import keras, keras_hub
    from tf_seqloss import keras_hub as fused_hub

    rng = np.random.default_rng(3)
    lengths = np.array([8, 2, 3, 7])   # 7 + 1 tokens on one replica, 2 + 6 on the other: uneven.
    padding = np.arange(8) < lengths[:, None]
    ids = (rng.integers(1, 50, size=padding.shape) * padding).astype("int32")
    # An int mask: a bool input fails in MirroredStrategy's input pipeline under Keras 3 (AddN on bool),
    # with keras-hub's own compiled loss too.
    x = {"token_ids": ids[:, :-1], "padding_mask": padding[:, :-1].astype("int32")}
    y, weights = ids[:, 1:], padding[:, 1:].astype("float32")

    def build():
        keras.utils.set_random_seed(0)
        backbone = keras_hub.models.GPT2Backbone(vocabulary_size=50, num_layers=1, num_heads=2, hidden_dim=8,
                                                 intermediate_dim=16, max_sequence_length=16, dropout=0.0)
        causal_lm = fused_hub.fused_causal_lm(keras_hub.models.GPT2CausalLM(backbone, preprocessor=None),
                                              normalizer="global")
        causal_lm.compile(optimizer=keras.optimizers.SGD(1.0))
        return causal_lm

    results = {}
    for devices in (1, 2):
        if devices == 2:
            with tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]).scope():
                causal_lm = build()
        else:
            causal_lm = build()
        history = causal_lm.fit(x, y, sample_weight=weights, batch_size=4, epochs=1, verbose=0, shuffle=False)
        results[devices] = dict(history={k: float(v[0]) for k, v in history.history.items()},
                                weights=[w.numpy().tolist() for w in causal_lm.trainable_weights])
    print("RESULTS" + json.dumps(results))
''')


@pytest.mark.slow
def test_mirrored_strategy_with_the_global_normalizer_equals_one_device():
    out = run_script(STRATEGY_SCRIPT, marker="RESULTS", timeout=300)
    one, two = out["1"], out["2"]
    for key in ("token_perplexity", "token_accuracy", "loss"):
        np.testing.assert_allclose(two["history"][key], one["history"][key], rtol=1e-5, err_msg=key)
    for a, b in zip(one["weights"], two["weights"]):
        np.testing.assert_allclose(np.array(b), np.array(a), rtol=1e-4, atol=1e-6)


def test_the_fused_loss_is_the_token_mean_where_keras_hubs_default_counts_padding():
    # Pins the module docstring: on a padded batch the default divides by batch * time, the fused by sum(w).
    causal_lm = keras_hub.models.GPT2CausalLM(_backbone(4), preprocessor=None)
    causal_lm.compile(optimizer="sgd", jit_compile=False)
    x, y, weights = _batch(4)
    assert weights.mean() < 0.9
    token_mean, logits = _reference(causal_lm, x, y, weights)
    default = causal_lm.evaluate(x, y, sample_weight=weights, batch_size=4, verbose=0, return_dict=True)
    np.testing.assert_allclose(default["loss"], token_mean * weights.mean(), rtol=1e-5)
    fused_hub.fused_causal_lm(causal_lm)
    fused = causal_lm.evaluate(x, y, sample_weight=weights, batch_size=4, verbose=0, return_dict=True)
    np.testing.assert_allclose(fused["loss"], token_mean, rtol=1e-5)
