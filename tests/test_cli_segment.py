"""`sdseg3d segment`: outputs, Dice table, and bad inputs (exit 2, one line, nothing written)."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from conftest import labelled_scan
from sdseg_monai.errors import SDSegInputError
from sdseg_monai.cli import main


@pytest.fixture
def scan(tmp_path):
    image, labels, affine = labelled_scan()
    nib.save(nib.Nifti1Image(image.astype(np.int16), affine), str(tmp_path / "scan.nii.gz"))
    nib.save(nib.Nifti1Image(labels, affine), str(tmp_path / "ref.nii.gz"))
    return tmp_path / "scan.nii.gz"


def cli(*args):
    return subprocess.run([sys.executable, "-m", "sdseg_monai.cli", *map(str, args)], capture_output=True, text=True)


def test_segment_writes_labels_sidecar_and_dice_table(model_dir, scan, tmp_path, capsys):
    out = tmp_path / "mask.nii.gz"
    code = main(["segment", str(scan), "-o", str(out), "-m", str(model_dir), "-l", str(tmp_path / "ref.nii.gz"), "-q", "-s", "5"])
    assert code == 0
    written = nib.load(str(out))
    assert written.shape == (24, 20, 4) and np.allclose(written.affine, nib.load(str(scan)).affine)
    assert set(np.unique(np.asanyarray(written.dataobj))) <= {0, 1, 6}
    assert json.loads((tmp_path / "mask.json").read_text())["labels"] == {"1": "spleen", "6": "liver"}
    assert json.loads((tmp_path / "mask.json").read_text())["seed"] == 5
    table = capsys.readouterr().out
    assert "spleen" in table and "liver" in table and "mean (present organs)" in table


def test_organ_subset_and_unknown_organ(model_dir, scan, tmp_path):
    out = tmp_path / "liver.nii.gz"
    assert main(["segment", str(scan), "-o", str(out), "-m", str(model_dir), "--organs", "liver", "-q"]) == 0
    assert json.loads((tmp_path / "liver.json").read_text())["labels"] == {"6": "liver"}
    result = cli("segment", scan, "-o", tmp_path / "x.nii.gz", "-m", model_dir, "--organs", "brain", "-q")
    assert result.returncode == 2 and "unknown organ 'brain'" in result.stderr


def test_shifts_are_recorded_and_a_bad_count_is_refused(model_dir, scan, tmp_path):
    out = tmp_path / "mask.nii.gz"
    assert main(["segment", str(scan), "-o", str(out), "-m", str(model_dir), "--shifts", "2", "-q"]) == 0
    assert json.loads((tmp_path / "mask.json").read_text())["postprocessing"]["num_shifts"] == 2
    _assert_refused(cli("segment", scan, "-o", tmp_path / "out.nii.gz", "-m", model_dir, "--shifts", "3"),
                    "num_shifts must be one of [1, 2, 4], got 3", leftover_dir=tmp_path)


def _assert_refused(result, *fragments, leftover_dir=None):
    assert result.returncode == 2, result.stderr
    message = result.stderr.strip()
    assert "\n" not in message and "Traceback" not in message, message
    for fragment in fragments:
        assert fragment in message, message
    if leftover_dir is not None:
        assert not [p for p in leftover_dir.iterdir() if p.name.startswith(("out", ".out"))]


def test_missing_input(model_dir, tmp_path):
    _assert_refused(cli("segment", tmp_path / "nope.nii.gz", "-o", tmp_path / "out.nii.gz", "-m", model_dir),
                    "nope.nii.gz", "no such file", leftover_dir=tmp_path)


BEFORE_THE_MODEL = """
import sys
from sdseg_monai.cli import main
code = main(sys.argv[1:])
print(code, *(name in sys.modules for name in ("monai", "sdseg_monai.inference")))
"""


def test_a_bad_input_is_told_before_monai_and_the_model_load(model_dir, tmp_path, scan):
    """A missing or malformed input is refused before MONAI is imported and before the model loads
    (and compiles): at once, instead of after seconds (minutes with --compile). The control, a good
    input, loads both."""
    flat = tmp_path / "flat.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((20, 20), dtype=np.int16), np.eye(4)), str(flat))
    for args in (["segment", tmp_path / "nope.nii.gz", "-o", tmp_path / "out.nii.gz"],
                 ["segment", flat, "-o", tmp_path / "out.nii.gz"],
                 ["batch", tmp_path / "nope", "-o", tmp_path / "out", "--compile"]):
        run = subprocess.run([sys.executable, "-c", BEFORE_THE_MODEL, *map(str, args), "-m", str(model_dir), "-q"],
                             capture_output=True, text=True)
        assert run.stdout.split() == ["2", "False", "False"], (args, run.stdout, run.stderr)
        assert run.stderr.count("\n") == 1 and str(args[1].name) in run.stderr
    assert not (tmp_path / "out").exists()
    control = subprocess.run([sys.executable, "-c", BEFORE_THE_MODEL, "segment", str(scan), "-o", str(tmp_path / "out.nii.gz"),
                              "-m", str(model_dir), "-q", "--organs", "liver"], capture_output=True, text=True)
    assert control.stdout.split() == ["0", "True", "True"], control.stderr


def test_corrupt_gzip(model_dir, tmp_path, scan):
    broken = tmp_path / "broken.nii.gz"
    data = scan.read_bytes()
    broken.write_bytes(data[: len(data) // 2])  # truncated gzip stream
    _assert_refused(cli("segment", broken, "-o", tmp_path / "out.nii.gz", "-m", model_dir), "broken.nii.gz", leftover_dir=tmp_path)
    garbage = tmp_path / "garbage.nii.gz"
    garbage.write_bytes(gzip.compress(b"this is not a nifti header" * 20))
    _assert_refused(cli("segment", garbage, "-o", tmp_path / "out.nii.gz", "-m", model_dir), "garbage.nii.gz", leftover_dir=tmp_path)


@pytest.mark.parametrize("shape, fragment", [((20, 20), "2D image"), ((8, 8, 4, 1, 2), "5D image"), ((8, 8, 4, 3), "4D image with 3 volumes")])
def test_wrong_dimensionality(model_dir, tmp_path, shape, fragment):
    path = tmp_path / "bad.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros(shape, dtype=np.int16), np.eye(4)), str(path))
    _assert_refused(cli("segment", path, "-o", tmp_path / "out.nii.gz", "-m", model_dir), "bad.nii.gz", fragment, leftover_dir=tmp_path)


def test_unwritable_output(model_dir, scan, tmp_path):
    _assert_refused(cli("segment", scan, "-o", tmp_path / "missing_dir" / "out.nii.gz", "-m", model_dir), "folder does not exist")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):  # root ignores permission bits
            pytest.skip("running as root: permission bits are not enforced")
        _assert_refused(cli("segment", scan, "-o", locked / "out.nii.gz", "-m", model_dir), "cannot write output in", "Permission denied")
    finally:
        locked.chmod(0o700)


def test_existing_output_is_replaced_whole_or_left_alone(model_dir, scan, tmp_path):
    out = tmp_path / "out.nii.gz"
    out.write_bytes(b"previous result")
    # A failure (unknown organ) leaves the old file exactly as it was.
    assert cli("segment", scan, "-o", out, "-m", model_dir, "--organs", "brain", "-q").returncode == 2
    assert out.read_bytes() == b"previous result"
    assert main(["segment", str(scan), "-o", str(out), "-m", str(model_dir), "-q"]) == 0
    assert nib.load(str(out)).shape == (24, 20, 4)


def test_missing_or_bad_model(scan, tmp_path, capsys, no_default_model):
    assert main(["segment", str(scan), "-o", str(tmp_path / "out.nii.gz")]) == 2
    message = capsys.readouterr().err.strip()
    assert "\n" not in message and "no packaged default model" in message and "--model" in message
    _assert_refused(cli("segment", scan, "-o", tmp_path / "out.nii.gz", "-m", tmp_path / "none"), "no such model folder")
    _assert_refused(cli("segment", scan, "-o", tmp_path / "out.nii.gz", "-m", tmp_path), "not an SDSeg model folder")


def test_reference_on_another_grid_is_refused(model_dir, scan, tmp_path):
    ref = tmp_path / "small_ref.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((5, 5, 5), dtype=np.uint8), np.eye(4)), str(ref))
    _assert_refused(cli("segment", scan, "-o", tmp_path / "out.nii.gz", "-m", model_dir, "-l", ref), "small_ref.nii.gz", "differs")


def _pydicom_file(*parts):
    import pydicom

    return os.path.join(os.path.dirname(pydicom.__file__), "data", "test_files", *parts)


def test_dicom_folders_non_ct_and_several_series_are_refused(model_dir, tmp_path):
    import shutil

    mr = tmp_path / "mr"
    mr.mkdir()
    shutil.copy(_pydicom_file("MR_small.dcm"), mr / "1.dcm")
    _assert_refused(cli("segment", mr, "-o", tmp_path / "out.nii.gz", "-m", model_dir), "not_ct", "modality MR, not CT")
    two = tmp_path / "two"
    from dicom_series import ct_slices, phantom_ct, uid, write

    image, _ = phantom_ct((16, 16, 4))
    write(ct_slices(image, series=uid(1, 1)), two / "a")
    write(ct_slices(image, series=uid(1, 2)), two / "b")
    _assert_refused(cli("segment", two, "-o", tmp_path / "out.nii.gz", "-m", model_dir), "2 CT series", "expected one", "sdseg3d batch")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not dicom")
    _assert_refused(cli("segment", empty, "-o", tmp_path / "out.nii.gz", "-m", model_dir), "no DICOM image series")
    # An MR beside a CT is skipped, as batch skips it: the CT is the one series to segment.
    shutil.copy(_pydicom_file("MR_small.dcm"), two / "a" / "mr.dcm")
    assert main(["segment", str(two / "a"), "-o", str(tmp_path / "ct.nii.gz"), "-m", str(model_dir), "-q"]) == 0


def test_small_real_dicom_ct_series_segments_on_its_grid(model_dir, tmp_path):
    from sdseg_monai.data import read_volume

    series = _pydicom_file("dicomdirtests", "98892001", "CT5N")
    volume = read_volume(series)
    assert volume.shape == (16, 16, 5)
    out = tmp_path / "ct5n.nii.gz"
    assert main(["segment", series, "-o", str(out), "-m", str(model_dir), "-q"]) == 0
    written = nib.load(str(out))
    assert written.shape == (16, 16, 5) and np.allclose(written.affine, volume.affine, atol=1e-4)


def test_auto_precision_follows_the_cpu_and_the_sidecar_records_it(model_dir, scan, tmp_path, monkeypatch):
    import torch

    from sdseg_monai.model import resolve_precision

    cpu = torch.device("cpu")
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    assert resolve_precision(cpu) == "fp32" and resolve_precision(cpu, "bf16") == "bf16"
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True, raising=False)
    assert resolve_precision(cpu) == "bf16" and resolve_precision(cpu, "fp32") == "fp32"
    cuda = torch.device("cuda")  # bf16 autocast measured slower than fp32 on an H200 (issue 19)
    assert resolve_precision(cuda) == "fp32" and resolve_precision(cuda, "bf16") == "bf16"
    with pytest.raises(SDSegInputError, match="precision must be one of"):
        resolve_precision(cpu, "int8")
    # A noise-predicting model stays fp32 under auto: its one step scales the UNet's rounding by 1/sqrt(abar).
    from conftest import micro_config

    noise_model = micro_config(prediction_type="epsilon")
    assert resolve_precision(cpu, "auto", noise_model) == "fp32" and resolve_precision(cpu, "bf16", noise_model) == "bf16"
    assert resolve_precision(cpu, "auto", micro_config(prediction_type="sample")) == "bf16"
    from sdseg_monai.model import SDSeg

    torch.manual_seed(0)
    z0_model = SDSeg(micro_config(organs=("spleen", "liver"), prediction_type="sample", preprocessing={"hu_window": (-175, 250), "slice_size": 32}))
    z0_dir = z0_model.save_pretrained(tmp_path / "z0_model")
    # auto is bf16 here (patched CPU) for a z0-predicting model, fp32 for the noise-predicting one: the sidecar says what ran.
    for name, model, precision, expected in (("z0_auto", z0_dir, "auto", "bf16"), ("z0_fp32", z0_dir, "fp32", "fp32"),
                                             ("eps_auto", model_dir, "auto", "fp32")):
        out = tmp_path / f"{name}.nii.gz"
        assert main(["segment", str(scan), "-o", str(out), "-m", str(model), "-q", "--precision", precision]) == 0
        assert json.loads(out.with_name(f"{name}.json").read_text())["precision"] == expected
    _assert_refused(cli("segment", scan, "-o", tmp_path / "out.nii.gz", "-m", model_dir, "--precision", "fp8"), "precision must be one of")
