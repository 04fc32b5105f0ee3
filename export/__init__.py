"""PyTorch -> ONNX export, int8 quantization and parity checks (see the on-device recognition milestone)."""
