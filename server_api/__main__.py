"""`python -m server_api` = `facefl serve`."""

from __future__ import annotations

import sys

from server_api.cli import main

if __name__ == "__main__":
    sys.exit(main())
