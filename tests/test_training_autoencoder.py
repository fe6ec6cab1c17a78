"""Stage-0 training of the tiny mask autoencoder: phantoms, loss, Dice conventions, real-CT slicing."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sdseg_monai.phantoms import random_organ_masks
from sdseg_monai.training import (
    binary_dice,
    decoded_to_probabilities,
    init_posterior_logvar,
    mask_autoencoder_loss,
    mask_reconstruction_dice,
    organ_masks_from_label_volume,
    train_mask_autoencoder,
)

# A much smaller autoencoder of the same layout as TINY_AUTOENCODER (f=8, 4 latent channels): the
# loss and training tests check plumbing and learning, not capacity, and must run in seconds.
SMALL_AUTOENCODER = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [8, 8, 16, 16],
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 4,
    "sample_size": 32,
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def small_autoencoder(seed: int = 0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL.from_config(SMALL_AUTOENCODER)


# -- phantoms ----------------------------------------------------------------------------------------
def test_random_organ_masks_shape_binary_deterministic():
    a = random_organ_masks(40, size=64, seed=3)
    assert a.shape == (40, 64, 64) and a.dtype == torch.float32
    assert set(a.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(a, random_organ_masks(40, size=64, seed=3))
    # Mask i does not depend on how many masks are drawn.
    assert torch.equal(a[:7], random_organ_masks(7, size=64, seed=3))
    assert not torch.equal(a, random_organ_masks(40, size=64, seed=4))


def test_random_organ_masks_variety():
    masks = random_organ_masks(300, size=128, seed=0)
    area = masks.flatten(1).sum(1)
    assert 0 < int((area == 0).sum()) < 40  # some empty masks, not too many
    nonempty = area[area > 0]
    assert nonempty.min() <= 10  # adrenal / vessel sized
    assert nonempty.max() >= 2000  # liver sized
    assert nonempty.max() < 128 * 128 / 2


def test_random_organ_masks_edge_cases():
    assert random_organ_masks(0, size=32).shape == (0, 32, 32)
    with pytest.raises(ValueError):
        random_organ_masks(2, size=4)


# -- Dice conventions -----------------------------------------------------------------------------------
def test_binary_dice_conventions():
    empty = torch.zeros(8, 8)
    blob = torch.zeros(8, 8)
    blob[2:5, 2:6] = 1
    half = torch.zeros(8, 8)
    half[2:5, 2:4] = 1  # 6 of the blob's 12 pixels
    pred = torch.stack([blob, empty, blob, empty, half])
    target = torch.stack([blob, empty, empty, blob, blob])
    dice = binary_dice(pred, target)
    assert dice[0] == 1.0  # perfect
    assert math.isnan(dice[1])  # both empty: no information, excluded from means
    assert dice[2] == 0.0  # false positive on an empty mask
    assert dice[3] == 0.0  # missed organ
    assert dice[4] == pytest.approx(2 * 6 / (6 + 12))
    assert torch.nanmean(dice) == pytest.approx((1 + 0 + 0 + 2 / 3) / 4)
    assert binary_dice(pred.bool(), target.bool()).nan_to_num(-1).tolist() == dice.nan_to_num(-1).tolist()
    with pytest.raises(ValueError):
        binary_dice(pred, target[:2])


class _StubPosterior:
    def __init__(self, mean):
        self.mean = mean


class _StubOutput:
    def __init__(self, latent_dist=None, sample=None):
        self.latent_dist = latent_dist
        self.sample = sample


class IdentityAutoencoder(torch.nn.Module):
    """Encodes X unchanged; decodes to ``scale * X + offset``: controls the reconstruction exactly."""

    def __init__(self, scale=1.0, offset=0.0):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(()))
        self.scale, self.offset = scale, offset

    def encode(self, x):
        return _StubOutput(latent_dist=_StubPosterior(x))

    def decode(self, z):
        return _StubOutput(sample=self.scale * z + self.offset)


def test_mask_reconstruction_dice_conventions_with_stub():
    blob = torch.zeros(16, 16)
    blob[4:9, 3:12] = 1
    masks = torch.stack([blob, torch.zeros(16, 16)])
    # Perfect reconstruction (even with outputs far beyond +-1: the inference mapping clamps).
    dice = mask_reconstruction_dice(IdentityAutoencoder(scale=5.0), masks, batch_size=1)
    assert dice[0] == 1.0 and math.isnan(dice[1])
    # Everything decoded as foreground: the empty mask scores 0, the blob its Dice against all-ones.
    dice = mask_reconstruction_dice(IdentityAutoencoder(scale=0.0, offset=1.0), masks)
    assert dice[1] == 0.0
    assert dice[0] == pytest.approx(2 * 45 / (45 + 256))
    # Exactly 0.5 probability is background (threshold is prob > 0.5).
    dice = mask_reconstruction_dice(IdentityAutoencoder(scale=0.0, offset=0.0), masks)
    assert dice[0] == 0.0 and math.isnan(dice[1])


def test_inference_mapping_uses_clamped_channels():
    # Channel mean of the raw output is positive here, of the clamped output negative: inference
    # (clamp, [0, 1], mean) must call it background.
    decoded = torch.tensor([5.0, -1.0, -1.0]).reshape(1, 3, 1, 1)
    assert decoded.mean() > 0
    assert decoded_to_probabilities(decoded).item() == pytest.approx(1 / 3)


# -- loss and training -------------------------------------------------------------------------------
def test_loss_terms_and_gradients():
    ae = small_autoencoder()
    masks = random_organ_masks(3, size=32, seed=1)
    losses = mask_autoencoder_loss(ae, masks, generator=torch.Generator().manual_seed(0), boundary_weight=0.0)
    assert set(losses) == {"loss", "bce", "dice", "kl", "crisp"}
    assert all(torch.isfinite(v) for v in losses.values())
    losses["loss"].backward()
    assert all(p.grad is not None for p in ae.decoder.parameters() if p.requires_grad)
    # Boundary weighting only raises the BCE term (every pixel keeps at least weight 1).
    weighted = mask_autoencoder_loss(ae, masks, generator=torch.Generator().manual_seed(0), boundary_weight=10.0)
    assert weighted["bce"] > losses["bce"] and weighted["dice"] == pytest.approx(losses["dice"].item())
    # The same generator state gives the same loss (posterior sample included).
    again = mask_autoencoder_loss(ae, masks, generator=torch.Generator().manual_seed(0), boundary_weight=0.0)
    assert again["loss"].item() == pytest.approx(losses["loss"].item(), rel=1e-6)


def test_training_reduces_loss_and_is_deterministic():
    masks = random_organ_masks(6, size=32, seed=2)
    masks[0] = 0  # an empty mask in the pool
    ae = small_autoencoder(0)
    history = train_mask_autoencoder(ae, masks.bool(), steps=30, batch_size=4, lr=3e-3, seed=0, log_every=1)
    assert [r["step"] for r in history] == list(range(1, 31))
    losses = [r["loss"] for r in history]
    first, last = np.mean(losses[:5]), np.mean(losses[-5:])
    assert last < 0.8 * first, (first, last)
    assert not ae.training


def test_training_is_deterministic_from_seed():
    masks = random_organ_masks(6, size=32, seed=2)
    runs = []
    for seed in (0, 0, 1):
        history = train_mask_autoencoder(small_autoencoder(0), masks, steps=3, batch_size=4, seed=seed, log_every=1)
        runs.append([r["loss"] for r in history])
    assert runs[0] == pytest.approx(runs[1], rel=1e-6)
    assert runs[0][1:] != pytest.approx(runs[2][1:], rel=1e-6)  # other batches from step 1 on


def test_training_logging_and_arguments():
    masks = random_organ_masks(4, size=32, seed=5)
    records = []
    history = train_mask_autoencoder(
        small_autoencoder(), masks, steps=5, batch_size=2, log_every=2, augment=False,
        sample_weights=torch.tensor([1.0, 0.0, 0.0, 1.0]), callback=records.append,
    )  # fmt: skip
    assert [r["step"] for r in history] == [2, 4, 5] and records == history
    with pytest.raises(ValueError):
        train_mask_autoencoder(small_autoencoder(), masks, steps=0)
    with pytest.raises(ValueError):
        train_mask_autoencoder(small_autoencoder(), masks, steps=1, sample_weights=torch.zeros(4))


def test_init_posterior_logvar_makes_the_posterior_near_deterministic():
    ae = init_posterior_logvar(small_autoencoder(), logvar=-10.0)
    x = torch.randn(2, 3, 32, 32)
    posterior = ae.encode(x).latent_dist
    assert torch.allclose(posterior.logvar, torch.full_like(posterior.logvar, -10.0))
    assert posterior.std.max() < 0.01


def test_training_under_bf16_autocast():
    masks = random_organ_masks(4, size=32, seed=6)
    history = train_mask_autoencoder(
        small_autoencoder(), masks, steps=2, batch_size=2, log_every=1, autocast_dtype=torch.bfloat16
    )
    assert all(math.isfinite(r["loss"]) for r in history)


# -- real label maps -----------------------------------------------------------------------------------
def test_organ_masks_from_label_volume_synthetic():
    labels = np.zeros((20, 10, 6), dtype=np.uint8)
    labels[2:8, 1:5, 1:3] = 3  # label 3 on z = 1, 2
    labels[10:12, 6:9, 4] = 7  # label 7 on z = 4 only
    labels[0, 0, 5] = 3  # and one pixel of label 3 on z = 5
    masks, index = organ_masks_from_label_volume(labels, size=40, return_index=True)
    assert masks.shape == (4, 40, 40) and masks.dtype == torch.float32
    assert set(masks.unique().tolist()) == {0.0, 1.0}
    assert index.tolist() == [[3, 1], [3, 2], [3, 5], [7, 4]]
    # Nearest-neighbour 2x / 4x upsampling of the (X, Y) plane: pixel counts scale exactly.
    assert masks[0].sum() == 6 * 4 * 2 * 4
    assert masks[3].sum() == 2 * 3 * 2 * 4
    assert masks[2, 0:2, 0:4].sum() == 8 and masks[2].sum() == 8
    assert organ_masks_from_label_volume(labels, size=40).shape == (4, 40, 40)
    only7 = organ_masks_from_label_volume(labels, size=16, labels=[7])
    assert only7.shape == (1, 16, 16)
    assert organ_masks_from_label_volume(np.zeros((4, 4, 3)), size=8).shape == (0, 8, 8)
    with pytest.raises(ValueError):
        organ_masks_from_label_volume(np.zeros((4, 4)), size=8)


@pytest.mark.slow
def test_tiny_autoencoder_learns_masks():
    """The real tiny preset on a few hundred steps learns non-trivial reconstructions (minutes)."""
    from diffusers import AutoencoderKL

    from sdseg_monai.config import TINY_AUTOENCODER

    torch.manual_seed(0)
    ae = AutoencoderKL.from_config(TINY_AUTOENCODER)
    masks = random_organ_masks(256, seed=0)
    train_mask_autoencoder(ae, masks, steps=150, batch_size=8, lr=1e-3, seed=0)
    dice = mask_reconstruction_dice(ae, random_organ_masks(32, seed=99))
    assert torch.nanmean(dice) > 0.6


@pytest.mark.parametrize("name, value", [("lr", float("nan")), ("lr", float("inf")), ("weight_decay", -1.0), ("min_lr_fraction", 2.0),
                                         ("kl_weight", float("nan"))])
def test_train_mask_autoencoder_refuses_a_rate_that_is_not_finite(name, value):
    """Before, lr=nan reached AdamW ("Invalid learning rate"), lr=inf trained to NaN; now refused up front."""
    from diffusers import AutoencoderKL

    from sdseg_monai.errors import SDSegInputError

    torch.manual_seed(0)
    autoencoder = AutoencoderKL.from_config(SMALL_AUTOENCODER)
    masks = random_organ_masks(4, size=32, seed=0)
    before = {k: v.clone() for k, v in autoencoder.state_dict().items()}
    with pytest.raises(SDSegInputError, match=f"^{name} must be a finite number"):
        train_mask_autoencoder(autoencoder, masks, steps=1, batch_size=2, **{name: value})
    assert all(torch.equal(v, before[k]) for k, v in autoencoder.state_dict().items())  # nothing trained
    train_mask_autoencoder(autoencoder, masks, steps=1, batch_size=2, lr=1e-3)  # the control: a finite rate trains
    assert not all(torch.equal(v, before[k]) for k, v in autoencoder.state_dict().items())
