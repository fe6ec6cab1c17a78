"""Synthetic phantoms, deterministic from a seed: 2D organ-like masks and 3D abdominal CT volumes.

- :func:`random_organ_masks`: binary 2D masks that look like axial organ cross-sections, for training
  the tiny preset's mask autoencoder from scratch (far more masks than one real CT provides): smooth
  blobs from a few pixels wide (adrenal glands, vessels) up to half the image (liver), lobed and bent,
  sometimes in several pieces, sometimes empty.
- :func:`abdominal_phantom`, :func:`write_phantoms`, :func:`phantom_volumes`: whole CT-like volumes
  with BTCV 13-organ label maps, calibrated on the real CT in ``shared/data/ct``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

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


# -- 3D abdominal CT phantoms ------------------------------------------------------------------------

# :func:`abdominal_phantom` draws a whole CT-like volume with its BTCV label map: body outline, fat,
# muscle, spine and ribs, lung bases and heart above the diaphragm, unlabelled bowel, and the 13 BTCV
# organs. Geometry is written in millimetres in an anatomical frame (u: towards the patient's right,
# v: anterior, w: superior; origin on the body axis), so a phantom looks the same at any spacing.
#
# Calibration: one real non-contrast abdominal CT with TotalSegmentator labels remapped to BTCV
# (shared/data/ct/abdomen_ct_3mm*.nii.gz, 3 mm, RAS; the liver lies at higher axis-0 indices than the
# spleen, i.e. +axis 0 = patient's right, as RAS says). Measured there, relative to the body centre
# (real slice 88 = w 0, phantom w = real w - 12 mm so that the liver dome fits the default 192 mm):
#   body half-widths 165-177 mm (left-right) x 132-137 mm (antero-posterior); subcutaneous fat
#   -97 +- 21 HU, 10-25 mm thick; muscle 30-60 HU; air -1023 +- 27 HU; vertebral body centre 24 mm
#   behind the body centre, half-widths 25 x 20 mm, cancellous bone 130-280 HU, cortex 300-800 HU;
#   organ centroids (u, v, w_real mm), PCA half-axes (mm), volume (ml), interior median +- std (HU):
#     spleen        (-107, -36,  36)  33 x 42 x 66   261   35 +- 12
#     right kidney  (  75, -26, -13)  27 x 34 x 63   193   14 +- 27  (sinus fat included)
#     left kidney   ( -73, -33,  -1)  26 x 30 x 58   137   20 +- 43
#     gallbladder   (  70,  54,   5)  15 x 19 x 29    36    3 +- 11
#     liver         (  72,  27,  34)  47 x 72 x 127 1126+  47 +- 13  (dome above the scan)
#     stomach       ( -35,  52,  31)  20 x 28 x 90   131   38, with gas (mean -22)
#     aorta         ( -11,   3,   5)  radius 9 (low) .. 13 mm (high), 42 +- 14
#     IVC           (  18,  13,  -7)  radius ~11 mm, 40 +- 13
#     portal/splenic vein ( -4, 30, 28)  29 ml, 37 +- 12
#     pancreas      ( -15,  31,  11)  19 ml (atrophic), -6 .. 6 (fatty, partial volume)
#     adrenals      R (36, -9, 39), L (-42, -6, 44); 5-6 ml; 4-21 (partial volume)
#   The esophagus is not in that scan. Phantom HU use these numbers, nudged towards textbook
#   non-contrast values where partial volume of a 3 mm automatic label biases them (kidney, pancreas,
#   adrenals), and keep the liver brighter than the spleen as in a normal liver.

PHANTOM_SHAPE = (128, 128, 64)
PHANTOM_SPACING = (3.0, 3.0, 3.0)

# Tissue table: name -> (BTCV label, mean HU, per-seed SD of the mean, texture amplitude HU).
# Several tissues can share a label (stomach wall, contents and gas are all "stomach").
_TISSUES = (
    ("air", 0, -1000.0, 0.0, 0.0),
    ("table", 0, -250.0, 40.0, 30.0),
    ("skin", 0, 35.0, 5.0, 4.0),
    ("subcutaneous_fat", 0, -100.0, 6.0, 8.0),
    ("muscle", 0, 45.0, 5.0, 6.0),
    ("visceral_fat", 0, -95.0, 6.0, 12.0),
    ("lung", 0, -860.0, 25.0, 30.0),
    ("heart", 0, 40.0, 4.0, 4.0),
    ("bowel", 0, 25.0, 8.0, 12.0),
    ("bowel_gas", 0, -950.0, 15.0, 20.0),
    ("stool", 0, -150.0, 30.0, 120.0),
    ("cancellous_bone", 0, 200.0, 30.0, 40.0),
    ("cortical_bone", 0, 600.0, 80.0, 60.0),
    ("disc", 0, 85.0, 10.0, 8.0),
    ("spinal_canal", 0, 25.0, 5.0, 4.0),
    ("rib", 0, 450.0, 60.0, 60.0),
    ("spleen", 1, 42.0, 5.0, 4.0),
    ("right_kidney", 2, 30.0, 5.0, 4.0),
    ("left_kidney", 3, 30.0, 5.0, 4.0),
    ("gallbladder", 4, 8.0, 4.0, 2.0),
    ("esophagus", 5, 38.0, 4.0, 4.0),
    ("esophagus_gas", 5, -900.0, 30.0, 20.0),
    ("liver", 6, 54.0, 5.0, 4.0),
    ("hepatic_vein", 6, 38.0, 3.0, 2.0),
    ("stomach_wall", 7, 42.0, 4.0, 4.0),
    ("stomach_contents", 7, 15.0, 8.0, 12.0),
    ("stomach_gas", 7, -950.0, 15.0, 20.0),
    ("aorta", 8, 42.0, 4.0, 3.0),
    ("inferior_vena_cava", 9, 40.0, 4.0, 3.0),
    ("portal_and_splenic_vein", 10, 40.0, 4.0, 3.0),
    ("pancreas", 11, 38.0, 5.0, 10.0),
    ("right_adrenal_gland", 12, 25.0, 5.0, 4.0),
    ("left_adrenal_gland", 13, 25.0, 5.0, 4.0),
)
_T = {name: i for i, (name, *_rest) in enumerate(_TISSUES)}

# Anatomical w of the volume centre is drawn in +-PHANTOM_Z_JITTER_MM: patients are not all scanned
# at the same level.
PHANTOM_Z_JITTER_MM = 10.0
# Fixed box (mm, half-sizes) of the deformation field's random nodes: the same random numbers are
# drawn whatever the grid, so a seed gives the same anatomy at every shape and spacing.
_FIELD_BOX_MM = (320.0, 320.0, 256.0)
# Partial-volume blur (Gaussian sigma, mm) applied before the noise: soft organ edges.
_BLUR_MM = 1.0


def abdominal_phantom(
    seed: int,
    shape: tuple[int, int, int] = PHANTOM_SHAPE,
    spacing: tuple[float, float, float] = PHANTOM_SPACING,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A synthetic non-contrast abdominal CT volume with its BTCV 13-organ label map.

    The volume holds air, a patient table, an elliptical body (skin, subcutaneous fat, muscle wall),
    the lumbar / lower thoracic spine with discs and posterior elements, paraspinal and psoas
    muscles, ribs on the upper slices, lung bases and the heart above the diaphragm, unlabelled bowel
    and colon, and the 13 BTCV organs (labels as in :data:`sdseg_monai.labels.BTCV`). Positions,
    sizes and HU are calibrated on a real CT (see the comment above); each seed moves, scales,
    rotates and deforms the anatomy (smooth random displacement field), and adds organ texture, a
    slight partial-volume blur and Gaussian noise (10-20 HU). Every voxel labelled ``k`` holds organ
    ``k``'s tissue.

    Arrays are in RAS order like a NIfTI read with nibabel: index 0 grows towards the patient's
    right, index 1 anterior, index 2 superior. All anatomy is defined in millimetres, so the same seed
    gives the same anatomy at any ``shape`` / ``spacing`` (the field of view is ``shape * spacing``,
    centred on the body).

    Args:
        seed: non-negative integer; the phantom is a pure function of ``(seed, shape, spacing)``.
        shape: grid size (X, Y, Z) in voxels.
        spacing: voxel size (X, Y, Z) in mm.

    Returns:
        ``(image, label, affine)``: float32 HU array of ``shape``, uint8 label array of ``shape``
        (0 background, 1..13 BTCV organs), and the 4x4 float64 RAS voxel-to-mm affine (diagonal
        ``spacing``, volume centre at the origin).

    Raises:
        ValueError: a negative seed, or a non-positive shape or spacing.

    Example:
        >>> image, label, affine = abdominal_phantom(0, shape=(32, 32, 16), spacing=(12.0, 12.0, 12.0))
        >>> image.shape, image.dtype.name, label.dtype.name, float(affine[0, 0])
        ((32, 32, 16), 'float32', 'uint8', 12.0)
    """
    shape, spacing = _check_grid(shape, spacing)
    if int(seed) != seed or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    seed = int(seed)
    rng = np.random.default_rng(seed)  # anatomy: a fixed sequence of draws, independent of the grid
    # World coordinates (mm) of voxel centres: the volume centre is the origin.
    axes64 = [(np.arange(n) - (n - 1) / 2) * d for n, d in zip(shape, spacing)]
    axes = [a.astype(np.float32) for a in axes64]
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = [a[0] for a in axes64]

    hu = np.array([m + sd * rng.standard_normal() for _, _, m, sd, _ in _TISSUES], dtype=np.float32)
    hu[_T["air"]] = -1000.0
    # A normal liver is brighter than the spleen on non-contrast CT.
    hu[_T["spleen"]] = min(hu[_T["spleen"]], hu[_T["liver"]] - 4.0)
    scene = _Scene(rng, seed, axes)
    _build_body(scene)
    _build_organs(scene)
    _build_skeleton_and_muscles(scene)

    texture = _gaussian_field(np.random.default_rng([seed, 2]), axes, sigma=5.0)
    amp = np.array([t[4] for t in _TISSUES], dtype=np.float32)
    tissue = scene.tissue
    image = hu[tissue] + amp[tissue] * texture
    image = _blur(image, [_BLUR_MM / d for d in spacing])
    noise_rng = np.random.default_rng([seed, 3])
    noise_sd = rng.uniform(10.0, 20.0)
    image += noise_sd * noise_rng.standard_normal(shape, dtype=np.float32)
    np.clip(image, -1024.0, 3071.0, out=image)
    labels = np.array([t[1] for t in _TISSUES], dtype=np.uint8)[tissue]
    return image.astype(np.float32, copy=False), labels, affine


def _check_grid(shape, spacing) -> tuple[tuple[int, int, int], tuple[float, float, float]]:
    shape = tuple(shape)
    spacing = tuple(spacing)
    if len(shape) != 3 or any(int(n) != n or n < 1 for n in shape):
        raise ValueError(f"shape must be three positive integers, got {shape!r}")
    if len(spacing) != 3 or not all(np.isfinite(d) and d > 0 for d in spacing):
        raise ValueError(f"spacing must be three positive numbers (mm), got {spacing!r}")
    return tuple(int(n) for n in shape), tuple(float(d) for d in spacing)


def write_phantoms(
    out_dir: str | os.PathLike,
    n: int = 1,
    seed: int = 0,
    shape: tuple[int, int, int] = PHANTOM_SHAPE,
    spacing: tuple[float, float, float] = PHANTOM_SPACING,
) -> list[tuple[Path, Path]]:
    """Write phantoms ``seed .. seed + n - 1`` as NIfTI image / label pairs.

    Each phantom ``s`` becomes ``phantom_<s>_image.nii.gz`` (int16 HU) and
    ``phantom_<s>_label.nii.gz`` (uint8 BTCV labels) in ``out_dir`` (created if missing), both with
    the RAS affine of :func:`abdominal_phantom` as qform and sform (code 1, scanner), and the label
    map's names beside it, ``phantom_<s>_label.json`` (``{"labels": {"1": "spleen", ...}}``), as every
    label map written has. Each phantom's files are written to temporary files beside the targets and
    renamed into place, so a reader never sees a half-written phantom.

    Args:
        out_dir: output folder.
        n: number of phantoms (>= 1).
        seed: first seed (>= 0).
        shape: grid size (X, Y, Z) in voxels.
        spacing: voxel size (X, Y, Z) in mm.

    Returns:
        ``[(image_path, label_path), ...]`` in seed order.

    Raises:
        ValueError: ``n < 1``, a negative seed, or a bad shape / spacing.
        SDSegInputError: ``out_dir/manifest.json`` is unreadable or not a phantom manifest (before
            any phantom is written; see :func:`read_phantom_manifest`).
    """
    import nibabel as nib

    from sdseg_monai.data import atomic_paths, sidecar_path
    from sdseg_monai.labels import BTCV

    if int(n) != n or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    if int(seed) != seed or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    shape, spacing = _check_grid(shape, spacing)
    out = Path(out_dir)
    # The folder's manifest is updated after the phantoms are written: a bad one must stop us first.
    read_phantom_manifest(out)
    out.mkdir(parents=True, exist_ok=True)

    def nifti(data: np.ndarray, affine: np.ndarray, what: str):
        image = nib.Nifti1Image(data, affine)
        image.set_qform(affine, 1)
        image.set_sform(affine, 1)
        image.header.set_xyzt_units("mm")
        image.header["descrip"] = f"sdseg3d phantom {what}".encode()
        return image

    written = []
    for s in range(int(seed), int(seed) + int(n)):
        image, label, affine = abdominal_phantom(s, shape, spacing)
        targets = (out / f"phantom_{s}_image.nii.gz", out / f"phantom_{s}_label.nii.gz")
        names = {"labels": {str(o.label): o.name for o in BTCV.organs}, "source": f"sdseg3d phantom, seed {s}"}
        with atomic_paths(*targets, sidecar_path(targets[1])) as (tmp_image, tmp_label, tmp_names):
            nib.save(nifti(np.rint(image).astype(np.int16), affine, "image"), str(tmp_image))
            nib.save(nifti(label, affine, "label"), str(tmp_label))
            tmp_names.write_text(json.dumps(names, indent=2) + "\n", encoding="utf-8")
        written.append(targets)
    return written


# -- random fields -----------------------------------------------------------------------------------
def _gaussian_field(rng: np.random.Generator, axes, sigma: float, box=None) -> np.ndarray:
    """A smooth random field of about unit SD on the grid ``axes`` (three 1D mm arrays).

    White noise on nodes spaced ``sigma`` apart, smoothed by a Gaussian of SD ``sigma``; separable, so
    it costs three small matrix products. With ``box`` (half-sizes, mm) the nodes cover that fixed box
    and the field does not depend on the grid; without, they cover the grid only (cheaper).
    """
    if box is None:
        box = [float(np.abs(a).max()) + 3 * sigma for a in axes]
    nodes = [np.arange(-b, b + 1e-3, sigma, dtype=np.float32) for b in box]
    coeff = rng.standard_normal(tuple(len(n) for n in nodes), dtype=np.float32)
    mats = [np.exp(-0.5 * ((a[:, None] - n[None, :]) / sigma) ** 2).astype(np.float32) for a, n in zip(axes, nodes)]
    field = np.tensordot(mats[0], coeff, axes=(1, 0))  # (X, ny, nz)
    field = np.tensordot(field, mats[1], axes=(1, 1))  # (X, nz, Y)
    field = np.tensordot(field, mats[2], axes=(1, 1))  # (X, Y, Z)
    # Each node weight sums to ~sqrt(pi) per axis when the spacing equals sigma: unit variance after.
    return field * np.float32(np.pi**-0.75)


def _blur(image: np.ndarray, sigmas) -> np.ndarray:
    """Separable Gaussian blur (sigmas in voxels) with edge padding; numpy only."""
    for axis, sigma in enumerate(sigmas):
        if sigma < 0.2:
            continue
        radius = int(np.ceil(3 * sigma))
        k = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2).astype(np.float32)
        k /= k.sum()
        pad = [(0, 0)] * 3
        pad[axis] = (radius, radius)
        padded = np.pad(image, pad, mode="edge")
        n = image.shape[axis]
        out = np.zeros_like(image)
        for i, weight in enumerate(k):
            out += weight * np.take(padded, np.arange(i, i + n), axis=axis)
        image = out
    return image


# -- geometry helpers --------------------------------------------------------------------------------
def _rotation(rx: float = 0.0, ry: float = 0.0, rz: float = 0.0) -> np.ndarray:
    """Rotation matrix (degrees about u, v, w); rows are the local axes in the anatomical frame."""
    a, b, c = np.radians([rx, ry, rz])
    mx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    my = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    mz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return (mz @ my @ mx).T


def _local(u, v, w, centre, rot=None):
    """Coordinates relative to ``centre``, in the local axes of ``rot`` (None: anatomical axes)."""
    du, dv, dw = u - np.float32(centre[0]), v - np.float32(centre[1]), w - np.float32(centre[2])
    if rot is None:
        return du, dv, dw
    r = rot.astype(np.float32)
    return (
        r[0, 0] * du + r[0, 1] * dv + r[0, 2] * dw,
        r[1, 0] * du + r[1, 1] * dv + r[1, 2] * dw,
        r[2, 0] * du + r[2, 1] * dv + r[2, 2] * dw,
    )


def _ellipsoid(u, v, w, centre, semi, rot=None):
    """Normalised squared radius of an ellipsoid: < 1 inside."""
    p, q, r = _local(u, v, w, centre, rot)
    return (p / semi[0]) ** 2 + (q / semi[1]) ** 2 + (r / semi[2]) ** 2


def _smooth_path(points, iterations: int = 3) -> np.ndarray:
    """Chaikin corner cutting that keeps both end points: a smooth centreline through control points."""
    p = np.asarray(points, dtype=np.float64)
    for _ in range(iterations):
        q = 0.75 * p[:-1] + 0.25 * p[1:]
        r = 0.25 * p[:-1] + 0.75 * p[1:]
        mid = np.empty((2 * len(q), p.shape[1]))
        mid[0::2], mid[1::2] = q, r
        p = np.concatenate([p[:1], mid, p[-1:]])
    return p


def _smooth_tube(ctrl, radii, iterations: int = 3) -> np.ndarray:
    """(n, 4) tube path (u, v, w, radius) smoothed through control points and their radii."""
    ctrl = np.asarray(ctrl, dtype=np.float64)
    radii = np.broadcast_to(np.asarray(radii, dtype=np.float64), (len(ctrl),))
    return _smooth_path(np.column_stack([ctrl, radii]), iterations)


def _segment_distance(u, v, w, a, b):
    """Signed distance to the capsule between ``a`` and ``b`` (u, v, w, radius) and the parameter t."""
    d = b[:3] - a[:3]
    length2 = float(d @ d)
    du, dv, dw = u - a[0], v - a[1], w - a[2]
    if length2 > 0:
        t = np.clip((du * d[0] + dv * d[1] + dw * d[2]) / np.float32(length2), 0.0, 1.0)
    else:
        t = np.zeros_like(du)
    dist = np.sqrt((du - t * d[0]) ** 2 + (dv - t * d[1]) ** 2 + (dw - t * d[2]) ** 2) - (a[3] + t * (b[3] - a[3]))
    return dist, t


def _path_box(path):
    """(lo, hi) corners (mm) of the box around a tube path (u, v, w, radius)."""
    path = np.asarray(path, dtype=np.float64)
    r = path[:, 3].max()
    return path[:, :3].min(0) - r, path[:, :3].max(0) + r


class _Scene:
    """The grid in anatomical coordinates and the tissue map being painted.

    Anatomical coordinates (mm): ``u`` towards the patient's right, ``v`` anterior, ``w`` superior,
    origin on the body axis; they are the grid's world coordinates moved by the body's random shift
    and roll and by a smooth random displacement field (which bends every structure alike).
    """

    def __init__(self, rng: np.random.Generator, seed: int, axes):
        self.rng = rng
        self.axes = axes
        shape = tuple(len(a) for a in axes)
        self.tissue = np.zeros(shape, dtype=np.uint8)
        # Body placement: in-plane shift and roll, level along the body axis.
        self.shift = np.array([rng.normal(0, 4.0), rng.normal(0, 4.0), rng.uniform(-PHANTOM_Z_JITTER_MM, PHANTOM_Z_JITTER_MM)])
        self.roll = np.radians(rng.normal(0, 2.0))
        # Smooth deformation: a large scale (whole-body bending) and a middle scale (organ shapes).
        field_rng = np.random.default_rng([seed, 1])
        disp = []
        for _ in range(3):
            d = 5.0 * _gaussian_field(field_rng, axes, 48.0, _FIELD_BOX_MM)
            d += 2.5 * _gaussian_field(field_rng, axes, 20.0, _FIELD_BOX_MM)
            disp.append(d)
        self.margin = float(max(np.abs(d).max() for d in disp)) + 2.0
        x = axes[0][:, None, None] + disp[0] - np.float32(self.shift[0])
        y = axes[1][None, :, None] + disp[1] - np.float32(self.shift[1])
        c, s = np.float32(np.cos(self.roll)), np.float32(np.sin(self.roll))
        self.u = (c * x + s * y).astype(np.float32)
        self.v = (-s * x + c * y).astype(np.float32)
        self.w = (axes[2][None, None, :] + disp[2] - np.float32(self.shift[2])).astype(np.float32)
        del x, y, disp
        self.w_extent = float(np.abs(self.w).max())  # farthest height from the reference level
        # Set by _build_body: anatomy parameters, polar coordinates around the body axis, depth
        # under the skin, fat thickness, inner face of the wall, and the regions organs may fill.
        self.g: dict = {}
        self.r = self.depth = self.fat_t = self.wall_inner = None
        self.cavity = self.abdomen = None

    def box(self, lo, hi):
        """Index slices of the voxels whose anatomical coordinates may fall in [lo, hi] (mm), or None."""
        lo = np.asarray(lo, dtype=np.float64) - self.margin
        hi = np.asarray(hi, dtype=np.float64) + self.margin
        # World x, y of the box corners (undo the roll), then the shift.
        c, s = np.cos(self.roll), np.sin(self.roll)
        corners = np.array([[a, b] for a in (lo[0], hi[0]) for b in (lo[1], hi[1])])
        xs = c * corners[:, 0] - s * corners[:, 1] + self.shift[0]
        ys = s * corners[:, 0] + c * corners[:, 1] + self.shift[1]
        bounds = [(xs.min(), xs.max()), (ys.min(), ys.max()), (lo[2] + self.shift[2], hi[2] + self.shift[2])]
        slices = []
        for axis, (a, b) in zip(self.axes, bounds):
            i0 = int(np.searchsorted(axis, a, side="left"))
            i1 = int(np.searchsorted(axis, b, side="right"))
            if i1 <= i0:
                return None
            slices.append(slice(i0, i1))
        return tuple(slices)

    def tube(self, path, with_centre_v: bool = False):
        """Signed distance (mm, < 0 inside) to a tube around ``path`` over the tube's bounding box.

        ``path`` is an (n, 4) array of centreline points (u, v, w) and radii, linear along each
        segment. Each segment is measured only within its own box (far voxels keep +inf), which keeps
        long, curved tubes cheap. Returns ``(slices, sdf)``, or ``(slices, sdf, centre_v)`` with the
        v of the nearest centreline point (gas-fluid levels: gas rises anteriorly in a supine
        patient); ``None`` when the tube misses the grid.
        """
        path = np.asarray(path, dtype=np.float32)
        sl = self.box(*_path_box(path))
        if sl is None:
            return None
        sdf = np.full(tuple(s.stop - s.start for s in sl), np.inf, dtype=np.float32)
        centre_v = np.zeros_like(sdf) if with_centre_v else None
        for a, b in zip(path[:-1], path[1:]):
            r = max(a[3], b[3])
            seg = self.box(np.minimum(a[:3], b[:3]) - r, np.maximum(a[:3], b[:3]) + r)
            if seg is None:
                continue
            rel = tuple(slice(s.start - o.start, s.stop - o.start) for s, o in zip(seg, sl))
            dist, t = _segment_distance(*self.coords(seg), a, b)
            sub = sdf[rel]  # a view: updated in place
            closer = dist < sub
            sub[closer] = dist[closer]
            if with_centre_v:
                centre_v[rel][closer] = (a[1] + t * (b[1] - a[1]))[closer]
        return (sl, sdf, centre_v) if with_centre_v else (sl, sdf)

    def coords(self, sl):
        return self.u[sl], self.v[sl], self.w[sl]

    def paint(self, name: str, sl, mask, only=None, over=None):
        """Set tissue ``name`` where ``mask`` holds within slices ``sl``.

        Args:
            name: tissue name from the tissue table.
            sl: slices from :meth:`box` or :meth:`tube` (None: nothing to paint).
            mask: boolean array of the box's shape.
            only: optional full-grid boolean region the tissue must stay in.
            over: optional tissue names: only voxels currently of these tissues change.
        """
        if sl is None:
            return
        if only is not None:
            mask = mask & only[sl]
        target = self.tissue[sl]
        if over is not None:
            mask = mask & np.isin(target, [_T[n] for n in over])
        target[mask] = _T[name]


# -- body, thorax, bowel -----------------------------------------------------------------------------
def _frame(long_axis, towards) -> np.ndarray:
    """Rotation whose rows are local axes p (``towards``, made orthogonal), q and r (``long_axis``)."""
    r = np.asarray(long_axis, dtype=np.float64)
    r = r / np.linalg.norm(r)
    p = np.asarray(towards, dtype=np.float64)
    p = p - (p @ r) * r
    p = p / np.linalg.norm(p)
    return np.stack([p, np.cross(r, p), r])


def _diaphragm(g: dict, u, v):
    """Height (w, mm) of the diaphragm above (u, v): two domes, lower posteriorly and laterally."""
    s = g["s"]
    side = 0.5 + 0.5 * np.tanh(u / 30.0)  # 1 on the right, 0 on the left
    top = g["dome_l"] + side * (g["dome_r"] - g["dome_l"])
    lateral = (np.abs(u) - 60.0 * s) / (80.0 * s)
    posterior = np.maximum(0.0, -v) / (80.0 * s)
    anterior = np.maximum(0.0, v - 40.0 * s) / (80.0 * s)
    # Deep posterior recesses: lung bases behind the liver and spleen on the upper slices.
    return top - 25.0 * lateral**2 - 50.0 * posterior**2 - 15.0 * anterior**2


def _build_body(scene: _Scene) -> None:
    """Skin, subcutaneous fat, muscle wall, the peritoneal cavity, table, lung bases, heart, bowel."""
    rng = scene.rng
    s = float(np.clip(rng.normal(1.0, 0.05), 0.88, 1.08))  # build: scales every position and size
    fat = rng.uniform(6.0, 26.0)  # subcutaneous fat (mm)
    muscle = rng.uniform(9.0, 15.0)
    g = {
        "s": s,
        "fat": fat,
        "muscle": muscle,
        # Peritoneal half-axes 140 x 100 mm: the real CT's body (~170 x 134) minus its wall.
        "body_a": 140.0 * s * rng.uniform(0.95, 1.03) + fat + muscle,
        "body_b": 100.0 * s * rng.uniform(0.95, 1.05) + fat + muscle,
        "dome_r": 88.0 * s + rng.normal(0, 6.0),
        "table_gap": rng.uniform(8.0, 25.0),
    }
    g["dome_l"] = g["dome_r"] - rng.uniform(5.0, 15.0)
    # Spine (real CT): vertebral body centre 24 mm behind the body centre, half-widths 25 x 20 mm;
    # lordosis brings the lower lumbar spine forward.
    g["vb_v0"] = -24.0 * s + rng.normal(0, 4.0)
    g["vb_u0"] = rng.normal(0, 2.0)
    g["vb_a"] = 25.0 * s * rng.uniform(0.9, 1.1)
    g["vb_b"] = 20.0 * s * rng.uniform(0.9, 1.1)
    g["lordosis"] = rng.uniform(0.06, 0.18)
    g["vertebra_mm"] = 36.0 * s * rng.uniform(0.93, 1.07)
    g["vertebra_phase"] = rng.uniform(0, 1)
    scene.g = g

    # Outline and wall thicknesses as functions of the angle theta around the body axis (tables):
    # flatter back (superellipse), gentle lobes; fat thicker in places; rectus muscles in front with a
    # thin linea alba, thinner muscle behind.
    tab = np.linspace(-np.pi, np.pi, 1025)
    ct, st = np.abs(np.cos(tab)), np.abs(np.sin(tab))
    p = np.where(np.sin(tab) < 0, rng.uniform(2.3, 3.0), 2.0)
    skin_tab = ((ct / g["body_a"]) ** p + (st / g["body_b"]) ** p) ** (-1.0 / p)
    fat_tab = np.full_like(tab, fat)
    for k in (2, 3, 4):
        skin_tab *= 1.0 + rng.uniform(0, 0.015) / (k - 1) * np.cos(k * tab + rng.uniform(0, 2 * np.pi))
    for k in (1, 2, 3):
        fat_tab *= 1.0 + rng.uniform(0, 0.35) / k * np.cos(k * tab + rng.uniform(0, 2 * np.pi))
    fat_tab = np.maximum(fat_tab, 3.0)
    front = np.maximum(np.sin(tab), 0.0)
    muscle_tab = muscle * (1.0 + 0.5 * front**6 - 0.3 * np.maximum(-np.sin(tab), 0.0))
    muscle_tab *= 1.0 - 0.8 * np.exp(-(((tab - np.pi / 2) / 0.04) ** 2))

    u, v, w = scene.u, scene.v, scene.w
    r = np.hypot(u, v)
    theta = np.arctan2(v, u)
    skin = np.interp(theta, tab, skin_tab).astype(np.float32) * (1.0 - 0.0003 * w)  # wider lower down
    fat_t = np.interp(theta, tab, fat_tab).astype(np.float32)
    wall_t = fat_t + np.interp(theta, tab, muscle_tab).astype(np.float32)
    depth = skin - r
    t = scene.tissue
    t[depth >= 0] = _T["subcutaneous_fat"]
    t[(depth >= 0) & (depth < 2.0)] = _T["skin"]
    t[(depth >= fat_t) & (depth < wall_t)] = _T["muscle"]
    cavity = depth >= wall_t
    t[cavity] = _T["visceral_fat"]
    scene.r, scene.depth, scene.fat_t, scene.cavity = r, depth, fat_t, cavity
    scene.wall_inner = skin - wall_t  # distance from the axis to the inner face of the wall

    # Table: a thin curved plate under the back.
    table_v = -(g["body_b"] + g["table_gap"]) + 0.0015 * u**2
    t[(v < table_v) & (v > table_v - 5.0) & (np.abs(u) < 230.0) & (depth < 0)] = _T["table"]

    # Above the diaphragm: lung bases and the heart; a 4 mm muscular diaphragm between them and the
    # abdomen.
    h = _diaphragm(g, u, v)
    thorax = cavity & (w >= h)
    t[cavity & (w >= h - 4.0) & (w < h)] = _T["muscle"]
    t[thorax] = _T["lung"]
    heart_c = np.array([-25.0 * s, 30.0 * s, g["dome_r"] + 50.0 * s])
    sl = scene.box(heart_c - 90 * s, heart_c + 90 * s)
    if sl is not None:
        heart = _ellipsoid(*scene.coords(sl), heart_c, np.array([75, 55, 70]) * s, _rotation(rz=-25)) < 1
        scene.paint("heart", sl, heart, only=thorax)
    scene.abdomen = cavity & (w < h - 4.0)
    _build_bowel(scene)


def _build_bowel(scene: _Scene) -> None:
    """Unlabelled colon, small bowel and duodenum: soft tissue, gas and stool that organs may cover."""
    rng, g = scene.rng, scene.g
    s = g["s"]
    # Colon: ascending, hepatic flexure, transverse (sagging in front), splenic flexure, descending.
    ctrl = np.array([
        [95, 5, -150], [95, 10, -50], [85, 40, -20], [40, 80, -40], [-10, 85, -45 + rng.uniform(-25, 15)],
        [-60, 75, -20], [-100, 35, 15], [-112, 0, -20], [-112, -5, -150],
    ]) * s + rng.normal(0, 7.0, (9, 3))
    colon = _smooth_tube(ctrl, rng.uniform(16.0, 24.0, len(ctrl)) * s, 2)
    gas_level = rng.uniform(-0.2, 0.8)  # gas in front of this fraction of a typical radius
    tube = scene.tube(colon, with_centre_v=True)
    if tube is not None:
        sl, sdf, cv = tube
        sv = scene.v[sl]
        scene.paint("bowel", sl, sdf < 0, only=scene.abdomen)  # a 3 mm wall round the lumen
        lumen = sdf <= -3.0
        scene.paint("stool", sl, lumen, only=scene.abdomen)
        scene.paint("bowel_gas", sl, lumen & (sv - cv > gas_level * 20.0 * s), only=scene.abdomen)
    # Small bowel: fluid-filled loops in the mid and lower abdomen, some with gas in front.
    for _ in range(40):
        c = np.array([rng.uniform(-100, 100), rng.uniform(-20, 95), rng.uniform(-170, 20)]) * s
        semi = rng.uniform(9.0, 18.0, 3) * s
        rot = _rotation(*rng.uniform(-60, 60, 3))
        gas = rng.random() < 0.3
        sl = scene.box(c - semi.max(), c + semi.max())
        if sl is None:
            continue
        su, sv, sw = scene.coords(sl)
        q = _ellipsoid(su, sv, sw, c, semi, rot)
        scene.paint("bowel", sl, q < 1, only=scene.abdomen)
        if gas:
            scene.paint("bowel_gas", sl, (q < 0.6) & (sv > c[1] + 0.2 * semi.min()), only=scene.abdomen)
    # Duodenum: a C around the pancreatic head, from the pylorus down and across the midline.
    ctrl = np.array([[30, 45, -20], [55, 25, -35], [55, 20, -60], [20, 25, -75], [-20, 30, -65], [-30, 35, -45]]) * s
    tube = scene.tube(_smooth_tube(ctrl + rng.normal(0, 4.0, ctrl.shape), rng.uniform(10, 14) * s, 2), with_centre_v=True)
    if tube is not None:
        sl, sdf, cv = tube
        sv = scene.v[sl]
        scene.paint("bowel", sl, sdf < 0, only=scene.abdomen)
        scene.paint("bowel_gas", sl, (sdf < -3) & (sv - cv > 4.0), only=scene.abdomen)


# -- organs ------------------------------------------------------------------------------------------
def _jitter(rng, centre, sd=6.0):
    return np.asarray(centre, dtype=np.float64) + rng.normal(0, sd, 3)


def _build_organs(scene: _Scene) -> None:
    """The 13 BTCV organs, painted in order: later organs cover earlier ones where they touch."""
    rng, g = scene.rng, scene.g
    s = g["s"]
    dome_r, dome_l = g["dome_r"], g["dome_l"]
    level = (dome_r - 88.0 * s) * 0.5  # organs under the domes follow them half-way
    abdomen, cavity = scene.abdomen, scene.cavity

    def vb_v(w):  # vertebral body centre v at height w (lordosis)
        return g["vb_v0"] - g["lordosis"] * np.asarray(w, dtype=np.float64)

    # All random draws come first, in a fixed order, so the anatomy never depends on the grid.
    size = {name: float(np.exp(rng.normal(0, 0.08))) * s for name in (
        "liver", "spleen", "kidney_r", "kidney_l", "gallbladder", "stomach", "pancreas", "adrenal_r",
        "adrenal_l", "aorta", "ivc", "veins", "esophagus")}

    # Aorta: on the left front of the vertebral bodies, widening upwards (9 -> 13 mm in the real CT).
    k = size["aorta"]
    ws = np.linspace(-260.0, 260.0, 14)
    ao_r = np.clip(11.0 + 0.02 * ws, 8.5, 14.0) * k
    ao_u = -12.0 * s + rng.normal(0, 3.0) - 0.05 * np.maximum(ws - 30, 0)
    ao_v = vb_v(ws) + g["vb_b"] + ao_r + rng.uniform(0.0, 4.0) + np.clip(-0.06 * ws, -4, 6)
    aorta = np.column_stack([ao_u, ao_v, ws, ao_r])

    # IVC: right of the aorta and a little in front, flattened (two overlapping tubes side by side);
    # it climbs through the back of the liver to the heart.
    k = size["ivc"]
    ws = np.linspace(-260.0, dome_r + 5.0, 12)
    ivc_u = 16.0 * s + rng.normal(0, 3.0) + 0.03 * (ws + 100)
    ivc_v = vb_v(ws) + g["vb_b"] + rng.uniform(8, 14) + np.where(ws > 30, 0.25 * (ws - 30), 0)
    ivc_r = rng.uniform(9.0, 11.0) * k
    ivc_half = rng.uniform(0.2, 0.45) * ivc_r
    ivc = [np.column_stack([ivc_u + d, ivc_v, ws, np.full(12, ivc_r)]) for d in (-ivc_half, ivc_half)]
    ivc_top = np.array([ivc_u[-1], ivc_v[-1], ws[-1] - 12.0])
    # Hepatic veins fan out from the IVC under the dome (a little darker than unenhanced liver).
    hepatic_veins = [
        (ivc_top + np.array([du, dv, dw]) * s + rng.normal(0, 5.0, 3), rng.uniform(3.5, 5.0))
        for du, dv, dw in ((60, -5, -45), (20, 45, -45), (-35, 45, -30))
    ]

    # Liver: the right upper quadrant up to the wall (an envelope wider than the cavity, widening
    # towards the dome), cut below by an inferior border that rises from the right lobe tip to the
    # left lobe; a left lobe across the midline in front of the stomach, the caudate lobe by the IVC.
    k = size["liver"]
    liver = {
        "c": _jitter(rng, (95 * s, 0 * s, 0.0), 5.0)[:2],
        "a": np.array([68.0, 95.0]) * k * rng.uniform(0.9, 1.1),  # in-plane half-axes under the dome
        "tip": dome_r - 150.0 * k + rng.normal(0, 8.0),  # lowest point, far right
        "rise": rng.uniform(0.15, 0.3),  # inferior border rises (mm per mm) towards the left
        "front": rng.uniform(0.1, 0.3),  # ... and towards the front
    }
    left_c = _jitter(rng, (-5 * s, 45 * s, dome_l - 40 * k), 6.0)
    left_semi = np.array([75.0 * rng.uniform(0.8, 1.15), 30.0, 30.0]) * k
    left_rot = _rotation(rng.normal(0, 8), rng.normal(-10, 6), rng.normal(15, 8))
    caudate_c = _jitter(rng, (22 * s, -2 * s, dome_r - 50 * k), 4.0)
    medial_c = _jitter(rng, (35 * s, 35 * s, dome_r - 45 * k), 5.0)  # segment 4: joins the lobes

    # Spleen: a crescent against the left posterolateral wall under the left dome, long axis along
    # the ribs (lower pole in front), concave hilum facing anteromedially.
    k = size["spleen"]
    spleen_c = _jitter(rng, (-95 * s, -28 * s, dome_l - 52 * k), 6.0)
    spleen_semi = np.array([30.0, 52.0, 58.0]) * k
    spleen_rot = _rotation(rng.normal(-20, 8), rng.normal(0, 8), rng.normal(20, 10))
    spleen_hilum = rng.uniform(0.5, 0.7)

    # Kidneys: paravertebral, right lower than left; upper poles medial and posterior, hilum facing
    # anteromedially, renal sinus fat opening at the hilum.
    kidneys = []
    for name, side, w0 in (("right_kidney", 1, -25.0), ("left_kidney", -1, -13.0)):
        k = size["kidney_r" if side > 0 else "kidney_l"]
        c = _jitter(rng, (side * 74 * s, -30 * s, w0 * s + level), 6.0)
        semi = np.array([30.0, 24.0, 58.0]) * k * rng.uniform(0.92, 1.08, 3)
        long_axis = (-side * np.tan(np.radians(rng.normal(12, 5))), -np.tan(np.radians(rng.normal(15, 5))), 1.0)
        hilum = np.radians(rng.normal(35, 8))
        rot = _frame(long_axis, (-side * np.cos(hilum), np.sin(hilum), 0.0))
        kidneys.append((name, c, semi, rot, rng.uniform(0.3, 0.45)))

    # Gallbladder: a pear under the liver, fundus in front and below.
    k = size["gallbladder"]
    gb_c = _jitter(rng, (66 * s, 50 * s, -8 * s + level), 6.0)
    gb_semi = np.array([14.0, 15.0, 28.0]) * k * rng.uniform(0.8, 1.2, 3)
    gb_rot = _frame((rng.normal(0.3, 0.15), rng.normal(-0.5, 0.15), 1.0), (1.0, 0.0, 0.0))

    # Stomach: fundus under the left dome, body down the left front, antrum across to the pylorus.
    k = size["stomach"]
    fundus = np.array([-62 * s, 0 * s, dome_l - 28 * k])
    st_ctrl = np.array([
        fundus,
        [-62 * s, 30 * s, dome_l - 70 * k],
        [-45 * s, 55 * s, dome_l - 100 * k],
        [-5 * s, 65 * s, dome_l - 115 * k],
        [28 * s, 45 * s, dome_l - 105 * k],
    ]) + rng.normal(0, 6.0, (5, 3))
    st_radius = np.array([31.0, 27.0, 23.0, 16.0, 11.0]) * k * rng.uniform(0.8, 1.2)
    gas_fraction = rng.uniform(0.02, 0.3)

    # Esophagus: down the chest in front of and left of the aorta, through the hiatus to the cardia.
    k = size["esophagus"]
    eso_ctrl = np.array([
        [-5 * s, vb_v(dome_r + 130) + 35 * s, dome_r + 130],
        [-10 * s, vb_v(dome_r) + 40 * s, dome_r - 10],
        [-30 * s, 20 * s, dome_l - 25 * s],
        fundus + np.array([25, 18, -15]) * s,
    ]) + rng.normal(0, 3.0, (4, 3))
    eso_radius = rng.uniform(7.0, 10.0) * k
    eso_gas = rng.random() < 0.5

    # Pancreas: head in the duodenal C (right, low), neck in front of the portal confluence, body
    # over the aorta, tail up to the splenic hilum.
    k = size["pancreas"]
    pa_ctrl = np.array([
        [32 * s, 28 * s, -35 * s],
        [15 * s, 38 * s, -15 * s],
        [-15 * s, 42 * s, -8 * s],
        [-55 * s, 25 * s, 0 * s],
        [-85 * s, -5 * s, 12 * s],
    ]) + rng.normal(0, 5.0, (5, 3)) + [0, 0, level]
    pa_radius = np.array([17.0, 10.0, 10.0, 9.0, 8.0]) * k * rng.uniform(0.85, 1.15, 5)

    # Portal / splenic vein: behind the pancreas from the splenic hilum to the confluence, then the
    # portal vein up and right to the liver hilum, with right and left branches.
    k = size["veins"]
    conf = pa_ctrl[1] + np.array([-3, -14, 5]) * s
    splenic = np.array([pa_ctrl[4] + [0, -12 * s, 4 * s], pa_ctrl[3] + [0, -13 * s, 2 * s], pa_ctrl[2] + [0, -14 * s, 2 * s], conf])
    porta = conf + np.array([25, 2, 30]) * s + rng.normal(0, 4, 3)
    portal = np.array([conf, conf + np.array([12, 0, 14]) * s, porta])
    right_branch = np.array([porta, porta + np.array([30, -8, 8]) * s + rng.normal(0, 4, 3)])
    left_branch = np.array([porta, porta + np.array([-28, 20, 12]) * s + rng.normal(0, 4, 3)])
    vein_r = (rng.uniform(4.5, 6.0) * k, rng.uniform(6.5, 8.0) * k)

    # Adrenals: thin inverted-Y plates above and medial to the upper kidney poles: two limbs from an
    # anterior crest, diverging backwards.
    adrenals = []
    for name, side, c0 in (("right_adrenal_gland", 1, (36, -9, 27)), ("left_adrenal_gland", -1, (-42, -6, 32))):
        k = size["adrenal_r" if side > 0 else "adrenal_l"]
        c = _jitter(rng, (c0[0] * s, c0[1] * s, c0[2] * s + level), 4.0)
        limbs = []
        for spread in (-25.0, 25.0):
            a = np.radians(spread + rng.normal(0, 8))
            back = (side * np.sin(a) * 0.6, -np.cos(a), 0.0)  # in-plane direction of the limb
            rot = _frame((rng.normal(0, 0.15), rng.normal(0, 0.15), 1.0), np.cross(back, (0, 0, 1)))
            limbs.append((rot, np.asarray(back), np.array([3.0, 13.0, 18.0]) * k * rng.uniform(0.85, 1.15, 3)))
        adrenals.append((name, c, limbs))

    # -- painting, least to most prominent --------------------------------------------------------
    k = size["liver"]
    sl = scene.box((-110 * s, -130 * s, liver["tip"] - 10), (170 * s, 130 * s, dome_r + 10))
    if sl is not None:
        su, sv, sw = scene.coords(sl)
        # The lobe narrows to a rounded tip against the right wall: half-axes ~ sqrt(height).
        t = np.sqrt(np.clip((sw - liver["tip"]) / (dome_r - liver["tip"]), 0.0, 1.0))
        a_u = liver["a"][0] * (0.2 + 0.8 * t) + 1e-3
        a_v = liver["a"][1] * (0.45 + 0.55 * t)
        right = ((su - liver["c"][0]) / a_u) ** 2 + ((sv - liver["c"][1]) / a_v) ** 2 < 1
        bottom = liver["tip"] + liver["rise"] * (130 * s - su) + liver["front"] * np.abs(sv - 20 * s)
        right &= sw > bottom
        p, q, r = _local(su, sv, sw, left_c, left_rot)
        thin = np.clip(1.0 + 0.5 * p / left_semi[0], 0.2, 1.5)  # thinner towards its left tip
        left = (p / left_semi[0]) ** 2 + (q / (left_semi[1] * thin)) ** 2 + (r / (left_semi[2] * thin)) ** 2 < 1
        caudate = _ellipsoid(su, sv, sw, caudate_c, np.array([20, 18, 30]) * k) < 1
        medial = _ellipsoid(su, sv, sw, medial_c, np.array([40, 35, 40]) * k) < 1
        scene.paint("liver", sl, right | left | caudate | medial, only=abdomen)
    for end, rad in hepatic_veins:
        tube = scene.tube(np.array([[*ivc_top, rad], [*end, rad * 0.5]]))
        if tube is not None:
            scene.paint("hepatic_vein", tube[0], tube[1] < 0, over=("liver",))

    tube = scene.tube(_smooth_tube(st_ctrl, st_radius))
    if tube is not None:
        sl, sdf = tube
        stomach = (sdf < 0) & abdomen[sl]
        scene.paint("stomach_wall", sl, stomach)
        contents = stomach & (sdf < -4.0)
        scene.paint("stomach_contents", sl, contents)
        if contents.any():
            # Gas rises to the front in a supine patient: a flat gas-fluid level in v.
            sv = scene.v[sl]
            scene.paint("stomach_gas", sl, contents & (sv > np.quantile(sv[contents], 1.0 - gas_fraction)))

    k = size["spleen"]
    sl = scene.box(spleen_c - 70 * k, spleen_c + 70 * k)
    if sl is not None:
        su, sv, sw = scene.coords(sl)
        inward = spleen_rot[0] * np.sign(spleen_rot[0, 0])  # thickness axis, pointing medially (+u)
        carve_r = 45.0 * k
        carve_c = spleen_c + inward * (spleen_semi[0] * spleen_hilum + carve_r)
        spleen = (_ellipsoid(su, sv, sw, spleen_c, spleen_semi, spleen_rot) < 1) & (_ellipsoid(su, sv, sw, carve_c, (carve_r,) * 3) >= 1)
        scene.paint("spleen", sl, spleen, only=abdomen)

    for name, c, semi, rot, sinus in kidneys:
        sl = scene.box(c - 70 * s, c + 70 * s)
        if sl is None:
            continue
        p, q, r = _local(*scene.coords(sl), c, rot)  # +p points to the hilum
        bean = (p / semi[0]) ** 2 + (q / semi[1]) ** 2 + (r / semi[2]) ** 2 < 1
        hollow = ((p / semi[0] - 0.85) / 0.9) ** 2 + (q / (semi[1] * sinus)) ** 2 + (r / (semi[2] * 0.45)) ** 2 < 1
        scene.paint("visceral_fat", sl, bean & hollow, only=abdomen)
        scene.paint(name, sl, bean & ~hollow, only=abdomen)

    sl = scene.box(gb_c - 45 * s, gb_c + 45 * s)
    if sl is not None:
        p, q, r = _local(*scene.coords(sl), gb_c, gb_rot)
        pear = 1.0 + 0.35 * np.clip(-r / gb_semi[2], -1, 1)  # wide fundus (local -r), narrow neck
        pear_mask = (p / (gb_semi[0] * pear)) ** 2 + (q / (gb_semi[1] * pear)) ** 2 + (r / gb_semi[2]) ** 2 < 1
        scene.paint("gallbladder", sl, pear_mask, only=abdomen)

    tube = scene.tube(_smooth_tube(pa_ctrl, pa_radius))
    if tube is not None:
        scene.paint("pancreas", tube[0], tube[1] < 0, only=abdomen)

    for name, c, limbs in adrenals:
        sl = scene.box(c - 35 * s, c + 35 * s)
        if sl is None:
            continue
        su, sv, sw = scene.coords(sl)
        gland = np.zeros(su.shape, dtype=bool)
        for rot, back, semi in limbs:
            # Each limb starts at the crest and runs backwards along its own in-plane direction.
            gland |= _ellipsoid(su, sv, sw, c + back * semi[1] * 0.8, semi, rot) < 1
        scene.paint(name, sl, gland, only=abdomen)

    for path in ivc:
        tube = scene.tube(path)
        if tube is not None:
            scene.paint("inferior_vena_cava", tube[0], (tube[1] < 0) & (scene.w[tube[0]] < dome_r - 5), only=cavity)
    tube = scene.tube(aorta)
    if tube is not None:
        scene.paint("aorta", tube[0], tube[1] < 0, only=cavity)
    tube = scene.tube(_smooth_tube(eso_ctrl, eso_radius))
    if tube is not None:
        scene.paint("esophagus", tube[0], tube[1] < 0, only=cavity)
        if eso_gas:
            scene.paint("esophagus_gas", tube[0], tube[1] < -eso_radius + 2.5, only=cavity)
    for seg, rad in ((splenic, vein_r[0]), (portal, vein_r[1]), (right_branch, vein_r[0]), (left_branch, vein_r[0])):
        tube = scene.tube(_smooth_tube(seg, rad, 2))
        if tube is not None:
            scene.paint("portal_and_splenic_vein", tube[0], tube[1] < 0, only=abdomen)


# -- skeleton and muscles ----------------------------------------------------------------------------
def _build_skeleton_and_muscles(scene: _Scene) -> None:
    """Psoas, paraspinal muscles, vertebrae and ribs, painted last: they bound the abdominal cavity."""
    rng, g = scene.rng, scene.g
    s = g["s"]
    psoas_top = rng.uniform(0.0, 30.0) * s
    psoas_rate = rng.uniform(0.12, 0.18)
    para = np.array([rng.uniform(22, 28), rng.uniform(32, 40)]) * s  # half-width, half-depth
    rib_z12 = 25.0 * s + rng.normal(0, 6.0)
    rib_step = g["vertebra_mm"] * rng.uniform(0.75, 0.9)
    rib_slope = rng.uniform(25.0, 35.0)  # mm the rib drops per radian round the body
    rib_ends = [rng.uniform(0.9, 1.2), rng.uniform(1.4, 1.8)] + [rng.uniform(2.2, 2.6) for _ in range(5)]
    t = scene.tissue

    lord = g["lordosis"] * scene.w_extent  # how far the spine's v wanders over the grid's heights
    canal_v = -g["vb_b"] - 11.0 * s  # canal centre, relative to the vertebral body centre

    def region(u_half, v_lo, v_hi, w_hi=1e4):
        """Slices, coordinates and local (du, dv) of a box around the spine (v relative to it)."""
        sl = scene.box((-u_half, g["vb_v0"] + v_lo - lord, -1e4), (u_half, g["vb_v0"] + v_hi + lord, w_hi))
        if sl is None:
            return None
        u, v, w = scene.coords(sl)
        return sl, w, u - g["vb_u0"], v - (g["vb_v0"] - g["lordosis"] * w)

    # Paraspinal muscles fill the gutters behind the transverse processes out to the skin fat.
    box = region(100 * s, canal_v - 2.2 * para[1], canal_v + 10 * s)
    if box is not None:
        sl, w, du, dv = box
        allowed = (scene.depth[sl] >= scene.fat_t[sl])
        for side in (1, -1):
            pm = (np.abs(du - side * para[0] * 1.15) / para[0]) ** 4 + ((dv - canal_v - 2 * s + para[1]) / para[1]) ** 2 < 1
            t[sl][pm & allowed] = _T["muscle"]
    # Psoas: grows downwards from its origin at the upper lumbar spine.
    box = region(100 * s, -30 * s, 40 * s, psoas_top)
    if box is not None:
        sl, w, du, dv = box
        ps_r = np.clip(3.0 + psoas_rate * (psoas_top - w), 0.0, 22.0 * s)
        safe_r = np.maximum(ps_r, 1e-3)
        for side in (1, -1):
            pc_u = side * (g["vb_a"] * 0.75 + ps_r * 0.75)
            psoas = ((du - pc_u) / safe_r) ** 2 + ((dv - 0.2 * ps_r) / (safe_r * 0.9)) ** 2 < 1
            t[sl][psoas & (ps_r > 1.0) & scene.cavity[sl]] = _T["muscle"]
    # Vertebral body (cortex, cancellous bone, discs between), canal and posterior arch.
    box = region(60 * s, canal_v - 45 * s, g["vb_b"] + 5 * s)
    if box is not None:
        sl, w, du, dv = box
        body, ts = scene.depth[sl] >= 0, t[sl]
        level = ((w / g["vertebra_mm"]) + g["vertebra_phase"]) % 1.0
        disc = level < 0.22
        vb_q = (du / g["vb_a"]) ** 2 + (dv / g["vb_b"]) ** 2
        canal_d = np.hypot(du, (dv - canal_v) * 1.1)
        arch = (canal_d < 16.0 * s) & (dv < canal_v + 3.0) & ~disc
        spinous = (np.abs(du) < 4.5 * s) & (dv < canal_v - 8 * s) & (dv > canal_v - 42 * s) & (level > 0.3) & (level < 0.8)
        transverse = (np.abs(dv - canal_v - 4 * s) < 3.5 * s) & (np.abs(du) < 42 * s) & (level > 0.5) & (level < 0.65)
        ts[(arch | spinous | transverse) & body] = _T["cortical_bone"]
        ts[(canal_d < 9.0 * s) & body] = _T["spinal_canal"]
        ts[(vb_q < 1) & ~disc] = _T["cortical_bone"]
        ts[(vb_q < (1 - 3.0 / g["vb_b"]) ** 2) & ~disc] = _T["cancellous_bone"]
        ts[disc & (vb_q < 1.05)] = _T["disc"]

    # Ribs: each runs from beside the spine round the body wall, dropping as it goes forward; an
    # axial slice cuts it as a short bone arc. phi: angle from the back midline (0) to the front (pi).
    top = rib_z12 + len(rib_ends) * rib_step + 10.0
    sl = scene.box((-1e4, -1e4, rib_z12 - rib_slope * np.pi - 10.0), (1e4, 1e4, top))
    if sl is not None:
        u, v, w = scene.coords(sl)
        r, ts = scene.r[sl], t[sl]
        phi = np.abs(np.arctan2(u, -v))
        inner = scene.wall_inner[sl] + g["muscle"] * 0.4
        vbv = g["vb_v0"] - g["lordosis"] * w
        tp_r = np.hypot(42.0 * s, vbv - g["vb_b"] - 7.0 * s)  # transverse process tips from the axis
        along = np.clip((phi - 0.45) / 0.7, 0.0, 1.0)
        near = np.abs(r - (tp_r + along * (inner - tp_r))) < 3.5 * s
        soft = np.isin(ts, [_T[n] for n in ("muscle", "visceral_fat", "subcutaneous_fat", "lung", "bowel")])
        for i, end in enumerate(rib_ends):
            centre = rib_z12 + i * rib_step - rib_slope * phi
            ts[near & soft & (np.abs(w - centre) < 4.0 * s) & (phi > 0.35) & (phi < end)] = _T["rib"]


PHANTOM_MANIFEST = "manifest.json"


def read_phantom_manifest(out_dir: str | os.PathLike) -> dict | None:
    """The JSON of ``out_dir/manifest.json``, or None when there is none.

    Raises:
        SDSegInputError: one line naming the file, for a manifest that is unreadable, invalid (see
            :func:`~sdseg_monai.data.load_manifest`) or not a phantom folder's (other labels than BTCV's).
    """
    import json

    from sdseg_monai.data import load_manifest
    from sdseg_monai.errors import SDSegInputError
    from sdseg_monai.labels import BTCV

    path = Path(out_dir) / PHANTOM_MANIFEST
    if not path.exists():
        return None
    manifest = load_manifest(path)
    if manifest.labels != {o.label: o.name for o in BTCV.organs}:
        raise SDSegInputError("not a phantom manifest: its labels are not the BTCV table phantoms carry; use another folder", path)
    return json.loads(path.read_text(encoding="utf-8"))


def update_phantom_manifest(out_dir: str | os.PathLike, seeds: list[int], split: str) -> Path:
    """Add phantoms ``seeds`` (already written in ``out_dir``) to split ``split`` of
    ``out_dir/manifest.json``, creating it when absent, so that ``sdseg3d train`` and
    ``sdseg3d evaluate`` read phantom folders like any dataset. A seed moves out of any other split.
    (:func:`write_phantoms` checks that manifest before it writes anything.)"""
    import json

    from sdseg_monai.data import atomic_paths
    from sdseg_monai.labels import BTCV

    out = Path(out_dir)
    path = out / PHANTOM_MANIFEST
    manifest = read_phantom_manifest(out)
    if manifest is None:
        manifest = {
            "schema_version": 1,
            "name": "phantoms",
            "description": "Synthetic abdominal CT phantoms (sdseg3d phantom), BTCV 13-organ labels",
            "source": {"generator": "sdseg_monai.phantoms.abdominal_phantom", "license": "generated, no restrictions"},
            "layout": "phantom_<seed>_image.nii.gz / phantom_<seed>_label.nii.gz in the data root",
            "hu_window": list(BTCV.hu_window),
            "labels": {str(o.label): o.name for o in BTCV.organs},
            "subsets": {name: list(members) for name, members in BTCV.subsets.items()},
            "splits": {},
            "cases": {},
        }
    ids = [f"phantom_{int(s)}" for s in seeds]
    for case_id in ids:
        manifest["cases"][case_id] = {"image": f"{case_id}_image.nii.gz", "label": f"{case_id}_label.nii.gz"}
    for name in list(manifest["splits"]):
        manifest["splits"][name] = [c for c in manifest["splits"][name] if c not in ids]
    manifest["splits"].setdefault(split, [])
    manifest["splits"][split] += ids
    with atomic_paths(path) as (tmp,):
        tmp.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return path


def phantom_volumes(seed: int, shape=PHANTOM_SHAPE, spacing=PHANTOM_SPACING):
    """An in-memory phantom as ``(image, label)`` :class:`~sdseg_monai.data.Volume` pairs (no files)."""
    from monai.data import MetaTensor

    from sdseg_monai.data import Volume

    image, label, affine = abdominal_phantom(seed, shape=shape, spacing=spacing)
    source = f"phantom:{seed}"
    return (
        Volume(MetaTensor(torch.from_numpy(image)[None], affine=torch.from_numpy(affine)), source, None, image.shape),
        Volume(MetaTensor(torch.from_numpy(label.astype(np.int16))[None], affine=torch.from_numpy(affine)), source, None, label.shape),
    )
