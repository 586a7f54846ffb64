"""Arguments that used to pass the constructors and fail (or go silently wrong) later are refused when built.

Each refusal names the argument and the value received. Every public Keras class is covered:
`SequenceLoss`, `SequenceLossLayer`, `SequenceMask`, `FusedLinearHead`, `TokenPerplexity`,
`TokenAccuracy`, and every function that takes `epsilon`. Values are checked against NumPy float64.
"""

import json

import numpy as np
import pytest
import tensorflow as tf

import tf_seqloss
from tests import reference
from tf_seqloss._keras import IS_KERAS_3, keras

VOCAB, TIME = 5, 4
KERAS_CLASSES = [
    tf_seqloss.SequenceLoss, tf_seqloss.SequenceLossLayer, tf_seqloss.SequenceMask,
    lambda **kwargs: tf_seqloss.FusedLinearHead(VOCAB, **kwargs), tf_seqloss.TokenPerplexity,
    tf_seqloss.TokenAccuracy,
]
CLASS_IDS = ["SequenceLoss", "SequenceLossLayer", "SequenceMask", "FusedLinearHead", "TokenPerplexity",
             "TokenAccuracy"]


def _case(seed=0):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(3, TIME, VOCAB)).astype(np.float32)
    targets = rng.integers(0, VOCAB, size=(3, TIME)).astype(np.int32)
    weights = (rng.random((3, TIME)) > 0.3).astype(np.float32)
    return logits, targets, weights


# ---- epsilon: finite, non-negative, in float32's range, at every entry point

def _epsilon_entry_points():
    logits, targets, weights = _case()
    hidden = logits[..., :3]
    kernel = np.ones([3, VOCAB], np.float32)
    return {
        "sequence_loss": lambda eps: tf_seqloss.sequence_loss(logits, targets, weights, epsilon=eps),
        "SequenceLoss": lambda eps: tf_seqloss.SequenceLoss(epsilon=eps),
        "SequenceLossLayer": lambda eps: tf_seqloss.SequenceLossLayer(epsilon=eps),
        "linear_sequence_loss": lambda eps: tf_seqloss.linear_sequence_loss(hidden, kernel, targets, epsilon=eps),
        "sampled_sequence_loss": lambda eps: tf_seqloss.sampled_sequence_loss(
            hidden, kernel, targets, num_sampled=2, epsilon=eps),
        "FusedLinearHead": lambda eps: tf_seqloss.FusedLinearHead(VOCAB, epsilon=eps),
    }


@pytest.mark.parametrize("entry", list(_epsilon_entry_points()))
@pytest.mark.parametrize("epsilon", [float("inf"), np.inf, float("nan"), -1.0, 1e39, -0.0 - 1e-30, "1e-12"])
def test_epsilon_out_of_range_is_refused_naming_it(entry, epsilon):
    with pytest.raises(ValueError, match=r"argument `epsilon`. Expected None or a non-negative number") as info:
        _epsilon_entry_points()[entry](epsilon)
    assert f"Received: epsilon={epsilon!r}" in str(info.value)


@pytest.mark.parametrize("epsilon", [0.0, 1e-12, np.float32(1e-7), 3e38])
def test_epsilon_in_range_divides_by_normaliser_plus_epsilon(epsilon):
    logits, targets, weights = _case(seed=1)
    loss = tf_seqloss.sequence_loss(tf.constant(logits, tf.float64), targets, weights.astype(np.float64),
                                     average_across_batch=False, epsilon=epsilon)
    np.testing.assert_allclose(loss, reference.sequence_loss(logits, targets, weights, average_across_batch=False,
                                                             epsilon=float(epsilon)), rtol=1e-6)


# ---- dtype: a Keras dtype policy, refused when built in both Kerases

@pytest.mark.parametrize("make", KERAS_CLASSES, ids=CLASS_IDS)
@pytest.mark.parametrize("dtype", ["mixed_foo", "mixed_", "floatt32", ["float32"]])
def test_invalid_dtype_policy_is_refused_when_built(make, dtype):
    with pytest.raises(ValueError, match=r"argument `dtype`") as info:
        make(dtype=dtype)
    assert f"Received: dtype={dtype!r}" in str(info.value)


@pytest.mark.parametrize("make", [tf_seqloss.SequenceLoss, KERAS_CLASSES[3], tf_seqloss.TokenPerplexity,
                                  tf_seqloss.TokenAccuracy],
                         ids=["SequenceLoss", "FusedLinearHead", "TokenPerplexity", "TokenAccuracy"])
@pytest.mark.parametrize("dtype", ["int32", "bool", "string"])
def test_non_floating_dtype_is_refused_where_it_computes(make, dtype):
    with pytest.raises(ValueError, match=r"`dtype`") as info:
        make(dtype=dtype)
    assert f"Received: dtype={dtype!r}" in str(info.value)


@pytest.mark.parametrize("make", KERAS_CLASSES, ids=CLASS_IDS)
def test_valid_dtype_policies_are_accepted(make):
    policy = keras.DTypePolicy("float64") if IS_KERAS_3 else keras.mixed_precision.Policy("float64")
    for dtype in ("float32", "float64", tf.float64, "mixed_float16", "mixed_bfloat16", policy, None):
        make(dtype=dtype)


def test_fused_head_under_a_policy_still_computes_the_loss():
    head = tf_seqloss.FusedLinearHead(VOCAB, dtype="float64", use_bias=False)
    logits, targets, weights = _case(seed=2)
    hidden = logits[..., :3].astype(np.float64)
    head(hidden, targets, weights)
    kernel = head.kernel.numpy()
    assert kernel.dtype == np.float64
    np.testing.assert_allclose(float(head.losses[-1]), reference.sequence_loss(hidden @ kernel, targets, weights),
                               rtol=1e-10)


# ---- the metrics' running sums: float32 or float64, never integer or half precision

@pytest.mark.parametrize("cls", [tf_seqloss.TokenPerplexity, tf_seqloss.TokenAccuracy])
@pytest.mark.parametrize("dtype", ["int32", "int64", "uint8", "float16", "bfloat16", "bool"])
def test_metric_refuses_sums_that_truncate_or_stop_counting(cls, dtype):
    with pytest.raises(ValueError, match=r"argument `dtype` of `Token") as info:
        cls(dtype=dtype)
    assert f"Received: dtype={dtype!r}" in str(info.value)


def test_metric_under_a_mixed_policy_sums_in_float32_past_2048_tokens():
    # 3000 tokens in 25 batches, uniform logits over 5 classes: float16 sums round away part of each batch.
    rng = np.random.default_rng(4)
    perplexity = tf_seqloss.TokenPerplexity(dtype="mixed_float16")
    accuracy = tf_seqloss.TokenAccuracy(dtype="mixed_bfloat16")
    for _ in range(25):
        targets = rng.integers(0, 5, size=(2, 60)).astype(np.int32)
        perplexity.update_state(targets, np.zeros([2, 60, 5], np.float16), sample_weight=np.ones([2, 60]))
        accuracy.update_state(targets, np.eye(5, dtype=np.float16)[targets], sample_weight=np.ones([2, 60]))
    assert perplexity.total.dtype == tf.float32 and accuracy.total.dtype == tf.float32
    assert float(perplexity.count) == 3000.0 and float(accuracy.count) == 3000.0
    np.testing.assert_allclose(float(perplexity.result()), 5.0, rtol=1e-5)
    assert float(accuracy.result()) == 1.0


def test_metric_in_float64_matches_numpy_to_float64_precision():
    logits, targets, weights = _case(seed=3)
    perplexity = tf_seqloss.TokenPerplexity(dtype="float64")
    perplexity.update_state(targets, logits.astype(np.float64), sample_weight=weights)
    expected = np.exp(reference.sequence_loss(logits, targets, weights))
    np.testing.assert_allclose(float(perplexity.result()), expected, rtol=1e-12)


def test_metric_with_a_half_precision_floatx_sums_in_float32():
    floatx = keras.backend.floatx()
    keras.backend.set_floatx("float16")
    try:
        metric = tf_seqloss.TokenAccuracy()
    finally:
        keras.backend.set_floatx(floatx)
    assert metric.dtype == "float32"


# ---- SequenceMask: maxlen and output_dtype

@pytest.mark.parametrize("maxlen", [10**12, 2**31, -1, 2.5, True, "4"])
def test_sequence_mask_refuses_maxlen_it_could_not_build(maxlen):
    with pytest.raises(ValueError, match=r"argument `maxlen`") as info:
        tf_seqloss.SequenceMask(maxlen=maxlen)
    assert f"Received: maxlen={maxlen!r}" in str(info.value) and "2147483647" in str(info.value)


def test_sequence_mask_takes_numpy_ints_and_saves_them_as_python_ints():
    layer = tf_seqloss.SequenceMask(maxlen=np.int64(4))
    assert layer.maxlen == 4 and type(layer.maxlen) is int
    assert json.loads(json.dumps(layer.get_config()))["maxlen"] == 4
    np.testing.assert_array_equal(layer(np.array([1, 3])).numpy(), [[1, 0, 0, 0], [1, 1, 1, 0]])
    assert tf_seqloss.SequenceMask(maxlen=2**31 - 1).maxlen == 2**31 - 1   # The bound itself is accepted.


@pytest.mark.parametrize("output_dtype", ["string", "complex64", "qint8", "resource", "variant", "words"])
def test_sequence_mask_refuses_output_dtypes_a_mask_cannot_take(output_dtype):
    with pytest.raises(ValueError, match=r"argument `output_dtype`") as info:
        tf_seqloss.SequenceMask(output_dtype=output_dtype)
    assert f"Received: output_dtype={output_dtype!r}" in str(info.value)


@pytest.mark.parametrize("output_dtype", ["bool", "float16", "float64", "int32", "uint8", tf.int64])
def test_sequence_mask_builds_every_numeric_output_dtype(output_dtype):
    mask = tf_seqloss.SequenceMask(maxlen=3, output_dtype=output_dtype)(np.array([0, 2]))
    assert mask.dtype == tf.as_dtype(output_dtype)
    np.testing.assert_array_equal(np.asarray(mask).astype(int), [[0, 0, 0], [1, 1, 0]])


# ---- FusedLinearHead: use_bias

@pytest.mark.parametrize("use_bias", ["False", 0, None])
def test_fused_head_refuses_a_use_bias_that_is_not_a_bool(use_bias):
    with pytest.raises(TypeError, match=r"`use_bias`") as info:
        tf_seqloss.FusedLinearHead(VOCAB, use_bias=use_bias)
    assert f"Received: use_bias={use_bias!r}" in str(info.value)


def test_fused_head_takes_a_numpy_bool():
    assert tf_seqloss.FusedLinearHead(VOCAB, use_bias=np.bool_(False)).use_bias is False


# ---- softmax_loss_function and name: checked when built, not at the first call

def _no_keywords(x, y):
    return x


@pytest.mark.parametrize("make", [tf_seqloss.SequenceLoss, tf_seqloss.SequenceLossLayer],
                         ids=["SequenceLoss", "SequenceLossLayer"])
@pytest.mark.parametrize("fn", [_no_keywords, tf.nn.sampled_softmax_loss])
def test_softmax_loss_function_that_cannot_take_labels_and_logits_is_refused_when_built(make, fn):
    with pytest.raises(TypeError, match=r"`softmax_loss_function` is called as .*labels=.*logits=") as info:
        make(softmax_loss_function=fn)
    assert repr(fn) in str(info.value)


def test_softmax_loss_function_with_the_keywords_is_still_used():
    logits, targets, weights = _case(seed=5)
    def xent(labels, logits):
        return tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits)
    loss = tf_seqloss.SequenceLoss(softmax_loss_function=xent)
    np.testing.assert_allclose(float(loss(targets, logits, weights)), reference.sequence_loss(logits, targets, weights),
                               rtol=1e-5)


@pytest.mark.parametrize("make", [tf_seqloss.SequenceLoss, tf_seqloss.TokenPerplexity, tf_seqloss.TokenAccuracy],
                         ids=["SequenceLoss", "TokenPerplexity", "TokenAccuracy"])
@pytest.mark.parametrize("name", [5, b"loss"])
def test_a_name_that_is_not_a_string_is_refused_when_built(make, name):
    with pytest.raises(TypeError, match=r"argument `name`") as info:
        make(name=name)
    assert f"Received: name={name!r}" in str(info.value)
