"""The built-in demo: the whole pipeline on a synthetic abdominal CT phantom, no download.

A phantom (seeded, never used in training) is written as NIfTI, segmented by the packaged default
model through the same path as ``sdseg3d segment``, scored per organ against the phantom's own
labels, and a few axial slices are drawn as PNG overlays (prediction beside reference). When this
build ships no default model, an untrained ``tiny`` network stands in and the output says so.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from sdseg_monai.config import model_preset
from sdseg_monai.metrics import OrganScore, organ_scores
from sdseg_monai.model import SDSeg, default_model_path

# Far from any seed used to train the default model.
DEMO_PHANTOM_SEED = 777_001
DEMO_SHAPE = (128, 128, 64)
# One colour per BTCV label (1..13), for overlays.
PALETTE = np.array(
    [
        [0, 0, 0], [220, 60, 60], [60, 200, 60], [60, 60, 220], [230, 200, 40], [40, 200, 200],
        [200, 60, 200], [240, 140, 40], [250, 250, 250], [120, 120, 255], [160, 90, 40],
        [140, 220, 140], [255, 150, 200], [150, 150, 60],
    ],
    dtype=np.uint8,
)


@dataclass
class DemoResult:
    """What the demo ran, measured and wrote."""

    model: str
    trained: bool
    scores: list[OrganScore]
    seconds: float
    slices: int
    files: list[Path] = field(default_factory=list)


def overlay_png(image_hu: np.ndarray, labels: np.ndarray, reference: np.ndarray, z: int, path: Path, window=(-175.0, 250.0)) -> Path:
    """Axial slice ``z``: CT with the predicted labels (left) and the reference (right), as a PNG.
    Arrays are RAS (X, Y, Z); the picture shows the patient's right on the left (radiological view)."""
    from PIL import Image

    low, high = window
    grey = np.clip((image_hu[:, :, z] - low) / (high - low), 0, 1) * 255
    grey = np.repeat(grey[..., None], 3, axis=-1)

    def draw(label_slice):
        colour = PALETTE[np.clip(label_slice, 0, len(PALETTE) - 1)].astype(np.float64)
        mask = (label_slice > 0)[..., None]
        mixed = np.where(mask, 0.45 * grey + 0.55 * colour, grey)
        # (X, Y) -> rows from anterior (top) to posterior, columns from the patient's right to left.
        return mixed.transpose(1, 0, 2)[::-1, ::-1]

    panel = np.concatenate([draw(labels[:, :, z]), np.zeros((labels.shape[1], 4, 3)), draw(reference[:, :, z])], axis=1)
    image = Image.fromarray(panel.astype(np.uint8)).resize((panel.shape[1] * 3, panel.shape[0] * 3), Image.NEAREST)
    image.save(path)
    return path


def run_demo(
    out_dir: str | Path = "sdseg3d_demo",
    *,
    model: str | Path | SDSeg | None = None,
    seed: int = DEMO_PHANTOM_SEED,
    shape: tuple[int, int, int] = DEMO_SHAPE,
    device: str = "auto",
    batch_size: int | None = None,
    pictures: int = 3,
) -> DemoResult:
    """Generate a phantom, segment it, score it, and write NIfTI, JSON and PNG files to ``out_dir``.

    Args:
        out_dir: output folder (created).
        model: a model folder or :class:`SDSeg`; default: the packaged model, else an untrained ``tiny``.
        seed: phantom seed.
        shape: phantom grid (3 mm voxels).
        device: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:N"``.
        batch_size: (slice, organ) pairs per forward.
        pictures: number of axial slices drawn as PNG overlays.
    """
    import nibabel as nib

    from sdseg_monai.inference import VolumeSegmenter
    from sdseg_monai.phantoms import write_phantoms

    trained = True
    if model is None:
        model = default_model_path()
    if model is None:
        trained = False
        torch.manual_seed(0)
        model = SDSeg(model_preset("tiny"))
        model.config.latent_scale = 1.0
    name = str(model) if not isinstance(model, SDSeg) else ("untrained tiny preset" if not trained else "in-memory model")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ((image_path, label_path),) = write_phantoms(out, n=1, seed=seed, shape=shape)
    segmenter = VolumeSegmenter(model, device=device, batch_size=batch_size, seed=0)
    result = segmenter.segment(image_path)
    result.model = name
    mask_path, sidecar = result.save(out / "prediction.nii.gz")
    reference = np.asarray(nib.load(str(label_path)).dataobj).astype(np.uint8)
    scores = organ_scores(result.labels, reference, result.organs)
    image_hu = np.asarray(nib.load(str(image_path)).dataobj).astype(np.float32)
    files = [image_path, label_path, mask_path, sidecar]
    present = np.nonzero(reference.any(axis=(0, 1)))[0]
    if len(present) and pictures > 0:
        for k, z in enumerate(np.linspace(present[0], present[-1], pictures + 2)[1:-1].round().astype(int)):
            files.append(overlay_png(image_hu, result.labels, reference, int(z), out / f"overlay_{k}_z{int(z)}.png"))
    return DemoResult(model=name, trained=trained, scores=scores, seconds=result.seconds, slices=reference.shape[2], files=files)
