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

`y_pred` must be the logits (or probabilities). Hidden states in their place are refused with a
`ValueError` naming `y_pred` when the ids are known (eagerly, or constants) and exceed its last axis, or
when its rank is not 3; inside a graph, where the ids are only known when it runs, a real token whose id
is past the last axis makes both metrics NaN until the next reset, never a plausible value. A model
trained through a fused head (no logits) updates them with `update_from_token_stats` from
`linear_sequence_loss(..., return_token_stats=True)`, or through `FusedLinearHead(token_metrics=True)`.

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

from tf_seqloss import _checks, _cross_entropy, _keras, _linear_head
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

    @_keras.not_converted
    def update_state(self, y_true: Any, y_pred: Any, sample_weight: Any = None) -> None:
        """Adds a batch: `y_true` `[batch, time]` ids (or probabilities), `y_pred` `[batch, time, classes]` logits.

        Padding comes from `sample_weight` (`[batch, time]`, `[batch]` or a scalar), the Keras mask of
        `y_pred` and `padding_id`, multiplied together as in `SequenceLoss`.

        Args:
            y_true: `[batch, time]` class ids (or `[batch, time, 1]`), or `[batch, time, classes]`
                probabilities; may be ragged.
            y_pred: `[batch, time, classes]` logits; may be ragged.
            sample_weight: optional token weights: `[batch, time]`, `[batch]` per sequence, or a scalar.

        Raises:
            ValueError: as `tf_seqloss.sequence_loss`, for inputs of the wrong rank or sizes that disagree.
            TypeError: as `tf_seqloss.sequence_loss`, for inputs of the wrong dtype.

        Example:

        >>> import numpy as np, tf_seqloss
        >>> metric = tf_seqloss.TokenAccuracy()
        >>> logits = np.eye(3, dtype="float32")[[[0, 1, 2]]]        # predicts 0, 1, 2
        >>> metric.update_state(np.array([[0, 2, 2]]), logits, sample_weight=np.array([[1, 1, 0]]))
        >>> float(metric.result())   # the weight-0 token does not count
        0.5
        >>> metric.reset_state(); float(metric.result())
        0.0
        """
        ragged = isinstance(y_pred, tf.RaggedTensor) or isinstance(y_true, tf.RaggedTensor)
        logits = y_pred if isinstance(y_pred, tf.RaggedTensor) else tf.convert_to_tensor(y_pred)
        mask = _keras.get_mask(y_pred)
        self._check_y_pred_rank(logits)
        tokens = token_losses(logits, standardize_targets(y_true, logits), self._options,
                              sample_weight=sample_weight, mask=mask)
        self._check_classes(tokens)
        values = self._weighted_values(tokens)
        self.total.assign_add(tf.cast(tf.reduce_sum(values), self.dtype))
        self.count.assign_add(tf.cast(tf.reduce_sum(tokens.weights), self.dtype))
        # Ragged rows carry their lengths: padding information too.
        if sample_weight is None and mask is None and self.padding_id is None and not ragged:
            self._unmarked_padding.check(tokens.targets)
            self._unmarked_padding.warn_if_seen(self)

    @_keras.not_converted
    def update_from_token_stats(self, stats: "_linear_head.TokenStats") -> None:
        """Adds a batch trained through a fused head: a `TokenStats` from `linear_sequence_loss`.

        `linear_sequence_loss(..., return_token_stats=True)` (or a head built on it) computes each
        token's argmax and cross-entropy inside its chunked loop, so the metric is updated without any
        `[batch, time, classes]` logits; the sums are those `update_state` would add from the logits.

        Args:
            stats: a `tf_seqloss.TokenStats`, whose `weights` already carry every padding route.

        Raises:
            TypeError: `stats` is not a `tf_seqloss.TokenStats`.

        Example:

        >>> import numpy as np, tensorflow as tf, tf_seqloss
        >>> hidden = tf.constant([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]])   # [batch 1, time 3, features 2]
        >>> kernel = tf.constant([[2.0, 0.0, 0.0], [0.0, 2.0, 0.0]])     # [features 2, classes 3]
        >>> loss, stats = tf_seqloss.linear_sequence_loss(
        ...     hidden, kernel, tf.constant([[0, 2, 1]]), lengths=tf.constant([2]), return_token_stats=True)
        >>> stats.predictions.numpy()        # argmax of each token's logits; 0 at padding
        array([[0, 1, 0]], dtype=int32)
        >>> accuracy = tf_seqloss.TokenAccuracy()
        >>> accuracy.update_from_token_stats(stats)
        >>> float(accuracy.result())         # 1 of the 2 real tokens
        0.5
        """
        if not isinstance(stats, _linear_head.TokenStats):
            raise TypeError(_checks.invalid_value(
                "stats", "a `tf_seqloss.TokenStats` (from `linear_sequence_loss(..., return_token_stats=True)`)",
                type(stats).__name__, owner=f"{type(self).__name__}.update_from_token_stats"))
        weights = tf.cast(stats.weights, self.dtype)
        values = self._values_from_stats(stats, weights)
        self.total.assign_add(tf.reduce_sum(values))
        self.count.assign_add(tf.reduce_sum(weights))

    def _check_y_pred_rank(self, logits: tf.Tensor) -> None:
        rank = logits.shape.rank
        if rank is not None and rank != 3:
            raise ValueError(_checks.invalid_value(
                "y_pred", f"[batch, time, classes] logits (rank 3) for `{type(self).__name__}`",
                f"a tensor of shape {tuple(logits.shape)}", owner=f"{type(self).__name__}.update_state"))

    def _check_classes(self, tokens: Any) -> None:
        """Refuses `y_pred` narrower than the ids of `y_true` when both are known (eagerly, or constants).

        Hidden states given in place of logits (e.g. by a model trained through a fused head) would
        otherwise give a plausible accuracy and a NaN perplexity. In a graph, where the ids are only known
        when it runs, such a token makes both metrics NaN until the next reset (see the module docstring).
        """
        classes = tokens.logits.shape[-1]
        if classes is None or tokens.targets.shape.rank != 2:
            return  # Probability targets were checked against the classes of `y_pred` already.
        ids, weights = tf.get_static_value(tokens.targets), tf.get_static_value(tokens.weights)
        if ids is None or weights is None:
            return
        real = ids[weights != 0]
        if real.size and real.max() >= classes:
            raise ValueError(_checks.invalid_value(
                "y_pred",
                f"[batch, time, classes] logits with more classes than the largest id of `y_true` "
                f"({int(real.max())}): logits, not hidden states (through a fused head, take the "
                "metric from `linear_sequence_loss(..., return_token_stats=True)` with "
                "`update_from_token_stats`)",
                f"a tensor of shape {tuple(tokens.logits.shape)}", owner=f"{type(self).__name__}.update_state"))

    @_keras.not_converted
    def reset_state(self) -> None:
        """Sets the running sums to 0, as Keras does at the start of every epoch and of `evaluate`."""
        self._unmarked_padding.warn_if_seen(self)  # Keras resets eagerly before an epoch and `evaluate`.
        for variable in (self.total, self.count):
            variable.assign(tf.zeros_like(variable))

    def get_config(self) -> dict:
        """Returns the metric's config: `name`, `dtype` and `padding_id`.

        Returns:
            A JSON-serialisable dict that `from_config` rebuilds the metric from.
        """
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
        **kwargs: passed to `keras.metrics.Metric`.

    Raises:
        ValueError: `dtype` is not float32, float64 or a mixed policy, or `padding_id` does not fit in
            int64.
        TypeError: `name` is not a string, or `padding_id` is not an int.

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

    def _values_from_stats(self, stats: "_linear_head.TokenStats", weights: tf.Tensor) -> tf.Tensor:
        # Padded tokens hold 0, real tokens with a bad id NaN (which the weight must not hide).
        return weights * tf.cast(stats.cross_entropy, self.dtype)

    @_keras.not_converted
    def result(self) -> tf.Tensor:
        """Returns the token perplexity since the last reset.

        Returns:
            `exp(sum(w * ce) / sum(w))`, a scalar in the metric's dtype; 1 before any token.
        """
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
        **kwargs: passed to `keras.metrics.Metric`.

    Raises:
        ValueError: `dtype` is not float32, float64 or a mixed policy, or `padding_id` does not fit in
            int64.
        TypeError: `name` is not a string, or `padding_id` is not an int.

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
        targets = tf.cast(targets, tf.int64)
        correct = tf.cast(tf.equal(predicted, targets), tokens.weights.dtype)
        # An id past the classes of `y_pred` (only known when a graph runs) gives NaN, never a plausible
        # accuracy: `y_pred` is then hidden states, not logits. Padded tokens are left out.
        valid, _ = _cross_entropy.checked_ids(targets, tf.shape(tokens.logits, out_type=tf.int64)[-1])
        invalid = tf.logical_and(tf.logical_not(valid), tf.not_equal(tokens.weights, 0))
        # A select, not a product with NaN: XLA turns `w * float(correct)` into a select that drops the NaN.
        return tf.where(invalid, tf.constant(float("nan"), tokens.weights.dtype), tokens.weights * correct)

    def _values_from_stats(self, stats: "_linear_head.TokenStats", weights: tf.Tensor) -> tf.Tensor:
        correct = tf.cast(tf.equal(tf.cast(stats.predictions, tf.int64), tf.cast(stats.targets, tf.int64)),
                          self.dtype)
        # The cross-entropy is NaN exactly at the real tokens whose id is out of range: NaN there too.
        invalid = tf.math.is_nan(tf.cast(stats.cross_entropy, self.dtype))
        return tf.where(invalid, tf.constant(float("nan"), self.dtype), weights * correct)

    @_keras.not_converted
    def result(self) -> tf.Tensor:
        """Returns the token accuracy since the last reset.

        Returns:
            `sum(w * correct) / sum(w)`, a scalar in the metric's dtype; 0 before any token.
        """
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
