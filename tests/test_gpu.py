"""The CUDA path: the same labels as the CPU, reproducible, components as SciPy finds them.

Skipped where no CUDA device is present (here and in CI); `benchmarks/gpu_bench.sh run` runs them first
on a lent GPU machine."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

# TF32 convolutions and a different reduction order move a few probabilities across a threshold.
MAX_DIFFERING_SHARE = 0.01
MAX_DICE_CHANGE = 0.01


@pytest.fixture(scope="module")
def phantom():
    from sdseg_monai.phantoms import phantom_volumes

    return phantom_volumes(9000, shape=(128, 128, 24))


def _labels(device: str, precision: str, image):
    from sdseg_monai.inference import VolumeSegmenter
    from sdseg_monai.model import default_model_path

    result = VolumeSegmenter(default_model_path(), device=device, precision=precision).segment(image)
    return result.labels, result.organs


def _dice_by_organ(labels: np.ndarray, truth: np.ndarray, organs: dict[int, str]) -> dict[str, float | None]:
    from sdseg_monai.metrics import organ_scores

    return {score.name: score.dice for score in organ_scores(labels, truth, organs)}


@pytest.fixture(scope="module")
def cpu_reference(phantom):
    return _labels("cpu", "fp32", phantom[0])


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_cuda_labels_agree_with_the_cpu_fp32_labels(phantom, cpu_reference, precision):
    image, truth = phantom
    cpu, organs = cpu_reference
    gpu, gpu_organs = _labels("cuda", precision, image)
    assert gpu.dtype == np.uint8 and gpu.shape == cpu.shape == tuple(image.shape) and gpu_organs == organs
    foreground = int(((cpu > 0) | (gpu > 0)).sum())
    differing = int((cpu != gpu).sum())
    print(f"cuda {precision} against cpu fp32: {differing} of {foreground} foreground voxels differ")
    assert foreground > 1000 and differing <= MAX_DIFFERING_SHARE * foreground
    truth = truth.image[0].numpy()
    cpu_dice, gpu_dice = _dice_by_organ(cpu, truth, organs), _dice_by_organ(gpu, truth, organs)
    for name in organs.values():
        if cpu_dice[name] is not None and gpu_dice[name] is not None:
            assert abs(cpu_dice[name] - gpu_dice[name]) <= MAX_DICE_CHANGE, name


def test_cuda_labels_are_bit_identical_run_to_run(phantom):
    image, _ = phantom
    first, _ = _labels("cuda", "bf16", image)
    second, _ = _labels("cuda", "bf16", image)
    assert np.array_equal(first, second)


def test_largest_component_on_cuda_equals_scipy():
    from sdseg_monai.transforms import keep_largest_component, largest_component

    rng = np.random.default_rng(1)
    for _ in range(40):
        mask = rng.random(tuple(rng.integers(1, 40, size=3))) < rng.uniform(0.05, 0.6)
        expected = keep_largest_component(torch.from_numpy(mask.astype(np.uint8)), [1], in_torch=False).numpy() == 1  # SciPy's
        kept = largest_component(torch.from_numpy(mask).cuda())
        assert kept.is_cuda and np.array_equal(kept.cpu().numpy(), expected)


def test_overlapped_batch_run_on_cuda_equals_case_by_case(model_dir, tmp_path):
    """Reader threads (page-locked volumes, asynchronous copies), inference and the writer thread on a
    GPU give the labels of one case at a time, bit for bit."""
    import nibabel as nib
    from conftest import labelled_scan

    from sdseg_monai.batch import BatchRunner

    tree = tmp_path / "in"
    tree.mkdir()
    image, _, affine = labelled_scan((40, 36, 9))
    for k in range(3):
        nib.save(nib.Nifti1Image((image + 10 * k).astype(np.float32), affine), str(tree / f"scan_{k}.nii.gz"))
    report = BatchRunner(model_dir, tmp_path / "overlapped", device="cuda", dicom_seg=False, readers=3).run(tree)
    one_by_one = BatchRunner(model_dir, tmp_path / "one_by_one", device="cuda", dicom_seg=False)
    rows = [one_by_one.segment_case(case) for case in one_by_one.plan(tree) if case.segmentable]
    assert len(rows) == len(report.rows) == 3 and all(r["status"] == "ok" for r in rows + report.rows)

    def labels(out):
        return {str(p.parent.relative_to(out)): np.asarray(nib.load(str(p)).dataobj) for p in out.rglob("label.nii.gz")}

    a, b = labels(tmp_path / "overlapped"), labels(tmp_path / "one_by_one")
    assert sorted(a) == sorted(b) and len(a) == 3 and all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 2e-3), (torch.bfloat16, 0.1)])
def test_fused_upsampling_on_cuda_decodes_what_diffusers_decodes(dtype, tolerance):
    """The fused upsamplers (one transposed convolution) against diffusers' nearest 2x + 3x3, on the
    default model's decoder, on CUDA in fp32 (TF32 convolutions) and wholly in bf16."""
    import copy

    from sdseg_monai.layers import unfuse_upsample_convs
    from sdseg_monai.model import SDSeg, default_model_path

    fused = SDSeg.from_pretrained(default_model_path()).to("cuda").eval()
    if dtype != torch.float32:
        fused.cast_decoder(dtype)
    stock = copy.deepcopy(fused)
    unfuse_upsample_convs(stock)
    latents = torch.randn((16, 4, 32, 32), generator=torch.Generator().manual_seed(0)).cuda() * 2
    with torch.inference_mode():
        a, b = fused.decode_probabilities(latents), stock.decode_probabilities(latents)
    assert (a - b).abs().max().item() < tolerance
    assert ((a >= 0.5) != (b >= 0.5)).float().mean().item() < 1e-3


def test_compiled_cuda_labels_agree_and_repeat(phantom, cpu_reference):
    """--compile on the GPU (the packaged model; tens of seconds of compiling, so last in this file):
    labels as the CPU's within the same share, and the same twice."""
    from sdseg_monai.inference import VolumeSegmenter
    from sdseg_monai.model import default_model_path

    image, _ = phantom
    cpu, _ = cpu_reference
    segmenter = VolumeSegmenter(default_model_path(), device="cuda", precision="bf16", compile=True)
    first, second = segmenter.segment(image).labels, segmenter.segment(image).labels
    foreground = int(((cpu > 0) | (first > 0)).sum())
    differing = int((cpu != first).sum())
    print(f"cuda bf16 compiled against cpu fp32: {differing} of {foreground} foreground voxels differ")
    assert differing <= MAX_DIFFERING_SHARE * foreground
    assert np.array_equal(first, second)
