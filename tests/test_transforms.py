"""Slice-level transforms: channel modes, the in-plane geometry and label fusion."""

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from sdseg_monai.config import Preprocessing
from sdseg_monai.transforms import SliceGeometry, axial_slices, canonical_transforms, fuse_probabilities


def test_hu_window_maps_to_minus_one_one_and_clips():
    volume = MetaTensor(torch.tensor([-1000.0, -175.0, 37.5, 250.0, 3000.0]).reshape(1, 5, 1, 1), affine=torch.eye(4))
    out = canonical_transforms(Preprocessing(hu_window=(-175, 250)))({"image": volume})["image"]
    assert out.flatten().tolist() == pytest.approx([-1.0, -1.0, 0.0, 1.0, 1.0])
    sts = canonical_transforms(Preprocessing(hu_window=(-100, 1100)))({"image": volume})["image"]
    assert sts.flatten()[2].item() == pytest.approx((37.5 + 100) / 1200 * 2 - 1)


def test_replicate_and_two_and_a_half_d_channels():
    volume = torch.arange(4 * 3 * 5, dtype=torch.float32).reshape(1, 4, 3, 5)
    grey = axial_slices(volume, [0, 4], "replicate")
    assert grey.shape == (2, 3, 4, 3)
    assert torch.equal(grey[1, 0], volume[0, :, :, 4]) and torch.equal(grey[1, 0], grey[1, 2])
    stacked = axial_slices(volume, [0, 2, 4], "2.5d")
    assert torch.equal(stacked[1, 0], volume[0, :, :, 1]) and torch.equal(stacked[1, 2], volume[0, :, :, 3])
    assert torch.equal(stacked[0, 0], volume[0, :, :, 0])  # the edge slice repeats at the ends
    assert torch.equal(stacked[2, 2], volume[0, :, :, 4])


@pytest.mark.parametrize("shape", [(64, 64), (40, 64), (97, 131), (300, 260)])
def test_slice_geometry_keeps_aspect_and_inverts(shape):
    geometry = SliceGeometry(shape, 128)
    mask = torch.zeros(1, *shape)
    x0, y0 = shape[0] // 4, shape[1] // 4
    mask[0, x0 : x0 + shape[0] // 2, y0 : y0 + shape[1] // 2] = 1
    model_space = geometry.masks_to_model(mask)
    assert model_space.shape == (1, 128, 128)
    back = geometry.from_model(model_space[:, None])[:, 0]
    assert back.shape == (1, *shape)
    recovered = back >= 0.5
    dice = 2 * (recovered & (mask > 0)).sum() / (recovered.sum() + mask.sum())
    assert dice >= 0.98
    # Padding keeps the aspect ratio: a square stays a square in model space.
    square = torch.zeros(1, *shape)
    side = min(shape) // 2
    square[0, :side, :side] = 1
    ms = geometry.masks_to_model(square)[0]
    rows, cols = ms.any(1).sum().item(), ms.any(0).sum().item()
    assert abs(rows - cols) <= 1


def test_identity_geometry_is_exact():
    geometry = SliceGeometry((32, 32), 32)
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(geometry.to_model(x), x) and torch.equal(geometry.from_model(x), x)


def test_fusion_is_argmax_over_organs_above_threshold():
    probs = torch.tensor([[0.6, 0.2, 0.4], [0.7, 0.9, 0.1]]).reshape(2, 3, 1, 1).permute(1, 0, 2, 3)  # (n=3, K=2)
    labels = fuse_probabilities(probs, [6, 1]).flatten().tolist()
    assert labels == [1, 1, 0]  # 0.7 vs 0.6 -> organ 2 (label 1); 0.9 vs 0.2 -> label 1; max 0.4 < 0.5 -> background
    assert fuse_probabilities(torch.full((1, 2, 1, 1), 0.5), [6, 1]).item() == 6
    assert fuse_probabilities(torch.zeros(1, 1, 2, 2), np.array([3])).dtype == torch.uint8
