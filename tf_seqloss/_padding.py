"""Token weights: the one place where every way of marking padding becomes a `[batch, time]` weight.

A sequence loss is told which tokens count in several ways, all of which end here: contrib's `weights`,
Keras' `sample_weight`, sequence `lengths`, a `padding_id` in the targets, the Keras mask a masking layer
leaves on the logits, and the row lengths of ragged inputs. The padding routes (everything but `weights`
and `sample_weight`) are combined as booleans and then select the weights, so a padded token gets weight
exactly 0 whatever weight was given there, even `inf` or `NaN`.

A `lengths` entry outside `[0, time]` raises when the graph runs; under XLA, which compiles asserts
away, its sequence's weights become NaN instead, so the loss is NaN rather than silently clamped.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional, Tuple

import numpy as np
import tensorflow as tf

from tf_seqloss import _checks, _fused


class DenseInputs(NamedTuple):
    """Inputs with every `tf.RaggedTensor` padded; `lengths` are the ragged row lengths, or None."""

    logits: tf.Tensor
    targets: tf.Tensor
    weights: Optional[tf.Tensor]
    lengths: Optional[tf.Tensor]


def densify_ragged(logits: Any, targets: Any, weights: Any = None) -> DenseInputs:
    """Pads ragged `logits` (`[batch, (time), classes]`), `targets` and `weights` (`[batch, (time)]`).

    The row lengths of the ragged inputs become the sequence lengths; where several inputs are ragged
    their row lengths must agree. Dense inputs pass through unchanged.

    Args:
        logits: `[batch, time, classes]` logits, dense or ragged.
        targets: `[batch, time]` ids or `[batch, time, classes]` probabilities, dense or ragged.
        weights: `[batch, time]` weights, dense, ragged or None.

    Returns:
        A `DenseInputs` with the padded tensors and the row lengths (None when nothing was ragged).
    """
    lengths = None

    def take_lengths(x: Any, arg: str) -> Any:
        nonlocal lengths
        if _fused.in_xla_compilation():
            raise ValueError(
                f"A ragged `{arg}` cannot be compiled by XLA (`jit_compile=True`): its padded shape depends "
                f"on the data. Pass padded tensors with `lengths={arg}.row_lengths()` instead, e.g. "
                f"`{arg}.to_tensor()` outside the compiled function.")
        if x.ragged_rank != 1:
            raise ValueError(
                f"A ragged `{arg}` must be ragged in the time axis only (ragged_rank 1, e.g. "
                f"`tf.RaggedTensor.from_row_lengths(values, lengths)`). "
                f"Received: {arg}.shape={x.shape}, ragged_rank={x.ragged_rank}")
        row_lengths = x.row_lengths()
        if lengths is None:
            lengths = row_lengths
        else:
            tf.debugging.assert_equal(
                lengths, row_lengths, message=f"The row lengths of the ragged `{arg}` must equal those of "
                                              f"the other ragged inputs")
        return row_lengths

    if isinstance(logits, tf.RaggedTensor):
        if logits.shape.rank != 3:
            raise ValueError(
                "A ragged `logits` must be [batch, (time), classes]. "
                f"Received: logits.shape={logits.shape}")
        take_lengths(logits, "logits")
        logits = logits.to_tensor()
    time = None if isinstance(logits, tf.RaggedTensor) else _checks.dim(tf.convert_to_tensor(logits), 1)

    def pad(x: Any, arg: str, rank: Tuple[int, ...]) -> Any:
        row_lengths = take_lengths(x, arg)
        if time is not None:
            tf.debugging.assert_less_equal(
                row_lengths, tf.cast(time, row_lengths.dtype),
                message=f"The rows of the ragged `{arg}` must not be longer than the time dimension of "
                        "`logits`")
        if x.shape.rank not in rank:
            raise ValueError(f"A ragged `{arg}` must be [batch, (time)] or [batch, (time), classes]. "
                             f"Received: {arg}.shape={x.shape}")
        # Padded up to the logits' time axis; a longer row fails the lengths check against it.
        shape = [None, time] + [None] * (x.shape.rank - 2) if isinstance(time, int) else None
        return x.to_tensor(shape=shape)

    if isinstance(targets, tf.RaggedTensor):
        targets = pad(targets, "targets", (2, 3))
    if isinstance(weights, tf.RaggedTensor):
        weights = pad(weights, "weights", (2,))
    return DenseInputs(logits, targets, weights, lengths)


def token_weights(
    reference: tf.Tensor,
    targets: tf.Tensor,
    *,
    dtype: tf.DType,
    weights: Any = None,
    sample_weight: Any = None,
    lengths: Any = None,
    padding_id: Optional[int] = None,
    mask: Any = None,
    reference_arg: str = "logits",
) -> Optional[tf.Tensor]:
    """Returns the `[batch, time]` weight of every token in `dtype`, or None when nothing marks padding.

    Args:
        reference: a `[batch, time, ...]` tensor (the logits, or a head's hidden states) whose first two
            sizes the weights must have; named `reference_arg` in errors.
        targets: `[batch, time]` integer ids or `[batch, time, classes]` probabilities.
        dtype: the dtype of the returned weights.
        weights: contrib's `[batch, time]` float weights.
        sample_weight: Keras' weights: a scalar, `[batch]` (one per sequence), `[batch, time]` or
            `[batch, time, 1]`.
        lengths: `[batch]` integer lengths in `[0, time]`, any integer dtype.
        padding_id: an id marking padding in sparse `targets` (checked by `_checks.check_padding_id`).
        mask: a `[batch, time]` Keras mask (boolean, or 0/1).
        reference_arg: the name `reference` goes by in error messages (`"logits"`, `"hidden"`).

    Returns:
        The `[batch, time]` weights, the product of every route given, or None when no route is given
            (None stands for all ones: the caller can then skip the work that padding needs).
    """
    given = None
    if weights is not None:
        given = tf.convert_to_tensor(weights, name="weights")
        _checks.check_floating(given, "weights")
        _checks.check_rank(given, "weights", (2,), "[batch, time]")
        _check_batch_time(reference, reference_arg, given, "weights")
        given = tf.cast(given, dtype)
    if sample_weight is not None:
        keras_weights = _standardize_sample_weight(sample_weight, targets, dtype)
        _check_batch_time(reference, reference_arg, keras_weights, "sample_weight")
        given = keras_weights if given is None else given * keras_weights

    keep, bad_rows = None, None
    if lengths is not None:
        keep, bad_rows = _length_mask(reference, reference_arg, lengths)
    if padding_id is not None:
        not_padding = tf.not_equal(targets, tf.constant(padding_id, targets.dtype))
        keep = not_padding if keep is None else tf.logical_and(keep, not_padding)
    if mask is not None:
        mask = tf.convert_to_tensor(mask)
        if mask.shape.rank == 3 and mask.shape[-1] == 1:
            mask = tf.squeeze(mask, -1)
        mask = mask if mask.dtype == tf.bool else tf.not_equal(mask, tf.zeros([], mask.dtype))
        keep = mask if keep is None else tf.logical_and(keep, mask)

    if keep is None:
        return given
    result = tf.where(keep, tf.ones([], dtype) if given is None else given, tf.zeros([], dtype))
    if bad_rows is not None:
        result = tf.where(bad_rows[:, None], tf.constant(np.nan, dtype), result)
    return result


def ones_if_none(token_weights: Optional[tf.Tensor], like: tf.Tensor) -> tf.Tensor:
    """Returns `token_weights`, or the all-ones weights it stands for when None (shape and dtype of `like`)."""
    return tf.ones(tf.shape(like), like.dtype) if token_weights is None else token_weights


def _check_batch_time(reference: tf.Tensor, reference_arg: str, x: tf.Tensor, arg: str) -> None:
    _checks.check_same_dim(reference, reference_arg, 0, x, arg, 0, "batch")
    _checks.check_same_dim(reference, reference_arg, 1, x, arg, 1, "time")


def _length_mask(reference: tf.Tensor, reference_arg: str, lengths: Any) -> tf.Tensor:
    """Returns `(keep, bad_rows)`: the `[batch, time]` boolean mask of `lengths` and the out-of-range rows."""
    lengths = tf.convert_to_tensor(lengths, name="lengths")
    if not lengths.dtype.is_integer:
        raise TypeError(
            "`lengths` must hold integer sequence lengths (any integer dtype). "
            f"Received: lengths.dtype={lengths.dtype.name}")
    _checks.check_rank(lengths, "lengths", (1,), "[batch]")
    _checks.check_same_dim(reference, reference_arg, 0, lengths, "lengths", 0, "batch")
    # Compared in int64: casting the time size to a narrow lengths dtype (uint8, int8) could overflow.
    lengths = tf.cast(lengths, tf.int64)
    time = _checks.dim(reference, 1)
    time64 = tf.cast(time, tf.int64)
    tf.debugging.assert_non_negative(lengths, message="`lengths` must be non-negative")
    tf.debugging.assert_less_equal(
        lengths, time64, message=f"`lengths` must not exceed the time dimension of `{reference_arg}`")
    bad_rows = tf.logical_or(lengths < 0, lengths > time64)
    return tf.sequence_mask(lengths, maxlen=time), bad_rows


def _standardize_sample_weight(sample_weight: Any, targets: tf.Tensor, dtype: tf.DType) -> tf.Tensor:
    """Returns Keras' `sample_weight` as `[batch, time]` weights in `dtype`."""
    weights = tf.convert_to_tensor(sample_weight)
    if not (weights.dtype.is_floating or weights.dtype.is_integer or weights.dtype == tf.bool):
        raise TypeError(f"`sample_weight` must hold numbers. Received: sample_weight.dtype={weights.dtype.name}")
    weights = tf.cast(weights, dtype)
    rank = weights.shape.rank
    if rank == 3 and weights.shape[-1] == 1:
        weights = tf.squeeze(weights, axis=-1)
    elif rank == 1:
        weights = weights[:, tf.newaxis]  # One weight per sequence.
    elif rank not in (0, 2):
        raise ValueError(
            "`sample_weight` must be a scalar, `[batch]` (one weight per sequence), `[batch, time]` or "
            f"`[batch, time, 1]`. Received: sample_weight.shape={weights.shape}"
        )
    if rank in (0, 1):
        weights = tf.broadcast_to(weights, tf.shape(targets)[:2])
    return weights
