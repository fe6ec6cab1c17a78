"""The built-in demo: the whole pipeline on a synthetic abdominal CT phantom, no download.

A phantom (seeded, never used in training) is written as NIfTI, segmented by the packaged default
model through the same path as ``sdseg3d segment``, scored per organ against the phantom's own
labels, and a few axial slices are drawn as PNG overlays (prediction beside reference). When this
build ships no default model, an untrained ``tiny`` network stands in and the output says so.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from sdseg_monai.config import model_preset
from sdseg_monai.errors import SDSegInputError
from sdseg_monai.metrics import OrganScore, mean_dice, organ_scores
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


def _font(size: int):
    from PIL import ImageFont

    return ImageFont.load_default(size=size)  # Pillow's bundled scalable font: no system fonts needed


def overlay_png(
    image_hu: np.ndarray,
    labels: np.ndarray,
    reference: np.ndarray,
    z: int,
    path: Path,
    scores: Sequence[OrganScore] = (),
    window=(-175.0, 250.0),
    zoom: int = 3,
) -> Path:
    """Axial slice ``z`` as a PNG that explains itself: the CT with the predicted labels (left) and
    the reference (right), each panel titled, and a legend of every organ's colour, name and Dice.

    Arrays are RAS (X, Y, Z); the panels show the patient's right on the left (radiological view).
    """
    from PIL import Image, ImageDraw

    low, high = window
    grey = np.clip((image_hu[:, :, z] - low) / (high - low), 0, 1) * 255
    grey = np.repeat(grey[..., None], 3, axis=-1)

    def draw(label_slice):
        colour = PALETTE[np.clip(label_slice, 0, len(PALETTE) - 1)].astype(np.float64)
        mask = (label_slice > 0)[..., None]
        mixed = np.where(mask, 0.45 * grey + 0.55 * colour, grey)
        # (X, Y) -> rows from anterior (top) to posterior, columns from the patient's right to left.
        panel = Image.fromarray(mixed.transpose(1, 0, 2)[::-1, ::-1].astype(np.uint8))
        return panel.resize((panel.width * zoom, panel.height * zoom), Image.NEAREST)

    prediction, truth = draw(labels[:, :, z]), draw(reference[:, :, z])
    title, text, small = _font(22), _font(18), _font(15)
    margin, gap, header, row = 16, 12, 64, 26
    legend_width = 330
    panel_w, panel_h = prediction.size
    width = margin * 2 + panel_w * 2 + gap * 2 + legend_width
    height = max(header + panel_h, header + row * (len(scores) + 2)) + margin
    canvas = Image.new("RGB", (width, height), (24, 24, 24))
    pen = ImageDraw.Draw(canvas)
    x_pred, x_ref, x_legend = margin, margin + panel_w + gap, margin + 2 * (panel_w + gap)
    mean = mean_dice(scores)
    summary = f"axial slice {z}" + ("" if mean is None else f"  -  mean Dice {mean:.3f} over the volume")
    pen.text((margin, 8), summary, font=small, fill=(200, 200, 200))
    pen.text((x_pred, 30), "Prediction (sdseg3d)", font=title, fill=(255, 255, 255))
    pen.text((x_ref, 30), "Reference (phantom labels)", font=title, fill=(255, 255, 255))
    canvas.paste(prediction, (x_pred, header))
    canvas.paste(truth, (x_ref, header))
    pen.text((x_pred + 4, header + panel_h - 22), "R", font=small, fill=(255, 255, 0))
    pen.text((x_legend, 30), "organ", font=title, fill=(255, 255, 255))
    pen.text((x_legend + legend_width - 70, 30), "Dice", font=title, fill=(255, 255, 255))
    for k, score in enumerate(scores):
        y = header + k * row
        colour = tuple(int(c) for c in PALETTE[min(score.label, len(PALETTE) - 1)])
        pen.rectangle((x_legend, y + 3, x_legend + 16, y + 19), fill=colour)
        pen.text((x_legend + 24, y), score.name.replace("_", " "), font=text, fill=(235, 235, 235))
        dice = "absent" if score.dice is None else f"{score.dice:.3f}"
        pen.text((x_legend + legend_width - 70, y), dice, font=text, fill=(235, 235, 235))
    from sdseg_monai.data import atomic_paths

    with atomic_paths(Path(path)) as (tmp,):
        canvas.save(tmp, format="PNG")
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
    """Generate a phantom, segment it, score it, and write NIfTI, JSON and PNG files to ``out_dir``:
    the phantom's image, its label map with the label names (``.json``), the prediction with its
    sidecar, and the overlays.

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

    from sdseg_monai.data import sidecar_path
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
    if out.exists() and not out.is_dir():
        raise SDSegInputError("the demo's output must be a folder, and a file of that name exists", out)
    segmenter = VolumeSegmenter(model, device=device, batch_size=batch_size, seed=0)  # a bad device: refused before writing
    out.mkdir(parents=True, exist_ok=True)
    ((image_path, label_path),) = write_phantoms(out, n=1, seed=seed, shape=shape)
    label_names = sidecar_path(label_path)  # written with the phantom
    result = segmenter.segment(image_path)
    result.model = name
    mask_path, sidecar = result.save(out / "prediction.nii.gz")
    reference = np.asarray(nib.load(str(label_path)).dataobj).astype(np.uint8)
    scores = organ_scores(result.labels, reference, result.organs)
    image_hu = np.asarray(nib.load(str(image_path)).dataobj).astype(np.float32)
    files = [image_path, label_path, label_names, mask_path, sidecar]
    present = np.nonzero(reference.any(axis=(0, 1)))[0]
    if len(present) and pictures > 0:
        for k, z in enumerate(np.linspace(present[0], present[-1], pictures + 2)[1:-1].round().astype(int)):
            files.append(overlay_png(image_hu, result.labels, reference, int(z), out / f"overlay_{k}_z{int(z)}.png", scores))
    return DemoResult(model=name, trained=trained, scores=scores, seconds=result.seconds, slices=reference.shape[2], files=files)
