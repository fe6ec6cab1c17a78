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
