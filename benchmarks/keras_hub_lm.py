"""keras-hub GPT-2-shaped causal LM: `fit` with keras-hub's default compile vs through the fused head.

Each route runs in a process of its own (a fresh interpreter: peak memory is the process's own), building
a `GPT2Backbone` with a 50257-token vocabulary and random weights (nothing downloaded), then `fit` for
`--steps` steps of `--batch` x `--time` tokens:

- `default`: `GPT2CausalLM.compile(optimizer)` as keras-hub sets it up (logits `[batch, time, 50257]`,
  `SparseCategoricalCrossentropy`, `SparseCategoricalAccuracy` as a weighted metric);
- `fused`: the same task after `tf_seqloss.keras_hub.fused_causal_lm`, compiled alike (no logits).

Printed per route: the peak resident memory of the process (`ru_maxrss`) and its growth during `fit`
(over the memory after building the model), the wall time of the whole `fit` (compilation counted), and
tokens/s over the steps after the first (steady state). Run: `python benchmarks/keras_hub_lm.py`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def child(route: str, args) -> dict:
    import resource

    import keras
    import keras_hub
    import numpy as np

    def rss_mb() -> float:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux

    keras.utils.set_random_seed(0)
    backbone = keras_hub.models.GPT2Backbone(vocabulary_size=args.vocab, num_layers=args.layers, num_heads=2,
                                             hidden_dim=args.hidden, intermediate_dim=4 * args.hidden,
                                             max_sequence_length=args.time, dropout=0.0)
    causal_lm = keras_hub.models.GPT2CausalLM(backbone, preprocessor=None)
    if route == "fused":
        from tf_seqloss import keras_hub as fused_hub
        causal_lm = fused_hub.fused_causal_lm(causal_lm)
    causal_lm.compile(optimizer=keras.optimizers.Adam(1e-4))
    rng = np.random.default_rng(0)
    rows = args.batch * args.steps
    ids = rng.integers(1, args.vocab, size=(rows, args.time + 1)).astype("int32")
    x = {"token_ids": ids[:, :-1], "padding_mask": np.ones((rows, args.time), "int32")}
    y, weights = ids[:, 1:], np.ones((rows, args.time), "float32")
    before = rss_mb()
    ends = []

    class Clock(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            ends.append(time.perf_counter())

    start = time.perf_counter()
    history = causal_lm.fit(x, y, sample_weight=weights, batch_size=args.batch, epochs=1, verbose=0,
                            shuffle=False, callbacks=[Clock()])
    total = time.perf_counter() - start
    steady = (len(ends) - 1) * args.batch * args.time / (ends[-1] - ends[0]) if len(ends) > 1 else float("nan")
    return dict(route=route, peak_rss_mb=rss_mb(), fit_growth_mb=rss_mb() - before, fit_seconds=total,
                tokens_per_second=steady, loss=float(history.history["loss"][-1]),
                jit_compile=bool(causal_lm.jit_compile))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--time", type=int, default=256)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--routes", default="default,fused")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT" + json.dumps(child(args.child, args)))
        return
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=str(ROOT))
    env.pop("TF_USE_LEGACY_KERAS", None)  # keras-hub runs on Keras 3
    results = []
    for route in args.routes.split(","):
        command = [sys.executable, __file__, "--child", route] + [
            f"--{name}={getattr(args, name)}" for name in ("vocab", "hidden", "layers", "batch", "time", "steps")]
        done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT, timeout=3600)
        if done.returncode != 0:
            sys.exit(f"The {route!r} route failed:\n{done.stderr[-3000:]}")
        line = [line for line in done.stdout.splitlines() if line.startswith("RESULT")][-1]
        results.append(json.loads(line[len("RESULT"):]))
    try:
        load = " ".join(f"{v:.1f}" for v in os.getloadavg())
    except OSError:
        load = "n/a"
    print(f"GPT2Backbone(vocabulary={args.vocab}, hidden={args.hidden}, layers={args.layers}), fit of "
          f"{args.steps} steps of {args.batch} x {args.time} tokens; {os.cpu_count()} cores, load {load}")
    print("| route | jit | peak RSS (MB) | growth in fit (MB) | fit incl. compile (s) | tokens/s after step 1 "
          "| last loss |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['route']} | {r['jit_compile']} | {r['peak_rss_mb']:.0f} | {r['fit_growth_mb']:.0f} | "
              f"{r['fit_seconds']:.1f} | {r['tokens_per_second']:.0f} | {r['loss']:.4f} |")


if __name__ == "__main__":
    main()
