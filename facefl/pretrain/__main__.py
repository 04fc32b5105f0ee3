"""``python -m facefl.pretrain``: the same as ``facefl pretrain``."""

import sys

from facefl.pretrain.cli import main

sys.exit(main())
