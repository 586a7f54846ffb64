"""Whole training steps: the logits made inside the step by the projection, loss and gradients of both.

    python benchmarks/steps.py                       # 8 x 256 tokens, 128 features, 8k/32k/50257/128k classes
    python benchmarks/steps.py --classes 50257 --modes static --entries default,tf.nn
    python benchmarks/steps.py --dtype bfloat16      # mixed precision: the logits in bfloat16 (or float16)

Each entry computes, in one step, `logits = hidden @ kernel` (`hidden` `[8, 256, features]`, `kernel`
`[features, classes]`; in half precision both cast to `--dtype` first, as a mixed-precision `Dense` does),
the masked mean cross-entropy over uneven sequence lengths, and the gradients of the loss with respect to
`hidden` and `kernel`. Entries:

- `default`: `tf_seqloss.sequence_loss(logits, targets, lengths=lengths)`, default settings (`"auto"`);
  in `fit`, `tf_seqloss.SequenceLoss()` with the mask as `sample_weight`;
- `tf.nn`: `tf.nn.sparse_softmax_cross_entropy_with_logits` times the mask, over the mask's sum;
- `keras`: `SparseCategoricalCrossentropy(from_logits=True, reduction="sum")` with the mask as
  `sample_weight`, over the mask's sum (in `fit`: the default reduction);
- `linear`: `tf_seqloss.linear_sequence_loss(hidden, kernel, targets, lengths=lengths)`, the fused head
  (not in `fit`);
- `floor`: not a loss but a yardstick for time: the same step with the cross-entropy replaced by the
  masked mean of the logits' sum over classes (`reduce_sum(reduce_sum(logits, -1) * mask) / reduce_sum(mask)`),
  so the projection's three matmuls, a broadcast and a sum, and no softmax: in a `tf.function` about the
  least a step on these logits takes (under XLA its broadcast gradient can cost more than a softmax). Not
  in `fit`, and no ratio of its peak (its logits gradient is a broadcast the others do not hold);
- `fused_xla` (only when asked for with `--entries`): `sequence_loss(..., implementation="fused_xla")`,
  the option that buys speed with static sizes for one more logits-sized buffer (in `fit`, `SequenceLoss`
  with that implementation).

Modes: `function` (a `tf.function` with `None` batch and time sizes; the kernel's shape, a model's weight,
is known), `static` (a `tf.function` traced for
the concrete shape), `xla` (`jit_compile=True`), `fit` (`Dense(classes, use_bias=False)` on the features
in `model.fit` with SGD, over `--fit-steps` batches whose time is drawn from [64, 256)).

Every entry runs in its own process (`--entry`), so no allocator pool, trace or XLA cache is shared.
Peak memory is TensorFlow's CPU allocator peak during the measured calls above what was allocated before
them (inputs and weights excluded): one step for the custom modes, the whole `fit` (after its first batch)
for `fit`. `first s` is the first call, compilation included; `total s` is the first call plus the
`--repeats` steps (in `fit`: the whole `fit`). `× best` divides by the better of `tf.nn` and `keras` in
the same mode and invocation (peak: the lower; time: the faster total).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

# benchmarks/ is on the path of a script run from here
from _common import load_average, machine, print_entry, run_in_own_process, write_results

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # time this checkout's tf_seqloss

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

ENTRIES = ("default", "tf.nn", "keras", "linear", "floor")
OPTIONAL_ENTRIES = ("fused_xla",)
MODES = ("function", "static", "xla", "fit")
PEERS = ("tf.nn", "keras")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--time", type=int, default=256)
    parser.add_argument("--features", type=int, default=128)
    parser.add_argument("--classes", default="8192,32768,50257,131072",
                        help="comma-separated class counts; leave 131072 out to skip the largest")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--entries", default=",".join(ENTRIES))
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                        help="dtype of the logits (half precision: a mixed-precision policy in `fit`)")
    parser.add_argument("--repeats", type=int, default=3, help="steps timed after the first (default 3)")
    parser.add_argument("--fit-steps", type=int, default=6, help="batches of `fit` (default 6)")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    parser.add_argument("--entry", help=argparse.SUPPRESS)  # ENTRY,MODE,CLASSES: run one, print JSON
    return parser.parse_args(argv)


def _masked_mean(entry, logits, targets, mask):
    import tensorflow as tf

    if entry == "floor":  # no softmax: the logits' sum over classes
        return tf.reduce_sum(tf.cast(tf.reduce_sum(logits, -1), tf.float32) * mask) / tf.reduce_sum(mask)
    if entry == "tf.nn":
        # Its kernel has no half-precision CPU kernel: the logits are cast, as users do.
        token_loss = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=targets, logits=tf.cast(logits, tf.float32))
        return tf.reduce_sum(token_loss * mask) / tf.reduce_sum(mask)
    scce = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="sum")
    return scce(targets, logits, sample_weight=mask) / tf.reduce_sum(mask)


def run_custom(entry, mode, classes, args):
    """One custom step in this process: returns the first call's time, the peak and the step times."""
    import numpy as np
    import tensorflow as tf

    import tf_seqloss

    dtype = tf.as_dtype(args.dtype)
    rng = np.random.default_rng(0)
    hidden = tf.constant(rng.standard_normal((args.batch, args.time, args.features), dtype=np.float32))
    kernel = tf.constant(rng.standard_normal((args.features, classes), dtype=np.float32) / args.features ** 0.5)
    targets = tf.constant(rng.integers(0, classes, size=(args.batch, args.time)).astype(np.int32))
    lengths = tf.constant(rng.integers(args.time // 2, args.time + 1, size=args.batch).astype(np.int32))

    def step(hidden, kernel, targets, lengths):
        with tf.GradientTape() as tape:
            tape.watch([hidden, kernel])
            if entry == "linear":
                loss = tf_seqloss.linear_sequence_loss(tf.cast(hidden, dtype), tf.cast(kernel, dtype), targets,
                                                       lengths=lengths)
            else:
                logits = tf.matmul(tf.cast(hidden, dtype), tf.cast(kernel, dtype))
                if entry in ("default", "fused_xla"):
                    loss = tf_seqloss.sequence_loss(logits, targets, lengths=lengths, **_package_options(entry))
                else:
                    mask = tf.sequence_mask(lengths, tf.shape(targets)[1], dtype=tf.float32)
                    loss = _masked_mean(entry, logits, targets, mask)
        return (loss, *tape.gradient(loss, [hidden, kernel]))

    if mode == "function":
        signature = [tf.TensorSpec([None, None, args.features], tf.float32),
                     tf.TensorSpec([args.features, classes], tf.float32),
                     tf.TensorSpec([None, None], tf.int32), tf.TensorSpec([None], tf.int32)]
        step = tf.function(step, input_signature=signature)
    else:
        step = tf.function(step, jit_compile=mode == "xla")
    inputs = (hidden, kernel, targets, lengths)
    start = time.perf_counter()
    loss = float(step(*inputs)[0])
    first = time.perf_counter() - start
    tf.config.experimental.reset_memory_stats("CPU:0")
    before = tf.config.experimental.get_memory_info("CPU:0")["current"]
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        float(step(*inputs)[0])
        times.append(time.perf_counter() - start)
    peak = tf.config.experimental.get_memory_info("CPU:0")["peak"] - before
    reference = _reference_loss(hidden.numpy(), kernel.numpy(), targets.numpy(), lengths.numpy(), dtype,
                                floor=entry == "floor")
    return dict(first_s=first, times=times, total_s=first + sum(times), peak_bytes=peak, loss=loss,
                loss_error=abs(loss - reference) / abs(reference))


def _package_options(entry):
    """The package's arguments for `entry`: none at all for `default` (`"auto"`), else the implementation."""
    return {} if entry == "default" else {"implementation": entry}


def _reference_loss(hidden, kernel, targets, lengths, dtype, floor=False):
    """The masked mean in NumPy float64 of the logits as the step makes them (rounded to `dtype`): of the
    cross-entropy, or with `floor=True` of the logits' sum over classes (the `floor` entry's)."""
    import numpy as np
    import tensorflow as tf

    rounded = [tf.cast(tf.cast(x, dtype), tf.float64).numpy() for x in (hidden, kernel)]
    logits = tf.cast(tf.cast(rounded[0] @ rounded[1], dtype), tf.float64).numpy()
    mask = np.arange(targets.shape[1])[None, :] < lengths[:, None]
    if floor:
        return float((logits.sum(-1) * mask).sum() / mask.sum())
    shift = logits.max(-1, keepdims=True)
    lse = np.log(np.exp(logits - shift).sum(-1)) + shift[..., 0]
    ce = lse - np.take_along_axis(logits, targets[..., None], -1)[..., 0]
    return float((ce * mask).sum() / mask.sum())


def run_fit(entry, classes, args):
    """`model.fit` over variable-length batches in this process."""
    import numpy as np
    import tensorflow as tf

    import tf_seqloss

    if args.dtype != "float32":
        tf.keras.mixed_precision.set_global_policy("mixed_" + args.dtype)
    if entry in ("default", "fused_xla"):
        loss = tf_seqloss.SequenceLoss(**_package_options(entry))
    elif entry == "keras":
        loss = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    elif entry == "tf.nn":
        def loss(y_true, y_pred):
            return tf.nn.sparse_softmax_cross_entropy_with_logits(
                labels=tf.cast(y_true, tf.int32), logits=tf.cast(y_pred, tf.float32))
    else:
        raise ValueError(f"no `fit` entry {entry!r}")
    inputs = tf.keras.Input([None, args.features])
    model = tf.keras.Model(inputs, tf.keras.layers.Dense(classes, use_bias=False)(inputs))
    model.compile(optimizer=tf.keras.optimizers.SGD(0.01), loss=loss)
    rng = np.random.default_rng(0)
    data = []
    for _ in range(args.fit_steps + 1):
        time_ = int(rng.integers(args.time // 4, args.time))
        lengths = rng.integers(time_ // 2, time_ + 1, size=args.batch)
        mask = (np.arange(time_)[None, :] < lengths[:, None]).astype(np.float32)
        data.append((rng.standard_normal((args.batch, time_, args.features), dtype=np.float32),
                     rng.integers(0, classes, size=(args.batch, time_)).astype(np.int32), mask))
    data[0] = tuple(x[:, :args.time // 4] for x in data[0])  # the first batch, outside the measurement
    spec = (tf.TensorSpec([None, None, args.features], tf.float32), tf.TensorSpec([None, None], tf.int32),
            tf.TensorSpec([None, None], tf.float32))
    start = time.perf_counter()
    model.fit(tf.data.Dataset.from_generator(lambda: iter(data[:1]), output_signature=spec), verbose=0)
    first = time.perf_counter() - start
    tf.config.experimental.reset_memory_stats("CPU:0")
    before = tf.config.experimental.get_memory_info("CPU:0")["current"]
    start = time.perf_counter()
    history = model.fit(tf.data.Dataset.from_generator(lambda: iter(data[1:]), output_signature=spec), verbose=0)
    rest = time.perf_counter() - start
    peak = tf.config.experimental.get_memory_info("CPU:0")["peak"] - before
    return dict(first_s=first, times=[rest], total_s=first + rest, peak_bytes=peak,
                loss=float(history.history["loss"][-1]))


def main(argv=None):
    args = parse_args(argv)
    if args.entry:
        entry, mode, classes = args.entry.split(",")
        print_entry(dict(entry=entry, mode=mode, classes=int(classes), dtype=args.dtype),
                    lambda: run_fit(entry, int(classes), args) if mode == "fit" else
                    run_custom(entry, mode, int(classes), args))
        return
    load_before = load_average()
    passthrough = ["--batch", str(args.batch), "--time", str(args.time), "--features", str(args.features),
                   "--dtype", args.dtype, "--repeats", str(args.repeats), "--fit-steps", str(args.fit_steps)]
    rows = []
    for classes in [int(c) for c in args.classes.split(",") if c]:
        for mode in args.modes.split(","):
            for entry in args.entries.split(","):
                if mode == "fit" and entry in ("linear", "floor"):
                    continue
                rows.append(run_in_own_process(__file__, f"{entry},{mode},{classes}",
                                      dict(entry=entry, mode=mode, classes=classes), passthrough))
    _add_ratios(rows)
    meta = dict(command="python benchmarks/steps.py " + " ".join(sys.argv[1:] if argv is None else argv),
                load_before=load_before, load_after=load_average(), **machine(), dtype=args.dtype,
                batch=args.batch, time=args.time, features=args.features)
    write_results(args.out, meta, rows, markdown, plot, stem="steps", plot_name="steps.png")


def _add_ratios(rows):
    for row in rows:
        peers = [r for r in rows if r["classes"] == row["classes"] and r["mode"] == row["mode"]
                 and r["entry"] in PEERS and "error" not in r]
        if peers and "error" not in row:
            best_peak = min(r["peak_bytes"] for r in peers)
            # Tiny shapes can peak at nothing the allocator counts: no ratio then (NaN in the table).
            if row["entry"] != "floor":  # a yardstick for time only
                row["x_best_peak"] = row["peak_bytes"] / best_peak if best_peak else float("nan")
            row["x_best_time"] = row["total_s"] / min(r["total_s"] for r in peers)


MODE_TITLES = {"function": "`tf.function` with `None` sizes", "static": "`tf.function`, static sizes",
               "xla": "`tf.function(jit_compile=True)`", "fit": "`model.fit`, variable-length batches"}


def markdown(rows, meta):
    lines = [f"`{meta['command']}`: {meta['batch']} x {meta['time']} tokens, {meta['features']} features, "
             f"{meta['dtype']} logits; {meta['cpu']}, {meta['cores']} cores; load average before/after: "
             f"{meta['load_before']} / {meta['load_after']}.", ""]
    for mode in MODES:
        mode_rows = [r for r in rows if r["mode"] == mode]
        if not mode_rows:
            continue
        lines += [f"#### {MODE_TITLES[mode]}", "",
                  "| classes | entry | peak MiB | × best peak | first s | total s | × best time | load |",
                  "|---:|---|---:|---:|---:|---:|---:|---|"]
        for row in mode_rows:
            if "error" in row:
                lines.append(f"| {row['classes']} | {row['entry']} | failed: {row['error']} | | | | | |")
                continue
            lines.append(f"| {row['classes']} | {row['entry']} | {row['peak_bytes'] / 2**20:.0f} "
                         f"| {row.get('x_best_peak', float('nan')):.2f} | {row['first_s']:.2f} "
                         f"| {row['total_s']:.2f} | {row.get('x_best_time', float('nan')):.2f} "
                         f"| {row.get('load', '')} |")
        lines.append("")
    return "\n".join(lines)


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = [m for m in MODES if any(r["mode"] == m for r in rows)]
    fig, axes = plt.subplots(2, len(modes), figsize=(4.2 * len(modes), 7), squeeze=False)
    for column, mode in enumerate(modes):
        for entry, color in zip(ENTRIES + OPTIONAL_ENTRIES, ("C0", "C1", "C2", "C3", "C7", "C4")):
            points = sorted((r["classes"], r) for r in rows
                            if r["entry"] == entry and r["mode"] == mode and "error" not in r)
            if not points:
                continue
            classes = [c for c, _ in points]
            if entry != "floor":  # a yardstick for time only
                axes[0, column].plot(classes, [r["peak_bytes"] / 2**20 for _, r in points], "-o", color=color,
                                     label=entry)
            axes[1, column].plot(classes, [r["total_s"] for _, r in points], "-o", color=color, label=entry)
        axes[0, column].set(title=MODE_TITLES[mode].replace("`", ""), ylabel="peak MiB")
        axes[1, column].set(xlabel="classes", ylabel="total s (first call included)")
        for ax in axes[:, column]:
            ax.set(xscale="log", yscale="log")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


if __name__ == "__main__":
    main()
