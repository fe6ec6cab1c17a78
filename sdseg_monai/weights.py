"""Loading real weights offline: diffusers folders, single-file LDM / Stable Diffusion checkpoints,
and assembling an SDSeg model from pretrained parts.

Every loader reads local files only (``HF_HUB_OFFLINE=1``), unpickles nothing but tensors
(``weights_only``), and reports a missing file or a shape mismatch in one line naming the file.
"""

from __future__ import annotations

import copy
import json
import os
import pickle
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from sdseg_monai import _offline  # noqa: F401  (before diffusers)
from sdseg_monai.config import PAPER_UNET, SD_V1_AUTOENCODER, SD_V1_UNET, SDSegConfig, model_preset
from sdseg_monai.errors import SDSegInputError, WeightsError

WEIGHT_FILE_NAMES = (
    "diffusion_pytorch_model.safetensors",
    "model.safetensors",
    "diffusion_pytorch_model.bin",
    "pytorch_model.bin",
)
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
LDM_UNET_PREFIX = "model.diffusion_model."
LDM_VAE_PREFIXES = ("first_stage_model.", "vae.")
# Heads of every AttentionBlock of the LDM LSUN-churches UNet (num_heads=8), which the SDSeg paper starts from.
LDM_ATTENTION_HEADS = 8

PathLike = str | os.PathLike


class _Inert:
    """Stands in for a pickled training object (a Lightning callback) whose state is not needed:
    built and given its state without running any of its code."""

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass


# Packages whose pickled objects official checkpoints carry besides tensors: sd-v1-*.ckpt and the LDM
# model.ckpt files hold a ModelCheckpoint callback (with numpy scalars in its state).
_INERT_PACKAGES = ("pytorch_lightning", "lightning", "lightning_fabric")


def _numpy_globals() -> dict[str, Any]:
    """What a training callback's state pickles besides plain data: numpy scalars (their dtype and
    the codec that encodes their bytes), by the names pickles give them."""
    import codecs
    import importlib

    import numpy as np

    allowed: dict[str, Any] = {"numpy.dtype": np.dtype, "_codecs.encode": codecs.encode}
    for module in ("numpy._core.multiarray", "numpy.core.multiarray"):  # numpy 2, numpy 1
        try:
            allowed[f"{module}.scalar"] = importlib.import_module(module).scalar
        except (ImportError, AttributeError):
            continue
    for kind in (np.float64, np.float32, np.float16, np.int64, np.int32, np.int16, np.int8, np.uint8, np.bool_):
        dtype_class = type(np.dtype(kind))  # a dtype's state is set on its class (numpy.dtypes.Float64DType...)
        allowed[f"{dtype_class.__module__}.{dtype_class.__qualname__}"] = dtype_class
    return allowed


def _load_checkpoint(path: Path) -> Any:
    """A torch checkpoint, always through torch's ``weights_only`` unpickler. One that also pickles a
    Lightning training callback (official SD v1.x and LDM checkpoints) is loaded again with those
    classes standing as :class:`_Inert` and numpy scalars allowed (torch >= 2.6); any other global is refused."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # safe_globals takes (object, name) pairs from torch 2.6; older torch refuses these files as before.
        if tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2]) < (2, 6):
            raise
    numpy_globals = _numpy_globals()
    names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))  # every one, whatever the order
    if not any(name.split(".")[0] in _INERT_PACKAGES for name in names):
        raise pickle.UnpicklingError(f"Unsupported global: {names[0] if names else 'unknown'} (weights_only)")
    extra = [(found, name) for name, found in numpy_globals.items()]  # dtypes' classes too (BUILD sets their state)
    for name in names:
        if name.split(".")[0] in _INERT_PACKAGES:
            extra.append((_Inert, name))
        elif name not in numpy_globals:
            raise pickle.UnpicklingError(f"Unsupported global: {name} (weights_only)")
    with torch.serialization.safe_globals(extra):
        return torch.load(path, map_location="cpu", weights_only=True)


def read_state_dict(path: PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file, or of a torch checkpoint (``.ckpt``, ``.pt``, ``.bin``).

    A checkpoint is read with torch's ``weights_only`` unpickler; official Lightning checkpoints (SD
    v1.x, LDM), which also pickle a training callback, with that callback standing as an inert object
    and numpy scalars allowed (:func:`_load_checkpoint`): no pickled code runs, and nothing else is
    accepted. A ``{"state_dict": ...}`` wrapper is unwrapped.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError("no such weights file", path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: Any = load_file(str(path), device="cpu")
        else:
            state = _load_checkpoint(path)
    except Exception as e:  # noqa: BLE001  (any reader failure is a bad-file message; Ctrl-C, SIGTERM, exit are no Exception)
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            reason = "holds pickled objects besides tensors and training data; refused. Convert it to .safetensors"
        raise WeightsError(f"cannot read weights: {reason}", path) from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)} if isinstance(state, dict) else {}
    if not tensors:
        raise WeightsError("holds no state dict of tensors", path)
    return tensors


def read_config(path: PathLike) -> dict[str, Any]:
    """A diffusers ``config.json`` (a file, or a folder holding one)."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise WeightsError("no such config file", path) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise WeightsError(f"not a readable JSON config ({e})", path) from None
    if not isinstance(data, dict):
        raise WeightsError("config must be a JSON object", path)
    return data


def component_folder(source: PathLike, subfolder: str) -> Path | None:
    """The diffusers component folder for ``source``: ``source/subfolder`` (a pipeline folder) or
    ``source`` itself (a component folder). None when ``source`` is a single file."""
    source = Path(source)
    if source.is_file():
        return None
    if not source.exists():
        raise WeightsError("no such file or folder", source)
    for folder in (source / subfolder, source):
        if (folder / "config.json").is_file():
            return folder
    raise WeightsError(f"neither {subfolder}/config.json nor config.json found in this folder", source)


def weights_file(folder: Path) -> Path:
    for name in WEIGHT_FILE_NAMES:
        if (folder / name).is_file():
            return folder / name
    raise WeightsError(f"no weights file ({' or '.join(WEIGHT_FILE_NAMES[:2])}) in this folder", folder)


def load_state_into(module: nn.Module, state: dict[str, torch.Tensor], source: PathLike, what: str = "model") -> None:
    """Strictly load ``state`` into ``module``; any missing, unexpected or misshapen tensor is an error."""
    own = module.state_dict()
    state = {k: v for k, v in state.items() if v is not None}
    for key in sorted(own.keys() & state.keys()):
        if own[key].shape != state[key].shape:
            raise WeightsError(
                f"weights do not fit the {what}: {key} has shape {tuple(state[key].shape)} in the file, "
                f"{tuple(own[key].shape)} in the model",
                source,
            )
    for key in own.keys() & state.keys():
        if own[key].is_floating_point() != state[key].is_floating_point():
            raise WeightsError(f"weights do not fit the {what}: {key} has dtype {state[key].dtype} in the file", source)
    missing = sorted(own.keys() - state.keys())
    unexpected = sorted(state.keys() - own.keys())
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} tensors missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        raise WeightsError(f"weights do not fit the {what}: {'; '.join(parts)}", source)
    module.load_state_dict(state, strict=True)


def _config_arg(config: dict | PathLike | None, default: dict[str, Any]) -> dict[str, Any]:
    if config is None:
        return dict(default)
    if isinstance(config, dict):
        return dict(config)
    return read_config(config)


def _autoencoder_state(raw: dict[str, torch.Tensor], config: dict[str, Any], source: PathLike | None = None) -> dict[str, torch.Tensor]:
    """diffusers keys for an autoencoder state in LDM keys (bare kl-f8, or inside a full SD file)."""
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    if any(k.startswith(p) for k in raw for p in LDM_VAE_PREFIXES) or "encoder.down.0.block.0.conv1.weight" in raw:
        return _convert(convert_ldm_vae_checkpoint, raw, config, source)
    return raw  # already diffusers keys


def _unet_state(
    raw: dict[str, torch.Tensor], config: dict[str, Any], source: PathLike, attention_heads: int = LDM_ATTENTION_HEADS
) -> dict[str, torch.Tensor]:
    """diffusers keys for a UNet state in LDM keys: a Stable Diffusion UNet (spatial transformers) for a
    ``UNet2DConditionModel``, an LDM ``openaimodel.UNetModel`` with ``AttentionBlock``s (e.g. LSUN-churches)
    for a ``UNet2DModel``. A state already in diffusers keys is returned as it is."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    if not any(k.startswith(LDM_UNET_PREFIX) for k in raw):
        return raw
    class_name = config.get("_class_name", "UNet2DConditionModel")
    _check_ldm_unet_class(raw, class_name, source)
    if class_name == "UNet2DModel":

        def convert(state, cfg):
            return convert_ldm_openai_unet_checkpoint(state, cfg, heads=attention_heads)

        return _convert(convert, raw, config, source)
    return _convert(convert_ldm_unet_checkpoint, raw, config, source)


def _check_ldm_unet_class(raw: dict[str, torch.Tensor], class_name: str, source: PathLike) -> None:
    """An LDM-key UNet must go to the diffusers class of its attention layers (checked before a
    possibly multi-GB model is built for it)."""
    layout = _ldm_unet_layout(raw)
    if class_name == "UNet2DModel" and layout == "spatial-transformer":
        raise WeightsError(
            "this LDM checkpoint's attention layers are spatial transformers: Stable Diffusion UNets only "
            "load as a UNet2DConditionModel, not as the UNet2DModel the config asks for",
            source,
        )
    if class_name != "UNet2DModel" and layout == "attention-block":
        raise WeightsError(
            "this LDM checkpoint's attention layers are AttentionBlocks without cross-attention (e.g. "
            "LSUN-churches): load it with a UNet2DModel config ('_class_name': 'UNet2DModel'), not as a "
            "UNet2DConditionModel",
            source,
        )


def _ldm_unet_layout(raw: dict[str, torch.Tensor]) -> str | None:
    """``"spatial-transformer"`` (Stable Diffusion), ``"attention-block"`` (LDM/ADM ``AttentionBlock``,
    ``qkv`` conv) or None (no attention found) for the UNet of an LDM-key state."""
    unet = [k[len(LDM_UNET_PREFIX) :] for k in raw if k.startswith(LDM_UNET_PREFIX)]
    if any(".transformer_blocks." in k or ".proj_in." in k for k in unet):
        return "spatial-transformer"
    if any(k.endswith(".qkv.weight") for k in unet):
        return "attention-block"
    return None


# LDM openaimodel module names -> diffusers, inside one ResBlock / AttentionBlock.
_LDM_RESNET_NAMES = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}
_LDM_ATTENTION_NAMES = {"norm": "group_norm", "proj_out": "to_out.0"}
# diffusers UNet2DModel blocks the LDM layout maps to: (has attention, how it samples; None: the config's
# downsample_type / upsample_type).
_DOWN_BLOCKS = {
    "DownBlock2D": (False, "conv"),
    "AttnDownBlock2D": (True, None),
    "ResnetDownsampleBlock2D": (False, "resnet"),
}
_UP_BLOCKS = {
    "UpBlock2D": (False, "conv"),
    "AttnUpBlock2D": (True, None),
    "ResnetUpsampleBlock2D": (False, "resnet"),
}


def _unet2d_config(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` over ``UNet2DModel``'s defaults (a partial config means what diffusers makes of it)."""
    import inspect

    from diffusers import UNet2DModel

    defaults = {
        name: p.default
        for name, p in inspect.signature(UNet2DModel.__init__).parameters.items()
        if p.default is not inspect.Parameter.empty
    }
    return {**defaults, **dict(config)}


def ldm_openai_unet2d_config(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` (a ``UNet2DModel`` config) made to hold an LDM ``openaimodel.UNetModel`` checkpoint.

    Two diffusers defaults differ from the LDM layout, whatever ``config`` says otherwise:

    * ``DownBlock2D`` / ``UpBlock2D`` always sample with a conv, ignoring ``downsample_type`` /
      ``upsample_type``. With those ``"resnet"`` (LDM ``resblock_updown=True``, as in LSUN-churches
      and the SDSeg paper), such blocks (but the last, which does not sample) become
      ``ResnetDownsampleBlock2D`` / ``ResnetUpsampleBlock2D``, which sample with a ResBlock like the
      attention blocks do.
    * The mid-block attention has no GroupNorm unless ``resnet_time_scale_shift`` is ``"default"``;
      LDM's ``AttentionBlock`` always normalises, so ``attn_norm_num_groups`` is set to
      ``norm_num_groups`` when not given.
    """
    config = dict(config)
    full = _unet2d_config(config)
    plain_blocks = (("down", "DownBlock2D", "ResnetDownsampleBlock2D"), ("up", "UpBlock2D", "ResnetUpsampleBlock2D"))
    for kind, plain, resnet in plain_blocks:
        types = list(full[f"{kind}_block_types"])
        if full[f"{kind}sample_type"] == "resnet" and plain in types[:-1]:  # the last block does not sample
            config[f"{kind}_block_types"] = [resnet if t == plain else t for t in types[:-1]] + types[-1:]
    if full["add_attention"] and full["attn_norm_num_groups"] is None and full["resnet_time_scale_shift"] != "default":
        config["attn_norm_num_groups"] = full["norm_num_groups"]
    return config


def _split_qkv(tensor: torch.Tensor, heads: int, new_attention_order: bool) -> list[torch.Tensor]:
    """q, k, v (each C rows) of an LDM ``AttentionBlock.qkv`` weight (3C, C, 1) or bias (3C,).

    ``QKVAttentionLegacy`` (LDM's default) reads the 3C channels head by head, ``[q_h, k_h, v_h]`` for
    each head h; ``QKVAttention`` (``use_new_attention_order``) reads ``[q, k, v]``, each head by head.
    """
    if tensor.ndim == 3:
        if tensor.shape[-1] != 1:
            raise ValueError(f"qkv weight of shape {tuple(tensor.shape)} is not a kernel-1 conv1d")
        tensor = tensor[..., 0]
    width = tensor.shape[0]
    if width % (3 * heads):
        raise ValueError(f"qkv width {width} is not 3 x a multiple of {heads} heads")
    channels, rest = width // 3, tensor.shape[1:]
    if new_attention_order:
        parts = tensor.reshape(3, heads, channels // heads, *rest)
    else:
        parts = tensor.reshape(heads, 3, channels // heads, *rest).transpose(0, 1)
    return [p.reshape(channels, *rest).contiguous() for p in parts]


def convert_ldm_openai_unet_checkpoint(
    state: dict[str, torch.Tensor],
    config: dict[str, Any],
    heads: int = LDM_ATTENTION_HEADS,
    *,
    new_attention_order: bool = False,
) -> dict[str, torch.Tensor]:
    """diffusers ``UNet2DModel`` keys for the UNet of an LDM checkpoint in the ``openaimodel.UNetModel``
    layout without spatial transformers: ``AttentionBlock``s (``norm``, ``qkv``, ``proj_out``), e.g. the
    LDM LSUN-churches UNet the official SDSeg code starts from; a class-conditional one's ``label_emb``
    becomes ``class_embedding``.

    Args:
        state: LDM keys, under ``model.diffusion_model.`` (a whole LDM checkpoint: other tensors are
            ignored) or bare.
        config: the ``UNet2DModel`` config (missing keys take diffusers' defaults). Its block types say
            where the attention blocks are (``Attn*Block2D``) and how each level samples: conv
            ``Downsample``/``Upsample`` (``op`` / ``conv``) or ResBlocks with ``down``/``up``
            (``resblock_updown=True``: ``AttnDownBlock2D``/``AttnUpBlock2D`` with
            ``downsample_type``/``upsample_type`` ``"resnet"``, ``ResnetDownsampleBlock2D``/
            ``ResnetUpsampleBlock2D``).
        heads: attention heads of every ``AttentionBlock`` (LDM ``num_heads``). Checkpoints made with
            ``num_head_channels`` have as many heads as width / head channels, which differs between
            levels of different width: not supported. The diffusers model must run with ``heads``
            heads everywhere (:func:`sdseg_monai.model.set_attention_heads`).
        new_attention_order: the checkpoint was trained with ``use_new_attention_order=True``
            (``QKVAttention``) rather than LDM's default ``QKVAttentionLegacy``.

    Raises:
        ValueError: the checkpoint does not have the layout the config describes (a tensor left over,
            a sampler of the other kind, a spatial transformer).
    """
    cfg = _unet2d_config(config)
    if cfg["time_embedding_type"] != "positional":
        raise ValueError(f"time_embedding_type {cfg['time_embedding_type']!r}: LDM UNets use 'positional'")
    if any(k.startswith(LDM_UNET_PREFIX) for k in state):
        state = {k[len(LDM_UNET_PREFIX) :]: v for k, v in state.items() if k.startswith(LDM_UNET_PREFIX)}
    if any(".transformer_blocks." in k or ".proj_in." in k for k in state):
        raise ValueError("this UNet has spatial transformers (Stable Diffusion): use convert_ldm_unet_checkpoint")
    layers = int(cfg["layers_per_block"])
    down_types, up_types = list(cfg["down_block_types"]), list(cfg["up_block_types"])
    for kind, block_types, known in (("down", down_types, _DOWN_BLOCKS), ("up", up_types, _UP_BLOCKS)):
        for t in block_types:
            if t not in known:
                raise ValueError(f"{kind} block type {t!r} has no LDM counterpart here; use {', '.join(known)}")

    def sampler(kind: str, ldm: str, diffusers_prefix: str, sampling: str, block: int, block_type: str) -> None:
        """Map the LDM sampler module ``ldm`` (a ResBlock, or the module holding ``op``/``conv``)."""
        conv_name = "op" if kind == "down" else "conv"
        in_ckpt = None
        if f"{ldm}.in_layers.0.weight" in state:
            in_ckpt = "resnet"
        elif f"{ldm}.{conv_name}.weight" in state:
            in_ckpt = "conv"
        if in_ckpt is not None and in_ckpt != sampling:
            what = {"resnet": f"a ResBlock with {kind}=True (resblock_updown)", "conv": f"a conv {kind}sampler"}
            hint = {
                "down": "ResnetDownsampleBlock2D or downsample_type 'resnet'",
                "up": "ResnetUpsampleBlock2D or upsample_type 'resnet'",
            }
            raise ValueError(
                f"the checkpoint's {ldm} is {what[in_ckpt]}, but {kind} block {block} ({block_type}) has "
                f"{what[sampling]}" + (f"; use {hint[kind]}" if in_ckpt == "resnet" else "")
            )
        if sampling == "resnet":
            modules[ldm] = (diffusers_prefix, "resnet")
        else:
            modules[f"{ldm}.{conv_name}"] = (f"{diffusers_prefix}.conv", "plain")

    # LDM module -> (diffusers module, kind of module)
    modules: dict[str, tuple[str, str]] = {
        "time_embed.0": ("time_embedding.linear_1", "plain"),
        "time_embed.2": ("time_embedding.linear_2", "plain"),
        "label_emb": ("class_embedding", "plain"),
        "input_blocks.0.0": ("conv_in", "plain"),
        "middle_block.0": ("mid_block.resnets.0", "resnet"),
        "middle_block.1": ("mid_block.attentions.0", "attention"),
        "middle_block.2": ("mid_block.resnets.1", "resnet"),
        "out.0": ("conv_norm_out", "plain"),
        "out.2": ("conv_out", "plain"),
    }
    n = 1
    for b, block_type in enumerate(down_types):
        attention, sampling = _DOWN_BLOCKS[block_type]
        for j in range(layers):
            modules[f"input_blocks.{n}.0"] = (f"down_blocks.{b}.resnets.{j}", "resnet")
            if attention:
                modules[f"input_blocks.{n}.1"] = (f"down_blocks.{b}.attentions.{j}", "attention")
            n += 1
        if b < len(down_types) - 1:
            sampling = sampling or cfg["downsample_type"]
            sampler("down", f"input_blocks.{n}.0", f"down_blocks.{b}.downsamplers.0", sampling, b, block_type)
            n += 1
    n = 0
    for b, block_type in enumerate(up_types):
        attention, sampling = _UP_BLOCKS[block_type]
        for j in range(layers + 1):
            modules[f"output_blocks.{n}.0"] = (f"up_blocks.{b}.resnets.{j}", "resnet")
            if attention:
                modules[f"output_blocks.{n}.1"] = (f"up_blocks.{b}.attentions.{j}", "attention")
            n += 1
        if b < len(up_types) - 1:
            ldm = f"output_blocks.{n - 1}.{2 if attention else 1}"
            sampler("up", ldm, f"up_blocks.{b}.upsamplers.0", sampling or cfg["upsample_type"], b, block_type)

    out: dict[str, torch.Tensor] = {}
    leftover: list[str] = []
    for key, value in state.items():
        parts = key.split(".")
        for cut in range(len(parts) - 1, 0, -1):
            module = ".".join(parts[:cut])
            if module in modules:
                break
        else:
            leftover.append(key)
            continue
        target, kind = modules[module]
        rest = ".".join(parts[cut:])
        if kind == "plain":
            out[f"{target}.{rest}"] = value
            continue
        inner, _, param = rest.rpartition(".")
        if kind == "attention" and inner == "qkv":
            for name, part in zip(("to_q", "to_k", "to_v"), _split_qkv(value, heads, new_attention_order)):
                out[f"{target}.{name}.{param}"] = part
            continue
        names = _LDM_RESNET_NAMES if kind == "resnet" else _LDM_ATTENTION_NAMES
        if inner not in names:
            leftover.append(key)
            continue
        if kind == "attention" and inner == "proj_out" and value.ndim == 3:
            value = value[..., 0]  # conv1d kernel 1 -> linear
        out[f"{target}.{names[inner]}.{param}"] = value
    if leftover:
        raise ValueError(
            f"{len(leftover)} tensors of the checkpoint have no place in a UNet2DModel of this config "
            f"(e.g. {sorted(leftover)[0]}): its levels, layers per level or attention blocks differ"
        )
    return out


def _convert(converter, raw: dict, config: dict, source: PathLike | None = None) -> dict[str, torch.Tensor]:
    """Run a diffusers key converter; its failures (a layout it does not expect) become WeightsError."""
    try:
        return converter(raw, config)
    except Exception as e:  # noqa: BLE001
        reason = " ".join(str(e).split()) or type(e).__name__
        raise WeightsError(f"cannot map this checkpoint's keys to the model ({type(e).__name__}: {reason})", source) from None


def load_autoencoder(source: PathLike, config: dict | PathLike | None = None, state: dict | None = None):
    """A diffusers ``AutoencoderKL`` from local weights.

    Args:
        source: a diffusers folder (a pipeline root with ``vae/``, or the ``vae`` folder itself), or a
            single ``.safetensors``/``.ckpt`` file in LDM keys (a kl-f8 first-stage model or a whole
            Stable Diffusion checkpoint).
        config: for single files: a config dict, ``config.json`` or folder. Default: SD v1's layout.
        state: an already-read state dict of ``source`` (saves reading a multi-GB file twice).
    """
    from diffusers import AutoencoderKL

    from sdseg_monai.model import preserved_rng

    folder = component_folder(source, "vae")
    if folder is not None:
        cfg = _config_arg(config, read_config(folder))
        origin = weights_file(folder)
        tensors = state if state is not None else read_state_dict(origin)
    else:
        cfg = _config_arg(config, SD_V1_AUTOENCODER)
        origin = Path(source)
        tensors = None
    try:
        with preserved_rng():  # random initial weights, overwritten below
            model = AutoencoderKL.from_config(cfg)
    except Exception as e:  # noqa: BLE001
        raise WeightsError(f"config does not describe an AutoencoderKL ({e})", folder or origin) from None
    if tensors is None:  # the converter reads keys a partial config may leave to diffusers' defaults
        tensors = _autoencoder_state(state if state is not None else read_state_dict(origin), {**model.config, **cfg}, origin)
    load_state_into(model, tensors, origin, what="autoencoder")
    return model.eval()


def load_unet(
    source: PathLike,
    config: dict | PathLike | None = None,
    state: dict | None = None,
    attention_heads: int = LDM_ATTENTION_HEADS,
):
    """A pretrained diffusers UNet (``UNet2DConditionModel`` or ``UNet2DModel``) from local weights.

    Args:
        source: a diffusers folder (pipeline root with ``unet/``, or the ``unet`` folder itself), or a
            single file in LDM keys: a Stable Diffusion checkpoint (``UNet2DConditionModel``), or an LDM
            ``openaimodel.UNetModel`` checkpoint such as LSUN-churches ``model.ckpt`` when ``config``
            says ``"_class_name": "UNet2DModel"``.
        config: for single files: config dict, ``config.json`` or folder. Default: SD v1's UNet. A
            ``UNet2DModel`` config for an LDM file is completed with :func:`ldm_openai_unet2d_config`.
        state: an already-read state dict of ``source``.
        attention_heads: heads of the AttentionBlocks of an LDM ``UNet2DModel`` file; the returned model
            uses that many heads in every attention layer, as the checkpoint does.
    """
    return _load_unet(source, config, state, attention_heads)[0]


def _load_unet(source: PathLike, config: dict | PathLike | None, state: dict | None, attention_heads: int):
    """:func:`load_unet`, and whether the UNet came from an LDM ``UNet2DModel`` file (whose heads
    ``attention_heads`` set in every layer, where a diffusers UNet has its own config's layout)."""
    from diffusers import UNet2DConditionModel, UNet2DModel

    from sdseg_monai.model import preserved_rng, set_attention_heads

    folder = component_folder(source, "unet")
    if folder is not None:
        cfg = _config_arg(config, read_config(folder))
        origin = weights_file(folder)
        tensors = state if state is not None else read_state_dict(origin)
    else:
        cfg = _config_arg(config, {"_class_name": "UNet2DConditionModel", **SD_V1_UNET})
        origin = Path(source)
        tensors = None
    cls = UNet2DModel if cfg.get("_class_name") == "UNet2DModel" else UNet2DConditionModel
    ldm_unet2d = False
    if tensors is None:
        raw = state if state is not None else read_state_dict(origin)
        if any(k.startswith(LDM_UNET_PREFIX) for k in raw):
            _check_ldm_unet_class(raw, cls.__name__, origin)
        ldm_unet2d = cls is UNet2DModel and any(k.startswith(LDM_UNET_PREFIX) for k in raw)
        if ldm_unet2d:
            cfg = ldm_openai_unet2d_config(cfg)
    try:
        with preserved_rng():  # random initial weights, overwritten below
            model = cls.from_config(cfg)
    except Exception as e:  # noqa: BLE001
        raise WeightsError(f"config does not describe a {cls.__name__} ({e})", folder or origin) from None
    if tensors is None:  # the converter reads keys a partial config may leave to diffusers' defaults
        tensors = _unet_state(raw, {**model.config, **cfg}, origin, attention_heads=attention_heads)
    load_state_into(model, tensors, origin, what="UNet")
    if ldm_unet2d:
        set_attention_heads(model, attention_heads)
    return model.eval(), ldm_unet2d


def widen_conv_in(state: dict[str, torch.Tensor], in_channels: int) -> dict[str, torch.Tensor]:
    """Pretrained conv_in weights on the first (noisy-latent) channels, zeros on the new image-latent
    channels, so the widened UNet starts out computing exactly what the pretrained one did."""
    state = dict(state)
    weight = state["conv_in.weight"]
    if weight.shape[1] < in_channels:
        extra = torch.zeros(weight.shape[0], in_channels - weight.shape[1], *weight.shape[2:], dtype=weight.dtype)
        state["conv_in.weight"] = torch.cat([weight, extra], dim=1)
    return state


def with_condition_channels(model, channels: int):
    """A copy of an SDSeg ``model`` whose image latent has ``channels`` channels, computing exactly
    what ``model`` does: the new vision-encoder channels enter the UNet through zero weights
    (:func:`widen_conv_in`), and training teaches the UNet to use them."""
    from sdseg_monai.model import SDSeg

    config = SDSegConfig.from_dict(model.config.to_dict())
    old_channels = config.condition_latent_channels
    if channels < old_channels:
        raise SDSegInputError(f"cannot narrow the image latent from {old_channels} to {channels} channels")
    config.condition_channels = int(channels)
    config.unet["in_channels"] = config.latent_channels + int(channels)
    config.validate()
    widened = SDSeg(config)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("vision_encoder.extra.")}
    state["unet.conv_in.weight"] = widen_conv_in({"conv_in.weight": state["unet.conv_in.weight"]}, config.unet["in_channels"])["conv_in.weight"]
    missing, unexpected = widened.load_state_dict(state, strict=False)
    if unexpected or any(not k.startswith("vision_encoder.extra.") for k in missing):
        raise WeightsError(f"widening left parameters unset or unused: {sorted(missing + unexpected)}")
    old_extra, new_extra = model.vision_encoder.extra, widened.vision_encoder.extra
    if old_extra is not None:  # keep the extra channels it had; the new ones start at random
        with torch.no_grad():
            new_extra.weight[: old_extra.out_channels] = old_extra.weight
            new_extra.bias[: old_extra.out_channels] = old_extra.bias
    return widened.to(model.device)


def with_training_changes(
    model, mask_loss_weight: float | None = None, condition_channels: int | None = None, slice_size: int | None = None
):
    """``model`` prepared for (further) training: a new decoded-mask loss weight, a wider image
    latent (:func:`with_condition_channels`) and/or another slice size (the networks are
    convolutional: 256² slices give 32x32 latents, four times the room for small organs); None
    leaves that part as it is. Changes ``model``'s config in place; returns ``model``, or its
    widened copy."""
    if mask_loss_weight is not None:
        model.config.mask_loss_weight = float(mask_loss_weight)
        model.config.validate()
    if slice_size is not None:
        model.config.check_slice_size(slice_size)
        factor = model.config.downsample_factor
        model.config.preprocessing.slice_size = int(slice_size)
        model.config.unet["sample_size"] = int(slice_size) // factor
        model.config.autoencoder["sample_size"] = int(slice_size)
    if condition_channels is not None:
        model = with_condition_channels(model, condition_channels)
    if (mask_loss_weight, condition_channels, slice_size) != (None, None, None):
        model.name_or_path = None  # no longer what its folder holds: sidecars must not name it
    return model


def paper_ldm_unet_config() -> dict[str, Any]:
    """The ``UNet2DModel`` config of the LDM LSUN-churches UNet (``models/ldm/lsun_churches256/model.ckpt``):
    the paper preset's UNet with 4 input channels, completed by :func:`ldm_openai_unet2d_config`."""
    return ldm_openai_unet2d_config({"_class_name": "UNet2DModel", **copy.deepcopy(PAPER_UNET), "in_channels": 4})


def check_sd_v1_folder(folder: PathLike) -> None:
    """Refuse a diffusers pipeline folder whose scheduler predicts something else than the noise
    (Stable Diffusion 2.x "v" models): its UNet would load into the sd-v1 preset, which reads every
    output as the noise, and segment nonsense without a word."""
    scheduler = Path(folder) / "scheduler" / "scheduler_config.json"
    if scheduler.is_file():
        prediction = read_config(scheduler).get("prediction_type", "epsilon")
        if prediction != "epsilon":
            raise WeightsError(f"this pipeline predicts {prediction!r} (Stable Diffusion 2.x?); the sd-v1 preset needs an "
                               "epsilon model such as SD v1.4 or v1.5", scheduler)


def sdseg_from_pretrained_parts(
    preset: str,
    *,
    stable_diffusion: PathLike | None = None,
    autoencoder: PathLike | None = None,
    unet: PathLike | None = None,
    autoencoder_config: dict | PathLike | None = None,
    unet_config: dict | PathLike | None = None,
    dataset: str = "btcv",
    organs: list[str] | None = None,
    **overrides: Any,
):
    """An untrained SDSeg model whose parts start from local pretrained weights.

    * ``sd-v1``: ``stable_diffusion`` is a Stable Diffusion v1.x diffusers folder (``vae/``, ``unet/``)
      or a single SD checkpoint file. Autoencoder, vision encoder and UNet all start from it.
    * ``paper``: ``autoencoder`` (kl-f8 / SD VAE, folder or single file) gives the frozen autoencoder
      and the vision encoder; the official-size UNet starts from ``unet`` when given (a diffusers
      UNet2DModel folder, or the LDM LSUN-churches ``model.ckpt`` as in the official code; a single
      file's layout defaults to :func:`paper_ldm_unet_config`), else from scratch.
    * ``tiny``: ``autoencoder`` is a tiny mask autoencoder trained with
      :func:`sdseg_monai.training.train_mask_autoencoder`.

    The vision encoder copies the autoencoder's encoder weights. conv_in's extra input channels and a
    new class embedding start at zero, so the UNet initially matches the pretrained one. Its attention
    layout is the pretrained one's too: a UNet in diffusers keys keeps its own config's heads (the
    paper preset's 8 heads are not forced on it; ``attention_heads`` in ``overrides`` sets them), an
    LDM ``UNet2DModel`` file gets ``attention_heads`` (default 8, as LDM checkpoints have) in every layer.
    """
    from sdseg_monai.model import SDSeg

    raw = None
    if preset == "sd-v1":
        if stable_diffusion is None:
            raise WeightsError("the sd-v1 preset needs a Stable Diffusion v1.x folder or checkpoint file")
        if Path(stable_diffusion).is_file():
            raw = read_state_dict(stable_diffusion)
        else:
            check_sd_v1_folder(stable_diffusion)
        autoencoder = autoencoder or stable_diffusion
        unet = unet or stable_diffusion
    if autoencoder is None:
        raise WeightsError(f"the {preset} preset needs pretrained autoencoder weights (a local folder or file)")
    vae = load_autoencoder(autoencoder, autoencoder_config, state=raw if raw is not None and autoencoder == stable_diffusion else None)
    pretrained_unet = None
    if unet is not None:
        if preset == "paper" and unet_config is None and Path(unet).is_file():
            unet_config = paper_ldm_unet_config()
        heads = overrides.get("attention_heads") or LDM_ATTENTION_HEADS
        pretrained_unet, ldm_heads = _load_unet(
            unet, unet_config, state=raw if raw is not None and unet == stable_diffusion else None, attention_heads=heads
        )
        # The model's config must rebuild the loaded layout (on save and load too): the LDM file's heads,
        # else the UNet's own config's, unless the caller names the heads.
        overrides["attention_heads"] = heads if ldm_heads else overrides.get("attention_heads")
    config: SDSegConfig = model_preset(
        preset,
        dataset=dataset,
        organs=organs,
        autoencoder=vae.config,
        unet=pretrained_unet.config if pretrained_unet is not None else None,
        **overrides,
    )
    expected = "UNet2DConditionModel" if config.backbone == "unet2d_condition" else "UNet2DModel"
    if pretrained_unet is not None and type(pretrained_unet).__name__ != expected:
        raise WeightsError(f"the {preset} preset needs a {expected}, not a {type(pretrained_unet).__name__}", unet)
    model = SDSeg(config)
    model.autoencoder.load_state_dict(vae.state_dict())
    model.vision_encoder.encoder.load_state_dict(vae.encoder.state_dict())
    if pretrained_unet is not None:
        state = widen_conv_in(pretrained_unet.state_dict(), config.unet["in_channels"])
        own = model.unet.state_dict()
        if "class_embedding.weight" in own and "class_embedding.weight" not in state:
            state["class_embedding.weight"] = torch.zeros_like(own["class_embedding.weight"])
        load_state_into(model.unet, state, unet, what="SDSeg UNet")
    if config.latent_scale_source == "autoencoder":
        model.config.latent_scale = float(vae.config.get("scaling_factor", 0.18215))
    return model
