"""Slice-level transforms: channel modes, the in-plane geometry and label fusion."""

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from sdseg_monai.config import Preprocessing
from sdseg_monai.transforms import (
    AXIS_LABELS,
    FillNonFinite,
    SliceGeometry,
    WindowIntensity,
    axial_slices,
    canonical_transforms,
    fuse_probabilities,
)


def test_hu_window_maps_to_minus_one_one_and_clips():
    volume = MetaTensor(torch.tensor([-1000.0, -175.0, 37.5, 250.0, 3000.0]).reshape(1, 5, 1, 1), affine=torch.eye(4))
    out = canonical_transforms(Preprocessing(hu_window=(-175, 250)))({"image": volume})["image"]
    assert out.flatten().tolist() == pytest.approx([-1.0, -1.0, 0.0, 1.0, 1.0])
    sts = canonical_transforms(Preprocessing(hu_window=(-100, 1100)))({"image": volume})["image"]
    assert sts.flatten()[2].item() == pytest.approx((37.5 + 100) / 1200 * 2 - 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.int16])
def test_window_is_bit_identical_to_monais_scale_intensity_range(dtype):
    from monai.transforms import Orientation, ScaleIntensityRange

    hu = (torch.randn((1, 37, 29, 11), generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 600).to(dtype)
    hu = Orientation(axcodes="RAS", labels=AXIS_LABELS)(MetaTensor(hu, affine=torch.diag(torch.tensor([-1.0, -1.0, 2.5, 1.0]))))
    fused_differs = []
    for low, high in ((-175, 250), (-100, 1100), (-57.3, 181.9)):
        reference = ScaleIntensityRange(low, high, -1.0, 1.0, clip=True)(hu)
        out = WindowIntensity(low, high)(hu)
        assert out.dtype == reference.dtype == torch.float32
        assert torch.equal(out.as_tensor(), reference.as_tensor())
        # meta and the reorientation stay, so that Invertd can undo it
        assert torch.equal(out.affine, hu.affine) and len(out.applied_operations) == len(hu.applied_operations) == 1
        fused = (hu.as_tensor().to(torch.float32) * (2.0 / (high - low)) - (2.0 * low / (high - low) + 1.0)).clamp(-1, 1)
        fused_differs.append(not torch.equal(fused, reference.as_tensor()))
    # Negative control: the same window as one multiply-add is not bit-identical, so the equality
    # above checks the arithmetic, not a tolerance.
    assert any(fused_differs)
    with pytest.raises(ValueError, match="high > low"):
        WindowIntensity(250, 250)


def test_fill_nonfinite_fills_nan_and_inf_and_passes_finite_volumes_through():
    fill = FillNonFinite(-175.0)
    holes = torch.tensor([1.0, float("nan"), float("inf"), -float("inf"), 2.0])
    assert fill(holes).tolist() == [1.0, -175.0, -175.0, -175.0, 2.0]
    finite = torch.tensor([1.0, 2.0])
    assert fill(finite) is finite  # checked without a copy
    # finite voxels whose sum overflows take the exact path, which changes nothing
    huge = torch.full((4,), 3e38)
    assert torch.equal(fill(huge), huge)
    integers = torch.tensor([1, 2], dtype=torch.int16)
    assert fill(integers) is integers


def test_replicate_and_two_and_a_half_d_channels():
    volume = torch.arange(4 * 3 * 5, dtype=torch.float32).reshape(1, 4, 3, 5)
    grey = axial_slices(volume, [0, 4], "replicate")
    assert grey.shape == (2, 3, 4, 3)
    assert torch.equal(grey[1, 0], volume[0, :, :, 4]) and torch.equal(grey[1, 0], grey[1, 2])
    run = axial_slices(volume, range(1, 4), "replicate")  # a run of slices: a view, the same values
    assert torch.equal(run, axial_slices(volume, [1, 2, 3], "replicate"))
    stacked = axial_slices(volume, [0, 2, 4], "2.5d")
    assert torch.equal(stacked[1, 0], volume[0, :, :, 1]) and torch.equal(stacked[1, 2], volume[0, :, :, 3])
    assert torch.equal(stacked[0, 0], volume[0, :, :, 0])  # the edge slice repeats at the ends
    assert torch.equal(stacked[2, 2], volume[0, :, :, 4])


@pytest.mark.parametrize("shape", [(64, 64), (40, 64), (97, 131), (300, 260), (333, 250), (101, 77)])
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
    # No shift on the way there and back (a one-pixel shift keeps Dice >= 0.98): the centre of mass of
    # the resampled map (not of the thresholded mask, whose edges move by up to half a model pixel) stays put.
    def centre(weights):
        grid = torch.stack(torch.meshgrid(*(torch.arange(n, dtype=torch.float64) for n in shape), indexing="ij"))
        return (grid * weights.double()).flatten(1).sum(1) / weights.double().sum()

    there_and_back = geometry.from_model(geometry.to_model(mask[:, None], pad_value=0.0))[0, 0]
    assert torch.allclose(centre(there_and_back), centre(mask[0]), atol=0.1)  # resampling moves it 0.06 px at most
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
    assert fuse_probabilities(torch.full((1, 2, 1, 1), 0.5), [6, 1]).item() == 0  # exactly 0.5: background (out_p > 0.5)
    assert fuse_probabilities(torch.full((1, 2, 1, 1), 0.5001), [6, 1]).item() == 6
    assert fuse_probabilities(torch.zeros(1, 1, 2, 2), np.array([3])).dtype == torch.uint8


def _scipy_largest(mask: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    components, count = ndimage.label(mask, structure=np.ones((3, 3, 3), dtype=bool))
    if count == 0:
        return mask.copy()
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    return components == int(np.argmax(sizes))


def test_largest_component_in_torch_equals_scipy():
    """The GPU's connected components (run here on the CPU) keep the voxels SciPy keeps: random masks of
    every density, a tie (the first in array order wins), diagonal contact (26-connected), a long
    winding path, and an empty mask."""
    from sdseg_monai.transforms import largest_component

    rng = np.random.default_rng(0)
    for _ in range(150):
        mask = rng.random(tuple(rng.integers(1, 12, size=3))) < rng.uniform(0.05, 0.6)
        assert np.array_equal(largest_component(torch.from_numpy(mask)).numpy(), _scipy_largest(mask))
    tie = np.zeros((6, 6, 6), dtype=bool)
    tie[4:6, 4:6, 4:6] = True
    tie[0:2, 0:2, 0:2] = True
    kept = largest_component(torch.from_numpy(tie)).numpy()
    assert kept[0, 0, 0] and not kept[5, 5, 5]
    diagonal = np.zeros((4, 4, 4), dtype=bool)
    diagonal[0, 0, 0] = diagonal[1, 1, 1] = diagonal[3, 3, 3] = True
    assert largest_component(torch.from_numpy(diagonal)).numpy().sum() == 2
    serpentine = np.zeros((41, 30, 1), dtype=bool)
    serpentine[::2] = True
    for row in range(1, 41, 2):
        serpentine[row, 29 if row % 4 == 1 else 0] = True
    assert np.array_equal(largest_component(torch.from_numpy(serpentine)).numpy(), serpentine)
    assert not largest_component(torch.zeros((3, 3, 3), dtype=torch.bool)).any()


def test_keep_largest_component_cuts_only_the_listed_labels():
    from sdseg_monai.transforms import keep_largest_component

    labels = torch.zeros((8, 8, 8), dtype=torch.uint8)
    labels[0:3, 0:3, 0:3] = 1
    labels[6:8, 6:8, 6:8] = 1  # a smaller second piece of organ 1
    labels[0, 7, 7] = 2  # a lone voxel of organ 2, which is not listed
    labels[5, 0, 0] = 2
    out = keep_largest_component(labels, [1])
    assert out[6:8, 6:8, 6:8].eq(0).all() and out[0:3, 0:3, 0:3].eq(1).all()
    assert out[0, 7, 7] == 2 and out[5, 0, 0] == 2 and labels[6, 6, 6] == 1  # the input is untouched
    assert torch.equal(keep_largest_component(labels, [1], in_torch=True), out)  # the GPU's path
    assert torch.equal(keep_largest_component(labels, [1, 2], in_torch=True), keep_largest_component(labels, [1, 2]))


@pytest.mark.parametrize("order", [(0, 1, 2), (2, 0, 1), (1, 2, 0)])
def test_axial_depth_is_the_canonical_slice_count_for_any_axis_order(order):
    """The CLI's progress bar counts the slices the model will see, whatever the file's axis order."""
    from sdseg_monai.transforms import IMAGE_KEY, axial_depth, canonical_transforms

    shape = tuple((5, 6, 7)[i] for i in order)
    affine = np.eye(4)
    affine[:3, :3] = np.eye(3)[:, list(order)] @ np.diag([1.0, -1.0, 1.0])  # permuted, one axis flipped
    image = MetaTensor(torch.zeros((1, *shape)), affine=torch.as_tensor(affine))
    canonical = canonical_transforms(Preprocessing(slice_size=32))({IMAGE_KEY: image})[IMAGE_KEY]
    assert axial_depth(shape, affine) == canonical.shape[-1] == 7  # the third axis of the unpermuted volume


LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@pytest.mark.parametrize("order", [(0, 1, 2), (2, 0, 1)])
def test_an_lps_space_metatensor_reorients_as_the_same_anatomy_in_ras(order):
    """MONAI readers with ``affine_lps_to_ras=False`` give the affine to LPS world coordinates (meta
    space LPS). The same voxels with the RAS affine and with the LPS one give bit-identical canonical
    volumes, and labels inverted back land in the input's array order; the input is left as it was."""
    from sdseg_monai.transforms import IMAGE_KEY, LABEL_KEY, axial_axis, invert_to_input

    shape = tuple((9, 7, 5)[i] for i in order)
    voxels = torch.arange(int(np.prod(shape)), dtype=torch.float32).reshape(1, *shape) - 100  # no symmetry
    ras = np.eye(4)
    ras[:3, :3] = np.eye(3)[:, list(order)] @ np.diag([0.8, -0.9, 3.0])  # permuted, one axis flipped
    ras[:3, 3] = [12.0, -30.0, 5.5]
    lps = LPS_FROM_RAS @ ras
    transforms = canonical_transforms(Preprocessing(slice_size=32), keys=(IMAGE_KEY,), label_keys=(LABEL_KEY,))
    out = {}
    for space, affine in (("RAS", ras), ("LPS", lps)):
        image = MetaTensor(voxels.clone(), affine=torch.as_tensor(affine), meta={"space": space})
        out[space] = transforms({IMAGE_KEY: image, LABEL_KEY: image.clone()})
        if space == "LPS":
            assert image.meta["space"] == "LPS" and torch.equal(image.affine, torch.as_tensor(lps))  # untouched
    assert torch.equal(out["RAS"][IMAGE_KEY].as_tensor(), out["LPS"][IMAGE_KEY].as_tensor())
    assert torch.equal(out["RAS"][LABEL_KEY].as_tensor(), out["LPS"][LABEL_KEY].as_tensor())
    assert torch.equal(out["RAS"][IMAGE_KEY].affine, out["LPS"][IMAGE_KEY].affine)
    for space in ("RAS", "LPS"):  # the canonical "labels" (the voxels) return to the input's array order
        back = invert_to_input(out[space][LABEL_KEY].as_tensor(), out[space][IMAGE_KEY], transforms)
        assert torch.equal(back, voxels)
    # Which input axis holds the axial slices does not depend on the space.
    assert axial_axis(lps) == axial_axis(ras) == order.index(2)
