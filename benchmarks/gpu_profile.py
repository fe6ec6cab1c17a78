"""Where a GPU's time goes in one volume of the packaged default model, per precision (issue 19).

Times one 512x512x100 phantom's read apart, then for each variant: its preprocessing, the inference on
the prepared volume (best of 3), the voxels it labels unlike the first variant, and torch.profiler's
tables (kernels by GPU time, operators by host time), printed as each variant ends.

Variants: ``fp32`` (TF32 convolutions, as cuDNN runs them by default); ``bf16`` (the network wholly
in bf16, outside autocast: what ``--precision bf16`` runs on a GPU,
:meth:`SDSeg.cast_for_inference`); ``bf16-decoder`` (the decoder wholly in bf16, the vision encoder
and UNet under autocast); ``bf16-autocast`` (all of it under autocast, every GroupNorm in fp32);
``-cl`` after a variant puts the weights channels-last (``bf16-autocast-cl`` is what bf16 ran as on
a GPU before); ``bf16-cast`` (the network cast on any device: on a CPU, beside the autocast ``bf16``
runs there); ``-compile`` after a variant runs it as ``--compile`` does (the UNet and the decoder
through torch.compile, compiled when the segmenter starts: its setup time); ``-stock`` after a
variant puts diffusers' own upsampling layers back (nearest 2x, then the 3x3 convolution) in place of
the fused ones the model runs (``sdseg_monai.layers.fuse_upsample_convs``). A variant that fails
prints its error and the others run.

    python benchmarks/gpu_profile.py [--variants fp32,bf16,...] [--batch-size N] [--rows 15] [--repeats 3] [--device cuda]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from sdseg_monai.bench import sync, timed, write_phantom
from sdseg_monai.data import read_volume
from sdseg_monai.inference import VolumeSegmenter
from sdseg_monai.model import SDSeg, default_model_path

VARIANTS = (
    "fp32", "bf16", "fp32-stock", "bf16-stock", "bf16-cl", "bf16-decoder", "bf16-autocast", "bf16-autocast-cl", "bf16-cast",
    "fp32-compile", "bf16-compile",
)


def segmenter_for(variant: str, device: str, batch_size: int | None) -> VolumeSegmenter:
    if variant not in VARIANTS:
        raise SystemExit(f"unknown variant {variant!r}: choose from {', '.join(VARIANTS)}")
    autocast = variant in ("bf16-decoder", "bf16-autocast", "bf16-autocast-cl")
    # A bf16 segmenter casts its model on a GPU (a copy of one given): these keep the fp32 weights
    # themselves, since casting back to fp32 would keep bf16's rounding.
    source = SDSeg.from_pretrained(default_model_path()) if autocast else default_model_path()
    segmenter = VolumeSegmenter(source, device=device, precision=variant.split("-")[0], batch_size=batch_size,
                                compile=variant.endswith("-compile"))
    model = segmenter.model
    if autocast and model.cast_dtype is not None:
        model = segmenter.model = source.to(segmenter.device).eval()  # fp32 (on a GPU): autocast decides per operation
        if variant == "bf16-decoder":
            model.cast_decoder(torch.bfloat16)
    if variant == "bf16-cast" and model.cast_dtype is None:
        model.cast_for_inference(torch.bfloat16)
    if variant.endswith("-cl"):
        segmenter.model = model.to(memory_format=torch.channels_last)
    if variant.endswith("-stock"):
        from sdseg_monai.layers import unfuse_upsample_convs

        unfuse_upsample_convs(model)
    return segmenter


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=3, default=(512, 512, 100))
    parser.add_argument("--variants", default="fp32,bf16,bf16-compile,fp32-stock,bf16-stock,bf16-decoder,bf16-autocast,bf16-autocast-cl,bf16-cl")
    parser.add_argument("--batch-size", type=int, default=None, help="(slice, organ) pairs per forward (default: by free memory)")
    parser.add_argument("--rows", type=int, default=15)
    parser.add_argument("--device", default="cuda", help="cuda, or cpu")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per variant after the first; the best counts")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        path = write_phantom(tuple(args.shape), Path(folder))
        began = time.perf_counter()
        volume = read_volume(path)
        print(f"read: {time.perf_counter() - began:.3f} s")
    depth = args.shape[2]
    reference = None
    for variant in args.variants.split(","):
        try:
            began = time.perf_counter()
            segmenter = segmenter_for(variant, args.device, args.batch_size)
            setup = time.perf_counter() - began  # loading, and for -compile the compiling
            began = time.perf_counter()
            canonical = segmenter.prepare(volume)
            prepare = time.perf_counter() - began
            began = time.perf_counter()
            labels = segmenter.segment_canonical(canonical)  # also the warm-up
            first = time.perf_counter() - began  # segment_canonical returns labels on the host: the device is done
            reference = labels if reference is None else reference
            seconds = min(timed(lambda: segmenter.segment_canonical(canonical), args.device) for _ in range(args.repeats))
        except Exception as error:  # noqa: BLE001  (a measurement script: one variant's failure is its result)
            print(f"{variant}: failed: {type(error).__name__}: {' '.join(str(error).split())[:300]}", flush=True)
            continue
        differing = int((labels != reference).sum())
        print(f"{variant}: batch {segmenter.batch_size} pairs, chunks of {segmenter.chunk_slices} slices; setup {setup:.1f} s; prepare {prepare:.3f} s; "
              f"first call {first:.3f} s; inference {seconds:.3f} s ({depth / seconds:.0f} slices/s); "
              f"{differing} voxels labelled unlike the first variant's", flush=True)
        activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if args.device.startswith("cuda") else [])
        with torch.profiler.profile(activities=activities) as profile:
            segmenter.segment_canonical(canonical)
            sync(args.device)
        averages = profile.key_averages()
        by = "cuda_time_total" if args.device.startswith("cuda") else "cpu_time_total"
        print(f"== {variant}\n" + averages.table(sort_by=by, row_limit=args.rows, max_name_column_width=50)
              + averages.table(sort_by="self_cpu_time_total", row_limit=max(1, args.rows // 2), max_name_column_width=50), flush=True)
        segmenter = None  # its memory back before the next variant's batch is sized
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
