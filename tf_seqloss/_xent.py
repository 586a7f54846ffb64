"""Per-token softmax cross-entropy: the unreduced loss every public function in the package reduces.

The reference formulation is `tf.nn.sparse_softmax_cross_entropy_with_logits` (class ids; float64 uses
`logsumexp - target logit`, see below) and `tf.nn.softmax_cross_entropy_with_logits` (probabilities),
computed in float32 for half-precision logits.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from tf_seqloss import _checks, _fused

# Formulations of the sparse per-token loss, by the name `implementation=` takes. Every one gives the same
# values and gradients to float tolerance; `benchmarks/README.md` has their speed and memory.
IMPLEMENTATIONS = ("auto", "reference", "fused", "fused_xla")


def check_implementation(implementation: str) -> None:
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"Invalid value for argument `implementation`. Expected one of {IMPLEMENTATIONS}. "
            f"Received: implementation={implementation!r}"
        )


# Outside XLA, `"auto"` compiles the fused kernels only for at least this many classes: below it a step
# saves a few milliseconds at most, while every new input shape costs an XLA compilation (0.3-1 s here).
MIN_CLASSES_FOR_KERNELS = 1024


def choose_implementation(implementation: str, num_classes=None) -> str:
    """Returns the formulation `implementation` stands for: `"auto"` resolved, any other name as is.

    `"auto"` keeps the reference whenever the machine has an accelerator (GPU, TPU): the fused
    formulation was measured on CPU only, and CPU figures never make a path the default on GPU. On a
    CPU-only machine it takes `"fused"` inside an XLA compilation, where XLA fuses its ops; elsewhere
    `"fused_xla"` when the static number of classes is at least `MIN_CLASSES_FOR_KERNELS`, and the
    reference otherwise (see benchmarks/README.md for the figures behind these choices).
    """
    if implementation != "auto":
        return implementation
    if any(device.device_type != "CPU" for device in tf.config.list_physical_devices()):
        return "reference"
    if _fused.in_xla_compilation():
        return "fused"
    if num_classes is not None and num_classes >= MIN_CLASSES_FOR_KERNELS:
        return "fused_xla"
    return "reference"


def sparse_cross_entropy(logits: tf.Tensor, labels: tf.Tensor, label_smoothing=0.0,
                         implementation: str = "auto"):
    """Returns `(loss, valid)`: the cross-entropy of every position and whether its id is in range.

    `logits` is `[..., classes]` and `labels` the matching `[...]` integer ids. The loss is in the compute
    dtype (float32 for half logits). Positions whose id is outside `[0, classes)` get the loss of class 0
    and `valid=False`; the caller decides what such a position means (see `mask_invalid_ids`).

    With `label_smoothing=ls` the target distribution is TF1's `(1 - ls) * one_hot + ls / classes`. The
    loss is written as `ce + ls * (logits[label] - mean(logits))`, which equals
    `(1 - ls) * ce + ls * (logsumexp(logits) - mean(logits))` because `logsumexp - ce = logits[label]`,
    so no one-hot matrix is ever built.

    `implementation` is one of `IMPLEMENTATIONS`: `"reference"` is the TensorFlow kernel, `"fused"` and
    `"fused_xla"` the formulation of `_fused` (as plain ops, or as XLA kernels outside XLA), `"auto"` what
    `choose_implementation` picks.
    """
    num_classes = tf.cast(tf.shape(logits)[-1], labels.dtype)
    valid = tf.logical_and(labels >= 0, labels < num_classes)
    # The CPU kernel raises on an out-of-range id while GPU and XLA kernels return NaN; feeding a safe
    # id makes all three agree, and `valid` keeps the information.
    safe_labels = tf.where(valid, labels, tf.zeros_like(labels))
    chosen = choose_implementation(implementation, logits.shape[-1])
    if chosen != "reference":
        # The fused formulation takes half-precision logits as they are, so that its gradient is
        # computed in float32 and cast back in the same kernel.
        loss = _fused.sparse_softmax_cross_entropy(logits, safe_labels, label_smoothing,
                                                   compiled=chosen == "fused_xla")
        return loss, valid
    logits = tf.cast(logits, _checks.compute_dtype(logits.dtype))
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
    return loss, valid


def dense_cross_entropy(logits: tf.Tensor, labels: tf.Tensor, label_smoothing=0.0) -> tf.Tensor:
    """Returns the cross-entropy of `[..., classes]` probabilities against logits, in the compute dtype."""
    dtype = _checks.compute_dtype(logits.dtype)
    logits = tf.cast(logits, dtype)
    labels = tf.cast(labels, dtype)
    if not _checks.is_zero(label_smoothing):
        ls = _checks.cast_number(label_smoothing, dtype)
        num_classes = tf.cast(tf.shape(labels)[-1], dtype)
        labels = labels * (1.0 - ls) + ls / num_classes
    return tf.nn.softmax_cross_entropy_with_logits(labels=labels, logits=logits)


def mask_invalid_ids(weighted_loss: tf.Tensor, valid: tf.Tensor, weights: tf.Tensor) -> tf.Tensor:
    """Makes a weighted loss NaN wherever an out-of-range id carries a non-zero weight.

    An id outside `[0, classes)` has no cross-entropy, so a finite number there would be silently wrong.
    Where the weight is zero the position is padding, and its id does not matter.
    """
    invalid = tf.logical_and(tf.logical_not(valid), tf.not_equal(weights, 0))
    return tf.where(invalid, tf.constant(np.nan, weighted_loss.dtype), weighted_loss)
