"""The fused formulations against the NumPy float64 reference (`tests/reference.py`).

Every fast path must give the exact values and gradients to the tolerance of its dtype, in every dtype, for
int32 and int64 ids, with and without label smoothing, with out-of-range ids, eagerly, in a `tf.function`
with `None` sizes and under XLA; a numerical gradient checks the formulation as well. The expected values
come from NumPy, not from `implementation="reference"`, which shares the weighting and padding code with
the fast paths. Speed and memory are measured by `benchmarks/run.py`, not here.
"""

import functools
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import tensorflow as tf

import tf_seqloss
from tests import reference
from tests.graph_checks import on_a_machine
from tf_seqloss import _cross_entropy as _xent
from tf_seqloss import _fused

FAST = ("fused", "fused_xla")
DTYPES = (tf.float32, tf.float64, tf.float16, tf.bfloat16)
# Against float64: losses to float32 arithmetic for half logits (computed in float32 from the half values);
# gradients are returned in the logits' dtype, so they carry one rounding to it (half: 2**-11, 2**-8).
LOSS_TOL = {tf.float64: 1e-12, tf.float32: 5e-6, tf.float16: 5e-6, tf.bfloat16: 5e-6}
GRAD_TOL = {tf.float64: 1e-12, tf.float32: 2e-6, tf.float16: 1e-3, tf.bfloat16: 8e-3}


def _param_id(value):
    return getattr(value, "name", str(value))


def _inputs(shape, dtype=tf.float32, id_dtype=tf.int32, seed=0, out_of_range=False, scale=3.0):
    rng = np.random.default_rng(seed)
    classes = shape[-1]
    logits = tf.cast(rng.normal(size=shape) * scale, dtype)
    ids = rng.integers(0, classes, size=shape[:-1])
    if out_of_range:
        flat = ids.reshape(-1)
        flat[::3] = rng.choice([-1, -100, classes, classes + 7], size=flat[::3].shape)
    return logits, tf.constant(ids, id_dtype)


def _loss_and_grad(logits, ids, implementation, label_smoothing=0.0):
    """Per-position loss, validity, and the gradient of a weighted sum of the losses.

    Out-of-range ids get weight 0 (padding), so they must be ignored; their validity is computed here.
    """
    valid = tf.logical_and(ids >= 0, ids < tf.cast(tf.shape(logits)[-1], ids.dtype))
    weights = tf.cast(valid, tf.float64 if logits.dtype == tf.float64 else tf.float32)
    with tf.GradientTape() as tape:
        tape.watch(logits)
        loss = _xent.sparse_cross_entropy(logits, ids, weights, label_smoothing=label_smoothing,
                                          implementation=implementation)
        # Uneven upstream gradients, so that a gradient that ignored them would be caught.
        upstream = tf.cast(tf.range(1, tf.size(loss) + 1), loss.dtype) / tf.cast(tf.size(loss), loss.dtype)
        total = tf.reduce_sum(loss * tf.reshape(upstream, tf.shape(loss)))
    return loss, valid, tape.gradient(total, logits)


def _expected(logits, ids, label_smoothing=0.0):
    """What `_loss_and_grad` must return, in NumPy float64 from the logits' own values."""
    logits = np.asarray(tf.cast(logits, tf.float64))
    ids = np.asarray(ids)
    classes = logits.shape[-1]
    valid = (ids >= 0) & (ids < classes)
    safe = np.where(valid, ids, 0)
    loss = np.where(valid, reference.token_cross_entropy(logits, safe, label_smoothing), 0.0)
    target = np.eye(classes)[safe] * (1 - label_smoothing) + label_smoothing / classes
    upstream = (np.arange(1, loss.size + 1) / loss.size).reshape(loss.shape) * valid
    return loss, valid, (np.exp(reference.log_softmax(logits)) - target) * upstream[..., None]


def _assert_same(fast, expected, dtype):
    """`fast` is `_loss_and_grad`'s result for `dtype` logits, `expected` `_expected`'s."""
    (loss, valid, grad), (ref_loss, ref_valid, ref_grad) = fast, expected
    assert loss.dtype == (tf.float32 if dtype in (tf.float16, tf.bfloat16) else dtype) and grad.dtype == dtype
    np.testing.assert_array_equal(valid, ref_valid)
    assert np.all(np.isfinite(loss.numpy())) and np.all(np.isfinite(tf.cast(grad, tf.float64).numpy()))
    tol = LOSS_TOL[dtype]
    np.testing.assert_allclose(loss, ref_loss, rtol=tol, atol=tol)
    tol = GRAD_TOL[dtype]
    np.testing.assert_allclose(tf.cast(grad, tf.float64), ref_grad, rtol=tol, atol=tol)


@pytest.mark.parametrize("implementation", FAST)
@pytest.mark.parametrize("dtype,id_dtype", [(tf.float32, tf.int32), (tf.float64, tf.int64),
                                            (tf.float16, tf.int64), (tf.bfloat16, tf.int32)],
                         ids=_param_id)
@pytest.mark.parametrize("label_smoothing", (0.0, 0.2))
def test_equals_reference_eagerly(implementation, dtype, id_dtype, label_smoothing):
    logits, ids = _inputs((3, 4, 11), dtype, id_dtype)
    _assert_same(_loss_and_grad(logits, ids, implementation, label_smoothing),
                 _expected(logits, ids, label_smoothing), dtype)


@pytest.mark.parametrize("implementation", FAST)
def test_out_of_range_ids_at_zero_weight_are_ignored(implementation, label_smoothing=0.3):
    logits, ids = _inputs((4, 6, 9), out_of_range=True)
    fast = _loss_and_grad(logits, ids, implementation, label_smoothing)
    assert not np.all(fast[1].numpy()) and np.any(fast[1].numpy())
    _assert_same(fast, _expected(logits, ids, label_smoothing), tf.float32)


@pytest.mark.parametrize("implementation", FAST)
@pytest.mark.parametrize("dtype,label_smoothing", [(tf.float32, 0.1), (tf.float16, 0.0)], ids=_param_id)
def test_equals_reference_in_a_function_with_unknown_sizes(implementation, dtype, label_smoothing):
    signature = (tf.TensorSpec([None, None, None], dtype), tf.TensorSpec([None, None], tf.int64))

    def run(impl):
        return tf.function(lambda logits, ids: _loss_and_grad(logits, ids, impl, label_smoothing),
                           input_signature=signature)

    fast = run(implementation)
    for shape in [(2, 3, 7), (3, 5, 13)]:
        logits, ids = _inputs(shape, dtype, tf.int64, seed=shape[1], out_of_range=True)
        _assert_same(fast(logits, ids), _expected(logits, ids, label_smoothing), dtype)


# Under XLA every fast choice (and "auto" on CPU) is the same traced formulation, so one dtype each.
@pytest.mark.parametrize("implementation,dtype,label_smoothing", [
    ("fused", tf.float32, 0.25), ("fused_xla", tf.float32, 0.0), ("auto", tf.float32, 0.25),
    ("fused", tf.bfloat16, 0.0), ("fused", tf.float64, 0.1)], ids=_param_id)
def test_equals_reference_under_xla(implementation, dtype, label_smoothing):
    def run(impl):
        return tf.function(lambda logits, ids: _loss_and_grad(logits, ids, impl, label_smoothing),
                           jit_compile=True)

    logits, ids = _inputs((3, 5, 17), dtype, out_of_range=True)
    _assert_same(run(implementation)(logits, ids), _expected(logits, ids, label_smoothing), dtype)


@pytest.mark.parametrize("implementation", FAST)
def test_equals_numpy_float64_for_any_leading_rank(implementation):
    # [batch, time, beam, classes]: the formulation flattens every leading axis.
    logits, ids = _inputs((2, 3, 2, 6), tf.float64, scale=10.0)
    label_smoothing = 0.15
    loss, valid, grad = _loss_and_grad(logits, ids, implementation, label_smoothing)
    expected = reference.token_cross_entropy(logits.numpy(), ids.numpy(), label_smoothing)
    np.testing.assert_allclose(loss, expected, rtol=1e-12, atol=1e-12)
    probs = np.exp(reference.log_softmax(logits.numpy()))
    target = np.eye(6)[ids.numpy()] * (1 - label_smoothing) + label_smoothing / 6
    upstream = (np.arange(1, loss.numpy().size + 1) / loss.numpy().size).reshape(loss.shape)
    np.testing.assert_allclose(grad, (probs - target) * upstream[..., None], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("implementation", FAST)
@pytest.mark.parametrize("label_smoothing", (0.0, 0.2))
def test_gradient_matches_finite_differences(implementation, label_smoothing):
    logits, ids = _inputs((2, 3, 5), tf.float64, scale=1.0)

    def loss(logits):
        return _xent.sparse_cross_entropy(logits, ids, label_smoothing=label_smoothing,
                                          implementation=implementation)

    theoretical, numerical = tf.test.compute_gradient(loss, [logits])
    np.testing.assert_allclose(theoretical[0], numerical[0], rtol=1e-7, atol=1e-7)


@pytest.mark.parametrize("implementation", FAST)
def test_label_smoothing_may_be_a_tensor(implementation):
    logits, ids = _inputs((2, 4, 8))
    smoothing = tf.constant(0.3)
    _assert_same(_loss_and_grad(logits, ids, implementation, smoothing), _expected(logits, ids, 0.3), tf.float32)


@pytest.mark.parametrize("implementation", FAST)
def test_large_logits_neither_overflow_nor_lose_the_gradient(implementation):
    # exp(logits) overflows float32 past 88 and float16 logits reach 65504: both paths subtract the max.
    logits = tf.constant([[[60000.0, 0.0, -60000.0], [1e4, 1e4 + 1.0, 1e4 - 1.0]]], tf.float16)
    ids = tf.constant([[2, 1]])
    _assert_same(_loss_and_grad(logits, ids, implementation), _expected(logits, ids), tf.float16)


@pytest.mark.parametrize("implementation", FAST)
@pytest.mark.parametrize("gap", [30.0, 85.0, 200.0])
def test_rows_whose_maximum_far_exceeds_the_target_logit(implementation, gap):
    # The fast paths shift each row by its target logit unless that overflows `exp` (float32: a gap
    # above ~80), and then by its maximum; either way the result must be the reference's.
    logits, ids = _inputs((2, 3, 40), scale=1.0)
    logits = tf.tensor_scatter_nd_add(logits, [[0, 1, 7], [1, 2, 3]], [gap, gap])
    for label_smoothing in (0.0, 0.1):
        _assert_same(_loss_and_grad(logits, ids, implementation, label_smoothing),
                     _expected(logits, ids, label_smoothing), tf.float32)

    # A small upstream gradient must not underflow on the way (e.g. into `upstream / sum_exp`).
    with tf.GradientTape() as tape:
        tape.watch(logits)
        total = tf.reduce_sum(_xent.sparse_cross_entropy(logits, ids, implementation=implementation)) * 1e-25
    expected = np.exp(reference.log_softmax(logits.numpy())) - np.eye(40)[ids.numpy()]
    np.testing.assert_allclose(tape.gradient(total, logits) * 1e25, expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("implementation", FAST)
def test_sequence_loss_keeps_its_semantics_on_the_fast_paths(implementation):
    # Invalid ids where the weight is zero are ignored; where it is not, the loss is NaN.
    logits, _ = _inputs((2, 4, 6))
    ids = tf.constant([[1, 2, 6, -1], [0, 5, 3, -100]])

    def run(**kwargs):
        with tf.GradientTape() as tape:
            tape.watch(logits)
            loss = tf_seqloss.sequence_loss(logits, ids, implementation=implementation, label_smoothing=0.1,
                                            **kwargs)
        return loss, tape.gradient(loss, logits)

    def expected(lengths, **flags):
        # NumPy float64 on safe ids; then NaN in every result that an invalid weighted id reaches, and in
        # that token's gradient (the NaN factor is on its loss alone, so the other tokens' gradients stay).
        mask = np.arange(4)[None, :] < np.asarray(lengths)[:, None]
        valid = (ids.numpy() >= 0) & (ids.numpy() < 6)
        safe = np.where(valid, ids.numpy(), 0)
        loss = reference.sequence_loss(logits.numpy(), safe, mask, label_smoothing=0.1, **flags)
        grad = reference.sequence_loss_grad(logits.numpy(), safe, mask, label_smoothing=0.1, **flags)
        poisoned = mask & ~valid
        loss = np.where(poisoned.any(axis=tuple(range(poisoned.ndim - np.ndim(loss), poisoned.ndim))), np.nan, loss)
        return loss, np.where(poisoned[..., None], np.nan, grad)

    for kwargs in (dict(lengths=[2, 2]), dict(average_across_batch=False, lengths=[3, 2])):
        (loss, grad), (ref_loss, ref_grad) = run(**kwargs), expected(**kwargs)
        assert np.isnan(ref_loss).any() == ("average_across_batch" in kwargs)
        np.testing.assert_allclose(loss, ref_loss, rtol=1e-6, atol=1e-7)  # NaN exactly where NumPy has NaN
        np.testing.assert_allclose(grad, ref_grad, rtol=1e-6, atol=1e-7)
    assert np.isnan(run(lengths=[3, 3])[0].numpy())


def _while_tracing(fn, jit_compile):
    """Returns what `fn()` returns while a `tf.function` is being traced."""
    seen = []
    tf.function(lambda: seen.append(fn()) or tf.constant(0), jit_compile=jit_compile)()
    return seen[0]


# What `"auto"` stands for, as a function of the call alone: (classes, rows, traced under XLA) -> choice on a
# CPU-only machine. Written out, not derived from the code (benchmarks/README.md has the figures).
_AUTO_ON_CPU = [
    ((32000, 2048, False), "fused_xla"),  # static sizes: kernels compiled for this shape
    ((4000, 1, False), "fused_xla"),
    ((1024, 10**6, False), "fused_xla"),
    ((32000, None, False), "fused"),  # sizes unknown while tracing: nothing compiled per shape
    ((1023, 2048, False), "reference"),  # below MIN_CLASSES_FOR_KERNELS
    ((1023, None, False), "reference"),
    ((None, 2048, False), "reference"),  # unknown number of classes
    ((None, None, False), "reference"),
    ((32000, 2048, True), "fused"),  # inside XLA, at every size
    ((32000, None, True), "fused"),
    ((100, 2048, True), "fused"),
    ((None, None, True), "fused"),
]


def _auto_on_cpu(classes, rows, xla):
    call = lambda: _xent.choose_implementation("auto", classes, rows=rows)  # noqa: E731
    return _while_tracing(call, jit_compile=True) if xla else call()


def test_auto_is_a_function_of_the_call_on_a_cpu_only_machine():
    with on_a_machine(gpu=False):
        assert [_auto_on_cpu(*call) for call, _ in _AUTO_ON_CPU] == [want for _, want in _AUTO_ON_CPU]
        # Traced, static sizes take the plain ops too: in a training step they run in the logits' buffer.
        assert _while_tracing(lambda: _xent.choose_implementation("auto", 32000, rows=2048),
                              jit_compile=False) == "fused"
        assert _while_tracing(lambda: _xent.choose_implementation("auto", 32000), jit_compile=False) == "fused"
        # Except half-precision logits with static sizes: their plain ops hold float32 copies, the kernels not.
        for dtype, want in ((tf.bfloat16, "fused_xla"), (tf.float16, "fused_xla"), (tf.float64, "fused")):
            static = functools.partial(_xent.choose_implementation, "auto", 32000, rows=2048, dtype=dtype)
            unknown = functools.partial(_xent.choose_implementation, "auto", 32000, dtype=dtype)
            assert _while_tracing(static, jit_compile=False) == want
            assert _while_tracing(unknown, jit_compile=False) == "fused"
    assert _xent.MIN_CLASSES_FOR_KERNELS == 1024


def test_auto_keeps_the_reference_when_an_accelerator_is_visible():
    with on_a_machine(gpu=True):
        for (classes, rows, xla), _ in _AUTO_ON_CPU:
            assert _auto_on_cpu(classes, rows, xla) == "reference"
    for name in ("reference", "fused", "fused_xla"):
        assert _xent.choose_implementation(name, 32000) == name
        assert _xent.choose_implementation(name, None, rows=None) == name


def test_auto_does_not_depend_on_earlier_calls():
    # The rule once gave compiled kernels to the first four static shapes seen per number of classes only.
    # 5003 classes: a number no other test uses. Eight shapes in turn, many others, then the eight again in
    # the other order, and the table: every call gets the same choice as on its own.
    shapes = range(7, 15)
    with on_a_machine(gpu=False):
        first = [_xent.choose_implementation("auto", 5003, rows=rows) for rows in shapes]
        for rows in range(100, 140):
            _xent.choose_implementation("auto", 5003, rows=rows)
        again = [_xent.choose_implementation("auto", 5003, rows=rows) for rows in reversed(shapes)][::-1]
        table = [_auto_on_cpu(*call) for call, _ in reversed(_AUTO_ON_CPU)][::-1]
    assert first == again == ["fused_xla"] * len(shapes)
    assert table == [want for _, want in _AUTO_ON_CPU]


def _traced_op_types(classes, time, implementation="auto"):
    """The op types of a forward + backward trace of `sequence_loss` at a static `[2, time, classes]`."""
    @tf.function
    def step(logits, targets):
        with tf.GradientTape() as tape:
            tape.watch(logits)
            loss = tf_seqloss.sequence_loss(logits, targets, implementation=implementation)
        return loss, tape.gradient(loss, logits)

    graph = step.get_concrete_function(tf.TensorSpec([2, time, classes]), tf.TensorSpec([2, time], tf.int32)).graph
    return sorted(op.type for op in graph.get_operations())


def test_a_traced_graph_does_not_depend_on_what_was_traced_before():
    # Traced only, never run: nothing is compiled. 1031 classes: a number no other test uses, so the first
    # trace is the first this process makes at this number of classes.
    with on_a_machine(gpu=False):
        first = _traced_op_types(1031, 3)
        for time in range(4, 12):
            _traced_op_types(1031, time)
        later = _traced_op_types(1031, 12)
        kernels, plain = _traced_op_types(1031, 12, "fused_xla"), _traced_op_types(1031, 12, "fused")
    assert kernels != plain
    assert first == later == plain  # traced: the plain ops, whatever came before


@pytest.mark.parametrize("jit_compile", [False, True])
def test_auto_with_none_sizes_equals_numpy_float64(jit_compile):
    logits, targets = _inputs((3, 5, 1500))
    lengths = tf.constant([5, 2, 0])
    spec = [tf.TensorSpec([None, None, 1500]), tf.TensorSpec([None, None], tf.int32), tf.TensorSpec([None], tf.int32)]

    def run(implementation):
        @tf.function(input_signature=spec, jit_compile=jit_compile)
        def step(logits, targets, lengths):
            with tf.GradientTape() as outer:
                outer.watch(logits)
                with tf.GradientTape() as inner:
                    inner.watch(logits)
                    loss = tf_seqloss.sequence_loss(logits, targets, lengths=lengths, implementation=implementation)
                grad = inner.gradient(loss, logits)
                hvp_seed = tf.reduce_sum(grad * tf.sin(logits))
            return loss, grad, outer.gradient(hvp_seed, logits)
        return step(logits, targets, lengths)

    # NumPy float64: the token mean over the 7 real tokens, its gradient `w (p - y) / sum(w)`, and the
    # Hessian-vector product of that gradient with `sin(logits)`: `w / sum(w) * (p * (s - p.s) + (p - y) cos z)`.
    z = logits.numpy().astype(np.float64)
    weights = (np.arange(5)[None, :] < lengths.numpy()[:, None]).astype(np.float64)
    p = np.exp(reference.log_softmax(z))
    scale = (weights / weights.sum())[..., None]
    s, y = np.sin(z), np.eye(1500)[targets.numpy()]
    hvp = scale * (p * (s - (p * s).sum(-1, keepdims=True)) + (p - y) * np.cos(z))
    expected = (reference.sequence_loss(z, targets.numpy(), weights),
                reference.sequence_loss_grad(z, targets.numpy(), weights), hvp)
    for name, got, want in zip(("loss", "gradient", "hvp"), run("auto"), expected):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7, err_msg=name)


def test_xla_compilation_is_detected_only_inside_a_jit_compiled_function():
    assert not _fused.in_xla_compilation()
    assert not _while_tracing(_fused.in_xla_compilation, jit_compile=False)
    assert _while_tracing(_fused.in_xla_compilation, jit_compile=True)


def _run_benchmark(script, out, *args, stem="results", plot="plot.png"):
    """Runs `benchmarks/<script>` writing to `out`; returns the rows of its `<stem>.json`."""
    pytest.importorskip("matplotlib")
    root = Path(__file__).resolve().parents[1]
    command = [sys.executable, str(root / "benchmarks" / script), *args, "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert (out / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return json.loads((out / f"{stem}.json").read_text())["rows"]


@pytest.mark.slow
@pytest.mark.keras
def test_benchmark_harness_runs_end_to_end(tmp_path):
    rows = _run_benchmark("run.py", tmp_path, "--shapes", "2x3x5,2x3x9", "--modes", "eager,function",
                          "--implementations", "auto", "--peers", "tf.nn,keras", "--repeats", "2", "--warmup", "1",
                          "--no-progress")
    assert {(row["entry"], row["mode"]) for row in rows} == {
        (entry, mode) for entry in ("tf_seqloss", "tf.nn", "keras")
        for mode in ("eager", "function")}
    for row in rows:
        assert "error" not in row, row
        # Every entry computes the same masked mean, checked against NumPy float64 by the harness.
        assert row["loss_error"] < 1e-5 and row["grad_error"] < 1e-6
        assert row["median_s"] > 0 and row["x_floor"] > 0 and row["x_best_peer"] > 0
    table = (tmp_path / "results.md").read_text()
    assert "| 2x3x9 | float32 | tf_seqloss | function |" in table


@pytest.mark.slow
def test_xla_floor_harness_runs_end_to_end(tmp_path):
    rows = _run_benchmark("xla_floor.py", tmp_path, "--shape", "2x3x9", "--repeats", "2", "--warmup", "1")
    rows = {row["entry"]: row for row in rows}
    assert set(rows) == {"np.copyto (copy floor)", "XLA: negate", "XLA: exp", "XLA: exp, row sum", "XLA: softmax",
                         "tf_seqloss step (XLA)", "tf.nn step (XLA)"}
    assert all(row["median_s"] > 0 and len(row["times"]) == 2 for row in rows.values())
    assert rows["np.copyto (copy floor)"]["x_floor"] == 1.0 and rows["XLA: softmax"]["x_softmax"] == 1.0


@pytest.mark.slow
@pytest.mark.duration(47)
def test_whole_step_and_fused_head_harnesses_run_end_to_end(tmp_path):
    rows = _run_benchmark("steps.py", tmp_path / "steps", "--batch", "2", "--time", "16", "--features", "8",
                          "--classes", "1500", "--modes", "function,fit", "--entries", "default,tf.nn,linear,floor",
                          "--repeats", "1", "--fit-steps", "2", stem="steps", plot="steps.png")
    assert {(row["entry"], row["mode"]) for row in rows} == {
        ("default", "function"), ("tf.nn", "function"), ("linear", "function"), ("floor", "function"),
        ("default", "fit"), ("tf.nn", "fit")}
    for row in rows:
        assert "error" not in row, row
        assert row["total_s"] > 0 and np.isfinite(row["loss"])
        if row["mode"] == "function":  # the harness's own NumPy float64 masked mean of the step's logits
            assert row["loss_error"] < 1e-5, row
        # The floor is a yardstick for time only: no peak ratio (its logits gradient is a broadcast).
        assert ("x_best_peak" in row) == (row["entry"] != "floor"), row
    # One round (a process an entry): how rounds are picked from is test_median_run_picks_the_median_good_run.
    rows = _run_benchmark("head.py", tmp_path / "head", "--tokens", "64", "--features", "8", "--classes", "1500",
                          "--modes", "function", "--repeats", "1", "--rounds", "1", stem="head", plot="head.png")
    fused, materialised = sorted(rows, key=lambda row: row["entry"])
    assert (fused["entry"], materialised["entry"]) == ("fused", "materialised")
    np.testing.assert_allclose(fused["loss"], materialised["loss"], rtol=1e-5)
    assert fused["median_s"] > 0 and fused["x_materialised_time"] > 0 and fused["x_floor"] > 0
    assert fused["median_s_all"] == [fused["median_s"]] and fused["rounds"] == 1


def test_median_run_picks_the_median_good_run():
    # benchmarks/_common.py, as the harnesses import it (their folder on the path), without TensorFlow.
    spec = importlib.util.spec_from_file_location(
        "_common", Path(__file__).resolve().parents[1] / "benchmarks" / "_common.py")
    common = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(common)
    runs = [dict(s=3.0, n=0), dict(error="exit 1"), dict(s=1.0, n=1), dict(s=2.0, n=2), dict(s=5.0, n=3)]
    # The failed run is left out; of the four good ones the two middle are 2.0 and 3.0: the larger is taken.
    assert common.median_run(runs, "s") == dict(s=3.0, n=0, rounds=4, s_all=[3.0, 1.0, 2.0, 5.0])
    assert common.median_run(runs[:4], "s") == dict(s=2.0, n=2, rounds=3, s_all=[3.0, 1.0, 2.0])
    assert runs[0] == dict(s=3.0, n=0)  # a copy is returned
    assert common.median_run([dict(error="a"), dict(error="b")], "s") == dict(error="a")


@pytest.mark.slow
@pytest.mark.duration(35)
def test_keras_hub_harness_runs_end_to_end(tmp_path):
    # The harness runs its entries on Keras 3 whatever the flavour here; keras-hub is an optional extra.
    if importlib.util.find_spec("keras_hub") is None:
        pytest.skip('keras-hub is not installed: pip install "tf_seqloss[keras-hub]"')
    rows = _run_benchmark("keras_hub_lm.py", tmp_path, "--models", "gpt2:16:300", "--dtypes", "float32",
                          "--modes", "function", "--routes", "default,fused,floor", "--layers", "1", "--batch", "2",
                          "--time", "16", "--steps", "3", stem="keras_hub_lm",
                          plot="keras_hub_lm.png")
    rows = {row["route"]: row for row in rows}
    assert set(rows) == {"default", "fused", "floor"}
    for row in rows.values():
        assert "error" not in row, row
        assert row["peak_bytes"] >= 0 and row["tokens_per_s"] > 0 and row["fit_s"] > 0
        # One round (each is a process a route, about 10 s here): `median_run`, which picks among rounds, has
        # its own test (test_median_run_picks_the_median_good_run).
        assert row["rounds"] == 1 and row["tokens_per_s_all"] == [row["tokens_per_s"]]
    # Random weights give nearly uniform logits: the fused route's loss (a mean over the real tokens) is
    # close to log(classes); keras-hub's default divides by every token, padding included, so it is lower.
    assert abs(rows["fused"]["loss"] - np.log(300)) < 0.05 * np.log(300), rows["fused"]
    assert rows["default"]["loss"] < rows["fused"]["loss"]
    assert "| gpt2:16:300 | float32 | function | fused |" in (tmp_path / "keras_hub_lm.md").read_text()


@pytest.mark.slow
@pytest.mark.duration(16)
def test_chunked_matmuls_harness_runs_end_to_end(tmp_path):
    # The harness itself checks each chunked product against the whole one (the sum of its squares) and
    # fails on a mismatch: a run that completes computed the same three products both ways.
    rows = _run_benchmark("chunked_matmuls.py", tmp_path, "--shape", "64x8x1500", "--chunks", "16,32",
                          "--repeats", "1")
    products = ("logits h @ W", "kernel gradient h^T @ g", "hidden gradient g @ W^T")
    assert sorted((row["mode"], row["product"], str(row["chunk"])) for row in rows) == sorted(
        (mode, product, chunk) for mode in ("function", "xla") for product in products
        for chunk in ("whole", "16", "32"))
    assert all(row["seconds"] > 0 and row["gflops"] > 0 for row in rows)
    assert "| xla | kernel gradient h^T @ g | 16 |" in (tmp_path / "results.md").read_text()
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "chunked_matmuls.py"
    bad = subprocess.run([sys.executable, str(script), "--shape", "64x8x1500", "--chunks", "48"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--chunks must divide the tokens of --shape (64), got 48" in bad.stderr


@pytest.mark.parametrize("weight", [1.0, 1e-3], ids=["normal-ratio", "subnormal-ratio"])
def test_plain_fused_backward_is_exact_when_upstream_over_the_sum_is_subnormal(weight):
    # The target logit is the shift: a logit 85 above it makes the sum of exponentials ~1e37, so
    # `g / sum` is subnormal for g = 1e-3 and the plain-op backward pass must divide first.
    logits = tf.constant([[[0.0, 85.0, 1.0, -3.0], [0.5, 0.0, 2.0, 1.0]]])
    ids = tf.constant([[0, 2]])
    weights = tf.constant([[weight, weight]])

    def run(implementation):
        @tf.function
        def step(logits):
            with tf.GradientTape() as tape:
                tape.watch(logits)
                loss = tf_seqloss.sequence_loss(logits, ids, weights, average_across_timesteps=False,
                                                average_across_batch=False, implementation=implementation)
                total = tf.reduce_sum(loss)
            return total, tape.gradient(total, logits)
        return step(logits)

    loss, grad = run("fused")
    z, w = logits.numpy().astype(np.float64), weights.numpy().astype(np.float64)
    np.testing.assert_allclose(loss, reference.sequence_loss(z, ids.numpy(), w, average_across_timesteps=False,
                                                             average_across_batch=False).sum(), rtol=1e-6)
    np.testing.assert_allclose(grad, w[..., None] * (np.exp(reference.log_softmax(z)) - np.eye(4)[ids.numpy()]),
                               rtol=1e-5, atol=1e-12 * weight)


@pytest.fixture
def blocks_of_four_rows():
    """The forward pass that keeps nothing logits-sized reduces 4 rows of 11 classes at a time, in fresh
    kernels (the module's kernels may hold traces made with the default block size)."""
    kernel = tf.function(_fused._compiled_forward, jit_compile=True, reduce_retracing=True)
    with mock.patch.object(_fused, "ROW_BLOCK_ELEMENTS", (4 * 11, 4 * 11)), \
            mock.patch.object(_fused, "_forward_kernel", kernel):
        yield


def _numpy_loss_and_grad(logits, ids, label_smoothing):
    """`_loss_and_grad`'s loss and gradient in NumPy float64, from the logits' exact values."""
    x = tf.cast(logits, tf.float64).numpy()
    ids = ids.numpy()
    classes = x.shape[-1]
    valid = (ids >= 0) & (ids < classes)
    safe = np.where(valid, ids, 0)
    loss = np.where(valid, reference.token_cross_entropy(x, safe, label_smoothing), 0.0)
    upstream = (np.arange(1, ids.size + 1) / ids.size).reshape(ids.shape) * valid
    target = np.eye(classes)[safe] * (1 - label_smoothing) + label_smoothing / classes
    return loss, (np.exp(reference.log_softmax(x)) - target) * upstream[..., None]


@pytest.mark.usefixtures("blocks_of_four_rows")
@pytest.mark.parametrize("mode", ("eager", "function", "xla"))
@pytest.mark.parametrize("implementation", FAST)
@pytest.mark.parametrize("dtype", DTYPES, ids=_param_id)
def test_row_blocks_equal_numpy_float64(dtype, implementation, mode):
    # 15 rows in blocks of 4: the last block starts at row 11 and repeats row 11. Two rows hold a logit
    # 800 above their target's, which overflows the target shift and sends every row to the row maximum.
    logits, ids = _inputs((3, 5, 11), dtype, tf.int64, seed=4, out_of_range=True)
    ids = tf.tensor_scatter_nd_update(ids, [[0, 0], [2, 4]], tf.constant([1, 5], tf.int64))  # first, last row valid
    logits = tf.tensor_scatter_nd_add(logits, [[0, 1, 7], [2, 4, 3]], tf.constant([800.0, 800.0], dtype))
    for label_smoothing, rows in ((0.0, logits), (0.2, logits[:, :4]), (0.0, logits[:1, :2])):
        rows_ids = ids[:rows.shape[0], :rows.shape[1]]
        run = functools.partial(_loss_and_grad, implementation=implementation, label_smoothing=label_smoothing)
        if mode != "eager":
            spec = (tf.TensorSpec([None, None, 11], dtype), tf.TensorSpec([None, None], tf.int64))
            run = tf.function(run, jit_compile=mode == "xla", input_signature=None if mode == "xla" else spec)
        loss, _, grad = run(rows, rows_ids)
        expected_loss, expected_grad = _numpy_loss_and_grad(rows, rows_ids, label_smoothing)
        np.testing.assert_allclose(loss, expected_loss, rtol=LOSS_TOL[dtype], atol=LOSS_TOL[dtype])
        np.testing.assert_allclose(tf.cast(grad, tf.float64), expected_grad, rtol=GRAD_TOL[dtype],
                                   atol=GRAD_TOL[dtype])


@pytest.mark.parametrize("bounds", [(20, 20), (10, 1000)], ids=["4-rows", "an-eighth-at-least-2-rows"])
@pytest.mark.parametrize("mode", ("eager", "function", "xla"))
@pytest.mark.parametrize("rows", (0, 1, 3, 8, 9, 40))
def test_row_block_reduction_covers_every_row_once(rows, mode, bounds):
    # Blocks of 4 rows of 5 classes, or of an eighth of the logits but at least 2 rows (10 logits); the
    # last block is moved back to end at the last row.
    x = tf.reshape(tf.range(rows * 5, dtype=tf.float32), [rows, 5])
    shift = tf.range(rows, dtype=tf.float32)

    def sums(x, shift):
        return _fused._row_block_reduction(
            lambda block, shift: tf.reduce_sum(block, axis=-1) - shift, x, tf.float32, False, shift)

    if mode != "eager":
        spec = None if mode == "xla" else (tf.TensorSpec([None, 5]), tf.TensorSpec([None]))
        sums = tf.function(sums, jit_compile=mode == "xla", input_signature=spec)
    with mock.patch.object(_fused, "ROW_BLOCK_ELEMENTS", bounds):
        result = sums(x, shift)
    np.testing.assert_array_equal(result, x.numpy().sum(axis=-1) - shift.numpy())


@pytest.mark.parametrize("mode", ("eager", "xla"))
def test_bfloat16_bits_widen_exactly(mode):
    # Every bfloat16 bit pattern class: zeros, subnormals, normals, extremes, infinities and NaN.
    values = tf.constant([0.0, -0.0, 1e-40, -3e-39, 1.0, -2.5, 3.3895e38, -3.3895e38, np.inf, -np.inf, np.nan],
                         tf.bfloat16)
    carrier, bits = _fused._kernel_input(values)
    assert bits and carrier.dtype == tf.float16
    widen = functools.partial(_fused._widen, dtype=tf.float32, bfloat16_bits=True)
    if mode == "xla":
        widen = tf.function(widen, jit_compile=True)
    np.testing.assert_array_equal(widen(carrier).numpy().view(np.uint32),
                                  tf.cast(values, tf.float32).numpy().view(np.uint32))


@pytest.mark.parametrize("implementation", ("auto",) + FAST)
@pytest.mark.parametrize("dtype", (tf.float32, tf.float64, tf.bfloat16), ids=_param_id)
def test_under_xla_with_unknown_sizes_equals_numpy_whatever_the_padding_holds(dtype, implementation):
    # With sizes unknown while tracing, XLA compiles the step for each shape and the fused formulation
    # shifts every row by its maximum (no fallback branch). A logit 800 above the target's, and
    # padding of inf, -inf and NaN, must leave the loss and gradient those of NumPy float64.
    logits, ids = _inputs((3, 5, 11), dtype, seed=7)
    logits = tf.tensor_scatter_nd_add(logits, [[0, 1, 7], [2, 0, 3]], tf.constant([800.0, 800.0], dtype))
    lengths = tf.constant([5, 2, 1])
    inside = np.arange(5)[None, :] < lengths.numpy()[:, None]
    hostile = np.resize(np.array([np.inf, -np.inf, np.nan]), (3, 5, 11))
    padded = tf.where(inside[..., None], logits, tf.constant(hostile, dtype))
    spec = (tf.TensorSpec([None, None, 11], dtype), tf.TensorSpec([None, None], tf.int32),
            tf.TensorSpec([None], tf.int32))

    @tf.function(input_signature=spec, jit_compile=True)
    def step(logits, ids, lengths):
        with tf.GradientTape() as tape:
            tape.watch(logits)
            loss = tf_seqloss.sequence_loss(logits, ids, lengths=lengths, implementation=implementation)
        return loss, tape.gradient(loss, logits)

    loss, grad = step(padded, ids, lengths)
    clean = np.where(inside[..., None], tf.cast(logits, tf.float64).numpy(), 0.0)
    weights = inside.astype(np.float64)
    np.testing.assert_allclose(loss, reference.sequence_loss(clean, ids.numpy(), weights),
                               rtol=LOSS_TOL[dtype], atol=LOSS_TOL[dtype])
    np.testing.assert_allclose(tf.cast(grad, tf.float64), reference.sequence_loss_grad(clean, ids.numpy(), weights),
                               rtol=GRAD_TOL[dtype], atol=GRAD_TOL[dtype])
    assert np.all(tf.cast(grad, tf.float64).numpy()[~inside] == 0.0)
