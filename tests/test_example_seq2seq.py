"""The encoder-decoder example: its data, its losses against NumPy, both training routes, resuming."""

import csv
import dataclasses
import datetime
import hashlib
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

pytest.importorskip("babel")

import tf_seqloss  # noqa: E402
from examples.seq2seq import data, train  # noqa: E402
from examples.seq2seq.model import FLAVOUR, Seq2SeqModel, keras  # noqa: E402
from tests.reference import token_cross_entropy  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OTHER_FLAVOUR = "tf_keras" if FLAVOUR == "keras3" else "keras3"
# TensorFlow's start-up lines, absl's (2.21: `I0000 00:00:1795519564.509000    3688 port.cc:153] ...`) and
# dated (2.16-2.20: `2026-12-02 02:40:31.105187: E external/.../cuda_fft.cc:479] ...`), and absl's preamble.
ABSL_LINE = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d+\.\d+ +\d+ \S+:\d+\] "
                       r"|^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+: [IWEF] \S+:\d+\] |absl::InitializeLog", re.M)
ISO_FORMS = {"%Y-%m-%d": data.DATE_FORMS, "%Y-%m": data.MONTH_FORMS, "%Y-%m-%dT%H:%M": data.DATETIME_FORMS}


def tiny_config(tmp_path, **overrides):
    settings = dict(epochs=2, batch_size=16, num_lstm_units=16, embedding_dim=8, train_examples=64,
                    validation_examples=32, test_examples=16, learning_rate=0.05, samples=0, progress=False,
                    run_dir=str(tmp_path / "runs"), saved_models_dir=str(tmp_path / "saved_models"))
    settings.update(overrides)
    return train.Config(**settings)


def quiet(*args):
    pass


# --- data -------------------------------------------------------------------------------------------


def test_generated_examples_are_deterministic_distinct_and_iso():
    examples = data.generate_examples(400, seed=7)
    assert examples == data.generate_examples(400, seed=7)
    assert examples != data.generate_examples(400, seed=8)
    assert len({e.source for e in examples}) == len(examples)
    assert {e.locale for e in examples} == set(data.LOCALES)
    for example in examples:
        iso_format = next(f for f, forms in ISO_FORMS.items() if example.form in forms)
        moment = datetime.datetime.strptime(example.target, iso_format)
        assert data.FIRST_YEAR <= moment.year <= data.LAST_YEAR
        assert str(moment.year) in example.source


def test_sources_and_targets_vary_in_length():
    examples = data.generate_examples(400, seed=0)
    source_lengths = data.tokenize([e.source for e in examples]).row_lengths().numpy()
    target_lengths = data.tokenize([e.target for e in examples]).row_lengths().numpy()
    assert source_lengths.min() <= 3 and source_lengths.max() >= 9
    assert set(target_lengths) == {3, 5, 9}


TOKENS = {
    "Donnerstag, 3. September 1987": ["Donnerstag", ",", "3", ".", "September", "1987"],
    "January 13, 1971, 10:35\u202fAM": ["January", "13", ",", "1971", ",", "10", ":", "35", "AM"],
    "quinta-feira, 3 de set. de 1987": ["quinta", "-", "feira", ",", "3", "de", "set", ".", "de", "1987"],
    "giovedì 3 settembre 1987": ["giovedì", "3", "settembre", "1987"],
    "1987-09-03T14:05": ["1987", "-", "09", "-", "03", "T", "14", ":", "05"],
    " \u00a0": [],
}


def test_tokenize_splits_letters_digits_and_symbols():
    tokens = data.tokenize(list(TOKENS)).to_list()
    assert [[t.decode() for t in row] for row in tokens] == list(TOKENS.values())


def test_encoded_examples_wrap_targets_in_start_and_stop():
    examples = data.generate_examples(20, seed=1)
    model = Seq2SeqModel.from_vocabulary(data.build_vocabulary(examples), num_lstm_units=4, embedding_dim=4)
    encoder_ids, decoder_inputs, decoder_outputs = data.encode_examples(model, examples)
    for example, source, inputs, outputs in zip(examples, encoder_ids.to_list(), decoder_inputs.to_list(),
                                                decoder_outputs.to_list()):
        vocabulary = [""] + ["[UNK]"] + model.vocabulary
        assert data.OOV_ID not in source
        assert "".join(vocabulary[i] for i in source) == "".join(example.source.split())  # spaces dropped
        assert inputs[0] == data.START_ID and outputs[-1] == data.STOP_ID
        assert inputs[1:] == outputs[:-1]
        assert "".join(vocabulary[i] for i in outputs[:-1]) == example.target


def test_unknown_tokens_map_to_the_oov_id():
    model = Seq2SeqModel.from_vocabulary([data.START, data.STOP, "1987"], num_lstm_units=4, embedding_dim=4)
    assert model.text_to_ids(["1987 Brumaire"]).to_list() == [[4, data.OOV_ID]]


# --- losses -----------------------------------------------------------------------------------------


def numpy_per_sequence_loss(logits, targets, lengths, batch_size):
    mask = np.arange(targets.shape[1])[None, :] < np.asarray(lengths)[:, None]
    return (token_cross_entropy(logits, targets) * mask).sum() / batch_size


@pytest.mark.parametrize("dtype", [tf.float32, tf.float64])
def test_calculate_loss_is_masked_sum_over_batch_size(dtype):
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, size=(4, 6, 9))
    targets = rng.integers(0, 9, size=(4, 6))
    lengths = np.array([6, 2, 0, 4])
    model = Seq2SeqModel(vocab_size=9, num_lstm_units=4, embedding_dim=4)
    loss = model.calculate_loss(tf.constant(logits, dtype), tf.constant(lengths), tf.constant(targets), 4)
    np.testing.assert_allclose(float(loss), numpy_per_sequence_loss(logits, targets, lengths, 4),
                               rtol=1e-6 if dtype == tf.float32 else 1e-12)
    # Padding may hold any id, and `batch_size` divides whatever it is.
    noisy = np.where(np.arange(6)[None, :] < lengths[:, None], targets, 8)
    noisy_loss = model.calculate_loss(tf.constant(logits, dtype), lengths, noisy, tf.constant(3))
    np.testing.assert_allclose(float(noisy_loss), numpy_per_sequence_loss(logits, targets, lengths, 3),
                               rtol=1e-6 if dtype == tf.float32 else 1e-12)


def test_calculate_loss_gradient_is_zero_at_padding_and_closed_form_elsewhere():
    rng = np.random.default_rng(1)
    logits = tf.constant(rng.normal(size=(3, 5, 7)))
    targets = rng.integers(0, 7, size=(3, 5))
    lengths = np.array([5, 1, 3])
    model = Seq2SeqModel(vocab_size=7, num_lstm_units=4, embedding_dim=4)
    with tf.GradientTape() as tape:
        tape.watch(logits)
        loss = model.calculate_loss(logits, lengths, targets, 3)
    gradient = tape.gradient(loss, logits).numpy()
    probabilities = np.exp(logits.numpy()) / np.exp(logits.numpy()).sum(-1, keepdims=True)
    mask = (np.arange(5)[None, :] < lengths[:, None])[..., None]
    expected = (probabilities - np.eye(7)[targets]) * mask / 3
    np.testing.assert_allclose(gradient, expected, atol=1e-12)


def test_compiled_sequence_loss_uses_the_models_mask():
    """`fit`'s loss is the mean cross-entropy of the real tokens: the Keras mask reaches the loss."""
    examples = data.generate_examples(24, seed=2)
    model = Seq2SeqModel.from_vocabulary(data.build_vocabulary(examples), num_lstm_units=8, embedding_dim=4)
    model.compile(optimizer="adam", loss=tf_seqloss.SequenceLoss(), run_eagerly=True)  # no tracing: fast
    (encoder_ids, decoder_inputs), decoder_outputs = next(iter(data.make_dataset(model, examples, 24)))
    assert (decoder_outputs.numpy() == data.PAD_ID).any()  # the batch really is padded
    keras_loss = model.evaluate((encoder_ids, decoder_inputs), decoder_outputs, batch_size=24, verbose=0)
    logits = model((encoder_ids, decoder_inputs)).numpy()
    real = decoder_outputs.numpy() != data.PAD_ID
    expected = token_cross_entropy(logits, decoder_outputs.numpy())[real].mean()
    np.testing.assert_allclose(keras_loss, expected, rtol=1e-5)


# --- model ------------------------------------------------------------------------------------------


def test_greedy_decode_pads_everything_after_the_first_stop():
    model = Seq2SeqModel(vocab_size=6, num_lstm_units=4, embedding_dim=4, max_output_length=5)
    model.build()
    # A projection that ignores its input and prefers id 5, then 3 (stop), from a fixed bias.
    kernel, bias = model.projection.get_weights()
    model.projection.set_weights([np.zeros_like(kernel), np.array([0, 0, 0, 1, 0, 2], bias.dtype)])
    assert model.greedy_decode(tf.constant([[4, 5]])).numpy().tolist() == [[5, 5, 5, 5, 5]]
    model.projection.set_weights([np.zeros_like(kernel), np.array([0, 0, 0, 3, 0, 2], bias.dtype)])
    assert model.greedy_decode(tf.constant([[4, 5], [4, 0]])).numpy().tolist() == [[3, 0, 0, 0, 0]] * 2


def test_model_rejects_a_vocabulary_that_disagrees_with_vocab_size():
    with pytest.raises(ValueError, match="`vocabulary` must start with"):
        Seq2SeqModel(vocab_size=10, vocabulary=[data.START, data.STOP, "a"])
    with pytest.raises(ValueError, match="`num_lstm_units` must be a positive int"):
        Seq2SeqModel(vocab_size=10, num_lstm_units=0)
    with pytest.raises(ValueError, match="`translate` needs the model's `vocabulary`"):
        Seq2SeqModel(vocab_size=10).translate(["1 May 1990"])


# --- training ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=train.ROUTES)
def interrupted_run(request, tmp_path_factory):
    """Trains a tiny run by one route, interrupted in its second epoch, then restored, then finished;
    the `fit` run is saved (saving does not depend on the route)."""
    route = request.param
    config = tiny_config(tmp_path_factory.mktemp(route), route=route, epochs=3)
    end_of_first_epoch = {}

    def interrupt_in_second_epoch(model, epoch, batch):
        if epoch == 0 and batch == 3:  # the last of 4 batches: the weights the checkpoint must hold
            end_of_first_epoch.update((f"{i}:{w.name}", w.numpy()) for i, w in enumerate(model.weights))
        if epoch == 1 and batch == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt) as interruption:
        train.train(config, on_batch_end=interrupt_in_second_epoch, save=False, log=quiet)
    with open(config.route_dir / "history.csv") as f:
        history_at_interruption = list(csv.DictReader(f))
    restored = train.restore_run(config)  # what a second run starts from
    finished = train.train(config, save=route == "fit", log=quiet)
    with open(config.route_dir / "history.csv") as f:
        history_when_finished = list(csv.DictReader(f))
    return dict(config=config, end_of_first_epoch=end_of_first_epoch, restored=restored, finished=finished,
                history_at_interruption=history_at_interruption, history_when_finished=history_when_finished,
                interruption=interruption.value)


@pytest.mark.slow
def test_an_interrupted_run_keeps_its_finished_epochs(interrupted_run):
    assert [row["epoch"] for row in interrupted_run["history_at_interruption"]] == ["1"]
    restored = interrupted_run["restored"]
    assert restored.done == 1 and len(restored.state.history) == 1
    for i, weight in enumerate(restored.model.weights):
        np.testing.assert_array_equal(weight.numpy(), interrupted_run["end_of_first_epoch"][f"{i}:{weight.name}"])


@pytest.mark.slow
def test_a_resumed_run_trains_only_the_missing_epochs_and_learns(interrupted_run):
    finished = interrupted_run["finished"]
    assert finished.resumed_from_epoch == 1
    assert [row["epoch"] for row in finished.history] == [1, 2, 3]
    assert all(type(row["epoch"]) is int for row in finished.history)
    # The file too: the restored epoch is written back as `1`, not `1.0`, beside the new ones.
    assert [row["epoch"] for row in interrupted_run["history_when_finished"]] == ["1", "2", "3"]
    assert finished.history[0]["loss"] == float(interrupted_run["history_at_interruption"][0]["loss"])
    losses = [row["loss"] for row in finished.history]
    val_losses = [row["val_loss"] for row in finished.history]
    # 64 training examples teach the training set, not yet the held-out one: only its loss must fall.
    assert losses[0] > losses[1] > losses[2] and losses[2] < 0.85 * losses[0]
    assert np.isfinite(val_losses).all()
    assert set(finished.metrics) == {"token_accuracy", "sequence_accuracy", "train_seconds"}
    assert finished.plot_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_an_interruption_says_where_it_stopped_and_what_is_saved(interrupted_run):
    interruption, config = interrupted_run["interruption"], interrupted_run["config"]
    assert isinstance(interruption, train.TrainingInterrupted)
    assert interruption.where == "in epoch 2 of 3, after step 2 of 4"  # 64 examples in batches of 16
    checkpoint = config.route_dir / "checkpoints" / "ckpt-1"
    assert interruption.saved == (f"Saved: epoch 1 of 3 in {checkpoint} (weights, optimizer, epoch count) and "
                                  f"{config.route_dir / 'history.csv'}. Epoch 2 is trained again from its "
                                  "start when resumed.")
    assert interrupted_run["restored"].state.manager.latest_checkpoint == str(checkpoint)


@pytest.fixture
def ctrl_c_raises():
    """SIGINT raises `KeyboardInterrupt` here as in a terminal (a suite started in the background ignores it)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def train_until_ctrl_c_from(config, folders, after_step):
    """Trains `config` with SIGINT sent from the first call into a file under `folders` once
    `after_step(epoch, batch)` held after a training step (a profile hook sends it); returns the
    `TrainingInterrupted`."""
    armed = []

    def send_from_there(frame, event, arg):
        if armed and event == "call" and frame.f_code.co_filename.startswith(folders):
            armed.clear()
            os.kill(os.getpid(), signal.SIGINT)

    def arm(model, epoch, batch):
        if after_step(epoch, batch):
            armed.append(True)
            sys.setprofile(send_from_there)

    try:
        with pytest.raises(train.TrainingInterrupted) as interruption:
            train.train(config, on_batch_end=arm, save=False, log=quiet)
    finally:
        sys.setprofile(None)
    assert not armed  # the signal was sent
    return interruption.value


@pytest.mark.parametrize("route", train.ROUTES)
def test_ctrl_c_inside_tensorflow_code_takes_effect_at_the_end_of_the_step(route, tmp_path, ctrl_c_raises):
    # Ctrl-C lands in TensorFlow's or Keras' own Python code, the next call into it after the second step of
    # epoch 2. Raised there, it could leave their native objects half made; the run must go on to the end of
    # the step, then stop, saying so.
    config = tiny_config(tmp_path, route=route, epochs=2)
    libraries = tuple(str(Path(module.__file__).parent) for module in (tf, keras))
    interruption = train_until_ctrl_c_from(config, libraries, lambda epoch, batch: (epoch, batch) == (1, 1))
    assert interruption.where == "in epoch 2 of 2, after step 3 of 4"
    ctrl_c = interruption.__context__
    assert type(ctrl_c) is KeyboardInterrupt
    raised_in = traceback.extract_tb(ctrl_c.__traceback__)[-1]
    assert (Path(raised_in.filename).name, raised_in.name) == ("train.py", "check")
    assert [row["epoch"] for row in csv.DictReader(open(config.route_dir / "history.csv"))] == ["1"]


def test_ctrl_c_as_the_last_epoch_is_recorded_says_that_every_epoch_is_trained(tmp_path, ctrl_c_raises):
    config = tiny_config(tmp_path, route="loop", epochs=1)
    checkpointing = str(Path(tf.__file__).parent / "python" / "checkpoint")  # as the epoch's checkpoint is written
    interruption = train_until_ctrl_c_from(config, checkpointing, lambda epoch, batch: batch == 3)
    assert interruption.where == "after epoch 1 of 1"
    assert interruption.saved.endswith(
        f"{config.route_dir / 'history.csv'}. Every epoch is trained: resuming evaluates and saves the model.")


def test_a_second_ctrl_c_does_not_wait_for_the_step(ctrl_c_raises):
    with pytest.raises(KeyboardInterrupt) as first:
        with train._CtrlCAtStepEnds() as ctrl_c:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.01)  # the handler runs between two bytecodes: only noted
            assert ctrl_c.pending
        pytest.fail("a Ctrl-C noted but not taken by the end of the block")  # pragma: no cover
    assert traceback.extract_tb(first.value.__traceback__)[-1].name == "check"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handed back
    with pytest.raises(KeyboardInterrupt) as second:
        with train._CtrlCAtStepEnds():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.01)
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.01)
            pytest.fail("a second Ctrl-C did not stop at once")  # pragma: no cover
    assert traceback.extract_tb(second.value.__traceback__)[-1].name == "_note"


def test_ctrl_c_is_left_alone_where_it_does_not_raise(ctrl_c_raises):
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a job started in the background
    with train._CtrlCAtStepEnds():
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN


def test_ctrl_c_while_an_epoch_is_recorded_goes_to_its_handler_once_the_record_is_written(ctrl_c_raises, monkeypatch):
    def press_twice():
        for _ in range(2):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.01)  # a handler runs between two bytecodes: here, if it were not held

    written = []
    with pytest.raises(KeyboardInterrupt):  # the default handler: raised once the block is done
        with train._ctrl_c_deferred():
            press_twice()
            written.append("record")
    assert written == ["record"] and signal.getsignal(signal.SIGINT) is signal.default_int_handler

    calls = []
    signal.signal(signal.SIGINT, lambda signum, frame: calls.append(signum))  # a caller's own handler
    with train._ctrl_c_deferred():
        press_twice()
        assert calls == []
    assert calls == [signal.SIGINT]  # handed on once, not turned into a KeyboardInterrupt

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a job started in the background: still ignored
    with train._ctrl_c_deferred():
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        press_twice()
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN

    # A handler installed outside Python (an embedding host): `getsignal` gives None, and a handler swapped
    # in could not be put back (`signal.signal(SIGINT, None)` raises TypeError). Left alone.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    real_getsignal = signal.getsignal
    with monkeypatch.context() as patched:
        patched.setattr(signal, "getsignal", lambda signum: None)
        with train._ctrl_c_deferred():
            written.append("record")
            assert real_getsignal(signal.SIGINT) is signal.default_int_handler
    assert written == ["record", "record"] and signal.getsignal(signal.SIGINT) is signal.default_int_handler

    # While training runs, the step-end holder gets it: noted, then raised by its `check`.
    with pytest.raises(KeyboardInterrupt) as taken:
        with train._CtrlCAtStepEnds() as ctrl_c:
            with train._ctrl_c_deferred():
                press_twice()
            assert ctrl_c.pending
    assert traceback.extract_tb(taken.value.__traceback__)[-1].name == "check"


@pytest.mark.slow
def test_a_finished_run_saves_models_that_decode_as_it_does(interrupted_run):
    finished = interrupted_run["finished"]
    if interrupted_run["config"].route != "fit":
        assert finished.keras_path is None and finished.saved_model_path is None
        return
    # `train` itself checks that both saved forms decode 256 held-out inputs as the trained model does
    # (it raises otherwise); here a fresh load decodes the test inputs to the predictions that the
    # accuracy was measured on.
    assert (finished.saved_model_path / "saved_model.pb").exists()
    texts = tf.constant([e.source for e in finished.test_examples])
    reloaded = keras.models.load_model(str(finished.keras_path))
    assert [t.decode() for t in reloaded.translate(texts).numpy()] == finished.predictions


def test_a_run_directory_refuses_other_settings_unless_fresh(tmp_path):
    config = tiny_config(tmp_path)
    train.prepare_run_dir(config)
    (config.route_dir / "history.csv").touch()
    train.prepare_run_dir(dataclasses.replace(config, epochs=5, samples=3))  # not settings of the run
    with pytest.raises(ValueError, match=r"num_lstm_units=12 \(was 16\).*`--fresh`"):
        train.prepare_run_dir(dataclasses.replace(config, num_lstm_units=12))
    train.prepare_run_dir(dataclasses.replace(config, num_lstm_units=12, fresh=True))
    assert not (config.route_dir / "history.csv").exists()
    assert json.loads((config.route_dir / "config.json").read_text())["num_lstm_units"] == 12


TINY_ARGS = ["--epochs", "1", "--num-lstm-units", "8", "--embedding-dim", "4", "--train-examples", "32",
             "--validation-examples", "8", "--test-examples", "8", "--batch-size", "16", "--no-progress",
             "--samples", "2"]


def tiny_args(tmp_path, *more):
    return TINY_ARGS + ["--run-dir", str(tmp_path / "runs"), "--saved-models-dir", str(tmp_path / "saved_models"),
                        *more]


def config_of(args):
    """Returns the `Config` of command-line `args`."""
    parsed = vars(train.make_parser().parse_args(args))
    return train.Config(**{key: value for key, value in parsed.items() if key not in ("save", "decode")})


PAST_NS = 1_000_000_000 * 10**9  # September 2001


def snapshot(folder):
    """Returns `{relative path: (sha256, mtime_ns)}` of every file and folder under `folder`."""
    return {str(path.relative_to(folder)): (hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "",
                                            path.stat().st_mtime_ns)
            for path in sorted(folder.rglob("*"))}


@pytest.mark.slow
def test_decode_restores_and_decodes_and_writes_nothing(tmp_path, capsys):
    trained = train.main(tiny_args(tmp_path))
    # Every modification time set to one in the past: a rewrite, even of the same bytes, sets it to now,
    # whatever the file system's timestamp resolution.
    for path in tmp_path.rglob("*"):
        os.utime(path, ns=(PAST_NS, PAST_NS))
    before = snapshot(tmp_path)
    assert {mtime for _, mtime in before.values()} == {PAST_NS}
    assert any(name.endswith(".keras") for name in before) and any(name.endswith("loss.png") for name in before)
    capsys.readouterr()

    texts = ["3 mars 1999", "1. Mai 1990"]
    result = train.main(tiny_args(tmp_path, "--decode", *texts))
    out = capsys.readouterr().out
    assert snapshot(tmp_path) == before
    reloaded = keras.models.load_model(str(trained.keras_path))  # the trained model, as saved
    expected = [iso.decode() for iso in reloaded.translate(tf.constant(texts)).numpy()]
    assert result.decoded == list(zip(texts, expected))
    assert f"restored epoch 1 of 1 from {tmp_path / 'runs' / FLAVOUR / 'fit' / 'checkpoints' / 'ckpt-1'}" in out
    assert "exact-sequence accuracy" in out and f"'3 mars 1999' -> {expected[0]}" in out
    assert result.keras_path is None and result.plot_path is None


def test_decode_without_a_trained_run_says_so_and_creates_nothing(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.main(tiny_args(tmp_path, "--route", "loop", "--decode", "3 mars 1999"))
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert f"There is no run in {tmp_path / 'runs' / FLAVOUR / 'loop'} to decode with" in error
    assert not (tmp_path / "runs").exists() and not (tmp_path / "saved_models").exists()
    with pytest.raises(SystemExit):
        train.main(tiny_args(tmp_path, "--fresh", "--decode", "3 mars 1999"))
    assert "cannot be combined with `--fresh`. Received: --fresh --decode" in capsys.readouterr().err


def run_example(args, flavour, tmp_path, **popen):
    """Starts `python -m examples.seq2seq args` under Keras `flavour` from the repository root.

    SIGINT is made to raise KeyboardInterrupt as in a terminal: a suite started in the background
    (scripts/test.sh) would otherwise pass on an ignored SIGINT."""
    env = {key: value for key, value in os.environ.items()
           if key not in ("TF_USE_LEGACY_KERAS", "TF_CPP_MIN_LOG_LEVEL", train.COMMAND_VARIABLE)}
    if flavour == "tf_keras":
        env["TF_USE_LEGACY_KERAS"] = "1"
    code = ("import runpy, signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
            "runpy.run_module('examples.seq2seq', run_name='__main__', alter_sys=True)")
    return subprocess.Popen([sys.executable, "-c", code, *args], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **popen)


def keras_file_weights(path):
    """Returns the names of the arrays in a `.keras` file's weights (`optimizer/...` for its state), but
    for tf_keras' `metrics/...` (the loss tracker, built only once `fit` or `evaluate` has run)."""
    import io
    import zipfile

    import h5py

    names = []
    with zipfile.ZipFile(path) as archive, h5py.File(io.BytesIO(archive.read("model.weights.h5")), "r") as f:
        f.visititems(lambda name, item: names.append(name) if isinstance(item, h5py.Dataset) else None)
    return sorted(name for name in names if not name.startswith("metrics/"))


@pytest.mark.slow
def test_both_keras_flavours_run_one_after_the_other_without_colliding(tmp_path, capsys):
    args = tiny_args(tmp_path)
    here = train.main(args)  # this process's flavour
    other = run_example(args, OTHER_FLAVOUR, tmp_path)
    out, err = other.communicate(timeout=600)
    assert other.returncode == 0, err
    assert f"route `fit`, {OTHER_FLAVOUR}; from scratch" in out  # its own run, not this flavour's checkpoint
    runs, saved = tmp_path / "runs", tmp_path / "saved_models"
    for flavour in ("keras3", "tf_keras"):
        assert json.loads((runs / flavour / "fit" / "config.json").read_text())["keras"] == flavour
        assert (runs / flavour / "fit" / "checkpoints" / "ckpt-1.index").exists()
        assert (saved / flavour / "seq2seq_dates_fit.keras").exists()
        assert (saved / flavour / "seq2seq_dates_fit_savedmodel" / "saved_model.pb").exists()
    assert here.keras_path == saved / FLAVOUR / "seq2seq_dates_fit.keras"
    keras.models.load_model(str(here.keras_path))  # still this flavour's file

    # Run again when finished: it resumes its own run and saves again, optimizer state included.
    saved_weights = keras_file_weights(here.keras_path)
    assert any(name.startswith("optimizer/") for name in saved_weights)
    again = train.main(args)
    assert again.resumed_from_epoch == 1 and keras_file_weights(again.keras_path) == saved_weights

    # A checkpoint of the other flavour in this flavour's place is refused with a message, never a crash.
    config = config_of(args)
    mine, theirs = runs / FLAVOUR / "fit", runs / OTHER_FLAVOUR / "fit"
    (mine / "checkpoints").rename(tmp_path / "mine")
    (theirs / "checkpoints").rename(mine / "checkpoints")
    with pytest.raises(train.RunSettingsError, match=r"ckpt-1 does not fit the model of these settings "
                                                     rf"\(keras='{FLAVOUR}'\).*`--fresh`"):
        train.restore_run(config)
    (mine / "config.json").write_text((theirs / "config.json").read_text())
    with pytest.raises(train.RunSettingsError, match=rf"keras='{FLAVOUR}' \(was '{OTHER_FLAVOUR}'\)"):
        train.restore_run(config)


@pytest.mark.slow
def test_ctrl_c_says_where_it_stopped_and_how_to_resume_and_exits_130(tmp_path):
    args = tiny_args(tmp_path, "--epochs", "500", "--train-examples", "400", "--route", "loop", "--fresh")
    process = run_example(args, FLAVOUR, tmp_path)
    history = tmp_path / "runs" / FLAVOUR / "loop" / "history.csv"
    checkpoint_state = history.parent / "checkpoints" / "checkpoint"  # written once the first epoch is saved
    deadline = time.monotonic() + 300
    while not checkpoint_state.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert "Traceback" not in err and not ABSL_LINE.search(err), err
    # The two lines of the interruption close stderr; anything else there (a library's warning) is not
    # this test's business.
    lines = err.strip().splitlines()
    assert len(lines) >= 2, err
    message, command = lines[-2:]
    run = train.restore_run(config_of([arg for arg in args if arg != "--fresh"]))  # what the resume starts from
    assert run.done >= 1
    saved = "epoch 1" if run.done == 1 else f"epochs 1-{run.done}"
    # Ctrl-C may land while an epoch is being recorded: it then takes effect once the record is complete.
    where = rf"(in epoch {run.done + 1} of 500, after step \d+ of 25|after epoch {run.done} of 500)"
    assert re.fullmatch(rf"Interrupted {where}\. Saved: {saved} of 500 "
                        rf"in {re.escape(str(history.parent / 'checkpoints'))}/ckpt-{run.done} \(weights, optimizer, "
                        rf"epoch count\) and {re.escape(str(history))}\. Epoch {run.done + 1} is trained again "
                        r"from its start when resumed\.", message), message
    flavour = "TF_USE_LEGACY_KERAS=1 " if FLAVOUR == "tf_keras" else ""
    expected = [arg for arg in args if arg != "--fresh"]
    assert command == f"Resume with: {flavour}python -m examples.seq2seq {shlex.join(expected)}"


def test_start_up_lines_are_silenced_and_errors_still_shown(tmp_path):
    process = run_example(["--epochs", "-1"], FLAVOUR, tmp_path)
    out, err = process.communicate(timeout=300)
    assert process.returncode == 2
    assert err.splitlines()[-1] == ("python -m examples.seq2seq: error: `epochs` must be non-negative. "
                                    "Received: epochs=-1")
    assert not ABSL_LINE.search(err), err


@pytest.mark.slow
@pytest.mark.parametrize("route", train.ROUTES)
def test_fused_head_trains_by_either_route_and_reports_next_to_the_default_head(tmp_path, route, monkeypatch):
    # Both models start from the same weights (the first one built gives them to the second), so that the
    # two heads, computing the same loss, take the same steps.
    initial = []
    build = Seq2SeqModel.build

    def build_alike(model, input_shape=None):
        build(model, input_shape)
        if initial:
            model.set_weights(initial)
        else:
            initial.extend(model.get_weights())

    monkeypatch.setattr(Seq2SeqModel, "build", build_alike)
    lines = []
    dense = train.train(tiny_config(tmp_path, route=route), save=False, log=quiet)
    fused = train.train(tiny_config(tmp_path, route=route, head="fused"), save=route == "fit", log=lines.append)
    assert fused.model.head == "fused" and isinstance(fused.model.projection, tf_seqloss.FusedLinearHead)
    losses = [r["loss"] for r in fused.history]
    assert losses[1] < losses[0] and np.isfinite([r["val_loss"] for r in fused.history]).all()
    # The same loss from the same weights: both epochs of the two heads agree, in training and validation.
    for key in ("loss", "val_loss"):
        np.testing.assert_allclose([r[key] for r in fused.history], [r[key] for r in dense.history], rtol=1e-5,
                                   err_msg=key)
    assert any("the default head's run: token accuracy" in line for line in lines)
    if route == "fit":  # `train` checks that the saved forms decode as the trained model does
        assert fused.keras_path.name.endswith(f"_{route}_fused.keras")
