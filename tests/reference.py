"""An independent NumPy float64 implementation of the sequence loss, written from the contrib/TFA docs."""

from __future__ import annotations

import numpy as np


def log_softmax(logits):
    logits = np.asarray(logits, np.float64)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def log_sum_exp(logits):
    logits = np.asarray(logits, np.float64)
    top = logits.max(axis=-1)
    return top + np.log(np.exp(logits - top[..., None]).sum(axis=-1))


def token_cross_entropy(logits, targets, label_smoothing=0.0, z_loss=0.0):
    """`[batch, time]` cross-entropy of sparse ids or `[batch, time, classes]` probabilities.

    `z_loss=z` adds PaLM's `z * logsumexp(logits)**2` to every token's loss.
    """
    logp = log_softmax(logits)
    num_classes = logp.shape[-1]
    targets = np.asarray(targets)
    if targets.ndim == logp.ndim - 1:
        probs = np.eye(num_classes)[targets]
    else:
        probs = targets.astype(np.float64)
    probs = probs * (1.0 - label_smoothing) + label_smoothing / num_classes
    return -(probs * logp).sum(axis=-1) + z_loss * log_sum_exp(logits) ** 2


def sequence_loss(logits, targets, weights, average_across_timesteps=True, average_across_batch=True,
                  sum_over_timesteps=False, sum_over_batch=False, label_smoothing=0.0, epsilon=None, z_loss=0.0):
    weights = np.asarray(weights, np.float64)
    weighted = token_cross_entropy(logits, targets, label_smoothing, z_loss) * weights
    axes = tuple(axis for axis, on in ((0, average_across_batch or sum_over_batch),
                                       (1, average_across_timesteps or sum_over_timesteps)) if on)
    if not axes:
        return weighted
    total = weighted.sum(axis=axes)
    if average_across_batch or average_across_timesteps:
        norm = weights.sum(axis=axes)
    else:
        norm = (weights != 0).sum(axis=axes).astype(np.float64)
    if epsilon is not None:
        return total / (norm + epsilon)
    return np.where(norm == 0, 0.0, total / np.where(norm == 0, 1.0, norm))


def sequence_loss_grad(logits, targets, weights, **flags):
    """d(sum(loss)) / d(logits), by the closed form: weight * (softmax - target) / normaliser."""
    logits = np.asarray(logits, np.float64)
    weights = np.asarray(weights, np.float64)
    num_classes = logits.shape[-1]
    ls = flags.get("label_smoothing", 0.0)
    targets = np.asarray(targets)
    probs = np.eye(num_classes)[targets] if targets.ndim == 2 else targets.astype(np.float64)
    probs = probs * (1.0 - ls) + ls / num_classes
    per_token = np.exp(log_softmax(logits)) - probs
    # d(z * lse**2) / d logits = 2 * z * lse * softmax.
    per_token += 2.0 * flags.get("z_loss", 0.0) * log_sum_exp(logits)[..., None] * np.exp(log_softmax(logits))
    avg_t, avg_b = flags.get("average_across_timesteps", True), flags.get("average_across_batch", True)
    sum_t, sum_b = flags.get("sum_over_timesteps", False), flags.get("sum_over_batch", False)
    axes = tuple(axis for axis, on in ((0, avg_b or sum_b), (1, avg_t or sum_t)) if on)
    if not axes:
        scale = weights
    else:
        norm = weights.sum(axis=axes, keepdims=True) if (avg_t or avg_b) else \
            (weights != 0).sum(axis=axes, keepdims=True).astype(np.float64)
        if flags.get("epsilon") is not None:
            scale = weights / (norm + flags["epsilon"])
        else:
            scale = np.where(norm == 0, 0.0, weights / np.where(norm == 0, 1.0, norm))
    return per_token * scale[..., None]


def sequence_loss_weights_grad(logits, targets, weights, average_across_timesteps=True,
                               average_across_batch=True, sum_over_timesteps=False, sum_over_batch=False,
                               label_smoothing=0.0, epsilon=None, z_loss=0.0):
    """d(sum(loss)) / d(weights), in closed form.

    A token of weight 0 is padding and its loss counts as 0 (its logits are never read). With the averaging
    flags `loss = sum(w * ce) / sum(w)`, so `d loss / d w_i = (ce_i - loss) / sum(w)` (contrib's formula) at
    a non-zero weight and `-loss / sum(w)` at a zero one. The `sum_over_*` flags divide by the count of
    non-zero weights, which is piecewise constant: `ce_i / count`, and 0 at a zero weight.
    """
    weights = np.asarray(weights, np.float64)
    ce = np.where(weights != 0, token_cross_entropy(logits, targets, label_smoothing, z_loss), 0.0)
    averaging = average_across_timesteps or average_across_batch
    axes = tuple(axis for axis, on in ((0, average_across_batch or sum_over_batch),
                                       (1, average_across_timesteps or sum_over_timesteps)) if on)
    if not axes:
        return ce
    norm = weights.sum(axis=axes, keepdims=True) if averaging else \
        (weights != 0).sum(axis=axes, keepdims=True).astype(np.float64)
    if epsilon is not None:
        norm = norm + epsilon
    safe = np.where(norm == 0, 1.0, norm)
    loss = (ce * weights).sum(axis=axes, keepdims=True) / safe
    grad = (ce - loss) / safe if averaging else ce / safe
    return np.where(norm == 0, 0.0, grad)


def linear_token_mean(features, kernel, targets, weights):
    """Returns `(loss, d loss / d kernel)` of the weighted token mean of `logits = features @ kernel`.

    `features` `[batch, time, dim]`, `kernel` `[dim, classes]`, `targets` `[batch, time]` ids, `weights`
    `[batch, time]`; float64 throughout, the gradient in closed form: `x^T w (softmax - onehot) / sum(w)`.
    """
    features, kernel, weights = (np.asarray(a, np.float64) for a in (features, kernel, weights))
    logits = features @ kernel
    log_probs = log_softmax(logits)
    onehot = np.eye(kernel.shape[1])[np.asarray(targets)]
    total = weights.sum()
    loss = -(weights * (onehot * log_probs).sum(-1)).sum() / total
    dlogits = weights[..., None] * (np.exp(log_probs) - onehot) / total
    return loss, np.einsum("btd,btc->dc", features, dlogits)
