"""`SequenceLoss` and `SequenceLossLayer` under the `mixed_float16` and `mixed_bfloat16` Keras policies.

The tolerance against the float32 model: per token, cross-entropy `logsumexp(z) - z[y]` changes by at most
`2 * max|dz|` when the logits change by `dz` (both terms are 1-Lipschitz in the max-norm), and a weighted
mean of tokens keeps that bound. So a loss computed in float32 from half-precision logits differs from the
float32 model's loss by at most twice the largest logit rounding error, which the test measures.
"""

import numpy as np
import pytest
import tensorflow as tf

import tf_seqloss
from tests import reference
from tf_seqloss._keras import keras

VOCAB, TIME = 11, 6
LENGTHS = np.array([6, 2, 4, 5])
POLICIES = ["mixed_float16", "mixed_bfloat16"]


@pytest.fixture
def policy(request):
    keras.mixed_precision.set_global_policy(request.param)
    yield request.param
    keras.mixed_precision.set_global_policy("float32")


def _batch(seed=0):
    rng = np.random.default_rng(seed)
    mask = (np.arange(TIME) < LENGTHS[:, None]).astype(np.float32)
    tokens = (rng.integers(1, VOCAB, size=mask.shape) * mask).astype(np.int32)
    targets = (rng.integers(1, VOCAB, size=mask.shape) * mask).astype(np.int32)
    return tokens, targets, mask


def _model():
    tokens = keras.Input((TIME,), dtype="int32")
    hidden = keras.layers.Embedding(VOCAB, 16, mask_zero=True)(tokens)
    hidden = keras.layers.Dense(16, activation="tanh")(hidden)
    return keras.Model(tokens, keras.layers.Dense(VOCAB)(hidden))  # Half-precision logits under a policy.


def _float32_weights(seed):
    keras.mixed_precision.set_global_policy("float32")
    keras.utils.set_random_seed(seed)
    model = _model()
    return model, model.get_weights()


@pytest.mark.parametrize("policy", POLICIES, indirect=True)
def test_loss_is_computed_in_float32_and_matches_the_float32_model(policy):
    tokens, targets, mask = _batch()
    model32, weights = _float32_weights(seed=0)
    logits32 = model32(tokens).numpy()
    loss32 = float(tf_seqloss.SequenceLoss()(targets, model32(tokens)))

    keras.mixed_precision.set_global_policy(policy)
    model = _model()
    model.set_weights(weights)
    logits = model(tokens)
    assert logits.dtype == tf.as_dtype(policy[len("mixed_"):])
    loss = tf_seqloss.SequenceLoss()(targets, logits)  # The mask comes with the logits.
    assert loss.dtype == tf.float32

    # Computed in float32: the float64 reference on the very same half-precision logits agrees to float32
    # rounding (a float16 computation would be off by about 1e-3).
    half_logits = logits.numpy().astype(np.float64)
    np.testing.assert_allclose(float(loss), reference.sequence_loss(half_logits, targets, mask), rtol=2e-6)

    model.compile(loss=tf_seqloss.SequenceLoss())
    np.testing.assert_allclose(model.evaluate(tokens, targets, batch_size=len(tokens), verbose=0), float(loss),
                               rtol=1e-6)

    logit_error = np.max(np.abs(half_logits - logits32)[mask.astype(bool)])
    assert logit_error < (0.01 if policy == "mixed_float16" else 0.05)  # Half rounding of O(1) logits.
    assert abs(float(loss) - loss32) <= 2 * logit_error + 1e-6


@pytest.mark.parametrize("policy", POLICIES, indirect=True)
def test_dtype_reports_the_dtype_the_loss_is_returned_in(policy):
    # Under the global policy, for the policy given as `dtype`, its half dtype, the default and float64:
    # `dtype` says what comes back whatever the logits' dtype, float32 for a half-precision policy.
    _, targets, mask = _batch()
    logits = np.random.default_rng(1).normal(size=mask.shape + (VOCAB,)) * 3
    half = policy[len("mixed_"):]
    for dtype, returned in ((policy, "float32"), (half, "float32"), (None, "float32"), ("float64", "float64")):
        loss_fn = tf_seqloss.SequenceLoss(dtype=dtype)
        assert loss_fn.dtype == returned, dtype
        for logits_dtype in (half, "float32", "float64"):
            given = tf.cast(logits, logits_dtype)
            loss = loss_fn(targets, given, sample_weight=mask)
            assert loss.dtype.name == returned, (dtype, logits_dtype)
            expected = reference.sequence_loss(tf.cast(given, tf.float64).numpy(), targets, mask)
            np.testing.assert_allclose(float(loss), expected, rtol=1e-12 if returned == "float64" else 2e-6)


def test_training_under_mixed_float16_with_loss_scaling_lowers_the_loss():
    tokens, targets, mask = _batch(seed=1)
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        keras.utils.set_random_seed(1)
        model = _model()
        model.compile(optimizer=keras.optimizers.Adam(0.05), loss=tf_seqloss.SequenceLoss())
        assert "LossScaleOptimizer" in type(model.optimizer).__name__  # `compile` wraps it for float16.
        history = model.fit(tokens, targets, batch_size=len(tokens), epochs=15, verbose=0)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    losses = history.history["loss"]
    assert np.all(np.isfinite(losses))
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize("policy", POLICIES, indirect=True)
def test_loss_layer_computes_in_float32_from_half_logits(policy):
    tokens, targets, mask = _batch(seed=2)
    keras.utils.set_random_seed(2)
    layer = tf_seqloss.SequenceLossLayer()
    logits = keras.layers.Dense(VOCAB)(keras.layers.Embedding(VOCAB, 8)(tokens))
    assert logits.dtype != tf.float32
    assert layer(logits, targets, weights=mask) is not None
    (loss,) = layer.losses
    assert loss.dtype == tf.float32
    np.testing.assert_allclose(float(loss), reference.sequence_loss(logits.numpy().astype(np.float64), targets,
                                                                    mask), rtol=2e-6)
