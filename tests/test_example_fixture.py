"""The committed fixture model `saved_models/fixture/` still loads, decodes and scores as it did.

A change that breaks saved models (a renamed layer or config key, a new weight, a different tokeniser,
another loss) fails here. Each Keras flavour loads its own `.keras` file (tf_keras cannot read Keras 3
files); both load the same SavedModel export. The expected decodings are the generator's ISO 8601
targets, not the model's output; the losses are checked against NumPy float64 from the model's logits
and against the values recorded when the fixture was saved (`python -m examples.seq2seq.make_fixture`).
"""

import json
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

import tf_seqloss
from examples.seq2seq import data
from examples.seq2seq.make_fixture import FLAVOUR
from examples.seq2seq.model import Seq2SeqModel, keras
from tests.reference import token_cross_entropy

FIXTURE = Path(__file__).resolve().parents[1] / "saved_models" / "fixture"
META = json.loads((FIXTURE / "fixture.json").read_text())
EXAMPLES = [data.Example(e["source"], e["target"], e["locale"], "") for e in META["examples"]]
SOURCES = tf.constant([e.source for e in EXAMPLES])
TARGETS = [e.target for e in EXAMPLES]


@pytest.fixture(scope="module")
def model():
    loaded = keras.models.load_model(str(FIXTURE / FLAVOUR / "seq2seq.keras"))
    assert isinstance(loaded, Seq2SeqModel)
    return loaded


@pytest.fixture(scope="module")
def batch(model):
    return next(iter(data.make_dataset(model, EXAMPLES, len(EXAMPLES))))


def test_fixture_model_has_its_recorded_configuration(model):
    for key, value in META["model"].items():
        assert getattr(model, key) == value, key
    assert len(model.weights) == 1 + 2 * 3 * model.num_lstm_layers + 2


def test_fixture_model_decodes_held_out_dates_to_iso(model):
    assert [text.decode() for text in model.translate(SOURCES).numpy()] == TARGETS
    assert model.translate(tf.constant([], tf.string)).shape == [0]


def test_fixture_model_losses_match_numpy_and_the_recorded_values(model, batch):
    (encoder_ids, decoder_inputs), decoder_outputs = batch
    logits = model((encoder_ids, decoder_inputs))
    targets = decoder_outputs.numpy()
    real = targets != data.PAD_ID
    token_losses = token_cross_entropy(logits.numpy(), targets)  # NumPy float64
    expected_mean = token_losses[real].mean()
    expected_per_sequence = token_losses[real].sum() / len(targets)

    token_mean = float(tf_seqloss.SequenceLoss()(decoder_outputs, logits))  # padding from the Keras mask
    lengths = real.sum(axis=1).astype(np.int32)
    per_sequence = float(model.calculate_loss(logits, lengths, decoder_outputs, len(targets)))
    np.testing.assert_allclose(token_mean, expected_mean, rtol=1e-5)
    np.testing.assert_allclose(per_sequence, expected_per_sequence, rtol=1e-5)
    np.testing.assert_allclose(token_mean, META["losses"]["token_mean"], rtol=1e-4)
    np.testing.assert_allclose(per_sequence, META["losses"]["calculate_loss"], rtol=1e-4)
    assert token_mean < 0.2  # a trained model, not one whose weights failed to load


def test_fixture_saved_model_decodes_strings_and_gives_the_same_logits(model, batch):
    exported = tf.saved_model.load(str(FIXTURE / "saved_model"))
    iso = exported.signatures["serving_default"](text=SOURCES)["iso"]
    assert [text.decode() for text in iso.numpy()] == TARGETS
    assert exported.signatures["serving_default"](text=tf.constant([], tf.string))["iso"].shape == [0]
    (encoder_ids, decoder_inputs), decoder_outputs = batch
    exported_logits = exported.signatures["logits"](encoder_ids=encoder_ids, decoder_inputs=decoder_inputs)
    # Only real positions count: Keras 3 and tf_keras LSTMs output different values at masked steps.
    real = decoder_outputs.numpy() != data.PAD_ID
    np.testing.assert_allclose(exported_logits["logits"].numpy()[real],
                               model((encoder_ids, decoder_inputs)).numpy()[real], atol=1e-5)
