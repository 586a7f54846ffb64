"""`sequence_loss` against the recorded outputs of TFA 0.23 and TF1 contrib 1.4 / 1.15, every case."""

import functools

import numpy as np
import pytest
import tensorflow as tf

import tf_seqloss
from tests.conftest import FLAG_NAMES, oracle_cases

TFA_CASES = 140  # as the oracle README records
CONTRIB_CASES = 80


@functools.lru_cache(maxsize=None)
def _cases(name):
    return oracle_cases(name)


def _tolerance(dtype):
    # float64: the contrib cases whose weights are all below 1e-11 differ from the recording by up to
    # 4e-10 relative, from the order of the sums; every other case agrees to 1e-15.
    return dict(rtol=2e-5, atol=2e-6) if dtype == np.float32 else dict(rtol=1e-9, atol=1e-12)


def _loss_and_grad(logits, *args, **kwargs):
    logits = tf.constant(logits)
    with tf.GradientTape() as tape:
        tape.watch(logits)
        loss = tf_seqloss.sequence_loss(logits, *args, **kwargs)
        total = tf.reduce_sum(loss)
    return loss.numpy(), tape.gradient(total, logits).numpy()


@pytest.mark.parametrize("name,count", [("tfa_sequence_loss", TFA_CASES), ("contrib_sequence_loss", CONTRIB_CASES)])
def test_oracle_holds_every_recorded_case(name, count):
    assert len(_cases(name)) == count


@pytest.mark.parametrize("index", range(TFA_CASES))
def test_matches_tfa_loss_and_gradient(index):
    _, meta, case = _cases("tfa_sequence_loss")[index]
    flags = {flag: meta[flag] for flag in FLAG_NAMES}
    loss, grad = _loss_and_grad(case["logits"], case["targets"], case["weights"], **flags)
    assert loss.shape == case["loss"].shape
    assert loss.dtype == case["loss"].dtype
    tol = _tolerance(case["logits"].dtype)
    np.testing.assert_allclose(loss, case["loss"], **tol)
    np.testing.assert_allclose(grad, case["grad"], **tol)


@pytest.mark.parametrize("index", range(CONTRIB_CASES))
def test_matches_contrib_1_4_with_epsilon_and_1_15_without(index):
    _, meta, case = _cases("contrib_sequence_loss")[index]
    flags = {flag: meta[flag] for flag in FLAG_NAMES[:2]}
    tol = _tolerance(case["logits"].dtype)

    loss_r14, grad_r14 = _loss_and_grad(case["logits"], case["targets"], case["weights"], epsilon=1e-12, **flags)
    np.testing.assert_allclose(loss_r14, case["loss_r14"], **tol)
    np.testing.assert_allclose(grad_r14, case["grad_r14"], **tol)

    loss_r115, _ = _loss_and_grad(case["logits"], case["targets"], case["weights"], **flags)
    np.testing.assert_allclose(loss_r115, case["loss_r115"], **tol)
