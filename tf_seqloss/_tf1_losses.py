"""The TF1 `tf.losses` softmax cross-entropy family, TF2-native, for migrating code.

`softmax_cross_entropy` and `sparse_softmax_cross_entropy` take the arguments and give the results of
`tf.compat.v1.losses.softmax_cross_entropy` and `tf.compat.v1.losses.sparse_softmax_cross_entropy`, with
the same `Reduction` keys, but build no graph collections and run eagerly, under `tf.function` and XLA.
"""

from __future__ import annotations

from typing import Optional

import tensorflow as tf
from tensorflow.types.experimental import TensorLike

from tf_seqloss import _checks, _cross_entropy


class Reduction:
    """The TF1 reduction keys; the values are TF1's own strings, so `tf.compat.v1` constants work too.

    - `NONE`: the weighted per-example losses, unreduced.
    - `SUM`: the sum of the weighted losses.
    - `MEAN`: the sum of the weighted losses divided by the sum of the weights.
    - `SUM_OVER_BATCH_SIZE`: the sum of the weighted losses divided by the number of losses.
    - `SUM_BY_NONZERO_WEIGHTS` (alias `SUM_OVER_NONZERO_WEIGHTS`): the sum of the weighted losses divided by
      the number of non-zero weights. TF1's default.

    Every division is `divide_no_nan`: all-zero weights give 0.

    Example:

    >>> import tf_seqloss
    >>> losses, weights = [1.0, 2.0, 3.0, 6.0], [1.0, 0.0, 1.0, 0.0]
    >>> for key in (tf_seqloss.Reduction.SUM, tf_seqloss.Reduction.MEAN,
    ...             tf_seqloss.Reduction.SUM_OVER_BATCH_SIZE, tf_seqloss.Reduction.SUM_BY_NONZERO_WEIGHTS):
    ...     print(key, float(tf_seqloss.compute_weighted_loss(losses, weights, reduction=key)))
    weighted_sum 4.0
    weighted_mean 2.0
    weighted_sum_over_batch_size 1.0
    weighted_sum_by_nonzero_weights 2.0
    """

    NONE = "none"
    SUM = "weighted_sum"
    SUM_OVER_BATCH_SIZE = "weighted_sum_over_batch_size"
    MEAN = "weighted_mean"
    SUM_BY_NONZERO_WEIGHTS = "weighted_sum_by_nonzero_weights"
    SUM_OVER_NONZERO_WEIGHTS = SUM_BY_NONZERO_WEIGHTS

    @classmethod
    def all(cls) -> tuple[str, ...]:
        """Returns every reduction key, the alias `SUM_OVER_NONZERO_WEIGHTS` counted once.

        Returns:
            A tuple of the five key strings.

        Example:

        >>> import tf_seqloss
        >>> tf_seqloss.Reduction.all()
        ('none', 'weighted_sum', 'weighted_mean', 'weighted_sum_over_batch_size', 'weighted_sum_by_nonzero_weights')
        """
        return (cls.NONE, cls.SUM, cls.MEAN, cls.SUM_OVER_BATCH_SIZE, cls.SUM_BY_NONZERO_WEIGHTS)

    @classmethod
    def validate(cls, key: str) -> None:
        """Raises unless `key` is one of `Reduction.all()`.

        Args:
            key: the reduction to check.

        Raises:
            ValueError: `key` is not a reduction key.

        Example:

        >>> import tf_seqloss
        >>> tf_seqloss.Reduction.validate("weighted_mean")   # a key: nothing happens
        >>> tf_seqloss.Reduction.validate("mean")
        Traceback (most recent call last):
        ...
        ValueError: Invalid value for argument `reduction`. Expected one of (...). Received: reduction='mean'
        """
        if key not in cls.all():
            raise ValueError(_checks.invalid_value("reduction", f"one of {cls.all()}", repr(key)))


@tf.autograph.experimental.do_not_convert
def softmax_cross_entropy(
    onehot_labels: TensorLike,
    logits: TensorLike,
    weights: TensorLike = 1.0,
    label_smoothing: float = 0,
    scope: Optional[str] = None,
    loss_collection: Optional[str] = "losses",
    reduction: str = Reduction.SUM_BY_NONZERO_WEIGHTS,
) -> tf.Tensor:
    """Returns the weighted softmax cross-entropy of one-hot (or probability) labels, reduced.

    TF2-native `tf.compat.v1.losses.softmax_cross_entropy`: `logits` and `onehot_labels` are
    `[batch, num_classes]` (any leading shape works), `weights` a scalar or a tensor broadcastable to the
    per-example losses (same rank, each dimension 1 or equal, e.g. `[batch]`).

    Args:
        onehot_labels: one-hot or probability labels, the shape of `logits`.
        logits: float logits. float16/bfloat16 are computed in float32.
        weights: coefficients of the per-example losses.
        label_smoothing: in `[0, 1]`; labels become `onehot * (1 - ls) + ls / num_classes`.
        scope: name scope of the operations.
        loss_collection: accepted for signature compatibility and ignored: TF2 has no graph collections.
        reduction: a `Reduction` key.

    Returns:
        The weighted loss: the shape of the per-example losses for `Reduction.NONE`, else a scalar. Its
            dtype is float32 for half-precision logits and the logits' dtype otherwise (TF1 reduced in
            float32 and cast back; here float64 stays float64 throughout).

    Raises:
        ValueError: `onehot_labels`, `logits` or `weights` is None, the shapes of `logits` and
            `onehot_labels` differ, `weights` is not broadcastable to the losses, `label_smoothing` is
            outside `[0, 1]`, or `reduction` is not a `Reduction` key.
        TypeError: non-float `logits`.

    Example:

    >>> import numpy as np, tf_seqloss
    >>> labels = np.eye(4, dtype="float32")[[1, 2]]         # one-hot, 2 examples
    >>> logits = np.zeros([2, 4], "float32")                # uniform over 4 classes
    >>> round(float(tf_seqloss.softmax_cross_entropy(labels, logits)), 4)   # log(4)
    1.3863
    >>> tf_seqloss.softmax_cross_entropy(labels, logits, reduction=tf_seqloss.Reduction.NONE).shape
    TensorShape([2])
    """
    del loss_collection
    if onehot_labels is None:
        raise ValueError("Argument `onehot_labels` must not be None.")
    if logits is None:
        raise ValueError("Argument `logits` must not be None.")
    label_smoothing = _checks.check_label_smoothing(label_smoothing)
    Reduction.validate(reduction)
    with tf.name_scope(scope or "softmax_cross_entropy_loss"):
        logits = tf.convert_to_tensor(logits, name="logits")
        _checks.check_floating(logits, "logits")
        onehot_labels = tf.convert_to_tensor(onehot_labels, name="onehot_labels")
        if not logits.shape.is_compatible_with(onehot_labels.shape):
            raise ValueError(
                "`logits` and `onehot_labels` must have the same shape. "
                f"Received: logits.shape={logits.shape} and onehot_labels.shape={onehot_labels.shape}")
        if onehot_labels.shape.rank is not None:
            for axis in range(onehot_labels.shape.rank):
                _checks.check_same_dim(logits, "logits", axis, onehot_labels, "onehot_labels", axis,
                                       _checks.ordinal(axis + 1))
        weights = _broadcast_weights(weights, tf.shape(onehot_labels)[:-1], onehot_labels.shape[:-1],
                                     _checks.compute_dtype(logits.dtype))
        weighted = _cross_entropy.dense_cross_entropy(logits, onehot_labels, weights,
                                                     label_smoothing=label_smoothing)
        return _reduce(weighted, weights, reduction)


@tf.autograph.experimental.do_not_convert
def sparse_softmax_cross_entropy(
    labels: TensorLike,
    logits: TensorLike,
    weights: TensorLike = 1.0,
    scope: Optional[str] = None,
    loss_collection: Optional[str] = "losses",
    reduction: str = Reduction.SUM_BY_NONZERO_WEIGHTS,
) -> tf.Tensor:
    """Returns the weighted softmax cross-entropy of integer class ids, reduced.

    TF2-native `tf.compat.v1.losses.sparse_softmax_cross_entropy`: `labels` is `[d_0, ..., d_{r-1}]`
    integer ids, `logits` is `[d_0, ..., d_{r-1}, num_classes]`; a trailing labels dimension of size 1
    (`[batch, 1]` ids for `[batch, classes]` logits) is squeezed as TF1 did. `weights` is a scalar or
    broadcastable to `labels`.

    An id outside `[0, num_classes)` with a non-zero weight makes its loss NaN (TF1 raised on CPU and
    returned NaN on GPU); with a zero weight it is ignored.

    Args:
        labels: int32 or int64 class ids.
        logits: float logits. float16/bfloat16 are computed in float32.
        weights: coefficients of the per-example losses.
        scope: name scope of the operations.
        loss_collection: accepted for signature compatibility and ignored: TF2 has no graph collections.
        reduction: a `Reduction` key.

    Returns:
        As `softmax_cross_entropy`.

    Raises:
        ValueError: `labels`, `logits` or `weights` is None, their shapes are incompatible, or `reduction`
            is not a `Reduction` key.
        TypeError: non-integer `labels` or non-float `logits`.

    Example:

    >>> import numpy as np, tf_seqloss
    >>> logits = np.zeros([2, 4], "float32")                # uniform over 4 classes
    >>> loss = tf_seqloss.sparse_softmax_cross_entropy(np.array([1, 2]), logits, weights=[1.0, 0.0])
    >>> round(float(loss), 4)   # log(4): the mean over the one non-zero weight
    1.3863
    """
    del loss_collection
    if labels is None:
        raise ValueError("Argument `labels` must not be None.")
    if logits is None:
        raise ValueError("Argument `logits` must not be None.")
    Reduction.validate(reduction)
    with tf.name_scope(scope or "sparse_softmax_cross_entropy_loss"):
        logits = tf.convert_to_tensor(logits, name="logits")
        labels = tf.convert_to_tensor(labels, name="labels")
        _checks.check_floating(logits, "logits")
        labels = _checks.check_class_ids(labels, "labels")
        logits_rank = _checks.check_rank(logits, "logits", tuple(range(1, 9)), "[..., num_classes]")
        labels_rank = _checks.check_rank(labels, "labels", tuple(range(0, 9)), "[...] class ids")
        if labels_rank == logits_rank and labels.shape[-1] == 1:
            labels = tf.squeeze(labels, axis=-1)
            labels_rank -= 1
        if labels_rank != logits_rank - 1:
            raise ValueError(
                "`labels` must have one dimension fewer than `logits` ([..., num_classes]). "
                f"Received: labels.shape={labels.shape} and logits.shape={logits.shape}")
        for axis in range(labels_rank):
            _checks.check_same_dim(logits, "logits", axis, labels, "labels", axis, _checks.ordinal(axis + 1))
        weights = _broadcast_weights(_squeeze_trailing_unit(weights, logits_rank), tf.shape(labels),
                                     labels.shape, _checks.compute_dtype(logits.dtype))
        weighted = _cross_entropy.sparse_cross_entropy(logits, labels, weights)
        return _reduce(weighted, weights, reduction)


@tf.autograph.experimental.do_not_convert
def compute_weighted_loss(losses: TensorLike, weights: TensorLike = 1.0, scope: Optional[str] = None,
                          loss_collection: Optional[str] = "losses",
                          reduction: str = Reduction.SUM_BY_NONZERO_WEIGHTS) -> tf.Tensor:
    """Returns `losses * weights` reduced by `reduction`, as `tf.compat.v1.losses.compute_weighted_loss`.

    Args:
        losses: float per-example losses, any shape.
        weights: coefficients of the losses: a scalar, or a tensor of the rank of `losses` with each
            dimension 1 or equal to that of `losses`.
        scope: name scope of the operations.
        loss_collection: accepted for signature compatibility and ignored: TF2 has no graph collections.
        reduction: a `Reduction` key.

    Returns:
        The weighted losses, of the shape of `losses`, for `Reduction.NONE`; else a scalar, in the dtype
            of `losses`.

    Raises:
        ValueError: `weights` is None or not broadcastable to `losses`, or `reduction` is not a
            `Reduction` key.

    Example:

    >>> import tf_seqloss
    >>> float(tf_seqloss.compute_weighted_loss([1.0, 2.0, 3.0], [1.0, 0.0, 1.0]))   # (1 + 3) / 2 weights
    2.0
    """
    del loss_collection
    Reduction.validate(reduction)
    with tf.name_scope(scope or "weighted_loss"):
        losses = tf.convert_to_tensor(losses)
        weights = _broadcast_weights(weights, tf.shape(losses), losses.shape, losses.dtype)
        return _reduce(losses * weights, weights, reduction)


def _broadcast_weights(weights: tf.Tensor, shape: tf.Tensor, static_shape: tf.TensorShape,
                       dtype: tf.DType) -> tf.Tensor:
    """Returns `weights` checked by TF1's broadcasting rule and broadcast to `shape`, in `dtype`."""
    if weights is None:
        raise ValueError("Argument `weights` must not be None: pass 1.0 for unweighted losses.")
    weights = tf.cast(tf.convert_to_tensor(weights), dtype)
    _check_broadcastable(weights, static_shape)
    return tf.broadcast_to(weights, shape)


def _reduce(weighted: tf.Tensor, weights: tf.Tensor, reduction: str) -> tf.Tensor:
    if reduction == Reduction.NONE:
        return weighted
    total = tf.reduce_sum(weighted)
    if reduction == Reduction.SUM:
        return total
    if reduction == Reduction.MEAN:
        normaliser = tf.reduce_sum(weights)
    elif reduction == Reduction.SUM_OVER_BATCH_SIZE:
        normaliser = tf.cast(tf.size(weighted), weighted.dtype)
    else:
        normaliser = tf.math.count_nonzero(weights, dtype=weighted.dtype)
    return tf.math.divide_no_nan(total, normaliser)


def _squeeze_trailing_unit(weights: tf.Tensor, logits_rank: int) -> tf.Tensor:
    """Squeezes `[..., 1]` weights given with the rank of the logits, as TF1 did."""
    if weights is None:
        return None
    weights = tf.convert_to_tensor(weights)
    if weights.shape.rank == logits_rank and weights.shape[-1] == 1:
        return tf.squeeze(weights, axis=-1)
    return weights


def _check_broadcastable(weights: tf.Tensor, losses_shape: tf.TensorShape) -> None:
    """TF1's rule: scalar weights, or the rank of the losses with each dimension 1 or equal."""
    if weights.shape.rank == 0:
        return
    if weights.shape.rank is not None and losses_shape.rank is not None:
        if weights.shape.rank != losses_shape.rank:
            raise ValueError(
                "`weights` must be a scalar or have the rank of the per-example losses, with each "
                f"dimension 1 or equal. Received: weights.shape={weights.shape} and losses.shape={losses_shape}")
        for axis, (w, n) in enumerate(zip(weights.shape, losses_shape)):
            if w is not None and n is not None and w not in (1, n):
                raise ValueError(
                    "`weights` must be broadcastable to the per-example losses: each dimension 1 or equal. "
                    f"Received: weights.shape={weights.shape} and losses.shape={losses_shape} (axis {axis})")
