"""Times forward + backward of a masked sequence loss: `tf_seqloss` against what users would use instead.

    python benchmarks/run.py                      # the default sweep, a few minutes on 2 cores
    python benchmarks/run.py --shapes 16x128x32000 --modes xla --repeats 15
    python benchmarks/run.py --implementations auto,reference,fused,fused_xla   # every formulation

For every `[batch, time, classes]` shape and dtype, each entry computes the mean cross-entropy over the
tokens inside uneven sequence lengths and its gradient with respect to the logits:

- `tf_seqloss`: `tf_seqloss.sequence_loss(logits, targets, lengths=lengths)`, per `--implementations`;
- `tf.nn`: `tf.nn.sparse_softmax_cross_entropy_with_logits` times the mask, over the mask's sum;
- `keras`: `SparseCategoricalCrossentropy(from_logits=True, reduction="sum")` with the mask as
  `sample_weight`, over the mask's sum;
- `torch`: `torch.nn.functional.cross_entropy(ignore_index=-100)` on CPU, when torch is installed;

in eager mode, in a `tf.function` and in a `tf.function(jit_compile=True)` (`--modes`). Runs are
interleaved (round r times every entry once) so that load from other processes spreads over all of them;
each figure is the median over `--repeats` rounds. Peak memory is TensorFlow's allocator peak during one
step (`tf.config.experimental.get_memory_info`, reset before the step) minus what was allocated before
it, so the gradient itself counts once. Times are reported as ratios to the best peer (the fastest
non-`tf_seqloss` entry of the shape) and to a bandwidth floor measured in the same rounds: one NumPy copy
of the logits into a preallocated array. Writes `results.md`, `results.json` and `plot.png` to `--out`.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from _common import load_average, machine, write_results  # noqa: E402  (benchmarks/ is on the path)

import tf_seqloss  # noqa: E402
from tf_seqloss import _cross_entropy as _xent  # noqa: E402

DEFAULT_SHAPES = "8x20x100,16x128x1000,16x128x4000,16x128x16000,16x128x32000"
MODES = ("eager", "function", "xla")
IGNORE_INDEX = -100
PEERS = ("tf.nn", "keras", "torch")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default=DEFAULT_SHAPES,
                        help=f"comma-separated BATCHxTIMExCLASSES (default: {DEFAULT_SHAPES})")
    parser.add_argument("--dtypes", default="float32", help="comma-separated logits dtypes (default: float32)")
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of eager,function,xla")
    parser.add_argument("--implementations", default="auto",
                        help=f"tf_seqloss implementations to time, of {_xent.IMPLEMENTATIONS} (default: auto)")
    parser.add_argument("--peers", default=",".join(PEERS), help="comma-separated subset of tf.nn,keras,torch")
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds per shape (default: 7)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls per entry first (default: 2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"),
                        help="output folder (default: benchmarks/results)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    args.shapes = [_parse_shape(s) for s in args.shapes.split(",") if s]
    args.dtypes = [s for s in args.dtypes.split(",") if s]
    args.modes = [s for s in args.modes.split(",") if s]
    args.implementations = [s for s in args.implementations.split(",") if s]
    args.peers = [s for s in args.peers.split(",") if s]
    for mode in args.modes:
        if mode not in MODES:
            parser.error(f"`--modes` must be a subset of {MODES}. Received: {mode!r}")
    for impl in args.implementations:
        if impl not in _xent.IMPLEMENTATIONS:
            parser.error(f"`--implementations` must be a subset of {_xent.IMPLEMENTATIONS}. Received: {impl!r}")
    for peer in args.peers:
        if peer not in PEERS:
            parser.error(f"`--peers` must be a subset of {PEERS}. Received: {peer!r}")
    if args.repeats < 1:
        parser.error(f"`--repeats` must be at least 1. Received: {args.repeats}")
    return args


def _parse_shape(text):
    try:
        batch, time_, classes = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise SystemExit(f"`--shapes` takes BATCHxTIMExCLASSES, e.g. 16x128x32000. Received: {text!r}") from None
    return batch, time_, classes


# ----------------------------------------------------------------------------------------------------------
# The entries. Each builder returns `step()`, which runs forward + backward and returns `(loss, grad)` as
# NumPy-convertible values without copying the gradient.

def _tf_inputs(data, dtype):
    logits = tf.constant(data["logits"], dtype=dtype)
    return logits, tf.constant(data["targets"]), tf.constant(data["lengths"])


def _tf_step(loss_fn, mode, logits, targets, lengths):
    def step(logits, targets, lengths):
        with tf.GradientTape() as tape:
            tape.watch(logits)
            loss = loss_fn(logits, targets, lengths)
        return loss, tape.gradient(loss, logits)

    if mode != "eager":
        step = tf.function(step, jit_compile=mode == "xla")
    return lambda: step(logits, targets, lengths)


def _tf_seqloss_loss(implementation):
    def loss(logits, targets, lengths):
        return tf_seqloss.sequence_loss(logits, targets, lengths=lengths, implementation=implementation)
    return loss


def _tf_nn_loss(logits, targets, lengths):
    mask = tf.sequence_mask(lengths, tf.shape(targets)[1], dtype=tf.float32)
    token_loss = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=targets, logits=tf.cast(logits, tf.float32))
    return tf.reduce_sum(token_loss * mask) / tf.reduce_sum(mask)


def _keras_loss():
    scce = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="sum")

    def loss(logits, targets, lengths):
        mask = tf.sequence_mask(lengths, tf.shape(targets)[1], dtype=tf.float32)
        return scce(targets, tf.cast(logits, tf.float32), sample_weight=mask) / tf.reduce_sum(mask)
    return loss


def _torch_step(data, dtype):
    import torch
    import torch.nn.functional as F

    logits = torch.from_numpy(np.ascontiguousarray(data["logits"])).to(getattr(torch, dtype)).requires_grad_()
    targets = torch.from_numpy(data["targets"].astype(np.int64))
    inside = np.arange(targets.shape[1])[None, :] < data["lengths"][:, None]
    targets = torch.where(torch.from_numpy(inside), targets, torch.full_like(targets, IGNORE_INDEX))
    num_classes = logits.shape[-1]

    def step():
        logits.grad = None
        loss = F.cross_entropy(logits.reshape(-1, num_classes), targets.reshape(-1), ignore_index=IGNORE_INDEX)
        loss.backward()
        return loss.detach().float().numpy(), logits.grad.float().numpy()
    return step


def build_entries(args, data, dtype):
    """Returns `[(entry, mode, step)]` for one shape and dtype; `entry` is a display name."""
    logits, targets, lengths = _tf_inputs(data, dtype)
    entries = []
    for impl in args.implementations:
        name = "tf_seqloss" if impl == "auto" else f"tf_seqloss[{impl}]"
        for mode in args.modes:
            entries.append((name, mode, _tf_step(_tf_seqloss_loss(impl), mode, logits, targets, lengths)))
    if "tf.nn" in args.peers:
        for mode in args.modes:
            entries.append(("tf.nn", mode, _tf_step(_tf_nn_loss, mode, logits, targets, lengths)))
    if "keras" in args.peers:
        for mode in args.modes:
            entries.append(("keras", mode, _tf_step(_keras_loss(), mode, logits, targets, lengths)))
    if "torch" in args.peers and torch_version():
        entries.append(("torch", "eager", _torch_step(data, dtype)))
    return entries


def torch_version():
    try:
        import torch
    except ImportError:
        return None
    return torch.__version__


def is_peer(entry):
    return not entry.startswith("tf_seqloss")


# ----------------------------------------------------------------------------------------------------------
# Measuring.

def make_data(shape, seed):
    batch, time_, classes = shape
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, time_ + 1, size=batch).astype(np.int32)
    lengths[0] = time_  # the padded width is used
    return {
        "logits": rng.standard_normal((batch, time_, classes), dtype=np.float32) * 2.0,
        "targets": rng.integers(0, classes, size=(batch, time_)).astype(np.int32),
        "lengths": lengths,
    }


def _peak_memory(step):
    """Returns the TensorFlow allocator's peak during `step()` above what was allocated before it."""
    tf.config.experimental.reset_memory_stats("CPU:0")
    before = tf.config.experimental.get_memory_info("CPU:0")["current"]
    result = step()
    peak = tf.config.experimental.get_memory_info("CPU:0")["peak"] - before
    del result
    return peak


def _run(step):
    loss, grad = step()
    return float(np.asarray(loss))  # forces the step to have finished, without copying the gradient


def measure_shape(args, shape, dtype, progress):
    """Returns the result rows of one shape and dtype."""
    data = make_data(shape, args.seed)
    logits_bytes = int(np.prod(shape)) * tf.as_dtype(dtype).size
    entries = build_entries(args, data, dtype)
    rows = []
    reference_loss = reference_grad = None
    for entry, mode, step in entries:
        row = dict(shape=list(shape), dtype=dtype, entry=entry, mode=mode, logits_bytes=logits_bytes,
                   peer=is_peer(entry))
        try:
            start = time.perf_counter()
            loss, grad = step()
            row["first_call_s"] = time.perf_counter() - start
            grad = np.asarray(grad, np.float64)
            if reference_loss is None:  # every entry is compared with the same NumPy float64 result
                reference_loss, reference_grad = _numpy_loss_and_grad(data, shape, dtype)
            row["loss_error"] = float(abs(float(np.asarray(loss)) - reference_loss))
            row["grad_error"] = float(np.max(np.abs(grad - reference_grad)))
            del loss, grad
            for _ in range(args.warmup - 1):
                _run(step)
            row["peak_bytes"] = _peak_memory(step) if entry != "torch" else None
        except Exception as error:  # a peer that cannot run this dtype or mode is reported, not fatal
            row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
        progress.update(args.warmup + 1)
        row["times"] = []
        rows.append(row)
    live = [(row, step) for row, (_, _, step) in zip(rows, entries) if "error" not in row]
    copy_source = tf.cast(data["logits"], dtype).numpy()
    copy_target = np.empty_like(copy_source)
    floor_times = []
    for round_ in range(args.repeats):
        start = time.perf_counter()
        np.copyto(copy_target, copy_source)
        floor_times.append(time.perf_counter() - start)
        # Rotate the order so that no entry always runs right after the same neighbour.
        for i in range(len(live)):
            row, step = live[(i + round_) % len(live)]
            start = time.perf_counter()
            _run(step)
            row["times"].append(time.perf_counter() - start)
            progress.update(1)
        progress.update(len(rows) - len(live))
    floor = float(np.median(floor_times))
    measured = [row for row in rows if row["times"]]
    best_peer = min((np.median(row["times"]) for row in measured if row["peer"]), default=None)
    for row in rows:
        row["floor_s"] = floor
        if row["times"]:
            row["median_s"] = float(np.median(row["times"]))
            row["x_floor"] = row["median_s"] / floor
            row["x_best_peer"] = row["median_s"] / best_peer if best_peer else None
        if row.get("peak_bytes") is not None:
            row["x_logits"] = row["peak_bytes"] / logits_bytes
    return rows


def _numpy_loss_and_grad(data, shape, dtype):
    """The masked mean cross-entropy and its gradient in NumPy float64: what every entry must give."""
    logits = tf.cast(tf.cast(data["logits"], dtype), tf.float64).numpy()  # as rounded to `dtype`
    batch, time_, classes = shape
    mask = (np.arange(time_)[None, :] < data["lengths"][:, None]).astype(np.float64)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    softmax = np.exp(shifted)
    softmax /= softmax.sum(axis=-1, keepdims=True)
    picked = np.take_along_axis(softmax, data["targets"][..., None].astype(np.int64), axis=-1)[..., 0]
    loss = float(np.sum(-np.log(picked) * mask) / mask.sum())
    grad = softmax
    np.put_along_axis(grad, data["targets"][..., None].astype(np.int64),
                      np.take_along_axis(grad, data["targets"][..., None].astype(np.int64), axis=-1) - 1.0, axis=-1)
    grad *= (mask / mask.sum())[..., None]
    return loss, grad


# ----------------------------------------------------------------------------------------------------------
# Reporting.

def machine_and_versions():
    return dict(machine(), tensorflow=tf.__version__,
                keras=_keras_version(), torch=torch_version(), numpy=np.__version__,
                gpus=len(tf.config.list_physical_devices("GPU")))


def _keras_version():
    try:
        return tf.keras.__version__
    except AttributeError:
        return None


def _fmt(value, spec):
    return "—" if value is None else format(value, spec)


def markdown(rows, meta):
    lines = [
        f"Machine: {meta['machine']['cpu']}, {meta['machine']['cores']} cores; TensorFlow "
        f"{meta['machine']['tensorflow']}, Keras {meta['machine']['keras']}, torch {meta['machine']['torch']}. "
        f"Load average before/after: {meta['load_before']} / {meta['load_after']}. "
        f"{meta['repeats']} interleaved rounds, medians.",
        "",
        "| shape | dtype | entry | mode | median ms | × copy floor | × best peer | peak extra MB | × logits "
        "| first call ms | max abs error: loss / grad |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in rows:
        shape = "x".join(str(v) for v in row["shape"])
        if "error" in row:
            lines.append(f"| {shape} | {row['dtype']} | {row['entry']} | {row['mode']} | failed: "
                         f"{row['error'].replace('|', '/')} | | | | | | |")
            continue
        peak = None if row.get("peak_bytes") is None else row["peak_bytes"] / 2**20
        lines.append(
            f"| {shape} | {row['dtype']} | {row['entry']} | {row['mode']} | {row['median_s'] * 1e3:.2f} "
            f"| {row['x_floor']:.1f} | {_fmt(row.get('x_best_peer'), '.2f')} | {_fmt(peak, '.1f')} "
            f"| {_fmt(row.get('x_logits'), '.2f')} | {row['first_call_s'] * 1e3:.0f} "
            f"| {row['loss_error']:.1e} / {row['grad_error']:.1e} |")
    floors = sorted({("x".join(str(v) for v in row["shape"]), row["dtype"], row["floor_s"]) for row in rows})
    lines += ["", "Copy floor (np.copyto of the logits into a preallocated array), median ms: "
              + ", ".join(f"{shape} {dtype}: {floor * 1e3:.2f}" for shape, dtype, floor in floors) + "."]
    if meta["notes"]:
        lines += [""] + [f"Note: {note}" for note in meta["notes"]]
    return "\n".join(lines) + "\n"


_MODE_STYLE = {"eager": (":", "^"), "function": ("--", "s"), "xla": ("-", "o")}


def plot(rows, path):
    """Time and memory against the number of classes, one row of plots per `[batch, time]` and dtype."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measured = [row for row in rows if "median_s" in row]
    if any(row["entry"] == "tf_seqloss" for row in measured):
        # The default choice against the peers; the other implementations are in the table.
        measured = [row for row in measured if row["entry"] == "tf_seqloss" or is_peer(row["entry"])]
    groups = {}
    for row in measured:
        groups.setdefault((row["shape"][0], row["shape"][1], row["dtype"]), set()).add(row["shape"][2])
    # A sweep is a `[batch, time]` measured at several class counts; single shapes are in the table.
    keys = sorted(key for key, classes in groups.items() if len(classes) > 1) or sorted(groups)
    entries = sorted({row["entry"] for row in measured}, key=lambda e: (is_peer(e), e))
    colors = {entry: f"C{i}" for i, entry in enumerate(entries)}
    fig, axes = plt.subplots(len(keys), 2, figsize=(14, 4.6 * len(keys)), squeeze=False)
    for (batch, time_, dtype), (ax_time, ax_mem) in zip(keys, axes):
        group = [row for row in measured if (row["shape"][0], row["shape"][1], row["dtype"]) == (batch, time_, dtype)]
        for entry, mode in sorted({(row["entry"], row["mode"]) for row in group}):
            points = sorted(((row["shape"][2], row) for row in group if (row["entry"], row["mode"]) == (entry, mode)),
                            key=lambda point: point[0])
            linestyle, marker = _MODE_STYLE.get(mode, ("-", "o"))
            style = dict(color=colors[entry], linestyle=linestyle, marker=marker, markersize=4,
                         linewidth=2.0 if not is_peer(entry) else 1.0, label=f"{entry} ({mode})")
            ax_time.plot([c for c, _ in points], [r["median_s"] * 1e3 for _, r in points], **style)
            memory = [(c, r["x_logits"]) for c, r in points if r.get("x_logits") is not None]
            if memory:
                ax_mem.plot([c for c, _ in memory], [m for _, m in memory], **style)
        floors = sorted({(row["shape"][2], row["floor_s"]) for row in group})
        ax_time.plot([c for c, _ in floors], [f * 1e3 for _, f in floors], color="black", linestyle=":",
                     linewidth=1, label="copy floor")
        ax_time.set(xscale="log", yscale="log", xlabel="classes", ylabel="median ms, forward + backward",
                    title=f"Time, [{batch}, {time_}, classes] {dtype}")
        ax_mem.set(xscale="log", xlabel="classes", ylabel="peak extra memory / logits size",
                   title=f"TensorFlow peak memory, [{batch}, {time_}, classes] {dtype}")
        ax_mem.set_ylim(bottom=0)
        for ax in (ax_time, ax_mem):
            ax.grid(True, which="both", alpha=0.3)
        ax_mem.legend(*ax_time.get_legend_handles_labels(), fontsize=7, loc="upper left",
                      bbox_to_anchor=(1.02, 1.0), borderaxespad=0,
                      title="thick: tf_seqloss\n-o xla, --s function, :^ eager", title_fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


class _Progress:
    """tqdm when available and wanted, else nothing."""

    def __init__(self, total, enabled):
        self._bar = None
        if enabled:
            try:
                from tqdm import tqdm
                self._bar = tqdm(total=total, unit="step", desc="benchmark", file=sys.stderr)
            except ImportError:
                print("(pip install tqdm for a progress bar)", file=sys.stderr)

    def update(self, n):
        if self._bar is not None and n:
            self._bar.update(n)

    def set_description(self, text):
        if self._bar is not None:
            self._bar.set_description(text)

    def close(self):
        if self._bar is not None:
            self._bar.close()


def main(argv=None):
    args = parse_args(argv)
    notes = []
    if "torch" in args.peers and not torch_version():
        notes.append("torch is not installed, so the PyTorch peer was skipped (`pip install torch` to add it).")
    if "torch" in args.peers and torch_version():
        notes.append("torch runs eagerly on CPU; its memory is not TensorFlow's and is not measured.")
    per_shape = (len(args.implementations) * len(args.modes)
                 + len([p for p in args.peers if p != "torch"]) * len(args.modes)
                 + ("torch" in args.peers and bool(torch_version())))
    total = len(args.shapes) * len(args.dtypes) * per_shape * (args.warmup + 1 + args.repeats)
    progress = _Progress(total, not args.no_progress)
    load_before = load_average()
    rows = []
    for dtype in args.dtypes:
        for shape in args.shapes:
            progress.set_description("x".join(str(v) for v in shape) + f" {dtype}")
            rows += measure_shape(args, shape, dtype, progress)
    progress.close()
    meta = dict(machine=machine_and_versions(), load_before=load_before, load_after=load_average(),
                repeats=args.repeats,
                command="python benchmarks/run.py " + " ".join(sys.argv[1:] if argv is None else argv),
                notes=notes)
    write_results(args.out, meta, rows, markdown, plot)


if __name__ == "__main__":
    main()
