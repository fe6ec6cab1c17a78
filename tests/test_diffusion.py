"""The diffusion maths: schedules, the z0 identity, loss and timestep sampling."""

import pytest
import torch

from sdseg_monai import diffusion


@pytest.mark.parametrize("schedule, last", [("sd-v1", 4.66e-3), ("ldm", 6.7e-4)])
def test_schedules_match_the_reference_alpha_bar(schedule, last):
    abar = diffusion.alphas_cumprod(schedule, 1000)
    assert abar.shape == (1000,)
    assert abar[-1].item() == pytest.approx(last, rel=0.02)
    assert torch.all(abar[1:] < abar[:-1])


def test_z0_identity_inverts_the_forward_process():
    abar = diffusion.alphas_cumprod("ldm")
    generator = torch.Generator().manual_seed(0)
    z0 = torch.randn((6, 4, 8, 8), generator=generator, dtype=torch.float64)
    noise = torch.randn((6, 4, 8, 8), generator=generator, dtype=torch.float64)
    t = torch.tensor([0, 1, 250, 500, 998, 999])
    z_t = diffusion.add_noise(z0, noise, t, abar)
    # z_t really is the forward process, sample by sample.
    for i, ti in enumerate(t):
        expected = abar[ti].sqrt() * z0[i] + (1 - abar[ti]).sqrt() * noise[i]
        assert torch.allclose(z_t[i], expected)
    assert torch.allclose(diffusion.z0_from_noise(z_t, noise, t, abar), z0, atol=1e-9)
    assert torch.allclose(diffusion.noise_from_z0(z_t, z0, t, abar), noise, atol=1e-6)


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample"])
def test_split_prediction_gives_consistent_noise_and_z0(prediction_type):
    abar = diffusion.alphas_cumprod("sd-v1")
    generator = torch.Generator().manual_seed(2)
    z0, noise = torch.randn((2, 2, 3, 4, 4), generator=generator, dtype=torch.float64)
    t = torch.tensor([10, 999])
    z_t = diffusion.add_noise(z0, noise, t, abar)
    output = noise if prediction_type == "epsilon" else z0
    noise_hat, z0_hat = diffusion.split_prediction(output, z_t, t, abar, prediction_type)
    assert torch.allclose(noise_hat, noise, atol=1e-6)
    assert torch.allclose(z0_hat, z0, atol=1e-6)


def test_loss_is_l1_noise_plus_lambda_l1_z0():
    a, b, c, d = (torch.full((2, 4), v) for v in (1.0, 0.5, 3.0, 1.0))
    full = diffusion.sdseg_loss(a, b, c, d, z0_weight=1.0)
    assert full["loss"].item() == pytest.approx(0.5 + 2.0)
    ablation = diffusion.sdseg_loss(a, b, c, d, z0_weight=0.0)
    assert ablation["loss"].item() == pytest.approx(0.5)
    assert full["loss_noise"].item() == pytest.approx(0.5) and full["loss_z0"].item() == pytest.approx(2.0)


def test_timesteps_uniform_with_optional_final_step_weight():
    generator = torch.Generator().manual_seed(0)
    t = diffusion.sample_timesteps(20000, 1000, 0.0, generator)
    assert t.min() >= 0 and t.max() <= 999
    assert (t == 999).float().mean().item() < 0.01
    t = diffusion.sample_timesteps(20000, 1000, 0.5, generator)
    assert (t == 999).float().mean().item() == pytest.approx(0.5, abs=0.02)
    assert torch.all(diffusion.sample_timesteps(50, 1000, 1.0, generator) == 999)


def test_ddim_scheduler_starts_at_the_last_timestep_without_clipping():
    scheduler = diffusion.ddim_scheduler("ldm", 1000, "epsilon", 4)
    assert scheduler.timesteps[0].item() == 999
    assert scheduler.config.clip_sample is False
    assert diffusion.ddim_scheduler("ldm", 1000, "sample", 1).timesteps.tolist() == [999]
