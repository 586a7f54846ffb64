"""An LSTM encoder-decoder that learns to rewrite dates written out in eight locales as ISO 8601.

`data` generates the task offline with Babel and tokenises it, `model` holds `Seq2SeqModel` (training,
`calculate_loss` on `tf_seqloss`, greedy decoding, SavedModel export) and `train` runs both training
routes from the command line: `python -m examples.seq2seq --help`.
"""
