"""facefl aggregation service (FastAPI): rounds, updates, aggregation and model versions."""
