"""`SequenceLoss`: `sequence_loss` as a Keras loss, for `model.compile(loss=...)` and custom training loops.

Works with the Keras that `tf.keras` resolves to: Keras 3 (TensorFlow's default) or tf_keras, the Keras 2
that `TF_USE_LEGACY_KERAS=1` selects.
"""

from __future__ import annotations

import importlib
import re
from typing import Callable, Optional

import tensorflow as tf

from tf_seqloss import _checks
from tf_seqloss.sequence_loss import check_options, sequence_loss


def _keras_module():
    # `tf.keras` is a lazy alias whose namespace lacks `saving` under Keras 3; import the real package.
    legacy = tf.keras.losses.Loss.__module__.startswith("tf_keras")
    return importlib.import_module("tf_keras" if legacy else "keras")


keras = _keras_module()
IS_KERAS_3 = not keras.__version__.startswith("2.")

# Reductions that average what the flags leave unreduced, and whose result Keras 3 divides by the number of
# replicas under `tf.distribute` (tf_keras' `compile` divides itself).
_MEAN_REDUCTIONS = ("sum_over_batch_size", "mean", "mean_with_sample_weight", "auto")
_NO_REDUCTIONS = (None, "none")


@keras.saving.register_keras_serializable(package="tf_seqloss")
class SequenceLoss(keras.losses.Loss):
    """Returns `tf_seqloss.sequence_loss` of a batch, with Keras' padding routes as its weights.

    The loss to put in `model.compile(loss=...)` or call in a custom loop as
    `loss(y_true, y_pred, sample_weight)`, where `y_pred` are `[batch, time, classes]` logits and `y_true`
    are `[batch, time]` class ids (or `[batch, time, 1]`, or `[batch, time, classes]` probabilities).

    The weights of `sequence_loss` come from every route Keras users pad with, multiplied together:
    `sample_weight` (`[batch, time]`, `[batch, time, 1]`, `[batch]` per sequence, or a scalar), the Keras
    mask carried by `y_pred` (`Embedding(mask_zero=True)` propagated through recurrent and dense layers),
    and `padding_id` in `y_true`. So the default gives the contrib default, `sum(w * ce) / sum(w)` over
    the real tokens, whichever route marks the padding.

    The flags reduce as in `sequence_loss`; Keras' `reduction` then reduces whatever the flags leave
    unreduced (nothing, for the default flags):

    | flags set to True                       | `sequence_loss` | trained on with `"sum_over_batch_size"` |
    |-----------------------------------------|-----------------|-----------------------------------------|
    | `average_across_*` both (default)       | `[]`            | `sum(w * ce) / sum(w)`: token mean      |
    | `sum_over_*` both (TFA class default)   | `[]`            | `sum(w * ce) / count_nonzero(w)`        |
    | `average_across_timesteps`              | `[batch]`       | mean of the per-sequence token means    |
    | `average_across_batch`                  | `[time]`        | mean of the per-step means              |
    | `sum_over_timesteps` / `sum_over_batch` | `[batch]`/`[time]` | as above, dividing by non-zero counts |
    | none                                    | `[batch, time]` | `sum(w * ce) / (batch * time)`          |

    With `reduction="sum"` the non-scalar outputs are summed instead (no flags and `"sum"`: the summed
    token loss); with `"none"` they are returned as they are. `"mean"` and `"mean_with_sample_weight"`
    (Keras 3) average like `"sum_over_batch_size"`: the weights already act inside the flags.

    Unlike Keras' built-in losses, `sample_weight` here is contrib's `weights`, so a constant factor cancels
    in the averaging flags' ratio; scale a loss with `compile(loss_weights=...)` instead.

    Args:
        average_across_timesteps: as in `sequence_loss`: divide the sum over time by the summed weights.
            `None` (default) means True unless a `sum_over_*` flag is True, so that
            `SequenceLoss(sum_over_timesteps=True, sum_over_batch=True)` is TFA's `SequenceLoss()`.
        average_across_batch: as in `sequence_loss`: divide the sum over the batch by the summed weights.
            `None` (default) as for `average_across_timesteps`.
        sum_over_timesteps: as in `sequence_loss`: reduce over time, dividing by the non-zero weights.
        sum_over_batch: as in `sequence_loss`: reduce over the batch, dividing by the non-zero weights.
        softmax_loss_function: as in `sequence_loss`. To save it in a `.keras` file, register it with
            `@keras.saving.register_keras_serializable(package="...")`; a lambda saves, but loading it
            needs `safe_mode=False`.
        padding_id: keyword-only. A class id marking padding in sparse `y_true` (weight 0 there).
        label_smoothing: keyword-only. As in `sequence_loss`.
        epsilon: keyword-only. As in `sequence_loss`.
        implementation: keyword-only. As in `sequence_loss`.
        reduction: keyword-only. How Keras reduces what the flags leave unreduced; one of Keras'
            reductions (`"sum_over_batch_size"` default, `"sum"`, `"none"`; Keras 3 also `None`, `"mean"`,
            `"mean_with_sample_weight"`; tf_keras also `"auto"`).
        name: keyword-only. The loss's name.
        dtype: keyword-only. The dtype the loss is computed and returned in (a dtype name or a Keras
            dtype policy); `None` means `keras.backend.floatx()`. Logits are cast to it, except that a
            half-precision dtype (e.g. the compute dtype of `"mixed_float16"`) computes in float32, as
            `sequence_loss` does. tf_keras' `Loss` has no `dtype`; this class accepts it there too.

    Returns:
        A scalar loss (or the shape the flags and `reduction="none"` leave) in `dtype`: float32 by
        default, whatever the logits' dtype; float32 also for a half-precision `dtype`.

    Under `tf.distribute` each replica normalises by its own tokens and the replicas' losses are averaged,
    as Keras does for its built-in losses: Keras 3 divides by the number of replicas inside the loss (for
    the averaging reductions), tf_keras' `compile` does it outside.

    Example:

    >>> import numpy as np, tf_seqloss
    >>> loss = tf_seqloss.SequenceLoss()
    >>> logits = np.zeros([2, 3, 5], "float32")          # uniform over 5 classes
    >>> targets = np.array([[1, 2, 0], [4, 0, 0]])
    >>> weights = np.array([[1, 1, 1], [1, 0, 0]], "float32")
    >>> round(float(loss(targets, logits, sample_weight=weights)), 5)  # log(5)
    1.60944

    In `compile`:

    ```python
    model.compile(optimizer="adam", loss=tf_seqloss.SequenceLoss(padding_id=0))
    ```
    """

    def __init__(
        self,
        average_across_timesteps: Optional[bool] = None,
        average_across_batch: Optional[bool] = None,
        sum_over_timesteps: bool = False,
        sum_over_batch: bool = False,
        softmax_loss_function: Optional[Callable] = None,
        *,
        padding_id: Optional[int] = None,
        label_smoothing: float = 0.0,
        epsilon: Optional[float] = None,
        implementation: str = "auto",
        reduction="sum_over_batch_size",
        name: Optional[str] = None,
        dtype=None,
    ):
        # An unset averaging flag is True, as in contrib, unless a `sum_over_*` flag is set: then
        # `SequenceLoss(sum_over_timesteps=True, sum_over_batch=True)` is TFA's class default.
        summing = bool(sum_over_timesteps) or bool(sum_over_batch)
        if average_across_timesteps is None:
            average_across_timesteps = not summing
        if average_across_batch is None:
            average_across_batch = not summing
        if not isinstance(label_smoothing, (int, float)) or isinstance(label_smoothing, bool):
            raise TypeError(
                f"`label_smoothing` must be a Python number. Received: label_smoothing={label_smoothing!r}")
        check_options(average_across_timesteps, average_across_batch, sum_over_timesteps, sum_over_batch,
                      softmax_loss_function, padding_id, label_smoothing, epsilon, implementation)

        if IS_KERAS_3:
            super().__init__(name=name, reduction=reduction, dtype=dtype)
        else:
            super().__init__(reduction=reduction, name=name)
        self.average_across_timesteps = average_across_timesteps
        self.average_across_batch = average_across_batch
        self.sum_over_timesteps = sum_over_timesteps
        self.sum_over_batch = sum_over_batch
        self.softmax_loss_function = softmax_loss_function
        self.padding_id = padding_id
        self.label_smoothing = label_smoothing
        self.epsilon = epsilon
        self.implementation = implementation
        self._dtype_argument = dtype
        self._loss_dtype = _dtype_name(dtype)

    @property
    def dtype(self) -> str:
        """The dtype the loss is returned in (before `sequence_loss`'s float32 for half precision)."""
        return self._loss_dtype

    def __call__(self, y_true, y_pred, sample_weight=None):
        # Keras' own `Loss.__call__` applies `sample_weight` after `call` and divides by a count, so it
        # cannot give contrib's `sum(w * ce) / sum(w)` (tf_keras has no such reduction at all, and the
        # `sum_over_*` and single-axis flags need the weights inside the reduction). This keeps its
        # contract (same signature, masks, `reduction`, replica scaling) but hands the weights to
        # `sequence_loss`.
        return self._reduced_loss(y_true, y_pred, sample_weight, scale_for_replicas=True)

    def call(self, y_true, y_pred):
        """Returns `sequence_loss` with the flags, weighted by `y_pred`'s Keras mask and `padding_id` only."""
        return self._weighted_loss(y_true, y_pred, None)

    def get_config(self) -> dict:
        config = super().get_config()
        fn = self.softmax_loss_function
        config.update(
            average_across_timesteps=self.average_across_timesteps,
            average_across_batch=self.average_across_batch,
            sum_over_timesteps=self.sum_over_timesteps,
            sum_over_batch=self.sum_over_batch,
            softmax_loss_function=None if fn is None else keras.saving.serialize_keras_object(fn),
            padding_id=self.padding_id,
            label_smoothing=self.label_smoothing,
            epsilon=self.epsilon,
            implementation=self.implementation,
            dtype=_dtype_config(self._dtype_argument),
        )
        return config

    @classmethod
    def from_config(cls, config: dict) -> "SequenceLoss":
        config = dict(config)
        fn = config.get("softmax_loss_function")
        if fn is not None and not callable(fn):
            config["softmax_loss_function"] = _deserialize_function(fn)
        return cls(**config)

    def _scope_name(self) -> str:
        name = re.sub(r"[^A-Za-z0-9_.\-]", "_", self.name or type(self).__name__).lstrip("_.-")
        return name or "sequence_loss"

    def _weighted_loss(self, y_true, y_pred, sample_weight):
        mask = getattr(y_pred, "_keras_mask", None)  # Where both Kerases keep a tensor's mask.
        logits = tf.convert_to_tensor(y_pred)
        dtype = tf.as_dtype(self._loss_dtype)
        if logits.dtype.is_floating and dtype not in (tf.float16, tf.bfloat16) and logits.dtype != dtype:
            logits = tf.cast(logits, dtype)
        targets = _standardize_targets(y_true, logits)
        weights_dtype = _checks.compute_dtype(logits.dtype) if logits.dtype.is_floating else tf.float32
        weights = _merge_weights(sample_weight, mask, targets, weights_dtype)
        return sequence_loss(
            logits, targets, weights,
            self.average_across_timesteps, self.average_across_batch,
            self.sum_over_timesteps, self.sum_over_batch,
            self.softmax_loss_function,
            padding_id=self.padding_id, label_smoothing=self.label_smoothing,
            epsilon=self.epsilon, implementation=self.implementation,
        )

    def _reduced_loss(self, y_true, y_pred, sample_weight, scale_for_replicas):
        """Returns the loss reduced by `reduction`; `scale_for_replicas=False` for `add_loss`, which Keras scales."""
        with tf.name_scope(self._scope_name()):
            loss = self._weighted_loss(y_true, y_pred, sample_weight)
            if loss.shape.rank and self.reduction not in _NO_REDUCTIONS:
                loss = tf.reduce_sum(loss) if self.reduction == "sum" else tf.reduce_mean(loss)
            if scale_for_replicas:
                loss = self._scale_for_replicas(loss)
            return loss

    def _scale_for_replicas(self, loss):
        if IS_KERAS_3 and self.reduction in _MEAN_REDUCTIONS:
            # Keras 3 sums the replicas' gradients and expects each replica's loss divided by their
            # number (its `fit` multiplies back for the logged loss); tf_keras' `compile` divides itself.
            replicas = tf.distribute.get_strategy().num_replicas_in_sync
            if replicas > 1:
                loss = loss * tf.cast(1.0 / replicas, loss.dtype)
        return loss


def _standardize_targets(y_true, logits):
    """Returns `[batch, time]` integer ids or `[batch, time, classes]` probabilities."""
    targets = tf.convert_to_tensor(y_true)
    classes = logits.shape[-1] if logits.shape.rank else None
    if targets.shape.rank == 3 and targets.shape[-1] == 1 and classes != 1:
        targets = tf.squeeze(targets, axis=-1)  # Sparse ids with a trailing axis, as Keras accepts.
    if targets.shape.rank == 2 and targets.dtype.is_floating:
        targets = tf.cast(targets, tf.int64)  # Keras may hand class ids over as floats.
    return targets


def _merge_weights(sample_weight, mask, targets, dtype):
    """Returns `sample_weight * mask` as `[batch, time]` weights in `dtype`, or None when both are None."""
    weights = None
    if sample_weight is not None:
        weights = tf.convert_to_tensor(sample_weight)
        if weights.dtype != dtype:
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
    if mask is not None:
        mask = tf.cast(mask, dtype)
        weights = mask if weights is None else weights * mask
    return weights


def _dtype_name(dtype) -> str:
    """Returns the name of the dtype a loss built with `dtype` is computed in."""
    if dtype is None:
        return keras.backend.floatx()
    compute = getattr(dtype, "compute_dtype", None)  # A Keras dtype policy.
    if compute is not None:
        return tf.as_dtype(compute).name
    if isinstance(dtype, str) and dtype.startswith("mixed_"):
        return dtype[len("mixed_"):]
    try:
        resolved = tf.as_dtype(dtype)
    except TypeError:
        resolved = None
    if resolved is None or not resolved.is_floating:
        raise ValueError(
            "`dtype` must be None, a floating dtype name (e.g. 'float32') or a Keras dtype policy "
            f"(e.g. 'mixed_float16'). Received: dtype={dtype!r}"
        )
    return resolved.name


def _dtype_config(dtype):
    if dtype is None or isinstance(dtype, str):
        return dtype
    name = getattr(dtype, "name", None)
    return name if isinstance(name, str) else str(dtype)


def _deserialize_function(config):
    try:
        return keras.saving.deserialize_keras_object(config)
    except (ValueError, TypeError, AttributeError) as err:
        raise ValueError(
            "Could not restore `softmax_loss_function` of `SequenceLoss` from its saved config "
            f"({_describe(config)}): {err}\nA function round-trips when Keras can find it by name: "
            "decorate it with "
            "`@keras.saving.register_keras_serializable(package='my_package')` and import its module before "
            "loading. A lambda is stored as bytecode, which safe mode refuses; load with `safe_mode=False` "
            "only if you trust the file."
        ) from err


def _describe(config) -> str:
    if isinstance(config, dict):
        return f"class_name={config.get('class_name')!r}, name={str(config.get('config'))[:60]!r}"
    return repr(config)[:80]
