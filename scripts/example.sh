#!/usr/bin/env bash
# The main job: trains the LSTM encoder-decoder of examples/seq2seq (dates in eight locales -> ISO 8601)
# with tf_seqloss, prints held-out accuracy and sample decodings, plots the loss to runs/seq2seq/<route>/
# and saves the model to saved_models/. Run again to resume an interrupted run; options are passed on,
# e.g. `bash scripts/example.sh --route loop`, `--fresh`, `--help`.
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
.venv/bin/python -m examples.seq2seq "$@"
