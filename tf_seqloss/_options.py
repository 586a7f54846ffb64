"""The options of a sequence loss: one frozen, validated object that every entry point builds and reads.

`sequence_loss`, `SequenceLoss`, `SequenceLossLayer`, `linear_sequence_loss`, `FusedLinearHead` and
`sampled_sequence_loss` all take their options as keyword arguments (the public signatures), build one
`LossOptions` from them and hand that object down; nothing below an entry point threads an option by hand.
Every check of a single option, and of options that exclude one another, happens once, in
`LossOptions.__post_init__`. A new option is a new field here (with its check), plus the keyword of each
entry point that accepts it and a row in `tests/test_options_matrix.py`.

An entry point that cannot give an option a meaning refuses it with `refuse`, saying why.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Callable, Optional

import numpy as np
import tensorflow as tf

from tf_seqloss import _checks, _cross_entropy, _distribute, _padding

FLAGS = ("average_across_timesteps", "average_across_batch", "sum_over_timesteps", "sum_over_batch")


@dataclasses.dataclass(frozen=True, eq=False)
class LossOptions:
    """What to compute and how to reduce it, checked on construction.

    Attributes:
        average_across_timesteps, average_across_batch: contrib's averaging flags. `None` resolves to True
            unless a `sum_over_*` flag is True (then False), so that setting both `sum_over_*` flags alone
            gives TFA's class default; the functions pass contrib's default True.
        sum_over_timesteps, sum_over_batch: TFA's flags (divide by the count of non-zero weights).
        label_smoothing: TF1 label smoothing in `[0, 1]`; a scalar float tensor where `allow_tensors`.
        z_loss: PaLM's z-loss weight in `[0, inf)`, a Python float once checked.
        logit_soft_cap: None, or a positive finite Python float `cap`: the logits become
            `cap * tanh(logits / cap)` before the softmax (Gemma's soft-capping).
        normalizer: None, `"global"` or a positive token count (a tensor where `allow_tensors`).
        epsilon: None, or a non-negative number added to the normaliser.
        padding_id: None or a Python int marking padding in sparse targets.
        from_logits: False takes the predictions as probabilities (Keras' convention).
        softmax_loss_function: a custom per-token loss `fn(labels=, logits=)`, or None.
        implementation: one of `IMPLEMENTATIONS`.
        allow_tensors: init-only. False for the Keras faces, whose options must be saved in a config.
    """

    average_across_timesteps: Optional[bool] = True
    average_across_batch: Optional[bool] = True
    sum_over_timesteps: bool = False
    sum_over_batch: bool = False
    label_smoothing: Any = 0.0
    z_loss: Any = 0.0
    logit_soft_cap: Optional[float] = None
    normalizer: Any = None
    epsilon: Optional[float] = None
    padding_id: Optional[int] = None
    from_logits: bool = True
    softmax_loss_function: Optional[Callable] = None
    implementation: str = "auto"
    allow_tensors: dataclasses.InitVar[bool] = True

    @tf.autograph.experimental.do_not_convert  # plain Python checks, also when built inside a traced step
    def __post_init__(self, allow_tensors: bool) -> None:
        def store(field: str, value) -> None:
            object.__setattr__(self, field, value)  # frozen: only the checked value is ever stored

        for flag in ("sum_over_timesteps", "sum_over_batch"):
            store(flag, _check_bool(flag, getattr(self, flag)))
        summing = self.sum_over_timesteps or self.sum_over_batch
        for flag in ("average_across_timesteps", "average_across_batch"):
            value = getattr(self, flag)
            store(flag, not summing if value is None else _check_bool(flag, value))
        _check_flag_families(self.flags)

        fn = self.softmax_loss_function
        if fn is not None:
            check_custom_loss(fn)
        store("padding_id", _checks.check_padding_id(self.padding_id))
        store("label_smoothing", _checks.check_label_smoothing(self.label_smoothing, allow_tensor=allow_tensors))
        store("z_loss", _checks.check_z_loss(self.z_loss))
        store("logit_soft_cap", check_logit_soft_cap(self.logit_soft_cap))
        _checks.check_epsilon(self.epsilon)
        _cross_entropy.check_implementation(self.implementation)
        store("from_logits", _check_bool("from_logits", self.from_logits))
        store("normalizer", _distribute.check_normalizer(self.normalizer, allow_tensor=allow_tensors,
                                                         scalar=self.scalar))
        if fn is not None:
            # The custom function receives the logits as they are: it owns the whole per-token loss.
            for field, default, hint in (
                    ("label_smoothing", 0.0, "smooth the labels inside your function instead"),
                    ("z_loss", 0.0, "add it inside your function"),
                    ("logit_soft_cap", None, "cap the logits inside your function"),
                    ("from_logits", True, "the function receives `y_pred` as it is; turn probabilities into "
                                          "what it expects inside it")):
                value = getattr(self, field)
                if not _same(value, default):
                    raise ValueError(
                        f"Invalid combination of arguments: `{field}={value!r}` cannot be combined with "
                        f"`softmax_loss_function`: {hint}. Received: {field}={value!r}, softmax_loss_function={fn!r}")
        if not self.from_logits and not _checks.is_zero(self.z_loss):
            raise ValueError(
                "Invalid combination of arguments: `z_loss` cannot be combined with `from_logits=False`: the z-loss "
                "penalises the log-sum-exp of logits, which probabilities do not determine. "
                f"Received: z_loss={self.z_loss!r}")
        if not self.from_logits and self.logit_soft_cap is not None:
            raise ValueError(
                "Invalid combination of arguments: `logit_soft_cap` cannot be combined with `from_logits=False`: "
                "the cap bends logits (`cap * tanh(logits / cap)`), and probabilities are not logits. "
                f"Received: logit_soft_cap={self.logit_soft_cap!r}, from_logits=False")

    @property
    def flags(self) -> dict:
        """The four contrib flags, by name."""
        return {flag: getattr(self, flag) for flag in FLAGS}

    @property
    def scalar(self) -> bool:
        """Whether the flags reduce both axes (the only modes a normaliser of the whole batch applies to)."""
        return ((self.average_across_timesteps and self.average_across_batch)
                or (self.sum_over_timesteps and self.sum_over_batch))

    @property
    def reduces_both_axes(self) -> bool:
        """Whether every token's weighted loss reaches the result with the same upstream gradient."""
        return ((self.average_across_timesteps or self.sum_over_timesteps)
                and (self.average_across_batch or self.sum_over_batch))

    def config(self, *fields: str) -> dict:
        """Returns the named options (all of them by default) as plain config values."""
        return {field: getattr(self, field) for field in (fields or FIELDS)}


FIELDS = tuple(field.name for field in dataclasses.fields(LossOptions))
"""The option names, in the order of `LossOptions`."""


def check_logit_soft_cap(logit_soft_cap) -> Optional[float]:
    """Returns `logit_soft_cap` as a Python float (or None) after checking it is a positive finite number."""
    if logit_soft_cap is None:
        return None
    if not _checks.is_real_number(logit_soft_cap):
        raise TypeError(_checks.invalid_value(
            "logit_soft_cap", "None or a positive finite Python or NumPy number (logits become "
            "`cap * tanh(logits / cap)`)", f"{logit_soft_cap!r} of type {type(logit_soft_cap).__name__}"))
    value = float(logit_soft_cap)
    if not 0.0 < value < np.inf:  # NaN fails too
        raise ValueError(_checks.invalid_value("logit_soft_cap", "None or a positive finite number",
                                               repr(logit_soft_cap)))
    return value


def soft_cap(logits: tf.Tensor, cap: Optional[float]) -> tf.Tensor:
    """Returns `cap * tanh(logits / cap)` (Gemma's soft-capping), or `logits` for `cap=None`.

    Callers keep padded logits out first: the tanh of a NaN would make a zero upstream gradient NaN.
    """
    if cap is None:
        return logits
    cap = _checks.cast_number(cap, logits.dtype)
    return cap * tf.math.tanh(logits / cap)


def refuse(owner: str, option: str, value, expected: str, reason: str) -> None:
    """Raises the error of an entry point that has no meaning for `option` (or for its `value`), saying why."""
    raise ValueError(_checks.invalid_value(option, f"{expected}: {reason}", repr(value), owner=owner))


def check_custom_loss(softmax_loss_function) -> None:
    """Raises unless `softmax_loss_function` can be called as `fn(labels=..., logits=...)`."""
    if not callable(softmax_loss_function):
        raise TypeError(_checks.invalid_value(
            "softmax_loss_function", "None or a callable taking `labels=` and `logits=`", repr(softmax_loss_function)))
    try:
        inspect.signature(softmax_loss_function).bind(labels=None, logits=None)
    except TypeError as err:
        raise TypeError(
            "`softmax_loss_function` is called as `softmax_loss_function(labels=..., logits=...)` with "
            "flattened `[batch * time]` labels and `[batch * time, classes]` logits, and must return "
            f"`[batch * time]` losses; {softmax_loss_function!r} cannot take those keywords ({err}). "
            "For `tf.nn.sampled_softmax_loss`, which takes hidden states rather than logits, use "
            "`tf_seqloss.sampled_sequence_loss(hidden, kernel, targets, weights, num_sampled=...)`, with "
            "the same flags and padding options. Wrap any other function so that it takes `labels=` and "
            "`logits=`."
        ) from None
    except ValueError:
        pass  # No signature to inspect (some builtins): let the call itself decide.


def _same(value, default) -> bool:
    if tf.is_tensor(value):
        return False
    return value == default


def _check_bool(arg: str, value) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(_checks.invalid_value(arg, "True or False (a Python or NumPy bool)", repr(value)))
    return bool(value)


def _check_flag_families(flags: dict) -> None:
    for average, total in (("average_across_timesteps", "sum_over_timesteps"),
                           ("average_across_batch", "sum_over_batch"),
                           ("average_across_batch", "sum_over_timesteps"),
                           ("average_across_timesteps", "sum_over_batch")):
        if flags[average] and flags[total]:
            raise ValueError(
                f"Invalid combination of arguments: `{average}` and `{total}` cannot both be True: the "
                "`average_across_*` flags divide by the summed weights and the `sum_over_*` flags by the count "
                "of non-zero weights, and one loss cannot do both. Set one family of flags only."
            )


def reduce_tokens(weighted: tf.Tensor, token_weights: Optional[tf.Tensor], options: LossOptions) -> tf.Tensor:
    """Returns the `[batch, time]` weighted token losses reduced as the flags of `options` say.

    `token_weights` None stands for all ones. The averaging flags divide by the summed weights, the
    `sum_over_*` flags by the count of non-zero weights; `normalizer` and `epsilon` as documented.

    Args:
        weighted: `[batch, time]` weighted token losses `w * ce`.
        token_weights: `[batch, time]` token weights `w`, or None for all ones.
        options: the checked options; their flags, `normalizer` and `epsilon` are read.

    Returns:
        `[]`, `[batch]`, `[time]` or `[batch, time]`, as the flags say.
    """
    axes = [axis for axis, on in ((0, options.average_across_batch or options.sum_over_batch),
                                  (1, options.average_across_timesteps or options.sum_over_timesteps)) if on]
    if not axes:
        return weighted
    token_weights = _padding.ones_if_none(token_weights, weighted)
    total = tf.reduce_sum(weighted, axis=axes)
    if options.average_across_timesteps or options.average_across_batch:
        normaliser = tf.reduce_sum(token_weights, axis=axes)
    else:
        normaliser = tf.math.count_nonzero(token_weights, axis=axes, dtype=weighted.dtype)
    if options.normalizer is not None:
        return _distribute.normalise(total, normaliser, options.normalizer, options.epsilon)
    if options.epsilon is None:
        return tf.math.divide_no_nan(total, normaliser)
    return total / (normaliser + _checks.cast_number(options.epsilon, normaliser.dtype))


def expose(*fields: str):
    """Class decorator: read-only attributes `obj.<field>` reading `obj._options`, the one copy of the options.

    A Keras loss or layer keeps its options in one `LossOptions`; an attribute that copied an option could
    be assigned without effect, so each is a property without a setter instead (assigning raises).
    """
    def decorate(cls):
        for field in fields or FIELDS:
            def read(self: Any, field: str = field) -> Any:
                return getattr(self._options, field)

            doc = f"The `{field}` option (read-only: build a new object to change it)."
            setattr(cls, field, property(read, doc=doc))
        return cls
    return decorate


def reduce_for_keras(loss: tf.Tensor, reduction) -> tf.Tensor:
    """Returns a non-scalar loss the flags left reduced to a scalar by Keras' `reduction`; a scalar as is.

    `"sum"` sums, every other reduction but `None`/`"none"` averages (the weights already acted inside the
    flags, so Keras' mean reductions are all the plain mean here).

    Args:
        loss: what the flags left.
        reduction: a Keras reduction name, or None.

    Returns:
        A scalar, or `loss` as it is for `None` and `"none"`.
    """
    if not loss.shape.rank or reduction in (None, "none"):
        return loss
    return tf.reduce_sum(loss) if reduction == "sum" else tf.reduce_mean(loss)


def for_add_loss(loss: tf.Tensor, options: LossOptions, reduction) -> tf.Tensor:
    """Returns a layer's loss as `add_loss` takes it: a scalar, times the replicas where it is a global share.

    Both Kerases divide `add_loss` losses by the number of replicas in sync; a share of a global mean
    (`normalizer` given) must reach the gradient as it is, so it is handed over multiplied by them.

    Args:
        loss: what the flags left.
        options: the layer's options; only `normalizer` is read.
        reduction: the layer's Keras reduction.

    Returns:
        The scalar to pass to `add_loss`.
    """
    loss = reduce_for_keras(loss, reduction)
    return loss if options.normalizer is None else _distribute.undo_replica_scaling(loss)
