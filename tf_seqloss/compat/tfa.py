"""TensorFlow Addons 0.23's `tfa.seq2seq.sequence_loss` and `tfa.seq2seq.SequenceLoss`, on `tf_seqloss`.

Changing the import is the whole migration:

```python
# import tensorflow_addons as tfa; loss = tfa.seq2seq.sequence_loss(logits, targets, weights)
from tf_seqloss.compat import tfa
loss = tfa.sequence_loss(logits, targets, weights)
```

What is TFA's here: the function's and the class's defaults (the class defaults to `sum_over_timesteps=True,
sum_over_batch=True` with both averages off), the class returning whatever the flags leave (a `[batch]`,
`[time]` or `[batch, time]` loss comes back as it is, with no Keras reduction), the order of the checks
and their `ValueError` texts, and the values and gradients (tested against recorded TFA 0.23 outputs).

What is not: the loss is computed by `tf_seqloss.sequence_loss`, so half-precision logits give a float32
loss, weights of another float dtype are cast rather than rejected, an out-of-range target id gives NaN
rather than an error, and `weights=None` (or `sample_weight=None`) means all ones where TFA crashed. The
class also works under Keras 3 (TFA's needed tf_keras) and has a `get_config`.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Tuple

import tensorflow as tf
from tensorflow.types.experimental import TensorLike

import tf_seqloss
from tf_seqloss._keras import keras as _keras
from tf_seqloss._keras import not_converted

__all__ = ["SequenceLoss", "sequence_loss"]


@tf.autograph.experimental.do_not_convert
def sequence_loss(
    logits: TensorLike,
    targets: TensorLike,
    weights: TensorLike,
    average_across_timesteps: bool = True,
    average_across_batch: bool = True,
    sum_over_timesteps: bool = False,
    sum_over_batch: bool = False,
    softmax_loss_function: Optional[Callable] = None,
    name: Optional[str] = None,
) -> tf.Tensor:
    """Returns TFA 0.23's `tfa.seq2seq.sequence_loss`: the weighted cross-entropy, reduced by the flags.

    Same arguments, defaults, checks and results as TFA's function; see `tf_seqloss.sequence_loss` for
    the table of what the flags give. `softmax_loss_function` is called as
    `softmax_loss_function(labels=..., logits=...)`, as TFA required.

    Args:
        logits: `[batch, time, classes]` float logits.
        targets: `[batch, time]` integer class ids, or `[batch, time, classes]` probabilities.
        weights: `[batch, time]` float weights (TFA required them; `None` here means all ones).
        average_across_timesteps: divide the sum over time by the summed weights over time.
        average_across_batch: divide the sum over the batch by the summed weights over the batch.
        sum_over_timesteps: reduce over time, dividing by the number of non-zero weights.
        sum_over_batch: reduce over the batch, dividing by the number of non-zero weights.
        softmax_loss_function: a replacement per-token loss, as in `tf_seqloss.sequence_loss`.
        name: name scope of the operations.

    Returns:
        The reduced loss, as `tf_seqloss.sequence_loss` returns it for the flags: `[]` for the defaults.

    Raises:
        ValueError: with TFA's own messages, for `logits` not of rank 3, `targets` not of rank 2 or 3,
            `weights` not of rank 2, and conflicting flags (e.g. "... because of ambiguous order"); then
            as `tf_seqloss.sequence_loss`, e.g. for sizes that disagree.
        TypeError: as `tf_seqloss.sequence_loss`, for inputs of the wrong dtype.

    Example:

    Migrating is changing the import; the call stays as it was:

    >>> import numpy as np
    >>> from tf_seqloss.compat import tfa    # was: import tensorflow_addons as tfa
    >>> logits = np.zeros([2, 3, 4], "float32")               # uniform over 4 classes
    >>> targets = np.array([[1, 2, 0], [3, 0, 0]])
    >>> weights = np.array([[1, 1, 1], [1, 0, 0]], "float32")
    >>> round(float(tfa.sequence_loss(logits, targets, weights)), 4)   # was: tfa.seq2seq.sequence_loss
    1.3863
    >>> tfa.sequence_loss(logits, targets, weights, average_across_batch=False).shape   # [batch]
    TensorShape([2])
    """
    logits, targets, weights = _check(logits, targets, weights, average_across_timesteps,
                                      average_across_batch, sum_over_timesteps, sum_over_batch)
    return tf_seqloss.sequence_loss(
        logits, targets, weights,
        average_across_timesteps=average_across_timesteps,
        average_across_batch=average_across_batch,
        sum_over_timesteps=sum_over_timesteps,
        sum_over_batch=sum_over_batch,
        softmax_loss_function=softmax_loss_function,
        name=name,
    )


def _check(logits: tf.Tensor, targets: tf.Tensor, weights: tf.Tensor, average_across_timesteps: bool,
           average_across_batch: bool, sum_over_timesteps: bool,
           sum_over_batch: bool) -> Tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """Raises TFA's errors in TFA's order, so code and tests matching its messages keep working."""
    logits = tf.convert_to_tensor(logits)
    targets = tf.convert_to_tensor(targets)
    if logits.shape.rank != 3:
        raise ValueError("Logits must be a [batch_size x sequence_length x logits] tensor")
    if targets.shape.rank not in (2, 3):
        raise ValueError(
            "Targets must be either a [batch_size x sequence_length] tensor "
            "where each element contains the labels' index"
            "or a [batch_size x sequence_length x num_classes] tensor "
            "where the third axis is a one-hot representation of the labels"
        )
    if weights is not None:
        weights = tf.convert_to_tensor(weights)
        if weights.shape.rank != 2:
            raise ValueError("Weights must be a [batch_size x sequence_length] tensor")
    if average_across_timesteps and sum_over_timesteps:
        raise ValueError(
            "average_across_timesteps and sum_over_timesteps cannot be set to True at same time.")
    if average_across_batch and sum_over_batch:
        raise ValueError("average_across_batch and sum_over_batch cannot be set to True at same time.")
    if average_across_batch and sum_over_timesteps:
        raise ValueError(
            "average_across_batch and sum_over_timesteps cannot be set to True at same time because of "
            "ambiguous order.")
    if sum_over_batch and average_across_timesteps:
        raise ValueError(
            "sum_over_batch and average_across_timesteps cannot be set to True at same time because of "
            "ambiguous order.")
    return logits, targets, weights


def _check_type(argument: str, value: Any, expected: tuple, names: str) -> None:
    # TFA's class was `@typechecked`; keep a TypeError for the same mistakes, in this package's wording.
    if not isinstance(value, expected) or (bool not in expected and isinstance(value, bool)):
        raise TypeError(f"`{argument}` must be {names}. Received: {argument}={value!r}")


@_keras.saving.register_keras_serializable(package="tf_seqloss.compat.tfa")
class SequenceLoss(_keras.losses.Loss):
    """Returns TFA 0.23's `tfa.seq2seq.SequenceLoss`: `sequence_loss` with TFA's class defaults.

    Called as `loss(y_true, y_pred, sample_weight)`, it returns `sequence_loss(y_pred, y_true,
    sample_weight, **flags)` exactly, whatever its rank: the defaults (`sum_over_timesteps=True,
    sum_over_batch=True`) give a scalar, the mean over non-zero weights; other flags give `[batch]`,
    `[time]` or `[batch, time]`, returned as they are (no Keras reduction, as in TFA). In `compile`,
    tf_keras trains on the sum of a non-scalar loss and reports its mean, as it did with TFA; Keras 3
    averages it.

    Args:
        average_across_timesteps: as in `sequence_loss`; default False.
        average_across_batch: as in `sequence_loss`; default False.
        sum_over_timesteps: as in `sequence_loss`; default True.
        sum_over_batch: as in `sequence_loss`; default True.
        softmax_loss_function: as in `sequence_loss`.
        name: the loss's name.
        **kwargs: passed to `keras.losses.Loss`; a `reduction` (which `from_config` passes back) is
            ignored: the loss always returns what the flags leave, as TFA's did.

    Raises:
        TypeError: a flag that is not a bool, a `softmax_loss_function` that is not callable, or a `name`
            that is not a string.
        ValueError: when called, with TFA's messages, as `sequence_loss` (conflicting flags, wrong ranks).

    Example:

    >>> import numpy as np
    >>> from tf_seqloss.compat import tfa
    >>> logits = np.zeros([2, 3, 4], "float32")               # uniform over 4 classes
    >>> targets = np.array([[1, 2, 0], [3, 0, 0]])
    >>> weights = np.array([[1, 1, 1], [1, 0, 0]], "float32")
    >>> round(float(tfa.SequenceLoss()(targets, logits, weights)), 5)   # log(4)
    1.38629
    >>> tfa.SequenceLoss(sum_over_timesteps=False)(targets, logits, weights).shape   # [time]
    TensorShape([3])
    """

    def __init__(
        self,
        average_across_timesteps: bool = False,
        average_across_batch: bool = False,
        sum_over_timesteps: bool = True,
        sum_over_batch: bool = True,
        softmax_loss_function: Optional[Callable] = None,
        name: Optional[str] = None,
        **kwargs: Any,
    ) -> None:
        for flag, value in (("average_across_timesteps", average_across_timesteps),
                            ("average_across_batch", average_across_batch),
                            ("sum_over_timesteps", sum_over_timesteps), ("sum_over_batch", sum_over_batch)):
            _check_type(flag, value, (bool,), "a bool")
        if softmax_loss_function is not None and not callable(softmax_loss_function):
            raise TypeError("`softmax_loss_function` must be None or a callable taking `labels=` and "
                            f"`logits=`. Received: softmax_loss_function={softmax_loss_function!r}")
        if name is not None:
            _check_type("name", name, (str,), "None or a str")
        # `reduction` is "none", as in TFA: `__call__` returns what the flags leave. Keras passes it
        # back through `from_config`, hence the kwargs.
        kwargs.pop("reduction", None)
        super().__init__(reduction="none", name=name, **kwargs)
        self.average_across_timesteps = average_across_timesteps
        self.average_across_batch = average_across_batch
        self.sum_over_timesteps = sum_over_timesteps
        self.sum_over_batch = sum_over_batch
        self.softmax_loss_function = softmax_loss_function

    @tf.autograph.experimental.do_not_convert
    def __call__(self, y_true: TensorLike, y_pred: TensorLike, sample_weight: Optional[TensorLike] = None) -> tf.Tensor:
        """Returns `sequence_loss(y_pred, y_true, sample_weight, **flags)`, of whatever rank the flags leave.

        Args:
            y_true: `[batch, time]` integer class ids, or `[batch, time, classes]` probabilities.
            y_pred: `[batch, time, classes]` float logits.
            sample_weight: `[batch, time]` float weights; `None` means all ones.

        Returns:
            The loss reduced by the flags only (no Keras reduction): `[]` for the defaults.

        Raises:
            ValueError: as `sequence_loss`, with TFA's messages.
            TypeError: as `tf_seqloss.sequence_loss`, for inputs of the wrong dtype.

        Example:

        >>> import numpy as np
        >>> from tf_seqloss.compat import tfa
        >>> loss = tfa.SequenceLoss(sum_over_batch=False)       # per time step
        >>> targets, weights = np.array([[1, 2], [3, 0]]), np.array([[1, 1], [1, 0]], "float32")
        >>> np.round(loss(targets, np.zeros([2, 2, 4], "float32"), weights).numpy(), 4)
        array([1.3863, 1.3863], dtype=float32)
        """
        # TFA's own override: Keras' `Loss.__call__` multiplies `sample_weight` in after `call` and divides
        # by a count, which cannot give the flags' ratios; the weights belong inside the reduction.
        return sequence_loss(
            y_pred,
            y_true,
            sample_weight,
            average_across_timesteps=self.average_across_timesteps,
            average_across_batch=self.average_across_batch,
            sum_over_timesteps=self.sum_over_timesteps,
            sum_over_batch=self.sum_over_batch,
            softmax_loss_function=self.softmax_loss_function,
            name=self.name,
        )

    @not_converted
    def call(self, y_true: TensorLike, y_pred: TensorLike) -> tf.Tensor:
        """Returns the loss without sample weights (all ones), reduced by the flags.

        Args:
            y_true: as in `__call__`.
            y_pred: as in `__call__`.

        Returns:
            `self(y_true, y_pred)`.

        Raises:
            ValueError: as `__call__`.
            TypeError: as `__call__`.
        """
        return self(y_true, y_pred)

    def get_config(self) -> dict:
        """Returns the loss's config: `name`, the flags and `softmax_loss_function`.

        Returns:
            A dict that `from_config` rebuilds the loss from.
        """
        config = super().get_config()
        config.update(
            average_across_timesteps=self.average_across_timesteps,
            average_across_batch=self.average_across_batch,
            sum_over_timesteps=self.sum_over_timesteps,
            sum_over_batch=self.sum_over_batch,
            softmax_loss_function=(None if self.softmax_loss_function is None
                                   else _keras.saving.serialize_keras_object(self.softmax_loss_function)),
        )
        return config

    @classmethod
    def from_config(cls, config: dict) -> "SequenceLoss":
        """Returns a loss built from `get_config()`'s dict, deserialising `softmax_loss_function` with Keras.

        Args:
            config: a dict from `get_config()`.

        Returns:
            A new `tf_seqloss.compat.tfa.SequenceLoss`.

        Raises:
            ValueError: Keras cannot deserialise `softmax_loss_function`.
            TypeError: a config value of the wrong type, as the constructor says.
        """
        config = dict(config)
        function = config.get("softmax_loss_function")
        if function is not None:
            config["softmax_loss_function"] = _keras.saving.deserialize_keras_object(function)
        return cls(**config)
