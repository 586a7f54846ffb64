"""`python -m tf_seqloss.upgrade PATH... [--write] [--contrib-version {1.4,1.15}]`.

The same command as `tf-seqloss-upgrade` and `python -m tf_seqloss_upgrade`, which start faster: this
spelling imports `tf_seqloss`, hence TensorFlow, first.
"""

import sys

from tf_seqloss_upgrade.cli import main

sys.exit(main())
