"""Every loss entry point x every option: accepted and equal to NumPy float64, or refused with its error.

The entry points are `sequence_loss`, `SequenceLoss`, `SequenceLossLayer`, `linear_sequence_loss`,
`FusedLinearHead` and `sampled_sequence_loss`; the fused ones are compared on the materialised logits
`hidden @ kernel + bias`, the sampled one with its own float64 reference (`tests/test_sampled_loss.py`,
same candidates). The reference here is written from the documentation: the token cross-entropy of
`tests/reference.py`, plus the z-loss, the padding id, Keras' clipped probabilities, then the flags'
reduction, a normaliser or an epsilon. `compat.tfa` keeps TFA's semantics and is not part of the matrix.
"""

from __future__ import annotations

import functools
import re

import numpy as np
import pytest
import tensorflow as tf

import tf_seqloss
from tests import reference
from tests import test_sampled_loss as sampled_reference
from tests.conftest import LEGAL_FLAGS
from tf_seqloss._keras import keras

BATCH, TIME, FEATURES, CLASSES = 2, 4, 3, 5
SCALAR = dict(average_across_timesteps=True, average_across_batch=True, sum_over_timesteps=False,
              sum_over_batch=False)
SUM_FLAGS = dict(average_across_timesteps=False, average_across_batch=False, sum_over_timesteps=True,
                 sum_over_batch=True)
TFA_CLASS_DEFAULT = dict(sum_over_timesteps=True, sum_over_batch=True)  # averaging flags left unset
PROBABILITY_EPSILON = 1e-7  # Keras' `backend.epsilon()`, the clipping bound of `from_logits=False`

ENTRY_POINTS = ("sequence_loss", "SequenceLoss", "SequenceLossLayer", "linear_sequence_loss", "FusedLinearHead",
                "sampled_sequence_loss")
LOGITS_FACES = ENTRY_POINTS[:3]
HEADS = ("linear_sequence_loss", "FusedLinearHead")


def _custom_loss(labels, logits):
    return tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits)


@functools.lru_cache(maxsize=None)
def _sampled_candidates():
    """The sampled loss's candidates, drawn once so that the loss and its reference see the same ones."""
    x = sampled_reference._inputs()
    return tuple(c.numpy() for c in sampled_reference._candidates(x["targets"]))


def _inputs():
    rng = np.random.default_rng(19)
    hidden = rng.normal(size=(BATCH, TIME, FEATURES)).astype(np.float32)
    kernel = rng.normal(size=(FEATURES, CLASSES)).astype(np.float32)
    bias = rng.normal(size=(CLASSES,)).astype(np.float32)
    targets = rng.integers(0, CLASSES, size=(BATCH, TIME)).astype(np.int32)
    targets[0, 1] = 0  # `padding_id=0` has something to mask
    weights = rng.uniform(0.5, 2.0, size=(BATCH, TIME)).astype(np.float32)
    weights[1, 3] = 0.0  # a zero weight: the `sum_over_*` flags count it out
    return hidden, kernel, bias, targets, weights


def _logits(hidden, kernel, bias):
    return hidden.astype(np.float64) @ kernel.astype(np.float64) + bias.astype(np.float64)


def _softmax(logits):
    return np.exp(reference.log_softmax(logits))


def resolve_flags(options):
    """Returns the four flags `options` give, an unset averaging flag resolved as the Keras objects do."""
    summing = bool(options.get("sum_over_timesteps") or options.get("sum_over_batch"))
    flags = {**SCALAR, "average_across_timesteps": not summing, "average_across_batch": not summing}
    return {flag: options.get(flag, default) for flag, default in flags.items()}


def numpy_reduce(weighted, weights, *, normalizer=None, epsilon=None, **flags):
    """Reduces `[batch, time]` float64 weighted token losses as the documentation says."""
    flags = resolve_flags(flags)
    averaging = flags["average_across_timesteps"] or flags["average_across_batch"]
    axes = tuple(axis for axis, on in ((0, flags["average_across_batch"] or flags["sum_over_batch"]),
                                       (1, flags["average_across_timesteps"] or flags["sum_over_timesteps"])) if on)
    if not axes:
        return weighted
    total = weighted.sum(axis=axes)
    if isinstance(normalizer, float):  # a count is divided by as given; "global" is this call's own count here
        return total / normalizer
    count = weights.sum(axis=axes) if averaging else (weights != 0).sum(axis=axes).astype(np.float64)
    if epsilon is not None:
        return total / (count + epsilon)
    return np.where(count == 0, 0.0, total / np.where(count == 0, 1.0, count))


def numpy_loss(logits, targets, weights, *, label_smoothing=0.0, z_loss=0.0, padding_id=None, from_logits=True,
               logit_soft_cap=None, **reduction):
    """The documented loss in float64; with `from_logits=False`, `logits` are probabilities."""
    logits = np.asarray(logits, np.float64)
    if not from_logits:
        logits = np.log(np.clip(logits, PROBABILITY_EPSILON, 1 - PROBABILITY_EPSILON))
    if logit_soft_cap is not None:
        logits = logit_soft_cap * np.tanh(logits / logit_soft_cap)
    weights = np.asarray(weights, np.float64)
    if padding_id is not None:
        weights = weights * (targets != padding_id)
    ce = reference.token_cross_entropy(logits, targets, label_smoothing)
    if z_loss:
        top = logits.max(axis=-1)
        ce = ce + z_loss * (top + np.log(np.exp(logits - top[..., None]).sum(axis=-1))) ** 2
    return numpy_reduce(ce * weights, weights, **reduction)


def run(entry, options):
    """Returns the loss `entry` computes with `options`, as NumPy; raises what it raises."""
    hidden, kernel, bias, targets, weights = _inputs()
    logits = _logits(hidden, kernel, bias).astype(np.float32)
    if options.get("from_logits") is False:
        logits = _softmax(logits).astype(np.float32)
    if entry == "sequence_loss":
        return tf_seqloss.sequence_loss(logits, targets, weights, **options).numpy()
    if entry == "SequenceLoss":  # `reduction="none"`: what the flags leave, as the function returns it
        return tf_seqloss.SequenceLoss(reduction="none", **options)(targets, logits, sample_weight=weights).numpy()
    if entry == "SequenceLossLayer":
        layer = tf_seqloss.SequenceLossLayer(**options)
        layer(tf.constant(logits), tf.constant(targets), weights=tf.constant(weights))
        return layer.losses[0].numpy()
    if entry == "linear_sequence_loss":
        return tf_seqloss.linear_sequence_loss(hidden, kernel, targets, weights, bias=bias, **options).numpy()
    if entry == "FusedLinearHead":
        head = tf_seqloss.FusedLinearHead(CLASSES, **options)
        head.build(hidden.shape)
        head.set_weights([kernel, bias])
        head(tf.constant(hidden), tf.constant(targets), weights=tf.constant(weights))
        return head.losses[0].numpy()
    assert entry == "sampled_sequence_loss"
    x = sampled_reference._inputs()
    return tf_seqloss.sampled_sequence_loss(
        x["hidden"], x["kernel"], x["targets"], x["weights"], bias=x["bias"], num_sampled=sampled_reference.SAMPLED,
        sampled_values=_sampled_candidates(), **options).numpy()


def expected(entry, options):
    """The float64 reference of `run(entry, options)`; the layers add the mean of a non-scalar loss."""
    if entry == "sampled_sequence_loss":
        x = sampled_reference._inputs()
        weights = x["weights"].astype(np.float64)
        if options.pop("padding_id", None) == 0:
            weights = weights * (x["targets"] != 0)
        unreduced = {flag: False for flag in SCALAR}  # its own reference's token losses, reduced here
        weighted = sampled_reference._numpy_loss(x, _sampled_candidates(), weights, **unreduced)
        return numpy_reduce(weighted, weights, **options)
    hidden, kernel, bias, targets, weights = _inputs()
    logits = _logits(hidden, kernel, bias)
    if options.get("from_logits") is False:
        logits = _softmax(logits.astype(np.float32).astype(np.float64))
    value = numpy_loss(logits, targets, weights, **options)
    return np.mean(value) if entry in ("SequenceLossLayer", "FusedLinearHead") else value


# (option values, entry points that refuse them, the error they raise, a pattern of its message)
CASES = {
    **{"flags-" + ("-".join(k for k, v in flags.items() if v) or "none"): (flags, {}) for flags in LEGAL_FLAGS},
    # The Keras objects resolve unset averaging flags (TFA's class default); the functions keep contrib's
    # signature, whose averaging flags default to True, and refuse the mix as contrib did.
    "flags-tfa-class-default": (TFA_CLASS_DEFAULT, {
        entry: (ValueError, "cannot both be True") for entry in ("sequence_loss", "linear_sequence_loss",
                                                                 "sampled_sequence_loss")}),
    "label_smoothing": (dict(label_smoothing=0.1), {
        "sampled_sequence_loss": (ValueError, r"`label_smoothing` of `sampled_sequence_loss`.*sampled softmax")}),
    "z_loss": (dict(z_loss=0.01), {
        "sampled_sequence_loss": (ValueError, r"`z_loss` of `sampled_sequence_loss`.*log-sum-exp")}),
    "z_loss-sum-flags": (dict(z_loss=0.01, sum_over_timesteps=True, sum_over_batch=False,
                              average_across_timesteps=False, average_across_batch=False), {
        "sampled_sequence_loss": (ValueError, r"`z_loss` of `sampled_sequence_loss`")}),
    # Caps well inside the logits' range (about +-4 here), so that the cap changes every loss.
    "logit_soft_cap": (dict(logit_soft_cap=1.5), {
        "sampled_sequence_loss": (ValueError, r"`logit_soft_cap` of `sampled_sequence_loss`.*sampling probabilities")}),
    "logit_soft_cap-label_smoothing-z_loss": (dict(logit_soft_cap=2.0, label_smoothing=0.1, z_loss=0.01), {
        "sampled_sequence_loss": (ValueError, r"`logit_soft_cap` of `sampled_sequence_loss`")}),
    "logit_soft_cap-sum-flags": (dict(logit_soft_cap=1.5, **SUM_FLAGS), {
        "sampled_sequence_loss": (ValueError, r"`logit_soft_cap` of `sampled_sequence_loss`")}),
    "normalizer-number": (dict(normalizer=7.0), {}),
    "normalizer-number-sum-flags": (dict(normalizer=7.0, **SUM_FLAGS), {}),
    "normalizer-global": (dict(normalizer="global"), {}),  # without a strategy: this call's own count
    "normalizer-per-sequence": (dict(normalizer=7.0, average_across_batch=False), {
        entry: (ValueError, "`normalizer` applies to the scalar modes only") for entry in ENTRY_POINTS}),
    "padding_id": (dict(padding_id=0), {}),
    "epsilon": (dict(epsilon=1e-3), {}),
    "epsilon-sum-flags": (dict(epsilon=1e-3, **SUM_FLAGS), {}),
    # Probabilities have a meaning only where the caller hands over predictions; the heads compute logits.
    "from_logits-false": (dict(from_logits=False), {
        **{entry: (TypeError, "unexpected keyword argument 'from_logits'") for entry in
           ("linear_sequence_loss", "sampled_sequence_loss")},
        "FusedLinearHead": (ValueError, "`from_logits` of `FusedLinearHead`. Expected no such argument: the "
                                        "head computes the logits itself")}),
    "from_logits-false-label_smoothing": (dict(from_logits=False, label_smoothing=0.2), {
        entry: ((TypeError, ValueError), "from_logits") for entry in ENTRY_POINTS[3:]}),
    "from_logits-false-z_loss": (dict(from_logits=False, z_loss=0.01), {
        **{entry: (ValueError, "`z_loss` cannot be combined with `from_logits=False`") for entry in LOGITS_FACES},
        **{entry: ((TypeError, ValueError), "from_logits") for entry in ENTRY_POINTS[3:]}}),
    "from_logits-false-logit_soft_cap": (dict(from_logits=False, logit_soft_cap=2.0), {
        **{entry: (ValueError, "Invalid combination of arguments: `logit_soft_cap` cannot be combined with "
                               "`from_logits=False`") for entry in LOGITS_FACES},
        **{entry: ((TypeError, ValueError), "from_logits") for entry in ENTRY_POINTS[3:]}}),
    "implementation": (dict(implementation="fused"), {
        **{entry: (TypeError, "unexpected keyword argument 'implementation'") for entry in
           ("linear_sequence_loss", "sampled_sequence_loss")},
        "FusedLinearHead": (ValueError, "`implementation` of `FusedLinearHead`. Expected no such")}),
    "softmax_loss_function": (dict(softmax_loss_function=_custom_loss), {
        **{entry: (TypeError, "unexpected keyword argument 'softmax_loss_function'") for entry in
           ("linear_sequence_loss", "sampled_sequence_loss")},
        "FusedLinearHead": (ValueError, "`softmax_loss_function` of `FusedLinearHead`. Expected no such")}),
    "softmax_loss_function-logit_soft_cap": (dict(softmax_loss_function=_custom_loss, logit_soft_cap=2.0), {
        **{entry: (ValueError, "`logit_soft_cap=2.0` cannot be combined with `softmax_loss_function`")
           for entry in LOGITS_FACES},
        **{entry: ((TypeError, ValueError), "softmax_loss_function") for entry in ENTRY_POINTS[3:]}}),
    "softmax_loss_function-z_loss": (dict(softmax_loss_function=_custom_loss, z_loss=0.01), {
        **{entry: (ValueError, "`z_loss=0.01` cannot be combined with `softmax_loss_function`")
           for entry in LOGITS_FACES},
        **{entry: ((TypeError, ValueError), "softmax_loss_function") for entry in ENTRY_POINTS[3:]}}),
}


@pytest.mark.parametrize("entry", ENTRY_POINTS)
@pytest.mark.parametrize("case", list(CASES))
def test_each_option_is_accepted_and_exact_or_refused_with_its_error(entry, case):
    options, refusals = CASES[case]
    if entry in refusals:
        error, pattern = refusals[entry]
        with pytest.raises(error, match=pattern):
            run(entry, dict(options))
        return
    np.testing.assert_allclose(run(entry, dict(options)), expected(entry, dict(options)), rtol=2e-5, atol=1e-6)


# Every option of each Keras object set away from its default, for the config round trip.
KERAS_OPTIONS = dict(average_across_timesteps=False, average_across_batch=False, sum_over_timesteps=True,
                     sum_over_batch=True, padding_id=-1, label_smoothing=0.1, z_loss=0.01, logit_soft_cap=30.0,
                     epsilon=1e-6,
                     normalizer="global", reduction="sum")
KERAS_OBJECTS = {
    "SequenceLoss": lambda: tf_seqloss.SequenceLoss(implementation="reference", **KERAS_OPTIONS),
    "SequenceLossLayer": lambda: tf_seqloss.SequenceLossLayer(implementation="reference", **KERAS_OPTIONS),
    "FusedLinearHead": lambda: tf_seqloss.FusedLinearHead(CLASSES, chunk_size=2, **KERAS_OPTIONS),
}


@pytest.mark.parametrize("name", list(KERAS_OBJECTS))
def test_keras_objects_round_trip_every_option_through_their_config(name):
    original = KERAS_OBJECTS[name]()
    config = original.get_config()
    for option, value in KERAS_OPTIONS.items():
        assert config[option] == value, option
        assert getattr(original, option) == value, option
    restored = type(original).from_config(config)
    assert restored.get_config() == config
    for option in KERAS_OPTIONS:
        assert getattr(restored, option) == getattr(original, option), option


@pytest.mark.parametrize("name", list(KERAS_OBJECTS))
def test_option_attributes_are_read_only(name):
    # An assignment that `call` would never read must fail rather than do nothing.
    obj = KERAS_OBJECTS[name]()
    for option in ("label_smoothing", "padding_id", "average_across_batch", "normalizer"):
        with pytest.raises(AttributeError):
            setattr(obj, option, 0.25)


def test_the_layers_accept_the_same_reductions():
    # Both hand their loss to `add_loss`, which needs a scalar: the same set, the same refusal.
    scalar = ["sum_over_batch_size", "sum"] + (["mean", "mean_with_sample_weight"] if keras.__version__ >= "3"
                                               else ["auto"])
    for reduction in scalar:
        tf_seqloss.SequenceLossLayer(reduction=reduction)
        tf_seqloss.FusedLinearHead(CLASSES, reduction=reduction)
    for reduction in (None, "none", "max"):
        for make in (lambda r: tf_seqloss.SequenceLossLayer(reduction=r),
                     lambda r: tf_seqloss.FusedLinearHead(CLASSES, reduction=r)):
            with pytest.raises(ValueError, match=r"Invalid value for argument `reduction` of `\w+`. Expected one"):
                make(reduction)


BAD_VALUES = [  # (option, value)
    ("average_across_batch", 1), ("sum_over_timesteps", "yes"), ("label_smoothing", 1.5), ("label_smoothing", "0.1"),
    ("z_loss", -1.0), ("z_loss", "0.1"), ("normalizer", 0), ("normalizer", "local"), ("epsilon", -1.0),
    ("padding_id", 0.5), ("logit_soft_cap", 0.0), ("logit_soft_cap", -1.0), ("logit_soft_cap", float("inf")),
    ("logit_soft_cap", float("nan")), ("logit_soft_cap", "30"), ("logit_soft_cap", True),
]


@pytest.mark.parametrize("entry", ENTRY_POINTS)
@pytest.mark.parametrize("option, value", BAD_VALUES, ids=[f"{o}={v!r}" for o, v in BAD_VALUES])
def test_a_bad_option_value_gets_the_one_error_vocabulary_on_every_entry_point(entry, option, value):
    """Whatever the entry point, a bad value is refused in Keras' words, naming the argument and the value."""
    received = re.escape(f"{option}={value!r}")
    pattern = rf"^Invalid value for argument `{option}`( of `\w+`)?\. Expected .*Received: {received}"
    with pytest.raises((TypeError, ValueError), match=pattern):
        run(entry, {option: value})
