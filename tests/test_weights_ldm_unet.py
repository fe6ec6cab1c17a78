"""LDM ``openaimodel.UNetModel`` checkpoints (LSUN-churches, which the official SDSeg code starts from) as
diffusers ``UNet2DModel``s: key conversion, attention head layout, single-file loading, the paper preset.

The toys have the churches layout at small width: ResBlock samplers (``resblock_updown``), scale-shift
norm, attention at every level but the last, 8 heads at every width.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, UNet2DModel

from ldm_keys import LDM_UNET_PREFIX, unet2d_to_ldm_openai, vae_to_ldm
from sdseg_monai.model import set_attention_heads
from sdseg_monai.weights import (
    convert_ldm_openai_unet_checkpoint,
    ldm_openai_unet2d_config,
    load_unet,
    paper_ldm_unet_config,
    sdseg_from_pretrained_parts,
)
from test_weights import VAE_CONFIG, assert_same_state, raises_one_line

HEADS = 8
# Written the way config.PAPER_UNET is: UpBlock2D for the attention-free level, no attn_norm_num_groups.
PAPER_LIKE_UNET = {
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": [32, 64, 64],
    "layers_per_block": 2,
    "down_block_types": ["AttnDownBlock2D", "AttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D"],
    "downsample_type": "resnet",
    "upsample_type": "resnet",
    "resnet_time_scale_shift": "scale_shift",
    "attention_head_dim": 8,
    "dropout": 0.0,
    "norm_num_groups": 8,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
}
# What the LDM layout needs of it: a ResBlock upsampler after the attention-free level, a GroupNorm in
# the mid-block attention (diffusers drops it with scale_shift unless attn_norm_num_groups is set).
CHURCHES_LIKE_UNET = {
    **PAPER_LIKE_UNET,
    "up_block_types": ["ResnetUpsampleBlock2D", "AttnUpBlock2D", "AttnUpBlock2D"],
    "attn_norm_num_groups": 8,
}
VARIANTS = {
    "churches": (CHURCHES_LIKE_UNET, False),
    "class-conditional": ({**CHURCHES_LIKE_UNET, "num_class_embeds": 3}, False),
    "conv-samplers": (  # resblock_updown=False: Downsample.op / Upsample.conv
        {
            **CHURCHES_LIKE_UNET,
            "up_block_types": PAPER_LIKE_UNET["up_block_types"],
            "downsample_type": "conv",
            "upsample_type": "conv",
        },
        False,
    ),
    "new-attention-order": (CHURCHES_LIKE_UNET, True),
}
ORGANS = ["spleen", "liver", "pancreas"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def seeded(cls, config: dict, seed: int, heads: int | None = None):
    """A model with every parameter perturbed (norms and biases off their defaults), optionally with
    ``heads`` heads in every attention layer."""
    torch.manual_seed(seed)
    model = cls.from_config(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    if heads:
        set_attention_heads(model, heads)
    return model.eval()


def save_ldm_ckpt(path, unet: UNet2DModel, **extra) -> None:
    """``unet`` as an LDM single-file checkpoint: ``{"state_dict": {"model.diffusion_model.*": ...}}`` plus
    the other tensors such files carry (first stage, schedule, EMA bookkeeping)."""
    state = {
        **unet2d_to_ldm_openai(unet.state_dict(), HEADS),
        "first_stage_model.encoder.conv_in.weight": torch.randn(8, 3, 3, 3),
        "betas": torch.linspace(1e-4, 2e-2, 1000),
        "model_ema.decay": torch.tensor(0.9999),
        **extra,
    }
    torch.save({"state_dict": state, "global_step": 500000}, path)


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(7)
    return {"z": torch.randn(2, 4, 8, 8, generator=g), "t": torch.tensor([999, 10]), "y": torch.tensor([2, 0])}


@pytest.fixture(scope="module")
def churches(tmp_path_factory):
    """A seeded churches-like UNet (8 heads) and its LDM ``.ckpt``; a class-conditional one; a kl-f8 file."""
    root = tmp_path_factory.mktemp("ldm")
    out = {
        "unet": seeded(UNet2DModel, CHURCHES_LIKE_UNET, 1, HEADS),
        "cin": seeded(UNet2DModel, VARIANTS["class-conditional"][0], 2, HEADS),
        "vae": seeded(AutoencoderKL, VAE_CONFIG, 0),
        "ckpt": root / "model.ckpt",
        "cin_ckpt": root / "cin.ckpt",
        "klf8": root / "kl-f8.ckpt",
    }
    save_ldm_ckpt(out["ckpt"], out["unet"])
    save_ldm_ckpt(out["cin_ckpt"], out["cin"])
    torch.save({"state_dict": vae_to_ldm(out["vae"].state_dict())}, out["klf8"])
    return out


# -- key conversion -------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_round_trip_diffusers_ldm_diffusers_is_bit_identical(variant):
    config, new_order = VARIANTS[variant]
    model = seeded(UNet2DModel, config, 3)
    ldm = unet2d_to_ldm_openai(model.state_dict(), HEADS, new_attention_order=new_order)
    attentions = sum(k.endswith(".to_q.weight") for k in model.state_dict())
    assert attentions == 2 * 2 + 1 + 2 * 3  # down, mid, up
    assert len(ldm) == len(model.state_dict()) - 4 * attentions  # to_q/k/v weights and biases -> qkv
    back = convert_ldm_openai_unet_checkpoint(ldm, config, HEADS, new_attention_order=new_order)
    assert_same_state(back, model)
    if variant == "churches":  # the official layout (openaimodel, resblock_updown=True, 2 res blocks)
        p = LDM_UNET_PREFIX
        expected = {
            "time_embed.0.weight": (128, 32),
            "input_blocks.0.0.weight": (32, 4, 3, 3),
            "input_blocks.1.1.qkv.weight": (96, 32, 1),
            "input_blocks.1.1.proj_out.weight": (32, 32, 1),
            "input_blocks.2.1.norm.bias": (32,),
            "input_blocks.3.0.in_layers.2.weight": (32, 32, 3, 3),  # down ResBlock: no op
            "input_blocks.4.0.skip_connection.weight": (64, 32, 1, 1),
            "input_blocks.6.0.emb_layers.1.weight": (128, 128),  # scale-shift: 2 x 64
            "input_blocks.8.0.out_layers.3.weight": (64, 64, 3, 3),
            "middle_block.1.qkv.bias": (192,),
            "middle_block.2.out_layers.0.weight": (64,),
            "output_blocks.2.1.in_layers.0.weight": (64,),  # up ResBlock after a level without attention
            "output_blocks.5.1.qkv.weight": (192, 64, 1),
            "output_blocks.5.2.in_layers.2.weight": (64, 64, 3, 3),  # up ResBlock after an attention block
            "output_blocks.8.1.proj_out.bias": (32,),
            "out.0.weight": (32,),
            "out.2.weight": (4, 32, 3, 3),
        }
        for key, shape in expected.items():
            assert tuple(ldm[p + key].shape) == shape, key
        assert not any(k.endswith((".op.weight", ".conv.weight")) for k in ldm)
        assert len({k.split(".")[3] for k in ldm if k.startswith(p + "input_blocks.")}) == 9
        assert len({k.split(".")[3] for k in ldm if k.startswith(p + "output_blocks.")}) == 9
    elif variant == "class-conditional":
        assert tuple(ldm[LDM_UNET_PREFIX + "label_emb.weight"].shape) == (3, 128)
    elif variant == "conv-samplers":
        for key in ("input_blocks.3.0.op.weight", "input_blocks.6.0.op.bias", "output_blocks.2.1.conv.weight",
                    "output_blocks.5.2.conv.bias"):
            assert LDM_UNET_PREFIX + key in ldm, key


def ldm_attention_block(x, w, heads, groups, new_order=False):
    """LDM's ``AttentionBlock._forward`` with ``QKVAttentionLegacy`` (``QKVAttention`` with ``new_order``),
    written out from ``ldm/modules/diffusionmodules/openaimodel.py``. LDM normalises with 32 groups; the
    toy widths take ``groups``."""
    b, c, *spatial = x.shape
    x = x.reshape(b, c, -1)
    qkv = F.conv1d(F.group_norm(x, groups, w["norm.weight"], w["norm.bias"], eps=1e-5), w["qkv.weight"], w["qkv.bias"])
    bs, width, length = qkv.shape
    ch = width // (3 * heads)
    if new_order:  # split q, k, v first, then heads
        q, k, v = (part.reshape(bs * heads, ch, length) for part in qkv.chunk(3, dim=1))
    else:  # split heads first: each head's 3*ch channels are [q_h, k_h, v_h]
        q, k, v = qkv.reshape(bs * heads, ch * 3, length).split(ch, dim=1)
    scale = 1 / math.sqrt(math.sqrt(ch))
    weight = torch.softmax(torch.einsum("bct,bcs->bts", q * scale, k * scale), dim=-1)
    a = torch.einsum("bts,bcs->bct", weight, v).reshape(bs, -1, length)
    h = F.conv1d(a, w["proj_out.weight"], w["proj_out.bias"])
    return (x + h).reshape(b, c, *spatial)


@pytest.mark.parametrize("new_order", [False, True], ids=["legacy", "new-attention-order"])
def test_attention_conversion_matches_ldm_attention_block(new_order):
    """Fresh LDM-layout weights (not made by the inverse helper) through the converter: the diffusers
    attention computes what LDM's AttentionBlock computes. A wrong q/k/v head layout fails here."""
    model = seeded(UNet2DModel, CHURCHES_LIKE_UNET, 4)
    ldm = unet2d_to_ldm_openai(model.state_dict(), HEADS, new_attention_order=new_order)
    g = torch.Generator().manual_seed(11)
    fresh = {}
    for block, width in (("input_blocks.1.1", 32), ("middle_block.1", 64)):
        fresh[block] = {
            "norm.weight": 1 + 0.3 * torch.randn(width, generator=g),
            "norm.bias": 0.3 * torch.randn(width, generator=g),
            "qkv.weight": 0.3 * torch.randn(3 * width, width, 1, generator=g),
            "qkv.bias": 0.3 * torch.randn(3 * width, generator=g),
            "proj_out.weight": 0.3 * torch.randn(width, width, 1, generator=g),
            "proj_out.bias": 0.3 * torch.randn(width, generator=g),
        }
        for name, value in fresh[block].items():
            assert ldm[f"{LDM_UNET_PREFIX}{block}.{name}"].shape == value.shape
            ldm[f"{LDM_UNET_PREFIX}{block}.{name}"] = value
    converted = {}
    for order in (new_order, not new_order):
        unet = UNet2DModel.from_config(CHURCHES_LIKE_UNET)
        state = convert_ldm_openai_unet_checkpoint(ldm, CHURCHES_LIKE_UNET, HEADS, new_attention_order=order)
        unet.load_state_dict(state)
        set_attention_heads(unet, HEADS)
        converted[order] = unet.eval()
    pairs = (("input_blocks.1.1", "down_blocks.0.attentions.0"), ("middle_block.1", "mid_block.attentions.0"))
    for block, attention in pairs:
        width = fresh[block]["norm.weight"].shape[0]
        x = 2 * torch.randn(2, width, 4, 4, generator=g)
        with torch.no_grad():
            expected = ldm_attention_block(x, fresh[block], HEADS, groups=8, new_order=new_order)
            out = converted[new_order].get_submodule(attention)(x)
            wrong = converted[not new_order].get_submodule(attention)(x)
        assert torch.allclose(out, expected, atol=1e-5), (out - expected).abs().max()
        assert (wrong - expected).abs().max() > 1e-2  # the other head layout is really different


def test_ldm_layout_config_of_a_paper_style_config():
    assert ldm_openai_unet2d_config(PAPER_LIKE_UNET) == CHURCHES_LIKE_UNET
    assert ldm_openai_unet2d_config(CHURCHES_LIKE_UNET) == CHURCHES_LIKE_UNET
    # Conv samplers and default time-embedding norm: nothing to change.
    plain = {**PAPER_LIKE_UNET, "downsample_type": "conv", "upsample_type": "conv"}
    plain["resnet_time_scale_shift"] = "default"
    assert ldm_openai_unet2d_config(plain) == plain
    # An attention-free level that samples: a Resnet*sample block; the last block never samples.
    down = ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D"]
    config = ldm_openai_unet2d_config({**PAPER_LIKE_UNET, "down_block_types": down})
    assert config["down_block_types"] == ["ResnetDownsampleBlock2D", "AttnDownBlock2D", "DownBlock2D"]
    paper = paper_ldm_unet_config()
    assert paper["_class_name"] == "UNet2DModel" and paper["in_channels"] == 4 and paper["attn_norm_num_groups"] == 32
    assert paper["block_out_channels"] == [192, 384, 384, 768, 768]
    assert paper["up_block_types"] == ["ResnetUpsampleBlock2D"] + ["AttnUpBlock2D"] * 4
    assert paper["down_block_types"] == ["AttnDownBlock2D"] * 4 + ["DownBlock2D"]


# -- loading a single LDM file ----------------------------------------------------------------------


@pytest.mark.parametrize("which", ["unconditional", "class-conditional"])
def test_ldm_checkpoint_loads_to_an_identical_unet2d(which, churches, inputs):
    reference = churches["unet"] if which == "unconditional" else churches["cin"]
    path = churches["ckpt"] if which == "unconditional" else churches["cin_ckpt"]
    config = {"_class_name": "UNet2DModel", **PAPER_LIKE_UNET}
    if which == "class-conditional":
        config["num_class_embeds"] = 3
    unet = load_unet(path, config=config)
    assert isinstance(unet, UNet2DModel)
    assert list(unet.config.up_block_types) == CHURCHES_LIKE_UNET["up_block_types"]
    assert {m.heads for m in unet.modules() if hasattr(m, "heads")} == {HEADS}
    assert_same_state(unet, reference)
    kwargs = {"class_labels": inputs["y"]} if which == "class-conditional" else {}
    with torch.no_grad():
        out = unet(inputs["z"], inputs["t"], **kwargs).sample
        expected = reference(inputs["z"], inputs["t"], **kwargs).sample
    assert torch.equal(out, expected)


def test_ldm_checkpoint_errors_name_the_file_and_the_fix(churches, tmp_path):
    path = churches["ckpt"]
    # No config: the Stable Diffusion default does not fit an AttentionBlock UNet.
    assert "load it with a UNet2DModel config" in raises_one_line(path, load_unet, path)
    # Conv upsamplers asked for, ResBlock upsamplers in the file.
    config = {"_class_name": "UNet2DModel", **PAPER_LIKE_UNET, "upsample_type": "conv"}
    message = raises_one_line(path, load_unet, path, config=config)
    assert "output_blocks.2.1 is a ResBlock with up=True" in message and "ResnetUpsampleBlock2D" in message
    # One res block per level in the config, two in the file.
    config = {"_class_name": "UNet2DModel", **PAPER_LIKE_UNET, "layers_per_block": 1}
    assert "have no place in a UNet2DModel of this config" in raises_one_line(path, load_unet, path, config=config)
    # Heads that do not divide the width.
    config = {"_class_name": "UNet2DModel", **PAPER_LIKE_UNET}
    assert "not 3 x a multiple of 5 heads" in raises_one_line(path, load_unet, path, config=config, attention_heads=5)


# -- the paper preset from the churches checkpoint -------------------------------------------------


@pytest.mark.parametrize("organs", [ORGANS, ["liver"]], ids=["3-organs", "1-organ"])
def test_paper_model_from_ldm_checkpoint_starts_as_the_pretrained_unet(organs, churches, inputs):
    model = sdseg_from_pretrained_parts(
        "paper", autoencoder=churches["klf8"], autoencoder_config=VAE_CONFIG, unet=churches["ckpt"],
        unet_config={"_class_name": "UNet2DModel", **PAPER_LIKE_UNET}, organs=organs,
    ).eval()
    check_zero_init(model, churches, organs, inputs)


def test_paper_preset_reads_a_single_unet_file_as_the_churches_layout(churches, inputs, monkeypatch):
    """Without unet_config, a single file is read with PAPER_UNET's layout at 4 input channels (here a
    toy stands in for PAPER_UNET; the real one is checked by test_ldm_layout_config_of_a_paper_style_config)."""
    import sdseg_monai.weights as weights

    monkeypatch.setattr(weights, "PAPER_UNET", {**PAPER_LIKE_UNET, "in_channels": 8})
    model = sdseg_from_pretrained_parts(
        "paper", autoencoder=churches["klf8"], autoencoder_config=VAE_CONFIG, unet=churches["ckpt"], organs=ORGANS
    ).eval()
    check_zero_init(model, churches, ORGANS, inputs)


def check_zero_init(model, churches, organs, inputs):
    pretrained = churches["unet"]
    assert model.config.attention_heads == HEADS and isinstance(model.unet, UNet2DModel)
    assert model.config.unet["up_block_types"] == CHURCHES_LIKE_UNET["up_block_types"]
    assert {m.heads for m in model.unet.modules() if hasattr(m, "heads")} == {HEADS}
    weight, old = model.unet.conv_in.weight, pretrained.conv_in.weight
    assert weight.shape == (32, 8, 3, 3) and torch.equal(weight[:, :4], old)
    assert torch.count_nonzero(weight[:, 4:]) == 0
    state = model.unet.state_dict()
    if len(organs) > 1:
        assert torch.count_nonzero(state["class_embedding.weight"]) == 0
    else:
        assert "class_embedding.weight" not in state
    z, t = inputs["z"], inputs["t"]
    with torch.no_grad():
        expected = pretrained(z, t).sample
        for seed in (0, 1):
            g = torch.Generator().manual_seed(seed)
            cond = torch.randn(z.shape, generator=g) * 3
            class_ids = torch.randint(0, len(organs), (z.shape[0],), generator=g) if len(organs) > 1 else None
            out = model.denoise(z, cond, t, class_ids)
            assert torch.allclose(out, expected, atol=1e-5), (out - expected).abs().max()
