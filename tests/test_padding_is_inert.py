"""Padding is inert: with padded positions holding anything at all, loss and gradients equal those computed
with the padded positions physically removed (the optax way of testing masks).

Every implementation, eagerly, in a `tf.function` with `None` sizes and under XLA, through every route that
marks padding: `weights`, `lengths`, `padding_id`, ragged inputs, and `SequenceLoss`'s `sample_weight` and
Keras mask. The padded logits hold `inf`, `-inf`, `NaN` and huge values, the padded targets invalid ids or
`NaN` probabilities.
"""

import numpy as np
import pytest
import tensorflow as tf

import tf_seqloss
from tests import reference
from tests.conftest import LEGAL_FLAGS

BATCH, TIME, CLASSES = 3, 5, 7
LENGTHS = np.array([5, 2, 0])  # a full row, a short row and an empty row
POISONS = {"nan": np.nan, "inf": np.inf, "-inf": -np.inf, "huge": 3e38}


def _clean_inputs(seed=0, dense=False):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(BATCH, TIME, CLASSES)) * 2.0
    if dense:
        targets = rng.dirichlet(np.ones(CLASSES), size=(BATCH, TIME))
    else:
        targets = rng.integers(0, CLASSES, size=(BATCH, TIME))
    return logits, targets


def _poisoned(logits, targets, poison, padding_id=None):
    """The same inputs with every padded position overwritten by `poison` (and bad ids or NaN targets)."""
    padded = np.arange(TIME)[None, :] >= LENGTHS[:, None]
    logits = logits.copy()
    logits[padded] = POISONS[poison]
    logits[padded, 0] = 1.0  # mixed rows too: one finite logit among the poison
    targets = targets.copy()
    if targets.ndim == 3:
        targets[padded] = np.nan
    else:
        targets[padded] = CLASSES + 3 if padding_id is None else padding_id
    return logits, targets


def _removed_loss_and_grad(logits, targets, flags):
    """The loss and gradient computed on the real tokens only, by NumPy float64 (no padding anywhere)."""
    rows = [slice(0, n) for n in LENGTHS]
    grad = np.zeros_like(logits)
    if flags == "token_mean":
        # The contrib default: the mean over the real tokens, one packed sequence.
        real_logits = np.concatenate([logits[b, rows[b]] for b in range(BATCH)])[None]
        real_targets = np.concatenate([targets[b, rows[b]] for b in range(BATCH)])[None]
        ones = np.ones(real_targets.shape[:2])
        loss = reference.sequence_loss(real_logits, real_targets, ones)
        packed_grad = reference.sequence_loss_grad(real_logits, real_targets, ones)[0]
        offset = 0
        for b, n in enumerate(LENGTHS):
            grad[b, :n] = packed_grad[offset:offset + n]
            offset += n
        return loss, grad
    # "per_sequence": each row's own token mean, on the row cut to its length (an empty row gives 0).
    loss = np.zeros(BATCH)
    for b, n in enumerate(LENGTHS):
        if n:
            flags_t = dict(average_across_batch=False)
            row_logits, row_targets = logits[b:b + 1, :n], targets[b:b + 1, :n]
            loss[b] = reference.sequence_loss(row_logits, row_targets, np.ones((1, n)), **flags_t)[0]
            grad[b, :n] = reference.sequence_loss_grad(row_logits, row_targets, np.ones((1, n)), **flags_t)[0]
    return loss, grad


FLAGS = {"token_mean": {}, "per_sequence": dict(average_across_batch=False)}


def _route_kwargs(route, targets, padding_id=-1):
    mask = (np.arange(TIME)[None, :] < LENGTHS[:, None]).astype(np.float32)
    if route == "weights":
        return dict(weights=tf.constant(mask))
    if route == "lengths":
        return dict(lengths=tf.constant(LENGTHS, tf.int32))
    if route == "padding_id":
        return dict(padding_id=padding_id)
    raise AssertionError(route)


def _run(fn, mode, logits, targets):
    logits = tf.constant(logits, tf.float32)
    targets = tf.constant(targets)

    def loss_and_grad(logits, targets):
        with tf.GradientTape() as tape:
            tape.watch(logits)
            loss = fn(logits, targets)
            total = tf.reduce_sum(loss)
        return loss, tape.gradient(total, logits)

    if mode == "eager":
        return loss_and_grad(logits, targets)
    signature = [tf.TensorSpec([None, None, None], tf.float32),
                 tf.TensorSpec([None] * targets.shape.rank, targets.dtype)]
    compiled = tf.function(loss_and_grad, input_signature=signature, jit_compile=mode == "xla")
    return compiled(logits, targets)


def _assert_equals_removed(result, logits, targets, flags):
    loss, grad = result
    expected_loss, expected_grad = _removed_loss_and_grad(logits, targets, flags)
    np.testing.assert_allclose(loss.numpy(), expected_loss, rtol=2e-5, atol=2e-6)
    grad = grad.numpy()
    padded = np.arange(TIME)[None, :] >= LENGTHS[:, None]
    assert np.all(grad[padded] == 0.0), "padded positions must get exactly zero gradient"
    np.testing.assert_allclose(grad, expected_grad, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("implementation", tf_seqloss.IMPLEMENTATIONS)
@pytest.mark.parametrize("route", ["weights", "lengths", "padding_id"])
@pytest.mark.parametrize("poison", sorted(POISONS))
@pytest.mark.parametrize("flags", sorted(FLAGS))
def test_sparse_padding_is_inert_eagerly(implementation, route, poison, flags):
    clean_logits, clean_targets = _clean_inputs()
    logits, targets = _poisoned(clean_logits, clean_targets, poison, padding_id=-1 if route == "padding_id" else None)
    kwargs = _route_kwargs(route, targets)
    fn = lambda lg, tg: tf_seqloss.sequence_loss(lg, tg, implementation=implementation, **FLAGS[flags], **kwargs)
    _assert_equals_removed(_run(fn, "eager", logits, targets), clean_logits, clean_targets, flags)


@pytest.mark.parametrize("implementation", tf_seqloss.IMPLEMENTATIONS)
@pytest.mark.parametrize("mode", ["function", "xla"])
@pytest.mark.parametrize("route", ["weights", "lengths", "padding_id"])
def test_sparse_padding_is_inert_in_graphs(implementation, mode, route):
    clean_logits, clean_targets = _clean_inputs(seed=1)
    logits, targets = _poisoned(clean_logits, clean_targets, "nan", padding_id=-1 if route == "padding_id" else None)
    logits[1, 3] = np.inf  # a second poison in the same batch
    kwargs = _route_kwargs(route, targets)
    fn = lambda lg, tg: tf_seqloss.sequence_loss(lg, tg, implementation=implementation, **kwargs)
    _assert_equals_removed(_run(fn, mode, logits, targets), clean_logits, clean_targets, "token_mean")


@pytest.mark.parametrize("mode", ["eager", "function", "xla"])
@pytest.mark.parametrize("route", ["weights", "lengths"])
@pytest.mark.parametrize("poison", ["nan", "-inf"])
def test_probability_targets_padding_is_inert(mode, route, poison):
    clean_logits, clean_targets = _clean_inputs(seed=2, dense=True)
    logits, targets = _poisoned(clean_logits, clean_targets, poison)
    kwargs = _route_kwargs(route, targets)
    fn = lambda lg, tg: tf_seqloss.sequence_loss(lg, tf.cast(tg, tf.float32), **kwargs)
    _assert_equals_removed(_run(fn, mode, logits, targets), clean_logits, clean_targets, "token_mean")


@pytest.mark.parametrize("poison", ["nan", "inf"])
def test_custom_softmax_loss_function_never_sees_padding(poison):
    clean_logits, clean_targets = _clean_inputs(seed=3)
    logits, targets = _poisoned(clean_logits, clean_targets, poison)
    seen = []

    def xent(labels, logits):
        seen.append((labels, logits))
        return tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits)

    fn = lambda lg, tg: tf_seqloss.sequence_loss(lg, tg, lengths=LENGTHS, softmax_loss_function=xent)
    _assert_equals_removed(_run(fn, "eager", logits, targets), clean_logits, clean_targets, "token_mean")
    labels, flat_logits = seen[0]
    assert np.all(np.isfinite(flat_logits.numpy())) and np.all(labels.numpy() < CLASSES)


@pytest.mark.parametrize("mode", ["eager", "function"])
def test_ragged_inputs_equal_padded_positions_removed(mode):
    clean_logits, clean_targets = _clean_inputs(seed=4)

    def fn(logits, targets):
        ragged_logits = tf.RaggedTensor.from_tensor(logits, lengths=LENGTHS)
        ragged_targets = tf.RaggedTensor.from_tensor(targets, lengths=LENGTHS)
        return tf_seqloss.sequence_loss(ragged_logits, ragged_targets)

    logits, targets = _poisoned(clean_logits, clean_targets, "nan")
    _assert_equals_removed(_run(fn, mode, logits, targets), clean_logits, clean_targets, "token_mean")


@pytest.mark.parametrize("implementation", tf_seqloss.IMPLEMENTATIONS)
@pytest.mark.parametrize("flags", range(len(LEGAL_FLAGS)))
def test_gradient_with_respect_to_weights_counts_a_padded_tokens_loss_as_zero(implementation, flags):
    # A padded token's loss is 0, so at a zero weight d loss / d w is `-loss / sum(w)` under the averaging
    # flags (contrib: `(ce - loss) / sum(w)`); at a non-zero weight it is contrib's `(ce - loss) / sum(w)`.
    flags = LEGAL_FLAGS[flags]
    logits, targets = _clean_inputs(seed=3)
    rng = np.random.default_rng(3)
    weights = rng.uniform(0.5, 2.0, size=(BATCH, TIME)) * (rng.uniform(size=(BATCH, TIME)) > 0.3)
    weights[2] = 0.0  # an all-padding row: its slice's loss and gradient are 0
    zero = weights == 0
    assert zero.any() and (~zero).any()
    variable = tf.Variable(weights)
    with tf.GradientTape() as tape:
        loss = tf_seqloss.sequence_loss(tf.constant(logits), targets, variable, implementation=implementation,
                                        **flags)
        total = tf.reduce_sum(loss)
    grad = tape.gradient(total, variable).numpy()
    expected = reference.sequence_loss_weights_grad(logits, targets, weights, **flags)
    np.testing.assert_allclose(grad, expected, rtol=1e-9, atol=1e-12)

    # The closed form, against central differences of the NumPy loss at the non-zero weights (no step
    # there crosses 0, where a padded token's loss jumps from `ce` to 0).
    step = 1e-6
    for index in zip(*np.nonzero(~zero)):
        up, down = weights.copy(), weights.copy()
        up[index] += step
        down[index] -= step
        numeric = (reference.sequence_loss(logits, targets, up, **flags).sum()
                   - reference.sequence_loss(logits, targets, down, **flags).sum()) / (2 * step)
        np.testing.assert_allclose(expected[index], numeric, rtol=1e-6, atol=1e-8)
    if flags is LEGAL_FLAGS[0]:
        # The contrib default, by the formulas the docstring and README state.
        ce = reference.token_cross_entropy(logits, targets)
        mean = (weights * ce).sum() / weights.sum()
        np.testing.assert_allclose(grad[~zero], ((ce - mean) / weights.sum())[~zero], rtol=1e-9)
        np.testing.assert_allclose(grad[zero], -mean / weights.sum(), rtol=1e-9)


@pytest.mark.keras
@pytest.mark.parametrize("route", ["sample_weight", "keras_mask", "padding_id"])
@pytest.mark.parametrize("mode", ["eager", "function"])
def test_sequence_loss_class_padding_is_inert(route, mode):
    clean_logits, clean_targets = _clean_inputs(seed=5)
    logits, targets = _poisoned(clean_logits, clean_targets, "-inf", padding_id=0 if route == "padding_id" else None)
    mask = np.arange(TIME)[None, :] < LENGTHS[:, None]
    loss_object = tf_seqloss.SequenceLoss(padding_id=0 if route == "padding_id" else None)
    if route == "padding_id":
        # Class 0 marks padding, so the real targets must avoid it.
        clean_targets = np.where(clean_targets == 0, 1, clean_targets)
        targets = np.where(mask, clean_targets, 0)

    def fn(logits, targets):
        if route == "sample_weight":
            return loss_object(targets, logits, sample_weight=tf.cast(mask, tf.float32))
        if route == "keras_mask":
            logits = tf.identity(logits)
            logits._keras_mask = tf.constant(mask)  # as a masking layer leaves it on its output
        return loss_object(targets, logits)

    _assert_equals_removed(_run(fn, mode, logits, targets), clean_logits, clean_targets, "token_mean")


def test_ragged_inputs_under_xla_are_refused_saying_what_to_pass():
    logits = tf.RaggedTensor.from_tensor(tf.zeros([BATCH, TIME, CLASSES]), lengths=LENGTHS)
    targets = tf.RaggedTensor.from_tensor(tf.zeros([BATCH, TIME], tf.int32), lengths=LENGTHS)
    compiled = tf.function(tf_seqloss.sequence_loss, jit_compile=True)
    with pytest.raises(ValueError, match=r"ragged `logits` cannot be compiled by XLA.*lengths=logits.row_lengths"):
        compiled(logits, targets)
