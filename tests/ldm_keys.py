"""Test helper: diffusers state dicts -> original LDM / Stable Diffusion v1 key layout.

Real single-file checkpoints (``v1-5-pruned.safetensors``, kl-f8 ``model.ckpt``) use CompVis key names.
Tests write tiny files in that layout so that the single-file loaders run on the same key names they
meet in the wild; ``tests/test_weights.py`` checks these functions against diffusers' own inverse
converters (``convert_ldm_vae_checkpoint`` / ``convert_ldm_unet_checkpoint``), and
``tests/test_weights_ldm_unet.py`` checks :func:`unet2d_to_ldm_openai` against
``sdseg_monai.weights.convert_ldm_openai_unet_checkpoint`` and a reimplementation of LDM's attention.
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


def unet2d_to_ldm_openai(
    state: dict[str, torch.Tensor],
    heads: int,
    prefix: str = LDM_UNET_PREFIX,
    new_attention_order: bool = False,
) -> dict[str, torch.Tensor]:
    """A ``UNet2DModel`` state dict in the LDM ``openaimodel.UNetModel`` layout without spatial
    transformers (the LSUN-churches UNet the SDSeg paper starts from).

    Attention blocks become ``AttentionBlock``s: ``norm``, ``qkv`` (one kernel-1 conv1d C -> 3C, its
    channels laid out head by head ``[q_h, k_h, v_h]`` as ``QKVAttentionLegacy`` reads them, or
    ``[q, k, v]`` with ``new_attention_order``) and ``proj_out`` (kernel-1 conv1d). A ResNet sampler
    (``downsample_type``/``upsample_type`` ``"resnet"``) becomes a ResBlock with down/up (``resblock_updown``)
    numbered like any other input/output block; an up block's sampler is its last module
    (``output_blocks.N.2`` after an attention block, ``.1`` otherwise); a conv sampler becomes
    ``input_blocks.N.0.op`` / ``output_blocks.N.{1,2}.conv``.
    """
    maps: dict[str, tuple[str, dict[str, str]]] = {
        "time_embedding.linear_1": ("time_embed.0", {}),
        "time_embedding.linear_2": ("time_embed.2", {}),
        "class_embedding": ("label_emb", {}),
        "conv_in": ("input_blocks.0.0", {}),
        "mid_block.resnets.0": ("middle_block.0", _UNET_RESNET),
        "mid_block.resnets.1": ("middle_block.2", _UNET_RESNET),
        "conv_norm_out": ("out.0", {}),
        "conv_out": ("out.2", {}),
    }
    attentions = {"mid_block.attentions.0": "middle_block.1"}

    def sampler(diffusers_prefix: str, ldm: str, conv_name: str) -> bool:
        if f"{diffusers_prefix}.conv1.weight" in state:  # ResnetBlock2D with down / up
            maps[diffusers_prefix] = (ldm, _UNET_RESNET)
        elif f"{diffusers_prefix}.conv.weight" in state:
            maps[f"{diffusers_prefix}.conv"] = (f"{ldm}.{conv_name}", {})
        else:
            return False
        return True

    n = 1
    for i in _indices(state, r"down_blocks\.(\d+)\."):
        for j in _indices(state, rf"down_blocks\.{i}\.resnets\.(\d+)\."):
            maps[f"down_blocks.{i}.resnets.{j}"] = (f"input_blocks.{n}.0", _UNET_RESNET)
            if f"down_blocks.{i}.attentions.{j}.to_q.weight" in state:
                attentions[f"down_blocks.{i}.attentions.{j}"] = f"input_blocks.{n}.1"
            n += 1
        if sampler(f"down_blocks.{i}.downsamplers.0", f"input_blocks.{n}.0", "op"):
            n += 1
    n = 0
    for i in _indices(state, r"up_blocks\.(\d+)\."):
        has_attention = False
        for j in _indices(state, rf"up_blocks\.{i}\.resnets\.(\d+)\."):
            maps[f"up_blocks.{i}.resnets.{j}"] = (f"output_blocks.{n}.0", _UNET_RESNET)
            if f"up_blocks.{i}.attentions.{j}.to_q.weight" in state:
                attentions[f"up_blocks.{i}.attentions.{j}"] = f"output_blocks.{n}.1"
                has_attention = True
            n += 1
        sampler(f"up_blocks.{i}.upsamplers.0", f"output_blocks.{n - 1}.{2 if has_attention else 1}", "conv")

    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        attention = next((a for a in attentions if key.startswith(a + ".")), None)
        if attention is None:
            new = _rename(key, maps)
            if new == key:
                raise KeyError(f"no LDM place for {key}")
            out[prefix + new] = value
            continue
        name, _, param = key[len(attention) + 1 :].rpartition(".")
        ldm = prefix + attentions[attention]
        if name == "group_norm":
            out[f"{ldm}.norm.{param}"] = value
        elif name == "to_out.0":
            out[f"{ldm}.proj_out.{param}"] = value[..., None] if value.ndim == 2 else value
        elif name not in ("to_q", "to_k", "to_v"):
            raise KeyError(f"no LDM place for {key}")
    for attention, ldm in attentions.items():
        for param in ("weight", "bias"):
            q, k, v = (state[f"{attention}.{name}.{param}"] for name in ("to_q", "to_k", "to_v"))
            width = q.shape[0]
            per_head = [t.reshape(heads, width // heads, *t.shape[1:]) for t in (q, k, v)]
            qkv = torch.stack(per_head, dim=0 if new_attention_order else 1).reshape(3 * width, *q.shape[1:])
            out[f"{prefix}{ldm}.qkv.{param}"] = qkv[..., None] if param == "weight" else qkv
    return out
