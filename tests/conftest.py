import os
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from hypothesis import settings

# No example database in the work tree: the suite runs twice at once (Keras 3 and tf_keras).
settings.register_profile("tf_seqloss", database=None)
settings.load_profile("tf_seqloss")

ORACLE_DIR = Path(os.environ.get("TF_SEQLOSS_ORACLE", Path(__file__).resolve().parents[2] / "shared" / "oracle"))

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
    """Yields `(index, meta, arrays)` for every recorded case of `../shared/oracle/<name>.npz`."""
    import json

    path = ORACLE_DIR / f"{name}.npz"
    if not path.exists():
        if os.environ.get("CI"):
            raise FileNotFoundError(f"The oracle {path} is missing; CI runs with ../shared beside the repo.")
        pytest.skip(f"oracle {path} not found (set TF_SEQLOSS_ORACLE to its folder)")
    data = np.load(path, allow_pickle=False)
    count = sum(1 for key in data.files if key.endswith("/meta"))
    cases = []
    for i in range(count):
        arrays = {key.split("/", 1)[1]: data[key] for key in data.files if key.startswith(f"{i}/")}
        meta = json.loads(str(arrays.pop("meta")))
        cases.append((i, meta, arrays))
    return cases


@pytest.fixture(autouse=True)
def _fresh_keras_session():
    yield
    tf.keras.backend.clear_session()
