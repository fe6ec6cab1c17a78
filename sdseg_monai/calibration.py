"""Calibrate a model's postprocessing on a validation split.

SDSeg rounds each organ's decoded map at 0.5. Thin and small organs (veins, adrenal glands) come out
under-confident, and a few organs gain stray islands. :func:`calibrate` segments the validation cases
once, keeps their per-organ probability maps (float32, as segmenting fuses them; only where they can
decide a label, :class:`CaseMaps`), and chooses, to maximise the mean per-organ Dice (the
metric), each organ's probability threshold together with the weight of its neighbouring axial slices
(coordinate ascent over :data:`THRESHOLD_GRID` x :data:`SMOOTHING_GRID`; some 3D context for a model
that sees one slice), then which organs keep only their largest connected component (nnU-Net's
postprocessing rule: only where it helps on validation). Before that search, it sets the radius around
an empty mask's latent within which a (slice, organ) pair need not be decoded
(:func:`choose_skip_decode_radius`: decoding is most of the inference cost, and most pairs are organs
absent from the slice), and empties those pairs' maps, so the search sees what segmenting will. The
result is a :class:`~sdseg_monai.config.Postprocessing` that :func:`save_calibrated_model` stores in a
copy of the model, so every later ``segment`` applies it.

Never calibrate on the test split: the thresholds would be selected on the cases that report the score.

Example:
    >>> segmenter = VolumeSegmenter("my_model")                                              # doctest: +SKIP
    >>> result = calibrate(segmenter, "data_manifests/btcv.json", "/data/RawData/Training")  # doctest: +SKIP
    >>> print(result.format_table())                                                         # doctest: +SKIP
    >>> save_calibrated_model("my_model", result, "my_model_calibrated")                     # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from sdseg_monai.config import SKIP_DECODE_PROBABILITY, Postprocessing, SDSegConfig
from sdseg_monai.data import Manifest, check_data_root, load_manifest
from sdseg_monai.errors import SDSegInputError
from sdseg_monai.evaluation import scored_organs, read_case
from sdseg_monai.transforms import IMAGE_KEY, LABEL_KEY, canonical_transforms, keep_largest_component, smooth_axially

CALIBRATION_NAME = "calibration.json"
THRESHOLD_GRID = tuple(round(0.1 + 0.05 * i, 2) for i in range(17))  # 0.10, 0.15, ..., 0.90
# Weights of the neighbouring axial slices tried for each organ (see Postprocessing.axial_smoothing).
SMOOTHING_GRID = (0.0, 0.25, 0.5, 1.0)
# A change must raise the mean Dice by more than this to be taken: ties keep SDSeg's defaults.
MIN_GAIN = 1e-4
# The skip radius is this fraction of the distance of the closest pair that decoded to
# SKIP_DECODE_PROBABILITY or more: absent organs sit far inside it, the organs it must not miss far outside.
SKIP_DECODE_MARGIN = 0.5


@dataclass
class CalibrationResult:
    """The chosen postprocessing and the per-organ mean Dice on the calibration cases, before
    (thresholds 0.5, no component filter) and after (the chosen postprocessing)."""

    postprocessing: Postprocessing
    organs: list[str]
    cases: list[str]
    before: dict[str, float | None]
    after: dict[str, float | None]
    split: str = "validation"
    seconds: float = 0.0
    closest_decoded: float | None = None  # distance of the closest pair that decoded visibly
    skipped_share: float = 0.0  # share of the calibration cases' (slice, organ) pairs not decoded

    @property
    def mean_before(self) -> float | None:
        return _mean_present(self.before.values())

    @property
    def mean_after(self) -> float | None:
        return _mean_present(self.after.values())

    def to_dict(self) -> dict:
        post = self.postprocessing
        return {
            "split": self.split,
            "cases": self.cases,
            "threshold_grid": list(THRESHOLD_GRID),
            "smoothing_grid": list(SMOOTHING_GRID),
            "postprocessing": {
                "default_threshold": post.default_threshold,
                "thresholds": dict(post.thresholds),
                "largest_component": list(post.largest_component),
                "skip_decode_radius": post.skip_decode_radius,
                "axial_smoothing": dict(post.axial_smoothing),
            },
            "skip_decode": {
                "probability": SKIP_DECODE_PROBABILITY,
                "margin": SKIP_DECODE_MARGIN,
                "closest_decoded_distance": self.closest_decoded,
                "pairs_skipped": self.skipped_share,
            },
            "mean_dice_before": self.mean_before,
            "mean_dice_after": self.mean_after,
            "per_organ": {
                name: {
                    "threshold": post.threshold(name),
                    "axial_smoothing": post.smoothing(name),
                    "largest_component": name in post.largest_component,
                    "dice_before": self.before[name],
                    "dice_after": self.after[name],
                }
                for name in self.organs
            },
            "seconds": round(self.seconds, 1),
        }

    def format_table(self) -> str:
        text = lambda v: "absent" if v is None else f"{v:.4f}"  # noqa: E731
        lines = [
            f"calibrated on {len(self.cases)} {self.split} cases",
            f"{'organ':<24} {'threshold':>9} {'smoothing':>9} {'largest':>7} {'Dice 0.5':>8} {'Dice':>7}",
        ]
        post = self.postprocessing
        for name in self.organs:
            largest = "yes" if name in post.largest_component else "-"
            lines.append(
                f"{name:<24} {post.threshold(name):>9.2f} {post.smoothing(name):>9.2f} {largest:>7} "
                f"{text(self.before[name]):>8} {text(self.after[name]):>7}"
            )
        lines.append(f"{'mean Dice':<42} {text(self.mean_before):>8} {text(self.mean_after):>7}")
        radius = self.postprocessing.skip_decode_radius
        if radius > 0:
            lines.append(
                f"decoding skipped within {radius:.3f} of an empty mask: "
                f"{self.skipped_share:.1%} of the (slice, organ) pairs of these cases"
            )
        else:
            lines.append("decoding skipped for no pair (no pair decoded visibly to measure a radius against)")
        return "\n".join(lines)


def _confusion(prediction: torch.Tensor, reference: torch.Tensor, classes: int) -> torch.Tensor:
    """(classes, classes) voxel counts of (predicted index, reference index); index 0 is background."""
    # One int32 buffer (classes <= 256): the search counts a whole volume per organ and case.
    pairs = prediction.reshape(-1).to(torch.int32, copy=True).mul_(classes).add_(reference.reshape(-1))
    return torch.bincount(pairs, minlength=classes * classes).reshape(classes, classes)


def _dice_per_case(confusions: Sequence[torch.Tensor]) -> list[list[float | None]]:
    """Per case, per organ (index 1..K) Dice from confusion matrices; None where the organ is absent
    from both prediction and reference (left out of every mean, as in :mod:`sdseg_monai.metrics`)."""
    out = []
    for matrix in confusions:
        matrix = matrix.double()
        overlap, predicted, reference = matrix.diagonal()[1:], matrix.sum(1)[1:], matrix.sum(0)[1:]
        total = predicted + reference
        out.append([None if t == 0 else float(2 * o / t) for o, t in zip(overlap.tolist(), total.tolist())])
    return out


def _mean_present(values) -> float | None:
    """Mean of the values that are not None (absent organs are left out of every mean)."""
    present = [v for v in values if v is not None]
    return float(np.mean(present)) if present else None


def _organ_means(per_case: list[list[float | None]], organs: int) -> list[float | None]:
    return [_mean_present(case[k] for case in per_case) for k in range(organs)]


def _overall(means: list[float | None]) -> float:
    return _mean_present(means) or 0.0


@dataclass
class OrganBox:
    """One organ's probabilities (x, y, z) float32 in a box of the volume starting at ``corner``."""

    corner: tuple[int, int, int]
    values: torch.Tensor

    @property
    def region(self) -> tuple[slice, slice, slice]:
        return tuple(slice(c, c + n) for c, n in zip(self.corner, self.values.shape))

    def smoothed(self, weight: float) -> torch.Tensor:
        """The box with :func:`~sdseg_monai.transforms.smooth_axially`. On its own the box's end slices
        lack a neighbour, but they claim nothing either way (see :class:`CaseMaps`)."""
        if weight == 0:
            return self.values
        return smooth_axially(self.values.permute(2, 0, 1)[:, None], [weight])[:, 0].permute(1, 2, 0)


def _span(above: torch.Tensor, axis: int) -> tuple[int, int]:
    """First and one past the last index along ``axis`` where the bool (X, Y, Z) ``above`` holds."""
    for other in sorted({0, 1, 2} - {axis}, reverse=True):
        above = above.any(dim=other)
    where = above.nonzero()[:, 0]
    return int(where[0]), int(where[-1]) + 1


class CaseMaps:
    """A case's per-organ probability maps (K, X, Y, Z), float32 as the model gives them, kept only
    where they can decide a label: for each organ, the bounding box of its voxels above ``floor``
    (half the lowest threshold searched), two slices longer at each axial end.

    Labels from these are those of the whole maps. An organ claims a voxel when its average over the
    voxel's slice and the slices either side passes a threshold, so only where one of those three
    is above ``floor``: within a slice of the box's voxels above ``floor``, where that average reads
    only slices inside the box. Elsewhere all three are at most ``floor`` (rounding adds far less
    than the other half of the threshold), with the whole maps as with these.

    Memory: the boxes (23% of the whole maps on synthetic 13-organ 512x512x100 cases; all of them
    for a model that is unsure everywhere).
    """

    def __init__(self, shape: tuple[int, int, int], organs: list[OrganBox | None], floor: float):
        self.shape = shape
        self.organs = organs
        self.floor = floor

    @classmethod
    def of(cls, maps: torch.Tensor, floor: float) -> CaseMaps:
        """From whole (K, X, Y, Z) maps (copied: ``maps`` can go)."""
        organs = []
        depth = maps.shape[-1]
        for organ_map in maps:
            above = organ_map > floor
            if not bool(above.any()):
                organs.append(None)  # claims nothing anywhere
                continue
            (x0, x1), (y0, y1), (z0, z1) = (_span(above, axis) for axis in range(3))
            z0, z1 = max(0, z0 - 2), min(depth, z1 + 2)
            organs.append(OrganBox((x0, y0, z0), organ_map[x0:x1, y0:y1, z0:z1].to(torch.float32, copy=True)))
        return cls(tuple(maps.shape[1:]), organs, floor)

    def drop_pairs(self, skipped: torch.Tensor) -> None:
        """Empty the (organ, slice) pairs that ``skipped`` (K, Z) marks, in place (as skipping their
        decode does). The boxes stay valid: emptying lowers no voxel's neighbours above ``floor``."""
        for box, pairs in zip(self.organs, skipped):
            if box is not None:
                box.values[..., pairs[box.region[2]]] = 0

    def fuse(
        self, thresholds: Sequence[float], weights: Sequence[float], leave_out: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(X, Y, Z) the highest smoothed probability claiming each voxel (-1: none) and its organ
        index (uint8: 0 background, k + 1 organ k), without organ ``leave_out``: the rule of
        :func:`~sdseg_monai.transforms.fuse_probabilities` (strictly above the threshold; the most
        probable, ties to the lower organ index: organs go in order and only a higher value wins)."""
        best = torch.full(self.shape, -1.0)
        index = torch.zeros(self.shape, dtype=torch.uint8)
        for k, box in enumerate(self.organs):
            if box is None or k == leave_out:
                continue
            organ = box.smoothed(weights[k])
            claim = torch.where(organ > thresholds[k], organ, -1.0)
            region = box.region
            wins = claim > best[region]
            best[region] = torch.where(wins, claim, best[region])
            index[region] = torch.where(wins, k + 1, index[region])
        return best, index


def lowest_floor(grid: Sequence[float]) -> float:
    """The ``floor`` of :class:`CaseMaps` for a search over ``grid`` (which starts from 0.5)."""
    return min(0.5, *grid) / 2


def _candidate_confusions(
    case: CaseMaps, reference: torch.Tensor, k: int, thresholds, weights, grid, smoothing_grid, classes: int
) -> list[list[torch.Tensor]]:
    """Confusion matrices of ``case`` for organ ``k`` at each (smoothing, threshold) of the grids,
    the other organs as they are: [smoothing][threshold]. Organ ``k`` claims only inside its box,
    so only the box is fused again."""
    best, index = case.fuse(thresholds, weights, leave_out=k)
    base = _confusion(index, reference, classes)
    box = case.organs[k]
    if box is None:
        return [[base] * len(grid) for _ in smoothing_grid]
    region = box.region
    best, index, reference = best[region], index[region], reference[region]
    outside = base - _confusion(index, reference, classes)
    table = []
    for weight in smoothing_grid:
        organ = box.smoothed(weight)
        row = []
        for value in grid:
            # fuse_probabilities' rule: the highest claimant wins, ties to the lower organ index.
            wins = (organ > value) & ((organ > best) | ((organ == best) & (index > k + 1)))
            row.append(outside + _confusion(torch.where(wins, k + 1, index), reference, classes))
        table.append(row)
    return table


def search_postprocessing(
    probabilities: Sequence[torch.Tensor | CaseMaps],
    references: Sequence[torch.Tensor],
    organ_names: Sequence[str],
    scored: Sequence[str] | None = None,
    passes: int = 2,
    grid: Sequence[float] = THRESHOLD_GRID,
    smoothing_grid: Sequence[float] = SMOOTHING_GRID,
) -> tuple[Postprocessing, dict[str, float | None], dict[str, float | None]]:
    """Choose per-organ thresholds, axial smoothing and largest-component organs that maximise the
    mean per-organ Dice.

    Args:
        probabilities: per case, (K, X, Y, Z) probability maps, organs in ``organ_names`` order, or
            their :class:`CaseMaps` (floor at most :func:`lowest_floor` of ``grid``).
        references: per case, the (X, Y, Z) reference as organ *indices* (0 background, k + 1 organ k).
        organ_names: the K organs.
        scored: the organs the references label (default: all). Only these are tuned and scored; the
            others keep the defaults but still compete for voxels.
        passes: rounds of coordinate ascent over the organs' (smoothing, threshold) pairs.
        grid: the thresholds tried.
        smoothing_grid: the neighbouring-slice weights tried (with every threshold).

    Returns:
        the postprocessing, and the scored organs' mean Dice before (0.5, no smoothing, no filter)
        and after it.
    """
    organs = len(organ_names)
    classes = organs + 1
    tuned = [k for k, name in enumerate(organ_names) if scored is None or name in scored]
    if len(probabilities) != len(references) or not probabilities:
        raise SDSegInputError("calibration needs one reference per probability map, and at least one case")
    floor = lowest_floor(grid)
    cases = [p if isinstance(p, CaseMaps) else CaseMaps.of(p, floor) for p in probabilities]
    if any(case.floor > floor for case in cases):
        raise ValueError(f"maps kept above {max(c.floor for c in cases)} cannot be searched at thresholds down to {2 * floor}")
    thresholds = [0.5] * organs
    weights = [0.0] * organs

    def score(confusions: Sequence[torch.Tensor]) -> list[float | None]:
        means = _organ_means(_dice_per_case(confusions), organs)
        return [means[k] if k in tuned else None for k in range(organs)]

    def fused_all() -> list[torch.Tensor]:
        return [case.fuse(thresholds, weights)[1] for case in cases]

    def confusions(fused: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return [_confusion(f, r, classes) for f, r in zip(fused, references)]

    before = score(confusions(fused_all()))
    best_score = _overall(before)
    for _ in range(passes):
        changed = False
        for k in tuned:
            tables = [_candidate_confusions(c, r, k, thresholds, weights, grid, smoothing_grid, classes) for c, r in zip(cases, references)]
            for i, weight in enumerate(smoothing_grid):
                for j, value in enumerate(grid):
                    candidate = _overall(score([table[i][j] for table in tables]))
                    if candidate > best_score + MIN_GAIN:
                        best_score, thresholds[k], weights[k], changed = candidate, float(value), float(weight), True
        if not changed:
            break

    fused = fused_all()
    largest = []
    for k in tuned:
        filtered = [keep_largest_component(f, [k + 1]) for f in fused]
        base = score(confusions(fused))[k]
        gain = score(confusions(filtered))[k]
        if base is not None and gain is not None and gain > base + MIN_GAIN:
            largest.append(organ_names[k])
            fused = filtered
    postprocessing = Postprocessing(
        thresholds={name: t for name, t in zip(organ_names, thresholds) if t != 0.5},
        largest_component=largest,
        axial_smoothing={name: w for name, w in zip(organ_names, weights) if w != 0},
    )
    after = score(confusions(fused))
    return (
        postprocessing,
        {organ_names[k]: before[k] for k in tuned},
        {organ_names[k]: after[k] for k in tuned},
    )


def choose_skip_decode_radius(
    peaks: Sequence[torch.Tensor], distances: Sequence[torch.Tensor], margin: float = SKIP_DECODE_MARGIN
) -> tuple[float, float | None, float]:
    """The radius around an empty mask's latent within which pairs need not be decoded.

    Args:
        peaks: per case, (K, Z) each (organ, slice)'s highest probability (at native resolution).
        distances: per case, (K, Z) each pair's :meth:`~sdseg_monai.model.SDSeg.empty_distance`.
        margin: the radius is this fraction of the closest visible pair's distance.

    Returns:
        the radius (0 when no pair reached :data:`SKIP_DECODE_PROBABILITY`: nothing to measure it
        against), that closest distance (or None), and the share of pairs the radius skips.
    """
    peak = torch.cat([p.flatten().float() for p in peaks])
    distance = torch.cat([d.flatten().float() for d in distances])
    if peak.shape != distance.shape:
        raise SDSegInputError("calibration needs one distance per (organ, slice) peak")
    visible = peak >= SKIP_DECODE_PROBABILITY
    if not visible.any():
        return 0.0, None, 0.0
    closest = float(distance[visible].min())
    radius = margin * closest
    return radius, closest, float((distance < radius).float().mean())


def check_calibration_split(split: str | None) -> None:
    """Refuse the test split, and every case (``None``), test cases among them: thresholds chosen
    there would inflate the score reported on them (the manifest loader refuses overlapping splits)."""
    if split is None or split == "test":
        raise SDSegInputError("refusing to calibrate on the test split: choose thresholds on validation cases")


def check_calibration_output(
    model_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    manifest: str | os.PathLike | None = None,
    data_root: str | os.PathLike | None = None,
) -> Path:
    """Fail early when the calibrated copy of ``model_dir`` cannot go to ``output_dir``: the manifest
    is never replaced either, nor the data root (the output may lie inside it)."""
    from sdseg_monai.model import check_output_folder

    output_dir, model = Path(output_dir), Path(model_dir).resolve()
    if output_dir.resolve() == model or model in output_dir.resolve().parents:
        raise SDSegInputError("the calibrated model must go to a new folder; the input model is never modified", output_dir)
    return check_output_folder(output_dir, model_dir, manifest, roots=[data_root])


def calibrate(
    segmenter,
    manifest: Manifest | str | os.PathLike,
    data_root: str | os.PathLike,
    split: str = "validation",
    progress: Callable[[int, int, str], None] | None = None,
) -> CalibrationResult:
    """Choose a model's postprocessing on a manifest split (not the test split).

    Args:
        segmenter: a loaded :class:`~sdseg_monai.inference.VolumeSegmenter` (its seed and batch are used).
        manifest: a :class:`~sdseg_monai.data.Manifest` or the path of a manifest JSON.
        data_root: the folder the manifest's relative paths start from.
        split: the split to calibrate on.
        progress: called after each case is segmented with (cases done, total, case id).

    Memory holds one case's whole per-organ maps (float32, K x its voxels x 4 bytes) while it is
    segmented, and every case's :class:`CaseMaps` (the maps where they can decide a label), reference
    and label map: the search chooses on the values segmenting produces.
    """
    check_calibration_split(split)
    start = time.perf_counter()
    if not isinstance(manifest, Manifest):
        manifest = load_manifest(manifest)
    files = check_data_root(manifest, data_root, split)
    if not files:
        raise SDSegInputError(f"split {split!r} has no cases", manifest.path)
    organs, _ = scored_organs(segmenter, manifest)
    model_labels = list(segmenter.organs)  # probabilities_canonical's organ order
    transforms = canonical_transforms(segmenter.config.preprocessing, keys=(IMAGE_KEY,), label_keys=(LABEL_KEY,))
    floor = lowest_floor(THRESHOLD_GRID)
    probabilities, peaks, distances, references, cases = [], [], [], [], []
    for done, (case_id, image_path, label_path) in enumerate(files, start=1):
        image, reference = read_case(image_path, label_path)
        canonical = transforms({IMAGE_KEY: image.image, LABEL_KEY: reference.image})
        del image, reference
        label = canonical.pop(LABEL_KEY)[0].as_tensor().round().long()
        index = torch.zeros(label.shape, dtype=torch.uint8)
        for dataset_label, model_label, _ in organs:
            index[label == dataset_label] = model_labels.index(model_label) + 1
        del label  # freed before the case's whole maps are made, the peak of calibrating
        maps, distance = segmenter.probabilities_canonical(canonical.pop(IMAGE_KEY))
        peaks.append(maps.amax(dim=(1, 2)))
        probabilities.append(CaseMaps.of(maps, floor))
        del maps
        distances.append(distance)
        references.append(index)
        cases.append(case_id)
        if progress is not None:
            progress(done, len(files), case_id)
    names = list(segmenter.organs.values())
    radius, closest, skipped = choose_skip_decode_radius(peaks, distances)
    for case, distance in zip(probabilities, distances):
        case.drop_pairs(distance < radius)  # the search sees what segmenting will: the skipped pairs empty
    postprocessing, before, after = search_postprocessing(probabilities, references, names, scored=[n for _, _, n in organs])
    return CalibrationResult(
        postprocessing=replace(postprocessing, skip_decode_radius=radius),
        organs=list(before),
        cases=cases,
        before=before,
        after=after,
        split=split,
        seconds=time.perf_counter() - start,
        closest_decoded=closest,
        skipped_share=skipped,
    )


def save_calibrated_model(model_dir: str | os.PathLike, result: CalibrationResult, output_dir: str | os.PathLike) -> Path:
    """Copy model folder ``model_dir`` to ``output_dir`` with ``result``'s postprocessing in its config
    and the calibration report as ``calibration.json``; the weights are copied byte for byte. Written
    atomically; ``model_dir`` is never modified. From a MONAI bundle, the result is a model folder
    (its weights as safetensors, the same tensors), which ``export_bundle`` can package again.
    """
    from sdseg_monai.model import CONFIG_NAME, EVALUATION_NAME, WEIGHTS_NAME, model_files, replace_dir

    source, target = Path(model_dir), check_calibration_output(model_dir, output_dir)
    config_path, weights_path = model_files(source)
    from_bundle = config_path.name != CONFIG_NAME
    config = SDSegConfig.from_json_file(config_path)
    config.postprocessing = result.postprocessing
    config.validate()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        if from_bundle:
            from safetensors.torch import save_file

            from sdseg_monai.weights import read_state_dict

            save_file(read_state_dict(weights_path), str(tmp / WEIGHTS_NAME))
        else:
            for item in source.iterdir():
                # The old test metrics (evaluation.json) describe the old postprocessing: not copied.
                if item.is_file() and item.name not in (CONFIG_NAME, CALIBRATION_NAME, EVALUATION_NAME):
                    shutil.copy2(item, tmp / item.name)
        (tmp / CONFIG_NAME).write_text(config.to_json_string(), encoding="utf-8")
        (tmp / CALIBRATION_NAME).write_text(json.dumps(result.to_dict(), indent=2) + "\n", encoding="utf-8")
        replace_dir(tmp, target, source)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target
