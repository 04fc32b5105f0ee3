"""facefl: federated face recognition (shared, transport-free core)."""

__version__ = "0.1.0"
