"""``python -m facefl.algorithms``: the protocol docs' table of the registered algorithms."""

from facefl.algorithms.registry import markdown

print(markdown(), end="")
