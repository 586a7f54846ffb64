"""The rewriter's transform; it lives in `tf_seqloss_upgrade._rewriter`, re-exported here."""

from tf_seqloss_upgrade._rewriter import (  # noqa: F401
    CONTRIB_VERSIONS,
    SOFTMAX_LOSS_FUNCTION_SUGGESTION,
    Finding,
    UpgradeResult,
    upgrade_source,
)
