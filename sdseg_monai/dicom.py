"""DICOM input: index a tree of files, split it into stacks with QC, and read a stack onto a RAS
``MetaTensor`` in Hounsfield units.

The index reads headers only (pydicom, ``stop_before_pixels``) and groups images by
SeriesInstanceUID across folders. Within a series, images are split into stacks by orientation,
size and pixel spacing, and each stack is sorted by position along the slice normal (never by
InstanceNumber). Every hazard has a stated outcome (a reason code and a sentence), see ``REASONS``;
a spacing or position the volume cannot honestly have is refused, never averaged.

Single-frame CT and multi-frame (Enhanced / Legacy Converted Enhanced) CT go through the same path:
each image plane is a :class:`Frame`. Nothing from a header's free text (names, descriptions) is put
in a message: only UIDs, counts and numbers.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sdseg_monai._quiet import quiet_dicom
from sdseg_monai.errors import SDSegInputError

# LPS (DICOM / ITK) to RAS (NIfTI / MONAI) world coordinates.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT_IMAGES = ("1.2.840.10008.5.1.4.1.1.2.1", "1.2.840.10008.5.1.4.1.1.2.2")  # Enhanced, Legacy Converted
# Objects that hold no image to segment: SEG, RT objects, SR, presentation states, key objects.
NON_IMAGE_PREFIXES = ("1.2.840.10008.5.1.4.1.1.66", "1.2.840.10008.5.1.4.1.1.481.", "1.2.840.10008.5.1.4.1.1.88.",
                      "1.2.840.10008.5.1.4.1.1.11.", "1.2.840.10008.5.1.4.1.1.104.")
SECONDARY_CAPTURE_PREFIX = "1.2.840.10008.5.1.4.1.1.7"
DICOMDIR_CLASS = "1.2.840.10008.1.3.10"

MIN_SLICES = 3
SPACING_TOLERANCE_MM = 0.1  # a gap off the median, or a slice off its evenly spaced place, by more than this and ...
SPACING_TOLERANCE_FRACTION = 0.05  # ... by more than this fraction of the spacing: a missing slice, or drift
IN_PLANE_TOLERANCE_MM = 0.05  # slice positions off the normal by more than this: gantry tilt
LOCALIZER_SHARE = 0.1  # an orientation held by at most this share of a series' images is a scout

# Reason codes: (status, what it means). ``ok`` and the notes on dropped images are not failures.
REASONS = {
    "ok": ("ok", "segmented"),
    "not_ct": ("skipped", "modality is not CT"),
    "not_image": ("skipped", "a SEG, RT, SR, presentation or key-object instance, not an image"),
    "derived": ("skipped", "derived or secondary images (MPR, MIP, screen captures); --include-derived takes them"),
    "localizer_only": ("skipped", "only localizer (scout) images"),
    "too_few_slices": ("skipped", f"fewer than {MIN_SLICES} slices"),
    "no_frame_of_reference": ("skipped", "no FrameOfReferenceUID"),
    "no_geometry": ("skipped", "no image position, orientation or pixel spacing"),
    "invalid_uid": ("failed", "a study or series UID that is not a valid DICOM UID"),
    "ambiguous_duplicates": ("failed", "several images at one position with different pixels, and no clean split"),
    "nonuniform_spacing": ("failed", "slice spacing not uniform (a missing slice?)"),
    "gantry_tilt": ("failed", "gantry tilt: slices not stacked along their normal"),
    "unreadable_slices": ("failed", "images that cannot be read or decoded"),
    "split_multiframe": ("failed", "with DICOM SEG output: a multi-frame series spread over several files, or mixed with single-frame images"),
}

# Decoders pydicom may lack, by transfer syntax, and the package that brings one.
DECODER_PACKAGES = {
    "1.2.840.10008.1.2.4.80": "pyjpegls", "1.2.840.10008.1.2.4.81": "pyjpegls",
    "1.2.840.10008.1.2.4.90": "pylibjpeg-openjpeg", "1.2.840.10008.1.2.4.91": "pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.4.201": "pylibjpeg-openjpeg", "1.2.840.10008.1.2.4.202": "pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.4.203": "pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.4.50": "pylibjpeg-libjpeg", "1.2.840.10008.1.2.4.51": "pylibjpeg-libjpeg",
    "1.2.840.10008.1.2.4.57": "pylibjpeg-libjpeg", "1.2.840.10008.1.2.4.70": "pylibjpeg-libjpeg",
}


def valid_uid(value) -> bool:
    """A DICOM UID safe to use as a path part: digits and dots, at most 64 characters."""
    return isinstance(value, str) and len(value) <= 64 and bool(UID_RE.match(value))


@dataclass(frozen=True)
class Frame:
    """One image plane: a single-frame file, or one frame of a multi-frame file (``number`` 1-based)."""

    path: Path
    number: int | None
    sop_uid: str
    position: tuple[float, float, float]  # LPS, mm
    orientation: tuple[float, ...]  # row direction, column direction
    rows: int
    columns: int
    pixel_spacing: tuple[float, float]  # between rows, between columns
    slope: float
    intercept: float
    acquisition: str
    localizer: bool


@dataclass
class Series:
    """Every image of one SeriesInstanceUID found in the tree, and what the index learned of it."""

    study_uid: str
    series_uid: str
    modality: str = ""
    frame_of_reference: str = ""
    kind: str = "image"  # or "not_image"
    derived: bool = False
    tilt: float = 0.0
    multiframe: bool = False
    frames: list[Frame] = field(default_factory=list)
    files: set = field(default_factory=set)
    no_geometry: int = 0
    bad_headers: int = 0  # image headers whose values cannot be parsed (e.g. a DS of "abc")
    bad_header_error: str = ""  # the first one's exception class, never its text (it may quote the header)


@dataclass
class Stack:
    """A segmentable unit: one series, or one of the stacks a series splits into (``key`` UID#k)."""

    study_uid: str
    series_uid: str
    key: str
    frames: list[Frame] = field(default_factory=list)  # sorted along the normal
    reason: str = "ok"
    message: str = ""
    dropped: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    spacing: tuple[float, float, float] = (0.0, 0.0, 0.0)  # columns, rows, slices (mm)
    plane: str = ""

    @property
    def status(self) -> str:
        return REASONS[self.reason][0]

    @property
    def ok(self) -> bool:
        return self.reason == "ok"

    @property
    def files(self) -> list[Path]:
        return sorted({f.path for f in self.frames})

    @property
    def seg_refusal(self) -> str | None:
        """Why a DICOM SEG cannot reference this stack's images, or None. A SEG references one
        multi-frame source or single-frame images only (highdicom too); such a stack still reads
        exactly, for labels without a SEG."""
        files = {f.path for f in self.frames}
        if len(files) > 1 and any(f.number is not None for f in self.frames):
            return (f"{len(self.frames)} slices from {len(files)} files, multi-frame among them: no DICOM SEG can reference them; "
                    "convert the series to one multi-frame file or to single-frame images, or run without DICOM SEG output")
        return None

    @property
    def sop_uids(self) -> list[str]:
        return sorted({f.sop_uid for f in self.frames})

    @property
    def images_used(self) -> int:
        return len(self.frames) if self.ok else 0

    @property
    def normal(self) -> np.ndarray:
        o = np.asarray(self.frames[0].orientation, dtype=np.float64)
        return np.cross(o[:3], o[3:])

    def affine(self) -> np.ndarray:
        """RAS affine of the volume ``read_stack`` returns: index (column, row, slice)."""
        first = self.frames[0]
        o = np.asarray(first.orientation, dtype=np.float64)
        lps = np.eye(4)
        lps[:3, 0] = o[:3] * first.pixel_spacing[1]
        lps[:3, 1] = o[3:] * first.pixel_spacing[0]
        lps[:3, 2] = self.normal * self.spacing[2]
        lps[:3, 3] = first.position
        return LPS_TO_RAS @ lps

    def fail(self, reason: str, message: str = "") -> Stack:
        self.reason, self.message = reason, message or REASONS[reason][1]
        return self


@dataclass
class DicomIndex:
    """What a tree holds: stacks to segment (and those skipped or failed), NIfTI files, file counts."""

    root: Path
    stacks: list[Stack] = field(default_factory=list)
    nifti: list[Path] = field(default_factory=list)
    counts: Counter = field(default_factory=Counter)


# -- index ------------------------------------------------------------------------------------------

def _floats(value, n: int) -> tuple[float, ...] | None:
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    return out if len(out) == n and all(np.isfinite(out)) else None


def _first(sequence, name: str):
    item = getattr(sequence, name, None) if sequence is not None else None
    return item[0] if item else None


def _is_localizer(header) -> bool:
    return "LOCALIZER" in [str(v).upper() for v in (getattr(header, "ImageType", None) or [])]


def _is_derived(header, sop_class: str) -> bool:
    image_type = [str(v).upper() for v in (getattr(header, "ImageType", None) or [])]
    if sop_class.startswith(SECONDARY_CAPTURE_PREFIX):
        return True
    if image_type and image_type[0] == "DERIVED":
        return True
    if len(image_type) > 1 and image_type[1] == "SECONDARY":
        return True
    return bool({"MPR", "MIP", "MINIP", "REFORMATTED", "PROJECTION IMAGE", "SCREEN SAVE"} & set(image_type))


def _single_frame(header, path: Path) -> list[Frame] | None:
    position = _floats(getattr(header, "ImagePositionPatient", None), 3)
    orientation = _floats(getattr(header, "ImageOrientationPatient", None), 6)
    spacing = _floats(getattr(header, "PixelSpacing", None), 2)
    if position is None or orientation is None or spacing is None:
        return None
    return [Frame(path, None, str(header.SOPInstanceUID), position, orientation, int(header.Rows), int(header.Columns),
                  spacing, float(getattr(header, "RescaleSlope", 1) or 1), float(getattr(header, "RescaleIntercept", 0) or 0),
                  str(getattr(header, "AcquisitionNumber", "") or ""), _is_localizer(header))]


def _multi_frame(header, path: Path) -> list[Frame] | None:
    shared = _first(header, "SharedFunctionalGroupsSequence")
    per_frame = getattr(header, "PerFrameFunctionalGroupsSequence", None) or []
    frames = []
    for number, groups in enumerate(per_frame, start=1):
        def item(name, groups=groups):
            return _first(groups, name) or _first(shared, name)

        plane = item("PlanePositionSequence")
        orient = item("PlaneOrientationSequence")
        measures = item("PixelMeasuresSequence")
        transform = item("PixelValueTransformationSequence")
        position = _floats(getattr(plane, "ImagePositionPatient", None), 3)
        orientation = _floats(getattr(orient, "ImageOrientationPatient", None), 6)
        spacing = _floats(getattr(measures, "PixelSpacing", None), 2)
        if position is None or orientation is None or spacing is None:
            return None
        frame_type = getattr(item("CTImageFrameTypeSequence"), "FrameType", None) or []
        frames.append(Frame(path, number, str(header.SOPInstanceUID), position, orientation, int(header.Rows),
                            int(header.Columns), spacing, float(getattr(transform, "RescaleSlope", 1) or 1),
                            float(getattr(transform, "RescaleIntercept", 0) or 0), "",
                            _is_localizer(header) or "LOCALIZER" in [str(v).upper() for v in frame_type]))
    return frames or None


@quiet_dicom()
def _read_header(path: Path):
    import pydicom

    return pydicom.dcmread(path, stop_before_pixels=True)


@quiet_dicom()  # a header's values are checked where first used: in this loop, not in dcmread
def index_tree(root: str | os.PathLike, include_derived: bool = False) -> DicomIndex:
    """Index every file under ``root`` (a folder, or one file): DICOM series split into QC'd stacks,
    and NIfTI files. Unreadable files and non-DICOM files are counted, never fatal."""
    from sdseg_monai.data import is_nifti

    root = Path(root)
    index = DicomIndex(root)
    # Dot files are hidden or half-written (the node's and atomic_paths' temporaries are ".<name>.*").
    paths = [root] if root.is_file() else sorted(p for p in root.rglob("*")
                                                 if p.is_file() and not p.is_symlink() and not p.name.startswith("."))
    series: dict[str, Series] = {}
    for path in paths:
        index.counts["files"] += 1
        if is_nifti(path):
            index.nifti.append(path)
            continue
        try:
            header = _read_header(path)
        except Exception:  # noqa: BLE001  (not DICOM, or too damaged to read a header)
            index.counts["not_dicom_or_unreadable"] += 1
            continue
        meta = getattr(header, "file_meta", None)
        sop_class = str(getattr(header, "SOPClassUID", "") or getattr(meta, "MediaStorageSOPClassUID", "") or "")
        if sop_class == DICOMDIR_CLASS or "DirectoryRecordSequence" in header:
            index.counts["dicomdir"] += 1
            continue
        series_uid = str(getattr(header, "SeriesInstanceUID", "") or "")
        if not series_uid or "SOPInstanceUID" not in header:
            index.counts["not_dicom_or_unreadable"] += 1
            continue
        index.counts["dicom"] += 1
        entry = series.setdefault(series_uid, Series(str(getattr(header, "StudyInstanceUID", "") or ""), series_uid))
        entry.files.add(path)
        entry.modality = entry.modality or str(getattr(header, "Modality", "") or "")
        entry.frame_of_reference = entry.frame_of_reference or str(getattr(header, "FrameOfReferenceUID", "") or "")
        if sop_class.startswith(NON_IMAGE_PREFIXES) or "Rows" not in header:
            entry.kind = "not_image"
            continue
        try:
            _add_image(entry, header, path, sop_class)
        except Exception as e:  # noqa: BLE001  (a malformed value, e.g. a tilt of "abc", or no Columns: its series fails)
            entry.bad_headers += 1
            entry.bad_header_error = entry.bad_header_error or type(e).__name__
    for entry in sorted(series.values(), key=lambda s: (s.study_uid, s.series_uid)):
        index.stacks.extend(plan_series(entry, include_derived))
    return index


def _add_image(entry: Series, header, path: Path, sop_class: str) -> None:
    """The image planes of one image file's ``header``, added to its series."""
    derived = _is_derived(header, sop_class)
    tilt = abs(float(getattr(header, "GantryDetectorTilt", 0) or 0))
    multiframe = sop_class in ENHANCED_CT_IMAGES or int(getattr(header, "NumberOfFrames", 1) or 1) > 1
    frames = _multi_frame(header, path) if multiframe else _single_frame(header, path)
    # Only now, every value parsed: a header that raises above leaves its series as it was.
    entry.derived |= derived
    entry.tilt = entry.tilt or tilt
    entry.multiframe |= multiframe
    if frames is None:
        entry.no_geometry += 1
    else:
        entry.frames.extend(frames)


def _skip(entry: Series, reason: str, message: str = "") -> list[Stack]:
    return [Stack(entry.study_uid, entry.series_uid, entry.series_uid).fail(reason, message)]


def plan_series(entry: Series, include_derived: bool = False) -> list[Stack]:
    """QC one series: what is dropped, how it splits into stacks, and each stack's outcome."""
    if not (valid_uid(entry.series_uid) and valid_uid(entry.study_uid)):
        return [Stack(entry.study_uid if valid_uid(entry.study_uid) else "invalid", "invalid", "invalid").fail("invalid_uid")]
    if entry.kind == "not_image":
        return _skip(entry, "not_image")
    if entry.modality != "CT":
        modality = entry.modality if re.fullmatch(r"[A-Z0-9_ ]{1,16}", entry.modality) else "unknown"
        return _skip(entry, "not_ct", f"modality {modality}, not CT")
    if entry.derived and not include_derived:
        return _skip(entry, "derived")
    if not entry.frame_of_reference:
        return _skip(entry, "no_frame_of_reference")
    if entry.bad_headers:  # which slices they hold is unknown: the volume would be short of them, silently
        return _skip(entry, "unreadable_slices", f"{entry.bad_headers} image header(s) with values that cannot be parsed "
                     f"({entry.bad_header_error})")
    if not entry.frames:
        return _skip(entry, "no_geometry")
    frames = [f for f in entry.frames if not f.localizer]
    dropped = Counter()
    dropped["localizer"] = len(entry.frames) - len(frames)
    # Group by geometry; small orientation groups beside a large one are scouts.
    groups: dict[tuple, list[Frame]] = defaultdict(list)
    for f in frames:
        groups[(tuple(np.round(f.orientation, 3)), f.rows, f.columns, tuple(np.round(f.pixel_spacing, 4)))].append(f)
    if groups:
        largest = max(len(g) for g in groups.values())
        for key in [k for k, g in groups.items() if len(g) <= LOCALIZER_SHARE * len(entry.frames) and len(g) < largest]:
            dropped["localizer"] += len(groups.pop(key))
    if not groups:
        return _skip(entry, "localizer_only")
    stacks: list[Stack] = []
    for group in sorted(groups.values(), key=lambda g: (-len(g), g[0].sop_uid)):
        stacks.extend(_split_acquisitions(entry, group))
    if len(stacks) > 1:
        for k, stack in enumerate(stacks, start=1):
            stack.key = f"{entry.series_uid}#{k}"
    for stack in stacks:
        stack.dropped.update({k: v for k, v in dropped.items() if v})
        if stack.ok:
            _check_geometry(stack, entry)
    return stacks


def _along(frames: list[Frame]) -> np.ndarray:
    o = np.asarray(frames[0].orientation, dtype=np.float64)
    normal = np.cross(o[:3], o[3:])
    return np.array([np.dot(f.position, normal) for f in frames])


def _pixel_digest(frame: Frame, cache: dict) -> str:
    return hashlib.sha256(read_frame_pixels(frame, cache).tobytes()).hexdigest()


def _too_far(off: np.ndarray, spacing: float) -> np.ndarray:
    return (off > SPACING_TOLERANCE_MM) & (off > SPACING_TOLERANCE_FRACTION * spacing)


def slice_spacing(frames: list[Frame]) -> float:
    """The spacing of the sorted ``frames`` along their normal: first to last over the gaps, so that
    the volume's first and last slices lie where their headers put them."""
    s = _along(frames)
    return float(s[-1] - s[0]) / (len(frames) - 1)


def _spacing_problem(frames: list[Frame]) -> str | None:
    """Why the sorted ``frames`` are not evenly spaced along their normal, or None: a gap off the
    median (a missing slice), or a slice off its place at even spacing (gaps that drift slowly)."""
    s = _along(frames)
    gaps = np.diff(s)
    median = float(np.median(gaps))
    bad = np.flatnonzero(_too_far(np.abs(gaps - median), median))
    if bad.size:
        k = int(bad[0])
        return (f"gap of {gaps[k]:.2f} mm between slices {k + 1} and {k + 2} of {len(frames)} (median {median:.2f} mm); "
                f"{bad.size} gap(s) off the median; a slice may be missing")
    spacing = slice_spacing(frames)
    off = np.abs(s - (s[0] + spacing * np.arange(len(s))))
    k = int(np.argmax(off))
    if not _too_far(off[k:k + 1], spacing)[0]:
        return None
    return (f"slice {k + 1} of {len(frames)} lies {off[k]:.2f} mm from its place at an even spacing of {spacing:.3f} mm; "
            "the gaps drift")


def _by_acquisition(frames: list[Frame]) -> list[list[Frame]] | None:
    """``frames`` (sorted) split by AcquisitionNumber when each part is a clean stack of its own."""
    parts: dict[str, list[Frame]] = defaultdict(list)
    for f in frames:
        parts[f.acquisition].append(f)
    if len(parts) < 2:
        return None
    for part in parts.values():
        if len(part) < MIN_SLICES or (np.abs(np.diff(_along(part))) < 1e-3).any() or _spacing_problem(part):
            return None
    return sorted(parts.values(), key=lambda part: _along(part)[0])


def _split_acquisitions(entry: Series, group: list[Frame]) -> list[Stack]:
    """One geometry group -> stacks. Two acquisitions under one UID (overlapping, or leaving a gap)
    split by AcquisitionNumber when each part is a clean stack; exact duplicates are dropped; images
    at one position with different pixels and no clean split make the series ambiguous."""
    order = np.argsort(_along(group), kind="stable")
    frames = [group[i] for i in order]
    s = _along(frames)
    stack = Stack(entry.study_uid, entry.series_uid, entry.series_uid)
    repeated = np.abs(np.diff(s)) < 1e-3
    if repeated.any() or (len(frames) >= MIN_SLICES and _spacing_problem(frames)):
        parts = _by_acquisition(frames)
        if parts:
            return [Stack(entry.study_uid, entry.series_uid, entry.series_uid, frames=part,
                          notes=[f"acquisition {k + 1} of {len(parts)} under one series UID"]) for k, part in enumerate(parts)]
    if not repeated.any():
        stack.frames = frames
        return [stack]
    kept: list[Frame] = []
    kept_digest = None  # of kept[-1], read once however many copies follow it
    decoded: dict = {}  # multi-frame files, decoded once for all their frames
    try:
        for i, f in enumerate(frames):
            if i and repeated[i - 1]:
                kept_digest = kept_digest or _pixel_digest(kept[-1], decoded)
                if _pixel_digest(f, decoded) == kept_digest:
                    continue
                return [stack.fail("ambiguous_duplicates", f"images at {s[i]:.2f} mm along the normal differ in their "
                                   "pixels, and AcquisitionNumber gives no clean split")]
            kept.append(f)
            kept_digest = None
    except _UnreadableFrame as e:
        return [stack.fail("unreadable_slices", str(e))]
    stack.frames = kept
    stack.dropped["duplicate"] = len(frames) - len(kept)
    stack.notes.append(f"{len(frames) - len(kept)} exact duplicate image(s) dropped")
    return [stack]


def _check_geometry(stack: Stack, entry: Series) -> None:
    frames = stack.frames
    if len(frames) < MIN_SLICES:
        stack.fail("too_few_slices", f"{len(frames)} slice(s); at least {MIN_SLICES} are needed")
        return
    if entry.tilt > 0:
        stack.fail("gantry_tilt", f"GantryDetectorTilt is {entry.tilt:g} degrees; resample the series first")
        return
    positions = np.array([f.position for f in frames], dtype=np.float64)
    normal = stack.normal
    offsets = positions - positions[0]
    in_plane = offsets - np.outer(offsets @ normal, normal)
    drift = float(np.linalg.norm(in_plane, axis=1).max())
    if drift > IN_PLANE_TOLERANCE_MM:
        stack.fail("gantry_tilt", f"slice positions leave the slice normal by up to {drift:.2f} mm (gantry tilt or a sheared stack)")
        return
    problem = _spacing_problem(frames)
    if problem:
        stack.fail("nonuniform_spacing", problem)
        return
    stack.spacing = (frames[0].pixel_spacing[1], frames[0].pixel_spacing[0], slice_spacing(frames))
    axis = int(np.argmax(np.abs(normal)))
    stack.plane = ("sagittal", "coronal", "axial")[axis] if abs(normal[axis]) > 0.99 else "oblique"


# -- pixels -----------------------------------------------------------------------------------------

class _UnreadableFrame(Exception):
    pass


@quiet_dicom()
def _decode_error(path: Path, error: Exception) -> str:
    import pydicom

    try:
        syntax = str(pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)
    except Exception:  # noqa: BLE001
        syntax = ""
    package = DECODER_PACKAGES.get(syntax)
    text = str(error).lower()
    if package and ("plugin" in text or "decod" in text or "missing required dependencies" in text):
        return f"cannot decode transfer syntax {syntax}: pip install {package} (or \"sdseg3d[dicom]\")"
    return f"an image cannot be read ({type(error).__name__})"


@quiet_dicom()
def _pixels(path: Path) -> np.ndarray:
    import pydicom

    ds = pydicom.dcmread(path)
    return np.asarray(ds.pixel_array)


def read_frame_pixels(frame: Frame, cache: dict | None = None) -> np.ndarray:
    """Stored pixel values of one frame (Rows x Columns), decoded."""
    try:
        if frame.number is None:
            array = _pixels(frame.path)
        else:
            if cache is None or frame.path not in cache:
                data = _pixels(frame.path)
                if cache is not None:
                    cache[frame.path] = data
            else:
                data = cache[frame.path]
            array = data[frame.number - 1] if data.ndim == 3 else data
    except Exception as e:  # noqa: BLE001  (truncated, corrupt, or no decoder)
        raise _UnreadableFrame(_decode_error(frame.path, e)) from None
    if array.shape != (frame.rows, frame.columns):
        raise _UnreadableFrame(f"an image holds {array.shape} pixels, its header says {(frame.rows, frame.columns)}")
    return array


def read_stack(stack: Stack):
    """The stack as a (1, X=columns, Y=rows, Z=slices) float32 ``MetaTensor`` in HU with its RAS affine.

    Raises:
        SDSegInputError: when the stack is not ok, or an image cannot be read (reason in the message).
    """
    from monai.data import MetaTensor

    if not stack.ok:
        raise SDSegInputError(f"series {stack.key}: {stack.message}")
    # Slice-major (Z, rows, columns): each image lands in one contiguous block, and the (X, Y, Z) view
    # below is in Fortran order, as a NIfTI reads (an axial slice contiguous).
    planes = np.empty((len(stack.frames), stack.frames[0].rows, stack.frames[0].columns), dtype=np.float32)
    cache: dict = {}
    for k, frame in enumerate(stack.frames):
        try:
            stored = read_frame_pixels(frame, cache)
        except _UnreadableFrame as e:
            stack.fail("unreadable_slices", f"slice {k + 1} of {len(stack.frames)}: {e}")
            raise SDSegInputError(f"series {stack.key}: {stack.message}") from None
        plane = planes[k]
        plane[...] = stored  # the same float32 arithmetic as stored.astype(float32) * slope + intercept
        plane *= np.float32(frame.slope)
        plane += np.float32(frame.intercept)
    volume = planes.transpose(2, 1, 0)
    affine = stack.affine()
    meta = {"filename_or_obj": str(stack.frames[0].path.parent), "original_affine": affine.copy(), "space": "RAS",
            "modality": "CT", "study_uid": stack.study_uid, "series_uid": stack.series_uid, "series_key": stack.key}
    return MetaTensor(volume[None], affine=affine, meta=meta)


def source_paths(stack: Stack) -> list[Path]:
    """The files a DICOM SEG of ``stack`` references, in slice order for single-frame series (one
    per slice), or the one multi-frame file."""
    return list(dict.fromkeys(f.path for f in stack.frames))


def read_headers(paths) -> list:
    """The datasets of ``paths``, without pixels."""
    return [_read_header(Path(p)) for p in paths]


def source_headers(stack: Stack) -> list:
    """The source datasets (no pixels) a DICOM SEG of ``stack`` references (see :func:`source_paths`)."""
    return read_headers(source_paths(stack))


def read_ct_series(folder: str | os.PathLike, include_derived: bool = False):
    """Read the single CT series in ``folder`` (the reader and QC of ``sdseg3d batch``).

    Refuses a folder with no series, several segmentable series (naming them, and pointing to
    ``sdseg3d batch``), or a series QC refuses (with its reason).
    """
    folder = Path(folder)
    index = index_tree(folder, include_derived=include_derived)
    if not index.stacks:
        raise SDSegInputError("no DICOM image series in this folder", folder)
    good = [s for s in index.stacks if s.ok]
    if len(good) > 1:
        listing = ", ".join(f"{s.key} ({len(s.frames)} images)" for s in good)
        raise SDSegInputError(f"{len(good)} CT series in this folder, expected one: {listing}; "
                              "sdseg3d batch segments a tree of series", folder)
    if not good:
        why = "; ".join(f"{s.key} {s.status} ({s.reason}): {s.message}" for s in index.stacks)
        raise SDSegInputError(f"no DICOM CT series to segment: {why}", folder)
    image = read_stack(good[0])
    image.meta["filename_or_obj"] = str(folder)
    return image
