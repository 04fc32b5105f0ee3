import numpy as np
import pytest
import torch

from facefl.algorithms.fedface import class_embedding, spreadout


def test_class_embedding_is_normalized_mean() -> None:
    w = class_embedding(torch.tensor([[2.0, 0.0], [0.0, 1.0]]))
    assert torch.allclose(w, torch.tensor([0.5**0.5, 0.5**0.5]))
    with pytest.raises(ValueError):
        class_embedding(torch.zeros(0, 2))


def test_spreadout_pushes_close_rows_apart_and_keeps_norm() -> None:
    w = np.array([[1.0, 0.1, 0.0], [1.0, -0.1, 0.0], [0.0, 0.0, 1.0]], dtype=np.float32)
    out = spreadout(w, steps=20, lr=0.5)
    assert out.shape == w.shape and out.dtype == np.float32
    assert np.allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    wn = w / np.linalg.norm(w, axis=1, keepdims=True)
    assert float(out[0] @ out[1]) < float(wn[0] @ wn[1]) - 0.1
    assert np.allclose(spreadout(w, steps=0), wn, atol=1e-6)
