"""Offline weight loading: diffusers folders, single-file LDM / SD checkpoints, SDSeg from pretrained parts.

Every model here is a seeded toy of the real layout (SD v1 VAE and UNet, LDM UNet2DModel), written to
``tmp_path`` in the formats found in the wild, so the whole file runs in seconds on a CPU.
"""

from __future__ import annotations

import copy
import os
import re
import subprocess
import sys

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel, UNet2DModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint
from safetensors.torch import save_file

from ldm_keys import LDM_VAE_PREFIX, unet_to_ldm, vae_to_ldm
from sdseg_monai.errors import WeightsError
from sdseg_monai.model import set_attention_heads
from sdseg_monai.weights import load_autoencoder, load_unet, sdseg_from_pretrained_parts

VAE_CONFIG = {
    "block_out_channels": [8, 16, 16, 16],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 8,
    "sample_size": 32,
}
COND_UNET_CONFIG = {
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": [32, 64],
    "layers_per_block": 2,
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "cross_attention_dim": 32,
    "attention_head_dim": 8,
    "norm_num_groups": 8,
}
# An LDM-style UNet2DModel (the paper's denoiser family); widths divisible by the preset's 8 heads.
UNET2D_CONFIG = {
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": [32, 64],
    "layers_per_block": 1,
    "down_block_types": ["AttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "AttnUpBlock2D"],
    "attention_head_dim": 8,
    "norm_num_groups": 8,
    "resnet_time_scale_shift": "scale_shift",
}
ORGANS = ["spleen", "liver", "pancreas"]


def seeded(cls, config: dict, seed: int):
    """A model with seeded weights, every parameter perturbed so that norms and biases are not the
    defaults (1 / 0): a loader that skipped or swapped any tensor then changes the outputs."""
    torch.manual_seed(seed)
    model = cls.from_config(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def assert_same_state(a: torch.nn.Module | dict, b: torch.nn.Module | dict) -> None:
    """Same tensor names, and every tensor bit-identical."""
    a = a if isinstance(a, dict) else a.state_dict()
    b = b if isinstance(b, dict) else b.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def raises_one_line(path, func, *args, **kwargs) -> str:
    """Run ``func``; it must raise a one-line WeightsError that starts with ``path``. Returns the text."""
    with pytest.raises(WeightsError) as info:
        func(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: "), message
    return message


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def pretrained():
    """Seeded toy SD v1 VAE, SD v1 UNet and LDM UNet2DModel."""
    return {
        "vae": seeded(AutoencoderKL, VAE_CONFIG, 0),
        "unet": seeded(UNet2DConditionModel, COND_UNET_CONFIG, 1),
        "unet2d": seeded(UNet2DModel, UNET2D_CONFIG, 2),
    }


@pytest.fixture(scope="module")
def files(pretrained, tmp_path_factory):
    """The pretrained models in every on-disk format the loaders accept."""
    root = tmp_path_factory.mktemp("weights")
    out = {"pipeline": root / "sd", "unet2d": root / "unet2d"}
    pretrained["vae"].save_pretrained(out["pipeline"] / "vae")
    pretrained["unet"].save_pretrained(out["pipeline"] / "unet")
    pretrained["unet2d"].save_pretrained(out["unet2d"])
    # A whole SD v1 checkpoint: VAE, UNet and the other tensors such files carry besides them.
    full = {
        **vae_to_ldm(pretrained["vae"].state_dict(), prefix=LDM_VAE_PREFIX),
        **unet_to_ldm(pretrained["unet"].state_dict()),
        "cond_stage_model.transformer.text_model.final_layer_norm.weight": torch.ones(32),
        "alphas_cumprod": torch.linspace(1, 0, 1000),
        "model_ema.decay": torch.tensor(0.9999),
    }
    full = {k: v.contiguous() for k, v in full.items()}
    out["safetensors"] = root / "sd.safetensors"
    save_file(full, out["safetensors"])
    out["ckpt"] = root / "sd.ckpt"
    torch.save({"state_dict": full, "global_step": 470000}, out["ckpt"])
    # A bare kl-f8 first-stage checkpoint, with the training-loss tensors the LDM release ships.
    bare = {
        **vae_to_ldm(pretrained["vae"].state_dict()),
        "loss.logvar": torch.zeros(()),
        "loss.discriminator.main.0.weight": torch.randn(8, 3, 4, 4),
    }
    out["klf8"] = root / "kl-f8.ckpt"
    torch.save({"state_dict": bare}, out["klf8"])
    return out


def vae_out(vae, x):
    """The autoencoder's reconstruction of ``x``."""
    return vae(x).sample  # decode(posterior mode): deterministic


def unet_out(unet, z, t, context=None):
    """The UNet's prediction (cross-attending to ``context`` when given)."""
    kwargs = {} if context is None else {"encoder_hidden_states": context}
    return unet(z, t, **kwargs).sample


@pytest.fixture(scope="module")
def inputs():
    """Seeded images, latents, timesteps and a text context for the toy models."""
    g = torch.Generator().manual_seed(3)
    return {
        "x": torch.rand((2, 3, 32, 32), generator=g) * 2 - 1,
        "z": torch.randn((2, 4, 8, 8), generator=g),
        "t": torch.tensor([10, 999]),
        "context": torch.randn((2, 1, 32), generator=g),
    }


# -- the LDM key helper ---------------------------------------------------------------------------


@pytest.mark.parametrize("what", ["vae", "unet-2-layers", "unet-1-layer-class-embeds"])
def test_ldm_key_helper_round_trips_through_diffusers_converters(what):
    if what == "vae":
        config, model = VAE_CONFIG, seeded(AutoencoderKL, VAE_CONFIG, 0)
        ldm = vae_to_ldm(model.state_dict(), prefix=LDM_VAE_PREFIX)
        back = convert_ldm_vae_checkpoint(ldm, config)
        # The original names and the 1x1-conv attention weights of the CompVis kl-f8 autoencoder.
        assert ldm["first_stage_model.encoder.mid.attn_1.q.weight"].shape == (16, 16, 1, 1)
        first_up = model.decoder.up_blocks[0].resnets[0].conv1.weight
        assert torch.equal(ldm["first_stage_model.decoder.up.3.block.0.conv1.weight"], first_up)
        for key in ("encoder.down.1.block.0.nin_shortcut.weight", "encoder.down.0.downsample.conv.weight",
                    "decoder.up.1.upsample.conv.weight", "decoder.mid.block_2.norm2.bias", "encoder.norm_out.weight",
                    "quant_conv.weight", "post_quant_conv.bias", "decoder.mid.attn_1.proj_out.weight"):
            assert LDM_VAE_PREFIX + key in ldm, key
    else:
        config = dict(COND_UNET_CONFIG)
        if what == "unet-1-layer-class-embeds":
            config.update(layers_per_block=1, num_class_embeds=3)
        model = seeded(UNet2DConditionModel, config, 1)
        ldm = unet_to_ldm(model.state_dict())
        back = convert_ldm_unet_checkpoint(ldm, config)
        p = "model.diffusion_model."
        if what == "unet-2-layers":  # SD v1's numbering, at 2 levels
            expected = ("time_embed.2.weight", "input_blocks.0.0.weight", "input_blocks.1.0.in_layers.2.weight",
                        "input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight", "input_blocks.3.0.op.weight",
                        "input_blocks.4.0.skip_connection.weight", "input_blocks.5.0.emb_layers.1.bias",
                        "middle_block.1.proj_in.weight", "middle_block.2.out_layers.3.weight",
                        "output_blocks.2.1.conv.weight", "output_blocks.5.1.proj_out.bias", "out.0.weight",
                        "out.2.bias")
        else:
            expected = ("label_emb.weight", "input_blocks.2.0.op.weight", "output_blocks.1.1.conv.weight")
        for key in expected:
            assert p + key in ldm, key
    assert len(ldm) == len(model.state_dict())
    assert_same_state(back, model)


# -- loading diffusers folders and single files ---------------------------------------------------


@pytest.mark.parametrize("layout", ["pipeline-root", "component-folder"])
def test_diffusers_folder_loads_to_identical_models(layout, files, pretrained, inputs):
    root = files["pipeline"]
    vae_src, unet_src = (root, root) if layout == "pipeline-root" else (root / "vae", root / "unet")
    vae = load_autoencoder(vae_src)
    assert_same_state(vae, pretrained["vae"])
    assert torch.equal(vae_out(vae, inputs["x"]), vae_out(pretrained["vae"], inputs["x"]))
    unet = load_unet(unet_src)
    assert isinstance(unet, UNet2DConditionModel)
    args = inputs["z"], inputs["t"], inputs["context"]
    assert torch.equal(unet_out(unet, *args), unet_out(pretrained["unet"], *args))
    unet2d = load_unet(files["unet2d"])
    assert isinstance(unet2d, UNet2DModel)
    args = inputs["z"], inputs["t"]
    assert torch.equal(unet_out(unet2d, *args), unet_out(pretrained["unet2d"], *args))


@pytest.mark.parametrize("fmt", ["safetensors", "ckpt"])
def test_single_sd_file_in_ldm_keys_loads_to_identical_models(fmt, files, pretrained, inputs):
    # Config as a dict for the VAE, as a diffusers folder for the UNet.
    vae = load_autoencoder(files[fmt], config=VAE_CONFIG)
    assert_same_state(vae, pretrained["vae"])
    assert torch.equal(vae_out(vae, inputs["x"]), vae_out(pretrained["vae"], inputs["x"]))
    unet = load_unet(files[fmt], config=files["pipeline"] / "unet")
    assert_same_state(unet, pretrained["unet"])
    args = inputs["z"], inputs["t"], inputs["context"]
    assert torch.equal(unet_out(unet, *args), unet_out(pretrained["unet"], *args))


def test_single_file_with_a_partial_config_falls_back_to_diffusers_defaults(files, pretrained):
    # layers_per_block=2 is diffusers' default; LDM-key conversion must not need it spelled out.
    config = {k: v for k, v in COND_UNET_CONFIG.items() if k != "layers_per_block"}
    unet = load_unet(files["safetensors"], config=config)
    assert unet.config.layers_per_block == 2
    assert_same_state(unet, pretrained["unet"])


def test_bare_klf8_checkpoint_with_loss_tensors_loads(files, pretrained, inputs):
    vae = load_autoencoder(files["klf8"], config=files["pipeline"] / "vae")
    assert_same_state(vae, pretrained["vae"])
    assert torch.equal(vae_out(vae, inputs["x"]), vae_out(pretrained["vae"], inputs["x"]))


# -- SDSeg from pretrained parts -----------------------------------------------------------------


def check_parts(model, pretrained_vae, pretrained_unet, organs, inputs, context):
    """The shared facts of a fresh SDSeg model built on pretrained parts."""
    assert_same_state(model.autoencoder, pretrained_vae)
    assert_same_state(model.vision_encoder.encoder, pretrained_vae.encoder)
    # conv_in: pretrained weights on the noisy-latent channels, zeros on the image-latent ones.
    weight, old = model.unet.conv_in.weight, pretrained_unet.conv_in.weight
    assert weight.shape == (old.shape[0], 8, *old.shape[2:])
    assert torch.equal(weight[:, :4], old)
    assert torch.count_nonzero(weight[:, 4:]) == 0
    assert torch.equal(model.unet.conv_in.bias, pretrained_unet.conv_in.bias)
    state = model.unet.state_dict()
    if len(organs) > 1:
        assert state["class_embedding.weight"].shape == (len(organs), model.unet.time_embedding.linear_1.out_features)
        assert torch.count_nonzero(state["class_embedding.weight"]) == 0
    else:
        assert not any(k.startswith("class_embedding") for k in state)
    # Zero-init equivalence: whatever the image latent and organ, the new UNet computes the pretrained one.
    z, t = inputs["z"], inputs["t"]
    expected = unet_out(pretrained_unet, z, t, context)
    for seed in (0, 1):
        g = torch.Generator().manual_seed(seed)
        cond = torch.randn(z.shape, generator=g) * 3
        class_ids = torch.randint(0, len(organs), (z.shape[0],), generator=g) if len(organs) > 1 else None
        out = model.denoise(z, cond, t, class_ids)
        assert out.shape == z.shape
        assert torch.allclose(out, expected, atol=1e-5), (out - expected).abs().max()
    return expected


@pytest.mark.parametrize("organs", [ORGANS, ["liver"]], ids=["3-organs", "1-organ"])
@pytest.mark.parametrize("source", ["pipeline", "safetensors", "ckpt"])
def test_sd_v1_model_from_pretrained_parts_starts_as_the_pretrained_unet(source, organs, files, pretrained, inputs):
    configs = {} if source == "pipeline" else {"unet_config": COND_UNET_CONFIG, "autoencoder_config": VAE_CONFIG}
    model = sdseg_from_pretrained_parts(
        "sd-v1", stable_diffusion=files[source], dataset="btcv", organs=organs, **configs
    ).eval()
    assert model.config.organ_names == organs
    assert model.config.backbone == "unet2d_condition" and isinstance(model.unet, UNet2DConditionModel)
    context = model.null_context.expand(inputs["z"].shape[0], -1, -1)
    with torch.no_grad():
        check_parts(model, pretrained["vae"], pretrained["unet"], organs, inputs, context)


def attention_heads(unet) -> list[int]:
    """The head count of each attention layer of a UNet, in order."""
    return [a.heads for a in unet.modules() if hasattr(a, "heads")]


@pytest.mark.parametrize("organs", [ORGANS, ["liver"]], ids=["3-organs", "1-organ"])
def test_paper_model_from_pretrained_parts_starts_as_the_pretrained_unet(organs, files, pretrained, inputs, tmp_path):
    from sdseg_monai.model import SDSeg

    model = sdseg_from_pretrained_parts(
        "paper", autoencoder=files["klf8"], autoencoder_config=VAE_CONFIG, unet=files["unet2d"],
        dataset="btcv", organs=organs,
    ).eval()
    # A diffusers UNet keeps its own attention layout (head width 8: 4 heads at width 32, 8 at 64),
    # not the preset's 8 heads everywhere, which would make it compute something else.
    assert isinstance(model.unet, UNet2DModel) and model.config.attention_heads is None
    assert attention_heads(model.unet) == attention_heads(pretrained["unet2d"]) and 4 in attention_heads(model.unet)
    eight = copy.deepcopy(pretrained["unet2d"])
    set_attention_heads(eight, 8)
    with torch.no_grad():
        expected = check_parts(model, pretrained["vae"], pretrained["unet2d"], organs, inputs, None)
        assert (unet_out(eight, inputs["z"], inputs["t"]) - expected).abs().max() > 1e-3  # heads change the function
    # The layout is in the config: the saved model rebuilds it.
    model.config.latent_scale = 0.5
    loaded = SDSeg.from_pretrained(model.save_pretrained(tmp_path / "model"))
    assert attention_heads(loaded.unet) == attention_heads(pretrained["unet2d"])
    classes = torch.zeros(2, dtype=torch.long) if len(organs) > 1 else None
    with torch.no_grad():
        args = (inputs["z"], torch.ones_like(inputs["z"]), inputs["t"], classes)
        assert torch.equal(loaded.denoise(*args), model.denoise(*args))


def test_heads_named_for_a_pretrained_unet_are_the_callers_choice(files, pretrained):
    """A diffusers folder saved from an LDM conversion lost its heads (diffusers stores a head width):
    naming them puts them back, in the model and in its config."""
    model = sdseg_from_pretrained_parts(
        "paper", autoencoder=files["klf8"], autoencoder_config=VAE_CONFIG, unet=files["unet2d"],
        organs=["liver"], attention_heads=8,
    ).eval()
    assert model.config.attention_heads == 8 and set(attention_heads(model.unet)) == {8}
    reference = copy.deepcopy(pretrained["unet2d"])
    set_attention_heads(reference, 8)
    z, t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([10, 999])
    with torch.no_grad():
        assert torch.allclose(model.denoise(z, torch.zeros_like(z), t, None), unet_out(reference, z, t), atol=1e-5)


def test_a_latent_scale_taken_from_the_autoencoder_is_the_models(files):
    model = sdseg_from_pretrained_parts(
        "paper", autoencoder=files["klf8"], autoencoder_config=VAE_CONFIG, unet=files["unet2d"],
        organs=["liver"], latent_scale_source="autoencoder",
    )
    assert model.config.latent_scale == pytest.approx(0.18215)  # diffusers' scaling_factor, VAE_CONFIG names none


def test_loading_parts_leaves_the_global_random_state_alone(files):
    """Loaders build networks whose random initial weights the file's replace: the caller's random
    state must not move (a seeded experiment would draw other numbers after a load)."""
    state = torch.get_rng_state()
    load_autoencoder(files["klf8"], VAE_CONFIG)
    load_unet(files["unet2d"])
    assert torch.equal(torch.get_rng_state(), state)


# -- bad inputs: one line, naming the file --------------------------------------------------------


def test_missing_paths_and_folders_without_config_or_weights(tmp_path):
    missing = tmp_path / "nowhere"
    assert "no such file or folder" in raises_one_line(missing, load_autoencoder, missing)
    message = raises_one_line(missing, sdseg_from_pretrained_parts, "sd-v1", stable_diffusion=missing)
    assert "no such file or folder" in message
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("hi")
    message = raises_one_line(tmp_path / "empty", load_unet, tmp_path / "empty")
    assert "unet/config.json" in message and "config.json found" in message
    (tmp_path / "noweights").mkdir()
    (tmp_path / "noweights" / "config.json").write_text('{"_class_name": "AutoencoderKL"}')
    assert "no weights file" in raises_one_line(tmp_path / "noweights", load_autoencoder, tmp_path / "noweights")


def test_corrupt_safetensors_is_refused(tmp_path):
    bad = tmp_path / "broken.safetensors"
    noise = torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    bad.write_bytes(noise.numpy().tobytes())
    assert "cannot read weights" in raises_one_line(bad, load_unet, bad, config=COND_UNET_CONFIG)


@pytest.mark.parametrize("part", ["vae", "unet"])
def test_checkpoint_of_a_differently_sized_model_names_tensor_and_both_shapes(part, tmp_path):
    if part == "vae":  # wider decoder/encoder at the last level
        other = seeded(AutoencoderKL, {**VAE_CONFIG, "block_out_channels": [8, 16, 16, 24]}, 5)
        state, config, load = vae_to_ldm(other.state_dict(), prefix=LDM_VAE_PREFIX), VAE_CONFIG, load_autoencoder
        own = AutoencoderKL.from_config(VAE_CONFIG).state_dict()
    else:  # another text encoder width
        other = seeded(UNet2DConditionModel, {**COND_UNET_CONFIG, "cross_attention_dim": 48}, 5)
        state, config, load = unet_to_ldm(other.state_dict()), COND_UNET_CONFIG, load_unet
        own = UNet2DConditionModel.from_config(COND_UNET_CONFIG).state_dict()
    path = tmp_path / "other.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, path)
    message = raises_one_line(path, load, path, config=config)
    # Which misfit tensor is named first is not fixed; whichever it is, its two shapes must be right.
    match = re.search(r"(\S+) has shape (\([\d, ]+\)) in the file, (\([\d, ]+\)) in the model", message)
    assert match, message
    key = match.group(1)
    assert match.group(2) == str(tuple(other.state_dict()[key].shape))
    assert match.group(3) == str(tuple(own[key].shape))
    assert match.group(2) != match.group(3)


UNPICKLED = []


def _record(value):
    UNPICKLED.append(value)
    return value


class Payload:
    """A pickled object that would run ``_record`` if a loader unpickled it."""

    def __reduce__(self):
        return (_record, ("ran",))


def test_ckpt_with_pickled_objects_is_refused_without_running_them(files, tmp_path):
    state = torch.load(files["ckpt"], weights_only=True)["state_dict"]
    path = tmp_path / "sneaky.ckpt"
    torch.save({"state_dict": state, "callback": Payload()}, path)
    message = raises_one_line(path, load_autoencoder, path, config=VAE_CONFIG)
    assert "holds pickled objects besides tensors" in message and "safetensors" in message
    assert UNPICKLED == []


def test_ldm_unet_file_for_a_unet2d_model_is_refused(files):
    config = {"_class_name": "UNet2DModel", **UNET2D_CONFIG}
    message = raises_one_line(files["safetensors"], load_unet, files["safetensors"], config=config)
    assert "Stable Diffusion UNets only" in message


def test_preset_given_the_other_unet_class_is_refused(files):
    message = raises_one_line(
        files["pipeline"], sdseg_from_pretrained_parts, "paper", autoencoder=files["pipeline"], unet=files["pipeline"]
    )
    assert "the paper preset needs a UNet2DModel, not a UNet2DConditionModel" in message
    message = raises_one_line(
        files["unet2d"], sdseg_from_pretrained_parts, "sd-v1", stable_diffusion=files["pipeline"], unet=files["unet2d"]
    )
    assert "the sd-v1 preset needs a UNet2DConditionModel, not a UNet2DModel" in message


def test_importing_the_package_forces_hf_hub_offline():
    # A fresh interpreter, since this one imported sdseg_monai long ago; the user's "0" must not win.
    code = (
        "import os, sdseg_monai; import huggingface_hub.constants as c; "
        "print(os.environ['HF_HUB_OFFLINE'], c.HF_HUB_OFFLINE)"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "0"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["1", "True"]
    assert os.environ["HF_HUB_OFFLINE"] == "1"


def test_official_lightning_checkpoints_load_and_pickled_code_never_runs(tmp_path, monkeypatch):
    """sd-v1-*.ckpt and the LDM model.ckpt files pickle a Lightning ModelCheckpoint (numpy scalars in
    its state) beside the state dict: weights_only refuses them, yet their tensors must load, without
    Lightning installed and without running pickled code."""
    import os
    import sys
    import types

    import numpy as np

    from sdseg_monai.errors import WeightsError
    from sdseg_monai.weights import read_state_dict

    lightning = types.ModuleType("pytorch_lightning.callbacks.model_checkpoint")

    class ModelCheckpoint:
        def __init__(self):
            self.best_model_score, self.monitor, self.kth_value = torch.tensor(0.1), "val/loss", np.float64(0.5)

    ModelCheckpoint.__module__, ModelCheckpoint.__qualname__ = lightning.__name__, "ModelCheckpoint"
    lightning.ModelCheckpoint = ModelCheckpoint
    state = {"model.diffusion_model.out.2.weight": torch.randn(4, 8, 3, 3), "first_stage_model.x": torch.nn.Parameter(torch.ones(2))}
    checkpoint = tmp_path / "sd-v1-4.ckpt"
    with monkeypatch.context() as patch:  # Lightning exists only while the checkpoint is written
        for name in ("pytorch_lightning", "pytorch_lightning.callbacks", lightning.__name__):
            patch.setitem(sys.modules, name, lightning)
        torch.save({"state_dict": state, "callbacks": {ModelCheckpoint: ModelCheckpoint()}, "epoch": 6,
                    "global_step": np.int64(470000), "pytorch-lightning_version": "1.4.2"}, checkpoint)
        # The same with a numpy scalar pickled before the callback: weights_only names numpy first.
        torch.save({"global_step": np.int64(470000), "state_dict": state, "callbacks": {ModelCheckpoint: ModelCheckpoint()}},
                   tmp_path / "numpy_first.ckpt")
    assert "pytorch_lightning" not in sys.modules
    with pytest.raises(Exception, match="pytorch_lightning"):  # why the plain weights_only load is not enough
        torch.load(checkpoint, weights_only=True)
    for path in (checkpoint, tmp_path / "numpy_first.ckpt"):
        loaded = read_state_dict(path)
        assert sorted(loaded) == sorted(state) and all(torch.equal(loaded[k], state[k]) for k in state)

    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    with monkeypatch.context() as patch:
        for name in ("pytorch_lightning", "pytorch_lightning.callbacks", lightning.__name__):
            patch.setitem(sys.modules, name, lightning)
        torch.save({"state_dict": state, "callbacks": {ModelCheckpoint: ModelCheckpoint()}, "hook": Payload()}, tmp_path / "evil.ckpt")
    with pytest.raises(WeightsError, match="holds pickled objects besides tensors and training data"):
        read_state_dict(tmp_path / "evil.ckpt")
    assert not marker.exists()


def test_a_v_prediction_pipeline_is_refused_for_the_sd_v1_preset(files, tmp_path):
    """SD 2.x-v folders look like SD v1 ones but predict v: read as noise, their output is nonsense."""
    import json
    import shutil

    from sdseg_monai.errors import WeightsError

    folder = tmp_path / "sd2v"
    shutil.copytree(files["pipeline"], folder)
    (folder / "scheduler").mkdir()
    scheduler = {"_class_name": "DDIMScheduler", "prediction_type": "v_prediction"}
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler))
    with pytest.raises(WeightsError, match="predicts 'v_prediction'"):
        sdseg_from_pretrained_parts("sd-v1", stable_diffusion=folder, dataset="btcv", organs=ORGANS)
    scheduler["prediction_type"] = "epsilon"  # control: an SD v1 scheduler config loads
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler))
    sdseg_from_pretrained_parts("sd-v1", stable_diffusion=folder, dataset="btcv", organs=ORGANS)


def test_a_crafted_lightning_checkpoint_cannot_change_torch_by_build(tmp_path):
    """A pickle naming a Lightning class (so that the callback path takes it) that BUILDs on a torch
    function in the allowlist: refused, and the function is left as it was (a restricted plain
    unpickler let it set __defaults__, corrupting every later tensor load in the process)."""
    import zipfile

    from sdseg_monai.errors import WeightsError
    from sdseg_monai.weights import read_state_dict

    defaults = torch._utils._rebuild_tensor_v2.__defaults__
    text = lambda s: b"X" + len(s).to_bytes(4, "little") + s.encode()  # noqa: E731
    body = (b"\x80\x02}" + text("callback") + b"cpytorch_lightning.callbacks\nModelCheckpoint\ns"
            + text("f") + b"ctorch._utils\n_rebuild_tensor_v2\nN}" + text("__defaults__") + b"}" + text("neg") + b"\x88s\x85s\x86bs.")
    path = tmp_path / "crafted.ckpt"
    torch.save({"a": 1}, path)
    with zipfile.ZipFile(path) as z:
        items = {n: z.read(n) for n in z.namelist()}
    items[next(n for n in items if n.endswith("data.pkl"))] = body
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for name, data in items.items():
            z.writestr(name, data)
    with pytest.raises(WeightsError):
        read_state_dict(path)
    assert torch._utils._rebuild_tensor_v2.__defaults__ == defaults


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
@pytest.mark.parametrize("stop", [KeyboardInterrupt, SystemExit])
def test_an_interruption_while_reading_weights_is_not_a_bad_file(suffix, stop, tmp_path, monkeypatch):
    """Ctrl-C or SIGTERM (raised as KeyboardInterrupt) while the weights are read stays an interruption,
    never 'cannot read weights'; a reader's own failure (the control) is a bad-file message."""
    import safetensors.torch

    import sdseg_monai.weights as weights

    path = tmp_path / f"w{suffix}"
    if suffix == ".safetensors":
        save_file({"a": torch.zeros(2)}, str(path))
    else:
        torch.save({"a": torch.zeros(2)}, path)
    assert list(weights.read_state_dict(path)) == ["a"]

    def reader(error):
        def read(*args, **kwargs):
            raise error

        monkeypatch.setattr(safetensors.torch, "load_file", read)
        monkeypatch.setattr(weights.torch, "load", read)

    reader(stop())
    with pytest.raises(stop):
        weights.read_state_dict(path)
    reader(ValueError("bad header"))
    assert "cannot read weights: bad header" in raises_one_line(path, weights.read_state_dict, path)


def test_ctrl_c_while_segment_loads_the_model_is_an_interruption(model_dir, tmp_path, monkeypatch, capfd):
    import nibabel as nib
    import numpy as np
    import safetensors.torch

    from sdseg_monai.cli import main

    scan = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 2), dtype=np.float32), np.eye(4)), str(scan))

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "load_file", interrupted)
    assert main(["segment", str(scan), "-o", str(tmp_path / "mask.nii.gz"), "-m", str(model_dir), "-d", "cpu", "-q"]) == 130
    assert capfd.readouterr().err.strip() == "sdseg3d: interrupted"
    assert not list(tmp_path.glob("mask*")) and not list(tmp_path.glob(".mask*"))
