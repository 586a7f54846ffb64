"""The task: dates and times that Babel writes out in eight locales, to be rewritten as ISO 8601.

Everything is generated offline from a seed, so a run never downloads anything and the same seed gives
the same examples on every machine with the same Babel (CLDR) version:

    >>> examples = generate_examples(3, seed=0)
    >>> [(e.source, e.target) for e in examples]          # doctest: +SKIP
    [('26 de fev. de 1999', '1999-02-26'), ('14 jan 1983, 09:28', '1983-01-14T09:28'),
     ('september 1988', '1988-09')]

Sources run from 2 to 9 tokens and targets from 3 to 9 (`YYYY-MM`, `YYYY-MM-DD`,
`YYYY-MM-DDTHH:MM`), so batches are padded and the loss must ignore the padding.

Tokens are runs of letters, runs of digits, or single other characters (`tokenize`); the same
TensorFlow string ops tokenise the training data and the SavedModel's string input, so the two cannot
drift apart. A shared vocabulary holds source and target tokens, preceded by the start and stop tokens.
"""

from __future__ import annotations

import collections
import datetime
import random
from typing import Iterable, List, NamedTuple, Sequence, Tuple

import numpy as np
import tensorflow as tf

START, STOP = "<s>", "</s>"
PAD_ID, OOV_ID, START_ID, STOP_ID = 0, 1, 2, 3  # StringLookup(mask_token="") puts "" at 0, OOV at 1.

LOCALES = ("en_US", "en_GB", "fr_FR", "de_DE", "es_ES", "it_IT", "pt_BR", "nl_NL")
FIRST_YEAR, LAST_YEAR = 1950, 2049

# How a source is written, and so which ISO 8601 form its target takes.
DATE_FORMS = ("medium", "long", "full", "yMMMEd")        # -> YYYY-MM-DD
MONTH_FORMS = ("yMMM", "yMMMM")                          # -> YYYY-MM
DATETIME_FORMS = ("medium+time", "long+time")            # -> YYYY-MM-DDTHH:MM
FORMS = DATE_FORMS + MONTH_FORMS + DATETIME_FORMS

# Letters, digits, then anything else but separators, one character at a time.
_TOKEN_PATTERN = r"(\pL+|\pN+|[^\pL\pN\pZ\s])"


class Example(NamedTuple):
    source: str
    target: str
    locale: str
    form: str


def write_out(moment: datetime.datetime, locale: str, form: str) -> Example:
    """Returns `moment` written in `locale` and `form` (one of `FORMS`) with its ISO 8601 target."""
    from babel import Locale
    from babel.dates import format_date, format_skeleton, format_time

    if form in DATE_FORMS:
        if form in ("medium", "long", "full"):
            source = format_date(moment.date(), form, locale=locale)
        else:
            source = format_skeleton(form, moment, locale=locale)
        target = moment.strftime("%Y-%m-%d")
    elif form in MONTH_FORMS:
        source = format_skeleton(form, moment, locale=locale)
        target = moment.strftime("%Y-%m")
    elif form in DATETIME_FORMS:
        date_format = form.split("+")[0]
        pattern = Locale.parse(locale).datetime_formats[date_format]  # e.g. "{1}, {0}": date, time
        source = str(pattern).format(format_time(moment.time(), "short", locale=locale),
                                     format_date(moment.date(), date_format, locale=locale))
        target = moment.strftime("%Y-%m-%dT%H:%M")
    else:
        raise ValueError(f"`form` must be one of {FORMS}. Received: form={form!r}")
    return Example(source, target, locale, form)


def generate_examples(count: int, seed: int = 0, locales: Sequence[str] = LOCALES,
                      forms: Sequence[str] = FORMS) -> List[Example]:
    """Returns `count` examples with distinct sources: uniform dates and minutes in 1950-2049, uniform
    locale and form."""
    try:
        import babel  # noqa: F401
    except ImportError:
        raise ImportError("The example's data needs Babel: `pip install babel` "
                          "(or `pip install -e .[example]`).") from None
    rng = random.Random(seed)
    first = datetime.datetime(FIRST_YEAR, 1, 1)
    span_minutes = int((datetime.datetime(LAST_YEAR + 1, 1, 1) - first).total_seconds() // 60)
    examples, seen = [], set()
    while len(examples) < count:
        moment = first + datetime.timedelta(minutes=rng.randrange(span_minutes))
        example = write_out(moment, rng.choice(locales), rng.choice(forms))
        if example.source not in seen:
            seen.add(example.source)
            examples.append(example)
    return examples


def split_examples(examples: Sequence[Example], validation: int, test: int
                   ) -> Tuple[List[Example], List[Example], List[Example]]:
    """Returns `(train, validation, test)`; sources are distinct, so no held-out input is trained on."""
    if validation + test >= len(examples):
        raise ValueError(f"`validation` + `test` must leave training examples. Received: validation="
                         f"{validation}, test={test} of {len(examples)} examples")
    train_end = len(examples) - validation - test
    return (list(examples[:train_end]), list(examples[train_end:train_end + validation]),
            list(examples[train_end + validation:]))


def tokenize(texts) -> tf.RaggedTensor:
    """Returns the `[batch, (tokens)]` string tokens of a `[batch]` string tensor."""
    texts = tf.convert_to_tensor(texts, tf.string)
    spaced = tf.strings.regex_replace(texts, _TOKEN_PATTERN, r" \1 ")
    spaced = tf.strings.regex_replace(spaced, r"[\pZ\s]+", " ")  # also no-break and narrow spaces
    return tf.strings.split(tf.strings.strip(spaced))


def build_vocabulary(examples: Iterable[Example]) -> List[str]:
    """Returns `[START, STOP]` and then every source and target token, most frequent first."""
    examples = list(examples)
    texts = [e.source for e in examples] + [e.target for e in examples]
    counts = collections.Counter(token.decode("utf-8") for token in tokenize(texts).flat_values.numpy())
    return [START, STOP] + sorted(counts, key=lambda token: (-counts[token], token))


def encode_examples(model, examples: Sequence[Example]):
    """Returns ragged `(encoder_ids, decoder_inputs, decoder_outputs)` int32 ids of `examples`.

    `decoder_inputs` is `START` then the target tokens; `decoder_outputs` is the target tokens then
    `STOP`, so both have the target's length plus one."""
    encoder_ids = model.text_to_ids([e.source for e in examples])
    target_ids = model.text_to_ids([e.target for e in examples])
    column = tf.ones_like(target_ids[:, :1])  # a ragged [batch, 1]
    decoder_inputs = tf.concat([column * START_ID, target_ids], axis=1)
    decoder_outputs = tf.concat([target_ids, column * STOP_ID], axis=1)
    return encoder_ids, decoder_inputs, decoder_outputs


def make_dataset(model, examples: Sequence[Example], batch_size: int, shuffle_seed=None) -> tf.data.Dataset:
    """Returns batches of `((encoder_ids, decoder_inputs), decoder_outputs)`, zero-padded per batch.

    With `shuffle_seed` the examples are reshuffled every epoch; without, they keep their order."""
    encoder_ids, decoder_inputs, decoder_outputs = encode_examples(model, examples)
    dataset = tf.data.Dataset.from_tensor_slices(((encoder_ids, decoder_inputs), decoder_outputs))
    if shuffle_seed is not None:
        dataset = dataset.shuffle(len(examples), seed=shuffle_seed, reshuffle_each_iteration=True)
    dataset = dataset.ragged_batch(batch_size).map(
        lambda inputs, outputs: ((inputs[0].to_tensor(), inputs[1].to_tensor()), outputs.to_tensor()))
    return dataset.prefetch(tf.data.AUTOTUNE)


def padded(ragged) -> np.ndarray:
    """Returns a ragged id tensor as a zero-padded NumPy array."""
    return ragged.to_tensor(default_value=PAD_ID).numpy()
