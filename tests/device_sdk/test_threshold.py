"""The open-set threshold on a model's stranger bank, on hand-computed 2-d cases, and which threshold
``threshold_for`` puts in force."""

from __future__ import annotations

import numpy as np
import pytest

from device_sdk import RecognizerError
from device_sdk.threshold import CALIBRATION_MARGIN, open_set_threshold, threshold_for


def unit(degrees: list[float]) -> np.ndarray:
    a = np.deg2rad(np.array(degrees, dtype=np.float64))
    return np.stack([np.cos(a), np.sin(a)], axis=1)


TEMPLATES = unit([0, 90])
# each stranger's best template is the nearer axis: best cosines cos 5, cos 20, cos 30, cos 2, cos 35, cos 40
STRANGERS = unit([5, 20, 60, 88, 125, 130])


def cos(deg: float) -> float:
    return float(np.cos(np.deg2rad(deg)))


def test_open_set_threshold_accepts_at_most_the_target_share_of_strangers() -> None:
    # n = 6, FAR 1/3: k = 2 accepted (cos 2, cos 5); cos 20 is the highest rejected; the gap (0.057) is
    # wider than twice the margin, so the threshold is cos 20 + margin
    t = open_set_threshold(STRANGERS, TEMPLATES, 1 / 3)
    assert t is not None and (t.source, t.strangers, t.impostor_pairs) == ("strangers", 6, 0)
    assert t.value == pytest.approx(cos(20) + CALIBRATION_MARGIN, abs=1e-6)
    best = (STRANGERS @ TEMPLATES.T).max(axis=1)
    assert int((best >= t.value).sum()) == 2
    # FAR 0.2: k = 1; the gap between cos 5 and cos 2 (0.0032) is wider than twice the margin too
    t = open_set_threshold(STRANGERS, TEMPLATES, 0.2)
    assert t is not None and t.value == pytest.approx(cos(5) + CALIBRATION_MARGIN, abs=1e-6)
    assert int((best >= t.value).sum()) == 1


def test_open_set_threshold_follows_the_templates() -> None:
    # one template at 0 degrees: the strangers' scores are now cos 5, 20, 60, 88, 125, 130 themselves
    t = open_set_threshold(STRANGERS, unit([0]), 1 / 3)
    assert t is not None and t.value == pytest.approx(cos(60) + CALIBRATION_MARGIN, abs=1e-6)
    # a template among the strangers raises it: 20 degrees scores cos 0 = 1 for the second stranger
    t = open_set_threshold(STRANGERS, unit([0, 20]), 0.2)
    assert t is not None and t.value == pytest.approx(cos(5) + CALIBRATION_MARGIN, abs=1e-6)


def test_open_set_threshold_needs_enough_strangers_and_a_template() -> None:
    assert open_set_threshold(STRANGERS, TEMPLATES, 0.1) is None  # FAR 0.1 needs 10 strangers
    assert open_set_threshold(STRANGERS, np.zeros((0, 0)), 0.5) is None  # no one enrolled
    with pytest.raises(RecognizerError, match="3-d embeddings, its templates are 2-d"):
        open_set_threshold(np.eye(3)[[0, 1, 2, 0, 1, 2]], TEMPLATES, 0.5)


def test_threshold_for_prefers_fixed_then_strangers_then_pairs() -> None:
    # the gallery: two people with two images each (4 impostor pairs), at the template angles
    emb, labels = unit([0, 3, 90, 93]), np.array([0, 0, 1, 1])
    common = {"target_far": 0.25, "model_default": "0.42", "templates": TEMPLATES}
    fixed = threshold_for(emb, labels, fixed=0.7, strangers=STRANGERS, **common)
    assert (fixed.value, fixed.source) == (0.7, "fixed")
    on_strangers = threshold_for(emb, labels, fixed=None, strangers=STRANGERS, **common)
    assert on_strangers.source == "strangers" and on_strangers.strangers == 6
    pairwise = threshold_for(emb, labels, fixed=None, strangers=None, **common)
    assert (pairwise.source, pairwise.impostor_pairs) == ("calibrated", 4)
    # too few strangers for FAR 0.1 and too few pairs: the model's default
    few = threshold_for(emb, labels, fixed=None, strangers=STRANGERS, **{**common, "target_far": 0.1})
    assert (few.value, few.source) == (0.42, "model default")
