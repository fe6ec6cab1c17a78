"""Train the ``tiny`` preset's mask autoencoder (stage 0 of SDSeg) on CPU and measure it.

Training masks: random organ-like phantoms (:func:`sdseg_monai.phantoms.random_organ_masks`) plus
per-organ axial slices of the real CT label map in ``shared/data/ct``. Held out (never trained on):
the last ``--holdout-fraction`` of the labelled z-extent of the real CT (a contiguous block of
slices) and a fresh seed of random masks. Prints the held-out reconstruction Dice (thresholded,
SDSeg's inference mapping, posterior mean; empty/empty pairs are NaN and left out of means), broken
down by source, organ and mask size, and saves the autoencoder with ``save_pretrained``.

Loss: BCE (boundary pixels weighted 1 + 30) + per-mask soft Dice on the decoder's channel-mean logit
(:func:`sdseg_monai.training.mask_autoencoder_loss`); posterior log-variance initialised at -10;
AdamW, lr 1e-3 with warm-up and cosine decay, batches of 8 (a quarter real-CT masks), bf16 autocast.

Example (the defaults; measured with the earlier (16, 32, 64, 64) layout: 16.5 minutes of one CPU
thread with AVX512-BF16, held-out mean Dice 0.975, real-CT 0.959)::

    python benchmarks/train_tiny_autoencoder.py --steps 1600 --bf16 --boundary-weight 30 \
        --out runs/tiny_autoencoder --threads 1

The 0.99 target needs far more masks than a CPU sees in that time: batches of 128 for about 900
steps on a GPU reach 0.990 held out (``benchmarks/train_default_model.py``, stage 0). ``--no-bf16``
on CPUs without AVX512-BF16, where bf16 autocast is many times slower.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

from sdseg_monai.config import TINY_AUTOENCODER, TINY_SLICE_SIZE
from sdseg_monai.labels import BTCV
from sdseg_monai.phantoms import random_organ_masks
from sdseg_monai.training import init_posterior_logvar, mask_reconstruction_dice, organ_masks_from_label_volume, train_mask_autoencoder

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_LABELS = ROOT.parent / "shared" / "data" / "ct" / "abdomen_ct_3mm_labels_btcv.nii.gz"
SIZE_BINS = ((1, 30), (30, 200), (200, 1000), (1000, 10**9))  # foreground pixels at 128 x 128


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=1600, help="optimiser steps")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "tiny_autoencoder", help="save_pretrained folder")
    p.add_argument("--seed", type=int, default=0, help="seeds weights, training masks and batches")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--crisp-weight", type=float, default=0.1)
    p.add_argument("--init-logvar", type=float, default=-10.0, help="initial posterior log-variance (nan: diffusers' init)")
    p.add_argument(
        "--bf16", action=argparse.BooleanOptionalAction, default=True,
        help="bfloat16 autocast in training, about 1.5x faster on AVX512-BF16 CPUs (evaluation stays float32)",
    )  # fmt: skip
    p.add_argument("--boundary-weight", type=float, default=30.0, help="extra BCE weight on boundary pixels")
    p.add_argument("--kl-weight", type=float, default=1e-6)
    p.add_argument("--n-random", type=int, default=8000, help="pool of random training masks")
    p.add_argument("--n-heldout-random", type=int, default=512, help="fresh random masks for evaluation")
    p.add_argument("--real-fraction", type=float, default=0.25, help="share of each batch from the real CT")
    p.add_argument("--holdout-fraction", type=float, default=0.3, help="last share of the labelled z-extent held out")
    p.add_argument("--eval-every", type=int, default=400, help="quick held-out check every N steps (0: off)")
    p.add_argument("--labels", type=Path, default=DEFAULT_LABELS, help="real CT label map (NIfTI)")
    return p.parse_args(argv)


def real_ct_split(path: Path, holdout_fraction: float, size: int):
    """Per-organ slices of the real CT, split by z: (train masks, train index, held-out masks,
    held-out index, held-out z range). Index rows are (label, z)."""
    import nibabel as nib

    labels = np.asarray(nib.load(str(path)).dataobj)
    masks, index = organ_masks_from_label_volume(labels, size=size, return_index=True)
    z_present = np.nonzero(labels.any(axis=(0, 1)))[0]
    z_lo, z_hi = int(z_present.min()), int(z_present.max())
    cut = z_lo + int(math.ceil((1 - holdout_fraction) * (z_hi - z_lo + 1)))
    held = index[:, 1] >= cut
    return masks[~held], index[~held], masks[held], index[held], (cut, z_hi)


def summarise(dice: torch.Tensor, masks: torch.Tensor, is_real: torch.Tensor, real_index: torch.Tensor) -> dict:
    """Mean Dice overall / real / random, 5th percentile, and by mask size and organ."""
    valid = ~torch.isnan(dice)
    d = dice[valid]
    area = masks.flatten(1).sum(1)
    out = {
        "n_masks": int(dice.numel()),
        "n_scored": int(valid.sum()),
        "mean": float(d.mean()),
        "p5": float(torch.quantile(d, 0.05)),
        "min": float(d.min()),
        "real_ct_mean": float(torch.nanmean(dice[is_real])),
        "real_ct_p5": float(torch.quantile(dice[is_real & valid], 0.05)),
        "random_mean": float(torch.nanmean(dice[~is_real])),
        "empty_masks": int((area == 0).sum()),
        "empty_masks_with_false_positives": int(((area == 0) & valid).sum()),
        "by_size": {},
        "by_organ": {},
    }
    for lo, hi in SIZE_BINS:
        sel = (area >= lo) & (area < hi) & valid
        if sel.any():
            out["by_size"][f"{lo}-{hi - 1 if hi < 10**9 else 'max'}px"] = {
                "n": int(sel.sum()),
                "mean": round(float(dice[sel].mean()), 4),
                "min": round(float(dice[sel].min()), 4),
            }
    real_dice = dice[is_real]
    for label in sorted(set(real_index[:, 0].tolist())):
        sel = real_index[:, 0] == label
        out["by_organ"][BTCV.organs[label - 1].name] = {
            "n": int(sel.sum()),
            "mean": round(float(torch.nanmean(real_dice[sel])), 4),
        }
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    from diffusers import AutoencoderKL

    size = TINY_SLICE_SIZE
    t0 = time.perf_counter()
    real_train, real_train_idx, real_held, real_held_idx, (cut, z_hi) = real_ct_split(
        args.labels, args.holdout_fraction, size
    )
    # The random pool is kept as bool (8000 masks: 131 MB instead of 524 MB as float32).
    random_train = random_organ_masks(args.n_random, size=size, seed=args.seed).bool()
    # A fresh seed far from the training one: held-out phantoms share no mask with the pool.
    random_held = random_organ_masks(args.n_heldout_random, size=size, seed=args.seed + 1_000_003)
    train = torch.cat([random_train, real_train.bool()])
    # Real masks get a fixed share of every batch however small their pool is.
    weights = torch.cat(
        [
            torch.full((len(random_train),), (1 - args.real_fraction) / len(random_train)),
            torch.full((len(real_train),), args.real_fraction / max(1, len(real_train))),
        ]
    )
    held = torch.cat([real_held, random_held])
    is_real = torch.cat([torch.ones(len(real_held), dtype=torch.bool), torch.zeros(len(random_held), dtype=torch.bool)])
    print(
        f"data: {len(random_train)} random + {len(real_train)} real-CT training masks "
        f"(z < {cut}); held out: {len(real_held)} real-CT masks (z {cut}..{z_hi}) + {len(random_held)} "
        f"random masks; built in {time.perf_counter() - t0:.0f}s",
        flush=True,
    )

    autoencoder = AutoencoderKL.from_config(TINY_AUTOENCODER)
    if not math.isnan(args.init_logvar):
        init_posterior_logvar(autoencoder, args.init_logvar)
    quick = torch.cat([real_held, random_held[:128]])

    def check(record):
        if args.eval_every and record["step"] % args.eval_every == 0 and record["step"] < args.steps:
            t = time.perf_counter()
            dice = mask_reconstruction_dice(autoencoder, quick)
            real = torch.nanmean(dice[: len(real_held)])
            # A safety net on a shared machine: the latest weights survive a killed run.
            autoencoder.save_pretrained(str(args.out.parent / (args.out.name + ".partial")))
            print(
                f"  step {record['step']}: quick held-out Dice {float(torch.nanmean(dice)):.4f} "
                f"(real CT {float(real):.4f}) [{time.perf_counter() - t:.0f}s]",
                flush=True,
            )

    t_train, cpu_train = time.perf_counter(), time.process_time()
    history = train_mask_autoencoder(
        autoencoder,
        train,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        crisp_weight=args.crisp_weight,
        boundary_weight=args.boundary_weight,
        kl_weight=args.kl_weight,
        sample_weights=weights,
        autocast_dtype=torch.bfloat16 if args.bf16 else None,
        log_every=50,
        callback=check,
    )
    train_seconds = time.perf_counter() - t_train
    train_cpu_seconds = time.process_time() - cpu_train  # wall time inflates on shared cores

    dice = mask_reconstruction_dice(autoencoder, held)
    summary = summarise(dice, held, is_real, real_held_idx)
    summary.update(
        {
            "train_seconds": round(train_seconds, 1),
            "train_cpu_seconds": round(train_cpu_seconds, 1),
            "threads": args.threads,
            "args": {k: str(v) for k, v in vars(args).items()},
            "final_loss": history[-1],
            "train_real_ct_mean": float(torch.nanmean(mask_reconstruction_dice(autoencoder, real_train))),
        }
    )
    args.out.mkdir(parents=True, exist_ok=True)
    autoencoder.save_pretrained(str(args.out))
    (args.out / "heldout_metrics.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps({k: v for k, v in summary.items() if k not in ("args", "final_loss")}, indent=2))
    print(
        f"HELD-OUT reconstruction Dice: mean {summary['mean']:.4f} | real-CT mean {summary['real_ct_mean']:.4f} "
        f"| random mean {summary['random_mean']:.4f} | p5 {summary['p5']:.4f} | "
        f"training {train_seconds / 60:.1f} min wall, {train_cpu_seconds / 60:.1f} min CPU, {args.threads} thread(s); "
        f"saved to {args.out}",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
