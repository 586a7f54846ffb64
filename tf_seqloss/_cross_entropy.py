"""Weighted per-token softmax cross-entropy: the finished loss of every token, before any reduction.

Every public loss of the package reduces what this module returns, `weights * cross_entropy`, with two
rules applied here and nowhere else:

- **Padding is inert.** A token of weight 0 contributes exactly 0 to the loss and its logits get exactly
  0 gradient, whatever they hold (`inf`, `-inf`, `NaN`): the loss and gradients equal those computed
  with the padded tokens removed. (Attention masks write `-inf` into padded rows.)
- **An out-of-range id is NaN.** A sparse id outside `[0, classes)` has no cross-entropy; at a token of
  non-zero weight its loss and its gradient are NaN, eagerly, under `tf.function` and under XLA, on CPU
  and GPU alike. At a token of weight 0 it is padding and ignored.

The reference formulation is `tf.nn.sparse_softmax_cross_entropy_with_logits` (class ids; float64 uses
`logsumexp - target logit`, see below) and `tf.nn.softmax_cross_entropy_with_logits` (probabilities),
computed in float32 for half-precision logits. `IMPLEMENTATIONS` names the formulations of the sparse
loss that `implementation=` chooses between.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import tensorflow as tf

from tf_seqloss import _checks, _fused

IMPLEMENTATIONS = ("auto", "reference", "fused", "fused_xla")
"""The values `implementation=` takes. Every one gives the same values and gradients (first and second
order) to float tolerance; the `implementation` argument of `sequence_loss` says what each one is and
how `"auto"` chooses, and `benchmarks/README.md` has their speed and memory."""


def check_implementation(implementation: str) -> None:
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(_checks.invalid_value("implementation", f"one of {IMPLEMENTATIONS}", repr(implementation)))


# Outside XLA, `"auto"` compiles the fused kernels only for at least this many classes: below it a step
# saves a few milliseconds at most, while every new input shape costs an XLA compilation.
MIN_CLASSES_FOR_KERNELS = 1024


def choose_implementation(implementation: str, num_classes: Optional[int] = None, *,
                          rows: Optional[int] = None, dtype: Optional[tf.DType] = None) -> str:
    """Returns the formulation `implementation` stands for: `"auto"` resolved, any other name as is.

    The choice depends only on the call: its arguments, whether an XLA compilation is being traced, and
    the machine's devices; never on what was called before, so a trace (and a SavedModel made from it)
    holds the same ops whatever the process ran first.

    Args:
        implementation: one of `IMPLEMENTATIONS`.
        num_classes: the static number of classes, None where unknown while tracing.
        rows: the static number of tokens (the product of the other dimensions of the logits), None where
            some of them is unknown while tracing.
        dtype: the logits' dtype (None: float32).

    Returns:
        `implementation` unless it is `"auto"`; for `"auto"`, the formulation the rule stated once, in the
            `implementation` argument of `tf_seqloss.sequence_loss`, picks (the code below is that rule;
            `MIN_CLASSES_FOR_KERNELS` is its class threshold).
    """
    if implementation != "auto":
        return implementation
    if _fused.accelerator_visible():
        return "reference"
    if _fused.in_xla_compilation():
        return "fused"
    if num_classes is None or num_classes < MIN_CLASSES_FOR_KERNELS:
        return "reference"
    if rows is None:
        return "fused"
    if tf.executing_eagerly() or (dtype is not None and dtype in (tf.bfloat16, tf.float16)):
        return "fused_xla"
    return "fused"


@tf.autograph.experimental.do_not_convert
def sparse_cross_entropy(logits: tf.Tensor, labels: tf.Tensor, weights: Optional[tf.Tensor] = None, *,
                         label_smoothing=0.0, implementation: str = "auto", z_loss=0.0) -> tf.Tensor:
    """Returns `weights * cross_entropy` of `[..., classes]` logits against `[...]` integer ids.

    `weights` has the shape of `labels` (None: all ones) and the compute dtype, which is also the dtype of
    the result (float32 for half-precision logits). Padding and out-of-range ids follow the module's rules.

    With `label_smoothing=ls` the target distribution is TF1's `(1 - ls) * one_hot + ls / classes`. The
    loss is written as `ce + ls * (logits[label] - mean(logits))`, which equals
    `(1 - ls) * ce + ls * (logsumexp(logits) - mean(logits))` because `logsumexp - ce = logits[label]`,
    so no one-hot matrix is ever built.

    `implementation` is one of `IMPLEMENTATIONS`: `"reference"` is the TensorFlow kernel, `"fused"` and
    `"fused_xla"` the formulation of `_fused` (as plain ops, or as XLA kernels outside XLA), `"auto"` what
    `choose_implementation` picks. `z_loss=z` adds PaLM's `z * logsumexp(logits)**2` to every token's loss.
    """
    valid, safe_labels = checked_ids(labels, tf.shape(logits)[-1])
    active = None if weights is None else tf.not_equal(weights, 0)
    rows = logits.shape[:-1].num_elements() if logits.shape[:-1].is_fully_defined() else None
    chosen = choose_implementation(implementation, logits.shape[-1], rows=rows, dtype=logits.dtype)
    if chosen != "reference":
        # The fused formulation takes half-precision logits as they are, so that its gradient is computed
        # in float32 and cast back in the same kernel. It gives rows of zero upstream gradient a zero
        # gradient whatever their logits hold, so padded logits need no cleaning here.
        loss = _fused.fused_cross_entropy(logits, safe_labels, label_smoothing,
                                                   compiled=chosen == "fused_xla", active=active)
        return _weigh(_add_z_loss(loss, logits, z_loss, active), weights, active, valid)
    logits = _inert_padding(tf.cast(logits, _checks.compute_dtype(logits.dtype)), active)
    smoothing = not _checks.is_zero(label_smoothing)
    if smoothing or logits.dtype == tf.float64:
        target_logit = tf.gather(logits, safe_labels[..., None], batch_dims=logits.shape.rank - 1)[..., 0]
    if logits.dtype == tf.float64:
        # TensorFlow registers no float64 GPU kernel for SparseSoftmaxCrossEntropyWithLogits, so float64
        # takes the equal `logsumexp - target logit`, whose ops all have one.
        loss = tf.reduce_logsumexp(logits, axis=-1) - target_logit
    else:
        loss = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=safe_labels, logits=logits)
    if smoothing:
        ls = _checks.cast_number(label_smoothing, logits.dtype)
        loss += ls * (target_logit - tf.reduce_mean(logits, axis=-1))
    return _weigh(_add_z_loss(loss, logits, z_loss, active), weights, active, valid)


@tf.autograph.experimental.do_not_convert
def dense_cross_entropy(logits: tf.Tensor, labels: tf.Tensor, weights: Optional[tf.Tensor] = None, *,
                        label_smoothing=0.0, z_loss=0.0) -> tf.Tensor:
    """Returns `weights * cross_entropy` of `[..., classes]` probabilities against logits, in the compute dtype."""
    dtype = _checks.compute_dtype(logits.dtype)
    active = None if weights is None else tf.not_equal(weights, 0)
    logits = _inert_padding(tf.cast(logits, dtype), active)
    labels = _smooth(_inert_padding(tf.cast(labels, dtype), active), label_smoothing)
    loss = tf.nn.softmax_cross_entropy_with_logits(labels=labels, logits=logits)
    return _weigh(_add_z_loss(loss, logits, z_loss, active), weights, active, None)


@tf.autograph.experimental.do_not_convert
def sparse_cross_entropy_of_probabilities(probabilities: tf.Tensor, labels: tf.Tensor,
                                          weights: Optional[tf.Tensor] = None, *, epsilon: float,
                                          label_smoothing=0.0, implementation: str = "auto") -> tf.Tensor:
    """Returns `weights * cross_entropy` of `[..., classes]` probabilities against `[...]` integer ids.

    Keras' `SparseCategoricalCrossentropy(from_logits=False)`, in both Kerases: the probabilities are
    clipped to `[epsilon, 1 - epsilon]` and their log taken as logits, so the loss is
    `-log(p[label] / sum(p))` of the clipped `p`. The padding and out-of-range rules are those of
    `sparse_cross_entropy`, which computes it; the padded probabilities never reach the log.
    """
    logits = _clipped_log(probabilities, weights, epsilon)
    return sparse_cross_entropy(logits, labels, weights, label_smoothing=label_smoothing,
                                implementation=implementation)


@tf.autograph.experimental.do_not_convert
def dense_cross_entropy_of_probabilities(probabilities: tf.Tensor, labels: tf.Tensor,
                                         weights: Optional[tf.Tensor] = None, *, epsilon: float,
                                         label_smoothing=0.0) -> tf.Tensor:
    """Returns `weights * cross_entropy` of `[..., classes]` probabilities against probability `labels`.

    Keras' `CategoricalCrossentropy(from_logits=False)`, in both Kerases: each row is divided by its sum,
    clipped to `[epsilon, 1 - epsilon]`, and the loss is `-sum(labels * log(p))`. Padding follows the
    module's rule: padded rows are zeros divided by 1 before the log.
    """
    dtype = _checks.compute_dtype(probabilities.dtype)
    active = None if weights is None else tf.not_equal(weights, 0)
    probabilities = _inert_padding(tf.cast(probabilities, dtype), active)
    labels = _smooth(_inert_padding(tf.cast(labels, dtype), active), label_smoothing)
    totals = tf.reduce_sum(probabilities, axis=-1, keepdims=True)
    if active is not None:
        totals = tf.where(active[..., None], totals, tf.ones([], dtype))
    clipped = _clip(probabilities / totals, epsilon)
    loss = -tf.reduce_sum(labels * tf.math.log(clipped), axis=-1)
    return _weigh(loss, weights, active, None)


@tf.autograph.experimental.do_not_convert
def custom_cross_entropy(loss_fn, logits: tf.Tensor, labels: tf.Tensor, weights: Optional[tf.Tensor],
                         dtype: tf.DType) -> tf.Tensor:
    """Returns `weights * loss_fn(labels=labels, logits=logits)` with padded inputs replaced by zeros.

    `logits` and `labels` are handed to `loss_fn` flat (`[n, classes]`, `[n]` or `[n, classes]`) and as
    given (not cast), as contrib did; `loss_fn` returns `[n]` losses.
    """
    active = None if weights is None else tf.not_equal(weights, 0)
    flat_active = None if active is None else tf.reshape(active, [-1])
    num_classes = _checks.dim(logits, -1)
    flat_logits = _inert_padding(tf.reshape(logits, [-1, num_classes]), flat_active)
    dense = labels.shape.rank == logits.shape.rank
    flat_labels = _inert_padding(tf.reshape(labels, [-1, num_classes] if dense else [-1]), flat_active)
    flat_loss = loss_fn(labels=flat_labels, logits=flat_logits)
    loss = tf.reshape(tf.cast(flat_loss, dtype), tf.shape(labels)[:logits.shape.rank - 1])
    return _weigh(loss, weights, active, None)


def _add_z_loss(loss: tf.Tensor, logits: tf.Tensor, z_loss, active: Optional[tf.Tensor]) -> tf.Tensor:
    """Returns `loss + z_loss * logsumexp(logits)**2` (PaLM's z-loss), padded logits kept out of it."""
    if _checks.is_zero(z_loss):
        return loss
    logits = _inert_padding(tf.cast(logits, loss.dtype), active)
    return loss + _checks.cast_number(z_loss, loss.dtype) * tf.square(tf.reduce_logsumexp(logits, axis=-1))


def _smooth(labels: tf.Tensor, label_smoothing) -> tf.Tensor:
    """Returns TF1's smoothed probability targets `(1 - ls) * labels + ls / classes`."""
    if _checks.is_zero(label_smoothing):
        return labels
    ls = _checks.cast_number(label_smoothing, labels.dtype)
    num_classes = tf.cast(tf.shape(labels)[-1], labels.dtype)
    return labels * (1.0 - ls) + ls / num_classes


def _clip(probabilities: tf.Tensor, epsilon: float) -> tf.Tensor:
    # As Keras: the bounds are Python numbers converted to the dtype, `1 - epsilon` rounded there.
    return tf.clip_by_value(probabilities, _checks.cast_number(epsilon, probabilities.dtype),
                            _checks.cast_number(1.0 - epsilon, probabilities.dtype))


def _clipped_log(probabilities: tf.Tensor, weights: Optional[tf.Tensor], epsilon: float) -> tf.Tensor:
    """Returns `log(clip(probabilities, epsilon, 1 - epsilon))` in the compute dtype, padded rows zeroed first."""
    active = None if weights is None else tf.not_equal(weights, 0)
    probabilities = _inert_padding(tf.cast(probabilities, _checks.compute_dtype(probabilities.dtype)), active)
    return tf.math.log(_clip(probabilities, epsilon))


def _inert_padding(x: tf.Tensor, active: Optional[tf.Tensor]) -> tf.Tensor:
    """Returns `x` with zeros wherever `active` is False, so padded content never reaches a kernel."""
    if active is None:
        return x
    cond = active if x.shape.rank == active.shape.rank else active[..., None]
    return tf.where(cond, x, tf.zeros([], x.dtype))


def _weigh(loss: tf.Tensor, weights: Optional[tf.Tensor], active: Optional[tf.Tensor],
           valid: Optional[tf.Tensor]) -> tf.Tensor:
    """Returns `weights * loss`: exactly 0 where the weight is 0, NaN where an id is invalid.

    Multiplying by a NaN factor (rather than selecting NaN) makes the gradient NaN too, so a loop that
    only applies gradients cannot train on silently. The loss of an inactive token is selected away
    before the product, so its gradient is exactly 0 even when the loss there is `inf` or `NaN`.
    """
    if weights is None:
        return loss if valid is None else loss * nan_where_invalid(tf.ones([], loss.dtype), valid, None)
    loss = tf.where(active, loss, tf.zeros([], loss.dtype))
    return loss * (weights if valid is None else nan_where_invalid(weights, valid, active))


def checked_ids(labels: tf.Tensor, num_classes) -> tuple[tf.Tensor, tf.Tensor]:
    """Returns `(valid, safe_labels)`: which ids lie in `[0, num_classes)`, and the ids with 0 elsewhere.

    The rule for out-of-range ids, shared by every loss of the package: the CPU kernel raises on an
    out-of-range id while GPU and XLA kernels return NaN; a safe id makes all three agree, and `valid`
    keeps the information for `nan_where_invalid`.
    """
    valid = tf.logical_and(labels >= 0, labels < tf.cast(num_classes, labels.dtype))
    return valid, tf.where(valid, labels, tf.zeros_like(labels))


def nan_where_invalid(factor: tf.Tensor, valid: tf.Tensor, active: Optional[tf.Tensor]) -> tf.Tensor:
    """Returns `factor` (a token's weight, or 1) with NaN at the real tokens whose id is invalid.

    `active` (None: every token) marks the tokens of non-zero weight; an invalid id at a padded token is
    ignored. A token's loss is multiplied by the result, so the NaN reaches its gradient too.
    """
    keep = valid if active is None else tf.logical_or(valid, tf.logical_not(active))
    return tf.where(keep, factor, tf.constant(np.nan, factor.dtype))
