"""Global normalisers: the token count a loss divides by when its batch is split into parts.

A batch split over replicas (`tf.distribute`), workers or micro-batches (gradient accumulation) gives
each part a mean over its own tokens; averaging those means weights a token by how much padding its part
had. The exact token mean divides each part's weighted sum by the weights of the whole batch instead:

- `normalizer="global"` all-reduces the weights over the replicas in sync (`ReplicaContext.all_reduce`),
  so each replica returns its share `sum_r(w * ce) / sum_all(w)` and the shares, like the gradients a
  strategy sums, add up to the global token mean;
- a number or scalar tensor is the count of a whole accumulation window, known ahead from the data.

An all-reduced or given normaliser is a constant for differentiation (`tf.stop_gradient`): weights are
data, not parameters. Where `"global"` sees the whole batch it is exactly `None`, gradient included.
"""

from __future__ import annotations

import numbers
from typing import Any, Optional

import numpy as np
import tensorflow as tf

from tf_seqloss import _checks

GLOBAL = "global"
_EXPECTED = "None, 'global' or a positive token count (a number or a scalar tensor)"


def check_normalizer(normalizer: Any, *, scalar: bool, allow_tensor: bool = True) -> Any:
    """Raises unless `normalizer` is None, `"global"` or a positive count; returns it (numbers as float).

    `scalar` says whether the flags reduce to a scalar (both `average_across_*` or both `sum_over_*`), the
    only modes a normaliser of the whole batch applies to.
    """
    if normalizer is None:
        return None
    if isinstance(normalizer, str):
        if normalizer != GLOBAL:
            raise ValueError(_checks.invalid_value("normalizer", _EXPECTED, repr(normalizer)))
    elif isinstance(normalizer, (tf.Tensor, tf.Variable, np.ndarray)) and not isinstance(normalizer, np.generic):
        if not allow_tensor:
            raise TypeError(_checks.invalid_value(
                "normalizer", "None, 'global' or a Python number for a Keras loss or layer, so that it can be "
                "saved in its config (pass a tensor count to `tf_seqloss.sequence_loss` instead)", repr(normalizer)))
        dtype = tf.as_dtype(normalizer.dtype)
        if not (dtype.is_floating or dtype.is_integer):
            raise TypeError(_checks.invalid_value(
                "normalizer", "an integer or float count as a tensor", f"a tensor of dtype {dtype.name}"))
        if tf.TensorShape(normalizer.shape).rank not in (None, 0):
            raise ValueError(_checks.invalid_value(
                "normalizer", "a scalar token count as a tensor", f"a tensor with normalizer.shape={normalizer.shape}"))
        if isinstance(normalizer, np.ndarray) or (isinstance(normalizer, tf.Tensor)
                                                  and not tf.is_symbolic_tensor(normalizer)):
            _check_positive(float(np.asarray(normalizer)))  # A known value; a graph's is asserted when it runs.
    elif isinstance(normalizer, numbers.Real) and not isinstance(normalizer, bool):
        _check_positive(float(normalizer))
        normalizer = float(normalizer)
    else:
        raise TypeError(_checks.invalid_value(
            "normalizer", _EXPECTED, f"{normalizer!r} of type {type(normalizer).__name__}"))
    if not scalar:
        raise ValueError(
            "`normalizer` applies to the scalar modes only: both `average_across_timesteps` and "
            "`average_across_batch` (the default), or both `sum_over_timesteps` and `sum_over_batch`. "
            f"Received: normalizer={normalizer!r} with flags that leave a [batch] or [time] axis; reduce the "
            "output yourself, or set both flags of one family.")
    return normalizer


def _check_positive(value: float) -> None:
    if not value > 0 or not np.isfinite(value):
        raise ValueError(_checks.invalid_value(
            "normalizer", "a positive, finite number (the token count the summed loss is divided by)", repr(value)))


def normalise(total: tf.Tensor, local_normaliser: tf.Tensor, normalizer: Any,
              epsilon: Optional[float] = None) -> tf.Tensor:
    """Returns the scalar `total` divided by the normaliser `normalizer` names.

    `local_normaliser` is this call's own (summed weights, or count of non-zero weights), which `"global"`
    sums over the replicas in sync. `epsilon`, if given, is added to a `"global"` normaliser as it is to
    a call's own; an explicit count is divided by as given.

    Args:
        total: the scalar weighted sum of this call's token losses.
        local_normaliser: this call's own normaliser.
        normalizer: `"global"`, or a positive number or scalar tensor (the checked option).
        epsilon: the checked `epsilon` option, or None.

    Returns:
        The scalar `total / normaliser`; the normaliser is a constant for differentiation.
    """
    if isinstance(normalizer, str):
        count = global_sum(local_normaliser)
        if epsilon is None:
            return tf.math.divide_no_nan(total, count)
        return total / (count + _checks.cast_number(epsilon, count.dtype))
    count = tf.stop_gradient(tf.cast(normalizer, total.dtype))
    if not isinstance(normalizer, float):
        with tf.control_dependencies([tf.debugging.assert_positive(
                count, message="`normalizer` must be a positive token count")]):
            count = tf.identity(count)
    return total / count


def global_sum(value: tf.Tensor) -> tf.Tensor:
    """Returns `value` summed over the replicas in sync, or `value` where this call sees the whole batch.

    Outside a strategy there is one replica; in a cross-replica context (inside `strategy.scope()` but
    outside `strategy.run`) the call holds the whole batch, so its own value is already the global one.
    """
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return value
    # A constant for differentiation: the all-reduce's own gradient would be all-reduced again.
    return tf.stop_gradient(context.all_reduce(tf.distribute.ReduceOp.SUM, value))


def replicas_in_sync() -> int:
    """Returns the number of replicas a loss computed here is one of (1 outside a replica context)."""
    context = tf.distribute.get_replica_context()
    return 1 if context is None else context.num_replicas_in_sync


def undo_replica_scaling(loss: tf.Tensor) -> tf.Tensor:
    """Returns `loss` multiplied by the replicas in sync, for a caller that will divide it by them.

    A share of a global mean must reach the gradient as it is; tf_keras' `compile` and both Kerases'
    `add_loss` divide a replica's loss by the number of replicas, so the share is handed to them multiplied.
    Their logged value, the replica mean of what they received, is then the global mean.
    """
    replicas = replicas_in_sync()
    return loss if replicas == 1 else loss * tf.cast(replicas, loss.dtype)
