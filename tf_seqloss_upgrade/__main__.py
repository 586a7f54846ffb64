"""`python -m tf_seqloss_upgrade PATH... [--write] [--contrib-version {1.4,1.15}]`: the command, without TensorFlow."""

import sys

from tf_seqloss_upgrade.cli import main

sys.exit(main())
