"""`sampled_sequence_loss` against NumPy float64 with the same sampled candidates, and its padding rules."""

import numpy as np
import pytest
import tensorflow as tf

import tf_seqloss
from tests.conftest import LEGAL_FLAGS

BATCH, TIME, FEATURES, CLASSES, SAMPLED = 3, 5, 4, 40, 6


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    return dict(
        hidden=rng.normal(size=(BATCH, TIME, FEATURES)).astype(np.float32),
        kernel=rng.normal(size=(FEATURES, CLASSES)).astype(np.float32),
        bias=rng.normal(size=(CLASSES,)).astype(np.float32),
        targets=rng.integers(0, 10, size=(BATCH, TIME)).astype(np.int64),  # frequent ids: accidental hits
        weights=rng.uniform(0.5, 2.0, size=(BATCH, TIME)).astype(np.float32),
        lengths=np.array([5, 2, 0], np.int32))


def _candidates(targets):
    sampled, true_expected, sampled_expected = tf.random.log_uniform_candidate_sampler(
        true_classes=tf.reshape(tf.constant(targets), [-1, 1]), num_true=1, num_sampled=SAMPLED, unique=True,
        range_max=CLASSES, seed=7)
    return sampled, true_expected, sampled_expected


def _numpy_loss(x, candidates, weights, remove_accidental_hits=True, **flags):
    sampled, true_expected, sampled_expected = (np.asarray(c, np.float64) for c in candidates)
    sampled = sampled.astype(np.int64)
    hidden = x["hidden"].astype(np.float64).reshape(-1, FEATURES)
    kernel, bias = x["kernel"].astype(np.float64), x["bias"].astype(np.float64)
    labels = x["targets"].reshape(-1)
    true_logit = np.einsum("nf,fn->n", hidden, kernel[:, labels]) + bias[labels] - np.log(true_expected[:, 0])
    sampled_logits = hidden @ kernel[:, sampled] + bias[sampled] - np.log(sampled_expected)
    if remove_accidental_hits:
        sampled_logits[labels[:, None] == sampled[None, :]] = -np.inf
    all_logits = np.concatenate([true_logit[:, None], sampled_logits], axis=1)
    top = all_logits.max(axis=1, keepdims=True)
    ce = (np.log(np.exp(all_logits - top).sum(axis=1)) + top[:, 0] - true_logit).reshape(BATCH, TIME)
    weighted = np.where(weights != 0, ce, 0.0) * weights
    axes = tuple(a for a, on in ((0, flags["average_across_batch"] or flags["sum_over_batch"]),
                                 (1, flags["average_across_timesteps"] or flags["sum_over_timesteps"])) if on)
    if not axes:
        return weighted
    norm = weights.sum(axis=axes) if flags["average_across_batch"] or flags["average_across_timesteps"] else \
        (weights != 0).sum(axis=axes)
    return np.where(norm == 0, 0.0, weighted.sum(axis=axes) / np.where(norm == 0, 1.0, norm))


@pytest.mark.parametrize("flags", LEGAL_FLAGS, ids=lambda f: "-".join(k for k, v in f.items() if v) or "none")
def test_equals_numpy_float64_with_the_same_candidates(flags):
    x = _inputs()
    hidden = x["hidden"].copy()
    hidden[1, 2:] = np.nan  # padding: inert
    candidates = _candidates(x["targets"])
    loss = tf_seqloss.sampled_sequence_loss(
        hidden, x["kernel"], x["targets"], x["weights"], bias=x["bias"], lengths=x["lengths"],
        num_sampled=SAMPLED, sampled_values=candidates, **flags)
    weights = x["weights"].astype(np.float64) * (np.arange(TIME)[None, :] < x["lengths"][:, None])
    np.testing.assert_allclose(loss.numpy(), _numpy_loss(x, candidates, weights, **flags), rtol=1e-5, atol=1e-6)


def test_gradients_are_finite_and_zero_at_padding_in_a_function_with_none_sizes():
    x = _inputs(1)
    hidden = x["hidden"].copy()
    hidden[1, 2:] = np.inf

    @tf.function(input_signature=[tf.TensorSpec([None, None, FEATURES]), tf.TensorSpec([FEATURES, CLASSES]),
                                  tf.TensorSpec([None, None], tf.int64), tf.TensorSpec([None], tf.int32)])
    def step(hidden, kernel, targets, lengths):
        with tf.GradientTape() as tape:
            tape.watch([hidden, kernel])
            loss = tf_seqloss.sampled_sequence_loss(hidden, kernel, targets, lengths=lengths, num_sampled=SAMPLED,
                                                    padding_id=9, seed=3)
        return loss, tape.gradient(loss, [hidden, kernel])

    loss, (d_hidden, d_kernel) = step(hidden, x["kernel"], x["targets"], x["lengths"])
    assert np.isfinite(float(loss)) and np.isfinite(tf.convert_to_tensor(d_kernel).numpy()).all()
    d_hidden = d_hidden.numpy()
    assert np.all(d_hidden[1, 2:] == 0) and np.all(d_hidden[2] == 0)
    assert np.all(d_hidden[x["targets"] == 9] == 0)
    assert np.any(d_hidden[0] != 0)


def test_out_of_range_id_is_nan_where_weighted_and_ignored_where_padded():
    x = _inputs(2)
    targets = x["targets"].copy()
    targets[1, 4] = CLASSES + 3  # past length 2: padding
    candidates = _candidates(np.minimum(targets, CLASSES - 1))
    kwargs = dict(bias=x["bias"], lengths=x["lengths"], num_sampled=SAMPLED, sampled_values=candidates)
    assert np.isfinite(float(tf_seqloss.sampled_sequence_loss(x["hidden"], x["kernel"], targets, **kwargs)))
    targets[0, 1] = -2
    assert np.isnan(float(tf_seqloss.sampled_sequence_loss(x["hidden"], x["kernel"], targets, **kwargs)))


def test_sampling_every_class_without_correction_is_close_to_the_full_loss():
    # With all classes sampled (unique) and no accidental hits removed the sampled loss is a softmax over
    # the target plus every class, each shifted by log(expected count): close to, not equal to, the full loss.
    x = _inputs(3)
    loss = tf_seqloss.sampled_sequence_loss(x["hidden"], x["kernel"], x["targets"], bias=x["bias"],
                                            num_sampled=CLASSES, seed=1)
    full = tf_seqloss.linear_sequence_loss(x["hidden"], x["kernel"], x["targets"], bias=x["bias"])
    assert abs(float(loss) - float(full)) < 0.5 * float(full)


def test_errors_name_the_argument():
    x = _inputs()
    with pytest.raises(ValueError, match="Invalid value for argument `num_sampled`. Expected a positive int"):
        tf_seqloss.sampled_sequence_loss(x["hidden"], x["kernel"], x["targets"], num_sampled=0)
    with pytest.raises(TypeError, match="num_sampled"):
        tf_seqloss.sampled_sequence_loss(x["hidden"], x["kernel"], x["targets"])
    with pytest.raises(ValueError, match="`hidden` and `kernel` must agree in the features"):
        tf_seqloss.sampled_sequence_loss(x["hidden"], x["kernel"][1:], x["targets"], num_sampled=2)


def test_under_xla_takes_candidates_drawn_outside_and_refuses_what_has_no_xla_kernel():
    x = _inputs()
    candidates = _candidates(x["targets"])
    kwargs = dict(bias=x["bias"], lengths=x["lengths"], num_sampled=SAMPLED)

    @tf.function(jit_compile=True)
    def compiled(hidden, kernel, sampled, true_expected, sampled_expected):
        return tf_seqloss.sampled_sequence_loss(hidden, kernel, x["targets"], x["weights"], **kwargs,
                                                sampled_values=(sampled, true_expected, sampled_expected),
                                                remove_accidental_hits=False)

    flags = dict(average_across_timesteps=True, average_across_batch=True, sum_over_timesteps=False,
                 sum_over_batch=False)
    weights = x["weights"].astype(np.float64) * (np.arange(TIME)[None, :] < x["lengths"][:, None])
    expected = _numpy_loss(x, candidates, weights, remove_accidental_hits=False, **flags)
    np.testing.assert_allclose(float(compiled(x["hidden"], x["kernel"], *candidates)), expected, rtol=1e-5)
    assert not np.isclose(expected, _numpy_loss(x, candidates, weights, **flags))  # the ids do collide

    for options in (dict(remove_accidental_hits=False), dict(sampled_values=candidates)):
        @tf.function(jit_compile=True)
        def refused(hidden, kernel, options=options):
            return tf_seqloss.sampled_sequence_loss(hidden, kernel, x["targets"], **kwargs, **options)

        with pytest.raises(ValueError, match="Under `jit_compile=True`.*sampled_values.*remove_accidental_hits"):
            refused(x["hidden"], x["kernel"])
