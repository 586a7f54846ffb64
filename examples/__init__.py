"""Runnable examples of `tf_seqloss` (run them from the repository root, e.g. `python -m examples.seq2seq`)."""
