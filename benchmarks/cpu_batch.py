"""Pairs per UNet call on a CPU: the default batch against others, side by side in one process.

One segmenter per batch size (each loads the model once), run in turn on the same volume, ``--repeats``
rounds, so that drift of the machine's speed falls on every batch size alike. Reports per volume and
batch size: the seconds of each round, the best, its ratio to the default's best, and the voxels
labelled differently from the default (kernels may round differently at another batch size).
Volumes: a 512x512xN phantom (``sdseg3d bench``'s) and the real CT of ``shared/data/ct`` when present.

Example (2-core CPU, the packaged model)::

    python benchmarks/cpu_batch.py --slices 100 --batch-sizes 8,32 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from sdseg_monai.bench import write_phantom
from sdseg_monai.inference import VolumeSegmenter
from sdseg_monai.model import CPU_BATCH_SIZE, SDSeg, default_model_path

ROOT = Path(__file__).resolve().parents[1]
REAL_CT = ROOT.parent / "shared" / "data" / "ct" / "abdomen_ct_3mm.nii.gz"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=None, help="saved model folder (default: the packaged one)")
    p.add_argument("--slices", type=int, default=100, help="axial slices of the 512x512 phantom (0: none)")
    p.add_argument("--real-ct", type=Path, default=REAL_CT, help="a CT to segment too ('' to skip; skipped when absent)")
    p.add_argument("--batch-sizes", default="8,32", help=f"comma-separated batch sizes to compare with the default ({CPU_BATCH_SIZE})")
    p.add_argument("--precision", default="auto")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    model = SDSeg.from_pretrained(args.model or default_model_path())
    sizes = [CPU_BATCH_SIZE] + [int(b) for b in args.batch_sizes.split(",") if b and int(b) != CPU_BATCH_SIZE]
    segmenters = {b: VolumeSegmenter(model, device="cpu", batch_size=b, precision=args.precision) for b in sizes}
    results = []
    with tempfile.TemporaryDirectory() as scratch:
        volumes = []
        if args.slices > 0:
            volumes.append((f"phantom 512x512x{args.slices}", write_phantom((512, 512, args.slices), Path(scratch))))
        if str(args.real_ct) and args.real_ct.is_file():
            volumes.append(("real CT", args.real_ct))
        for name, path in volumes:
            seconds = {b: [] for b in sizes}
            labels = {}
            for _ in range(args.repeats):
                for b, segmenter in segmenters.items():
                    began = time.perf_counter()
                    labels[b] = segmenter.segment(path).labels
                    seconds[b].append(time.perf_counter() - began)
            for b in sizes:
                row = {
                    "volume": name, "batch_size": b, "default": b == CPU_BATCH_SIZE, "precision": segmenters[b].precision,
                    "seconds": [round(s, 2) for s in seconds[b]], "best": round(min(seconds[b]), 2),
                    "default_faster": round(min(seconds[b]) / min(seconds[CPU_BATCH_SIZE]), 3),
                    "voxels_differing": int((labels[b] != labels[CPU_BATCH_SIZE]).sum()), "voxels": int(labels[b].size),
                }
                results.append(row)
                print(f"{name}: batch {b}{' (default)' if row['default'] else ''}, {row['precision']}: best {row['best']:.1f} s "
                      f"of {row['seconds']}, default {row['default_faster']:.3f}x faster, "
                      f"{row['voxels_differing']:,} of {row['voxels']:,} voxels labelled differently", flush=True)
    if args.out is not None:
        args.out.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
