"""The SDSeg network: frozen mask autoencoder, trainable vision encoder, concat-fusion denoising UNet.

Training predicts the noise (or z0) of a noisy mask latent given the image latent; inference is ONE
UNet call at t = T - 1 on seeded noise, then z0_hat is decoded into a probability map per organ.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import numbers
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from sdseg_monai import _offline  # noqa: F401  (before diffusers)
from sdseg_monai import diffusion
from sdseg_monai.config import MAX_SEED, SDSegConfig
from sdseg_monai.data import check_spares_inputs, current_umask
from sdseg_monai.errors import SDSegInputError
from sdseg_monai.layers import drop_unit_output_scale, fuse_upsample_convs

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
# Test metrics of a released model (e.g. the packaged default), recorded in its bundle's metadata.
EVALUATION_NAME = "evaluation.json"
# In a MONAI bundle (see sdseg_monai.bundle): the weights as MONAI loads them, the config beside them.
BUNDLE_CONFIG_NAME = "models/sdseg_config.json"
BUNDLE_WEIGHTS_NAME = "models/model.pt"


# Test-time shifts, in half latent cells (y, x): the first pass is the plain one, the second moves
# diagonally by half a cell (most of the gain), four cover the half-cell grid.
SHIFT_OFFSETS = {1: ((0, 0),), 2: ((0, 0), (1, 1)), 4: ((0, 0), (1, 1), (1, 0), (0, 1))}


def check_num_shifts(num_shifts: int) -> None:
    """Refuse a shift count that :data:`SHIFT_OFFSETS` does not define."""
    if num_shifts not in SHIFT_OFFSETS:
        raise SDSegInputError(f"num_shifts must be one of {sorted(SHIFT_OFFSETS)}, got {num_shifts}")


def _latent_distance(z0: torch.Tensor, empty: torch.Tensor) -> torch.Tensor:
    """:meth:`SDSeg.empty_distance` of latents ``z0`` from the empty latent ``empty``."""
    return (z0.float() - empty).norm(dim=1).flatten(1).amax(dim=1)


def check_seed(seed: int) -> int:
    """Refuse a seed that is not an integer in 0..:data:`~sdseg_monai.config.MAX_SEED`; returns it."""
    if not _is_int(seed) or not 0 <= seed <= MAX_SEED:
        raise SDSegInputError(f"seed must be an integer in 0..2**63-1, got {seed!r}")
    return int(seed)


def _is_int(value) -> bool:
    """A Python or numpy integer, not a bool (True would pass for 1) nor a float that happens to be whole."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def preserved_rng() -> contextlib.AbstractContextManager:
    """Around building a network whose random initial weights are then overwritten by loaded ones: the
    caller's global (CPU) random state is left as it was, as if nothing had been drawn."""
    return torch.random.fork_rng(devices=[])


class _EmptyLatentCache:
    """:meth:`SDSeg.empty_latent`, the key it was computed for, and the encoder's tensors then, held so
    that no new tensor can take their addresses (a key of addresses could not tell them apart). A copy
    or a pickle of the model gets an empty cache: it encodes again, rather than carry a second encoder."""

    key = latent = tensors = None

    def __reduce_ex__(self, protocol):
        return _EmptyLatentCache, ()


def _weight_dtype(module: nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype


# Batches reach a compiled UNet or decoder padded to a multiple of this (see SDSeg.compile_for_inference).
COMPILED_BATCH_MULTIPLE = 8


def pad_batch(tensors: Sequence[torch.Tensor | None], multiple: int) -> list[torch.Tensor | None]:
    """Each tensor's first dimension padded to the next multiple of ``multiple`` by repeats of its last
    item (real values: nothing in a padded row can overflow or divide by zero). None stays None."""
    padded = []
    for x in tensors:
        extra = 0 if x is None else -x.shape[0] % multiple
        padded.append(torch.cat([x, x[-1:].expand(extra, *x.shape[1:])]) if extra and x.shape[0] else x)
    return padded


# Pairs per decoder call on a CPU: the decoder's full-size maps (3 MB a pair for the tiny model in bf16)
# then stay in cache from one layer to the next; 8 pairs a call ran 1.6x slower in fp32, and 24 pairs
# 1.4x slower in bf16, on 2 EPYC cores (issue 19).
CPU_DECODER_PAIRS = 2


def cpu_decoder_calls(count: int) -> list[int]:
    """The sizes of the decoder calls :meth:`SDSeg.decode_probabilities` splits ``count`` pairs into on
    a CPU: :data:`CPU_DECODER_PAIRS` each, an odd pair out joining the last call (one pair alone takes
    oneDNN's single-image kernels, slower)."""
    if count <= CPU_DECODER_PAIRS:
        return [count]
    calls = [CPU_DECODER_PAIRS] * (count // CPU_DECODER_PAIRS)
    calls[-1] += count % CPU_DECODER_PAIRS
    return calls


def decoded_to_probabilities(decoded: torch.Tensor) -> torch.Tensor:
    """Decoder output (B, C, H, W) -> foreground probabilities (B, H, W), SDSeg's inference mapping:
    clamp to [-1, 1], map to [0, 1], average the channels."""
    return ((decoded.float().clamp(-1, 1) + 1) / 2).mean(dim=1)


def soft_dice_loss(probs: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """1 - soft Dice per mask, averaged over masks. Per mask (not pooled over the batch) so that a
    5-pixel adrenal gland counts as much as a liver, as in the mean-Dice metric; ``smooth`` makes an
    empty target penalise any predicted foreground."""
    dims = tuple(range(1, probs.ndim))
    inter = (probs * target).sum(dims)
    denom = probs.sum(dims) + target.sum(dims)
    return (1 - (2 * inter + smooth) / (denom + smooth)).mean()


def mask_logit_loss(logit: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """BCE + (1 - soft Dice) of a foreground logit map (B, H, W) against binary masks (B, H, W)."""
    target = target.to(logit.dtype)
    return F.binary_cross_entropy_with_logits(logit, target) + soft_dice_loss(torch.sigmoid(logit), target)


class VisionEncoder(nn.Module):
    """tau_theta: the autoencoder's encoder architecture, then a new 1x1 conv from 2z to z channels.

    With ``channels`` above z, a second 1x1 conv reads the encoder's last features (before its
    output conv) and adds ``channels - z`` image-latent channels after the z of the paper's path.
    """

    def __init__(self, autoencoder_config: dict, dropout: float = 0.0, channels: int | None = None):
        super().__init__()
        from diffusers.models.autoencoders.vae import Encoder

        cfg = autoencoder_config
        latent = int(cfg.get("latent_channels", 4))
        self.encoder = Encoder(
            in_channels=int(cfg.get("in_channels", 3)),
            out_channels=latent,
            down_block_types=tuple(cfg["down_block_types"]),
            block_out_channels=tuple(cfg["block_out_channels"]),
            layers_per_block=int(cfg.get("layers_per_block", 1)),
            norm_num_groups=int(cfg.get("norm_num_groups", 32)),
            act_fn=cfg.get("act_fn", "silu"),
            double_z=True,
            mid_block_add_attention=bool(cfg.get("mid_block_add_attention", True)),
        )
        from diffusers.models.resnet import ResnetBlock2D

        for module in self.encoder.modules():
            if isinstance(module, ResnetBlock2D):  # the official LDM Encoder drops out in its ResnetBlocks only
                module.dropout.p = dropout
        self.proj = nn.Conv2d(2 * latent, latent, kernel_size=1)
        extra = (channels or latent) - latent
        self.extra = nn.Conv2d(int(cfg["block_out_channels"][-1]), extra, kernel_size=1) if extra > 0 else None

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.extra is None:
            return self.proj(self.encoder(images))
        # diffusers' Encoder.forward, stopping before conv_out to share its last features.
        enc = self.encoder
        h = enc.conv_in(images)
        for block in enc.down_blocks:
            h = block(h)
        h = enc.conv_act(enc.conv_norm_out(enc.mid_block(h)))
        return torch.cat([self.proj(enc.conv_out(h)), self.extra(h)], dim=1)


def build_unet(config: SDSegConfig) -> nn.Module:
    """The denoiser of ``config``, with a class embedding when there are several organs."""
    from diffusers import UNet2DConditionModel, UNet2DModel

    unet_config = dict(config.unet)
    if config.num_classes > 1:
        unet_config["num_class_embeds"] = config.num_classes
        unet_config["class_embed_type"] = None
    else:
        unet_config.pop("num_class_embeds", None)
    cls = UNet2DConditionModel if config.backbone == "unet2d_condition" else UNet2DModel
    unet = cls.from_config(unet_config)
    if config.attention_heads:
        set_attention_heads(unet, config.attention_heads)
    return unet


def set_attention_heads(module: nn.Module, heads: int) -> None:
    """Give every attention layer ``heads`` heads, whatever its width (the LDM UNet's convention)."""
    from diffusers.models.attention_processor import Attention

    for attn in module.modules():
        if isinstance(attn, Attention):
            inner = attn.to_q.out_features
            if inner % heads:
                raise SDSegInputError(f"attention width {inner} is not divisible by {heads} heads")
            attn.heads = heads
            attn.sliceable_head_dim = heads
            attn.scale = (inner // heads) ** -0.5


class SDSeg(nn.Module):
    """SDSeg for one or several organs (one binary mask latent per organ).

    Args:
        config: the network, diffusion and preprocessing settings.

    Example:
        >>> model = SDSeg.from_pretrained("my_model")           # doctest: +SKIP
        >>> probs = model.predict(slices, seed=0)                # (S, K, H, W) in [0, 1]
    """

    def __init__(self, config: SDSegConfig):
        super().__init__()
        from diffusers import AutoencoderKL

        # Each model owns its config: fit_latent_scale or a new postprocessing must not reach other
        # models built from the same one (nor the caller's).
        self.config = config = copy.deepcopy(config)
        self.autoencoder = AutoencoderKL.from_config(config.autoencoder)
        self.autoencoder.requires_grad_(False)
        self.autoencoder.eval()
        self.vision_encoder = VisionEncoder(
            config.autoencoder, dropout=config.vision_encoder_dropout, channels=config.condition_latent_channels
        )
        drop_unit_output_scale(self.autoencoder)
        drop_unit_output_scale(self.vision_encoder)
        self.unet = build_unet(config)
        for part in (self.autoencoder, self.unet):
            fuse_upsample_convs(part)
        if config.backbone == "unet2d_condition":
            dim = int(config.unet.get("cross_attention_dim", 768))
            # Fusion is by concatenation; cross-attention only ever sees this learned constant.
            self.null_context = nn.Parameter(torch.randn(1, config.null_context_tokens, dim) * 0.02)
        else:
            self.null_context = None
        self.register_buffer(
            "alphas_cumprod", diffusion.alphas_cumprod(config.schedule, config.num_train_timesteps), persistent=False
        )
        self._empty_latent = _EmptyLatentCache()
        self._batch_multiple = 1  # COMPILED_BATCH_MULTIPLE once compile_for_inference ran

    # -- basics -------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.vision_encoder.parameters()).device

    def train(self, mode: bool = True) -> SDSeg:
        super().train(mode)
        self.autoencoder.eval()  # frozen: never in train mode
        return self

    def _apply(self, fn, *args, **kwargs):
        # .to(), .half(), .double(), .cuda() and the like: the schedule stays float64 (z0_hat divides by
        # sqrt(abar_{T-1}), 1/38.7, and bf16 would round abar by 0.4%), and the empty latent is redone.
        super()._apply(fn, *args, **kwargs)
        if self.alphas_cumprod.dtype != torch.float64:
            schedule = diffusion.alphas_cumprod(self.config.schedule, self.config.num_train_timesteps)
            self.alphas_cumprod = schedule.to(self.alphas_cumprod.device)
        self._empty_latent = _EmptyLatentCache()
        return self

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        """The parameters that training updates: vision encoder, UNet and the null context."""
        yield from self.vision_encoder.parameters()
        yield from self.unet.parameters()
        if self.null_context is not None:
            yield self.null_context

    def class_indices(self, organs: Sequence[str | int] | str | None = None) -> list[int]:
        """Class indices (0..K-1) of the organs named (or given as indices); all organs if None. A
        single name (a plain string) is that one organ."""
        if organs is None:
            return list(range(self.config.num_classes))
        if isinstance(organs, str):  # not its letters, one by one
            organs = [organs]
        if not isinstance(organs, Sequence):
            raise SDSegInputError(f"organs must be a list of organ names or class indices, got {type(organs).__name__}")
        if not organs:
            raise SDSegInputError("organs is empty: name at least one organ (None means every organ of the model)")
        out = []
        for organ in organs:
            if isinstance(organ, str):
                out.append(self.config.organ_index(organ))
            elif not _is_int(organ):
                raise SDSegInputError(f"an organ is a name or a class index, got {organ!r}")
            elif 0 <= organ < self.config.num_classes:
                out.append(int(organ))
            else:
                raise SDSegInputError(f"organ index {organ} out of range 0..{self.config.num_classes - 1}")
        repeated = sorted({self.config.organ_names[k] for k in out if out.count(k) > 1})
        if repeated:  # each organ is one label: a repeat would be segmented twice and recorded wrongly
            raise SDSegInputError(f"organ named more than once: {', '.join(repeated)}")
        return out

    # -- latents ------------------------------------------------------------------------------------
    @property
    def latent_scale(self) -> float:
        if self.config.latent_scale is None:
            raise SDSegInputError("latent scale not set: call fit_latent_scale() on training masks first")
        return float(self.config.latent_scale)

    @staticmethod
    def masks_to_autoencoder_input(masks: torch.Tensor) -> torch.Tensor:
        """Binary masks (B, H, W) -> X in {-1, 1}^(B, 3, H, W), the mask repeated on 3 channels."""
        if masks.ndim == 4:
            masks = masks[:, 0]
        x = masks.to(torch.float32) * 2 - 1
        return x.unsqueeze(1).expand(-1, 3, -1, -1).contiguous()

    @torch.no_grad()
    def encode_masks(self, masks: torch.Tensor, generator: torch.Generator | None = None, scaled: bool = True):
        """z0 = scale * E(X) for binary masks (B, H, W).

        The official code takes a posterior *sample* (``mask_latent="sample"``): the SD autoencoder's
        posterior variance is tiny, so this is near the mean but regularises like mild augmentation,
        and it is what the decoder saw in its own training. ``"mean"`` gives deterministic targets.
        """
        posterior = self._mask_posterior(masks)
        z = posterior.sample(generator=generator) if self.config.mask_latent == "sample" else posterior.mean
        return z * self.latent_scale if scaled else z

    @torch.no_grad()
    def fit_latent_scale(self, masks: torch.Tensor, generator: torch.Generator | None = None) -> float:
        """Set the latent scale: 1/std of the latents of ``masks`` (official ``scale_by_std``) or the
        autoencoder's ``scaling_factor``, by ``config.latent_scale_source``. Returns it."""
        if self.config.latent_scale_source == "autoencoder":
            scale = float(self.config.autoencoder.get("scaling_factor", 0.18215))
        else:
            z = self.encode_masks(masks, generator=generator, scaled=False)
            scale = float(1.0 / z.flatten().std())
        if not math.isfinite(scale) or scale <= 0:
            raise SDSegInputError(f"cannot derive a latent scale from these masks (got {scale})")
        self.config.latent_scale = scale
        return scale

    def _mask_posterior(self, masks: torch.Tensor):
        """The frozen autoencoder's posterior for binary masks, fed in its encoder's own dtype (fp32
        unless the whole model was cast, e.g. by ``.to(torch.bfloat16)``)."""
        x = self.masks_to_autoencoder_input(masks.to(self.device))
        return self.autoencoder.encode(x.to(_weight_dtype(self.autoencoder.encoder))).latent_dist

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Image slices (B, 3, H, W) in [-1, 1] -> image latents c (B, z, H/f, W/f)."""
        return self.vision_encoder(images.to(_weight_dtype(self.vision_encoder)))

    def empty_latent(self) -> torch.Tensor:
        """(1, C, h, w) scaled latent (posterior mean, fp32) of an all-background mask at the slice size:
        what the UNet should predict for an organ absent from the slice. A copy: the model keeps its own."""
        return self._cached_empty_latent().clone()

    @torch.no_grad()
    def _cached_empty_latent(self) -> torch.Tensor:
        """:meth:`empty_latent`, computed again whenever the latent scale, the slice size or any tensor
        of the encoder changes: a load (``load_state_dict`` copies in place, which moves the tensors'
        version counters), an in-place edit, a cast or a move (new tensors). The check costs 0.8 ms on
        the paper's encoder (106 tensors), once per :meth:`predict` call; encoding again would cost a
        whole encoder pass at the slice size (7 s on this project's CPU at 256², about a slice's)."""
        size = self.config.preprocessing.slice_size
        parts = (self.autoencoder.encoder, self.autoencoder.quant_conv)
        tensors = [p for part in parts if part is not None for p in part.parameters()]
        key = (self.latent_scale, size, tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in tensors))
        cache = self._empty_latent
        if cache.key != key:
            with torch.autocast(self.device.type, enabled=False):
                posterior = self._mask_posterior(torch.zeros((1, size, size)))
                cache.latent = posterior.mean.float() * self.latent_scale
            cache.key, cache.tensors = key, [p.detach() for p in tensors]
        return cache.latent

    def empty_distance(self, z0: torch.Tensor) -> torch.Tensor:
        """(B,) how far predicted latents (B, C, h, w) are from an empty mask's: the largest Euclidean
        distance over latent pixels, so that one small organ, a few pixels of the latent, counts."""
        return _latent_distance(z0, self._cached_empty_latent())

    def decode_probabilities(self, z0: torch.Tensor) -> torch.Tensor:
        """z0_hat -> decoder -> clamp to [-1, 1] -> [0, 1] -> channel mean: (B, H, W) probabilities.

        A decoder cast by :meth:`cast_decoder` runs wholly in its dtype, outside autocast. On a CPU the
        pairs go through in calls of :func:`cpu_decoder_calls`."""
        if self._batch_multiple == 1 and z0.device.type == "cpu":  # not compiled: batch sizes are free
            calls = cpu_decoder_calls(z0.shape[0])
            if len(calls) > 1:
                return torch.cat([self._decode_call(part) for part in z0.split(calls)])
        return self._decode_call(z0)

    def _decode_call(self, z0: torch.Tensor) -> torch.Tensor:
        """One decoder call of :meth:`decode_probabilities` on all of ``z0``."""
        dtype = _weight_dtype(self.autoencoder.decoder)
        count = z0.shape[0]
        (z0,) = pad_batch([z0], self._batch_multiple)  # as it is unless compiled
        with contextlib.nullcontext() if dtype == torch.float32 else torch.autocast(z0.device.type, enabled=False):
            return decoded_to_probabilities(self.autoencoder.decode((z0 / self.latent_scale).to(dtype)).sample[:count])

    @property
    def cast_dtype(self) -> torch.dtype | None:
        """The dtype :meth:`cast_for_inference` (or ``.to(dtype)``, ``.half()``...) put the UNet in; None
        while it is fp32."""
        dtype = _weight_dtype(self.unet)
        return None if dtype == torch.float32 else dtype

    def effective_precision(self, precision: str = "auto", device: str | torch.device | None = None) -> str:
        """The precision :meth:`predict` runs this model in for ``precision`` on ``device`` (default:
        the model's own), as it should be recorded with outputs.

        A model whose UNet is not fp32 (:meth:`cast_for_inference`, or ``.to(torch.bfloat16)``,
        ``.half()``, ``.double()``) runs wholly in that dtype: ``"auto"`` and that dtype's name
        (``"bf16"``, ``"fp16"``, ``"fp64"``) give it, and any other precision is refused (it cannot be
        honoured without a cast back). An fp32 model: :func:`resolve_precision`.

        Raises:
            SDSegInputError: an unknown precision, or one the cast model cannot run.
        """
        cast = self.cast_dtype
        if cast is None:
            return resolve_precision(self.device if device is None else torch.device(device), precision, self.config)
        name = DTYPE_NAMES.get(cast, str(cast))
        if precision not in ("auto", name):
            raise SDSegInputError(
                f"this model's weights are {name} (cast_for_inference or .to(dtype)), so it runs {name} only, not "
                f"precision={precision!r}: call cast_for_inference(torch.float32) (or .float()) first"
            )
        return name

    def cast_for_inference(self, dtype: torch.dtype) -> SDSeg:
        """Put the vision encoder, the UNet (and its null context) and the mask decoder in ``dtype``, in
        place, so that :meth:`predict` runs them wholly in bf16 or fp16, outside autocast (``float32``
        undoes it). Under autocast every GroupNorm runs in fp32, with a cast before and after it: on a
        GPU those casts and channels-last copies were most of the time (issue 19's profile on an H200).
        The autoencoder's encoder (the empty mask's latent), the noise and the schedule stay fp32, and
        the one-step arithmetic on the UNet's output runs in fp32."""
        self.vision_encoder.to(dtype)
        self.unet.to(dtype)
        if self.null_context is not None:
            self.null_context.data = self.null_context.data.to(dtype)
        return self.cast_decoder(dtype)

    def compile_for_inference(self, backend: str = "inductor") -> SDSeg:
        """Compile the UNet and the mask decoder, most of inference's work, with ``torch.compile``, in
        place (state-dict names unchanged). Their shapes are dynamic, and :meth:`denoise` and
        :meth:`decode_probabilities` pad every batch to a multiple of :data:`COMPILED_BATCH_MULTIPLE`,
        so that one compilation serves every batch size (torch.compile would compile a batch of 1
        apart). Call it after :meth:`cast_for_inference` and ``.to(device)``: a later change of dtype
        or device compiles again. The first forward compiles (tens of seconds).

        Args:
            backend: the ``torch.compile`` backend (``"inductor"``: generated, fused kernels).
        """
        for part in (self.unet, self.autoencoder.decoder):
            part.compile(backend=backend, dynamic=True)
        self._batch_multiple = COMPILED_BATCH_MULTIPLE
        return self

    def cast_decoder(self, dtype: torch.dtype) -> SDSeg:
        """Put the mask decoder (and its post-quantisation convolution) in ``dtype``, in place, so that
        :meth:`decode_probabilities` runs it wholly in that dtype, outside autocast (the decoder part
        of :meth:`cast_for_inference`; the autoencoder's encoder stays fp32)."""
        self.autoencoder.decoder.to(dtype)
        if self.autoencoder.post_quant_conv is not None:
            self.autoencoder.post_quant_conv.to(dtype)
        return self

    # -- denoiser -----------------------------------------------------------------------------------
    def denoise(self, z_t: torch.Tensor, cond: torch.Tensor, t: torch.Tensor, class_ids: torch.Tensor | None):
        """The UNet on [z_t || c] at timesteps t (and organ class ids when there are several)."""
        x = torch.cat([z_t, cond.to(z_t.dtype)], dim=1)
        if self.cast_dtype is not None:  # a cast UNet runs outside autocast: its input in its dtype
            x = x.to(self.cast_dtype)
        count = x.shape[0]
        x, t, class_ids = pad_batch([x, t, class_ids], self._batch_multiple)  # as they are unless compiled
        kwargs = {}
        if self.config.num_classes > 1:
            if class_ids is None:
                raise SDSegInputError("this model segments several organs: class ids are required")
            kwargs["class_labels"] = class_ids
        if self.null_context is not None:
            kwargs["encoder_hidden_states"] = self.null_context.expand(x.shape[0], -1, -1).to(x.dtype)
        return self.unet(x, t, **kwargs).sample[:count]

    def training_loss(
        self,
        images: torch.Tensor,
        masks: torch.Tensor,
        class_ids: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        image_index: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """The SDSeg objective on a batch.

        Args:
            images: (B, 3, H, W) image slices in [-1, 1]; (M, 3, H, W) with ``image_index``.
            masks: (B, H, W) binary masks of the organ in ``class_ids``.
            class_ids: (B,) organ class indices (needed with several organs).
            generator: CPU generator for timesteps, noise and posterior samples (reproducible runs).
            image_index: (B,) the image of each mask, when several organs share a slice: each image is
                encoded once.
        """
        device = self.device
        z0 = self.encode_masks(masks, generator=generator)
        cond = self.encode_images(images.to(device))
        if image_index is not None:
            cond = cond[image_index.to(device)]
        t = diffusion.sample_timesteps(
            z0.shape[0], self.config.num_train_timesteps, self.config.final_timestep_fraction, generator, device
        )
        noise = torch.randn(z0.shape, generator=generator).to(device)
        z_t = diffusion.add_noise(z0, noise, t, self.alphas_cumprod)
        out = self.denoise(z_t, cond, t, None if class_ids is None else class_ids.to(device))
        noise_hat, z0_hat = diffusion.split_prediction(out, z_t, t, self.alphas_cumprod, self.config.prediction_type)
        losses = diffusion.sdseg_loss(noise_hat, noise, z0_hat, z0, self.config.z0_loss_weight)
        if self.config.mask_loss_weight > 0:
            # On the samples at the inference step only (decoding is the costly part), through the
            # frozen decoder: the channel mean of its output is the foreground logit (stage 0 trains
            # it so), and a per-mask Dice weighs small organs as the mean-Dice metric does.
            final = (t == self.config.num_train_timesteps - 1).nonzero()[:, 0]
            logit = self.autoencoder.decode(z0_hat[final] / self.latent_scale).sample.float().mean(dim=1)
            loss_mask = mask_logit_loss(logit, masks.to(device)[final]) if len(final) else z0_hat.sum() * 0
            losses["loss"] = losses["loss"] + self.config.mask_loss_weight * loss_mask
            losses["loss_mask"] = loss_mask.detach()
        return losses

    # -- inference ----------------------------------------------------------------------------------
    def initial_noise(self, seed: int) -> torch.Tensor:
        """x_T for one pass: one seeded noise latent shared by every slice and organ (official code),
        drawn on the CPU so that results do not depend on the device or the batch size."""
        size = self.config.latent_size
        generator = torch.Generator("cpu").manual_seed(int(seed))
        return torch.randn((1, self.config.latent_channels, size, size), generator=generator)

    def reverse(self, cond: torch.Tensor, class_ids: torch.Tensor | None, noise: torch.Tensor, num_steps: int = 1):
        """z0_hat from x_T = noise: one UNet call at t = T - 1, or a ``num_steps`` DDIM chain."""
        batch = cond.shape[0]
        x = noise.to(cond.device, torch.float32).expand(batch, -1, -1, -1)
        if num_steps == 1:
            t = torch.full((batch,), self.config.num_train_timesteps - 1, device=cond.device, dtype=torch.long)
            # z0_hat divides by sqrt(abar_{T-1}) ~ 0.03-0.07: keep that step in fp32 under autocast.
            out = self.denoise(x, cond, t, class_ids).float()
            return diffusion.split_prediction(out, x, t, self.alphas_cumprod, self.config.prediction_type)[1]
        scheduler = diffusion.ddim_scheduler(
            self.config.schedule, self.config.num_train_timesteps, self.config.prediction_type, num_steps
        )
        for step in scheduler.timesteps:
            t = torch.full((batch,), int(step), device=cond.device, dtype=torch.long)
            out = self.denoise(x, cond, t, class_ids)
            x = scheduler.step(out.float(), int(step), x).prev_sample.float()
        return x

    @torch.inference_mode()
    def predict(
        self,
        images: torch.Tensor,
        organs: Sequence[str | int] | str | None = None,
        *,
        seed: int = 0,
        batch_size: int | None = None,
        num_steps: int = 1,
        num_samples: int = 1,
        precision: str = "auto",
        skip_decode_radius: float = 0.0,
        return_distances: bool = False,
        num_shifts: int = 1,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Probability maps for image slices, slices x organs batched together.

        The vision encoder runs once per slice; each (slice, organ) pair costs one UNet call (or
        ``num_steps`` with DDIM) and one decode, unless its predicted latent is within
        ``skip_decode_radius`` of an empty mask's (:meth:`empty_distance`), for every noise draw
        and every shift.

        Args:
            images: (S, 3, H, W) slices in [-1, 1] at the model's slice size.
            organs: organ names or class indices, or one organ's name (default: every organ of the model).
            seed: seed of the shared initial noise, 0..2**63-1; sample n uses ``seed + n``.
            batch_size: (slice, organ) pairs per forward pass (default: automatic).
            num_steps: 1 is SDSeg's one-step reverse process; more (up to the schedule's T) runs a
                DDIM chain.
            num_samples: averages the probability maps of this many noise draws.
            precision: ``"auto"`` (see :func:`resolve_precision`), ``"fp32"``, ``"bf16"``, ``"fp16"``;
                a model cast to another dtype runs in that one only (see :meth:`effective_precision`).
            skip_decode_radius: pairs closer than this to an empty mask are not decoded; their maps
                are zero (0 decodes every pair; see ``Postprocessing.skip_decode_radius``).
            return_distances: also return each pair's :meth:`empty_distance` (the largest over the
                noise draws and shifts).
            num_shifts: test-time shifts averaged (1, 2 or 4, see :data:`SHIFT_OFFSETS`): the slices
                also go through moved by half a latent cell, so that the latent grid falls
                differently on small organs; each shift costs a whole pass.

        Returns:
            (S, K, H, W) float32 probabilities on the images' device, and with ``return_distances``
            the (S, K) float32 distances there too (no copy to the host, no wait for it, per batch).

        Raises:
            SDSegInputError: an argument out of range or of the wrong kind, in one line, before any
                compute.

        Call ``model.eval()`` first: in train mode (as ``SDSeg(config)`` builds it, like every
        ``nn.Module``) dropout is active and draws from the global random state, so the same input and
        seed no longer give the same output.
        """
        self._check_predict_arguments(images, batch_size, num_steps, num_samples, seed, skip_decode_radius, num_shifts)
        precision = self.effective_precision(precision)
        if num_shifts > 1:
            return self._predict_shifted(
                images, organs, num_shifts, seed=seed, batch_size=batch_size, num_steps=num_steps,
                num_samples=num_samples, precision=precision, skip_decode_radius=skip_decode_radius,
                return_distances=return_distances,
            )
        classes = self.class_indices(organs)
        n_slices, n_organs = images.shape[0], len(classes)
        batch = batch_size or default_batch_size(self.device, self.config)
        device = self.device
        out = torch.zeros((n_slices, n_organs, *images.shape[-2:]), dtype=torch.float32, device=images.device)
        distances = torch.zeros((n_slices, n_organs), dtype=torch.float32, device=images.device)
        measure = return_distances or skip_decode_radius > 0
        empty = self._cached_empty_latent() if measure else None  # checked once per call, not per batch
        noises = [self.initial_noise(seed + n) for n in range(num_samples)]
        class_tensor = torch.tensor(classes, dtype=torch.long, device=device)
        # A model cast by cast_for_inference runs in its dtype; autocast would put its GroupNorms back in fp32.
        with autocast(device, precision) if self.cast_dtype is None else contextlib.nullcontext():
            slices = slices_per_call(device, batch)
            cond = torch.cat([self.encode_images(images[i : i + slices].to(device)) for i in range(0, n_slices, slices)])
            for start in range(0, n_slices * n_organs, batch):
                pairs = torch.arange(start, min(start + batch, n_slices * n_organs), device=device)
                slice_idx, organ_idx = pairs // n_organs, pairs % n_organs
                c, cls = cond[slice_idx], class_tensor[organ_idx]
                latents = [self.reverse(c, cls, noise, num_steps) for noise in noises]
                if measure:
                    distance = torch.stack([_latent_distance(z, empty) for z in latents]).amax(dim=0)
                    distances[slice_idx.to(distances.device), organ_idx.to(distances.device)] = distance.float().to(distances.device)
                if skip_decode_radius > 0:
                    decode = (distance >= skip_decode_radius).nonzero()[:, 0]
                    if not len(decode):
                        continue  # the skipped pairs keep their zero maps
                    if len(decode) < len(pairs):
                        latents, slice_idx, organ_idx = [z[decode] for z in latents], slice_idx[decode], organ_idx[decode]
                prob = sum(self.decode_probabilities(z) for z in latents)
                prob = (prob / num_samples).float().to(out.device)
                out[slice_idx.to(out.device), organ_idx.to(out.device)] = prob
        return (out, distances) if return_distances else out

    def _check_predict_arguments(self, images, batch_size, num_steps, num_samples, seed, skip_decode_radius, num_shifts):
        """:meth:`predict`'s refusals of plain misuse, each in one line (no tensor is read: cheap)."""
        size = self.config.preprocessing.slice_size
        expected = f"(S, 3, {size}, {size}) (this model's slice size is {size})"
        if not isinstance(images, torch.Tensor):
            raise SDSegInputError(f"images must be a torch.Tensor of shape {expected}, got {type(images).__name__}")
        if images.ndim != 4 or tuple(images.shape[1:]) != (3, size, size):
            raise SDSegInputError(f"expected image slices of shape {expected}, got {tuple(images.shape)}")
        if not images.shape[0]:
            raise SDSegInputError("no image slices to segment (S = 0)")
        if not images.is_floating_point():
            raise SDSegInputError(f"images must be floating point, in [-1, 1], got {images.dtype}")
        if batch_size is not None and not (_is_int(batch_size) and batch_size >= 1):
            raise SDSegInputError(f"batch_size must be a positive integer (or None: automatic), got {batch_size!r}")
        steps = self.config.num_train_timesteps
        if not (_is_int(num_steps) and 1 <= num_steps <= steps):
            raise SDSegInputError(f"num_steps must be an integer in 1..{steps} (the schedule's steps), got {num_steps!r}")
        if not (_is_int(num_samples) and num_samples >= 1):
            raise SDSegInputError(f"num_samples must be a positive integer, got {num_samples!r}")
        check_seed(seed)
        if not (isinstance(skip_decode_radius, numbers.Real) and skip_decode_radius >= 0):
            raise SDSegInputError(f"skip_decode_radius must be >= 0, got {skip_decode_radius!r}")
        check_num_shifts(num_shifts)

    def _predict_shifted(self, images: torch.Tensor, organs, num_shifts: int, return_distances: bool, **options):
        """:meth:`predict` averaged over the shifts of :data:`SHIFT_OFFSETS`: each pass rolls the
        slices (their borders are background) and rolls its maps back."""
        cell = images.shape[-1] // self.config.latent_size
        total, distances = None, None
        for dy, dx in SHIFT_OFFSETS[num_shifts]:
            offset = (dy * cell // 2, dx * cell // 2)
            shifted = torch.roll(images, offset, dims=(-2, -1))
            maps, distance = self.predict(shifted, organs, return_distances=True, **options)
            maps = torch.roll(maps, (-offset[0], -offset[1]), dims=(-2, -1))
            total = maps if total is None else total.add_(maps)
            distances = distance if distances is None else torch.maximum(distances, distance)
        total /= num_shifts
        return (total, distances) if return_distances else total

    # -- persistence --------------------------------------------------------------------------------
    def save_pretrained(self, path: str | os.PathLike, dtype: torch.dtype | None = None) -> Path:
        """Write ``config.json`` + ``model.safetensors`` to folder ``path``, atomically.

        Args:
            path: the model folder (replaced whole if it holds an earlier model; a non-empty folder
                holding none is refused, see :func:`check_output_folder`).
            dtype: store floating-point weights in this dtype (e.g. ``torch.float16`` halves the
                size of a packaged model): ``torch.float32``, ``float16``, ``bfloat16`` or ``float64``,
                or its name (``"float16"`` or ``"fp16"``...); loading always restores the model's own dtype.
        """
        from safetensors.torch import save_file

        dtype = None if dtype is None else storage_dtype(dtype)
        if self.config.latent_scale is None:
            raise SDSegInputError("cannot save a model whose latent scale is not set (call fit_latent_scale)")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
        try:
            (tmp / CONFIG_NAME).write_text(self.config.to_json_string(), encoding="utf-8")
            state = {k: v.detach().to("cpu").contiguous() for k, v in self.state_dict().items()}
            if dtype is not None:
                state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
            # One metadata key: safetensors writes them in a hash map's random order, so two keys made the
            # same model's bytes (and its model_hash) differ from one save to the next.
            save_file(state, tmp / WEIGHTS_NAME, metadata={"format": "pt"})
            replace_dir(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return path

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> SDSeg:
        """Load a model folder written by :meth:`save_pretrained`, or a MONAI bundle folder written by
        :func:`sdseg_monai.bundle.export_bundle`, in eval mode.

        Args:
            path: the model or bundle folder.
            device: ``"auto"`` (CUDA when present), ``"cpu"``, ``"cuda"``, ``"cuda:N"`` (see
                :func:`resolve_device`).

        Loading leaves the caller's global random state as it was.
        """
        from sdseg_monai.weights import load_state_into, read_state_dict

        target = resolve_device(device)
        config_path, weights_path = model_files(path)
        config = SDSegConfig.from_json_file(config_path)
        if config.latent_scale is None:
            raise SDSegInputError("model config has no latent_scale", config_path)
        try:
            with preserved_rng():
                model = cls(config)
        except (TypeError, ValueError, KeyError, IndexError) as e:  # diffusers refuses the network's shape
            raise SDSegInputError(f"invalid network in the model config ({type(e).__name__}: {e})", config_path) from None
        load_state_into(model, read_state_dict(weights_path), weights_path, what="SDSeg model")
        model.name_or_path = os.fspath(path)  # where it came from: sidecars record it, writers keep out of it
        return model.to(target).eval()

    def describe(self) -> dict:
        """Parameter counts per part, for logs and model cards."""
        count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
        return {
            "autoencoder": count(self.autoencoder),
            "vision_encoder": count(self.vision_encoder),
            "unet": count(self.unet),
            "organs": self.config.organ_names,
        }

    def __repr__(self) -> str:
        return f"SDSeg({json.dumps(self.describe())})"


DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "default_model"


def model_files(path: str | os.PathLike) -> tuple[Path, Path]:
    """(config, weights) of a saved model folder, or of a MONAI bundle folder; refuses anything else."""
    path = Path(path)
    if not path.exists():
        raise SDSegInputError("no such model folder", path)
    if path.is_dir() and (path / CONFIG_NAME).is_file():
        return path / CONFIG_NAME, path / WEIGHTS_NAME
    if path.is_dir() and (path / BUNDLE_CONFIG_NAME).is_file():
        return path / BUNDLE_CONFIG_NAME, path / BUNDLE_WEIGHTS_NAME
    raise SDSegInputError(f"not an SDSeg model folder (no {CONFIG_NAME}) nor an SDSeg MONAI bundle (no {BUNDLE_CONFIG_NAME})", path)


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes, read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def model_hash(path: str | os.PathLike) -> str:
    """Short fingerprint of a saved model or bundle: its config and weights (recorded with outputs)."""
    config, weights = model_files(path)
    return hashlib.sha256((file_sha256(config) + file_sha256(weights)).encode()).hexdigest()[:16]


def default_model_path() -> Path | None:
    """The model folder shipped inside the package, or None when this build has none."""
    return DEFAULT_MODEL_DIR if (DEFAULT_MODEL_DIR / CONFIG_NAME).is_file() else None


def check_output_folder(
    target: str | os.PathLike, *inputs: str | os.PathLike | None, roots: Iterable[str | os.PathLike | None] = ()
) -> Path:
    """Refuse, before any compute, an output folder that :func:`replace_dir` must not replace: a file,
    an input (model, manifest, volume) or a folder above one, a folder inside an input folder, one
    that is or holds a data root (``roots``; see :func:`~sdseg_monai.data.check_spares_inputs`), or an
    existing folder that is not empty and holds no saved model, autoencoder or bundle (a run folder,
    a data root, a home)."""
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise SDSegInputError("output must be a folder, and a file of that name exists", target)
    check_spares_inputs([target], inputs, roots)
    if target.is_dir() and any(target.iterdir()) and not any((target / marker).is_file() for marker in REPLACEABLE_MARKERS):
        raise SDSegInputError("output folder exists and holds no saved model; refusing to replace it (choose a new or empty folder)", target)
    return target


# What an earlier output of ours holds: a model or autoencoder (config.json) or a MONAI bundle.
REPLACEABLE_MARKERS = (CONFIG_NAME, BUNDLE_CONFIG_NAME, "configs/metadata.json")


def replace_dir(new: Path, target: Path, *inputs: str | os.PathLike | None) -> None:
    """Move folder ``new`` to ``target``; an existing ``target`` is swapped out, never half-overwritten,
    and only when :func:`check_output_folder` allows it (``inputs`` are never replaced)."""
    check_output_folder(target, *inputs)
    os.chmod(new, 0o777 & ~current_umask())  # mkdtemp makes 0700; a model folder gets ordinary permissions
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", dir=target.parent))
        old.rmdir()
        os.replace(target, old)
        os.replace(new, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(new, target)


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``"auto"``: the first CUDA GPU when present, else the CPU."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise SDSegInputError(f"device must be auto, cpu, cuda or cuda:N, got {device!r}") from None
    if device.type == "cpu" and device.index in (None, 0):
        return torch.device("cpu")
    if device.type != "cuda":
        raise SDSegInputError(f"device must be auto, cpu, cuda or cuda:N, got {str(device)!r}")
    if not torch.cuda.is_available():
        raise SDSegInputError(f"device {device} requested but CUDA is not available")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise SDSegInputError(f"device {device} requested but this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


MAX_CUDA_BATCH = 1024


def decoder_bytes_per_pair(config: SDSegConfig) -> int:
    """A generous estimate of the decoder's peak activation memory for one (slice, organ) pair, in
    bytes: six fp32 copies of its largest feature map (normalised, activated, convolved, upsampled).
    The decoder dominates inference memory (its widest maps are at the full slice size)."""
    size = int(config.preprocessing.slice_size)
    channels = [int(c) for c in config.autoencoder["block_out_channels"]]
    largest = max(c * (size >> level) ** 2 for level, c in enumerate(channels))
    return 6 * 4 * largest


# (slice, organ) pairs per UNet call on a CPU. The UNet's maps are small (32x32 latents), so a larger
# batch feeds oneDNN more work per layer: 10.6 ms/pair at 64 against 12.3 at 8 in bf16, 16 against 19.4
# in fp32, flat from 32 up; the 512x512x100 phantom, 13 organs, bf16: 50.5 -> 48.6 s (2 EPYC cores,
# benchmarks/cpu_batch.py). The decoder and the vision encoder, whose maps are full-size, run in small calls anyway.
CPU_BATCH_SIZE = 64

# Slices per vision-encoder call (and per chunk of a volume) on a CPU: the encoder's ms/slice is flat
# from 8 slices up (bf16, 2 EPYC cores), and full-size maps grow with the slices (64 slices: about
# 0.4 GB a map in the encoder, and one organ segmented 1.1x slower with 1.37 GB peak RSS, not 1.01).
CPU_SLICES_PER_CALL = 8


def slices_per_call(device: torch.device, slices: int) -> int:
    """How many of ``slices`` one vision-encoder call (or one chunk of a volume) takes on ``device``:
    at most :data:`CPU_SLICES_PER_CALL` on a CPU, all of them on a GPU."""
    return slices if device.type == "cuda" else min(slices, CPU_SLICES_PER_CALL)


def default_batch_size(device: torch.device, config: SDSegConfig | None = None) -> int:
    """(slice, organ) pairs per forward when the caller gives none: :data:`CPU_BATCH_SIZE` on a CPU; on
    a GPU, as many as half its free memory holds (by :func:`decoder_bytes_per_pair`), 4 to
    :data:`MAX_CUDA_BATCH`."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        per_pair = decoder_bytes_per_pair(config) if config is not None else 1 << 30
        return int(max(4, min(MAX_CUDA_BATCH, free // 2 // per_pair)))
    return CPU_BATCH_SIZE


PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AMX or AVX-512 BF16); elsewhere bf16 is emulated, slower."""
    for probe in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
        check = getattr(torch.cpu, probe, None)
        try:
            if check is not None and check():
                return True
        except RuntimeError:
            continue
    return False


def resolve_precision(device: torch.device, precision: str = "auto", config: SDSegConfig | None = None) -> str:
    """The precision ``"auto"`` means on ``device`` for a model of ``config``: bf16 on a CPU with AMX or
    AVX-512 BF16 (2.35x faster end to end on 2 AMX cores, issue 19); fp32 on other CPUs, where bf16
    is emulated, and on CUDA, where bf16 autocast measured slower than fp32 (TF32 convolutions) on an
    H200 and the all-bf16 network of :meth:`SDSeg.cast_for_inference` is not measured yet. Always
    fp32 for a model that predicts the noise (the paper and sd-v1 presets): its one step divides the
    UNet's output by sqrt(abar_{T-1}) (1/38.7 on the LDM schedule), so bf16's rounding of the noise
    (rms 0.065 on unit latents, against fp16's 0.008) would reach z0 as it is. Explicit choices are
    returned as given."""
    if precision not in PRECISIONS:
        raise SDSegInputError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision != "auto":
        return precision
    if config is not None and config.prediction_type == "epsilon":
        return "fp32"
    return "bf16" if device.type == "cpu" and cpu_has_fast_bf16() else "fp32"


# The floating dtypes a model runs (and is saved) in, by the names precisions have here.
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}


def precision_dtype(precision: str) -> torch.dtype:
    """The torch dtype of an explicit precision (``"fp32"``, ``"bf16"``, ``"fp16"``)."""
    return {name: dtype for dtype, name in DTYPE_NAMES.items()}[precision]


def storage_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """A dtype :meth:`SDSeg.save_pretrained` may store weights in (one of :data:`DTYPE_NAMES`, which
    :meth:`SDSeg.from_pretrained` reads back), given as a ``torch.dtype`` or by name (``"float16"``,
    ``"fp16"``); anything else (integers, float8) is refused before anything is written."""
    if isinstance(dtype, str):
        names = {name: d for d, name in DTYPE_NAMES.items()} | {str(d).removeprefix("torch."): d for d in DTYPE_NAMES}
        found = names.get(dtype.removeprefix("torch."))
    else:
        found = dtype if isinstance(dtype, torch.dtype) and dtype in DTYPE_NAMES else None
    if found is None:
        raise SDSegInputError(f"dtype to save weights in must be float32, float16, bfloat16 or float64, got {dtype!r}")
    return found


def autocast(device: torch.device, precision: str = "auto", config: SDSegConfig | None = None):
    """Mixed precision for inference, as :func:`resolve_precision` decides; none for fp32."""
    precision = resolve_precision(device, precision, config)
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=precision_dtype(precision))
