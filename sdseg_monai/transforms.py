"""MONAI transforms from a CT volume to the model's slices, and back.

Geometry is handled in two invertible steps:

1. Whole volume, MONAI dictionary transforms: load (NIfTI or a DICOM series) with the affine on a
   ``MetaTensor``, reorient to the canonical orientation (RAS: axial slices along the last axis), and
   window HU to [-1, 1]. ``Invertd`` undoes the reorientation on the output label map.
2. Per slice, :class:`SliceGeometry`: pad the axial slice to a square (keeping the aspect ratio), resize
   to the model's slice size; and exactly the reverse for the model's per-organ maps. Streaming works
   slice by slice, so this step is its own small invertible transform.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from sdseg_monai import _quiet  # noqa: F401
from sdseg_monai.config import Preprocessing

IMAGE_KEY = "image"
LABEL_KEY = "label"
# Windowed intensities live in [-1, 1]; air (below any CT window) maps to -1.
PAD_VALUE = -1.0


# Axis codes name RAS+ world directions, whatever "space" a MetaTensor's meta declares (so every
# MONAI version reorients alike); LPS-space MetaTensors are turned to RAS first (RASSpace).
AXIS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))


def is_lps(image) -> bool:
    """Whether ``image`` is a MetaTensor whose meta says its affine maps voxels to LPS world
    coordinates (MONAI readers with ``affine_lps_to_ras=False``); no ``space`` means RAS, as in MONAI."""
    meta = getattr(image, "meta", None) or {}
    return str(meta.get("space", "RAS")).upper() == "LPS"


class RASSpace:
    """Array transform: an LPS-space MetaTensor (:func:`is_lps`) as a new MetaTensor over the same
    voxels (not copied) with the RAS affine and ``space`` RAS; any other image as it is.

    Reorientation reads the affine's axis codes as RAS (:data:`AXIS_LABELS`): an LPS affine read so
    would mirror left and right. The input is left untouched, so ``Invertd`` still returns to its
    array order.
    """

    def __call__(self, image):
        if not is_lps(image):
            return image
        from monai.data import MetaTensor
        from monai.data.utils import orientation_ras_lps

        meta = {**image.meta, "space": "RAS", "affine": orientation_ras_lps(image.affine)}
        return MetaTensor(image.as_tensor(), meta=meta, applied_operations=list(image.applied_operations))


class FillNonFinite:
    """Array transform: NaN and +/-Inf voxels (e.g. the fill of a resampling) become ``value``.

    For CT, ``value`` is the bottom of the HU window: such voxels count as air, never as tissue.
    """

    def __init__(self, value: float):
        self.value = float(value)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        # A finite sum proves every voxel finite (NaN and Inf propagate through it) at a thirtieth of
        # isfinite's cost; a sum that overflows on finite voxels only costs the no-op fill.
        if not torch.is_floating_point(image) or bool(torch.isfinite(image.sum())):
            return image
        return torch.nan_to_num(image, nan=self.value, posinf=self.value, neginf=self.value)


class _OnKeys:
    """Dictionary version of an array transform: applied to ``keys``, other entries passed on."""

    def __init__(self, keys: str | Sequence[str], transform):
        self.keys = [keys] if isinstance(keys, str) else list(keys)
        self.transform = transform

    def __call__(self, data: dict) -> dict:
        out = dict(data)
        for key in self.keys:
            out[key] = self.transform(out[key])
        return out


class RASSpaced(_OnKeys):
    """Dictionary version of :class:`RASSpace` on ``keys``."""

    def __init__(self, keys: str | Sequence[str]):
        super().__init__(keys, RASSpace())


class FillNonFinited(_OnKeys):
    """Dictionary version of :class:`FillNonFinite` on ``keys``."""

    def __init__(self, keys: str | Sequence[str], value: float):
        super().__init__(keys, FillNonFinite(value))


class WindowIntensity:
    """Array transform: intensities (HU) ``[low, high]`` -> ``[-1, 1]``, clipped, float32.

    The arithmetic of MONAI's ``ScaleIntensityRange(low, high, -1, 1, clip=True)`` step for step, so
    the result is bit-identical, but in place on one new buffer: a quarter of its time on a
    512x512x100 CT, whose four intermediate volumes each cost a fresh 100 MB allocation.
    """

    def __init__(self, low: float, high: float):
        if not high > low:
            raise ValueError(f"the window needs high > low, got [{low}, {high}]")
        self.low, self.high = float(low), float(high)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        from monai.utils import convert_to_dst_type

        data = image.as_tensor() if hasattr(image, "as_tensor") else torch.as_tensor(image)
        out = data.sub(self.low)  # a new buffer; an integer image promotes to float32 here
        out.div_(self.high - self.low).mul_(2.0).add_(-1.0).clamp_(-1.0, 1.0)
        return convert_to_dst_type(out, dst=image, dtype=torch.float32)[0]


class WindowIntensityd(_OnKeys):
    """Dictionary version of :class:`WindowIntensity` on ``keys``."""

    def __init__(self, keys: str | Sequence[str], low: float, high: float):
        super().__init__(keys, WindowIntensity(low, high))


def canonical_transforms(preprocessing: Preprocessing, keys: Sequence[str] = (IMAGE_KEY,), label_keys: Sequence[str] = ()):
    """MONAI dictionary transforms on loaded (1, X, Y, Z) ``MetaTensor``s: reorient to the canonical
    orientation (axial slices along the last axis; an LPS-space MetaTensor's affine read as LPS, see
    :class:`RASSpace`) and window the image keys' HU to [-1, 1], NaN/Inf voxels counting as the
    bottom of the window.

    Invert the reorientation of an output with ``Invertd`` (see :func:`invert_to_input`).
    """
    from monai.transforms import Compose, Orientationd

    low, high = preprocessing.hu_window
    spatial = list(keys) + list(label_keys)
    return Compose(
        [
            RASSpaced(spatial),
            Orientationd(spatial, axcodes=preprocessing.orientation, labels=AXIS_LABELS),
            FillNonFinited(list(keys), value=low),
            WindowIntensityd(list(keys), low, high),
        ]
    )


def volume_transforms(
    preprocessing: Preprocessing,
    keys: Sequence[str] = (IMAGE_KEY,),
    label_keys: Sequence[str] = (),
    reader: str | object | None = None,
):
    """Load from file paths (MONAI ``LoadImaged``), then :func:`canonical_transforms`. For datasets.

    Args:
        preprocessing: the model's preprocessing (HU window, orientation).
        keys: image keys (windowed, float32).
        label_keys: label-map keys (loaded as integers, never windowed or interpolated).
        reader: a MONAI image reader (name or instance); None lets MONAI choose by file type.
    """
    from monai.transforms import Compose, LoadImaged

    steps = [LoadImaged(list(keys), reader=reader, image_only=True, ensure_channel_first=True, dtype=np.float32)]
    if label_keys:
        steps.append(LoadImaged(list(label_keys), reader=reader, image_only=True, ensure_channel_first=True, dtype=np.int16))
    return Compose(steps + list(canonical_transforms(preprocessing, keys, label_keys).transforms))


def axial_axis(affine, orientation: str = "RAS") -> int:
    """The input axis that :func:`canonical_transforms` makes the last, the one axial slices are
    taken along, when it reorients a volume of ``affine`` to ``orientation`` (nibabel's axis codes,
    as MONAI's ``Orientation`` picks them). The same for an LPS affine of the volume: LPS only flips
    the signs of two world axes, and this is which input axis lies along one, not its direction."""
    import nibabel as nib

    codes = nib.aff2axcodes(np.asarray(affine, dtype=np.float64), labels=AXIS_LABELS)
    pair = next(p for p in AXIS_LABELS if orientation[-1].upper() in p)
    return next(i for i, code in enumerate(codes) if code in pair)


def axial_depth(shape: Sequence[int], affine, orientation: str = "RAS") -> int:
    """How many axial slices a volume of ``shape`` gives once reoriented to ``orientation``."""
    return int(shape[axial_axis(affine, orientation)])


def axial_slices(volume: torch.Tensor, indices: Sequence[int] | range, channels: str = "replicate") -> torch.Tensor:
    """Model input channels for axial slices ``indices`` of a canonical volume (1, X, Y, Z).

    ``"replicate"`` repeats the grey slice 3 times (the paper); ``"2.5d"`` stacks slices z-1, z, z+1,
    repeating the edge slice at the volume's ends.

    Returns:
        (n, 3, X, Y) float32.
    """
    data = volume.as_tensor() if hasattr(volume, "as_tensor") else volume
    data = data[0]
    depth = data.shape[-1]
    idx = torch.as_tensor(list(indices), dtype=torch.long)
    if channels == "replicate":
        consecutive = isinstance(indices, range) and indices.step == 1
        # A run of slices is a view (contiguous in a NIfTI's Fortran layout); a gather otherwise.
        grey = (data[..., indices.start : indices.stop] if consecutive else data[..., idx]).permute(2, 0, 1)
        return grey[:, None].expand(-1, 3, -1, -1).float()
    if channels == "2.5d":
        stack = [data[..., (idx + offset).clamp(0, depth - 1)].permute(2, 0, 1) for offset in (-1, 0, 1)]
        return torch.stack(stack, dim=1).float()
    raise ValueError(f"unknown channel mode {channels!r}")


class SliceGeometry:
    """Exact in-plane mapping between native axial slices (X, Y) and the model's square slices.

    The slice is padded symmetrically to a square of side max(X, Y) (so organs keep their shape),
    then resized to ``slice_size``; :meth:`from_model` resizes back and crops the padding away.

    Args:
        in_plane_shape: (X, Y) of the canonical volume.
        slice_size: the model's slice size.
    """

    def __init__(self, in_plane_shape: tuple[int, int], slice_size: int):
        self.shape = (int(in_plane_shape[0]), int(in_plane_shape[1]))
        self.slice_size = int(slice_size)
        self.square = max(self.shape)
        pad_x, pad_y = self.square - self.shape[0], self.square - self.shape[1]
        # F.pad order: last dim first -> (y_before, y_after, x_before, x_after).
        self.padding = (pad_y // 2, pad_y - pad_y // 2, pad_x // 2, pad_x - pad_x // 2)

    def to_model(self, slices: torch.Tensor, pad_value: float = PAD_VALUE, antialias: bool = True) -> torch.Tensor:
        """(n, C, X, Y) native slices -> (n, C, S, S); bilinear, anti-aliased when shrinking."""
        square = F.pad(slices.float(), self.padding, value=pad_value) if any(self.padding) else slices.float()
        if self.square == self.slice_size:
            return square
        size = (self.slice_size, self.slice_size)
        return F.interpolate(square, size=size, mode="bilinear", align_corners=False, antialias=antialias and self.square > self.slice_size)

    def masks_to_model(self, masks: torch.Tensor) -> torch.Tensor:
        """(n, X, Y) binary masks -> (n, S, S) binary masks (area-weighted, then thresholded at 0.5)."""
        return (self.to_model(masks[:, None].float(), pad_value=0.0)[:, 0] >= 0.5).float()

    def from_model(self, maps: torch.Tensor) -> torch.Tensor:
        """(n, K, S, S) model-space maps -> (n, K, X, Y) native maps (bilinear, padding cropped)."""
        if self.square != self.slice_size:
            maps = F.interpolate(maps.float(), size=(self.square, self.square), mode="bilinear", align_corners=False)
        y0, _, x0, _ = self.padding
        return maps[..., x0 : x0 + self.shape[0], y0 : y0 + self.shape[1]]


def smooth_axially(
    maps: torch.Tensor,
    weights: Sequence[float],
    before: torch.Tensor | None = None,
    after: torch.Tensor | None = None,
) -> torch.Tensor:
    """Each organ's probability averaged with its neighbouring axial slices (3D context for a model
    that sees one slice): (p_z + w (p_z-1 + p_z+1)) / (1 + 2w), over the slices there at the ends.

    Args:
        maps: (n, K, X, Y) consecutive slices' per-organ probabilities.
        weights: K neighbour weights; an organ at 0 keeps its maps exactly.
        before: (1, K, X, Y) the slice just before ``maps``, None at the volume's first slice.
        after: (1, K, X, Y) the slice just after, None at the volume's last slice.
    """
    weight = torch.as_tensor([float(w) for w in weights], dtype=torch.float32).reshape(1, -1, 1, 1)
    if not bool((weight > 0).any()):
        return maps
    maps = maps.float()
    weight = weight.to(maps.device)
    nothing = torch.zeros_like(maps[:1])
    previous = torch.cat([nothing if before is None else before.float(), maps[:-1]])
    following = torch.cat([maps[1:], nothing if after is None else after.float()])
    neighbours = torch.full((maps.shape[0], 1, 1, 1), 2.0, device=maps.device)
    neighbours[0] -= float(before is None)
    neighbours[-1] -= float(after is None)
    return (maps + weight * (previous + following)) / (1 + weight * neighbours)


def fuse_probabilities(
    probabilities: torch.Tensor, label_values: Sequence[int], threshold: float | Sequence[float] = 0.5
) -> torch.Tensor:
    """Per-organ probabilities (n, K, X, Y) -> label map (n, X, Y) uint8: among the organs whose
    probability exceeds their threshold (one for all, or one per organ; strictly, as the official
    code's ``out_p > 0.5``), the most probable; background (0) where none does."""
    thresholds = torch.as_tensor(threshold, dtype=probabilities.dtype, device=probabilities.device)
    claimed = probabilities > thresholds.reshape(1, -1, *([1] * (probabilities.ndim - 2)))
    best, index = torch.where(claimed, probabilities, -1.0).max(dim=1)
    lut = torch.as_tensor([int(v) for v in label_values], dtype=torch.uint8, device=probabilities.device)
    labels = lut[index]
    labels[best < 0] = 0
    return labels


def keep_largest_component(labels: torch.Tensor, label_values: Sequence[int], in_torch: bool | None = None) -> torch.Tensor:
    """Label map (X, Y, Z) with each of ``label_values`` cut to its largest 3D connected component
    (26-connected; the first in array order on a tie); the voxels removed become background.
    Returns a new tensor on ``labels``' device. ``in_torch`` (default: off the CPU) uses
    :func:`largest_component` instead of SciPy, the same voxels, so a GPU's labels stay there."""
    out = labels.clone()
    if in_torch if in_torch is not None else out.device.type != "cpu":
        for value in label_values:
            mask = out == int(value)
            out[mask & ~largest_component(mask)] = 0
        return out
    from scipy import ndimage

    array = out.numpy()
    connectivity = np.ones((3, 3, 3), dtype=bool)
    for value in label_values:
        mask = array == int(value)
        if not mask.any():
            continue
        components, count = ndimage.label(mask, structure=connectivity)
        if count > 1:
            sizes = np.bincount(components.ravel())
            sizes[0] = 0
            array[mask & (components != int(np.argmax(sizes)))] = 0
    return out


def largest_component(mask: torch.Tensor) -> torch.Tensor:
    """The largest 26-connected component of a bool (X, Y, Z) ``mask``, in torch on ``mask``'s device
    (the first in array order on a tie, as SciPy's labelling and ``argmax`` choose).

    Each voxel of the mask's bounding box starts with its own linear index; a 3x3x3 minimum spread
    within the mask and pointer jumping (a voxel takes the label of the voxel its label names) repeat
    until nothing changes, when every component carries its first voxel's index."""
    where = mask.nonzero()
    if len(where) == 0:
        return mask.clone()
    low, high = where.min(dim=0).values.tolist(), (where.max(dim=0).values + 1).tolist()
    box = mask[low[0] : high[0], low[1] : high[1], low[2] : high[2]].contiguous()
    ids = _component_ids(box)
    values, counts = torch.unique(ids[box], return_counts=True)  # ascending: array order of first voxels
    out = torch.zeros_like(mask)
    out[low[0] : high[0], low[1] : high[1], low[2] : high[2]] = box & (ids == values[counts.argmax()])
    return out


def _component_ids(box: torch.Tensor) -> torch.Tensor:
    """int64 per voxel of ``box``: the smallest linear index in its 26-connected component (its
    first voxel in array order); ``box.numel()`` outside the mask."""
    outside = box.numel()
    flat_box = box.reshape(-1)
    ids = torch.where(box, torch.arange(outside, device=box.device).view(box.shape), outside)
    while True:
        spread = torch.where(box, _min_3x3x3(ids, outside), outside).reshape(-1)
        for _ in range(2):  # pointer jumping: shortens long chains (a thin, winding organ) to few rounds
            spread = torch.where(flat_box, spread[spread.clamp(max=outside - 1)], outside)
        spread = spread.view(box.shape)
        if torch.equal(spread, ids):
            return ids
        ids = spread


def _min_3x3x3(values: torch.Tensor, fill: int) -> torch.Tensor:
    """Minimum over each voxel's 3x3x3 neighbourhood (``fill`` beyond the edges), one axis at a time."""
    for dim in range(values.ndim):
        size = values.shape[dim]
        edge = values.new_full([1 if d == dim else n for d, n in enumerate(values.shape)], fill)
        padded = torch.cat([edge, values, edge], dim=dim)
        values = torch.minimum(torch.minimum(padded.narrow(dim, 0, size), padded.narrow(dim, 1, size)), padded.narrow(dim, 2, size))
    return values


def invert_to_input(label_canonical: torch.Tensor, image, transforms) -> torch.Tensor:
    """Undo ``transforms`` (the :func:`volume_transforms` that made ``image``) on a canonical label map
    (1, X, Y, Z), with MONAI's ``Invertd``: the result lies on the input's voxel grid, in the file's
    array order, nearest-neighbour so labels stay labels."""
    from monai.data import MetaTensor
    from monai.transforms import Invertd

    label = MetaTensor(label_canonical, meta=dict(image.meta), applied_operations=list(image.applied_operations))
    inverter = Invertd(keys=LABEL_KEY, transform=transforms, orig_keys=IMAGE_KEY, nearest_interp=True)
    out = inverter({LABEL_KEY: label, IMAGE_KEY: image})[LABEL_KEY]
    return out.as_tensor() if hasattr(out, "as_tensor") else out
