"""Keras layers for seq2seq models: lengths to a mask, the sequence loss added inside a model, a fused head.

Keras 3 functional models cannot call raw `tf` ops on symbolic tensors; these layers wrap the ops a
model with lengths or a loss needing more than `(y_true, y_pred)` must run. Both work in functional and
subclassed models, under Keras 3 and tf_keras, and are registered for `.keras` saving.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Optional, Tuple, Union

import numpy as np
import tensorflow as tf
from tensorflow.types.experimental import TensorLike

from tf_seqloss import _checks, _distribute, _keras, _linear_head, _metrics
from tf_seqloss._keras import keras
from tf_seqloss._keras_loss import SequenceLoss, reduced_loss
from tf_seqloss._options import FIELDS, FLAGS, LossOptions, expose, for_add_loss, refuse, soft_cap


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

    Raises:
        ValueError: `maxlen` is not `None` or an int in `[0, 2**31 - 1]`, `output_dtype` is not `"bool"` or
            a floating or integer dtype, or `dtype` (in `**kwargs`) is not a dtype or policy.
        TypeError: when called, `lengths` is not integer.

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

    @_keras.not_converted
    def call(self, lengths: Any, reference: Any = None) -> tf.Tensor:
        """Returns the `[batch, time]` mask of `lengths`, in `output_dtype`.

        Args:
            lengths: `[batch]` integer sequence lengths.
            reference: optional tensor whose axis 1 gives the time size when `maxlen` is `None`, e.g. the
                `[batch, time, classes]` logits the mask is for. Without either, the time size is the
                largest length.

        Returns:
            The mask, 1 (or True) at positions before each sequence's length and 0 after.

        Raises:
            TypeError: `lengths` is not integer.

        Example:

        >>> import numpy as np, tf_seqloss
        >>> logits = np.zeros([2, 4, 5], "float32")
        >>> tf_seqloss.SequenceMask(output_dtype="bool")(np.array([1, 3]), reference=logits).numpy()
        array([[ True, False, False, False],
               [ True,  True,  True, False]])
        """
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
        """Returns `(batch, time)`, with `time` from `maxlen` or `reference_shape` (None when unknown).

        Args:
            lengths_shape: the shape of `lengths`, `(batch,)`.
            reference_shape: the shape of `reference`, if the layer is called with one.

        Returns:
            The shape of the mask, a tuple.
        """
        time = self.maxlen
        if time is None and reference_shape is not None:
            time = tuple(reference_shape)[1]
        return (tuple(lengths_shape)[0], time)

    def get_config(self) -> dict:
        """Returns the layer's config: the base layer's, `maxlen` and `output_dtype`.

        Returns:
            A JSON-serialisable dict that `from_config` rebuilds the layer from.
        """
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
        average_across_timesteps: as in `tf_seqloss.SequenceLoss` (same default).
        average_across_batch: as in `tf_seqloss.SequenceLoss` (same default).
        sum_over_timesteps: as in `tf_seqloss.SequenceLoss`.
        sum_over_batch: as in `tf_seqloss.SequenceLoss`.
        softmax_loss_function: as in `tf_seqloss.SequenceLoss`.
        padding_id: keyword-only. As in `tf_seqloss.SequenceLoss`.
        label_smoothing: keyword-only. As in `tf_seqloss.SequenceLoss`.
        logit_soft_cap: keyword-only. As in `tf_seqloss.SequenceLoss`.
        epsilon: keyword-only. As in `tf_seqloss.SequenceLoss`.
        implementation: keyword-only. As in `tf_seqloss.SequenceLoss`; see `sequence_loss`.
        reduction: keyword-only. As in `tf_seqloss.SequenceLoss`, except that it must give a scalar
            (`"sum_over_batch_size"`, `"sum"`; Keras 3 also `"mean"`, `"mean_with_sample_weight"`,
            tf_keras `"auto"`), as for `FusedLinearHead`.
        normalizer: as in `tf_seqloss.SequenceLoss`: `"global"` makes `fit` under a `tf.distribute` strategy
            train on the global token mean of each batch (the layer hands `add_loss` its replica's share
            times the replicas, which both Kerases divide by).
        from_logits: keyword-only. As in `tf_seqloss.SequenceLoss`. With `from_logits=False`, `logits` are
            probabilities (the output of a softmax), and the layer returns them unchanged.
        z_loss: keyword-only. As in `tf_seqloss.SequenceLoss`.
        **kwargs: passed to `keras.layers.Layer` (`name`, ...). Inputs are not autocast under mixed
            precision (`autocast=False`): the loss is computed in float32 from the logits as they come.

    Call arguments:
        logits: `[batch, time, classes]` logits.
        targets: `[batch, time]` class ids or `[batch, time, classes]` probabilities.
        weights: optional `[batch, time]` float weights.
        lengths: optional `[batch]` integer lengths.

    Raises:
        ValueError: an option `tf_seqloss.SequenceLoss` refuses, a `reduction` that leaves a non-scalar
            loss, or a `dtype` (in `**kwargs`) that is not a dtype or policy.
        TypeError: an option of the wrong type, as `tf_seqloss.SequenceLoss` says.

    Example:

    Called on a batch, the layer returns the logits and holds the loss in `layer.losses`:

    >>> import numpy as np, tf_seqloss
    >>> logits = np.zeros([2, 3, 5], "float32")          # uniform over 5 classes
    >>> targets = np.array([[1, 2, 0], [4, 0, 0]])
    >>> layer = tf_seqloss.SequenceLossLayer()
    >>> layer(logits, targets, lengths=np.array([3, 1])).shape
    TensorShape([2, 3, 5])
    >>> [round(float(loss), 4) for loss in layer.losses]   # log(5)
    [1.6094]

    In a model whose inputs hold the lengths, compiled without a loss:

    >>> import tensorflow as tf
    >>> keras = tf.keras          # Keras 3, or tf_keras with TF_USE_LEGACY_KERAS=1
    >>> tokens = keras.Input((None,), dtype="int32")
    >>> targets = keras.Input((None,), dtype="int32")
    >>> lengths = keras.Input((), dtype="int32")
    >>> embedded = keras.layers.Embedding(10, 8)(tokens)
    >>> logits = keras.layers.Dense(10, kernel_initializer="zeros")(embedded)   # uniform at first
    >>> logits = tf_seqloss.SequenceLossLayer()(logits, targets, lengths=lengths)
    >>> model = keras.Model([tokens, targets, lengths], logits)
    >>> model.compile(optimizer="adam")
    >>> batch = [np.array([[4, 5, 9]]), np.array([[5, 6, 7]]), np.array([2])]
    >>> round(float(model.evaluate(batch, verbose=0)), 4)   # log(10), over the 2 real tokens
    2.3026
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
        reduction: str = "sum_over_batch_size",
        normalizer: Optional[Union[str, float]] = None,
        from_logits: bool = True,
        z_loss: float = 0.0,
        logit_soft_cap: Optional[float] = None,
        **kwargs,
    ) -> None:
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
            from_logits=from_logits, z_loss=z_loss, logit_soft_cap=logit_soft_cap, name=self.name + "_loss",
        )
        # The options live in the loss object only; the layer's option attributes read them (`expose`).
        self._options = self._sequence_loss._options

    @property
    def reduction(self):
        """How a non-scalar loss is reduced before `add_loss` (read-only, as the options)."""
        return self._sequence_loss.reduction

    @_keras.not_converted
    def call(self, logits, targets, weights=None, lengths=None, mask=None):
        """Adds the sequence loss of `logits` against `targets` to the layer's losses; returns `logits`.

        Args:
            logits: `[batch, time, classes]` logits (probabilities with `from_logits=False`).
            targets: `[batch, time]` class ids or `[batch, time, classes]` probabilities.
            weights: optional `[batch, time]` float weights.
            lengths: optional `[batch]` integer lengths.
            mask: the Keras mask of `logits`, which Keras passes; 0 (False) marks padding.

        Returns:
            `logits`, unchanged.

        Raises:
            ValueError: as `tf_seqloss.sequence_loss`, for inputs of the wrong rank or sizes that disagree.
            TypeError: as `tf_seqloss.sequence_loss`, for inputs of the wrong dtype.

        Example:

        >>> import numpy as np, tf_seqloss
        >>> layer = tf_seqloss.SequenceLossLayer(padding_id=0)
        >>> _ = layer(np.zeros([1, 3, 4], "float32"), np.array([[1, 2, 0]]))
        >>> round(float(layer.losses[0]), 4)   # log(4), over the two real tokens
        1.3863
        """
        _warn_about_logged_global_loss(self)
        # Both Kerases divide `add_loss` losses by the number of replicas themselves.
        self.add_loss(reduced_loss(
            self._sequence_loss, targets, logits, weights, lengths=lengths, mask=mask, scale_for_replicas=False,
            owner="SequenceLossLayer"))
        return logits

    def compute_output_shape(self, logits_shape, *args, **kwargs):
        """Returns `logits_shape`: the layer returns the logits.

        Args:
            logits_shape: the shape of `logits`.
            *args: the shapes of the other inputs, ignored.
            **kwargs: the shapes of the other inputs, ignored.

        Returns:
            `logits_shape`.
        """
        return logits_shape

    def compute_mask(self, logits, mask=None):
        """Returns `mask`: the returned logits keep the padding mask they came with.

        Args:
            logits: the logits.
            mask: their Keras mask, or None.

        Returns:
            `mask`.
        """
        return mask

    def get_config(self) -> dict:
        """Returns the layer's config: the base layer's and every option, as `SequenceLoss.get_config`.

        Returns:
            A JSON-serialisable dict that `from_config` rebuilds the layer from.
        """
        config = super().get_config()
        loss_config = self._sequence_loss.get_config()
        for key in FIELDS + ("reduction",):
            config[key] = loss_config[key]
        return config

    @classmethod
    def from_config(cls, config: dict) -> "SequenceLossLayer":
        """Returns a layer built from `get_config()`'s dict, resolving a saved `softmax_loss_function`.

        Args:
            config: a dict from `get_config()`.

        Returns:
            A new `SequenceLossLayer`.

        Raises:
            ValueError: `softmax_loss_function` names a function that is not registered with Keras, or
                one that safe mode refuses to load.
        """
        config = dict(config)
        config["softmax_loss_function"] = _keras.deserialize_function(
            config.get("softmax_loss_function"), cls.__name__, "softmax_loss_function")
        return cls(**config)


# The options of `FusedLinearHead`: those of `linear_sequence_loss`.
_HEAD_OPTIONS = FLAGS + ("padding_id", "label_smoothing", "z_loss", "logit_soft_cap", "epsilon", "normalizer")
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

    Tied to a token embedding (GPT-2, Gemma, Llama): `FusedLinearHead(vocab, embedding=embedding_layer)`
    creates no kernel and uses the embedding's `[classes, features]` variable as it is
    (`transpose_kernel=True`): `head.kernel` IS `embedding_layer.embeddings`, so training moves one
    variable, fed by both the lookup and the head. `embedding_layer` is a `keras.layers.Embedding`, a
    `keras.layers.ReversibleEmbedding` (Keras 3), keras-hub's `ReversibleEmbedding`, or any layer whose
    `embeddings` variable is `[classes, features]`; use it for the token lookup as usual. The head saves
    the embedding in its config; under Keras 3, saving the model (`model.save("model.keras")`) records
    the one layer the model and the head share, and `keras.models.load_model` gives both the same layer
    again: the loaded model keeps the tie. tf_keras' `.keras` loader rebuilds its built-in layers without
    that record and refuses the file (a `ValueError` about the embedding's variables); there, rebuild
    the model in code and `model.load_weights(...)`, which keeps the tie. (A bare
    `from_config(get_config())` outside saving, e.g. `keras.models.clone_model`, makes a second
    embedding.)

    Under a mixed-precision policy (`dtype="mixed_bfloat16"`, or the global policy) the head casts
    `hidden` and its float32 variables (or the tied embedding) to the compute dtype, as Keras layers do;
    the training loss (log-sum-exp, cross-entropy) is computed in float32 from those rounded values.

    Args:
        units: the number of classes (with `embedding`, `None` takes it from the embedding's `input_dim`).
        use_bias: whether the projection has a bias (GPT-2's tied head has none: pass False).
        kernel_initializer: the Keras initializer of the kernel.
        bias_initializer: the Keras initializer of the bias.
        average_across_timesteps: keyword-only. The contrib flag, as in `tf_seqloss.SequenceLoss`: unset
            (`None`), it is True unless a `sum_over_*` flag is True, so `sum_over_timesteps=True,
            sum_over_batch=True` alone is TFA's class default.
        average_across_batch: keyword-only. As `average_across_timesteps`.
        sum_over_timesteps: keyword-only. As in `tf_seqloss.SequenceLoss`.
        sum_over_batch: keyword-only. As in `tf_seqloss.SequenceLoss`.
        padding_id: keyword-only. As in `linear_sequence_loss`.
        label_smoothing: keyword-only. As in `linear_sequence_loss`.
        z_loss: keyword-only. As in `linear_sequence_loss`.
        epsilon: keyword-only. As in `linear_sequence_loss`.
        chunk_size: keyword-only. As in `linear_sequence_loss`.
        logit_soft_cap: keyword-only. As in `linear_sequence_loss`: `None`, or a positive finite `cap`;
            the training loss is that of the logits `cap * tanh(logits / cap)`, and inference returns
            the capped logits (and `top_k` ranks them; the cap keeps their order).
        normalizer: keyword-only. As in `tf_seqloss.SequenceLossLayer`: a Python number or `"global"`
            (the exact token mean over the replicas of a `tf.distribute` strategy).
        top_k: keyword-only. `None` (default): inference returns the logits; an int `k`: it returns
            `(values, ids)` of the `k` largest logits of every token.
        reduction: keyword-only. As in `tf_seqloss.SequenceLossLayer`: `"sum_over_batch_size"`
            (default) or another mean reduction of the running Keras averages a non-scalar loss, `"sum"`
            sums it.
        embedding: keyword-only. `None` (default): the head owns a `[features, units]` kernel. A layer
            with a `[units, features]` `embeddings` variable: the head is tied to it (see above), and
            `kernel_initializer` is unused.
        token_metrics: keyword-only. If True, the layer owns a `TokenAccuracy` and a `TokenPerplexity`
            (`layer.token_accuracy`, `layer.token_perplexity`, named `"token_accuracy"` and
            `"token_perplexity"`) and updates them from the fused loop at every call with targets (the
            argmax and cross-entropy of each token, no logits): `fit` and `evaluate` log them (both
            Kerases); a custom loop reads and resets them.
        **kwargs: passed to `keras.layers.Layer` (`name`, `dtype`, ...); `dtype` must be floating (the
            kernel's), e.g. `"float32"` or `"mixed_bfloat16"`.

    Call arguments:
        hidden: `[batch, time, features]` hidden states.
        targets: optional `[batch, time]` class ids; given, the layer adds the loss and returns the
            per-token log-sum-exp.
        weights: optional `[batch, time]` float weights.
        lengths: optional `[batch]` integer lengths.

    Raises:
        ValueError: `units` is not a positive int, `top_k` not `None` or an int in `[1, units]`, a
            `reduction` that leaves a non-scalar loss, an option `linear_sequence_loss` refuses, a
            `SequenceLossLayer` option the head has no meaning for (`from_logits`,
            `softmax_loss_function`, `implementation`), or a non-floating `dtype` (in `**kwargs`).
        TypeError: `use_bias` is not a bool, or an option of the wrong type.

    Example:

    Without targets the layer returns the logits; with them, the per-token log-sum-exp, after adding
    the loss to `head.losses`:

    >>> import numpy as np, tf_seqloss
    >>> head = tf_seqloss.FusedLinearHead(5, kernel_initializer="zeros")   # uniform over 5 classes
    >>> hidden = np.ones([2, 3, 4], "float32")
    >>> head(hidden).shape
    TensorShape([2, 3, 5])
    >>> targets = np.array([[1, 2, 0], [4, 0, 0]])
    >>> np.round(head(hidden, targets, lengths=np.array([3, 1])).numpy(), 4)   # 0 at padding
    array([[1.6094, 1.6094, 1.6094],
           [1.6094, 0.    , 0.    ]], dtype=float32)
    >>> [round(float(loss), 4) for loss in head.losses]   # log(5)
    [1.6094]

    A training model and a predicting model sharing the head:

    >>> import tensorflow as tf
    >>> keras = tf.keras          # Keras 3, or tf_keras with TF_USE_LEGACY_KERAS=1
    >>> tokens = keras.Input((None,), dtype="int32")
    >>> targets = keras.Input((None,), dtype="int32")
    >>> hidden = keras.layers.Embedding(10, 8, mask_zero=True)(tokens)   # id 0 is padding
    >>> head = tf_seqloss.FusedLinearHead(10, kernel_initializer="zeros")
    >>> trainer = keras.Model([tokens, targets], head(hidden, targets))   # fused loss, no logits
    >>> trainer.compile(optimizer="adam")
    >>> predictor = keras.Model(tokens, head(hidden))                     # the same weights, logits
    >>> _ = trainer([np.array([[4, 5, 0]]), np.array([[5, 6, 0]])])   # a step's forward pass
    >>> [round(float(loss), 4) for loss in trainer.losses]               # log(10)
    [2.3026]
    >>> predictor(np.array([[4, 5, 0]])).shape
    TensorShape([1, 3, 10])

    Tied to the input embedding, with Gemma's soft-capping:

    >>> import numpy as np, tf_seqloss
    >>> from tf_seqloss._keras import keras
    >>> embedding = keras.layers.Embedding(50, 8)
    >>> head = tf_seqloss.FusedLinearHead(50, use_bias=False, embedding=embedding, logit_soft_cap=30.0)
    >>> tokens = keras.Input((None,), dtype="int32")
    >>> targets = keras.Input((None,), dtype="int32")
    >>> hidden = keras.layers.Dense(8)(embedding(tokens))
    >>> trainer = keras.Model([tokens, targets], head(hidden, targets))
    >>> trainer.count_params()  # 50 x 8 embedding, shared; 8 x 8 + 8 Dense; no head kernel
    472
    >>> head.kernel is embedding.embeddings
    True
    """

    def __init__(
        self,
        units: Optional[int],
        use_bias: bool = True,
        kernel_initializer: Union[str, dict, Callable] = "glorot_uniform",
        bias_initializer: Union[str, dict, Callable] = "zeros",
        *,
        average_across_timesteps: Optional[bool] = None,
        average_across_batch: Optional[bool] = None,
        sum_over_timesteps: bool = False,
        sum_over_batch: bool = False,
        padding_id: Optional[int] = None,
        label_smoothing: float = 0.0,
        z_loss: float = 0.0,
        logit_soft_cap: Optional[float] = None,
        epsilon: Optional[float] = None,
        chunk_size: Optional[int] = None,
        top_k: Optional[int] = None,
        reduction: str = "sum_over_batch_size",
        normalizer: Optional[Union[str, float]] = None,
        embedding: Optional["keras.layers.Layer"] = None,
        token_metrics: bool = False,
        **kwargs,
    ) -> None:
        for option, reason in _NOT_HEAD_OPTIONS.items():
            if option in kwargs:
                refuse("FusedLinearHead", option, kwargs[option], "no such argument", reason)
        _check_layer_dtype(kwargs, "FusedLinearHead", floating=True)
        super().__init__(**kwargs)
        if isinstance(embedding, dict):  # from a config: `from_config` deserialises it, a direct call too
            embedding = keras.saving.deserialize_keras_object(embedding)
        if embedding is not None and not isinstance(embedding, keras.layers.Layer):
            raise TypeError(_checks.invalid_value(
                "embedding", "None or a Keras layer with a `[classes, features]` `embeddings` variable "
                "(e.g. `keras.layers.Embedding`)", f"{embedding!r} of type {type(embedding).__name__}"))
        if units is None and embedding is not None and isinstance(getattr(embedding, "input_dim", None), int):
            units = embedding.input_dim
        if isinstance(units, bool) or not isinstance(units, int) or units < 1:
            raise ValueError(_checks.invalid_value("units", "a positive int (the number of classes)", repr(units)))
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= units):
            raise ValueError(_checks.invalid_value("top_k", f"None or an int in [1, units={units}]", repr(top_k)))
        _keras.check_scalar_reduction(reduction, "FusedLinearHead")
        self._options = LossOptions(  # a tensor option cannot be saved in the config
            average_across_timesteps, average_across_batch, sum_over_timesteps, sum_over_batch,
            label_smoothing=label_smoothing, z_loss=z_loss, normalizer=normalizer, epsilon=epsilon,
            padding_id=padding_id, logit_soft_cap=logit_soft_cap, allow_tensors=False)
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
        self.embedding = embedding  # tracked: its variable is the head's kernel, `[units, features]`
        if not isinstance(token_metrics, (bool, np.bool_)):
            raise TypeError(_checks.invalid_value("token_metrics", "True or False", repr(token_metrics)))
        self.token_metrics = bool(token_metrics)
        if self.token_metrics:  # Tracked by the layer: both Kerases log and reset them with the model's.
            self.token_accuracy = _metrics.TokenAccuracy()
            self.token_perplexity = _metrics.TokenPerplexity()

    def build(self, hidden_shape, *args, **kwargs):
        """Creates `kernel` (`[features, units]`) and, with `use_bias`, `bias` (`[units]`).

        Args:
            hidden_shape: the shape of `hidden`; its last axis (features) must be known.
            *args: the shapes of the other inputs, ignored.
            **kwargs: the shapes of the other inputs, ignored.

        Raises:
            ValueError: the last axis of `hidden_shape` is unknown.
        """
        features = tuple(hidden_shape)[-1]
        if self.embedding is not None:
            self.kernel = self._tied_kernel(features)
        else:
            if features is None:
                raise ValueError("The last axis of `hidden` (features) must be known to build `FusedLinearHead`. "
                                 f"Received: hidden.shape={tuple(hidden_shape)}")
            self.kernel = self.add_weight(name="kernel", shape=(features, self.units),
                                          initializer=self.kernel_initializer)
        self.bias = self.add_weight(name="bias", shape=(self.units,), initializer=self.bias_initializer) \
            if self.use_bias else None
        self.built = True

    def _tied_kernel(self, features):
        """Returns the tied embedding's `embeddings` variable after checking it is `[units, features]`."""
        embedding = self.embedding
        assert embedding is not None  # `build` calls this for a tied head only
        if not embedding.built:
            embedding.build((None, None))  # an embedding's variable does not depend on the ids' shape
        variable = getattr(embedding, "embeddings", None)
        shape = None if variable is None else tuple(variable.shape)
        if shape is None or len(shape) != 2 or shape[0] != self.units or (features is not None
                                                                          and shape[1] != features):
            raise ValueError(_checks.invalid_value(
                "embedding", f"a layer whose `embeddings` variable is [units, features] = [{self.units}, "
                f"{features}] (the head reads it as a [classes, features] kernel)",
                f"{embedding.name!r} with embeddings.shape={shape}", owner="FusedLinearHead"))
        return variable

    @_keras.not_converted
    def call(
        self,
        hidden: TensorLike,
        targets: Optional[TensorLike] = None,
        weights: Optional[TensorLike] = None,
        lengths: Optional[TensorLike] = None,
        mask: Optional[TensorLike] = None,
    ) -> Union[tf.Tensor, Tuple[tf.Tensor, tf.Tensor]]:
        """Returns the logits of `hidden`, or, given `targets`, adds their fused loss and returns the log-sum-exp.

        Args:
            hidden: `[batch, time, features]` hidden states.
            targets: optional `[batch, time]` class ids. `None`: inference.
            weights: optional `[batch, time]` float weights (with `targets` only).
            lengths: optional `[batch]` integer lengths (with `targets` only).
            mask: the Keras mask of `hidden`, which Keras passes; 0 (False) marks padding.

        Returns:
            Without `targets`, the `[batch, time, units]` logits `hidden @ kernel + bias`, or with
                `top_k=k` the pair `(values, ids)`, `[batch, time, k]` each. With `targets`, the
                `[batch, time]` log-sum-exp of every token's logits (0 at padded tokens), after adding
                the loss with `add_loss`.

        Raises:
            ValueError: as `linear_sequence_loss`, for inputs of the wrong rank or sizes that disagree.
            TypeError: as `linear_sequence_loss`, for inputs of the wrong dtype.

        Example:

        >>> import numpy as np, tf_seqloss
        >>> head = tf_seqloss.FusedLinearHead(6, top_k=2)
        >>> values, ids = head(np.ones([2, 3, 4], "float32"))   # the 2 largest logits of every token
        >>> values.shape, ids.shape
        (TensorShape([2, 3, 2]), TensorShape([2, 3, 2]))
        """
        hidden = tf.convert_to_tensor(hidden)
        kernel = tf.convert_to_tensor(self.kernel)
        bias = None if self.bias is None else tf.convert_to_tensor(self.bias)
        # Under a mixed-precision policy: float32 variables in the compute dtype of `hidden`, as Keras does
        # (a tied embedding is another layer's variable, which this layer's autocast may not reach).
        if hidden.dtype in (tf.float16, tf.bfloat16):
            kernel = tf.cast(kernel, hidden.dtype)
            bias = None if bias is None else tf.cast(bias, hidden.dtype)
        tied = self.embedding is not None
        if targets is None:
            if tied:  # `[classes, features]`, read by the matmul as it is (`tensordot` would transpose a copy)
                logits = tf.matmul(hidden, kernel, transpose_b=True)
            else:
                logits = tf.tensordot(hidden, kernel, axes=[[hidden.shape.rank - 1], [0]])
            if bias is not None:
                logits += bias
            logits = soft_cap(logits, self.logit_soft_cap)
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
        loss, log_sum_exp, *stats = _linear_head.compute_linear_sequence_loss(
            hidden, kernel, targets, self._options, bias=bias, weights=weights, lengths=lengths, mask=mask,
            chunk_size=self.chunk_size, return_log_sum_exp=True, transpose_kernel=tied,
            return_token_stats=self.token_metrics)
        # tf_keras builds a functional model in a strategy's cross-replica context, where a sum-aggregated
        # variable takes no update; the steps run in the replica context.
        building = tf.distribute.has_strategy() and tf.distribute.in_cross_replica_context()
        for metric in (self.token_accuracy, self.token_perplexity) if stats and not building else ():
            metric.update_from_token_stats(stats[0])
        self.add_loss(for_add_loss(loss, self._options, self.reduction))
        return log_sum_exp

    def compute_output_shape(self, hidden_shape, targets_shape=None, *args, **kwargs):
        """Returns the shape `call` returns for these input shapes.

        Args:
            hidden_shape: the shape of `hidden`, `(batch, time, features)`.
            targets_shape: the shape of `targets`, or None for inference.
            *args: the shapes of the other inputs, ignored.
            **kwargs: the shapes of the other inputs, ignored.

        Returns:
            `(batch, time)` with targets; else `(batch, time, units)`, or with `top_k=k` the pair of
                `(batch, time, k)` shapes.
        """
        hidden_shape = tuple(hidden_shape)
        if targets_shape is not None:
            return hidden_shape[:-1]
        if self.top_k is None:
            return hidden_shape[:-1] + (self.units,)
        return hidden_shape[:-1] + (self.top_k,), hidden_shape[:-1] + (self.top_k,)

    def compute_mask(self, hidden, mask=None):
        """Returns `mask` for the logits or log-sum-exp, which keep the padding of `hidden`; None with `top_k`.

        Args:
            hidden: the hidden states.
            mask: their Keras mask, or None.

        Returns:
            `mask`, or None when the layer returns the `top_k` pair.
        """
        # Both Kerases call `compute_mask(inputs, previous_mask)`, the mask second whatever `call` takes:
        # the logits (or the per-token log-sum-exp) keep the padding mask of `hidden`.
        return None if self.top_k is not None else mask

    def get_config(self) -> dict:
        """Returns the layer's config: the base layer's, `units`, the initializers and every option.

        Returns:
            A JSON-serialisable dict that `from_config` rebuilds the layer from.
        """
        config = super().get_config()
        config.update(
            units=self.units, use_bias=self.use_bias,
            kernel_initializer=keras.initializers.serialize(self.kernel_initializer),
            bias_initializer=keras.initializers.serialize(self.bias_initializer),
            **self._options.config(*_HEAD_OPTIONS),
            chunk_size=self.chunk_size, top_k=self.top_k, reduction=self.reduction)
        if self.embedding is not None:
            # Saved whole; within a model's saving, Keras records a layer met twice (here and in the
            # model) once, and loading gives both places the same layer: the tie survives.
            config["embedding"] = keras.saving.serialize_keras_object(self.embedding)
        if self.token_metrics:  # Only when set: configs saved before the option load unchanged.
            config["token_metrics"] = True
        return config

    @classmethod
    def from_config(cls, config: dict) -> "FusedLinearHead":
        """Returns a head from `get_config()`, its tied embedding (if any) rebuilt from its own config.

        Args:
            config: the dictionary `get_config()` returned.

        Returns:
            A new `FusedLinearHead`. Within a model's `.keras` loading (Keras 3), the embedding is the
            model's own layer, so the tie holds; a bare call makes a second embedding.

        Raises:
            ValueError: as the constructor, for a config holding a value it refuses.
            TypeError: as the constructor, for a config holding a value of the wrong type.
        """
        config = dict(config)
        if isinstance(config.get("embedding"), dict):
            config["embedding"] = keras.saving.deserialize_keras_object(config["embedding"])
        return cls(**config)


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
