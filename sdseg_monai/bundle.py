"""SDSeg models as MONAI bundles: the volume-level network a bundle config runs, and the export.

A bundle made by :func:`export_bundle` follows the MONAI bundle specification and the model zoo's
layout; its code is this installed package, so it has no ``scripts/`` and runs from any directory::

    LICENSE
    configs/metadata.json            MONAI metadata schema 20240725
    configs/inference.json           LoadImaged -> RASSpaced -> Orientationd -> window -> network -> Invertd -> SaveImaged
    configs/multi_gpu_inference.json overlay for torchrun (one process per GPU, gloo without GPUs)
    configs/logging.conf
    models/model.pt                  a plain dict of tensors (torch.load(weights_only=True))
    models/sdseg_config.json         architecture, organs, preprocessing, calibrated postprocessing
    docs/README.md, docs/data_license.txt

Config files name only ``monai.*`` and ``sdseg_monai.*`` targets and a few ``$`` expressions
(:data:`EXPRESSIONS`), and nothing is pickled.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sdseg_monai.config import SDSegConfig
from sdseg_monai.data import NIFTI_SUFFIXES
from sdseg_monai.errors import SDSegInputError
from sdseg_monai.model import (
    BUNDLE_CONFIG_NAME,
    BUNDLE_WEIGHTS_NAME,
    EVALUATION_NAME,
    SDSeg,
    check_output_folder,
    file_sha256,
    model_files,
    replace_dir,
)
from sdseg_monai.transforms import AXIS_LABELS

SCHEMA_URL = "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20240725.json"
SCHEMA_PATH = Path(__file__).resolve().parent / "schema" / "meta_schema_20240725.json"
LICENSE_FILE = Path(__file__).resolve().parent / "LICENSE"  # the project's Apache-2.0 licence, whole
BUNDLE_VERSION = "0.1.0"
SEMVER = re.compile(r"(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)")  # MAJOR.MINOR.PATCH, no leading zeros
PAPER = ("Lin T, Chen Z, Yan Z, Yu W, Zheng F. Stable Diffusion Segmentation for Biomedical Images with "
         "Single-step Reverse Process. MICCAI 2024. arXiv:2406.18361")
TOTALSEGMENTATOR = ("Wasserthal J, et al. TotalSegmentator: Robust Segmentation of 104 Anatomic Structures in "
                    "CT Images. Radiology: Artificial Intelligence 2023")
# Every `$` expression the configs hold (a test pins this set): the usual model-zoo idioms, nothing else.
OUTPUT_DIR = "$@bundle_root + '/eval'"
DEVICE = "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')"
CONFIG_FILE = f"$@bundle_root + '/{BUNDLE_CONFIG_NAME}'"
WEIGHTS_FILE = f"$@bundle_root + '/{BUNDLE_WEIGHTS_NAME}'"
NETWORK = "$@network_def.to(@device)"
RUN = "$@evaluator.run()"
IMPORT_OS = "$import os"
IMPORT_DIST = "$import torch.distributed as dist"
LOCAL_DEVICE = "$torch.device('cuda:' + os.environ.get('LOCAL_RANK', '0') if torch.cuda.is_available() else 'cpu')"
INIT_PROCESS_GROUP = "$dist.is_initialized() or dist.init_process_group(backend='nccl' if torch.cuda.is_available() else 'gloo')"
SET_CUDA_DEVICE = "$torch.cuda.set_device(@device) if torch.cuda.is_available() else None"
RANK_ZERO_HANDLERS = "$@handlers[: 1 if dist.get_rank() > 0 else None]"  # rank > 0 keeps the CheckpointLoader only
DESTROY_PROCESS_GROUP = "$dist.is_initialized() and dist.destroy_process_group()"
EXPRESSIONS = (
    OUTPUT_DIR, DEVICE, CONFIG_FILE, WEIGHTS_FILE, NETWORK, RUN, IMPORT_OS, IMPORT_DIST, LOCAL_DEVICE,
    INIT_PROCESS_GROUP, SET_CUDA_DEVICE, RANK_ZERO_HANDLERS, DESTROY_PROCESS_GROUP,
)


class SDSegVolumeNetwork(SDSeg):
    """SDSeg as a MONAI bundle's network: a canonical, windowed CT volume in, its label map out.

    The weights are :class:`SDSeg`'s (same state-dict keys), so a bundle's ``models/model.pt`` is the
    saved model's tensors. Forward runs what ``sdseg3d segment`` runs between the windowing and the
    reorientation back: one-step inference over every axial slice and organ, then the model's
    calibrated postprocessing.

    Args:
        config_file: the model's ``sdseg_config.json``.
        seed: seed of the diffusion noise (same input, weights and seed: bit-identical labels).
        batch_size: (slice, organ) pairs per forward pass (None: automatic for the device).
        postprocess: apply the calibrated postprocessing (False: SDSeg's rounding at 0.5).
        num_shifts: test-time shifts averaged (1, 2 or 4).
    """

    def __init__(self, config_file: str | os.PathLike, seed: int = 0, batch_size: int | None = None,
                 postprocess: bool = True, num_shifts: int = 1):
        config = SDSegConfig.from_json_file(config_file)
        if config.latent_scale is None:
            raise SDSegInputError("model config has no latent_scale", config_file)
        super().__init__(config)
        self.options = {"seed": int(seed), "batch_size": batch_size, "postprocess": bool(postprocess), "num_shifts": int(num_shifts)}
        self.eval()

    def forward(self, volume: torch.Tensor) -> torch.Tensor:
        """(B, 1, X, Y, Z) canonical volume windowed to [-1, 1] -> (B, 1, X, Y, Z) uint8 label map,
        a ``MetaTensor`` carrying the input's metadata (so ``Invertd`` and ``SaveImaged`` place it)."""
        from monai.data import MetaTensor

        from sdseg_monai.inference import VolumeSegmenter

        if volume.ndim != 5 or volume.shape[1] != 1:
            raise SDSegInputError(f"expected a (B, 1, X, Y, Z) volume, got shape {tuple(volume.shape)}")
        segmenter = VolumeSegmenter(self, device=self.device, copy_model=False, **self.options)  # the network itself, as MONAI loaded it
        labels = torch.stack([segmenter.segment_canonical(item) for item in volume])
        labels = labels[:, None].to(volume.device)
        if isinstance(volume, MetaTensor):
            return MetaTensor(labels, meta=volume.meta, applied_operations=volume.applied_operations)
        return labels


def nifti_inputs(dataset_dir: str | os.PathLike) -> list[dict[str, str]]:
    """The bundle's data list: ``[{"image": path}]`` for every NIfTI file in ``dataset_dir``, sorted."""
    folder = Path(dataset_dir)
    if not folder.is_dir():
        raise SDSegInputError("no such dataset folder (give --dataset_dir DIR holding .nii/.nii.gz files)", folder)
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.name.lower().endswith(NIFTI_SUFFIXES))
    if not files:
        raise SDSegInputError("no NIfTI (.nii/.nii.gz) files in the dataset folder", folder)
    return [{"image": str(p)} for p in files]


def inference_config(config: SDSegConfig) -> dict[str, Any]:
    """``configs/inference.json``: the model zoo's inference idiom for ``config``'s model."""
    low, high = config.preprocessing.hu_window
    preprocessing = [
        {"_target_": "LoadImaged", "keys": "image", "image_only": True, "ensure_channel_first": True},
        # A reader set to LPS (affine_lps_to_ras=False) would otherwise be reoriented mirrored.
        {"_target_": "sdseg_monai.transforms.RASSpaced", "keys": "image"},
        {"_target_": "Orientationd", "keys": "image", "axcodes": config.preprocessing.orientation, "labels": [list(a) for a in AXIS_LABELS]},
        {"_target_": "sdseg_monai.transforms.FillNonFinited", "keys": "image", "value": low},
        {"_target_": "ScaleIntensityRanged", "keys": "image", "a_min": low, "a_max": high, "b_min": -1.0, "b_max": 1.0, "clip": True},
    ]
    postprocessing = [
        {"_target_": "Invertd", "keys": "pred", "transform": "@preprocessing", "orig_keys": "image", "nearest_interp": True, "to_tensor": True},
        {"_target_": "SaveImaged", "keys": "pred", "output_dir": "@output_dir", "output_postfix": "seg", "output_ext": ".nii.gz",
         "output_dtype": "uint8", "resample": False, "separate_folder": False, "print_log": False},
    ]
    return {
        "bundle_root": ".",
        "output_dir": OUTPUT_DIR,
        "dataset_dir": "/workspace/data",
        "device": DEVICE,
        "seed": 0,
        "network_def": {"_target_": "sdseg_monai.bundle.SDSegVolumeNetwork", "config_file": CONFIG_FILE, "seed": "@seed"},
        "network": NETWORK,
        "preprocessing": {"_target_": "Compose", "transforms": preprocessing},
        "datalist": {"_target_": "sdseg_monai.bundle.nifti_inputs", "dataset_dir": "@dataset_dir"},
        "dataset": {"_target_": "Dataset", "data": "@datalist", "transform": "@preprocessing"},
        "dataloader": {"_target_": "DataLoader", "dataset": "@dataset", "batch_size": 1, "shuffle": False, "num_workers": 0},
        "inferer": {"_target_": "SimpleInferer"},
        "postprocessing": {"_target_": "Compose", "transforms": postprocessing},
        "handlers": [
            {"_target_": "CheckpointLoader", "load_path": WEIGHTS_FILE, "load_dict": {"model": "@network"}, "map_location": "@device"},
            {"_target_": "StatsHandler", "iteration_log": False},
        ],
        "evaluator": {
            "_target_": "SupervisedEvaluator",
            "device": "@device",
            "val_data_loader": "@dataloader",
            "network": "@network",
            "inferer": "@inferer",
            "postprocessing": "@postprocessing",
            "val_handlers": "@handlers",
            "amp": False,
        },
        "initialize": [],
        "run": [RUN],
    }


def multi_gpu_config() -> dict[str, Any]:
    """``configs/multi_gpu_inference.json``: overlay for ``torchrun --nproc_per_node N``. Each process
    takes its own cases (a sampler that neither pads nor shuffles) on its local GPU, or the CPU with
    gloo; only rank 0 logs."""
    return {
        "imports": [IMPORT_OS, IMPORT_DIST],
        "device": LOCAL_DEVICE,
        "sampler": {"_target_": "DistributedSampler", "dataset": "@dataset", "even_divisible": False, "shuffle": False},
        "dataloader#sampler": "@sampler",
        "evaluator#val_handlers": RANK_ZERO_HANDLERS,
        "initialize": [INIT_PROCESS_GROUP, SET_CUDA_DEVICE],
        "run": [RUN],
        "finalize": [DESTROY_PROCESS_GROUP],
    }


LOGGING_CONF = """[loggers]
keys=root

[handlers]
keys=consoleHandler

[formatters]
keys=fullFormatter

[logger_root]
level=INFO
handlers=consoleHandler

[handler_consoleHandler]
class=StreamHandler
level=INFO
formatter=fullFormatter
args=(sys.stdout,)

[formatter_fullFormatter]
format=%(asctime)s - %(name)s - %(levelname)s - %(message)s
"""

DATA_LICENSE = f"""Data used to train the packaged default model
==============================================

1. Synthetic abdominal CT phantoms generated by sdseg3d (`sdseg3d phantom`): no third-party data.

2. One public abdominal CT with organ labels, from the TotalSegmentator test reference files
   (repository licence Apache-2.0; the public TotalSegmentator dataset is licensed CC BY 4.0,
   https://creativecommons.org/licenses/by/4.0/). Its labels are the output of an automatic model
   remapped to BTCV indices, not manual annotations.
   Attribution: {TOTALSEGMENTATOR}.

A model exported from other training data carries that data's licence instead: edit this file.
"""


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    from sdseg_monai._version import __version__

    found = {"sdseg3d": __version__}
    for name in ("diffusers", "safetensors", "nibabel", "scipy", "pytorch-ignite", "fire", "jsonschema"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            pass
    return found


def metadata(config: SDSegConfig, weights_sha256: str, eval_metrics: dict[str, Any] | None = None,
             version: str = BUNDLE_VERSION) -> dict[str, Any]:
    """``configs/metadata.json`` for ``config``'s model (every field of the 20240725 schema)."""
    import monai

    labels = {str(label): name for label, name in zip(config.organ_labels, config.organ_names)}
    classes = f"0 background, {', '.join(f'{k} {v}' for k, v in labels.items())}"
    low, high = config.preprocessing.hu_window
    names = ", ".join(config.organ_names)
    return {
        "schema": SCHEMA_URL,
        "version": version,
        "changelog": {version: "first bundle of this model, exported by sdseg3d export-bundle"},
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": np.__version__,
        "required_packages_version": _versions(),
        "supported_apps": {},
        "name": f"SDSeg {config.dataset or 'CT'} segmentation",
        "task": f"Segmentation of {len(labels)} structures in CT with SDSeg (single-step latent diffusion)",
        "description": (
            "SDSeg (Stable Diffusion Segmentation, single-step reverse process) on axial CT slices: a frozen "
            "autoencoder's latent of each organ mask is predicted by a latent denoising UNet from the image "
            "latent in one reverse step at t = T-1, then decoded; slices x organs are batched, and the label "
            "map goes back to the input's exact grid. The network is sdseg_monai.bundle.SDSegVolumeNetwork "
            "(pip install sdseg3d)."
        ),
        "authors": "sdseg3d contributors",
        "copyright": "Copyright (c) sdseg3d contributors",
        "data_source": "Synthetic abdominal CT phantoms (sdseg3d phantom) and one public CT of the TotalSegmentator test data (CC BY 4.0)",
        "data_type": "nibabel",
        "image_classes": f"single channel CT in Hounsfield units, windowed to [{low:g}, {high:g}] HU and scaled to [-1, 1]",
        "label_classes": f"label map: {classes}",
        "pred_classes": f"label map on the input's grid: {classes}",
        "eval_metrics": dict(eval_metrics or {}),
        "intended_use": f"Research and pipeline testing only; not for clinical use. Segments {names}.",
        "references": [PAPER],
        "network_data_format": {
            "inputs": {
                "image": {
                    "type": "image",
                    "format": "hounsfield",
                    "modality": "CT",
                    "num_channels": 1,
                    "spatial_shape": ["*", "*", "*"],
                    "dtype": "float32",
                    "value_range": [-1, 1],
                    "is_patch_data": False,
                    "channel_def": {"0": "image"},
                }
            },
            "outputs": {
                "pred": {
                    "type": "image",
                    "format": "labels",
                    "num_channels": 1,
                    "spatial_shape": ["*", "*", "*"],
                    "dtype": "uint8",
                    "value_range": [0, max(config.organ_labels)],
                    "is_patch_data": False,
                    "channel_def": {"0": "background", **labels},
                }
            },
        },
        "sdseg3d": {"weights_sha256": weights_sha256, "seed": 0},
    }


def bundle_readme(config: SDSegConfig, weights_sha256: str, model_card: str | None) -> str:
    labels = "\n".join(f"| {label} | {name.replace('_', ' ')} |" for label, name in zip(config.organ_labels, config.organ_names))
    card = f"\n## Model card\n\n{model_card.strip()}\n" if model_card else ""
    return f"""# SDSeg {config.dataset or 'CT'} segmentation (MONAI bundle)

SDSeg (Lin et al., MICCAI 2024, arXiv:2406.18361) for CT: one reverse diffusion step in the latent
space of an autoencoder per (axial slice, organ), then one decode. Exported by `sdseg3d export-bundle`.
**Research use only, not for clinical use.**

## Requirements

`pip install "sdseg3d[bundle]"`: the network is `sdseg_monai.bundle.SDSegVolumeNetwork` from the
installed package (no `scripts/` folder), so the bundle runs from any working directory, offline.

## Inference

```bash
python -m monai.bundle run --config_file configs/inference.json --bundle_root . \\
    --dataset_dir /path/to/niftis --output_dir /path/to/out
```

Every `.nii`/`.nii.gz` in the dataset folder gets `<name>_seg.nii.gz`: a uint8 label map on the
input's exact grid, identical to `sdseg3d segment` with the same model and seed. On several GPUs:

```bash
torchrun --nproc_per_node N -m monai.bundle run \\
    --config_file "['configs/inference.json','configs/multi_gpu_inference.json']" \\
    --bundle_root . --dataset_dir /path/to/niftis --output_dir /path/to/out
```

`sdseg3d segment scan.nii.gz -o mask.nii.gz --model <this folder>` uses the same weights.

## Labels

| value | structure |
|---|---|
| 0 | background |
{labels}

## Weights

`models/model.pt` is a plain dict of tensors (`torch.load(path, weights_only=True)`), sha256
`{weights_sha256}`; `models/sdseg_config.json` holds the architecture, organs, preprocessing and
calibrated postprocessing.

TorchScript export is not possible: the network is built from diffusers modules and runs a Python
loop over slices and organs, which `torch.jit.script` does not support. For the model zoo's
`ci/verify_bundle.py`, list this bundle in `exclude_verify_torchscript_list`; its other checks
(files, version and changelog, metadata schema, properties, network input and output) pass.
{card}"""


def check_bundle_version(version) -> str:
    """``version`` if it is MAJOR.MINOR.PATCH (semantic versioning without pre-release or build
    parts, as the MONAI model zoo's bundles have), e.g. ``0.1.0``.

    Raises:
        SDSegInputError: any other version.
    """
    if not isinstance(version, str) or not SEMVER.fullmatch(version):
        raise SDSegInputError(f"bundle version must be MAJOR.MINOR.PATCH (semantic versioning, as the MONAI model zoo "
                              f"requires), e.g. {BUNDLE_VERSION}; got {version!r}")
    return version


def export_bundle(model_dir: str | os.PathLike, output: str | os.PathLike, eval_metrics: dict[str, Any] | None = None,
                  version: str = BUNDLE_VERSION) -> Path:
    """Write the MONAI bundle of saved model ``model_dir`` (a model folder or a bundle) to folder
    ``output``, atomically (a failure leaves no half-written bundle; an existing one is replaced whole).

    Args:
        model_dir: a saved SDSeg model folder.
        output: the bundle folder.
        eval_metrics: the metadata's ``eval_metrics`` (default: the model folder's ``evaluation.json``
            ``metrics`` if present, else empty).
        version: the bundle version, MAJOR.MINOR.PATCH (see :func:`check_bundle_version`).

    Raises:
        SDSegInputError: a version that is not MAJOR.MINOR.PATCH, a bad model folder or output (before
            anything is written).
    """
    from sdseg_monai.weights import read_state_dict

    check_bundle_version(version)
    model_dir, output = Path(model_dir), Path(output)
    config_path, weights_path = model_files(model_dir)
    config = SDSegConfig.from_json_file(config_path)
    if output.resolve() == model_dir.resolve() or model_dir.resolve() in output.resolve().parents:
        raise SDSegInputError("the bundle folder must lie outside the model folder", output)
    check_output_folder(output, model_dir)
    if not output.parent.is_dir():
        raise SDSegInputError("cannot write the bundle: its parent folder does not exist", output)
    SDSeg.from_pretrained(model_dir)  # refuses weights that do not fit the config, before writing
    state = read_state_dict(weights_path)  # as stored (float16 for the packaged model)
    if eval_metrics is None and (model_dir / EVALUATION_NAME).is_file():
        eval_metrics = json.loads((model_dir / EVALUATION_NAME).read_text(encoding="utf-8")).get("metrics", {})
    card_path = model_dir / "MODEL_CARD.md"
    model_card = card_path.read_text(encoding="utf-8") if card_path.is_file() else None

    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        for folder in ("configs", "models", "docs"):
            (tmp / folder).mkdir()
        torch.save({k: v.contiguous() for k, v in state.items()}, tmp / BUNDLE_WEIGHTS_NAME)
        sha = file_sha256(tmp / BUNDLE_WEIGHTS_NAME)
        (tmp / BUNDLE_CONFIG_NAME).write_text(config.to_json_string(), encoding="utf-8")
        write = lambda name, data: (tmp / name).write_text(json.dumps(data, indent=4) + "\n", encoding="utf-8")  # noqa: E731
        write("configs/metadata.json", metadata(config, sha, eval_metrics, version))
        write("configs/inference.json", inference_config(config))
        write("configs/multi_gpu_inference.json", multi_gpu_config())
        (tmp / "configs" / "logging.conf").write_text(LOGGING_CONF, encoding="utf-8")
        shutil.copyfile(LICENSE_FILE, tmp / "LICENSE")
        (tmp / "docs" / "README.md").write_text(bundle_readme(config, sha, model_card), encoding="utf-8")
        (tmp / "docs" / "data_license.txt").write_text(DATA_LICENSE, encoding="utf-8")
        replace_dir(tmp, output, model_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return output
