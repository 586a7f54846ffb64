"""Token-level metrics: perplexity and accuracy over every real token seen, across batches and replicas.

`TokenPerplexity` and `TokenAccuracy` keep two running sums, the weighted token values and the token
weights, in variables summed over the replicas of a `tf.distribute` strategy (`aggregation="sum"`,
synchronised on read), so `result()` is the exact token-level value over everything since the last reset:
an epoch of `fit` or `evaluate`, under any strategy. The loss Keras logs over an epoch is not: it averages
the batches' losses weighted by their number of sequences, so a token of a short batch counts for more
than one of a long batch.

keras-hub's `Perplexity` keeps the same two sums since keras-hub 0.32 (before, it averaged per-batch values
weighted by sequences), and from the same `sample_weight` or `mask_token_id` it gives the same value as
`TokenPerplexity`. What these metrics add:

- the three padding routes of `SequenceLoss`, multiplied together: `sample_weight`, the Keras mask on
  `y_pred` (e.g. from `Embedding(mask_zero=True)`; keras-hub's `Perplexity` leaves masked tokens out of its
  cross-entropy sum but counts them in its token count), and `padding_id`;
- both Kerases: Keras 3 and tf_keras (`TF_USE_LEGACY_KERAS=1`), with a `.keras` file saving and loading
  them (and the model compiled with them) in each;
- probability targets, ragged inputs, and token accuracy over the same weights (`TokenAccuracy`).

Keras hands `sample_weight` only to the metrics in `compile(weighted_metrics=[...])`, never to those in
`metrics=[...]`. When padding is marked by `sample_weight` alone (keras-hub's `(x, y, sample_weight)`
batches), put these metrics in `weighted_metrics`, or give them `padding_id`. A metric updated with no
padding information at all while its targets look padded (some row starts or ends with two equal ids that
at least half the rows start or end with) warns once, when its value is first read outside a graph.
"""

from __future__ import annotations

import warnings
from typing import Any, Optional

import tensorflow as tf

from tf_seqloss import _checks, _keras
from tf_seqloss._keras import IS_KERAS_3, keras
from tf_seqloss._keras_loss import standardize_targets
from tf_seqloss._options import LossOptions
from tf_seqloss._sequence_loss import TokenLosses, token_losses


class _TokenMetric(keras.metrics.Metric):
    """Accumulates `sum(w * value)` and `sum(w)` over the tokens of every batch; subclasses give `value`.

    Unmarked padding. A metric in `compile(metrics=[...])` gets no `sample_weight`, so when the padding
    is marked by `sample_weight` alone it counts the padding as tokens (on a keras-hub batch: perplexity
    +571 %, accuracy -48.6 %). When a batch comes with no padding information at all (no `sample_weight`,
    no Keras mask, no `padding_id`, dense ids), the metric checks whether its targets look padded: some row
    starts or ends with two equal ids, and at least half the rows start (or end) with that same id, as
    `[[5, 9, 2, 0, 0], [7, 2, 0, 0, 0]]` does and text rarely does. The check is a handful of `[batch]`
    tensor ops recorded in a variable of its own, so it runs inside `fit`'s graph and under XLA (no
    `tf.py_function`, no `tf.print`) without reading anything back to the host in a step; the warning is
    raised, once per metric, the first time Python reads the metric outside a graph: `result()` at the
    end of an epoch or of `evaluate` (both Kerases read their metrics there), `reset_state()`, or an eager
    `update_state()`. It never changes the values.
    """

    def __init__(self, name: str, dtype: Any = None, *, padding_id: Optional[int] = None, **kwargs: Any) -> None:
        _checks.check_name(name, type(self).__name__)
        dtype = _checks.accumulator_dtype(dtype, type(self).__name__)
        super().__init__(name=name, dtype=dtype, **kwargs)
        self.padding_id = _checks.check_padding_id(padding_id)
        self._options = LossOptions(padding_id=self.padding_id)  # built here, never inside a traced step
        self.total = self._sum_variable("total")
        self.count = self._sum_variable("count")
        self._unmarked_padding = _PaddingProbe()

    def _sum_variable(self, name: str) -> tf.Variable:
        if IS_KERAS_3:
            return self.add_variable(shape=(), initializer="zeros", dtype=self.dtype, aggregation="sum", name=name)
        return self.add_weight(name=name, shape=(), initializer="zeros", dtype=self.dtype,
                               aggregation=tf.VariableAggregation.SUM)

    def update_state(self, y_true: Any, y_pred: Any, sample_weight: Any = None) -> None:
        """Adds a batch: `y_true` `[batch, time]` ids (or probabilities), `y_pred` `[batch, time, classes]` logits.

        Padding comes from `sample_weight` (`[batch, time]`, `[batch]` or a scalar), the Keras mask of
        `y_pred` and `padding_id`, multiplied together as in `SequenceLoss`.
        """
        ragged = isinstance(y_pred, tf.RaggedTensor) or isinstance(y_true, tf.RaggedTensor)
        logits = y_pred if isinstance(y_pred, tf.RaggedTensor) else tf.convert_to_tensor(y_pred)
        mask = _keras.get_mask(y_pred)
        tokens = token_losses(logits, standardize_targets(y_true, logits), self._options,
                              sample_weight=sample_weight, mask=mask)
        values = self._weighted_values(tokens)
        self.total.assign_add(tf.cast(tf.reduce_sum(values), self.dtype))
        self.count.assign_add(tf.cast(tf.reduce_sum(tokens.weights), self.dtype))
        # Ragged rows carry their lengths: padding information too.
        if sample_weight is None and mask is None and self.padding_id is None and not ragged:
            self._unmarked_padding.check(tokens.targets)
            self._unmarked_padding.warn_if_seen(self)

    def reset_state(self) -> None:
        self._unmarked_padding.warn_if_seen(self)  # Keras resets eagerly before an epoch and `evaluate`.
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

    def __init__(self, name: str = "token_perplexity", dtype: Any = None, *, padding_id: Optional[int] = None,
                 **kwargs: Any) -> None:
        super().__init__(name=name, dtype=dtype, padding_id=padding_id, **kwargs)

    def _weighted_values(self, tokens: TokenLosses) -> tf.Tensor:
        return tokens.weighted

    def result(self) -> tf.Tensor:
        self._unmarked_padding.warn_if_seen(self)
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

    def __init__(self, name: str = "token_accuracy", dtype: Any = None, *, padding_id: Optional[int] = None,
                 **kwargs: Any) -> None:
        super().__init__(name=name, dtype=dtype, padding_id=padding_id, **kwargs)

    def _weighted_values(self, tokens: TokenLosses) -> tf.Tensor:
        predicted = tf.argmax(tokens.logits, axis=-1, output_type=tf.int64)
        targets = tokens.targets
        if targets.shape.rank == 3:
            targets = tf.argmax(targets, axis=-1, output_type=tf.int64)
        correct = tf.cast(tf.equal(predicted, tf.cast(targets, tf.int64)), tokens.weights.dtype)
        return tokens.weights * correct

    def result(self) -> tf.Tensor:
        self._unmarked_padding.warn_if_seen(self)
        return tf.math.divide_no_nan(self.total, self.count)


class _PaddingProbe:
    """Records, in a variable of its own, whether targets that came with no padding information looked padded.

    A plain object, so that neither Keras tracks its variable: it is not one of the metric's weights, and
    `.keras` files and checkpoints hold the same variables as before it existed.
    """

    def __init__(self) -> None:
        # Created where the metric is (in a strategy's scope under `tf.distribute`): each replica records
        # its own batches, and a read averages them, which is above 0 if any replica saw padding. (A SUM
        # would refuse the update Keras 3 traces in the cross-replica context to build the metrics.)
        self.seen = tf.Variable(0.0, trainable=False, name="unmarked_padding",
                                synchronization=tf.VariableSynchronization.ON_READ,
                                aggregation=tf.VariableAggregation.MEAN)
        self.warned = False

    @tf.autograph.experimental.do_not_convert
    def check(self, targets: tf.Tensor) -> None:
        if self.warned or targets.shape.rank != 2:
            return  # Probability targets carry no padding id to recognise.
        time = targets.shape[1]
        if time is not None:
            if time < 2:
                return
            looks_padded = _looks_padded(targets)
        else:
            looks_padded = tf.cond(tf.shape(targets)[1] >= 2, lambda: _looks_padded(targets),
                                   lambda: tf.constant(False))
        self.seen.assign_add(tf.cast(looks_padded, self.seen.dtype))

    @tf.autograph.experimental.do_not_convert
    def warn_if_seen(self, metric: _TokenMetric) -> None:
        """Warns once if padding-like targets were recorded; only outside a graph, where reading costs nothing."""
        if self.warned or not tf.executing_eagerly():
            return
        if tf.distribute.has_strategy() and not tf.distribute.in_cross_replica_context():
            return  # One replica's copy; the sum is read in the cross-replica context.
        # Converted, not `read_value()`, which tf_keras' sync-on-read context for `result()` refuses.
        if float(tf.convert_to_tensor(self.seen)) > 0:
            self.warned = True
            warnings.warn(
                f"`{type(metric).__name__}` {metric.name!r} was updated without any padding information (no "
                "`sample_weight`, no Keras mask on `y_pred`, no `padding_id`), but its targets look padded "
                "(rows start or end with a run of one id, e.g. [..., 0, 0]): it counts that padding as tokens. "
                "Keras passes `sample_weight` only to `compile(weighted_metrics=[...])`, not to `metrics=[...]`: "
                f"put the metric there, or build it with `padding_id=`. Ignore this if the batches are not padded.",
                UserWarning, stacklevel=3)


# The rows `_looks_padded` compares pairwise: a sample, so that the check stays far cheaper than the loss.
_PROBE_ROWS = 256


@tf.autograph.experimental.do_not_convert
def _looks_padded(targets: tf.Tensor) -> tf.Tensor:
    """True if the `[batch, time >= 2]` ids (their first 256 rows) look padded at either end.

    At one end, padding shows as a row whose two end ids are equal while at least half the rows end in
    that same id: `[[5, 9, 2, 0, 0], [7, 2, 0, 0, 0], [3, 1, 4, 1, 6]]` ends in 0, 0 with 2 of 3 rows
    ending in 0. Text rarely ends (or starts) half the rows of a batch with one id and one with two.
    """
    rows = targets[:_PROBE_ROWS]
    batch = tf.shape(rows)[0]

    def at_end(ends: tf.Tensor, neighbours: tf.Tensor) -> tf.Tensor:
        sharing = tf.reduce_sum(tf.cast(tf.equal(ends[:, None], ends[None, :]), tf.int32), axis=1)
        return tf.reduce_any(tf.logical_and(tf.equal(ends, neighbours), 2 * sharing >= batch))

    return tf.logical_or(at_end(rows[:, -1], rows[:, -2]), at_end(rows[:, 0], rows[:, 1]))
