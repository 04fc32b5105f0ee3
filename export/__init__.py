"""PyTorch -> ONNX export, int8 quantization and parity checks for on-device recognition.

- :mod:`export.onnx`: the generic model (a facefl checkpoint) or the personalized model (a device's
  backbone followed by its DFC converter) to one self-contained ONNX file, embeddings L2-normalised in
  the graph and the preprocessing recorded in its metadata.
- :mod:`export.quantize`: static int8 quantization (QDQ, per-channel weights), calibrated on images.
- :mod:`export.parity`: cosine of PyTorch vs ONNX Runtime embeddings on the same images.
- :mod:`export.cli`: ``facefl export``.

Submodules are imported on use (this package imports nothing heavy), so ``facefl --help`` stays fast.
"""
