"""The Keras flavour switch and the few Keras services the package needs, in one place.

`tf.keras` resolves to Keras 3 (TensorFlow's default) or to tf_keras, the Keras 2 that
`TF_USE_LEGACY_KERAS=1` selects. Everything that depends on which one is running lives here: the module
itself, the Keras mask of a tensor, the replica scaling of a loss, and saving functions in a config.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any, Dict

import tensorflow as tf


def _keras_module():
    # `tf.keras` is a lazy alias whose namespace lacks `saving` under Keras 3; import the real package.
    legacy = tf.keras.losses.Loss.__module__.startswith("tf_keras")
    return importlib.import_module("tf_keras" if legacy else "keras")


keras: Any = _keras_module()  # a module either way; Any, as neither ships type information
IS_KERAS_3 = not keras.__version__.startswith("2.")
FLAVOUR = "keras3" if IS_KERAS_3 else "tf_keras"

# Wraps a function keeping the record `tf_inspect` reads its signature through. `tf.__internal__` is the
# namespace TensorFlow keeps for Keras, not a public API: without it, see `not_converted`.
_make_decorator = getattr(getattr(getattr(tf, "__internal__", None), "decorator", None), "make_decorator", None)

try:  # Keras 3 keeps a mask on the tensor when it can, and in a side table for tensors that refuse attributes;
    # this private accessor reads both. Without it, see `get_mask`.
    from keras.src.backend import get_keras_mask as _get_keras_mask
except ImportError:  # tf_keras, or a Keras 3 that moved it
    _get_keras_mask = None


def not_converted(method):
    """`tf.autograph.experimental.do_not_convert` for a method Keras calls, keeping its signature readable.

    AutoGraph converts the library code a `tf.function` (`fit`'s included) reaches, unless told not to:
    seconds of tracing per entry point, for code that has no Python control flow on tensors. tf_keras reads
    `call`'s and `update_state`'s arguments through TensorFlow's decorator record, which the plain
    `do_not_convert` wrapper (`*args, **kwargs`) does not leave; without that record (`_make_decorator`,
    the name TensorFlow keeps for Keras, gone) the method is left as it is: converted, the same graph.
    """
    if _make_decorator is None:
        return method
    return _make_decorator(method, tf.autograph.experimental.do_not_convert(method))


# Reductions that average what the flags leave unreduced, and whose result Keras 3 divides by the number of
# replicas under `tf.distribute` (tf_keras' `compile` divides itself).
MEAN_REDUCTIONS = ("sum_over_batch_size", "mean", "mean_with_sample_weight", "auto")
NO_REDUCTIONS = (None, "none")
# The reductions that give `add_loss` the scalar it needs, as the running Keras names them.
SCALAR_REDUCTIONS = ("sum_over_batch_size", "sum") + (("mean", "mean_with_sample_weight") if IS_KERAS_3 else ("auto",))


def check_scalar_reduction(reduction, owner: str) -> None:
    """Refuses a `reduction` that leaves a layer's non-scalar loss unreduced: `add_loss` takes a scalar."""
    if not isinstance(reduction, (str, type(None))) or reduction not in SCALAR_REDUCTIONS:
        raise ValueError(
            f"Invalid value for argument `reduction` of `{owner}`. Expected one of {SCALAR_REDUCTIONS}: the "
            "layer hands its loss to `add_loss`, which needs a scalar, so the reduction must reduce what the "
            f"flags leave (`None` and 'none' do not). Received: reduction={reduction!r}")


def get_mask(tensor):
    """Returns the Keras mask a masking layer left on `tensor`, or None.

    tf_keras keeps it as the tensor's `_keras_mask` attribute, which is all it has. Keras 3 has no public
    accessor: its private `get_keras_mask` reads the attribute or its side table. A Keras 3 without that
    accessor is asked through its public masking contract instead (`_MaskReader`), never by reading the
    attribute alone: a mask kept in the side table would be missed, and padding counted as tokens.
    """
    if not IS_KERAS_3:
        return getattr(tensor, "_keras_mask", None)
    if _get_keras_mask is not None:
        return _get_keras_mask(tensor)
    return _MaskReader().read(tensor)


class _MaskReader(keras.layers.Layer):
    """Reads the Keras mask of a tensor as Keras itself hands it over, wherever it keeps it.

    Keras' masking contract (its guide "Understanding masking & padding"): a layer whose `call` takes a
    `mask` argument receives the mask of its input. This layer's `call` only records that argument; the
    input is not cast (`autocast=False`), and the output is dropped.
    """

    def __init__(self):
        super().__init__(autocast=False, trainable=False, name="tf_seqloss_mask_reader")
        self.supports_masking = True
        self.received = []

    @not_converted
    def call(self, inputs, mask=None):
        self.received.append(mask)
        return inputs

    def read(self, tensor):
        self(tensor)
        return self.received[0]


def scale_for_replicas(loss: tf.Tensor, reduction) -> tf.Tensor:
    """Returns `loss` as Keras expects a loss object's result under `tf.distribute`.

    Keras 3 sums the replicas' gradients and expects each replica's (averaged) loss divided by their
    number; its `fit` multiplies back for the logged value. tf_keras' `compile` divides by itself.
    """
    if IS_KERAS_3 and reduction in MEAN_REDUCTIONS:
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        if replicas > 1:
            loss = loss * tf.cast(1.0 / replicas, loss.dtype)
    return loss


def serialize_function(fn):
    """Returns the config Keras saves a function argument as (None stays None).

    A registered function is saved under its registered name (`"package>name"`), as Keras 3 and tf_keras
    2.18+ save it; tf_keras 2.16 saves the bare `__name__`, which names no registered object, so the file would
    not load in safe mode.

    Args:
        fn: the function, or None.

    Returns:
        Keras' serialised config of `fn`, or None.
    """
    if fn is None:
        return None
    config = keras.saving.serialize_keras_object(fn)
    if inspect.isfunction(fn) and isinstance(config, dict) and config.get("class_name") == "function":
        registered = keras.saving.get_registered_name(fn)
        if ">" in registered and keras.saving.get_registered_object(registered) is fn:
            config = dict(config, config=registered)
    return config


def in_safe_mode() -> bool:
    """Returns whether Keras' safe mode is on: True unless a loader or the user turned it off.

    Both Kerases keep the flag that `load_model(..., safe_mode=...)` and
    `deserialize_keras_object(..., safe_mode=...)` set while they call `from_config` (Keras 3 in a global,
    tf_keras per thread), and that `keras.config.enable_unsafe_deserialization()` (tf_keras:
    `keras.__internal__.enable_unsafe_deserialization()`) clears. Outside any of them (a direct
    `from_config`, tf_keras' legacy `.h5` or SavedModel load) it is unset, and unset means safe: Keras'
    own `deserialize_keras_object` defaults to `safe_mode=True` too.
    """
    try:
        if IS_KERAS_3:
            from keras.src.saving.serialization_lib import in_safe_mode as keras_in_safe_mode
        else:
            from tf_keras.src.saving.serialization_lib import in_safe_mode as keras_in_safe_mode
    except ImportError:  # pragma: no cover - a Keras that moved it: stay safe
        return True
    return keras_in_safe_mode() is not False


# The public namespaces in which both Kerases look up a built-in function saved by its bare name
# (`module="builtins"`), as `Dense(activation="relu")` is; classes and the namespaces' own
# `get`/`serialize`/`deserialize` are not functions a config should name.
_BUILTIN_FUNCTION_MODULES = ("activations", "losses", "metrics")
_NOT_BUILTIN_FUNCTIONS = frozenset({"get", "serialize", "deserialize"})


def deserialize_function(config, owner: str, arg: str):
    """Returns the function `serialize_function` saved, or raises a ValueError saying how to make it load.

    In safe mode (see `in_safe_mode`) only what the user's own code vouches for is accepted: an object
    registered with `keras.saving.register_keras_serializable` or passed in `custom_objects`, and a
    Keras built-in function (`keras.activations`, `keras.losses`, `keras.metrics`). No module named by the
    config is imported and no bytecode is loaded, whichever Keras runs; tf_keras' generic deserialiser
    would import any module a `.keras` file names. With safe mode off the config goes to Keras'
    deserialiser as it is, which loads lambdas (and, under tf_keras, functions of any importable module).
    An object (not a config) is returned as it is.

    Args:
        config: what `serialize_function` saved, a function, or None.
        owner: the class whose argument this is, for the message.
        arg: the argument's name, for the message.

    Returns:
        The function, or None.

    Raises:
        ValueError: safe mode refuses the config, or Keras cannot deserialise it.
    """
    if config is None or callable(config):
        return config
    if in_safe_mode():
        found, what = _resolve_safely(config)
        if found is None:
            raise ValueError(
                f"Refused to load `{arg}` of `{owner}` in safe mode: its saved config names {what}, and safe "
                "mode loads only functions registered with `@keras.saving.register_keras_serializable()` (or "
                "passed in `custom_objects`) and Keras' built-in functions. Register the function and import "
                "its module before loading, or load with `safe_mode=False` if you trust the file. "
                f"Received: {arg}={_short(config)}"
            )
        if not isinstance(found, dict):
            return found
    try:
        return keras.saving.deserialize_keras_object(config)
    except (ValueError, TypeError, AttributeError) as err:
        raise ValueError(
            f"Could not restore `{arg}` of `{owner}` from its saved config ({_describe(config)}): {err}\n"
            "A function round-trips when Keras can find it by name: decorate it with "
            "`@keras.saving.register_keras_serializable(package='my_package')` and import its module before "
            "loading. A lambda is stored as bytecode, which safe mode refuses; load with `safe_mode=False` "
            "only if you trust the file."
        ) from err


def _resolve_safely(config):
    """Returns `(object or None, what the config names)`: None where safe mode refuses the config.

    A registered class comes back as its config (a dict), for Keras to instantiate: Keras then finds the
    class by its registered name before it would consider any module.
    """
    if isinstance(config, str):  # A bare name, as legacy formats save functions.
        return _registered_function(config) or _builtin_function(config), f"the name {config!r}"
    if not isinstance(config, dict):
        return None, f"a {type(config).__name__}"
    class_name, module = config.get("class_name"), config.get("module")
    name, registered_name = config.get("config"), config.get("registered_name")
    if class_name == "__lambda__":
        return None, "a lambda (Python bytecode)"
    if class_name == "function":
        where = f"the function {name!r}" + ("" if module in (None, "builtins") else f" of module {module!r}")
        if not isinstance(name, str):
            return None, where
        # Both Kerases save a function under its registered name (or bare name), and look it up by that.
        found = _registered_function(name) or _registered_function_by_bare_name(name)
        if found is None and (module in (None, "builtins") or _is_keras_module(module)):
            found = _builtin_function(name)
        return found, where
    where = (f"the class {class_name!r} of module {module!r} "
             f"(registered_name={registered_name!r})")
    if isinstance(registered_name, str) and isinstance(_registered(registered_name), type):
        return config, where
    return None, where


def _registered(name: str):
    # Looks in the `custom_objects` of the load under way and in the global registry; never imports.
    return keras.saving.get_registered_object(name) if isinstance(name, str) else None


def _registered_function(name: str):
    found = _registered(name)
    return found if callable(found) and not isinstance(found, type) else None


def _registered_function_by_bare_name(name: str):
    """The one registered function saved as `"<any package>>name"`, or None (none, or several packages).

    tf_keras 2.16 saved a registered function by its bare name; what it names is still only what the user's
    own code registered, so safe mode may accept it when the name is not ambiguous.
    """
    if not isinstance(name, str) or ">" in name:
        return None
    registry: Dict[str, Any] = getattr(keras.saving, "get_custom_objects", lambda: {})()
    found = {id(obj): obj for key, obj in registry.items()
             if key.rpartition(">")[2] == name and callable(obj) and not isinstance(obj, type)}
    return next(iter(found.values())) if len(found) == 1 else None


def _builtin_function(name: str):
    if not name.isidentifier() or name.startswith("_") or name in _NOT_BUILTIN_FUNCTIONS:
        return None
    for module in _BUILTIN_FUNCTION_MODULES:
        found = getattr(getattr(keras, module), name, None)
        if inspect.isfunction(found):
            return found
    return None


def _is_keras_module(module) -> bool:
    return isinstance(module, str) and module.split(".")[0] in ("keras", "tf_keras")


def _short(config) -> str:
    text = repr(config)
    return text if len(text) <= 200 else text[:197] + "..."


def _describe(config) -> str:
    if isinstance(config, dict):
        return (f"module={config.get('module')!r}, class_name={config.get('class_name')!r}, "
                f"name={str(config.get('config'))[:60]!r}")
    return repr(config)[:80]
