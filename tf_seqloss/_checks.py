"""Input checks shared by the public losses.

Every check is static when the shapes it needs are known while tracing, so bad input fails before any
computation. Where a dimension is only known at run time (a `tf.function` traced with `None` sizes), the
check becomes a `tf.debugging` assert that fails when the graph runs. XLA compiles asserts away; there a
mismatch surfaces as XLA's own shape error instead.
"""

from __future__ import annotations

import tensorflow as tf

_HALF_DTYPES = (tf.float16, tf.bfloat16)


def compute_dtype(dtype: tf.DType) -> tf.DType:
    """Returns the dtype a loss over `dtype` logits is computed in: float32 for half types."""
    return tf.float32 if dtype in _HALF_DTYPES else dtype


def check_floating(x: tf.Tensor, arg: str) -> None:
    if not x.dtype.is_floating:
        raise TypeError(
            f"`{arg}` must be a floating-point tensor (float16, bfloat16, float32 or float64). "
            f"Received: {arg}.dtype={x.dtype.name}"
        )


def check_class_ids(x: tf.Tensor, arg: str) -> tf.Tensor:
    """Returns integer class ids as int32 or int64, or raises a TypeError naming the argument."""
    if x.dtype in (tf.int32, tf.int64):
        return x
    if x.dtype.is_integer:
        return tf.cast(x, tf.int64)
    raise TypeError(
        f"Sparse `{arg}` must hold integer class ids (int32 or int64). Received: {arg}.dtype={x.dtype.name}. "
        f"Cast ids with `tf.cast({arg}, tf.int32)`, or pass `{arg}` as probabilities of shape "
        f"[..., num_classes] with the same rank as `logits`."
    )


def check_rank(x: tf.Tensor, arg: str, ranks: tuple[int, ...], layout: str) -> int:
    """Returns the static rank of `x` after checking it is one of `ranks`."""
    rank = x.shape.rank
    if rank is None:
        raise ValueError(
            f"The rank of `{arg}` must be known when the loss is traced. Expected {layout}. "
            f"Give the tf.function an `input_signature` (e.g. `tf.TensorSpec([None] * {ranks[0]})`) "
            f"or call `tf.ensure_shape` on `{arg}`."
        )
    if rank not in ranks:
        expected = " or ".join(str(r) for r in ranks)
        raise ValueError(
            f"`{arg}` must have rank {expected} ({layout}). "
            f"Received: {arg}.shape={x.shape}"
        )
    return rank


def dim(x: tf.Tensor, axis: int):
    """Returns `x.shape[axis]` when static, else the run-time size as a scalar tensor."""
    static = x.shape[axis]
    return static if static is not None else tf.shape(x)[axis]


def check_same_dim(a: tf.Tensor, a_arg: str, a_axis: int, b: tf.Tensor, b_arg: str, b_axis: int,
                   what: str) -> None:
    """Checks that `a.shape[a_axis] == b.shape[b_axis]`, statically if possible, else when run."""
    da, db = a.shape[a_axis], b.shape[b_axis]
    if da is not None and db is not None:
        if da != db:
            raise ValueError(
                f"`{a_arg}` and `{b_arg}` must agree in the {what} dimension. "
                f"Received: {a_arg}.shape={a.shape} and {b_arg}.shape={b.shape}"
            )
        return
    # Under tf.function the assert runs through automatic control dependencies.
    tf.debugging.assert_equal(
        tf.shape(a)[a_axis], tf.shape(b)[b_axis],
        message=f"`{a_arg}` and `{b_arg}` must agree in the {what} dimension "
                f"({a_arg} axis {a_axis}, {b_arg} axis {b_axis})",
    )


def check_label_smoothing(label_smoothing) -> None:
    if isinstance(label_smoothing, (int, float)) and not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(
            "`label_smoothing` must be in [0, 1]: the probability mass spread over all classes. "
            f"Received: label_smoothing={label_smoothing}"
        )


def is_zero(value) -> bool:
    """True for a Python number equal to 0 (a tensor is never treated as a static zero)."""
    return isinstance(value, (int, float)) and value == 0


def cast_number(value, dtype: tf.DType) -> tf.Tensor:
    """Returns `value` as a `dtype` tensor; a Python float is converted directly, not through float32."""
    if isinstance(value, (int, float)):
        return tf.constant(value, dtype)
    return tf.cast(value, dtype)
