"""How fast the fused head's three matmuls run on chunks of tokens, against the same products on all tokens.

    python benchmarks/chunked_matmuls.py                   # 8192 x 512 x 32768 float32, chunks 128-512
    python benchmarks/chunked_matmuls.py --shape 8192x128x32768 --chunks 128 --out /tmp/mm

A linear + cross-entropy step makes three products of the same size (2 x tokens x features x classes
FLOPs each): the logits `h @ W`, the kernel gradient `h^T @ g` and the hidden gradient `g @ W^T`. The
materialised path makes each once over all tokens; the fused head (`linear_sequence_loss`) makes them
one chunk of tokens at a time, in a `tf.while_loop`, so that only a chunk's logits exist. Here each
product is timed alone, `whole` (one matmul over all tokens) against `chunk T` (a loop over
`tokens / T` chunks: the kernel gradient summed into one `[features, classes]` accumulator, the hidden
gradient in the fused head's own formulation, `_times_transposed`), in `tf.function`
and under XLA, each mode in its own process, on random inputs. Every chunk reads the whole kernel (and
the kernel gradient reads and writes its accumulator), so the chunked products move `tokens / T` times
the kernel's bytes where the whole ones move it about once: what a chunk's size buys in speed, and what
it costs in memory, is the trade the fused head's `chunk_size` makes.

Printed and written (`results.md`, `results.json`, `plot.png` in `--out`): the fastest of `--repeats`
calls after a first (compiling) one, GFLOP/s, and each chunked product's time as a multiple of the
whole product's. Each product returns the sum of its squares, which the run checks to be the same in
chunks as over all tokens (relative 1e-3).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from _common import load_average, machine, print_entry, run_in_own_process, write_results  # noqa: E402

PRODUCTS = ("logits h @ W", "kernel gradient h^T @ g", "hidden gradient g @ W^T")
MODES = ("function", "xla")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="8192x512x32768", help="tokens x features x classes")
    parser.add_argument("--chunks", default="128,256,512", help="comma-separated tokens per chunk")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "chunked_matmuls"))
    parser.add_argument("--entry", help=argparse.SUPPRESS)  # MODE: run one mode's rows, print JSON
    args = parser.parse_args(argv)
    tokens = int(args.shape.split("x")[0])
    if any(tokens % int(chunk) for chunk in args.chunks.split(",")):
        parser.error(f"--chunks must divide the tokens of --shape ({tokens}), got {args.chunks}")
    return args


def _products(tokens, features, classes, chunk, xla):
    """`{product: fn(h, w, g)}` for one chunk size (`None`: whole), each returning the sum of the squares of
    its product (the same number whole and chunked: the run checks it); `xla` picks the fused head's
    formulation of the hidden gradient for that mode."""
    import tensorflow as tf

    from tf_seqloss._linear_head import _times_transposed

    def squares(x):
        return tf.reduce_sum(tf.square(x))

    if chunk is None:
        return {
            PRODUCTS[0]: lambda h, w, g: squares(tf.matmul(h, w)),
            PRODUCTS[1]: lambda h, w, g: squares(tf.matmul(h, g, transpose_a=True)),
            PRODUCTS[2]: lambda h, w, g: squares(tf.matmul(g, w, transpose_b=True)),
        }
    steps = tokens // chunk

    def loop(body, init):
        return tf.while_loop(lambda c, _: c < steps, lambda c, acc: (c + 1, body(c, acc)), (0, init),
                             parallel_iterations=1)[1]

    def rows(x, c):
        return tf.slice(x, [c * chunk, 0], [chunk, tf.shape(x)[1]])

    def logits(h, w, g):
        return loop(lambda c, acc: acc + squares(tf.matmul(rows(h, c), w)), 0.0)

    def kernel_gradient(h, w, g):
        return squares(loop(lambda c, acc: acc + tf.matmul(rows(h, c), rows(g, c), transpose_a=True),
                            tf.zeros([features, classes])))

    def hidden_gradient(h, w, g):
        return loop(lambda c, acc: acc + squares(_times_transposed(rows(g, c), w, xla)), 0.0)

    return {PRODUCTS[0]: logits, PRODUCTS[1]: kernel_gradient, PRODUCTS[2]: hidden_gradient}


def measure_mode(mode: str, args) -> list:
    import tensorflow as tf

    tokens, features, classes = (int(x) for x in args.shape.split("x"))
    jit = mode == "xla"
    h = tf.random.normal([tokens, features], seed=1)
    w = tf.random.normal([features, classes], seed=2)
    g = tf.random.normal([tokens, classes], seed=3)
    flop = 2.0 * tokens * features * classes
    rows, whole = [], {}
    for chunk in [None] + [int(c) for c in args.chunks.split(",")]:
        for product, fn in _products(tokens, features, classes, chunk, jit).items():
            compiled = tf.function(fn, jit_compile=jit)
            value = float(compiled(h, w, g))  # compiles
            if chunk is None:
                whole[product] = value
            elif abs(value - whole[product]) > 1e-3 * whole[product]:
                raise AssertionError(f"{product} in chunks of {chunk}: {value}, all tokens at once: {whole[product]}")
            times = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                compiled(h, w, g).numpy()
                times.append(time.perf_counter() - start)
            rows.append(dict(mode=mode, product=product, chunk="whole" if chunk is None else chunk,
                             seconds=min(times), gflops=flop / min(times) / 1e9))
    return rows


def markdown(rows, meta) -> str:
    whole = {(r["mode"], r["product"]): r["seconds"] for r in rows if r["chunk"] == "whole"}
    lines = [f"`{meta['command']}`: {meta['shape']} (tokens x features x classes) float32; "
             f"{meta['machine']['cpu']}, {meta['machine']['cores']} cores; load average before/after: "
             f"{meta['load_before']} / {meta['load_after']}.", "",
             "| mode | product | tokens per matmul | s | GFLOP/s | × whole |", "|---|---|---|---:|---:|---:|"]
    for r in rows:
        ratio = r["seconds"] / whole[r["mode"], r["product"]]
        lines.append(f"| {r['mode']} | {r['product']} | {r['chunk']} | {r['seconds']:.3f} | {r['gflops']:.0f} "
                     f"| {ratio:.2f} |")
    return "\n".join(lines) + "\n"


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = sorted({r["mode"] for r in rows}, key=MODES.index)
    fig, axes = plt.subplots(1, len(modes), figsize=(5 * len(modes), 3.6), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        for product in PRODUCTS:
            mine = [r for r in rows if r["mode"] == mode and r["product"] == product]
            chunked = [r for r in mine if r["chunk"] != "whole"]
            line, = ax.plot([r["chunk"] for r in chunked], [r["gflops"] for r in chunked], marker="o", label=product)
            for r in mine:
                if r["chunk"] == "whole":
                    ax.axhline(r["gflops"], color=line.get_color(), linestyle=":")
        ax.set(title=f"{mode} (dotted: all tokens in one matmul)", xlabel="tokens per chunk", ylabel="GFLOP/s",
               xscale="log")
        ax.set_xticks([r["chunk"] for r in rows if r["chunk"] != "whole" and r["mode"] == mode])
        ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    if args.entry:
        row = dict(mode=args.entry)
        print_entry(row, lambda: dict(rows=measure_mode(args.entry, args)))
        return
    passthrough = ["--shape", args.shape, "--chunks", args.chunks, "--repeats", str(args.repeats)]
    meta = dict(command="python benchmarks/chunked_matmuls.py " + " ".join(passthrough), shape=args.shape,
                machine=machine(), load_before=load_average())
    rows = []
    for mode in args.modes.split(","):
        result = run_in_own_process(__file__, mode, dict(mode=mode), passthrough)
        if "error" in result:
            raise SystemExit(f"{mode}: {result['error']}")
        rows += result["rows"]
    meta["load_after"] = load_average()
    write_results(args.out, meta, rows, markdown, plot)


if __name__ == "__main__":
    main()
