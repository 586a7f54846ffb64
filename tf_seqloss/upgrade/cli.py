"""The `tf-seqloss-upgrade` command line; it lives in `tf_seqloss_upgrade.cli`, re-exported here."""

from tf_seqloss_upgrade.cli import EXIT_OK, EXIT_REFUSED, EXIT_USAGE, main

__all__ = ["EXIT_OK", "EXIT_REFUSED", "EXIT_USAGE", "main"]
