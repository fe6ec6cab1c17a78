"""Shared fixtures: tiny SDSeg configs that build and run in milliseconds on a CPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

# Same layout as the real presets (f=8 kl autoencoder, concat-fusion UNet), at toy width.
MICRO_AUTOENCODER = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [8, 16, 16, 16],
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 8,
    "sample_size": 32,
}

MICRO_UNET = {
    "sample_size": 4,
    "in_channels": 8,
    "out_channels": 4,
    "block_out_channels": [32, 32],
    "layers_per_block": 1,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
    "up_block_types": ["AttnUpBlock2D", "UpBlock2D"],
    "attention_head_dim": 8,
    "norm_num_groups": 8,
    "resnet_time_scale_shift": "scale_shift",
}

MICRO_COND_UNET = {
    "sample_size": 4,
    "in_channels": 8,
    "out_channels": 4,
    "block_out_channels": [32, 32],
    "layers_per_block": 1,
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "cross_attention_dim": 16,
    "attention_head_dim": 8,
    "norm_num_groups": 8,
}


def micro_config(organs=("liver", "spleen", "left_kidney"), backbone="unet2d", **overrides):
    """An SDSegConfig of the real layout at toy size: 32x32 slices, 4x4x4 latents."""
    from sdseg_monai.config import SDSegConfig, organs_from

    chosen, dataset = organs_from("btcv", list(organs))
    unet = MICRO_COND_UNET if backbone == "unet2d_condition" else MICRO_UNET
    settings = dict(
        backbone=backbone,
        autoencoder=dict(MICRO_AUTOENCODER),
        unet=dict(unet),
        organs=chosen,
        dataset=dataset,
        latent_scale=0.5,
        preprocessing={"hu_window": (-175, 250), "slice_size": 32},
    )
    settings.update(overrides)
    return SDSegConfig(**settings)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Toy convolutions gain nothing from intra-op threads, and on a busy 2-core machine OpenMP's
    spinning threads slow them up to 10x. For a module: ``pytestmark = pytest.mark.usefixtures(...)``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """A saved 2-organ (spleen, liver) micro model with seeded random weights (read-only)."""
    from sdseg_monai.model import SDSeg

    torch.manual_seed(0)
    model = SDSeg(micro_config(organs=("spleen", "liver"), preprocessing={"hu_window": (-175, 250), "slice_size": 32}))
    return model.save_pretrained(tmp_path_factory.mktemp("models") / "micro")


def labelled_scan(shape=(24, 20, 4)):
    """A small CT-like volume (HU, X Y Z) with spleen (1) and liver (6) blocks, its labels and affine."""
    import numpy as np

    rng = np.random.default_rng(0)
    labels = np.zeros(shape, dtype=np.uint8)
    labels[4:14, 3:12] = 6
    labels[15:21, 12:18] = 1
    image = np.where(labels > 0, 60.0, -100.0) + rng.normal(0, 5, labels.shape)
    affine = np.array([[-1.5, 0, 0, 10], [0, -1.5, 0, -4], [0, 0, 3.0, 7], [0, 0, 0, 1]])
    return image, labels, affine


@pytest.fixture
def micro_model():
    """A 3-organ SDSeg model with seeded random weights, in eval mode."""
    from sdseg_monai.model import SDSeg

    torch.manual_seed(0)
    return SDSeg(micro_config()).eval()


@pytest.fixture
def slices():
    """Four 3-channel image slices in [-1, 1] at the micro model's size."""
    generator = torch.Generator().manual_seed(1)
    return torch.rand((4, 3, 32, 32), generator=generator) * 2 - 1


def blob_masks(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    """Binary disc masks of random centre and radius, (n, size, size)."""
    generator = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    centres = torch.rand((n, 2), generator=generator) * size * 0.6 + size * 0.2
    radii = torch.rand(n, generator=generator) * size * 0.25 + size * 0.1
    dist = (yy[None] - centres[:, 0, None, None]) ** 2 + (xx[None] - centres[:, 1, None, None]) ** 2
    return (dist < radii[:, None, None] ** 2).float()


@pytest.fixture
def no_default_model(monkeypatch):
    """This build as if it shipped no packaged default model."""
    import sdseg_monai.demo
    import sdseg_monai.model

    monkeypatch.setattr(sdseg_monai.model, "default_model_path", lambda: None)
    monkeypatch.setattr(sdseg_monai.demo, "default_model_path", lambda: None)
