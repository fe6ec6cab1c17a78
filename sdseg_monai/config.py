"""SDSeg model configuration: network layout, diffusion settings, organs and preprocessing.

A saved model carries one :class:`SDSegConfig` as ``config.json``, so the folder alone is enough to
rebuild the network and to preprocess a scan the way the model was trained.
"""

from __future__ import annotations

import copy
import json
import math
import numbers
import os
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from sdseg_monai.errors import SDSegInputError
from sdseg_monai.labels import BTCV, Organ, dataset_preset, organ_code

BACKBONES = ("unet2d", "unet2d_condition")
PREDICTION_TYPES = ("epsilon", "sample")
MASK_LATENTS = ("sample", "mean")
LATENT_SCALE_SOURCES = ("std", "autoencoder")
CHANNEL_MODES = ("replicate", "2.5d")
# Largest seed of the diffusion noise (and of phantoms): torch's generators take any seed below 2**64,
# and sample n of a pass uses seed + n. Here, not in the model, so that the command line needs no torch.
MAX_SEED = 2**63 - 1
# diffusers' number of UNet levels when a config does not list its blocks (both UNet classes).
DIFFUSERS_UNET_LEVELS = 4

# 1000-step schedules, both linear in sqrt(beta) (diffusers "scaled_linear", LDM "linear").
SCHEDULES: dict[str, tuple[str, float, float]] = {
    "sd-v1": ("scaled_linear", 0.00085, 0.012),  # Stable Diffusion v1; use with SD UNet weights
    "ldm": ("scaled_linear", 0.0015, 0.0155),  # the SDSeg paper / LDM kl-f8 configs
}

# Stable Diffusion v1.x component layouts (diffusers configs), so a single-file SD checkpoint loads
# without fetching a config.
SD_V1_AUTOENCODER: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 256,
    "scaling_factor": 0.18215,
}

SD_V1_UNET: dict[str, Any] = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
}

# The official SDSeg denoiser: the LDM LSUN-churches UNet (kl-f8 latents, 32x32 for 256^2 slices).
PAPER_UNET: dict[str, Any] = {
    "sample_size": 32,
    "in_channels": 8,
    "out_channels": 4,
    "block_out_channels": [192, 384, 384, 768, 768],
    "layers_per_block": 2,
    # Self-attention at latent resolutions 32/16/8/4, none at 2.
    "down_block_types": ["AttnDownBlock2D"] * 4 + ["DownBlock2D"],
    # diffusers' UpBlock2D ignores upsample_type; the LDM UNet upsamples with a ResBlock at every level.
    "up_block_types": ["ResnetUpsampleBlock2D"] + ["AttnUpBlock2D"] * 4,
    "downsample_type": "resnet",
    "upsample_type": "resnet",
    "resnet_time_scale_shift": "scale_shift",
    "attention_head_dim": 24,  # placeholder; SDSegConfig.attention_heads fixes 8 heads everywhere
    "dropout": 0.2,
    "norm_num_groups": 32,
    "attn_norm_num_groups": 32,  # LDM normalises before the mid-block attention too
    "flip_sin_to_cos": True,
    "freq_shift": 0,
}

# A few million parameters: trains on 2 CPU cores in minutes. f=8 like the real autoencoder, on
# 128^2 slices (16x16 latents): the decoder dominates CPU cost and is 4x cheaper than at 256^2.
TINY_SLICE_SIZE = 128
# Widths measured side by side (benchmarks/train_default_model.py, same 2 minutes of an H100):
# held-out reconstruction Dice 0.9902 for (24, 48, 96, 96) vs 0.9880 for (16, 32, 64, 64), for
# about 1.4x the CPU decoding time.
TINY_AUTOENCODER: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [24, 48, 96, 96],
    "layers_per_block": 1,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 8,
    "sample_size": 128,
    "scaling_factor": 1.0,
}

TINY_UNET: dict[str, Any] = {
    "sample_size": 16,
    "in_channels": 8,
    "out_channels": 4,
    "block_out_channels": [64, 128, 128],
    "layers_per_block": 1,
    "down_block_types": ["ResnetDownsampleBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"],
    "up_block_types": ["AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
    "downsample_type": "resnet",
    "upsample_type": "resnet",
    "resnet_time_scale_shift": "scale_shift",
    "attention_head_dim": 32,
    "dropout": 0.0,
    "norm_num_groups": 16,
    "attn_norm_num_groups": 16,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
}


@dataclass
class Preprocessing:
    """How a CT volume becomes model input; stored with every model.

    Args:
        hu_window: (low, high) Hounsfield window, mapped linearly to [-1, 1] and clipped.
        slice_size: in-plane size of the square axial slices fed to the model.
        channels: ``"replicate"`` repeats the grey slice 3 times (the paper); ``"2.5d"`` stacks the
            previous, current and next slice.
        orientation: the canonical orientation the volume is brought to before axial slicing.
    """

    hu_window: tuple[float, float] = BTCV.hu_window
    slice_size: int = 256
    channels: str = "replicate"
    orientation: str = "RAS"

    def __post_init__(self):
        self.hu_window = (float(self.hu_window[0]), float(self.hu_window[1]))
        if not self.hu_window[0] < self.hu_window[1]:
            raise SDSegInputError(f"HU window must be (low, high) with low < high, got {self.hu_window}")
        if self.channels not in CHANNEL_MODES:
            raise SDSegInputError(f"channels must be one of {CHANNEL_MODES}, got {self.channels!r}")
        # What it must be a multiple of depends on the network: SDSegConfig.check_slice_size.
        if isinstance(self.slice_size, bool) or not isinstance(self.slice_size, numbers.Integral) or self.slice_size <= 0:
            raise SDSegInputError(f"slice_size must be a positive integer, got {self.slice_size!r}")
        self.slice_size = int(self.slice_size)
        if not _is_axis_codes(self.orientation):
            raise SDSegInputError(f"orientation must be three axis codes such as RAS or LPS, got {self.orientation!r}")


# Skipped decodes are those that stayed below this probability on the calibration cases: far under any
# threshold an organ can have, so skipping them leaves the label maps as they were.
SKIP_DECODE_PROBABILITY = 0.05


@dataclass
class Postprocessing:
    """How per-organ probability maps become a label map; stored with every model and set on a
    validation split by :func:`sdseg_monai.calibration.calibrate` (never on the test split).

    Args:
        default_threshold: probability an organ needs to claim a voxel (0.5 is SDSeg's rounding).
        thresholds: organ name -> its own threshold, where it differs from ``default_threshold``.
        largest_component: organs of which only the largest 3D connected component is kept (each
            BTCV organ is one connected structure, so stray islands are false positives).
        skip_decode_radius: a (slice, organ) pair whose predicted latent lies closer than this to the
            latent of an empty mask is not decoded: its map is all zero. Decoding is most of the
            inference cost, and most pairs are organs absent from the slice. Calibration sets the
            radius with a margin below the closest pair that decoded to :data:`SKIP_DECODE_PROBABILITY`
            or more on its cases, so the label maps are those of decoding every pair (with axial
            smoothing, a skipped pair's neighbours may move by up to 0.05 w / (1 + w)). 0 decodes all.
        axial_smoothing: organ name -> weight w of its two neighbouring axial slices, where it is not 0:
            the organ's probability on slice z becomes (p_z + w (p_z-1 + p_z+1)) / (1 + 2w) (at the
            volume's ends over the slices there), some 3D context for a model that sees one slice.
    """

    default_threshold: float = 0.5
    thresholds: dict[str, float] = field(default_factory=dict)
    largest_component: list[str] = field(default_factory=list)
    skip_decode_radius: float = 0.0
    axial_smoothing: dict[str, float] = field(default_factory=dict)

    def __post_init__(self):
        self.default_threshold = float(self.default_threshold)
        self.thresholds = {str(k): float(v) for k, v in dict(self.thresholds).items()}
        self.largest_component = [str(name) for name in self.largest_component]
        for name, value in [("default", self.default_threshold), *self.thresholds.items()]:
            if not 0.0 < value <= 1.0:
                raise SDSegInputError(f"threshold of {name} must lie in (0, 1], got {value}")
        self.skip_decode_radius = float(self.skip_decode_radius)
        if not (math.isfinite(self.skip_decode_radius) and self.skip_decode_radius >= 0.0):
            raise SDSegInputError(f"skip_decode_radius must be a finite number >= 0, got {self.skip_decode_radius}")
        self.axial_smoothing = {str(k): float(v) for k, v in dict(self.axial_smoothing).items() if float(v) != 0.0}
        for name, value in self.axial_smoothing.items():
            if not (math.isfinite(value) and value > 0.0):
                raise SDSegInputError(f"axial_smoothing of {name} must be a finite number >= 0, got {value}")

    def threshold(self, organ: str) -> float:
        return self.thresholds.get(organ, self.default_threshold)

    def smoothing(self, organ: str) -> float:
        return self.axial_smoothing.get(organ, 0.0)


@dataclass
class SDSegConfig:
    """Everything needed to rebuild an SDSeg network and use it.

    Args:
        backbone: ``"unet2d"`` (diffusers ``UNet2DModel``, no cross-attention, as in the official
            code) or ``"unet2d_condition"`` (``UNet2DConditionModel``, e.g. from Stable Diffusion v1.x,
            its cross-attention fed a learned null context).
        autoencoder: diffusers ``AutoencoderKL`` config of the frozen mask autoencoder.
        unet: diffusers config of the denoiser; ``in_channels`` is the mask latent's channels plus the
            image latent's (twice the latent channels, as in the paper, unless ``condition_channels``).
        organs: foreground classes, ``{"label": value in label maps, "name": ...}``, optionally with
            ``"snomed": {"code", "meaning", "laterality"}`` for DICOM SEG output (see
            :func:`sdseg_monai.labels.organ_code`). One binary mask latent per organ; more than one
            organ adds a class embedding to the time embedding.
        latent_scale: multiplies autoencoder latents. ``None`` until measured on training masks.
        latent_scale_source: ``"std"`` (1/std of training-mask latents, the official code) or
            ``"autoencoder"`` (the autoencoder's ``scaling_factor``).
        mask_latent: ``"sample"`` (posterior sample, the official code) or ``"mean"``.
        vision_encoder_dropout: dropout in the trainable image encoder's resnet blocks.
        prediction_type: ``"epsilon"`` (the paper) or ``"sample"`` (the UNet outputs z0 directly).
        schedule: a key of :data:`SCHEDULES`.
        num_train_timesteps: T; one-step inference runs at t = T - 1.
        z0_loss_weight: lambda in L1(noise) + lambda * L1(z0_hat, z0).
        final_timestep_fraction: share of training samples drawn at t = T - 1 instead of uniformly.
        mask_loss_weight: weight of an extra loss on the *decoded* z0_hat of the samples at
            t = T - 1 (BCE + soft Dice per mask, through the frozen decoder; needs
            ``final_timestep_fraction`` > 0). 0 is the paper's objective; above 0 gives small organs
            the weight the mean-Dice metric gives them (a deviation, see ``docs/differences.md``).
        condition_channels: channels of the image latent c. None: the mask latent's (the paper).
            More: the vision encoder adds a 1x1 conv on its last features, giving the denoiser more
            of the image per latent pixel than 4 numbers (a deviation, see ``docs/differences.md``).
        null_context_tokens: length of the learned null context (``unet2d_condition`` only).
        attention_heads: if set, every self-attention layer of a ``unet2d`` uses this many heads
            (the official UNet has 8 heads at every width; diffusers fixes the head width instead).
        preprocessing: how scans become slices for this model.
        postprocessing: how its probability maps become a label map.
        dataset: name of the dataset preset the organs come from, if any.
    """

    backbone: str
    autoencoder: dict[str, Any]
    unet: dict[str, Any]
    organs: list[dict[str, Any]]
    latent_scale: float | None = None
    latent_scale_source: str = "std"
    mask_latent: str = "sample"
    vision_encoder_dropout: float = 0.2
    prediction_type: str = "epsilon"
    schedule: str = "ldm"
    num_train_timesteps: int = 1000
    z0_loss_weight: float = 1.0
    final_timestep_fraction: float = 0.0
    mask_loss_weight: float = 0.0
    condition_channels: int | None = None
    null_context_tokens: int = 1
    attention_heads: int | None = None
    preprocessing: Preprocessing = field(default_factory=Preprocessing)
    postprocessing: Postprocessing = field(default_factory=Postprocessing)
    dataset: str | None = None

    def __post_init__(self):
        if isinstance(self.preprocessing, dict):
            self.preprocessing = Preprocessing(**self.preprocessing)
        if isinstance(self.postprocessing, dict):
            self.postprocessing = Postprocessing(**self.postprocessing)
        self.organs = [o if isinstance(o, dict) else _organ_dict(o) for o in self.organs]
        self.autoencoder = _plain_config(self.autoencoder)
        self.unet = _plain_config(self.unet)
        self.validate()

    def validate(self) -> None:
        def check(ok: bool, message: str):
            if not ok:
                raise SDSegInputError(f"invalid SDSeg config: {message}")

        check(self.backbone in BACKBONES, f"backbone must be one of {BACKBONES}, got {self.backbone!r}")
        check(self.prediction_type in PREDICTION_TYPES, f"prediction_type must be one of {PREDICTION_TYPES}")
        check(self.mask_latent in MASK_LATENTS, f"mask_latent must be one of {MASK_LATENTS}")
        check(self.latent_scale_source in LATENT_SCALE_SOURCES, f"latent_scale_source must be one of {LATENT_SCALE_SOURCES}")
        check(self.schedule in SCHEDULES, f"schedule must be one of {tuple(SCHEDULES)}, got {self.schedule!r}")
        check(self.latent_scale is None or self.latent_scale > 0, "latent_scale must be positive")
        check(0.0 <= self.final_timestep_fraction <= 1.0, "final_timestep_fraction must lie in [0, 1]")
        check(self.z0_loss_weight >= 0, "z0_loss_weight must be >= 0")
        check(self.mask_loss_weight >= 0, "mask_loss_weight must be >= 0")
        check(
            self.mask_loss_weight == 0 or self.final_timestep_fraction > 0,
            "mask_loss_weight needs final_timestep_fraction > 0 (the decoded-mask loss is taken at t = T - 1)",
        )
        check(len(self.organs) >= 1, "at least one organ is needed")
        names = [o["name"] for o in self.organs]
        labels = [int(o["label"]) for o in self.organs]
        check(len(set(names)) == len(names), f"organ names repeat: {names}")
        check(len(set(labels)) == len(labels) and min(labels) >= 1, f"organ labels must be distinct and >= 1: {labels}")
        for organ in self.organs:
            if "snomed" in organ:
                try:  # a malformed code fails at load, not when a DICOM SEG is written
                    organ_code(organ)
                except SDSegInputError as e:
                    check(False, str(e))
        post = self.postprocessing
        unknown = sorted((set(post.thresholds) | set(post.largest_component) | set(post.axial_smoothing)) - set(names))
        check(not unknown, f"postprocessing names organs this model does not have: {', '.join(unknown)}")
        latent = int(self.autoencoder.get("latent_channels", 4))
        check(
            self.condition_channels is None or int(self.condition_channels) >= latent,
            f"condition_channels must be at least the latent channels ({latent})",
        )
        fused = latent + self.condition_latent_channels
        check(
            int(self.unet.get("in_channels", 0)) == fused,
            f"unet in_channels must be the mask plus image latent channels = {fused} (concat fusion), got {self.unet.get('in_channels')}",
        )
        check(int(self.unet.get("out_channels", 0)) == latent, f"unet out_channels must equal latent channels ({latent})")
        self.check_slice_size(self.preprocessing.slice_size)

    def check_slice_size(self, slice_size: int) -> None:
        """Refuse a slice size this network cannot run: the autoencoder and then the UNet halve it at
        each level, and the UNet's skip connections need every level's size to be whole."""
        multiple = self.slice_multiple
        if slice_size <= 0 or slice_size % multiple:
            raise SDSegInputError(
                f"slice size must be a positive multiple of {multiple} for this network (the autoencoder "
                f"downsamples by {self.downsample_factor}, its UNet by {multiple // self.downsample_factor}), got {slice_size}"
            )

    # -- derived facts -----------------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return len(self.organs)

    @property
    def organ_names(self) -> list[str]:
        return [o["name"] for o in self.organs]

    @property
    def organ_labels(self) -> list[int]:
        return [int(o["label"]) for o in self.organs]

    @property
    def latent_channels(self) -> int:
        return int(self.autoencoder.get("latent_channels", 4))

    @property
    def condition_latent_channels(self) -> int:
        """Channels of the image latent c (the vision encoder's output)."""
        return int(self.condition_channels) if self.condition_channels else self.latent_channels

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.autoencoder["block_out_channels"]) - 1)

    @property
    def slice_multiple(self) -> int:
        """What every slice size must be a multiple of: the autoencoder's downsampling times the UNet's
        (each of its levels but the last halves the latent)."""
        levels = len(self.unet.get("down_block_types", ())) or DIFFUSERS_UNET_LEVELS
        return self.downsample_factor * 2 ** (levels - 1)

    @property
    def latent_size(self) -> int:
        return self.preprocessing.slice_size // self.downsample_factor

    def organ_index(self, name: str) -> int:
        try:
            return self.organ_names.index(name)
        except ValueError:
            raise SDSegInputError(f"unknown organ {name!r}; this model knows: {', '.join(self.organ_names)}") from None

    # -- serialisation ------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["preprocessing"]["hu_window"] = list(self.preprocessing.hu_window)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SDSegConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known - {"_class_name", "_sdseg_version"})
        if unknown:
            raise SDSegInputError(f"unknown SDSeg config keys: {', '.join(unknown)}")
        return cls(**{k: copy.deepcopy(v) for k, v in data.items() if k in known})

    def to_json_string(self) -> str:
        from sdseg_monai._version import __version__

        return json.dumps({"_class_name": "SDSeg", "_sdseg_version": __version__, **self.to_dict()}, indent=2) + "\n"

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> SDSegConfig:
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except FileNotFoundError:
            raise SDSegInputError("no such file", path) from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise SDSegInputError(f"not a readable JSON config ({e})", path) from None
        if not isinstance(data, dict):
            raise SDSegInputError("config must be a JSON object", path)
        try:
            return cls.from_dict(data)
        except SDSegInputError as e:
            raise SDSegInputError(str(e), path) from None
        except (TypeError, ValueError, KeyError, IndexError, AttributeError) as e:
            raise SDSegInputError(f"invalid SDSeg config ({type(e).__name__}: {e})", path) from None


def _is_axis_codes(codes) -> bool:
    """One of R/L, one of A/P and one of S/I, in any order (what MONAI's Orientation accepts)."""
    return isinstance(codes, str) and len(codes) == 3 and all(sum(c in pair for c in codes.upper()) == 1 for pair in ("RL", "AP", "SI"))


def _organ_dict(organ: Organ) -> dict[str, Any]:
    """A config's organ entry; ``"snomed"`` only when the organ has a code (older configs have none)."""
    entry: dict[str, Any] = {"label": organ.label, "name": organ.name}
    if organ.snomed() is not None:
        entry["snomed"] = organ.snomed()
    return entry


def _plain_config(config: Any) -> dict[str, Any]:
    """A JSON-able copy of a diffusers config (FrozenDict or dict), without diffusers' private keys."""
    data = dict(config)
    data = {k: (list(v) if isinstance(v, tuple) else v) for k, v in data.items() if not k.startswith("_")}
    return copy.deepcopy(data)


def organs_from(dataset: str | None = None, organs: list[str] | None = None) -> tuple[list[Organ], str | None]:
    """Organs for a model: a dataset preset's table, optionally narrowed to the names in ``organs``."""
    preset = dataset_preset(dataset or "btcv")
    chosen = [preset.organ(n) for n in organs] if organs else list(preset.organs)
    return chosen, preset.name


MODEL_PRESETS = ("tiny", "paper", "sd-v1")


def model_preset(
    name: str,
    *,
    dataset: str = "btcv",
    organs: list[str] | None = None,
    autoencoder: dict[str, Any] | None = None,
    unet: dict[str, Any] | None = None,
    **overrides: Any,
) -> SDSegConfig:
    """Build the config of a model preset.

    Args:
        name: ``"tiny"`` (trained from scratch on CPU), ``"paper"`` (the official SDSeg UNet on a
            kl-f8 autoencoder) or ``"sd-v1"`` (every part from Stable Diffusion v1.x).
        dataset: dataset preset giving the organ table and HU window.
        organs: organ names to keep (default: all organs of the dataset).
        autoencoder: autoencoder config to use instead of the preset's (e.g. read from weights).
        unet: pretrained UNet config (its ``in_channels`` is widened to the concat input).
        overrides: any other :class:`SDSegConfig` field.
    """
    chosen, dataset_name = organs_from(dataset, organs)
    window = dataset_preset(dataset_name).hu_window
    ae = _plain_config(autoencoder) if autoencoder is not None else None
    if name == "tiny":
        ae = ae or copy.deepcopy(TINY_AUTOENCODER)
        base = dict(
            backbone="unet2d",
            unet=copy.deepcopy(TINY_UNET),
            latent_scale_source="std",
            # Measured here: from scratch on CPU, predicting z0 with extra weight on t = T-1 converges
            # about 10x faster than eps (see docs/differences.md).
            prediction_type="sample",
            final_timestep_fraction=0.5,
            schedule="ldm",
            vision_encoder_dropout=0.0,
            preprocessing=Preprocessing(hu_window=window, slice_size=TINY_SLICE_SIZE),
        )
    elif name == "paper":
        ae = ae or copy.deepcopy(SD_V1_AUTOENCODER)
        base = dict(
            backbone="unet2d",
            unet=copy.deepcopy(PAPER_UNET),
            latent_scale_source="std",
            prediction_type="epsilon",
            schedule="ldm",
            attention_heads=8,
        )
    elif name == "sd-v1":
        ae = ae or copy.deepcopy(SD_V1_AUTOENCODER)
        base = dict(
            backbone="unet2d_condition",
            unet=_plain_config(unet) if unet is not None else copy.deepcopy(SD_V1_UNET),
            latent_scale_source="std",
            prediction_type="epsilon",
            schedule="sd-v1",
        )
    else:
        raise SDSegInputError(f"unknown model preset {name!r}; choose from {', '.join(MODEL_PRESETS)}")
    if name != "sd-v1" and unet is not None:
        base["unet"] = _plain_config(unet)
    latent = int(ae.get("latent_channels", 4))
    base["unet"]["in_channels"] = latent + int(overrides.get("condition_channels") or latent)  # [z_t || image latent]
    base["unet"]["out_channels"] = latent
    if "preprocessing" in overrides and isinstance(overrides["preprocessing"], dict):
        overrides["preprocessing"] = Preprocessing(**{"hu_window": window, **overrides["preprocessing"]})
    base.update(overrides)
    base.setdefault("preprocessing", Preprocessing(hu_window=window))
    return SDSegConfig(autoencoder=ae, organs=chosen, dataset=dataset_name, **base)
