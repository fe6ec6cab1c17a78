"""Volume in, label volume out: geometry round trips with an oracle, real CT and DICOM, outputs."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from conftest import SHARED_DATA, micro_config
from sdseg_monai.data import Volume, read_volume
from sdseg_monai.errors import SDSegInputError
from sdseg_monai.inference import VolumeSegmenter
from sdseg_monai.metrics import organ_scores
from sdseg_monai.model import SDSeg, resolve_precision
from sdseg_monai.transforms import IMAGE_KEY, LABEL_KEY, SliceGeometry, canonical_transforms

ORGANS = ("spleen", "right_kidney", "left_kidney", "liver")  # BTCV labels 1, 2, 3, 6


def micro_model(slice_size=64, organs=ORGANS, **overrides):
    torch.manual_seed(0)
    return SDSeg(micro_config(organs=organs, preprocessing={"hu_window": (-175, 250), "slice_size": slice_size}, **overrides)).eval()


class OracleInferer:
    """Returns the reference masks of the slices it is asked about, in model space: whatever the
    segmenter loses between the input grid and the model's slices shows up as lost Dice."""

    def __init__(self, reference: Volume, segmenter: VolumeSegmenter):
        transforms = canonical_transforms(segmenter.config.preprocessing, keys=[IMAGE_KEY], label_keys=[LABEL_KEY])
        canonical = transforms({IMAGE_KEY: reference.image.float(), LABEL_KEY: reference.image})[LABEL_KEY][0]
        size_x, size_y, _ = canonical.shape
        geometry = SliceGeometry((size_x, size_y), segmenter.config.preprocessing.slice_size)
        labels = [segmenter.config.organ_labels[k] for k in segmenter.classes]
        per_slice = canonical.permute(2, 0, 1)  # (Z, X, Y)
        self.maps = torch.stack([geometry.masks_to_model(per_slice == v) for v in labels], dim=1)
        self.next = 0

    def __call__(self, inputs, network):
        out = self.maps[self.next : self.next + inputs.shape[0]]
        self.next += inputs.shape[0]
        return out


def ellipsoid_labels(shape, spacing):
    """Label map with four ellipsoid organs sized in mm, so anisotropic grids hold the same anatomy."""
    grid = np.stack(np.meshgrid(*[np.arange(n) * s for n, s in zip(shape, spacing)], indexing="ij"), -1)
    extent = np.array(shape) * np.array(spacing)
    labels = np.zeros(shape, dtype=np.uint8)
    for value, centre, radii in [
        (6, (0.35, 0.4, 0.5), (0.22, 0.2, 0.45)),  # liver
        (1, (0.72, 0.35, 0.5), (0.12, 0.12, 0.4)),  # spleen
        (2, (0.35, 0.75, 0.5), (0.07, 0.1, 0.35)),  # right kidney
        (3, (0.7, 0.75, 0.5), (0.07, 0.1, 0.35)),  # left kidney
    ]:
        d = ((grid - np.array(centre) * extent) / (np.array(radii) * extent)) ** 2
        labels[d.sum(-1) <= 1] = value
    return labels


def image_from_labels(labels):
    hu = {0: -80.0, 6: 60.0, 1: 45.0, 2: 150.0, 3: 150.0}
    image = np.full(labels.shape, -80.0, dtype=np.float32)
    for value, level in hu.items():
        image[labels == value] = level
    return image


def rotation_z(degrees):
    a = np.deg2rad(degrees)
    r = np.eye(4)
    r[:2, :2] = [[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]]
    return r


def affine_for(spacing, kind):
    base = np.diag([*spacing, 1.0])
    base[:3, 3] = [-120.0, 35.5, 410.25]
    if kind == "ras":
        return base
    if kind == "lps":
        return np.diag([-1.0, -1.0, 1.0, 1.0]) @ base
    if kind == "oblique":
        return rotation_z(17) @ np.diag([-1.0, 1.0, -1.0, 1.0]) @ base
    if kind == "permuted":  # voxel axes stored as (S, R, A): axial slices are not the file's last axis
        return base[:, [2, 0, 1, 3]][[0, 1, 2, 3]]
    raise ValueError(kind)


def write_case(tmp_path, labels, affine, name="case"):
    image_path, label_path = tmp_path / f"{name}.nii.gz", tmp_path / f"{name}_labels.nii.gz"
    nib.save(nib.Nifti1Image(image_from_labels(labels), affine), str(image_path))
    nib.save(nib.Nifti1Image(labels, affine), str(label_path))
    return image_path, label_path


def oracle_dice(image_path, label_path, slice_size=64):
    segmenter = VolumeSegmenter(micro_model(slice_size), device="cpu", batch_size=8)
    volume, reference = read_volume(image_path), read_volume(label_path, what="label map")
    segmenter.inferer = OracleInferer(reference, segmenter)
    result = segmenter.segment(volume)
    assert result.labels.shape == volume.shape[:3]
    scores = organ_scores(result.labels, reference.image[0].numpy(), result.organs)
    return {s.name: s.dice for s in scores}, result


@pytest.mark.parametrize(
    "shape, spacing, kind",
    [
        ((97, 131, 7), (1.0, 0.75, 5.0), "lps"),
        ((80, 64, 9), (0.9, 0.9, 2.5), "oblique"),
        ((70, 70, 5), (1.0, 1.0, 3.0), "ras"),
        ((6, 90, 72), (4.0, 1.0, 1.2), "permuted"),
    ],
)
def test_oracle_survives_the_round_trip_on_any_grid(tmp_path, shape, spacing, kind):
    affine = affine_for(spacing, kind)
    if kind == "permuted":
        spacing = (spacing[1], spacing[2], spacing[0])
        labels = np.transpose(ellipsoid_labels((shape[1], shape[2], shape[0]), spacing), (2, 0, 1)).copy()
    else:
        labels = ellipsoid_labels(shape, spacing)
    image_path, label_path = write_case(tmp_path, labels, affine)
    dice, _ = oracle_dice(image_path, label_path, slice_size=128)
    assert dice["liver"] >= 0.98 and dice["spleen"] >= 0.98, dice
    assert min(dice.values()) >= 0.9, dice


def test_single_slice_volume(tmp_path):
    labels = ellipsoid_labels((90, 77, 3), (1.0, 1.0, 1.0))[:, :, 1:2].copy()
    image_path, label_path = write_case(tmp_path, labels, affine_for((1.0, 1.0, 1.0), "lps"))
    dice, result = oracle_dice(image_path, label_path)
    assert result.labels.shape == (90, 77, 1)
    assert dice["liver"] >= 0.98


@pytest.mark.skipif(not (SHARED_DATA / "ct").is_dir(), reason="../shared/data/ct not present")
def test_oracle_on_the_real_abdominal_ct():
    dice, result = oracle_dice(
        SHARED_DATA / "ct" / "abdomen_ct_3mm.nii.gz", SHARED_DATA / "ct" / "abdomen_ct_3mm_labels_btcv.nii.gz", slice_size=128
    )
    assert result.labels.shape == (122, 101, 112)
    for organ in ("liver", "spleen", "left_kidney", "right_kidney"):
        assert dice[organ] >= 0.98, dice


@pytest.mark.skipif(not (SHARED_DATA / "dicom_ct_3slice").is_dir(), reason="../shared/data/dicom_ct_3slice not present")
def test_dicom_series_matches_its_nrrd_liver_mask_through_the_pipeline(tmp_path):
    import SimpleITK as sitk
    folder = SHARED_DATA / "dicom_ct_3slice"
    volume = read_volume(folder)
    assert volume.shape == (512, 512, 3)
    mask_image = sitk.ReadImage(str(folder / "liver_seg.nrrd"))
    mask = sitk.GetArrayFromImage(mask_image).transpose(2, 1, 0).astype(np.uint8)
    assert mask.shape == (512, 512, 3) and mask.max() == 1
    # The mask's own geometry agrees with the series' RAS affine (ITK is LPS).
    assert np.allclose(np.diag([-1, -1, 1]) @ np.array(mask_image.GetOrigin()), volume.affine[:3, 3], atol=1e-3)
    reference = Volume(image=MetaTensor(torch.from_numpy(mask * 6)[None], affine=volume.image.affine), source="nrrd", shape=mask.shape)
    segmenter = VolumeSegmenter(micro_model(256, organs=("liver",)), device="cpu")
    segmenter.inferer = OracleInferer(reference, segmenter)
    result = segmenter.segment(volume)
    (score,) = organ_scores(result.labels, mask * 6, result.organs)
    assert score.dice >= 0.98
    out, sidecar = result.save(tmp_path / "liver.nii.gz")
    written = nib.load(str(out))
    assert written.shape == (512, 512, 3)
    assert np.allclose(written.affine, volume.affine, atol=1e-4)


def test_output_keeps_shape_affine_qform_and_sform(tmp_path):
    labels = ellipsoid_labels((40, 36, 6), (1.2, 1.2, 4.0))
    affine = affine_for((1.2, 1.2, 4.0), "oblique")
    image = nib.Nifti1Image(image_from_labels(labels)[..., None], affine)  # 4D, singleton 4th axis
    image.set_qform(affine, 1)
    image.set_sform(affine @ np.diag([1, 1, 1, 1.0]), 4)
    path = tmp_path / "scan.nii.gz"
    nib.save(image, str(path))
    before = path.read_bytes()
    segmenter = VolumeSegmenter(micro_model(32), device="cpu")
    result = segmenter.segment(path)
    out, sidecar = result.save(tmp_path / "mask.nii.gz")
    assert path.read_bytes() == before  # input untouched
    written = nib.load(str(out))
    assert written.shape == (40, 36, 6, 1)
    assert written.get_data_dtype() == np.uint8
    source = nib.load(str(path))
    for coded in ("get_qform", "get_sform"):
        matrix, code = getattr(written.header, coded)(coded=True)
        expected, expected_code = getattr(source.header, coded)(coded=True)
        assert int(code) == int(expected_code) and np.allclose(matrix, expected, atol=1e-5)
    # Voxel-to-world mapping: a voxel index maps to the same world point in input and output.
    index = np.array([5, 30, 4, 1.0])
    assert np.allclose(written.affine @ index, source.affine @ index, atol=1e-4)
    meta = json.loads(sidecar.read_text())
    assert meta == {
        "labels": {"1": "spleen", "2": "right_kidney", "3": "left_kidney", "6": "liver"},
        "model": "<in-memory SDSeg>",  # given as an SDSeg, not a folder
        "input": str(path),
        "seed": 0,
        "postprocessing": {
            "thresholds": {"spleen": 0.5, "right_kidney": 0.5, "left_kidney": 0.5, "liver": 0.5},
            "largest_component": [],
            "skip_decode_radius": 0.0,
            "axial_smoothing": {},
            "num_shifts": 1,
        },
        "precision": resolve_precision(torch.device("cpu"), "auto", segmenter.config),  # what "auto" ran on this CPU for this model
        "compiled": False,
        "batch_size": 64,  # the CPU's default
        "nonfinite_input_voxels": 0,
    }
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mask.json", "mask.nii.gz", "scan.nii.gz"]


def test_same_input_same_seed_gives_bit_identical_labels(tmp_path):
    labels = ellipsoid_labels((30, 28, 5), (1.5, 1.5, 3.0))
    image_path, _ = write_case(tmp_path, labels, affine_for((1.5, 1.5, 3.0), "lps"))
    segmenter = VolumeSegmenter(micro_model(32), device="cpu", seed=3)
    first = segmenter.segment(image_path).labels
    again = VolumeSegmenter(micro_model(32), device="cpu", seed=3).segment(image_path).labels
    assert np.array_equal(first, again)
    assert first.any()  # random weights still claim voxels: the comparison is not of two empty maps


def test_the_files_layout_is_kept_from_read_to_written_labels_and_changes_no_label(tmp_path):
    from dataclasses import replace

    labels = ellipsoid_labels((30, 28, 5), (1.5, 1.5, 3.0))
    image_path = tmp_path / "case.nii"  # uncompressed: nibabel memory-maps it
    nib.save(nib.Nifti1Image(image_from_labels(labels), affine_for((1.5, 1.5, 3.0), "lps")), str(image_path))
    before = image_path.read_bytes()
    volume = read_volume(image_path)
    array = volume.image.as_tensor()[0].numpy()
    assert array.flags.f_contiguous and not array.flags.c_contiguous  # NIfTI's own order: no reordering copy
    array[0, 0, 0] = 1234.0  # a copy, not a view of the mapped file
    assert image_path.read_bytes() == before
    volume = read_volume(image_path)
    segmenter = VolumeSegmenter(micro_model(32), device="cpu", seed=2)
    result = segmenter.segment(volume)
    assert result.labels.flags.f_contiguous  # written without a reordering copy
    c_order = MetaTensor(volume.image.as_tensor().contiguous(), meta=volume.image.meta)
    assert np.array_equal(segmenter.segment(replace(volume, image=c_order)).labels, result.labels)
    assert result.labels.any()
    out, _ = result.save(tmp_path / "mask.nii.gz")
    assert np.array_equal(np.asanyarray(nib.load(str(out)).dataobj), result.labels)


def test_below_fp32_the_weights_go_channels_last_and_labels_stay_reproducible(tmp_path):
    import torch

    labels = ellipsoid_labels((30, 28, 3), (1.5, 1.5, 3.0))
    image_path, _ = write_case(tmp_path, labels, affine_for((1.5, 1.5, 3.0), "ras"))
    convs = lambda segmenter: [m.weight for m in segmenter.model.modules() if isinstance(m, torch.nn.Conv2d)]  # noqa: E731
    fp32 = VolumeSegmenter(micro_model(32), device="cpu", precision="fp32")
    assert all(w.is_contiguous() for w in convs(fp32))
    bf16 = VolumeSegmenter(micro_model(32), device="cpu", precision="bf16", seed=1)
    assert all(w.is_contiguous(memory_format=torch.channels_last) for w in convs(bf16) if w.shape[-1] > 1)
    first = bf16.segment(image_path).labels
    assert np.array_equal(first, VolumeSegmenter(micro_model(32), device="cpu", precision="bf16", seed=1).segment(image_path).labels)


def test_on_a_gpu_below_fp32_the_network_runs_wholly_in_bf16_on_a_copy_of_the_model(tmp_path, monkeypatch):
    import torch

    import sdseg_monai.inference as inference

    monkeypatch.setattr(inference, "casts_to_bf16", lambda device: True)  # the GPU's choice, on this CPU
    labels = ellipsoid_labels((30, 28, 3), (1.5, 1.5, 3.0))
    image_path, _ = write_case(tmp_path, labels, affine_for((1.5, 1.5, 3.0), "ras"))
    model = micro_model(32)
    segmenter = VolumeSegmenter(model, device="cpu", precision="bf16", seed=1)
    cast = segmenter.model
    assert cast is not model and cast.cast_dtype == torch.bfloat16 and model.cast_dtype is None
    for part in (cast.vision_encoder, cast.unet, cast.autoencoder.decoder):
        assert {p.dtype for p in part.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in model.parameters()} == {torch.float32}  # the caller's model is as it was
    assert {p.dtype for p in cast.autoencoder.encoder.parameters()} == {torch.float32}  # the empty latent's
    assert all(m.weight.is_contiguous() for m in cast.modules() if isinstance(m, torch.nn.Conv2d))  # no NHWC
    seen = []
    for part in (cast.vision_encoder, cast.unet, cast.autoencoder.decoder):
        part.register_forward_pre_hook(lambda module, args: seen.append((args[0].dtype, torch.is_autocast_enabled("cpu"))))
    first = segmenter.segment(image_path).labels
    assert len(seen) >= 3 and set(seen) == {(torch.bfloat16, False)}  # in bf16 throughout, outside autocast
    again = VolumeSegmenter(model, device="cpu", precision="bf16", seed=1).segment(image_path).labels
    assert np.array_equal(first, again)
    slices = torch.rand((2, 3, 32, 32), generator=torch.Generator().manual_seed(0)) * 2 - 1
    for steps in (1, 3):  # one step, and a DDIM chain
        fp32 = model.predict(slices, num_steps=steps, precision="fp32")
        bf16 = cast.predict(slices, num_steps=steps, precision="bf16")
        assert bf16.dtype == torch.float32 and 0 < (fp32 - bf16).abs().max() < 0.05  # bf16's resolution, not another answer
    cast.cast_for_inference(torch.float32)  # undone (the weights keep bf16's rounding): autocast decides again
    assert cast.cast_dtype is None and {p.dtype for p in cast.parameters()} == {torch.float32}


def test_only_one_chunk_of_native_maps_is_held(tmp_path):
    """Streaming: the inferer sees chunks of slices, never the whole volume."""
    labels = ellipsoid_labels((24, 24, 23), (1.0, 1.0, 1.0))
    image_path, _ = write_case(tmp_path, labels, affine_for((1.0, 1.0, 1.0), "ras"))
    segmenter = VolumeSegmenter(micro_model(32), device="cpu", batch_size=8)
    seen = []
    inner = segmenter.inferer
    segmenter.inferer = lambda x, net: seen.append(x.shape[0]) or inner(x, net)
    segmenter.segment(image_path)
    assert sum(seen) == 23 and max(seen) == segmenter.chunk_slices < 23
    # A chunk is as many slices as one batch of pairs holds: one UNet forward each (22 pairs, 4
    # organs: 5 slices, 5 forwards for 23 slices; chunks of 6 slices would have needed 7).
    batched = VolumeSegmenter(micro_model(32), device="cpu", batch_size=22)
    forwards = []
    hook = batched.model.unet.register_forward_hook(lambda module, inputs, output: forwards.append(inputs[0].shape[0]))
    batched.segment(image_path)
    hook.remove()
    assert batched.chunk_slices == 5 and forwards == [20, 20, 20, 20, 12]
    # On a CPU a chunk holds at most 8 slices (full-size maps grow with slices): the default 64 pairs
    # with 4 organs make chunks of 8 slices, 32 pairs a forward.
    default = VolumeSegmenter(micro_model(32), device="cpu")
    forwards.clear()
    hook = default.model.unet.register_forward_hook(lambda module, inputs, output: forwards.append(inputs[0].shape[0]))
    default.segment(image_path)
    hook.remove()
    assert default.batch_size == 64 and default.chunk_slices == 8 and forwards == [32, 32, 28]


def test_segment_array_and_organ_subset():
    labels = ellipsoid_labels((32, 32, 4), (1.0, 1.0, 2.0))
    segmenter = VolumeSegmenter(micro_model(32), device="cpu", organs=["liver"])
    result = segmenter.segment_array(image_from_labels(labels), np.diag([1.0, 1.0, 2.0, 1.0]))
    assert result.organs == {6: "liver"}
    assert set(np.unique(result.labels)) <= {0, 6}


def test_the_model_sees_the_same_ras_slices_however_the_file_stores_them(tmp_path):
    """One anatomy stored as RAS, LPS and with its axes permuted (S, L, A): the slices reaching the
    network are bit-identical, and for the RAS file they are its own axial slices. Built without the
    segmenter's transforms, so an orientation step lost or applied twice shows up here."""
    from sdseg_monai.transforms import axial_slices

    labels = ellipsoid_labels((40, 36, 6), (1.0, 1.1, 3.0))
    ras = nib.Nifti1Image(image_from_labels(labels), affine_for((1.0, 1.1, 3.0), "ras"))
    stored = {"ras": ras}
    for codes in (("L", "P", "S"), ("S", "L", "A")):
        change = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt(("R", "A", "S")), nib.orientations.axcodes2ornt(codes))
        stored["".join(codes)] = ras.as_reoriented(change)
    assert stored["SLA"].shape == (6, 40, 36)
    segmenter = VolumeSegmenter(micro_model(32), device="cpu", batch_size=8)
    seen = {}
    for name, image in stored.items():
        path = tmp_path / f"{name}.nii.gz"
        nib.save(image, str(path))
        batches = []

        def recording(slices, network, **options):
            batches.append(slices.clone())
            return torch.zeros(slices.shape[0], len(segmenter.classes), *slices.shape[-2:])

        segmenter.inferer = recording
        segmenter.segment(path)
        seen[name] = torch.cat(batches)
    assert all(torch.equal(seen["ras"], other) for other in seen.values())
    low, high = segmenter.config.preprocessing.hu_window
    windowed = torch.as_tensor(np.clip((image_from_labels(labels) - low) / (high - low) * 2 - 1, -1, 1))[None]
    own = SliceGeometry(labels.shape[:2], 32).to_model(axial_slices(windowed, range(labels.shape[2])))
    assert torch.allclose(seen["ras"], own, atol=1e-5)


def _lps_space(image, affine):
    """``image`` (X, Y, Z) with a voxel-to-RAS ``affine`` as MONAI readers with
    ``affine_lps_to_ras=False`` give it: the same voxels, the affine to LPS world coordinates."""
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine
    return MetaTensor(torch.as_tensor(image)[None], affine=torch.as_tensor(lps), meta={"space": "LPS"})


@pytest.mark.parametrize("kind", ["ras", "oblique", "permuted"])
def test_an_lps_space_metatensor_is_segmented_as_the_same_anatomy_in_ras(kind):
    """The model sees the same slices, and the labels come back in the input's array order, whether
    the MetaTensor's affine is to RAS or (meta space LPS) to LPS world coordinates."""
    labels = ellipsoid_labels((28, 24, 5), (1.2, 1.0, 3.0))
    image = image_from_labels(labels)
    affine = affine_for((1.2, 1.0, 3.0), kind)
    segmenter = VolumeSegmenter(micro_model(32), device="cpu")
    volumes = {
        "RAS": MetaTensor(torch.as_tensor(image)[None], affine=torch.as_tensor(affine), meta={"space": "RAS"}),
        "LPS": _lps_space(image, affine),
    }
    seen, out = {}, {}
    for space, metatensor in volumes.items():
        batches = []
        inner = segmenter.inferer
        segmenter.inferer = lambda slices, network, **options: batches.append(slices.clone()) or inner(slices, network, **options)
        out[space] = segmenter.segment(Volume(image=metatensor, source=space, shape=image.shape)).labels
        segmenter.inferer = inner
        seen[space] = torch.cat(batches)
    assert torch.equal(seen["RAS"], seen["LPS"])
    assert np.array_equal(out["RAS"], out["LPS"]) and out["LPS"].shape == labels.shape
    assert out["RAS"].any()  # labels to compare
    lps = volumes["LPS"]
    assert lps.meta["space"] == "LPS" and torch.equal(lps.affine, torch.as_tensor(np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine))  # untouched


def test_labels_of_an_lps_space_metatensor_are_written_on_its_anatomy(tmp_path):
    """The saved label map's affine is the RAS affine of the input's voxels (an LPS affine written as
    RAS would mirror the labels left to right); the RAS MetaTensor's file is the negative control."""
    labels = ellipsoid_labels((28, 24, 5), (1.2, 1.0, 3.0))
    image = image_from_labels(labels)
    affine = affine_for((1.2, 1.0, 3.0), "oblique")
    segmenter = VolumeSegmenter(micro_model(32), device="cpu")
    ras = MetaTensor(torch.as_tensor(image)[None], affine=torch.as_tensor(affine), meta={"space": "RAS"})
    written = {}
    for space, metatensor in (("RAS", ras), ("LPS", _lps_space(image, affine))):
        volume = Volume(image=metatensor, source=space, shape=image.shape)
        np.testing.assert_allclose(volume.affine, affine, atol=1e-12)
        path, _ = segmenter.segment(volume).save(tmp_path / f"{space}.nii.gz")
        written[space] = nib.load(str(path))
    for nifti in written.values():
        np.testing.assert_allclose(nifti.affine, affine, atol=1e-5)
        assert nifti.header.get_sform(coded=True)[1] == 1
    assert np.array_equal(written["RAS"].get_fdata(), written["LPS"].get_fdata())


# -- the caller's model -----------------------------------------------------------------------------------
def _convs_channels_last(model) -> bool:
    return any(m.weight.is_contiguous(memory_format=torch.channels_last) and not m.weight.is_contiguous()
               for m in model.modules() if isinstance(m, torch.nn.Conv2d))


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_given_model_is_copied_and_never_changed(precision):
    """VolumeSegmenter(model) leaves the caller's model as it was (mode, layout, weights), and later
    changes to it do not reach the segmenter."""
    model = micro_model(32).train()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    slices = torch.rand((2, 3, 32, 32), generator=torch.Generator().manual_seed(0)) * 2 - 1
    model.eval()
    own = model.predict(slices, precision="fp32")
    model.train()
    segmenter = VolumeSegmenter(model, device="cpu", precision=precision)
    assert model.training and segmenter.model is not model and not segmenter.model.training
    assert not _convs_channels_last(model)
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    model.eval()
    assert torch.equal(model.predict(slices, precision="fp32"), own)  # its own fp32 output, bit for bit

    image = image_from_labels(ellipsoid_labels((24, 20, 4), (1.5, 1.5, 3.0)))
    first = segmenter.segment_array(image).labels
    model.train()  # the caller resumes training it
    with torch.no_grad():
        for p in model.unet.parameters():
            p.add_(0.1)
    assert np.array_equal(segmenter.segment_array(image).labels, first)
    assert np.array_equal(segmenter.segment_array(image).labels, first)


def test_a_model_handed_over_is_prepared_in_place_and_refused_back_in_train_mode():
    model = micro_model(32).train()
    segmenter = VolumeSegmenter(model, device="cpu", precision="bf16", copy_model=False)
    assert segmenter.model is model and not model.training and _convs_channels_last(model)
    image = image_from_labels(ellipsoid_labels((24, 20, 4), (1.5, 1.5, 3.0)))
    segmenter.segment_array(image)
    model.train()
    with pytest.raises(SDSegInputError, match="in train mode") as error:
        segmenter.segment_array(image)
    assert "\n" not in str(error.value)


def test_the_sidecar_records_the_precision_a_cast_model_runs_in():
    image = image_from_labels(ellipsoid_labels((24, 20, 3), (1.5, 1.5, 3.0)))
    cast = micro_model(32).cast_for_inference(torch.bfloat16)
    assert VolumeSegmenter(cast, device="cpu").segment_array(image).sidecar()["precision"] == "bf16"
    assert VolumeSegmenter(cast, device="cpu", precision="bf16").precision == "bf16"
    assert VolumeSegmenter(micro_model(32).to(torch.bfloat16), device="cpu").precision == "bf16"
    half = micro_model(32).cast_for_inference(torch.float16)
    assert VolumeSegmenter(half, device="cpu").precision == "fp16"
    for model, asked in ((cast, "fp32"), (cast, "fp16"), (half, "bf16")):
        with pytest.raises(SDSegInputError, match=f"not precision.{{1,2}}'{asked}'") as error:
            VolumeSegmenter(model, device="cpu", precision=asked)
        assert "\n" not in str(error.value)
    assert VolumeSegmenter(micro_model(32), device="cpu", precision="fp32").segment_array(image).sidecar()["precision"] == "fp32"


def test_a_model_given_in_memory_is_recorded_by_name_or_as_in_memory(tmp_path):
    image = image_from_labels(ellipsoid_labels((24, 20, 3), (1.5, 1.5, 3.0)))
    model = micro_model(32)
    result = VolumeSegmenter(model, device="cpu").segment_array(image)
    assert result.model == result.sidecar()["model"] == "<in-memory SDSeg>"
    model.name_or_path = str(tmp_path / "my_model")  # as from_pretrained records where it loaded from
    assert VolumeSegmenter(model, device="cpu").model_name == str(tmp_path / "my_model")
    folder = model.save_pretrained(tmp_path / "saved")
    assert VolumeSegmenter(folder, device="cpu").model_name == str(folder)


@pytest.mark.parametrize(
    "options, fragment",
    [
        ({"organs": []}, "organs is empty"),
        ({"batch_size": -4}, "batch_size must be a whole number >= 1"),
        ({"batch_size": 0}, "batch_size must be a whole number >= 1"),
        ({"batch_size": 2.5}, "batch_size must be a whole number >= 1"),
        ({"batch_size": True}, "batch_size must be a whole number >= 1"),
    ],
)
def test_bad_settings_are_refused_at_construction_on_one_line(options, fragment):
    with pytest.raises(SDSegInputError, match=fragment) as error:
        VolumeSegmenter(micro_model(32), device="cpu", **options)
    assert "\n" not in str(error.value)
    assert VolumeSegmenter(micro_model(32), device="cpu", batch_size=np.int64(3)).batch_size == 3


def test_progress_receives_each_chunks_slices():
    segmenter = VolumeSegmenter(micro_model(32), device="cpu", batch_size=8)
    calls = []
    image = image_from_labels(ellipsoid_labels((20, 18, 10), (1.5, 1.5, 3.0)))
    volume = Volume(image=MetaTensor(torch.as_tensor(image)[None], affine=torch.eye(4)), source="<a>", shape=image.shape)
    segmenter.segment(volume, progress=calls.append)
    assert segmenter.chunk_slices == 4 and calls == [4, 4, 2]  # increments, not slices done so far
