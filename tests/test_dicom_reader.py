"""The DICOM reader: index a tree, split series into stacks, QC each hazard with its stated outcome,
and read stacks in HU with geometry equal to the positions in the headers."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest

from dicom_series import ct_slices, enhanced_ct, phantom_ct, spoil, uid, write
from sdseg_monai.dicom import LPS_TO_RAS, index_tree, read_ct_series, read_stack
from sdseg_monai.errors import SDSegInputError

SHARED_DICOM = Path(__file__).resolve().parents[2] / "shared" / "data" / "dicom_ct_3slice"
PYDICOM_CT5N = Path(pydicom.__file__).parent / "data" / "test_files" / "dicomdirtests" / "98892001" / "CT5N"
IMAGE, _ = phantom_ct((20, 16, 8))
LARGER, _ = phantom_ct((64, 48, 3))


def _only(folder, **kwargs):
    index = index_tree(folder, **kwargs)
    assert len(index.stacks) == 1, [(s.key, s.reason) for s in index.stacks]
    return index.stacks[0]


def _world_of_voxels(affine, shape):
    """LPS world position of voxel (0, 0, k) for every k, from a RAS affine."""
    lps = np.linalg.inv(LPS_TO_RAS) @ affine
    return np.array([(lps @ [0, 0, k, 1])[:3] for k in range(shape[2])])


def _check_geometry(stack, datasets):
    """The volume's voxel (0, 0, k) lies where slice k's header says, and its HU are the source's."""
    volume = read_stack(stack)
    positions = sorted((np.asarray(ds.ImagePositionPatient, float) for ds in datasets), key=lambda p: p @ stack.normal)
    assert np.allclose(_world_of_voxels(np.asarray(volume.affine), volume.shape[1:]), positions, atol=1e-3)
    return volume


# -- clean series, planes, multi-frame, compression ---------------------------------------------------

@pytest.mark.parametrize("plane,row_dir,col_dir", [
    ("axial", (1, 0, 0), (0, 1, 0)),
    ("coronal", (1, 0, 0), (0, 0, -1)),
    ("sagittal", (0, 1, 0), (0, 0, -1)),
    ("oblique", (np.cos(0.3), np.sin(0.3), 0), (0, 0, -1)),
])
def test_planes_read_on_the_source_grid_in_hu(tmp_path, plane, row_dir, col_dir):
    datasets = ct_slices(IMAGE, row_dir=row_dir, col_dir=col_dir)
    write(datasets, tmp_path / "s")
    stack = _only(tmp_path)
    assert stack.ok and stack.plane == plane and stack.key == uid(1, 1) and stack.images_used == 8
    assert stack.spacing == pytest.approx((0.8, 0.7, 3.0), abs=1e-5)  # positions are written to 1e-4 mm
    volume = _check_geometry(stack, datasets)
    assert volume.shape == (1, 20, 16, 8) and np.array_equal(volume[0].numpy(), IMAGE.astype(np.float32))
    assert volume[0].numpy().flags.f_contiguous  # slice-major, as a NIfTI reads: an axial slice contiguous


def test_reading_leaves_the_process_wide_warning_filters_alone(tmp_path, monkeypatch):
    """catch_warnings swaps the process's one filter list: reader threads (4 on a GPU) each swapping
    it could leave every warning ignored for good, or pydicom's, quoting header text, shown. Reading
    an uncompressed and a compressed series never swaps it."""
    import warnings

    write(ct_slices(IMAGE), tmp_path / "plain" / "s")
    compressed = ct_slices(IMAGE, series=uid(1, 2))
    for ds in compressed:
        ds.compress(pydicom.uid.RLELossless)
    write(compressed, tmp_path / "rle" / "s")

    import sys

    callers = []

    class Recorded(warnings.catch_warnings):
        def __init__(self, *args, **kwargs):
            callers.append(sys._getframe(1).f_code.co_filename)
            super().__init__(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(warnings, "catch_warnings", Recorded)
        read = {tree: read_stack(index_tree(tmp_path / tree).stacks[0])[0].numpy() for tree in ("plain", "rle")}
    assert all(np.array_equal(v, IMAGE.astype(np.float32)) for v in read.values())
    assert not [f for f in callers if "sdseg_monai" in f], callers


def test_slice_order_comes_from_positions_not_instance_numbers(tmp_path):
    datasets = ct_slices(IMAGE)
    for ds, number in zip(datasets, [5, 1, 8, 2, 7, 3, 6, 4]):
        ds.InstanceNumber = number
    write(datasets, tmp_path / "s")
    assert np.array_equal(read_stack(_only(tmp_path))[0].numpy(), IMAGE.astype(np.float32))


def test_per_slice_rescale_is_applied(tmp_path):
    datasets = ct_slices(IMAGE)
    for k, ds in enumerate(datasets):  # re-store each slice with its own slope and intercept
        slope, intercept = (0.5, -1000.0) if k % 2 else (2.0, -2048.0)
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
        ds.PixelData = np.rint((IMAGE[:, :, k].T - intercept) / slope).astype(np.int16).tobytes()
    write(datasets, tmp_path / "s")
    volume = read_stack(_only(tmp_path))[0].numpy()
    assert np.abs(volume - IMAGE).max() <= 1.0  # slope 2 rounds odd HU by one
    assert np.array_equal(volume[:, :, 1], IMAGE[:, :, 1])


@pytest.mark.parametrize("sop_class", ["1.2.840.10008.5.1.4.1.1.2.2", "1.2.840.10008.5.1.4.1.1.2.1"])  # Legacy Converted, Enhanced
def test_multiframe_ct_reads_like_its_single_frames(tmp_path, sop_class):
    datasets = ct_slices(IMAGE)
    multiframe = enhanced_ct(datasets, uid(1, 5))
    multiframe.SOPClassUID = multiframe.file_meta.MediaStorageSOPClassUID = sop_class  # the same functional groups
    write([multiframe], tmp_path / "mf", names=["mf.dcm"])
    stack = _only(tmp_path)
    assert stack.ok and stack.key == uid(1, 5) and len(stack.frames) == 8 and {f.number for f in stack.frames} == set(range(1, 9))
    _check_geometry(stack, datasets)
    assert np.array_equal(read_stack(stack)[0].numpy(), IMAGE.astype(np.float32))


@pytest.mark.parametrize("syntax", ["RLELossless", "JPEGLSLossless", "JPEG2000Lossless"])
def test_compressed_transfer_syntaxes_decode(tmp_path, syntax):
    datasets = ct_slices(LARGER)  # OpenJPEG's default resolutions need at least 32 x 32 pixels
    for ds in datasets:
        ds.compress(getattr(pydicom.uid, syntax))
    write(datasets, tmp_path / "s")
    assert np.array_equal(read_stack(_only(tmp_path))[0].numpy(), LARGER.astype(np.float32))


def test_a_missing_decoder_names_the_package(tmp_path, monkeypatch):
    datasets = ct_slices(LARGER)
    for ds in datasets:
        ds.compress(pydicom.uid.JPEG2000Lossless)
    write(datasets, tmp_path / "s")
    stack = _only(tmp_path)

    def no_plugin(path):
        raise RuntimeError("Unable to decode the pixel data as none of the available plugins are usable")

    monkeypatch.setattr("sdseg_monai.dicom._pixels", no_plugin)
    with pytest.raises(SDSegInputError, match=r"pip install pylibjpeg-openjpeg") as e:
        read_stack(stack)
    assert stack.status == "failed" and stack.reason == "unreadable_slices" and "\n" not in str(e.value)


# -- hazards: each with its stated outcome ------------------------------------------------------------

def test_localizer_inside_the_series_is_dropped_and_counted(tmp_path):
    datasets = ct_slices(IMAGE)
    scout = ct_slices(np.zeros((30, 10, 1)), row_dir=(0, 1, 0), col_dir=(0, 0, -1), image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"),
                      first_instance=100)
    write(datasets + scout, tmp_path / "s")
    stack = _only(tmp_path)
    assert stack.ok and stack.dropped == {"localizer": 1} and stack.images_used == 8
    _check_geometry(stack, datasets)
    # An odd orientation held by a few images is a scout even without the LOCALIZER flag.
    unflagged = ct_slices(np.zeros((20, 16, 1)), row_dir=(0, 1, 0), col_dir=(0, 0, -1), first_instance=200)
    write(unflagged, tmp_path / "s2", names=["scout"])
    stack = _only(tmp_path)
    assert stack.ok and stack.dropped == {"localizer": 2}


def test_a_series_of_localizers_only_is_skipped(tmp_path):
    write(ct_slices(IMAGE, image_type=("ORIGINAL", "PRIMARY", "LOCALIZER")), tmp_path / "s")
    stack = _only(tmp_path)
    assert (stack.status, stack.reason) == ("skipped", "localizer_only")


def test_a_missing_slice_is_refused_with_where_the_gap_is(tmp_path):
    datasets = ct_slices(IMAGE)
    write(datasets[:4] + datasets[5:], tmp_path / "s")
    stack = _only(tmp_path)
    assert (stack.status, stack.reason) == ("failed", "nonuniform_spacing")
    assert "gap of 6.00 mm between slices 4 and 5 of 7 (median 3.00 mm)" in stack.message
    with pytest.raises(SDSegInputError, match="nonuniform_spacing"):
        read_ct_series(tmp_path)


def test_slowly_drifting_gaps_are_refused_and_even_ones_read_where_their_headers_say(tmp_path):
    """100 gaps of 1.00 mm, then 100 of 1.09 mm: every gap is within 0.1 mm of the median, yet the
    middle slice lies 4.5 mm from its place at even spacing. A median-gap check alone passes it."""
    z = np.r_[np.arange(101) * 1.0, 100 + np.arange(1, 101) * 1.09]
    datasets = ct_slices(np.zeros((4, 4, len(z))), spacing=(1.0, 1.0, 1.0))
    for ds, position in zip(datasets, z):
        ds.ImagePositionPatient = [-100.0, -120.0, float(position)]
    write(datasets, tmp_path / "drift")
    stack = _only(tmp_path)
    assert (stack.status, stack.reason) == ("failed", "nonuniform_spacing")
    assert "slice 101 of 201 lies 4.50 mm from its place at an even spacing of 1.045 mm" in stack.message
    # Control: the same count of slices at an even spacing that is not the median's rounding passes,
    # and slice k of the volume lies where its header says (first to last, not the median gap).
    shutil.rmtree(tmp_path / "drift")
    even = np.linspace(0.0, 209.0, len(z))
    for ds, position in zip(datasets, even):
        ds.ImagePositionPatient = [-100.0, -120.0, float(position)]
    write(datasets, tmp_path / "even")
    stack = _only(tmp_path)
    assert stack.ok and stack.spacing[2] == pytest.approx(1.045)
    _check_geometry(stack, datasets)


def test_two_acquisitions_under_one_uid_become_two_stacks(tmp_path):
    first = ct_slices(IMAGE, acquisition=1)
    second = ct_slices(IMAGE + 50, acquisition=2, first_instance=101)  # same positions, other pixels
    write(first + second, tmp_path / "s")
    stacks = index_tree(tmp_path).stacks
    assert [s.key for s in stacks] == [f"{uid(1, 1)}#1", f"{uid(1, 1)}#2"] and all(s.ok for s in stacks)
    means = sorted(float(read_stack(s)[0].mean()) for s in stacks)
    assert means[1] - means[0] == pytest.approx(50, abs=1e-3)
    # Two acquisitions one after the other (a gap between them) split the same way.
    shutil.rmtree(tmp_path / "s")
    later = ct_slices(IMAGE, acquisition=2, first_instance=101, origin=(-100.0, -120.0, 200.0))
    write(first + later, tmp_path / "s")
    assert [s.reason for s in index_tree(tmp_path).stacks] == ["ok", "ok"]


def test_duplicates_exact_ones_dropped_different_pixels_ambiguous(tmp_path):
    datasets = ct_slices(IMAGE)
    copy = ct_slices(IMAGE[:, :, 3:4], origin=datasets[3].ImagePositionPatient, first_instance=50)
    write(datasets + copy, tmp_path / "s")
    stack = _only(tmp_path)
    assert stack.ok and stack.dropped == {"duplicate": 1} and stack.images_used == 8
    assert np.array_equal(read_stack(stack)[0].numpy(), IMAGE.astype(np.float32))
    other = ct_slices(IMAGE[:, :, 3:4] + 100, origin=datasets[3].ImagePositionPatient, first_instance=60)
    write(other, tmp_path / "s", names=["other"])
    stack = _only(tmp_path)
    assert (stack.status, stack.reason) == ("failed", "ambiguous_duplicates")
    # The same file twice in the tree (a copied folder) is an exact duplicate.
    (tmp_path / "s" / "other").unlink()
    shutil.copytree(tmp_path / "s", tmp_path / "copy")
    stack = _only(tmp_path)
    assert stack.ok and stack.dropped == {"duplicate": 10} and stack.images_used == 8


def test_a_multiframe_series_split_over_files_reads_but_no_seg_can_reference_it(tmp_path):
    """A DICOM SEG can reference one multi-frame source only: a series spread over two multi-frame
    files reads exactly (labels need no SEG), and says why no SEG can reference it; with SEG output
    it fails up front with its reason, before any output, instead of after label.nii.gz."""
    from sdseg_monai.batch import collect_cases
    from sdseg_monai.dicom import index_tree

    datasets = ct_slices(IMAGE)
    first, second = enhanced_ct(datasets[:4], uid(1, 5)), enhanced_ct(datasets[4:], uid(1, 5))
    second.SOPInstanceUID = second.file_meta.MediaStorageSOPInstanceUID = uid(1, 5, 2)
    write([first, second], tmp_path / "mf", names=["a.dcm", "b.dcm"])
    stack = _only(tmp_path)
    assert stack.ok and stack.seg_refusal.startswith("8 slices from 2 files, multi-frame among them")
    assert np.array_equal(read_stack(stack)[0].numpy(), IMAGE.astype(np.float32))
    (without,) = collect_cases(index_tree(tmp_path), tmp_path / "out", dicom_seg=False)
    (with_seg,) = collect_cases(index_tree(tmp_path), tmp_path / "out", dicom_seg=True)
    assert without.row["status"] == "ok" and without.out_dir is not None
    assert (with_seg.row["status"], with_seg.row["reason"]) == ("failed", "split_multiframe") and with_seg.out_dir is None
    # Control: two copies of one enhanced file are exact duplicates; every frame kept is from one file,
    # and the file is decoded once per copy, not once per frame.
    shutil.rmtree(tmp_path / "mf")
    write([enhanced_ct(datasets, uid(1, 5))], tmp_path / "mf", names=["a.dcm"])
    shutil.copytree(tmp_path / "mf", tmp_path / "copy")
    import sdseg_monai.dicom as dicom

    decoded = []
    original = dicom._pixels
    dicom._pixels = lambda path: decoded.append(path) or original(path)
    try:
        stack = _only(tmp_path)
    finally:
        dicom._pixels = original
    assert stack.ok and stack.dropped == {"duplicate": 8} and len(stack.files) == 1
    assert sorted(decoded) == sorted([tmp_path / "mf" / "a.dcm", tmp_path / "copy" / "a.dcm"])  # was 16 decodes
    assert np.array_equal(read_stack(stack)[0].numpy(), IMAGE.astype(np.float32))


def test_gantry_tilt_is_refused(tmp_path):
    write(ct_slices(IMAGE, slice_step=(0.0, 0.4, 3.0)), tmp_path / "s")
    stack = _only(tmp_path)
    assert (stack.status, stack.reason) == ("failed", "gantry_tilt") and "2.80 mm" in stack.message
    shutil.rmtree(tmp_path / "s")
    datasets = ct_slices(IMAGE)
    for ds in datasets:
        ds.GantryDetectorTilt = 12.0
    write(datasets, tmp_path / "s")
    assert _only(tmp_path).reason == "gantry_tilt"


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom warns when writing the invalid UIDs
@pytest.mark.parametrize("change,status,reason", [
    (lambda ds: setattr(ds, "Modality", "MR"), "skipped", "not_ct"),
    (lambda ds: setattr(ds, "ImageType", ["DERIVED", "SECONDARY", "MPR"]), "skipped", "derived"),
    (lambda ds: delattr(ds, "FrameOfReferenceUID"), "skipped", "no_frame_of_reference"),
    (lambda ds: delattr(ds, "ImagePositionPatient"), "skipped", "no_geometry"),
    (lambda ds: setattr(ds, "SeriesInstanceUID", "../../etc"), "failed", "invalid_uid"),
    (lambda ds: setattr(ds, "StudyInstanceUID", "1.2." + "3" * 80), "failed", "invalid_uid"),
])
def test_series_level_outcomes(tmp_path, change, status, reason):
    datasets = ct_slices(IMAGE)
    for ds in datasets:
        change(ds)
    write(datasets, tmp_path / "s")
    stack = _only(tmp_path)
    assert (stack.status, stack.reason) == (status, reason)
    assert "../" not in stack.key and "/" not in stack.key


def test_derived_images_are_taken_with_include_derived(tmp_path):
    datasets = ct_slices(IMAGE, image_type=("DERIVED", "SECONDARY", "MPR"))
    write(datasets, tmp_path / "s")
    assert _only(tmp_path).reason == "derived" and _only(tmp_path, include_derived=True).ok


def test_too_few_slices_are_skipped(tmp_path):
    write(ct_slices(IMAGE[:, :, :2]), tmp_path / "s")
    assert (_only(tmp_path).status, _only(tmp_path).reason) == ("skipped", "too_few_slices")


def test_a_truncated_slice_fails_its_series(tmp_path):
    paths = write(ct_slices(IMAGE), tmp_path / "s")
    data = paths[2].read_bytes()
    paths[2].write_bytes(data[: len(data) - 200])
    stack = _only(tmp_path)
    with pytest.raises(SDSegInputError, match="unreadable_slices|cannot be read"):
        read_stack(stack)
    assert (stack.status, stack.reason) == ("failed", "unreadable_slices")


@pytest.mark.parametrize("name,value,bad", [
    ("GantryDetectorTilt", "77.77", b"abc   "),
    ("RescaleSlope", "77.77", b"1,5e+x"),
    ("Columns", None, None),
])
def test_a_malformed_header_value_fails_its_series_not_the_index(tmp_path, name, value, bad):
    """One slice's header with a value that cannot be parsed: its series fails with a reason (which
    slice it held is unknown), the other series of the tree is indexed as usual."""
    datasets = ct_slices(IMAGE)
    if value is None:
        delattr(datasets[2], name)
    else:
        setattr(datasets[2], name, value)
    paths = write(datasets, tmp_path / "bad")
    if value is not None:
        spoil(paths[2], value, bad)
    write(ct_slices(IMAGE, series=uid(1, 2)), tmp_path / "good")
    outcome = {s.key: (s.status, s.reason, s.message) for s in index_tree(tmp_path).stacks}
    error = "AttributeError" if value is None else "ValueError"
    assert outcome == {uid(1, 1): ("failed", "unreadable_slices", f"1 image header(s) with values that cannot be parsed ({error})"),
                       uid(1, 2): ("ok", "ok", "")}


def test_hidden_and_half_written_files_are_not_read(tmp_path):
    """The node's and atomic_paths' temporaries (".<name>.*") may be half-written: never indexed."""
    paths = write(ct_slices(IMAGE), tmp_path / "s")
    partial = tmp_path / "s" / f".{paths[0].name}.dcm.k2j4.dcm"
    partial.write_bytes(paths[0].read_bytes()[:-300])  # same instance, pixels cut short
    stack = _only(tmp_path)
    assert stack.ok and stack.images_used == 8 and partial not in stack.files
    assert index_tree(tmp_path).counts["files"] == 8


def test_a_pacs_export_tree(tmp_path):
    """Two studies, a series split across folders, an MR, a SEG, junk, a DICOMDIR, hostile header text."""
    study_a = ct_slices(IMAGE, study=uid(1), series=uid(1, 1), patient_name="../../etc/passwd", description="/root/x")
    write(study_a[:4], tmp_path / "export" / "A" / "part1")
    write(study_a[4:], tmp_path / "export" / "A" / "part2")
    write(ct_slices(IMAGE, study=uid(2), series=uid(2, 1)), tmp_path / "export" / "B" / "ct")
    write(ct_slices(IMAGE, study=uid(2), series=uid(2, 2), modality="MR"), tmp_path / "export" / "B" / "mr")
    seg = ct_slices(IMAGE[:, :, :1], study=uid(2), series=uid(2, 3))[0]
    seg.SOPClassUID = "1.2.840.10008.5.1.4.1.1.66.4"
    seg.file_meta.MediaStorageSOPClassUID = seg.SOPClassUID
    write([seg], tmp_path / "export" / "B" / "seg")
    shutil.copy(Path(pydicom.__file__).parent / "data" / "test_files" / "dicomdirtests" / "DICOMDIR", tmp_path / "export" / "DICOMDIR")
    (tmp_path / "export" / "README.txt").write_text("junk")
    (tmp_path / "export" / "empty.dcm").write_bytes(b"")
    (tmp_path / "export" / "noise.dcm").write_bytes(os.urandom(3000))
    index = index_tree(tmp_path / "export")
    outcome = {s.key: (s.study_uid, s.reason) for s in index.stacks}
    assert outcome == {uid(1, 1): (uid(1), "ok"), uid(2, 1): (uid(2), "ok"), uid(2, 2): (uid(2), "not_ct"), uid(2, 3): (uid(2), "not_image")}
    assert index.counts["dicomdir"] == 1 and index.counts["not_dicom_or_unreadable"] == 3 and index.counts["dicom"] == 25
    split = next(s for s in index.stacks if s.key == uid(1, 1))
    assert {p.parent.name for p in split.files} == {"part1", "part2"}
    _check_geometry(split, study_a)
    messages = " ".join(s.message for s in index.stacks)
    assert "etc" not in messages and "root" not in messages


@pytest.mark.skipif(not SHARED_DICOM.is_dir(), reason="../shared/data/dicom_ct_3slice not present")
def test_real_three_slice_ct(tmp_path):
    stack = _only(SHARED_DICOM)
    assert stack.ok and stack.images_used == 3 and stack.plane == "axial"
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in sorted(SHARED_DICOM.glob("*.dcm"))]
    _check_geometry(stack, headers)


def test_pydicom_small_ct_series():
    stack = _only(PYDICOM_CT5N)
    assert stack.ok and stack.images_used == 5 and stack.spacing[2] == pytest.approx(2.5)
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in sorted(PYDICOM_CT5N.iterdir())]
    _check_geometry(stack, headers)
