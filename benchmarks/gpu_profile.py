"""Where a GPU's time goes in one volume of the packaged default model (issue 19's >= 500 slices/s).

Times each stage of one 512x512x100 phantom apart (read, preprocess, inference on the prepared volume,
inverting to the input grid), the inference at several batch sizes, then prints torch.profiler's
tables for one inference: the kernels by GPU time and the operators by host time.

    python benchmarks/gpu_profile.py [--precision bf16] [--batch-sizes 0,128,512]   # 0: the default
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from sdseg_monai.bench import write_phantom
from sdseg_monai.data import read_volume
from sdseg_monai.inference import VolumeSegmenter
from sdseg_monai.model import default_model_path


def timed(fn, repeats: int = 3) -> float:
    """Best of ``repeats`` wall times of ``fn()``, the device synchronised around each."""
    best = float("inf")
    for _ in range(repeats):
        torch.cuda.synchronize()
        began = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - began)
    return best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=3, default=(512, 512, 100))
    parser.add_argument("--precision", default="bf16")
    parser.add_argument("--batch-sizes", default="0,128,512")
    parser.add_argument("--rows", type=int, default=25)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        path = write_phantom(tuple(args.shape), Path(folder))
        began = time.perf_counter()
        volume = read_volume(path)
        print(f"read: {time.perf_counter() - began:.3f} s")
    depth = args.shape[2]
    for batch in [int(b) for b in args.batch_sizes.split(",")]:
        segmenter = VolumeSegmenter(default_model_path(), device="cuda", precision=args.precision, batch_size=batch or None)
        began = time.perf_counter()
        canonical = segmenter.prepare(volume)
        prepare = time.perf_counter() - began
        segmenter.segment(volume, canonical=canonical)  # warm-up
        inference = timed(lambda: segmenter.segment_canonical(canonical))
        whole = timed(lambda: segmenter.segment(volume, canonical=canonical), repeats=2)
        print(f"batch {segmenter.batch_size} pairs, chunks of {segmenter.chunk_slices} slices: prepare {prepare:.3f} s; "
              f"inference {inference:.3f} s ({depth / inference:.0f} slices/s); with inversion to the input grid "
              f"{whole:.3f} s ({depth / whole:.0f} slices/s)")
    segmenter = VolumeSegmenter(default_model_path(), device="cuda", precision=args.precision)
    canonical = segmenter.prepare(volume)
    segmenter.segment_canonical(canonical)
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as profile:
        segmenter.segment_canonical(canonical)
        torch.cuda.synchronize()
    averages = profile.key_averages()
    print(averages.table(sort_by="cuda_time_total", row_limit=args.rows, max_name_column_width=60))
    print(averages.table(sort_by="self_cpu_time_total", row_limit=args.rows // 2, max_name_column_width=60))
    launches = sum(e.count for e in averages if e.device_type == torch.autograd.DeviceType.CUDA)
    print(f"GPU kernels and copies: {launches}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
