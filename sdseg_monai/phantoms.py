"""Synthetic phantoms: random organ-like binary masks for training the mask autoencoder.

The tiny preset's mask autoencoder is trained from scratch, on CPU, with far more masks than one real
CT provides. :func:`random_organ_masks` draws 2D masks that look like axial organ cross-sections:
smooth blobs from a few pixels wide (adrenal glands, vessels) up to half the image (liver), lobed and
bent, sometimes in several pieces, sometimes empty. Everything is deterministic from a seed.
"""

from __future__ import annotations

import numpy as np
import torch

# Share of masks left empty: slices above or below an organ give empty masks in real data.
EMPTY_FRACTION = 0.05
# Probabilities of 1, 2 and 3 components (e.g. bowel-like stomach sections, liver lobes, vessels).
COMPONENT_PROBABILITIES = (0.7, 0.2, 0.1)
# Equivalent diameter of a component, as a fraction of the image size, drawn log-uniformly so that
# small structures are as common as large ones (small masks are the hard case for an f=8 autoencoder).
MIN_DIAMETER_PX = 2.5
MAX_DIAMETER_FRACTION = 0.5
# Fourier harmonics of the boundary radius (lobes and dents) and their relative amplitude.
HARMONICS = (2, 3, 4, 5, 6)


def random_organ_masks(n: int, size: int = 128, seed: int = 0) -> torch.Tensor:
    """Random binary 2D masks that look like organ cross-sections.

    Each non-empty mask is the union of 1 to 3 components. A component is an ellipse (random axes,
    aspect ratio and angle) whose boundary radius is modulated by a few low angular harmonics (lobes,
    dents), the whole image then warped by a smooth random displacement field (bent, kidney- or
    liver-like shapes). Component sizes are log-uniform from a few pixels to half the image width.

    Args:
        n: number of masks.
        size: height and width in pixels.
        seed: the masks are a pure function of ``(n, size, seed)``; mask ``i`` does not depend on ``n``.

    Returns:
        ``(n, size, size)`` float32 tensor of zeros and ones.

    Example:
        >>> masks = random_organ_masks(4, size=64, seed=1)
        >>> tuple(masks.shape), sorted(masks.unique().tolist()) in ([0.0, 1.0], [0.0])
        ((4, 64, 64), True)
    """
    if n < 0 or size < 8:
        raise ValueError(f"need n >= 0 and size >= 8, got n={n}, size={size}")
    out = torch.zeros((n, size, size), dtype=torch.float32)
    # Pixel-centre coordinates in pixels, shared by every mask.
    yy, xx = np.meshgrid(np.arange(size, dtype=np.float64) + 0.5, np.arange(size, dtype=np.float64) + 0.5, indexing="ij")
    for i in range(n):
        # One child seed per mask: mask i is the same whatever n is.
        rng = np.random.default_rng([int(seed), i])
        if rng.random() < EMPTY_FRACTION:
            continue
        out[i] = torch.from_numpy(_one_mask(rng, xx, yy, size))
    return out


def _one_mask(rng: np.random.Generator, xx: np.ndarray, yy: np.ndarray, size: int) -> np.ndarray:
    """One non-empty mask (size, size) float32 drawn from ``rng``."""
    # A smooth warp of the whole image: bends large organs, barely moves small ones' shape.
    wx, wy = _smooth_displacement(rng, size, amplitude=rng.uniform(0.0, 0.05) * size)
    u, v = xx + wx, yy + wy
    n_components = int(rng.choice(len(COMPONENT_PROBABILITIES), p=COMPONENT_PROBABILITIES)) + 1
    mask = np.zeros((size, size), dtype=bool)
    for _ in range(n_components):
        diameter = float(np.exp(rng.uniform(np.log(MIN_DIAMETER_PX), np.log(MAX_DIAMETER_FRACTION * size))))
        radius = diameter / 2
        aspect = float(np.exp(rng.uniform(np.log(1.0), np.log(2.5))))
        a, b = radius * np.sqrt(aspect), radius / np.sqrt(aspect)  # same area as the disc
        # Keep the centre inside the image, far enough from the edges for most of the blob to show.
        margin = min(max(a, b), size / 4)
        cx, cy = rng.uniform(margin, size - margin, size=2)
        theta = rng.uniform(0, np.pi)
        c, s = np.cos(theta), np.sin(theta)
        du, dv = u - cx, v - cy
        p = (c * du + s * dv) / a
        # Bend along the long axis: kidney-, pancreas- and banana-like sections.
        q = (-s * du + c * dv) / b - rng.uniform(-0.6, 0.6) * p * p
        r = np.hypot(p, q)
        phi = np.arctan2(q, p)
        # Boundary radius 1 + sum_k A_k cos(k phi + phase_k): lobes and dents, amplitude ~ 1/k.
        wobble = rng.uniform(0.0, 0.35)
        boundary = np.ones_like(r)
        for k in HARMONICS:
            boundary += wobble / k * rng.standard_normal() * np.cos(k * phi + rng.uniform(0, 2 * np.pi))
        component = r <= np.maximum(boundary, 0.3)
        if not component.any():  # a sub-pixel blob between pixel centres: keep the nearest pixel
            j = np.argmin(np.hypot(du, dv))
            component.flat[j] = True
        mask |= component
    return mask.astype(np.float32)


def _smooth_displacement(rng: np.random.Generator, size: int, amplitude: float) -> tuple[np.ndarray, np.ndarray]:
    """A smooth random displacement field (two (size, size) arrays, pixels) from a few low
    frequencies: its length scale is a fraction of the image, so it bends shapes without tearing."""
    t = np.linspace(0.0, 1.0, size)
    fields = []
    for _ in range(2):
        field = np.zeros((size, size))
        for fy in range(3):
            for fx in range(3):
                if fx == fy == 0:
                    continue
                weight = rng.standard_normal() / (1 + fx * fx + fy * fy)
                # Separable product of two cosines: an outer product, cheap at any size.
                col = np.cos(np.pi * (fy * t + rng.uniform()))
                row = np.cos(np.pi * (fx * t + rng.uniform()))
                field += weight * np.outer(col, row)
        fields.append(field * amplitude / max(np.abs(field).max(), 1e-8))
    return fields[0], fields[1]
