"""Per-organ Dice (and optional HD95) on the original voxel grid, with MONAI's metric functions.

Conventions: an organ absent from both prediction and reference is *absent* (``None``), never 1.0 or
0.0; an organ predicted where the reference has none scores 0 (the official SDSeg code's 1 is a bug).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass
from typing import Mapping, Sequence

import numpy as np
import torch

TRANSUNET8 = ("aorta", "gallbladder", "left_kidney", "right_kidney", "liver", "pancreas", "spleen", "stomach")


@dataclass
class OrganScore:
    """One organ's agreement between a prediction and a reference label map."""

    label: int
    name: str
    dice: float | None
    hd95: float | None = None
    predicted_voxels: int = 0
    reference_voxels: int = 0

    @property
    def absent(self) -> bool:
        return self.dice is None

    def to_dict(self) -> dict:
        return asdict(self)


def finite_or_none(value: float | None) -> float | None:
    """``value`` as a float, or None when it is None, NaN or infinite (strict JSON has neither)."""
    return None if value is None or not math.isfinite(value) else float(value)


def mean_or_none(values: Sequence[float]) -> float | None:
    """The mean of ``values``, or None when there are none."""
    return float(np.mean(values)) if len(values) else None


def _as_numpy(array) -> np.ndarray:
    if isinstance(array, torch.Tensor):
        array = array.detach().cpu().numpy()
    return np.asarray(array)


def _bounding_box(mask: np.ndarray) -> tuple[slice, ...]:
    """The smallest box holding ``mask``; metrics on the crop equal metrics on the whole grid."""
    box = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        hits = np.flatnonzero(mask.any(axis=other))
        box.append(slice(int(hits[0]), int(hits[-1]) + 1))
    return tuple(box)


def binary_dice(prediction: np.ndarray, reference: np.ndarray) -> float | None:
    """Dice of two binary masks with MONAI's ``compute_dice``; None when both are empty."""
    from monai.metrics import compute_dice

    prediction, reference = prediction.astype(bool), reference.astype(bool)
    if not prediction.any() and not reference.any():
        return None
    if not reference.any():
        return 0.0  # false positives only
    box = _bounding_box(prediction | reference)
    p = torch.from_numpy(prediction[box])[None, None].float()
    r = torch.from_numpy(reference[box])[None, None].float()
    return float(compute_dice(p, r, include_background=True, ignore_empty=False)[0, 0])


def binary_hd95(prediction: np.ndarray, reference: np.ndarray, spacing: Sequence[float]) -> float | None:
    """95th-percentile Hausdorff distance in physical units (mm); None unless both masks are non-empty."""
    from monai.metrics import compute_hausdorff_distance

    prediction, reference = prediction.astype(bool), reference.astype(bool)
    if not prediction.any() or not reference.any():
        return None
    box = _bounding_box(prediction | reference)
    # One voxel of margin so that borders of the crop are real background.
    padded = [np.pad(m[box], 1) for m in (prediction, reference)]
    p, r = (torch.from_numpy(m)[None, None].float() for m in padded)
    with warnings.catch_warnings():  # MONAI's own internal deprecation notice, not ours to act on
        warnings.simplefilter("ignore", FutureWarning)
        value = compute_hausdorff_distance(p, r, include_background=True, percentile=95, spacing=[float(s) for s in spacing])
    return float(value[0, 0])


def organ_scores(
    prediction,
    reference,
    organs: Mapping[int, str],
    spacing: Sequence[float] | None = None,
) -> list[OrganScore]:
    """Per-organ scores of two label maps on the same grid.

    Args:
        prediction: predicted label map.
        reference: reference label map, same shape.
        organs: ``{label value: name}`` of the organs to score.
        spacing: voxel spacing in mm; when given, HD95 is computed too.
    """
    prediction, reference = _as_numpy(prediction), _as_numpy(reference)
    if prediction.shape != reference.shape:
        raise ValueError(f"prediction shape {prediction.shape} differs from reference shape {reference.shape}")
    scores = []
    for label, name in organs.items():
        p, r = prediction == label, reference == label
        scores.append(
            OrganScore(
                label=int(label),
                name=name,
                dice=binary_dice(p, r),
                hd95=binary_hd95(p, r, spacing) if spacing is not None else None,
                predicted_voxels=int(p.sum()),
                reference_voxels=int(r.sum()),
            )
        )
    return scores


def mean_dice(scores: Sequence[OrganScore], names: Sequence[str] | None = None) -> float | None:
    """Mean Dice over the organs present (optionally only those named); None if none is present."""
    values = [s.dice for s in scores if s.dice is not None and (names is None or s.name in names)]
    return float(np.mean(values)) if values else None


def format_scores(scores: Sequence[OrganScore]) -> str:
    """A plain-text table, absent organs shown as such."""
    with_hd = any(s.hd95 is not None for s in scores)
    head = f"{'label':>5}  {'organ':<24} {'Dice':>6}" + (f" {'HD95 mm':>8}" if with_hd else "")
    lines = [head]
    for s in scores:
        dice = "absent" if s.dice is None else f"{s.dice:.4f}"
        row = f"{s.label:>5}  {s.name:<24} {dice:>6}"
        if with_hd:
            row += f" {'-' if s.hd95 is None or math.isinf(s.hd95) else f'{s.hd95:.2f}':>8}"
        lines.append(row)
    mean = mean_dice(scores)
    lines.append(f"{'':>5}  {'mean (present organs)':<24} {'-' if mean is None else f'{mean:.4f}':>6}")
    return "\n".join(lines)
