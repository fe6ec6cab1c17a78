"""Training of SDSeg's parts. Stage 0: the mask autoencoder of the ``tiny`` preset, from scratch.

SDSeg freezes a KL autoencoder that maps binary masks to latents and back. The paper reuses Stable
Diffusion's; the ``tiny`` preset (:data:`sdseg_monai.config.TINY_AUTOENCODER`) is trained here, on
masks only. Plain L1 reconstruction of ``X = 2 * mask - 1`` collapses to empty masks (background
dominates every slice), so the loss is mask-aware: BCE + per-mask soft Dice on the decoder's
channel-mean logit, plus a small hinge that pushes every decoder channel past +-1 so that the clamped
inference mapping of :meth:`sdseg_monai.model.SDSeg.decode_probabilities` gives crisp maps.

Inference mapping (the one SDSeg uses, and the one :func:`mask_reconstruction_dice` scores):
``prob = mean_c((clamp(out_c, -1, 1) + 1) / 2)``, foreground where ``prob > 0.5``, i.e. where the
channel mean of the *clamped* output is positive. Training uses ``logit = mean_c(out_c)``: the two
agree in sign whenever the channels agree in sign, which the hinge term enforces.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from sdseg_monai.model import SDSeg

logger = logging.getLogger(__name__)

__all__ = [
    "binary_dice",
    "decoded_to_probabilities",
    "mask_autoencoder_loss",
    "mask_reconstruction_dice",
    "organ_masks_from_label_volume",
    "train_mask_autoencoder",
]


def decoded_to_probabilities(decoded: torch.Tensor) -> torch.Tensor:
    """Decoder output (B, C, H, W) -> foreground probabilities (B, H, W), SDSeg's inference mapping:
    clamp to [-1, 1], map to [0, 1], average the channels."""
    return ((decoded.float().clamp(-1, 1) + 1) / 2).mean(dim=1)


def _soft_dice_loss(probs: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """1 - soft Dice per mask, averaged over masks. Per mask (not pooled over the batch) so that a
    5-pixel adrenal gland counts as much as a liver, as in the mean-Dice metric; ``smooth`` makes an
    empty target penalise any predicted foreground."""
    dims = tuple(range(1, probs.ndim))
    inter = (probs * target).sum(dims)
    denom = probs.sum(dims) + target.sum(dims)
    return (1 - (2 * inter + smooth) / (denom + smooth)).mean()


def mask_autoencoder_loss(
    autoencoder: torch.nn.Module,
    masks: torch.Tensor,
    generator: torch.Generator | None = None,
    kl_weight: float = 1e-6,
    crisp_weight: float = 0.1,
) -> dict[str, torch.Tensor]:
    """The mask-aware autoencoder objective on a batch of binary masks.

    ``X = 2 * mask - 1`` on 3 channels is encoded, a posterior sample decoded, and the channel mean
    of the decoder output is the foreground logit::

        loss = BCE_with_logits(logit, mask) + (1 - softDice(sigmoid(logit), mask))
               + kl_weight * KL + crisp_weight * mean_c,px relu(1 - s * out_c),   s = 2 * mask - 1

    The last (hinge) term is zero once every channel is past +-1 on the correct side: then the clamped
    inference map is exactly 0 or 1 and agrees with the sign of the logit.

    Args:
        autoencoder: a diffusers ``AutoencoderKL`` with 3 input and output channels.
        masks: (B, H, W) masks in {0, 1} (any dtype).
        generator: generator of the posterior sample (reproducible training).
        kl_weight: weight of the KL divergence to N(0, I), summed over latent elements, batch mean.
        crisp_weight: weight of the per-channel hinge; 0 disables it.

    Returns:
        ``{"loss", "bce", "dice", "kl", "crisp"}``: scalar tensors, ``loss`` with a graph.
    """
    device = next(autoencoder.parameters()).device
    target = masks.to(device=device, dtype=torch.float32)
    if target.ndim == 4:
        target = target[:, 0]
    x = SDSeg.masks_to_autoencoder_input(target)
    posterior = autoencoder.encode(x).latent_dist
    z = posterior.sample(generator=generator)
    decoded = autoencoder.decode(z).sample.float()
    logit = decoded.mean(dim=1)
    bce = F.binary_cross_entropy_with_logits(logit, target)
    dice = _soft_dice_loss(torch.sigmoid(logit), target)
    kl = posterior.kl().mean()
    sign = (2 * target - 1).unsqueeze(1)
    crisp = F.relu(1 - sign * decoded).mean()
    loss = bce + dice + kl_weight * kl + crisp_weight * crisp
    return {"loss": loss, "bce": bce.detach(), "dice": dice.detach(), "kl": kl.detach(), "crisp": crisp.detach()}


def _dihedral(masks: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Each mask under a random one of the 8 flips / 90-degree rotations (organ shapes have no
    preferred orientation at the autoencoder's level, and this multiplies the distinct inputs by 8)."""
    ks = torch.randint(0, 4, (masks.shape[0],), generator=generator).tolist()
    flips = torch.randint(0, 2, (masks.shape[0],), generator=generator).tolist()
    out = []
    for m, k, f in zip(masks, ks, flips):
        m = torch.rot90(m, k, dims=(-2, -1))
        out.append(torch.flip(m, dims=(-1,)) if f else m)
    return torch.stack(out)


def _lr_factor(step: int, steps: int, warmup: int, min_lr_fraction: float) -> float:
    """Linear warm-up, then cosine decay to ``min_lr_fraction`` (fine boundary detail comes last,
    at low learning rates)."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return min_lr_fraction + (1 - min_lr_fraction) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def train_mask_autoencoder(
    autoencoder: torch.nn.Module,
    masks: torch.Tensor,
    *,
    steps: int,
    batch_size: int = 16,
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    warmup_steps: int = 50,
    min_lr_fraction: float = 0.02,
    seed: int = 0,
    augment: bool = True,
    kl_weight: float = 1e-6,
    crisp_weight: float = 0.1,
    sample_weights: torch.Tensor | None = None,
    log_every: int = 50,
    callback: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Train a mask autoencoder with :func:`mask_autoencoder_loss` and AdamW.

    Batches are drawn with replacement from ``masks`` (uniformly, or by ``sample_weights``), each
    mask optionally under a random flip / 90-degree rotation. On CPU the run is a pure function of
    the autoencoder's initial weights, the data and ``seed``.

    Args:
        autoencoder: a diffusers ``AutoencoderKL`` (trained in place, left in eval mode).
        masks: (N, H, W) binary masks, any dtype (bool or uint8 keeps big pools small); batches are
            moved to the autoencoder's device.
        steps: optimiser steps.
        batch_size: masks per step.
        lr: peak learning rate (after a linear warm-up of ``warmup_steps``, then cosine decay to
            ``lr * min_lr_fraction``).
        weight_decay: AdamW weight decay.
        warmup_steps: steps of linear learning-rate warm-up.
        min_lr_fraction: final learning rate as a fraction of ``lr``.
        seed: seeds batch sampling, augmentation and posterior samples.
        augment: random flips and 90-degree rotations.
        kl_weight: see :func:`mask_autoencoder_loss`.
        crisp_weight: see :func:`mask_autoencoder_loss`.
        sample_weights: (N,) non-negative sampling weights, e.g. to oversample real masks.
        log_every: one history record (losses averaged over the last ``log_every`` steps) every
            ``log_every`` steps and at the last step.
        callback: called with each history record (e.g. to evaluate or checkpoint).

    Returns:
        The history: dicts with ``step`` (1-based), ``lr``, ``seconds`` since the start, and the mean
        ``loss``, ``bce``, ``dice``, ``kl`` and ``crisp`` over the steps since the previous record.
    """
    if steps < 1 or batch_size < 1 or log_every < 1:
        raise ValueError("steps, batch_size and log_every must be >= 1")
    if masks.ndim != 3 or masks.shape[0] == 0:
        raise ValueError(f"expected masks of shape (N, H, W) with N >= 1, got {tuple(masks.shape)}")
    generator = torch.Generator("cpu").manual_seed(int(seed))
    device = next(autoencoder.parameters()).device
    # The posterior sample's noise must come from a generator on the autoencoder's device.
    noise_generator = torch.Generator(device).manual_seed(int(seed) + 1)
    if sample_weights is not None:
        sample_weights = torch.as_tensor(sample_weights, dtype=torch.float64)
        if sample_weights.shape != (masks.shape[0],) or (sample_weights < 0).any() or sample_weights.sum() <= 0:
            raise ValueError("sample_weights must be (N,) non-negative with a positive sum")
    optimizer = torch.optim.AdamW(autoencoder.parameters(), lr=lr, weight_decay=weight_decay)
    warmup = min(warmup_steps, max(1, steps // 10))
    autoencoder.train()
    history: list[dict[str, Any]] = []
    sums: dict[str, float] = {}
    count = 0
    start = time.perf_counter()
    try:
        for step in range(steps):
            factor = _lr_factor(step, steps, warmup, min_lr_fraction)
            for group in optimizer.param_groups:
                group["lr"] = lr * factor
            if sample_weights is None:
                idx = torch.randint(0, masks.shape[0], (batch_size,), generator=generator)
            else:
                idx = torch.multinomial(sample_weights, batch_size, replacement=True, generator=generator)
            batch = masks[idx].to(torch.float32)
            if augment:
                batch = _dihedral(batch, generator)
            losses = mask_autoencoder_loss(
                autoencoder, batch, generator=noise_generator, kl_weight=kl_weight, crisp_weight=crisp_weight
            )
            optimizer.zero_grad(set_to_none=True)
            losses["loss"].backward()
            optimizer.step()
            for key, value in losses.items():
                sums[key] = sums.get(key, 0.0) + float(value.detach())
            count += 1
            if (step + 1) % log_every == 0 or step + 1 == steps:
                record = {"step": step + 1, "lr": lr * factor, "seconds": time.perf_counter() - start}
                record.update({k: v / count for k, v in sums.items()})
                history.append(record)
                logger.info(
                    "step %d/%d loss %.4f (bce %.4f dice %.4f crisp %.4f kl %.1f) lr %.2e %.0fs",
                    step + 1, steps, record["loss"], record["bce"], record["dice"], record["crisp"],
                    record["kl"], record["lr"], record["seconds"],
                )  # fmt: skip
                sums, count = {}, 0
                if callback is not None:
                    callback(record)
                    autoencoder.train()  # a callback may have evaluated the model
    finally:
        autoencoder.eval()
    return history


def binary_dice(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Dice of binary masks, one value per mask.

    Conventions: both masks empty -> NaN (nothing to segment and nothing found: no information, so it
    is left out of means, e.g. with ``torch.nanmean``); one empty and the other not -> 0.

    Args:
        pred: (B, H, W) predicted masks (bool or {0, 1}).
        target: (B, H, W) reference masks (bool or {0, 1}).

    Returns:
        (B,) float32 Dice in [0, 1] or NaN.
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred and target shapes differ: {tuple(pred.shape)} vs {tuple(target.shape)}")
    p = pred.reshape(pred.shape[0], -1).bool()
    t = target.reshape(target.shape[0], -1).bool()
    inter = (p & t).sum(1).to(torch.float64)
    denom = (p.sum(1) + t.sum(1)).to(torch.float64)
    dice = 2 * inter / denom  # 0/0 -> NaN for both empty; 0/n -> 0 when exactly one is empty
    return dice.to(torch.float32)


@torch.no_grad()
def reconstruct_masks(autoencoder: torch.nn.Module, masks: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
    """Thresholded reconstructions (N, H, W) bool: posterior mean -> decoder -> SDSeg's inference
    mapping (:func:`decoded_to_probabilities`) -> ``prob > 0.5``."""
    device = next(autoencoder.parameters()).device
    was_training = autoencoder.training
    autoencoder.eval()
    out = []
    try:
        for i in range(0, masks.shape[0], batch_size):
            x = SDSeg.masks_to_autoencoder_input(masks[i : i + batch_size].to(device, torch.float32))
            z = autoencoder.encode(x).latent_dist.mean
            out.append((decoded_to_probabilities(autoencoder.decode(z).sample) > 0.5).cpu())
    finally:
        autoencoder.train(was_training)
    return torch.cat(out) if out else torch.zeros((0, *masks.shape[1:]), dtype=torch.bool)


def mask_reconstruction_dice(autoencoder: torch.nn.Module, masks: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
    """Per-mask Dice of the autoencoder's thresholded reconstruction (see :func:`reconstruct_masks`).

    Args:
        autoencoder: a diffusers ``AutoencoderKL``.
        masks: (N, H, W) binary masks.
        batch_size: masks per forward pass.

    Returns:
        (N,) float32 Dice; NaN where mask and reconstruction are both empty, 0 where exactly one is
        empty (see :func:`binary_dice`). Average with ``torch.nanmean``.
    """
    return binary_dice(reconstruct_masks(autoencoder, masks, batch_size), masks)


def organ_masks_from_label_volume(
    label_array: np.ndarray | torch.Tensor,
    size: int = 128,
    labels: list[int] | None = None,
    return_index: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Per-organ binary axial slices of a 3D label map, resized to ``size x size``.

    The volume is taken as ``(X, Y, Z)`` with Z the axial axis (RAS / LPS NIfTI arrays as read by
    nibabel); each slice keeps the array's (X, Y) in-plane order. Only slices where the organ is
    present are returned, organ by organ in increasing label order, slices in increasing Z.
    Resizing is nearest-neighbour (``interpolate(mode="nearest-exact")``: pixel-centre aligned,
    unlike ``"nearest"`` which shifts by up to a pixel), so masks stay binary.

    Args:
        label_array: (X, Y, Z) integer label map, 0 = background.
        size: output height and width.
        labels: the labels to extract (default: every non-zero label present).
        return_index: also return an (N, 2) int64 tensor of (label, z) per mask.

    Returns:
        (N, size, size) float32 masks in {0, 1}; with ``return_index``, ``(masks, index)``.
    """
    volume = torch.as_tensor(np.asarray(label_array)).to(torch.int64)
    if volume.ndim != 3:
        raise ValueError(f"expected a 3D label map, got shape {tuple(volume.shape)}")
    if labels is None:
        labels = [int(v) for v in torch.unique(volume).tolist() if v != 0]
    masks, index = [], []
    for label in labels:
        organ = volume == int(label)
        present = organ.any(dim=0).any(dim=0).nonzero().flatten()
        if present.numel() == 0:
            continue
        slices = organ[:, :, present].permute(2, 0, 1).unsqueeze(1).to(torch.float32)  # (n, 1, X, Y)
        resized = F.interpolate(slices, size=(size, size), mode="nearest-exact")[:, 0]
        keep = resized.flatten(1).any(dim=1)  # downsizing can drop a 1-pixel organ: skip those
        masks.append(resized[keep])
        index.append(torch.stack([torch.full_like(present, int(label)), present], dim=1)[keep])
    out = torch.cat(masks) if masks else torch.zeros((0, size, size))
    idx = torch.cat(index) if index else torch.zeros((0, 2), dtype=torch.int64)
    return (out, idx) if return_index else out
