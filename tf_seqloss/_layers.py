"""Keras layers for seq2seq models: lengths to a mask, the sequence loss added inside a model, a fused head.

Keras 3 functional models cannot call raw `tf` ops on symbolic tensors; these layers wrap the ops a
model with lengths or a loss needing more than `(y_true, y_pred)` must run. Both work in functional and
subclassed models, under Keras 3 and tf_keras, and are registered for `.keras` saving.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Optional, Tuple

import numpy as np
import tensorflow as tf

from tf_seqloss import _checks, _distribute, _keras, _linear_head
from tf_seqloss._keras import keras
from tf_seqloss._keras_loss import SequenceLoss, reduced_loss
from tf_seqloss._options import FIELDS, FLAGS, LossOptions, expose, for_add_loss, refuse


@keras.saving.register_keras_serializable(package="tf_seqloss")
class SequenceMask(keras.layers.Layer):
    """Returns the `[batch, time]` mask of sequence `lengths`: 1 before each length, 0 after.

    `tf.sequence_mask` as a layer. The time size is `maxlen` if given, else the time axis (axis 1) of
    `reference` if passed, else the largest length in the batch.

    Args:
        maxlen: the time size of the mask, a Python or NumPy int in `[0, 2**31 - 1]` (the int32 range
            TensorFlow sizes a time axis in), or `None` to take it from `reference` or the lengths.
        output_dtype: the mask's dtype: `"float32"` (default, for loss weights) or `"bool"` (for Keras
            masks, e.g. `keras.layers.Attention(...)(..., mask=[query_mask, value_mask])`), or any other
            floating or integer dtype.
        **kwargs: passed to `keras.layers.Layer` (`name`, ...).

    Call arguments:
        lengths: `[batch]` integer lengths.
        reference: optional tensor whose axis 1 is the time size, e.g. the `[batch, time, classes]` logits.

    Example:

    >>> import numpy as np, tf_seqloss
    >>> tf_seqloss.SequenceMask(maxlen=4)(np.array([1, 3])).numpy()
    array([[1., 0., 0., 0.],
           [1., 1., 1., 0.]], dtype=float32)
    """

    def __init__(self, maxlen: Optional[int] = None, output_dtype: str = "float32", **kwargs: Any) -> None:
        _check_layer_dtype(kwargs, "SequenceMask")
        super().__init__(**kwargs)
        self.maxlen = _check_maxlen(maxlen)
        self.output_dtype = _check_mask_dtype(output_dtype)

    def call(self, lengths: Any, reference: Any = None) -> tf.Tensor:
        lengths = tf.convert_to_tensor(lengths)
        if not lengths.dtype.is_integer:
            raise TypeError(
                f"`lengths` must hold integer sequence lengths. Received: lengths.dtype={lengths.dtype.name}")
        maxlen = self.maxlen
        if maxlen is None and reference is not None:
            reference = tf.convert_to_tensor(reference)
            maxlen = reference.shape[1] if reference.shape[1] is not None else tf.shape(reference)[1]
        return tf.sequence_mask(lengths, maxlen=maxlen, dtype=self.output_dtype)

    def compute_output_shape(self, lengths_shape: Any, reference_shape: Any = None) -> Tuple[Any, Any]:
        time = self.maxlen
        if time is None and reference_shape is not None:
            time = tuple(reference_shape)[1]
        return (tuple(lengths_shape)[0], time)

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(maxlen=self.maxlen, output_dtype=self.output_dtype)
        return config


@keras.saving.register_keras_serializable(package="tf_seqloss")
@expose()
class SequenceLossLayer(keras.layers.Layer):
    """Returns `logits` unchanged, after adding their `sequence_loss` against `targets` to the model's losses.

    For models whose loss needs more than `(y_true, y_pred)`, e.g. lengths that are model inputs: put the
    targets and lengths among the inputs, end the model with this layer, and `compile` without a loss
    (`model.compile(optimizer)`); `fit`/`evaluate` then train on and report the sequence loss.

    The loss is `SequenceLoss(...)(targets, logits, sample_weight)` where the weights are `weights`,
    `tf.sequence_mask(lengths)` and the Keras mask of `logits` multiplied together, so it equals
    `tf_seqloss.sequence_loss(logits, targets, weights, lengths=lengths, ...)`. Flags leaving a non-scalar
    loss are averaged (`reduction="sum_over_batch_size"`) or summed (`reduction="sum"`).

    Args:
        average_across_timesteps, average_across_batch, sum_over_timesteps, sum_over_batch,
        softmax_loss_function, padding_id, label_smoothing, z_loss, epsilon, implementation, reduction,
        from_logits: as in `tf_seqloss.SequenceLoss` (same defaults), except that `reduction` must give a
            scalar (`"sum_over_batch_size"`, `"sum"`; Keras 3 also `"mean"`, `"mean_with_sample_weight"`,
            tf_keras `"auto"`), as for `FusedLinearHead`. With `from_logits=False`, `logits` are
            probabilities (the output of a softmax), and the layer returns them unchanged.
        normalizer: as in `tf_seqloss.SequenceLoss`: `"global"` makes `fit` under a `tf.distribute` strategy
            train on the global token mean of each batch (the layer hands `add_loss` its replica's share
            times the replicas, which both Kerases divide by).
        **kwargs: passed to `keras.layers.Layer` (`name`, ...). Inputs are not autocast under mixed
            precision (`autocast=False`): the loss is computed in float32 from the logits as they come.

    Call arguments:
        logits: `[batch, time, classes]` logits.
        targets: `[batch, time]` class ids or `[batch, time, classes]` probabilities.
        weights: optional `[batch, time]` float weights.
        lengths: optional `[batch]` integer lengths.

    Example:

    ```python
    tokens = keras.Input((None,), dtype="int32")
    targets = keras.Input((None,), dtype="int32")
    lengths = keras.Input((), dtype="int32")
    logits = keras.layers.Dense(vocab)(keras.layers.Embedding(vocab, 16)(tokens))
    logits = tf_seqloss.SequenceLossLayer()(logits, targets, lengths=lengths)
    model = keras.Model([tokens, targets, lengths], logits)
    model.compile(optimizer="adam")
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
        normalizer=None,
        from_logits: bool = True,
        z_loss: float = 0.0,
        **kwargs,
    ):
        _keras.check_scalar_reduction(reduction, "SequenceLossLayer")
        _check_layer_dtype(kwargs, "SequenceLossLayer")
        kwargs.setdefault("autocast", False)
        super().__init__(**kwargs)
        self.supports_masking = True
        # The loss object checks every argument and resolves the averaging flags' `None` default.
        self._sequence_loss = SequenceLoss(
            average_across_timesteps, average_across_batch, sum_over_timesteps, sum_over_batch,
            softmax_loss_function, padding_id=padding_id, label_smoothing=label_smoothing,
            epsilon=epsilon, implementation=implementation, reduction=reduction, normalizer=normalizer,
            from_logits=from_logits, z_loss=z_loss, name=self.name + "_loss",
        )
        # The options live in the loss object only; the layer's option attributes read them (`expose`).
        self._options = self._sequence_loss._options

    @property
    def reduction(self):
        """How a non-scalar loss is reduced before `add_loss` (read-only, as the options)."""
        return self._sequence_loss.reduction

    def call(self, logits, targets, weights=None, lengths=None, mask=None):
        _warn_about_logged_global_loss(self)
        # Both Kerases divide `add_loss` losses by the number of replicas themselves.
        self.add_loss(reduced_loss(
            self._sequence_loss, targets, logits, weights, lengths=lengths, mask=mask, scale_for_replicas=False,
            owner="SequenceLossLayer"))
        return logits

    def compute_output_shape(self, logits_shape, *args, **kwargs):
        return logits_shape

    def compute_mask(self, logits, mask=None):
        return mask

    def get_config(self) -> dict:
        config = super().get_config()
        loss_config = self._sequence_loss.get_config()
        for key in FIELDS + ("reduction",):
            config[key] = loss_config[key]
        return config

    @classmethod
    def from_config(cls, config: dict) -> "SequenceLossLayer":
        config = dict(config)
        config["softmax_loss_function"] = _keras.deserialize_function(
            config.get("softmax_loss_function"), cls.__name__, "softmax_loss_function")
        return cls(**config)


# The options of `FusedLinearHead`: those of `linear_sequence_loss`.
_HEAD_OPTIONS = FLAGS + ("padding_id", "label_smoothing", "z_loss", "epsilon", "normalizer")
# The options of `SequenceLossLayer` the head has no meaning for, and why.
_NOT_HEAD_OPTIONS = {
    "from_logits": "the head computes the logits itself, so its loss never takes probabilities",
    "softmax_loss_function": "the head's chunked loop computes the softmax cross-entropy itself and never "
                             "builds the logits a custom function would take",
    "implementation": "the head has one formulation, the chunked loop of `linear_sequence_loss`",
}


@keras.saving.register_keras_serializable(package="tf_seqloss")
@expose(*_HEAD_OPTIONS)
class FusedLinearHead(keras.layers.Layer):
    """Returns the logits `hidden @ kernel + bias`, or, given targets, trains on their fused sequence loss.

    The output projection of a sequence model with a large vocabulary, as one layer that owns its
    `kernel` (`[features, units]`) and `bias` (`[units]`):

    - `head(hidden)` returns the `[batch, time, units]` logits (or, with `top_k=k`, the pair of
      `[batch, time, k]` top values and ids), for inference and decoding;
    - `head(hidden, targets, weights=None, lengths=None)` adds `linear_sequence_loss` of the projection
      to the model's losses (`add_loss`) and returns the `[batch, time]` per-token log-sum-exp of the
      logits instead of the logits (0 at padded tokens; useful to watch `z_loss`). No
      `[batch, time, units]` tensor exists in that step, forward or backward.

    Compile the training model without a loss (`model.compile(optimizer)`), as with `SequenceLossLayer`.
    Padding is marked as in `sequence_loss`: `weights`, `lengths`, `padding_id`, and the Keras mask of
    `hidden` (e.g. from `Embedding(mask_zero=True)`), multiplied together. Flags leaving a non-scalar loss
    are averaged (`reduction="sum_over_batch_size"`) or summed (`reduction="sum"`).

    Args:
        units: the number of classes.
        use_bias: whether the projection has a bias.
        kernel_initializer, bias_initializer: Keras initializers of the kernel and bias.
        average_across_timesteps, average_across_batch, sum_over_timesteps, sum_over_batch: keyword-only;
            the contrib flags, as in `tf_seqloss.SequenceLoss`: an unset (`None`) averaging flag is True
            unless a `sum_over_*` flag is True, so `sum_over_timesteps=True, sum_over_batch=True` alone
            is TFA's class default.
        padding_id, label_smoothing, z_loss, epsilon, chunk_size: keyword-only; as in
            `linear_sequence_loss`.
        normalizer: keyword-only. As in `tf_seqloss.SequenceLossLayer`: a Python number or `"global"`
            (the exact token mean over the replicas of a `tf.distribute` strategy).
        top_k: keyword-only. `None` (default): inference returns the logits; an int `k`: it returns
            `(values, ids)` of the `k` largest logits of every token.
        reduction: keyword-only. As in `tf_seqloss.SequenceLossLayer`: `"sum_over_batch_size"`
            (default) or another mean reduction of the running Keras averages a non-scalar loss, `"sum"`
            sums it.
        **kwargs: passed to `keras.layers.Layer` (`name`, `dtype`, ...); `dtype` must be floating (the
            kernel's), e.g. `"float32"` or `"mixed_bfloat16"`.

    Example:

    ```python
    tokens = keras.Input((None,), dtype="int32")
    targets = keras.Input((None,), dtype="int32")
    hidden = keras.layers.LSTM(256, return_sequences=True)(keras.layers.Embedding(vocab, 128)(tokens))
    head = tf_seqloss.FusedLinearHead(vocab, padding_id=0)
    trainer = keras.Model([tokens, targets], head(hidden, targets))   # fused loss, no logits
    trainer.compile(optimizer="adam")
    predictor = keras.Model(tokens, head(hidden))                     # the same weights, logits
    ```
    """

    def __init__(
        self,
        units: int,
        use_bias: bool = True,
        kernel_initializer="glorot_uniform",
        bias_initializer="zeros",
        *,
        average_across_timesteps: Optional[bool] = None,
        average_across_batch: Optional[bool] = None,
        sum_over_timesteps: bool = False,
        sum_over_batch: bool = False,
        padding_id: Optional[int] = None,
        label_smoothing: float = 0.0,
        z_loss: float = 0.0,
        epsilon: Optional[float] = None,
        chunk_size: Optional[int] = None,
        top_k: Optional[int] = None,
        reduction: str = "sum_over_batch_size",
        normalizer=None,
        **kwargs,
    ):
        for option, reason in _NOT_HEAD_OPTIONS.items():
            if option in kwargs:
                refuse("FusedLinearHead", option, kwargs[option], "no such argument", reason)
        _check_layer_dtype(kwargs, "FusedLinearHead", floating=True)
        super().__init__(**kwargs)
        if isinstance(units, bool) or not isinstance(units, int) or units < 1:
            raise ValueError(_checks.invalid_value("units", "a positive int (the number of classes)", repr(units)))
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= units):
            raise ValueError(_checks.invalid_value("top_k", f"None or an int in [1, units={units}]", repr(top_k)))
        _keras.check_scalar_reduction(reduction, "FusedLinearHead")
        self._options = LossOptions(  # a tensor option cannot be saved in the config
            average_across_timesteps, average_across_batch, sum_over_timesteps, sum_over_batch,
            label_smoothing=label_smoothing, z_loss=z_loss, normalizer=normalizer, epsilon=epsilon,
            padding_id=padding_id, allow_tensors=False)
        self.units = units
        if not isinstance(use_bias, (bool, np.bool_)):  # `bool("False")` is True: refuse rather than guess.
            raise TypeError(_checks.invalid_value("use_bias", "True or False (a Python or NumPy bool)", repr(use_bias)))
        self.use_bias = bool(use_bias)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)
        self.chunk_size = _linear_head.check_chunk_size(chunk_size)
        self.top_k = top_k
        self.reduction = reduction
        self.supports_masking = True

    def build(self, hidden_shape, *args, **kwargs):
        features = tuple(hidden_shape)[-1]
        if features is None:
            raise ValueError("The last axis of `hidden` (features) must be known to build `FusedLinearHead`. "
                             f"Received: hidden.shape={tuple(hidden_shape)}")
        self.kernel = self.add_weight(name="kernel", shape=(features, self.units),
                                      initializer=self.kernel_initializer)
        self.bias = self.add_weight(name="bias", shape=(self.units,), initializer=self.bias_initializer) \
            if self.use_bias else None
        self.built = True

    def call(self, hidden, targets=None, weights=None, lengths=None, mask=None):
        kernel = tf.convert_to_tensor(self.kernel)
        bias = None if self.bias is None else tf.convert_to_tensor(self.bias)
        if targets is None:
            logits = tf.tensordot(hidden, kernel, axes=[[hidden.shape.rank - 1], [0]])
            if bias is not None:
                logits += bias
            if self.top_k is None:
                return logits
            values, ids = tf.math.top_k(logits, k=self.top_k)
            return values, ids
        if mask is None:
            mask = _keras.get_mask(hidden)
        targets = tf.convert_to_tensor(targets)
        if targets.dtype.is_floating:
            targets = tf.cast(targets, tf.int64)  # Keras may hand ids over as floats.
        _warn_about_logged_global_loss(self)
        loss, log_sum_exp = _linear_head.compute_linear_sequence_loss(
            hidden, kernel, targets, self._options, bias=bias, weights=weights, lengths=lengths, mask=mask,
            chunk_size=self.chunk_size, return_log_sum_exp=True)
        self.add_loss(for_add_loss(loss, self._options, self.reduction))
        return log_sum_exp

    def compute_output_shape(self, hidden_shape, targets_shape=None, *args, **kwargs):
        hidden_shape = tuple(hidden_shape)
        if targets_shape is not None:
            return hidden_shape[:-1]
        if self.top_k is None:
            return hidden_shape[:-1] + (self.units,)
        return hidden_shape[:-1] + (self.top_k,), hidden_shape[:-1] + (self.top_k,)

    def compute_mask(self, hidden, mask=None):
        # Both Kerases call `compute_mask(inputs, previous_mask)`, the mask second whatever `call` takes:
        # the logits (or the per-token log-sum-exp) keep the padding mask of `hidden`.
        return None if self.top_k is not None else mask

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(
            units=self.units, use_bias=self.use_bias,
            kernel_initializer=keras.initializers.serialize(self.kernel_initializer),
            bias_initializer=keras.initializers.serialize(self.bias_initializer),
            **self._options.config(*_HEAD_OPTIONS),
            chunk_size=self.chunk_size, top_k=self.top_k, reduction=self.reduction)
        return config


def _warn_about_logged_global_loss(layer: Any) -> None:
    if layer.normalizer == _distribute.GLOBAL and _keras.IS_KERAS_3 and _distribute.replicas_in_sync() > 1:
        # Keras 3 keeps `add_loss` losses in one list that the replica threads share; the all-reduce
        # inside this call lets one replica's logged total take in another's loss. The gradient is exact.
        owner = type(layer).__name__
        warnings.warn(
            f"Under Keras 3 with several replicas, the loss `fit` logs for `{owner}("
            "normalizer='global')` is not the global token mean (the gradients it trains on are exact). "
            "For an exact logged value use `compile(loss=tf_seqloss.SequenceLoss(normalizer='global'))`, "
            "or read `tf_seqloss.TokenPerplexity` (its log is the token mean).", stacklevel=3)


# The largest time size TensorFlow indexes with int32 (`tf.shape`'s default): a larger `maxlen` only fails,
# or allocates a mask of more than 2**31 entries a row, when the layer is first called.
_MAX_MAXLEN = np.iinfo(np.int32).max


def _check_layer_dtype(kwargs: dict, owner: str, *, floating: bool = False) -> None:
    """Refuses a bad `dtype` before `Layer.__init__`, whose messages (Keras 3 and tf_keras) do not name it."""
    if kwargs.get("dtype") is not None:
        _checks.dtype_policy(kwargs["dtype"], owner, floating=floating)


def _check_maxlen(maxlen: Any) -> Optional[int]:
    if maxlen is None:
        return None
    if isinstance(maxlen, (bool, np.bool_)) or not isinstance(maxlen, (int, np.integer)) \
            or not 0 <= maxlen <= _MAX_MAXLEN:
        raise ValueError(_checks.invalid_value(
            "maxlen", f"None or an int in [0, {_MAX_MAXLEN}] (2**31 - 1, the largest int32 time size)", repr(maxlen)))
    return int(maxlen)


def _check_mask_dtype(output_dtype: Any) -> str:
    try:
        dtype = tf.as_dtype(output_dtype)
    except TypeError:
        dtype = None
    # `tf.sequence_mask` casts a bool mask: strings, complex, quantized and resource types fail when called.
    if dtype is None or not (dtype.is_bool or dtype.is_floating or dtype.is_integer):
        raise ValueError(_checks.invalid_value(
            "output_dtype", "'bool' or a floating or integer dtype name (e.g. 'float32', 'int32')", repr(output_dtype)))
    return dtype.name
