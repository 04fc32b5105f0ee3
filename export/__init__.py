"""PyTorch -> ONNX export, int8 quantization and parity checks for on-device recognition.

- :mod:`export.onnx`: the generic model (a facefl checkpoint) or the personalized model (a device's
  backbone followed by its DFC converter) to one self-contained ONNX file, embeddings L2-normalised in
  the graph and the preprocessing recorded in its metadata.
- :mod:`export.quantize`: static int8 quantization (QDQ, per-channel weights), calibrated on images.
- :mod:`export.parity`: cosine of PyTorch vs ONNX Runtime embeddings on the same images.
- :mod:`export.personalize`: on the device, rebuild the personalized model's ONNX file after a round
  and swap it into a :class:`device_sdk.Recognizer`.
- :mod:`export.cli`: ``facefl export``.

``export`` may import ``device_sdk`` (its client, its Recognizer); ``device_sdk`` never imports ``export``.
Both read the device's state folder through :class:`facefl.device_state.DeviceState`.

Submodules are imported on use (this package imports nothing heavy), so ``facefl --help`` stays fast.
"""
