"""Times the loss where users train: variable-length batches and whole training steps, compilations included.

    python benchmarks/scenarios.py                                  # every scenario, about 6 minutes on 2 loaded cores
    python benchmarks/scenarios.py --scenarios varlen --classes 8000 --steps 10   # a quick look

`benchmarks/run.py` times one fixed shape, where every compilation is paid once and forgotten. A seq2seq
batch changes shape every step, and the loss is a part of a step. Each scenario here runs every entry in
its own Python process, so that no tracing or XLA compilation cache is shared, and reports the first
call, the total (compilations included), the median step, tokens per second and TensorFlow's peak memory:

- `varlen`: a custom loop of forward + backward of the masked mean loss over `[batch, time, classes]`
  logits whose `time` is drawn from `[time_min, time_max)` every step, in a `tf.function` whose input
  signature has `None` batch and time (`--modes function`) or the same with `jit_compile=True` (`xla`);
  `--modes retrace` is a `tf.function` without a signature, traced anew for every new shape (static
  sizes), and `--modes eager` runs the step eagerly.
- `train_loop`: a whole training step of a small encoder-decoder (embedding, LSTM encoder, LSTM decoder,
  projection to `classes`, the loss, Adam) in a `tf.function` custom loop with `None` sizes; its entry
  `tf_seqloss.linear_sequence_loss` is the same model trained through the fused head (the loss from the
  decoder's hidden states and the projection's kernel and bias, no logits).
- `fit`: the same model in `model.fit` on a `tf.data` pipeline of variable-length batches, with the
  loss as `SequenceLoss` (Keras picks the compilation, which on a CPU-only machine is no XLA).

Entries: `tf_seqloss[<implementation>]` for each `--implementations`, the peer `tf.nn` (custom loops) or
`keras` (`SparseCategoricalCrossentropy`, in `fit`), and in the training scenarios `null`, the same step
with the loss replaced by `mean(logits)`, whose gradient costs one fill: the loss's share of a step is
`1 - null / entry`. Times are ratios to the best peer (`× peer`), to the fastest `tf_seqloss` entry
(`× best`), and to the copy floor (the same run's `np.copyto` of every step's logits, summed: one read and
one write of the logits). Writes `results.json`, `results.md` and `plot.png` to `--out`.

Every child imports `tf_seqloss` from the checkout this script is in (put first on `PYTHONPATH`), not
from wherever it is installed, so a work tree benchmarks its own copy; `results.json` records the path.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

# benchmarks/ is on the path of a script run from here
from _common import load_average, machine, median_run, write_results

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

SCENARIOS = ("varlen", "train_loop", "fit")
REPOSITORY = Path(__file__).resolve().parents[1]  # the checkout whose `tf_seqloss` is timed
IMPLEMENTATIONS = ("auto", "reference", "fused", "fused_xla")
# `function` and `xla` trace once with `None` sizes; `retrace` (no input signature) traces every new shape
# with static sizes, as a `tf.function` does by default; `eager` runs the step op by op.
VARLEN_MODES = ("function", "xla", "retrace", "eager")
# The fused linear + cross-entropy head, an entry of `train_loop`: the same model and weights, with the
# loss computed from the decoder's hidden states and the projection's kernel, without logits.
HEAD_ENTRY = "tf_seqloss.linear_sequence_loss"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scenarios", default=",".join(SCENARIOS), help=f"comma-separated subset of {SCENARIOS}")
    parser.add_argument("--classes", default="8000,32000",
                        help="comma-separated class counts for `varlen` (default: 8000,32000)")
    parser.add_argument("--steps", default="40,16", help="steps of `varlen` per class count (default: 40,16)")
    parser.add_argument("--modes", default="function",
                        help=f"`varlen` modes, of {VARLEN_MODES} (default: function)")
    parser.add_argument("--train-classes", type=int, default=8000, help="vocabulary of the model (default: 8000)")
    parser.add_argument("--train-steps", type=int, default=24, help="steps of `train_loop` and `fit` (default: 24)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--time-min", type=int, default=10)
    parser.add_argument("--time-max", type=int, default=80, help="exclusive (default: 80)")
    parser.add_argument("--implementations", default=",".join(IMPLEMENTATIONS))
    parser.add_argument("--no-peers", action="store_true", help="no `tf.nn`, `keras` or `null` entries")
    parser.add_argument("--legacy-keras", action="store_true",
                        help="run the children with TF_USE_LEGACY_KERAS=1 (tf_keras instead of Keras 3)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="processes per entry, in rotating order; figures are medians (default: 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "scenarios"))
    parser.add_argument("--child", help=argparse.SUPPRESS)  # JSON job of one child process
    args = parser.parse_args(argv)
    if args.child:
        return args
    args.scenarios = _split(args.scenarios)
    args.classes = [int(v) for v in _split(args.classes)]
    steps = [int(v) for v in _split(args.steps)]
    args.steps = (steps * len(args.classes))[:len(args.classes)] if len(steps) == 1 else steps
    if len(args.steps) != len(args.classes):
        parser.error(f"`--steps` takes one value or one per class count. Received: {args.steps}")
    args.modes = _split(args.modes)
    args.implementations = _split(args.implementations)
    for name, values, allowed in (("scenarios", args.scenarios, SCENARIOS), ("modes", args.modes, VARLEN_MODES),
                                  ("implementations", args.implementations, IMPLEMENTATIONS)):
        for value in values:
            if value not in allowed:
                parser.error(f"`--{name}` must be a subset of {allowed}. Received: {value!r}")
    return args


def _split(text):
    return [s for s in text.split(",") if s]


# ----------------------------------------------------------------------------------------------------------
# The parent: one child process per (scenario, configuration, entry, round).

def jobs(args):
    """Returns the child jobs, grouped by scenario configuration: `[(config, [job, ...])]`."""
    impls = [f"tf_seqloss[{impl}]" for impl in args.implementations]
    common = dict(batch=args.batch, time_min=args.time_min, time_max=args.time_max, seed=args.seed,
                  legacy_keras=args.legacy_keras)
    groups = []
    for scenario in args.scenarios:
        if scenario == "varlen":
            for classes, steps in zip(args.classes, args.steps):
                for mode in args.modes:
                    config = dict(common, scenario=scenario, classes=classes, steps=steps, mode=mode)
                    groups.append((config, impls + ([] if args.no_peers else ["tf.nn"])))
        else:
            config = dict(common, scenario=scenario, classes=args.train_classes, steps=args.train_steps,
                          mode="fit" if scenario == "fit" else "function")
            peer = "keras" if scenario == "fit" else "tf.nn"
            head = [HEAD_ENTRY] if scenario == "train_loop" else []
            groups.append((config, impls + head + ([] if args.no_peers else [peer, "null"])))
    return groups


def run_child(job):
    """Runs one job in a fresh Python process and returns its result row."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPOSITORY)] + [p for p in [env.get("PYTHONPATH")] if p])
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if job.get("legacy_keras"):
        env["TF_USE_LEGACY_KERAS"] = "1"
    done = subprocess.run([sys.executable, __file__, "--child", json.dumps(job)], env=env,
                          capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode or not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return dict(job, error=f"exit {done.returncode}: {tail[:300]}")
    return json.loads(lines[-1])


def main(argv=None):
    args = parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))), flush=True)
        return
    load_before = load_average()
    groups = jobs(args)
    rows = []
    for config, entries in groups:
        runs = {entry: [] for entry in entries}
        for round_ in range(args.rounds):
            for i in range(len(entries)):
                entry = entries[(i + round_) % len(entries)]
                row = run_child(dict(config, entry=entry))
                print(_progress_line(row), file=sys.stderr, flush=True)
                runs[entry].append(row)
        rows += [_median_row(runs[entry]) for entry in entries]
    meta = dict(machine=machine(), load_before=load_before, load_after=load_average(), rounds=args.rounds,
                command="python benchmarks/scenarios.py " + " ".join(sys.argv[1:] if argv is None else argv))
    _add_ratios(rows)
    write_results(args.out, meta, rows, markdown, plot)


def _progress_line(row):
    what = f"{row['scenario']} {row['classes']} {row['mode']} {row['entry']}"
    if "error" in row:
        return f"{what}: failed, {row['error']}"
    return f"{what}: first {row['first_call_s']:.2f} s, total {row['total_s']:.2f} s (load {row['load']})"


def _median_row(runs):
    row = median_run(runs, "total_s")  # the median run, whole
    if "error" not in row:
        row["first_call_s"] = float(np.median([r["first_call_s"] for r in runs if "error" not in r]))
    return row


def _group_key(row):
    return row["scenario"], row["classes"], row["mode"]


def _add_ratios(rows):
    groups = {}
    for row in rows:
        if "error" not in row:
            groups.setdefault(_group_key(row), []).append(row)
    for group in groups.values():
        peers = [r["total_s"] for r in group if not r["entry"].startswith("tf_seqloss") and r["entry"] != "null"]
        ours = [r["total_s"] for r in group if r["entry"].startswith("tf_seqloss")]
        null = [r for r in group if r["entry"] == "null"]
        floor = sorted(r["floor_s"] for r in group)[len(group) // 2]
        for row in group:
            row["group_floor_s"] = floor
            row["x_floor"] = row["total_s"] / floor
            row["x_peer"] = row["total_s"] / min(peers) if peers else None
            row["x_best"] = row["total_s"] / min(ours) if ours else None
            if null and row["entry"] != "null":
                row["loss_share"] = 1.0 - null[0]["median_step_s"] / row["median_step_s"]
                row["loss_share_total"] = 1.0 - null[0]["total_s"] / row["total_s"]


# ----------------------------------------------------------------------------------------------------------
# The child: one entry of one scenario, timed from its first call.

def child(job):
    import tensorflow as tf

    import tf_seqloss

    tf.random.set_seed(job["seed"])
    data = _batches(job, np.random.default_rng(job["seed"]))
    result = dict(job, package=str(Path(tf_seqloss.__file__).resolve().parents[1]))
    floor = 0.0
    for batch in data:  # the copy floor of this run: one read and one write of every step's logits
        shape = (batch["targets"].shape[0], batch["targets"].shape[1], job["classes"])
        source = np.ones(shape, np.float32)
        target = np.empty_like(source)
        start = time.perf_counter()
        np.copyto(target, source)
        floor += time.perf_counter() - start
        del source, target
    result["floor_s"] = floor
    runner = {"varlen": _run_varlen, "train_loop": _run_train_loop, "fit": _run_fit}[job["scenario"]]
    tf.config.experimental.reset_memory_stats("CPU:0")
    before = tf.config.experimental.get_memory_info("CPU:0")["current"]
    times, last_loss = runner(job, data)
    result["peak_bytes"] = tf.config.experimental.get_memory_info("CPU:0")["peak"] - before
    import resource

    result["max_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    tokens = int(sum(batch["lengths"].sum() for batch in data))
    max_time = max(batch["targets"].shape[1] for batch in data)
    result.update(
        times=times, first_call_s=times[0], total_s=float(sum(times)),
        median_step_s=float(np.median(times[1:] or times)),
        tokens=tokens, tokens_per_s=tokens / sum(times), last_loss=last_loss,
        max_logits_bytes=job["batch"] * max_time * job["classes"] * 4,
        load=load_average(), versions=dict(tensorflow=tf.__version__, keras=_keras_version(tf)))
    result["x_logits"] = result["peak_bytes"] / result["max_logits_bytes"]
    return result


def _batches(job, rng):
    """The same variable-length batches for every entry of a configuration (the seed decides)."""
    batches = []
    for _ in range(job["steps"]):
        time_ = int(rng.integers(job["time_min"], job["time_max"]))
        lengths = rng.integers(1, time_ + 1, size=job["batch"]).astype(np.int32)
        lengths[0] = time_
        inside = np.arange(time_)[None, :] < lengths[:, None]
        batch = dict(lengths=lengths, targets=np.where(inside, rng.integers(1, job["classes"], (job["batch"], time_)),
                                                       0).astype(np.int32))
        if job["scenario"] != "varlen":
            source_time = int(rng.integers(job["time_min"], job["time_max"]))
            source_lengths = rng.integers(1, source_time + 1, size=job["batch"])
            source_lengths[0] = source_time
            source_inside = np.arange(source_time)[None, :] < source_lengths[:, None]
            batch["sources"] = np.where(source_inside, rng.integers(1, job["classes"], (job["batch"], source_time)),
                                        0).astype(np.int32)
            batch["decoder_inputs"] = np.where(inside, rng.integers(1, job["classes"], (job["batch"], time_)),
                                               0).astype(np.int32)
        batches.append(batch)
    return batches


def _loss_fn(entry):
    """Returns `loss(logits, targets, lengths)`: the masked mean cross-entropy of `entry`."""
    import tensorflow as tf

    import tf_seqloss

    if entry.startswith("tf_seqloss["):
        implementation = entry[len("tf_seqloss["):-1]
        return lambda logits, targets, lengths: tf_seqloss.sequence_loss(
            logits, targets, lengths=lengths, implementation=implementation)
    if entry == "tf.nn":
        def loss(logits, targets, lengths):
            mask = tf.sequence_mask(lengths, tf.shape(targets)[1], dtype=tf.float32)
            token_loss = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=targets, logits=logits)
            return tf.reduce_sum(token_loss * mask) / tf.reduce_sum(mask)
        return loss
    if entry == "null":
        return lambda logits, targets, lengths: tf.reduce_mean(logits)
    raise ValueError(f"no custom-loop loss for entry {entry!r}")


def _run_varlen(job, data):
    import tensorflow as tf

    classes, batch = job["classes"], job["batch"]
    loss_fn = _loss_fn(job["entry"])
    signature = [tf.TensorSpec([None, None, classes], tf.float32), tf.TensorSpec([None, None], tf.int32),
                 tf.TensorSpec([None], tf.int32)]

    def step(logits, targets, lengths):
        with tf.GradientTape() as tape:
            tape.watch(logits)
            loss = loss_fn(logits, targets, lengths)
        return loss, tape.gradient(loss, logits)

    if job["mode"] in ("function", "xla"):
        step = tf.function(step, input_signature=signature, jit_compile=job["mode"] == "xla")
    elif job["mode"] == "retrace":
        step = tf.function(step)

    rng = np.random.default_rng(job["seed"] + 1)
    pool = (rng.standard_normal((batch, job["time_max"], classes), dtype=np.float32) * 2.0)
    times, loss = [], None
    for item in data:
        logits = tf.constant(pool[:, :item["targets"].shape[1]])
        targets, lengths = tf.constant(item["targets"]), tf.constant(item["lengths"])
        start = time.perf_counter()
        loss, grad = step(logits, targets, lengths)
        loss = float(loss)
        times.append(time.perf_counter() - start)
        del grad, logits
    return times, loss


def build_model(classes, units=128, embedding_dim=64):
    """A small LSTM encoder-decoder: `[sources, decoder_inputs]` -> `[batch, time, classes]` logits."""
    import tensorflow as tf

    keras = tf.keras
    sources = keras.Input((None,), dtype="int32", name="sources")
    decoder_inputs = keras.Input((None,), dtype="int32", name="decoder_inputs")
    embedding = keras.layers.Embedding(classes, embedding_dim, mask_zero=True)
    _, state_h, state_c = keras.layers.LSTM(units, return_state=True)(embedding(sources))
    decoded = keras.layers.LSTM(units, return_sequences=True)(embedding(decoder_inputs),
                                                               initial_state=[state_h, state_c])
    logits = keras.layers.Dense(classes)(decoded)
    return keras.Model([sources, decoder_inputs], logits)


def _run_train_loop(job, data):
    import tensorflow as tf

    import tf_seqloss

    model = build_model(job["classes"])
    optimizer = tf.keras.optimizers.Adam(1e-3)
    if job["entry"] == HEAD_ENTRY:  # the decoder's hidden states and the projection's weights, no logits
        projection = model.layers[-1]
        hidden_model = tf.keras.Model(model.inputs, projection.input)

        def forward_loss(sources, decoder_inputs, targets, lengths):
            hidden = hidden_model([sources, decoder_inputs], training=True)
            return tf_seqloss.linear_sequence_loss(hidden, projection.kernel, targets, bias=projection.bias,
                                                   lengths=lengths)
    else:
        loss_fn = _loss_fn(job["entry"])

        def forward_loss(sources, decoder_inputs, targets, lengths):
            return loss_fn(model([sources, decoder_inputs], training=True), targets, lengths)
    ids = tf.TensorSpec([None, None], tf.int32)

    @tf.function(input_signature=[ids, ids, ids, tf.TensorSpec([None], tf.int32)])
    def step(sources, decoder_inputs, targets, lengths):
        with tf.GradientTape() as tape:
            loss = forward_loss(sources, decoder_inputs, targets, lengths)
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    times, loss = [], None
    for item in data:
        inputs = [tf.constant(item[key]) for key in ("sources", "decoder_inputs", "targets", "lengths")]
        start = time.perf_counter()
        loss = float(step(*inputs))
        times.append(time.perf_counter() - start)
    return times, loss


def _run_fit(job, data):
    import tensorflow as tf

    import tf_seqloss

    entry = job["entry"]
    if entry.startswith("tf_seqloss["):
        loss = tf_seqloss.SequenceLoss(implementation=entry[len("tf_seqloss["):-1])
    elif entry == "keras":
        loss = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    else:  # null
        def loss(y_true, y_pred):
            return tf.reduce_mean(y_pred, axis=-1)
    model = build_model(job["classes"])
    model.compile(optimizer=tf.keras.optimizers.Adam(1e-3), loss=loss)
    ids = tf.TensorSpec([None, None], tf.int32)

    def generate():
        for item in data:
            yield (item["sources"], item["decoder_inputs"]), item["targets"]

    dataset = tf.data.Dataset.from_generator(generate, output_signature=((ids, ids), ids)).prefetch(2)

    class Clock(tf.keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            self.times, self.last = [], time.perf_counter()

        def on_train_batch_end(self, batch, logs=None):
            now = time.perf_counter()
            self.times.append(now - self.last)
            self.last = now
            self.loss = logs.get("loss") if logs else None

    clock = Clock()
    model.fit(dataset, epochs=1, verbose=0, callbacks=[clock])
    loss_value = clock.loss
    return clock.times, None if loss_value is None else float(loss_value)


# ----------------------------------------------------------------------------------------------------------
# Reporting.

def _keras_version(tf):
    if os.environ.get("TF_USE_LEGACY_KERAS") == "1":
        import tf_keras

        return f"tf_keras {tf_keras.__version__}"
    try:
        return tf.keras.__version__
    except AttributeError:
        return None


_TITLES = {
    "varlen": "Variable-length custom loop: forward + backward of the loss",
    "train_loop": "Whole training step, custom loop (`tf.function`, `None` sizes): LSTM encoder-decoder + Adam",
    "fit": "Whole training step, `model.fit` on variable-length `tf.data` batches: LSTM encoder-decoder + Adam",
}

_MODE_TITLES = {
    "function": ", `tf.function` with `None` sizes",
    "xla": ", `tf.function` with `None` sizes (`jit_compile=True`)",
    "retrace": ", `tf.function` without a signature (a trace per new shape, static sizes)",
    "eager": ", eagerly",
}


def _fmt(value, spec, suffix=""):
    return "—" if value is None else format(value, spec) + suffix


def markdown(rows, meta):
    """One table per scenario configuration; every time includes tracing and compilation."""
    versions = next((row["versions"] for row in rows if "versions" in row), {})
    lines = [
        f"Machine: {meta['machine']['cpu']}, {meta['machine']['cores']} cores, Python {meta['machine']['python']}, "
        f"TensorFlow {versions.get('tensorflow')}, Keras {versions.get('keras')}. Load average before/after: "
        f"{meta['load_before']} / {meta['load_after']}. Every entry in its own process "
        f"({meta['rounds']} per entry; the median run is shown). Command: `{meta['command']}`.",
    ]
    groups = {}
    for row in rows:
        groups.setdefault(_group_key(row), []).append(row)
    for (scenario, classes, mode), group in groups.items():
        sample = next((r for r in group if "error" not in r), group[0])
        lines += ["", f"### {_TITLES[scenario]}" + (_MODE_TITLES.get(mode, "") if scenario == "varlen" else ""), "",
                  f"{classes} classes, batch {sample['batch']}, time drawn from [{sample['time_min']}, "
                  f"{sample['time_max']}), {sample['steps']} steps"
                  + (f", {sample['tokens']} target tokens; copy floor {sample['group_floor_s'] * 1e3:.0f} ms in all"
                     if "tokens" in sample and "group_floor_s" in sample else "") + ".", "",
                  "| entry | first call s | total s | median step ms | tokens/s | × best | × peer | × copy floor "
                  "| loss share | peak MB | × largest logits | load |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        best = min((r["total_s"] for r in group if "error" not in r and r["entry"].startswith("tf_seqloss")),
                   default=None)
        for row in group:
            if "error" in row:
                lines.append(f"| {row['entry']} | failed: {row['error'].replace('|', '/')} | | | | | | | | | | |")
                continue
            total = f"{row['total_s']:.2f}"
            if row["total_s"] == best:
                total = f"**{total}**"
            share = row.get("loss_share")
            lines.append(
                f"| {row['entry']} | {row['first_call_s']:.2f} | {total} | {row['median_step_s'] * 1e3:.1f} "
                f"| {row['tokens_per_s']:.0f} | {_fmt(row.get('x_best'), '.2f')} | {_fmt(row.get('x_peer'), '.2f')} "
                f"| {row['x_floor']:.1f} | {_fmt(None if share is None else share * 100, '.0f', '%')} "
                f"| {row['peak_bytes'] / 2**20:.0f} | {row['x_logits']:.2f} | {row['load']} |")
    lines += ["", "`× best`: total time over the fastest `tf_seqloss` entry; `× peer`: over the peer (`tf.nn`, or "
              "Keras' `SparseCategoricalCrossentropy` in `fit`); `× copy floor`: over one `np.copyto` of every "
              "step's logits; `loss share`: `1 - null / entry` of the median step, where `null` replaces the loss "
              "by `mean(logits)`; peak MB: TensorFlow's CPU allocator peak over the run (weights, optimizer state "
              "and activations included in the training scenarios), also as a multiple of the largest step's "
              "float32 logits."]
    return "\n".join(lines) + "\n"


def plot(rows, path):
    """Total time (first call hatched) and tokens per second of every entry, one column per configuration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = {}
    for row in rows:
        if "error" not in row:
            groups.setdefault(_group_key(row), []).append(row)
    if not groups:
        return
    fig, axes = plt.subplots(2, len(groups), figsize=(4.2 * len(groups), 7.5), squeeze=False)
    for column, ((scenario, classes, mode), group) in enumerate(groups.items()):
        names = [r["entry"].replace("tf_seqloss", "") or "tf_seqloss" for r in group]
        colors = ["C0" if r["entry"] == "tf_seqloss[auto]" else "C1" if r["entry"].startswith("tf_seqloss")
                  else "0.6" for r in group]
        positions = range(len(group))
        ax_time, ax_rate = axes[0][column], axes[1][column]
        ax_time.bar(positions, [r["total_s"] for r in group], color=colors)
        ax_time.bar(positions, [r["first_call_s"] for r in group], color="none", edgecolor="black", hatch="//",
                    linewidth=0)
        ax_time.set(title=f"{scenario}, {classes} classes, {mode}", ylabel="total s (hatched: first call)")
        ax_rate.bar(positions, [r["tokens_per_s"] / 1e3 for r in group], color=colors)
        ax_rate.set(ylabel="thousand target tokens / s")
        for ax in (ax_time, ax_rate):
            ax.set_xticks(list(positions))
            ax.set_xticklabels(names, rotation=45, ha="right", fontsize=8)
            ax.grid(True, axis="y", alpha=0.3)
    fig.suptitle("blue: tf_seqloss default (auto); orange: other implementations; grey: peers and null step",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


if __name__ == "__main__":
    main()
