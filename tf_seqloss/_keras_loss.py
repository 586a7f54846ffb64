"""`SequenceLoss`: `sequence_loss` as a Keras loss, for `model.compile(loss=...)` and custom training loops.

Works with the Keras that `tf.keras` resolves to: Keras 3 (TensorFlow's default) or tf_keras, the Keras 2
that `TF_USE_LEGACY_KERAS=1` selects.
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from typing import Any, Callable, Optional, Union

import tensorflow as tf
from tensorflow.types.experimental import TensorLike

from tf_seqloss import _checks, _distribute, _keras
from tf_seqloss._keras import IS_KERAS_3, keras
from tf_seqloss._options import LossOptions, expose, for_add_loss, reduce_for_keras
from tf_seqloss._sequence_loss import compute_sequence_loss


@keras.saving.register_keras_serializable(package="tf_seqloss")
@expose()
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
            `@keras.saving.register_keras_serializable(package="...")`. Loading in safe mode (the default
            of `load_model`, and of `from_config` outside a load) accepts only a registered function or
            class, one passed in `custom_objects`, or a Keras built-in function, and never imports a
            module the file names, under Keras 3 and tf_keras alike; anything else (a lambda, a function
            of another module) raises a `ValueError` and loads only with `safe_mode=False`.
        padding_id: keyword-only. A class id marking padding in sparse `y_true` (weight 0 there).
        from_logits: keyword-only. True (default): `y_pred` are logits. False: `y_pred` are
            probabilities (the output of a softmax), and each token's loss is that of Keras'
            `SparseCategoricalCrossentropy(from_logits=False)` for class ids, `-log(p[y] / sum(p))` of the
            probabilities clipped to `[eps, 1 - eps]` (`eps = keras.backend.epsilon()`, 1e-7), and of
            `CategoricalCrossentropy(from_logits=False)` for probability targets, `-sum(y * log(q))` with
            `q` each row divided by its sum, then clipped. As in Keras, a `y_pred` that a traced graph
            (`fit`, `evaluate`, a `tf.function`) computes with a `Softmax` op is replaced by that op's
            input, so the loss is computed from the logits without clipping; eagerly the probabilities
            are used as they are. Combines with every option but `softmax_loss_function`, which
            receives `y_pred` as it is (`ValueError`); `label_smoothing` smooths the targets as for
            logits. The padding rules hold: padded positions (even `inf` or `NaN`) change neither the
            loss nor the gradient. With the default, a `y_pred` that looks like probabilities (a
            `Softmax` op in a traced graph; eagerly, on the first call, rows that are non-negative and
            sum to 1) gets a warning, once per loss object; the result is unchanged.
        label_smoothing: keyword-only. As in `sequence_loss`.
        z_loss: keyword-only. As in `sequence_loss`: adds `z_loss * logsumexp(logits)**2` to every
            token's loss. Not allowed with `softmax_loss_function` or `from_logits=False`.
        logit_soft_cap: keyword-only. As in `sequence_loss`: `None`, or a positive finite `cap` that
            turns the logits into `cap * tanh(logits / cap)` before the softmax. Saved in the config.
        epsilon: keyword-only. As in `sequence_loss`.
        implementation: keyword-only. As in `sequence_loss`.
        normalizer: keyword-only. As in `sequence_loss`, a Python number or `"global"`. With `"global"`,
            `fit` under any `tf.distribute` strategy trains on and logs the global token mean of each batch
            (see below).
        reduction: keyword-only. How Keras reduces what the flags leave unreduced; one of Keras'
            reductions (`"sum_over_batch_size"` default, `"sum"`, `"none"`; Keras 3 also `None`, `"mean"`,
            `"mean_with_sample_weight"`; tf_keras also `"auto"`).
        name: keyword-only. The loss's name.
        dtype: keyword-only. The dtype the loss is computed and returned in (a dtype name or a Keras
            dtype policy); `None` means `keras.backend.floatx()`. Logits are cast to it, except where
            they are computed in it anyway: half-precision logits and a half-precision or float32 dtype
            (e.g. a `"mixed_bfloat16"` model's logits) compute in float32, as `sequence_loss` does, without
            a float32 copy. tf_keras' `Loss` has no `dtype`; this class accepts it there too.

    Returns:
        A scalar loss (or the shape the flags and `reduction="none"` leave) in `dtype`, float32 by
            default whatever the logits' dtype, and float32 also for a half-precision `dtype`.

    Raises:
        ValueError: conflicting flags, an option out of its range (`label_smoothing` outside `[0, 1]`, a
            negative `z_loss` or `epsilon`, an unknown `implementation` or `normalizer`), an option not
            allowed with another (`z_loss` or `from_logits=False` with `softmax_loss_function`), an
            unknown `reduction`, or a `dtype` that is not a floating dtype or policy. When called, as
            `sequence_loss`, for inputs of the wrong rank or sizes that disagree.
        TypeError: an option of the wrong type (a flag that is not a bool, a `padding_id` that is not an
            int, a `softmax_loss_function` that is not callable, a `name` that is not a string). When
            called, as `sequence_loss`, for inputs of the wrong dtype.

    Under `tf.distribute` each replica normalises by its own tokens and the replicas' losses are averaged,
    as Keras does for its built-in losses: Keras 3 divides by the number of replicas inside the loss (for
    the averaging reductions), tf_keras' `compile` does it outside. With `normalizer="global"` each replica
    divides its weighted sum by the weights of all replicas instead, so the gradients the strategy sums are
    those of the global token mean; the loss returns that share as each Keras's `compile` expects it
    (Keras 3: as it is; tf_keras, averaging reductions: times the replicas, which `compile` divides by), so
    the logged loss of a batch is the global token mean when the replicas hold equal numbers of sequences.

    Example:

    >>> import numpy as np, tf_seqloss
    >>> loss = tf_seqloss.SequenceLoss()
    >>> logits = np.zeros([2, 3, 5], "float32")          # uniform over 5 classes
    >>> targets = np.array([[1, 2, 0], [4, 0, 0]])
    >>> weights = np.array([[1, 1, 1], [1, 0, 0]], "float32")
    >>> round(float(loss(targets, logits, sample_weight=weights)), 5)  # log(5)
    1.60944

    In `compile` (`tf.keras` is Keras 3, or tf_keras with `TF_USE_LEGACY_KERAS=1`):

    >>> import tensorflow as tf
    >>> keras = tf.keras
    >>> model = keras.Sequential([keras.Input((None,), dtype="int32"), keras.layers.Embedding(10, 8),
    ...                           keras.layers.Dense(10, kernel_initializer="zeros")])   # uniform at first
    >>> model.compile(optimizer="adam", loss=tf_seqloss.SequenceLoss(padding_id=0))
    >>> round(float(model.evaluate(np.array([[4, 5, 0]]), np.array([[5, 6, 0]]), verbose=0)), 4)   # log(10)
    2.3026

    In a custom training step:

    >>> loss_fn = tf_seqloss.SequenceLoss(padding_id=0)
    >>> with tf.GradientTape() as tape:
    ...     loss = loss_fn(np.array([[5, 6, 0]]), model(np.array([[4, 5, 0]])))
    >>> gradients = tape.gradient(loss, model.trainable_variables)
    >>> round(float(loss), 4), all(g is not None for g in gradients)
    (2.3026, True)
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
        reduction: Optional[str] = "sum_over_batch_size",
        name: Optional[str] = None,
        dtype: Optional[Union[str, Any]] = None,
        normalizer: Optional[Union[str, float]] = None,
        from_logits: bool = True,
        z_loss: float = 0.0,
        logit_soft_cap: Optional[float] = None,
    ) -> None:
        # An unset averaging flag is True, as in contrib, unless a `sum_over_*` flag is set: then
        # `SequenceLoss(sum_over_timesteps=True, sum_over_batch=True)` is TFA's class default.
        options = LossOptions(
            average_across_timesteps, average_across_batch, sum_over_timesteps, sum_over_batch,
            label_smoothing=label_smoothing, z_loss=z_loss, normalizer=normalizer, epsilon=epsilon,
            padding_id=padding_id, from_logits=from_logits, softmax_loss_function=softmax_loss_function,
            implementation=implementation, logit_soft_cap=logit_soft_cap,
            allow_tensors=False)  # a tensor cannot be saved in the config

        _checks.check_name(name, "SequenceLoss")
        loss_dtype = _dtype_name(dtype)  # before Keras 3's own check, whose message does not name `dtype`
        if IS_KERAS_3:
            super().__init__(name=name, reduction=reduction, dtype=dtype)
        else:
            super().__init__(reduction=reduction, name=name)
        self._options = options
        # Warned about probabilities given as logits; checked their values eagerly (once, it costs a pass).
        self._warned_probabilities = False
        self._checked_values = False
        self._dtype_argument = dtype
        self._loss_dtype = loss_dtype

    @property
    def dtype(self) -> str:
        """The name of the dtype the loss is returned in: float32 for a half-precision `dtype`."""
        return _checks.compute_dtype(tf.as_dtype(self._loss_dtype)).name

    @tf.autograph.experimental.do_not_convert
    def __call__(self, y_true: TensorLike, y_pred: TensorLike, sample_weight: Optional[TensorLike] = None) -> tf.Tensor:
        """Returns the loss of a batch, reduced by the flags and then by `reduction`.

        Args:
            y_true: `[batch, time]` class ids (or `[batch, time, 1]`), or `[batch, time, classes]`
                probabilities; may be ragged.
            y_pred: `[batch, time, classes]` logits (probabilities with `from_logits=False`); may be
                ragged. A Keras mask on it marks padding.
            sample_weight: optional weights: `[batch, time]`, `[batch, time, 1]`, `[batch]` per sequence,
                or a scalar. `None` means all ones.

        Returns:
            The loss, in the loss's `dtype`: a scalar for the default flags.

        Raises:
            ValueError: as `sequence_loss`, for inputs of the wrong rank or sizes that disagree.
            TypeError: as `sequence_loss`, for inputs of the wrong dtype.

        Example:

        >>> import numpy as np, tf_seqloss
        >>> logits = np.zeros([2, 3, 4], "float32")          # uniform over 4 classes
        >>> targets = np.array([[1, 2, 0], [3, 0, 0]])
        >>> per_sequence = tf_seqloss.SequenceLoss(average_across_batch=False, reduction="none")
        >>> np.round(per_sequence(targets, logits, sample_weight=np.array([1.0, 0.0])).numpy(), 4)
        array([1.3863, 0.    ], dtype=float32)
        """
        # Keras' own `Loss.__call__` multiplies the output of `call` by `sample_weight` and then reduces.
        # Keras 3's `"mean_with_sample_weight"` would give the default flags' `sum(w * ce) / sum(w)`, but
        # tf_keras has no such reduction, and the `sum_over_*` and single-axis flags need the weights
        # inside their reduction. So this keeps the base contract (same signature, masks, `reduction`,
        # replica scaling) and hands the weights to the sequence loss itself.
        return reduced_loss(self, y_true, y_pred, sample_weight, scale_for_replicas=True)

    @tf.autograph.experimental.do_not_convert
    def call(self, y_true: TensorLike, y_pred: TensorLike) -> tf.Tensor:
        """Returns `sequence_loss` with the flags, weighted by `y_pred`'s Keras mask and `padding_id` only.

        Keras' `Loss.call`: the loss before `reduction`, without `sample_weight`; `__call__` is what
        `compile` and a custom loop call.

        Args:
            y_true: as in `__call__`.
            y_pred: as in `__call__`.

        Returns:
            The loss reduced by the flags only.

        Raises:
            ValueError: as `sequence_loss`, for inputs of the wrong rank or sizes that disagree.
            TypeError: as `sequence_loss`, for inputs of the wrong dtype.
        """
        return self._weighted_loss(y_true, y_pred, None)

    def get_config(self) -> dict:
        """Returns the loss's config: `name`, `reduction`, `dtype` and every option.

        Returns:
            A JSON-serialisable dict that `from_config` rebuilds the loss from; a `softmax_loss_function`
                is saved as Keras serialises a function.
        """
        config = super().get_config()
        config.update(self._options.config(),
                      softmax_loss_function=_keras.serialize_function(self.softmax_loss_function),
                      dtype=_dtype_config(self._dtype_argument))
        return config

    @classmethod
    def from_config(cls, config: dict) -> "SequenceLoss":
        """Returns a loss built from `get_config()`'s dict, resolving a saved `softmax_loss_function`.

        Args:
            config: a dict from `get_config()`.

        Returns:
            A new `SequenceLoss`.

        Raises:
            ValueError: `softmax_loss_function` names a function that is not registered with Keras, or
                one that safe mode refuses to load.
        """
        config = dict(config)
        config["softmax_loss_function"] = _keras.deserialize_function(
            config.get("softmax_loss_function"), cls.__name__, "softmax_loss_function")
        return cls(**config)

    def _scope_name(self) -> str:
        name = re.sub(r"[^A-Za-z0-9_.\-]", "_", self.name or type(self).__name__).lstrip("_.-")
        return name or "sequence_loss"

    def _weighted_loss(self, y_true, y_pred, sample_weight, *, lengths=None, mask=None,
                       owner: str = "SequenceLoss"):
        if mask is None:
            mask = _keras.get_mask(y_pred)
        options = self._options
        if options.from_logits:
            self._warn_if_probabilities(y_pred, owner)
        else:
            softmax_input = _softmax_input(y_pred)
            if softmax_input is not None:  # As Keras does: the logits, exact where clipping would not be.
                y_pred, options = softmax_input, dataclasses.replace(options, from_logits=True)
        logits = y_pred if isinstance(y_pred, tf.RaggedTensor) else tf.convert_to_tensor(y_pred)
        dtype = tf.as_dtype(self._loss_dtype)
        # Logits whose computation dtype is the returned dtype's go in as they are: half-precision logits are
        # computed in float32 inside (under a mixed-precision policy a float32 copy beside them cost a third
        # more memory in `fit`, benchmarks/README.md, "Whole training steps"). Any other mismatch is cast to
        # the returned dtype, float32 for a half `dtype`.
        if logits.dtype.is_floating and _checks.compute_dtype(logits.dtype) != _checks.compute_dtype(dtype):
            logits = tf.cast(logits, self.dtype)
        return compute_sequence_loss(
            logits, standardize_targets(y_true, logits), options, sample_weight=sample_weight, lengths=lengths,
            mask=mask, probability_epsilon=keras.backend.epsilon())

    def _warn_if_probabilities(self, y_pred, owner: str) -> None:
        """Warns once when `y_pred` looks like probabilities; reads `y_pred` only, never changes the loss."""
        if self._warned_probabilities:
            return
        if _softmax_input(y_pred) is not None:
            evidence = "was computed by a `Softmax` op"
        elif tf.executing_eagerly() and not self._checked_values:
            verdict = _rows_look_like_probabilities(y_pred)
            if verdict is None:  # No finite row to judge by: look again next time.
                return
            self._checked_values = True
            if not verdict:
                return
            evidence = "has rows that are non-negative and sum to 1"
        else:
            return
        self._warned_probabilities = True
        warnings.warn(
            f"`{owner}` received `from_logits=True`, but `y_pred` {evidence}: it looks like probabilities, "
            "not logits, and the loss of probabilities taken as logits stays near log(classes). Pass the "
            "logits (drop the final softmax), or set `from_logits=False`. (Shown once per loss object.)",
            UserWarning, stacklevel=4)


@tf.autograph.experimental.do_not_convert
def reduced_loss(loss: SequenceLoss, y_true, y_pred, sample_weight, *, lengths=None, mask=None,
                 scale_for_replicas: bool, owner: str = "SequenceLoss") -> tf.Tensor:
    """Returns `loss`'s value reduced by its `reduction`: what `SequenceLoss.__call__` and `SequenceLossLayer.call` use.

    Args:
        loss: the `SequenceLoss` whose options and reduction apply.
        y_true: the targets.
        y_pred: the logits (or probabilities).
        sample_weight: Keras' weights, or None.
        lengths: `[batch]` lengths, or None.
        mask: a Keras mask, or None (then `y_pred`'s own is read).
        scale_for_replicas: True for a loss `compile` takes; False for `add_loss`, which Keras scales.
        owner: the public class named in warnings.

    Returns:
        The reduced loss.
    """
    with tf.name_scope(loss._scope_name()):
        value = loss._weighted_loss(y_true, y_pred, sample_weight, lengths=lengths, mask=mask, owner=owner)
        if not scale_for_replicas:  # for a layer's `add_loss`
            return for_add_loss(value, loss._options, loss.reduction)
        value = reduce_for_keras(value, loss.reduction)
        if loss.normalizer is not None:
            # A share of the global mean already; tf_keras' `compile` divides a mean by the replicas.
            if not IS_KERAS_3 and loss.reduction in _keras.MEAN_REDUCTIONS:
                value = _distribute.undo_replica_scaling(value)
            return value
        return _keras.scale_for_replicas(value, loss.reduction)


# Rows of an eager `y_pred` judged by `_rows_look_like_probabilities`: a bounded, one-off cost.
_ROWS_CHECKED = 1024


def _softmax_input(y_pred):
    """Returns the logits a traced `Softmax` op turned into `y_pred`, or None.

    The op is known while tracing only (eager tensors keep no op); Keras' own cross-entropies look at the
    same op. A `Softmax` op always normalises the last axis.
    """
    if not isinstance(y_pred, tf.Tensor) or not tf.is_symbolic_tensor(y_pred):
        return None
    op = getattr(y_pred, "op", None)
    if op is None or op.type != "Softmax" or len(op.inputs) != 1:
        return None
    return op.inputs[0]


def _rows_look_like_probabilities(y_pred) -> Optional[bool]:
    """Returns whether the first rows of an eager `y_pred` are probabilities (None: no finite row to judge).

    Probabilities: every finite row is non-negative and sums to 1 (within the rounding of its dtype).
    Rows holding `inf` or `NaN` (e.g. padding) are ignored.
    """
    values = y_pred.flat_values if isinstance(y_pred, tf.RaggedTensor) else tf.convert_to_tensor(y_pred)
    classes = values.shape[-1] if values.shape.rank else None
    if not values.dtype.is_floating or classes is None or classes < 2:
        return False
    rows = tf.reshape(values, [-1, classes])[:_ROWS_CHECKED]
    tolerance = 1e-2 if values.dtype in (tf.float16, tf.bfloat16) else 1e-3
    rows = tf.cast(rows, tf.float64 if values.dtype == tf.float64 else tf.float32)
    finite = tf.reduce_all(tf.math.is_finite(rows), axis=-1)
    probability = tf.logical_and(tf.reduce_min(rows, axis=-1) >= 0,
                                 tf.abs(tf.reduce_sum(rows, axis=-1) - 1) <= tolerance)
    if not bool(tf.reduce_any(finite)):
        return None
    return bool(tf.reduce_all(tf.logical_or(probability, tf.logical_not(finite))))


def standardize_targets(y_true, logits):
    """Returns `[batch, time]` integer ids or `[batch, time, classes]` probabilities.

    Args:
        y_true: Keras' targets: ids (possibly float, possibly `[batch, time, 1]`) or probabilities.
        logits: the logits, whose class count tells a trailing 1 apart from one class.

    Returns:
        The targets, squeezed and cast to int64 where Keras handed ids over as floats.
    """
    if isinstance(y_true, tf.RaggedTensor):
        return y_true
    targets = tf.convert_to_tensor(y_true)
    classes = logits.shape[-1] if logits.shape.rank else None
    if targets.shape.rank == 3 and targets.shape[-1] == 1 and classes != 1:
        targets = tf.squeeze(targets, axis=-1)  # Sparse ids with a trailing axis, as Keras accepts.
    if targets.shape.rank == 2 and targets.dtype.is_floating:
        targets = tf.cast(targets, tf.int64)  # Keras may hand class ids over as floats.
    return targets


def _dtype_name(dtype) -> str:
    """Returns the name of the dtype a loss built with `dtype` is computed in."""
    if dtype is None:
        return keras.backend.floatx()
    # Resolved as the running Keras resolves a layer's `dtype`, so that tf_keras (whose `Loss` takes no
    # `dtype`) refuses `"mixed_<anything>"` here rather than at the first call.
    return tf.as_dtype(_checks.dtype_policy(dtype, "SequenceLoss", floating=True).compute_dtype).name


def _dtype_config(dtype):
    if dtype is None or isinstance(dtype, str):
        return dtype
    name = getattr(dtype, "name", None)
    return name if isinstance(name, str) else str(dtype)
