"""`sdseg3d stability`: SSIM / MS-SSIM / PSNR across seeds against seed 0, empty predictions skipped,
the Dice spread, JSON, determinism and the command line's one-line refusals."""

from __future__ import annotations

import json
import math

import nibabel as nib
import numpy as np
import pytest
import torch

from conftest import labelled_scan
from sdseg_monai.cli import main
from sdseg_monai.errors import SDSegInputError
from sdseg_monai.stability import MS_SSIM_WEIGHTS, MetricSettings, compare_maps, lpips_availability, stability

SIZE = 32  # the micro model's slice size
DEPTH = 4  # slices of labelled_scan()


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def scans(tmp_path):
    """A folder with one small scan, and a manifest (spleen 1, liver 6) over the same scan and its labels."""
    image, labels, affine = labelled_scan()
    folder = tmp_path / "scans"
    folder.mkdir()
    nib.save(nib.Nifti1Image(image.astype(np.int16), affine), str(folder / "a.nii.gz"))
    nib.save(nib.Nifti1Image(labels, affine), str(tmp_path / "a_label.nii.gz"))
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({
        "schema_version": 1, "name": "toy", "labels": {"1": "spleen", "6": "liver"}, "splits": {"test": ["a"]},
        "cases": {"a": {"image": "scans/a.nii.gz", "label": "a_label.nii.gz"}},
    }))
    return folder, manifest


def _cone(seed: int, centre: tuple[float, float], radius: float) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.arange(SIZE, dtype=torch.float32), torch.arange(SIZE, dtype=torch.float32), indexing="ij")
    distance = ((yy - centre[0]) ** 2 + (xx - centre[1]) ** 2).sqrt()
    return (1 - distance / radius).clamp(0, 1)


def controlled_maps(seed: int, z: int) -> torch.Tensor:
    """(2, S, S) maps for (spleen, liver) on slice z: spleen empty on slice 0 for every seed; liver the
    same on slice 1 whatever the seed, and empty with seed 1 on slice 3; elsewhere cones that move with the seed."""
    spleen = torch.full((SIZE, SIZE), 0.2) if z == 0 else _cone(seed, (10 + z, 12), 8 + seed)
    if z == 1:
        liver = _cone(0, (16, 16), 10) * 0.9
    elif z == 3 and seed == 1:
        liver = torch.zeros((SIZE, SIZE))
    else:
        liver = _cone(seed, (18, 20 - seed), 6 + 2 * seed)
    return torch.stack([spleen, liver])


class ControlledInferer:
    """Stands in for the model: answers :func:`controlled_maps` for the seed it is given, slice by slice."""

    def __init__(self):
        self.seen = 0

    def __call__(self, slices, network, **options):
        seed = options.get("seed", 0)
        maps = torch.stack([controlled_maps(seed, (self.seen + i) % DEPTH) for i in range(slices.shape[0])])
        self.seen += slices.shape[0]
        return maps


def _segmenter(model_dir, **options):
    from sdseg_monai.inference import VolumeSegmenter

    return VolumeSegmenter(model_dir, device="cpu", precision="fp32", **options)


def _direct(reference: torch.Tensor, other: torch.Tensor, settings: MetricSettings) -> tuple[float, float, float]:
    """One pair through MONAI's metric classes, as a reader would call them (float16 maps, as stored)."""
    from monai.metrics import MultiScaleSSIMMetric, PSNRMetric, SSIMMetric

    y = reference.to(torch.float16).float()[None, None]
    y_pred = other.to(torch.float16).float()[None, None]
    ssim = SSIMMetric(spatial_dims=2, data_range=1.0, win_size=settings.kernel_size)(y_pred, y)
    ms = MultiScaleSSIMMetric(spatial_dims=2, data_range=1.0, kernel_size=settings.kernel_size,
                              weights=settings.ms_ssim_weights)(y_pred, y)
    psnr = PSNRMetric(max_val=1.0)(y_pred, y)
    return float(ssim), float(ms), float(psnr)


def _expected(maps_by_seed: list[torch.Tensor], settings: MetricSettings) -> dict:
    """Per organ and pooled: mean over instances of the mean over seeds, with the module's skipping rules,
    computed pair by pair. ``maps_by_seed[i]`` is (K, Z, S, S)."""
    per_organ = []
    reference = maps_by_seed[0]
    for k in range(reference.shape[0]):
        ssim, ms, psnr, skipped_reference, identical = [], [], [], 0, 0
        for z in range(reference.shape[1]):
            if reference[k, z].to(torch.float16).max() < 0.5:
                skipped_reference += 1
                continue
            values = [_direct(reference[k, z], maps[k, z], settings) for maps in maps_by_seed[1:]
                      if maps[k, z].to(torch.float16).max() >= 0.5]
            if values:
                ssim.append(np.mean([v[0] for v in values]))
                ms.append(np.mean([v[1] for v in values]))
                finite = [v[2] for v in values if math.isfinite(v[2])]
                identical += len(values) - len(finite)
                if finite:
                    psnr.append(np.mean(finite))
        per_organ.append({"ssim": ssim, "ms_ssim": ms, "psnr": psnr, "skipped_reference": skipped_reference, "identical": identical})
    return per_organ


# -- metric settings --------------------------------------------------------------------------------------
@pytest.mark.parametrize("size, kernel, scales", [(256, 11, 5), (176, 11, 5), (128, 11, 4), (32, 11, 2), (8, 7, 1)])
def test_ms_ssim_uses_the_scales_that_fit_and_monai_accepts_them(size, kernel, scales):
    settings = MetricSettings.for_size(size)
    assert (settings.kernel_size, len(settings.ms_ssim_weights)) == (kernel, scales)
    if scales == 5:
        assert settings.ms_ssim_weights == MS_SSIM_WEIGHTS  # MONAI's own weights, untouched
    else:
        assert math.isclose(sum(settings.ms_ssim_weights), 1.0)
        assert np.allclose(np.array(settings.ms_ssim_weights) / settings.ms_ssim_weights[0],
                           np.array(MS_SSIM_WEIGHTS[:scales]) / MS_SSIM_WEIGHTS[0])
    generator = torch.Generator().manual_seed(size)
    a, b = torch.rand((2, 2, size, size), generator=generator)
    values = compare_maps(a, b, settings)  # no MONAI size error
    assert all(v.shape == (2,) for v in values.values())
    same = compare_maps(a, a.clone(), settings)
    assert torch.allclose(same["ssim"], torch.ones(2, dtype=torch.float64)) and torch.isinf(same["psnr"]).all()


# -- the measurement --------------------------------------------------------------------------------------
def test_identical_seeds_give_ssim_1_and_infinite_psnr_left_out(model_dir, scans):
    report = stability(_segmenter(model_dir), scans[0], seeds=[0, 0])
    o = report.overall
    assert o.instances == 2 * DEPTH and o.compared + o.skipped == o.instances and o.compared > 0
    assert o.ssim == pytest.approx(1.0, abs=1e-6) and o.ms_ssim == pytest.approx(1.0, abs=1e-6)
    assert o.psnr_db is None and o.psnr_identical_pairs == o.pairs_compared > 0
    summary = json.loads(json.dumps(report.to_dict(), allow_nan=False))["summary"]
    assert summary["psnr_db"] is None and summary["psnr_identical_pairs"] == o.pairs_compared
    assert "inf" in report.format_table()


def test_different_seeds_match_a_direct_monai_call_on_the_same_maps(model_dir, tmp_path):
    from sdseg_monai.data import read_volume
    from sdseg_monai.transforms import IMAGE_KEY, SliceGeometry, axial_slices

    # A deeper scan than a chunk, so each chunk's maps must land at its own slices (chunks of 4, 4 and 2
    # against one predict over all 10).
    depth = 10
    image, _, affine = labelled_scan((24, 20, depth))
    path = tmp_path / "deep.nii.gz"
    nib.save(nib.Nifti1Image(image.astype(np.int16), affine), str(path))
    segmenter = _segmenter(model_dir, batch_size=2)
    assert depth > segmenter.chunk_slices
    report = stability(segmenter, path, seeds=3)
    canonical = segmenter.transforms({IMAGE_KEY: read_volume(path).image})[IMAGE_KEY]
    geometry = SliceGeometry(tuple(canonical.shape[1:3]), SIZE)
    slices = geometry.to_model(axial_slices(canonical.as_tensor(), range(depth), segmenter.config.preprocessing.channels))
    names = list(segmenter.organs.values())
    # Forwards of 2 pairs, as the segmenter's: oneDNN may pick other fp32 kernels for other batch shapes
    # (it does with AMX), and the metrics would then differ by float rounding.
    maps = [segmenter.model.predict(slices, names, seed=s, precision="fp32", batch_size=2).permute(1, 0, 2, 3) for s in range(3)]
    expected = _expected(maps, report.settings)
    close = 1e-5
    for organ, want in zip(report.organs, expected):
        assert organ.compared == len(want["ssim"]) > 0
        assert organ.ssim == pytest.approx(np.mean(want["ssim"]), rel=close) and organ.ssim < 0.999
        assert organ.ms_ssim == pytest.approx(np.mean(want["ms_ssim"]), rel=close) and organ.ms_ssim < 0.999
        assert organ.psnr_db == pytest.approx(np.mean(want["psnr"]), rel=close)
    assert report.settings.to_dict()["ms_ssim"]["scales"] == 2  # 32x32 maps: two scales fit
    pooled = [v for want in expected for v in want["ssim"]]
    assert report.overall.ssim == pytest.approx(np.mean(pooled), rel=close)


def test_empty_predictions_are_skipped_and_counted(model_dir, scans):
    segmenter = _segmenter(model_dir)
    segmenter.inferer = ControlledInferer()
    report = stability(segmenter, scans[0], seeds=3)
    spleen, liver = report.organs
    assert (spleen.name, liver.name) == ("spleen", "liver")
    # Spleen: seed 0 empty on slice 0 -> that instance is skipped whole.
    assert (spleen.instances, spleen.compared, spleen.skipped_empty_reference, spleen.pairs_compared) == (4, 3, 1, 6)
    # Liver: seed 1 empty on slice 3 -> one pair skipped; slice 1 identical for every seed -> PSNR leaves it out.
    assert (liver.compared, liver.pairs_compared, liver.pairs_skipped_empty, liver.psnr_identical_pairs) == (4, 7, 1, 2)
    assert report.overall.skipped == 1 and report.overall.pairs_skipped_empty == 1
    maps = [torch.stack([controlled_maps(s, z) for z in range(DEPTH)], dim=1) for s in range(3)]
    expected = _expected(maps, report.settings)
    for organ, want in zip(report.organs, expected):
        assert organ.ssim == pytest.approx(np.mean(want["ssim"]), rel=1e-6)
        assert organ.ms_ssim == pytest.approx(np.mean(want["ms_ssim"]), rel=1e-6)
        assert organ.psnr_db == pytest.approx(np.mean(want["psnr"]), rel=1e-6)
    assert len(expected[1]["psnr"]) == 3  # the identical slice has no finite PSNR


def test_lpips_only_from_local_weights(model_dir, scans, monkeypatch):
    import sdseg_monai.stability as module

    function, reason = lpips_availability()
    if function is None:
        assert reason.startswith("not computed:") and any(w in reason for w in ("not installed", "weights", "torchvision", "failed"))
        report = stability(_segmenter(model_dir), scans[0], seeds=2)
        assert report.to_dict()["lpips"] is None and report.to_dict()["lpips_reason"] == reason
    # The dataset-level average, with a stand-in distance: per seed over its compared pairs, then over seeds.
    monkeypatch.setattr(module, "lpips_availability", lambda: (lambda a, b: (a.float() - b.float()).abs().flatten(1).mean(1).double(), "stand-in"))
    segmenter = _segmenter(model_dir)
    segmenter.inferer = ControlledInferer()
    lpips = stability(segmenter, scans[0], seeds=3).lpips
    per_seed = []
    for s in (1, 2):
        pairs = [(controlled_maps(0, z)[k], controlled_maps(s, z)[k]) for z in range(DEPTH) for k in range(2)]
        kept = [(a, b) for a, b in pairs if a.max() >= 0.5 and b.max() >= 0.5]
        per_seed.append(np.mean([float((a.half().float() - b.half().float()).abs().mean()) for a, b in kept]))
    assert lpips["by_seed"] == pytest.approx(per_seed, rel=1e-5) and lpips["value"] == pytest.approx(np.mean(per_seed), rel=1e-5)
    assert lpips["pairs"] == 6 + 7


def test_dice_spread_scores_what_segment_writes_with_each_seed(model_dir, scans):
    from sdseg_monai.metrics import organ_scores

    folder, manifest = scans
    report = stability(_segmenter(model_dir), seeds=3, manifest=manifest, data_root=manifest.parent)
    reference = np.asanyarray(nib.load(str(manifest.parent / "a_label.nii.gz")).dataobj)
    for seed in range(3):
        labels = _segmenter(model_dir, seed=seed).segment(folder / "a.nii.gz").labels
        scores = {s.name: s.dice for s in organ_scores(labels, reference, {1: "spleen", 6: "liver"})}
        for organ in report.organs:
            assert organ.dice.by_seed[seed] == scores[organ.name]
    for organ in report.organs:
        values = [v for v in organ.dice.by_seed if v is not None]
        if values:
            assert organ.dice.min == min(values) and organ.dice.max == max(values)
            assert organ.dice.mean == pytest.approx(np.mean(values))
    assert report.to_dict()["per_organ"]["liver"]["dice"]["by_seed"] == report.organs[1].dice.to_dict()["by_seed"]


def test_same_inputs_and_seeds_give_an_identical_report(model_dir, scans):
    _, manifest = scans
    first = stability(_segmenter(model_dir), seeds=3, manifest=manifest, data_root=manifest.parent).to_dict()
    second = stability(_segmenter(model_dir), seeds=3, manifest=manifest, data_root=manifest.parent).to_dict()
    first.pop("seconds"), second.pop("seconds")
    assert first == second


def test_report_round_trips_through_strict_json(model_dir, scans, tmp_path):
    report = stability(_segmenter(model_dir), scans[0], seeds=2)
    path = report.write_json(tmp_path / "stability.json")

    def refuse(constant):
        raise ValueError(f"non-standard JSON constant {constant}")

    loaded = json.loads(path.read_text(), parse_constant=refuse)
    assert loaded == json.loads(json.dumps(report.to_dict()))
    assert loaded["seeds"] == [0, 1] and loaded["reference_seed"] == 0 and loaded["precision"] == "fp32"
    assert loaded["dice"] is None and "no reference labels" in loaded["dice_reason"]
    assert loaded["metrics"]["ms_ssim"]["scales"] == 2 and loaded["instances"]["empty_below"] == 0.5
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary file left


def test_bad_api_inputs():
    with pytest.raises(SDSegInputError, match="at least 2"):
        stability("unused", "unused", seeds=1)
    with pytest.raises(SDSegInputError, match="nothing to measure"):
        stability("unused", None)


# -- command line -----------------------------------------------------------------------------------------
def test_cli_folder_and_manifest(model_dir, scans, tmp_path, capsys):
    folder, manifest = scans
    out = tmp_path / "folder.json"
    assert main(["stability", str(folder), "-m", str(model_dir), "--seeds", "2", "--device", "cpu", "--json", str(out), "-q"]) == 0
    table = capsys.readouterr().out
    assert "spleen" in table and "all organs" in table and "LPIPS" in table
    report = json.loads(out.read_text())
    assert report["cases"] == ["a"] and report["seeds"] == [0, 1] and set(report["per_organ"]) == {"spleen", "liver"}

    out = tmp_path / "manifest.json.out"
    argv = ["stability", "-m", str(model_dir), "--manifest", str(manifest), "--data-root", str(manifest.parent),
            "--seeds", "3", "--device", "cpu", "--json", str(out)]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "[case 1/1, seed 3/3] a" in captured.err and "Dice mean ± std" in captured.out
    report = json.loads(out.read_text())
    assert report["inputs"]["split"] == "test" and len(report["per_organ"]["spleen"]["dice"]["by_seed"]) == 3
    assert set(report["dice"]["mean_over_organs"]) == {"mean", "std", "min", "max", "by_seed"}


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["{folder}", "--seeds", "1"], "--seeds must be at least 2"),
        (["{tmp}/nope.nii.gz"], "no such file"),
        ([], "nothing to measure"),
        (["{folder}", "--manifest", "{manifest}", "--data-root", "{tmp}"], "not both"),
        (["--manifest", "{manifest}"], "--manifest needs --data-root"),
        (["--manifest", "{manifest}", "--data-root", "{tmp}", "--split", "train"], "no split 'train'"),
        (["{folder}", "--json", "{tmp}/missing/out.json"], "its folder does not exist"),
        (["{folder}", "--organs", "brain"], "unknown organ 'brain'"),
        (["{folder}", "--shifts", "3"], "num_shifts must be one of"),
    ],
)
def test_cli_refuses_bad_input_on_one_line(model_dir, scans, tmp_path, capsys, args, fragment):
    folder, manifest = scans
    argv = [a.format(folder=folder, manifest=manifest, tmp=tmp_path) for a in args]
    assert main(["stability", *argv, "-m", str(model_dir), "--device", "cpu", "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err and err.startswith("sdseg3d: error:"), err
    assert fragment in err, err
    assert not (tmp_path / "missing").exists()
