"""Library noise kept off the console (``sdseg_monai._quiet``): pydicom's value warnings, which quote
header text (a UID, a patient name), and nibabel's header-fixing log lines. The console is read in a
subprocess, as pytest captures warnings in its own; each test's control shows that the same input is
noisy without sdseg3d, so that a quiet console proves something."""

from __future__ import annotations

import csv
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest
from pydicom import config

from dicom_series import ct_slices, phantom_ct, uid, write
from sdseg_monai._quiet import quiet_dicom

IMAGE, _ = phantom_ct((24, 20, 6))
# The tester's cases: UIDs that are paths with a line break, and values over their VR's length.
HOSTILE_STUDY, HOSTILE_SERIES = "../../../escape_study", "../escape_series\nFAKE LOG LINE"
LONG_NAME, LONG_DESCRIPTION = "Long^" + "N" * 100, "D" * 120
NOISE = ("Warning", "warn", "FAKE", "escape", "exceeds", "NNNN", "DDDD")
TIMEOUT = 300


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=TIMEOUT, cwd=cwd)


def _hostile_tree(root: Path) -> Path:
    with warnings.catch_warnings():  # pydicom warns as these values are set
        warnings.simplefilter("ignore")
        write(ct_slices(IMAGE, study=HOSTILE_STUDY, series=HOSTILE_SERIES), root / "x")
        write(ct_slices(IMAGE, series=uid(5, 1), patient_name=LONG_NAME, description=LONG_DESCRIPTION), root / "y")
    return root


def _noise(text: str) -> list[str]:
    return [word for word in NOISE if word in text]


# -- pydicom ----------------------------------------------------------------------------------------
READ_AND_WRITE_SEG = """
import sys
import numpy as np
from sdseg_monai.dicom import index_tree, read_stack, source_headers
from sdseg_monai.dicom_seg import write_dicom_seg

for stack in index_tree(sys.argv[1]).stacks:
    print(stack.key if stack.ok else "refused", stack.reason)
    if stack.ok:
        labels = np.zeros(read_stack(stack).shape[1:], np.uint8)
        labels[4:9, 4:9] = 1
        write_dicom_seg(labels, source_headers(stack), sys.argv[2], organs=[{"label": 1, "name": "spleen"}], dataset="btcv")
"""

PLAIN_PYDICOM = """
import sys
from pathlib import Path
import pydicom

for path in sorted(Path(sys.argv[1]).rglob("IM*")):
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    [ds.get(name) for name in ("StudyInstanceUID", "SeriesInstanceUID", "PatientName", "SeriesDescription")]
"""


def test_reading_hostile_headers_and_writing_their_seg_says_nothing(tmp_path):
    pytest.importorskip("highdicom")
    root = _hostile_tree(tmp_path / "tree")
    run = _run("-c", READ_AND_WRITE_SEG, str(root), str(tmp_path / "seg.dcm"), cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split("\n")[:2] == ["refused invalid_uid", f"{uid(5, 1)} ok"]
    assert run.stderr == ""
    assert (tmp_path / "seg.dcm").is_file()
    # Control: pydicom alone warns on these headers, quoting them.
    control = _run("-c", PLAIN_PYDICOM, str(root), cwd=tmp_path)
    assert "FAKE LOG LINE" in control.stderr and "escape_study" in control.stderr and "exceeds" in control.stderr


def test_writing_the_seg_of_a_single_component_patient_name_says_nothing(tmp_path):
    # highdicom warns of such a name, quoting it, from whichever thread writes the SEG: the filter is
    # process-wide (no catch_warnings, which swaps the filter list under other threads).
    pytest.importorskip("highdicom")
    write(ct_slices(IMAGE, series=uid(6, 1), patient_name="ZORRO"), tmp_path / "tree" / "z")
    threaded = "import threading\nworker = threading.Thread(target=lambda: exec(BODY))\nworker.start()\nworker.join()\n"
    script = f"BODY = {READ_AND_WRITE_SEG!r}\n" + threaded
    run = _run("-c", script, str(tmp_path / "tree"), str(tmp_path / "seg.dcm"), cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split("\n")[0] == f"{uid(6, 1)} ok" and run.stderr == ""
    assert (tmp_path / "seg.dcm").is_file()
    # Control: with the filters reset after our import, the same write quotes the name.
    control = _run("-c", "import warnings, sdseg_monai._quiet\nwarnings.resetwarnings()\n" + READ_AND_WRITE_SEG,
                   str(tmp_path / "tree"), str(tmp_path / "control.dcm"), cwd=tmp_path)
    assert control.returncode == 0 and "ZORRO" in control.stderr and "unlikely to represent" in control.stderr


def test_the_commands_say_nothing_of_hostile_headers(tmp_path, model_dir):
    pytest.importorskip("highdicom")
    root = _hostile_tree(tmp_path / "tree")
    batch = _run("-m", "sdseg_monai.cli", "batch", str(root), "-o", str(tmp_path / "out"), "-m", str(model_dir),
                 "--device", "cpu", "-q", cwd=tmp_path)
    assert _noise(batch.stderr) == [], batch.stderr
    with open(tmp_path / "out" / "summary.csv", newline="") as f:
        outcomes = sorted((row["status"], row["reason"]) for row in csv.DictReader(f))
    assert outcomes == [("failed", "invalid_uid"), ("ok", "ok")]
    assert len(list((tmp_path / "out").rglob("seg.dcm"))) == 1
    segment = _run("-m", "sdseg_monai.cli", "segment", str(root / "x"), "-o", str(tmp_path / "x.nii.gz"), "-m", str(model_dir),
                   "--device", "cpu", "-q", cwd=tmp_path)
    assert segment.returncode == 2
    (line,) = segment.stderr.splitlines()
    assert line.startswith("sdseg3d: error: ") and "invalid_uid" in line and not _noise(line)


def test_quiet_dicom_gives_the_users_settings_back_once_the_last_user_leaves():
    settings = config.settings
    saved = (settings._reading_validation_mode, settings._writing_validation_mode)
    try:
        settings._reading_validation_mode = settings._writing_validation_mode = None  # pydicom's default: WARN
        inside, leave_a, a_left = threading.Event(), threading.Event(), threading.Event()

        def a():
            with quiet_dicom():
                inside.set()
                leave_a.wait(10)
            a_left.set()

        thread = threading.Thread(target=a)
        thread.start()
        assert inside.wait(10)
        with quiet_dicom():
            assert settings.reading_validation_mode == settings.writing_validation_mode == config.IGNORE
            with quiet_dicom():  # nested, as index_tree reads headers
                pass
            leave_a.set()
            assert a_left.wait(10)
            # The other thread left first: still ours.
            assert settings.reading_validation_mode == settings.writing_validation_mode == config.IGNORE
        thread.join(10)
        assert (settings._reading_validation_mode, settings._writing_validation_mode) == (None, None)

        settings.reading_validation_mode = config.RAISE  # a user's RAISE stays RAISE
        with quiet_dicom():
            assert settings.reading_validation_mode == config.RAISE and settings.writing_validation_mode == config.IGNORE
        assert settings._reading_validation_mode == config.RAISE and settings._writing_validation_mode is None
    finally:
        settings._reading_validation_mode, settings._writing_validation_mode = saved


# -- nibabel ----------------------------------------------------------------------------------------
def _zero_spacing_nifti(path: Path) -> Path:
    """pixdim[3] = 0 and a zero sform row, as the tester's file: nibabel fixes the one, logging it."""
    import nibabel as nib

    affine = np.diag([3.0, 3.0, 2.0, 1.0])
    image = nib.Nifti1Image(np.zeros((16, 16, 4), np.int16), affine)
    image.header.set_qform(affine, code=0)
    image.header.set_sform(affine, code=2)
    nib.save(image, path)
    raw = bytearray(path.read_bytes())
    header = np.frombuffer(bytes(raw[:348]), dtype=image.header.structarr.dtype).copy()
    header["pixdim"][0][3] = 0
    header["srow_z"][0][:3] = 0
    raw[:348] = header.tobytes()
    path.write_bytes(bytes(raw))
    return path


def test_an_image_nibabel_fixes_gives_only_the_one_line_error(tmp_path, model_dir):
    image = _zero_spacing_nifti(tmp_path / "zero_spacing.nii")
    run = _run("-m", "sdseg_monai.cli", "segment", str(image), "-o", str(tmp_path / "out.nii.gz"), "-m", str(model_dir),
               "--device", "cpu", "-q", cwd=tmp_path)
    assert run.returncode == 2
    (line,) = run.stderr.splitlines()
    assert line.startswith("sdseg3d: error: ") and "no usable affine" in line
    # Control: nibabel alone logs its fix of this header.
    control = _run("-c", "import sys, nibabel; nibabel.load(sys.argv[1])", str(image), cwd=tmp_path)
    assert "pixdim[1,2,3] should be non-zero" in control.stderr


# -- torch.compile ------------------------------------------------------------------------------------
# Compiles the packaged model (dynamo's eager backend: the same tracing as inductor, in seconds) and
# segments a small array, with the package's warning filters in place.
COMPILE_PACKAGED = """
import numpy as np
from sdseg_monai.model import SDSeg, default_model_path
from sdseg_monai.inference import VolumeSegmenter

compile_for_inference = SDSeg.compile_for_inference
SDSeg.compile_for_inference = lambda self, backend="inductor": compile_for_inference(self, "eager")
# bf16 on any CPU: the upsamplers' version check is only reached for bf16 maps.
segmenter = VolumeSegmenter(default_model_path(), device="cpu", organs=["liver"], compile=True, precision="bf16", batch_size=2)
segmenter.segment_array(np.zeros((40, 40, 2), np.float32))
print(segmenter.precision)
"""

# The control traces one bf16 upsampler alone (seconds, not the packaged model's minute).
COMPILE_UPSAMPLER = """
import sys, warnings
import torch
import sdseg_monai.model  # the package's filters
from diffusers.models.upsampling import Upsample2D

if sys.argv[1] == "unfiltered":
    warnings.resetwarnings()
upsampler = Upsample2D(4, use_conv=True).to(torch.bfloat16)
upsampler.compile(backend="eager")
upsampler(torch.zeros(1, 4, 8, 8, dtype=torch.bfloat16))
print("done")
"""


def test_compiling_the_packaged_model_says_nothing(tmp_path):
    """Dynamo warned, several lines each time, about the cached version check in diffusers'
    upsamplers (a constant): nothing for a user of --compile."""
    run = _run("-c", COMPILE_PACKAGED, cwd=tmp_path)
    assert run.returncode == 0 and run.stdout.strip() == "bf16", run.stderr[-2000:]
    assert run.stderr == "", run.stderr[-2000:]
    for mode, warned in (("filtered", False), ("unfiltered", True)):
        control = _run("-c", COMPILE_UPSAMPLER, mode, cwd=tmp_path)
        assert control.returncode == 0 and control.stdout.strip() == "done", control.stderr[-2000:]
        assert ("Dynamo detected a call to a `functools.lru_cache`-wrapped function" in control.stderr) is warned
