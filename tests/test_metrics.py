"""Per-organ Dice equals MONAI's DiceMetric; absent organs are absent; HD95 uses physical spacing."""

import numpy as np
import pytest
import torch
from monai.metrics import DiceMetric

from sdseg_monai.metrics import binary_dice, binary_hd95, format_scores, mean_dice, organ_scores


def random_label_maps(seed, shape=(30, 26, 12), labels=(1, 2, 3)):
    rng = np.random.default_rng(seed)
    ref = np.zeros(shape, dtype=np.uint8)
    pred = np.zeros(shape, dtype=np.uint8)
    for value in labels:
        lo = rng.integers(0, 10, 3)
        hi = lo + rng.integers(5, 15, 3)
        ref[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] = value
        shift = rng.integers(-3, 4, 3)
        lo2, hi2 = np.clip(lo + shift, 0, None), np.clip(hi + shift, 0, None)
        pred[lo2[0] : hi2[0], lo2[1] : hi2[1], lo2[2] : hi2[2]] = value
    return pred, ref


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dice_equals_monai_dice_metric(seed):
    pred, ref = random_label_maps(seed)
    ours = organ_scores(pred, ref, {1: "a", 2: "b", 3: "c"})
    metric = DiceMetric(include_background=False, reduction="none")
    one_hot = lambda m: torch.from_numpy(np.stack([m == v for v in range(4)]))[None].float()  # noqa: E731
    theirs = metric(one_hot(pred), one_hot(ref))[0].tolist()
    assert [s.dice for s in ours] == pytest.approx(theirs, abs=1e-6)
    # And the textbook formula.
    for s in ours:
        p, r = pred == s.label, ref == s.label
        assert s.dice == pytest.approx(2 * (p & r).sum() / (p.sum() + r.sum()))


def test_absent_and_false_positive_conventions():
    empty = np.zeros((5, 5, 5), dtype=np.uint8)
    blob = empty.copy()
    blob[1:3, 1:3, 1:3] = 1
    assert binary_dice(empty, empty) is None  # absent from both: not 1.0, not 0.0
    assert binary_dice(blob, empty) == 0.0  # predicted where there is none (official code says 1: a bug)
    assert binary_dice(empty, blob) == 0.0
    assert binary_dice(blob, blob) == 1.0
    scores = organ_scores(blob, blob, {1: "liver", 5: "esophagus"})
    assert scores[1].absent and scores[1].dice is None
    assert mean_dice(scores) == 1.0  # the absent organ is left out of the mean
    table = format_scores(scores)
    assert "esophagus" in table and "absent" in table


def test_hd95_is_in_millimetres():
    ref = np.zeros((20, 20, 20), dtype=np.uint8)
    ref[5:15, 5:15, 5:15] = 1
    pred = np.roll(ref, 2, axis=2)  # shifted 2 voxels along z
    assert binary_hd95(pred, ref, (1.0, 1.0, 1.0)) == pytest.approx(2.0)
    assert binary_hd95(pred, ref, (1.0, 1.0, 3.0)) == pytest.approx(6.0)
    assert binary_hd95(np.zeros_like(ref), ref, (1, 1, 1)) is None
    with_hd = organ_scores(pred, ref, {1: "x"}, spacing=(0.5, 0.5, 2.0))
    assert with_hd[0].hd95 == pytest.approx(4.0)
