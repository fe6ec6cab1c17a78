"""Synthetic 3D abdominal CT phantoms: determinism, anatomy, HU, RAS orientation, spacing, files, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from sdseg_monai.labels import BTCV
from sdseg_monai.phantoms import PHANTOM_SHAPE, abdominal_phantom, write_phantoms

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
REAL_LABELS = SHARED_DATA / "ct" / "abdomen_ct_3mm_labels_btcv.nii.gz"

# Expected median HU of each organ's voxels on non-contrast CT (generous: per-seed HU jitter, noise).
EXPECTED_HU = {
    "spleen": (25, 60),
    "right_kidney": (10, 50),
    "left_kidney": (10, 50),
    "gallbladder": (-10, 30),
    "esophagus": (15, 60),
    "liver": (35, 75),
    "stomach": (-30, 55),  # contents and wall; gas stays a minority
    "aorta": (25, 60),
    "inferior_vena_cava": (25, 60),
    "portal_and_splenic_vein": (25, 60),
    "pancreas": (15, 60),
    "right_adrenal_gland": (0, 50),
    "left_adrenal_gland": (0, 50),
}
LABEL = {o.name: o.label for o in BTCV.organs}
SMALL = ((64, 64, 32), (6.0, 6.0, 6.0))  # the default field of view at 6 mm: fast


@pytest.fixture(scope="module")
def phantom0():
    return abdominal_phantom(0)


def world_centroid(label: np.ndarray, affine: np.ndarray, k: int) -> np.ndarray:
    idx = np.argwhere(label == k).mean(0)
    return affine[:3, :3] @ idx + affine[:3, 3]


def test_phantom_is_deterministic_and_depends_on_the_seed(phantom0):
    image, label, affine = phantom0
    again = abdominal_phantom(0)
    assert image.tobytes() == again[0].tobytes()
    assert label.tobytes() == again[1].tobytes()
    assert np.array_equal(affine, again[2])
    a = abdominal_phantom(0, *SMALL)
    b = abdominal_phantom(1, *SMALL)
    assert not np.array_equal(a[1], b[1]) and not np.array_equal(a[0], b[0])


def test_default_phantom_has_every_btcv_organ(phantom0):
    image, label, affine = phantom0
    assert image.shape == label.shape == PHANTOM_SHAPE
    assert image.dtype == np.float32 and label.dtype == np.uint8
    assert np.allclose(np.diag(affine), [3.0, 3.0, 3.0, 1.0])
    assert set(np.unique(label).tolist()) == set(range(14))
    # Organs have different craniocaudal extents: not every organ is on every slice.
    slices = [int((label == k).any((0, 1)).sum()) for k in range(1, 14)]
    assert min(slices) < 0.5 * label.shape[2] and len(set(slices)) > 5


def test_labels_match_intensities(phantom0):
    image, label, _ = phantom0
    for name, (lo, hi) in EXPECTED_HU.items():
        median = float(np.median(image[label == LABEL[name]]))
        assert lo <= median <= hi, f"{name}: median {median:.1f} HU outside [{lo}, {hi}]"
    # Air outside the body: the corners of every slice.
    corners = np.concatenate([image[:6, :6].ravel(), image[-6:, :6].ravel(), image[:6, -6:].ravel(), image[-6:, -6:].ravel()])
    assert np.percentile(corners, 99) < -900
    # Fat, soft tissue and bone are all there.
    assert (image < -50).any() and (image > 300).sum() > 500


def test_anatomical_layout(phantom0):
    _, label, affine = phantom0
    c = {name: world_centroid(label, affine, k) for name, k in LABEL.items()}
    # RAS: +x is the patient's right, +y anterior, +z superior.
    assert c["liver"][0] > 0 > c["spleen"][0]
    assert c["right_kidney"][0] > 0 > c["left_kidney"][0]
    assert c["inferior_vena_cava"][0] > c["aorta"][0]
    assert c["right_adrenal_gland"][0] > 0 > c["left_adrenal_gland"][0]
    assert c["gallbladder"][0] > 0 and c["stomach"][0] < c["liver"][0]
    assert c["pancreas"][1] > c["aorta"][1] and c["stomach"][1] > c["spleen"][1]
    assert c["esophagus"][2] > c["right_kidney"][2] and c["esophagus"][2] > c["pancreas"][2]


def test_left_right_agrees_with_the_real_ct(phantom0):
    _, label, _ = phantom0
    phantom_sign = np.sign(np.argwhere(label == LABEL["liver"])[:, 0].mean() - np.argwhere(label == LABEL["spleen"])[:, 0].mean())
    assert phantom_sign != 0
    if not REAL_LABELS.is_file():
        pytest.skip("shared real CT not present")
    import nibabel as nib

    real = nib.load(str(REAL_LABELS))
    real_label = np.asarray(real.dataobj)
    real_sign = np.sign(np.argwhere(real_label == 6)[:, 0].mean() - np.argwhere(real_label == 1)[:, 0].mean())
    assert phantom_sign == real_sign
    assert nib.aff2axcodes(real.affine) == ("R", "A", "S")


@pytest.mark.parametrize("grid", [SMALL, ((128, 128, 24), (3.0, 3.0, 8.0))], ids=["6mm", "3x3x8mm"])
def test_other_spacings_give_the_same_physical_volumes(phantom0, grid):
    _, label, _ = phantom0
    base = np.bincount(label.ravel(), minlength=14)[1:] * 27.0
    other = abdominal_phantom(0, *grid)[1]
    volumes = np.bincount(other.ravel(), minlength=14)[1:] * float(np.prod(grid[1]))
    ratio = volumes / base
    assert np.all(np.abs(ratio - 1) < 0.15), dict(zip(EXPECTED_HU, ratio.round(3)))


def test_bad_arguments_raise():
    for kwargs in ({"seed": -1}, {"seed": 0, "shape": (0, 4, 4)}, {"seed": 0, "spacing": (1.0, -1.0, 1.0)}, {"seed": 0, "shape": (4, 4)}):
        with pytest.raises(ValueError):
            abdominal_phantom(**kwargs)
    with pytest.raises(ValueError):
        write_phantoms("unused", n=0)


def test_cli_writes_image_and_label_files(tmp_path, capsys):
    import nibabel as nib

    from sdseg_monai.cli import main

    out = tmp_path / "new" / "phantoms"  # created on the fly
    grid = ["--shape", "32", "32", "16", "--spacing", "12", "12", "12"]
    assert main(["phantom", "-o", str(out), "--n", "2", "--seed", "3", *grid]) == 0
    printed = capsys.readouterr().out.split()
    expected = [out / f"phantom_{s}_{kind}.nii.gz" for s in (3, 4) for kind in ("image", "label")]
    assert printed == [str(p) for p in expected] + [str(out / "manifest.json")]
    # No temporary files left; each label map has its names beside it.
    names = [f"phantom_{s}_label.json" for s in (3, 4)]
    assert sorted(p.name for p in out.iterdir()) == sorted([p.name for p in expected] + names + ["manifest.json"])
    labels = json.loads((out / names[1]).read_text())["labels"]
    assert labels["1"] == "spleen" and len(labels) == 13
    image, label, affine = abdominal_phantom(4, (32, 32, 16), (12.0, 12.0, 12.0))
    img_nii, lab_nii = nib.load(str(expected[2])), nib.load(str(expected[3]))
    assert img_nii.get_data_dtype() == np.int16 and lab_nii.get_data_dtype() == np.uint8
    for nii in (img_nii, lab_nii):
        assert np.allclose(nii.affine, affine)
        assert int(nii.header["qform_code"]) == 1 and int(nii.header["sform_code"]) == 1
    assert np.array_equal(np.asarray(img_nii.dataobj), np.rint(image).astype(np.int16))
    assert np.array_equal(np.asarray(lab_nii.dataobj), label)


def test_cli_rejects_bad_values_in_one_line(tmp_path, capsys):
    from sdseg_monai.cli import main

    assert main(["phantom", "-o", str(tmp_path), "--shape", "0", "8", "8"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--shape" in err[0]
    assert main(["phantom", "-o", str(tmp_path), "--spacing", "1", "-2", "1"]) == 2
    assert "--spacing" in capsys.readouterr().err
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    assert main(["phantom", "-o", str(a_file)]) == 2
    assert list(tmp_path.iterdir()) == [a_file]


@pytest.mark.parametrize(
    "text, fragment",
    [
        ('{"name": "phantoms", "cases": {', "manifest is not valid JSON"),
        ('{"name": "phantoms"}', "missing key(s) 'labels', 'splits', 'cases'"),
        (
            '{"name": "t", "labels": {"1": "teeth"}, "splits": {"train": ["a"]}, "cases": {"a": {"image": "i.nii", "label": "l.nii"}}}',
            "not a phantom manifest",
        ),
    ],
    ids=["truncated", "no-cases", "other-labels"],
)
def test_cli_refuses_a_bad_manifest_before_writing_phantoms(tmp_path, capsys, text, fragment):
    from sdseg_monai.cli import main

    manifest = tmp_path / "manifest.json"
    manifest.write_text(text)
    grid = ["--shape", "16", "16", "8", "--spacing", "24", "24", "24"]
    assert main(["phantom", "-o", str(tmp_path), "--n", "1", *grid]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(manifest) in err[0] and fragment in err[0], err
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"] and manifest.read_text() == text  # nothing written, input kept
    # Control: the same call in a folder without a manifest writes the phantom and a manifest.
    assert main(["phantom", "-o", str(tmp_path / "fresh"), "--n", "1", *grid]) == 0
    assert sorted(p.name for p in (tmp_path / "fresh").iterdir()) == [
        "manifest.json", "phantom_0_image.nii.gz", "phantom_0_label.json", "phantom_0_label.nii.gz"]
