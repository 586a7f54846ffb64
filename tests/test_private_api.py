"""The private TensorFlow and Keras names the package reads, each taken away: results stay exact.

`tf_seqloss` imports five names that no public API offers (docs/getting-started.md, "Why `SequenceLoss`
overrides `Loss.__call__`"): how to tell an XLA compilation while tracing, XLA's in-place slice update,
whether a tape could record, Keras 3's mask accessor, and TensorFlow's decorator record (AutoGraph). A
later TensorFlow or Keras may move any of them. Here each import fails as it then would, and every result
is compared with NumPy float64 (`tests/reference.py`).
"""

import numpy as np
import pytest
import tensorflow as tf

import tf_seqloss
from tests import reference
from tests.child import run_script
from tf_seqloss import _cross_entropy as _xent
from tf_seqloss import _fused, _keras, _linear_head

# --- every private import failing at once, in a fresh process, under XLA -------------------------------

# Each name is removed from its module while `tf_seqloss` is imported, so that its `from ... import`
# fails, then put back: TensorFlow and Keras go on using them themselves.
WITHOUT_PRIVATE_APIS = '''
import json
import numpy as np
import tensorflow as tf
from tensorflow.compiler.tf2xla.python import xla
from tensorflow.python.eager import record
from tensorflow.python.ops import control_flow_util

names = [(tf.__internal__, "get_enclosing_xla_context"), (control_flow_util, "GraphOrParentsInXlaContext"),
         (xla, "dynamic_update_slice"), (record, "could_possibly_record"),
         (tf.__internal__.decorator, "make_decorator")]
legacy = tf.keras.losses.Loss.__module__.startswith("tf_keras")
if not legacy:
    import keras.src.backend
    names.append((keras.src.backend, "get_keras_mask"))
saved = [(module, name, getattr(module, name)) for module, name in names]
for module, name, _ in saved:
    delattr(module, name)
import tf_seqloss
from tf_seqloss import _fused, _keras, _linear_head
for module, name, value in saved:
    setattr(module, name, value)

fallbacks = dict(xla_detector=getattr(_fused, "_xla_detector", "?") is None,
                 dynamic_update_slice=getattr(_linear_head, "_dynamic_update_slice", "?") is None,
                 could_record=_linear_head._could_record is None,
                 make_decorator=_keras._make_decorator is None)
if not legacy:
    fallbacks["keras_mask"] = _keras._get_keras_mask is None
data = np.load(__import__("sys").argv[1])
lengths = tf.constant(data["lengths"])
out = {"fallbacks": fallbacks}

def value_and_grads(loss_fn, *inputs):
    with tf.GradientTape() as tape:
        tape.watch(inputs)
        loss = loss_fn(*inputs)
        total = tf.reduce_sum(loss)
    return [loss, *tape.gradient(total, inputs)]

for implementation in ("auto", "reference", "fused", "fused_xla"):
    step = tf.function(lambda logits: value_and_grads(lambda x: tf_seqloss.sequence_loss(
        x, data["targets"], lengths=lengths, implementation=implementation), logits), jit_compile=True)
    out[f"sequence_loss[{implementation}]"] = [x.numpy().tolist() for x in step(tf.constant(data["logits"]))]

for flags in ("mean", "per_step"):
    def head(hidden, kernel, bias, flags=flags):
        return tf_seqloss.linear_sequence_loss(hidden, kernel, data["head_targets"], lengths=data["head_lengths"],
                                               bias=bias, chunk_size=64, average_across_batch=flags == "mean")
    step = tf.function(lambda *inputs: value_and_grads(head, *inputs), jit_compile=True)
    inputs = [tf.constant(data[name]) for name in ("hidden", "kernel", "bias")]
    out[f"linear_sequence_loss[{flags}]"] = [x.numpy().tolist() for x in step(*inputs)]

keras = _keras.keras
logits = keras.layers.Masking(mask_value=0.0)(tf.constant(data["masked_logits"]))  # padded steps are all 0
out["SequenceLoss"] = float(tf_seqloss.SequenceLoss()(data["targets"], logits))
print("RESULT" + json.dumps(out))
'''


def _case(seed=0):
    rng = np.random.default_rng(seed)
    logits = rng.normal(0.0, 2.0, size=(2, 5, 1100)).astype("float32")  # >= 1024 classes: "auto" may pick kernels
    targets = rng.integers(0, 1100, size=(2, 5)).astype("int32")
    lengths = np.array([5, 2], "int32")
    mask = (np.arange(5) < lengths[:, None])
    hidden = rng.normal(size=(2, 150, 8)).astype("float32")
    head_lengths = np.array([150, 40], "int32")
    return dict(logits=logits, targets=targets, lengths=lengths, mask=mask,
                masked_logits=np.where(mask[..., None], logits, 0.0).astype("float32"),
                hidden=hidden, kernel=rng.normal(size=(8, 2500)).astype("float32"),  # three class slices
                bias=rng.normal(size=(2500,)).astype("float32"),
                head_targets=rng.integers(0, 2500, size=(2, 150)).astype("int32"), head_lengths=head_lengths,
                head_mask=np.arange(150) < head_lengths[:, None])


def _linear_reference(hidden, kernel, bias, targets, mask, **flags):
    """NumPy float64 `(loss, d hidden, d kernel, d bias)` of `sum(sequence_loss(hidden @ kernel + bias))`."""
    hidden, kernel, bias = (np.asarray(x, np.float64) for x in (hidden, kernel, bias))
    logits = hidden @ kernel + bias
    weights = mask.astype(np.float64)
    d_logits = reference.sequence_loss_grad(logits, targets, weights, **flags)
    return (reference.sequence_loss(logits, targets, weights, **flags), d_logits @ kernel.T,
            np.einsum("btf,btc->fc", hidden, d_logits), d_logits.sum(axis=(0, 1)))


@pytest.mark.slow
def test_every_private_import_failing_leaves_xla_results_and_masks_exact(tmp_path):
    case = _case()
    np.savez(tmp_path / "case.npz", **case)
    script = WITHOUT_PRIVATE_APIS.replace('__import__("sys").argv[1]', repr(str(tmp_path / "case.npz")))
    out = run_script(script, marker="RESULT", timeout=600)
    assert out.pop("fallbacks") == dict(xla_detector=True, dynamic_update_slice=True, could_record=True,
                                        make_decorator=True,
                                        **({"keras_mask": True} if _keras.IS_KERAS_3 else {}))

    weights = case["mask"].astype(np.float64)
    want_loss = reference.sequence_loss(case["logits"], case["targets"], weights)
    want_grad = reference.sequence_loss_grad(case["logits"], case["targets"], weights)
    for implementation in _xent.IMPLEMENTATIONS:
        loss, grad = out.pop(f"sequence_loss[{implementation}]")
        np.testing.assert_allclose(loss, want_loss, rtol=1e-5, err_msg=implementation)
        np.testing.assert_allclose(grad, want_grad, rtol=1e-4, atol=1e-7, err_msg=implementation)

    for flags, options in (("mean", {}), ("per_step", dict(average_across_batch=False))):
        got = out.pop(f"linear_sequence_loss[{flags}]")
        want = _linear_reference(case["hidden"], case["kernel"], case["bias"], case["head_targets"],
                                 case["head_mask"], **options)
        for name, g, w in zip(("loss", "hidden", "kernel", "bias"), got, want):
            np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6, err_msg=f"{flags}: {name}")

    # The Keras mask (steps past `lengths`) is read: the loss is the mean over the real tokens only.
    np.testing.assert_allclose(out.pop("SequenceLoss"), want_loss, rtol=1e-5)
    assert not out


# --- the XLA context -----------------------------------------------------------------------------------


def _while_tracing(fn, jit_compile):
    seen = []

    @tf.function(jit_compile=jit_compile)
    def probe():
        seen.append(fn())
        return tf.constant(0)

    probe()
    return seen[0]


def test_xla_detector_uses_the_private_route_when_the_exported_one_is_gone(monkeypatch):
    monkeypatch.delattr(tf.__internal__, "get_enclosing_xla_context")
    detector = _fused.find_xla_detector()
    assert detector is not None
    assert _while_tracing(detector, jit_compile=True)
    assert not _while_tracing(detector, jit_compile=False)
    from tensorflow.python.ops import control_flow_util
    monkeypatch.delattr(control_flow_util, "GraphOrParentsInXlaContext")
    assert _fused.find_xla_detector() is None


def test_without_a_detector_the_xla_context_is_unknown_while_tracing(monkeypatch):
    monkeypatch.setattr(_fused, "_xla_detector", None)
    assert not _fused.in_xla_compilation(unknown=True)  # eager: known
    for jit_compile in (False, True):
        assert not _while_tracing(_fused.in_xla_compilation, jit_compile)
        assert _while_tracing(lambda: _fused.in_xla_compilation(unknown=True), jit_compile)


@pytest.mark.parametrize("mode", ["eager", "function", "xla"])
def test_linear_sequence_loss_without_detector_slice_update_or_record_check_is_exact(monkeypatch, mode):
    # In-process twin of the fresh-process test, in every mode: the fallbacks outside XLA must hold too.
    monkeypatch.setattr(_fused, "_xla_detector", None)
    monkeypatch.setattr(_linear_head, "_dynamic_update_slice", None)
    monkeypatch.setattr(_linear_head, "_could_record", None)
    case = _case(seed=1)

    def step(hidden, kernel, bias):
        with tf.GradientTape() as tape:
            tape.watch([hidden, kernel, bias])
            loss = tf_seqloss.linear_sequence_loss(hidden, kernel, case["head_targets"], bias=bias,
                                                   lengths=case["head_lengths"], chunk_size=64)
        return [loss, *tape.gradient(loss, [hidden, kernel, bias])]

    if mode != "eager":
        step = tf.function(step, jit_compile=mode == "xla")
    got = step(*(tf.constant(case[name]) for name in ("hidden", "kernel", "bias")))
    want = _linear_reference(case["hidden"], case["kernel"], case["bias"], case["head_targets"], case["head_mask"])
    for name, g, w in zip(("loss", "hidden", "kernel", "bias"), got, want):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6, err_msg=name)


# --- the Keras mask ------------------------------------------------------------------------------------


@pytest.fixture
def masks_in_a_side_table_only(monkeypatch):
    """A Keras 3 that keeps every mask in its side table, and whose accessor `tf_seqloss` cannot import."""
    if not _keras.IS_KERAS_3:
        pytest.skip("tf_keras keeps masks as `_keras_mask` attributes, its only store")
    import weakref

    import keras.src.backend

    table = {}

    def set_keras_mask(x, mask):
        if mask is None:
            table.pop(id(x), None)
        else:
            table[id(x)] = mask
            weakref.finalize(x, table.pop, id(x), None)

    monkeypatch.setattr(keras.src.backend, "set_keras_mask", set_keras_mask)
    monkeypatch.setattr(keras.src.backend, "get_keras_mask", lambda x: table.get(id(x)))
    monkeypatch.setattr(_keras, "_get_keras_mask", None)


@pytest.mark.keras
@pytest.mark.parametrize("mode", ["eager", "function"])
def test_a_mask_keras_keeps_elsewhere_is_still_read(masks_in_a_side_table_only, mode):
    case = _case()
    weights = case["mask"].astype(np.float64)
    want = reference.sequence_loss(case["logits"], case["targets"], weights)
    unmasked = reference.sequence_loss(case["masked_logits"], case["targets"], np.ones_like(weights))
    assert abs(unmasked - want) > 0.05 * want  # the padded steps' logits (all 0) would count
    masking = _keras.keras.layers.Masking(mask_value=0.0)
    metric = tf_seqloss.TokenPerplexity()

    def losses(logits, targets):
        logits = masking(logits)
        assert getattr(logits, "_keras_mask", None) is None  # the attribute alone would miss the mask
        metric.update_state(targets, logits)
        return tf_seqloss.SequenceLoss()(targets, logits), metric.result()

    if mode == "function":
        losses = tf.function(losses)
    loss, perplexity = losses(tf.constant(case["masked_logits"]), tf.constant(case["targets"]))
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    np.testing.assert_allclose(perplexity, np.exp(want), rtol=1e-5)


@pytest.mark.keras
def test_the_fused_head_reads_a_mask_keras_keeps_elsewhere(masks_in_a_side_table_only):
    case = _case()
    keras = _keras.keras
    hidden = keras.layers.Masking(mask_value=0.0)(np.where(case["head_mask"][..., None], case["hidden"], 0.0))
    head = tf_seqloss.FusedLinearHead(2500, chunk_size=64)
    head.build(hidden.shape)
    head.kernel.assign(case["kernel"])
    head.bias.assign(case["bias"])
    loss = head(hidden, case["head_targets"])
    want = _linear_reference(case["hidden"], case["kernel"], case["bias"], case["head_targets"], case["head_mask"])
    np.testing.assert_allclose(tf.reduce_sum(head.losses), want[0], rtol=1e-5)
    assert loss is not None
