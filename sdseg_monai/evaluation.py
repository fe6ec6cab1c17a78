"""Evaluate one loaded model on a manifest split: per-case, per-organ Dice (and HD95), written as
``per_case.csv`` and ``report.json``, with a per-organ summary table.

The model is loaded once (a :class:`~sdseg_monai.inference.VolumeSegmenter`) and reused for every case.
Scores are computed on each case's original voxel grid, with the conventions of
:mod:`sdseg_monai.metrics`: an organ absent from both prediction and reference is *absent* and left out
of every mean (never counted as 1 or 0).

Example:
    >>> segmenter = VolumeSegmenter("my_model")                                   # doctest: +SKIP
    >>> report = evaluate(segmenter, "data_manifests/btcv.json", "/data/RawData/Training",
    ...                   split="test", output_dir="reports/test")                # doctest: +SKIP
    >>> print(report.format_table())                                              # doctest: +SKIP
"""

from __future__ import annotations

import csv
import json
import math
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from sdseg_monai import __version__
from sdseg_monai.data import (
    Manifest, Volume, atomic_paths, check_data_root, check_label_grid, check_spares_inputs, load_manifest, make_writable_folder,
    match_organs, read_volume,
)
from sdseg_monai.errors import SDSegInputError
from sdseg_monai.metrics import OrganScore, finite_or_none, mean_or_none, organ_scores

CSV_NAME = "per_case.csv"
REPORT_NAME = "report.json"
CSV_COLUMNS = ("case", "label", "organ", "dice", "hd95", "predicted_voxels", "reference_voxels")


@dataclass
class CaseResult:
    """The scores of one case. ``scores`` carry the dataset's label values, in label order."""

    case_id: str
    image: str
    label: str
    scores: list[OrganScore]
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {
            "case": self.case_id,
            "image": self.image,
            "label": self.label,
            "seconds": round(self.seconds, 3),
            "organs": {
                s.name: {
                    "label": s.label,
                    "dice": finite_or_none(s.dice),
                    "hd95": finite_or_none(s.hd95),
                    "predicted_voxels": s.predicted_voxels,
                    "reference_voxels": s.reference_voxels,
                }
                for s in self.scores
            },
        }


@dataclass
class OrganSummary:
    """One organ over all cases: means over the cases where it is present (not absent)."""

    label: int
    name: str
    mean_dice: float | None
    mean_hd95: float | None
    cases_present: int
    cases_with_hd95: int
    cases: int

    def to_dict(self) -> dict:
        return {
            "label": self.label,
            "mean_dice": finite_or_none(self.mean_dice),
            "mean_hd95": finite_or_none(self.mean_hd95),
            "cases_present": self.cases_present,
            "cases_with_hd95": self.cases_with_hd95,
            "cases": self.cases,
        }


@dataclass
class EvaluationReport:
    """Everything :func:`evaluate` measured, and where it was written.

    ``mean_dice`` is the mean of the per-organ means over every scored organ (13 for a full BTCV model);
    ``subset_means`` holds the same over each named organ subset of the manifest (e.g. ``transunet8``),
    with the subset organs that were scored and those that were not.
    """

    dataset: str
    manifest: str
    split: str
    data_root: str
    model: str
    seed: int
    hd95: bool
    organs: dict[int, str]
    cases: list[CaseResult]
    per_organ: list[OrganSummary]
    mean_dice: float | None
    subset_means: dict[str, dict] = field(default_factory=dict)
    unscored_organs: list[str] = field(default_factory=list)
    seconds: float = 0.0
    postprocessing: dict = field(default_factory=dict)
    csv_path: Path | None = None
    json_path: Path | None = None

    def rows(self) -> list[dict]:
        """The per-case CSV rows: one per (case, organ); empty strings where a value is undefined."""
        rows = []
        for case in self.cases:
            for s in case.scores:
                rows.append(
                    {
                        "case": case.case_id,
                        "label": s.label,
                        "organ": s.name,
                        "dice": _csv_value(s.dice),
                        "hd95": _csv_value(s.hd95),
                        "predicted_voxels": s.predicted_voxels,
                        "reference_voxels": s.reference_voxels,
                    }
                )
        return rows

    def to_dict(self) -> dict:
        """The ``report.json`` content (strict JSON: undefined values are null, never NaN)."""
        return {
            "sdseg3d_version": __version__,
            "dataset": self.dataset,
            "manifest": self.manifest,
            "split": self.split,
            "data_root": self.data_root,
            "model": self.model,
            "seed": self.seed,
            "hd95": self.hd95,
            "organs": {str(k): v for k, v in self.organs.items()},
            "unscored_organs": list(self.unscored_organs),
            "postprocessing": self.postprocessing,
            "seconds": round(self.seconds, 3),
            "summary": {
                "cases": len(self.cases),
                "mean_dice": finite_or_none(self.mean_dice),
                "organs_in_mean": [o.name for o in self.per_organ if o.mean_dice is not None],
                "subsets": self.subset_means,
                "per_organ": {o.name: o.to_dict() for o in self.per_organ},
            },
            "cases": [c.to_dict() for c in self.cases],
        }

    def format_table(self) -> str:
        """A printable per-organ table (mean Dice, optional mean HD95), then the overall and subset means."""
        head = f"{'label':>5}  {'organ':<24} {'present':>7} {'Dice':>7}" + (f" {'HD95 mm':>8} {'(cases)':>7}" if self.hd95 else "")
        lines = [
            f"{self.dataset} split {self.split!r}: {len(self.cases)} cases, model {self.model or '<in memory>'}, "
            f"seed {self.seed}",
            head,
        ]
        for o in self.per_organ:
            dice = "absent" if o.mean_dice is None else f"{o.mean_dice:.4f}"
            row = f"{o.label:>5}  {o.name:<24} {f'{o.cases_present}/{o.cases}':>7} {dice:>7}"
            if self.hd95:
                row += f" {'-' if o.mean_hd95 is None else f'{o.mean_hd95:.2f}':>8} {f'({o.cases_with_hd95})':>7}"
            lines.append(row)
        in_mean = sum(o.mean_dice is not None for o in self.per_organ)
        lines.append(f"{'':>5}  {f'mean Dice, {in_mean} organs':<32} {_text(self.mean_dice):>7}")
        for subset, info in self.subset_means.items():
            total = len(info["organs"]) + len(info["not_scored"])
            title = f"mean Dice, {subset} ({len(info['organs'])}/{total})"
            lines.append(f"{'':>5}  {title:<32} {_text(info['mean_dice']):>7}")
        if self.unscored_organs:
            lines.append(f"not scored (no label in the manifest): {', '.join(self.unscored_organs)}")
        if self.hd95:  # a missed organ has no surface to measure: it counts in Dice (0) only
            lines.append("HD95: mean over the cases where both prediction and reference hold the organ (their count in brackets)")
        return "\n".join(lines)


def _csv_value(value: float | None) -> str:
    # repr of a float round-trips exactly, so means recomputed from the CSV match the report.
    value = finite_or_none(value)
    return "" if value is None else repr(value)


def _text(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def prepare_output_dir(
    output_dir: str | os.PathLike,
    inputs: Iterable[str | os.PathLike | None] = (),
    roots: Iterable[str | os.PathLike | None] = (),
) -> Path:
    """Create ``output_dir`` if needed and check it is writable, before any compute.

    Args:
        output_dir: the report folder.
        inputs: what the evaluation reads (manifest, images, label maps, model folder): the report's
            files may not be one nor lie inside an input folder (see :func:`evaluation_sources`); the
            folder may hold inputs, as ``.`` does.
        roots: the data root, which may hold the report.

    Raises:
        SDSegInputError: the path is a file, would harm an input, cannot be created, or is not writable.
    """
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise SDSegInputError("report output must be a folder, but a file of that name exists", output_dir)
    # Its two files, not the folder: they are written into it, the folder is never replaced.
    check_spares_inputs([output_dir / CSV_NAME, output_dir / REPORT_NAME], inputs, roots)
    return make_writable_folder(output_dir, "the report")


def evaluation_sources(manifest: str | os.PathLike, files, model: str | os.PathLike | None = None) -> list:
    """What an evaluation reads, for :func:`prepare_output_dir`: the manifest, each case's image and
    label map (``files``: ``(case id, image, label)``) and the model (its folder; a description of an
    in-memory model names nothing on disk and is skipped)."""
    return [manifest, model, *(path for _, image, label in files for path in (image, label))]


def scored_organs(segmenter, manifest: Manifest) -> tuple[list[tuple[int, int, str]], list[str]]:
    """Match the model's organs to the manifest's labels by name.

    Returns:
        ``(dataset label, model label, name)`` per organ scored, in dataset label order, and the names
        of the model's organs that the manifest does not label.
    """
    return match_organs(manifest, segmenter.organs)


def score_case(
    prediction: np.ndarray,
    reference: np.ndarray,
    organs: list[tuple[int, int, str]],
    spacing=None,
) -> list[OrganScore]:
    """Per-organ scores of a predicted label map (model label values) against a reference (dataset values).

    Args:
        prediction: predicted label map, model label values.
        reference: reference label map on the same grid, dataset label values.
        organs: ``(dataset label, model label, name)`` per organ.
        spacing: voxel spacing (mm) per array axis; when given, HD95 is computed too.
    """
    if all(d == m for d, m, _ in organs):
        remapped = reference
    else:
        # Bring the reference into the model's label values, so that one organ_scores call compares them.
        remapped = np.zeros(reference.shape, dtype=np.uint8)
        for dataset_label, model_label, _ in organs:
            remapped[reference == dataset_label] = model_label
    scores = organ_scores(prediction, remapped, {m: name for _, m, name in organs}, spacing=spacing)
    return [replace(s, label=d) for s, (d, _, _) in zip(scores, organs)]


def summarise(
    cases: list[CaseResult], organs: list[tuple[int, int, str]], subsets: dict[str, tuple[str, ...]]
) -> tuple[list[OrganSummary], float | None, dict[str, dict]]:
    """Per-organ means over cases (absent cases left out), their mean, and the mean over each subset."""
    per_organ = []
    for index, (dataset_label, _, name) in enumerate(organs):
        scores = [case.scores[index] for case in cases]
        dice = [s.dice for s in scores if s.dice is not None]
        hd = [s.hd95 for s in scores if s.hd95 is not None and math.isfinite(s.hd95)]
        per_organ.append(
            OrganSummary(dataset_label, name, mean_or_none(dice), mean_or_none(hd), len(dice), len(hd), len(scores))
        )
    means = {o.name: o.mean_dice for o in per_organ if o.mean_dice is not None}
    subset_means = {}
    for subset, members in subsets.items():
        used = [m for m in members if m in means]
        subset_means[subset] = {
            "mean_dice": mean_or_none([means[m] for m in used]),
            "organs": used,
            "not_scored": [m for m in members if m not in means],
        }
    return per_organ, mean_or_none(list(means.values())), subset_means


def read_case(image_path: str | os.PathLike, label_path: str | os.PathLike) -> tuple[Volume, Volume]:
    """Load an image and its label map, and check that they lie on the same voxel grid.

    Raises:
        SDSegInputError: an unreadable file, or a label map of another shape or affine than its image.
    """
    image = read_volume(image_path)
    reference = read_volume(label_path, what="label map")
    check_label_grid(image, reference)
    return image, reference


def evaluate(
    segmenter,
    manifest: Manifest | str | os.PathLike,
    data_root: str | os.PathLike,
    split: str | None = "test",
    output_dir: str | os.PathLike | None = None,
    hd95: bool = False,
    progress: Callable[[int, int, CaseResult], None] | None = None,
) -> EvaluationReport:
    """Segment every case of a manifest split with one loaded model and score it against its label map.

    Only the organs the model segments (and the manifest labels) are scored, matched by name. Every
    file of the split is checked before the first case is segmented.

    Args:
        segmenter: a :class:`~sdseg_monai.inference.VolumeSegmenter`, already loaded; reused for every case.
        manifest: a :class:`~sdseg_monai.data.Manifest` or the path of a manifest JSON.
        data_root: the folder the manifest's relative paths start from.
        split: the split to evaluate (None: every case of the manifest).
        output_dir: where ``per_case.csv`` and ``report.json`` are written (atomically); None writes nothing.
        hd95: also compute the 95th-percentile Hausdorff distance (mm, from the affine's spacing).
        progress: called after each case with (cases done, total cases, that case's result).

    Returns:
        an :class:`EvaluationReport`.

    Raises:
        SDSegInputError: a bad manifest, missing files, an unreadable volume, a label map whose grid
            differs from its image's, or an output folder that cannot be written.
    """
    start = time.perf_counter()
    if not isinstance(manifest, Manifest):
        manifest = load_manifest(manifest)
    files = check_data_root(manifest, data_root, split)
    organs, unscored = scored_organs(segmenter, manifest)
    root = Path(data_root)
    if output_dir is not None:
        sources = evaluation_sources(manifest.path, files, getattr(segmenter, "model_name", None))
        output_dir = prepare_output_dir(output_dir, sources, roots=[root])

    results: list[CaseResult] = []
    for done, (case_id, image_path, label_path) in enumerate(files, start=1):
        case_start = time.perf_counter()
        image, reference = read_case(image_path, label_path)
        prediction = segmenter.segment(image).labels
        # Spacing per array axis: the norms of the affine's columns.
        spacing = np.linalg.norm(image.affine[:3, :3], axis=0).tolist() if hd95 else None
        scores = score_case(prediction, reference.image[0].numpy(), organs, spacing)
        result = CaseResult(
            case_id=case_id,
            image=manifest.cases[case_id].image,
            label=manifest.cases[case_id].label,
            scores=scores,
            seconds=time.perf_counter() - case_start,
        )
        results.append(result)
        del image, reference, prediction  # one case in memory at a time
        if progress is not None:
            progress(done, len(files), result)

    per_organ, mean_dice, subset_means = summarise(results, organs, manifest.subsets)
    report = EvaluationReport(
        dataset=manifest.name,
        manifest=str(manifest.path),
        split=split if split is not None else "all",
        data_root=str(root),
        model=getattr(segmenter, "model_name", "") or "",
        seed=int(getattr(segmenter, "seed", 0)),
        hd95=bool(hd95),
        organs={d: name for d, _, name in organs},
        cases=results,
        per_organ=per_organ,
        mean_dice=mean_dice,
        subset_means=subset_means,
        unscored_organs=unscored,
        postprocessing=dict(getattr(segmenter, "postprocessing", {})),
        seconds=time.perf_counter() - start,
    )
    if output_dir is not None:
        report.csv_path, report.json_path = write_report(report, output_dir)
    return report


def write_report(report: EvaluationReport, output_dir: str | os.PathLike) -> tuple[Path, Path]:
    """Write ``per_case.csv`` and ``report.json`` into ``output_dir``, both atomically; returns their
    paths. The folder may not harm the report's inputs (see :func:`prepare_output_dir`)."""
    root = Path(report.data_root)
    files = [(case.case_id, root / case.image, root / case.label) for case in report.cases]
    output_dir = prepare_output_dir(output_dir, evaluation_sources(report.manifest, files, report.model), roots=[root])
    csv_path, json_path = output_dir / CSV_NAME, output_dir / REPORT_NAME
    # allow_nan=False: a NaN would make the file unreadable by strict JSON parsers.
    text = json.dumps(report.to_dict(), indent=2, allow_nan=False) + "\n"
    with atomic_paths(csv_path, json_path) as (tmp_csv, tmp_json):
        with open(tmp_csv, "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS)
            writer.writeheader()
            writer.writerows(report.rows())
        tmp_json.write_text(text, encoding="utf-8")
    return csv_path, json_path
