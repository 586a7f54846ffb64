"""`tf-seqloss-upgrade`: rewrites TF1 contrib, TensorFlow Addons and `tf.losses` code to `tf_seqloss`.

The rewriter lives in `tf_seqloss_upgrade`, a package of its own in the same distribution that imports
only libcst and the standard library, so that the command starts without TensorFlow; this module
re-exports it for the code that imports it from here. (Importing it from here runs `tf_seqloss`'s own
`__init__` first, which imports TensorFlow to register the Keras classes; `tf_seqloss_upgrade` does not.)

Needs the `upgrade` extra; `tf_seqloss_upgrade`'s docstring shows its use.
"""

import tf_seqloss_upgrade
from tf_seqloss_upgrade import *  # noqa: F401,F403 - the same public names, listed once, in tf_seqloss_upgrade

__all__ = list(tf_seqloss_upgrade.__all__)
