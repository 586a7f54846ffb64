"""keras-hub causal language models trained through the fused head: no `[batch, time, vocabulary]` logits.

A keras-hub `CausalLM` (e.g. `GPT2CausalLM`) ends with its backbone's `ReversibleEmbedding` called in
reverse: `hidden @ embeddings^T`, the logits, which for a 50k vocabulary are the largest tensor of a
training step. `fused_causal_lm(causal_lm)` returns the same task object, trained through
`tf_seqloss.linear_sequence_loss(hidden, embeddings^T, targets)`: `fit` and `evaluate` compute the
backbone's hidden states and the fused loss, gradients included, without ever forming the logits. Everything
else is the task's own: `generate()`, `predict()`, `score()`, the preprocessor (string inputs to `fit`),
the tied embedding, and saving. An embedding that soft-caps its logits (`logit_soft_cap`, Gemma 2)
is followed: the fused loss is that of the capped logits. keras-hub's `Seq2SeqLM` is a `CausalLM` too:
`BartSeq2SeqLM`, whose logits are the same embedding reversed over the decoder's states, trains alike. A
task whose logits are anything else is refused: `fused_causal_lm` runs it once on a two-token probe batch
and compares its logits with the fused head's.

```python
causal_lm = keras_hub.models.GPT2CausalLM.from_preset("gpt2_base_en")
causal_lm = tf_seqloss.keras_hub.fused_causal_lm(causal_lm)
causal_lm.compile(optimizer=keras.optimizers.AdamW(1e-4))
causal_lm.fit(texts, batch_size=8)       # logs loss, token_accuracy, token_perplexity
causal_lm.generate("The quick brown", max_length=20)
```

What changes in `fit` and `evaluate` (Keras 3 only; keras-hub needs it):

- the loss is `linear_sequence_loss` of the backbone's output against `y`, weighted by `sample_weight`
  (the preprocessor's padding mask): the token mean of the batch, `sum(w * ce) / sum(w)`. keras-hub's
  default compiled loss (`SparseCategoricalCrossentropy` with `sample_weight`, Keras'
  `"sum_over_batch_size"`) divides the same sum by every position, padding included, `batch * time`: it
  reads lower by the fraction of real tokens, and so do its gradients (on a batch with 16 real tokens in
  28 positions, 2.23 against 3.91). A learning rate tuned for the default acts larger here on padded
  batches; on unpadded batches the two are equal;
- the logged metrics are the loss and `token_accuracy` / `token_perplexity`, exact over the epoch and
  the replicas (`tf_seqloss.TokenAccuracy` / `TokenPerplexity` fed from the fused loop). The `loss` and
  `weighted_metrics` given to `compile` are not used: they would need logits.

Saving: a `.keras` file of the task saves and loads as the plain keras-hub task (its class, its weights,
the tie between the embedding and the output); call `fused_causal_lm` on the loaded model to train it
fused again. Install with `pip install "tf_seqloss[keras-hub]"`.
"""

from __future__ import annotations

import dataclasses
import types
from typing import Any, Dict, Optional, Tuple, Union

import tensorflow as tf

from tf_seqloss import _checks, _distribute, _keras, _linear_head, _metrics
from tf_seqloss._options import LossOptions, soft_cap

_INSTALL = 'pip install "tf_seqloss[keras-hub]"'


def _keras_hub() -> Any:
    """Imports keras-hub when first needed, so that `tf_seqloss` never depends on it."""
    try:
        import keras_hub
    except ImportError as error:
        raise ImportError(f"`tf_seqloss.keras_hub` needs the keras-hub package: {_INSTALL}") from error
    return keras_hub


def output_kernel(causal_lm: Any) -> Tuple[tf.Tensor, bool]:
    """Returns `(kernel, transposed)`: the output projection of `causal_lm`'s reversed token embedding.

    With tied weights (GPT-2, Gemma) that is the `[vocabulary, features]` embedding table itself, read
    by `linear_sequence_loss(..., transpose_kernel=True)` as it is (`transposed` True, no copy); untied,
    the `[features, vocabulary]` `reverse_embeddings` (`transposed` False).
    """
    embedding = causal_lm.backbone.token_embedding
    if not embedding.tie_weights:
        return tf.convert_to_tensor(embedding.reverse_embeddings), False
    return tf.convert_to_tensor(embedding.embeddings), True


def fused_causal_lm(
    causal_lm: Any,
    *,
    chunk_size: Optional[int] = None,
    z_loss: float = 0.0,
    label_smoothing: float = 0.0,
    normalizer: Optional[Union[str, float]] = None,
) -> Any:
    """Returns `causal_lm`, whose `fit` and `evaluate` now train through `linear_sequence_loss`.

    The task's `train_step` and `test_step` are replaced on this object only: the forward pass stops at
    the backbone's hidden states, and the loss, its gradients and the token metrics come from the fused
    loop over the output embedding (see the module docstring). Calling it twice is harmless.

    Args:
        causal_lm: a `keras_hub.models.CausalLM` whose backbone has a `ReversibleEmbedding` as
            `token_embedding` (GPT-2, Gemma, Llama, Mistral, ...), tied or not; or a `BartSeq2SeqLM`
            (keras-hub's `Seq2SeqLM` is a `CausalLM`): the loss is then that of the decoder's states.
        chunk_size: keyword-only; as in `tf_seqloss.linear_sequence_loss`.
        z_loss: keyword-only; as in `tf_seqloss.linear_sequence_loss`.
        label_smoothing: keyword-only; as in `tf_seqloss.linear_sequence_loss`.
        normalizer: keyword-only. `None` (each replica's token mean, the replicas averaged, as Keras
            does) or `"global"` (the exact token mean over the replicas of a `tf.distribute` strategy).

    Returns:
        `causal_lm` itself.

    Raises:
        ImportError: keras-hub is not installed.
        TypeError: `causal_lm` is not a keras-hub `CausalLM` with a `ReversibleEmbedding`, or its logits
            are not that embedding reversed over the backbone's output, as the fused loss computes them
            (checked on a probe batch of two tokens: T5 rescales the decoder's states before its output
            embedding, T5Gemma has an output embedding of its own; the fused loss would not be theirs).
        ValueError: a bad option, as in `linear_sequence_loss`.
    """
    keras_hub = _keras_hub()
    if not _keras.IS_KERAS_3:
        raise ImportError("`tf_seqloss.keras_hub` needs Keras 3 (keras-hub runs on it), and tf_seqloss runs on "
                          "tf_keras here: unset `TF_USE_LEGACY_KERAS`.")
    if not isinstance(causal_lm, keras_hub.models.CausalLM):
        raise TypeError(_checks.invalid_value("causal_lm", "a `keras_hub.models.CausalLM`",
                                              type(causal_lm).__name__, owner="fused_causal_lm"))
    embedding = getattr(getattr(causal_lm, "backbone", None), "token_embedding", None)
    if not hasattr(embedding, "tie_weights") or not hasattr(embedding, "logit_soft_cap"):
        raise TypeError(_checks.invalid_value(
            "causal_lm", "a task whose `backbone.token_embedding` is a `ReversibleEmbedding` (the output layer "
            "the fused loss replaces)", f"a {type(causal_lm).__name__} with token_embedding="
            f"{type(embedding).__name__}", owner="fused_causal_lm"))
    _check_logits_are_the_fused_head(causal_lm)
    options = LossOptions(label_smoothing=label_smoothing, z_loss=z_loss, normalizer=normalizer,
                          allow_tensors=False)
    chunk_size = _linear_head.check_chunk_size(chunk_size)
    trainer = _FusedTrainer(options, chunk_size)
    # Bound to this object only: the class, and so a saved and loaded task, keeps the logits path.
    # `get_metrics_result` is what `fit` and `evaluate` read at the end of an epoch, in the cross-replica
    # context (exact over the replicas); `reset_metrics` what they call before one.
    for method in ("train_step", "test_step", "get_metrics_result", "reset_metrics"):
        object.__setattr__(causal_lm, method, types.MethodType(getattr(trainer, method), causal_lm))
    # A `fit` function traced for the logits path must not be reused.
    causal_lm.train_function = causal_lm.test_function = None
    return causal_lm


def _output_head(causal_lm: Any, backbone_output: Any) -> Tuple[tf.Tensor, tf.Tensor, bool, Optional[float]]:
    """Returns `(hidden, kernel, transposed, cap)`: what the task's reversed embedding makes its logits of.

    The logits are `cap * tanh(hidden @ kernel / cap)` (`kernel^T` when `transposed`; no cap when `cap` is
    None), in the embedding's `reverse_dtype` when it has one. A `Seq2SeqLM`'s backbone returns a dict:
    the output embedding reads the decoder's states.
    """
    hidden = backbone_output
    if isinstance(hidden, dict):
        hidden = hidden["decoder_sequence_output"]
    embedding = causal_lm.backbone.token_embedding
    kernel, transposed = output_kernel(causal_lm)
    if embedding.reverse_dtype is not None:
        hidden, kernel = tf.cast(hidden, embedding.reverse_dtype), tf.cast(kernel, embedding.reverse_dtype)
    else:
        kernel = tf.cast(kernel, hidden.dtype)
    # The embedding's soft cap (Gemma 2), read at every step as the task's own reverse call does.
    cap = None if embedding.logit_soft_cap is None else float(embedding.logit_soft_cap)
    return hidden, kernel, transposed, cap


def _check_logits_are_the_fused_head(causal_lm: Any) -> None:
    """Refuses a task whose logits are not what the fused loss computes from its backbone's output.

    The task and its backbone run once on a probe batch (batch 1, 2 tokens of id 1, nothing padded): the
    task's own logits must equal `_output_head`'s. A task with anything else between the backbone and
    its logits (T5 rescales the decoder's states when tied, T5Gemma has a decoder embedding of its own, a
    user's task may add a layer) would otherwise be trained, silently, on another model's loss.
    """
    try:
        inputs = causal_lm.input
    except (AttributeError, ValueError) as error:
        raise TypeError(_checks.invalid_value(
            "causal_lm", "a functional keras-hub task (its inputs known, as every keras-hub task's are)",
            f"a {type(causal_lm).__name__} without inputs ({error})", owner="fused_causal_lm")) from None

    def probe(spec: Any) -> tf.Tensor:
        shape = [1] + [2 if size is None else size for size in spec.shape[1:]]
        dtype = tf.as_dtype(spec.dtype)
        return tf.ones(shape, dtype) if dtype.is_integer or dtype.is_bool else tf.zeros(shape, dtype)

    x = tf.nest.map_structure(probe, inputs)
    logits = tf.cast(causal_lm(x, training=False), tf.float32)
    hidden, kernel, transposed, cap = _output_head(causal_lm, causal_lm.backbone(x, training=False))
    expected = soft_cap(tf.cast(tf.matmul(hidden, kernel, transpose_b=transposed), tf.float32), cap)
    scale = float(tf.reduce_max(tf.abs(expected))) + 1e-6
    # Rounding only: float32 logits agree to a few ulps; half-precision ones to their own precision.
    tolerance = scale * (1e-4 if hidden.dtype == tf.float32 else 2e-2)
    difference = float(tf.reduce_max(tf.abs(logits - expected))) if logits.shape == expected.shape else None
    if difference is None or not difference <= tolerance:
        found = (f"logits of shape {logits.shape} where the fused head makes {expected.shape}"
                 if difference is None else f"logits {difference:.3g} away from the fused head's (largest {scale:.3g})")
        raise TypeError(_checks.invalid_value(
            "causal_lm", "a task whose logits are `backbone.token_embedding` reversed over the backbone's output "
            "(the decoder's states for a `Seq2SeqLM`), soft-capped if the embedding caps them",
            f"a {type(causal_lm).__name__} with {found}", owner="fused_causal_lm"))


class _FusedTrainer:
    """The fused `train_step` / `test_step` and their metrics, bound to one task."""

    def __init__(self, options: LossOptions, chunk_size: Optional[int]):
        self.options, self.chunk_size = options, chunk_size
        # Created here, in the caller's scope: a strategy's when the task was built in one.
        keras = _keras_hub_keras()
        self.metrics = (keras.metrics.Mean(name="loss"), _metrics.TokenAccuracy(), _metrics.TokenPerplexity())

    def reset_metrics(self, model: Any) -> None:
        for metric in self.metrics:
            metric.reset_state()

    def get_metrics_result(self, model: Any) -> Dict[str, tf.Tensor]:
        return {metric.name: metric.result() for metric in self.metrics}

    def loss(self, model: Any, x: Any, y: Any, sample_weight: Any, training: bool) -> Tuple[tf.Tensor, Any]:
        """Returns `(loss, stats)` of a batch: the fused loss of the backbone's hidden states."""
        hidden, kernel, transposed, cap = _output_head(model, model.backbone(x, training=training))
        y = tf.convert_to_tensor(y)
        if y.dtype.is_floating:
            y = tf.cast(y, tf.int64)
        options = self.options if cap is None else dataclasses.replace(self.options, logit_soft_cap=cap)
        loss, stats = _linear_head.compute_linear_sequence_loss(
            hidden, kernel, y, options, sample_weight=sample_weight, chunk_size=self.chunk_size,
            transpose_kernel=transposed, return_token_stats=True)
        if model.losses:  # regularisers of the backbone
            loss += tf.add_n([tf.cast(extra, loss.dtype) for extra in model.losses])
        return loss, stats

    def _log(self, loss: tf.Tensor, stats: Any) -> Dict[str, tf.Tensor]:
        # The replicas' logged values average to the batch's loss: a global share is multiplied back.
        logged = loss if self.options.normalizer is None else _distribute.undo_replica_scaling(loss)
        mean, accuracy, perplexity = self.metrics
        mean.update_state(logged)
        accuracy.update_from_token_stats(stats)
        perplexity.update_from_token_stats(stats)
        return self.get_metrics_result(None)

    @tf.autograph.experimental.do_not_convert
    def train_step(self, model: Any, data: Any) -> Dict[str, tf.Tensor]:
        keras = _keras_hub_keras()
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        with tf.GradientTape() as tape:
            loss, stats = self.loss(model, x, y, sample_weight, training=True)
            # The optimizer sums the replicas' gradients: a replica's own mean is divided by their number
            # (as Keras' compiled losses are), a share of the global mean is already what it must add.
            replicas = _distribute.replicas_in_sync()
            scaled = loss if self.options.normalizer is not None or replicas == 1 else loss / replicas
            scaled = model.optimizer.scale_loss(scaled)
        weights = model.trainable_weights
        gradients = tape.gradient(scaled, weights)
        model.optimizer.apply_gradients(zip(gradients, weights))
        return self._log(loss, stats)

    @tf.autograph.experimental.do_not_convert
    def test_step(self, model: Any, data: Any) -> Dict[str, tf.Tensor]:
        keras = _keras_hub_keras()
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        loss, stats = self.loss(model, x, y, sample_weight, training=False)
        return self._log(loss, stats)


def _keras_hub_keras() -> Any:
    """The Keras that keras-hub runs on (Keras 3), whatever `TF_USE_LEGACY_KERAS` says for tf_seqloss."""
    import keras
    return keras
