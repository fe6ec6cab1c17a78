"""The built-in demo: SDSeg's batched one-step inference end to end on a freshly generated example.

Until the packaged default model ships, the demo network has seeded random weights: it shows the
pipeline, the shapes and the speed, not segmentation quality.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sdseg_monai.config import model_preset
from sdseg_monai.model import SDSeg, resolve_device
from sdseg_monai.phantoms import random_organ_masks

DEMO_ORGANS = ("liver", "spleen", "left_kidney")


@dataclass
class DemoResult:
    """What the demo ran and measured."""

    organs: list[str]
    probabilities: torch.Tensor  # (S, K, H, W)
    seconds: float
    device: str
    parameters: dict = field(default_factory=dict)
    model_dir: Path | None = None

    @property
    def slices_per_second(self) -> float:
        return self.probabilities.shape[0] / self.seconds


def synthetic_slices(n_slices: int, n_organs: int, size: int, seed: int = 0) -> torch.Tensor:
    """CT-like image slices in [-1, 1]: random organ-shaped masks painted at distinct intensities
    on a soft-tissue background, plus noise. Shape (n_slices, 3, size, size), grey replicated."""
    masks = random_organ_masks(n_slices * n_organs, size=size, seed=seed).view(n_slices, n_organs, size, size)
    generator = torch.Generator().manual_seed(seed)
    image = torch.full((n_slices, size, size), -0.2)
    for k in range(n_organs):
        image = torch.where(masks[:, k] > 0, torch.tensor(0.2 + 0.5 * k / max(n_organs - 1, 1)), image)
    image = (image + 0.05 * torch.randn(image.shape, generator=generator)).clamp(-1, 1)
    return image[:, None].expand(-1, 3, -1, -1).contiguous()


def run_demo(
    out_dir: str | Path | None = None,
    *,
    seed: int = 0,
    n_slices: int = 16,
    device: str = "auto",
    batch_size: int | None = None,
) -> DemoResult:
    """Build the ``tiny`` preset, run one-step inference on generated slices, optionally save the model.

    Args:
        out_dir: if given, the (untrained) model is saved there as a model folder.
        seed: seeds the weights, the example and the diffusion noise.
        n_slices: number of generated slices.
        device: ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        batch_size: (slice, organ) pairs per forward pass.
    """
    target = resolve_device(device)
    torch.manual_seed(seed)
    model = SDSeg(model_preset("tiny", organs=list(DEMO_ORGANS))).to(target).eval()
    size = model.config.preprocessing.slice_size
    model.fit_latent_scale(random_organ_masks(32, size=size, seed=seed + 1), torch.Generator().manual_seed(seed))
    images = synthetic_slices(n_slices, len(DEMO_ORGANS), size, seed=seed + 2)
    model.predict(images[:1], seed=seed, batch_size=batch_size)  # warm-up, excluded from the timing
    start = time.perf_counter()
    probabilities = model.predict(images, seed=seed, batch_size=batch_size)
    seconds = time.perf_counter() - start
    saved = model.save_pretrained(out_dir) if out_dir is not None else None
    return DemoResult(
        organs=list(DEMO_ORGANS),
        probabilities=probabilities.cpu(),
        seconds=seconds,
        device=str(target),
        parameters=model.describe(),
        model_dir=saved,
    )
