"""keras-hub causal LMs trained with `fit`: keras-hub's default compile against the fused head.

    python benchmarks/keras_hub_lm.py                                    # the sweep in benchmarks/README.md
    python benchmarks/keras_hub_lm.py --models gpt2:128:50257 --dtypes float32 --modes function
    python benchmarks/keras_hub_lm.py --models gpt2:128:50257 --modes xla --steps 8 --rounds 3

Each entry runs in a process of its own (no allocator pool, trace or XLA cache shared), builds a backbone
with random weights from config (nothing downloaded) and trains it with `fit` for `--steps` batches of
`--batch` x `--time` tokens whose lengths are drawn from [time / 2, time], padded as keras-hub's
preprocessor marks it (`padding_mask` in the inputs, the same mask as `sample_weight`). Models
(`--models`, `kind:hidden:classes` each):

- `gpt2`: `GPT2Backbone` (`--layers` layers, 2 heads), the output projection tied to the token embedding;
- `gemma`: `GemmaBackbone` with Gemma 2's final soft cap (`final_logit_soft_cap=30`), tied, for the
  128k and 256k vocabularies (the Gemma family's is 256000).

Routes: `default` is the task compiled as keras-hub sets it up (`compile(optimizer=Adam)`: the logits
`[batch, time, classes]`, `SparseCategoricalCrossentropy`, a weighted accuracy); `fused` is the same task
after `tf_seqloss.keras_hub.fused_causal_lm` (no logits; token accuracy and perplexity from the loop);
`floor` (only when asked for with `--routes`) trains the backbone without any head, the output embedding
still getting a dense (zero) gradient and its Adam update: what both routes spend besides the head.
Modes: `function` (`jit_compile=False`, what keras-hub's `"auto"` gives on a CPU) and `xla`
(`jit_compile=True`). `--dtypes bfloat16` builds the task under the `mixed_bfloat16` policy.

Printed per entry: the peak of TensorFlow's CPU allocator during `fit` above what was allocated before it
(weights and optimizer state excluded; the batches are fed from NumPy), the whole `fit`'s wall time
(compilation counted), and tokens per second (real tokens, padding excluded) over the steps after the
first. `× default` divides the fused route's figures by the default route's in the same invocation.
On a shared machine tokens per second move by 10-30 % between processes: `--rounds N` runs every route in
N processes, the routes alternating, and reports the round of median tokens per second (every round's
figure in the JSON, `tokens_per_s_all`; a failed round is left out, `rounds` counts the others).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

# benchmarks/ is on the path of a script run from here
from _common import load_average, machine, median_run, print_entry, run_in_own_process, write_results

ROOT = Path(__file__).resolve().parents[1]
ROUTES = ("default", "fused")
OPTIONAL_ROUTES = ("floor",)
MODES = ("function", "xla")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="gpt2:128:50257,gpt2:768:50257,gemma:128:131072,gemma:128:256000",
                        help="comma-separated kind:hidden:classes (kind gpt2 or gemma)")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--routes", default=",".join(ROUTES))
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--time", type=int, default=256)
    parser.add_argument("--steps", type=int, default=4, help="batches of `fit` (default 4: 1 + 3 timed)")
    parser.add_argument("--chunk-size", type=int, default=None, help="the fused route's chunk_size (default auto)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="processes a route, the routes alternating; the round of median tokens/s is reported")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "keras_hub"))
    parser.add_argument("--entry", help=argparse.SUPPRESS)  # ROUTE,MODE,DTYPE,MODEL: run one, print JSON
    return parser.parse_args(argv)


def _task(kind: str, hidden: int, classes: int, args):
    import keras
    import keras_hub

    keras.utils.set_random_seed(0)
    if kind == "gpt2":
        backbone = keras_hub.models.GPT2Backbone(
            vocabulary_size=classes, num_layers=args.layers, num_heads=2, hidden_dim=hidden,
            intermediate_dim=4 * hidden, max_sequence_length=args.time, dropout=0.0)
        return keras_hub.models.GPT2CausalLM(backbone, preprocessor=None)
    if kind == "gemma":
        backbone = keras_hub.models.GemmaBackbone(
            vocabulary_size=classes, num_layers=args.layers, num_query_heads=2, num_key_value_heads=1,
            hidden_dim=hidden, intermediate_dim=4 * hidden, head_dim=hidden // 2, final_logit_soft_cap=30.0,
            dropout=0.0)
        return keras_hub.models.GemmaCausalLM(backbone, preprocessor=None)
    raise ValueError(f"unknown model kind {kind!r}: gpt2 or gemma")


def _train_without_a_head(causal_lm):
    """Replaces `train_step` by the backbone and the optimizer alone: what both routes spend besides the head.

    The loss is the mean of the hidden states, plus `0 * sum(embeddings)` so that the output embedding gets
    the dense gradient and the dense optimizer update it gets from a head (zero, computed all the same).
    """
    import keras
    import tensorflow as tf

    from tf_seqloss.keras_hub import output_kernel

    def train_step(data):
        x, _, _ = keras.utils.unpack_x_y_sample_weight(data)
        kernel, _ = output_kernel(causal_lm)
        with tf.GradientTape() as tape:
            hidden = causal_lm.backbone(x, training=True)
            loss = tf.reduce_mean(tf.cast(hidden, "float32")) + 0.0 * tf.reduce_sum(tf.cast(kernel, "float32"))
        weights = causal_lm.trainable_weights
        causal_lm.optimizer.apply_gradients(zip(tape.gradient(loss, weights), weights))
        return {"loss": loss}

    object.__setattr__(causal_lm, "train_step", train_step)
    # Keras reads the compiled metrics at the end of the epoch; this step updates none: the step's logs stand.
    object.__setattr__(causal_lm, "get_metrics_result", lambda: {})
    causal_lm.train_function = None


def measure_entry(route: str, mode: str, dtype: str, model: str, args) -> dict:
    import keras
    import numpy as np
    import tensorflow as tf

    kind, hidden, classes = model.split(":")
    hidden, classes = int(hidden), int(classes)
    if dtype != "float32":
        keras.config.set_dtype_policy("mixed_" + dtype)
    causal_lm = _task(kind, hidden, classes, args)
    if route == "fused":
        from tf_seqloss import keras_hub as fused_hub

        causal_lm = fused_hub.fused_causal_lm(causal_lm, chunk_size=args.chunk_size)
    elif route == "floor":
        _train_without_a_head(causal_lm)
    causal_lm.compile(optimizer=keras.optimizers.Adam(1e-4), jit_compile=mode == "xla")
    rng = np.random.default_rng(0)
    rows = args.batch * args.steps
    lengths = rng.integers(args.time // 2, args.time + 1, size=rows)
    lengths[0] = args.time
    padding = np.arange(args.time + 1)[None, :] < lengths[:, None] + 1
    ids = (rng.integers(1, classes, size=padding.shape) * padding).astype("int32")
    x = {"token_ids": ids[:, :-1], "padding_mask": padding[:, :-1].astype("int32")}
    y, weights = ids[:, 1:], padding[:, 1:].astype("float32")
    ends = []

    class Clock(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            ends.append(time.perf_counter())

    tf.config.experimental.reset_memory_stats("CPU:0")
    before = tf.config.experimental.get_memory_info("CPU:0")["current"]
    start = time.perf_counter()
    history = causal_lm.fit(x, y, sample_weight=weights, batch_size=args.batch, epochs=1, verbose=0,
                            shuffle=False, callbacks=[Clock()])
    total = time.perf_counter() - start
    peak = tf.config.experimental.get_memory_info("CPU:0")["peak"] - before
    steady_tokens = weights[args.batch:].sum()
    steady = steady_tokens / (ends[-1] - ends[0]) if len(ends) > 1 else float("nan")
    return dict(peak_bytes=int(peak), fit_s=total, first_s=ends[0] - start, tokens_per_s=float(steady),
                loss=float(history.history["loss"][-1]), jit_compile=bool(causal_lm.jit_compile))


def main(argv=None):
    args = parse_args(argv)
    if args.entry:
        route, mode, dtype, model = args.entry.split(",")
        print_entry(dict(route=route, mode=mode, dtype=dtype, model=model),
                    lambda: measure_entry(route, mode, dtype, model, args))
        return
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    env.pop("TF_USE_LEGACY_KERAS", None)  # keras-hub runs on Keras 3
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    passthrough = ["--layers", str(args.layers), "--batch", str(args.batch), "--time", str(args.time),
                   "--steps", str(args.steps)] + (["--chunk-size", str(args.chunk_size)] if args.chunk_size else [])
    load_before = load_average()
    rows = []
    for model in args.models.split(","):
        for dtype in args.dtypes.split(","):
            for mode in args.modes.split(","):
                routes = args.routes.split(",")
                # Round after round of every route, so that a slow spell of the machine falls on all of them.
                runs = {route: [] for route in routes}
                for _ in range(args.rounds):
                    for route in routes:
                        runs[route].append(run_in_own_process(
                            __file__, f"{route},{mode},{dtype},{model}",
                            dict(route=route, mode=mode, dtype=dtype, model=model), passthrough, env=env, cwd=ROOT))
                rows.extend(median_run(runs[route], "tokens_per_s") for route in routes)
    for row in rows:
        base = next((r for r in rows if r["route"] == "default" and "error" not in r
                     and all(r[k] == row[k] for k in ("mode", "dtype", "model"))), None)
        if base is not None and "error" not in row and base["peak_bytes"] > 0:
            row["x_peak"] = row["peak_bytes"] / base["peak_bytes"]
            row["x_tokens_per_s"] = row["tokens_per_s"] / base["tokens_per_s"]
    meta = dict(command="python benchmarks/keras_hub_lm.py " + " ".join(sys.argv[1:] if argv is None else argv),
                load_before=load_before, load_after=load_average(), **machine(), layers=args.layers,
                batch=args.batch, time=args.time, steps=args.steps, rounds=args.rounds)
    write_results(args.out, meta, rows, markdown, plot, stem="keras_hub_lm", plot_name="keras_hub_lm.png")


def markdown(rows, meta):
    lines = [f"`{meta['command']}`: {meta['layers']} layers, fit of {meta['steps']} batches of {meta['batch']} x "
             f"{meta['time']} tokens (lengths in [time / 2, time])"
             + (f", the round of median tokens/s of {meta['rounds']} an entry" if meta.get("rounds", 1) > 1 else "")
             + f"; {meta['cpu']}, {meta['cores']} cores; load "
             f"average before/after: {meta['load_before']} / {meta['load_after']}.", "",
             "| model (kind:hidden:classes) | dtype | mode | route | peak MiB | × default | fit s | first step s "
             "| tokens/s | × default | last loss | load |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        head = f"| {r['model']} | {r['dtype']} | {r['mode']} | {r['route']} "
        if "error" in r:
            lines.append(head + f"| failed: {r['error']} | | | | | | | |")
            continue
        x_peak, x_speed = ((f"{r[key]:.2f}" if key in r else "—") for key in ("x_peak", "x_tokens_per_s"))
        lines.append(head + f"| {r['peak_bytes'] / 2**20:.0f} | {x_peak} | {r['fit_s']:.1f} "
                     f"| {r['first_s']:.1f} | {r['tokens_per_s']:.0f} | {x_speed} "
                     f"| {r['loss']:.3f} | {r['load']} |")
    return "\n".join(lines) + "\n"


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if "error" not in r and r["route"] in ROUTES]  # the floor is in the table only
    models = list(dict.fromkeys(r["model"] for r in ok))
    groups = list(dict.fromkeys((r["dtype"], r["mode"]) for r in ok))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    if not ok:
        fig.savefig(path, dpi=90)
        plt.close(fig)
        return
    width = 0.8 / max(2 * len(groups), 1)
    for metric, ax, label in (("peak_bytes", axes[0], "peak MiB during fit"),
                              ("tokens_per_s", axes[1], "tokens/s after the first step")):
        for g, (dtype, mode) in enumerate(groups):
            for k, route in enumerate(ROUTES):
                values = []
                for model in models:
                    match = [r for r in ok if (r["model"], r["dtype"], r["mode"], r["route"]) ==
                             (model, dtype, mode, route)]
                    value = match[0][metric] if match else float("nan")
                    values.append(value / 2**20 if metric == "peak_bytes" else value)
                offset = (2 * g + k) * width - 0.4 + width / 2
                ax.bar([i + offset for i in range(len(models))], values, width,
                       label=f"{route}, {dtype}, {mode}", color=f"C{2 * g + k}", alpha=1.0 if k else 0.55)
        ax.set_xticks(range(len(models)), models, fontsize=8)
        ax.set(ylabel=label, yscale="log" if metric == "peak_bytes" else "linear")
        ax.grid(True, axis="y", alpha=0.3)
    axes[1].legend(fontsize=7, ncol=2)
    fig.suptitle("keras-hub causal LM, fit: keras-hub's default compile (light) vs the fused head (solid)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


if __name__ == "__main__":
    main()
