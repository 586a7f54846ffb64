"""The Keras flavour switch and the few Keras services the package needs, in one place.

`tf.keras` resolves to Keras 3 (TensorFlow's default) or to tf_keras, the Keras 2 that
`TF_USE_LEGACY_KERAS=1` selects. Everything that depends on which one is running lives here: the module
itself, the Keras mask of a tensor, the replica scaling of a loss, and saving functions in a config.
"""

from __future__ import annotations

import importlib

import tensorflow as tf


def _keras_module():
    # `tf.keras` is a lazy alias whose namespace lacks `saving` under Keras 3; import the real package.
    legacy = tf.keras.losses.Loss.__module__.startswith("tf_keras")
    return importlib.import_module("tf_keras" if legacy else "keras")


keras = _keras_module()
IS_KERAS_3 = not keras.__version__.startswith("2.")
FLAVOUR = "keras3" if IS_KERAS_3 else "tf_keras"

try:  # Keras 3 keeps a mask on the tensor when it can, and in a side table for tensors that refuse attributes;
    # this private accessor reads both. Without it, see `get_mask`.
    from keras.src.backend import get_keras_mask as _get_keras_mask
except ImportError:  # tf_keras, or a Keras 3 that moved it
    _get_keras_mask = None

# Reductions that average what the flags leave unreduced, and whose result Keras 3 divides by the number of
# replicas under `tf.distribute` (tf_keras' `compile` divides itself).
MEAN_REDUCTIONS = ("sum_over_batch_size", "mean", "mean_with_sample_weight", "auto")
NO_REDUCTIONS = (None, "none")


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
    """Returns the config Keras saves a function argument as (None stays None)."""
    return None if fn is None else keras.saving.serialize_keras_object(fn)


def deserialize_function(config, owner: str, arg: str):
    """Returns the function saved by `serialize_function`, or raises a ValueError saying how to make it load."""
    if config is None or callable(config):
        return config
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


def _describe(config) -> str:
    if isinstance(config, dict):
        return f"class_name={config.get('class_name')!r}, name={str(config.get('config'))[:60]!r}"
    return repr(config)[:80]
