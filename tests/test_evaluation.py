"""Dataset manifests, data-root checks and split evaluation (per-case CSV + JSON report, CLI)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from sdseg_monai.data import check_data_root, load_manifest
from sdseg_monai.errors import SDSegInputError
from sdseg_monai.labels import BTCV_ORGAN_NAMES

from conftest import micro_config

MANIFESTS = Path(__file__).resolve().parents[1] / "data_manifests"
TRANSUNET_TEST = ["0001", "0002", "0003", "0004", "0008", "0022", "0025", "0029", "0032", "0035", "0036", "0038"]
BTCV_CASES = [f"{i:04d}" for i in [*range(1, 11), *range(21, 41)]]

# Synthetic cases: 40x40x6, liver box at 200 HU, spleen box at 100 HU, air elsewhere. Case b has no
# spleen, and no case has a left kidney, so those are "absent" for an oracle that never invents them.
LIVER_HU, SPLEEN_HU = 200.0, 100.0
AFFINE = np.diag([-0.8, -0.8, 2.5, 1.0])  # LPS-like: exercises the reorientation round trip


# -- manifests ------------------------------------------------------------------------------------------
def test_btcv_manifest_matches_the_transunet_protocol():
    m = load_manifest(MANIFESTS / "btcv.json")
    assert m.name == "btcv" and m.hu_window == (-175.0, 250.0)
    assert list(m.cases) == BTCV_CASES
    assert m.cases_for("test") == TRANSUNET_TEST
    train, validation = m.cases_for("train"), m.cases_for("validation")
    assert len(train) == 15 and len(validation) == 3
    assert sorted(train + validation) == sorted(set(BTCV_CASES) - set(TRANSUNET_TEST))
    assert not set(train) & set(validation)
    assert m.labels == {i + 1: n for i, n in enumerate(BTCV_ORGAN_NAMES)}
    assert set(m.subsets["transunet8"]) == {
        "aorta", "gallbladder", "left_kidney", "right_kidney", "liver", "pancreas", "spleen", "stomach"
    }
    assert m.cases["0021"].image == "img/img0021.nii.gz" and m.cases["0021"].label == "label/label0021.nii.gz"
    assert len(m.cases_for()) == 30


def test_sts_manifest():
    m = load_manifest(MANIFESTS / "sts.json")
    assert m.labels == {1: "teeth"} and m.hu_window == (-100.0, 1100.0)
    assert m.cases_for("train") == [f"Teeth_{i:04d}" for i in range(1, 9)]
    assert m.cases_for("validation") == ["Teeth_0009"]
    assert m.cases_for("test") == ["Teeth_0010", "Teeth_0011", "Teeth_0012"]
    assert m.cases["Teeth_0010"].image == "image/Teeth_0010.nii.gz"
    assert m.cases["Teeth_0010"].label == "label/Teeth_0010.nii.gz"


def _write_manifest(tmp_path: Path, **changes) -> Path:
    data = json.loads((MANIFESTS / "sts.json").read_text())
    data.update(changes)
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize(
    "changes, fragment",
    [
        ({"splits": {"train": ["Teeth_0001", "Teeth_0010"], "test": ["Teeth_0010"]}}, "in both split 'test' and split 'train'"),
        ({"splits": {"validation": ["Teeth_0011"], "test": ["Teeth_0011"]}}, "in both split 'test' and split 'validation'"),
        ({"splits": {"test": ["Teeth_0099"]}}, "unknown case(s) Teeth_0099"),
        ({"splits": {"test": ["Teeth_0010", "Teeth_0010"]}}, "more than once"),
        ({"subsets": {"x": ["liver"]}}, "unknown organ(s) liver"),
        ({"labels": {"0": "teeth"}}, "must be an integer 1..255"),
        ({"hu_window": [100, -100]}, "'hu_window' must be [low, high]"),
        ({"cases": {"Teeth_0010": {"image": "../x.nii.gz", "label": "l.nii.gz"}}}, "without '..'"),
        ({"split": {}}, "unknown key(s) 'split'"),
    ],
)
def test_invalid_manifests_are_refused_on_one_line(tmp_path, changes, fragment):
    path = _write_manifest(tmp_path, **changes)
    with pytest.raises(SDSegInputError) as error:
        load_manifest(path)
    message = str(error.value)
    assert fragment in message and str(path) in message and "\n" not in message


def test_unreadable_manifests(tmp_path):
    with pytest.raises(SDSegInputError, match="no such manifest file"):
        load_manifest(tmp_path / "nope.json")
    broken = tmp_path / "broken.json"
    broken.write_text('{"name": "x",')
    with pytest.raises(SDSegInputError, match=r"broken.json: manifest is not valid JSON \(line 1"):
        load_manifest(broken)
    twice = tmp_path / "twice.json"
    twice.write_text('{"name": "x", "name": "y"}')
    with pytest.raises(SDSegInputError, match="duplicate key 'name'"):
        load_manifest(twice)


def test_check_data_root_lists_every_missing_file_on_one_line(tmp_path):
    m = load_manifest(MANIFESTS / "btcv.json")
    with pytest.raises(SDSegInputError) as error:
        check_data_root(m, tmp_path, "test")
    message = str(error.value)
    assert "\n" not in message and message.startswith(f"{tmp_path}: 24 of 24 files of split 'test'")
    for case in TRANSUNET_TEST:
        assert f"img/img{case}.nii.gz" in message and f"label/label{case}.nii.gz" in message
    assert "img0005" not in message  # a training case is not part of the test split
    with pytest.raises(SDSegInputError, match="60 of 60 files of all cases"):
        check_data_root(m, tmp_path)
    with pytest.raises(SDSegInputError, match="no such data folder"):
        check_data_root(m, tmp_path / "nope", "test")
    with pytest.raises(SDSegInputError, match="no split 'dev'"):
        check_data_root(m, tmp_path, "dev")


# -- evaluation ----------------------------------------------------------------------------------------
def _write_case(root: Path, name: str, spleen: bool) -> None:
    import nibabel as nib

    image = np.full((40, 40, 6), -800.0, dtype=np.float32)
    label = np.zeros((40, 40, 6), dtype=np.uint8)
    image[4:20, 6:22, 1:5], label[4:20, 6:22, 1:5] = LIVER_HU, 6
    if spleen:
        image[26:36, 24:36, 2:6], label[26:36, 24:36, 2:6] = SPLEEN_HU, 1
    (root / "image").mkdir(parents=True, exist_ok=True)
    (root / "label").mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(image, AFFINE), str(root / "image" / f"{name}.nii.gz"))
    nib.save(nib.Nifti1Image(label, AFFINE), str(root / "label" / f"{name}.nii.gz"))


@pytest.fixture
def dataset(tmp_path):
    """A data root with two synthetic cases and its manifest (BTCV label table)."""
    root = tmp_path / "data"
    _write_case(root, "a", spleen=True)
    _write_case(root, "b", spleen=False)
    manifest = json.loads((MANIFESTS / "btcv.json").read_text())
    manifest["cases"] = {c: {"image": f"image/{c}.nii.gz", "label": f"label/{c}.nii.gz"} for c in ("a", "b")}
    manifest["splits"] = {"test": ["a", "b"]}
    path = tmp_path / "btcv_small.json"
    path.write_text(json.dumps(manifest))
    return path, root


@pytest.fixture(scope="module")
def micro_sdseg():
    """A micro SDSeg (liver, spleen, left_kidney) with random weights, at 32x32 slices."""
    from sdseg_monai.model import SDSeg

    torch.manual_seed(0)
    return SDSeg(micro_config()).eval()


def _window(hu: float) -> float:
    return (hu + 175.0) / 425.0 * 2.0 - 1.0


class IntensityOracle:
    """Stands in for the diffusion inferer: 'segments' by the synthetic intensities, so scores are known.
    Its distance from an empty mask is 10x a map's peak, and it honours the skip radius as the model does."""

    def __init__(self, organs, skip_decode_radius: float = 0.0):
        self.organs = organs
        self.skip_decode_radius = skip_decode_radius

    def __call__(self, slices, network, skip_decode_radius=None, return_distances=False):
        maps = self.maps(slices)
        distances = 10 * maps.amax(dim=(2, 3))
        radius = self.skip_decode_radius if skip_decode_radius is None else skip_decode_radius
        maps[distances < radius] = 0
        return (maps, distances) if return_distances else maps

    def maps(self, slices):
        grey = slices[:, 0]
        middle = (_window(LIVER_HU) + _window(SPLEEN_HU)) / 2
        liver = (grey > middle).float()
        # Resizing blurs the liver's edge through the spleen's intensities: ignore a band around the liver.
        near_liver = torch.nn.functional.max_pool2d(liver[:, None], 5, stride=1, padding=2)[:, 0] > 0
        spleen = (grey > _window(SPLEEN_HU) - 0.2) & (grey <= middle) & ~near_liver
        maps = {"liver": liver, "spleen": spleen.float()}
        zeros = torch.zeros_like(grey)
        return torch.stack([maps.get(name, zeros) for name in self.organs], dim=1)


class Nothing:
    """An inferer that never predicts anything."""

    def __call__(self, slices, network):
        return torch.zeros((slices.shape[0], 3, *slices.shape[-2:]))


def _read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_evaluate_writes_consistent_csv_and_report(dataset, micro_sdseg, tmp_path):
    from sdseg_monai.evaluation import evaluate
    from sdseg_monai.inference import VolumeSegmenter

    manifest, root = dataset
    segmenter = VolumeSegmenter(micro_sdseg, device="cpu")
    segmenter.inferer = IntensityOracle(segmenter.inferer.organs)
    loaded = segmenter.model  # the segmenter's own copy of micro_sdseg
    seen = []
    report = evaluate(
        segmenter, manifest, root, split="test", output_dir=tmp_path / "out", hd95=True,
        progress=lambda done, total, case: seen.append((done, total, case.case_id)),
    )
    assert seen == [(1, 2, "a"), (2, 2, "b")]
    assert segmenter.model is loaded  # the one loaded model, never reloaded

    rows = _read_csv(tmp_path / "out" / "per_case.csv")
    assert list(rows[0]) == ["case", "label", "organ", "dice", "hd95", "predicted_voxels", "reference_voxels"]
    assert [(r["case"], r["organ"]) for r in rows] == [
        (c, o) for c in ("a", "b") for o in ("spleen", "left_kidney", "liver")  # dataset label order
    ]
    by = {(r["case"], r["organ"]): r for r in rows}
    # Absent from prediction and reference: empty, and left out of every mean.
    assert by["b", "spleen"]["dice"] == "" and by["a", "left_kidney"]["dice"] == "" and by["b", "left_kidney"]["dice"] == ""
    assert by["a", "liver"]["reference_voxels"] == str(16 * 16 * 4)
    # The oracle recovers the boxes through reorientation, resizing and back: high Dice, small HD95.
    assert float(by["a", "liver"]["dice"]) > 0.9 and float(by["b", "liver"]["dice"]) > 0.9
    assert float(by["a", "spleen"]["dice"]) > 0.8
    assert 0.0 <= float(by["a", "liver"]["hd95"]) < 2.5

    data = json.loads((tmp_path / "out" / "report.json").read_text())
    summary = data["summary"]
    for organ in ("spleen", "liver", "left_kidney"):
        values = [float(r["dice"]) for r in rows if r["organ"] == organ and r["dice"] != ""]
        expected = float(np.mean(values)) if values else None
        assert summary["per_organ"][organ]["mean_dice"] == pytest.approx(expected)
        assert summary["per_organ"][organ]["cases_present"] == len(values)
    assert summary["per_organ"]["spleen"]["mean_dice"] == float(by["a", "spleen"]["dice"])
    assert summary["per_organ"]["left_kidney"]["mean_dice"] is None
    assert summary["mean_dice"] == pytest.approx(np.mean([summary["per_organ"][o]["mean_dice"] for o in ("spleen", "liver")]))
    assert summary["organs_in_mean"] == ["spleen", "liver"]
    transunet = summary["subsets"]["transunet8"]
    assert transunet["organs"] == ["liver", "spleen"] and "left_kidney" in transunet["not_scored"]
    assert transunet["mean_dice"] == pytest.approx(summary["mean_dice"])
    assert data["split"] == "test" and data["seed"] == 0 and data["cases"][0]["organs"]["liver"]["label"] == 6
    assert report.mean_dice == pytest.approx(summary["mean_dice"])

    table = report.format_table()
    assert "liver" in table and "mean Dice, 2 organs" in table and "transunet8 (2/8)" in table
    assert "absent" in table.splitlines()[3]  # left_kidney row
    liver_row = next(line for line in table.splitlines() if " liver " in line)
    assert liver_row.split()[-1] == "(2)" and "where both prediction and reference hold the organ" in table
    assert not list((tmp_path / "out").glob(".*"))  # no temporary files left behind


def test_no_prediction_scores_zero_and_absent_stays_absent(dataset, micro_sdseg):
    from sdseg_monai.evaluation import evaluate
    from sdseg_monai.inference import VolumeSegmenter

    manifest, root = dataset
    segmenter = VolumeSegmenter(micro_sdseg, device="cpu")
    segmenter.inferer = Nothing()
    report = evaluate(segmenter, manifest, root)
    scores = {(c.case_id, s.name): s for c in report.cases for s in c.scores}
    assert scores["a", "liver"].dice == 0.0 and scores["a", "spleen"].dice == 0.0 and scores["b", "liver"].dice == 0.0
    assert scores["b", "spleen"].absent and scores["a", "left_kidney"].absent
    assert all(s.predicted_voxels == 0 for s in scores.values())
    assert report.mean_dice == 0.0 and report.csv_path is None  # no output_dir: nothing written


def test_cli_evaluate_end_to_end(dataset, micro_sdseg, tmp_path, capsys):
    from sdseg_monai.cli import main

    manifest, root = dataset
    # One case only: the real (random-weight) diffusion model is what runs here, and it is slow on CPU.
    one = json.loads(manifest.read_text())
    one["splits"] = {"validation": ["a"], "test": ["b"]}
    manifest = tmp_path / "one.json"
    manifest.write_text(json.dumps(one))
    model_dir = micro_sdseg.save_pretrained(tmp_path / "model")
    out = tmp_path / "report"
    args = ["evaluate", "--model", str(model_dir), "--manifest", str(manifest), "--data-root", str(root), "-o", str(out)]
    assert main([*args, "--split", "validation", "--device", "cpu", "--seed", "3", "--quiet"]) == 0
    table = capsys.readouterr().out
    assert "mean Dice" in table and "liver" in table
    rows = _read_csv(out / "per_case.csv")
    data = json.loads((out / "report.json").read_text())
    assert len(rows) == 1 * 3 and data["seed"] == 3 and data["model"] == str(model_dir) and data["split"] == "validation"
    for organ, info in data["summary"]["per_organ"].items():
        values = [float(r["dice"]) for r in rows if r["organ"] == organ and r["dice"] != ""]
        assert info["mean_dice"] == (pytest.approx(float(np.mean(values))) if values else None)
        assert all(0.0 <= v <= 1.0 and not math.isnan(v) for v in values)


def test_cli_evaluate_input_errors(dataset, tmp_path, capsys, no_default_model):
    from sdseg_monai.cli import main

    manifest, root = dataset
    base = ["evaluate", "--manifest", str(manifest), "--data-root", str(root), "-o", str(tmp_path / "r")]
    assert main(base) == 2
    assert "no packaged default model in this version yet; pass --model PATH" in capsys.readouterr().err
    model = tmp_path / "fake_model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["evaluate", "-m", str(model), "--manifest", str(manifest), "--data-root", str(empty), "-o", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "4 of 4 files of split 'test'" in err and "label/b.nii.gz" in err
