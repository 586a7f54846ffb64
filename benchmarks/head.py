"""Peak memory and time of the fused linear + cross-entropy head against the materialised logits.

    python benchmarks/head.py                                   # 8192 tokens x 512 features, 8k/32k/128k classes
    python benchmarks/head.py --classes 32768 --modes xla --repeats 3
    python benchmarks/head.py --classes 32768 --rounds 3       # entries alternating, 3 processes each

Each entry runs forward + backward of the mean cross-entropy of `hidden @ kernel + bias` over 8192 tokens
(`[8, 1024, features]`, every token real) and returns the loss and the gradients with respect to hidden,
kernel and bias:

- `fused`: `tf_seqloss.linear_sequence_loss(hidden, kernel, targets, bias=bias)`;
- `materialised`: `tf_seqloss.sequence_loss(hidden @ kernel + bias, targets)`;

in a `tf.function` and in a `tf.function(jit_compile=True)`. Each entry is measured in its own process
(`--entry`), so that one entry's allocator pool and XLA compilation do not affect another's: peak memory
is TensorFlow's CPU allocator peak during one step above what was allocated before it (as in `run.py`),
reported against the floor, the bytes of the gradients themselves (dh + dW + db). Times are medians over
`--repeats` steps, and compared as ratios between the entries of one invocation (fused / materialised in
the same mode). On a shared machine a single process moves by 10-30 %: `--rounds N` runs every entry in N
processes, the entries alternating round after round, and reports the round with the median time (every
round's median in the JSON, `median_s_all`; a failed round is left out, `rounds` counts the others).
Writes `head.md`, `head.json` and `head.png` to `--out`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

# benchmarks/ is on the path of a script run from here
from _common import load_average, median_run, run_in_own_process, write_results

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

ENTRIES = ("fused", "materialised")
MODES = ("function", "xla")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=8192, help="tokens, as [8, tokens / 8] (default 8192)")
    parser.add_argument("--features", type=int, default=512)
    parser.add_argument("--classes", default="8192,32768,131072", help="comma-separated class counts")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--entries", default=",".join(ENTRIES))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=1,
                        help="processes an entry, the entries alternating; the median round is reported (default 1)")
    parser.add_argument("--chunk-size", type=int, default=None, help="the fused head's chunk_size (default auto)")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    parser.add_argument("--entry", help=argparse.SUPPRESS)  # ENTRY,MODE,CLASSES: run one, print JSON
    return parser.parse_args(argv)


def run_entry(entry, mode, classes, args):
    """Measures one entry in this process; returns a result dict."""
    import numpy as np
    import tensorflow as tf

    import tf_seqloss

    batch = 8
    time_ = args.tokens // batch
    rng = np.random.default_rng(0)
    hidden = tf.constant(rng.standard_normal((batch, time_, args.features), dtype=np.float32))
    kernel = tf.constant(rng.standard_normal((args.features, classes), dtype=np.float32) / args.features ** 0.5)
    bias = tf.constant(rng.standard_normal((classes,), dtype=np.float32))
    targets = tf.constant(rng.integers(0, classes, size=(batch, time_)).astype(np.int32))

    def step(hidden, kernel, bias, targets):
        with tf.GradientTape() as tape:
            tape.watch([hidden, kernel, bias])
            if entry == "fused":
                loss = tf_seqloss.linear_sequence_loss(hidden, kernel, targets, bias=bias,
                                                       chunk_size=args.chunk_size)
            else:
                loss = tf_seqloss.sequence_loss(tf.matmul(hidden, kernel) + bias, targets)
        return (loss, *tape.gradient(loss, [hidden, kernel, bias]))

    step = tf.function(step, jit_compile=mode == "xla")
    start = time.perf_counter()
    result = step(hidden, kernel, bias, targets)
    first = time.perf_counter() - start
    loss = float(result[0])
    del result
    tf.config.experimental.reset_memory_stats("CPU:0")
    before = tf.config.experimental.get_memory_info("CPU:0")["current"]
    result = step(hidden, kernel, bias, targets)
    float(result[0])
    peak = tf.config.experimental.get_memory_info("CPU:0")["peak"] - before
    del result
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        float(step(hidden, kernel, bias, targets)[0])
        times.append(time.perf_counter() - start)
    floor = 4 * (args.tokens * args.features + args.features * classes + classes)
    return dict(entry=entry, mode=mode, classes=classes, tokens=args.tokens, features=args.features,
                loss=loss, peak_bytes=peak, floor_bytes=floor, x_floor=peak / floor,
                median_s=float(np.median(times)), times=times, first_call_s=first)


def main(argv=None):
    args = parse_args(argv)
    if args.entry:
        entry, mode, classes = args.entry.split(",")
        try:
            result = run_entry(entry, mode, int(classes), args)
        except Exception as error:  # reported (e.g. out of memory), not fatal to the sweep
            result = dict(entry=entry, mode=mode, classes=int(classes),
                          error=f"{type(error).__name__}: {str(error).splitlines()[0][:160]}")
        print("RESULT " + json.dumps(result))
        return
    load_before = load_average()
    rows = []
    passthrough = ["--tokens", str(args.tokens), "--features", str(args.features), "--repeats", str(args.repeats)]
    if args.chunk_size:
        passthrough += ["--chunk-size", str(args.chunk_size)]
    for classes in [int(c) for c in args.classes.split(",") if c]:
        for mode in args.modes.split(","):
            entries = args.entries.split(",")
            # Round after round of every entry, so that a slow spell of the machine falls on all of them.
            runs = {entry: [] for entry in entries}
            for _ in range(args.rounds):
                for entry in entries:
                    runs[entry].append(run_in_own_process(__file__, f"{entry},{mode},{classes}",
                                                          dict(entry=entry, mode=mode, classes=classes), passthrough))
            rows.extend(median_run(runs[entry], "median_s") for entry in entries)
    by_key = {(r["classes"], r["mode"], r["entry"]): r for r in rows}
    for row in rows:
        other = by_key.get((row["classes"], row["mode"], "materialised"))
        if row["entry"] == "fused" and other and "median_s" in row and "median_s" in other:
            row["x_materialised_time"] = row["median_s"] / other["median_s"]
    meta = dict(command="python benchmarks/head.py " + " ".join(sys.argv[1:] if argv is None else argv),
                load_before=load_before, load_after=load_average(), cores=os.cpu_count())
    write_results(args.out, meta, rows, markdown, plot, stem="head", plot_name="head.png")


def markdown(rows, meta):
    lines = [f"`{meta['command']}`; {meta['cores']} cores, load average before/after: "
             f"{meta['load_before']} / {meta['load_after']}.", "",
             "| classes | mode | entry | peak extra MiB | × floor (dh+dW+db) | median s | × materialised time |",
             "|---:|---|---|---:|---:|---:|---:|"]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['classes']} | {row['mode']} | {row['entry']} | failed: {row['error']} | | | |")
            continue
        ratio = row.get("x_materialised_time")
        lines.append(f"| {row['classes']} | {row['mode']} | {row['entry']} | {row['peak_bytes'] / 2**20:.0f} "
                     f"| {row['x_floor']:.2f} | {row['median_s']:.2f} | {'—' if ratio is None else f'{ratio:.2f}'} |")
    return "\n".join(lines) + "\n"


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_mem, ax_time) = plt.subplots(1, 2, figsize=(12, 4.5))
    for entry, color in zip(ENTRIES, ("C0", "C1")):
        for mode, style in zip(MODES, ("--s", "-o")):
            points = sorted((r["classes"], r) for r in rows
                            if r["entry"] == entry and r["mode"] == mode and "error" not in r)
            if not points:
                continue
            label = f"{entry} ({mode})"
            ax_mem.plot([c for c, _ in points], [r["peak_bytes"] / 2**20 for _, r in points], style, color=color,
                        label=label)
            ax_time.plot([c for c, _ in points], [r["median_s"] for _, r in points], style, color=color, label=label)
    floors = sorted({(r["classes"], r["floor_bytes"]) for r in rows if "floor_bytes" in r})
    ax_mem.plot([c for c, _ in floors], [f / 2**20 for _, f in floors], ":", color="black", label="dh+dW+db floor")
    ax_mem.set(xscale="log", yscale="log", xlabel="classes", ylabel="peak extra MiB, forward + backward",
               title=f"Memory, {rows[0].get('tokens', 8192)} tokens x {rows[0].get('features', 512)} features")
    ax_time.set(xscale="log", yscale="log", xlabel="classes", ylabel="median s, forward + backward",
                title="Time (2 shared cores)")
    for ax in (ax_mem, ax_time):
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
