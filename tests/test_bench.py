"""``sdseg3d bench``: the report's structure on a micro model (timings positive, ratios computed from
the measured numbers; no timing thresholds), atomic report files, ``--quick``, one-line errors."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from sdseg_monai import bench
from sdseg_monai.bench import BenchOptions, run_bench, write_report
from sdseg_monai.cli import main
from sdseg_monai.model import default_model_path

from conftest import micro_config

STAGES = {"read", "preprocess", "encoder", "unet", "decoder", "postprocess", "write"}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def calibrated_micro(tmp_path_factory):
    """A 2-organ micro model whose (made-up) calibration skips decodes and smooths the liver."""
    from sdseg_monai.model import SDSeg

    torch.manual_seed(0)
    config = micro_config(organs=("spleen", "liver"), postprocessing={"skip_decode_radius": 0.5, "axial_smoothing": {"liver": 0.5}})
    return SDSeg(config).save_pretrained(tmp_path_factory.mktemp("bench") / "micro")


def micro_options(model: Path, **overrides) -> BenchOptions:
    settings = dict(
        # fp32 alone: "auto" adds bf16 rows on a CPU with AMX, and the row counts below hold on every CPU.
        networks=(str(model),), device="cpu", precision="fp32", shape=(32, 32, 4), real_ct=None, multistep_slices=1,
        protocols=((1, 1), (50, 1), (2, 2)), peer_roi=16, peer_spacing=(25.0, 25.0, 25.0), isolate=False,
    )
    settings.update(overrides)
    return BenchOptions(**settings)


@pytest.fixture(scope="module")
def report(calibrated_micro):
    """One in-process bench of the micro model, the peer's network a single convolution (the
    pipeline around it is the bundle's; SwinUNETR itself takes seconds a window on a CPU)."""
    patch = pytest.MonkeyPatch()
    patch.setattr(bench, "peer_network", lambda feature_size: torch.nn.Conv3d(1, 14, 3, padding=1))
    checkpoints = []
    try:
        result = run_bench(micro_options(calibrated_micro), checkpoint=lambda partial: checkpoints.append((partial.to_dict(), partial.to_markdown())))
        result.checkpoints = checkpoints  # the instance only: what test_checkpoints_* reads
        yield result
    finally:
        patch.undo()


def test_one_step_rows_have_every_stage_and_consistent_rates(report):
    rows = report.one_step
    assert [(r["organs"], r["skip_decode"]) for r in rows] == [(2, True), (1, True), (2, False)]  # 13 organs -> the model's 2
    for row in rows:
        assert "error" not in row
        assert set(row["stages"]) == STAGES and all(v >= 0 for v in row["stages"].values())
        assert row["seconds"] > 0 and row["slices"] == 4
        assert row["slices_per_s"] == pytest.approx(row["slices"] / row["seconds"])
        assert row["seconds_per_volume"] == row["seconds"] and not row["extrapolated"]
        assert sum(row["stages"].values()) <= row["seconds"] * 1.5  # preprocess is timed apart, once more
        items = row["items"]
        assert items["encoder"] == 4 and items["unet"] == 4 * row["organs"] and 0 <= items["decoder"] <= items["unet"]
        assert row["decoded_share"] == pytest.approx(items["decoder"] / items["unet"])
        flops = row["flops_per_item"]
        assert all(flops[p] > 0 for p in ("encoder", "unet", "decoder"))
        total = sum(flops[p] * items[p] for p in flops)
        assert row["tflop"] == pytest.approx(total / 1e12)
        assert row["achieved_tflops"] == pytest.approx(total / row["seconds"] / 1e12)
        assert row["matmul_fraction"] == pytest.approx(row["achieved_tflops"] / report.matmul["fp32"]["tflops"])
        assert row["peak_rss_gb"] is None  # one process ran them all: no one's peak
    assert rows[1]["organ_names"] == ["liver"]
    assert rows[0]["skip_decode_radius"] == 0.5 and rows[2]["skip_decode_radius"] == 0.0
    assert rows[2]["items"]["decoder"] == rows[2]["items"]["unet"]  # every pair decoded


def test_skip_decode_and_multistep_ratios_come_from_the_measured_seconds(report):
    (skip,) = report.skip_decode
    with_skip, every = report.one_step[0], report.one_step[2]
    assert skip["speed_up"] == pytest.approx(every["seconds"] / with_skip["seconds"])
    assert skip["voxels"] == 32 * 32 * 4 and 0 <= skip["voxels_differing"] <= skip["voxels"]
    assert skip["labels_identical"] == (skip["voxels_differing"] == 0)

    (multistep,) = report.multistep
    runs = {(r["steps"], r["samples"], r["decode"]): r for r in multistep["runs"]}
    # The skip runs: the one-sample protocols only (a skip keeps or drops a pair for all its samples).
    assert set(runs) == {(1, 1, "all"), (50, 1, "all"), (2, 2, "all"), (1, 1, "calibrated skip"), (50, 1, "calibrated skip")}
    one, one_skip = runs[(1, 1, "all")]["seconds"], runs[(1, 1, "calibrated skip")]["seconds"]
    for run in runs.values():
        assert run["seconds"] > 0 and run["seconds_per_slice"] == run["seconds"] / multistep["slices"]
        assert run["ratio_to_one_step"] == pytest.approx(run["seconds"] / one)
        same = one_skip if run["decode"] == "calibrated skip" else one
        assert run["ratio_to_one_step_same_decode"] == pytest.approx(run["seconds"] / same)
    ddim, ddim_skip = (t for t in report.targets if "DDIM-50" in t["target"])
    assert ddim["target"].endswith("every pair decoded in both)") and ddim_skip["target"].endswith("the calibrated skip in both)")
    assert ddim["value"] == runs[(50, 1, "all")]["ratio_to_one_step"] and ddim["passed"] == (ddim["value"] >= 10)
    assert ddim_skip["value"] == runs[(50, 1, "calibrated skip")]["ratio_to_one_step_same_decode"]
    assert ddim_skip["passed"] == (ddim_skip["value"] >= 10)
    # FLOP ratios from the counted parts: S slices through the encoder once, S x K pairs through the UNet
    # steps x samples times and the decoder samples times.
    flops = multistep["flops_per_item"]
    assert flops == report.one_step[0]["flops_per_item"]  # the same network
    slices, pairs = multistep["slices"], multistep["slices"] * multistep["organs"]
    work = lambda steps, samples: flops["encoder"] * slices + samples * (steps * flops["unet"] + flops["decoder"]) * pairs  # noqa: E731
    assert runs[(1, 1, "all")]["flop_ratio_to_one_step"] == 1.0
    assert runs[(50, 1, "all")]["flop_ratio_to_one_step"] == pytest.approx(work(50, 1) / work(1, 1))
    assert runs[(2, 2, "all")]["flop_ratio_to_one_step"] == pytest.approx(work(2, 2) / work(1, 1))
    assert 1 < runs[(2, 2, "all")]["flop_ratio_to_one_step"] < 4 < runs[(50, 1, "all")]["flop_ratio_to_one_step"] < 50
    assert "in FLOPs" in ddim["basis"]
    # With the skip, only the decoded pairs count the decoder: what the skip saves, counted, not assumed.
    pairs_range = range(pairs + 1)
    for steps in (1, 50):
        run = runs[(steps, 1, "calibrated skip")]
        assert run["decoded_pairs"] in pairs_range and run["mask_pixels_changed"] >= 0
        skipped = flops["decoder"] * (pairs - run["decoded_pairs"])
        assert run["flop_ratio_to_one_step"] == pytest.approx((work(steps, 1) - skipped) / work(1, 1))
    skipped_one = flops["decoder"] * (pairs - runs[(1, 1, "calibrated skip")]["decoded_pairs"])
    skipped_ddim = flops["decoder"] * (pairs - runs[(50, 1, "calibrated skip")]["decoded_pairs"])
    assert runs[(50, 1, "calibrated skip")]["flop_ratio_to_one_step_same_decode"] == pytest.approx(
        (work(50, 1) - skipped_ddim) / (work(1, 1) - skipped_one))
    assert f"of {pairs} pairs" in ddim_skip["basis"] and "mask pixels changed by the skip" in ddim_skip["basis"]


def test_the_skip_in_a_chain_counts_its_decodes_and_the_mask_pixels_it_changes(calibrated_micro, monkeypatch):
    """Multi-step with the calibrated skip, on a radius that skips half the pairs: the decoded pairs
    are those at or beyond it, and the mask pixels changed are the skipped pairs' own (a skipped
    map is zero; a decoded one is as when every pair is decoded)."""
    from sdseg_monai.model import SDSeg

    model = SDSeg.from_pretrained(calibrated_micro).eval()
    slices = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    maps, distances = model.predict(slices, num_steps=3, seed=0, precision="fp32", return_distances=True)
    radius = float(distances.flatten().sort().values[3:5].mean())  # between the 4th and 5th of 8 pairs
    model.config.postprocessing.skip_decode_radius = radius
    thresholds = torch.tensor([model.config.postprocessing.threshold(n) for n in model.config.organ_names]).view(1, -1, 1, 1)
    skipped = distances < radius
    monkeypatch.setattr(bench, "build_network", lambda spec, device: model)
    monkeypatch.setattr(bench, "_model_slices", lambda model, path, count: slices)
    case = {"device": "cpu", "network": {}, "volume": None, "slices": 4, "precision": "fp32", "batch_size": None, "protocols": [[1, 1], [3, 1], [2, 2]]}
    runs = {(r["steps"], r["samples"], r["decode"]): r for r in bench.multistep_case(case)["runs"]}
    assert set(runs) == {(1, 1, "all"), (3, 1, "all"), (2, 2, "all"), (1, 1, "calibrated skip"), (3, 1, "calibrated skip")}
    chain = runs[(3, 1, "calibrated skip")]
    assert chain["decoded_pairs"] == 4 and chain["mask_pixels_changed"] == int((maps >= thresholds)[skipped].sum())
    assert chain["mask_pixels_changed"] > 0  # not zero by construction: here the skip does change masks


def test_peer_and_targets(report):
    (peer,) = report.peer
    assert peer["mode"] == "whole pipeline" and peer["basis"] == "measured"
    assert peer["windows"] == bench.count_windows(peer["resampled_shape"], 16) and peer["windows"] >= 1
    assert set(peer["stages"]) == {"read", "preprocess", "network", "postprocess", "write"}
    assert peer["seconds_per_window"] == pytest.approx(peer["stages"]["network"] / peer["windows"])
    assert peer["flops_per_window"] == pytest.approx(2 * 27 * 14 * 16**3, rel=0.01)  # the stand-in Conv3d
    default = report.one_step[0]
    vs_peer = next(t for t in report.targets if "SwinUNETR" in t["target"])
    assert vs_peer["value"] == pytest.approx(peer["seconds_per_volume"] / default["seconds_per_volume"])
    assert vs_peer["passed"] == (vs_peer["value"] >= 6)
    cpu = next(t for t in report.targets if "on CPU" in t["target"])
    assert cpu["value"] == default["seconds_per_volume"] and cpu["passed"] == (cpu["value"] <= 60)
    assert not any("RSS" in t["target"] for t in report.targets)  # not measured in-process
    assert report.matmul["fp32"]["tflops"] > 0 and report.options["precisions"][0] == "fp32"
    assert report.machine["torch_threads"] >= 1 and "cpu_fast_bf16" in report.machine
    assert {"torch", "monai", "diffusers", "sdseg3d"} <= set(report.versions)


def test_pipeline_runs_copies_through_the_batch_runner_beside_one_volume(report):
    (row,) = report.pipeline  # 2 volumes on a CPU by default
    single = report.one_step[0]  # same network, volume, every organ, skip as shipped
    assert (row["volumes"], row["organs"], row["precision"], row["readers"]) == (2, 2, "fp32", 0)  # a CPU reads in turn
    assert row["slices"] == 2 * single["slices"] and row["slices_per_s"] == pytest.approx(row["slices"] / row["seconds"])
    assert row["one_volume_slices_per_s"] == single["slices_per_s"]
    assert row["speed_up"] == pytest.approx(row["slices_per_s"] / single["slices_per_s"])
    assert "## Pipeline" in report.to_markdown() and BenchOptions.quick_defaults().pipeline_volumes == 0


def test_checkpoints_keep_what_was_measured_before_each_configuration(report):
    # One checkpoint before each configuration: 3 one-step, the pipeline (right after the default
    # network's rows: on a GPU it is the headline), 1 multi-step, 1 peer.
    stops = [data["incomplete"] for data, _ in report.checkpoints]
    assert len(stops) == 6 and all(stop.startswith("stopped before: ") for stop in stops)
    assert stops[3].startswith("stopped before: pipeline") and stops[4].startswith("stopped before: multi-step")
    rows = [(len(d["one_step"]), len(d["pipeline"]), len(d["multistep"]), len(d["peer"])) for d, _ in report.checkpoints]
    assert rows == [(0, 0, 0, 0), (1, 0, 0, 0), (2, 0, 0, 0), (3, 0, 0, 0), (3, 1, 0, 0), (3, 1, 1, 0)]
    assert report.checkpoints[4][0]["one_step"] == report.to_dict()["one_step"]  # finished rows are final rows
    # Judged as the final report is, on the rows so far: the CPU target once the default's rows exist.
    final = {t["target"]: t for t in report.to_dict()["targets"]}
    assert report.checkpoints[0][0]["targets"] == []
    (cpu,) = report.checkpoints[4][0]["targets"]
    assert "on CPU" in cpu["target"] and cpu == final[cpu["target"]] and "## Targets" in report.checkpoints[4][1]
    assert {t["target"] for t in report.checkpoints[5][0]["targets"]} == {cpu["target"]} | {t for t in final if "DDIM" in t}
    assert any(note.startswith("peak RSS") for note in report.checkpoints[4][0]["notes"])
    assert "**Incomplete report** (stopped before: pipeline" in report.checkpoints[3][1]
    assert report.incomplete is None and "Incomplete" not in report.to_markdown()


def test_report_serialises_and_tabulates(report):
    data = json.loads(json.dumps(report.to_dict(), allow_nan=False))
    assert set(data) >= {"options", "machine", "versions", "matmul", "volumes", "one_step", "multistep", "peer", "skip_decode", "targets", "notes"}
    text = report.to_markdown()
    for heading in ("## One step", "## Skipped decodes", "## Multi-step", "## Conventional 3D peer", "## Targets"):
        assert heading in text
    assert text.count("| micro (saved) |") == 3  # the one-step rows


def test_reports_are_written_atomically(report, tmp_path):
    json_path, md_path = tmp_path / "r.json", tmp_path / "r.md"
    assert write_report(report, json_path, md_path) == [json_path, md_path]
    assert json.loads(json_path.read_text())["one_step"][0]["network"] == "micro"
    assert md_path.read_text().startswith("# sdseg3d bench")

    def broken():
        raise RuntimeError("disk full halfway")

    report.to_markdown = broken  # the instance only; the class is untouched
    try:
        with pytest.raises(RuntimeError):
            write_report(report, None, md_path)
    finally:
        del report.to_markdown
    assert md_path.read_text().startswith("# sdseg3d bench")  # the old file, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json", "r.md"]  # no temporary left


def test_stage_hooks_time_the_cast_model_a_gpu_runs_in_bf16(model_dir, monkeypatch):
    import sdseg_monai.inference as inference

    monkeypatch.setattr(inference, "casts_to_bf16", lambda device: True)  # the GPU's choice, on this CPU
    monkeypatch.setattr(bench, "matmul_tflops", lambda *args, **kwargs: 1.0)  # an emulated bf16 matmul takes minutes here
    report = run_bench(micro_options(model_dir, precision="bf16", organ_counts=(2,), multistep_networks=(), peer=False, pipeline_volumes=0))
    row = next(r for r in report.one_step if r["precision"] == "bf16")
    assert row["items"]["encoder"] == 4 and row["items"]["unet"] == 8 and row["items"]["decoder"] > 0
    assert row["stages"]["decoder"] > 0


def test_pipeline_runs_once_more_compiled_with_its_compiling_timed_apart(model_dir, monkeypatch):
    from sdseg_monai.model import SDSeg

    original = SDSeg.compile_for_inference
    monkeypatch.setattr(SDSeg, "compile_for_inference", lambda self, backend="inductor": original(self, "eager"))  # inductor: a minute here
    torch._dynamo.reset()
    report = run_bench(micro_options(model_dir, organ_counts=(2,), multistep_networks=(), peer=False, pipeline_volumes=1, compile_pipeline=True))
    plain, compiled = report.pipeline
    assert (plain["compiled"], compiled["compiled"]) == (False, True) and "error" not in compiled
    assert compiled["setup_seconds"] > plain["setup_seconds"] > 0  # compiling happens when the runner starts
    assert compiled["slices"] == plain["slices"] == 4 and compiled["slices_per_s"] > 0
    assert "| compiled | start s |" in report.to_markdown() and "| yes |" in report.to_markdown()
    assert len(run_bench(micro_options(model_dir, organ_counts=(2,), multistep_networks=(), peer=False, pipeline_volumes=1)).pipeline) == 1  # CPU: plain only
    torch._dynamo.reset()


def test_isolated_configuration_measures_its_own_peak_rss(model_dir):
    # The uncalibrated micro model: one configuration, one fresh process.
    isolated = run_bench(micro_options(model_dir, organ_counts=(1,), multistep_networks=(), peer=False, isolate=True, pipeline_volumes=0))
    (row,) = isolated.one_step
    assert "error" not in row and 0.1 < row["peak_rss_gb"] < 64
    rss = next(t for t in isolated.targets if "RSS" in t["target"])
    assert rss["value"] == row["peak_rss_gb"] and rss["passed"] == (rss["value"] <= 3)
    # Beside it, in its own process, the same run with the C library's own malloc: same labels.
    from sdseg_monai.allocator import supported

    if supported():
        (compared,) = isolated.allocator
        assert compared["applied"] == [True, False]  # kept in the shipped run, not in the control
        assert compared["seconds_kept"] == row["seconds"] and compared["seconds_system"] > 0
        assert compared["speed_up"] == compared["seconds_system"] / compared["seconds_kept"]
        assert compared["voxels_differing"] == 0 and compared["voxels"] == 32 * 32 * 4
        assert "## C allocator" in isolated.to_markdown()
    else:
        assert isolated.allocator == []


def test_quick_defaults_and_cli_wiring(report, monkeypatch, tmp_path, capsys):
    quick = BenchOptions.quick_defaults()
    assert (quick.quick, quick.slab, quick.networks, quick.real_ct, quick.multistep_slices, quick.peer_windows) == (True, 4, ("tiny",), None, 1, 1)
    assert quick.protocols == ((1, 1), (50, 1)) and quick.shape == (512, 512, 100)
    seen = {}

    def fake_run_bench(options, progress=None, checkpoint=None):
        seen["options"], seen["checkpoint"] = options, checkpoint
        return report

    monkeypatch.setattr(bench, "run_bench", fake_run_bench)
    json_path, md_path = tmp_path / "q.json", tmp_path / "q.md"
    assert main(["bench", "--quick", "--json", str(json_path), "--markdown", str(md_path), "--device", "cpu", "--no-peer", "-q"]) == 0
    options = seen["options"]
    assert options.quick and options.slab == 4 and options.device == "cpu" and not options.peer and options.real_ct is None
    assert json.loads(json_path.read_text())["targets"] == report.to_dict()["targets"]
    assert md_path.read_text() == report.to_markdown()
    assert "## One step" in capsys.readouterr().out
    assert seen["checkpoint"] is not None  # with --json or --markdown, a run cut short keeps its rows
    assert main(["bench", "--networks", "tiny,paper", "--real-ct", str(tmp_path), "-q"]) == 0
    assert seen["checkpoint"] is None
    assert seen["options"].networks == ("tiny", "paper") and seen["options"].real_ct == str(tmp_path) and not seen["options"].quick
    assert seen["options"].pipeline_volumes is None  # 8 on a GPU, 2 on a CPU
    assert main(["bench", "--pipeline-volumes", "5", "-q"]) == 0 and seen["options"].pipeline_volumes == 5
    assert seen["options"].compile_pipeline is None  # compiled too on a GPU
    assert main(["bench", "--compile", "-q"]) == 0 and seen["options"].compile_pipeline is True
    assert seen["options"].isolate and main(["bench", "--no-isolate", "-q"]) == 0 and not seen["options"].isolate


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--precision", "fp8"], "precision must be one of"),
        (["--json", "{tmp}/missing/r.json"], "its folder does not exist"),
        (["--markdown", "{tmp}"], "must name a file"),
        (["--networks", "nope"], "unknown network 'nope'"),
        (["--real-ct", "{tmp}"], "no real CT here"),
        (["--shape", "0", "8", "8"], "--shape needs three positive integers"),
    ],
)
def test_bad_options_exit_2_with_one_line_before_any_compute(args, fragment, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(bench, "matmul_tflops", lambda *a, **k: pytest.fail("computed before refusing"))
    assert main(["bench", *[a.format(tmp=tmp_path) for a in args]]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("sdseg3d: error:") and fragment in err


def test_window_count_matches_monais_sliding_window():
    from monai.data import MetaTensor
    from monai.inferers import sliding_window_inference
    from monai.transforms import Spacing

    calls = []
    sliding_window_inference(torch.zeros(1, 1, 70, 40, 33), (32, 32, 32), 1, lambda x: calls.append(1) or x, overlap=0.5)
    assert bench.count_windows((70, 40, 33), 32) == len(calls)
    resampled = Spacing(pixdim=(1.5, 1.5, 2.0))(MetaTensor(torch.zeros(1, 40, 30, 10), affine=torch.diag(torch.tensor([3.0, 3.0, 5.0, 1.0]))))
    assert bench.peer_windows((40, 30, 10), (3.0, 3.0, 5.0))["resampled_shape"] == list(resampled.shape[1:])
    # The CT over 400 x 400 x 250 mm at the bundle's 1.5 x 1.5 x 2.0 mm: 5 x 5 x 2 windows.
    assert bench.peer_windows((512, 512, 100), (400 / 512, 400 / 512, 2.5))["windows"] == 50


def test_phantom_slab_and_gpu_baseline_share_the_helpers(tmp_path):
    import nibabel as nib

    path = bench.write_phantom((32, 32, 2), tmp_path, (400.0, 400.0, 5.0), name="slab.nii.gz")
    image = nib.load(str(path))
    assert image.shape == (32, 32, 2) and np.allclose(image.header.get_zooms(), (12.5, 12.5, 2.5))
    assert bench.timed(lambda: None, torch.device("cpu"), repeats=3) >= 0
    spec = importlib.util.spec_from_file_location("gpu_baseline", Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_baseline.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.write_phantom is bench.write_phantom and module.matmul_tflops is bench.matmul_tflops and module.timed is bench.timed
    assert math.isfinite(bench.matmul_tflops(torch.device("cpu"), 64, repeats=1))


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="Linux: ru_maxrss carries across fork and exec")
def test_a_fresh_process_reads_its_own_peak_not_its_parents():
    import subprocess
    import sys

    held = np.ones(600_000_000 // 8)  # 0.6 GB resident in this (the parent) process
    code = ("import resource; from sdseg_monai.bench import peak_rss_gb; "
            "print(peak_rss_gb(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9)")
    own, inherited = map(float, subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split())
    assert held.sum() > 0 and 0 < own < 0.3  # an interpreter with the bench module: tens of MB
    assert inherited >= 0.6  # the negative control: getrusage's peak starts at the parent's


# -- the report's arithmetic on made-up results (no model runs) -----------------------------------------
SLAB = {"name": "phantom slab 4", "shape": [512, 512, 4], "spacing_mm": [400 / 512, 400 / 512, 2.5], "reference_slices": 100}
STAGES_SECONDS = {"read": 0.5, "preprocess": 0.1, "encoder": 1.0, "unet": 2.0, "decoder": 3.0, "postprocess": 0.4, "write": 0.2}


def made_up_segment(seconds=8.0, slices=4) -> dict:
    return {"seconds": seconds, "slices": slices, "slices_per_s": slices / seconds, "organs": 13, "precision": "bf16",
            "skip_decode_radius": 0.5, "stages": dict(STAGES_SECONDS), "items": {"encoder": 4, "unet": 52, "decoder": 26}, "peak_rss_gb": 1.2}


def test_one_step_row_extrapolates_a_slab_to_the_reference_volume():
    spec, flops = {"name": "tiny", "weights": "packaged default"}, {"encoder": 1e9, "unet": 2e9, "decoder": 4e9}
    row = bench._one_step_row(spec, SLAB, made_up_segment(), flops, 0.5, True)
    assert row["seconds_per_volume"] == 100 / 0.5 and row["extrapolated"] and row["volume_slices"] == 100
    total = 4 * 1e9 + 52 * 2e9 + 26 * 4e9
    assert row["tflop"] == pytest.approx(total / 1e12) and row["achieved_tflops"] == pytest.approx(total / 8.0 / 1e12)
    assert row["network_tflops"] == pytest.approx(total / 6.0 / 1e12) and row["matmul_fraction"] == pytest.approx(row["achieved_tflops"] / 0.5)
    assert row["decoded_share"] == 0.5 and row["network_matmul_fraction"] == pytest.approx(row["network_tflops"] / 0.5)
    # The whole volume (or a volume without a reference, the real CT): its own seconds, no extrapolation.
    whole = bench._one_step_row(spec, {**SLAB, "reference_slices": 4}, made_up_segment(), flops, None, True)
    assert (whole["seconds_per_volume"], whole["extrapolated"], whole["matmul_fraction"]) == (8.0, False, None)
    assert bench._one_step_row(spec, {**SLAB, "reference_slices": None}, made_up_segment(), flops, 0.5, True)["seconds_per_volume"] == 8.0
    failed = bench._one_step_row(spec, SLAB, {"error": "OutOfMemoryError: x"}, flops, 0.5, True)
    assert failed["organs"] is None and failed["error"] == "OutOfMemoryError: x" and "seconds_per_volume" not in failed


def test_peer_row_from_timed_windows_is_a_lower_bound_over_the_reference_volumes_windows():
    options = BenchOptions()
    windows = {"mode": "network on 1 window(s)", "seconds_per_window": 2.0, "windows": 4, "resampled_shape": [267, 267, 5],
               "flops_per_window": 1e12, "precision": "fp16", "slices": 4, "stages": {"read": 0.1, "preprocess": 0.2}}
    row = bench._peer_row(SLAB, windows, options, {"fp16": {"tflops": 5.0}, "fp32": {"tflops": 1.0}})
    assert row["reference_windows"] == 50 and row["seconds_per_volume"] == 50 * 2.0  # 5 x 5 x 2 windows on 512x512x100
    assert row["basis"].startswith("lower bound") and row["achieved_tflops"] == pytest.approx(1e12 * 50 / 100 / 1e12)
    assert row["matmul_fraction"] == pytest.approx(0.5 / 5.0)  # against the fp16 matmul it ran as, not fp32's
    assert bench._peer_row(SLAB, windows, options, {"fp32": {"tflops": 1.0}, "bf16": {"tflops": 9.0}})["matmul_fraction"] is None
    assert bench.peer_precision(torch.device("cpu")) == "fp32" and bench.peer_precision("cuda:0") == "fp16"
    # The whole pipeline: measured on a whole volume; on a slab it has no per-volume seconds.
    pipeline = {**windows, "mode": "whole pipeline", "seconds": 30.0, "seconds_per_window": 0.5, "windows": 50, "slices": 100,
                "stages": {"read": 1, "preprocess": 1, "network": 25.0, "postprocess": 2, "write": 1}}
    whole = bench._peer_row({**SLAB, "reference_slices": 100}, pipeline, options, {"fp16": {"tflops": 5.0}})
    assert (whole["seconds_per_volume"], whole["basis"]) == (30.0, "measured") and whole["achieved_tflops"] == pytest.approx(50 / 25.0)
    assert bench._peer_row(SLAB, {**pipeline, "slices": 4}, options, {})["seconds_per_volume"] is None


def made_up_report(one_step=(), pipeline=(), peer=(), multistep=()) -> bench.BenchReport:
    return bench.BenchReport(options={}, machine={}, versions={}, matmul={}, one_step=list(one_step), pipeline=list(pipeline),
                             peer=list(peer), multistep=list(multistep))


def row(network="tiny", precision="bf16", organs=13, seconds=40.0, volume="phantom", skip=True, **extra) -> dict:
    return {"network": network, "volume": volume, "organs": organs, "precision": precision, "skip_decode": skip, "seconds_per_volume": seconds,
            "slices_per_s": 100 / seconds, "extrapolated": False, "peak_rss_gb": 2.1,
            "skip_decode_radius": 0.5 if network == "tiny" else 0.0, **extra}


def test_targets_on_a_cpu_judge_the_shipped_precision_with_its_ratio_to_fp32():
    cpu = torch.device("cpu")
    ddim = {"network": "tiny", "slices": 2, "runs": [{"steps": 50, "samples": 1, "decode": "all", "ratio_to_one_step": 12.0}]}
    lower = {"volume": "phantom", "seconds_per_volume": 200.0, "basis": "lower bound: network only"}
    rows = [row(), row(precision="fp32", seconds=100.0), row(organs=1, seconds=5.0), row(seconds=45.0, skip=False),
            row(network="sd-v1", seconds=900.0)]
    targets = bench._targets(made_up_report(rows, peer=[lower], multistep=[ddim]), cpu, "bf16", (512, 512, 100), "tiny", "phantom")
    by = {t["target"]: t for t in targets}
    assert set(by) == {"one step >= 10x faster than DDIM-50 (tiny, every pair decoded in both)", "default >= 6x faster than SwinUNETR on the 512x512x100 CT",
                       "peak RSS <= 3 GB (default, all organs)", "512x512x100 CT, 13 organs, <= 60 s on CPU"}  # no GPU targets on a CPU
    ct = by["512x512x100 CT, 13 organs, <= 60 s on CPU"]
    assert (ct["value"], ct["passed"], ct["speed_up_over_fp32"]) == (40.0, True, 2.5) and "bf16 2.50x as fast as fp32" in ct["basis"]
    assert by["default >= 6x faster than SwinUNETR on the 512x512x100 CT"]["passed"] is None  # 5x from a lower bound: inconclusive
    assert by["one step >= 10x faster than DDIM-50 (tiny, every pair decoded in both)"]["passed"] is True
    assert by["peak RSS <= 3 GB (default, all organs)"]["value"] == 2.1
    # Measured SwinUNETR at 5x and a 70 s default: both fail; without an fp32 row, no ratio.
    measured = {**lower, "basis": "measured"}
    targets = bench._targets(made_up_report([row(seconds=70.0)], peer=[measured]), cpu, "bf16", (512, 512, 100), "tiny", "phantom")
    assert [t["passed"] for t in targets] == [False, True, False] and targets[-1]["speed_up_over_fp32"] is None
    assert bench._targets(made_up_report(), cpu, "fp32", (512, 512, 100), "tiny", "phantom") == []
    # On a central slab (--quick): seconds overstated and memory understated, so only a pass on speed or
    # a miss on memory holds; the rest is inconclusive, not a FAIL or a pass the whole volume may not earn.
    def on_slab(seconds, rss):
        slab = row(seconds=seconds, extrapolated=True, peak_rss_gb=rss)
        return [t["passed"] for t in bench._targets(made_up_report([slab], peer=[measured]), cpu, "bf16", (512, 512, 100), "tiny", "phantom")]
    assert on_slab(seconds=70.0, rss=2.1) == [None, None, None]  # vs SwinUNETR, peak RSS, <= 60 s
    assert on_slab(seconds=20.0, rss=3.5) == [True, False, True]
    # Multi-step on a central slab's slices: more pairs decoded than on the volume's average slice, so
    # the skip's ratio is understated there; the every-pair ratio does not depend on the slices.
    skip_run = {"decode": "calibrated skip", "samples": 1, "flop_ratio_to_one_step_same_decode": 10.0, "decoded_pairs": 10, "mask_pixels_changed": 0}
    chains = {"network": "tiny", "slices": 1, "organs": 13, "runs": [
        {"steps": 50, "samples": 1, "decode": "all", "ratio_to_one_step": 8.5},
        {**skip_run, "steps": 1, "ratio_to_one_step_same_decode": 1.0}, {**skip_run, "steps": 50, "ratio_to_one_step_same_decode": 9.3}]}

    def ddim_passed(volume):
        report = made_up_report(multistep=[chains])
        report.volumes = [volume]
        return [t["passed"] for t in bench._targets(report, cpu, "bf16", (512, 512, 100), "tiny", "phantom")]
    assert ddim_passed({"name": "phantom", "shape": [512, 512, 100], "reference_slices": 100}) == [False, False]
    assert ddim_passed({"name": "phantom", "shape": [512, 512, 4], "reference_slices": 100}) == [False, None]


def test_targets_on_a_gpu_judge_the_faster_precision_and_the_sd_sized_network():
    from types import SimpleNamespace

    cuda = SimpleNamespace(type="cuda")  # all _targets reads of the device
    pipeline = {"organs": 13, "precision": "bf16", "volumes": 8, "compiled": True, "slices_per_s": 480.0}
    rows = [row(precision="fp32", seconds=100 / 600), row(precision="bf16", seconds=100 / 450),
            row("sd-v1", "fp32", seconds=100 / 40), row("sd-v1", "bf16", seconds=100 / 55), row("sd-v1", "bf16", organs=1, seconds=1.0)]
    targets = bench._targets(made_up_report(rows, pipeline=[pipeline]), cuda, "bf16", (512, 512, 100), "tiny", "phantom")
    by = {t["target"]: t for t in targets}
    tiny, sd = by["default, 13 organs, >= 500 slices/s end to end on a GPU"], by["sd-v1, 13 organs, >= 50 slices/s end to end on a GPU"]
    assert (tiny["value"], tiny["passed"]) == (pytest.approx(600.0), True) and tiny["basis"].startswith("one volume, fp32")
    assert (sd["value"], sd["passed"]) == (pytest.approx(55.0), True) and sd["basis"].startswith("one volume, bf16")
    assert "every pair decoded" in sd["basis"] and not any("on CPU" in t for t in by)
    # fp32 slower: the compiled batch run is the faster; sd-v1 only in fp32 at 40 slices/s fails.
    rows = [row(precision="fp32", seconds=100 / 300), row(precision="bf16", seconds=100 / 450), row("sd-v1", "fp32", seconds=100 / 40)]
    by = {t["target"]: t for t in bench._targets(made_up_report(rows, pipeline=[pipeline]), cuda, "bf16", (512, 512, 100), "tiny", "phantom")}
    tiny, sd = by["default, 13 organs, >= 500 slices/s end to end on a GPU"], by["sd-v1, 13 organs, >= 50 slices/s end to end on a GPU"]
    assert (tiny["value"], tiny["passed"]) == (480.0, False) and tiny["basis"].startswith("8 volumes through the batch runner, bf16, compiled")
    assert (sd["value"], sd["passed"]) == (pytest.approx(40.0), False)
    # Extrapolated from a slab, a miss proves nothing; a pass holds.
    rows = [row(precision="fp32", seconds=100 / 300, extrapolated=True), row("sd-v1", "fp32", seconds=100 / 60, extrapolated=True)]
    by = {t["target"]: t["passed"] for t in bench._targets(made_up_report(rows), cuda, "bf16", (512, 512, 100), "tiny", "phantom")}
    assert (by["default, 13 organs, >= 500 slices/s end to end on a GPU"], by["sd-v1, 13 organs, >= 50 slices/s end to end on a GPU"]) == (None, True)


def test_warm_up_on_a_gpu_runs_a_full_chunk_of_every_organ_on_the_volumes_grid(tmp_path, monkeypatch):
    from types import SimpleNamespace

    import nibabel as nib

    import sdseg_monai.inference as inference

    seen = []

    class Recorder:  # stands in for VolumeSegmenter: what the warm-up would run, without a model or a GPU
        def __init__(self, model, organs=None, **options):
            self.organs, self.options = organs, options

        def segment_array(self, array, affine=None):
            seen.append((self.organs, array.shape, affine, self.options["skip_decode"]))

    monkeypatch.setattr(inference, "VolumeSegmenter", Recorder)
    # Axial along the file's first axis (an S-I first affine): the chunk is cut there.
    affine = np.array([[0, 0.8, 0, 0], [0, 0, 0.8, 0], [2.5, 0, 0, 0], [0, 0, 0, 1.0]])
    path = tmp_path / "v.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((20, 48, 40), np.int16), affine), str(path))
    segmenter = SimpleNamespace(device=SimpleNamespace(type="cuda"), organs={1: "spleen", 6: "liver"}, chunk_slices=8, model=None,
                                batch_size=16, precision="bf16", seed=0)
    bench.warm_up(segmenter, str(path))
    bench.warm_up(SimpleNamespace(**{**vars(segmenter), "device": SimpleNamespace(type="cpu")}), str(path))
    (gpu_organs, gpu_shape, gpu_affine, gpu_skip), (cpu_organs, cpu_shape, cpu_affine, _) = seen
    assert gpu_organs == ["spleen", "liver"] and gpu_shape == (8, 48, 40) and np.allclose(gpu_affine, affine) and gpu_skip is False
    assert cpu_organs == ["spleen"] and cpu_shape == (64, 64, 1) and cpu_affine is None  # cheap on a CPU
    assert bench._warm_up_array(str(path), 100)[0].shape == (20, 48, 40)  # never thicker than the volume


@pytest.mark.skipif(default_model_path() is None, reason="no packaged default model")
def test_gpu_profile_autocast_variants_keep_the_fp32_weights(monkeypatch):
    import sdseg_monai.inference as inference
    from sdseg_monai.model import SDSeg

    spec = importlib.util.spec_from_file_location("gpu_profile", Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_profile.py")
    profile = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(profile)
    monkeypatch.setattr(inference, "casts_to_bf16", lambda device: True)  # the GPU's choice, on this CPU
    fp32 = SDSeg.from_pretrained(default_model_path()).state_dict()

    def weights(variant):
        return profile.segmenter_for(variant, "cpu", None).model.state_dict()

    cast = weights("bf16")  # the negative control: the cast network's weights are rounded
    assert cast["unet.conv_in.weight"].dtype == torch.bfloat16 and not torch.equal(cast["unet.conv_in.weight"].float(), fp32["unet.conv_in.weight"])
    autocast = weights("bf16-autocast")
    assert all(torch.equal(autocast[name], value) for name, value in fp32.items())  # bit for bit, fp32
    decoder = weights("bf16-decoder")
    assert torch.equal(decoder["unet.conv_in.weight"], fp32["unet.conv_in.weight"])
    assert decoder["autoencoder.decoder.conv_in.weight"].dtype == torch.bfloat16


def test_precision_dice_summary_prints_what_a_run_without_comparable_organs_leaves():
    spec = importlib.util.spec_from_file_location("precision_dice", Path(__file__).resolve().parents[1] / "benchmarks" / "precision_dice.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.warm_up is bench.warm_up  # warmed up as the bench is, before either precision is timed
    group = {"max_abs_difference": 0.00123, "mean_dice": {"fp32": 0.8, "bf16": 0.8}, "within_tolerance": True}
    lines = module.summary_lines({"groups": {"phantoms": group}, "seconds": {"fp32": 2.0, "bf16": 1.0}, "speedup": 2.0}, "bf16")
    assert lines[0].startswith("phantoms: max |dDice| 0.0012 (tolerance 0.005)") and lines[-1].endswith("bf16 speed-up 2.00x")
    # No organ scored in both precisions, no time measured: dashes, not a TypeError after the JSON is written.
    empty = {"groups": {"real_ct": {**group, "max_abs_difference": None}}, "seconds": {"fp32": 0.0, "bf16": 0.0}, "speedup": None}
    lines = module.summary_lines(empty, "bf16")
    assert lines[0].startswith("real_ct: max |dDice| - (") and lines[-1].endswith("bf16 speed-up -")
