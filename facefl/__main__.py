import sys

from facefl.cli import main

sys.exit(main())
