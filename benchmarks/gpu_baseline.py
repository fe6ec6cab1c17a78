"""Baseline speed of today's inference path on one GPU (issue 19), before any GPU-specific work.

Measures, in one process on one device:

1. end to end (NIfTI read to written labels) with the packaged default model, 13 organs, on a
   synthetic 512x512x100 CT, at several (slice, organ) batch sizes;
2. the network alone (``SDSeg.predict`` on every slice of that CT, skip radius as calibrated);
3. the network alone for the ``paper`` and ``sd-v1`` sized models with random weights;
4. a large bf16 matmul, the device's reachable FLOP/s, for scale.

    python benchmarks/gpu_baseline.py --json OUT.json [--device cuda] [--shape 512 512 100]

Every stage is timed after a warm-up run, with the device synchronised. The timing, matmul and phantom
helpers are :mod:`sdseg_monai.bench`'s; ``sdseg3d bench`` is the complete benchmark.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from sdseg_monai.bench import matmul_tflops, timed, write_phantom
from sdseg_monai.config import model_preset
from sdseg_monai.data import read_volume
from sdseg_monai.inference import VolumeSegmenter
from sdseg_monai.model import SDSeg, default_model_path, resolve_device
from sdseg_monai.transforms import IMAGE_KEY, SliceGeometry, axial_slices, canonical_transforms


def network_slices_per_second(model: SDSeg, slices: torch.Tensor, batch_size: int, radius: float, device) -> dict:
    run = lambda: model.predict(slices, batch_size=batch_size, skip_decode_radius=radius)  # noqa: E731
    run()
    seconds = timed(run, device)
    return {"slices": int(slices.shape[0]), "batch_size": batch_size, "seconds": seconds, "slices_per_s": slices.shape[0] / seconds}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto")
    p.add_argument("--shape", type=int, nargs=3, default=[512, 512, 100])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 256, 1024])
    p.add_argument("--large-slices", type=int, default=16, help="slices for the paper / sd-v1 sized networks")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    device = resolve_device(args.device)
    report: dict = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "torch": torch.__version__}
    report["matmul_tflops"] = matmul_tflops(device, 8192 if device.type == "cuda" else 1024)
    print(json.dumps(report), flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        path = write_phantom(args.shape, Path(tmp))
        report["phantom_seconds"] = time.perf_counter() - start
        model = SDSeg.from_pretrained(default_model_path(), device=device)
        end_to_end = []
        for batch in args.batch_sizes:
            segmenter = VolumeSegmenter(model, device=device, batch_size=batch)
            segmenter.segment(path)  # warm-up
            seconds = timed(lambda: segmenter.segment(path).save(Path(tmp) / "labels.nii.gz"), device)
            row = {"batch_size": batch, "chunk_slices": segmenter.chunk_slices, "seconds": seconds, "slices_per_s": args.shape[2] / seconds}
            end_to_end.append(row)
            print("end to end", json.dumps(row), flush=True)
        report["end_to_end_default_13_organs"] = end_to_end

        canonical = canonical_transforms(model.config.preprocessing)({IMAGE_KEY: read_volume(path).image})[IMAGE_KEY]
        geometry = SliceGeometry(tuple(canonical.shape[1:3]), model.config.preprocessing.slice_size)
        slices = geometry.to_model(axial_slices(canonical, range(canonical.shape[-1]), model.config.preprocessing.channels)).to(device)
        radius = model.config.postprocessing.skip_decode_radius
        report["network_default"] = [
            {**network_slices_per_second(model, slices, batch, r, device), "skip_decode_radius": r}
            for batch in (256, 1024)
            for r in (radius, 0.0)
        ]
        print("network", json.dumps(report["network_default"]), flush=True)
        del model

    for preset in ("paper", "sd-v1"):
        try:
            torch.manual_seed(0)
            with torch.device(device):
                big = SDSeg(model_preset(preset, latent_scale=0.18215)).eval()
            size = big.config.preprocessing.slice_size
            images = torch.rand(args.large_slices, 3, size, size, device=device) * 2 - 1
            rows = []
            for batch in (26, 104):
                with torch.inference_mode():
                    rows.append(network_slices_per_second(big, images, batch, 0.0, device))
            report[f"network_{preset}_random"] = {"slice_size": size, "organs": big.config.num_classes, "runs": rows}
            print(preset, json.dumps(report[f"network_{preset}_random"]), flush=True)
            del big
            if device.type == "cuda":
                torch.cuda.empty_cache()
        except Exception as error:  # a bench of record: report what failed, keep the rest
            report[f"network_{preset}_random"] = {"error": f"{type(error).__name__}: {error}"}
            print(preset, "failed:", error, flush=True)
    if device.type == "cuda":
        report["cuda_max_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
