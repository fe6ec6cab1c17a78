"""Skipping the decodes of near-empty (slice, organ) pairs: speed and labels, side by side.

One loaded model segments each volume twice, decoding every pair (``--decode-all``) and skipping the
pairs its calibrated ``skip_decode_radius`` marks empty (the default), and reports per volume: the
seconds of each, their ratio, the share of pairs decoded, the voxels whose label differs, and the
mean Dice of both against the reference labels. Volumes: held-out phantoms (generated into a
temporary folder) and the real CT of ``shared/data/ct`` when present.

Example (2-core CPU, the packaged model)::

    python benchmarks/skip_decode.py --phantoms 2 --device cpu --batch-size 8
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from sdseg_monai.evaluation import read_case
from sdseg_monai.inference import VolumeSegmenter
from sdseg_monai.metrics import organ_scores
from sdseg_monai.model import SDSeg, default_model_path
from sdseg_monai.phantoms import write_phantoms

ROOT = Path(__file__).resolve().parents[1]
REAL_CT = ROOT.parent / "shared" / "data" / "ct"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=None, help="saved model folder (default: the packaged one)")
    p.add_argument("--phantoms", type=int, default=2, help="held-out phantoms, seeds 9000 onwards")
    p.add_argument("--real-ct", type=Path, default=REAL_CT, help="folder of the real CT and its BTCV labels ('' to skip)")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    return p.parse_args(argv)


def cases(args, scratch: Path) -> list[tuple[str, Path, Path]]:
    found = [
        (f"phantom {image.name.split('_')[1]}", image, label)
        for image, label in write_phantoms(scratch, n=args.phantoms, seed=9000)
    ]
    if str(args.real_ct) and (args.real_ct / "abdomen_ct_3mm.nii.gz").is_file():
        found.append(("real CT", args.real_ct / "abdomen_ct_3mm.nii.gz", args.real_ct / "abdomen_ct_3mm_labels_btcv.nii.gz"))
    return found


def main(argv=None) -> int:
    args = parse_args(argv)
    model = SDSeg.from_pretrained(args.model or default_model_path())
    radius = model.config.postprocessing.skip_decode_radius
    if radius <= 0:
        print(f"{args.model}: this model has no calibrated skip_decode_radius (run sdseg3d calibrate)", file=sys.stderr)
        return 2
    runs = {
        "decode_all": VolumeSegmenter(model, device=args.device, batch_size=args.batch_size, skip_decode=False),
        "skip": VolumeSegmenter(model, device=args.device, batch_size=args.batch_size),
    }
    for segmenter in runs.values():  # one-time costs (allocations, kernel selection) out of the timings
        segmenter.segment_array(np.full((64, 64, 2), -1000.0, dtype=np.float32))
    decoded = []
    model.autoencoder.decoder.register_forward_hook(lambda module, inputs, output: decoded.append(inputs[0].shape[0]))
    results = []
    with tempfile.TemporaryDirectory() as scratch:
        for name, image_path, label_path in cases(args, Path(scratch)):
            image, reference = read_case(image_path, label_path)
            row = {"case": name, "slices": image.shape[2]}
            labels = {}
            for run, segmenter in runs.items():
                decoded.clear()
                start = time.perf_counter()
                result = segmenter.segment(image)
                row[f"{run}_seconds"] = time.perf_counter() - start
                row[f"{run}_decodes"] = sum(decoded)
                scores = organ_scores(result.labels, reference.image[0].numpy(), result.organs)
                row[f"{run}_mean_dice"] = float(np.mean([s.dice for s in scores if s.dice is not None]))
                labels[run] = result.labels
            row["speed_up"] = row["decode_all_seconds"] / row["skip_seconds"]
            row["decoded_share"] = row["skip_decodes"] / row["decode_all_decodes"]
            row["voxels_differing"] = int((labels["skip"] != labels["decode_all"]).sum())
            results.append(row)
            print(
                f"{name:<14} {row['slices']:>4} slices  all {row['decode_all_seconds']:7.1f} s  "
                f"skip {row['skip_seconds']:7.1f} s  x{row['speed_up']:.2f}  decoded {row['decoded_share']:.1%}  "
                f"voxels differing {row['voxels_differing']}  Dice {row['decode_all_mean_dice']:.4f} / {row['skip_mean_dice']:.4f}",
                flush=True,
            )
    summary = {
        "model": str(args.model or default_model_path()),
        "skip_decode_radius": radius,
        "device": str(runs["skip"].device),
        "torch_threads": torch.get_num_threads(),
        "cases": results,
    }
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
