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


# The fused head under a policy (issue 21). The reference is NumPy float64 on the very values the head
# computes from: `hidden`, kernel and bias rounded to the half dtype. The head forms their products and the
# softmax statistics in float32, so the loss agrees to float32 rounding of a `FEATURES`-term dot product and
# a log-sum-exp of O(10) logits: a relative 2e-6 covers it (a half-precision softmax would be off by ~1e-3).
HEAD_FEATURES = 8


def _rounded(x, dtype):
    return tf.cast(tf.cast(x, dtype), tf.float64).numpy()


def _numpy_head_loss(hidden, kernel, bias, targets, weights, *, transpose_kernel=False, cap=None):
    logits = hidden @ (kernel.T if transpose_kernel else kernel) + bias
    if cap:
        logits = cap * np.tanh(logits / cap)
    return reference.sequence_loss(logits, targets, weights)


@pytest.mark.parametrize("transpose_kernel", [False, True], ids=["kernel", "transposed"])
@pytest.mark.parametrize("half", [tf.bfloat16, tf.float16], ids=lambda d: d.name)
def test_linear_sequence_loss_casts_a_float32_kernel_to_half_hidden(half, transpose_kernel):
    # Decided: a float32 kernel (and bias) with half-precision hidden is cast to hidden's dtype, as a layer
    # under a mixed policy casts its variables; the kernel's gradient comes back in float32 through the cast.
    _, targets, mask = _batch()
    rng = np.random.default_rng(3)
    hidden = tf.cast(rng.normal(size=mask.shape + (HEAD_FEATURES,)), half)
    shape = (VOCAB, HEAD_FEATURES) if transpose_kernel else (HEAD_FEATURES, VOCAB)
    kernel = tf.constant(rng.normal(size=shape), tf.float32)
    bias = tf.constant(rng.normal(size=(VOCAB,)), tf.float32)
    with tf.GradientTape() as tape:
        tape.watch([kernel, bias])
        loss = tf_seqloss.linear_sequence_loss(hidden, kernel, targets, mask, bias=bias, logit_soft_cap=3.0,
                                               transpose_kernel=transpose_kernel, chunk_size=4)
    d_kernel, d_bias = tape.gradient(loss, [kernel, bias])
    assert loss.dtype == tf.float32 and d_kernel.dtype == tf.float32 and d_bias.dtype == tf.float32
    expected = _numpy_head_loss(_rounded(hidden, half), _rounded(kernel, half), _rounded(bias, half), targets,
                                mask, transpose_kernel=transpose_kernel, cap=3.0)
    np.testing.assert_allclose(float(loss), expected, rtol=2e-6)
    with pytest.raises(TypeError, match=r"`kernel` must have the dtype of `hidden` \(float32\).*Received: "
                                        r"kernel.dtype=float64, hidden.dtype=float32"):
        tf_seqloss.linear_sequence_loss(tf.cast(hidden, tf.float32), tf.cast(kernel, tf.float64), targets)


@pytest.mark.parametrize("tied", [False, True], ids=["own_kernel", "tied"])
@pytest.mark.parametrize("policy", POLICIES, indirect=True)
def test_fused_head_computes_in_the_policy_dtype_and_the_loss_in_float32(policy, tied):
    tokens, targets, mask = _batch(seed=4)
    keras.utils.set_random_seed(4)
    embedding = keras.layers.Embedding(VOCAB, HEAD_FEATURES)
    head = tf_seqloss.FusedLinearHead(VOCAB, bias_initializer="random_normal", logit_soft_cap=3.0, chunk_size=4,
                                      embedding=embedding if tied else None)
    hidden = embedding(tokens)
    half = tf.as_dtype(policy[len("mixed_"):])
    assert hidden.dtype == half and head.compute_dtype == half.name
    head(hidden, targets, weights=mask)
    (loss,) = head.losses
    assert loss.dtype == tf.float32
    assert head.kernel.dtype == tf.float32 and head.bias.dtype == tf.float32  # float32 variables
    kernel = tf.convert_to_tensor(embedding.embeddings if tied else head.kernel)
    expected = _numpy_head_loss(_rounded(hidden, half), _rounded(kernel, half), _rounded(head.bias, half), targets,
                                mask, transpose_kernel=tied, cap=3.0)
    np.testing.assert_allclose(float(loss), expected, rtol=2e-6)
    logits = head(hidden)  # inference in the compute dtype
    assert logits.dtype == half
