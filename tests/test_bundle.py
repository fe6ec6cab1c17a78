"""MONAI bundles: layout, MONAI's own verifiers (each with a negative control), the infer workflow,
`monai.bundle run` (single process and 2-process torchrun on CPU) identical to `sdseg3d segment`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from sdseg_monai.bundle import EXPRESSIONS, SCHEMA_PATH, export_bundle, nifti_inputs
from sdseg_monai.cli import main
from sdseg_monai.errors import SDSegInputError

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "bundles" / "sdseg_btcv"


@pytest.fixture(scope="module")
def bundle(model_dir, tmp_path_factory):
    return export_bundle(model_dir, tmp_path_factory.mktemp("bundles") / "micro_bundle")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    affines = [np.array([[-1.5, 0, 0, 10], [0, -1.5, 0, -4], [0, 0, 3.0, 7], [0, 0, 0, 1]]), np.diag([1.0, 2.0, 3.0, 1.0])]
    for k, affine in enumerate(affines):
        image = (rng.normal(0, 100, (24, 20, 5)) + np.where(np.arange(24)[:, None, None] > 12, 60, -80)).astype(np.float32)
        nib.save(nib.Nifti1Image(image, affine), str(folder / f"case{k}.nii.gz"))
    (folder / "notes.txt").write_text("not an image")
    return folder


def _monai_bundle(*args, cwd, torchrun=False):
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "monai.bundle", *args] if torchrun \
        else [sys.executable, "-m", "monai.bundle", *args]
    return subprocess.run(command, capture_output=True, text=True, cwd=cwd, timeout=600)


def _segment_reference(model_dir, dataset, out_dir) -> dict:
    masks = {}
    for case in sorted(dataset.glob("*.nii.gz")):
        out = out_dir / case.name.replace(".nii.gz", "_ref.nii.gz")
        assert main(["segment", str(case), "-o", str(out), "-m", str(model_dir), "-q"]) == 0
        masks[case.name.replace(".nii.gz", "")] = nib.load(str(out))
    return masks


def _assert_same_masks(out_dir: Path, reference: dict):
    written = sorted(p.name for p in out_dir.glob("*_seg.nii.gz"))
    assert written == sorted(f"{name}_seg.nii.gz" for name in reference)
    for name, expected in reference.items():
        got = nib.load(str(out_dir / f"{name}_seg.nii.gz"))
        assert got.get_data_dtype() == np.uint8
        assert np.array_equal(np.asanyarray(got.dataobj).reshape(expected.shape), np.asanyarray(expected.dataobj))
        assert np.allclose(got.affine, expected.affine, atol=1e-5)
    assert any(np.asanyarray(e.dataobj).any() for e in reference.values())  # labels, not an empty map


def test_layout_weights_and_config_format(bundle, model_dir):
    files = sorted(str(p.relative_to(bundle)) for p in bundle.rglob("*") if p.is_file())
    assert files == sorted([
        "LICENSE", "configs/inference.json", "configs/logging.conf", "configs/metadata.json",
        "configs/multi_gpu_inference.json", "docs/README.md", "docs/data_license.txt", "models/model.pt",
        "models/sdseg_config.json",
    ])
    assert all((bundle / f).stat().st_size < 25 * 2**20 for f in files)
    from safetensors.torch import load_file

    weights = torch.load(bundle / "models" / "model.pt", weights_only=True)
    saved = load_file(str(model_dir / "model.safetensors"))
    assert weights.keys() == saved.keys() and all(torch.equal(weights[k], saved[k]) and weights[k].dtype == saved[k].dtype for k in saved)
    import hashlib

    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    assert meta["sdseg3d"]["weights_sha256"] == hashlib.sha256((bundle / "models" / "model.pt").read_bytes()).hexdigest()
    for name in ("metadata.json", "inference.json", "multi_gpu_inference.json"):
        text = (bundle / "configs" / name).read_text()
        assert text == json.dumps(json.loads(text), indent=4) + "\n"  # the model zoo's 4-space format


def _strings(node):
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _strings(value)
    elif isinstance(node, list):
        for value in node:
            yield from _strings(value)
    elif isinstance(node, str):
        yield node


def _targets(node):
    if isinstance(node, dict):
        if "_target_" in node:
            yield node["_target_"]
        for value in node.values():
            yield from _targets(value)
    elif isinstance(node, list):
        for value in node:
            yield from _targets(value)


def test_configs_use_only_monai_and_sdseg_targets_and_pinned_expressions(bundle):
    from monai.bundle import ConfigComponent

    for name in ("inference.json", "multi_gpu_inference.json"):
        config = json.loads((bundle / "configs" / name).read_text())
        assert {s for s in _strings(config) if s.startswith("$")} <= set(EXPRESSIONS)
        for target in _targets(config):
            located = ConfigComponent({"_target_": target}).resolve_module_name()
            module = located if isinstance(located, str) else getattr(located, "__module__", "")
            assert target.startswith("sdseg_monai.") or module.startswith("monai."), (target, module)
    assert not list(bundle.rglob("*.pkl")) and not (bundle / "scripts").exists()


def test_verify_metadata_passes_and_fails_without_a_required_field(bundle, tmp_path):
    from monai.bundle import verify_metadata

    verify_metadata(meta_file=str(bundle / "configs" / "metadata.json"), filepath=str(SCHEMA_PATH))
    broken = json.loads((bundle / "configs" / "metadata.json").read_text())
    del broken["authors"]
    (tmp_path / "metadata.json").write_text(json.dumps(broken))
    with pytest.raises(Exception, match="authors"):
        verify_metadata(meta_file=str(tmp_path / "metadata.json"), filepath=str(SCHEMA_PATH))


def test_verify_net_in_out_passes_and_fails_on_a_wrong_output_dtype(bundle, monkeypatch):
    from monai.bundle import verify_net_in_out

    monkeypatch.chdir(bundle)
    args = dict(net_id="network_def", meta_file="configs/metadata.json", config_file="configs/inference.json", device="cpu", any=8)
    verify_net_in_out(**args, bundle_root=str(bundle))
    with pytest.raises(ValueError, match="dtype"):
        verify_net_in_out(**args, bundle_root=str(bundle), **{"_meta_#network_data_format#outputs#pred#dtype": "float32"})


def test_infer_workflow_properties_runs_and_an_empty_dataset_folder(bundle, dataset, tmp_path):
    from monai.bundle import ConfigWorkflow

    def workflow(dataset_dir, out):
        flow = ConfigWorkflow(
            config_file=str(bundle / "configs" / "inference.json"), meta_file=str(bundle / "configs" / "metadata.json"),
            logging_file=str(bundle / "configs" / "logging.conf"), workflow_type="infer",
            bundle_root=str(bundle), dataset_dir=str(dataset_dir), output_dir=str(out),
        )
        flow.initialize()
        return flow

    flow = workflow(dataset, tmp_path / "out")
    assert not flow.check_properties()  # None or [] when every required property is there
    flow.run()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["case0_seg.nii.gz", "case1_seg.nii.gz"]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(RuntimeError) as failure:  # MONAI wraps what a component raises
        workflow(empty, tmp_path / "out2").run()
    assert isinstance(failure.value.__cause__, SDSegInputError)
    assert "no NIfTI (.nii/.nii.gz) files in the dataset folder" in str(failure.value.__cause__)
    with pytest.raises(SDSegInputError, match="no such dataset folder"):
        nifti_inputs(tmp_path / "missing")


class LPSSpaced:
    """What a reader set to LPS (ITKReader(affine_lps_to_ras=False)) hands over: the same voxels, the
    affine to LPS world coordinates, meta space LPS."""

    def __init__(self, keys: str):
        self.key = keys

    def __call__(self, data: dict) -> dict:
        from monai.data import MetaTensor

        image = data[self.key]
        lps = torch.as_tensor(np.diag([-1.0, -1.0, 1.0, 1.0]), dtype=image.affine.dtype) @ image.affine
        meta = {**image.meta, "space": "LPS", "affine": lps}
        return {**data, self.key: MetaTensor(image.as_tensor(), meta=meta, applied_operations=list(image.applied_operations))}


def test_an_lps_space_image_gives_the_same_masks(bundle, model_dir, dataset, tmp_path):
    """An LPS-space image (a reader set to LPS) is read as RAS by RASSpaced, so the masks are sdseg3d
    segment's. Without RASSpaced (negative control) the network sees it mirrored: other masks."""
    from monai.bundle import ConfigWorkflow

    reference = _segment_reference(model_dir, dataset, tmp_path)
    shipped = json.loads((bundle / "configs" / "inference.json").read_text())["preprocessing"]["transforms"]
    assert shipped[1]["_target_"] == "sdseg_monai.transforms.RASSpaced"
    as_lps = {"_target_": f"{__name__}.LPSSpaced", "keys": "image"}

    def run(out, transforms):
        flow = ConfigWorkflow(
            config_file=str(bundle / "configs" / "inference.json"), meta_file=str(bundle / "configs" / "metadata.json"),
            logging_file=str(bundle / "configs" / "logging.conf"), workflow_type="infer", bundle_root=str(bundle),
            dataset_dir=str(dataset), output_dir=str(out), **{"preprocessing#transforms": transforms},
        )
        flow.initialize()
        flow.run()

    run(tmp_path / "lps", [shipped[0], as_lps, *shipped[1:]])
    _assert_same_masks(tmp_path / "lps", reference)
    run(tmp_path / "mirrored", [shipped[0], as_lps, *shipped[2:]])
    with pytest.raises(AssertionError):
        _assert_same_masks(tmp_path / "mirrored", reference)


def test_bundle_run_from_another_directory_equals_sdseg3d_segment(bundle, model_dir, dataset, tmp_path):
    reference = _segment_reference(model_dir, dataset, tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = tmp_path / "out"
    result = _monai_bundle("run", "--config_file", str(bundle / "configs" / "inference.json"), "--bundle_root", str(bundle),
                           "--dataset_dir", str(dataset), "--output_dir", str(out), cwd=elsewhere)
    assert result.returncode == 0, result.stderr[-3000:]
    _assert_same_masks(out, reference)
    # A bundle folder is a --model like any saved model.
    via_bundle = tmp_path / "via_bundle.nii.gz"
    assert main(["segment", str(dataset / "case0.nii.gz"), "-o", str(via_bundle), "-m", str(bundle), "-q"]) == 0
    assert np.array_equal(np.asanyarray(nib.load(str(via_bundle)).dataobj), np.asanyarray(reference["case0"].dataobj))


def test_two_process_torchrun_on_cpu_equals_one_process(bundle, model_dir, dataset, tmp_path):
    reference = _segment_reference(model_dir, dataset, tmp_path)
    out = tmp_path / "out"
    configs = f"['{bundle / 'configs' / 'inference.json'}','{bundle / 'configs' / 'multi_gpu_inference.json'}']"
    result = _monai_bundle("run", "--config_file", configs, "--bundle_root", str(bundle), "--dataset_dir", str(dataset),
                           "--output_dir", str(out), cwd=tmp_path, torchrun=True)
    assert result.returncode == 0, result.stderr[-3000:]
    _assert_same_masks(out, reference)


def test_export_refuses_bad_models_and_writes_nothing(tmp_path, model_dir):
    with pytest.raises(SDSegInputError, match="not an SDSeg model folder"):
        export_bundle(tmp_path, tmp_path / "b")
    with pytest.raises(SDSegInputError, match="outside the model folder"):
        export_bundle(model_dir, model_dir / "b")
    assert not (tmp_path / "b").exists() and not list(tmp_path.glob(".b.*"))


@pytest.mark.skipif(not SHIPPED.is_dir(), reason="no shipped bundle in this checkout")
def test_shipped_bundle_is_the_packaged_default_model(tmp_path):
    from sdseg_monai.model import default_model_path

    fresh = export_bundle(default_model_path(), tmp_path / "fresh")
    names = ("configs/inference.json", "configs/multi_gpu_inference.json", "models/sdseg_config.json", "LICENSE", "docs/data_license.txt",
             "docs/README.md")  # the README carries the model card: a card edited without re-exporting fails here
    for name in names:
        assert (SHIPPED / name).read_text() == (fresh / name).read_text(), name
    shipped = torch.load(SHIPPED / "models" / "model.pt", weights_only=True)
    again = torch.load(fresh / "models" / "model.pt", weights_only=True)
    assert shipped.keys() == again.keys() and all(torch.equal(shipped[k], again[k]) for k in again)
    meta = json.loads((SHIPPED / "configs" / "metadata.json").read_text())
    assert meta["network_data_format"]["outputs"]["pred"]["channel_def"]["13"] == "left_adrenal_gland"
    assert meta["eval_metrics"], "the shipped bundle carries the model card's test metrics"


def test_zipped_bundle_installs_with_monai_bundle_download_and_runs(bundle, model_dir, dataset, tmp_path):
    import zipfile

    archive = tmp_path / "micro_bundle.zip"
    with zipfile.ZipFile(archive, "w") as zipped:
        for path in sorted(bundle.rglob("*")):
            zipped.write(path, Path("micro_bundle") / path.relative_to(bundle))
    installed = tmp_path / "installed"
    result = _monai_bundle("download", "--name", "micro_bundle", "--url", archive.as_uri(), "--bundle_dir", str(installed), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    root = installed / "micro_bundle"
    out = tmp_path / "out"
    result = _monai_bundle("run", "--config_file", str(root / "configs" / "inference.json"), "--bundle_root", str(root),
                           "--dataset_dir", str(dataset), "--output_dir", str(out), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    _assert_same_masks(out, _segment_reference(model_dir, dataset, tmp_path))


# The model zoo's own checker is not on PyPI and its code stays out of this repository: point
# SDSEG_MODEL_ZOO at a checkout of Project-MONAI/model-zoo to run it (README: "MONAI bundle").
MODEL_ZOO = Path(os.environ.get("SDSEG_MODEL_ZOO", "/nonexistent"))
ZOO_VERIFY = ("import sys; sys.path.insert(0, sys.argv[1] + '/ci'); import bundle_custom_data as custom; "
              "custom.exclude_verify_torchscript_list += sys.argv[3:]; from verify_bundle import verify; "
              "verify(sys.argv[2], 'models', 'full')")


def _zoo_verify(models: Path, name: str, *exclude_torchscript: str):
    return subprocess.run([sys.executable, "-c", ZOO_VERIFY, str(MODEL_ZOO), name, *exclude_torchscript],
                          capture_output=True, text=True, cwd=models.parent, timeout=600)


@pytest.mark.skipif(not (MODEL_ZOO / "ci" / "verify_bundle.py").is_file() or not SHIPPED.is_dir(),
                    reason="SDSEG_MODEL_ZOO names no model-zoo checkout")
def test_model_zoo_verify_bundle_full_mode(tmp_path):
    """The zoo's `verify(bundle, 'models', mode='full')`, set up the way its CI does (an empty
    model_info.json, the schema as eval/schema.json), with this bundle in its TorchScript exclusions."""
    models = tmp_path / "models"
    root = models / "sdseg_btcv"
    shutil.copytree(SHIPPED, root)
    (models / "model_info.json").write_text("{}")
    (root / "eval").mkdir()
    shutil.copyfile(SCHEMA_PATH, root / "eval" / "schema.json")

    result = _zoo_verify(models, "sdseg_btcv", "sdseg_btcv")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    for step in ("directory is verified correctly", "version and changelog are verified correctly",
                 "metadata format is verified correctly", "data shape is verified correctly",
                 "does not support torchscript, skip verifying"):
        assert step in result.stdout
    # Negative controls: TorchScript is really impossible (as docs/README.md says), and the zoo
    # refuses a bundle without its LICENSE or with a version missing from the changelog.
    result = _zoo_verify(models, "sdseg_btcv")
    assert result.returncode != 0 and "torch.jit" in result.stderr
    meta = json.loads((root / "configs" / "metadata.json").read_text())
    (root / "configs" / "metadata.json").write_text(json.dumps({**meta, "version": "9.9.9"}, indent=4))
    result = _zoo_verify(models, "sdseg_btcv", "sdseg_btcv")
    assert result.returncode != 0 and "is missing in 'changelog'" in result.stderr
    (root / "configs" / "metadata.json").write_text(json.dumps(meta, indent=4))
    (root / "LICENSE").unlink()
    result = _zoo_verify(models, "sdseg_btcv", "sdseg_btcv")
    assert result.returncode != 0 and "necessary file LICENSE is not existing" in result.stderr


@pytest.mark.parametrize("version", ["banana", "1.0", "1", "01.2.3", "1.2.3-rc.1", "1.2.3+build", " 1.2.3", "v1.2.3", "", 1])
def test_a_version_that_is_not_major_minor_patch_is_refused_up_front(version, model_dir, tmp_path, monkeypatch, capfd):
    """The model zoo's bundles are versioned MAJOR.MINOR.PATCH; before, any text went into metadata.json.
    Refused before the model is read, by the API and by the CLI (one line, exit 2), nothing written."""
    import sdseg_monai.bundle as bundle

    read = []
    monkeypatch.setattr(bundle, "model_files", lambda *a: read.append(a) or pytest.fail("the model was read first"))
    with pytest.raises(SDSegInputError, match="bundle version must be MAJOR.MINOR.PATCH"):
        export_bundle(model_dir, tmp_path / "b", version=version)
    if isinstance(version, str):
        assert main(["export-bundle", str(model_dir), "-o", str(tmp_path / "b"), "--version", version]) == 2
        err = capfd.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "'--version'" in err and "MAJOR.MINOR.PATCH" in err, err
    assert not read and not list(tmp_path.iterdir())


def test_a_major_minor_patch_version_is_written(model_dir, tmp_path, capfd):
    """The control: 10.0.3 is taken, as the metadata's version and its changelog's key."""
    assert main(["export-bundle", str(model_dir), "-o", str(tmp_path / "b"), "--version", "10.0.3"]) == 0
    meta = json.loads((tmp_path / "b" / "configs" / "metadata.json").read_text())
    assert meta["version"] == "10.0.3" and list(meta["changelog"]) == ["10.0.3"]
