"""DICOM SEG output (``sdseg_monai.dicom_seg``): SNOMED CT codes from the label tables and configs, and
SEG files checked by three independent readers, each with a negative control that makes it fail:
dicom3tools' IOD validator ``dciodvfy``, highdicom's reader, and dcmqi's ``segimage2itkimage`` (DCMTK)
whose NRRD, placed by its own geometry, must equal our labels voxel for voxel."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest

from dicom_series import ct_slices, enhanced_ct, phantom_ct, uid, write
from sdseg_monai._version import __version__
from sdseg_monai.config import SDSegConfig
from sdseg_monai.errors import SDSegInputError
from sdseg_monai.labels import BTCV, STS, Organ, organ_code

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "sdseg_monai" / "default_model" / "config.json"
REAL_CT = Path(__file__).resolve().parents[2] / "shared" / "data" / "dicom_ct_3slice"
# Label values of a subset model: BINARY renumbers them 1..3, LABELMAP keeps them.
ORGANS = [{"label": o.label, "name": o.name} for o in (BTCV.organ("spleen"), BTCV.organ("right_kidney"), BTCV.organ("liver"))]
LABEL_OF = {o["name"]: o["label"] for o in ORGANS}
HASH = "0123456789abcdef" * 4
SOURCE_SERIES_TEXT = "venous phase 42"
SEG_STORAGE = {"binary": "1.2.840.10008.5.1.4.1.1.66.4", "labelmap": "1.2.840.10008.5.1.4.1.1.66.7"}


# -- codes and configs (no highdicom needed) ------------------------------------------------------------
def test_organ_codes_come_from_the_config_then_the_preset_then_a_generic_fallback():
    liver = organ_code({"label": 6, "name": "liver"}, "btcv")
    assert (liver.category.value, liver.type.value, liver.type.meaning, liver.modifier) == ("91723000", "10200004", "Liver", None)
    right = organ_code({"label": 2, "name": "right_kidney"}, "BTCV")
    assert (right.type.value, right.modifier.value, right.modifier.meaning) == ("64033007", "24028007", "Right")
    left_adrenal = organ_code({"label": 13, "name": "left_adrenal_gland"}, "btcv")
    assert (left_adrenal.type.value, left_adrenal.modifier.value) == ("23451007", "7771000")
    assert organ_code({"label": 1, "name": "teeth"}, "sts").type.value == "38199008"
    # The organ's own entry wins over the preset's organ of that name.
    own = organ_code({"label": 6, "name": "liver", "snomed": {"code": "39607008", "meaning": "Lung", "laterality": "left"}}, "btcv")
    assert (own.type.value, own.type.meaning, own.modifier.value) == ("39607008", "Lung", "7771000")
    # Unknown organ, or no preset: still a valid segment, coded as a generic anatomical structure.
    for generic in (organ_code({"label": 1, "name": "heart"}, "btcv"), organ_code({"label": 6, "name": "liver"}, None)):
        assert (generic.category.value, generic.type.value, generic.modifier) == ("91723000", "91723000", None)
    assert all(o.snomed_code for o in (*BTCV.organs, *STS.organs))
    assert Organ(1, "x").snomed() is None
    with pytest.raises(SDSegInputError, match="laterality"):
        organ_code({"label": 1, "name": "x", "snomed": {"code": "10200004", "meaning": "Liver", "laterality": "up"}})


def test_new_configs_carry_codes_and_saved_configs_without_them_load_unchanged():
    saved = json.loads(DEFAULT_CONFIG.read_text())
    old = SDSegConfig.from_json_file(DEFAULT_CONFIG)
    assert old.organs == saved["organs"] and all(set(o) == {"label", "name"} for o in old.organs)
    plain = {**old.to_dict(), "postprocessing": {}}  # its calibration names all 13 organs
    new = SDSegConfig.from_dict({**plain, "organs": [BTCV.organ("liver"), BTCV.organ("left_kidney")]})
    assert new.organs == [
        {"label": 6, "name": "liver", "snomed": {"code": "10200004", "meaning": "Liver"}},
        {"label": 3, "name": "left_kidney", "snomed": {"code": "64033007", "meaning": "Kidney", "laterality": "left"}},
    ]
    assert SDSegConfig.from_dict(json.loads(new.to_json_string())).organs == new.organs
    bad = {**plain, "organs": [{"label": 1, "name": "lung", "snomed": {"code": "lung", "meaning": "Lung"}}]}
    with pytest.raises(SDSegInputError, match="invalid SDSeg config: organ 'lung': SNOMED CT code"):
        SDSegConfig.from_dict(bad)


# -- helpers ------------------------------------------------------------------------------------------
def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed")
    return path


def _phantom(tmp_path: Path, name: str = "ct", **geometry):
    """Source headers (read back without pixels, as the DICOM reader hands them over) in slice order,
    and labels: the phantom's liver and spleen plus a right kidney block off-centre, so that a flip
    along any axis changes the labels."""
    image, labels = phantom_ct()
    labels[4:10, 3:9, 5:8] = 2
    paths = write(ct_slices(image, series=uid(1, 1, len(name)), description=SOURCE_SERIES_TEXT, **geometry), tmp_path / name)
    return [pydicom.dcmread(p, stop_before_pixels=True) for p in paths], labels


def _write(tmp_path: Path, name: str, labels, sources, **kwargs) -> Path:
    from sdseg_monai.dicom_seg import write_dicom_seg

    kwargs = {"organs": ORGANS, "dataset": "btcv", "model_hash": HASH, **kwargs}
    return write_dicom_seg(labels, sources, tmp_path / f"{name}.dcm", **kwargs)


def _dciodvfy_errors(path: Path) -> list[str]:
    run = subprocess.run([_tool("dciodvfy"), str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")]


def _assert_valid_and_control(seg_path: Path, tmp_path: Path) -> None:
    """No Error from dciodvfy; the same file without a required attribute gives one."""
    assert _dciodvfy_errors(seg_path) == []
    broken = pydicom.dcmread(seg_path)
    del broken.SegmentSequence[-1].SegmentLabel
    broken.save_as(tmp_path / "broken.dcm")
    assert any("SegmentLabel" in line for line in _dciodvfy_errors(tmp_path / "broken.dcm"))


def _label_by_segment(seg) -> dict[int, int]:
    """Segment number -> our label value, through the organ names in SegmentLabel."""
    return {int(s.SegmentNumber): LABEL_OF[s.SegmentLabel] for s in seg.SegmentSequence if int(s.SegmentNumber) > 0}


def _highdicom_labels(seg_path: Path, sources, frame_numbers=None) -> np.ndarray:
    """The SEG as read by highdicom, per source instance (or frame), as labels [i, j, k]."""
    import highdicom as hd

    seg = hd.seg.segread(seg_path)
    if frame_numbers is None:
        planes = seg.get_pixels_by_source_instance([ds.SOPInstanceUID for ds in sources], combine_segments=True)
    else:
        # Frames of empty slices are omitted, so highdicom must be told they are empty, not unknown.
        planes = seg.get_pixels_by_source_frame(sources[0].SOPInstanceUID, frame_numbers, combine_segments=True,
                                                assert_missing_frames_are_empty=True)
    lookup = np.zeros(256, np.uint8)
    for number, label in _label_by_segment(seg).items():
        lookup[number] = label
    return lookup[planes].transpose(2, 1, 0)


def _geometry(sources, frame_numbers=None):
    """Per slice k the LPS position of voxel (0, 0, k); row and column directions; column and row spacing."""
    if frame_numbers is None:
        positions = [ds.ImagePositionPatient for ds in sources]
        orientation, spacing = sources[0].ImageOrientationPatient, sources[0].PixelSpacing
    else:
        shared = sources[0].SharedFunctionalGroupsSequence[0]
        frames = sources[0].PerFrameFunctionalGroupsSequence
        positions = [frames[n - 1].PlanePositionSequence[0].ImagePositionPatient for n in frame_numbers]
        orientation = shared.PlaneOrientationSequence[0].ImageOrientationPatient
        spacing = shared.PixelMeasuresSequence[0].PixelSpacing
    orientation = np.asarray(orientation, float)
    return np.asarray(positions, float), orientation[:3], orientation[3:], float(spacing[1]), float(spacing[0])


def _dcmqi_labels(seg_path: Path, tmp_path: Path, shape, geometry) -> np.ndarray:
    """dcmqi's merged NRRD of the SEG, resampled by nearest index onto our grid [i, j, k] through both
    images' own geometry (ITK's LPS origin, direction and spacing), its values mapped to our labels."""
    import SimpleITK as sitk

    folder = tmp_path / f"dcmqi_{seg_path.stem}"
    folder.mkdir()
    run = subprocess.run([_tool("segimage2itkimage"), "--inputDICOM", str(seg_path), "--outputDirectory", str(folder),
                          "--mergeSegments"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    (nrrd,) = folder.glob("*.nrrd")
    lookup = np.zeros(256, np.uint8)
    for segment in json.loads((folder / "meta.json").read_text())["segmentAttributes"][0]:
        lookup[segment["labelID"]] = LABEL_OF[segment["SegmentLabel"]]
    image = sitk.ReadImage(str(nrrd))
    array = sitk.GetArrayFromImage(image).transpose(2, 1, 0)  # ITK index (x, y, z)
    positions, row, col, column_spacing, row_spacing = geometry
    i, j, k = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    points = positions[k] + i[..., None] * column_spacing * row + j[..., None] * row_spacing * col
    to_index = np.linalg.inv(np.reshape(image.GetDirection(), (3, 3)) @ np.diag(image.GetSpacing()))
    index = (points - np.asarray(image.GetOrigin())) @ to_index.T
    rounded = np.rint(index).astype(int)
    assert np.abs(index - rounded).max() < 1e-2, "dcmqi's voxel grid is not the source grid"
    inside = np.all((rounded >= 0) & (rounded < array.shape), axis=-1)
    out = np.zeros(shape, np.uint8)
    out[inside] = lookup[array[tuple(rounded[inside].T)]]
    # dcmqi's volume spans only the frames present; none of its voxels may fall off our grid.
    assert np.count_nonzero(out) == np.count_nonzero(array)
    return out


def _frames_expected(labels, kind: str) -> int:
    if kind == "labelmap":
        return int(sum(labels[:, :, k].any() for k in range(labels.shape[2])))
    return int(sum((labels[:, :, k] == o["label"]).any() for o in ORGANS for k in range(labels.shape[2])))


# -- SEG files ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["binary", "labelmap"])
def test_seg_is_valid_and_equals_the_labels_in_highdicom_and_dcmqi(tmp_path, kind, caplog):
    hd = pytest.importorskip("highdicom")
    # A one-component patient name: highdicom's logs do not quote it (its warning, filtered process-wide
    # at import, is checked in a subprocess: test_quiet.py, as pytest resets the filters per test).
    sources, labels = _phantom(tmp_path, patient_name="HOSTILENAME")
    caplog.set_level("DEBUG")
    path = _write(tmp_path, kind, labels, sources, seg_type=kind)
    assert "HOSTILENAME" not in caplog.text
    _assert_valid_and_control(path, tmp_path)

    seg = hd.seg.segread(path)
    source = sources[0]
    assert (seg.SOPClassUID, seg.SegmentationType) == (SEG_STORAGE[kind], kind.upper())
    syntax = pydicom.uid.RLELossless if kind == "labelmap" else pydicom.uid.ExplicitVRLittleEndian
    assert seg.file_meta.TransferSyntaxUID == syntax
    assert seg.NumberOfFrames == _frames_expected(labels, kind) < labels.shape[2] * (1 if kind == "labelmap" else 3)
    for copied in ("StudyInstanceUID", "PatientID", "FrameOfReferenceUID"):
        assert seg[copied].value == source[copied].value
    assert seg.SeriesInstanceUID != source.SeriesInstanceUID and seg.SOPInstanceUID != source.SOPInstanceUID
    assert (seg.SeriesDescription, seg.Manufacturer, seg.ContentLabel) == ("sdseg3d segmentation", "sdseg3d", "SDSEG")
    assert seg.SeriesNumber == 901 and seg.DeviceSerialNumber == HASH[:16]
    assert list(seg.SoftwareVersions)[0] == f"sdseg3d {__version__}"
    segments = {s.SegmentLabel: s for s in seg.SegmentSequence}
    liver, kidney = segments["liver"], segments["right_kidney"]
    assert int(liver.SegmentNumber) == (6 if kind == "labelmap" else 3) and liver.SegmentDescription == "sdseg3d label 6"
    assert liver.SegmentedPropertyTypeCodeSequence[0].CodeValue == "10200004"
    assert liver.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "91723000"
    kidney_type = kidney.SegmentedPropertyTypeCodeSequence[0]
    assert kidney_type.CodeValue == "64033007"
    assert kidney_type.SegmentedPropertyTypeModifierCodeSequence[0].CodeValue == "24028007"
    algorithm = liver.SegmentationAlgorithmIdentificationSequence[0]
    assert (liver.SegmentAlgorithmType, algorithm.AlgorithmName) == ("AUTOMATIC", "sdseg3d")
    assert algorithm.AlgorithmFamilyCodeSequence[0].CodeValue == "123110"  # DCM Artificial Intelligence
    assert algorithm.AlgorithmVersion == f"{__version__} model {HASH[:16]}" and HASH in algorithm.AlgorithmParameters
    assert SOURCE_SERIES_TEXT.encode() not in path.read_bytes()  # the source series' text stays out

    flipped = _write(tmp_path, f"{kind}_flipped", np.ascontiguousarray(labels[:, ::-1, :]), sources, seg_type=kind)
    assert np.array_equal(_highdicom_labels(path, sources), labels)
    assert not np.array_equal(_highdicom_labels(flipped, sources), labels)  # control: the reader sees the flip
    geometry = _geometry(sources)
    assert np.array_equal(_dcmqi_labels(path, tmp_path, labels.shape, geometry), labels)
    assert not np.array_equal(_dcmqi_labels(flipped, tmp_path, labels.shape, geometry), labels)  # control


@pytest.mark.parametrize("kind", ["binary", "labelmap"])
def test_the_same_labels_give_the_same_segments_under_new_uids(tmp_path, kind):
    """Pixel data, frames and segment descriptions are a function of the labels; each SEG is a new
    object, so its series and instance UIDs (and highdicom's creation date and time) are new."""
    pytest.importorskip("highdicom")
    sources, labels = _phantom(tmp_path)
    first, second = (pydicom.dcmread(_write(tmp_path, f"{kind}_{n}", labels, sources, seg_type=kind)) for n in (1, 2))
    assert first.PixelData == second.PixelData and first.NumberOfFrames == second.NumberOfFrames
    assert first.SegmentSequence == second.SegmentSequence and len(first.SegmentSequence) >= len(ORGANS)
    assert first.PerFrameFunctionalGroupsSequence == second.PerFrameFunctionalGroupsSequence
    assert first.SharedFunctionalGroupsSequence == second.SharedFunctionalGroupsSequence
    assert first.SeriesInstanceUID != second.SeriesInstanceUID and first.SOPInstanceUID != second.SOPInstanceUID
    # Control: other labels give other pixel data.
    other = pydicom.dcmread(_write(tmp_path, f"{kind}_other", np.where(labels == 2, 0, labels).astype(np.uint8), sources, seg_type=kind))
    assert other.PixelData != first.PixelData


@pytest.mark.parametrize("orientation", [
    pytest.param(((1.0, 0.0, 0.0), (0.0, 0.0, -1.0)), id="coronal"),
    pytest.param(((np.cos(0.5), np.sin(0.5), 0.0),
                  (-np.sin(0.5) * np.cos(0.3), np.cos(0.5) * np.cos(0.3), -np.sin(0.3))), id="oblique"),
])
def test_seg_of_a_coronal_or_oblique_series_keeps_its_geometry(tmp_path, orientation):
    pytest.importorskip("highdicom")
    row_dir, col_dir = orientation
    sources, labels = _phantom(tmp_path, row_dir=row_dir, col_dir=col_dir)
    geometry = _geometry(sources)
    for kind in ("binary", "labelmap"):
        path = _write(tmp_path, kind, labels, sources, seg_type=kind)
        assert _dciodvfy_errors(path) == []
        assert np.array_equal(_highdicom_labels(path, sources), labels)
        assert np.array_equal(_dcmqi_labels(path, tmp_path, labels.shape, geometry), labels)
        seg = pydicom.dcmread(path, stop_before_pixels=True)
        orientation = seg.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0].ImageOrientationPatient
        assert np.allclose(np.asarray(orientation, float), np.r_[row_dir, col_dir], atol=1e-5)


def test_seg_of_a_multiframe_source_references_its_frames(tmp_path):
    hd = pytest.importorskip("highdicom")
    image, labels = phantom_ct()
    labels[4:10, 3:9, 5:8] = 2
    series = uid(1, 7)
    shuffled = [3, 0, 7, 1, 11, 5, 2, 9, 4, 10, 6, 8]
    slices = ct_slices(image, series=series)
    write([enhanced_ct([slices[k] for k in shuffled], series)], tmp_path / "mf", names=["enhanced.dcm"])
    source = pydicom.dcmread(tmp_path / "mf" / "enhanced.dcm", stop_before_pixels=True)
    # Slice k's frame, found by position: the converter orders frames its own way.
    z = [float(f.PlanePositionSequence[0].ImagePositionPatient[2]) for f in source.PerFrameFunctionalGroupsSequence]
    frame_numbers = [z.index(float(ds.ImagePositionPatient[2])) + 1 for ds in slices]
    assert frame_numbers != list(range(1, 13))

    for kind in ("binary", "labelmap"):
        path = _write(tmp_path, kind, labels, [source], seg_type=kind, frame_numbers=frame_numbers)
        assert _dciodvfy_errors(path) == []
        seg = hd.seg.segread(path)
        assert seg.NumberOfFrames == _frames_expected(labels, kind)
        referenced = seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0].ReferencedSOPInstanceUID
        assert referenced == source.SOPInstanceUID
        assert np.array_equal(_highdicom_labels(path, [source], frame_numbers), labels)
        assert np.array_equal(_dcmqi_labels(path, tmp_path, labels.shape, _geometry([source], frame_numbers)), labels)
    with pytest.raises(SDSegInputError, match="one frame number per label slice"):
        _write(tmp_path, "no_numbers", labels, [source])


def test_seg_of_the_real_3_slice_ct_with_its_liver_mask(tmp_path):
    pytest.importorskip("highdicom")
    import SimpleITK as sitk

    if not (REAL_CT / "liver_seg.nrrd").is_file():
        pytest.skip(f"{REAL_CT} is absent")
    mask = sitk.ReadImage(str(REAL_CT / "liver_seg.nrrd"))
    labels = (sitk.GetArrayFromImage(mask).transpose(2, 1, 0) > 0).astype(np.uint8) * 6
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in sorted(REAL_CT.glob("*.dcm"))]
    # The NRRD's slice k is the DICOM image at its position.
    sources = []
    for k in range(labels.shape[2]):
        point = np.asarray(mask.TransformIndexToPhysicalPoint((0, 0, k)))
        (match,) = [ds for ds in headers if np.allclose(np.asarray(ds.ImagePositionPatient, float), point, atol=1e-3)]
        sources.append(match)
    assert [Path(ds.filename).name for ds in sources] != sorted(Path(ds.filename).name for ds in sources)
    for kind in ("binary", "labelmap"):
        path = _write(tmp_path, kind, labels, sources, seg_type=kind)
        assert _dciodvfy_errors(path) == []
        assert np.array_equal(_highdicom_labels(path, sources), labels)
        assert np.array_equal(_dcmqi_labels(path, tmp_path, labels.shape, _geometry(sources)), labels)
        assert np.count_nonzero(labels) > 100_000


@pytest.mark.parametrize("kind", ["binary", "labelmap"])
def test_seg_without_any_voxel_is_still_valid_and_small(tmp_path, kind):
    hd = pytest.importorskip("highdicom")
    sources, labels = _phantom(tmp_path)
    path = _write(tmp_path, kind, np.zeros_like(labels), sources, seg_type=kind)
    assert _dciodvfy_errors(path) == []
    seg = hd.seg.segread(path)
    # One empty plane (per segment for BINARY) on the first slice, not every slice.
    assert seg.NumberOfFrames == (1 if kind == "labelmap" else len(ORGANS))
    assert len(seg.SegmentSequence) == len(ORGANS) + (kind == "labelmap")  # LABELMAP adds the background
    assert not _highdicom_labels(path, sources).any()


def test_seg_organ_codes_from_the_config_entry(tmp_path):
    """A model trained on other organs: codes from its config's own "snomed" entry, else generic."""
    hd = pytest.importorskip("highdicom")
    sources, labels = _phantom(tmp_path)
    organs = [{"label": 1, "name": "spleen", "snomed": {"code": "39607008", "meaning": "Lung", "laterality": "left"}},
              {"label": 2, "name": "right_kidney"}, {"label": 6, "name": "liver"}]
    seg = hd.seg.segread(_write(tmp_path, "custom", labels, sources, organs=organs, dataset=None))
    codes = {s.SegmentLabel: s.SegmentedPropertyTypeCodeSequence[0] for s in seg.SegmentSequence}
    assert codes["spleen"].CodeValue == "39607008"
    assert codes["spleen"].SegmentedPropertyTypeModifierCodeSequence[0].CodeValue == "7771000"
    assert codes["liver"].CodeValue == codes["right_kidney"].CodeValue == "91723000"


def test_bad_input_is_one_line_and_leaves_the_output_alone(tmp_path):
    pytest.importorskip("highdicom")
    sources, labels = _phantom(tmp_path)
    target = tmp_path / "seg.dcm"
    target.write_bytes(b"before")
    cases = [
        ({"seg_type": "fractional"}, "unknown DICOM SEG type 'fractional'"),
        ({"labels": np.where(labels == 2, 7, labels).astype(np.uint8)}, r"labels hold values no organ describes: \[7\]"),
        ({"sources": sources[:-1]}, "11 source images for 12 label slices"),
        ({"labels": labels[:-1]}, "source image is 40 x 48"),
        ({"model_hash": "sha 1"}, "model hash"),
    ]
    from sdseg_monai.dicom_seg import write_dicom_seg

    for change, message in cases:
        kwargs = {"labels": labels, "sources": sources, "organs": ORGANS, "dataset": "btcv", **change}
        with pytest.raises(SDSegInputError, match=message) as error:
            write_dicom_seg(kwargs.pop("labels"), kwargs.pop("sources"), target, **kwargs)
        assert "\n" not in str(error.value)
    assert target.read_bytes() == b"before" and sorted(p.name for p in tmp_path.iterdir()) == ["ct", "seg.dcm"]


def test_without_highdicom_the_error_is_the_install_hint(tmp_path, monkeypatch):
    from sdseg_monai.dicom_seg import write_dicom_seg

    monkeypatch.setitem(sys.modules, "highdicom", None)  # import highdicom now raises ImportError
    labels = np.zeros((4, 4, 2), np.uint8)
    with pytest.raises(SDSegInputError) as error:
        write_dicom_seg(labels, [], tmp_path / "seg.dcm", organs=ORGANS)
    assert str(error.value) == 'DICOM SEG output needs the dicom extra: pip install "sdseg3d[dicom]"'
    assert not (tmp_path / "seg.dcm").exists()


def test_dates_and_times_pydicom_cannot_parse_still_give_a_seg_and_never_reach_a_message(tmp_path, recwarn):
    """Real exports carry a birth date "00000000" or a time "10:10:10": highdicom re-parses them and
    failed, so the case got no SEG. They are blanked in a copy (type 2: empty is valid); the source
    headers are left as they were, and a refusal that quotes a header value never shows it."""
    hd = pytest.importorskip("highdicom")
    from sdseg_monai.dicom_seg import _scrubbed

    import warnings

    sources, labels = _phantom(tmp_path)
    with warnings.catch_warnings():  # pydicom warns as the values are set; read back raw, as from an export
        warnings.simplefilter("ignore")
        for k, ds in enumerate(sources):
            ds.PatientBirthDate, ds.StudyTime = "00000000", "10:10:10"
            ds.save_as(tmp_path / f"odd_{k}.dcm", enforce_file_format=False)
    sources = [pydicom.dcmread(tmp_path / f"odd_{k}.dcm") for k in range(len(sources))]
    recwarn.clear()
    path = _write(tmp_path, "odd_dates", labels, sources)
    seg = hd.seg.segread(path)
    assert seg.PatientBirthDate == "" and seg.StudyTime == "" and seg.StudyDate == sources[0].StudyDate
    assert sources[0].PatientBirthDate == "00000000"  # the caller's headers are not changed
    assert not [w for w in recwarn if "00000000" in str(w.message) or "10:10:10" in str(w.message)]
    # Dates, codes and multi-valued or nested text are header values too.
    sources[0].ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    sources[0].OtherPatientIDsSequence = [pydicom.Dataset()]
    sources[0].OtherPatientIDsSequence[0].PatientID = "NESTED-ID-123"
    message = _scrubbed("bad value 00000000, AXIAL and NESTED-ID-123 in it", sources)
    assert "00000000" not in message and "AXIAL" not in message and "NESTED-ID-123" not in message


def test_a_refusal_never_quotes_a_header_value_even_as_python_escapes_it(tmp_path):
    """highdicom quotes a value it refuses with repr(): a Specific Character Set of "EVIL\\nFAKE" came
    out as 'EVIL\\\\nFAKE', which the value itself does not match, and reached the summary."""
    pytest.importorskip("highdicom")
    import warnings

    sources, labels = _phantom(tmp_path)
    with warnings.catch_warnings():  # pydicom warns as it is set
        warnings.simplefilter("ignore")
        for ds in sources:
            ds.SpecificCharacterSet = "EVIL\nFAKE CHARSET"
    with pytest.raises(SDSegInputError, match="cannot build a DICOM SEG") as error:
        _write(tmp_path, "evil", labels, sources)
    message = str(error.value)
    assert "<header text>" in message and "EVIL" not in message and "FAKE" not in message and "\n" not in message
