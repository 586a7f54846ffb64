"""`TokenPerplexity` and `TokenAccuracy`: exact token-level values over uneven batches, every padding route.

The reference is NumPy float64 over all real tokens pooled; a mean of per-batch values (what Keras does
with a per-batch metric or loss) is shown to differ on the same data. The strategy run of the padding
routes is in `test_distribute_normalizer.py`; the one of the unmarked-padding warning is here.
"""

import doctest
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import warnings

import numpy as np
import pytest
import tensorflow as tf

import tf_seqloss
from tests import reference
from tests.child import ROOT, run_script
from tf_seqloss import _metrics
from tf_seqloss._keras import keras

VOCAB, TIME = 6, 7


def _data(seed=0):
    rng = np.random.default_rng(seed)
    lengths = np.array([7, 6, 7, 1, 2, 1])   # Batches of 2: 13, 8 and 3 tokens.
    mask = (np.arange(TIME) < lengths[:, None]).astype("float32")
    logits = rng.normal(size=(6, TIME, VOCAB)).astype("float32")
    targets = (rng.integers(1, VOCAB, size=mask.shape) * mask).astype("int32")
    return logits, targets, mask


def _exact(logits, targets, mask):
    ce = reference.token_cross_entropy(logits, targets)
    correct = logits.argmax(-1) == targets
    return np.exp((mask * ce).sum() / mask.sum()), (mask * correct).sum() / mask.sum()


@pytest.mark.parametrize("route", ["sample_weight", "padding_id", "keras_mask"])
def test_update_state_over_uneven_batches_gives_the_exact_token_values(route):
    logits, targets, mask = _data()
    perplexity = tf_seqloss.TokenPerplexity(padding_id=0 if route == "padding_id" else None)
    accuracy = tf_seqloss.TokenAccuracy(padding_id=0 if route == "padding_id" else None)
    per_batch = []
    for part in (slice(0, 2), slice(2, 4), slice(4, 6)):
        y_pred = logits[part]
        if route == "keras_mask":
            y_pred = keras.layers.Masking(0.0)(np.where(mask[part][..., None] > 0, y_pred, 0.0))
            y_pred = keras.layers.Activation("linear")(y_pred)   # Passes the mask on to its output.
        sample_weight = mask[part] if route == "sample_weight" else None
        for metric in (perplexity, accuracy):
            metric.update_state(targets[part], y_pred, sample_weight=sample_weight)
        per_batch.append(_exact(logits[part], targets[part], mask[part]))
    expected = _exact(logits, targets, mask)
    np.testing.assert_allclose([float(perplexity.result()), float(accuracy.result())], expected, rtol=1e-5)
    assert abs(np.mean([p for p, _ in per_batch]) - expected[0]) > 0.01  # A mean of batch values is off.
    perplexity.reset_state()
    assert float(perplexity.result()) == 1.0 and float(perplexity.count) == 0.0


def test_evaluate_reports_the_exact_values_over_batches():
    logits, targets, mask = _data(seed=1)
    model = keras.Sequential([keras.Input((TIME, VOCAB)), keras.layers.Masking(0.0), keras.layers.Activation("linear")])
    model.compile(loss=tf_seqloss.SequenceLoss(),
                  metrics=[tf_seqloss.TokenPerplexity(), tf_seqloss.TokenAccuracy()])
    inputs = np.where(mask[..., None] > 0, logits, 0.0)
    logs = model.evaluate(inputs, targets, batch_size=2, verbose=0, return_dict=True)
    expected = _exact(logits, targets, mask)
    np.testing.assert_allclose([logs["token_perplexity"], logs["token_accuracy"]], expected, rtol=1e-5)
    # The loss Keras reports over several batches weights them by sequences; log(perplexity) is exact.
    assert abs(logs["loss"] - np.log(expected[0])) > 0.01


def test_probability_targets_use_their_argmax():
    logits, targets, mask = _data(seed=2)
    accuracy, perplexity = tf_seqloss.TokenAccuracy(), tf_seqloss.TokenPerplexity()
    for metric in (accuracy, perplexity):
        metric.update_state(np.eye(VOCAB, dtype="float32")[targets], logits, sample_weight=mask)
    np.testing.assert_allclose([float(perplexity.result()), float(accuracy.result())], _exact(logits, targets, mask),
                               rtol=1e-5)


@pytest.mark.parametrize("cls", [tf_seqloss.TokenPerplexity, tf_seqloss.TokenAccuracy])
def test_config_round_trip_and_keras_file(cls):
    metric = cls(name="m", padding_id=-100)
    restored = cls.from_config(metric.get_config())
    assert restored.get_config() == metric.get_config() and restored.padding_id == -100
    assert keras.saving.get_registered_object(f"tf_seqloss>{cls.__name__}") is cls
    model = keras.Sequential([keras.Input((TIME, VOCAB)), keras.layers.Activation("linear")])
    model.compile(loss=tf_seqloss.SequenceLoss(padding_id=0), metrics=[cls(padding_id=0)])
    logits, targets, _ = _data()
    model.evaluate(logits, targets, verbose=0)
    path = os.path.join(tempfile.mkdtemp(), "model.keras")
    model.save(path)
    loaded = keras.models.load_model(path)   # No custom_objects.
    # The compiled metric comes back with its padding_id and reports the exact token value again.
    logs = loaded.evaluate(logits, targets, batch_size=2, verbose=0, return_dict=True)
    name = "token_perplexity" if cls is tf_seqloss.TokenPerplexity else "token_accuracy"
    expected = _exact(logits, targets, (targets != 0).astype("float64"))
    np.testing.assert_allclose(logs[name], expected[0 if cls is tf_seqloss.TokenPerplexity else 1], rtol=1e-5)


def test_bad_padding_id_names_the_argument():
    with pytest.raises((TypeError, ValueError), match="padding_id"):
        tf_seqloss.TokenAccuracy(padding_id=1.5)


def test_docstring_examples_run():
    result = doctest.testmod(_metrics, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0


# ---- Unmarked padding: `metrics=` gets no sample_weight (keras-hub's data format marks padding only so)

HUB_BATCH, HUB_TIME, HUB_VOCAB = 8, 9, 7


def _keras_hub_batch(seed=0):
    """`(y_pred, y, sample_weight)` as keras-hub's causal-LM preprocessing gives them.

    Token ids packed as `[start, tokens..., end, 0, 0, ...]`; the targets are the ids shifted by one and
    the sample weights the shifted padding mask, so padding is marked by `sample_weight` alone.
    """
    rng = np.random.default_rng(seed)
    lengths = rng.integers(2, HUB_TIME, size=HUB_BATCH)
    lengths[0] = HUB_TIME   # One full row, as in any batch packed to its longest sequence.
    ids = np.where(np.arange(HUB_TIME + 1) < lengths[:, None] + 1,
                   rng.integers(3, HUB_VOCAB, size=(HUB_BATCH, HUB_TIME + 1)), 0)
    ids[np.arange(HUB_BATCH), lengths] = 2   # The end token.
    ids[:, 0] = 1                            # The start token.
    padding_mask = (np.arange(HUB_TIME + 1) <= lengths[:, None]).astype("float32")
    y, sample_weight = ids[:, 1:].astype("int32"), padding_mask[:, 1:]
    logits = rng.normal(size=(HUB_BATCH, HUB_TIME, HUB_VOCAB)).astype("float32")
    logits[..., 0] += 1.5   # A model that learnt the padding: it predicts 0 where padding is likely.
    return logits, y, sample_weight


def _ours(records):
    return [str(r.message) for r in records if "without any padding information" in str(r.message)]


def _graph_update(metric, **function_kwargs):
    """`metric.update_state` as a `tf.function` (tf_keras returns an op from it, which a function cannot)."""
    def update(y_true, y_pred):
        metric.update_state(y_true, y_pred)
    return tf.function(update, **function_kwargs)


def _identity_model():
    inputs = keras.Input((HUB_TIME, HUB_VOCAB))
    return keras.Model(inputs, keras.layers.Activation("linear")(inputs))


@pytest.mark.parametrize("jit_compile", [False, True])
def test_metrics_list_counts_padding_and_warns_weighted_metrics_list_is_exact(jit_compile):
    logits, y, sample_weight = _keras_hub_batch()
    model = _identity_model()
    model.compile(loss=tf_seqloss.SequenceLoss(), jit_compile=jit_compile,
                  metrics=[tf_seqloss.TokenPerplexity(name="ppl"), tf_seqloss.TokenAccuracy(name="acc")],
                  weighted_metrics=[tf_seqloss.TokenPerplexity(name="w_ppl"), tf_seqloss.TokenAccuracy(name="w_acc")])
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        logs = model.evaluate(logits, y, sample_weight=sample_weight, batch_size=3, verbose=0, return_dict=True)
    # `weighted_metrics`: the real tokens only. `metrics`: Keras gave them no weights, so every position counts.
    np.testing.assert_allclose([logs["w_ppl"], logs["w_acc"]], _exact(logits, y, sample_weight), rtol=1e-5)
    np.testing.assert_allclose([logs["ppl"], logs["acc"]], _exact(logits, y, np.ones_like(sample_weight)), rtol=1e-5)
    assert logs["ppl"] < 0.8 * logs["w_ppl"] and logs["acc"] > 1.2 * logs["w_acc"]   # Far off, not rounding.
    ours = _ours(records)
    assert len(ours) == 2, ours   # Once for each metric in `metrics=`, none for `weighted_metrics=`.
    assert any("'ppl'" in m for m in ours) and any("'acc'" in m for m in ours)
    assert all("weighted_metrics" in m and "padding_id" in m for m in ours)


@pytest.mark.parametrize("route", ["sample_weight", "keras_mask", "padding_id", "ragged"])
def test_no_warning_when_the_padding_is_marked(route):
    logits, y, sample_weight = _keras_hub_batch(seed=1)
    metric = tf_seqloss.TokenPerplexity(padding_id=0 if route == "padding_id" else None)
    y_true, y_pred, weights = y, logits, None
    if route == "sample_weight":
        weights = sample_weight
    elif route == "keras_mask":
        y_pred = keras.layers.Masking(0.0)(np.where(sample_weight[..., None] > 0, logits, 0.0))
    elif route == "ragged":
        lengths = sample_weight.sum(1).astype("int64")
        y_true = tf.RaggedTensor.from_tensor(y, lengths=lengths)
        y_pred = tf.RaggedTensor.from_tensor(logits, lengths=lengths)
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        for _ in range(2):
            metric.update_state(y_true, y_pred, sample_weight=weights)
        value = float(metric.result())
        metric.reset_state()
    assert _ours(records) == []
    np.testing.assert_allclose(value, _exact(logits, y, sample_weight)[0], rtol=1e-5)


def test_no_warning_for_unpadded_targets():
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(16, 12, 40)).astype("float32")
    targets = rng.integers(1, 40, size=(16, 12)).astype("int32")
    targets[:, -1] = 2          # Every row ends with an end token (shared, but never doubled),
    targets[3, -3:] = [5, 5, 2]  # and one row holds a repeated token just before it.
    for row in range(16):       # No row starts or ends with two equal ids.
        if targets[row, 0] == targets[row, 1]:
            targets[row, 1] = targets[row, 0] % 39 + 1
        if targets[row, -2] == 2:
            targets[row, -2] = 3
    metric = tf_seqloss.TokenAccuracy()
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        metric.update_state(targets, logits)
        _graph_update(metric)(targets, logits)
        value = float(metric.result())
    assert _ours(records) == []
    np.testing.assert_allclose(value, (logits.argmax(-1) == targets).mean(), rtol=1e-6)


@pytest.mark.parametrize("targets,padded", [
    ([[5, 9, 2, 0, 0], [7, 2, 0, 0, 0], [3, 1, 4, 1, 6]], True),     # Post-padding, 2 of 3 rows.
    ([[0, 0, 5, 9, 2], [0, 0, 0, 7, 2], [3, 1, 4, 1, 6]], True),     # Pre-padding (`pad_sequences`' default).
    ([[5, 9, -100, -100], [7, 2, 4, -100]], True),                    # Any id: Hugging Face's -100.
    ([[1, 1], [2, 2]], True),                                         # One id fills the rows: cannot tell.
    ([[5, 9, 2, 2], [7, 2, 4, 6], [8, 1, 4, 8], [3, 3, 4, 9]], False),  # Doubled ends no other row shares.
    ([[5, 9, 2], [7, 2, 2], [3, 1, 4]], True),
    ([[5, 9, 2], [7, 1, 2], [3, 1, 2]], False),                       # A shared end id, never doubled.
    ([[4], [4]], False),                                              # One step: nothing to compare.
    (np.zeros([0, 5], "int32"), False),                               # No rows.
])
def test_what_looks_padded(targets, padded):
    targets = tf.constant(np.asarray(targets, "int32"))
    if targets.shape[1] >= 2:
        assert bool(_metrics._looks_padded(targets)) is padded
    # Through the metric, with the time size unknown while tracing (the graph's own guard for time < 2).
    metric = tf_seqloss.TokenPerplexity()
    update = _graph_update(metric, input_signature=[
        tf.TensorSpec([None, None], tf.int32), tf.TensorSpec([None, None, 11], tf.float32)])
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        update(targets, tf.zeros(list(targets.shape) + [11]))
        metric.result()
    assert len(_ours(records)) == int(padded)


def test_graph_and_xla_updates_warn_once_when_read_and_never_change_the_value():
    logits, y, _ = _keras_hub_batch(seed=3)
    warned, quiet = tf_seqloss.TokenPerplexity(), tf_seqloss.TokenPerplexity()
    quiet._unmarked_padding.warned = True   # As if it had warned already: its steps trace without the check.
    values = {}
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        for metric in (warned, quiet):
            step, before = _graph_update(metric, jit_compile=True), len(records)
            for part in (slice(0, 4), slice(4, 8)):
                step(y[part], logits[part])
            assert _ours(records[before:]) == []   # Nothing is read back to the host inside the steps.
            values[metric] = [float(metric.result()), float(metric.result())]
            metric.reset_state()
    assert len(_ours(records)) == 1 and "'token_perplexity'" in _ours(records)[0]   # Once, when read.
    assert values[warned] == values[quiet]   # The check adds ops beside the sums, never to them.
    np.testing.assert_allclose(values[warned][0], _exact(logits, y, np.ones(y.shape))[0], rtol=1e-5)
    assert len(warned.variables) == 2   # The check's variable is not one of the metric's saved variables.


STRATEGY_SCRIPT = textwrap.dedent('''
    import json, warnings
    import numpy as np
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

    import tf_seqloss
    from tf_seqloss._keras import keras

    rng = np.random.default_rng(5)
    lengths = np.array([9, 2, 8, 1, 3, 9, 2, 4])
    sample_weight = (np.arange(9) < lengths[:, None]).astype("float32")
    y = (rng.integers(1, 6, size=(8, 9)) * sample_weight).astype("int32")
    logits = rng.normal(size=(8, 9, 6)).astype("float32")
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    with strategy.scope():
        inputs = keras.Input((9, 6))
        model = keras.Model(inputs, keras.layers.Activation("linear")(inputs))
        model.compile(loss=tf_seqloss.SequenceLoss(), metrics=[tf_seqloss.TokenPerplexity(name="ppl")],
                      weighted_metrics=[tf_seqloss.TokenPerplexity(name="w_ppl")])
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        logs = model.evaluate(logits, y, sample_weight=sample_weight, batch_size=4, verbose=0, return_dict=True)
    ours = [str(r.message) for r in records if "without any padding information" in str(r.message)]
    print("RESULTS" + json.dumps(dict(logs={k: float(v) for k, v in logs.items()}, warnings=ours,
                                      y=y.tolist(), logits=logits.tolist(), sample_weight=sample_weight.tolist())))
''')


@pytest.mark.slow
def test_unmarked_padding_warning_and_exact_values_under_a_strategy():
    out = run_script(STRATEGY_SCRIPT, marker="RESULTS", timeout=240)
    logits, y, sample_weight = (np.array(out[key]) for key in ("logits", "y", "sample_weight"))
    np.testing.assert_allclose(out["logs"]["w_ppl"], _exact(logits, y, sample_weight)[0], rtol=1e-5)
    np.testing.assert_allclose(out["logs"]["ppl"], _exact(logits, y, np.ones(y.shape))[0], rtol=1e-5)
    assert len(out["warnings"]) == 1 and "'ppl'" in out["warnings"][0]


# ---- Given hidden states in place of logits (issue 21): refused, or NaN in a graph, never plausible

@pytest.mark.parametrize("cls", [tf_seqloss.TokenPerplexity, tf_seqloss.TokenAccuracy])
def test_hidden_states_narrower_than_the_ids_are_refused_naming_y_pred(cls):
    hidden = np.random.default_rng(0).normal(size=(2, 3, 8)).astype("float32")   # width 8, ids up to 49
    targets = np.array([[1, 49, 3], [7, 2, 0]])
    with pytest.raises(ValueError, match=r"Invalid value for argument `y_pred`.*largest id of `y_true` \(49\)"
                                         r".*Received: y_pred=a tensor of shape \(2, 3, 8\)"):
        cls().update_state(targets, hidden)
    with pytest.raises(ValueError, match=r"Invalid value for argument `y_pred`.*rank 3.*shape \(2, 3\)"):
        cls().update_state(targets, hidden[..., 0])


@pytest.mark.parametrize("cls", [tf_seqloss.TokenPerplexity, tf_seqloss.TokenAccuracy])
def test_ids_past_the_classes_at_padding_only_are_accepted(cls):
    # Padding written as id `classes` (a common convention) with weight 0 is not an error.
    logits, targets, mask = _data()
    padded = np.where(mask > 0, targets, VOCAB)
    metric = cls()
    metric.update_state(padded, logits, sample_weight=mask)
    expected = _exact(logits, targets, mask)[0 if cls is tf_seqloss.TokenPerplexity else 1]
    np.testing.assert_allclose(float(metric.result()), expected, rtol=1e-5)


@pytest.mark.parametrize("jit_compile", [False, True])
@pytest.mark.parametrize("cls", [tf_seqloss.TokenPerplexity, tf_seqloss.TokenAccuracy])
def test_ids_past_the_classes_in_a_graph_give_nan(cls, jit_compile):
    metric = cls()
    hidden = np.random.default_rng(1).normal(size=(2, 3, 8)).astype("float32")
    targets = np.array([[1, 3, 5], [7, 2, 0]])
    targets_past = np.array([[1, 49, 5], [7, 2, 0]])

    @tf.function(jit_compile=jit_compile)
    def update(y_true, y_pred):
        metric.update_state(y_true, y_pred)

    update(tf.constant(targets), tf.constant(hidden))
    assert np.isfinite(float(metric.result()))
    update(tf.constant(targets_past), tf.constant(hidden))   # One token past the classes: the epoch is NaN.
    assert np.isnan(float(metric.result()))


# ---- From the fused head: `linear_sequence_loss(..., return_token_stats=True)`, no logits

FUSED_FEATURES, FUSED_CLASSES = 5, 13


def _fused_data(seed, batch=4, time=6):
    rng = np.random.default_rng(seed)
    hidden = rng.normal(size=(batch, time, FUSED_FEATURES)).astype("float32")
    kernel = rng.normal(size=(FUSED_FEATURES, FUSED_CLASSES)).astype("float32")
    kernel[:, 7] = kernel[:, 2]   # Classes 2 and 7 tie at every token: argmax takes the lowest id, 2.
    kernel[:, 11] = kernel[:, 4]
    bias = np.zeros(FUSED_CLASSES, "float32")
    lengths = rng.integers(1, time + 1, size=batch)
    mask = (np.arange(time) < lengths[:, None]).astype("float64")
    logits = hidden.astype("float64") @ kernel.astype("float64")
    predicted = logits.argmax(-1)
    # Targets: half the tokens at the predicted class, so that accuracy is far from 0 and from 1.
    targets = np.where(rng.random(mask.shape) < 0.5, predicted, rng.integers(0, FUSED_CLASSES, size=mask.shape))
    return hidden, kernel, bias, targets.astype("int32"), lengths, mask, logits


@pytest.mark.parametrize("mode", ["eager", "function", "xla"])
def test_token_stats_match_numpy_float64_on_the_materialised_logits(mode):
    hidden, kernel, bias, targets, lengths, mask, logits = _fused_data(0)
    # Tied maxima occur (at class 2 = 7 or 4 = 11), and NumPy's rule picks the lower id.
    assert (logits[..., 2] == logits[..., 7]).all() and np.isin(logits.argmax(-1), [2, 4]).any()

    def run(hidden, kernel, bias, targets):
        # Label smoothing and z-loss change the loss, not the stats (plain cross-entropy).
        return tf_seqloss.linear_sequence_loss(hidden, kernel, targets, bias=bias, lengths=lengths, chunk_size=4,
                                               label_smoothing=0.1, z_loss=1e-3, return_token_stats=True)

    if mode != "eager":
        run = tf.function(run, jit_compile=mode == "xla")
    loss, stats = run(hidden, kernel, bias, targets)
    assert isinstance(stats, tf_seqloss.TokenStats)
    expected_loss = reference.sequence_loss(logits, targets, mask, label_smoothing=0.1, z_loss=1e-3)
    np.testing.assert_allclose(float(loss), expected_loss, rtol=1e-5)
    ce = reference.token_cross_entropy(logits, targets)
    np.testing.assert_array_equal(stats.predictions.numpy(), np.where(mask > 0, logits.argmax(-1), 0))
    np.testing.assert_allclose(stats.cross_entropy.numpy(), mask * ce, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(stats.weights.numpy(), mask)
    np.testing.assert_array_equal(stats.targets.numpy(), targets)


@pytest.mark.parametrize("mode", ["eager", "function", "xla"])
def test_token_stats_break_ties_at_the_lowest_id_over_many_classes_and_predict_no_class_at_nan(mode):
    # Each token's hidden state is one-hot, so its logits are one row of small integers: most tokens
    # have several tied maxima, spread over 3001 classes (several class slices, several chunks).
    classes, features, batch, time = 3001, 16, 3, 7
    rng = np.random.default_rng(5)
    kernel = rng.integers(1, 5, size=(features, classes)).astype("float32")
    rows = rng.integers(0, features, size=(batch, time))
    hidden = np.eye(features, dtype="float32")[rows]
    lengths = np.array([7, 5, 6])
    mask = np.arange(time) < lengths[:, None]
    hidden[0, 2] = np.nan                     # a real token: NaN logits
    hidden[1, 1] = np.inf                     # a real token: +inf logits (kernel entries are positive)
    hidden[2, 3] = -np.inf                    # a real token: every logit -inf
    hidden[1, 6] = np.nan                     # padding: must not matter
    targets = rng.integers(0, classes, size=(batch, time)).astype("int32")
    logits = np.nan_to_num(hidden.astype("float64"), nan=0.0, posinf=0.0, neginf=0.0) @ kernel.astype("float64")
    expected = np.where(mask, logits.argmax(-1), 0)
    expected[0, 2] = expected[1, 1] = expected[2, 3] = classes  # no class where the log-sum-exp is NaN
    assert (np.sort(logits, -1)[..., -1] == np.sort(logits, -1)[..., -2]).mean() > 0.5  # ties are common
    assert expected[mask].max() > classes // 2  # maxima not all at low ids

    def run(hidden, kernel, targets):
        return tf_seqloss.linear_sequence_loss(hidden, kernel, targets, lengths=lengths, chunk_size=4,
                                               return_token_stats=True)[1].predictions

    if mode != "eager":
        run = tf.function(run, jit_compile=mode == "xla")
    np.testing.assert_array_equal(run(hidden, kernel, targets).numpy(), expected)


XLA_TEMP_SCRIPT = textwrap.dedent('''
    import glob, json, os, re, tempfile
    dump = tempfile.mkdtemp()
    os.environ["XLA_FLAGS"] = f"--xla_dump_to={dump}"  # read when XLA first compiles
    import tensorflow as tf
    import tf_seqloss

    hidden = tf.random.normal([4, 64, 32])
    kernel = tf.random.normal([32, 4099])
    targets = tf.zeros([4, 64], tf.int32)

    def step(stats):
        with tf.GradientTape() as tape:
            tape.watch([hidden, kernel])
            out = tf_seqloss.linear_sequence_loss(hidden, kernel, targets, chunk_size=64,
                                                  return_token_stats=stats)
            loss = out[0] if stats else out
        return tape.gradient(loss, [hidden, kernel]), (out[1].predictions if stats else loss)

    @tf.function(jit_compile=True)
    def step_with_stats():
        return step(True)

    @tf.function(jit_compile=True)
    def step_without_stats():
        return step(False)

    temp = {}
    for name, fn in (("with_stats", step_with_stats), ("without_stats", step_without_stats)):
        fn()
        [path] = glob.glob(os.path.join(dump, f"*step_{name}_*buffer-assignment.txt"))
        temp[name] = int(re.search(r"size (\\d+), preallocated-temp", open(path).read()).group(1))
    print("RESULT " + json.dumps(temp))
''')


def test_token_stats_under_xla_hold_no_buffer_of_a_chunk_by_the_classes():
    # The argmax and cross-entropy per token are reductions of the chunk's logits: under XLA they add
    # well under one `[chunk, classes]` buffer (64 x 4099 x 4 bytes) to the step's temporaries. Before
    # XLA's ArgMax was used there, the explicit lowest-id rule made XLA on CPU write an int32 one.
    # XLA's buffer assignment of each compiled step is read from its dump, in a child process.
    chunk_buffer = 64 * 4099 * 4
    temp = run_script(XLA_TEMP_SCRIPT, marker="RESULT ", timeout=240)
    extra = temp["with_stats"] - temp["without_stats"]
    assert extra < chunk_buffer // 4, (extra, chunk_buffer)


def test_metrics_from_token_stats_are_exact_over_uneven_batches():
    perplexity, accuracy = tf_seqloss.TokenPerplexity(), tf_seqloss.TokenAccuracy()
    pooled = []
    for seed, (batch, time) in enumerate([(4, 6), (1, 9), (3, 2)]):
        hidden, kernel, bias, targets, lengths, mask, logits = _fused_data(seed, batch, time)
        kernel = _fused_data(0)[1]   # One head over the epoch.
        logits = hidden.astype("float64") @ kernel.astype("float64")
        _, stats = tf_seqloss.linear_sequence_loss(hidden, kernel, targets, lengths=lengths,
                                                   return_token_stats=True)
        for metric in (perplexity, accuracy):
            metric.update_from_token_stats(stats)
        pooled.append((reference.token_cross_entropy(logits, targets)[mask > 0],
                       (logits.argmax(-1) == targets)[mask > 0]))
    ce = np.concatenate([c for c, _ in pooled])
    correct = np.concatenate([c for _, c in pooled])
    np.testing.assert_allclose([float(perplexity.result()), float(accuracy.result())],
                               [np.exp(ce.mean()), correct.mean()], rtol=1e-5)
    assert 0.2 < correct.mean() < 0.9


def test_token_stats_with_an_id_past_the_classes_give_nan_and_bad_stats_are_refused():
    hidden, kernel, _, targets, lengths, mask, _ = _fused_data(3)
    targets = targets.copy()
    targets[0, 0] = FUSED_CLASSES   # a real token (every row has length >= 1)
    _, stats = tf_seqloss.linear_sequence_loss(hidden, kernel, targets, lengths=lengths, return_token_stats=True)
    for cls in (tf_seqloss.TokenPerplexity, tf_seqloss.TokenAccuracy):
        metric = cls()
        metric.update_from_token_stats(stats)
        assert np.isnan(float(metric.result()))
        with pytest.raises(TypeError, match="Invalid value for argument `stats`"):
            metric.update_from_token_stats((1, 2))
    with pytest.raises(TypeError, match="Invalid value for argument `return_token_stats`"):
        tf_seqloss.linear_sequence_loss(hidden, kernel, targets, return_token_stats="yes")


# ---- `FusedLinearHead(token_metrics=True)`: the metrics in `fit`'s history and in a custom loop

HEAD_SCRIPT = textwrap.dedent('''
    import json, sys
    import numpy as np
    import tensorflow as tf

    devices = int(sys.argv[1]) if len(sys.argv) > 1 else 1
    if devices > 1:
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * devices)

    import tf_seqloss
    from tf_seqloss._keras import keras

    VOCAB, TIME, FEATURES = 11, 6, 4
    rng = np.random.default_rng(0)
    lengths = np.array([6, 1, 5, 4, 2, 6, 3, 1])   # Batches of 3, 3, 2 rows: 12, 12 and 4 tokens.
    mask = np.arange(TIME) < lengths[:, None]
    tokens = rng.integers(1, VOCAB, size=mask.shape).astype("int32")
    targets = (rng.integers(1, VOCAB, size=mask.shape) * mask).astype("int32")

    def build():
        tokens_in, targets_in = keras.Input((TIME,), dtype="int32"), keras.Input((TIME,), dtype="int32")
        normal = keras.initializers.RandomNormal(stddev=1.0, seed=1)
        hidden = keras.layers.Embedding(VOCAB, FEATURES, embeddings_initializer=normal)(tokens_in)
        head = tf_seqloss.FusedLinearHead(VOCAB, padding_id=0, token_metrics=True, kernel_initializer=normal,
                                          normalizer="global")
        return keras.Model([tokens_in, targets_in], head(hidden, targets_in)), head

    strategy = tf.distribute.MirroredStrategy([f"/cpu:{i}" for i in range(devices)]) if devices > 1 else None
    with strategy.scope() if strategy else tf.init_scope():
        model, head = build()
        model.compile(optimizer=keras.optimizers.SGD(0.0))   # Fixed weights: every epoch sees one model.
    history = model.fit([tokens, targets], None, batch_size=4 if strategy else 3, epochs=2, verbose=0,
                        shuffle=False)
    embedding = model.layers[1].get_weights()[0]
    out = dict(history={k: [float(v) for v in vs] for k, vs in history.history.items()},
               hidden=embedding[tokens].tolist(), kernel=head.kernel.numpy().tolist(),
               bias=head.bias.numpy().tolist(), targets=targets.tolist(), mask=mask.tolist())
    if strategy is None:   # A custom loop: the layer's metrics, read and reset by hand.
        head.token_accuracy.reset_state()
        head.token_perplexity.reset_state()
        for part in (slice(0, 5), slice(5, 8)):
            model([tokens[part], targets[part]])
        out["loop"] = [float(head.token_perplexity.result()), float(head.token_accuracy.result())]
    print("RESULTS" + json.dumps(out))
''')


def _head_reference(out):
    logits = np.array(out["hidden"]) @ np.array(out["kernel"]) + np.array(out["bias"])
    targets, mask = np.array(out["targets"]), np.array(out["mask"], "float64")
    return _exact(logits, targets, mask)


def _run_head_script(devices):
    # `run_script` takes no arguments for the child; the device count is one.
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-c", HEAD_SCRIPT, str(devices)], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    line = [line for line in done.stdout.splitlines() if line.startswith("RESULTS")][-1]
    return json.loads(line[len("RESULTS"):])


def test_fused_head_token_metrics_in_fit_history_and_a_custom_loop_are_exact():
    # In a child: the flavour (Keras 3 or tf_keras) is the environment's, as for the parent.
    out = _run_head_script(1)
    expected = _head_reference(out)
    history = out["history"]
    for epoch in range(2):   # Reset between epochs; exact over uneven batches (not a mean of batch values).
        np.testing.assert_allclose([history["token_perplexity"][epoch], history["token_accuracy"][epoch]],
                                   expected, rtol=1e-5)
    np.testing.assert_allclose(out["loop"], expected, rtol=1e-5)
    assert 0.0 < expected[1] < 1.0


@pytest.mark.slow
def test_fused_head_token_metrics_under_a_strategy_equal_one_device():
    single, mirrored = _run_head_script(1), _run_head_script(2)
    expected = _head_reference(mirrored)
    np.testing.assert_allclose(mirrored["history"]["token_perplexity"], [expected[0]] * 2, rtol=1e-5)
    np.testing.assert_allclose(mirrored["history"]["token_accuracy"], [expected[1]] * 2, rtol=1e-5)
    np.testing.assert_allclose(mirrored["history"]["token_perplexity"], single["history"]["token_perplexity"],
                               rtol=1e-5)


def test_fused_head_token_metrics_config_and_keras_file():
    head = tf_seqloss.FusedLinearHead(VOCAB, padding_id=0, token_metrics=True)
    assert head.get_config()["token_metrics"] is True
    assert "token_metrics" not in tf_seqloss.FusedLinearHead(VOCAB).get_config()   # older configs unchanged
    with pytest.raises(TypeError, match="Invalid value for argument `token_metrics`"):
        tf_seqloss.FusedLinearHead(VOCAB, token_metrics="yes")
    tokens_in, targets_in = keras.Input((TIME,), dtype="int32"), keras.Input((TIME,), dtype="int32")
    hidden = keras.layers.Embedding(VOCAB, 3)(tokens_in)
    model = keras.Model([tokens_in, targets_in], head(hidden, targets_in))
    model.compile(optimizer="sgd")
    _, targets, _ = _data()
    logs = model.evaluate([targets, targets], None, verbose=0, return_dict=True)
    path = os.path.join(tempfile.mkdtemp(), "trainer.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    reloaded = loaded.evaluate([targets, targets], None, verbose=0, return_dict=True)
    np.testing.assert_allclose([reloaded["token_perplexity"], reloaded["token_accuracy"]],
                               [logs["token_perplexity"], logs["token_accuracy"]], rtol=1e-6)
