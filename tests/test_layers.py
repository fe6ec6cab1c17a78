"""Faster forwards of diffusers layers (sdseg_monai.layers): the same results as diffusers' own."""

import copy
import io

import pytest
import torch

from sdseg_monai.layers import (
    FusedUpsample2D,
    PlainResnetBlock2D,
    drop_unit_output_scale,
    fuse_upsample_convs,
    unfuse_upsample_convs,
    upsample_conv_kernel,
)


def test_plain_resnet_blocks_compute_what_diffusers_computes_without_the_unit_scale_pass(micro_model):
    from diffusers.models.resnet import ResnetBlock2D

    # Every resnet of the autoencoder and the vision encoder is plain; the UNet's take a time embedding.
    for part in (micro_model.autoencoder, micro_model.vision_encoder):
        blocks = [m for m in part.modules() if isinstance(m, ResnetBlock2D)]
        assert blocks and all(type(m) is PlainResnetBlock2D for m in blocks)
    assert all(type(m) is ResnetBlock2D for m in micro_model.unet.modules() if isinstance(m, ResnetBlock2D))

    torch.manual_seed(3)
    stock = ResnetBlock2D(in_channels=16, out_channels=24, temb_channels=None, groups=8).eval()
    plain = copy.deepcopy(stock)
    assert drop_unit_output_scale(plain) == 1 and type(plain) is PlainResnetBlock2D
    x = torch.randn(2, 16, 12, 12)
    before = x.clone()
    with torch.inference_mode():
        assert torch.equal(plain(x, None), stock(x, None))  # in-place SiLU and sum: the same values
    assert torch.equal(x, before)  # and the input untouched
    assert torch.equal(plain(x, None), stock(x, None))  # with autograd too
    # Blocks that scale their output, or take a time embedding, keep diffusers' forward.
    scaled = ResnetBlock2D(in_channels=16, out_channels=16, temb_channels=None, groups=8, output_scale_factor=2.0)
    timed = ResnetBlock2D(in_channels=16, out_channels=16, temb_channels=32, groups=8)
    assert drop_unit_output_scale(scaled) == 0 and drop_unit_output_scale(timed) == 0
    # Models with plain blocks still pickle (torch.save of a whole model, DDP spawn) and copy.
    buffer = io.BytesIO()
    torch.save(plain, buffer)
    buffer.seek(0)
    assert type(torch.load(buffer, weights_only=False)) is PlainResnetBlock2D


def _stock_upsample(channels, **options):
    from diffusers.models.upsampling import Upsample2D

    torch.manual_seed(5)
    return Upsample2D(channels, use_conv=True, **options).eval()


@pytest.mark.parametrize("shape", [(3, 16, 9, 7), (1, 8, 1, 1), (2, 8, 32, 32)])
def test_fused_upsample_computes_what_nearest_upsampling_then_the_3x3_convolution_computes(shape):
    stock = _stock_upsample(shape[1])
    fused = copy.deepcopy(stock)
    assert fuse_upsample_convs(fused) == 1 and type(fused) is FusedUpsample2D
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected = stock(x)
        assert fused(x).shape == expected.shape == (shape[0], shape[1], 2 * shape[2], 2 * shape[3])
        assert torch.allclose(fused(x), expected, rtol=1e-5, atol=1e-5)
        channels_last = fused(x.to(memory_format=torch.channels_last))
        assert torch.allclose(channels_last, expected, rtol=1e-5, atol=1e-5)
        # Negative control: a kernel summed for the wrong parity (taps reversed) is far off.
        flipped = upsample_conv_kernel(stock.conv.weight).flip(2, 3)
        wrong = torch.nn.functional.conv_transpose2d(x, flipped, stock.conv.bias, stride=2, padding=1)
        assert not torch.allclose(wrong, expected, rtol=1e-3, atol=1e-3)
    # Gradients too (the decoder is differentiated through by the mask loss).
    x.requires_grad_(True)
    (expected_grad,) = torch.autograd.grad(stock(x).square().sum(), x)
    (grad,) = torch.autograd.grad(fused(x).square().sum(), x)
    assert torch.allclose(grad, expected_grad, rtol=1e-4, atol=1e-4)
    # Another output size falls back to diffusers' forward.
    assert torch.equal(fused(x, output_size=(2 * shape[2] + 1, 2 * shape[3])), stock(x, output_size=(2 * shape[2] + 1, 2 * shape[3])))


def test_only_nearest_2x_then_3x3_upsamplers_are_fused_and_state_dicts_and_pickles_are_unchanged(micro_model):
    from diffusers.models.upsampling import Upsample2D

    # The packaged layout: every upsampler of the decoder (and of the UNet) is fused.
    for part in (micro_model.autoencoder.decoder, micro_model.unet):
        upsamplers = [m for m in part.modules() if isinstance(m, Upsample2D)]
        assert upsamplers and all(type(m) is FusedUpsample2D for m in upsamplers)
    # Transposed convolutions, plain interpolation and normed inputs keep diffusers' forward.
    for options in ({"use_conv_transpose": True}, {"norm_type": "rms_norm", "eps": 1e-6, "elementwise_affine": True}):
        assert fuse_upsample_convs(_stock_upsample(8, **options)) == 0
    assert fuse_upsample_convs(Upsample2D(8, use_conv=False)) == 0
    assert fuse_upsample_convs(Upsample2D(8, use_conv=True, kernel_size=5, padding=2)) == 0
    stock, fused = _stock_upsample(8), _stock_upsample(8)
    fuse_upsample_convs(fused)
    assert list(fused.state_dict()) == list(stock.state_dict()) == ["conv.weight", "conv.bias"]
    buffer = io.BytesIO()
    torch.save(fused, buffer)
    buffer.seek(0)
    assert type(torch.load(buffer, weights_only=False)) is FusedUpsample2D


def test_fused_decoder_decodes_what_diffusers_decoder_decodes(micro_model):
    latents = torch.randn((6, 4, 4, 4), generator=torch.Generator().manual_seed(1)) * 2
    with torch.inference_mode():
        fused = micro_model.decode_probabilities(latents)
        stock = copy.deepcopy(micro_model)
        unfuse_upsample_convs(stock)
        assert torch.allclose(fused, stock.decode_probabilities(latents), atol=1e-5)
