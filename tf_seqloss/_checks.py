"""Input checks shared by the public losses.

Every check is static when the shapes it needs are known while tracing, so bad input fails before any
computation. Where a dimension is only known at run time (a `tf.function` traced with `None` sizes), the
check becomes a `tf.debugging` assert that fails when the graph runs. XLA compiles asserts away; there a
mismatch surfaces as XLA's own shape error instead.
"""

from __future__ import annotations

import importlib
import numbers
from typing import Any, Optional, Union

import numpy as np
import tensorflow as tf

from tf_seqloss import _keras

_HALF_DTYPES = (tf.float16, tf.bfloat16)
# `epsilon` is added to a normaliser computed in float32 (or float64): beyond float32's range it is infinite there.
_FLOAT32_MAX = float(np.finfo(np.float32).max)


def compute_dtype(dtype: tf.DType) -> tf.DType:
    """Returns the dtype a loss over `dtype` logits is computed in: float32 for half types."""
    return tf.float32 if dtype in _HALF_DTYPES else dtype


def check_floating(x: tf.Tensor, arg: str) -> None:
    if not x.dtype.is_floating:
        raise TypeError(
            f"`{arg}` must be a floating-point tensor (float16, bfloat16, float32 or float64). "
            f"Received: {arg}.dtype={x.dtype.name}"
        )


def check_class_ids(x: tf.Tensor, arg: str, padding_id: Optional[int] = None) -> tf.Tensor:
    """Returns integer class ids as int32 or int64, or raises a TypeError naming the argument.

    A `padding_id` is checked against the ids' own dtype, before any cast could make it wrap.
    """
    if padding_id is not None and x.dtype.is_integer:
        check_padding_id_fits(padding_id, x.dtype)
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


def dim(x: tf.Tensor, axis: int) -> Union[int, tf.Tensor]:
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


def ordinal(n: int) -> str:
    """Returns `1st`, `2nd`, `3rd`, `4th`, ... for error texts."""
    if n % 100 in (11, 12, 13):
        return f"{n}th"
    return f"{n}{ {1: 'st', 2: 'nd', 3: 'rd'}.get(n % 10, 'th')}"


def is_real_number(value: Any) -> bool:
    """True for a Python or NumPy int or float (not a bool, a string or a tensor)."""
    # Both are scalars: a NumPy array is neither, so no check of the rank is needed.
    return isinstance(value, (numbers.Real, np.number)) and not isinstance(value, (bool, np.bool_))


def invalid_value(arg: str, expected: str, received: str, *, owner: Optional[str] = None) -> str:
    """Returns the package's one message for a bad argument value, in Keras' words.

    `Invalid value for argument `arg` [of `owner`]. Expected <expected>. Received: arg=<received>`: every
    option check says what was expected and what was received the same way.

    Args:
        arg: the argument's name.
        expected: what it must be, a phrase (e.g. "a number in [0, 1]").
        received: the value received, as it should be shown (usually its `repr`).
        owner: the class or function the argument belongs to, when the message needs it.

    Returns:
        The message, one line.
    """
    where = f" of `{owner}`" if owner else ""
    return f"Invalid value for argument `{arg}`{where}. Expected {expected}. Received: {arg}={received}"


def check_label_smoothing(label_smoothing: Any, *, allow_tensor: bool = True) -> Union[float, tf.Tensor]:
    """Returns `label_smoothing` checked to lie in `[0, 1]`: a float, or a scalar float tensor.

    A number (Python or NumPy) or a tensor with a value known while tracing is checked at once. A tensor
    known only when the graph runs gets an assert, and, since XLA compiles asserts away, is replaced by
    NaN where it is out of range, so the loss is NaN rather than silently wrong.
    """
    def out_of_range(value: Any) -> ValueError:
        return ValueError(invalid_value(
            "label_smoothing", "a number in [0, 1] (the probability mass spread over all classes)", repr(value)))

    if is_real_number(label_smoothing):
        value = float(label_smoothing)
        if not 0.0 <= value <= 1.0:  # NaN fails too
            raise out_of_range(label_smoothing)
        return value
    if not allow_tensor or not tf.is_tensor(label_smoothing):
        kinds = "a Python or NumPy number" + (" or a scalar float tensor" if allow_tensor else "")
        raise TypeError(invalid_value(
            "label_smoothing", f"{kinds} in [0, 1]",
            f"{label_smoothing!r} of type {type(label_smoothing).__name__}"))
    if not label_smoothing.dtype.is_floating or label_smoothing.shape.rank != 0:
        raise TypeError(invalid_value(
            "label_smoothing", "a scalar float tensor when given as a tensor",
            f"a tensor of dtype {label_smoothing.dtype.name} and shape {label_smoothing.shape}"))
    static = tf.get_static_value(label_smoothing)
    if static is not None:
        if not 0.0 <= float(static) <= 1.0:
            raise out_of_range(float(static))
        return label_smoothing
    in_range = tf.logical_and(label_smoothing >= 0, label_smoothing <= 1)
    tf.debugging.Assert(in_range, ["`label_smoothing` must be in [0, 1]. Received:", label_smoothing])
    return tf.where(in_range, label_smoothing, tf.constant(np.nan, label_smoothing.dtype))


def check_padding_id(padding_id: Any) -> Optional[int]:
    """Returns `padding_id` as a Python int (or None), raising for anything that is not an integer."""
    if padding_id is None:
        return None
    if isinstance(padding_id, (bool, np.bool_)) or not isinstance(padding_id, (numbers.Integral, np.integer)):
        raise TypeError(invalid_value(
            "padding_id", "None or an integer class id (Python or NumPy int)",
            f"{padding_id!r} of type {type(padding_id).__name__}"))
    padding_id = int(padding_id)
    if not np.iinfo(np.int64).min <= padding_id <= np.iinfo(np.int64).max:
        raise ValueError(invalid_value("padding_id", "a class id that fits in int64", str(padding_id)))
    return padding_id


def check_padding_id_fits(padding_id: int, targets_dtype: tf.DType) -> None:
    """Raises if `padding_id` cannot occur in targets of `targets_dtype` (it would otherwise wrap on a cast)."""
    if not targets_dtype.min <= padding_id <= targets_dtype.max:
        raise ValueError(invalid_value(
            "padding_id", f"a value {targets_dtype.name} `targets` can hold, in [{targets_dtype.min}, "
            f"{targets_dtype.max}] (no target could equal it, so it would mask nothing)",
            f"{padding_id} with targets.dtype={targets_dtype.name}"))


def is_zero(value: Any) -> bool:
    """True for a Python or NumPy number equal to 0 (a tensor is never treated as a static zero)."""
    return is_real_number(value) and value == 0


def cast_number(value: Any, dtype: tf.DType) -> tf.Tensor:
    """Returns `value` as a `dtype` tensor; a Python float is converted directly, not through float32."""
    if is_real_number(value):
        return tf.constant(float(value), dtype)
    return tf.cast(value, dtype)


def check_z_loss(z_loss: Any) -> float:
    """Returns `z_loss` as a float after checking it is a Python or NumPy number in `[0, inf)`."""
    if not is_real_number(z_loss):
        raise TypeError(invalid_value(
            "z_loss", "a Python or NumPy number in [0, inf) (the weight of `logsumexp(logits)**2`)",
            f"{z_loss!r} of type {type(z_loss).__name__}"))
    value = float(z_loss)
    if not 0.0 <= value < np.inf:  # NaN fails too
        raise ValueError(invalid_value("z_loss", "a number in [0, inf)", repr(z_loss)))
    return value


def check_epsilon(epsilon: Any) -> None:
    """Raises unless `epsilon` is None or a number in `[0, float32 max]` (the loss divides by `normaliser + epsilon`).

    An infinite `epsilon` (or one that is infinite in float32, the compute dtype of most losses) would make
    every loss 0, and a NaN one every loss NaN, so both are refused with the negative ones.
    """
    if epsilon is None:
        return
    if not (is_real_number(epsilon) and 0.0 <= float(epsilon) <= _FLOAT32_MAX):  # NaN fails too
        raise ValueError(invalid_value(
            "epsilon", f"None or a non-negative number, finite in float32 (at most {_FLOAT32_MAX:.4g}; the "
            "loss divides by `normaliser + epsilon`, so an infinite one makes every loss 0)", repr(epsilon)))


def dtype_policy(dtype: Any, owner: str, *, floating: bool = False) -> Any:
    """Returns the Keras dtype policy `dtype` names, resolved as the running Keras resolves a layer's `dtype`.

    Keras 3 and tf_keras refuse a bad name at different times (tf_keras' `Loss` takes no `dtype` at all,
    and `"mixed_<anything>"` used to pass until the first call), and neither message names the argument;
    this refuses it at construction in both, naming `owner`'s `dtype`. With `floating=True` the policy's
    compute and variable dtypes must be floating (a loss or a layer with float weights).
    """
    expected = ("None, a floating dtype name (e.g. 'float32') or a Keras dtype policy (e.g. 'mixed_float16')"
                if floating else "None, a dtype name (e.g. 'float32') or a Keras dtype policy (e.g. 'mixed_float16')")
    try:
        if _keras.IS_KERAS_3:
            policy = _keras.keras.dtype_policies.get(dtype)
        else:  # tf_keras' `Layer` resolves `dtype` with this function (not exported).
            policies = importlib.import_module(_keras.keras.__name__ + ".src.mixed_precision.policy")
            policy = policies.get_policy(dtype)
    except (TypeError, ValueError) as err:
        raise ValueError(invalid_value("dtype", expected, f"{dtype!r} ({err})", owner=owner)) from None
    if floating and not all(tf.as_dtype(d).is_floating for d in (policy.compute_dtype, policy.variable_dtype)):
        raise ValueError(invalid_value(
            "dtype", expected,
            f"{dtype!r} (compute dtype {policy.compute_dtype}, variable dtype {policy.variable_dtype})", owner=owner))
    return policy


def accumulator_dtype(dtype: Any, owner: str) -> str:
    """Returns the dtype of a metric's running sums: float32 or float64, the variable dtype of `dtype`.

    An integer sum truncates fractional weights and cross-entropies (a perplexity of 5 read 3.79), and a
    half-precision one cannot count past 2048 tokens one by one (2048 + 1 == 2048 in float16) and rounds
    every larger sum, so both are refused.
    A mixed policy sums in its variable dtype, float32, under both Kerases; `None` takes
    `keras.backend.floatx()`, or float32 if that is a half-precision type.
    """
    if dtype is None:
        floatx = _keras.keras.backend.floatx()
        return floatx if floatx in ("float32", "float64") else "float32"
    variable = tf.as_dtype(dtype_policy(dtype, owner).variable_dtype)
    if variable not in (tf.float32, tf.float64):
        raise ValueError(invalid_value(
            "dtype", "None, 'float32', 'float64' or a mixed policy ('mixed_float16', 'mixed_bfloat16', which sum in "
            "float32): the dtype of the running sums, where an integer type truncates fractional values and a "
            "half-precision one cannot count past 2048 tokens one by one", repr(dtype), owner=owner))
    return variable.name


def check_name(name: Any, owner: str) -> None:
    """Raises unless `name` is None or a string (Keras 3 accepted any object until the first call)."""
    if name is not None and not isinstance(name, str):
        raise TypeError(invalid_value("name", "a string or None", f"{name!r} of type {type(name).__name__}",
                                      owner=owner))
