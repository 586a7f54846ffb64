"""Token-level metrics: perplexity and accuracy over every real token seen, across batches and replicas.

Keras averages a metric's per-batch values weighted by the batches' sizes in sequences, and keras-hub's
`Perplexity` does the same; a token of a short batch then counts for more than one of a long batch. These
metrics keep two sums instead, the weighted token values and the token weights, in variables that Keras
sums over replicas (`aggregation="sum"`, synchronised on read), so `result()` is the exact token-level
value over everything since the last reset: an epoch of `fit` or `evaluate`, under any strategy.
"""

from __future__ import annotations

from typing import Optional

import tensorflow as tf

from tf_seqloss import _checks, _keras
from tf_seqloss._keras import IS_KERAS_3, keras
from tf_seqloss.keras_loss import standardize_targets
from tf_seqloss.sequence_loss import token_losses


class _TokenMetric(keras.metrics.Metric):
    """Accumulates `sum(w * value)` and `sum(w)` over the tokens of every batch; subclasses give `value`."""

    def __init__(self, name: str, dtype=None, *, padding_id: Optional[int] = None, **kwargs):
        dtype = _checks.accumulator_dtype(dtype, type(self).__name__)
        super().__init__(name=name, dtype=dtype, **kwargs)
        self.padding_id = _checks.check_padding_id(padding_id)
        self.total = self._sum_variable("total")
        self.count = self._sum_variable("count")

    def _sum_variable(self, name: str):
        if IS_KERAS_3:
            return self.add_variable(shape=(), initializer="zeros", dtype=self.dtype, aggregation="sum", name=name)
        return self.add_weight(name=name, shape=(), initializer="zeros", dtype=self.dtype,
                               aggregation=tf.VariableAggregation.SUM)

    def update_state(self, y_true, y_pred, sample_weight=None):
        """Adds a batch: `y_true` `[batch, time]` ids (or probabilities), `y_pred` `[batch, time, classes]` logits.

        Padding comes from `sample_weight` (`[batch, time]`, `[batch]` or a scalar), the Keras mask of
        `y_pred` and `padding_id`, multiplied together as in `SequenceLoss`.
        """
        logits = y_pred if isinstance(y_pred, tf.RaggedTensor) else tf.convert_to_tensor(y_pred)
        tokens = token_losses(logits, standardize_targets(y_true, logits), sample_weight=sample_weight,
                              padding_id=self.padding_id, mask=_keras.get_mask(y_pred))
        values = self._weighted_values(tokens)
        self.total.assign_add(tf.cast(tf.reduce_sum(values), self.dtype))
        self.count.assign_add(tf.cast(tf.reduce_sum(tokens.weights), self.dtype))

    def reset_state(self):
        for variable in (self.total, self.count):
            variable.assign(tf.zeros_like(variable))

    def get_config(self) -> dict:
        config = super().get_config()
        config["padding_id"] = self.padding_id
        return config


@keras.saving.register_keras_serializable(package="tf_seqloss")
class TokenPerplexity(_TokenMetric):
    """Returns `exp(sum(w * ce) / sum(w))` over every token since the last reset: the exact token perplexity.

    `log` of it is the exact token-mean cross-entropy of an epoch, which the loss `fit` and `evaluate`
    report cannot be over several batches (Keras weights batches by their sequences).

    Args:
        name: the metric's name (`"token_perplexity"`).
        dtype: the dtype of the running sums: `"float32"`, `"float64"`, or a mixed policy (which sums in
            float32). `None`: `keras.backend.floatx()`, or float32 if that is a half-precision type.
            Integer and half-precision dtypes are refused (`ValueError`): they truncate or round the sums.
        padding_id: keyword-only. A class id marking padding in `y_true` (weight 0 there).

    Example:

    >>> import numpy as np, tf_seqloss
    >>> metric = tf_seqloss.TokenPerplexity(padding_id=0)
    >>> metric.update_state(np.array([[1, 2, 0]]), np.zeros([1, 3, 5], "float32"))   # 2 tokens
    >>> metric.update_state(np.array([[3, 0, 0]]), np.zeros([1, 3, 5], "float32"))   # 1 token
    >>> round(float(metric.result()), 4)   # uniform over 5 classes
    5.0
    """

    def __init__(self, name: str = "token_perplexity", dtype=None, *, padding_id: Optional[int] = None, **kwargs):
        super().__init__(name=name, dtype=dtype, padding_id=padding_id, **kwargs)

    def _weighted_values(self, tokens):
        return tokens.weighted

    def result(self):
        return tf.exp(tf.math.divide_no_nan(self.total, self.count))


@keras.saving.register_keras_serializable(package="tf_seqloss")
class TokenAccuracy(_TokenMetric):
    """Returns `sum(w * [argmax(y_pred) == y_true]) / sum(w)` over every token since the last reset.

    For probability targets the true class is their argmax.

    Args:
        name: the metric's name (`"token_accuracy"`).
        dtype: the dtype of the running sums: `"float32"`, `"float64"`, or a mixed policy (which sums in
            float32). `None`: `keras.backend.floatx()`, or float32 if that is a half-precision type.
            Integer and half-precision dtypes are refused (`ValueError`): they truncate or round the sums.
        padding_id: keyword-only. A class id marking padding in `y_true` (weight 0 there).

    Example:

    >>> import numpy as np, tf_seqloss
    >>> metric = tf_seqloss.TokenAccuracy(padding_id=0)
    >>> logits = np.eye(4, dtype="float32")[[[1, 2, 3], [3, 3, 3]]]   # predicts 1, 2, 3 and 3, 3, 3
    >>> metric.update_state(np.array([[1, 2, 0], [3, 1, 2]]), logits)  # 2 of 2, then 1 of 3 correct
    >>> round(float(metric.result()), 4)
    0.6
    """

    def __init__(self, name: str = "token_accuracy", dtype=None, *, padding_id: Optional[int] = None, **kwargs):
        super().__init__(name=name, dtype=dtype, padding_id=padding_id, **kwargs)

    def _weighted_values(self, tokens):
        predicted = tf.argmax(tokens.logits, axis=-1, output_type=tf.int64)
        targets = tokens.targets
        if targets.shape.rank == 3:
            targets = tf.argmax(targets, axis=-1, output_type=tf.int64)
        correct = tf.cast(tf.equal(predicted, tf.cast(targets, tf.int64)), tokens.weights.dtype)
        return tokens.weights * correct

    def result(self):
        return tf.math.divide_no_nan(self.total, self.count)
