"""Build DICOM CT series with pydicom for tests: clean ones from a volume, and the hazards a PACS
export holds (a localizer, a missing or duplicated slice, two acquisitions under one UID, gantry
tilt, multi-frame, compressed transfer syntaxes, hostile header text)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID

ROOT = "1.2.826.0.1.3680043.8.498.77"  # pydicom's UID root, a fixed branch for test objects


def uid(*parts: int) -> str:
    return ".".join([ROOT, *(str(p) for p in parts)])


def ct_slices(volume_hu: np.ndarray, *, study: str = uid(1), series: str = uid(1, 1), frame_of_reference: str = uid(9, 1),
              spacing=(0.8, 0.7, 3.0), origin=(-100.0, -120.0, -40.0), row_dir=(1.0, 0.0, 0.0), col_dir=(0.0, 1.0, 0.0),
              slice_step=None, slope: float = 1.0, intercept: float = -1024.0, modality: str = "CT",
              image_type=("ORIGINAL", "PRIMARY", "AXIAL"), patient_name: str = "Doe^Jane", description: str = "abdomen",
              acquisition: int = 1, first_instance: int = 1) -> list[Dataset]:
    """One single-frame CT dataset per z index of ``volume_hu`` (X = columns, Y = rows, Z = slices),
    positions in LPS: voxel (i, j, k) lies at origin + i*spacing[0]*row_dir + j*spacing[1]*col_dir + k*step,
    where step is ``slice_step`` (default: spacing[2] along row_dir x col_dir)."""
    volume_hu = np.asarray(volume_hu, dtype=np.float64)
    row_dir, col_dir = np.asarray(row_dir, float), np.asarray(col_dir, float)
    step = np.cross(row_dir, col_dir) * spacing[2] if slice_step is None else np.asarray(slice_step, float)
    stored = np.rint((volume_hu - intercept) / slope)
    assert stored.min() >= -32768 and stored.max() <= 32767
    datasets = []
    for k in range(volume_hu.shape[2]):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = f"{series}.{first_instance + k}"
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = f"{series}.{first_instance + k}"
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = patient_name, "P-0001", "19700101", "F"
        ds.StudyInstanceUID, ds.StudyDate, ds.StudyTime, ds.StudyID = study, "20260101", "120000", "1"
        ds.AccessionNumber, ds.ReferringPhysicianName, ds.StudyDescription = "A1", "", "CT abdomen"
        ds.SeriesInstanceUID, ds.SeriesNumber, ds.SeriesDescription = series, 2, description
        ds.Modality, ds.Manufacturer, ds.PatientPosition = modality, "sdseg3d tests", "HFS"
        ds.FrameOfReferenceUID, ds.PositionReferenceIndicator = frame_of_reference, ""
        ds.ImageType = list(image_type)
        ds.InstanceNumber, ds.AcquisitionNumber = first_instance + k, acquisition
        ds.ImagePositionPatient = [round(float(v), 4) for v in np.asarray(origin, float) + k * step]
        ds.ImageOrientationPatient = [float(v) for v in (*row_dir, *col_dir)]
        ds.PixelSpacing = [float(spacing[1]), float(spacing[0])]  # row spacing (between rows), column spacing
        ds.SliceThickness = float(np.linalg.norm(step))
        ds.KVP, ds.ContentDate, ds.ContentTime = 120, "20260101", "120000"
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows, ds.Columns = volume_hu.shape[1], volume_hu.shape[0]
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = slope, intercept, "HU"
        ds.PixelData = np.ascontiguousarray(stored[:, :, k].T.astype(np.int16)).tobytes()
        datasets.append(ds)
    return datasets


def write(datasets, folder: Path, names=None) -> list[Path]:
    """Write ``datasets`` into ``folder`` (created), as ``names`` or IM00001... in a shuffled order of names."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, ds in enumerate(datasets):
        path = folder / (names[k] if names else f"IM{(k * 7919) % 100003:05d}")
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def phantom_ct(shape=(48, 40, 12), seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A small body-like HU volume (X, Y, Z) with a liver (6) and a spleen (1), and its labels."""
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    body = ((x - shape[0] / 2) / (shape[0] * 0.45)) ** 2 + ((y - shape[1] / 2) / (shape[1] * 0.45)) ** 2 < 1
    labels = np.zeros(shape, np.uint8)
    labels[((x - shape[0] * 0.35) / (shape[0] * 0.17)) ** 2 + ((y - shape[1] * 0.5) / (shape[1] * 0.2)) ** 2 < 1] = 6
    labels[((x - shape[0] * 0.7) / (shape[0] * 0.1)) ** 2 + ((y - shape[1] * 0.45) / (shape[1] * 0.12)) ** 2 < 1] = 1
    labels[:, :, : max(1, shape[2] // 6)] = 0
    image = np.where(body, 20.0, -1000.0) + np.where(labels == 6, 40, 0) + np.where(labels == 1, 25, 0)
    image = image + rng.normal(0, 8, shape)
    return np.round(image), labels


def enhanced_ct(datasets: list[Dataset], series: str) -> Dataset:
    """A Legacy Converted Enhanced CT (one multi-frame object) of single-frame ``datasets`` (highdicom)."""
    import highdicom as hd

    return hd.legacy.LegacyConvertedEnhancedCTImage(
        legacy_datasets=datasets, series_instance_uid=series, series_number=3,
        sop_instance_uid=f"{series}.1", instance_number=1)


def spoil(path: Path, value: str, bad: bytes) -> None:
    """Replace the header value ``value`` (written once in ``path``, padded to even length as DICOM
    pads it) by ``bad`` of the same length: a malformed value pydicom itself would refuse to write."""
    good = (value + " " * (len(value) % 2)).encode()
    data = path.read_bytes()
    assert data.count(good) == 1 and len(bad) == len(good), (value, bad)
    path.write_bytes(data.replace(good, bad))
