"""sdseg3d: SDSeg (Stable Diffusion Segmentation, single-step reverse process) for 3D CT on MONAI.

Lin et al., "Stable Diffusion Segmentation for Biomedical Images with Single-step Reverse Process",
MICCAI 2024, arXiv:2406.18361.

Importing the package sets ``HF_HUB_OFFLINE=1`` before diffusers is loaded: nothing is ever downloaded.
Heavy modules (torch, diffusers) load on first use, so label listings stay instant.
"""

from sdseg_monai import _offline  # noqa: F401  (must precede any diffusers import)
from sdseg_monai._version import __version__
from sdseg_monai.errors import SDSegInputError, WeightsError

_LAZY = {
    "SDSeg": "sdseg_monai.model",
    "SDSegConfig": "sdseg_monai.config",
    "Preprocessing": "sdseg_monai.config",
    "Postprocessing": "sdseg_monai.config",
    "model_preset": "sdseg_monai.config",
    "dataset_preset": "sdseg_monai.labels",
    "load_autoencoder": "sdseg_monai.weights",
    "load_unet": "sdseg_monai.weights",
    "sdseg_from_pretrained_parts": "sdseg_monai.weights",
}

__all__ = ["__version__", "SDSegInputError", "WeightsError", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'sdseg_monai' has no attribute {name!r}")
