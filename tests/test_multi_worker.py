"""Two worker processes on loopback (`MultiWorkerMirroredStrategy`) train one step with `normalizer="global"`.

The workers hold unevenly padded shards (15 and 3 real tokens). Each takes one SGD step of a linear model
on its shard, with the gradients all-reduced by the strategy; the step must equal the NumPy float64
gradient of the token mean of the whole batch in one process. The workers' ports stay reserved from the
moment they are picked until the workers are gone (`reserved_ports`); both processes are killed in a
`finally`, the first failure ends the wait, and the whole run is bounded well under a minute.
"""

import contextlib
import json
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from tests import reference

TIMEOUT_SECONDS = 50

WORKER = textwrap.dedent('''
    import json, sys
    import numpy as np
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    import tf_seqloss
    from tf_seqloss._keras import keras

    index = int(sys.argv[2])
    data = np.load(sys.argv[1])
    shard = slice(2 * index, 2 * index + 2)
    features, targets, mask = data["features"][shard], data["targets"][shard], data["mask"][shard]
    options = tf.distribute.experimental.CommunicationOptions(
        implementation=tf.distribute.experimental.CommunicationImplementation.RING)
    strategy = tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)
    with strategy.scope():
        kernel = tf.Variable(data["kernel"])
        optimizer = keras.optimizers.SGD(1.0)
        optimizer.build([kernel])  # Its variables are created under the strategy, not inside the step.

    @tf.function
    def train_step(x, y, w):
        def step(x, y, w):
            with tf.GradientTape() as tape:
                logits = tf.einsum("btd,dc->btc", x, kernel)
                loss = tf_seqloss.sequence_loss(logits, y, w, normalizer="global")
            optimizer.apply_gradients([(tape.gradient(loss, kernel), kernel)])
            return loss
        return strategy.reduce("SUM", strategy.run(step, args=(x, y, w)), axis=None)

    loss = train_step(features, targets, mask)
    print("RESULT" + json.dumps(dict(worker=index, loss=float(loss),
                                     step=(data["kernel"] - kernel.numpy()).tolist())), flush=True)
''')


@contextlib.contextmanager
def reserved_ports(count):
    """Yields `count` loopback ports, each held by a bound socket that never listens, until the block ends.

    Picking a free port and closing it before a server binds it would leave a window in which anything
    else may take it. Here the port stays bound: the kernel skips it when it picks a port itself (a bind
    to port 0, an outgoing connection) and refuses a plain `bind` to it. Linux lets sockets that all set
    `SO_REUSEADDR` share a port as long as at most one listens, and gRPC, which TensorFlow's servers are
    built on, sets it: so the workers' servers bind and listen on the held ports, and the ports are never
    free in between.
    """
    sockets = []
    try:
        for _ in range(count):
            held = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sockets.append(held)
            held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            held.bind(("127.0.0.1", 0))
        yield [held.getsockname()[1] for held in sockets]
    finally:
        for held in sockets:
            held.close()


def wait_for_all(processes, deadline):
    """Waits until every process has exited, the first one exits with an error, or `deadline` passes."""
    pending = {os.pidfd_open(process.pid): process for process in processes}  # readable once it exits
    try:
        while pending:
            ready, _, _ = select.select(list(pending), [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                return
            for fd in ready:
                process = pending.pop(fd)
                os.close(fd)
                if process.wait() != 0:
                    return
    finally:
        for fd in pending:
            os.close(fd)


def test_reserved_ports_are_refused_to_others_and_taken_by_a_server():
    with reserved_ports(1) as (port,):
        with socket.socket() as other, pytest.raises(OSError):
            other.bind(("127.0.0.1", port))
        with socket.socket() as server:  # as gRPC binds
            server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            server.bind(("0.0.0.0", port))
            server.listen()
            with socket.create_connection(("127.0.0.1", port), timeout=10):
                pass


@pytest.mark.slow
def test_two_workers_on_loopback_take_the_single_process_full_batch_step():
    rng = np.random.default_rng(5)
    lengths = np.array([8, 7, 1, 2])   # Worker 0: 15 tokens, worker 1: 3.
    mask = (np.arange(8) < lengths[:, None]).astype("float32")
    features = (rng.normal(size=(4, 8, 3)) * mask[..., None]).astype("float32")
    targets = (rng.integers(1, 5, size=mask.shape) * mask).astype("int32")
    kernel = rng.normal(size=(3, 5)).astype("float32")
    root = Path(__file__).resolve().parents[1]
    workers = []
    with tempfile.TemporaryDirectory() as tmp:
        data_path = os.path.join(tmp, "data.npz")
        np.savez(data_path, features=features, targets=targets, mask=mask, kernel=kernel)
        with reserved_ports(2) as ports:
            cluster = {"worker": [f"127.0.0.1:{port}" for port in ports]}
            try:
                for index in range(2):
                    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="-1",
                               TF_CONFIG=json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}}))
                    log = open(os.path.join(tmp, f"worker{index}.log"), "w+")
                    workers.append((subprocess.Popen([sys.executable, "-c", WORKER, data_path, str(index)], cwd=root,
                                                     env=env, stdout=log, stderr=subprocess.STDOUT,
                                                     start_new_session=True), log))
                wait_for_all([process for process, _ in workers], time.monotonic() + TIMEOUT_SECONDS)
                texts = []
                for _, log in workers:
                    log.seek(0)
                    texts.append(log.read())
                for index, (process, _) in enumerate(workers):  # a failure first: the other may wait for it
                    assert process.poll() in (0, None), \
                        f"worker {index} failed (exit status {process.returncode}):\n{texts[index][-3000:]}"
                for index, (process, _) in enumerate(workers):
                    assert process.poll() == 0, f"worker {index} still ran after {TIMEOUT_SECONDS} s:\n" \
                                                f"{texts[index][-3000:]}"
                outputs = [json.loads(next(line[len("RESULT"):] for line in text.splitlines()
                                           if line.startswith("RESULT"))) for text in texts]
            finally:
                for process, log in workers:
                    if process.poll() is None:
                        os.killpg(process.pid, signal.SIGKILL)  # its session: the worker and anything it started
                        process.wait(timeout=10)
                    log.close()
    loss, grad = reference.linear_token_mean(features, kernel, targets, mask)
    for output in outputs:
        np.testing.assert_allclose(output["step"], grad, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(output["loss"], loss, rtol=1e-5)
    # Each worker's own mean, averaged, would be far off: the shards' token counts are 15 and 3.
    halves = [reference.linear_token_mean(features[s], kernel, targets[s], mask[s])[1]
              for s in (slice(0, 2), slice(2, 4))]
    assert np.linalg.norm(np.mean(halves, axis=0) - grad) > 0.1 * np.linalg.norm(grad)
