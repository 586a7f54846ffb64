"""Trains `Seq2SeqModel` on the dates task by either route, resumably, then evaluates and saves it.

Routes over the same model and data:

- `fit`: `model.compile(loss=tf_seqloss.SequenceLoss())` and `model.fit`; the loss finds the padding
  through the Keras mask that the model's `Embedding(mask_zero=True)` puts on the logits, and is the
  mean cross-entropy per real token.
- `loop`: a custom loop whose step, under `tf.function`, calls `model.calculate_loss` (the summed
  cross-entropy of the real tokens per sequence, masked with `tf.sequence_mask` of the target lengths).

Every finished epoch is checkpointed (`tf.train.Checkpoint`: weights, optimizer, epoch) under
`<run-dir>/<flavour>/<route>/checkpoints`, after its row of `history.csv` is written; a second run with
the same settings resumes from the last finished epoch. The Keras flavour (`keras3`, or `tf_keras` under
`TF_USE_LEGACY_KERAS=1`) is one of the settings: the two write different checkpoints and `.keras` files,
so each keeps its own run directory and saved models. Run `python -m examples.seq2seq --help` for the
options.

`--replicas N` trains either route on N logical CPUs under `MirroredStrategy`, normalised exactly over the
replicas: `fit` with `SequenceLoss(normalizer="global")`, the loop dividing by the whole batch's sequences;
both report `TokenPerplexity` and `TokenAccuracy`, exact over the replicas and batches.

Every file the example writes replaces its previous version in one step (`write_atomically`), so an
interruption at any moment leaves either the old file or the new one. The checkpoint also records the
run's settings and its history rows, so a `config.json` or `history.csv` found damaged or missing on
resume is rebuilt from it, with a `RunStateWarning`; leftovers of an interrupted write or checkpoint save
are removed when the next run starts.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import functools
import io
import json
import math
import os
import shlex
import shutil
import signal
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf

import tf_seqloss
from examples.seq2seq import data
from examples.seq2seq.files import RunFileError, RunStateWarning, remove_leftovers, replace_folder, write_atomically
from examples.seq2seq.model import FLAVOUR, Seq2SeqModel, export_saved_model, keras

ROUTES = ("fit", "loop")
HISTORY_FIELDS = ("epoch", "loss", "val_loss", "seconds")
# Settings that change what a checkpoint holds or what it was trained on; a resumed run must match them.
_RESUME_KEYS = ("route", "head", "num_lstm_layers", "num_lstm_units", "embedding_dim", "batch_size", "learning_rate",
                "train_examples", "validation_examples", "test_examples", "seed")


@dataclasses.dataclass
class Config:
    """Every knob of a run; the command-line options have the same names (with dashes)."""

    route: str = "fit"
    head: str = "dense"
    epochs: int = 6
    batch_size: int = 64
    num_lstm_layers: int = 1
    num_lstm_units: int = 256
    embedding_dim: int = 64
    learning_rate: float = 3e-3
    train_examples: int = 20000
    validation_examples: int = 1000
    test_examples: int = 1000
    seed: int = 0
    run_dir: str = "runs/seq2seq"
    saved_models_dir: str = "saved_models"
    model_name: str = "seq2seq_dates"
    fresh: bool = False
    samples: int = 8
    progress: bool = True
    replicas: int = 1

    def __post_init__(self):
        if self.route not in ROUTES:
            raise ValueError(f"`route` must be one of {ROUTES}. Received: route={self.route!r}")
        if self.head not in ("dense", "fused"):
            raise ValueError(f"`head` must be 'dense' or 'fused'. Received: head={self.head!r}")
        for name in ("batch_size", "num_lstm_layers", "num_lstm_units", "embedding_dim", "train_examples",
                     "validation_examples", "test_examples", "replicas"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be at least 1. Received: {name}={getattr(self, name)}")
        if self.epochs < 0:
            raise ValueError(f"`epochs` must be non-negative. Received: epochs={self.epochs}")

    @property
    def route_dir(self) -> Path:
        """`<run_dir>/<flavour>/<route>`: checkpoints, `history.csv`, `config.json` and `loss.png`."""
        return Path(self.run_dir) / FLAVOUR / (self.route if self.head == "dense" else f"{self.route}_fused")

    @property
    def saved_models_path(self) -> Path:
        """`<saved_models_dir>/<flavour>`: where the `.keras` file and the SavedModel export go."""
        return Path(self.saved_models_dir) / FLAVOUR

    def settings(self) -> Dict[str, object]:
        """The settings a resumed run must share with its run directory (`config.json`)."""
        return {"keras": FLAVOUR, **{key: getattr(self, key) for key in _RESUME_KEYS}}


@dataclasses.dataclass
class Result:
    """What `train` returns."""

    model: Seq2SeqModel
    history: List[Dict[str, float]]
    resumed_from_epoch: int
    metrics: Dict[str, float]
    predictions: List[str]
    test_examples: List[data.Example]
    keras_path: Optional[Path] = None
    saved_model_path: Optional[Path] = None
    plot_path: Optional[Path] = None
    decoded: List[Tuple[str, str]] = dataclasses.field(default_factory=list)  # `--decode`: (text, iso)


# The files of a run directory, each replaced whole by `write_atomically`.
STATE_FILES = ("config.json", "history.csv", "metrics.json", "loss.png")
# `--decode` refuses longer texts. The generator's longest source is 38 characters (`segunda-feira, 20 de
# fevereiro de 1967`): the cap leaves room for five times that, and keeps a stray paste of a whole file
# from running the encoder for minutes (100 kB took 71 s and 0.93 GB).
MAX_DECODE_CHARS = 200


class InvalidTextError(ValueError):
    """A `--decode` text that the model cannot take (not UTF-8, or too long)."""


def check_decode_texts(texts: Sequence[str]) -> None:
    """Raises `InvalidTextError` unless every text is UTF-8 and at most `MAX_DECODE_CHARS` characters.

    A command-line argument that is not valid UTF-8 reaches Python as a string with lone surrogates
    (`surrogateescape`), which TensorFlow refuses with a traceback; the message shows its bytes instead."""
    for number, text in enumerate(texts, 1):
        try:
            if isinstance(text, bytes):  # as `tf.constant` takes them
                text = text.decode("utf-8")
            else:
                text.encode("utf-8")
        except (UnicodeEncodeError, UnicodeDecodeError):
            if isinstance(text, bytes):
                raw = text
            else:
                raw = text.encode("utf-8", "surrogateescape" if _only_escaped_bytes(text) else "backslashreplace")
            try:
                raw.decode("utf-8")
                where = ""
            except UnicodeDecodeError as error:
                where = f" (byte 0x{raw[error.start]:02x} at position {error.start} is not UTF-8)"
            raise InvalidTextError(
                f"Invalid value for argument `--decode`. Expected UTF-8 text. Received: text {number} = "
                f"{_excerpt(raw)}{where}") from None
        if len(text) > MAX_DECODE_CHARS:
            raise InvalidTextError(
                f"Invalid value for argument `--decode`. Expected at most {MAX_DECODE_CHARS} characters per "
                f"text (about five times the longest date the model is trained on). Received: text {number} "
                f"of {len(text)} characters, {_excerpt(text)}")


def _only_escaped_bytes(text: str) -> bool:
    """Whether every surrogate in `text` is one of the `surrogateescape` ones (U+DC80-U+DCFF)."""
    return all(not 0xD800 <= ord(c) <= 0xDFFF or 0xDC80 <= ord(c) <= 0xDCFF for c in text)


def _excerpt(value, limit: int = 60) -> str:
    """Returns the `repr` of `value`'s first `limit` characters or bytes, with `...` if there are more."""
    return repr(value[:limit]) + ("..." if len(value) > limit else "")


# The checkpoint's copy of `config.json` and `history.csv` (a JSON string variable): what rebuilds them.
_RECORD = "run_record"
_RECORD_KEY = f"{_RECORD}/.ATTRIBUTES/VARIABLE_VALUE"


def _checkpoint_record(latest: Optional[str]) -> Optional[dict]:
    """Returns the record that checkpoint `latest` holds (`{"settings": ..., "history": [...]}`), or None:
    no checkpoint, one written by an earlier version of the example (it has no record), or unreadable."""
    if not latest:
        return None
    try:
        reader = tf.train.load_checkpoint(latest)
        if not reader.has_tensor(_RECORD_KEY):
            return None
        record = json.loads(reader.get_tensor(_RECORD_KEY))
    except (tf.errors.OpError, ValueError):  # restoring it says what is wrong
        return None
    return record if isinstance(record, dict) else None


def _read_history(path: Path) -> Tuple[List[Dict[str, float]], Optional[str]]:
    """Returns `(rows, problem)`: the well-formed rows of `history.csv` from its start, and what is wrong
    with the file (None if nothing)."""
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        return [], "is missing"
    except UnicodeDecodeError:
        return [], "is damaged (not UTF-8 text)"
    except OSError as error:
        return [], f"cannot be read ({error.strerror or error})"
    if not text.strip():
        return [], "is empty"
    lines = text.splitlines(keepends=True)
    cut = not text.endswith("\n")  # every row ends in a line break; a missing one means a torn write
    reader = csv.reader(lines[:-1] if cut else lines)
    header = next(reader, [])
    if tuple(header) != HISTORY_FIELDS:
        return [], f"is damaged (its header is {_excerpt(','.join(header))})"
    rows = []
    for values in reader:
        try:
            if len(values) != len(HISTORY_FIELDS):
                raise ValueError
            # int(float()) also reads the `1.0` epochs that earlier versions wrote after a resume.
            row = {key: int(float(value)) if key == "epoch" else float(value)
                   for key, value in zip(HISTORY_FIELDS, values)}
            if row["epoch"] != len(rows) + 1:
                raise ValueError
        except ValueError:
            return rows, f"is damaged (line {len(rows) + 2} is {_excerpt(','.join(values))})"
        rows.append(row)
    if cut:
        return rows, f"is damaged (line {len(rows) + 2} is cut off)"
    return rows, None


class _RunState:
    """The checkpoint and history of one run directory."""

    def __init__(self, config: Config, model: Seq2SeqModel, optimizer):
        self.dir = config.route_dir
        self.settings = config.settings()
        self.history_path = self.dir / "history.csv"
        self.model, self.optimizer = model, optimizer
        self.epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch")
        self.record = tf.Variable("", dtype=tf.string, trainable=False, name=_RECORD)
        checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer, epoch=self.epoch, **{_RECORD: self.record})
        self.manager = tf.train.CheckpointManager(checkpoint, str(self.dir / "checkpoints"), max_to_keep=2)
        self.history: List[Dict[str, float]] = []
        self.saved_epochs = 0  # epochs in the latest checkpoint
        self.epoch_in_progress = 0  # 1-based, 0 outside training; with `step`, where an interruption hit
        self.step = 0

    def restore(self, write: bool = True) -> int:
        """Restores the last finished epoch, if any; returns how many epochs are done.

        A `history.csv` that is damaged, missing or short of the checkpoint's epochs is rebuilt from the
        checkpoint (and rewritten unless `write=False`), with a `RunStateWarning`."""
        latest = self.manager.latest_checkpoint
        record = _checkpoint_record(latest)
        if latest:
            # A checkpoint of an earlier version of the example holds no record: restored without one.
            root = self.manager.checkpoint if record is not None else tf.train.Checkpoint(
                model=self.model, optimizer=self.optimizer, epoch=self.epoch)
            try:
                root.restore(latest).assert_existing_objects_matched()
            except (ValueError, AssertionError, tf.errors.OpError) as error:
                # `config.json` matched, so the checkpoint was written by other code or copied in.
                raise RunSettingsError(
                    f"The checkpoint {latest} does not fit the model of these settings (keras={FLAVOUR!r}): "
                    f"{str(error).splitlines()[0]} Pass `--fresh` to start the run again, or another "
                    "`--run-dir`.") from None
            if record is not None and record.get("settings") != self.settings:
                raise RunSettingsError(
                    f"The checkpoint {latest} was written with other settings: "
                    f"{_describe_changes(record.get('settings'), self.settings)}. Pass `--fresh` to start the "
                    "run again, or another `--run-dir`.")
        done = self.saved_epochs = int(self.epoch.numpy())
        self.history = self._recover_history(done, latest, record, write)
        return done

    def _recover_history(self, done: int, latest: Optional[str], record: Optional[dict],
                         write: bool) -> List[Dict[str, float]]:
        rows, problem = _read_history(self.history_path)
        # A row written just before an interruption has no checkpoint: that epoch is trained again.
        kept = rows[:done]
        recorded = record.get("history") if record is not None else None
        if isinstance(recorded, list) and len(recorded) >= done:
            history = [{key: int(row[key]) if key == "epoch" else float(row[key]) for key in HISTORY_FIELDS}
                       for row in recorded[:done]]
            if json.dumps(kept) == json.dumps(history):  # (NaN compares equal as JSON text)
                return history
            if problem is None:
                problem = (f"holds {len(rows)} epoch rows for a checkpoint of {done}" if len(rows) < done
                           else "differs from the losses recorded in the checkpoint")
            done_what = "rebuilt" if write else "read (not rewritten: `--decode` writes nothing)"
            message = f"{self.history_path} {problem}; its {done} epoch rows are {done_what} from {latest}."
        else:
            if len(kept) == done:
                return kept
            if problem is None:
                problem = f"holds {len(rows)} epoch rows for a checkpoint of {done}"
            lost = range(len(kept) + 1, done + 1)
            epochs = f"epoch {lost[0]}" if len(lost) == 1 else f"epochs {lost[0]}-{lost[-1]}"
            history = kept + [dict(epoch=epoch, loss=math.nan, val_loss=math.nan, seconds=math.nan) for epoch in lost]
            message = (f"{self.history_path} {problem}, and {latest} (written by an earlier version of the "
                       f"example) does not record the losses: {epochs} cannot be rebuilt and "
                       f"{'are' if len(lost) > 1 else 'is'} kept as rows without values (nan). Training "
                       f"continues from the checkpoint.")
        warnings.warn(message, RunStateWarning, stacklevel=2)
        if write:
            self._write_history(history)
        return history

    def _write_history(self, history: Sequence[Dict[str, float]]) -> None:
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=HISTORY_FIELDS)
        writer.writeheader()
        writer.writerows(history)
        write_atomically(self.history_path, text.getvalue())

    def finish_epoch(self, loss: float, val_loss: float, seconds: float) -> None:
        """Records a finished epoch: its history row first, then the checkpoint that makes it count.

        The checkpoint carries the settings and every history row too, so that `config.json` and
        `history.csv` can be rebuilt from it. Ctrl-C is held back until the record is complete, so that
        the files on disk and what the interruption message says about them always agree."""
        with _ctrl_c_deferred():
            history = self.history + [dict(epoch=len(self.history) + 1, loss=loss, val_loss=val_loss,
                                           seconds=seconds)]
            self._write_history(history)
            self.history = history
            self.record.assign(json.dumps({"settings": self.settings, "history": history}))
            self.epoch.assign(len(self.history))
            with _checkpoint_write_errors(self.manager.directory):
                self.manager.save(checkpoint_number=len(self.history))
            self.saved_epochs = len(self.history)


@contextlib.contextmanager
def _checkpoint_write_errors(where):
    """Turns TensorFlow's error for a checkpoint or SavedModel it could not write (read-only folder, full
    disk) into a one-line `RunFileError`."""
    try:
        yield
    except tf.errors.OpError as error:
        message = (error.message or str(error)).strip().splitlines()[0]
        raise RunFileError(f"Could not write {where}: {message}. The previous checkpoint, if any, is "
                           "unchanged.") from None


@contextlib.contextmanager
def _ctrl_c_deferred():
    """Holds a SIGINT received inside the block until its end, then hands it, once, to the handler it would
    have gone to (`KeyboardInterrupt` by default, `_CtrlCAtStepEnds` while training runs). Nothing changes
    outside the main thread (only it receives signals), where SIGINT is ignored, or where its handler was not
    installed from Python (`getsignal` gives None: it could not be put back)."""
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) in (signal.SIG_IGN, None)):
        yield
        return
    received = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        signal.raise_signal(signal.SIGINT)


class _CtrlCAtStepEnds:
    """While training runs, Ctrl-C takes effect at the end of a step, not wherever it lands.

    A `KeyboardInterrupt` raised in the middle of TensorFlow's or Keras' own Python code (a dataset iterator
    being made, a `tf.function` being called) can leave their native objects half made or half freed. Under
    tf_keras a Ctrl-C landing just after an epoch's checkpoint ended twice with glibc aborting the process
    (`free(): invalid next size (fast)`, status -6) before the interruption message: once in a test run, once
    in 92 tries sending it 0-0.3 s after the checkpoint appeared. So inside the `with` block the first Ctrl-C
    is only noted, and `check()`, called between steps, raises it as `KeyboardInterrupt`, in this file's
    code; a second Ctrl-C before then raises at once, wherever it lands. Nothing changes outside the main
    thread, or where SIGINT does not raise `KeyboardInterrupt` (ignored in a background job, or a handler of
    the caller's own).
    """

    def __init__(self):
        self.pending = False
        self._previous = None

    def _note(self, signum, frame):
        if self.pending:  # pressed again: the user does not want to wait for the step
            raise KeyboardInterrupt
        self.pending = True

    def check(self) -> None:
        """Raises `KeyboardInterrupt` if Ctrl-C was pressed since the block began."""
        if self.pending:
            self.pending = False
            raise KeyboardInterrupt

    def __enter__(self) -> "_CtrlCAtStepEnds":
        if (threading.current_thread() is threading.main_thread()
                and signal.getsignal(signal.SIGINT) is signal.default_int_handler):
            self._previous = signal.signal(signal.SIGINT, self._note)
        return self

    def __exit__(self, *exc_info) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None
        if exc_info[0] is None:
            self.check()  # pressed after the last step: taken now


class RunSettingsError(ValueError):
    """A run directory holds a run with other settings."""


def _describe_changes(recorded, settings: Dict[str, object]) -> str:
    recorded = recorded if isinstance(recorded, dict) else {}
    return ", ".join(f"{key}={value!r} (was {recorded.get(key)!r})" for key, value in settings.items()
                     if recorded.get(key) != value)


def _read_settings(path: Path) -> Tuple[Optional[dict], Optional[str]]:
    """Returns `(settings, problem)` of `config.json`: `(None, None)` if it is missing, `(None, what is
    wrong)` if it is damaged."""
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        return None, None
    except UnicodeDecodeError:
        return None, "is damaged (not UTF-8 text)"
    except OSError as error:
        return None, f"cannot be read ({error.strerror or error})"
    if not text.strip():
        return None, "is empty"
    try:
        settings = json.loads(text)
    except ValueError as error:
        return None, f"is damaged ({error})"
    if not isinstance(settings, dict):
        return None, f"is damaged (a JSON {type(settings).__name__}, not an object)"
    return settings, None


def prepare_run_dir(config: Config, write: bool = True) -> bool:
    """Creates the run directory, or checks that the one there was made with the same settings.

    A `config.json` that is damaged or missing beside a checkpoint is rebuilt from the settings the
    checkpoint records, with a `RunStateWarning`. A checkpoint written by an earlier version of the example
    records none: the settings are then this run's, and only restoring the checkpoint can check them (the
    model's shape), so `config.json` is left to be written once it is restored (`restore_run` does).
    With `write=False` it only checks: the run directory must exist, and nothing is written.

    Returns:
        Whether `config.json` is still to be written once the checkpoint is restored."""
    path = config.route_dir / "config.json"
    settings = config.settings()
    if config.fresh and config.route_dir.exists():
        try:
            shutil.rmtree(config.route_dir)
        except OSError as error:
            raise RunFileError(f"Could not remove {config.route_dir} for `--fresh`: "
                               f"{error.strerror or error}.") from None
    recorded, problem = _read_settings(path)
    unverified = False
    if recorded is None:
        latest = tf.train.latest_checkpoint(str(config.route_dir / "checkpoints"))
        if latest:
            record = _checkpoint_record(latest)
            recorded = record.get("settings") if record is not None else None
            if not isinstance(recorded, dict):
                recorded = None
            state = problem or "is missing"
            if recorded is not None:
                source = f"from the settings recorded in {latest}"
            else:
                unverified = True
                source = (f"from these settings: {latest} was written by an earlier version of the example, "
                          "which recorded none, so only the model's shape is checked against it")
            action = "rebuilt" if write else "read (not rewritten: `--decode` writes nothing)"
            warnings.warn(f"{path} {state}; {action} {source}.", RunStateWarning, stacklevel=2)
        elif not write:
            raise RunSettingsError(f"There is no run in {config.route_dir} to decode with (Keras flavour "
                                   f"{FLAVOUR!r}); train it first with the same options, without `--decode`.")
        elif problem is not None:
            warnings.warn(f"{path} {problem}, and there is no checkpoint beside it; written again from these "
                          "settings.", RunStateWarning, stacklevel=2)
    if recorded is not None and any(recorded.get(key) != value for key, value in settings.items()):
        raise RunSettingsError(f"{config.route_dir} holds a run with other settings: "
                               f"{_describe_changes(recorded, settings)}. Pass `--fresh` to start it again, or "
                               "another `--run-dir`.")
    if write and not unverified:
        write_settings(config)
    return write and unverified


def write_settings(config: Config) -> None:
    """Writes the run's `config.json`, creating its folder."""
    _make_folder(config.route_dir)
    write_atomically(config.route_dir / "config.json", json.dumps(config.settings(), indent=2) + "\n")


def _make_folder(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise RunFileError(f"Could not create {path}: {error.strerror or error}.") from None


def make_optimizer(config: Config):
    return keras.optimizers.Adam(learning_rate=config.learning_rate, clipnorm=1.0)


def load_task(config: Config):
    """Returns `(train, validation, test)` examples and the vocabulary of the training examples."""
    total = config.train_examples + config.validation_examples + config.test_examples
    examples = data.generate_examples(total, seed=config.seed)
    train, validation, test = data.split_examples(examples, config.validation_examples, config.test_examples)
    return train, validation, test, data.build_vocabulary(train)


@dataclasses.dataclass
class Run:
    """A run ready to train: its examples, its model and optimizer restored to the last finished epoch."""

    train_examples: List[data.Example]
    validation_examples: List[data.Example]
    test_examples: List[data.Example]
    model: Seq2SeqModel
    optimizer: object
    state: _RunState
    done: int


@functools.lru_cache(maxsize=None)  # one strategy per process: a second one's collectives would clash
def make_strategy(replicas: int):
    """Returns `MirroredStrategy` over `replicas` logical CPUs, or the default strategy for one."""
    if replicas == 1:
        return tf.distribute.get_strategy()
    cpu = tf.config.list_physical_devices("CPU")[0]
    try:
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * replicas)
    except RuntimeError:  # TensorFlow has already set its devices up in this process.
        if len(tf.config.list_logical_devices("CPU")) < replicas:
            raise RuntimeError(f"`--replicas {replicas}` must be set before TensorFlow initialises its devices; "
                               "run it in a fresh process.") from None
    return tf.distribute.MirroredStrategy([f"/cpu:{i}" for i in range(replicas)])


def restore_run(config: Config, write: bool = True, log: Callable[[str], None] = print) -> Run:
    """Returns the run `config` describes, restored from its last checkpoint if it has one.

    What an interrupted run left behind is removed first (`remove_leftovers`, one `log` line each), and a
    damaged or missing `config.json` or `history.csv` is rebuilt from the checkpoint with a
    `RunStateWarning`. With `write=False` the run must exist and nothing is written or removed (see
    `prepare_run_dir`)."""
    settings_pending = prepare_run_dir(config, write=write)  # settings checked before the data is generated
    if write:
        keras_name, export_name = saved_model_names(config)
        files = [config.route_dir / name for name in STATE_FILES] + [config.saved_models_path / keras_name]
        remove_leftovers(config.route_dir / "checkpoints", files=files,
                         folders=[config.saved_models_path / export_name], log=log)
    strategy = make_strategy(config.replicas)
    train_examples, validation_examples, test_examples, vocabulary = load_task(config)
    with strategy.scope():
        model = Seq2SeqModel.from_vocabulary(vocabulary, num_lstm_layers=config.num_lstm_layers,
                                             num_lstm_units=config.num_lstm_units, embedding_dim=config.embedding_dim,
                                             head=config.head)
        model.build()
        optimizer = make_optimizer(config)
        optimizer.build(model.trainable_variables)  # so that a checkpoint restores its slots at once
        if config.route == "fit":
            # Compiled whether or not epochs remain, so that a saved `.keras` file always holds the optimizer.
            if config.head == "fused":  # the head adds its fused loss itself; the targets come with the inputs
                model.compile(optimizer=optimizer)
            else:  # `normalizer="global"`: the exact token mean over the replicas (the plain mean on one device)
                model.compile(optimizer=optimizer, loss=tf_seqloss.SequenceLoss(normalizer="global"),
                              metrics=[tf_seqloss.TokenPerplexity(), tf_seqloss.TokenAccuracy()])
    state = _RunState(config, model, optimizer)
    done = state.restore(write=write)
    if settings_pending:  # the checkpoint fits these settings' model: they are the run's
        write_settings(config)
    return Run(train_examples, validation_examples, test_examples, model, optimizer, state, done)


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C (or an exception from `on_batch_end`) stopped `train`; the message says where and what is saved."""

    def __init__(self, where: str, saved: str):
        super().__init__(f"Interrupted {where}. {saved}")
        self.where, self.saved = where, saved


def _interruption(stage: str, config: Config, state: Optional[_RunState], steps: int) -> TrainingInterrupted:
    if stage == "training" and state is not None and state.epoch_in_progress:
        if state.epoch_in_progress <= state.saved_epochs:  # stopped just as that epoch was recorded
            where = f"after epoch {state.saved_epochs} of {config.epochs}"
        else:
            where = f"in epoch {state.epoch_in_progress} of {config.epochs}, after step {state.step} of {steps}"
    else:
        where = f"while {stage}"
    if state is None or not state.saved_epochs:
        saved = "No epoch was finished, so nothing is saved: the run starts from scratch when resumed."
    else:
        finished = "epoch 1" if state.saved_epochs == 1 else f"epochs 1-{state.saved_epochs}"
        saved = (f"Saved: {finished} of {config.epochs} in {state.manager.latest_checkpoint} "
                 f"(weights, optimizer, epoch count) and {state.history_path}.")
        if stage == "training":
            saved += (f" Epoch {state.saved_epochs + 1} is trained again from its start when resumed."
                      if state.saved_epochs < config.epochs  # else stopped as the last epoch was recorded
                      else " Every epoch is trained: resuming evaluates and saves the model.")
    return TrainingInterrupted(where, saved)


def train(config: Config, on_batch_end: Optional[Callable[[Seq2SeqModel, int, int], None]] = None,
          save: bool = True, log: Callable[[str], None] = print) -> Result:
    """Trains (or resumes) the run `config` describes, evaluates it on the test examples and saves it.

    `on_batch_end(model, epoch, batch)`, if given, is called after every training step (zero-based
    indices); an exception raised from it interrupts the run as Ctrl-C would. While training runs, Ctrl-C
    takes effect at the end of the step in progress (`_CtrlCAtStepEnds`). A `KeyboardInterrupt` leaves as a
    `TrainingInterrupted` that says where the run stopped and what is saved.
    """
    started = time.perf_counter()
    stage, state, steps = "generating the data and building the model", None, 0
    try:
        run = restore_run(config, log=log)
        train_examples, validation_examples, test_examples = (
            run.train_examples, run.validation_examples, run.test_examples)
        model, optimizer, state, done = run.model, run.optimizer, run.state, run.done
        log(f"{len(train_examples)} training, {len(validation_examples)} validation and {len(test_examples)} "
            f"test examples; vocabulary of {model.vocab_size} ids; {model.count_params():,} parameters; route "
            f"`{config.route}`, {FLAVOUR}; "
            + (f"resuming after epoch {done} of {config.epochs}" if done else "from scratch"))

        train_data = data.make_dataset(model, train_examples, config.batch_size, shuffle_seed=config.seed)
        validation_data = data.make_dataset(model, validation_examples, config.batch_size)
        steps = math.ceil(len(train_examples) / config.batch_size)
        if done < config.epochs:
            stage = "training"
            fit = _fit if config.route == "fit" else _custom_loop
            with _CtrlCAtStepEnds() as ctrl_c:
                fit(config, model, optimizer, state, done, train_data, validation_data, steps, on_batch_end,
                    ctrl_c.check)
            state.epoch_in_progress = 0
        train_seconds = time.perf_counter() - started

        stage = "evaluating the trained model"
        result = _evaluate_and_report(config, model, state, done, test_examples, log,
                                      f" ({train_seconds:.0f} s since start)", record=True)
        result.metrics["train_seconds"] = train_seconds
        if state.history:
            stage = "plotting the loss"
            result.plot_path = plot_history(state.history, config.route_dir / "loss.png", config.route)
            log(f"loss plot: {result.plot_path}")
        if save:
            stage = "saving the models"
            result.keras_path, result.saved_model_path = save_model(model, config, test_examples, log)
        return result
    except KeyboardInterrupt:
        raise _interruption(stage, config, state, steps) from None


def _evaluate_and_report(config: Config, model: Seq2SeqModel, state: _RunState, done: int, test_examples,
                         log, suffix: str = "", record: bool = False) -> Result:
    metrics, predictions = evaluate(model, test_examples, config.batch_size)
    log(f"held-out token accuracy {metrics['token_accuracy']:.2%}, exact-sequence accuracy "
        f"{metrics['sequence_accuracy']:.2%} on {len(test_examples)} test examples{suffix}")
    if record:  # for the other head's run of this route to compare with (decoding writes nothing)
        write_atomically(config.route_dir / "metrics.json", json.dumps(metrics) + "\n")
    other_head = dict(dense="fused", fused="dense")[config.head]
    other = config.route_dir.parent / dataclasses.replace(config, head=other_head).route_dir.name / "metrics.json"
    if other.exists():
        try:
            accuracy = float(json.loads(other.read_bytes())["token_accuracy"])
        except (OSError, ValueError, TypeError, KeyError):  # only a comparison: never a reason to stop
            warnings.warn(f"{other} is damaged; it is rewritten when that run is evaluated again.",
                          RunStateWarning, stacklevel=2)
        else:
            log(f"  the {'default' if config.head == 'fused' else 'fused'} head's run: token accuracy "
                f"{accuracy:.2%} ({other})")
    for example, prediction in list(zip(test_examples, predictions))[:config.samples]:
        mark = "ok" if prediction == example.target else f"expected {example.target}"
        log(f"  {example.source!r:45} -> {prediction}   ({example.locale}, {mark})")
    return Result(model, list(state.history), done, metrics, predictions, test_examples)


def decode(config: Config, texts: Sequence[str], log: Callable[[str], None] = print) -> Result:
    """Restores the run's last finished epoch, evaluates it and decodes `texts`; trains and writes nothing.

    Raises `RunSettingsError` if the run directory holds no finished epoch of these settings, and
    `InvalidTextError` if a text is not UTF-8 or longer than `MAX_DECODE_CHARS` characters."""
    if config.fresh:
        raise RunSettingsError("`--decode` only reads the run; it cannot be combined with `--fresh`. "
                               "Received: --fresh --decode")
    check_decode_texts(texts)  # before the run is restored: a refused text costs nothing
    run = restore_run(config, write=False, log=log)
    if not run.done:
        raise RunSettingsError(f"{config.route_dir} holds no finished epoch to decode with; train it first "
                               "with the same options, without `--decode`.")
    log(f"restored epoch {run.done} of {config.epochs} from {run.state.manager.latest_checkpoint}"
        + ("" if run.done >= config.epochs else
           f" (the run is not finished: run without `--decode` to train epochs {run.done + 1}-{config.epochs})"))
    result = _evaluate_and_report(config, run.model, run.state, run.done, run.test_examples, log)
    isos = run.model.translate(tf.constant(list(texts))).numpy() if texts else []
    result.decoded = [(text, iso.decode("utf-8")) for text, iso in zip(texts, isos)]
    for text, iso in result.decoded:
        log(f"  {text!r} -> {iso}")
    return result


def _fit(config, model, optimizer, state, done, train_data, validation_data, steps, on_batch_end, check_ctrl_c):
    # `restore_run` compiled the model with `optimizer`, and for the default head `SequenceLoss(normalizer="global")`
    # and the token metrics.
    if config.head == "fused":  # the targets go in with the inputs; the head adds the loss
        train_data, validation_data = (d.map(lambda x, y: ((*x, y),)) for d in (train_data, validation_data))

    class Checkpointer(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.epoch = epoch  # Keras passes `on_train_batch_end` no epoch number
            self.started = time.perf_counter()
            state.epoch_in_progress, state.step = epoch + 1, 0

        def on_train_batch_end(self, batch, logs=None):
            state.step = batch + 1
            if on_batch_end is not None:
                on_batch_end(model, self.epoch, batch)
            check_ctrl_c()

        def on_test_batch_end(self, batch, logs=None):
            check_ctrl_c()

        def on_epoch_end(self, epoch, logs=None):
            state.finish_epoch(float(logs["loss"]), float(logs["val_loss"]), time.perf_counter() - self.started)
            check_ctrl_c()

    model.fit(train_data, validation_data=validation_data, epochs=config.epochs, initial_epoch=done,
              callbacks=[Checkpointer()], shuffle=False,  # the dataset reshuffles itself
              verbose=1 if config.progress else 2)  # 2: one line per epoch


def _custom_loop(config, model, optimizer, state, done, train_data, validation_data, steps, on_batch_end,
                 check_ctrl_c):
    from tqdm.auto import tqdm

    strategy = model.distribute_strategy  # MirroredStrategy with --replicas, else the default strategy
    train_data, validation_data = (strategy.experimental_distribute_dataset(d) for d in (train_data, validation_data))
    with strategy.scope():
        token_metrics = [tf_seqloss.TokenPerplexity(), tf_seqloss.TokenAccuracy()]

    def batch_loss(encoder_ids, decoder_inputs, decoder_outputs, training):
        """Returns `(loss, logits)`; the fused head computes its loss without logits (None)."""
        dec_seq_lens = tf.math.count_nonzero(decoder_outputs, axis=1, dtype=tf.int32)  # stop token included
        # The sequences of the whole batch, over all replicas: the replicas' losses add up to the batch's.
        batch_size = tf.distribute.get_replica_context().all_reduce(
            "sum", tf.cast(tf.shape(decoder_outputs)[0], tf.float32))
        if config.head == "fused":
            return model.calculate_fused_loss((encoder_ids, decoder_inputs), dec_seq_lens, decoder_outputs,
                                              batch_size, training=training), None
        logits = model((encoder_ids, decoder_inputs), training=training)
        return model.calculate_loss(logits, dec_seq_lens, decoder_outputs, batch_size), logits

    def train_replica(encoder_ids, decoder_inputs, decoder_outputs):
        with tf.GradientTape() as tape:
            loss, _ = batch_loss(encoder_ids, decoder_inputs, decoder_outputs, training=True)
        # Dense: the replicas' sparse embedding gradients differ in rows, which the all-reduce refuses.
        gradients = [tf.convert_to_tensor(g) for g in tape.gradient(loss, model.trainable_variables)]
        optimizer.apply_gradients(zip(gradients, model.trainable_variables))
        return loss

    def eval_replica(encoder_ids, decoder_inputs, decoder_outputs):
        loss, logits = batch_loss(encoder_ids, decoder_inputs, decoder_outputs, training=False)
        if logits is None:  # the fused head's logits, as decoding uses them, for the metrics only
            logits = model((encoder_ids, decoder_inputs), training=False)
        for metric in token_metrics:  # the logits carry the Keras mask of the padding
            metric.update_state(decoder_outputs, logits)
        return loss

    def on_replicas(step):
        spec = train_data.element_spec
        return tf.function(lambda batch: strategy.reduce("SUM", strategy.run(
            step, args=(batch[0][0], batch[0][1], batch[1])), axis=None), input_signature=[spec])

    train_step, eval_step = on_replicas(train_replica), on_replicas(eval_replica)

    def mean_loss(step, dataset, bar=None):
        # calculate_loss is per sequence in its batch; weighting by batch size gives the epoch's mean.
        total, count = 0.0, 0
        for batch, inputs in enumerate(dataset):
            size = sum(int(part.shape[0]) for part in strategy.experimental_local_results(inputs[1]))
            total += float(step(inputs)) * size
            count += size
            if bar is not None:
                state.step = batch + 1
                bar.update(1)
                bar.set_postfix(loss=f"{total / count:.4f}")
                if on_batch_end is not None:
                    on_batch_end(model, len(state.history), batch)
            check_ctrl_c()
        return total / count

    for epoch in range(done, config.epochs):
        started = time.perf_counter()
        state.epoch_in_progress, state.step = epoch + 1, 0
        with tqdm(total=steps, desc=f"Epoch {epoch + 1}/{config.epochs}", unit="batch",
                  disable=not config.progress, file=sys.stdout) as bar:
            loss = mean_loss(train_step, train_data, bar)
            for metric in token_metrics:
                metric.reset_state()
            val_loss = mean_loss(eval_step, validation_data)
            perplexity, accuracy = (float(metric.result()) for metric in token_metrics)
            bar.set_postfix(loss=f"{loss:.4f}", val_loss=f"{val_loss:.4f}", val_token_perplexity=f"{perplexity:.4f}",
                            val_token_accuracy=f"{accuracy:.4f}")
        state.finish_epoch(loss, val_loss, time.perf_counter() - started)
        if not config.progress:
            print(f"Epoch {epoch + 1}/{config.epochs} - {state.history[-1]['seconds']:.0f}s - loss: {loss:.4f} "
                  f"- val_loss: {val_loss:.4f} - val_token_perplexity: {perplexity:.4f} "
                  f"- val_token_accuracy: {accuracy:.4f}")
        check_ctrl_c()


def evaluate(model: Seq2SeqModel, examples: Sequence[data.Example], batch_size: int):
    """Returns `({"token_accuracy", "sequence_accuracy"}, predictions)` of greedy decoding.

    Token accuracy counts the positions of each target (its stop token included) where the decoded
    token is the target's; exact-sequence accuracy counts the decoded strings equal to the target."""
    decode = tf.function(model.greedy_decode, input_signature=[tf.TensorSpec([None, None], tf.int32)])
    dataset = data.make_dataset(model, examples, batch_size)
    right = total = 0
    predictions: List[str] = []
    for (encoder_ids, _), decoder_outputs in dataset:
        decoded = decode(encoder_ids).numpy()
        targets = decoder_outputs.numpy()
        width = max(decoded.shape[1], targets.shape[1])
        decoded = np.pad(decoded, [(0, 0), (0, width - decoded.shape[1])])
        targets = np.pad(targets, [(0, 0), (0, width - targets.shape[1])])
        real = targets != data.PAD_ID
        right += int(((decoded == targets) & real).sum())
        total += int(real.sum())
        predictions += [text.decode("utf-8") for text in model.ids_to_text(decoded).numpy()]
    exact = np.mean([p == e.target for p, e in zip(predictions, examples)])
    return {"token_accuracy": right / total, "sequence_accuracy": float(exact)}, predictions


def plot_history(history: Sequence[Dict[str, float]], path: Path, route: str) -> Path:
    """Writes a PNG of the training and validation loss per epoch; returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [row["epoch"] for row in history]
    figure, axes = plt.subplots(figsize=(6, 4))
    axes.plot(epochs, [row["loss"] for row in history], "o-", label="training")
    axes.plot(epochs, [row["val_loss"] for row in history], "s--", label="validation")
    axes.set_xlabel("epoch")
    axes.set_ylabel("cross-entropy per token" if route == "fit" else "cross-entropy per sequence")
    axes.set_yscale("log")
    axes.set_title(f"Dates to ISO 8601, route `{route}`")
    axes.legend()
    figure.tight_layout()
    try:
        write_atomically(path, lambda temp: figure.savefig(temp, dpi=100))
    finally:
        plt.close(figure)
    return path


def saved_model_names(config: Config) -> Tuple[str, str]:
    """Returns the names of the `.keras` file and of the SavedModel folder in `config.saved_models_path`."""
    stem = f"{config.model_name}_{config.route_dir.name}"
    return f"{stem}.keras", f"{stem}_savedmodel"


def save_model(model: Seq2SeqModel, config: Config, check_examples, log=print):
    """Saves `<flavour>/<name>_<route>.keras` and the `<name>_<route>_savedmodel` export under
    `saved_models_dir`; checks that both decode as `model` does."""
    folder = config.saved_models_path
    _make_folder(folder)
    keras_name, export_name = saved_model_names(config)
    keras_path, saved_model_path = folder / keras_name, folder / export_name
    # Each replaces the previous one in one step: an interrupted save leaves the previous model in place.
    write_atomically(keras_path, lambda temp: model.save(str(temp)))
    with _checkpoint_write_errors(saved_model_path):
        replace_folder(saved_model_path, lambda temp: export_saved_model(model, temp))

    texts = tf.constant([e.source for e in check_examples[:256]])
    expected = model.translate(texts).numpy()
    reloaded = keras.models.load_model(str(keras_path))
    serving = tf.saved_model.load(str(saved_model_path)).signatures["serving_default"]
    same_keras = bool((reloaded.translate(texts).numpy() == expected).all())
    same_export = bool((serving(text=texts)["iso"].numpy() == expected).all())
    log(f"saved {keras_path} (reloaded, decodes identically: {same_keras}) and {saved_model_path} "
        f"(serving_default, decodes identically: {same_export})")
    if not (same_keras and same_export):
        raise RuntimeError("A saved model decodes differently from the trained one.")
    return keras_path, saved_model_path


# How the user started the example: `scripts/example.sh` sets this, so that `--help` and the resume
# command show the command they typed.
COMMAND_VARIABLE = "TF_SEQLOSS_EXAMPLE_COMMAND"


def command_name() -> str:
    """Returns the command that runs the example, as the user typed it (without options)."""
    return os.environ.get(COMMAND_VARIABLE) or "python -m examples.seq2seq"


def resume_command(argv: Sequence[str]) -> str:
    """Returns the shell command that resumes the run `argv` started: the same options without `--fresh`,
    under the same Keras flavour."""
    flavour = "TF_USE_LEGACY_KERAS=1 " if FLAVOUR == "tf_keras" else ""
    return " ".join([flavour + command_name()] + [shlex.quote(arg) for arg in argv if arg != "--fresh"])


def make_parser() -> argparse.ArgumentParser:
    defaults = Config()
    parser = argparse.ArgumentParser(
        prog=command_name(), allow_abbrev=False,  # no abbreviations: the resume command drops `--fresh`
        description="Train an LSTM encoder-decoder to rewrite dates written out by Babel in eight locales "
                    "as ISO 8601, with tf_seqloss as its loss; evaluate it, plot its loss and save it. "
                    "A second run with the same settings resumes from the last finished epoch. Runs and saved "
                    "models are kept per Keras flavour (keras3, or tf_keras under TF_USE_LEGACY_KERAS=1).")
    parser.add_argument("--route", choices=ROUTES, default=defaults.route,
                        help="`fit`: compile with tf_seqloss.SequenceLoss and fit; `loop`: custom loop on "
                             "Seq2SeqModel.calculate_loss (default: %(default)s)")
    parser.add_argument("--head", choices=("dense", "fused"), default=defaults.head,
                        help="`dense`: Dense projection, loss on the logits; `fused`: tf_seqloss.FusedLinearHead, "
                             "trained on linear_sequence_loss without logits (default: %(default)s)")
    for name, kind, help_text in (
            ("epochs", int, "total epochs, counting those of a resumed run"),
            ("batch_size", int, "sequences per batch"),
            ("num_lstm_layers", int, "LSTM layers of the encoder and of the decoder"),
            ("num_lstm_units", int, "units per LSTM layer"),
            ("embedding_dim", int, "size of the shared token embedding"),
            ("learning_rate", float, "Adam learning rate (gradients clipped to norm 1)"),
            ("train_examples", int, "generated training examples"),
            ("validation_examples", int, "held-out examples for the per-epoch validation loss"),
            ("test_examples", int, "held-out examples for the final accuracy"),
            ("seed", int, "seed of the generated data and the shuffling"),
            ("run_dir", str, "where checkpoints, history.csv and loss.png go (in <flavour>/<route>/)"),
            ("saved_models_dir", str, "where the .keras file and the SavedModel export go (in <flavour>/)"),
            ("model_name", str, "file name stem of the saved models"),
            ("samples", int, "held-out decodings to print"),
            ("replicas", int, "logical CPUs to train on under MirroredStrategy")):
        parser.add_argument("--" + name.replace("_", "-"), type=kind, default=getattr(defaults, name),
                            help=f"{help_text} (default: %(default)s)")
    parser.add_argument("--fresh", action="store_true", help="discard the run's checkpoints and start again")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    parser.add_argument("--no-save", dest="save", action="store_false", help="do not write saved_models/")
    parser.add_argument("--decode", nargs="+", metavar="TEXT", default=(),
                        help="restore the run's last finished epoch, evaluate it and decode these texts, "
                             "e.g. --decode '3 mars 1999'; trains nothing and writes nothing. Each TEXT is "
                             f"UTF-8 of at most {MAX_DECODE_CHARS} characters (about five times the longest "
                             "date the model is trained on)")
    return parser


def _show_warning(prog, show, message, category, filename, lineno, file=None, line=None):
    """Shows a `RunStateWarning` as one line, `<prog>: warning: <message>`; other warnings as Python does."""
    if issubclass(category, RunStateWarning):
        print(f"{prog}: warning: {message}", file=sys.stderr if file is None else file, flush=True)
    else:
        show(message, category, filename, lineno, file, line)


def main(argv: Optional[Sequence[str]] = None) -> Result:
    """Runs the command line `argv` (default: `sys.argv[1:]`). Ctrl-C exits with status 130 after saying
    where the run stopped, what is saved and the command that resumes it."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = make_parser()
    args = vars(parser.parse_args(argv))
    save, texts = args.pop("save"), args.pop("decode")
    try:
        config = Config(**args)
    except ValueError as error:
        parser.error(str(error))
    try:
        with warnings.catch_warnings():  # restores `showwarning` on the way out
            warnings.showwarning = functools.partial(_show_warning, parser.prog, warnings.showwarning)
            return decode(config, texts) if texts else train(config, save=save)
    except (RunSettingsError, InvalidTextError) as error:
        parser.error(str(error))
    except RunFileError as error:  # not a usage error: the message alone, and status 1
        print(f"{parser.prog}: error: {error}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
    except KeyboardInterrupt as interrupt:
        sys.stdout.write("\n")  # end a progress bar's line
        sys.stdout.flush()
        message = str(interrupt) if isinstance(interrupt, TrainingInterrupted) else "Interrupted."
        print(f"{message}\nResume with: {resume_command(argv)}", file=sys.stderr, flush=True)
        raise SystemExit(130) from None

