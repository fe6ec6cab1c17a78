"""Loading real weights offline: diffusers folders, single-file LDM / Stable Diffusion checkpoints,
and assembling an SDSeg model from pretrained parts.

Every loader reads local files only (``HF_HUB_OFFLINE=1``), unpickles nothing but tensors
(``weights_only``), and reports a missing file or a shape mismatch in one line naming the file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from sdseg_monai import _offline  # noqa: F401  (before diffusers)
from sdseg_monai.config import SD_V1_AUTOENCODER, SD_V1_UNET, SDSegConfig, model_preset
from sdseg_monai.errors import WeightsError

WEIGHT_FILE_NAMES = (
    "diffusion_pytorch_model.safetensors",
    "model.safetensors",
    "diffusion_pytorch_model.bin",
    "pytorch_model.bin",
)
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
LDM_UNET_PREFIX = "model.diffusion_model."
LDM_VAE_PREFIXES = ("first_stage_model.", "vae.")

PathLike = str | os.PathLike


def read_state_dict(path: PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file, or of a torch checkpoint loaded with ``weights_only=True``.

    A Lightning-style ``{"state_dict": ...}`` wrapper is unwrapped.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError("no such weights file", path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: Any = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001  (any reader failure is a bad-file message)
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            reason = "holds pickled objects besides tensors; refused (weights_only). Convert it to .safetensors"
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


def _unet_state(raw: dict[str, torch.Tensor], config: dict[str, Any], source: PathLike) -> dict[str, torch.Tensor]:
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    if any(k.startswith(LDM_UNET_PREFIX) for k in raw):
        if config.get("_class_name", "UNet2DConditionModel") != "UNet2DConditionModel":
            raise WeightsError(
                "single-file LDM checkpoints are supported for Stable Diffusion UNets only; "
                "give a diffusers UNet2DModel folder (config.json + safetensors) instead",
                source,
            )
        return _convert(convert_ldm_unet_checkpoint, raw, config, source)
    return raw


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
        model = AutoencoderKL.from_config(cfg)
    except Exception as e:  # noqa: BLE001
        raise WeightsError(f"config does not describe an AutoencoderKL ({e})", folder or origin) from None
    if tensors is None:  # the converter reads keys a partial config may leave to diffusers' defaults
        tensors = _autoencoder_state(state if state is not None else read_state_dict(origin), {**model.config, **cfg}, origin)
    load_state_into(model, tensors, origin, what="autoencoder")
    return model.eval()


def load_unet(source: PathLike, config: dict | PathLike | None = None, state: dict | None = None):
    """A pretrained diffusers UNet (``UNet2DConditionModel`` or ``UNet2DModel``) from local weights.

    Args:
        source: a diffusers folder (pipeline root with ``unet/``, or the ``unet`` folder itself), or a
            single Stable Diffusion ``.safetensors``/``.ckpt`` in LDM keys.
        config: for single files: config dict, ``config.json`` or folder. Default: SD v1's UNet.
        state: an already-read state dict of ``source``.
    """
    from diffusers import UNet2DConditionModel, UNet2DModel

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
    try:
        model = cls.from_config(cfg)
    except Exception as e:  # noqa: BLE001
        raise WeightsError(f"config does not describe a {cls.__name__} ({e})", folder or origin) from None
    if tensors is None:  # the converter reads keys a partial config may leave to diffusers' defaults
        tensors = _unet_state(state if state is not None else read_state_dict(origin), {**model.config, **cfg}, origin)
    load_state_into(model, tensors, origin, what="UNet")
    return model.eval()


def widen_conv_in(state: dict[str, torch.Tensor], in_channels: int) -> dict[str, torch.Tensor]:
    """Pretrained conv_in weights on the first (noisy-latent) channels, zeros on the new image-latent
    channels, so the widened UNet starts out computing exactly what the pretrained one did."""
    state = dict(state)
    weight = state["conv_in.weight"]
    if weight.shape[1] < in_channels:
        extra = torch.zeros(weight.shape[0], in_channels - weight.shape[1], *weight.shape[2:], dtype=weight.dtype)
        state["conv_in.weight"] = torch.cat([weight, extra], dim=1)
    return state


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
      and the vision encoder; the official-size UNet starts from ``unet`` (a diffusers UNet2DModel
      folder) when given, else from scratch.
    * ``tiny``: ``autoencoder`` is a tiny mask autoencoder trained with
      :func:`sdseg_monai.training.train_mask_autoencoder`.

    The vision encoder copies the autoencoder's encoder weights. conv_in's extra input channels and a
    new class embedding start at zero, so the UNet initially matches the pretrained one.
    """
    from sdseg_monai.model import SDSeg

    raw = None
    if preset == "sd-v1":
        if stable_diffusion is None:
            raise WeightsError("the sd-v1 preset needs a Stable Diffusion v1.x folder or checkpoint file")
        if Path(stable_diffusion).is_file():
            raw = read_state_dict(stable_diffusion)
        autoencoder = autoencoder or stable_diffusion
        unet = unet or stable_diffusion
    if autoencoder is None:
        raise WeightsError(f"the {preset} preset needs pretrained autoencoder weights (a local folder or file)")
    vae = load_autoencoder(autoencoder, autoencoder_config, state=raw if raw is not None and autoencoder == stable_diffusion else None)
    pretrained_unet = None
    if unet is not None:
        pretrained_unet = load_unet(unet, unet_config, state=raw if raw is not None and unet == stable_diffusion else None)
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
        config.latent_scale = float(vae.config.get("scaling_factor", 0.18215))
    return model
