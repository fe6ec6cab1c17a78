"""DICOM input: find the CT series in a folder and read it onto a RAS ``MetaTensor``.

Series are told apart by SeriesInstanceUID with pydicom (headers only); the chosen series is read
with SimpleITK's GDCM series reader, which sorts slices by position and applies rescale slope and
intercept, so voxel values are Hounsfield units.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sdseg_monai.errors import SDSegInputError

# Modalities whose pixel values are Hounsfield units.
CT_MODALITIES = ("CT",)
# LPS (DICOM / ITK) to RAS (NIfTI / MONAI) world coordinates.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass
class DicomSeries:
    """One series found in a folder."""

    uid: str
    modality: str
    description: str
    files: list[Path] = field(default_factory=list)


def find_series(folder: str | os.PathLike) -> list[DicomSeries]:
    """Every DICOM image series directly inside ``folder`` (non-DICOM files are skipped)."""
    import pydicom

    folder = Path(folder)
    series: dict[str, DicomSeries] = {}
    for path in sorted(p for p in folder.iterdir() if p.is_file()):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                header = pydicom.dcmread(path, stop_before_pixels=True, force=True)
        except Exception:  # noqa: BLE001  (not DICOM: skip, e.g. a README or a mask file)
            continue
        uid = getattr(header, "SeriesInstanceUID", None)
        if uid is None:
            continue
        if not hasattr(header, "Rows"):  # no image (a DICOMDIR, a report)
            continue
        entry = series.setdefault(
            str(uid),
            DicomSeries(str(uid), str(getattr(header, "Modality", "")), str(getattr(header, "SeriesDescription", ""))),
        )
        entry.files.append(path)
    return list(series.values())


def read_ct_series(folder: str | os.PathLike):
    """Read the single CT series in ``folder`` as a (1, X, Y, Z) float32 ``MetaTensor`` in HU, with
    its RAS affine. Refuses a folder with no series, several series, or a non-CT series."""
    import SimpleITK as sitk
    from monai.data import MetaTensor

    folder = Path(folder)
    found = find_series(folder)
    if not found:
        raise SDSegInputError("no DICOM image series in this folder", folder)
    if len(found) > 1:
        listing = "; ".join(f"{s.modality} '{s.description}' ({len(s.files)} files)" for s in found)
        raise SDSegInputError(f"{len(found)} DICOM series in this folder, expected one: {listing}", folder)
    series = found[0]
    if series.modality not in CT_MODALITIES:
        raise SDSegInputError(f"DICOM series has modality {series.modality or 'unknown'}, not CT", folder)
    reader = sitk.ImageSeriesReader()
    names = reader.GetGDCMSeriesFileNames(str(folder), series.uid) or [str(p) for p in series.files]
    reader.SetFileNames(list(names))
    try:
        image = reader.Execute()
    except RuntimeError as e:
        raise SDSegInputError(f"cannot read the DICOM series ({str(e).strip().splitlines()[-1]})", folder) from None
    if image.GetDimension() != 3:
        raise SDSegInputError(f"DICOM series is {image.GetDimension()}D, a 3D CT volume is required", folder)
    array = np.ascontiguousarray(sitk.GetArrayFromImage(image).transpose(2, 1, 0), dtype=np.float32)
    direction = np.array(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    affine = np.eye(4)
    affine[:3, :3] = direction * np.array(image.GetSpacing(), dtype=np.float64)
    affine[:3, 3] = image.GetOrigin()
    affine = LPS_TO_RAS @ affine
    meta = {"filename_or_obj": str(folder), "original_affine": affine.copy(), "space": "RAS", "modality": "CT"}
    return MetaTensor(array[None], affine=affine, meta=meta)
