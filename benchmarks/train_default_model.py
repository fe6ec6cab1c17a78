"""Train the packaged default model (``sdseg_monai/default_model``) end to end, and measure it.

The recipe, one command (a GPU makes it minutes; every stage also runs on a CPU, much slower)::

    python benchmarks/train_default_model.py --out runs/default_model --device cuda

1. **Phantoms**: synthetic abdominal CTs (:mod:`sdseg_monai.phantoms`) written as NIfTI with a
   ``manifest.json``: train seeds 100000+, validation seeds 5000+, test seeds 9000+ (never trained on).
2. **Stage 0, mask autoencoder** (the ``tiny`` preset has no pretrained one): BCE + soft Dice on
   random organ-shaped masks, training-phantom organ masks and the real CT's organ masks below a
   z cut. Several layouts (``--ae-variants``) train side by side, each in its own process; the one
   kept has the best held-out reconstruction Dice (test-phantom masks, the real CT above the cut,
   fresh random masks), the smaller one when they are within ``--ae-tolerance``.
3. **Stage 1, SDSeg** (``sdseg3d train``'s :func:`~sdseg_monai.training.train_sdseg`): vision
   encoder + UNet on the training phantoms plus the real CT of ``shared/data/ct``, ``"strong"``
   augmentation, EMA weights selected on the validation phantoms.
4. **Calibration** (``sdseg3d calibrate``'s :func:`~sdseg_monai.calibration.calibrate`) of the
   float16 model on the validation phantoms: per-organ thresholds and largest-component organs.
5. **Evaluation** (``sdseg3d evaluate``'s :func:`~sdseg_monai.evaluation.evaluate`) on the test
   phantoms of the calibrated float16 model, which is what ships; also without its postprocessing,
   and the float32 model without it (what float16 storage costs).

``--init-from MODEL`` skips stage 0 and continues training a saved model (e.g. the packaged one).
Step counts are fixed by ``--ae-steps`` / ``--steps``; with ``--ae-seconds`` / ``--sdseg-seconds``
instead, a short timed probe converts the time budget to steps, and ``summary.json`` records the
steps taken so the run can be repeated with fixed counts. On a GPU, cuDNN kernels make reruns close
but not bit-identical; on a CPU a rerun is exact.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import torch

from sdseg_monai.config import TINY_AUTOENCODER, model_preset

ROOT = Path(__file__).resolve().parents[1]
REAL_CT = ROOT.parent / "shared" / "data" / "ct"
TRAIN_SEED, VALIDATION_SEED, TEST_SEED = 100_000, 5_000, 9_000
RANDOM_MASK_SEED = 0

# Autoencoder layouts tried in stage 0 (f=8, 4 latent channels, as Stable Diffusion's).
AE_VARIANTS = {
    "tiny": copy.deepcopy(TINY_AUTOENCODER),  # (24, 48, 96, 96)
    "tiny-narrow": {**copy.deepcopy(TINY_AUTOENCODER), "block_out_channels": [16, 32, 64, 64]},
}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("stage", nargs="?", default="all", choices=["all", "autoencoder"], help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "default_model")
    p.add_argument("--device", default="auto")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes generating phantoms")
    p.add_argument("--n-train", type=int, default=48, help="training phantoms")
    p.add_argument("--n-validation", type=int, default=4)
    p.add_argument("--n-test", type=int, default=8)
    p.add_argument("--real-ct", type=Path, default=REAL_CT, help="folder of the real CT and its BTCV labels ('' to skip)")
    p.add_argument("--ae-variants", default="tiny,tiny-narrow", help=f"comma-separated, from {', '.join(AE_VARIANTS)}")
    p.add_argument("--ae-tolerance", type=float, default=0.002, help="held-out Dice within which the smaller layout wins")
    p.add_argument("--ae-steps", type=int, default=None)
    p.add_argument("--ae-seconds", type=float, default=None, help="time budget of stage 0 (instead of --ae-steps)")
    p.add_argument("--ae-batch-size", type=int, default=128)
    p.add_argument("--ae-lr", type=float, default=2e-3)
    p.add_argument("--random-masks", type=int, default=6000, help="random organ-shaped training masks")
    p.add_argument("--heldout-random", type=int, default=512, help="fresh random masks held out")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--sdseg-seconds", type=float, default=None, help="time budget of stage 1 (instead of --steps)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=6e-4, help="learning rate of stage 1")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps of stage 1 (default: a tenth of the steps, at most 500)")
    p.add_argument("--validations", type=int, default=4, help="validation rounds in stage 1")
    p.add_argument("--organ-sampling", default="slice", choices=["slice", "organ"], help="stage 1: slice first, or organ first (small organs as often as large)")
    p.add_argument("--organs-per-slice", type=int, default=1, help="stage 1: organs drawn per slice, sharing one image encoding")
    p.add_argument("--mask-loss-weight", type=float, default=None, help="stage 1: weight of the decoded-mask BCE + Dice loss (default: the model's)")
    p.add_argument("--condition-channels", type=int, default=None, help="stage 1: widen the image latent to this many channels (default: the model's)")
    p.add_argument("--slice-size", type=int, default=None, help="stage 1: train at this slice size (default: the model's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--init-from", type=Path, default=None, help="continue from a saved model (e.g. the packaged one): no stage 0")
    p.add_argument("--variant", default="tiny", help=argparse.SUPPRESS)  # the autoencoder stage's layout
    p.add_argument("--export", type=Path, default=None, help="folder receiving the results as each stage ends (few files)")
    p.add_argument("--max-minutes", type=float, default=None, help="stage 1 stops (and saves) after this much wall time of the whole run")
    p.add_argument("--smoke", action="store_true", help="a few steps of every stage on 2 small phantoms (checks the code path)")
    args = p.parse_args(argv)
    if args.smoke:
        args.n_train, args.n_validation, args.n_test = 2, 1, 1
        args.random_masks, args.heldout_random, args.validations = 64, 16, 1
        if args.ae_seconds is None:
            args.ae_steps = 6
        if args.sdseg_seconds is None:
            args.steps = 6
        args.ae_batch_size, args.batch_size = min(args.ae_batch_size, 16), min(args.batch_size, 16)
    if (args.ae_steps is None) == (args.ae_seconds is None) and args.stage == "all" and args.init_from is None:
        p.error("give exactly one of --ae-steps and --ae-seconds")
    if (args.steps is None) == (args.sdseg_seconds is None) and args.stage == "all":
        p.error("give exactly one of --steps and --sdseg-seconds")
    return args


def inference_batch(slice_size: int) -> int:
    """Slices x organs per forward: 416 at 128x128, fewer for larger slices (same activation memory)."""
    return max(13, 13 * 32 * 128**2 // slice_size**2)


def cuda_speed_settings() -> None:
    if torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


# -- 1. phantoms ----------------------------------------------------------------------------------
def _write_one(folder: str, seed: int) -> None:
    from sdseg_monai.phantoms import write_phantoms

    torch.set_num_threads(1)
    write_phantoms(folder, n=1, seed=seed)


def _random_masks(n: int, seed: int) -> torch.Tensor:
    from sdseg_monai.phantoms import random_organ_masks

    torch.set_num_threads(1)
    return random_organ_masks(n, size=128, seed=seed).bool()


def make_phantoms(args) -> Path:
    from sdseg_monai.phantoms import update_phantom_manifest

    folder = args.out / "phantoms"
    splits = {
        "train": list(range(TRAIN_SEED, TRAIN_SEED + args.n_train)),
        "validation": list(range(VALIDATION_SEED, VALIDATION_SEED + args.n_validation)),
        "test": list(range(TEST_SEED, TEST_SEED + args.n_test)),
    }
    todo = [s for seeds in splits.values() for s in seeds if not (folder / f"phantom_{s}_label.nii.gz").is_file()]
    start = time.perf_counter()
    with ProcessPoolExecutor(max_workers=max(1, args.workers), mp_context=get_context("fork")) as pool:
        list(pool.map(_write_one, [str(folder)] * len(todo), todo))
    for split, seeds in splits.items():
        update_phantom_manifest(folder, seeds, split)
    log(f"phantoms: {len(todo)} written in {time.perf_counter() - start:.0f}s ({args.workers} processes) -> {folder}")
    return folder


def split_cases(folder: Path, split: str):
    from sdseg_monai.data import check_data_root, load_manifest

    return [(i, lab) for _, i, lab in check_data_root(load_manifest(folder / "manifest.json"), folder, split)]


def real_ct_pair(args):
    if not str(args.real_ct):
        return None
    image, label = args.real_ct / "abdomen_ct_3mm.nii.gz", args.real_ct / "abdomen_ct_3mm_labels_btcv.nii.gz"
    return (image, label) if image.is_file() and label.is_file() else None


# -- 2. mask autoencoder --------------------------------------------------------------------------
def real_ct_masks(pair, preprocessing, organ_labels, holdout_fraction: float = 0.3):
    """Model-space organ masks of the real CT, split by z: (below the cut, above it)."""
    from sdseg_monai.data import SliceDataset

    dataset = SliceDataset([pair], preprocessing, organ_labels)
    labels = dataset.labels[0]  # (Z, S, S)
    z_present = torch.nonzero(labels.flatten(1).any(1)).flatten()
    cut = int(z_present.min()) + int(math.ceil((1 - holdout_fraction) * (int(z_present.max()) - int(z_present.min()) + 1)))

    def masks(block):
        out = [(block == v) for v in organ_labels]
        out = [m[m.flatten(1).any(1)] for m in out]
        return torch.cat(out)

    return masks(labels[:cut]), masks(labels[cut:])


def autoencoder_stage(args) -> int:
    """One autoencoder layout (run as its own process, so that layouts train side by side)."""
    from diffusers import AutoencoderKL

    from sdseg_monai.model import resolve_device
    from sdseg_monai.training import init_posterior_logvar, mask_reconstruction_dice, model_space_organ_masks, train_mask_autoencoder

    cuda_speed_settings()
    device = resolve_device(args.device)
    out = args.out / f"autoencoder_{args.variant}"
    config = model_preset("tiny")
    folder = args.out / "phantoms"
    train_masks = model_space_organ_masks(split_cases(folder, "train"), config.preprocessing, config.organ_labels)
    test_masks = model_space_organ_masks(split_cases(folder, "test"), config.preprocessing, config.organ_labels)
    pair = real_ct_pair(args)
    real_train, real_held = (
        real_ct_masks(pair, config.preprocessing, config.organ_labels) if pair else (torch.zeros((0, 128, 128), dtype=torch.bool),) * 2
    )
    pool = torch.load(args.out / "random_masks.pt", weights_only=True)
    held_random = pool[len(pool) - args.heldout_random :]
    pool = pool[: len(pool) - args.heldout_random]
    organ_masks = torch.cat([train_masks, real_train])
    masks = torch.cat([pool, organ_masks]).to(device)
    # Half of every batch from phantom / real organ masks, half from the random pool.
    weights = torch.cat([torch.full((len(pool),), 0.5 / len(pool)), torch.full((len(organ_masks),), 0.5 / max(1, len(organ_masks)))])
    bf16 = torch.bfloat16 if device.type == "cuda" else None  # CPU bf16 is only fast with AVX512-BF16

    def build():
        torch.manual_seed(args.seed)
        ae = AutoencoderKL.from_config(AE_VARIANTS[args.variant]).to(device)
        return init_posterior_logvar(ae)

    steps = args.ae_steps
    if steps is None:  # probe the speed, then spend the budget
        probe, probe_steps = build(), 20
        train_mask_autoencoder(probe, masks, steps=5, batch_size=args.ae_batch_size, sample_weights=weights, autocast_dtype=bf16)
        start = time.perf_counter()
        train_mask_autoencoder(probe, masks, steps=probe_steps, batch_size=args.ae_batch_size, sample_weights=weights, autocast_dtype=bf16)
        rate = probe_steps / (time.perf_counter() - start)
        steps = max(10, int(rate * args.ae_seconds))
        log(f"autoencoder {args.variant}: {rate:.1f} steps/s -> {steps} steps")
        del probe
    autoencoder = build()
    start = time.perf_counter()
    history = train_mask_autoencoder(
        autoencoder, masks, steps=steps, batch_size=args.ae_batch_size, lr=args.ae_lr, seed=args.seed,
        sample_weights=weights, autocast_dtype=bf16, log_every=max(1, steps // 10),
        callback=lambda r: log(f"autoencoder {args.variant}: step {r['step']} loss {r['loss']:.4f}"),
    )  # fmt: skip
    seconds = time.perf_counter() - start
    held = {"test_phantoms": test_masks, "real_ct_above_cut": real_held, "random": held_random}
    metrics = {"variant": args.variant, "layout": AE_VARIANTS[args.variant], "steps": steps, "batch_size": args.ae_batch_size}
    metrics["parameters"] = sum(p.numel() for p in autoencoder.parameters())
    metrics["train_seconds"] = round(seconds, 1)
    metrics["final_loss"] = history[-1]["loss"]
    all_dice = []
    for name, m in held.items():
        dice = mask_reconstruction_dice(autoencoder, m.to(device), batch_size=256) if len(m) else torch.zeros(0)
        all_dice.append(dice)
        metrics[name] = {"n": len(m), "mean_dice": float(torch.nanmean(dice)) if len(m) else None}
    dice = torch.cat(all_dice)
    area = torch.cat([m.flatten(1).sum(1) for m in held.values()]).cpu()
    metrics["held_out_mean_dice"] = float(torch.nanmean(dice))
    metrics["by_size"] = {
        f"{lo}-{hi - 1}px" if hi < 10**9 else f">={lo}px": round(float(torch.nanmean(dice[(area >= lo) & (area < hi)])), 4)
        for lo, hi in ((1, 30), (30, 200), (200, 1000), (1000, 10**9))
        if ((area >= lo) & (area < hi)).any()
    }
    autoencoder.to("cpu").save_pretrained(str(out))
    (out / "heldout_metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    log(f"autoencoder {args.variant}: held-out Dice {metrics['held_out_mean_dice']:.4f} {json.dumps(metrics['by_size'])}")
    return 0


def train_autoencoders(args) -> tuple[Path, list[dict]]:
    from sdseg_monai.phantoms import random_organ_masks  # noqa: F401  (import check before forking)

    n = args.random_masks + args.heldout_random
    chunks = [(min(500, n - i), RANDOM_MASK_SEED + i // 500) for i in range(0, n, 500)]
    with ProcessPoolExecutor(max_workers=max(1, args.workers), mp_context=get_context("fork")) as pool:
        masks = torch.cat(list(pool.map(_random_masks, *zip(*chunks))))
    torch.save(masks, args.out / "random_masks.pt")
    variants = [v.strip() for v in args.ae_variants.split(",") if v.strip()]
    base = [sys.executable, str(Path(__file__).resolve()), "autoencoder", "--out", str(args.out), "--device", args.device]
    base += ["--ae-batch-size", str(args.ae_batch_size), "--ae-lr", str(args.ae_lr), "--seed", str(args.seed)]
    base += ["--real-ct", str(args.real_ct), "--heldout-random", str(args.heldout_random)]
    base += ["--ae-steps", str(args.ae_steps)] if args.ae_steps is not None else ["--ae-seconds", str(args.ae_seconds)]
    procs = [subprocess.Popen(base + ["--variant", v]) for v in variants]
    codes = [p.wait() for p in procs]
    results = []
    for v, code in zip(variants, codes):
        path = args.out / f"autoencoder_{v}" / "heldout_metrics.json"
        if code == 0 and path.is_file():
            results.append(json.loads(path.read_text()))
        else:
            log(f"autoencoder {v}: failed (exit {code})")
    if not results:
        raise SystemExit("no autoencoder trained")
    # Smallest first: a bigger layout must beat it by more than the tolerance.
    results.sort(key=lambda r: r["parameters"])
    chosen = results[0]
    for r in results[1:]:
        if r["held_out_mean_dice"] > chosen["held_out_mean_dice"] + args.ae_tolerance:
            chosen = r
    log(f"autoencoder chosen: {chosen['variant']} (held-out Dice {chosen['held_out_mean_dice']:.4f})")
    return args.out / f"autoencoder_{chosen['variant']}", results


# -- 3. SDSeg -------------------------------------------------------------------------------------
def sdseg_stage(args, autoencoder: Path | None, folder: Path, deadline: float | None = None) -> dict:
    from sdseg_monai.data import DeviceSliceBatches, SliceDataset
    from sdseg_monai.model import resolve_device
    from sdseg_monai.training import TrainSettings, train_sdseg
    from sdseg_monai.weights import sdseg_from_pretrained_parts, with_training_changes

    cuda_speed_settings()
    device = resolve_device(args.device)
    train_cases = split_cases(folder, "train")
    pair = real_ct_pair(args)
    if pair:
        train_cases.append(pair)
    validation_cases = split_cases(folder, "validation")
    def build():
        from sdseg_monai.model import SDSeg

        model = SDSeg.from_pretrained(args.init_from) if args.init_from else sdseg_from_pretrained_parts("tiny", autoencoder=autoencoder)
        return with_training_changes(model, args.mask_loss_weight, args.condition_channels, args.slice_size)

    steps = args.steps
    if steps is None:  # probe the speed of a training step on this device
        probe = build().to(device)
        dataset = SliceDataset(train_cases[:2], probe.config.preprocessing, probe.config.organ_labels)
        if probe.config.latent_scale is None:
            probe.fit_latent_scale(torch.stack([dataset[i]["mask"] for i in range(32)]))
        batches = DeviceSliceBatches(dataset, device, seed=args.seed, organs_per_slice=args.organs_per_slice)
        optimizer = torch.optim.AdamW([p for p in probe.parameters() if p.requires_grad], lr=1e-4)
        use_amp = device.type == "cuda"
        for i in range(25):
            if i == 5:
                if device.type == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
            b = batches.batch(i, args.batch_size)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                loss = probe.training_loss(b["image"], b["mask"], b["class_id"], torch.Generator().manual_seed(i), b.get("image_index"))["loss"]
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        rate = 20 / (time.perf_counter() - start)
        # Validation rounds and EMA bookkeeping cost about 15% on top of the steps.
        steps = max(10, int(rate * args.sdseg_seconds * 0.85))
        log(f"sdseg: {rate:.1f} steps/s at batch {args.batch_size} -> {steps} steps")
        del probe, optimizer, batches, dataset
    model = build()
    settings = TrainSettings(
        steps=steps,
        batch_size=args.batch_size,
        base_lr=args.lr / args.batch_size,
        warmup_steps=args.warmup if args.warmup is not None else min(500, max(1, steps // 10)),
        ema_decay=0.999,
        checkpoint_every=max(1, steps // 4),
        validate_every=max(1, steps // max(1, args.validations)),
        log_every=max(1, steps // 50),
        seed=args.seed,
        absent_fraction=0.15,
        augmentation="strong",
        validation_batch_size=inference_batch(model.config.preprocessing.slice_size),
        batches_on_device=True,
        organ_sampling=args.organ_sampling,
        organs_per_slice=args.organs_per_slice,
        max_seconds=None if deadline is None else max(1.0, deadline - time.perf_counter()),
    )
    log(f"sdseg: {len(train_cases)} training volumes, {len(validation_cases)} validation; {steps} steps at batch {args.batch_size}")
    summary = train_sdseg(model, train_cases, args.out / "sdseg", settings, validation_cases, device=str(device), progress=False)
    log(f"sdseg: {summary['steps']} steps in {summary['seconds']:.0f}s, best validation {json.dumps(summary['best'])}")
    return {"steps": steps, "settings": {k: v for k, v in vars(settings).items()}, **summary}


# -- 4. calibration, 5. evaluation and packaging ---------------------------------------------------
def _segmenter(model_dir: Path, device: str, postprocess: bool = True):
    from sdseg_monai.inference import VolumeSegmenter
    from sdseg_monai.model import SDSeg

    model = SDSeg.from_pretrained(model_dir)
    batch_size = inference_batch(model.config.preprocessing.slice_size)
    return VolumeSegmenter(model, device=device, seed=0, batch_size=batch_size, postprocess=postprocess)


def calibrate_model(model_dir: Path, folder: Path, device: str, out: Path) -> dict:
    from sdseg_monai.calibration import calibrate, save_calibrated_model

    result = calibrate(_segmenter(model_dir, device), folder / "manifest.json", folder, split="validation")
    save_calibrated_model(model_dir, result, out)
    log(f"calibration ({len(result.cases)} validation phantoms, {result.seconds:.0f}s):\n{result.format_table()}")
    return result.to_dict()


def evaluate_model(model_dir: Path, folder: Path, device: str, out: Path, postprocess: bool = True) -> dict:
    from sdseg_monai.evaluation import evaluate

    report = evaluate(_segmenter(model_dir, device, postprocess), folder / "manifest.json", folder, split="test", output_dir=out)
    log(f"test phantoms ({model_dir.name}{'' if postprocess else ', no postprocessing'}):\n{report.format_table()}")
    return report.to_dict()


def export(args, summary: dict, model: Path | None = None) -> None:
    """Copy the results so far to ``--export`` (a machine that may be reclaimed keeps nothing else)."""
    if args.export is None:
        return
    import shutil
    import tarfile

    args.export.mkdir(parents=True, exist_ok=True)
    (args.export / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    for name in ("sdseg/log.jsonl", "eval/report.json", "eval/per_case.csv", "eval_uncalibrated/report.json"):
        if (args.out / name).is_file():
            shutil.copy(args.out / name, args.export / name.replace("/", "_"))
    if model is not None:
        # In parts of at most 15 MB (transfer channels may cap a file's size): `cat default_model.tar.* | tar x`.
        tar_path = args.out / "default_model.tar"
        with tarfile.open(tar_path, "w") as tar:
            tar.add(model, arcname="default_model")
        data, part = tar_path.read_bytes(), 15 * 1024 * 1024
        for k in range(0, len(data), part):
            (args.export / f"default_model.tar.{k // part}").write_bytes(data[k : k + part])


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.stage == "autoencoder":
        return autoencoder_stage(args)
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    summary: dict = {"args": {k: str(v) for k, v in vars(args).items()}, "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}
    folder = make_phantoms(args)
    if args.init_from is None:
        autoencoder, ae_results = train_autoencoders(args)
        summary["autoencoders"] = ae_results
        summary["autoencoder"] = autoencoder.name
    else:
        autoencoder, summary["init_from"] = None, str(args.init_from)
    export(args, summary)
    summary["sdseg"] = sdseg_stage(args, autoencoder, folder, deadline=t0 + 60 * args.max_minutes if args.max_minutes else None)
    from sdseg_monai.model import SDSeg

    best, uncalibrated, packaged = args.out / "sdseg" / "model", args.out / "uncalibrated", args.out / "default_model"
    SDSeg.from_pretrained(best).save_pretrained(uncalibrated, dtype=torch.float16)
    export(args, summary, model=uncalibrated)
    summary["calibration"] = calibrate_model(uncalibrated, folder, args.device, packaged)
    summary["package_bytes"] = sum(f.stat().st_size for f in packaged.iterdir())
    export(args, summary, model=packaged)
    summary["test"] = evaluate_model(packaged, folder, args.device, args.out / "eval")
    export(args, summary)
    summary["test_uncalibrated"] = evaluate_model(packaged, folder, args.device, args.out / "eval_uncalibrated", postprocess=False)
    summary["test_fp32"] = evaluate_model(best, folder, args.device, args.out / "eval_fp32", postprocess=False)
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    export(args, summary)
    log(f"done in {summary['seconds']:.0f}s: test mean Dice {summary['test']['summary']['mean_dice']:.4f}; "
        f"package {summary['package_bytes'] / 1e6:.1f} MB -> {packaged}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
