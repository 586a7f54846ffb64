"""What XLA's CPU backend itself takes for the passes of a cross-entropy step, beside `tf_seqloss`'s step.

    python benchmarks/xla_floor.py                       # 16x128x32000 float32, about a minute
    python benchmarks/xla_floor.py --shape 16x128x8000 --repeats 15 --out benchmarks/last_xla_floor

The speed issue measures the XLA step against a copy floor: one NumPy copy of the logits into a
preallocated array. This script puts that floor beside what XLA compiles for the building blocks of any
softmax cross-entropy over `[n, classes]` float32 logits, each a `tf.function(jit_compile=True)`:

- `negate`: one read and one write of the logits into a new buffer (XLA's own copy);
- `exp`: `exp(x - 1)`, the same traffic with the exponentials;
- `exp, row sum`: `reduce_sum(exp(x - 1), -1)`: XLA writes the exponentials out and reduces them in a
  second pass (it does not fuse an elementwise producer into a row reduction on CPU);
- `softmax`: `e / reduce_sum(e, -1)` with `e = exp(x - 1)`: the smallest graph that yields a logits-sized
  softmax, the shape of every cross-entropy gradient;

and the whole forward + backward step of the masked mean loss of `run.py`, for `tf_seqloss` (`"auto"`)
and `tf.nn`, under XLA. Rounds are interleaved as in `run.py`; each figure is the median over `--repeats`
rounds, as a multiple of the copy floor and of XLA's `softmax`. Writes `results.md`, `results.json` and
`plot.png` to `--out`.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import run  # noqa: E402
import tensorflow as tf  # noqa: E402
from _common import load_average, write_results  # noqa: E402  (benchmarks/ is on the path)


def _blocks(flat):
    """The XLA-compiled building blocks, each a function of no arguments returning one tensor."""
    def compiled(fn):
        fn = tf.function(fn, jit_compile=True)
        return lambda: fn(flat)

    def softmax(x):
        e = tf.exp(x - 1.0)
        return e / tf.reduce_sum(e, axis=-1, keepdims=True)

    return [
        ("XLA: negate", compiled(lambda x: -x)),
        ("XLA: exp", compiled(lambda x: tf.exp(x - 1.0))),
        ("XLA: exp, row sum", compiled(lambda x: tf.reduce_sum(tf.exp(x - 1.0), axis=-1))),
        ("XLA: softmax", compiled(softmax)),
    ]


def measure(args):
    data = run.make_data(args.shape, args.seed)
    logits, targets, lengths = run._tf_inputs(data, tf.float32)
    flat = tf.reshape(logits, [-1, args.shape[-1]])
    steps = [("tf_seqloss step (XLA)", run._tf_step(run._tf_seqloss_loss("auto"), "xla", logits, targets, lengths)),
             ("tf.nn step (XLA)", run._tf_step(run._tf_nn_loss, "xla", logits, targets, lengths))]
    entries = [(name, fn, False) for name, fn in _blocks(flat)] + [(name, fn, True) for name, fn in steps]
    for _, fn, is_step in entries:  # compile, and warm up
        for _ in range(args.warmup):
            run._run(fn) if is_step else fn().numpy()
    source = data["logits"]
    target = np.empty_like(source)
    times = {name: [] for name, _, _ in entries}
    times["np.copyto (copy floor)"] = []
    for round_ in range(args.repeats):
        start = time.perf_counter()
        np.copyto(target, source)
        times["np.copyto (copy floor)"].append(time.perf_counter() - start)
        for i in range(len(entries)):
            name, fn, is_step = entries[(i + round_) % len(entries)]
            start = time.perf_counter()
            if is_step:
                run._run(fn)
            else:
                result = fn()
                del result  # TensorFlow runs CPU ops synchronously: the result is complete
            times[name].append(time.perf_counter() - start)
    floor = float(np.median(times["np.copyto (copy floor)"]))
    softmax = float(np.median(times["XLA: softmax"]))
    return [dict(entry=name, median_s=float(np.median(values)), x_floor=float(np.median(values)) / floor,
                 x_softmax=float(np.median(values)) / softmax, times=values)
            for name, values in times.items()]


def markdown(rows, meta):
    lines = [f"# XLA's floor: `[{'x'.join(map(str, meta['shape']))}]` float32", "",
             f"{meta['cpu']}, {meta['cores']} cores; TensorFlow {meta['tensorflow']}; "
             f"median of {meta['repeats']} rounds; load average {meta['load_before']} before, "
             f"{meta['load_after']} after.", "",
             "| entry | median ms | × copy floor | × XLA softmax |", "|---|---:|---:|---:|"]
    for row in rows:
        lines.append(f"| {row['entry']} | {row['median_s'] * 1e3:.1f} | {row['x_floor']:.2f} | "
                     f"{row['x_softmax']:.2f} |")
    return "\n".join(lines) + "\n"


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 0.45 * len(rows) + 1.2))
    names = [row["entry"] for row in rows][::-1]
    ax.barh(names, [row["x_floor"] for row in rows][::-1], color="C0")
    ax.axvline(1.0, color="black", linestyle=":", linewidth=1)
    ax.set(xlabel="median time / copy floor", title="XLA on CPU: building blocks and whole steps")
    ax.grid(True, axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=run._parse_shape, default=run._parse_shape("16x128x32000"),
                        help="BATCHxTIMExCLASSES (default 16x128x32000)")
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results/xla_floor")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    meta = dict(run.machine_and_versions(), shape=list(args.shape), repeats=args.repeats, load_before=load_average())
    rows = measure(args)
    meta["load_after"] = load_average()
    write_results(args.out, meta, rows, markdown, plot)


if __name__ == "__main__":
    main()
