"""The suite's own set-up (tests/conftest.py): Keras is reset between tests without a forced collection."""

import gc

import pytest
import tensorflow as tf

from tests import conftest


@pytest.mark.keras
def test_keras_is_reset_between_tests_without_a_forced_garbage_collection(monkeypatch):
    # Keras 3's clear_session() runs gc.collect() unless told not to: after every test of the suite that was
    # its largest cost. What the reset is for, Keras's global names, must still start afresh.
    collections = []
    monkeypatch.setattr(gc, "collect", lambda *args, **kwargs: collections.append(args) or 0)
    tf.keras.layers.Dense(1)
    assert tf.keras.layers.Dense(1).name != "dense"  # the second layer of the session has a suffix
    conftest._clear_keras_session()
    assert tf.keras.layers.Dense(1).name == "dense"
    assert collections == []
