"""SDSeg training: the loss falls, resume is exact, DDP runs on CPU, the CLI trains and resumes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from conftest import micro_config
from sdseg_monai.config import Postprocessing
from sdseg_monai.data import SliceDataset, slice_augmentation
from sdseg_monai.model import SDSeg
from sdseg_monai.training import TrainSettings, train_sdseg


def write_cases(folder, n, write=True):
    """n small labelled volumes: a liver-like and a spleen-like box on soft tissue."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cases = []
    for i in range(n):
        image_path, label_path = folder / f"img{i}.nii.gz", folder / f"lab{i}.nii.gz"
        if write:
            labels = np.zeros((36, 32, 6), dtype=np.uint8)
            labels[4 + i : 20 + i, 5:22, 1:6] = 6
            labels[22:31, 18 - i : 28 - i, 0:4] = 1
            image = np.where(labels == 6, 60.0, np.where(labels == 1, 150.0, -60.0)).astype(np.float32)
            affine = np.diag([1.5, 1.5, 3.0, 1.0])
            nib.save(nib.Nifti1Image(image, affine), str(image_path))
            nib.save(nib.Nifti1Image(labels, affine), str(label_path))
        cases.append((image_path, label_path))
    return cases


def micro(**overrides):
    torch.manual_seed(0)
    settings = dict(organs=("spleen", "liver"), latent_scale=None, prediction_type="sample", final_timestep_fraction=0.5)
    settings.update(overrides)
    return SDSeg(micro_config(**settings))


def quick_settings(**overrides):
    values = dict(steps=6, batch_size=4, checkpoint_every=3, validate_every=0, log_every=3, base_lr=2e-4, augmentation="none", warmup_steps=1)
    values.update(overrides)
    return TrainSettings(**values)


def test_slice_dataset_draws_present_organs_and_is_seeded(tmp_path):
    cases = write_cases(tmp_path, 1)
    config = micro_config(organs=("spleen", "liver"))
    dataset = SliceDataset(cases, config.preprocessing, config.organ_labels, absent_fraction=0.0, augment=slice_augmentation("strong", size=32), seed=3)
    assert len(dataset) == 6
    sample = dataset[2]
    assert sample["image"].shape == (3, 32, 32) and sample["mask"].shape == (32, 32)
    assert sample["mask"].sum() > 0  # absent_fraction 0: an organ present in the slice
    again = dataset[2]
    assert torch.equal(sample["image"], again["image"]) and torch.equal(sample["mask"], again["mask"])
    dataset.set_epoch(1)
    assert not torch.equal(dataset[2]["image"], sample["image"])  # a new epoch draws new augmentations
    only_absent = SliceDataset(cases, config.preprocessing, config.organ_labels, absent_fraction=1.0, seed=3)
    # Slice 5 holds the liver only: the absent organ (spleen) is drawn, with an empty mask.
    assert only_absent[5]["class_id"].item() == 0 and only_absent[5]["mask"].sum() == 0


def test_slice_dataset_prepares_cases_in_order_with_any_number_of_threads(tmp_path):
    cases = write_cases(tmp_path, 3)
    config = micro_config(organs=("spleen", "liver"))
    serial = SliceDataset(cases, config.preprocessing, config.organ_labels, load_threads=1)
    threaded = SliceDataset(cases, config.preprocessing, config.organ_labels, load_threads=3)
    assert serial.index == threaded.index == [(v, z) for v in range(3) for z in range(6)]
    assert all(torch.equal(a, b) for a, b in zip(serial.images, threaded.images))
    assert all(torch.equal(a, b) for a, b in zip(serial.labels, threaded.labels))
    # Case order is kept: volume k is case k.
    for k, case in enumerate(cases):
        alone = SliceDataset([case], config.preprocessing, config.organ_labels)
        assert torch.equal(alone.images[0], threaded.images[k]) and torch.equal(alone.labels[0], threaded.labels[k])


def test_slice_dataset_refuses_a_label_map_off_its_image_grid(tmp_path):
    from sdseg_monai.errors import SDSegInputError

    (image, label), = write_cases(tmp_path, 1)
    config = micro_config(organs=("spleen", "liver"))
    nifti = nib.load(str(label))
    shifted = np.diag([1.5, 1.5, 3.0, 1.0])
    shifted[0, 3] = 4.5  # three voxels to the side: same shape, other voxels
    for name, affine in [("shifted.nii.gz", shifted), ("flipped.nii.gz", np.diag([-1.5, 1.5, 3.0, 1.0]))]:
        nib.save(nib.Nifti1Image(np.asarray(nifti.dataobj), affine), str(tmp_path / name))
        with pytest.raises(SDSegInputError) as error:
            SliceDataset([(image, tmp_path / name)], config.preprocessing, config.organ_labels)
        assert str(error.value) == f"{tmp_path / name}: label map affine differs from its image's: not on the same voxel grid"
    nib.save(nib.Nifti1Image(np.asarray(nifti.dataobj)[:, :, :5], np.diag([1.5, 1.5, 3.0, 1.0])), str(tmp_path / "short.nii.gz"))
    with pytest.raises(SDSegInputError, match="label map shape 36x32x5 differs from its image's 36x32x6"):
        SliceDataset([(image, tmp_path / "short.nii.gz")], config.preprocessing, config.organ_labels)
    # Control: within the tolerance (a rounding of the affine), the case is read.
    nib.save(nib.Nifti1Image(np.asarray(nifti.dataobj), np.diag([1.5 + 1e-4, 1.5, 3.0, 1.0])), str(tmp_path / "rounded.nii.gz"))
    assert len(SliceDataset([(image, tmp_path / "rounded.nii.gz")], config.preprocessing, config.organ_labels)) == 6
    # A validation case off its grid is refused before the first step, not at the first validation.
    with pytest.raises(SDSegInputError, match="flipped.nii.gz: label map affine differs"):
        train_sdseg(micro(), [(image, label)], tmp_path / "run", quick_settings(validate_every=3),
                    validation_cases=[(image, tmp_path / "flipped.nii.gz")], device="cpu", progress=False)
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_training_reduces_the_loss_and_writes_the_run(tmp_path):
    cases = write_cases(tmp_path / "data", 2)
    model = micro()
    model.name_or_path = str(tmp_path / "loaded_from")  # as from_pretrained records it
    settings = quick_settings(steps=40, log_every=10, validate_every=20)
    summary = train_sdseg(model, cases, tmp_path / "run", settings, validation_cases=cases[:1], device="cpu", progress=False)
    assert model.name_or_path is None  # trained in place: sidecars no longer name the folder it came from
    records = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 4 and losses[-1] < 0.9 * losses[0], losses
    assert summary["steps"] == 40 and summary["lr"] == pytest.approx(2e-4 * 4)
    assert model.config.latent_scale is not None  # fitted on the first batch (scale_by_std)
    best = SDSeg.from_pretrained(tmp_path / "run" / "model")
    assert best.config.organ_names == ["spleen", "liver"]
    assert (tmp_path / "run" / "last_model" / "model.safetensors").is_file()
    assert any("validation" in r for r in records)


def test_resume_continues_exactly_where_training_stopped(tmp_path):
    """Stopped mid-epoch with gradient accumulation: the resumed run skips the samples already used
    in that epoch and ends with the uninterrupted run's weights, EMA, optimiser state and best model."""
    cases = write_cases(tmp_path / "data", 2)  # 12 slices: 3 batches of 4 per epoch
    common = dict(augmentation="strong", grad_accum=2, checkpoint_every=2, validate_every=2, batches_on_device=False)
    run = lambda folder, steps, **kw: train_sdseg(  # noqa: E731
        micro(), cases, tmp_path / folder, quick_settings(steps=steps, **common), validation_cases=cases[:1], device="cpu", progress=False, **kw
    )
    run("a", 4)
    run("b", 2)
    assert divmod(2 * common["grad_accum"], 3) == (1, 1)  # stopped one batch into epoch 1
    run("b", 4, resume=True)
    a = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)
    assert a["step"] == b["step"] == 4
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for key in a["ema"]["shadow"]:
        assert torch.equal(a["ema"]["shadow"][key], b["ema"]["shadow"][key]), key
    assert a["ema"]["updates"] == b["ema"]["updates"] == 4
    for (ka, sa), (kb, sb) in zip(a["optimizer"]["state"].items(), b["optimizer"]["state"].items()):
        assert ka == kb and all(torch.equal(sa[k], sb[k]) for k in sa), ka
    assert a["best"] == b["best"] and a["best"]["step"] in (2, 4)


def test_device_batches_follow_the_sampling_rule_and_are_seeded(tmp_path):
    from sdseg_monai.data import DeviceSliceBatches

    cases = write_cases(tmp_path, 2)
    config = micro_config(organs=("spleen", "liver"))
    dataset = SliceDataset(cases, config.preprocessing, config.organ_labels, absent_fraction=0.0)
    plain = DeviceSliceBatches(dataset, "cpu", augmentation="none", seed=3)
    batch = plain.batch(0, 64)
    assert batch["image"].shape == (64, 3, 32, 32) and batch["mask"].shape == (64, 32, 32) and batch["class_id"].shape == (64,)
    assert torch.equal(batch["image"][:, 0], batch["image"][:, 2])  # grey replicated to 3 channels
    # absent_fraction 0: every mask holds its organ, and it is exactly that organ's label region.
    assert (batch["mask"].flatten(1).sum(1) > 0).all()
    values = torch.tensor(config.organ_labels)[batch["class_id"]]
    # Liver (60 HU) and spleen (150 HU) are bright on -60 HU tissue (-0.44 after the window).
    inside = batch["image"][:, 0] > -0.3
    assert torch.equal(batch["mask"].bool() & ~inside, torch.zeros_like(inside))
    assert set(values.tolist()) == {1, 6}
    again = DeviceSliceBatches(dataset, "cpu", augmentation="none", seed=3).batch(0, 64)
    assert all(torch.equal(batch[k], again[k]) for k in batch)
    assert not torch.equal(plain.batch(1, 64)["image"], batch["image"])
    only_absent = SliceDataset(cases, config.preprocessing, config.organ_labels, absent_fraction=1.0)
    absent = DeviceSliceBatches(only_absent, "cpu", augmentation="none").batch(0, 64)
    # An absent organ wherever one exists (slices 4-5 lack the spleen); never an empty draw otherwise.
    assert (absent["mask"].flatten(1).sum(1) == 0).float().mean() > 0.2
    # Augmented: image and mask move together (the mask stays on bright tissue).
    strong = DeviceSliceBatches(dataset, "cpu", augmentation="strong", seed=3).batch(0, 64)
    assert strong["image"].min() >= -1 and strong["image"].max() <= 1 and set(strong["mask"].unique().tolist()) <= {0.0, 1.0}
    mask = strong["mask"].bool()
    assert (strong["image"][:, 0][mask] > -0.3).float().mean() > 0.95
    assert not torch.equal(strong["image"], batch["image"])


def test_organ_first_sampling_and_several_organs_per_slice(tmp_path):
    from sdseg_monai.data import DeviceSliceBatches
    from sdseg_monai.errors import SDSegInputError

    # One volume: liver on all 12 slices, spleen on slice 5 only (a small organ, rarely drawn slice-first).
    labels = np.zeros((32, 32, 12), dtype=np.uint8)
    labels[4:20, 5:22, :] = 6
    labels[22:30, 20:28, 5] = 1
    image = np.where(labels == 6, 60.0, np.where(labels == 1, 150.0, -60.0)).astype(np.float32)
    affine = np.diag([1.5, 1.5, 3.0, 1.0])
    nib.save(nib.Nifti1Image(image, affine), str(tmp_path / "img.nii.gz"))
    nib.save(nib.Nifti1Image(labels, affine), str(tmp_path / "lab.nii.gz"))
    config = micro_config(organs=("spleen", "liver"))
    dataset = SliceDataset([(tmp_path / "img.nii.gz", tmp_path / "lab.nii.gz")], config.preprocessing, config.organ_labels, absent_fraction=0.0)

    def spleen_share(batch):
        return float((batch["class_id"] == 0).float().mean())

    slice_first = DeviceSliceBatches(dataset, "cpu", augmentation="none", seed=1).batch(0, 512)
    organ_first = DeviceSliceBatches(dataset, "cpu", augmentation="none", seed=1, organ_sampling="organ").batch(0, 512)
    assert spleen_share(slice_first) < 0.1 and 0.4 < spleen_share(organ_first) < 0.6
    assert (organ_first["mask"].flatten(1).sum(1) > 0).all()  # each draw on a slice showing its organ

    shared = DeviceSliceBatches(dataset, "cpu", augmentation="strong", seed=1, organs_per_slice=2).batch(0, 64)
    assert shared["image"].shape == (32, 3, 32, 32) and shared["mask"].shape == (64, 32, 32)
    assert torch.equal(shared["image_index"], torch.arange(32).repeat_interleave(2))
    pairs = shared["class_id"].view(32, 2)
    assert (pairs[:, 0] != pairs[:, 1]).all()  # two different organs of each slice
    # Every organ's mask is warped with its slice: it stays on that slice's bright tissue.
    under = shared["image"][shared["image_index"], 0][shared["mask"].bool()]
    assert under.numel() > 0 and (under > -0.3).float().mean() > 0.95
    with pytest.raises(SDSegInputError, match="multiple of organs per slice"):
        DeviceSliceBatches(dataset, "cpu", organs_per_slice=2).batch(0, 63)
    with pytest.raises(SDSegInputError, match="organs per slice must be 1 to 2"):
        DeviceSliceBatches(dataset, "cpu", organs_per_slice=3)
    with pytest.raises(SDSegInputError, match="organ sampling must be one of"):
        DeviceSliceBatches(dataset, "cpu", organ_sampling="volume")


def test_a_shared_image_encoding_gives_the_loss_of_repeated_images():
    model = micro(latent_scale=1.0, vision_encoder_dropout=0.0)  # no dropout: both passes see the same network
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    masks = (torch.rand(4, 32, 32, generator=torch.Generator().manual_seed(1)) > 0.7).float()
    class_ids, image_index = torch.tensor([0, 1, 1, 0]), torch.tensor([0, 0, 1, 1])
    shared = model.training_loss(images, masks, class_ids, torch.Generator().manual_seed(5), image_index=image_index)
    repeated = model.training_loss(images[image_index], masks, class_ids, torch.Generator().manual_seed(5))
    for key in shared:
        torch.testing.assert_close(shared[key], repeated[key])


def test_training_with_organ_first_sampling_and_shared_slices(tmp_path):
    from sdseg_monai.errors import SDSegInputError

    cases = write_cases(tmp_path / "data", 2)
    settings = quick_settings(steps=4, organ_sampling="organ", organs_per_slice=2)  # device batches switch on by themselves
    summary = train_sdseg(micro(), cases, tmp_path / "run", settings, device="cpu", progress=False)
    assert summary["steps"] == 4 and (tmp_path / "run" / "model" / "model.safetensors").is_file()
    with pytest.raises(SDSegInputError, match="need batches built on the device"):
        train_sdseg(micro(), cases, tmp_path / "b", quick_settings(organ_sampling="organ", batches_on_device=False), device="cpu", progress=False)
    with pytest.raises(SDSegInputError, match="not a multiple of organs per slice"):
        train_sdseg(micro(), cases, tmp_path / "c", quick_settings(batch_size=3, organs_per_slice=2), device="cpu", progress=False)
    assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists()  # refused before writing anything


def test_device_batches_resume_exactly_and_a_time_limit_stops_cleanly(tmp_path):
    cases = write_cases(tmp_path / "data", 2)
    on_device = dict(batches_on_device=True, augmentation="strong")
    straight = micro()
    train_sdseg(straight, cases, tmp_path / "a", quick_settings(steps=6, **on_device), device="cpu", progress=False)
    interrupted = micro()
    train_sdseg(interrupted, cases, tmp_path / "b", quick_settings(steps=3, **on_device), device="cpu", progress=False)
    train_sdseg(micro(), cases, tmp_path / "b", quick_settings(steps=6, **on_device), device="cpu", progress=False, resume=True)
    a = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)
    assert a["step"] == b["step"] == 6
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    # A time limit already spent: one step, then validation, checkpoint and both model folders.
    limited = quick_settings(steps=50, max_seconds=0.0, validate_every=25, **on_device)
    summary = train_sdseg(micro(), cases, tmp_path / "c", limited, validation_cases=cases[:1], device="cpu", progress=False)
    assert summary["steps"] == 1 and summary["best"]["step"] == 1
    assert torch.load(tmp_path / "c" / "checkpoint.pt", weights_only=True)["step"] == 1
    assert (tmp_path / "c" / "model" / "model.safetensors").is_file() and (tmp_path / "c" / "last_model").is_dir()


def test_resume_refuses_other_trajectory_settings(tmp_path):
    """Batch, learning rate, seed, augmentation... shape the run: resumed with others, it would not be
    the run that stopped. Its length and cadence may change."""
    from sdseg_monai.errors import SDSegInputError

    cases = write_cases(tmp_path / "data", 1)
    train_sdseg(micro(), cases, tmp_path / "run", quick_settings(steps=3), device="cpu", progress=False)
    with pytest.raises(SDSegInputError, match=r"batch_size 4 -> 2; base_lr 0.0002 -> 0.0001"):
        train_sdseg(micro(), cases, tmp_path / "run", quick_settings(steps=6, batch_size=2, base_lr=1e-4), device="cpu", progress=False, resume=True)
    summary = train_sdseg(micro(), cases, tmp_path / "run", quick_settings(steps=4, checkpoint_every=1, log_every=1), device="cpu",
                          progress=False, resume=True)
    assert summary["steps"] == 4


def test_resume_refuses_another_model(tmp_path):
    cases = write_cases(tmp_path / "data", 1)
    train_sdseg(micro(), cases, tmp_path / "run", quick_settings(steps=3), device="cpu", progress=False)
    from sdseg_monai.errors import SDSegInputError

    with pytest.raises(SDSegInputError, match="another model configuration"):
        train_sdseg(micro(organs=("liver",)), cases, tmp_path / "run", quick_settings(steps=6), device="cpu", progress=False, resume=True)


@pytest.mark.parametrize("batches", ["loader", "device-batches"])
def test_two_process_gloo_ddp_run_completes(tmp_path, batches):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parent)}
    worker = Path(__file__).with_name("ddp_train_worker.py")
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(worker), str(tmp_path), batches],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["steps"] == 4 and r["world"] == 2 for r in ranks)
    assert ranks[0]["checksum"] == pytest.approx(ranks[1]["checksum"], rel=1e-9)  # replicas stay in sync
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert state["step"] == 4
    # Learning rate scales with the number of processes (batch x accum x world).
    assert json.loads((tmp_path / "run" / "log.jsonl").read_text().splitlines()[-1])["lr"] == pytest.approx(1e-4 * 2 * 2)


def test_train_cli_trains_resumes_and_refuses_overwrite(tmp_path):
    from sdseg_monai.cli import main

    cases = write_cases(tmp_path / "data", 1)
    autoencoder_dir = tmp_path / "ae"
    micro().autoencoder.save_pretrained(autoencoder_dir)
    volume = f"{cases[0][0]}:{cases[0][1]}"
    args = ["train", "-o", str(tmp_path / "run"), "--preset", "tiny", "--autoencoder", str(autoencoder_dir), "--organs", "spleen,liver",
            "--volume", volume, "--batch-size", "2", "--checkpoint-every", "2", "--validate-every", "0", "--augment", "none", "-q", "--device", "cpu"]
    assert main(args + ["--steps", "2"]) == 0
    assert main(args + ["--steps", "2"]) == 2  # a checkpoint is there: refuse to start over it
    assert main(args + ["--steps", "4", "--resume"]) == 0
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["step"] == 4
    # Resumed without its flags, a run keeps its own settings (batch 2, no augmentation, not the defaults).
    bare = ["train", "-o", str(tmp_path / "run"), "--autoencoder", str(autoencoder_dir), "--organs", "spleen,liver", "--volume", volume,
            "-q", "--device", "cpu", "--resume"]
    assert main(bare + ["--steps", "6"]) == 0
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert state["step"] == 6 and state["settings"]["batch_size"] == 2 and state["settings"]["augmentation"] == "none"
    assert main(bare + ["--steps", "8", "--batch-size", "3"]) == 2  # a flag given that changes the trajectory
    assert main(["train", "-o", str(tmp_path / "x"), "--volume", "no-colon-here"]) == 2


def test_train_cli_fine_tunes_a_saved_model(tmp_path, capsys):
    from sdseg_monai.cli import main

    cases = write_cases(tmp_path / "data", 1)
    start = micro(latent_scale=0.7, postprocessing={"thresholds": {"liver": 0.3}, "largest_component": ["spleen"]})
    start.save_pretrained(tmp_path / "start")
    volume = f"{cases[0][0]}:{cases[0][1]}"
    args = ["train", "-o", str(tmp_path / "run"), "--init-from", str(tmp_path / "start"), "--volume", volume, "--steps", "2",
            "--batch-size", "2", "--validate-every", "0", "--augment", "none", "--max-minutes", "5", "-q", "--device", "cpu",
            "--organ-sampling", "organ", "--organs-per-slice", "2", "--mask-loss-weight", "0.5",
            "--condition-channels", "8"]
    assert main(args) == 0
    tuned = SDSeg.from_pretrained(tmp_path / "run" / "model")
    assert tuned.config.organ_names == ["spleen", "liver"] and tuned.config.latent_scale == 0.7  # the saved model's own
    assert tuned.config.mask_loss_weight == 0.5 and tuned.config.condition_channels == 8
    assert tuned.config.postprocessing == Postprocessing()  # calibrated for the old weights: reset
    assert "loss_mask" in (tmp_path / "run" / "log.jsonl").read_text()
    changed = [k for k, v in tuned.unet.state_dict().items() if not torch.equal(v, start.unet.state_dict()[k])]
    assert changed  # trained from the saved weights
    assert torch.equal(tuned.autoencoder.state_dict()["decoder.conv_out.weight"], start.autoencoder.state_dict()["decoder.conv_out.weight"])
    capsys.readouterr()
    assert main(["train", "-o", str(tmp_path / "other")] + args[3:] + ["--organs", "liver"]) == 2
    assert "--init-from takes the whole model" in capsys.readouterr().err
    assert main(["train", "-o", str(tmp_path / "third")] + args[3:] + ["--batch-size", "3"]) == 2
    err = capsys.readouterr().err
    assert "batch size 3 is not a multiple of organs per slice (2)" in err and len(err.strip().splitlines()) == 1
    assert main(args + ["--resume"]) == 2
    err = capsys.readouterr().err
    assert "--resume continues the checkpoint's model as it was" in err and len(err.strip().splitlines()) == 1


def test_train_autoencoder_cli_writes_a_loadable_autoencoder(tmp_path, capsys):
    from sdseg_monai.cli import main
    from sdseg_monai.weights import load_autoencoder

    cases = write_cases(tmp_path / "data", 1)
    out = tmp_path / "ae"
    args = ["train-autoencoder", "-o", str(out), "--random-masks", "16", "--volume", f"{cases[0][0]}:{cases[0][1]}", "--steps", "2", "-b", "2", "-q"]
    assert main(args) == 0
    assert "held-out reconstruction Dice" in capsys.readouterr().out
    autoencoder = load_autoencoder(out)
    from sdseg_monai.config import TINY_AUTOENCODER

    assert autoencoder.config.latent_channels == 4
    assert list(autoencoder.config.block_out_channels) == TINY_AUTOENCODER["block_out_channels"] == [24, 48, 96, 96]


def test_phantom_folders_carry_a_manifest_with_splits(tmp_path):
    from sdseg_monai.cli import main
    from sdseg_monai.data import check_data_root, load_manifest

    common = ["phantom", "-o", str(tmp_path), "--shape", "32", "32", "16", "--spacing", "12", "12", "12"]
    assert main(common + ["--n", "2", "--seed", "0", "--split", "train"]) == 0
    assert main(common + ["--n", "1", "--seed", "50", "--split", "test"]) == 0
    manifest = load_manifest(tmp_path / "manifest.json")
    assert manifest.splits == {"train": ("phantom_0", "phantom_1"), "test": ("phantom_50",)}
    assert manifest.labels[6] == "liver" and "transunet8" in manifest.subsets
    assert [c for c, _, _ in check_data_root(manifest, tmp_path, "test")] == ["phantom_50"]


def test_ddp_on_gpus_binds_each_process_to_its_own_gpu_before_nccl_starts(monkeypatch):
    """No GPU here: torch.cuda and torch.distributed are stood in for, and the calls recorded."""
    import datetime

    import torch.distributed as dist

    from sdseg_monai import training

    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: calls.append(("set_device", index)))
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda **kw: calls.append(("init", kw["backend"], kw["timeout"])))
    monkeypatch.setattr(dist, "get_backend", lambda: "nccl")
    monkeypatch.setattr(dist, "barrier", lambda **kw: calls.append(("barrier", kw)))
    backend, target = training._init_process_group(local_rank=1)
    assert backend == "nccl" and target == torch.device("cuda:1")
    assert calls[0] == ("set_device", 1) and calls[1][:2] == ("init", "nccl")
    assert calls[1][2] >= datetime.timedelta(minutes=60)  # rank 0 validates alone while the others wait
    training._barrier(backend, 1)
    assert calls[-1] == ("barrier", {"device_ids": [1]})
    # Control: on CPUs (gloo) no GPU is chosen, and the barrier takes no device ids (gloo has none).
    calls.clear()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(dist, "get_backend", lambda: "gloo")
    backend, target = training._init_process_group(local_rank=1)
    training._barrier(backend, 1)
    assert backend == "gloo" and target == torch.device("cpu")
    assert [c[:2] for c in calls] == [("init", "gloo"), ("barrier", {})]


def test_a_disabled_scaler_state_resumes_into_an_enabled_one():
    """A CPU or bf16 run checkpoints a disabled GradScaler as {}; resumed with fp16 on a GPU, the
    enabled scaler starts afresh instead of raising. (A CPU GradScaler stands in for CUDA's.)"""
    from sdseg_monai.training import _load_scaler_state

    disabled = torch.amp.GradScaler("cpu", enabled=False).state_dict()
    assert disabled == {}
    enabled = torch.amp.GradScaler("cpu", enabled=True, init_scale=2.0**16)
    with pytest.raises(RuntimeError, match="state dict is empty"):  # what loading it directly does
        enabled.load_state_dict(disabled)
    _load_scaler_state(enabled, disabled)
    assert enabled.get_scale() == 2.0**16
    # Control: an enabled scaler's own state is restored.
    _load_scaler_state(enabled, torch.amp.GradScaler("cpu", enabled=True, init_scale=128.0).state_dict())
    assert enabled.get_scale() == 128.0


def test_a_resumed_run_logs_each_step_once(tmp_path, monkeypatch):
    """Steps logged after the last checkpoint, before a crash, are dropped from log.jsonl on resume
    (they are trained and logged again); the log then reads as the uninterrupted run's."""
    from sdseg_monai import training

    cases = write_cases(tmp_path / "data", 2)
    settings = dict(steps=6, checkpoint_every=3, log_every=1)
    train_sdseg(micro(), cases, tmp_path / "straight", quick_settings(**settings), device="cpu", progress=False)
    save = training._atomic_torch_save

    def crash_at_step_6(state, path):
        if state["step"] == 6:
            raise KeyboardInterrupt
        save(state, path)

    monkeypatch.setattr(training, "_atomic_torch_save", crash_at_step_6)
    with pytest.raises(KeyboardInterrupt):
        train_sdseg(micro(), cases, tmp_path / "run", quick_settings(**settings), device="cpu", progress=False)
    log = tmp_path / "run" / "log.jsonl"
    with open(log, "a") as f:
        f.write('{"step": 7, "lo')  # a line the crash cut short
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()[:-1]] == [1, 2, 3, 4, 5, 6]
    monkeypatch.setattr(training, "_atomic_torch_save", save)
    train_sdseg(micro(), cases, tmp_path / "run", quick_settings(**settings), device="cpu", progress=False, resume=True)
    records = [json.loads(line) for line in log.read_text().splitlines()]
    straight = [json.loads(line) for line in (tmp_path / "straight" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in records] == [r["loss"] for r in straight]


def test_saved_models_hold_the_ema_weights_and_the_learning_rate_warms_up(tmp_path, monkeypatch):
    """model/ and last_model/ hold the exponential moving average of the trained weights (with its
    (1 + n) / (10 + n) warm-up), not the raw weights; the rate rises linearly over --warmup steps."""
    from safetensors.torch import load_file

    from sdseg_monai import training

    cases = write_cases(tmp_path / "data", 2)
    raw = []  # the raw weights after each step, from the checkpoints
    save = training._atomic_torch_save
    monkeypatch.setattr(training, "_atomic_torch_save", lambda state, path: (raw.append({k: v.clone() for k, v in state["model"].items()}), save(state, path)))
    start = micro()
    initial = {k: v.clone() for k, v in start.state_dict().items()}
    settings = quick_settings(steps=4, checkpoint_every=1, log_every=1, warmup_steps=3, validate_every=4, ema_decay=0.5)
    train_sdseg(start, cases, tmp_path / "run", settings, validation_cases=cases[:1], device="cpu", progress=False)
    trained = [name for name, _ in training._trained_parameters(start)]
    expected = {name: initial[name].float() for name in trained}
    for n, weights in enumerate(raw, 1):
        decay = min(0.5, (1 + n) / (10 + n))
        expected = {name: decay * expected[name] + (1 - decay) * weights[name].float() for name in trained}
    for folder in ("model", "last_model"):  # validated at the last step only: the best is the last
        saved = load_file(tmp_path / "run" / folder / "model.safetensors")
        for name in trained:
            torch.testing.assert_close(saved[name], expected[name], rtol=1e-5, atol=1e-6, msg=f"{folder}: {name}")
        # Control: the raw weights of the last step are not what was saved.
        assert sum(not torch.allclose(saved[n], raw[-1][n]) for n in trained) > len(trained) // 2
        assert torch.equal(saved["autoencoder.decoder.conv_out.weight"], initial["autoencoder.decoder.conv_out.weight"])  # frozen
    lr = 2e-4 * 4
    records = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in records if "lr" in r] == pytest.approx([lr / 3, 2 * lr / 3, lr, lr])


def _mirroring(plain, changed):
    """The slice axes (of the last two dims) along which ``changed`` mirrors ``plain``."""
    for axes in [(), (0,), (1,), (0, 1)]:
        if torch.allclose(torch.flip(plain, [a - 2 for a in axes]), changed, atol=1e-4):
            return axes
    raise AssertionError("not a mirroring")


@pytest.mark.parametrize(
    "organs, expected",
    [(("spleen", "liver", "left_kidney"), {(), (1,)}), (("spleen", "liver"), {(), (0,), (1,), (0, 1)})],
    ids=["lateral", "control"],
)
def test_flips_never_mirror_left_and_right_for_a_model_with_lateral_organs(tmp_path, organs, expected):
    """--augment paper (flips) on a model with a left kidney: both batch paths mirror front to back
    (slice axis 1 in RAS) but never left to right (axis 0), image and mask alike. Without lateral
    organs, both axes are mirrored."""
    from sdseg_monai.data import DeviceSliceBatches, flip_axes

    cases = write_cases(tmp_path, 2)
    config = micro_config(organs=organs)
    assert config.preprocessing.orientation == "RAS" and flip_axes(config) == tuple(sorted({a for m in expected for a in m}))
    plain = SliceDataset(cases, config.preprocessing, config.organ_labels, seed=1)
    paper = SliceDataset(cases, config.preprocessing, config.organ_labels, seed=1, augment=slice_augmentation("paper", size=32, axes=flip_axes(config)))
    seen = set()
    for epoch in range(4):
        plain.set_epoch(epoch), paper.set_epoch(epoch)
        for i in range(len(plain)):
            a, b = plain[i], paper[i]
            axes = _mirroring(a["image"], b["image"])
            assert torch.equal(torch.flip(a["mask"], [x - 2 for x in axes]), b["mask"])  # the mask goes with it
            seen.add(axes)
    assert seen == expected
    unflipped = DeviceSliceBatches(plain, "cpu", augmentation="none", seed=2).batch(0, 64)
    flipped = DeviceSliceBatches(plain, "cpu", augmentation="paper", seed=2, axes=flip_axes(config)).batch(0, 64)
    mirrorings = [_mirroring(unflipped["image"][i], flipped["image"][i]) for i in range(64)]
    assert set(mirrorings) == expected
    for i, axes in enumerate(mirrorings):
        assert torch.equal(torch.flip(unflipped["mask"][i], [x - 2 for x in axes]), flipped["mask"][i])


def test_both_strong_paths_draw_the_same_spread_of_spatial_parameters(tmp_path):
    """slice_augmentation's MONAI transforms and DeviceSliceBatches apply one recipe: the same share
    of affine and elastic draws, and per axis the same spread of rotation, scale, translation (pixels)
    and elastic control displacements (pixels) at the same control spacing."""
    from monai.transforms import Rand2DElasticd, RandAffined

    from sdseg_monai.data import DeviceSliceBatches

    size, n = 128, 4000
    config = micro_config(organs=("spleen", "liver"))
    device = DeviceSliceBatches(SliceDataset(write_cases(tmp_path, 1), config.preprocessing, config.organ_labels), "cpu")
    drawn = device.draw_spatial(n, torch.Generator().manual_seed(0))
    on = drawn["on"]
    device_params = {
        "rotate": drawn["angle"][on][:, None],
        "scale": drawn["scale"][on].flip(1),  # (x, y) -> slice axes (0, 1)
        "translate": drawn["shift"][on].flip(1) * size / 2,
    }
    warped = drawn["elastic"].flatten(1).any(1)
    device_elastic = drawn["elastic"][warped].flatten() * size / 2

    steps = slice_augmentation("strong", size=size).transforms
    affine = next(t for t in steps if isinstance(t, RandAffined)).set_random_state(0)
    elastic = next(t for t in steps if isinstance(t, Rand2DElasticd)).set_random_state(1)
    monai_on, params = 0, {"rotate": [], "scale": [], "translate": []}
    for _ in range(n):
        affine.randomize(None)
        if affine._do_transform:
            monai_on += 1
            affine.rand_affine.randomize()
            grid = affine.rand_affine.rand_affine_grid
            params["rotate"].append(grid.rotate_params)
            params["scale"].append(grid.scale_params)
            params["translate"].append(grid.translate_params)
    monai_params = {k: torch.tensor(v, dtype=torch.float32) for k, v in params.items()}
    offsets, warps = [], 0
    deform = elastic.rand_2d_elastic.deform_grid
    for _ in range(n // 4):
        elastic.randomize(None)
        if elastic._do_transform:
            warps += 1
            deform(spatial_size=(size, size))
            offsets.append(torch.as_tensor(deform.random_offset * deform.rand_mag).flatten())
    monai_elastic = torch.cat(offsets)

    assert abs(monai_on / n - float(on.float().mean())) < 0.03
    assert abs(warps / (n // 4) - float(warped.float().mean())) < 0.05
    for key in device_params:
        ours, theirs = device_params[key], monai_params[key]
        assert ours.shape[1] == theirs.shape[1], key  # a range for every axis
        assert torch.allclose(ours.std(0), theirs.std(0), rtol=0.08), (key, ours.std(0), theirs.std(0))
        assert torch.allclose(ours.mean(0), theirs.mean(0), atol=0.1 * float(theirs.std())), key
    assert torch.allclose(device_params["translate"].abs().amax(0), torch.full((2,), 0.06 * size), rtol=0.02)
    assert float(device_elastic.std()) == pytest.approx(float(monai_elastic.std()), rel=0.08)
    assert deform.spacing == pytest.approx((size / (device.ELASTIC_GRID - 1),) * 2, abs=1)


@pytest.mark.parametrize("field, value", [("base_lr", float("nan")), ("base_lr", float("inf")), ("base_lr", -1e-5), ("ema_decay", float("nan")),
                                          ("ema_decay", 1.5), ("absent_fraction", float("nan")), ("max_seconds", float("inf")),
                                          ("max_seconds", float("nan")), ("ema_decay", None), ("base_lr", "0.1"), ("max_seconds", 10**400)])
def test_train_settings_refuse_numbers_that_are_not_finite_or_in_range(field, value):
    """The API refuses what the CLI refuses: a NaN rate trained NaN weights, an infinite time limit meant none."""
    from sdseg_monai.errors import SDSegInputError

    with pytest.raises(SDSegInputError, match=f"TrainSettings.{field} must be a finite number"):
        TrainSettings(**{field: value})
    # The control: None where it has a meaning, the bounds themselves and the defaults are taken.
    assert TrainSettings(base_lr=None, max_seconds=None, ema_decay=1.0, absent_fraction=0.0).max_seconds is None
    assert TrainSettings(base_lr=0.0, max_seconds=0.0).learning_rate(1) == 0.0
    assert TrainSettings(base_lr=1).learning_rate(1) == pytest.approx(TrainSettings().batch_size)  # an int rate, kept as a float
