"""Inputs are never harmed, bad ones are refused before any compute, and outputs are never half-written.

Every refusal: exit 2, one line on stderr naming the file and the problem, no traceback, no file
written, and every byte of the inputs unchanged.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from conftest import labelled_scan
from sdseg_monai.cli import main
from sdseg_monai.errors import SDSegInputError
from sdseg_monai.inference import VolumeSegmenter
from sdseg_monai.model import SDSeg

HU_WINDOW = (-175, 250)


def _save(path: Path, data: np.ndarray, affine=np.eye(4)) -> Path:
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path


def _save_with_header(path: Path, data: np.ndarray, mutate) -> Path:
    """A NIfTI whose header fields are set by ``mutate`` and written verbatim (nibabel would
    otherwise recompute the forms from an affine, and refuses to build a singular one)."""
    header = nib.Nifti1Image(data, np.diag([2.0, 2.0, 3.0, 1.0])).header
    mutate(header)
    nib.save(nib.Nifti1Image(data, None, header=header), str(path))
    return path


def _zero_forms(header):
    for row in ("srow_x", "srow_y", "srow_z"):
        header[row] = 0
    header["pixdim"][1:4] = 0


def _nan_forms(header):
    header["srow_x"][0] = np.nan
    header["pixdim"][1] = np.nan


def _dicom_folder(folder: Path) -> Path:
    import pydicom

    source = Path(pydicom.__file__).parent / "data" / "test_files" / "dicomdirtests" / "98892001" / "CT5N"
    shutil.copytree(source, folder)
    return folder


# Each case: (id, build(tmp) -> (args after "segment", fragments of the message)). The model is added
# unless the case gives its own. Paths are relative to tmp (the working directory).
def _case_same_file(tmp):
    return ["scan.nii.gz", "-o", "scan.nii.gz"], ["scan.nii.gz", "would overwrite the input"]


def _case_dot_path(tmp):
    (tmp / "sub").mkdir()
    return ["./scan.nii.gz", "-o", "./sub/../scan.nii.gz"], ["would overwrite the input"]


def _case_symlink(tmp):
    (tmp / "link.nii.gz").symlink_to(tmp / "scan.nii.gz")
    return ["scan.nii.gz", "-o", "link.nii.gz"], ["link.nii.gz", "would overwrite the input"]


def _case_hard_link(tmp):
    os.link(tmp / "scan.nii.gz", tmp / "hard.nii.gz")
    return ["scan.nii.gz", "-o", "hard.nii.gz"], ["hard.nii.gz", "would overwrite the input"]


def _case_inside_dicom_folder(tmp):
    _dicom_folder(tmp / "series")
    return ["series", "-o", "series/mask.nii.gz"], ["series/mask.nii.gz", "inside the input folder"]


def _case_output_is_label(tmp):
    return ["scan.nii.gz", "-o", "ref.nii.gz", "-l", "ref.nii.gz"], ["ref.nii.gz", "would overwrite the input"]


def _case_all_nan(tmp):
    _save(tmp / "nan.nii.gz", np.full((8, 8, 4), np.nan, dtype=np.float32))
    return ["nan.nii.gz", "-o", "out.nii.gz"], ["nan.nii.gz", "no finite voxel"]


def _case_all_inf(tmp):
    data = np.full((8, 8, 4), np.inf, dtype=np.float32)
    data[0] = -np.inf
    _save(tmp / "inf.nii.gz", data)
    return ["inf.nii.gz", "-o", "out.nii.gz"], ["inf.nii.gz", "no finite voxel"]


def _case_zero_length_axis(tmp):
    _save_with_header(tmp / "flat.nii.gz", np.zeros((8, 0, 4), dtype=np.int16), lambda h: None)
    return ["flat.nii.gz", "-o", "out.nii.gz"], ["flat.nii.gz", "zero-length axis"]


def _case_singular_affine(tmp):
    _save_with_header(tmp / "singular.nii.gz", np.zeros((8, 8, 4), dtype=np.int16), _zero_forms)
    return ["singular.nii.gz", "-o", "out.nii.gz"], ["singular.nii.gz", "no usable affine"]


def _case_nan_affine(tmp):
    _save_with_header(tmp / "nanaffine.nii.gz", np.zeros((8, 8, 4), dtype=np.int16), _nan_forms)
    return ["nanaffine.nii.gz", "-o", "out.nii.gz"], ["nanaffine.nii.gz", "no usable affine"]


def _case_missing(tmp):
    return ["nope.nii.gz", "-o", "out.nii.gz"], ["nope.nii.gz", "no such file"]


def _case_empty_file(tmp):
    (tmp / "empty.nii.gz").write_bytes(b"")
    return ["empty.nii.gz", "-o", "out.nii.gz"], ["empty.nii.gz", "not a readable NIfTI"]


def _case_truncated(tmp):
    data = (tmp / "scan.nii.gz").read_bytes()
    (tmp / "cut.nii.gz").write_bytes(data[: len(data) // 2])
    return ["cut.nii.gz", "-o", "out.nii.gz"], ["cut.nii.gz"]


def _case_corrupt(tmp):
    (tmp / "junk.nii.gz").write_bytes(gzip.compress(b"not a nifti header" * 30))
    return ["junk.nii.gz", "-o", "out.nii.gz"], ["junk.nii.gz", "not a readable NIfTI"]


def _case_2d(tmp):
    _save(tmp / "flat2d.nii.gz", np.zeros((8, 8), dtype=np.int16))
    return ["flat2d.nii.gz", "-o", "out.nii.gz"], ["flat2d.nii.gz", "2D image"]


def _case_5d(tmp):
    _save(tmp / "five.nii.gz", np.zeros((8, 8, 4, 1, 2), dtype=np.int16))
    return ["five.nii.gz", "-o", "out.nii.gz"], ["five.nii.gz", "5D image"]


def _case_4d(tmp):
    _save(tmp / "four.nii.gz", np.zeros((8, 8, 4, 3), dtype=np.int16))
    return ["four.nii.gz", "-o", "out.nii.gz"], ["four.nii.gz", "4D image with 3 volumes"]


def _case_unknown_organ(tmp):
    return ["scan.nii.gz", "-o", "out.nii.gz", "--organs", "brain"], ["unknown organ 'brain'"]


def _case_bad_model(tmp):
    (tmp / "notamodel").mkdir()
    return ["scan.nii.gz", "-o", "out.nii.gz", "-m", "notamodel"], ["notamodel", "not an SDSeg model folder"]


def _case_unwritable_output(tmp):
    return ["scan.nii.gz", "-o", "missing/out.nii.gz"], ["missing/out.nii.gz", "folder does not exist"]


def _case_label_nan(tmp):
    _, labels, affine = labelled_scan()
    bad = labels.astype(np.float32)
    bad[0, 0, 0] = np.nan
    _save(tmp / "nanref.nii.gz", bad, affine)
    return ["scan.nii.gz", "-o", "out.nii.gz", "-l", "nanref.nii.gz"], ["nanref.nii.gz", "NaN or Inf"]


def _case_bad_device(tmp):
    return ["scan.nii.gz", "-o", "out.nii.gz", "-d", "gpu"], ["device must be auto, cpu, cuda or cuda:N", "'gpu'"]


def _case_bad_device_index(tmp):
    return ["scan.nii.gz", "-o", "out.nii.gz", "-d", "cuda:abc"], ["device must be auto, cpu, cuda or cuda:N"]


def _bad_config_model(tmp, name, **changes) -> str:
    from conftest import micro_config

    config = json.loads(micro_config(organs=("spleen", "liver")).to_json_string())
    config["latent_scale"] = 1.0
    for key, value in changes.items():
        section, _, field = key.partition("__")
        config[section][field] = value
    (tmp / name).mkdir()
    (tmp / name / "config.json").write_text(json.dumps(config), encoding="utf-8")
    (tmp / name / "model.safetensors").write_bytes(b"")
    return name


def _case_config_bad_window(tmp):
    model = _bad_config_model(tmp, "badwindow", preprocessing__hu_window=["a", 1])
    return ["scan.nii.gz", "-o", "out.nii.gz", "-m", model], ["badwindow/config.json", "invalid SDSeg config"]


def _case_config_bad_orientation(tmp):
    model = _bad_config_model(tmp, "badaxes", preprocessing__orientation="XYZ")
    return ["scan.nii.gz", "-o", "out.nii.gz", "-m", model], ["badaxes/config.json", "orientation must be three axis codes"]


def _case_float64_beyond_float32(tmp):
    _save(tmp / "huge.nii.gz", np.full((8, 8, 4), 1e300))
    return ["huge.nii.gz", "-o", "out.nii.gz"], ["huge.nii.gz", "no finite voxel"]


def _case_complex_voxels(tmp):
    _save(tmp / "complex.nii.gz", np.zeros((8, 8, 4), dtype=np.complex64))
    return ["complex.nii.gz", "-o", "out.nii.gz"], ["complex.nii.gz", "unsupported voxel type complex64"]


def _case_rgb_voxels(tmp):
    rgb = np.zeros((8, 8, 4), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    _save(tmp / "rgb.nii.gz", rgb)
    return ["rgb.nii.gz", "-o", "out.nii.gz"], ["rgb.nii.gz", "unsupported voxel type"]


def _case_label_beyond_int16(tmp):
    _, labels, affine = labelled_scan()
    wide = labels.astype(np.uint16)
    wide[0, 0, 0] = 40000  # would wrap to -25536 as int16
    _save(tmp / "wide.nii.gz", wide, affine)
    return ["scan.nii.gz", "-o", "out.nii.gz", "-l", "wide.nii.gz"], ["wide.nii.gz", "outside -32768..32767"]


def _case_label_on_another_grid(tmp):
    _, labels, affine = labelled_scan()
    _save(tmp / "flipped.nii.gz", labels, np.diag([-1.0, 1.0, 1.0, 1.0]) @ affine)
    return ["scan.nii.gz", "-o", "out.nii.gz", "-l", "flipped.nii.gz"], ["flipped.nii.gz", "not on the same voxel grid"]


def _case_organ_twice(tmp):
    return ["scan.nii.gz", "-o", "out.nii.gz", "--organs", "liver,spleen,liver"], ["organ named more than once: liver"]


def _case_seed_beyond_torch(tmp):
    return ["scan.nii.gz", "-o", "out.nii.gz", "--seed", str(2**64)], ["segment: Invalid value for '--seed'", "(see sdseg3d segment -h)"]


def _case_batch_size_zero(tmp):
    return ["scan.nii.gz", "-o", "out.nii.gz", "-b", "0"], ["segment: Invalid value for '--batch-size'"]


def _case_sidecar_is_a_folder(tmp):
    (tmp / "mask.json").mkdir()
    return ["scan.nii.gz", "-o", "mask.nii.gz"], ["mask.json", "is a folder"]


BAD_INPUTS = {name[len("_case_"):]: fn for name, fn in globals().items() if name.startswith("_case_")}


def _snapshot(folder: Path) -> dict:
    """Every file under ``folder`` (links as links) with its bytes."""
    out = {}
    for path in sorted(folder.rglob("*")):
        if path.is_symlink():
            out[str(path.relative_to(folder))] = ("link", os.readlink(path))
        elif path.is_file():
            out[str(path.relative_to(folder))] = path.read_bytes()
    return out


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_refused_and_nothing_is_touched(case, model_dir, tmp_path, monkeypatch, capfd):
    image, labels, affine = labelled_scan()
    _save(tmp_path / "scan.nii.gz", image.astype(np.int16), affine)
    _save(tmp_path / "ref.nii.gz", labels, affine)
    args, fragments = BAD_INPUTS[case](tmp_path)
    if "-m" not in args:
        args += ["-m", str(model_dir)]
    before = _snapshot(tmp_path)
    monkeypatch.chdir(tmp_path)
    capfd.readouterr()
    code = main(["segment", *args, "-q"])
    err = capfd.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("sdseg3d: error: ") and "\n" not in err and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, err
    assert _snapshot(tmp_path) == before  # no input changed, nothing written, no temporary left


def test_refusal_through_the_console_script_is_one_line(model_dir, tmp_path):
    """The same guarantee end to end in a fresh process (no test-runner capture or warning filters)."""
    image, _, affine = labelled_scan()
    scan = _save(tmp_path / "scan.nii.gz", image.astype(np.int16), affine)
    _save_with_header(tmp_path / "singular.nii.gz", np.zeros((8, 8, 4), dtype=np.int16), _zero_forms)
    before = _snapshot(tmp_path)
    for args, fragment in [([scan, "-o", scan], "would overwrite the input"), ([tmp_path / "singular.nii.gz", "-o", tmp_path / "o.nii.gz"], "no usable affine")]:
        result = subprocess.run([sys.executable, "-m", "sdseg_monai.cli", "segment", *map(str, args), "-m", str(model_dir)],
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 2 and result.stderr.count("\n") == 1 and fragment in result.stderr, result.stderr
    assert _snapshot(tmp_path) == before


def test_sform_unusable_but_qform_usable_is_read_with_the_qform(tmp_path):
    from sdseg_monai.data import read_volume

    def sform_zero_qform_set(header):
        for row in ("srow_x", "srow_y", "srow_z"):
            header[row] = 0
        header.set_qform(np.diag([2.0, 2.0, 3.0, 1.0]), code=1)

    path = _save_with_header(tmp_path / "q.nii.gz", np.zeros((6, 5, 4), dtype=np.int16), sform_zero_qform_set)
    assert nib.load(str(path)).header["sform_code"] > 0  # nibabel alone would use the zero sform
    assert np.allclose(read_volume(path).affine, np.diag([2.0, 2.0, 3.0, 1.0]))


@pytest.mark.parametrize("bad_row", [np.nan, 0.0], ids=["nan", "singular"])
def test_labels_of_a_file_read_by_its_qform_are_placed_by_it(model_dir, tmp_path, bad_row):
    """A coded sform the reader skipped (NaN: nibabel cannot even write it back; singular) goes into
    the labels uncoded, so every reader places them by the qform, as the input was read (before: an
    internal error after all the computing, or labels placed by the singular sform)."""
    qform = np.diag([2.0, 2.0, 3.0, 1.0])

    def broken_sform(header):
        header.set_qform(qform, code=1)
        header["sform_code"] = 1
        header["srow_x"], header["srow_y"], header["srow_z"] = [bad_row, 0, 0, 0], [0, 2, 0, 0], [0, 0, 3, 0]

    scan = _save_with_header(tmp_path / "q.nii.gz", labelled_scan()[0].astype(np.int16), broken_sform)
    assert main(["segment", str(scan), "-o", str(tmp_path / "mask.nii.gz"), "-m", str(model_dir), "-q"]) == 0
    header = nib.load(str(tmp_path / "mask.nii.gz")).header
    assert header["sform_code"] == 0 and header["qform_code"] == 1
    assert np.allclose(header.get_best_affine(), qform)


def test_partial_nan_volume_segments_as_window_bottom_and_is_counted(model_dir, tmp_path):
    image, _, affine = labelled_scan()
    image = image.astype(np.float32)
    image[2:5, 2:4, 1] = np.nan
    image[10, 10, 2] = np.inf
    image[11, 11, 3] = -np.inf
    filled = np.where(np.isfinite(image), image, np.float32(HU_WINDOW[0]))
    _save(tmp_path / "holes.nii.gz", image, affine)
    _save(tmp_path / "filled.nii.gz", filled, affine)
    for name in ("holes", "filled"):
        assert main(["segment", str(tmp_path / f"{name}.nii.gz"), "-o", str(tmp_path / f"{name}_mask.nii.gz"), "-m", str(model_dir), "-q"]) == 0
    holes = np.asanyarray(nib.load(str(tmp_path / "holes_mask.nii.gz")).dataobj)
    filled_labels = np.asanyarray(nib.load(str(tmp_path / "filled_mask.nii.gz")).dataobj)
    assert np.array_equal(holes, filled_labels)  # NaN/Inf voxels are exactly the bottom of the window
    assert json.loads((tmp_path / "holes_mask.json").read_text())["nonfinite_input_voxels"] == 3 * 2 + 2
    assert json.loads((tmp_path / "filled_mask.json").read_text())["nonfinite_input_voxels"] == 0


# Runs `sdseg3d segment` with nibabel's save slowed down after the bytes are written: the test
# kills the process while the result sits, complete, in its temporary file, before the rename.
_SLOW_WRITER = """
import sys, time, pathlib, nibabel
real_save = nibabel.save
def slow_save(image, path):
    real_save(image, path)
    pathlib.Path(sys.argv[1]).write_text(str(path))
    time.sleep(120)
nibabel.save = slow_save
from sdseg_monai.cli import main
from sdseg_monai.errors import SDSegInputError
sys.exit(main(sys.argv[2:]))
"""


def _wait_for(path: Path, process, seconds: float = 240.0) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "the writer never started"
        time.sleep(0.05)


def test_sigkill_during_the_write_leaves_the_old_output_or_none(model_dir, tmp_path):
    image, _, affine = labelled_scan()
    scan = _save(tmp_path / "scan.nii.gz", image.astype(np.int16), affine)
    scan_bytes = scan.read_bytes()
    for previous in (None, b"previous result"):
        out = tmp_path / "mask.nii.gz"
        out.unlink(missing_ok=True)
        if previous is not None:
            out.write_bytes(previous)
        marker = tmp_path / "writing"
        marker.unlink(missing_ok=True)
        process = subprocess.Popen(
            [sys.executable, "-c", _SLOW_WRITER, str(marker), "segment", str(scan), "-o", str(out), "-m", str(model_dir), "-q"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        try:
            _wait_for(marker, process)
            temporary = Path(marker.read_text())
            assert temporary.parent == tmp_path and temporary.name.startswith(".mask.nii.gz.") and temporary.stat().st_size > 0
            process.send_signal(signal.SIGKILL)
        finally:
            process.kill()
            process.wait(timeout=60)
        assert process.returncode == -signal.SIGKILL
        if previous is None:
            assert not out.exists()
        else:
            assert out.read_bytes() == previous
        assert scan.read_bytes() == scan_bytes
    # Uninterrupted, the same command replaces the old output whole.
    assert main(["segment", str(scan), "-o", str(out), "-m", str(model_dir), "-q"]) == 0
    assert nib.load(str(out)).get_fdata().shape == image.shape


def test_sigkill_at_any_moment_leaves_output_absent_or_complete(model_dir, tmp_path):
    image, _, affine = labelled_scan()
    scan = _save(tmp_path / "scan.nii.gz", image.astype(np.int16), affine)
    out = tmp_path / "mask.nii.gz"
    for delay in (1.0, 3.0, 6.0):
        out.unlink(missing_ok=True)
        process = subprocess.Popen([sys.executable, "-m", "sdseg_monai.cli", "segment", str(scan), "-o", str(out), "-m", str(model_dir), "-q"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        process.kill()
        process.wait(timeout=60)
        if out.exists():
            written = nib.load(str(out))
            assert written.shape == image.shape and np.asanyarray(written.dataobj).shape == image.shape


def test_model_outputs_never_replace_an_input_or_a_folder_holding_other_work(model_dir, tmp_path, monkeypatch, capfd):
    """calibrate, export-bundle and train-autoencoder replace their output folder whole: never a folder
    above an input (the model's run folder, the data root) nor one that holds no saved model."""
    from sdseg_monai.bundle import export_bundle
    from sdseg_monai.model import check_output_folder, replace_dir

    run = tmp_path / "run"
    shutil.copytree(model_dir, run / "model")
    (run / "checkpoint.pt").write_bytes(b"weeks of training")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    before = _snapshot(tmp_path)
    with pytest.raises(SDSegInputError, match="would replace the input"):
        export_bundle(run / "model", run)  # the folder above the model
    with pytest.raises(SDSegInputError, match="holds no saved model"):
        export_bundle(run / "model", tmp_path / "notes")
    with pytest.raises(SDSegInputError, match="would replace the input"):
        replace_dir(tmp_path / "anything", run, run / "model")  # the last guard, whoever calls it
    monkeypatch.chdir(tmp_path)
    for args in (
        ["calibrate", "-m", "run/model", "-o", "run", "--manifest", "m.json", "--data-root", "."],
        ["calibrate", "-m", "run/model", "-o", "notes", "--manifest", "m.json", "--data-root", "."],
        ["train-autoencoder", "-o", "run", "--volume", "run/model/config.json:run/model/config.json"],
    ):
        capfd.readouterr()
        assert main(args) == 2
        err = capfd.readouterr().err.strip()
        assert err.startswith("sdseg3d: error: ") and "\n" not in err and ("run" in err or "notes" in err), err
    assert _snapshot(tmp_path) == before
    # Control: a new folder, an empty one and an earlier model output are fine.
    (tmp_path / "empty").mkdir()
    for target in (tmp_path / "new", tmp_path / "empty", run / "model"):
        assert check_output_folder(target, tmp_path / "scan.nii.gz") == target
    written = export_bundle(run / "model", tmp_path / "bundle")
    assert export_bundle(run / "model", written) == written  # a bundle replaces its earlier self


def test_saving_a_segmentation_over_its_input_through_the_api_is_refused(model_dir, tmp_path):
    from sdseg_monai.inference import VolumeSegmenter

    image, _, affine = labelled_scan()
    scan = _save(tmp_path / "scan.nii.gz", image.astype(np.int16), affine)
    before = scan.read_bytes()
    result = VolumeSegmenter(model_dir, device="cpu").segment(scan)
    with pytest.raises(SDSegInputError, match="would overwrite the input"):
        result.save(scan)
    assert scan.read_bytes() == before
    result.save(tmp_path / "mask.nii.gz")  # control


def test_uncoded_input_gives_uncoded_output_on_the_same_grid(model_dir, tmp_path):
    """Neither qform nor sform coded: the label map stays uncoded too, so that ITK and Slicer (which
    then use the voxel sizes) place it where they place the input, and nibabel reads the same affine."""
    from sdseg_monai.inference import VolumeSegmenter

    image, _, _ = labelled_scan()

    def uncoded(header):
        header.set_qform(None, code=0)
        header.set_sform(None, code=0)

    scan = _save_with_header(tmp_path / "scan.nii.gz", image.astype(np.int16), uncoded)
    assert (int(nib.load(str(scan)).header["qform_code"]), int(nib.load(str(scan)).header["sform_code"])) == (0, 0)
    out, _ = VolumeSegmenter(model_dir, device="cpu").segment(scan).save(tmp_path / "mask.nii.gz")
    written = nib.load(str(out))
    assert (int(written.header["qform_code"]), int(written.header["sform_code"])) == (0, 0)
    assert np.allclose(written.header["pixdim"][1:4], nib.load(str(scan)).header["pixdim"][1:4])
    assert np.allclose(written.affine, nib.load(str(scan)).affine)


def test_usage_errors_through_the_console_script_are_one_line(tmp_path):
    for args, fragment in [(["segment", "x.nii.gz", "-o", "y.nii.gz", "-b", "0"], "Invalid value for '--batch-size'"),
                           (["bogus"], "No such command 'bogus'"), (["organs", "--bogus"], "No such option: --bogus")]:
        result = subprocess.run([sys.executable, "-m", "sdseg_monai.cli", *args], capture_output=True, text=True, timeout=120, cwd=tmp_path)
        assert result.returncode == 2 and result.stderr.startswith("sdseg3d: error: ") and result.stderr.count("\n") == 1, result.stderr
        assert fragment in result.stderr and "╭" not in result.stderr
    assert not list(tmp_path.iterdir())


def test_nifti2_in_nifti2_out_and_a_big_endian_array_segments_as_native(model_dir, tmp_path, recwarn):
    from sdseg_monai.inference import VolumeSegmenter

    image, _, affine = labelled_scan()
    scan = tmp_path / "scan2.nii.gz"
    nifti2 = nib.Nifti2Image(image.astype(np.int16), affine)
    nifti2.header["cal_min"], nifti2.header["cal_max"] = -175, 250
    nib.save(nifti2, str(scan))
    segmenter = VolumeSegmenter(model_dir, device="cpu")
    out, _ = segmenter.segment(scan).save(tmp_path / "mask.nii.gz")
    written = nib.load(str(out))
    assert isinstance(written, nib.Nifti2Image) and int(written.header["sizeof_hdr"]) == 540
    assert float(written.header["cal_max"]) == 0.0  # the CT's display window is not the labels'
    assert not [w for w in recwarn if "sizeof_hdr" in str(w.message)]
    native = segmenter.segment_array(image.astype(np.float32), affine).labels
    swapped = segmenter.segment_array(image.astype(">f4"), affine).labels
    assert np.array_equal(native, swapped)
    with pytest.raises(SDSegInputError, match="unsupported voxel type complex64"):
        segmenter.segment_array(image.astype(np.complex64), affine)


def test_an_internal_error_exits_1_in_one_line_and_debug_raises_it(monkeypatch, capfd):
    """Our own bug (not bad input) is never a silent success: exit 1, one line, the way to a traceback."""
    import sdseg_monai.labels

    def broken(*args, **kwargs):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(sdseg_monai.labels, "dataset_preset", broken)
    monkeypatch.delenv("SDSEG3D_DEBUG", raising=False)
    capfd.readouterr()
    assert main(["organs"]) == 1
    err = capfd.readouterr().err
    assert err == "sdseg3d: internal error: RuntimeError: boom second line (set SDSEG3D_DEBUG=1 for a traceback)\n", err
    monkeypatch.setenv("SDSEG3D_DEBUG", "1")
    with pytest.raises(RuntimeError, match="boom"):
        main(["organs"])
    # click turns an EOFError (a truncated stream) inside a command into Abort: still ours, not a Ctrl-C.
    monkeypatch.delenv("SDSEG3D_DEBUG")

    def truncated(*args, **kwargs):
        raise EOFError("Ran out of input")

    monkeypatch.setattr(sdseg_monai.labels, "dataset_preset", truncated)
    capfd.readouterr()
    assert main(["organs"]) == 1
    err = capfd.readouterr().err  # click writes an empty line before it converts the EOFError
    assert err.strip() == "sdseg3d: internal error: EOFError: Ran out of input (set SDSEG3D_DEBUG=1 for a traceback)"

    def interrupted(*args, **kwargs):  # control: a real Ctrl-C stays an interruption
        raise KeyboardInterrupt

    monkeypatch.setattr(sdseg_monai.labels, "dataset_preset", interrupted)
    assert main(["organs"]) == 130 and capfd.readouterr().err.strip() == "sdseg3d: interrupted"


# -- outputs never land on, in or over an input ---------------------------------------------------------
def _scan_and_labels(folder: Path) -> tuple[Path, Path]:
    image, labels, affine = labelled_scan()
    return _save(folder / "scan.nii.gz", image.astype(np.int16), affine), _save(folder / "ref.nii.gz", labels, affine)


def _refused(capfd, argv: list[str], *fragments: str) -> None:
    """``sdseg3d argv`` exits 2 with one line holding every fragment."""
    capfd.readouterr()
    code = main(argv)
    err = capfd.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("sdseg3d: error: ") and "\n" not in err and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, err


def _toy_manifest(path: Path, image: str, label: str) -> Path:
    path.write_text(json.dumps({
        "schema_version": 1, "name": "toy", "labels": {"1": "spleen", "6": "liver"},
        "splits": {"train": ["b"], "test": ["a"]}, "cases": {case: {"image": image, "label": label} for case in "ab"},
    }), encoding="utf-8")
    return path


def test_a_report_path_never_overwrites_an_input_nor_lies_in_an_input_folder(model_dir, tmp_path, monkeypatch, capfd):
    """stability --json and bench --json/--markdown wrote over the scan, the manifest or a label map
    (after all the compute); now refused first, as segment's -o is, and by the API writers too."""
    from sdseg_monai.bench import BenchReport, write_report
    from sdseg_monai.stability import MetricSettings, OrganStability, StabilityReport

    scan, ref = _scan_and_labels(tmp_path)
    _dicom_folder(tmp_path / "series")
    manifest = _toy_manifest(tmp_path / "m.json", "scan.nii.gz", "ref.nii.gz")
    shutil.copytree(model_dir, tmp_path / "model")
    (tmp_path / "link.nii.gz").symlink_to(scan)
    os.link(scan, tmp_path / "hard.nii.gz")
    monkeypatch.chdir(tmp_path)
    before = _snapshot(tmp_path)
    stability = ["stability", "-m", "model", "--seeds", "2", "-d", "cpu", "-q"]
    for argv, fragments in [
        (["scan.nii.gz", "--json", "scan.nii.gz"], ["scan.nii.gz: output would overwrite the input scan.nii.gz"]),
        (["scan.nii.gz", "--json", "./sub/../scan.nii.gz"], ["would overwrite the input scan.nii.gz"]),
        (["scan.nii.gz", "--json", "link.nii.gz"], ["link.nii.gz", "would overwrite the input"]),
        (["scan.nii.gz", "--json", "hard.nii.gz"], ["hard.nii.gz", "would overwrite the input"]),
        (["series", "--json", "series/report.json"], ["series/report.json", "inside the input folder series"]),
        (["scan.nii.gz", "--json", "model/report.json"], ["model/report.json", "inside the input folder model"]),
        (["--manifest", "m.json", "--data-root", ".", "--json", "m.json"], ["would overwrite the input m.json"]),
        (["--manifest", "m.json", "--data-root", ".", "--json", "ref.nii.gz"], ["would overwrite the input ref.nii.gz"]),
    ]:
        (tmp_path / "sub").mkdir(exist_ok=True)
        _refused(capfd, [*stability, *argv], *fragments)
    bench = ["bench", "--quick", "-d", "cpu", "-q", "--networks", "model"]
    _refused(capfd, [*bench, "--real-ct", "scan.nii.gz", "--json", "scan.nii.gz"], "would overwrite the input scan.nii.gz")
    _refused(capfd, [*bench, "--markdown", "model/bench.md"], "model/bench.md", "inside the input folder model")
    (tmp_path / "sub").rmdir()
    assert _snapshot(tmp_path) == before

    # The API writers hold the same rule: each report knows what its run read.
    settings = MetricSettings.for_size(32)
    report = StabilityReport(model="model", precision="fp32", seeds=[0, 1], inputs={}, cases=[], settings=settings, empty_below=0.5,
                             organs=[], overall=OrganStability("all organs", None), sources=[scan, "model"])
    with pytest.raises(SDSegInputError, match="would overwrite the input"):
        report.write_json(tmp_path / "link.nii.gz")
    bench_report = BenchReport(options={"networks": ["model"], "real_ct": str(scan)}, machine={}, versions={}, matmul={})
    with pytest.raises(SDSegInputError, match="inside the input folder model"):
        write_report(bench_report, tmp_path / "model" / "bench.json")
    assert _snapshot(tmp_path) == before
    # Control: a report beside the inputs, or in the data root, is written.
    assert report.write_json(tmp_path / "stability.json").is_file()
    assert write_report(bench_report, tmp_path / "bench.json") == [tmp_path / "bench.json"]


def test_segment_never_writes_into_the_model_folder(model_dir, tmp_path, monkeypatch, capfd):
    """-o MODEL/config.nii.gz wrote its sidecar, config.json, over the model's own after segmenting.
    Refused first, by the command and by segment_file."""
    from sdseg_monai.inference import segment_file

    scan, _ = _scan_and_labels(tmp_path)
    model = shutil.copytree(model_dir, tmp_path / "model")
    monkeypatch.chdir(tmp_path)
    before = _snapshot(tmp_path)
    _refused(capfd, ["segment", "scan.nii.gz", "-o", "model/config.nii.gz", "-m", "model", "-d", "cpu", "-q"],
             "model/config.nii.gz: output lies inside the input folder model")
    with pytest.raises(SDSegInputError, match="inside the input folder"):
        segment_file(scan, model / "mask.nii.gz", model, device="cpu")
    loaded = SDSeg.from_pretrained(model)  # a loaded model knows its folder
    assert loaded.name_or_path == str(model)
    with pytest.raises(SDSegInputError, match="inside the input folder"):
        segment_file(scan, model / "mask.nii.gz", loaded, device="cpu")
    with pytest.raises(SDSegInputError, match="inside the input folder"):
        VolumeSegmenter(loaded, device="cpu").segment(scan).save(model / "mask.nii.gz")
    assert _snapshot(tmp_path) == before
    # Control: beside the model folder is fine.
    assert main(["segment", "scan.nii.gz", "-o", "mask.nii.gz", "-m", "model", "-d", "cpu", "-q"]) == 0
    assert (tmp_path / "mask.json").is_file() and _snapshot(model) == _snapshot(Path(model_dir))


def test_report_and_run_folders_never_hold_an_input(model_dir, tmp_path, monkeypatch, capfd, micro_model):
    """evaluate -o and train -o wrote into a folder holding the manifest (report.json over it) or the
    model trained from (--init-from RUN/model: RUN/model replaced by the new weights)."""
    from sdseg_monai.model import check_output_folder
    from sdseg_monai.training import TrainSettings, train_sdseg

    data = tmp_path / "data"
    (data / "img").mkdir(parents=True)
    scan, ref = _scan_and_labels(data / "img")
    manifest = _toy_manifest(tmp_path / "m.json", "img/scan.nii.gz", "img/ref.nii.gz")
    (tmp_path / "out").mkdir()
    shutil.copy(manifest, tmp_path / "out" / "report.json")  # a manifest where evaluate writes report.json
    shutil.copytree(model_dir, tmp_path / "run" / "model")
    monkeypatch.chdir(tmp_path)
    before = _snapshot(tmp_path)
    evaluate = ["evaluate", "-m", "run/model", "--data-root", "data", "--split", "test", "-d", "cpu", "-q"]
    # evaluate writes two files into its folder: they may not be an input nor go into the model folder.
    _refused(capfd, [*evaluate, "--manifest", "out/report.json", "-o", "out"], "out/report.json: output would overwrite the input out/report.json")
    _refused(capfd, [*evaluate, "--manifest", "m.json", "-o", "run/model"], "inside the input folder run/model")
    _refused(capfd, [*evaluate, "--manifest", "m.json", "-o", "run/model/eval"], "inside the input folder run/model")
    train = ["train", "--steps", "1", "--validate-every", "0", "-d", "cpu", "-q"]
    _refused(capfd, [*train, "-o", "run", "--init-from", "run/model", "--manifest", "m.json", "--data-root", "data"],
             "run: output folder would replace the input run/model")
    _refused(capfd, [*train, "-o", "data", "--manifest", "m.json", "--data-root", "data"], "would replace the input data")
    _refused(capfd, [*train, "-o", "data/img", "--volume", "data/img/scan.nii.gz:data/img/ref.nii.gz"], "would replace the input data/img/scan.nii.gz")
    _refused(capfd, [*train, "-o", "run/model/sub", "--init-from", "run/model", "--volume", "data/img/scan.nii.gz:data/img/ref.nii.gz"],
             "inside the input folder run/model")
    _refused(capfd, ["train-autoencoder", "-o", "data", "--manifest", "m.json", "--data-root", "data"], "would replace the input data")
    with pytest.raises(SDSegInputError, match="would replace the input"):
        train_sdseg(micro_model, [(scan, ref)], data / "img", TrainSettings(steps=1), device="cpu")  # the API too
    with pytest.raises(SDSegInputError, match="inside the input folder"):
        check_output_folder(tmp_path / "run" / "model" / "calibrated", tmp_path / "run" / "model")
    assert _snapshot(tmp_path) == before and not (tmp_path / "run" / "model" / "eval").exists()
    # Control: a new folder beside the inputs, or one inside the data root, is accepted.
    from sdseg_monai.evaluation import evaluation_sources, prepare_output_dir
    from sdseg_monai.training import check_run_folder

    files = [("a", scan, ref)]
    sources = evaluation_sources(manifest, files, "run/model")
    assert prepare_output_dir(data / "reports", sources, roots=[data]) == data / "reports"
    # A report folder holding inputs is fine: its two files are new names there (the working folder, the run folder).
    for folder in (tmp_path, tmp_path / "run", data, data / "img"):
        assert prepare_output_dir(folder, sources, roots=[data]) == folder
    assert check_run_folder(tmp_path / "run2", [(scan, ref)], [manifest, "run/model"], roots=[data]) == tmp_path / "run2"
    assert check_output_folder(data / "ae", manifest, scan, ref, roots=[data]) == data / "ae"


def test_a_store_folder_never_is_nor_holds_nor_lies_in_the_model_folder(model_dir, tmp_path):
    from sdseg_monai.node import DicomNode

    model = shutil.copytree(model_dir, tmp_path / "site" / "model")
    before = _snapshot(tmp_path)
    for store, fragment in [(model, "would replace the input"), (tmp_path / "site", "would replace the input"),
                            (model / "node", "inside the input folder")]:
        with pytest.raises(SDSegInputError, match=fragment):
            DicomNode(model, store, port=0, device="cpu")
    assert _snapshot(tmp_path) == before and sorted(p.name for p in model.iterdir()) == ["config.json", "model.safetensors"]
    node = DicomNode(model, tmp_path / "store", port=0, device="cpu")  # control
    assert node.incoming.is_dir()


def test_a_failed_rename_in_a_multi_file_write_restores_the_files_renamed_before_it(tmp_path, monkeypatch):
    """label map and sidecar are all or nothing: the label map renamed, the sidecar's rename failing,
    left a new label map beside the old sidecar (or a label map alone)."""
    from sdseg_monai.data import atomic_paths

    real_replace = os.replace

    def second_fails(calls):
        def replace(src, dst):
            calls.append(Path(dst))
            if len(calls) == 2:
                raise OSError("disk full")
            return real_replace(src, dst)
        return replace

    (tmp_path / "elsewhere.txt").write_text("the link's target")
    layouts = {"existing": {"a.nii.gz": "old a", "a.json": "old json"}, "new": {}, "symlink": {"a.nii.gz": ("link", "elsewhere.txt")}}
    for name, layout in layouts.items():
        folder = tmp_path / name
        folder.mkdir()
        for file, content in layout.items():
            if isinstance(content, tuple):
                (folder / file).symlink_to(tmp_path / content[1])
            else:
                (folder / file).write_text(content)
        before = _snapshot(folder)
        calls = []
        monkeypatch.setattr(os, "replace", second_fails(calls))
        with pytest.raises(OSError, match="disk full"):
            with atomic_paths(folder / "a.nii.gz", folder / "a.json") as (image, side):
                image.write_text("new a")
                side.write_text("new json")
        monkeypatch.setattr(os, "replace", real_replace)
        assert calls[:2] == [folder / "a.nii.gz", folder / "a.json"]  # then the undoing
        assert _snapshot(folder) == before, name  # restored (or removed), no temporary nor backup left
    assert (tmp_path / "elsewhere.txt").read_text() == "the link's target"
    # Control: without a failure both are replaced, and nothing else is left.
    with atomic_paths(tmp_path / "existing" / "a.nii.gz", tmp_path / "existing" / "a.json") as (image, side):
        image.write_text("new a")
        side.write_text("new json")
    assert _snapshot(tmp_path / "existing") == {"a.json": b"new json", "a.nii.gz": b"new a"}


@pytest.mark.parametrize("interrupted_after", [1, 2])
def test_an_interrupt_right_after_a_rename_leaves_the_old_pair_or_the_new_pair(tmp_path, monkeypatch, interrupted_after):
    """SIGTERM (KeyboardInterrupt) arriving as a rename returns: after the first, the pair is put back
    as it was; after the last, the write is whole. Never one file new and the other old."""
    from sdseg_monai.data import atomic_paths

    real_replace = os.replace
    calls = []

    def replace(src, dst):
        real_replace(src, dst)
        calls.append(dst)
        if len(calls) == interrupted_after:
            raise KeyboardInterrupt

    (tmp_path / "a.nii.gz").write_text("old a")
    (tmp_path / "a.json").write_text("old json")
    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        with atomic_paths(tmp_path / "a.nii.gz", tmp_path / "a.json") as (image, side):
            image.write_text("new a")
            side.write_text("new json")
    monkeypatch.setattr(os, "replace", real_replace)
    expected = {"a.nii.gz": b"old a", "a.json": b"old json"} if interrupted_after == 1 else {"a.nii.gz": b"new a", "a.json": b"new json"}
    assert _snapshot(tmp_path) == expected


def test_a_file_that_cannot_be_backed_up_is_still_replaced(tmp_path, monkeypatch):
    """Another user's unreadable output in a shared folder: replacing it needs only the folder, as
    before the all-or-nothing backup; neither a hard link nor a copy of it can be made."""
    import shutil as shutil_module

    from sdseg_monai.data import atomic_paths

    def refused(*args, **kwargs):
        raise PermissionError("permission denied")

    (tmp_path / "a.nii.gz").write_text("old a")
    monkeypatch.setattr(os, "link", refused)
    monkeypatch.setattr(shutil_module, "copy2", refused)
    with atomic_paths(tmp_path / "a.nii.gz", tmp_path / "a.json") as (image, side):
        image.write_text("new a")
        side.write_text("new json")
    assert _snapshot(tmp_path) == {"a.nii.gz": b"new a", "a.json": b"new json"}


def test_a_sidecar_path_that_is_a_folder_is_refused_up_front(tmp_path):
    from sdseg_monai.data import check_writable

    (tmp_path / "mask.json").mkdir()
    with pytest.raises(SDSegInputError, match=r"mask\.json: the label names of mask\.nii\.gz go to this path, and it is a folder"):
        check_writable(tmp_path / "mask.nii.gz")
    assert check_writable(tmp_path / "other.nii.gz") == tmp_path / "other.nii.gz"  # control


def test_a_folder_nothing_can_be_written_in_is_refused_up_front_and_nothing_is_left(tmp_path, monkeypatch):
    """os.access answers yes to root and cannot see a read-only mount or a pseudo file system: the
    check creates (and removes) a file, in the folder or the nearest one above it that exists."""
    import errno
    import tempfile as tempfile_module

    from sdseg_monai.batch import check_tree_paths
    from sdseg_monai.data import check_folder_writable, check_writable

    (tmp_path / "in").mkdir()
    (tmp_path / "a_file").write_text("not a folder")
    # Writable: nothing made, nothing left (the folder to be made is not made by the check).
    check_folder_writable(tmp_path / "new" / "deeper", "the output")
    assert check_writable(tmp_path / "mask.nii.gz") == tmp_path / "mask.nii.gz"
    assert check_tree_paths(tmp_path / "in", tmp_path / "out") == tmp_path / "in"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "in"]
    with pytest.raises(SDSegInputError, match=r"/out: cannot write the output: .*a_file is not a folder"):
        check_tree_paths(tmp_path / "in", tmp_path / "a_file" / "out")

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(tempfile_module, "mkstemp", read_only)
    with pytest.raises(SDSegInputError, match=r"mask\.nii\.gz: cannot write output in .* \(Read-only file system\)"):
        check_writable(tmp_path / "mask.nii.gz")
    with pytest.raises(SDSegInputError, match=r"/out/run: cannot write the output in .* \(Read-only file system\)"):
        check_tree_paths(tmp_path / "in", tmp_path / "out" / "run")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "in"]


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc, where no file can be created")
def test_an_output_in_a_folder_that_takes_no_files_is_refused_before_the_model_loads(model_dir, tmp_path):
    scan = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 3), np.int16), np.eye(4)), str(scan))
    for argv in (["segment", scan, "-o", "/proc/mask.nii.gz"], ["batch", tmp_path, "-o", "/proc/run"]):
        result = subprocess.run([sys.executable, "-c", "import sys; from sdseg_monai.cli import main; code = main(sys.argv[1:]); "
                                 "print(code, 'sdseg_monai.inference' in sys.modules)", *map(str, argv), "-m", str(model_dir)],
                                capture_output=True, text=True)
        assert result.stdout.split() == ["2", "False"], result.stderr  # refused, and no model loaded
        assert result.stderr.strip().count("\n") == 0 and "cannot write" in result.stderr and "in /proc" in result.stderr


def test_a_write_that_fails_midway_is_told_in_one_line_and_leaves_the_old_output(tmp_path, monkeypatch):
    """A full disk or a quota while the labels are written: the system's reason, naming the output; no
    temporary left, and the previous result as it was."""
    import errno

    from sdseg_monai.data import read_volume, write_label_volume

    scan = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 3), np.int16), np.eye(4)), str(scan))
    volume = read_volume(scan)
    (tmp_path / "mask.nii.gz").write_bytes(b"previous labels")
    before = _snapshot(tmp_path)

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(nib, "save", disk_full)
    with pytest.raises(SDSegInputError, match=r"mask\.nii\.gz: cannot write output \(No space left on device\)"):
        write_label_volume(np.zeros((8, 8, 3), np.uint8), volume, tmp_path / "mask.nii.gz", {})
    assert _snapshot(tmp_path) == before
