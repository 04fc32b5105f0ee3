"""Pretrained networks from other toolkits, as ordinary facefl checkpoints (``facefl import-model``)."""
