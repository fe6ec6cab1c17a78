"""The packaged default model: it ships, loads offline and segments a phantom it never saw.

A check of the packaging (files, size, storage, preprocessing, a Dice floor on large organs), not of
speed and not of the model's final quality (see sdseg_monai/default_model/MODEL_CARD.md).
"""

from __future__ import annotations

import json

import numpy as np
import torch

from sdseg_monai.labels import BTCV
from sdseg_monai.model import DEFAULT_MODEL_DIR, SDSeg, default_model_path

# Far from every seed the default model was trained, validated or tested on (100000+, 5000+, 9000+).
UNSEEN_PHANTOM_SEED = 424_242


def test_the_package_ships_a_default_model_within_its_size_budget():
    path = default_model_path()
    assert path == DEFAULT_MODEL_DIR
    files = sorted(p.name for p in path.iterdir())
    assert {"config.json", "model.safetensors", "MODEL_CARD.md"} <= set(files)
    assert sum(p.stat().st_size for p in path.iterdir()) <= 25 * 1024 * 1024

    from safetensors import safe_open

    with safe_open(str(path / "model.safetensors"), "pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
    assert dtypes == {"F16"}  # stored half precision, loaded as float32


def test_default_model_carries_its_organs_and_preprocessing():
    model = SDSeg.from_pretrained(default_model_path())
    config = model.config
    assert config.organ_names == [o.name for o in BTCV.organs]
    assert config.organ_labels == list(range(1, 14))
    assert config.preprocessing.hu_window == BTCV.hu_window
    assert config.preprocessing.slice_size == 256 and config.preprocessing.channels == "replicate"
    assert config.prediction_type == "sample" and config.latent_scale > 0
    assert next(model.parameters()).dtype == torch.float32
    card = (default_model_path() / "MODEL_CARD.md").read_text(encoding="utf-8")
    assert "not for clinical use" in card.lower() and "synthetic" in card.lower()


def test_default_model_segments_an_unseen_phantom():
    """Four large organs of a phantom never used in training, through the `sdseg3d segment` path.
    A 12-slice slab through the phantom's middle (the same anatomy as the full phantom there) keeps
    this CPU test short at the model's 256x256 slices."""
    from sdseg_monai.inference import VolumeSegmenter
    from sdseg_monai.metrics import organ_scores
    from sdseg_monai.phantoms import phantom_volumes

    image, label = phantom_volumes(UNSEEN_PHANTOM_SEED, shape=(128, 128, 12))
    organs = ["liver", "spleen", "right_kidney", "left_kidney"]
    segmenter = VolumeSegmenter(default_model_path(), device="cpu", organs=organs, seed=0)
    result = segmenter.segment(image)
    assert result.labels.shape == tuple(image.shape[:3]) and result.labels.dtype == np.uint8
    scores = {s.name: s.dice for s in organ_scores(result.labels, label.image[0].numpy(), result.organs)}
    assert set(scores) == set(organs)
    assert scores["liver"] >= 0.85, scores
    assert min(scores.values()) >= 0.6, scores
    # Same model, same input, same seed: the same labels, bit for bit.
    assert np.array_equal(segmenter.segment(image).labels, result.labels)
    # Its calibrated radius skips the decodes of pairs predicted empty (the esophagus lies above
    # this slab) and leaves the labels those of decoding every pair.
    decoded = []
    segmenter.model.autoencoder.decoder.register_forward_hook(lambda m, i, o: decoded.append(i[0].shape[0]))
    pair = ["liver", "esophagus"]
    skipping = VolumeSegmenter(segmenter.model, device="cpu", organs=pair, seed=0).segment(image)
    skipped_run_decodes = sum(decoded)
    decoded.clear()
    every = VolumeSegmenter(segmenter.model, device="cpu", organs=pair, seed=0, skip_decode=False).segment(image)
    assert sum(decoded) == 12 * len(pair) and 0 < skipped_run_decodes < sum(decoded)
    assert np.array_equal(every.labels, skipping.labels)


def test_segment_cli_uses_the_default_model_without_model_option(tmp_path):
    from sdseg_monai.cli import main
    from sdseg_monai.phantoms import write_phantoms

    ((image, _),) = write_phantoms(tmp_path, n=1, seed=UNSEEN_PHANTOM_SEED, shape=(48, 48, 3))
    out = tmp_path / "mask.nii.gz"
    assert main(["segment", str(image), "-o", str(out), "--organs", "liver", "-q"]) == 0
    sidecar = json.loads((tmp_path / "mask.json").read_text())
    assert sidecar["model"] == str(default_model_path())
    assert sidecar["labels"] == {"6": "liver"}

