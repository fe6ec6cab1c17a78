"""Does bf16 inference segment as fp32 does? Per-organ Dice of both precisions, side by side (issue 19).

`precision="auto"` picks bf16 on CPUs with AMX or AVX-512 BF16 and fp32 elsewhere, GPUs included
(there ``--precision bf16`` runs the network cast to bf16). This runs the packaged
default model (or ``--model``) at fp32 and at ``--precision`` (bf16) on the held-out test phantoms
(seeds 9000-9007, generated when ``--phantoms`` does not hold them) and on the real CT in
``../shared/data/ct`` when present, with the same seed and batch size, and reports per organ: the
mean Dice of each precision, their difference, and the voxels whose label differs. The check the
issue sets: every organ within 0.005 of fp32, on the phantoms and on the real CT.

    python benchmarks/precision_dice.py --json runs/precision_dice.json [--device cpu] [--cases 2]

Timings are per precision in this one process, so their ratio is measured side by side, each
precision warmed up first (on a GPU the first run would carry CUDA's start-up; on a CPU without native
bf16 the bf16 run is emulated and slow; the Dice comparison still holds).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from sdseg_monai.bench import warm_up
from sdseg_monai.data import atomic_write_text, load_manifest
from sdseg_monai.evaluation import read_case, score_case, scored_organs
from sdseg_monai.inference import VolumeSegmenter
from sdseg_monai.metrics import mean_or_none
from sdseg_monai.model import cpu_has_fast_bf16, default_model_path, resolve_device

ROOT = Path(__file__).resolve().parents[1]
REAL_CT = ROOT.parent / "shared" / "data" / "ct"
TOLERANCE = 0.005


def test_phantoms(folder: Path, count: int):
    """(case id, image, label) of the first ``count`` test phantoms (generated if absent), and their manifest."""
    manifest_path = folder / "manifest.json"
    if not manifest_path.is_file():
        command = [sys.executable, "-m", "sdseg_monai.cli", "phantom", "-o", str(folder), "--n", "8", "--seed", "9000", "--split", "test"]
        subprocess.run(command, check=True)
    manifest = load_manifest(manifest_path)
    cases = manifest.cases_for("test")[:count]
    return [(case, folder / manifest.cases[case].image, folder / manifest.cases[case].label) for case in cases], manifest


def organ_means(per_case: list[dict[str, float | None]]) -> dict[str, float | None]:
    """Each organ's mean Dice over the cases where it is present."""
    names = per_case[0].keys() if per_case else []
    return {name: mean_or_none([case[name] for case in per_case if case[name] is not None]) for name in names}


def summarise(cases, dice, differing, foreground, scored, precision) -> dict:
    """One group's per-organ comparison over the cases done so far."""
    means = {p: organ_means(d) for p, d in dice.items()}
    organs = {}
    for _, _, name in scored:
        x, y = means["fp32"][name], means[precision][name]
        organs[name] = {"fp32": x, precision: y, "difference": None if x is None or y is None else y - x,
                        "voxels_differing": differing[name]}
    deltas = [abs(o["difference"]) for o in organs.values() if o["difference"] is not None]
    return {
        "cases": [c[0] for c in cases],
        "organs": organs,
        "max_abs_difference": max(deltas) if deltas else None,
        "within_tolerance": all(d <= TOLERANCE for d in deltas),
        "fp32_foreground_voxels": foreground,
        "mean_dice": {p: float(np.mean([v for v in m.values() if v is not None])) for p, m in means.items()},
    }


def summary_lines(report: dict, precision: str) -> list[str]:
    """What the run prints at its end: per group the largest Dice difference, then the speed-up."""
    lines = []
    for group, result in report["groups"].items():
        largest = result["max_abs_difference"]
        lines.append(f"{group}: max |dDice| {'-' if largest is None else f'{largest:.4f}'} (tolerance {TOLERANCE}), "
                     f"mean Dice {result['mean_dice']}, within: {result['within_tolerance']}")
    speedup = report.get("speedup")
    lines.append(f"seconds {report['seconds']}, {precision} speed-up {'-' if speedup is None else f'{speedup:.2f}x'}")
    return lines


def write_report(path: Path, report: dict, seconds: dict, precision: str) -> None:
    report["seconds"] = dict(seconds)
    report["speedup"] = seconds["fp32"] / seconds[precision] if seconds[precision] else None
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(report, indent=2) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(default_model_path()))
    parser.add_argument("--phantoms", default=str(ROOT / "runs" / "phantoms"), help="test phantoms (generated if absent)")
    parser.add_argument("--cases", type=int, default=8, help="test phantoms used (the first N of 8)")
    parser.add_argument("--real-ct", default=str(REAL_CT), help="folder with abdomen_ct_3mm(_labels_btcv).nii.gz (none: skip it)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="bf16", help="compared against fp32")
    parser.add_argument("--batch-size", type=int, default=None, help="(slice, organ) pairs per forward (default: the device's, 64 on a CPU)")
    parser.add_argument("--json", required=True)
    args = parser.parse_args()

    device = resolve_device(args.device)
    phantoms, manifest = test_phantoms(Path(args.phantoms), args.cases)
    groups = {"phantoms": phantoms}
    real = Path(args.real_ct)
    if (real / "abdomen_ct_3mm.nii.gz").is_file():
        groups["real_ct"] = [("abdomen_ct_3mm", real / "abdomen_ct_3mm.nii.gz", real / "abdomen_ct_3mm_labels_btcv.nii.gz")]

    report = {
        "model": args.model,
        "device": str(device),
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                    "cpu_native_bf16": cpu_has_fast_bf16(),
                    "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None},
        "compared": ["fp32", args.precision],
        "tolerance": TOLERANCE,
        "groups": {},
    }
    segmenters = {p: VolumeSegmenter(args.model, device=device, precision=p, batch_size=args.batch_size, seed=0) for p in ("fp32", args.precision)}
    scored, _ = scored_organs(segmenters["fp32"], manifest)
    first = next((image for cases in groups.values() for _, image, _ in cases), None)
    for segmenter in segmenters.values() if first is not None else ():  # one-time costs (CUDA start-up, kernels) out of both timings
        warm_up(segmenter, str(first))
    seconds = {p: 0.0 for p in segmenters}
    out = Path(args.json)
    for group, cases in groups.items():
        dice = {p: [] for p in segmenters}
        differing = {name: 0 for _, _, name in scored}
        foreground = 0
        for done, (case_id, image, label) in enumerate(cases, start=1):
            volume, reference = read_case(image, label)
            reference_array = reference.image[0].numpy()
            labels = {}
            for precision, segmenter in segmenters.items():
                start = time.perf_counter()
                labels[precision] = segmenter.segment(volume).labels
                seconds[precision] += time.perf_counter() - start
                dice[precision].append({s.name: s.dice for s in score_case(labels[precision], reference_array, scored)})
            a, b = labels["fp32"], labels[args.precision]
            foreground += int((a > 0).sum())
            for _, model_label, name in scored:
                differing[name] += int(((a == model_label) != (b == model_label)).sum())
            print(f"{group} {case_id}: {int((a != b).sum())} voxels differ", flush=True)
            # Written after every case: a long emulated run that is stopped still leaves its numbers.
            report["groups"][group] = summarise(cases[:done], dice, differing, foreground, scored, args.precision)
            report["complete"] = False
            write_report(out, report, seconds, args.precision)
    report["complete"] = True
    write_report(out, report, seconds, args.precision)
    print("\n".join(summary_lines(report, args.precision)))
    return 0 if all(r["within_tolerance"] for r in report["groups"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
