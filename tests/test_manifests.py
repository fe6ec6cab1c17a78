"""Dataset manifests as training reads them: case paths, label tables, HU windows, splits."""

from __future__ import annotations

import json

import pytest

from sdseg_monai.data import load_manifest
from sdseg_monai.errors import SDSegInputError


def write_manifest(folder, name="m.json", **changes):
    """A small valid manifest (two cases, BTCV-like labels), with ``changes`` applied to its top level."""
    data = {
        "name": "toy",
        "hu_window": [-175, 250],
        "labels": {"1": "spleen", "6": "liver"},
        "splits": {"train": ["a"], "validation": ["b"]},
        "cases": {"a": {"image": "img_a.nii.gz", "label": "lab_a.nii.gz"}, "b": {"image": "img_b.nii.gz", "label": "lab_b.nii.gz"}},
    }
    data.update(changes)
    path = folder / name
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize("value", [".", "./", "", "a/../../x.nii.gz"])
def test_a_case_path_that_names_no_file_inside_the_root_is_one_line(tmp_path, value):
    path = write_manifest(tmp_path, cases={"a": {"image": value, "label": "lab.nii.gz"}}, splits={"train": ["a"]})
    with pytest.raises(SDSegInputError) as error:
        load_manifest(path)
    message = str(error.value)
    assert message.startswith(f"{path}: invalid manifest: case 'a' image") and "\n" not in message
    # Control: the same manifest with a file name loads.
    fine = write_manifest(tmp_path, "fine.json", cases={"a": {"image": "./img.nii.gz", "label": "lab.nii.gz"}}, splits={"train": ["a"]})
    assert load_manifest(fine).cases["a"].image == "img.nii.gz"


# -- a manifest's label table and HU window in training ------------------------------------------------

import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from conftest import micro_config  # noqa: E402
from sdseg_monai.data import DeviceSliceBatches, LabelledCase, SliceDataset, manifest_organ_values  # noqa: E402
from test_training import micro, write_cases  # noqa: E402


def relabelled(case, folder, mapping):
    """``case`` with its label values changed by ``mapping`` (a dataset with another label table)."""
    image, label = case
    nifti = nib.load(str(label))
    data = np.asarray(nifti.dataobj)
    out = np.zeros_like(data)
    for old, new in mapping.items():
        out[data == old] = new
    path = folder / f"relabelled_{label.name}"
    nib.save(nib.Nifti1Image(out, nifti.affine), str(path))
    return image, path


def test_manifest_label_values_are_matched_to_the_model_by_name(tmp_path):
    """A dataset that labels the spleen 6 and the liver 1 (the model: spleen 1, liver 6) trains the
    same model-space labels as one in the model's own values, and validates the same."""
    from sdseg_monai.training import validation_dice

    config = micro_config(organs=("spleen", "liver"))
    (standard,) = write_cases(tmp_path, 1)
    swapped = relabelled(standard, tmp_path, {1: 6, 6: 1})
    manifest = load_manifest(write_manifest(tmp_path, labels={"6": "spleen", "1": "liver"}))
    values = manifest_organ_values(manifest, config)
    assert values == {1: 6, 6: 1}
    own = SliceDataset([standard], config.preprocessing, config.organ_labels)
    mapped = SliceDataset([LabelledCase(*swapped, values)], config.preprocessing, config.organ_labels)
    assert torch.equal(own.labels[0], mapped.labels[0]) and (own.labels[0] == 1).any() and (own.labels[0] == 6).any()
    unmapped = SliceDataset([swapped], config.preprocessing, config.organ_labels)  # control: values taken as the model's
    assert not torch.equal(own.labels[0], unmapped.labels[0])
    model = micro(latent_scale=0.5).eval()
    reference = validation_dice(model, [standard], "cpu")
    assert reference["organs"].keys() == {"spleen", "liver"}
    assert validation_dice(model, [LabelledCase(*swapped, values)], "cpu") == reference


def test_organs_a_case_does_not_label_are_never_drawn_from_it(tmp_path):
    """A manifest that labels spleen and liver, for a model that also has a left kidney: that kidney,
    unlabelled there, is neither drawn as present nor as absent (it would learn to vanish)."""
    config = micro_config(organs=("spleen", "liver", "left_kidney"))
    cases = write_cases(tmp_path, 2)
    values = manifest_organ_values(load_manifest(write_manifest(tmp_path)), config)
    assert values == {1: 1, 6: 6}
    kidney = config.organ_names.index("left_kidney")
    partial = SliceDataset([LabelledCase(*c, values) for c in cases], config.preprocessing, config.organ_labels, absent_fraction=1.0)
    full = SliceDataset(cases, config.preprocessing, config.organ_labels, absent_fraction=1.0)  # control: labelled everywhere
    assert kidney not in {int(partial[i]["class_id"]) for i in range(len(partial))}
    assert kidney in {int(full[i]["class_id"]) for i in range(len(full))}
    for sampling in ("slice", "organ"):
        drawn = DeviceSliceBatches(partial, "cpu", augmentation="none", organ_sampling=sampling).batch(0, 256)["class_id"]
        control = DeviceSliceBatches(full, "cpu", augmentation="none", organ_sampling=sampling).batch(0, 256)["class_id"]
        assert kidney not in drawn.tolist() and kidney in control.tolist(), sampling
    two = DeviceSliceBatches(partial, "cpu", augmentation="none", organs_per_slice=2).batch(0, 64)["class_id"]
    assert kidney not in two.tolist()
    with pytest.raises(SDSegInputError, match=r"organs per slice must be 1 to 2 \(the organs every case labels\), got 3"):
        DeviceSliceBatches(partial, "cpu", organs_per_slice=3)


@pytest.mark.parametrize(
    "changes, fragment",
    [
        ({"hu_window": [-100, 1100]}, "the manifest's HU window -100..1100 is not the model's -175..250"),
        ({"labels": {"1": "teeth"}}, "the model segments spleen, liver, none of which manifest 'toy' labels (teeth)"),
    ],
    ids=["window", "no-organ"],
)
def test_a_manifest_the_model_cannot_train_on_is_refused_in_one_line(tmp_path, changes, fragment):
    config = micro_config(organs=("spleen", "liver"))
    path = write_manifest(tmp_path, **changes)
    with pytest.raises(SDSegInputError) as error:
        manifest_organ_values(load_manifest(path), config)
    assert str(error.value).startswith(f"{path}: ") and fragment in str(error.value) and "\n" not in str(error.value)
    assert manifest_organ_values(load_manifest(write_manifest(tmp_path, "ok.json")), config) == {1: 1, 6: 6}  # control


def test_train_cli_reads_a_manifest_by_its_own_labels_with_or_without_a_validation_split(tmp_path, capsys):
    from sdseg_monai.cli import main

    data = tmp_path / "data"
    cases = write_cases(data, 2)
    files = {"a": relabelled(cases[0], data, {1: 6, 6: 1}), "b": relabelled(cases[1], data, {1: 6, 6: 1})}
    table = {"6": "spleen", "1": "liver"}
    entries = {k: {"image": img.name, "label": lab.name} for k, (img, lab) in files.items()}
    autoencoder = tmp_path / "ae"
    micro().autoencoder.save_pretrained(autoencoder)
    common = ["--preset", "tiny", "--autoencoder", str(autoencoder), "--organs", "spleen,liver", "--data-root", str(data), "--steps", "2",
              "--batch-size", "2", "--validate-every", "2", "--augment", "none", "-q", "--device", "cpu"]
    # No validation split: trains, and the final weights are the model.
    no_validation = write_manifest(tmp_path, "train_only.json", labels=table, cases=entries, splits={"train": ["a", "b"], "test": []})
    assert main(["train", "-o", str(tmp_path / "r1"), "--manifest", str(no_validation), *common]) == 0
    assert (tmp_path / "r1" / "model" / "model.safetensors").is_file()
    # With one: validated on it, scoring both organs in the manifest's values.
    validated = write_manifest(tmp_path, "validated.json", labels=table, cases=entries, splits={"train": ["a"], "validation": ["b"]})
    assert main(["train", "-o", str(tmp_path / "r2"), "--manifest", str(validated), *common]) == 0
    records = [json.loads(line) for line in (tmp_path / "r2" / "log.jsonl").read_text().splitlines()]
    assert [set(r["validation"]["organs"]) for r in records if "validation" in r] == [{"spleen", "liver"}]
    # An organ the manifest names otherwise ("hepar" is not "liver") is not trained from it, and says so.
    capsys.readouterr()
    renamed = write_manifest(tmp_path, "renamed.json", labels={"6": "spleen", "1": "hepar"}, cases=entries, splits={"train": ["a", "b"]})
    assert main(["train", "-o", str(tmp_path / "r4"), "--manifest", str(renamed), *common]) == 0
    assert "labels no liver (by name)" in capsys.readouterr().err
    # A teeth manifest with its own window, for the BTCV window model: refused before training.
    capsys.readouterr()
    teeth = write_manifest(tmp_path, "teeth.json", labels={"1": "teeth"}, hu_window=[-100, 1100], cases=entries, splits={"train": ["a"]})
    assert main(["train", "-o", str(tmp_path / "r3"), "--manifest", str(teeth), *common]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(teeth) in err[0] and "HU window" in err[0]
    assert not (tmp_path / "r3").exists()
