"""`tf-seqloss-upgrade`: rewrites TF1 contrib, TensorFlow Addons and `tf.losses` code to `tf_seqloss`.

A package of its own beside `tf_seqloss`, in the same distribution, that imports only libcst and the
standard library: the command starts without TensorFlow. `tf_seqloss.upgrade` re-exports it.
Needs the `upgrade` extra (`pip install "tf_seqloss[upgrade]"`, which brings libcst); without it,
importing this package raises an `ImportError` that names that command.

```python
from tf_seqloss_upgrade import upgrade_source
result = upgrade_source(open("model.py", newline="").read(), path="model.py", contrib_version="1.15")
print(result.code)
for finding in result.findings:
    print(finding)          # path:line:col: LEVEL: message
```
"""

from tf_seqloss_upgrade._bytes import FileResult, upgrade_python_bytes
from tf_seqloss_upgrade._notebook import upgrade_notebook_bytes
from tf_seqloss_upgrade._rewriter import (
    CONTRIB_VERSIONS,
    SOFTMAX_LOSS_FUNCTION_SUGGESTION,
    Finding,
    UpgradeResult,
    upgrade_source,
)
from tf_seqloss_upgrade.cli import main

__all__ = ["CONTRIB_VERSIONS", "SOFTMAX_LOSS_FUNCTION_SUGGESTION", "FileResult", "Finding", "UpgradeResult", "main",
           "upgrade_notebook_bytes", "upgrade_python_bytes", "upgrade_source"]
