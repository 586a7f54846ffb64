"""The sequence loss of a linear output layer without its logits: `linear_sequence_loss`; sampled softmax.

For a vocabulary of tens of thousands, the `[batch, time, classes]` logits `hidden @ kernel + bias` are the
largest tensor of a training step. `linear_sequence_loss` gives the value and the gradients (hidden,
kernel, bias) of `sequence_loss(hidden @ kernel + bias, ...)` while holding logits for `chunk_size`
tokens at a time:

- **Chunks of tokens.** A `tf.while_loop` computes, for `chunk_size` tokens at a time, the chunk's logits,
  its log-sum-exp and cross-entropy, and, when a gradient will be taken, the chunk's logits gradient,
  which it turns at once into the chunk's rows of the hidden gradient (added into one `[tokens,
  features]` buffer) and adds into the kernel and bias gradients (accumulated in float32). Nothing
  `[tokens, classes]`-sized is ever alive.
- **Slices of classes for the kernel gradient.** `dW += h^T @ g` is summed one slice of classes at a
  time (`class_slices`), so that no `[features, classes]` temporary sits beside the accumulator: outside
  XLA each slice has its own accumulator, concatenated once after the loop; under XLA one buffer is
  updated in place, slice after slice in a loop of its own (XLA's scheduler would otherwise run every
  slice's matmul first and hold all their results).
- **Gradient in the forward pass.** When the flags reduce to a scalar, the gradient of the reduced loss
  is the same for every token's weighted loss, so the loop forms the gradients as it goes (as Liger-Kernel
  does) and the backward pass only scales them: one matmul for the logits and two for the gradients,
  as the materialised path spends. Otherwise, or when no tape is recording while the loss is traced, the
  forward pass computes the loss only and the backward pass runs the loop again with the per-token
  upstream gradient.
- **Weights inside the loop.** Each token's weight (and its upstream gradient) scales its logits gradient
  before the kernel gradient is summed, so padded or down-weighted tokens never leak into `dW`.
- **Padding is skipped.** Tokens of weight 0 are moved behind the others (a stable sort of the weights'
  zero pattern) and the loop stops after the last chunk holding a real token: padded tokens cost no
  matmul. Their hidden states never reach a kernel, so they may hold `inf` or `NaN`; their loss and
  gradient are exactly 0. An out-of-range id at a token of non-zero weight makes the loss and every
  gradient NaN, as in `cross_entropy`.

Second-order gradients are refused with an error (the gradients are computed from stopped tensors, so
differentiating them again would be silently wrong).
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Tuple, Union

import numpy as np
import tensorflow as tf
from tensorflow.types.experimental import TensorLike

from tf_seqloss import _checks, _cross_entropy, _fused, _padding
from tf_seqloss._options import LossOptions, reduce_tokens, refuse

try:  # Whether a gradient tape (eager or traced) could record the ops being built now. Private API; without
    # it the forward pass never forms the gradients and the backward pass runs the loop again: slower, exact.
    from tensorflow.python.eager.record import could_possibly_record as _could_record
except ImportError:
    _could_record = None

try:  # XLA's in-place update of a slice, for the kernel gradient under XLA. Private API, and no public op lowers
    # to it; without it the kernel gradient keeps one accumulator a slice of classes, as outside XLA: exact,
    # with one more kernel-sized buffer while they are concatenated.
    from tensorflow.compiler.tf2xla.python.xla import dynamic_update_slice as _dynamic_update_slice
except ImportError:
    _dynamic_update_slice = None

_LAYOUT_HIDDEN = "[batch, time, features]"

# Automatic chunking keeps the float32 logits of one chunk near this many elements (8 MiB), with a
# chunk of at least MIN_CHUNK tokens so that the matmuls of a chunk stay efficient: the sizes that were
# fastest and leanest in both modes (benchmarks/README.md, "The fused head").
CHUNK_ELEMENTS = 2 ** 21
MIN_CHUNK = 128
MAX_CHUNK = 4096


class TokenStats(NamedTuple):
    """What the token metrics need from a fused head, `[batch, time]` each, with no logits.

    `linear_sequence_loss(..., return_token_stats=True)` returns it; `TokenAccuracy` and
    `TokenPerplexity` take it in `update_from_token_stats`.

    Attributes:
        targets: the class ids.
        weights: each token's weight, every padding route multiplied together (0 at padded tokens).
        predictions: int32 argmax of each token's logits; among tied maxima, the lowest id (NumPy's
            `argmax` rule). 0 at padded tokens; the number of classes (no class) at a real token whose
            log-sum-exp is NaN (a NaN or +inf among its logits, or all of them -inf).
        cross_entropy: each token's plain cross-entropy `logsumexp(logits) - logits[target]`, without
            label smoothing or z-loss, in the compute dtype. 0 at padded tokens; NaN at a real token whose
            id is out of range.

    Example:

    >>> import numpy as np, tensorflow as tf, tf_seqloss
    >>> hidden = tf.ones([1, 2, 4])
    >>> kernel = tf.zeros([4, 5])                       # uniform logits over 5 classes
    >>> _, stats = tf_seqloss.linear_sequence_loss(hidden, kernel, tf.constant([[3, 1]]),
    ...                                            return_token_stats=True)
    >>> np.round(stats.cross_entropy.numpy(), 4)       # log(5) at every token
    array([[1.6094, 1.6094]], dtype=float32)
    >>> perplexity = tf_seqloss.TokenPerplexity()
    >>> perplexity.update_from_token_stats(stats)
    >>> round(float(perplexity.result()), 4)           # exp(log 5)
    5.0
    """

    targets: tf.Tensor
    weights: tf.Tensor
    predictions: tf.Tensor
    cross_entropy: tf.Tensor


@tf.autograph.experimental.do_not_convert
def linear_sequence_loss(
    hidden: TensorLike,
    kernel: TensorLike,
    targets: TensorLike,
    weights: Optional[TensorLike] = None,
    average_across_timesteps: bool = True,
    average_across_batch: bool = True,
    sum_over_timesteps: bool = False,
    sum_over_batch: bool = False,
    name: Optional[str] = None,
    *,
    bias: Optional[TensorLike] = None,
    lengths: Optional[TensorLike] = None,
    padding_id: Optional[int] = None,
    label_smoothing: Union[float, TensorLike] = 0.0,
    z_loss: float = 0.0,
    epsilon: Optional[float] = None,
    chunk_size: Optional[int] = None,
    return_log_sum_exp: bool = False,
    normalizer: Optional[Union[str, float, TensorLike]] = None,
    transpose_kernel: bool = False,
    logit_soft_cap: Optional[float] = None,
    return_token_stats: bool = False,
) -> Union[tf.Tensor, Tuple[tf.Tensor, ...]]:
    """Returns `sequence_loss(hidden @ kernel + bias, targets, ...)`, computed without the logits.

    Value and gradients with respect to `hidden`, `kernel`, `bias` (and `weights`) equal those of
    `tf_seqloss.sequence_loss` on the materialised logits, for every flag combination, padding route,
    label smoothing and z-loss, while only `chunk_size` tokens' logits exist at a time (see the module
    docstring). Works eagerly, in `tf.function` with `None` sizes, and under `jit_compile=True`.

    Args:
        hidden: `[batch, time, features]` float16, bfloat16, float32 or float64 hidden states.
        kernel: `[features, classes]` output projection (`[classes, features]` with
            `transpose_kernel=True`), of the dtype of `hidden`; or float32 with float16 or bfloat16
            `hidden`, as a Keras layer's variable under a mixed-precision policy: it is then cast to
            `hidden`'s dtype (the gradient reaches the float32 kernel through the cast). The logits of
            half-precision inputs are formed and reduced in float32 from the rounded values.
        targets: `[batch, time]` integer class ids.
        weights: `[batch, time]` float weights, as in `sequence_loss`; `None` means all ones.
        average_across_timesteps: the contrib flag, as in `sequence_loss` (same default, same shapes).
        average_across_batch: the contrib flag, as in `sequence_loss` (same default, same shapes).
        sum_over_timesteps: the contrib flag, as in `sequence_loss` (same default, same shapes).
        sum_over_batch: the contrib flag, as in `sequence_loss` (same default, same shapes).
        name: name scope of the operations; defaults to `"linear_sequence_loss"`.
        bias: keyword-only. Optional `[classes]` bias, of the dtype of `hidden` (or float32, as `kernel`).
        lengths: keyword-only. `[batch]` sequence lengths, as in `sequence_loss`.
        padding_id: keyword-only. A class id marking padding in `targets`, as in `sequence_loss`.
        label_smoothing: keyword-only. TF1 label smoothing in `[0, 1]`, as in `sequence_loss`.
        z_loss: keyword-only. The PaLM auxiliary loss: adds `z_loss * logsumexp(logits)**2` to every
            token's loss (weighted like it). A Python or NumPy number in `[0, inf)`.
        epsilon: keyword-only. As in `sequence_loss`.
        chunk_size: keyword-only. Tokens per chunk; `None` picks it from the number of classes so that a
            chunk's float32 logits hold about 2M elements (at least 128, at most 4096 tokens).
        return_log_sum_exp: keyword-only. Also return the `[batch, time]` log-sum-exp of every token's
            logits (0 at padded tokens), e.g. to log what `z_loss` pushes towards 0. It has no gradient.
        normalizer: keyword-only. As in `sequence_loss`: `"global"` for the exact token mean over the
            replicas of a `tf.distribute` strategy, or a window's token count.
        transpose_kernel: keyword-only. False (default): `kernel` is `[features, classes]` and the logits
            are `hidden @ kernel + bias`. True: `kernel` is `[classes, features]`, e.g. a token embedding
            tied to the output (GPT-2, Gemma, Llama), and the logits are `hidden @ kernel^T + bias`; the
            kernel is read as it is (no transposed copy) and its gradient has its own layout.
        logit_soft_cap: keyword-only. As in `sequence_loss`: `None`, or a positive finite `cap` applied to
            each chunk's logits as `cap * tanh(logits / cap)` before the softmax; the loss, label
            smoothing, z-loss and the returned log-sum-exp are those of the capped logits.
        return_token_stats: keyword-only. Also return a `tf_seqloss.TokenStats` (each token's argmax and
            plain cross-entropy, computed inside the loop, and its weight) for `TokenAccuracy` and
            `TokenPerplexity.update_from_token_stats`. It has no gradient.

    Returns:
        The loss, shaped and typed as `sequence_loss`'s (float32 for half-precision inputs); with
        `return_log_sum_exp=True`, the pair `(loss, log_sum_exp)`; with `return_token_stats=True`, the
        `TokenStats` appended last: `(loss, stats)` or `(loss, log_sum_exp, stats)`.

    Raises:
        ValueError: as `sequence_loss` for the shared arguments; a `chunk_size` that is not `None` or a
            positive int; `hidden`, `kernel` or `bias` of the wrong rank, or disagreeing in features or
            classes.
        TypeError: as `sequence_loss` for the shared arguments; `hidden`, `kernel` and `bias` of
            different or non-float dtypes, or non-integer `targets`.
        tf.errors.InvalidArgumentError: as `sequence_loss`, when the graph runs, for sizes or values
            only known then.

    Example:

    >>> import tensorflow as tf, tf_seqloss
    >>> hidden = tf.random.normal([2, 3, 4])
    >>> kernel, bias = tf.random.normal([4, 7]), tf.random.normal([7])
    >>> targets = tf.constant([[1, 2, 0], [4, 0, 0]])
    >>> fused = tf_seqloss.linear_sequence_loss(hidden, kernel, targets, lengths=[3, 1], bias=bias)
    >>> logits = tf.matmul(hidden, kernel) + bias
    >>> materialised = tf_seqloss.sequence_loss(logits, targets, lengths=[3, 1])
    >>> bool(abs(fused - materialised) < 1e-5)
    True

    A `[classes, features]` embedding tied to the output, with Gemma's soft-capping:

    >>> embeddings = tf.random.normal([7, 4])
    >>> fused = tf_seqloss.linear_sequence_loss(hidden, embeddings, targets, lengths=[3, 1],
    ...                                         transpose_kernel=True, logit_soft_cap=5.0)
    >>> logits = tf.matmul(hidden, embeddings, transpose_b=True)
    >>> materialised = tf_seqloss.sequence_loss(5.0 * tf.tanh(logits / 5.0), targets, lengths=[3, 1])
    >>> bool(abs(fused - materialised) < 1e-5)
    True
    """
    options = LossOptions(
        average_across_timesteps, average_across_batch, sum_over_timesteps, sum_over_batch,
        label_smoothing=label_smoothing, z_loss=z_loss, normalizer=normalizer, epsilon=epsilon,
        padding_id=padding_id, logit_soft_cap=logit_soft_cap)
    chunk_size = check_chunk_size(chunk_size)
    if not isinstance(return_token_stats, (bool, np.bool_)):
        raise TypeError(_checks.invalid_value("return_token_stats", "True or False", repr(return_token_stats)))
    with tf.name_scope(name or "linear_sequence_loss"):
        return compute_linear_sequence_loss(
            hidden, kernel, targets, options, bias=bias, weights=weights, lengths=lengths, chunk_size=chunk_size,
            return_log_sum_exp=return_log_sum_exp, transpose_kernel=transpose_kernel,
            return_token_stats=bool(return_token_stats))


def check_chunk_size(chunk_size) -> Optional[int]:
    if chunk_size is None:
        return None
    if isinstance(chunk_size, (bool, np.bool_)) or not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
        raise ValueError(_checks.invalid_value("chunk_size", "None or a positive int (tokens per chunk)",
                                               repr(chunk_size)))
    return int(chunk_size)


def kernel_layout(transpose_kernel: bool) -> str:
    """Returns the kernel's layout, as the shape errors name it."""
    if transpose_kernel:
        return "[classes, features] (as `transpose_kernel=True` takes it, e.g. tied embeddings)"
    return "[features, classes] (pass `transpose_kernel=True` for a [classes, features] kernel)"


def check_head(hidden, kernel, bias, transpose_kernel: bool = False):
    """Returns `(hidden, kernel, bias)` as tensors after checking ranks, dtypes and sizes.

    A float32 `kernel` or `bias` with half-precision `hidden` is cast to `hidden`'s dtype, as a Keras
    layer under a mixed-precision policy casts its float32 variables to the compute dtype (the gradient
    reaches the float32 tensor through the cast); any other dtype mismatch is refused.
    """
    hidden = tf.convert_to_tensor(hidden, name="hidden")
    kernel = tf.convert_to_tensor(kernel, name="kernel")
    _checks.check_floating(hidden, "hidden")
    _checks.check_rank(hidden, "hidden", (3,), _LAYOUT_HIDDEN)
    if not isinstance(transpose_kernel, (bool, np.bool_)):
        raise TypeError(_checks.invalid_value("transpose_kernel", "True or False (a Python or NumPy bool)",
                                              repr(transpose_kernel)))
    features_axis, classes_axis = (1, 0) if transpose_kernel else (0, 1)
    _checks.check_rank(kernel, "kernel", (2,), kernel_layout(transpose_kernel))
    if bias is not None:
        bias = tf.convert_to_tensor(bias, name="bias")
        _checks.check_rank(bias, "bias", (1,), "[classes]")

    def same_dtype(arg, x):
        if x.dtype == hidden.dtype:
            return x
        if x.dtype == tf.float32 and hidden.dtype in (tf.float16, tf.bfloat16):
            return tf.cast(x, hidden.dtype)  # mixed precision: float32 variables, half-precision activations
        raise TypeError(f"`{arg}` must have the dtype of `hidden` ({hidden.dtype.name}), as in "
                        f"`hidden @ kernel + bias`, or be float32 with float16 or bfloat16 `hidden` (then "
                        f"cast to it, as under a Keras mixed-precision policy). Received: {arg}.dtype="
                        f"{x.dtype.name}, hidden.dtype={hidden.dtype.name}")

    kernel = same_dtype("kernel", kernel)
    bias = None if bias is None else same_dtype("bias", bias)
    _check_kernel_dim(transpose_kernel, hidden, "hidden", 2, kernel, "kernel", features_axis, "features")
    if bias is not None:
        _check_kernel_dim(transpose_kernel, kernel, "kernel", classes_axis, bias, "bias", 0, "classes")
    return hidden, kernel, bias


def _check_kernel_dim(transpose_kernel, *args):
    """`_checks.check_same_dim(*args)`, whose message also names the kernel layout `transpose_kernel` expects."""
    try:
        _checks.check_same_dim(*args)
    except ValueError as err:
        raise ValueError(f"{str(err).rstrip('.')}. With transpose_kernel={transpose_kernel}, `kernel` is "
                         f"expected as {kernel_layout(transpose_kernel)}.") from None


def check_head_targets(hidden, targets, padding_id):
    """Returns `[batch, time]` class ids checked against `hidden` (and `padding_id` against their dtype)."""
    targets = tf.convert_to_tensor(targets, name="targets")
    _checks.check_rank(targets, "targets", (2,), "[batch, time] class ids")
    targets = _checks.check_class_ids(targets, "targets", padding_id)
    _checks.check_same_dim(hidden, "hidden", 0, targets, "targets", 0, "batch")
    _checks.check_same_dim(hidden, "hidden", 1, targets, "targets", 1, "time")
    return targets


def compute_linear_sequence_loss(hidden, kernel, targets, options: LossOptions, *, bias=None, weights=None,
                                 sample_weight=None, lengths=None, mask=None, chunk_size=None,
                                 return_log_sum_exp=False, transpose_kernel=False, return_token_stats=False):
    """`linear_sequence_loss` with checked `options`, also taking Keras' `sample_weight` and mask."""
    hidden, kernel, bias = check_head(hidden, kernel, bias, transpose_kernel)
    targets = check_head_targets(hidden, targets, options.padding_id)
    dtype = _checks.compute_dtype(hidden.dtype)
    token_weights = _padding.token_weights(
        hidden, targets, dtype=dtype, weights=weights, sample_weight=sample_weight, lengths=lengths,
        padding_id=options.padding_id, mask=mask, reference_arg="hidden")

    features = _checks.dim(hidden, 2)
    flat_hidden = tf.reshape(hidden, [-1, features])
    flat_weights = None if token_weights is None else tf.reshape(token_weights, [-1])
    # When the flags reduce both axes, every token's weighted loss gets the same upstream gradient.
    flat_loss, flat_lse, *flat_stats = fused_linear_cross_entropy(
        flat_hidden, kernel, bias, tf.reshape(targets, [-1]), flat_weights,
        label_smoothing=options.label_smoothing, z_loss=options.z_loss, chunk_size=chunk_size,
        uniform_upstream=options.reduces_both_axes, transpose_kernel=transpose_kernel,
        logit_soft_cap=options.logit_soft_cap, token_stats=return_token_stats)
    weighted = tf.reshape(flat_loss, tf.shape(targets))
    loss = reduce_tokens(weighted, token_weights, options)
    outputs = [loss]
    if return_log_sum_exp:
        outputs.append(tf.reshape(flat_lse, tf.shape(targets)))
    if return_token_stats:
        predictions, nll = (tf.reshape(x, tf.shape(targets)) for x in flat_stats[0])
        stats_weights = tf.ones(tf.shape(targets), dtype) if token_weights is None else token_weights
        outputs.append(TokenStats(targets, tf.stop_gradient(stats_weights), predictions, nll))
    return outputs[0] if len(outputs) == 1 else tuple(outputs)


def auto_chunk_size(num_classes) -> int:
    """Returns the tokens per chunk for `num_classes` (a static int, or None when unknown)."""
    if num_classes is None:
        return 256
    chunk = CHUNK_ELEMENTS // max(int(num_classes), 1)
    chunk = 1 << max(chunk, 1).bit_length() - 1  # a power of two, for even matmul tiles
    return int(min(max(chunk, MIN_CHUNK), MAX_CHUNK))


def fused_linear_cross_entropy(hidden, kernel, bias, labels, weights, *, label_smoothing=0.0, z_loss=0.0,
                               chunk_size=None, uniform_upstream=False, transpose_kernel=False,
                               logit_soft_cap=None, token_stats=False):
    """Returns `(weights * loss, log_sum_exp)`, `[n]` each, of the logits `hidden @ kernel + bias`.

    With `token_stats=True`, returns `(weights * loss, log_sum_exp, (predictions, cross_entropy))`: each
    token's argmax (int32, the lowest id among tied maxima) and its plain cross-entropy (no smoothing,
    no z-loss; NaN at a real token whose id is out of range), 0 at padded tokens, without gradients.

    `hidden` is `[n, features]`, `labels` `[n]` ids, `weights` `[n]` in the compute dtype or None (all
    ones). The per-token loss follows `_cross_entropy.sparse_cross_entropy` (padding inert, bad ids NaN)
    plus `z_loss * log_sum_exp**2`. `uniform_upstream=True` promises that the gradient arriving at the
    result is the same for every token (a full sum), which lets the forward pass form the gradients.
    `transpose_kernel=True` takes a `[classes, features]` kernel (logits `hidden @ kernel^T + bias`), used
    as it is. `logit_soft_cap=cap` caps each chunk's logits as `cap * tanh(logits / cap)` (a Python float).
    """
    dtype = _checks.compute_dtype(hidden.dtype)
    classes_axis = 0 if transpose_kernel else 1
    chunk = chunk_size or auto_chunk_size(kernel.shape[classes_axis])
    smoothing = None if _checks.is_zero(label_smoothing) else _checks.cast_number(label_smoothing, dtype)
    z = None if _checks.is_zero(z_loss) else _checks.cast_number(z_loss, dtype)
    n = tf.shape(hidden, out_type=tf.int32)[0]
    valid, safe_labels = _cross_entropy.checked_ids(labels, tf.shape(kernel, out_type=labels.dtype)[classes_axis])
    if weights is None:
        factor = _cross_entropy.nan_where_invalid(tf.ones([], dtype), valid, None)
        order, n_active = tf.range(n), n
    else:
        active = tf.not_equal(weights, 0)
        factor = _cross_entropy.nan_where_invalid(weights, valid, active)
        # Real tokens first, in their order; the loop stops after the last chunk holding one.
        order = tf.argsort(tf.cast(tf.logical_not(active), tf.int32), stable=True)
        n_active = tf.reduce_sum(tf.cast(active, tf.int32))
    precompute = uniform_upstream and _could_record is not None and _could_record()
    loop = _ChunkLoop(order, n, n_active, chunk, safe_labels, factor, smoothing, z, dtype,
                      transpose_kernel=transpose_kernel, cap=logit_soft_cap)
    stats = {}  # filled by the forward pass with the token stats, which have no gradient

    has_bias, has_weights = bias is not None, weights is not None

    @tf.custom_gradient
    def head(hidden, kernel, *bias_and_weights):
        bias = bias_and_weights[0] if has_bias else None
        # Stopped: the tape must not record the loop, whose ops' own gradients are never used.
        args = [tf.stop_gradient(x) for x in (hidden, kernel)]
        bias_arg = None if bias is None else tf.stop_gradient(bias)
        # mypy cannot tell that `args` holds exactly hidden and kernel.
        ce, lse, grads, *token_stats_ = loop.run(  # type: ignore[misc]
            *args, bias_arg, upstream=None if precompute else False, token_stats=token_stats)
        stats["token_stats"] = token_stats_
        loss = factor * ce

        def grad(upstream, _lse_upstream):
            if precompute:
                # The same for every token; the first one's (0 for no tokens, when the gradients are 0 too).
                scale = tf.reduce_sum(upstream[:1])
                d_hidden, d_kernel, d_bias = (None if g is None else g * tf.cast(scale, g.dtype) for g in grads)
            else:
                _, _, (d_hidden, d_kernel, d_bias), *_ = loop.run(  # type: ignore[misc]
                    *args, bias_arg, upstream=upstream)
            result = [d_hidden, d_kernel]
            if has_bias:
                result.append(d_bias)
            if has_weights:
                result.append(upstream * ce)
            # Tied to the inputs, so that a tape differentiating these gradients finds the refusal.
            return [_first_order_only(g, hidden, kernel, *bias_and_weights) for g in result]

        return (loss, lse), grad

    inputs = [hidden, kernel] + ([] if bias is None else [bias]) + ([] if weights is None else [weights])
    loss, lse = head(*inputs)
    if not token_stats:
        return loss, tf.stop_gradient(lse)
    predictions, nll = stats["token_stats"][0]
    # NaN at a real token whose id is out of range (as its loss), so no metric can look plausible.
    invalid = tf.logical_not(valid) if weights is None else tf.logical_and(tf.logical_not(valid),
                                                                            tf.not_equal(weights, 0))
    nll = tf.where(invalid, tf.constant(np.nan, dtype), nll)  # a select: XLA may drop a NaN factor
    return loss, tf.stop_gradient(lse), (predictions, tf.stop_gradient(nll))


class _ChunkLoop:
    """The chunked loop over tokens: cross-entropy and log-sum-exp, and optionally the gradients."""

    def __init__(self, order, n, n_active, chunk, labels, factor, smoothing, z, dtype, *, transpose_kernel=False,
                 cap=None):
        self.n, self.n_active, self.chunk = n, n_active, chunk
        self.transpose_kernel = transpose_kernel
        self.cap = cap  # a Python float, made a tensor in the graph `run` builds in
        self.max_chunks = (n + chunk - 1) // chunk
        # Padded to whole chunks with token 0; the rows past `n_active` are masked in every chunk.
        self.order = tf.pad(order, [[0, self.max_chunks * chunk - n]])
        self.labels, self.factor, self.smoothing, self.z, self.dtype = labels, factor, smoothing, z, dtype

    def run(self, hidden, kernel, bias, *, upstream, token_stats=False):
        """Returns `(ce, lse, (d_hidden, d_kernel, d_bias))` for all `n` tokens.

        `token_stats=True` appends `(predictions, nll)`: each token's argmax and plain cross-entropy.

        `upstream=False`: no gradients (they are None). `upstream=None`: the gradients of
        `sum(factor * ce)`. A tensor: those of `sum(upstream * factor * ce)`.
        """
        dtype, chunk = self.dtype, self.chunk
        with_grad = upstream is not False
        xla = _fused.in_xla_compilation()
        # Arrays of a static size are right in every mode (unwritten chunks stack as zeros); growable ones
        # are not under XLA (TensorFlow 2.21 then stacks them as zeros: a loss of 0). So static unless the
        # loop is known to run outside XLA.
        static_arrays = _fused.in_xla_compilation(unknown=True)
        in_place = xla and _dynamic_update_slice is not None  # one kernel-gradient buffer, updated in place
        features = tf.shape(hidden)[1]
        kernel_c = tf.cast(kernel, dtype)
        bias_c = None if bias is None else tf.cast(bias, dtype)
        scale = self.factor if upstream is None or upstream is False else self.factor * tf.cast(upstream, dtype)
        num_chunks = (self.n_active + chunk - 1) // chunk
        columns = tf.range(chunk)
        transposed = self.transpose_kernel
        cap = None if self.cap is None else _checks.cast_number(self.cap, dtype)
        slices = class_slices(kernel.shape[0 if transposed else 1])

        def body(c, ce_ta, lse_ta, d_hidden, d_kernel, d_bias, *stats_ta):
            start = c * chunk
            rows = tf.slice(self.order, [start], [chunk])
            live = start + columns < self.n_active
            h = tf.cast(tf.gather(hidden, rows), dtype)
            # Rows past the real tokens repeat padded tokens, whose hidden states may hold inf or NaN.
            h = tf.where(live[:, None], h, tf.zeros([], dtype))
            labels = tf.gather(self.labels, rows)
            # A `[classes, features]` kernel is read as it is by the matmul: no transposed copy.
            logits = tf.matmul(h, kernel_c, transpose_b=transposed)
            if bias_c is not None:
                logits = tf.nn.bias_add(logits, bias_c)
            if cap is not None:
                tanh = tf.math.tanh(logits / cap)
                logits = cap * tanh
            zero = tf.zeros([], dtype)
            if with_grad:
                coef = tf.where(live, tf.gather(scale, rows), zero)
                ce, lse, g = _softmax_step(logits, labels, coef, self.smoothing, self.z, with_grad=True)
            else:
                ce, lse = _softmax_step(logits, labels, None, self.smoothing, self.z, with_grad=False)
            ce_ta = ce_ta.write(c, tf.where(live, ce, zero))
            lse_ta = lse_ta.write(c, tf.where(live, lse, zero))
            if token_stats:
                stats_ta = _write_token_stats(stats_ta, c, logits, labels, lse, live, xla)
            if not with_grad:
                return (c + 1, ce_ta, lse_ta, d_hidden, d_kernel, d_bias, *stats_ta)
            if cap is not None:
                g *= 1.0 - tf.square(tanh)  # d(cap * tanh(x / cap)) / dx
            # Adds exact zeros at the rows past the real tokens (padded tokens, or token 0 repeated).
            d_rows = tf.matmul(g, kernel_c) if transposed else _times_transposed(g, kernel_c, xla)
            d_hidden = tf.tensor_scatter_nd_add(d_hidden, rows[:, None], tf.cast(d_rows, hidden.dtype))
            d_kernel = _add_kernel_gradient(d_kernel, h, g, slices, in_place, transposed)
            if bias_c is not None:
                d_bias += tf.reduce_sum(g, axis=0)
            return (c + 1, ce_ta, lse_ta, d_hidden, d_kernel, d_bias, *stats_ta)

        # Static arrays: unwritten chunks (all padding) stack as zeros. Growable ones (known to be outside
        # XLA): at least one chunk runs (unless there are no tokens), so that every stacked chunk was written.
        iterations = num_chunks if static_arrays else tf.maximum(num_chunks, tf.minimum(self.max_chunks, 1))

        def array(array_dtype=dtype):
            if static_arrays:
                return tf.TensorArray(array_dtype, size=self.max_chunks, element_shape=[chunk])
            return tf.TensorArray(array_dtype, size=0, dynamic_size=True, element_shape=[chunk])

        if with_grad:
            d_hidden = tf.zeros(tf.shape(hidden), hidden.dtype)
            if slices is None or len(slices) == 1 or in_place:  # one buffer
                d_kernel = tf.zeros(tf.shape(kernel_c), dtype)
            else:  # one accumulator a slice of classes, concatenated after the loop
                d_kernel = tuple(tf.zeros([size, features] if transposed else [features, size], dtype)
                                 for _, size in slices)
            d_bias = tf.zeros(tf.shape(bias_c), dtype) if bias_c is not None else tf.zeros([], dtype)
        else:
            d_hidden = d_kernel = d_bias = tf.zeros([], dtype)
        stats_ta = (array(tf.int32), array()) if token_stats else ()
        state = (tf.constant(0), array(), array(), d_hidden, d_kernel, d_bias, *stats_ta)
        _, ce_ta, lse_ta, d_hidden, d_kernel, d_bias, *stats_ta = tf.while_loop(
            lambda c, *_: c < iterations, body, state, maximum_iterations=self.max_chunks,
            parallel_iterations=1)  # one chunk's buffers alive at a time
        # Every stacked row is scattered to its token; the rows past the real tokens add exact zeros.
        index = self.order[:, None] if static_arrays else self.order[:ce_ta.size() * chunk, None]
        ce = tf.scatter_nd(index, tf.reshape(ce_ta.stack(), [-1]), [self.n])
        lse = tf.scatter_nd(index, tf.reshape(lse_ta.stack(), [-1]), [self.n])
        stats = [tuple(tf.scatter_nd(index, tf.reshape(ta.stack(), [-1]), [self.n]) for ta in stats_ta)] \
            if token_stats else []
        if not with_grad:
            return ce, lse, (None, None, None), *stats
        if isinstance(d_kernel, tuple):
            d_kernel = tf.concat(d_kernel, axis=0 if transposed else 1)
        d_kernel = tf.cast(d_kernel, kernel.dtype)
        d_bias = None if bias is None else tf.cast(d_bias, bias.dtype)
        return ce, lse, (d_hidden, d_kernel, d_bias), *stats


def _write_token_stats(stats_ta, c, logits, labels, lse, live, xla):
    """Writes a chunk's argmax (the lowest id among tied maxima, as NumPy's) and plain cross-entropy.

    A token whose log-sum-exp is NaN (a NaN or +inf among its logits, or every logit -inf) predicts
    `classes`: no class.
    """
    predictions_ta, nll_ta = stats_ta
    classes = tf.shape(logits)[1]
    if xla:
        # XLA's ArgMax is a reduction whose comparator takes the lower id of equal values, the same on
        # every device, and reads the logits in place: the rule below made XLA on CPU write a whole
        # `[tokens, classes]` int32 temporary (25 MiB a chunk at 50257 classes) before reducing it.
        predictions = tf.argmax(logits, axis=1, output_type=tf.int32)
    else:
        # An explicit rule rather than `tf.argmax`, whose choice among ties TensorFlow does not promise.
        at_max = tf.equal(logits, tf.reduce_max(logits, axis=1, keepdims=True))
        predictions = tf.reduce_min(tf.where(at_max, tf.range(classes)[None, :], classes), axis=1)
    predictions = tf.where(tf.math.is_nan(lse), classes, predictions)
    nll = lse - tf.gather(logits, labels[:, None], batch_dims=1)[:, 0]
    return (predictions_ta.write(c, tf.where(live, predictions, 0)),
            nll_ta.write(c, tf.where(live, nll, tf.zeros([], nll.dtype))))


def _softmax_step(logits, labels, coef, smoothing=None, z=None, *, with_grad):
    """Returns `(ce, lse, g)` of a chunk's `[tokens, classes]` logits; `(ce, lse)` without gradient.

    `ce` is each token's loss (cross-entropy, plus TF1 label smoothing and the z-loss when `smoothing`
    and `z` are given), `lse` its log-sum-exp, and `g` the gradient of `sum(coef * ce)` with respect to
    the logits: `coef * ((1 + 2 z lse) softmax - (1 - ls) one_hot - ls / classes)`.
    """
    row_max = tf.reduce_max(logits, axis=1)
    exp = tf.exp(logits - row_max[:, None])
    sum_exp = tf.reduce_sum(exp, axis=1)
    lse = row_max + tf.math.log(sum_exp)
    target = tf.gather(logits, labels[:, None], batch_dims=1)[:, 0]
    ce = lse - target
    if smoothing is not None:
        ce += smoothing * (target - tf.reduce_mean(logits, axis=1))
    if z is not None:
        ce += z * tf.square(lse)
    if not with_grad:
        return ce, lse
    softmax_coef = coef if z is None else coef * (1.0 + 2.0 * z * lse)
    g = exp * (softmax_coef / sum_exp)[:, None]
    at_label = coef
    if smoothing is not None:
        g -= (coef * smoothing / tf.cast(tf.shape(logits)[1], logits.dtype))[:, None]
        at_label = coef * (1.0 - smoothing)
    rows = tf.range(tf.shape(logits)[0])
    g = tf.tensor_scatter_nd_sub(g, tf.stack([rows, tf.cast(labels, tf.int32)], 1), at_label)
    return ce, lse, g


def _times_transposed(g, kernel, xla):
    """Returns `g @ kernel^T`, `[tokens, features]` from `[tokens, classes]` and `[features, classes]`.

    The formulation that is fastest on CPU in each mode (benchmarks/README.md, "The fused head"):
    outside XLA, a batch of one, for which oneDNN takes the transposed kernel at full speed, where
    `MatMul(transpose_b=True)` with its long inner dimension (the classes) runs at about half speed;
    under XLA, `(kernel @ g^T)^T`, faster than the dot with the transposed operand. On GPU all are one
    cuBLAS call.
    """
    if xla:
        return tf.transpose(tf.matmul(kernel, g, transpose_b=True))
    return tf.linalg.matmul(g[None], kernel[None], transpose_b=True)[0]


# The kernel gradient is summed one slice of this many classes at a time (when the classes are known
# when traced): a whole `h^T @ g` would be a `[features, classes]` temporary beside the accumulator.
# Under XLA the accumulator is one buffer updated in place; elsewhere each slice has its own
# accumulator, concatenated once after the loop.
CLASS_SLICE = 1024
MAX_CLASS_SLICES = 32


def class_slices(num_classes):
    """Returns `[(start, size), ...]` covering `num_classes` (a static int), or None when it is unknown."""
    if num_classes is None:
        return None
    size = max(CLASS_SLICE, -(-num_classes // MAX_CLASS_SLICES))
    return [(start, min(size, num_classes - start)) for start in range(0, num_classes, size)]


def _add_kernel_gradient(d_kernel, h, g, slices, in_place, transposed=False):
    """Returns `d_kernel + h^T @ g`, without a kernel-sized temporary when the classes are static.

    `d_kernel` is one `[features, classes]` tensor (`[classes, features]` and `g^T @ h` when
    `transposed`), or (for two or more static slices, unless `in_place`) a tuple of one accumulator for
    each of `slices`. `in_place` (only inside an XLA compilation) updates the one tensor slice after
    slice with XLA's `dynamic_update_slice`.
    """
    def product(g_slice):
        if transposed:
            return tf.matmul(g_slice, h, transpose_a=True)
        return tf.matmul(h, g_slice, transpose_a=True)

    if slices is None or len(slices) == 1:
        return d_kernel + product(g)
    if not in_place:
        return tuple(acc + product(g[:, start:start + size]) for acc, (start, size) in zip(d_kernel, slices))

    features, tokens = tf.shape(d_kernel)[1 if transposed else 0], tf.shape(g)[0]

    def add_slice(d_kernel, start, size):
        update = product(tf.slice(g, [0, start], [tokens, size]))
        if transposed:
            current = tf.slice(d_kernel, [start, 0], [size, features])
            return _dynamic_update_slice(d_kernel, current + update, tf.stack([start, 0]))
        current = tf.slice(d_kernel, [0, start], [features, size])
        return _dynamic_update_slice(d_kernel, current + update, tf.stack([0, start]))

    # A loop over the equal slices, so that XLA runs them one after the other: unrolled, its scheduler
    # runs every slice's matmul first and holds their results (a whole `h^T @ g`) at once.
    size = slices[0][1]
    whole = len(slices) if slices[-1][1] == size else len(slices) - 1
    _, d_kernel = tf.while_loop(lambda k, _: k < whole, lambda k, d: (k + 1, add_slice(d, k * size, size)),
                                (tf.constant(0), d_kernel), parallel_iterations=1)
    if whole < len(slices):
        d_kernel = add_slice(d_kernel, *slices[-1])
    return d_kernel


@tf.custom_gradient
def _first_order_only(x, *inputs):
    """Returns `x`; differentiating it with respect to `x` or any of `inputs` raises."""
    def refuse(*_):
        raise NotImplementedError(
            "`linear_sequence_loss` has first-order gradients only: its gradients are formed inside a "
            "chunked loop and cannot be differentiated again. For second-order gradients (e.g. a Hessian-"
            "vector product or a gradient penalty), use `sequence_loss(hidden @ kernel + bias, ...)`.")
    return tf.identity(x), refuse


@tf.autograph.experimental.do_not_convert
def sampled_sequence_loss(
    hidden: TensorLike,
    kernel: TensorLike,
    targets: TensorLike,
    weights: Optional[TensorLike] = None,
    average_across_timesteps: bool = True,
    average_across_batch: bool = True,
    sum_over_timesteps: bool = False,
    sum_over_batch: bool = False,
    name: Optional[str] = None,
    *,
    num_sampled: int,
    bias: Optional[TensorLike] = None,
    lengths: Optional[TensorLike] = None,
    padding_id: Optional[int] = None,
    epsilon: Optional[float] = None,
    remove_accidental_hits: bool = True,
    sampled_values: Optional[Tuple[TensorLike, TensorLike, TensorLike]] = None,
    seed: Optional[int] = None,
    normalizer: Optional[Union[str, float, TensorLike]] = None,
    label_smoothing: Union[float, TensorLike] = 0.0,
    z_loss: float = 0.0,
    transpose_kernel: bool = False,
    logit_soft_cap: Optional[float] = None,
) -> tf.Tensor:
    """Returns the sampled-softmax sequence loss of `hidden @ kernel + bias`, for training only.

    Each real token's loss is `tf.nn.sampled_softmax_loss` of its hidden state: the softmax over its
    target and `num_sampled` classes drawn for the whole batch (log-uniform by default, which suits
    vocabularies sorted by decreasing frequency), with the logits corrected by the log of the
    sampling probabilities. Weights, padding routes and flags are those of `sequence_loss`: padded
    tokens contribute exactly 0 (their hidden states may hold inf or NaN), and an out-of-range id at a
    token of non-zero weight makes the loss NaN.

    The sampled loss is a biased, cheaper estimate of the full softmax loss for training. Evaluate with
    the full softmax over the same kernel: `linear_sequence_loss(hidden, kernel, targets, bias=bias,
    ...)`, which never builds the logits either.

    Args:
        hidden: `[batch, time, features]` float hidden states.
        kernel: `[features, classes]` output projection (transposed for `tf.nn.sampled_softmax_loss`,
            which takes `[classes, features]`), or `[classes, features]` with `transpose_kernel=True`;
            `classes` must be known when traced.
        targets: `[batch, time]` integer class ids.
        weights: `[batch, time]` float weights, as in `sequence_loss`; `None` means all ones.
        average_across_timesteps: the contrib flag, as in `sequence_loss`.
        average_across_batch: the contrib flag, as in `sequence_loss`.
        sum_over_timesteps: the contrib flag, as in `sequence_loss`.
        sum_over_batch: the contrib flag, as in `sequence_loss`.
        name: name scope of the operations; defaults to `"sampled_sequence_loss"`.
        num_sampled: keyword-only, required. The number of classes sampled per batch.
        bias: keyword-only. Optional `[classes]` bias.
        lengths: keyword-only. `[batch]` sequence lengths, as in `sequence_loss`.
        padding_id: keyword-only. A class id marking padding in `targets`, as in `sequence_loss`.
        epsilon: keyword-only. As in `sequence_loss`.
        remove_accidental_hits: keyword-only. As in `tf.nn.sampled_softmax_loss` (default True).
        sampled_values: keyword-only. A `(sampled, true_expected_count, sampled_expected_count)` tuple
            from a `tf.random.*_candidate_sampler` over the flattened `[batch * time, 1]` targets; `None`
            draws log-uniform candidates, on the host (TensorFlow's candidate samplers have neither a GPU
            nor an XLA kernel). Under `jit_compile=True`, draw them outside the compiled function, pass
            them here and pass `remove_accidental_hits=False` (its op has no XLA kernel either); else a
            `ValueError` says so.
        seed: keyword-only. Seed of the default sampler.
        normalizer: keyword-only. As in `sequence_loss`.
        label_smoothing: keyword-only. Refused unless 0 (`ValueError`): TF1 label smoothing spreads mass
            over every class, while a sampled softmax sees only the target and the sampled classes.
        z_loss: keyword-only. Refused unless 0 (`ValueError`): the z-loss penalises the log-sum-exp over
            every class, which a sampled softmax never computes.
        transpose_kernel: keyword-only. True takes a `[classes, features]` kernel (e.g. a tied token
            embedding), which `tf.nn.sampled_softmax_loss` gathers the sampled rows of as it is: no
            transposed copy of the whole kernel (False transposes it once per call).
        logit_soft_cap: keyword-only. Refused unless None (`ValueError`): `tf.nn.sampled_softmax_loss`
            subtracts the log sampling probabilities inside the op, right after forming the logits, and
            a cap would have to act between the two; train a capped model with `linear_sequence_loss`.

    Returns:
        The reduced loss, shaped as `sequence_loss`'s output for the flags.

    Raises:
        ValueError: as `sequence_loss` for the shared arguments; a `num_sampled` that is not a positive
            int; non-zero `label_smoothing` or `z_loss`; `hidden`, `kernel` or `bias` of the wrong rank or
            disagreeing in sizes; `kernel.shape[1]` unknown while tracing; or, under `jit_compile=True`,
            no `sampled_values` or `remove_accidental_hits=True`.
        TypeError: as `sequence_loss` for the shared arguments; `hidden`, `kernel` and `bias` of
            different or non-float dtypes, or non-integer `targets`.
        tf.errors.InvalidArgumentError: as `sequence_loss`, when the graph runs, for sizes or values
            only known then.

    Example:

    >>> import tensorflow as tf, tf_seqloss
    >>> hidden, kernel = tf.random.normal([2, 3, 4]), tf.random.normal([4, 50])
    >>> targets = tf.constant([[1, 2, 0], [4, 0, 0]])
    >>> loss = tf_seqloss.sampled_sequence_loss(hidden, kernel, targets, lengths=[3, 1], num_sampled=8)
    >>> loss.shape
    TensorShape([])
    """
    options = LossOptions(
        average_across_timesteps, average_across_batch, sum_over_timesteps, sum_over_batch,
        label_smoothing=label_smoothing, z_loss=z_loss, normalizer=normalizer, epsilon=epsilon,
        padding_id=padding_id, logit_soft_cap=logit_soft_cap)
    if options.logit_soft_cap is not None:
        refuse("sampled_sequence_loss", "logit_soft_cap", options.logit_soft_cap, "None",
               "`tf.nn.sampled_softmax_loss` subtracts the log sampling probabilities from the logits inside "
               "the op, and the cap would have to act before that correction; cap with "
               "`linear_sequence_loss(logit_soft_cap=...)` instead")
    if not _checks.is_zero(options.label_smoothing):
        refuse("sampled_sequence_loss", "label_smoothing", options.label_smoothing, "0",
               "TF1 label smoothing spreads probability mass over every class, and a sampled softmax sees "
               "only the target and the sampled classes; smooth with `linear_sequence_loss` instead")
    if options.z_loss:
        refuse("sampled_sequence_loss", "z_loss", options.z_loss, "0",
               "the z-loss penalises the log-sum-exp over every class, which a sampled softmax never "
               "computes; add it with `linear_sequence_loss` instead")
    if isinstance(num_sampled, (bool, np.bool_)) or not isinstance(num_sampled, (int, np.integer)) or num_sampled < 1:
        raise ValueError(_checks.invalid_value("num_sampled", "a positive int", repr(num_sampled)))
    with tf.name_scope(name or "sampled_sequence_loss"):
        hidden, kernel, bias = check_head(hidden, kernel, bias, transpose_kernel)
        classes_axis = 0 if transpose_kernel else 1
        num_classes = kernel.shape[classes_axis]
        if num_classes is None:
            raise ValueError(f"The number of classes (`kernel.shape[{classes_axis}]`) must be known when "
                             f"`sampled_sequence_loss` is traced. Received: kernel.shape={kernel.shape}")
        if _fused.in_xla_compilation() and (sampled_values is None or remove_accidental_hits):
            # TensorFlow's candidate samplers and `ComputeAccidentalHits` have no XLA kernel.
            raise ValueError(
                "Under `jit_compile=True`, `sampled_sequence_loss` needs `sampled_values` drawn outside the "
                "compiled function (e.g. `tf.random.log_uniform_candidate_sampler` on the `[batch * time, 1]` "
                "targets) and `remove_accidental_hits=False`: TensorFlow's candidate samplers and its removal "
                "of accidental hits have no XLA kernel. Received: sampled_values="
                f"{'None' if sampled_values is None else 'a tuple'}, "
                f"remove_accidental_hits={remove_accidental_hits!r}")
        targets = check_head_targets(hidden, targets, options.padding_id)
        dtype = _checks.compute_dtype(hidden.dtype)
        token_weights = _padding.token_weights(hidden, targets, dtype=dtype, weights=weights, lengths=lengths,
                                               padding_id=options.padding_id, reference_arg="hidden")
        valid, safe_targets = _cross_entropy.checked_ids(targets, num_classes)
        safe_targets = tf.cast(safe_targets, tf.int64)
        class_weights = kernel if transpose_kernel else tf.transpose(kernel)
        class_bias = tf.zeros([num_classes], kernel.dtype) if bias is None else bias

        def sampled_loss(labels, logits):  # `logits` are the flat hidden states here
            return tf.nn.sampled_softmax_loss(
                class_weights, class_bias, labels[:, None], logits, num_sampled, num_classes,
                sampled_values=sampled_values, remove_accidental_hits=remove_accidental_hits, seed=seed)

        # The same path as `sequence_loss(softmax_loss_function=...)`: padded inputs zeroed, weighted.
        weighted = _cross_entropy.custom_cross_entropy(sampled_loss, hidden, safe_targets, token_weights, dtype)
        active = None if token_weights is None else tf.not_equal(token_weights, 0)
        weighted *= _cross_entropy.nan_where_invalid(tf.ones([], dtype), valid, active)
        return reduce_tokens(weighted, token_weights, options)
