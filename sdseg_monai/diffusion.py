"""The diffusion maths of SDSeg: schedule, forward process, z0 <-> noise, loss and samplers."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sdseg_monai import _offline  # noqa: F401
from sdseg_monai.config import SCHEDULES


def alphas_cumprod(schedule: str, num_train_timesteps: int = 1000) -> torch.Tensor:
    """alpha-bar_t for t = 0..T-1, from diffusers' ``DDPMScheduler`` (which computes it in float32:
    abar_{T-1} 6.686662e-4 against 6.686652e-4 in float64, 1.5e-6 relative), held as float64."""
    from diffusers import DDPMScheduler

    beta_schedule, beta_start, beta_end = SCHEDULES[schedule]
    scheduler = DDPMScheduler(
        num_train_timesteps=num_train_timesteps,
        beta_schedule=beta_schedule,
        beta_start=beta_start,
        beta_end=beta_end,
    )
    return scheduler.alphas_cumprod.to(torch.float64)


def _gather(values: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    out = values.to(like.device)[t.to(like.device)].to(like.dtype)
    return out.reshape(-1, *([1] * (like.ndim - 1)))


def add_noise(z0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, abar: torch.Tensor) -> torch.Tensor:
    """Forward process: z_t = sqrt(abar_t) z0 + sqrt(1 - abar_t) noise."""
    a = _gather(abar, t, z0)
    return a.sqrt() * z0 + (1 - a).sqrt() * noise


def z0_from_noise(z_t: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, abar: torch.Tensor) -> torch.Tensor:
    """z0_hat = (z_t - sqrt(1 - abar_t) noise_hat) / sqrt(abar_t)."""
    a = _gather(abar, t, z_t)
    return (z_t - (1 - a).sqrt() * noise) / a.sqrt()


def noise_from_z0(z_t: torch.Tensor, z0: torch.Tensor, t: torch.Tensor, abar: torch.Tensor) -> torch.Tensor:
    """The noise implied by a z0 estimate: (z_t - sqrt(abar_t) z0_hat) / sqrt(1 - abar_t)."""
    a = _gather(abar, t, z_t)
    return (z_t - a.sqrt() * z0) / (1 - a).sqrt()


def split_prediction(
    output: torch.Tensor, z_t: torch.Tensor, t: torch.Tensor, abar: torch.Tensor, prediction_type: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (noise_hat, z0_hat) from the UNet output, whatever it predicts."""
    if prediction_type == "epsilon":
        return output, z0_from_noise(z_t, output, t, abar)
    return noise_from_z0(z_t, output, t, abar), output


def sample_timesteps(
    batch: int,
    num_train_timesteps: int,
    final_fraction: float = 0.0,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """t uniform in [0, T), with a share ``final_fraction`` set to T - 1 (the inference step)."""
    t = torch.randint(0, num_train_timesteps, (batch,), generator=generator)
    if final_fraction > 0:
        at_final = torch.rand(batch, generator=generator) < final_fraction
        t = torch.where(at_final, torch.full_like(t, num_train_timesteps - 1), t)
    return t.to(device)


def sdseg_loss(
    noise_hat: torch.Tensor,
    noise: torch.Tensor,
    z0_hat: torch.Tensor,
    z0: torch.Tensor,
    z0_weight: float = 1.0,
) -> dict[str, torch.Tensor]:
    """L1(noise_hat, noise) + lambda * L1(z0_hat, z0): the SDSeg objective (lambda = 0: the ablation)."""
    loss_noise = F.l1_loss(noise_hat, noise)
    loss_z0 = F.l1_loss(z0_hat, z0)
    return {"loss": loss_noise + z0_weight * loss_z0, "loss_noise": loss_noise.detach(), "loss_z0": loss_z0.detach()}


def ddim_scheduler(schedule: str, num_train_timesteps: int, prediction_type: str, num_steps: int):
    """A DDIM scheduler whose first step is t = T - 1, so one DDIM step equals SDSeg's one-step reverse."""
    from diffusers import DDIMScheduler

    beta_schedule, beta_start, beta_end = SCHEDULES[schedule]
    scheduler = DDIMScheduler(
        num_train_timesteps=num_train_timesteps,
        beta_schedule=beta_schedule,
        beta_start=beta_start,
        beta_end=beta_end,
        prediction_type=prediction_type,
        clip_sample=False,  # SDSeg never clips z0_hat
        set_alpha_to_one=True,
        timestep_spacing="trailing",
    )
    scheduler.set_timesteps(num_steps)
    return scheduler
