"""Masked sequence cross-entropy for TensorFlow 2 and Keras.

The maintained replacement for `tf.contrib.seq2seq.sequence_loss` and `tfa.seq2seq.sequence_loss`, plus
the TF1 `tf.losses.softmax_cross_entropy` family for migrating code.
"""

from tf_seqloss._cross_entropy import IMPLEMENTATIONS
from tf_seqloss._keras_loss import SequenceLoss
from tf_seqloss._layers import FusedLinearHead, SequenceLossLayer, SequenceMask
from tf_seqloss._linear_head import TokenStats, linear_sequence_loss, sampled_sequence_loss
from tf_seqloss._metrics import TokenAccuracy, TokenPerplexity
from tf_seqloss._sequence_loss import sequence_loss
from tf_seqloss._tf1_losses import (
    Reduction,
    compute_weighted_loss,
    softmax_cross_entropy,
    sparse_softmax_cross_entropy,
)

__version__ = "1.0.0"

__all__ = [
    "FusedLinearHead",
    "IMPLEMENTATIONS",
    "Reduction",
    "SequenceLoss",
    "SequenceLossLayer",
    "SequenceMask",
    "TokenAccuracy",
    "TokenPerplexity",
    "TokenStats",
    "compute_weighted_loss",
    "linear_sequence_loss",
    "sequence_loss",
    "sampled_sequence_loss",
    "softmax_cross_entropy",
    "sparse_softmax_cross_entropy",
]
