"""Test helper: diffusers state dicts -> original LDM / Stable Diffusion v1 key layout.

Real single-file checkpoints (``v1-5-pruned.safetensors``, kl-f8 ``model.ckpt``) use CompVis key names.
Tests write tiny files in that layout so that the single-file loaders run on the same key names they
meet in the wild; ``tests/test_weights.py`` checks these functions against diffusers' own inverse
converters (``convert_ldm_vae_checkpoint`` / ``convert_ldm_unet_checkpoint``).
"""

from __future__ import annotations

import re

import torch

LDM_UNET_PREFIX = "model.diffusion_model."
LDM_VAE_PREFIX = "first_stage_model."

# diffusers -> LDM module renames inside one block, applied to the remainder of a key.
_VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}


def _indices(state: dict, pattern: str) -> list[int]:
    """Sorted distinct integers captured by ``pattern`` (one group) at the start of the keys."""
    return sorted({int(m.group(1)) for k in state if (m := re.match(pattern, k))})


def _rename(key: str, prefixes: dict[str, tuple[str, dict[str, str]]]) -> str:
    """Map the longest matching module prefix of ``key``, then rename the first inner module."""
    for old in sorted(prefixes, key=len, reverse=True):
        if key == old or key.startswith(old + "."):
            new, inner = prefixes[old]
            rest = key[len(old) + 1 :]
            for a, b in inner.items():
                if rest.startswith(a + "."):
                    rest = b + rest[len(a) :]
                    break
            return f"{new}.{rest}" if rest else new
    return key


def vae_to_ldm(state: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """An ``AutoencoderKL`` state dict in LDM keys (``prefix="first_stage_model."`` inside an SD file).

    Decoder up blocks are numbered in reverse (diffusers' ``up_blocks.0`` is LDM's ``up.{n-1}``) and
    the mid attention's linear projections become 1x1 conv weights, as in the original checkpoints.
    """
    maps: dict[str, tuple[str, dict[str, str]]] = {}
    for part in ("encoder", "decoder"):
        maps[f"{part}.conv_norm_out"] = (f"{part}.norm_out", {})
        maps[f"{part}.mid_block.attentions.0"] = (f"{part}.mid.attn_1", _VAE_ATTENTION)
        for j in (0, 1):
            maps[f"{part}.mid_block.resnets.{j}"] = (f"{part}.mid.block_{j + 1}", _VAE_RESNET)
    for i in _indices(state, r"encoder\.down_blocks\.(\d+)\."):
        for j in _indices(state, rf"encoder\.down_blocks\.{i}\.resnets\.(\d+)\."):
            maps[f"encoder.down_blocks.{i}.resnets.{j}"] = (f"encoder.down.{i}.block.{j}", _VAE_RESNET)
        maps[f"encoder.down_blocks.{i}.downsamplers.0"] = (f"encoder.down.{i}.downsample", {})
    ups = _indices(state, r"decoder\.up_blocks\.(\d+)\.")
    for i in ups:
        ldm = len(ups) - 1 - i
        for j in _indices(state, rf"decoder\.up_blocks\.{i}\.resnets\.(\d+)\."):
            maps[f"decoder.up_blocks.{i}.resnets.{j}"] = (f"decoder.up.{ldm}.block.{j}", _VAE_RESNET)
        maps[f"decoder.up_blocks.{i}.upsamplers.0"] = (f"decoder.up.{ldm}.upsample", {})
    out = {}
    for key, value in state.items():
        new = _rename(key, maps)
        if ".mid.attn_1." in new and new.endswith(".weight") and value.ndim == 2:
            value = value[:, :, None, None]  # LDM's AttnBlock uses 1x1 convs for q, k, v, proj_out
        out[prefix + new] = value
    return out


def unet_to_ldm(state: dict[str, torch.Tensor], prefix: str = LDM_UNET_PREFIX) -> dict[str, torch.Tensor]:
    """A ``UNet2DConditionModel`` state dict in the LDM ``openaimodel.UNetModel`` layout.

    ``input_blocks`` / ``output_blocks`` number resnet(+transformer) layers and samplers
    sequentially; an up block's upsampler sits at ``.1.conv`` after a plain resnet and ``.2.conv``
    after a resnet + transformer.
    """
    maps: dict[str, tuple[str, dict[str, str]]] = {
        "time_embedding.linear_1": ("time_embed.0", {}),
        "time_embedding.linear_2": ("time_embed.2", {}),
        "class_embedding": ("label_emb", {}),
        "conv_in": ("input_blocks.0.0", {}),
        "mid_block.resnets.0": ("middle_block.0", _UNET_RESNET),
        "mid_block.attentions.0": ("middle_block.1", {}),
        "mid_block.resnets.1": ("middle_block.2", _UNET_RESNET),
        "conv_norm_out": ("out.0", {}),
        "conv_out": ("out.2", {}),
    }
    n = 1
    for i in _indices(state, r"down_blocks\.(\d+)\."):
        for j in _indices(state, rf"down_blocks\.{i}\.resnets\.(\d+)\."):
            maps[f"down_blocks.{i}.resnets.{j}"] = (f"input_blocks.{n}.0", _UNET_RESNET)
            maps[f"down_blocks.{i}.attentions.{j}"] = (f"input_blocks.{n}.1", {})
            n += 1
        if f"down_blocks.{i}.downsamplers.0.conv.weight" in state:
            maps[f"down_blocks.{i}.downsamplers.0.conv"] = (f"input_blocks.{n}.0.op", {})
            n += 1
    n = 0
    for i in _indices(state, r"up_blocks\.(\d+)\."):
        layers = _indices(state, rf"up_blocks\.{i}\.resnets\.(\d+)\.")
        for j in layers:
            maps[f"up_blocks.{i}.resnets.{j}"] = (f"output_blocks.{n}.0", _UNET_RESNET)
            maps[f"up_blocks.{i}.attentions.{j}"] = (f"output_blocks.{n}.1", {})
            n += 1
        has_attention = any(k.startswith(f"up_blocks.{i}.attentions.") for k in state)
        maps[f"up_blocks.{i}.upsamplers.0.conv"] = (f"output_blocks.{n - 1}.{2 if has_attention else 1}.conv", {})
    return {prefix + _rename(key, maps): value for key, value in state.items()}
