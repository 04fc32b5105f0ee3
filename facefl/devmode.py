"""The well-known credentials of a development server (``FACEFL_DEV_MODE=1``), defined once.

A server in dev mode accepts them when ``FACEFL_ADMIN_TOKEN`` / ``FACEFL_ENROLLMENT_SECRET`` are unset;
the simulator and local tools use them against a server they started themselves. Never expose such a
server: anyone who reads this file knows its admin token.
"""

from __future__ import annotations

__all__ = ["DEV_ADMIN_TOKEN", "DEV_ENROLLMENT_SECRET"]

DEV_ADMIN_TOKEN = "dev-admin-token"
DEV_ENROLLMENT_SECRET = "dev-enrollment-secret"
