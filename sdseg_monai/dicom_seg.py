"""DICOM SEG output: a label volume as a Segmentation object on the source CT series' own grid.

Built with highdicom (the optional ``dicom`` extra, imported on first use) from typed parts: one
segment per organ of the model, coded with SNOMED CT (:func:`sdseg_monai.labels.organ_code`), the
algorithm identified as sdseg3d with its version and model hash. Frames are the source slices
themselves (no resampling); frames without any voxel of a segment are left out. Patient and study
come from the source (highdicom copies them); nothing from the headers' free text (names,
descriptions) goes into the new series' description, labels or the log.
"""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from sdseg_monai._quiet import quiet_dicom
from sdseg_monai._version import __version__
from sdseg_monai.data import atomic_paths, check_parent_writable, told_write_errors
from sdseg_monai.errors import SDSegInputError
from sdseg_monai.labels import organ_code

INSTALL_HINT = 'DICOM SEG output needs the dicom extra: pip install "sdseg3d[dicom]"'
SEG_TYPES = ("binary", "labelmap")
SERIES_DESCRIPTION = "sdseg3d segmentation"
CONTENT_LABEL = "SDSEG"
ALGORITHM_NAME = "sdseg3d"
MANUFACTURER = "sdseg3d"


def _highdicom():
    try:
        import highdicom
    except ImportError:
        raise SDSegInputError(INSTALL_HINT) from None
    return highdicom


def _source_name(ds, fallback) -> Any:
    return getattr(ds, "filename", None) or fallback


def _check_labels(labels: np.ndarray, organs: list[dict], output: Path) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 3 or labels.size == 0:
        raise SDSegInputError(f"labels must be a non-empty 3D volume (X, Y, Z), got shape {labels.shape}", output)
    if labels.dtype.kind not in "ub" and not (labels.dtype.kind == "i" and labels.min() >= 0):
        raise SDSegInputError(f"labels must hold non-negative integers, got {labels.dtype}", output)
    known = {int(o["label"]) for o in organs}
    unknown = sorted(set(np.unique(labels).tolist()) - known - {0})
    if unknown:
        raise SDSegInputError(f"labels hold values no organ describes: {unknown[:10]}", output)
    return labels.astype(np.uint8, copy=False)  # values are organ labels <= 255; bool would index as a mask


def _check_organs(organs: list[dict], output: Path) -> list[dict]:
    if not organs:
        raise SDSegInputError("a DICOM SEG needs at least one organ", output)
    if not all(isinstance(o, dict) and isinstance(o.get("label"), (int, np.integer)) and isinstance(o.get("name"), str) for o in organs):
        raise SDSegInputError('organs must be {"label": int, "name": str} objects', output)
    values = [int(o["label"]) for o in organs]
    if len(set(values)) != len(values) or min(values) < 1 or max(values) > 255:
        raise SDSegInputError(f"organ labels must be distinct and within 1..255, got {values}", output)
    return sorted(organs, key=lambda o: int(o["label"]))


def _slice_map(sources: list, labels: np.ndarray, frame_numbers: list[int] | None, output: Path) -> tuple[int, list[int]]:
    """The number of source frames and, per slice k of ``labels``, its 0-based source frame index.

    Single-frame sources: slice k is ``sources[k]``. One multi-frame source: slice k is frame
    ``frame_numbers[k]`` (1-based).
    """
    columns, rows, slices = labels.shape
    if not sources:
        raise SDSegInputError("no source images for the DICOM SEG", output)
    for ds in sources:
        if int(ds.get("Rows", 0)) != rows or int(ds.get("Columns", 0)) != columns:
            raise SDSegInputError(
                f"source image is {ds.get('Rows')} x {ds.get('Columns')} (rows x columns), the labels "
                f"{rows} x {columns}", _source_name(ds, output))
    multiframe = len(sources) == 1 and int(sources[0].get("NumberOfFrames", 1) or 1) > 1
    if not multiframe:
        if len(sources) != slices:
            raise SDSegInputError(f"{len(sources)} source images for {slices} label slices", output)
        if frame_numbers is not None and any(n not in (None, 1) for n in frame_numbers):
            raise SDSegInputError("frame numbers given for single-frame source images", output)
        return slices, list(range(slices))
    total = int(sources[0].NumberOfFrames)
    name = _source_name(sources[0], output)
    if frame_numbers is None or len(frame_numbers) != slices:
        raise SDSegInputError(f"a multi-frame source needs one frame number per label slice ({slices})", name)
    numbers = [int(n) for n in frame_numbers]
    if len(set(numbers)) != len(numbers) or min(numbers) < 1 or max(numbers) > total:
        raise SDSegInputError(f"frame numbers must be distinct and within 1..{total}", name)
    return total, [n - 1 for n in numbers]


def _frame_position(hd, sources: list, index: int):
    """The plane position of source frame ``index`` (0-based) as highdicom wants it."""
    ds = sources[0] if len(sources) == 1 else sources[index]
    if "PerFrameFunctionalGroupsSequence" in ds:
        item = ds.PerFrameFunctionalGroupsSequence[index]
        if "PlanePositionSequence" not in item:
            item = ds.SharedFunctionalGroupsSequence[0]
        position = item.PlanePositionSequence[0].ImagePositionPatient
    else:
        position = ds.ImagePositionPatient
    return hd.PlanePositionSequence(hd.CoordinateSystemNames.PATIENT, image_position=[float(v) for v in position])


def _labelmap_syntax():
    """RLE Lossless when pydicom can encode it (its own encoder needs no plugin), else uncompressed.

    Not JPEG-LS: DCMTK's dcmseg (dcmqi, 3D Slicer) refuses JPEG-LS Segmentations as lossy, and
    BINARY frames (1 bit) stay uncompressed as highdicom allows no encapsulated syntax but JPEG 2000.
    """
    from pydicom.pixels.encoders.base import get_encoder
    from pydicom.uid import ExplicitVRLittleEndian, RLELossless

    try:
        return RLELossless if get_encoder(RLELossless).is_available else ExplicitVRLittleEndian
    except (NotImplementedError, KeyError):
        return ExplicitVRLittleEndian


def _character_set(source) -> str | list[str] | None:
    """The source's Specific Character Set in a form highdicom accepts; None for the default repertoire.

    Real exports write it empty, or as ``ISO_IR 6``, both meaning the default, which highdicom refuses;
    an empty first value of a code-extension list is spelt out for the same reason.
    """
    value = source.get("SpecificCharacterSet")
    values = [value] if value is None or isinstance(value, str) else list(value)
    values = [str(v or "").strip() for v in values]
    if all(v in ("", "ISO_IR 6") for v in values):
        return None
    return [v or "ISO 2022 IR 6" for v in values] if len(values) > 1 else values[0]


# Header values that may identify a patient or quote free text: never in a message.
_QUOTABLE_VRS = ("PN", "LO", "SH", "ST", "LT", "UT", "UC", "DA", "DT", "TM", "AS", "CS")


def _header_texts(datasets) -> set[str]:
    """Every quotable value of ``datasets``, each value of a multi-valued element apart, sequences included."""
    from pydicom.multival import MultiValue

    texts = set()
    for ds in datasets:
        for element in ds:
            if element.VR == "SQ":
                texts |= _header_texts(element.value or [])
            elif element.VR in _QUOTABLE_VRS and element.value not in (None, ""):
                values = element.value if isinstance(element.value, (list, tuple, MultiValue)) else [element.value]
                texts |= {str(v) for v in values if str(v)}
    return texts


def _scrubbed(message: str, sources: list) -> str:
    """First line of a highdicom error with any header value of the sources replaced (names, dates, descriptions)."""
    line = message.splitlines()[0] if message else "no detail"
    for text in sorted(_header_texts(sources), key=len, reverse=True):
        if len(text) > 2:
            # highdicom quotes a value as Python writes it, control characters escaped.
            line = line.replace(text, "<header text>").replace(repr(text)[1:-1], "<header text>")
    return line


def _conformant(sources: list) -> list:
    """The sources with every date or time that pydicom cannot parse blanked (in a copy): highdicom
    re-parses the patient and study modules it copies, and real exports carry a birth date of
    "00000000" or a time of "10:10:10"; those attributes are type 2, so empty is valid."""
    from pydicom.valuerep import DA, DT, TM

    parsers = {"DA": DA, "DT": DT, "TM": TM}
    fixed = []
    for ds in sources:
        bad = []
        for element in ds:
            if element.VR in parsers and isinstance(element.value, str) and element.value:
                try:
                    parsers[element.VR](element.value)
                except (ValueError, TypeError, OverflowError):
                    bad.append(element.tag)
        if bad:
            ds = copy.deepcopy(ds)
            for tag in bad:
                ds[tag].value = ""
        fixed.append(ds)
    return fixed


def _segment_descriptions(hd, organs: list[dict], numbers: list[int], dataset: str | None, algorithm) -> list:
    """One SegmentDescription per organ: its name as SegmentLabel, SNOMED CT category, type and laterality."""
    from pydicom.sr.coding import Code

    descriptions = []
    for organ, number in zip(organs, numbers):
        codes = organ_code(organ, dataset)
        description = hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=str(organ["name"])[:64],
            segmented_property_category=Code(codes.category.value, codes.category.scheme, codes.category.meaning),
            segmented_property_type=Code(codes.type.value, codes.type.scheme, codes.type.meaning),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
        )
        if codes.modifier is not None:
            # SegmentDescription has no laterality argument: the Segment Description macro codes it
            # as a modifier inside the property type item.
            modifier = hd.sr.CodedConcept(codes.modifier.value, codes.modifier.scheme, codes.modifier.meaning)
            description.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = [modifier]
        # Segment numbers can differ from label values (BINARY needs 1..n); readers find the label here.
        description.SegmentDescription = f"sdseg3d label {int(organ['label'])}"
        descriptions.append(description)
    return descriptions


@quiet_dicom()  # highdicom reads the sources' values, and copies patient and study into the SEG
def write_dicom_seg(labels: np.ndarray, sources: list, output: str | os.PathLike, *, organs: list[dict],
                    dataset: str | None = None, seg_type: str = "binary", frame_numbers: list[int] | None = None,
                    model_hash: str = "", series_number: int = 901) -> Path:
    """Write ``labels`` as a DICOM Segmentation of the source series.

    Args:
        labels: uint8 label volume indexed [column i, row j, slice k] (X = Columns, Y = Rows,
            Z = slices): slice k as a DICOM frame is ``labels[:, :, k].T``.
        sources: pydicom datasets of the source series (pixel data not needed): one single-frame
            image per slice, ``sources[k]`` being slice k, or exactly one multi-frame image.
        output: path of the SEG file, written atomically.
        organs: the model config's organs, ``{"label": int, "name": str}`` and optionally
            ``"snomed"``; one segment each, present in ``labels`` or not.
        dataset: the model's dataset preset, for the organs' SNOMED CT codes.
        seg_type: ``"binary"`` (one 1-bit frame per segment and slice) or ``"labelmap"`` (one
            frame per slice holding the label values; lossless compression when an encoder is
            available).
        frame_numbers: for a multi-frame source, the 1-based frame number of each slice k.
        model_hash: identifies the model weights (e.g. their sha256); goes into the algorithm
            version and parameters.
        series_number: SeriesNumber of the new series.

    Segment numbers: LABELMAP keeps the label values; BINARY numbers the organs 1..n in label
    order (highdicom requires it), so each segment's SegmentDescription reads "sdseg3d label <value>".
    If no organ has any voxel, the SEG holds one empty plane (per segment for BINARY) on the first
    slice, as highdicom cannot omit every frame.

    The same labels and sources give the same pixel data and segment descriptions; the series and
    instance UIDs are new for every SEG (a new object, as DICOM has it), and so are highdicom's
    creation date and time.

    Returns:
        The path written.

    Raises:
        SDSegInputError: highdicom is not installed, an unknown ``seg_type``, or labels, organs
            and sources that do not fit together.
    """
    output = Path(output)
    kind = str(seg_type).lower()
    if kind not in SEG_TYPES:
        raise SDSegInputError(f"unknown DICOM SEG type {seg_type!r}; choose binary or labelmap", output)
    if output.is_dir():
        raise SDSegInputError("output path is a folder; give a file name such as seg.dcm", output)
    check_parent_writable(output, "output")
    model_hash = model_hash or ""
    if not re.fullmatch(r"[0-9A-Za-z._:-]{0,128}", model_hash):
        raise SDSegInputError("model hash must be at most 128 letters, digits or . _ : -", output)
    hd = _highdicom()
    from pydicom.sr.codedict import codes

    organs = _check_organs(organs, output)
    labels = _check_labels(labels, organs, output)
    total, frame_index = _slice_map(sources, labels, frame_numbers, output)

    values = [int(o["label"]) for o in organs]
    if kind == "labelmap":
        if not hasattr(hd.seg.SegmentationTypeValues, "LABELMAP"):
            raise SDSegInputError("labelmap DICOM SEG needs highdicom >= 0.24; pip install -U highdicom", output)
        segmentation_type, numbers = hd.seg.SegmentationTypeValues.LABELMAP, values
        syntax = _labelmap_syntax()
    else:
        # highdicom wants BINARY segments numbered 1..n without gaps: segment s is the s-th organ
        # by label, its label value in SegmentDescription.
        segmentation_type, numbers = hd.seg.SegmentationTypeValues.BINARY, list(range(1, len(organs) + 1))
        from pydicom.uid import ExplicitVRLittleEndian

        syntax = ExplicitVRLittleEndian
    lookup = np.zeros(256, np.uint8)
    lookup[values] = numbers
    # Frames are (Rows, Columns) = labels[:, :, k].T; a label-map style array keeps memory at one
    # byte per voxel whatever the number of segments.
    planes = np.zeros((total, labels.shape[1], labels.shape[0]), np.uint8)
    planes[frame_index] = lookup[labels].transpose(2, 1, 0)
    plane_positions, empty = None, not planes.any()
    if empty:
        # highdicom keeps every frame of an all-empty segmentation (Z x segments frames for
        # BINARY); one empty plane on the first slice is just as valid and stays small.
        planes = planes[frame_index[0]:frame_index[0] + 1]
        plane_positions = [_frame_position(hd, sources, frame_index[0])]

    algorithm = hd.AlgorithmIdentificationSequence(
        name=ALGORITHM_NAME,
        family=codes.cid7162.ArtificialIntelligence,
        version=f"{__version__} model {model_hash[:16]}" if model_hash else __version__,
        source=MANUFACTURER,
        parameters={"model_sha256": model_hash} if model_hash else None,
    )
    try:
        seg = hd.seg.Segmentation(
            source_images=_conformant(list(sources)),
            pixel_array=planes,
            segmentation_type=segmentation_type,
            segment_descriptions=_segment_descriptions(hd, organs, numbers, dataset, algorithm),
            series_instance_uid=hd.UID(),
            series_number=int(series_number),
            sop_instance_uid=hd.UID(),
            instance_number=1,
            manufacturer=MANUFACTURER,
            manufacturer_model_name=ALGORITHM_NAME,
            software_versions=[f"sdseg3d {__version__}", f"highdicom {hd.__version__}"],  # a tuple warns in pydicom
            device_serial_number=model_hash[:16] or "0",
            transfer_syntax_uid=syntax,
            plane_positions=plane_positions,
            omit_empty_frames=not empty,  # True would log a warning and keep the plane anyway
            content_label=CONTENT_LABEL,
            content_description="automatic segmentation by sdseg3d",
            series_description=SERIES_DESCRIPTION,
            specific_character_set=_character_set(sources[0]),
        )
    except (ValueError, TypeError, AttributeError, KeyError) as e:
        # highdicom refuses sources it cannot place (no geometry, mixed series): one line, no header text.
        raise SDSegInputError(f"cannot build a DICOM SEG of these source images ({type(e).__name__}: "
                              f"{_scrubbed(str(e), sources)})", output) from None
    with told_write_errors(output), atomic_paths(output) as (tmp,):
        seg.save_as(tmp, enforce_file_format=True)
    return output
