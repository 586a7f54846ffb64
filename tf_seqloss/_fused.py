"""The fused sparse softmax cross-entropy: `logsumexp(logits) - logits[label]` with a hand-written gradient.

`tf.nn.sparse_softmax_cross_entropy_with_logits` computes the whole gradient `softmax - one_hot` in its
forward pass and multiplies it by the incoming gradient in its backward pass: on CPU one slow kernel plus
a second full pass, and under XLA two logits-sized buffers alive at once. Here the forward pass keeps only
what the backward pass needs, and the backward pass writes the gradient once, `softmax * g - one_hot * g`,
without building a one-hot matrix (see `_gradient`). The softmax is shifted by the target logit rather
than the row maximum whenever that cannot overflow, which saves the pass that finds the maximum (see
`_forward`).

The first-order backward pass reads what the forward pass kept as constants, so its own ops cannot be
differentiated. It is itself a `tf.custom_gradient` function whose gradient is the closed-form second
derivative (Hessian-vector product and the term in the upstream gradient), written in plain
differentiable ops (see `_second_order`): gradients of every order equal the reference's.

Padding: a row whose upstream gradient is exactly 0 gets an exactly-0 gradient, first and second order,
even if its logits hold `inf` or `NaN` (a caller that selects padded rows away with `tf.where` gives
them a zero upstream gradient); `active` keeps such rows out of the forward pass's overflow check.

Two ways to run the same formulation:

- `compiled=False`: plain TensorFlow ops. Under `jit_compile=True` XLA fuses them: the forward pass keeps
  `exp(logits - shift)` and the backward pass rescales it in place, so the whole step holds one
  logits-sized buffer (float32 and float64 logits) and computes one `exp` per logit. Outside XLA every
  op is its own kernel, and the gradient is copied once more to subtract the one-hot part.
- `compiled=True`: outside an XLA compilation, the forward and the backward pass are each compiled by
  XLA into one kernel (`tf.function(jit_compile=True)`), so eager code and plain `tf.function`s get fused
  kernels too. The forward pass keeps nothing logits-sized and the backward pass recomputes the softmax.
  XLA compiles each kernel once per input shape. Inside an XLA compilation it is `compiled=False`.

Memory: XLA's CPU backend (TensorFlow 2.21) writes out the whole input of a row reduction, so that
`sum(exp(logits - shift))` would materialise `[n, classes]` in float32: twice the size of half-precision
logits. The forward pass that keeps nothing logits-sized (the kernels, and half-precision logits under
XLA) therefore reduces blocks of rows in a loop (`_row_block_reduction`); the step then peaks at the
gradient's own size (bfloat16 under XLA: plus one block, see `_kernel_input`).
"""

from __future__ import annotations

import functools

import numpy as np
import tensorflow as tf

from tf_seqloss import _checks


def find_xla_detector():
    """Returns a function telling whether the ops being built now will be compiled by XLA, or None.

    TensorFlow has no public API for this. Two routes, tried in turn: `tf.__internal__.
    get_enclosing_xla_context`, exported for Keras (tf_keras' batch normalisation asks it), and the private
    `control_flow_util.GraphOrParentsInXlaContext` that `tf.TensorArray` and `tf.while_loop` ask. Both
    walk the graph's control-flow contexts, and the graphs it is nested in, for the context that
    `tf.function(jit_compile=True)` enters while tracing. None when this TensorFlow has neither: see
    `in_xla_compilation`.
    """
    exported = getattr(getattr(tf, "__internal__", None), "get_enclosing_xla_context", None)
    if exported is not None:
        return lambda: exported() is not None
    try:
        from tensorflow.python.ops.control_flow_util import GraphOrParentsInXlaContext
    except ImportError:
        return None
    return lambda: bool(GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph()))


_xla_detector = find_xla_detector()

try:  # Whether a gradient tape could record the ops being built now (private API, as in `_linear_head`).
    # Without it every backward pass is built differentiable, reading the logits: exact, with the logits
    # kept alive until the backward pass (see `_traced_xent`).
    from tensorflow.python.eager.record import could_possibly_record as _could_record
except ImportError:
    _could_record = None


def in_xla_compilation(unknown: bool = False) -> bool:
    """True while tracing a function that XLA compiles (`jit_compile=True`, or a Keras model compiled so).

    Returns `unknown` when this TensorFlow offers no way to tell (`find_xla_detector`) while a graph is
    being built. Callers that only choose the faster of two correct formulations keep the default,
    False; a caller whose formulation would be wrong under XLA passes `unknown=True` and builds the one
    that is right in both.
    """
    if tf.executing_eagerly():
        return False
    if _xla_detector is None:
        return unknown
    return _xla_detector()


def accelerator_visible() -> bool:
    """True when the machine has a device other than CPUs (GPU, TPU), whatever ops are placed on."""
    return any(device.device_type != "CPU" for device in tf.config.list_physical_devices())


@tf.autograph.experimental.do_not_convert
def fused_cross_entropy(logits: tf.Tensor, labels: tf.Tensor, label_smoothing=0.0, *,
                        compiled: bool = True, active: tf.Tensor | None = None) -> tf.Tensor:
    """Returns the `[...]` cross-entropy of `[..., classes]` logits against in-range `[...]` ids.

    Equals `tf.nn.sparse_softmax_cross_entropy_with_logits` on the logits cast to the compute dtype, plus
    `label_smoothing * (logits[label] - mean(logits))` (TF1 label smoothing, see `cross_entropy`), in value and
    in gradients of every order. The loss is in the compute dtype (float32 for float16 and bfloat16
    logits); the gradient has the logits' dtype. `labels` must lie in `[0, classes)`: the caller replaces
    invalid ids.

    A row whose upstream gradient is exactly 0 gets an exactly-0 gradient (first and second order),
    whatever its logits hold, so padded rows may be selected out of the loss with `tf.where` even when
    they hold `inf` or `NaN`. `active`, a boolean tensor shaped like `labels`, says which rows' losses
    will be used: the others may then be non-finite without sending every row down the slower path of
    the forward pass (see `_forward`). Their losses are then unspecified.
    """
    dtype = _checks.compute_dtype(logits.dtype)
    num_classes = _checks.dim(logits, -1)
    flat_logits = tf.reshape(logits, [-1, num_classes])
    flat_labels = tf.reshape(labels, [-1])
    flat_active = None if active is None else tf.reshape(tf.cast(active, tf.bool), [-1])
    smoothing = None if _checks.is_zero(label_smoothing) else _checks.cast_number(label_smoothing, dtype)
    if compiled and not in_xla_compilation():
        loss = _compiled_xent(flat_logits, flat_labels, smoothing, flat_active)
    else:
        loss = _traced_xent(flat_logits, flat_labels, smoothing, flat_active)
    return tf.reshape(loss, tf.shape(labels))


def _forward(logits, labels, smoothing, active=None, keep_unnormalised=True, row_blocks=False,
             bfloat16_bits=False, max_shift=False):
    """Returns `(loss, unnormalised_softmax, sum_exp, shift)` of flat `[n, classes]` logits, in float32+.

    `unnormalised_softmax` is `exp(logits - shift)` with one `shift` per row, chosen so that `exp` cannot
    overflow. The row maximum always works but costs a pass over the logits. The target logit, gathered
    anyway, works as well unless some logit of its row exceeds it by more than about 80 (float32) or
    700 (float64): then the sum overflows, which is checked, and the rows are redone with the maximum.
    (Except under XLA with sizes unknown while tracing, where the maximum is taken at once, see below.)
    Either way the result is exact to float rounding, and every logit enters as its distance to the
    shift, so large logits (float16 reaches 65504) lose no precision. Rows where `active` is False are
    left out of the check: padding may hold `inf` or `NaN`, which no shift repairs.

    With `keep_unnormalised=False` it returns None for `unnormalised_softmax` and keeps nothing
    logits-sized. With `row_blocks` as well, every row reduction runs over blocks of rows, so that XLA
    materialises nothing logits-sized either (`_row_block_reduction`); with `bfloat16_bits`, the float16
    `logits` then hold the bit patterns of bfloat16 logits (`_kernel_input`).
    """
    # Half-precision logits are cast where they are used, never as a whole: a float32 copy would be
    # materialised for the reductions. Gathering and taking the maximum commute with the exact cast.
    if bfloat16_bits and not (row_blocks and not keep_unnormalised):
        raise ValueError("bfloat16 bit patterns are only read block by block (`row_blocks=True`).")
    dtype = tf.float32 if bfloat16_bits else _checks.compute_dtype(logits.dtype)
    target_logit = tf.gather(logits, labels[:, None], batch_dims=1)[:, 0]
    target_logit = _widen(target_logit, dtype, bfloat16_bits)

    def reduce_rows(reduce, *row_vectors):
        # `reduce` of the logits in `dtype` and of `[n]` vectors; with `row_blocks`, block by block.
        if row_blocks:
            return _row_block_reduction(reduce, logits, dtype, bfloat16_bits, *row_vectors)
        return reduce(tf.cast(logits, dtype), *row_vectors)

    def row_max():
        if row_blocks:
            return reduce_rows(lambda x: tf.reduce_max(x, axis=-1))
        return tf.cast(tf.reduce_max(logits, axis=-1), dtype)

    def row_mean():
        return reduce_rows(lambda x: tf.reduce_mean(x, axis=-1))

    if keep_unnormalised:
        def shifted_by(shift):
            unnormalised = tf.exp(tf.cast(logits, dtype) - shift[:, None])
            return unnormalised, tf.reduce_sum(unnormalised, axis=-1), shift
    else:
        def shifted_by(shift):
            sum_exp = reduce_rows(lambda x, shift: tf.reduce_sum(tf.exp(x - shift[:, None]), axis=-1), shift)
            return None, sum_exp, shift

    if max_shift:
        with tf.control_dependencies([target_logit]):
            unnormalised, sum_exp, shift = shifted_by(row_max())
    elif in_xla_compilation() and not logits.shape.is_fully_defined():
        # Sizes unknown while tracing under XLA: the function is compiled anew for every shape it meets,
        # and the fallback's branch costs more compilation time than the pass for the maximum costs running
        # (benchmarks/README.md, "Three processes an entry, and the loss's compilation under XLA").
        unnormalised, sum_exp, shift = shifted_by(row_max())
    else:
        unnormalised, sum_exp, shift = shifted_by(target_logit)
        fits = tf.math.is_finite(sum_exp)
        if active is not None:
            fits = tf.logical_or(fits, tf.logical_not(active))
        # Without `unnormalised`, nothing logits-sized passes through the fallback's `tf.cond`.
        kept = (sum_exp, shift) if unnormalised is None else (unnormalised, sum_exp, shift)
        kept = tf.cond(tf.reduce_all(fits), lambda: kept, lambda: shifted_by(row_max())[3 - len(kept):])
        unnormalised, sum_exp, shift = (None, *kept) if unnormalised is None else kept
    loss = tf.math.log(sum_exp) - (target_logit - shift)
    if smoothing is not None:
        loss += smoothing * (target_logit - row_mean())
    return loss, unnormalised, sum_exp, shift


# The forward pass that keeps nothing logits-sized reduces about an eighth of the logits at once, within
# these bounds (`_row_block_reduction`). Fewer, larger blocks were measured steadier: with many small ones,
# steps run after other TensorFlow ops were slower in some processes (benchmarks/README.md, "The fixed shape
# and half precision, rerun after the row blocks", Block size).
ROW_BLOCK_ELEMENTS = (2**21, 2**23)


def _row_block_reduction(reduce_block, logits, dtype, bfloat16_bits, *row_vectors):
    """Returns the `[n]` row reductions `reduce_block(block, *vector_blocks)` of all rows of `logits`.

    `block` is a block of rows of the logits in `dtype` (see `ROW_BLOCK_ELEMENTS`; and `_widen`
    for `bfloat16_bits`), and each vector block the same rows of a `[n]` vector of `row_vectors`.
    XLA's CPU backend writes out the input of a row reduction (see the module's docstring); block by
    block, in a `tf.while_loop`, that input is one block, which stays in cache: the pass is also faster
    (benchmarks/README.md, "The fixed shape and half precision, rerun after the row blocks"). The last
    block is shifted back to end at the last row, so every block has the same static size under XLA; the
    rows it repeats are written twice, equal.
    """
    n, classes = _checks.dim(logits, 0), _checks.dim(logits, 1)
    fewest, most = ROW_BLOCK_ELEMENTS
    if isinstance(n, int) and isinstance(classes, int):  # static sizes, as XLA needs them
        elements = min(max(n * classes // 8, fewest), most)
        rows = min(max(elements // max(classes, 1), 1), n)
    else:
        elements = tf.minimum(tf.maximum(n * classes // 8, fewest), most)
        rows = tf.minimum(tf.maximum(elements // tf.maximum(classes, 1), 1), n)
    num_blocks = (n + rows - 1) // tf.maximum(rows, 1)

    def body(i, output):
        start = tf.minimum(i * rows, n - rows)
        block = _widen(tf.slice(logits, tf.stack([start, 0]), tf.stack([rows, classes])), dtype, bfloat16_bits)
        part = reduce_block(block, *(tf.slice(v, [start], [rows]) for v in row_vectors))
        return i + 1, tf.tensor_scatter_nd_update(output, (start + tf.range(rows))[:, None], part)

    _, output = tf.while_loop(lambda i, _: i < num_blocks, body, (tf.constant(0), tf.zeros([n], dtype)),
                              parallel_iterations=1)
    return output


def _widen(x, dtype, bfloat16_bits=False):
    """Returns `x` cast to `dtype`, or with `bfloat16_bits` the bfloat16 values whose bit patterns the
    float16 `x` holds, as float32: a bfloat16 is the upper half of the float32 of the same value."""
    if bfloat16_bits:
        bits = tf.cast(tf.bitcast(x, tf.uint16), tf.uint32)
        return tf.bitcast(tf.bitwise.left_shift(bits, 16), tf.float32)
    return tf.cast(x, dtype)


def _kernel_input(logits):
    """Returns `(logits, bfloat16_bits)` as the forward kernel takes them.

    Inside the loop over row blocks, XLA's CPU backend converts bfloat16 to float32 before slicing,
    and then hoists the conversion of the whole tensor out of the loop: the float32 copy the blocks
    avoid. It keeps float16 slices, and bit operations, in the loop. So bfloat16 logits enter the
    kernel as float16 holding their bit patterns (which have a GPU kernel for every op, unlike
    `uint16`), and are widened with bit operations. `tf.bitcast` outside the kernel shares the buffer;
    inside an XLA compilation it is a copy, which the backward pass then reads too (`_recomputing_xent`),
    so that XLA writes the gradient into that copy's buffer.
    """
    if logits.dtype == tf.bfloat16:
        return tf.bitcast(logits, tf.float16), True
    return logits, False


def _times_upstream(softmax, upstream):
    """Returns `g * softmax`, exactly 0 in the rows where `g == 0`."""
    # Such a row is padding that the caller selected away; its softmax may be NaN (logits of `inf` or
    # `NaN`), and `NaN * 0` would poison the whole gradient. `MulNoNan` has no bfloat16 GPU kernel, but
    # `softmax` is in the compute dtype, float32 or float64.
    return tf.math.multiply_no_nan(softmax, upstream[:, None])


def _gradient(softmax_times_g, labels, upstream, smoothing, dtype, scatter):
    """Returns `g * (softmax - (1 - ls) * one_hot - ls / classes)` from `g * softmax`, in `dtype`.

    The derivative of `ce + ls * (logits[label] - mean(logits))`, without a one-hot matrix: the one-hot
    part is either a scatter of one value per row, or, in a kernel XLA compiles, a comparison with the
    column index that XLA fuses into the loop writing the gradient, which then writes it once, directly
    in `dtype`. (Op by op, that comparison would build `[n, classes]` temporaries.)
    """
    at_label = upstream
    if smoothing is not None:
        num_classes = tf.cast(tf.shape(softmax_times_g)[-1], upstream.dtype)
        softmax_times_g -= (upstream * smoothing / num_classes)[:, None]
        at_label = upstream * (1.0 - smoothing)
    if scatter:
        rows = tf.range(tf.shape(labels, out_type=labels.dtype)[0], dtype=labels.dtype)
        at = tf.stack([rows, labels], axis=1)
        if softmax_times_g.dtype != dtype and not accelerator_visible():
            # Half-precision logits, op by op on a CPU-only machine: TensorFlow's scatter copies its input,
            # so it gets the narrow gradient, whose label entries are set, rounded once from float32 as the
            # float32 scatter's would be: less memory and no more time (benchmarks/README.md, "Costs and
            # limits"). GPUs have no half-precision scatter kernel: there the float32 one stays.
            at_label = tf.gather(softmax_times_g, labels[:, None], batch_dims=1)[:, 0] - at_label
            return tf.tensor_scatter_nd_update(tf.cast(softmax_times_g, dtype), at, tf.cast(at_label, dtype))
        if scatter == "in_place":
            # Half-precision logits too: subtracted in the float32 buffer, then rounded once in the cast.
            return tf.cast(_subtract_at_labels(softmax_times_g, labels, at_label), dtype)
        grad = tf.tensor_scatter_nd_sub(softmax_times_g, at, at_label)
    else:
        columns = tf.range(tf.shape(softmax_times_g, out_type=labels.dtype)[-1], dtype=labels.dtype)
        grad = tf.where(columns[None, :] == labels[:, None], softmax_times_g - at_label[:, None],
                        softmax_times_g)
    return tf.cast(grad, dtype)


# `InplaceSub` indexes the flattened gradient with int32: larger gradients take the scatter.
IN_PLACE_LIMIT = 2**31


def _subtract_at_labels(x, labels, values):
    """Returns `x` with `values[i]` subtracted from `x[i, labels[i]]`, written into `x`'s own buffer.

    `x` must be a tensor no one else holds (a fresh gradient): `InplaceSub` writes into its input. Op by
    op, `tensor_scatter_nd_sub` copies its input first, a second gradient-sized buffer alive with the
    first (benchmarks/README.md, "Whole training steps"). From `IN_PLACE_LIMIT` elements on, the scatter.
    """
    n, classes = tf.shape(x, out_type=tf.int64)[0], tf.shape(x, out_type=tf.int64)[1]
    rows = tf.range(n, dtype=tf.int64)

    def in_place():
        at = tf.cast(rows * classes + tf.cast(labels, tf.int64), tf.int32)
        return tf.reshape(tf.raw_ops.InplaceSub(x=tf.reshape(x, [-1]), i=at, v=values), tf.shape(x))

    def scatter():
        return tf.tensor_scatter_nd_sub(x, tf.stack([rows, tf.cast(labels, tf.int64)], axis=1), values)

    size = x.shape.num_elements()
    if size is not None:
        return in_place() if size < IN_PLACE_LIMIT else scatter()
    return tf.cond(n * classes < IN_PLACE_LIMIT, in_place, scatter)


def _second_order(logits, labels, upstream, cotangent, smoothing):
    """Returns the gradients of `<cotangent, _gradient(...)>` with respect to the logits and `g`.

    Per row, with `p = softmax(logits)` and `v` the cotangent: `g * (p * v - p * <p, v>)` (the Hessian of
    the loss times `v`; label smoothing adds a term linear in the logits, with no second derivative) and
    `<p, v> - (1 - ls) * v[label] - ls * mean(v)`. Plain differentiable ops, so that a third derivative,
    if taken, is right as well. This path is not tuned for speed: `p` is recomputed by `tf.nn.softmax`.
    """
    dtype = upstream.dtype
    probs = tf.nn.softmax(tf.cast(logits, dtype))
    v = tf.cast(cotangent, dtype)
    probs_dot_v = tf.reduce_sum(probs * v, axis=-1)
    v_at_label = tf.gather(v, labels[:, None], batch_dims=1)[:, 0]
    d_upstream = probs_dot_v - v_at_label
    if smoothing is not None:
        d_upstream += smoothing * (v_at_label - tf.reduce_mean(v, axis=-1))
    d_logits = _times_upstream(probs * (v - probs_dot_v[:, None]), upstream)
    return tf.cast(d_logits, logits.dtype), d_upstream


def _with_second_order(first_order, logits, labels, upstream, smoothing):
    """Returns `first_order(logits, upstream)`, differentiable in both through `_second_order`.

    `first_order` reads what the forward pass kept (a shift, a sum of exponentials) as constants: its
    own ops' gradients would miss how those depend on the logits, so they are never recorded.
    """

    @tf.custom_gradient
    def backward(logits, upstream, *smoothing_arg):
        grad = first_order(tf.stop_gradient(logits), tf.stop_gradient(upstream))

        def second_order(cotangent):
            return (*_second_order(logits, labels, upstream, cotangent, smoothing),
                    *(None for _ in smoothing_arg))

        return grad, second_order

    return backward(logits, upstream, *_as_args(smoothing))


def _as_args(smoothing):
    # `smoothing` is passed as an input so that the tape sees every tensor the function reads.
    return [] if smoothing is None else [smoothing]


def _op_by_op_scatter():
    """The `scatter` of `_gradient` for plain ops: in place on CPU-only machines outside XLA (where XLA
    updates its buffer in place itself); elsewhere the scatter, whose kernels every device has."""
    # `unknown=True`: where this TensorFlow cannot tell whether XLA compiles the graph, the scatter, since
    # `InplaceSub` has no XLA kernel (a graph that held it would not compile).
    if in_xla_compilation(unknown=True):
        return True
    return True if accelerator_visible() else "in_place"


def _traced_xent(logits, labels, smoothing, active):
    """The formulation as plain ops: the forward pass keeps `exp(logits - shift)` for the backward pass.

    Except for half-precision logits: kept in the compute dtype, that buffer would be twice their size,
    so the forward pass keeps two `[n]` vectors and the backward pass recomputes the softmax from the
    logits, as the compiled kernels do: the forward pass a loop over blocks of rows, the backward pass one
    fused loop under XLA.
    """
    if _checks.compute_dtype(logits.dtype) != logits.dtype:
        return _recomputing_xent(logits, labels, smoothing, active, scatter=_op_by_op_scatter())

    max_shift = not in_xla_compilation()

    @tf.custom_gradient
    def xent(logits, *smoothing_arg):
        # The tape must not record the forward ops: their registered gradients are never used, and in
        # eager mode recording them would keep every logits-sized intermediate alive.
        loss, unnormalised, sum_exp, _ = _forward(tf.stop_gradient(logits), labels, smoothing, active,
                                                  max_shift=max_shift)

        def first_order(logits, upstream):
            # Only the dtype of `logits` is read: the kept `unnormalised` holds the rest.
            # Divide first: with a shift below the maximum, `upstream / sum_exp` could underflow.
            # Rows with `g == 0` are divided by 0 with `DivNoNan`, which zeroes them whatever they hold
            # (see `_times_upstream`): as fast as a division, while `MulNoNan` instead of the
            # multiplication costs more than a `Mul` outside XLA (benchmarks/README.md, "Measurements
            # behind choices in the code").
            def divide_then_multiply():
                divisor = tf.where(upstream == 0, tf.zeros_like(sum_exp), sum_exp)
                return tf.math.divide_no_nan(unnormalised, divisor[:, None]) * upstream[:, None]

            if in_xla_compilation():  # XLA fuses the two products into one pass anyway
                softmax_times_g = divide_then_multiply()
            elif max_shift:
                # Shifted by the maximum, `sum_exp` lies in [1, classes], and `g / sum_exp` is below the
                # smallest normal float only where every product is too: one `MulNoNan`, which the
                # executor runs in the kept buffer (no `tf.cond` around it holding that buffer).
                scale = tf.where(upstream == 0, tf.zeros_like(upstream), upstream / sum_exp)
                softmax_times_g = tf.math.multiply_no_nan(unnormalised, scale[:, None])
            else:
                # Op by op, one pass over the logits instead of two (a quarter of the backward pass, see
                # benchmarks/README.md, "Measurements behind choices in the code"): `MulNoNan` by the
                # per-row `g / sum_exp`, which zeroes the padded
                # rows. It is exact while that ratio is a normal float (or 0); when it is not (a
                # shift far below the maximum, a tiny `g`, a NaN), the rows are divided first.
                scale = tf.where(upstream == 0, tf.zeros_like(upstream), upstream / sum_exp)
                tiny = np.finfo(scale.dtype.as_numpy_dtype).tiny  # the smallest normal float
                normal = tf.logical_or(tf.abs(scale) >= tiny, upstream == 0)
                softmax_times_g = tf.cond(
                    tf.reduce_all(normal),
                    lambda: tf.math.multiply_no_nan(unnormalised, scale[:, None]),
                    divide_then_multiply)
            # A scatter, not a comparison: XLA then rescales the kept buffer in place (benchmarks/README.md,
            # "How").
            return _gradient(softmax_times_g, labels, upstream, smoothing, logits.dtype, scatter=_op_by_op_scatter())

        def grad(upstream):
            if _could_record is not None and not _could_record():
                # No tape records this backward pass, so it needs no second derivative, and it reads
                # nothing of the logits but their dtype: they can be freed after the forward pass, whose
                # ops then write `exp(logits - shift)` into their buffer (see `_forward`).
                return (first_order(logits, upstream), *(None for _ in smoothing_arg))
            return (_with_second_order(first_order, logits, labels, upstream, smoothing),
                    *(None for _ in smoothing_arg))

        return loss, grad

    return xent(logits, *_as_args(smoothing))


def _compiled_forward(logits, labels, smoothing, active, row_blocks=True, bfloat16_bits=False):
    loss, _, sum_exp, shift = _forward(logits, labels, smoothing, active, keep_unnormalised=False,
                                       row_blocks=row_blocks, bfloat16_bits=bfloat16_bits)
    return loss, shift, tf.math.log(sum_exp)


def _compiled_backward(logits, labels, shift, log_sum_exp, upstream, smoothing, scatter=False,
                       bfloat16_bits=False):
    # A graph runs every op once its inputs are ready: the logits are, before the forward pass has run, and
    # op by op a cast of half-precision logits would then sit beside the forward pass's own (benchmarks/
    # README.md, "Costs and limits").
    with tf.control_dependencies([upstream]):
        widened = _widen(logits, upstream.dtype, bfloat16_bits)
    softmax = tf.exp(widened - shift[:, None] - log_sum_exp[:, None])
    return _gradient(_times_upstream(softmax, upstream), labels, upstream, smoothing,
                     tf.bfloat16 if bfloat16_bits else logits.dtype, scatter=scatter)


# One XLA kernel each; `reduce_retracing` makes the second input shape trace a shape-generic function,
# which XLA then compiles once per concrete shape.
_forward_kernel = tf.function(_compiled_forward, jit_compile=True, reduce_retracing=True, autograph=False)
_backward_kernel = tf.function(_compiled_backward, jit_compile=True, reduce_retracing=True, autograph=False)


def _compiled_xent(logits, labels, smoothing, active):
    """The formulation as two XLA kernels: the forward pass keeps only two `[n]` vectors."""
    return _recomputing_xent(logits, labels, smoothing, active, kernels=True)


def _recomputing_xent(logits, labels, smoothing, active, kernels=False, scatter=False):
    """The forward pass keeps only two `[n]` vectors and the backward pass recomputes the softmax.

    `kernels=True` runs each pass as an XLA kernel, otherwise as plain ops (`scatter` as in `_gradient`).
    """
    blocks = kernels or in_xla_compilation()  # row blocks: XLA materialises one block at a time

    def forward(logits, *args, bfloat16_bits=False):
        if blocks:
            # mypy cannot tell that `args` stops before the keywords.
            return (_forward_kernel if kernels else _compiled_forward)(  # type: ignore[misc]
                logits, *args, bfloat16_bits=bfloat16_bits)
        # Op by op a loop over row blocks was measured slower and saves nothing: the backward pass's ops
        # materialise float32 tensors of the logits' shape anyway.
        return _compiled_forward(logits, *args, row_blocks=False)  # type: ignore[misc]  # as above

    backward = _backward_kernel if kernels else functools.partial(_compiled_backward, scatter=scatter)

    @tf.custom_gradient
    def xent(logits, *smoothing_arg):
        # `stop_gradient`: in eager mode the tape would otherwise record the kernel call and keep its
        # logits-sized intermediates for a gradient that is never taken.
        carrier, bfloat16_bits = tf.stop_gradient(logits), False
        if blocks:
            carrier, bfloat16_bits = _kernel_input(carrier)
        loss, shift, log_sum_exp = forward(carrier, labels, smoothing, active, bfloat16_bits=bfloat16_bits)

        def first_order(logits, upstream):
            if bfloat16_bits and not kernels:
                # Under an XLA compilation `_kernel_input`'s bitcast is a copy of the logits. Read by the
                # backward pass as well, it ends there, and XLA writes the gradient into its buffer, which
                # saves a logits-sized buffer (benchmarks/README.md, "The fixed shape and half precision,
                # rerun after the row blocks").
                return backward(carrier, labels, shift, log_sum_exp, upstream, smoothing, bfloat16_bits=True)
            return backward(logits, labels, shift, log_sum_exp, upstream, smoothing)

        def grad(upstream):
            return (_with_second_order(first_order, logits, labels, upstream, smoothing),
                    *(None for _ in smoothing_arg))

        return loss, grad

    return xent(logits, *_as_args(smoothing))
