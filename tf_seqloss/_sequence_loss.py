"""`sequence_loss`: the weighted cross-entropy of `[batch, time, classes]` logits, as contrib and TFA had it."""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional, Union

import tensorflow as tf
from tensorflow.types.experimental import TensorLike

from tf_seqloss import _checks, _cross_entropy, _padding
from tf_seqloss._options import LossOptions, reduce_tokens, soft_cap

_LAYOUT_LOGITS = "[batch, time, classes]"
_LAYOUT_TARGETS = "[batch, time] class ids, or [batch, time, classes] probabilities"
# The clipping bound of probabilities (`from_logits=False`): Keras' default `keras.backend.epsilon()`.
_PROBABILITY_EPSILON = 1e-7


# The package is graph-safe Python (tf.cond, tf.where, static checks), so AutoGraph has nothing to
# convert; letting it try costs seconds at the first trace in a process, and a little at every later one,
# which a variable-length loop or a retracing `fit` pays again and again (benchmarks/README.md,
# "Measurements behind choices in the code"). Every public entry point says so.
@tf.autograph.experimental.do_not_convert
def sequence_loss(
    logits: TensorLike,
    targets: TensorLike,
    weights: Optional[TensorLike] = None,
    average_across_timesteps: bool = True,
    average_across_batch: bool = True,
    sum_over_timesteps: bool = False,
    sum_over_batch: bool = False,
    softmax_loss_function: Optional[Callable[..., tf.Tensor]] = None,
    name: Optional[str] = None,
    *,
    lengths: Optional[TensorLike] = None,
    padding_id: Optional[int] = None,
    label_smoothing: Union[float, TensorLike] = 0.0,
    epsilon: Optional[float] = None,
    implementation: str = "auto",
    normalizer: Optional[Union[str, float, TensorLike]] = None,
    z_loss: float = 0.0,
    from_logits: bool = True,
    logit_soft_cap: Optional[float] = None,
) -> tf.Tensor:
    """Returns the weighted cross-entropy of a batch of sequences, reduced as the flags say.

    A drop-in replacement for `tf.contrib.seq2seq.sequence_loss` and `tfa.seq2seq.sequence_loss`: same
    positional order, same defaults, same results. The per-token loss is
    `tf.nn.sparse_softmax_cross_entropy_with_logits` for class ids and
    `tf.nn.softmax_cross_entropy_with_logits` for probabilities; each token's loss is multiplied by its
    weight and the result is reduced:

    | flags set to True                             | output shape      | value                                  |
    |-----------------------------------------------|-------------------|----------------------------------------|
    | `average_across_timesteps, average_across_batch` (default) | `[]`  | `sum(w * ce) / sum(w)`                 |
    | `average_across_timesteps`                    | `[batch]`         | `sum_t(w * ce) / sum_t(w)`             |
    | `average_across_batch`                        | `[time]`          | `sum_b(w * ce) / sum_b(w)`             |
    | `sum_over_timesteps, sum_over_batch`          | `[]`              | `sum(w * ce) / count_nonzero(w)`       |
    | `sum_over_timesteps`                          | `[batch]`         | `sum_t(w * ce) / count_nonzero_t(w)`   |
    | `sum_over_batch`                              | `[time]`          | `sum_b(w * ce) / count_nonzero_b(w)`   |
    | none                                          | `[batch, time]`   | `w * ce`                               |

    Despite their names, the `sum_over_*` flags divide by the number of non-zero weights, as TFA's do.
    Every division is `tf.math.divide_no_nan`: an all-zero slice of weights gives 0, never NaN (contrib
    1.14+ and TFA); pass `epsilon=1e-12` for the `sum / (sum(w) + 1e-12)` of contrib 1.4 to 1.13.
    An `average_across_*` flag cannot be combined with a `sum_over_*` flag (`ValueError`).

    Args:
        logits: `[batch, time, classes]` float16, bfloat16, float32 or float64 unscaled log-probabilities.
        targets: `[batch, time]` int32 or int64 class ids, or `[batch, time, classes]` probabilities.
        weights: `[batch, time]` float weights of any float dtype (cast to the compute dtype), typically a
            0/1 mask from `tf.sequence_mask`. `None` means all ones. A token of weight 0 is padding: its
            logits are never read and its loss counts as 0. The gradient with respect to a non-zero weight
            is contrib's (`(ce - loss) / sum(w)` under the averaging flags); with respect to a zero weight
            it is `-loss / sum(w)` under the averaging flags (contrib and TFA: `(ce - loss) / sum(w)`) and
            0 under the others.
        average_across_timesteps: divide the sum over time by the summed weights over time.
        average_across_batch: divide the sum over the batch by the summed weights over the batch.
        sum_over_timesteps: reduce over time, dividing by the number of non-zero weights.
        sum_over_batch: reduce over the batch, dividing by the number of non-zero weights.
        softmax_loss_function: a replacement per-token loss, called as contrib did:
            `softmax_loss_function(labels=targets_flat, logits=logits_flat)` with `logits_flat` of shape
            `[batch * time, classes]` (as given, not cast) and `targets_flat` of shape `[batch * time]`
            (or `[batch * time, classes]`), returning `[batch * time]` losses. To use a function with
            another signature, wrap it. For `tf.nn.sampled_softmax_loss`, which takes hidden states,
            use `tf_seqloss.sampled_sequence_loss(hidden, kernel, targets, ..., num_sampled=n)`.
        name: name scope of the operations; defaults to `"sequence_loss"`.
        lengths: keyword-only. `[batch]` sequence lengths of any integer dtype, in `[0, time]`; positions
            at or past a sequence's length get weight 0 (`tf.sequence_mask(lengths, time)`).
        padding_id: keyword-only. A class id that marks padding in sparse `targets`; positions holding
            it get weight 0. It may lie outside `[0, classes)` (e.g. -1 or -100), but must be a value the
            targets' dtype can hold.
        label_smoothing: keyword-only. TF1 label smoothing in `[0, 1]`, a Python or NumPy number or a
            scalar float tensor: the targets become `(1 - label_smoothing) * one_hot + label_smoothing /
            classes`. For sparse targets no one-hot matrix is built. Not allowed with
            `softmax_loss_function`.
        epsilon: keyword-only. `None` (default) divides with `divide_no_nan`; a number divides by
            `normaliser + epsilon` instead, reproducing contrib 1.4 to 1.13 with `epsilon=1e-12`. A
            Python or NumPy number in `[0, 3.4e38]` (finite in float32; `inf` and NaN are refused).
        implementation: keyword-only. How the per-token loss of sparse targets is computed, one of
            `tf_seqloss.IMPLEMENTATIONS`; every choice gives the same values and gradients (first and
            second order) to float tolerance. `"reference"` is
            `tf.nn.sparse_softmax_cross_entropy_with_logits`. `"fused"` is `logsumexp - target logit`
            with a hand-written gradient that XLA fuses, under `jit_compile=True`, into passes that keep a
            single logits-sized buffer; in a plain `tf.function` its ops run in the logits' own buffer
            once nothing else reads them (a training step whose projection makes the logits), so the
            step peaks no higher than with `tf.nn`. `"fused_xla"` is the same formulation compiled by XLA
            into two kernels even in eager mode and plain `tf.function`s, where it keeps no logits-sized
            buffer between forward and backward, but writes the gradient beside the logits; XLA compiles
            them once per input shape. `"auto"` (default) keeps the reference whenever a GPU or other
            accelerator is visible, since only CPU was measured; on a CPU-only machine it takes the
            reference below 1024 classes or when the logits' last dimension is unknown while tracing
            (outside XLA), else `"fused_xla"` eagerly and `"fused"` while tracing (under
            XLA, in a `tf.function` with static or `None` sizes, in Keras' `fit`), which compiles nothing
            per shape. Memory decides that choice: in a `tf.function` with static sizes
            `implementation="fused_xla"` is faster per step and buys that speed for one more
            logits-sized buffer. The choice depends on the call alone, never on earlier calls: an eager
            loop whose shape changes every step compiles every shape, so pass `"fused"` there.
            `benchmarks/README.md` has the figures.
        normalizer: keyword-only, for the scalar modes only (both `average_across_*` flags, or both
            `sum_over_*` flags). What the weighted sum is divided by when the batch is one part of a larger
            one: `None` (default) this call's own weights (their sum, or their non-zero count);
            `"global"` this call's own summed over the replicas of a `tf.distribute` strategy (an
            all-reduce), so that each replica returns its share of the global token mean and the shares
            (and the gradients a strategy sums) add up to it exactly; equal to `None` outside a strategy
            and in a cross-replica context; a positive number or scalar tensor: divide by it, e.g. the
            token count of a whole gradient-accumulation window. An all-reduced or given normaliser is
            a constant for differentiation.
        z_loss: keyword-only. PaLM's auxiliary loss: adds `z_loss * logsumexp(logits)**2` to every token's
            loss, weighted like it, which keeps the softmax normaliser near 1. A Python or NumPy number
            in `[0, inf)`; 0 (default) adds nothing. Not allowed with `softmax_loss_function` or
            `from_logits=False`.
        from_logits: keyword-only. True (default): `logits` are logits. False: they are probabilities (a
            softmax's output), as Keras' cross-entropies take them with `from_logits=False`: clipped to
            `[1e-7, 1 - 1e-7]` (class ids) or divided by their row sum and clipped (probability targets),
            then their log is taken. Not allowed with `softmax_loss_function` or `z_loss`.
        logit_soft_cap: keyword-only. `None` (default), or a positive finite number `cap`: every logit
            becomes `cap * tanh(logit / cap)` before the softmax, as Gemma-family models cap theirs (the
            name Keras' `ReversibleEmbedding` uses). The cross-entropy, label smoothing and z-loss are
            those of the capped logits, and the gradient includes the tanh's derivative. Every
            `implementation` supports it; half-precision logits are capped in float32. Not allowed with
            `softmax_loss_function` or `from_logits=False`.

    `weights`, `lengths` and `padding_id` combine: the effective weight of a token is `weights` where
    `sequence_mask(lengths)` is true and the target is not `padding_id`, and exactly 0 elsewhere.

    Padding is inert: whatever a padded position (weight 0, beyond `lengths`, or at `padding_id`) holds,
    even `inf` or `NaN` logits or an invalid id, the loss and its gradients equal those computed with the
    padded positions removed, and the padded logits get exactly 0 gradient.

    `logits` and `targets` (and `weights`) may be `tf.RaggedTensor`s, `[batch, (time), classes]` and
    `[batch, (time)]`: their row lengths then act as `lengths`, and a non-scalar result is the padded
    `[batch, time]` or `[batch]`/`[time]` tensor. XLA cannot compile ragged inputs (`ValueError`).

    Returns:
        The reduced loss, of the rank the flags give (0, 1 or 2). Its dtype is float32 for float16 and
            bfloat16 logits (the loss is computed in float32, so logits up to the float16 maximum of 65504
            do not overflow) and the logits' dtype otherwise.

    A sparse target id outside `[0, classes)` at a position with non-zero weight makes the loss NaN
    (elementwise outputs: that element) and the gradient of that position's logits NaN, in eager mode,
    under `tf.function` and under XLA alike, and on CPU and GPU alike; at a position with zero weight it is
    ignored, so padding may hold any id. Where XLA compiles the run-time asserts away, an out-of-range
    `lengths` entry or tensor `label_smoothing` makes the loss NaN instead of raising.

    Raises:
        ValueError: wrong ranks, batch/time/classes sizes that disagree, conflicting flags,
            `label_smoothing` outside `[0, 1]` or with `softmax_loss_function`, `padding_id` with
            probability targets or outside the targets' dtype, ragged inputs under XLA.
        TypeError: non-float `logits` or `weights`, non-integer sparse `targets`, `lengths` or
            `padding_id`, a `label_smoothing` that is not a number, or a `softmax_loss_function` that
            cannot be called with `labels=` and `logits=` keywords.
        tf.errors.InvalidArgumentError: when the graph runs, for what is only known then: sizes that
            disagree, `lengths` outside `[0, time]`, a tensor `label_smoothing` outside `[0, 1]`, a
            tensor `normalizer` that is not positive (not under XLA, which compiles these asserts away).

    Example:

    >>> import tensorflow as tf, tf_seqloss
    >>> logits = tf.zeros([2, 3, 5])                      # uniform over 5 classes
    >>> targets = tf.constant([[1, 2, 0], [4, 0, 0]])
    >>> float(tf_seqloss.sequence_loss(logits, targets, lengths=[3, 1]))  # log(5)
    1.609437...

    Soft-capping: with `logit_soft_cap=30`, a logit of 100 counts as `30 * tanh(100 / 30)`, about 29.9.

    >>> import numpy as np
    >>> logits = tf.constant([[[100.0, 0.0]]])
    >>> capped = tf_seqloss.sequence_loss(logits, [[1]], logit_soft_cap=30.0)
    >>> bool(abs(float(capped) - 30 * np.tanh(100 / 30)) < 1e-3)  # log(1 + e^29.9) - 0
    True
    """
    options = LossOptions(
        average_across_timesteps, average_across_batch, sum_over_timesteps, sum_over_batch,
        label_smoothing=label_smoothing, z_loss=z_loss, normalizer=normalizer, epsilon=epsilon,
        padding_id=padding_id, from_logits=from_logits, softmax_loss_function=softmax_loss_function,
        implementation=implementation, logit_soft_cap=logit_soft_cap)
    with tf.name_scope(name or "sequence_loss"):
        return compute_sequence_loss(logits, targets, options, weights=weights, lengths=lengths)


@tf.autograph.experimental.do_not_convert
def compute_sequence_loss(logits, targets, options: LossOptions, *, weights=None, sample_weight=None, lengths=None,
                          mask=None, probability_epsilon=_PROBABILITY_EPSILON):
    """`sequence_loss` with checked `options`, also taking Keras' `sample_weight` and mask.

    The path every public face of the loss takes (the function, `SequenceLoss`, `SequenceLossLayer`):
    inputs are checked, every padding route becomes one set of token weights (`_padding.token_weights`),
    `_cross_entropy` weighs the per-token loss, and `_options.reduce_tokens` reduces it as the flags say.

    Args:
        logits: as in `sequence_loss` (probabilities with `options.from_logits` False); may be ragged.
        targets: as in `sequence_loss`; may be ragged.
        options: the checked options.
        weights: contrib's `[batch, time]` float weights, or None.
        sample_weight: Keras' weights (a scalar, `[batch]`, `[batch, time]` or `[batch, time, 1]`), or None.
        lengths: `[batch]` integer lengths, or None.
        mask: a `[batch, time]` Keras mask, or None.
        probability_epsilon: the clipping bound of probabilities (`options.from_logits` False).

    Returns:
        The loss reduced as `options`' flags say, as `sequence_loss` returns it.
    """
    tokens = token_losses(logits, targets, options, weights=weights, sample_weight=sample_weight,
                          lengths=lengths, mask=mask, probability_epsilon=probability_epsilon)
    return reduce_tokens(tokens.weighted, tokens.weights, options)


class TokenLosses(NamedTuple):
    """`[batch, time]` weighted token losses and their weights, with the checked dense inputs."""

    weighted: tf.Tensor
    weights: tf.Tensor
    logits: tf.Tensor
    targets: tf.Tensor


def token_losses(logits, targets, options: LossOptions, *, weights=None, sample_weight=None, lengths=None,
                 mask=None, probability_epsilon=_PROBABILITY_EPSILON) -> TokenLosses:
    """Returns the `[batch, time]` weighted token losses `w * ce` and the token weights `w` (also the metrics').

    With `options.from_logits` False, `logits` are probabilities, as Keras' cross-entropies take them with
    `from_logits=False`, clipped to `[probability_epsilon, 1 - probability_epsilon]`.

    Args:
        logits: as in `compute_sequence_loss`.
        targets: as in `compute_sequence_loss`.
        options: as in `compute_sequence_loss`.
        weights: as in `compute_sequence_loss`.
        sample_weight: as in `compute_sequence_loss`.
        lengths: as in `compute_sequence_loss`.
        mask: as in `compute_sequence_loss`.
        probability_epsilon: as in `compute_sequence_loss`.

    Returns:
        A `TokenLosses`: `weighted` and `weights` (`[batch, time]`, all ones where nothing marks padding),
            and the dense, checked `logits` and `targets`.
    """
    ragged = _padding.densify_ragged(logits, targets, weights)
    logits = tf.convert_to_tensor(ragged.logits, name="logits")
    targets = tf.convert_to_tensor(ragged.targets, name="targets")
    _checks.check_floating(logits, "logits")
    _checks.check_rank(logits, "logits", (3,), _LAYOUT_LOGITS)
    dense = _checks.check_rank(targets, "targets", (2, 3), _LAYOUT_TARGETS) == 3
    _checks.check_same_dim(logits, "logits", 0, targets, "targets", 0, "batch")
    _checks.check_same_dim(logits, "logits", 1, targets, "targets", 1, "time")
    padding_id = options.padding_id
    if dense:
        _checks.check_floating(targets, "targets")
        _checks.check_same_dim(logits, "logits", 2, targets, "targets", 2, "classes")
        if padding_id is not None:
            raise ValueError(
                "`padding_id` needs sparse `targets` of class ids ([batch, time]); with probability "
                f"targets pass `weights` or `lengths`. Received: targets.shape={targets.shape}"
            )
    else:
        targets = _checks.check_class_ids(targets, "targets", padding_id)

    dtype = _checks.compute_dtype(logits.dtype)
    if ragged.lengths is not None:
        # Ragged row lengths are lengths; `lengths` given as well mask on top of them.
        ragged_mask = tf.sequence_mask(ragged.lengths, maxlen=_checks.dim(logits, 1))
        mask = ragged_mask if mask is None else tf.logical_and(tf.cast(mask, tf.bool), ragged_mask)
    token_weights = _padding.token_weights(
        logits, targets, dtype=dtype, weights=ragged.weights, sample_weight=sample_weight, lengths=lengths,
        padding_id=padding_id, mask=mask)

    if options.logit_soft_cap is not None:
        # Capped in the compute dtype, padding zeroed first: every implementation then sees capped logits,
        # and a padded NaN never meets the tanh, whose derivative would turn its zero gradient into NaN.
        active = None if token_weights is None else tf.not_equal(token_weights, 0)
        logits = _cross_entropy._inert_padding(tf.cast(logits, dtype), active)
        logits = soft_cap(logits, options.logit_soft_cap)
    label_smoothing, implementation = options.label_smoothing, options.implementation
    if options.softmax_loss_function is not None:
        weighted = _cross_entropy.custom_cross_entropy(
            options.softmax_loss_function, logits, targets, token_weights, dtype)
    elif not options.from_logits and dense:
        weighted = _cross_entropy.dense_cross_entropy_of_probabilities(
            logits, targets, token_weights, epsilon=probability_epsilon, label_smoothing=label_smoothing)
    elif not options.from_logits:
        weighted = _cross_entropy.sparse_cross_entropy_of_probabilities(
            logits, targets, token_weights, epsilon=probability_epsilon, label_smoothing=label_smoothing,
            implementation=implementation)
    elif dense:
        weighted = _cross_entropy.dense_cross_entropy(logits, targets, token_weights,
                                                     label_smoothing=label_smoothing, z_loss=options.z_loss)
    else:
        weighted = _cross_entropy.sparse_cross_entropy(logits, targets, token_weights,
                                                      label_smoothing=label_smoothing,
                                                      implementation=implementation, z_loss=options.z_loss)
    return TokenLosses(weighted, _padding.ones_if_none(token_weights, weighted), logits, targets)
