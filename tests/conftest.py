import collections
import os
import zlib
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from hypothesis import settings

# No example database in the work tree: the suite runs twice at once (Keras 3 and tf_keras).
settings.register_profile("tf_seqloss", database=None)
settings.load_profile("tf_seqloss")

# The recorded peer outputs travel with the suite (tests/data/README.md says what they are);
# TF_SEQLOSS_ORACLE=/path/to/folder reads another copy instead.
ORACLE_DEFAULT_DIR = Path(__file__).resolve().parent / "data"


def oracle_dir() -> Path:
    """Returns the folder of the recorded outputs: `$TF_SEQLOSS_ORACLE` if set, else `tests/data`."""
    return Path(os.environ.get("TF_SEQLOSS_ORACLE") or ORACLE_DEFAULT_DIR)

FLAG_NAMES = ("average_across_timesteps", "average_across_batch", "sum_over_timesteps", "sum_over_batch")

# Every legal flag combination: averages only, or sums only.
LEGAL_FLAGS = [
    dict(zip(FLAG_NAMES, values))
    for values in [
        (True, True, False, False), (True, False, False, False), (False, True, False, False),
        (False, False, False, False), (False, False, True, True), (False, False, True, False),
        (False, False, False, True),
    ]
]


def oracle_cases(name):
    """Returns `(index, meta, arrays)` for every recorded case of `<oracle_dir()>/<name>.npz`.

    A missing file fails the test that asks for it: parity that is not checked must not pass as skipped.
    """
    import json

    path = oracle_dir() / f"{name}.npz"
    if not path.exists():
        raise FileNotFoundError(
            f"The recorded outputs `{name}.npz` are missing: expected {path} "
            f"(TF_SEQLOSS_ORACLE={os.environ.get('TF_SEQLOSS_ORACLE')!r}; unset, it is {ORACLE_DEFAULT_DIR}, "
            f"committed with the tests).")
    data = np.load(path, allow_pickle=False)
    count = sum(1 for key in data.files if key.endswith("/meta"))
    cases = []
    for i in range(count):
        arrays = {key.split("/", 1)[1]: data[key] for key in data.files if key.startswith(f"{i}/")}
        meta = json.loads(str(arrays.pop("meta")))
        cases.append((i, meta, arrays))
    return cases


def _clear_keras_session():
    """Resets Keras's global state (names, uids, graphs) without forcing a garbage collection.

    Keras 3's `clear_session` runs `gc.collect()` by default, which with TensorFlow loaded takes 0.2-1 s
    (measured on the 2-core CI machine): after each of some 1300 tests it was the largest cost of the suite.
    The collection frees memory sooner but resets nothing, and Python's own collector still runs. tf_keras
    has no such argument and collects nothing.
    """
    clear = tf.keras.backend.clear_session
    try:
        clear(free_memory=False)
    except TypeError:  # tf_keras
        clear()


@pytest.fixture(autouse=True)
def _fresh_keras_session():
    yield
    _clear_keras_session()


# Files of tests that exercise plain TensorFlow code, which does not depend on the Keras flavour; their tests
# that do touch Keras carry `@pytest.mark.keras`. scripts/test.sh runs the suite once per flavour, side by
# side, and sets TF_SEQLOSS_SHARD=K/N on each run (shard K of N; `0-1/3` takes shards 0 and 1 of 3): the
# flavour-free tests are then split between the runs, so that each runs once, in one of the two (see
# _shard_of). Unset (a plain `pytest`), every test runs.
FLAVOUR_FREE_FILES = {
    "test_adversarial.py", "test_compat_tfa.py", "test_example_setup.py", "test_example_state.py", "test_fused.py",
    "test_fused_gradients.py", "test_graph_modes.py", "test_linear_head.py", "test_lint.py",
    "test_oracle_parity.py", "test_padding_is_inert.py", "test_reliability.py", "test_sampled_loss.py",
    "test_readme.py", "test_sequence_loss.py", "test_sharding.py", "test_soft_cap.py", "test_tf1_losses.py",
    "test_typing.py", "test_upgrade.py", "test_upgrade_files.py", "test_upgrade_notebooks.py", "test_docs.py",
    "test_whole_steps.py",
}


def _shards(spec):
    taken, total = spec.split("/")
    first, _, last = taken.partition("-")
    return set(range(int(first), int(last or first) + 1)), int(total)


def pytest_configure(config):
    config.addinivalue_line("markers", "keras: touches Keras, so it runs under both flavours even in a "
                                       "flavour-free file (see FLAVOUR_FREE_FILES)")
    config.addinivalue_line("markers", "slow: an end-to-end run (the example's training and SIGKILL runs, "
                                       "multi-worker) that scripts/test.sh leaves out unless asked "
                                       "(`bash scripts/test.sh -m slow`); CI runs them after the suite")
    config.addinivalue_line("markers", "duration(seconds): about how long a slow flavour-free test takes alone "
                                       "(pytest --durations); scripts/test.sh balances its two suites with it")


# Seconds by which a shard's slow tests that run under both flavours outlast the other's: scripts/test.sh's
# shard 1 is the tf_keras suite, which trains the example more slowly (in two CI runs its slow set took 84
# and 92 s longer than Keras 3's with the flavour-free ones dealt out evenly). The deal below starts from it.
SLOW_HEAD_START = {1: 90.0}


def _shard_of(items, total, head_start=None):
    """Returns `{nodeid: shard}` for the flavour-free `items`, the same in every run that collected them.

    Tests marked `duration` (the slow ones that take a good share of a run) are dealt out first, longest
    first, each to the shard with the fewest of those seconds so far (counting from `head_start`, seconds by
    shard): a few minute-long tests decide when the slow set ends. Every other test function takes a stable
    hash of its id, and its parametrized cases take that shard and the next ones in turn."""
    def seconds(item):
        return item.get_closest_marker("duration").args[0]

    shards = {}
    load = [float((head_start or {}).get(k, 0.0)) for k in range(total)]
    timed = [item for item in items if item.get_closest_marker("duration") is not None]
    for item in sorted(timed, key=lambda item: (-seconds(item), item.nodeid)):
        shards[item.nodeid] = shard = min(range(total), key=lambda k: (load[k], k))
        load[shard] += seconds(item)
    taken = collections.Counter()
    for item in items:
        if item.nodeid not in shards:
            function = item.nodeid.split("[", 1)[0]
            shards[item.nodeid] = (zlib.crc32(function.encode()) + taken[function]) % total
            taken[function] += 1
    return shards


def pytest_collection_modifyitems(config, items):
    spec = os.environ.get("TF_SEQLOSS_SHARD")
    if not spec:
        return
    mine, total = _shards(spec)
    shared = [item for item in items if Path(str(item.fspath)).name in FLAVOUR_FREE_FILES
              and item.get_closest_marker("keras") is None]
    head_start = SLOW_HEAD_START if total == 2 else None
    others = {nodeid for nodeid, shard in _shard_of(shared, total, head_start).items() if shard not in mine}
    if others:
        config.hook.pytest_deselected(items=[item for item in items if item.nodeid in others])
        items[:] = [item for item in items if item.nodeid not in others]
