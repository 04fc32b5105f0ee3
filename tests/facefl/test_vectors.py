"""facefl.vectors.l2_normalize on hand-computed rows."""

from __future__ import annotations

import numpy as np

from facefl.vectors import l2_normalize


def test_rows_become_unit_vectors_and_a_zero_row_stays_zero() -> None:
    out = l2_normalize(np.array([[3.0, 4.0], [0.0, 0.0], [0.0, -2.0]]))
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, np.array([[0.6, 0.8], [0.0, 0.0], [0.0, -1.0]], np.float32))


def test_one_vector_other_axis_and_dtype() -> None:
    np.testing.assert_allclose(l2_normalize(np.array([1.0, 1.0]), dtype=np.float64), [0.5**0.5, 0.5**0.5])
    assert l2_normalize(np.array([1.0, 1.0]), dtype=np.float64).dtype == np.float64
    cols = l2_normalize(np.array([[3.0, 0.0], [4.0, 5.0]]), axis=0)
    np.testing.assert_allclose(cols, [[0.6, 0.0], [0.8, 1.0]], rtol=1e-6)
