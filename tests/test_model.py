"""The SDSeg network: batched one-step inference, determinism, training loss, persistence."""

import json

import pytest
import torch

from conftest import blob_masks, micro_config
from sdseg_monai.errors import SDSegInputError
from sdseg_monai.model import SDSeg, cpu_decoder_calls


def test_three_organ_model_returns_one_map_per_organ_from_one_batched_call(micro_model, slices):
    probs = micro_model.predict(slices, seed=0)
    assert probs.shape == (4, 3, 32, 32)
    assert probs.dtype == torch.float32
    assert probs.min() >= 0 and probs.max() <= 1
    # Slices x organs batching gives what one organ at a time gives.
    for k, organ in enumerate(["liver", "spleen", "left_kidney"]):
        alone = micro_model.predict(slices, organs=[organ], seed=0)
        assert torch.allclose(alone[:, 0], probs[:, k], atol=1e-5)
    assert not torch.allclose(probs[:, 0], probs[:, 1])  # the class embedding matters


def test_vision_encoder_runs_once_per_slice_not_per_organ(micro_model, slices):
    calls = []
    hook = micro_model.vision_encoder.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    micro_model.predict(slices, seed=0, batch_size=64)
    hook.remove()
    assert sum(calls) == slices.shape[0]


def test_a_cpu_runs_the_unet_on_whole_batches_and_the_encoder_on_eight_slices_a_call(micro_model):
    slices = torch.rand((30, 3, 32, 32), generator=torch.Generator().manual_seed(1)) * 2 - 1
    encoder, unet = [], []
    hooks = [
        micro_model.vision_encoder.register_forward_hook(lambda m, i, o: encoder.append(i[0].shape[0])),
        micro_model.unet.register_forward_pre_hook(lambda m, args: unet.append(args[0].shape[0])),
    ]
    probs = micro_model.predict(slices, seed=0)  # the CPU's default batch: 64 pairs
    for hook in hooks:
        hook.remove()
    assert encoder == [8, 8, 8, 6] and unet == [64, 26]  # 30 slices x 3 organs = 90 pairs
    assert torch.equal(probs, micro_model.predict(slices, seed=0, batch_size=64))


@pytest.mark.parametrize("count, calls", [(1, [1]), (2, [2]), (3, [3]), (4, [2, 2]), (7, [2, 2, 3]), (8, [2, 2, 2, 2])])
def test_a_cpu_decodes_two_pairs_a_call_and_never_one_alone_after_others(count, calls):
    assert cpu_decoder_calls(count) == calls


def test_cpu_decoding_in_small_calls_gives_what_each_call_alone_gives(micro_model):
    config = micro_model.config
    latents = torch.randn(7, config.latent_channels, config.latent_size, config.latent_size, generator=torch.Generator().manual_seed(0))
    sizes = []
    hook = micro_model.autoencoder.decoder.register_forward_pre_hook(lambda m, args: sizes.append(args[0].shape[0]))
    with torch.no_grad():
        probs = micro_model.decode_probabilities(latents)
        hook.remove()
        assert sizes == [2, 2, 3]
        alone = torch.cat([micro_model.decode_probabilities(part) for part in latents.split([2, 2, 3])])
        whole = micro_model._decode_call(latents)  # one call, as a GPU or a compiled model runs it
    size = config.preprocessing.slice_size
    assert probs.shape == (7, size, size) and torch.equal(probs, alone)
    torch.testing.assert_close(probs, whole, atol=1e-5, rtol=0)


def test_same_input_same_seed_is_bit_identical(micro_model, slices):
    first = micro_model.predict(slices, seed=7, batch_size=5)
    again = micro_model.predict(slices, seed=7, batch_size=5)
    assert torch.equal(first, again)
    other = micro_model.predict(slices, seed=8, batch_size=5)
    assert not torch.equal(first, other)


def test_one_step_is_a_single_unet_call_at_the_last_timestep(micro_model, slices):
    seen = []
    hook = micro_model.unet.register_forward_pre_hook(lambda m, args: seen.append(args[1].clone()))
    micro_model.predict(slices[:1], organs=["liver"], seed=0)
    hook.remove()
    assert len(seen) == 1 and seen[0].tolist() == [999]


def test_one_ddim_step_equals_the_one_step_reverse(micro_model, slices):
    one_step = micro_model.predict(slices, seed=3)
    ddim_one = micro_model.reverse  # same code path name, checked through predict below
    assert ddim_one is not None
    cond = micro_model.encode_images(slices)
    noise = micro_model.initial_noise(3)
    classes = torch.zeros(4, dtype=torch.long)
    with torch.no_grad():
        direct = micro_model.reverse(cond, classes, noise, num_steps=1)
        from sdseg_monai import diffusion

        scheduler = diffusion.ddim_scheduler("ldm", 1000, "epsilon", 1)
        x = noise.expand(4, -1, -1, -1)
        out = micro_model.denoise(x, cond, torch.full((4,), 999), classes)
        via_ddim = scheduler.step(out, 999, x).prev_sample
    assert torch.allclose(direct, via_ddim, atol=1e-4)
    multi = micro_model.predict(slices, seed=3, num_steps=4)
    assert multi.shape == one_step.shape and not torch.equal(multi, one_step)


def test_multi_sample_averaging_is_the_mean_over_seeds(micro_model, slices):
    averaged = micro_model.predict(slices, seed=10, num_samples=3)
    manual = sum(micro_model.predict(slices, seed=s) for s in (10, 11, 12)) / 3
    assert torch.allclose(averaged, manual, atol=1e-6)


def test_empty_latent_is_an_empty_mask_and_sits_at_distance_zero(micro_model):
    empty = micro_model.empty_latent()
    assert empty.shape == (1, 4, 4, 4)
    background = micro_model.masks_to_autoencoder_input(torch.zeros(1, 32, 32))  # all -1
    assert torch.equal(background, -torch.ones(1, 3, 32, 32))
    with torch.no_grad():
        assert torch.equal(empty, micro_model.autoencoder.encode(background).latent_dist.mean * 0.5)  # the posterior mean
    assert micro_model.empty_distance(empty).item() == 0.0
    # One latent pixel moved by (3, 4, 0, 0) is at distance 5, however small the organ.
    moved = empty.clone()
    moved[0, :2, 1, 2] += torch.tensor([3.0, 4.0])
    assert micro_model.empty_distance(moved).item() == pytest.approx(5.0)
    micro_model.config.latent_scale = 1.0  # a new scale gives a new empty latent
    assert torch.allclose(micro_model.empty_latent(), empty / 0.5)


def test_skipping_decodes_zeroes_the_near_empty_pairs_and_keeps_the_rest(micro_model, slices):
    full, distances = micro_model.predict(slices, seed=2, batch_size=5, return_distances=True)
    assert distances.shape == (4, 3) and torch.all(distances > 0)
    assert torch.equal(full, micro_model.predict(slices, seed=2, batch_size=5))  # measuring changes nothing
    radius = float(distances.flatten().sort().values[5])  # skip the 5 closest pairs
    decoded = []
    hook = micro_model.autoencoder.decoder.register_forward_hook(lambda m, i, o: decoded.append(i[0].shape[0]))
    skipped = micro_model.predict(slices, seed=2, batch_size=5, skip_decode_radius=radius)
    hook.remove()
    near = distances < radius
    assert int(near.sum()) == 5 and sum(decoded) == 12 - 5
    assert torch.all(skipped[near] == 0)
    assert torch.allclose(skipped[~near], full[~near], atol=1e-6)
    assert torch.equal(skipped, micro_model.predict(slices, seed=2, batch_size=5, skip_decode_radius=radius))
    everything = micro_model.predict(slices, seed=2, batch_size=5, skip_decode_radius=1e9)
    assert torch.equal(everything, torch.zeros_like(full))
    # With several noise draws a pair is skipped only when every draw is near empty.
    _, per_draw = micro_model.predict(slices, seed=2, batch_size=5, num_samples=2, return_distances=True)
    _, second = micro_model.predict(slices, seed=3, batch_size=5, return_distances=True)
    assert torch.allclose(per_draw, torch.maximum(distances, second), atol=1e-4)
    with pytest.raises(SDSegInputError, match="skip_decode_radius must be >= 0"):
        micro_model.predict(slices, skip_decode_radius=-1.0)


def test_shift_averaging_moves_the_slices_by_half_a_latent_cell_and_back(micro_model, slices):
    plain, near = micro_model.predict(slices, seed=4, batch_size=5, return_distances=True)
    assert torch.equal(micro_model.predict(slices, seed=4, batch_size=5, num_shifts=1), plain)
    # 32-pixel slices, 4x4 latents: a latent cell is 8 pixels, the second pass moves by (4, 4).
    moved, far = micro_model.predict(torch.roll(slices, (4, 4), dims=(-2, -1)), seed=4, batch_size=5, return_distances=True)
    averaged, distances = micro_model.predict(slices, seed=4, batch_size=5, num_shifts=2, return_distances=True)
    assert torch.allclose(averaged, (plain + torch.roll(moved, (-4, -4), dims=(-2, -1))) / 2, atol=1e-6)
    assert torch.equal(distances, torch.maximum(near, far))  # a pair is skipped only when every pass is near empty
    four = micro_model.predict(slices, seed=4, batch_size=5, num_shifts=4)
    assert four.shape == plain.shape and not torch.equal(four, averaged)
    assert torch.equal(four, micro_model.predict(slices, seed=4, batch_size=5, num_shifts=4))  # same run, same bits
    with pytest.raises(SDSegInputError, match=r"num_shifts must be one of \[1, 2, 4\], got 3"):
        micro_model.predict(slices, num_shifts=3)


def test_predict_rejects_bad_shapes_and_unknown_organs(micro_model):
    with pytest.raises(SDSegInputError, match="shape"):
        micro_model.predict(torch.zeros(2, 1, 32, 32))
    with pytest.raises(SDSegInputError, match="unknown organ 'brain'"):
        micro_model.predict(torch.zeros(1, 3, 32, 32), organs=["brain"])


@pytest.mark.parametrize("prediction_type, ratio", [("epsilon", 0.6), ("sample", 0.97)])
def test_loss_falls_over_a_few_dozen_steps(prediction_type, ratio):
    torch.manual_seed(0)
    model = SDSeg(micro_config(prediction_type=prediction_type, final_timestep_fraction=0.5, latent_scale=None)).train()
    masks = blob_masks(8)
    images = masks[:, None].expand(-1, 3, -1, -1) * 1.5 - 0.75
    classes = torch.arange(8) % 3
    model.fit_latent_scale(masks, torch.Generator().manual_seed(0))
    optimiser = torch.optim.AdamW(model.trainable_parameters(), lr=3e-3)

    def held_loss():  # the same timesteps and noise every time, so only the weights change it
        with torch.no_grad():
            return model.training_loss(images, masks, classes, generator=torch.Generator().manual_seed(99))["loss"].item()

    before = held_loss()
    generator = torch.Generator().manual_seed(0)
    for _ in range(60):
        loss = model.training_loss(images, masks, classes, generator=generator)["loss"]
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    after = held_loss()
    assert after < ratio * before, (before, after)


def test_autoencoder_stays_frozen_and_in_eval_mode(micro_model):
    micro_model.train()
    assert not micro_model.autoencoder.training
    assert micro_model.vision_encoder.training
    assert all(not p.requires_grad for p in micro_model.autoencoder.parameters())
    trainable = {id(p) for p in micro_model.trainable_parameters()}
    assert not trainable & {id(p) for p in micro_model.autoencoder.parameters()}


def test_lambda_zero_is_the_noise_only_ablation():
    torch.manual_seed(0)
    model = SDSeg(micro_config(z0_loss_weight=0.0))
    out = model.training_loss(torch.zeros(2, 3, 32, 32), blob_masks(2), torch.tensor([0, 1]), torch.Generator().manual_seed(0))
    assert out["loss"].item() == pytest.approx(out["loss_noise"].item())
    assert out["loss_z0"].item() > 0


def test_decoded_mask_loss_is_taken_at_the_last_timestep_through_the_frozen_decoder():
    from sdseg_monai import diffusion
    from sdseg_monai.model import mask_logit_loss

    torch.manual_seed(0)
    images, masks, classes = torch.zeros(8, 3, 32, 32), blob_masks(8), torch.arange(8) % 3
    common = dict(prediction_type="sample", final_timestep_fraction=0.5, vision_encoder_dropout=0.0)
    plain = SDSeg(micro_config(**common))
    weighted = SDSeg(micro_config(**common, mask_loss_weight=2.0))
    weighted.load_state_dict(plain.state_dict())
    base = plain.training_loss(images, masks, classes, torch.Generator().manual_seed(3))
    out = weighted.training_loss(images, masks, classes, torch.Generator().manual_seed(3))
    assert "loss_mask" not in base
    assert out["loss_z0"].item() == base["loss_z0"].item()  # same draws: the extra term adds, nothing else moves
    assert out["loss"].item() == pytest.approx(base["loss"].item() + 2.0 * out["loss_mask"].item(), rel=1e-5)

    # Its value: BCE + soft Dice of the decoded channel-mean logit, on the samples drawn at t = T - 1.
    generator = torch.Generator().manual_seed(3)
    weighted.encode_masks(masks, generator=generator)
    t = torch.randint(0, 1000, (8,), generator=generator)
    t = torch.where(torch.rand(8, generator=generator) < 0.5, torch.full_like(t, 999), t)
    noise = torch.randn((8, 4, 4, 4), generator=generator)
    final = (t == 999).nonzero()[:, 0]
    assert 0 < len(final) < 8
    cond = weighted.encode_images(images)
    z0 = weighted.encode_masks(masks, generator=torch.Generator().manual_seed(3))
    z_t = diffusion.add_noise(z0, noise, t, weighted.alphas_cumprod)
    z0_hat = weighted.denoise(z_t, cond, t, classes)
    logit = weighted.autoencoder.decode(z0_hat[final] / weighted.latent_scale).sample.mean(dim=1)
    assert out["loss_mask"].item() == pytest.approx(mask_logit_loss(logit, masks[final]).item(), rel=1e-4)

    # Gradients reach the UNet and the vision encoder through the decoder, which stays frozen.
    weighted.config.z0_loss_weight = 0.0
    weighted.training_loss(images, masks, classes, torch.Generator().manual_seed(3))["loss"].backward()
    assert weighted.unet.conv_in.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in weighted.autoencoder.parameters())
    with pytest.raises(SDSegInputError, match="mask_loss_weight needs final_timestep_fraction > 0"):
        micro_config(mask_loss_weight=1.0)


def test_latent_scale_is_one_over_std_of_mask_latents():
    torch.manual_seed(0)
    model = SDSeg(micro_config(latent_scale=None, mask_latent="mean"))
    masks = blob_masks(6)
    scale = model.fit_latent_scale(masks)
    z = model.encode_masks(masks)
    assert model.config.latent_scale == scale
    assert z.std().item() == pytest.approx(1.0, rel=1e-4)
    from_autoencoder = SDSeg(micro_config(latent_scale=None, latent_scale_source="autoencoder"))
    assert from_autoencoder.fit_latent_scale(masks) == pytest.approx(0.18215)


def test_condition_unet_backbone_uses_a_learned_null_context(slices):
    torch.manual_seed(0)
    model = SDSeg(micro_config(backbone="unet2d_condition", null_context_tokens=2)).eval()
    assert model.null_context.shape == (1, 2, 16)
    assert model.predict(slices, seed=0).shape == (4, 3, 32, 32)
    assert any(p is model.null_context for p in model.trainable_parameters())


def test_save_and_load_round_trip_gives_identical_outputs(micro_model, slices, tmp_path):
    target = tmp_path / "model"
    micro_model.save_pretrained(target)
    assert sorted(p.name for p in target.iterdir()) == ["config.json", "model.safetensors"]
    saved = json.loads((target / "config.json").read_text())
    assert [o["name"] for o in saved["organs"]] == ["liver", "spleen", "left_kidney"]
    assert saved["preprocessing"] == {"hu_window": [-175.0, 250.0], "slice_size": 32, "channels": "replicate", "orientation": "RAS"}
    loaded = SDSeg.from_pretrained(target)
    assert loaded.config.to_dict() == micro_model.config.to_dict()
    assert torch.equal(loaded.predict(slices, seed=0), micro_model.predict(slices, seed=0))


def test_saving_over_an_existing_model_replaces_it_whole(micro_model, tmp_path):
    target = tmp_path / "model"
    micro_model.save_pretrained(target)
    torch.manual_seed(5)
    other = SDSeg(micro_config(organs=("aorta",)))
    other.save_pretrained(target)
    assert SDSeg.from_pretrained(target).config.organ_names == ["aorta"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temporary folders left


def test_loading_a_model_with_another_layout_names_the_file(micro_model, tmp_path):
    target = tmp_path / "model"
    micro_model.save_pretrained(target)
    config = json.loads((target / "config.json").read_text())
    config["unet"]["block_out_channels"] = [16, 16]
    (target / "config.json").write_text(json.dumps(config))
    with pytest.raises(SDSegInputError) as error:
        SDSeg.from_pretrained(target)
    message = str(error.value)
    assert "model.safetensors" in message and "shape" in message and "\n" not in message


def test_loading_a_folder_that_is_no_model_says_so(tmp_path):
    with pytest.raises(SDSegInputError, match="no such model folder"):
        SDSeg.from_pretrained(tmp_path / "missing")
    with pytest.raises(SDSegInputError, match="not an SDSeg model folder"):
        SDSeg.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(SDSegInputError, match="config.json: not a readable JSON config"):
        SDSeg.from_pretrained(tmp_path)


def test_half_precision_save_is_smaller_and_loads_as_float32(micro_model, slices, tmp_path):
    full = micro_model.save_pretrained(tmp_path / "fp32")
    half = micro_model.save_pretrained(tmp_path / "fp16", dtype=torch.float16)
    assert (half / "model.safetensors").stat().st_size < 0.6 * (full / "model.safetensors").stat().st_size
    loaded = SDSeg.from_pretrained(half)
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    # fp16 storage rounds the weights only: the maps stay close to the fp32 model's.
    assert (loaded.predict(slices, seed=0) - micro_model.predict(slices, seed=0)).abs().max() < 0.05


def test_a_wider_image_latent_starts_from_what_the_model_computes_and_round_trips(micro_model, slices, tmp_path):
    from sdseg_monai.weights import with_condition_channels

    before = micro_model.predict(slices, seed=0)
    wide = with_condition_channels(micro_model, 12).eval()
    assert wide.config.condition_channels == 12 and wide.config.unet["in_channels"] == 4 + 12
    assert wide.encode_images(slices).shape == (4, 12, 4, 4)
    assert torch.equal(wide.predict(slices, seed=0), before)  # new channels enter through zero weights
    assert micro_model.config.condition_channels is None  # the original is left as it was
    wider = with_condition_channels(wide, 16).eval()  # widening again keeps the channels already there
    assert torch.equal(wider.vision_encoder.extra.weight[:8], wide.vision_encoder.extra.weight)
    assert torch.equal(wider.predict(slices, seed=0), before)

    # The new channels train: one step moves the UNet's weights on them away from zero.
    wide.train()
    masks = blob_masks(4)
    wide.training_loss(slices, masks, torch.tensor([0, 1, 2, 0]), torch.Generator().manual_seed(0))["loss"].backward()
    assert wide.unet.conv_in.weight.grad[:, 8:].abs().sum() > 0
    wide.eval()

    wide.save_pretrained(tmp_path / "wide")
    loaded = SDSeg.from_pretrained(tmp_path / "wide")
    assert loaded.config.condition_channels == 12
    assert torch.equal(loaded.predict(slices, seed=0), before)
    with pytest.raises(SDSegInputError, match="cannot narrow the image latent from 12 to 8 channels"):
        with_condition_channels(wide, 8)
    with pytest.raises(SDSegInputError, match="unet in_channels must be the mask plus image latent channels = 16"):
        micro_config(condition_channels=12)


def test_a_model_retargeted_to_larger_slices_segments_them(micro_model):
    from sdseg_monai.weights import with_training_changes

    micro_model.name_or_path = "a/model/folder"  # as from_pretrained records it
    assert with_training_changes(micro_model).name_or_path == "a/model/folder"  # nothing changed
    model = with_training_changes(micro_model, slice_size=64)
    assert model.config.preprocessing.slice_size == 64 and model.config.latent_size == 8
    assert model.name_or_path is None  # not that folder's model any more
    assert model.initial_noise(0).shape == (1, 4, 8, 8)
    assert model.predict(torch.zeros(2, 3, 64, 64), seed=0).shape == (2, 3, 64, 64)
    # 40 is a multiple of the autoencoder's 8, not of the 16 that its UNet's halving needs too.
    with pytest.raises(SDSegInputError, match=r"slice size must be a positive multiple of 16 .*its UNet by 2\), got 40"):
        with_training_changes(model, slice_size=40)
    assert model.config.preprocessing.slice_size == 64 and model.config.unet["sample_size"] == 8  # left as it was


def test_cuda_batch_size_follows_the_decoder_memory_of_the_model():
    from sdseg_monai.model import decoder_bytes_per_pair, default_batch_size

    config = micro_config()  # 32x32 slices, decoder channels 8, 16, 16, 16
    assert decoder_bytes_per_pair(config) == 6 * 4 * max(8 * 32**2, 16 * 16**2, 16 * 8**2, 16 * 4**2)
    wider = micro_config(preprocessing={"hu_window": (-175, 250), "slice_size": 64})
    assert decoder_bytes_per_pair(wider) == 4 * decoder_bytes_per_pair(config)
    assert default_batch_size(torch.device("cpu"), config) == 64


def test_presets_build_with_a_wider_image_latent():
    """model_preset(..., condition_channels=C): the UNet's input is [z_t (4) || image latent (C)]."""
    from sdseg_monai.config import model_preset

    for preset in ("tiny", "paper"):
        config = model_preset(preset, condition_channels=8)
        assert config.condition_channels == 8 and config.unet["in_channels"] == 4 + 8
        assert model_preset(preset).unet["in_channels"] == 4 + 4


def test_vision_encoder_dropout_is_in_its_resnet_blocks_only(micro_model):
    """As the official AEEncoderEmbedder (an LDM Encoder with dropout 0.2): ResnetBlocks drop out, the
    mid-block attention does not."""
    from diffusers.models.resnet import ResnetBlock2D

    encoder = micro_model.vision_encoder.encoder
    in_resnets = {id(m.dropout) for m in encoder.modules() if isinstance(m, ResnetBlock2D)}
    rates = {id(m): m.p for m in encoder.modules() if isinstance(m, torch.nn.Dropout)}
    assert in_resnets and all(rates[i] == micro_model.config.vision_encoder_dropout > 0 for i in in_resnets)
    assert all(p == 0.0 for i, p in rates.items() if i not in in_resnets)


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample"])
def test_predict_is_the_reference_steps_written_out_by_hand(prediction_type):
    """predict() against the official inference written out from its formulas, not from our helpers:
    LDM linear betas, x_T seeded, one UNet call at t = T-1 on [x_T || c], z0 from it, decode(z0 / scale),
    clamp((x + 1) / 2, 0, 1), mean over the 3 channels. A scale multiplied instead of divided, another
    concatenation order or timestep fails it."""
    from conftest import micro_config

    torch.manual_seed(0)
    model = SDSeg(micro_config(prediction_type=prediction_type, latent_scale=0.37)).eval()
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    predicted = model.predict(images, seed=7, precision="fp32")

    T = model.config.num_train_timesteps
    betas = torch.linspace(0.0015**0.5, 0.0155**0.5, T, dtype=torch.float64) ** 2  # LDM "linear"
    abar = torch.cumprod(1 - betas, dim=0)[T - 1].float()
    size, channels = model.config.latent_size, model.config.latent_channels
    x_T = torch.randn((1, channels, size, size), generator=torch.Generator("cpu").manual_seed(7))
    with torch.no_grad():
        for s in range(2):
            c = model.vision_encoder(images[s : s + 1])
            for k in range(model.config.num_classes):
                out = model.unet(torch.cat([x_T, c], dim=1), torch.tensor([T - 1]), class_labels=torch.tensor([k])).sample
                z0 = (x_T - (1 - abar).sqrt() * out) / abar.sqrt() if prediction_type == "epsilon" else out
                x = model.autoencoder.decode(z0 / 0.37).sample
                expected = torch.clamp((x + 1) / 2, 0, 1).mean(dim=1)[0]
                assert torch.allclose(predicted[s, k], expected, atol=1e-5), (s, k)


# -- ownership, dtypes, devices and persistence of the public API -----------------------------------


def test_each_model_owns_its_config():
    """Two models built from one config: fitting one's latent scale or giving it new postprocessing
    leaves the other (and the caller's config) as they were, so the other still decodes with its scale."""
    from sdseg_monai.config import Postprocessing

    torch.manual_seed(0)
    config = micro_config()
    a, b = SDSeg(config), SDSeg(config)
    scale = a.fit_latent_scale(blob_masks(4))
    assert scale != 0.5 and a.latent_scale == scale
    assert b.latent_scale == 0.5 and config.latent_scale == 0.5
    a.config.postprocessing = Postprocessing(default_threshold=0.3)
    assert b.config.postprocessing.default_threshold == 0.5 == config.postprocessing.default_threshold


@pytest.mark.parametrize("dtype, tolerance", [(torch.bfloat16, 0.02), (torch.float16, 0.005), (torch.float64, 1e-5)])
def test_a_model_converted_with_to_dtype_measures_distances(micro_model, slices, dtype, tolerance):
    """``.to(dtype)`` casts the autoencoder's encoder too: the empty mask's latent is encoded in its
    dtype, and the schedule stays float64 for the one-step arithmetic."""
    import copy

    converted = copy.deepcopy(micro_model).to(dtype)
    assert {p.dtype for p in converted.autoencoder.encoder.parameters()} == {dtype}
    got, measured = converted.predict(slices, seed=0, return_distances=True)
    maps, distances = micro_model.predict(slices, seed=0, return_distances=True)
    assert torch.equal(converted.alphas_cumprod, micro_model.alphas_cumprod)  # float64, not rounded to dtype
    assert got.dtype == measured.dtype == torch.float32
    assert (got - maps).abs().max() < tolerance
    assert ((measured - distances).abs() / distances).max() < tolerance
    assert converted.effective_precision() == {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}[dtype]


def test_a_cast_model_runs_its_dtype_and_refuses_another_precision(micro_model, slices):
    from sdseg_monai.model import resolve_precision

    micro_model.cast_for_inference(torch.bfloat16)
    for other in ("fp32", "fp16"):  # it would run bf16 all the same
        with pytest.raises(SDSegInputError, match=rf"runs bf16 only, not precision='{other}': call cast_for_inference\(torch.float32\)"):
            micro_model.predict(slices, precision=other)
    assert micro_model.effective_precision() == micro_model.effective_precision("bf16") == "bf16"
    micro_model.cast_for_inference(torch.float32)
    cpu = torch.device("cpu")
    for precision in ("auto", "fp32", "bf16"):  # an fp32 model: as resolve_precision says
        assert micro_model.effective_precision(precision) == resolve_precision(cpu, precision, micro_model.config)
    assert micro_model.effective_precision("fp32") == "fp32"
    assert micro_model.predict(slices, precision="fp32").shape == (4, 3, 32, 32)


def test_from_pretrained_resolves_devices_as_the_segmenter_does(model_dir):
    from sdseg_monai.model import resolve_device

    assert SDSeg.from_pretrained(model_dir, device="auto").device == resolve_device("auto")
    with pytest.raises(SDSegInputError, match="device must be auto, cpu, cuda or cuda:N, got 'gpu'"):
        SDSeg.from_pretrained(model_dir, device="gpu")
    if not torch.cuda.is_available():
        with pytest.raises(SDSegInputError, match="device cuda requested but CUDA is not available"):
            SDSeg.from_pretrained(model_dir, device="cuda")


def test_a_slice_size_the_network_cannot_halve_is_refused_in_its_config():
    """The autoencoder halves a slice 3 times (f=8), then the UNet once per level but its last: the
    tiny preset's 3 levels need multiples of 32, the micro model's 2 levels multiples of 16."""
    from sdseg_monai.config import model_preset

    for size in (24, 40, 100):
        with pytest.raises(SDSegInputError, match=rf"slice size must be a positive multiple of 32 .* got {size}$"):
            model_preset("tiny", preprocessing={"slice_size": size})
    assert model_preset("tiny", preprocessing={"slice_size": 96}).latent_size == 12
    with pytest.raises(SDSegInputError, match="multiple of 16"):
        micro_config(preprocessing={"hu_window": (-175, 250), "slice_size": 24})
    torch.manual_seed(0)
    smallest = SDSeg(micro_config(preprocessing={"hu_window": (-175, 250), "slice_size": 16})).eval()
    assert smallest.predict(torch.zeros(1, 3, 16, 16), seed=0).shape == (1, 3, 16, 16)  # what it accepts runs


def test_loading_leaves_the_global_random_state_alone(model_dir):
    state = torch.get_rng_state()
    SDSeg.from_pretrained(model_dir)
    assert torch.equal(torch.get_rng_state(), state)


def test_empty_latent_is_a_copy_and_follows_the_encoder(slices):
    torch.manual_seed(0)
    a = SDSeg(micro_config()).eval()
    torch.manual_seed(0)
    twin = SDSeg(micro_config()).eval()
    torch.manual_seed(1)
    b = SDSeg(micro_config()).eval()
    a.empty_latent().mul_(0)  # the caller's copy, not the model's
    assert torch.equal(a.predict(slices, seed=0, return_distances=True)[1], twin.predict(slices, seed=0, return_distances=True)[1])
    a.load_state_dict(b.state_dict())  # new weights: a now measures as b does
    assert torch.equal(a.predict(slices, seed=0, return_distances=True)[1], b.predict(slices, seed=0, return_distances=True)[1])
    with torch.no_grad():  # an edit in place
        a.autoencoder.encoder.conv_in.bias.add_(1.0)
    assert not torch.equal(a.empty_latent(), b.empty_latent())
    b.autoencoder.encoder.to(torch.bfloat16)  # a round trip of the encoder alone: its rounding is seen
    b.autoencoder.encoder.to(torch.float32)
    with torch.no_grad():
        expected = b.autoencoder.encode(-torch.ones(1, 3, 32, 32)).latent_dist.mean * 0.5
    assert torch.equal(b.empty_latent(), expected)


@pytest.mark.parametrize("dtype", [torch.int8, getattr(torch, "float8_e4m3fn", torch.uint8), "int8", "float17", 16])
def test_saving_in_a_dtype_that_cannot_be_loaded_is_refused_before_writing(micro_model, tmp_path, dtype):
    with pytest.raises(SDSegInputError, match="dtype to save weights in must be float32, float16, bfloat16 or float64"):
        micro_model.save_pretrained(tmp_path / "model", dtype=dtype)
    assert not any(tmp_path.iterdir())


def test_dtypes_to_save_in_may_be_named(micro_model, slices, tmp_path):
    typed = micro_model.save_pretrained(tmp_path / "typed", dtype=torch.bfloat16)
    for name in ("bfloat16", "bf16", "torch.bfloat16"):
        named = micro_model.save_pretrained(tmp_path / name, dtype=name)
        assert (named / "model.safetensors").read_bytes() == (typed / "model.safetensors").read_bytes()
    assert SDSeg.from_pretrained(typed).predict(slices, seed=0).shape == (4, 3, 32, 32)


def test_saving_the_same_model_twice_writes_the_same_bytes(micro_model, tmp_path):
    """The weights file's bytes feed model_hash, recorded with every output."""
    from sdseg_monai.model import model_hash

    first = micro_model.save_pretrained(tmp_path / "first")
    hashes = {model_hash(micro_model.save_pretrained(tmp_path / f"again{k}")) for k in range(6)}
    assert hashes == {model_hash(first)}
