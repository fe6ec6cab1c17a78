"""Postprocessing (per-organ thresholds, axial smoothing, largest components) and its calibration on a
validation split."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from sdseg_monai.calibration import SMOOTHING_GRID, THRESHOLD_GRID
from sdseg_monai.config import Postprocessing, SDSegConfig
from sdseg_monai.errors import SDSegInputError
from sdseg_monai.transforms import fuse_probabilities, keep_largest_component, smooth_axially

from conftest import micro_config
from test_evaluation import IntensityOracle, dataset, micro_sdseg  # noqa: F401  (fixtures)


# -- fusion and components -------------------------------------------------------------------------------
def test_fusion_with_per_organ_thresholds():
    # Organ A (label 6) at 0.6 under its threshold 0.7; organ B (label 1) at 0.4 over its 0.3: B wins.
    probs = torch.tensor([0.6, 0.4]).reshape(1, 2, 1, 1)
    assert fuse_probabilities(probs, [6, 1], [0.7, 0.3]).item() == 1
    assert fuse_probabilities(probs, [6, 1], [0.5, 0.3]).item() == 6  # both claim: the more probable wins
    assert fuse_probabilities(probs, [6, 1], [0.7, 0.45]).item() == 0
    # One threshold for all is the same as the same threshold per organ.
    maps = torch.rand((3, 4, 5, 5), generator=torch.Generator().manual_seed(0))
    assert torch.equal(fuse_probabilities(maps, [1, 2, 3, 4], 0.5), fuse_probabilities(maps, [1, 2, 3, 4], [0.5] * 4))


def test_keep_largest_component_removes_islands_of_the_named_organs_only():
    labels = torch.zeros((12, 12, 6), dtype=torch.uint8)
    labels[1:5, 1:5, 1:4] = 2  # 48 voxels
    labels[8, 8, 2] = labels[9, 9, 3] = 2  # a diagonal 2-voxel island (26-connected)
    labels[10, 1, 1] = 3
    labels[1, 10, 4] = labels[1, 10, 0] = 3  # another organ's islands, not filtered
    out = keep_largest_component(labels, [2, 4])
    assert int((out == 2).sum()) == 48 and out[8, 8, 2] == 0 and out[9, 9, 3] == 0
    assert torch.equal(out == 3, labels == 3)
    assert int((labels == 2).sum()) == 50  # the input is untouched


def test_axial_smoothing_averages_each_organ_with_its_neighbouring_slices():
    maps = torch.rand((7, 3, 4, 5), generator=torch.Generator().manual_seed(1))
    out = smooth_axially(maps, [0.0, 0.5, 1.0])
    assert torch.equal(out[:, 0], maps[:, 0])  # weight 0: the organ's maps exactly
    assert torch.allclose(out[3, 2], (maps[2, 2] + maps[3, 2] + maps[4, 2]) / 3)
    assert torch.allclose(out[3, 1], (maps[3, 1] + 0.5 * (maps[2, 1] + maps[4, 1])) / 2)
    assert torch.allclose(out[0, 1], (maps[0, 1] + 0.5 * maps[1, 1]) / 1.5)  # the volume's ends: no slice beyond
    assert torch.allclose(out[6, 2], (maps[5, 2] + maps[6, 2]) / 2)
    # A block with the slices around it given is the same as the block cut from the whole volume.
    assert torch.allclose(smooth_axially(maps[2:5], [0.0, 0.5, 1.0], maps[1:2], maps[5:6]), out[2:5])
    assert smooth_axially(maps, [0.0, 0.0, 0.0]) is maps


# -- config ----------------------------------------------------------------------------------------------
def test_postprocessing_round_trips_with_the_model(tmp_path, micro_model):
    from sdseg_monai.model import SDSeg

    micro_model.config.postprocessing = Postprocessing(thresholds={"liver": 0.3}, largest_component=["spleen"])
    loaded = SDSeg.from_pretrained(micro_model.save_pretrained(tmp_path / "m"))
    assert loaded.config.postprocessing == micro_model.config.postprocessing
    assert loaded.config.postprocessing.threshold("liver") == 0.3 and loaded.config.postprocessing.threshold("spleen") == 0.5
    # A config written before postprocessing existed loads with SDSeg's plain rounding.
    data = micro_config().to_dict()
    del data["postprocessing"]
    assert SDSegConfig.from_dict(data).postprocessing == Postprocessing()


@pytest.mark.parametrize(
    "postprocessing, fragment",
    [
        ({"thresholds": {"pancreas": 0.3}}, "postprocessing names organs this model does not have: pancreas"),
        ({"largest_component": ["heart"]}, "does not have: heart"),
        ({"thresholds": {"liver": 1.5}}, "threshold of liver must lie in (0, 1]"),
        ({"default_threshold": 0.0}, "threshold of default must lie in (0, 1]"),
        ({"skip_decode_radius": -0.5}, "skip_decode_radius must be a finite number >= 0"),
        ({"axial_smoothing": {"liver": -1}}, "axial_smoothing of liver must be a finite number >= 0"),
        ({"axial_smoothing": {"heart": 0.5}}, "does not have: heart"),
    ],
)
def test_bad_postprocessing_is_refused(postprocessing, fragment):
    with pytest.raises(SDSegInputError) as error:
        micro_config(postprocessing=postprocessing)
    assert fragment in str(error.value)


# -- the segmenter applies the model's postprocessing ----------------------------------------------------
def test_segmenter_applies_thresholds_and_largest_components(micro_model):
    from sdseg_monai.inference import VolumeSegmenter

    image = torch.rand((1, 24, 20, 5), generator=torch.Generator().manual_seed(4)) * 2 - 1
    plain = VolumeSegmenter(micro_model, device="cpu", postprocess=False)
    labels = plain.segment_canonical(image)
    assert plain.postprocessing == {
        "thresholds": {"spleen": 0.5, "left_kidney": 0.5, "liver": 0.5},
        "largest_component": [],
        "skip_decode_radius": 0.0,
        "axial_smoothing": {},
        "num_shifts": 1,
    }

    micro_model.config.postprocessing = Postprocessing(largest_component=["spleen", "left_kidney", "liver"])
    filtered = VolumeSegmenter(micro_model, device="cpu").segment_canonical(image)
    assert torch.equal(filtered, keep_largest_component(labels, [1, 3, 6]))
    assert torch.equal(VolumeSegmenter(micro_model, device="cpu", postprocess=False).segment_canonical(image), labels)

    # Lowering thresholds only adds foreground; an organ that won at 0.5 still wins.
    micro_model.config.postprocessing = Postprocessing(thresholds={"liver": 0.2})
    lowered = VolumeSegmenter(micro_model, device="cpu").segment_canonical(image)
    assert torch.all(lowered[labels == 6] == 6) and torch.all(lowered[labels > 0] > 0)
    everywhere = VolumeSegmenter(micro_model, device="cpu", threshold=0.01).segment_canonical(image)
    assert torch.all(everywhere[labels > 0] > 0) and int((everywhere > 0).sum()) >= int((lowered > 0).sum())


def test_segmenter_skips_decodes_only_where_the_calibration_holds(micro_model):
    from sdseg_monai.inference import VolumeSegmenter

    image = torch.rand((1, 24, 20, 5), generator=torch.Generator().manual_seed(4)) * 2 - 1
    exact = VolumeSegmenter(micro_model, device="cpu")
    maps, distances = exact.probabilities_canonical(image)
    assert maps.shape == (3, 24, 20, 5) and distances.shape == (3, 5)
    radius = float(distances.flatten().sort().values[4])  # 4 of the 15 (organ, slice) pairs inside
    micro_model.config.postprocessing = Postprocessing(skip_decode_radius=radius)
    skipping = VolumeSegmenter(micro_model, device="cpu")
    assert skipping.postprocessing["skip_decode_radius"] == radius
    # The radius skips exactly those pairs: their maps are empty, the other maps as before.
    with torch.inference_mode():
        native = torch.cat([chunk.maps for chunk in exact._probability_chunks(image)])  # (Z, K, X, Y)
    native = native.clone()
    near = distances < radius
    native[near.T] = 0
    expected = fuse_probabilities(native, list(exact.organs), 0.5).permute(1, 2, 0)
    assert torch.equal(skipping.segment_canonical(image), expected)
    # Calibrating again measures every pair, whatever the model's radius.
    again, again_distances = skipping.probabilities_canonical(image)
    assert torch.equal(again, maps) and torch.equal(again_distances, distances)
    # No skipping without the postprocessing, on request, or under thresholds the calibration does not cover.
    for options in ({"postprocess": False}, {"skip_decode": False}, {"threshold": 0.05}):
        assert VolumeSegmenter(micro_model, device="cpu", **options).skip_decode_radius == 0.0
    assert VolumeSegmenter(micro_model, device="cpu", threshold=0.3).skip_decode_radius == radius


def test_segmenter_smooths_across_its_chunks_as_over_the_whole_volume(micro_model):
    from sdseg_monai.inference import VolumeSegmenter

    image = torch.rand((1, 24, 20, 9), generator=torch.Generator().manual_seed(5)) * 2 - 1
    micro_model.config.postprocessing = Postprocessing()
    plain = VolumeSegmenter(micro_model, device="cpu", batch_size=3)  # chunks of 4, 4 and 1 slices
    with torch.inference_mode():
        native = torch.cat([chunk.maps for chunk in plain._probability_chunks(image)])  # (Z, K, X, Y)
    weights = {"spleen": 1.0, "liver": 0.25}
    micro_model.config.postprocessing = Postprocessing(axial_smoothing=weights, thresholds={"liver": 0.45})
    smoothing = VolumeSegmenter(micro_model, device="cpu", batch_size=3)
    assert smoothing.chunk_slices == 4 and smoothing.postprocessing["axial_smoothing"] == weights
    names = list(plain.organs.values())
    organ_weights = [weights.get(name, 0.0) for name in names]
    organ_thresholds = [0.45 if name == "liver" else 0.5 for name in names]
    expected = fuse_probabilities(smooth_axially(native, organ_weights), list(plain.organs), organ_thresholds)
    labels = smoothing.segment_canonical(image)
    assert torch.equal(labels, expected.permute(1, 2, 0))
    assert not torch.equal(labels, plain.segment_canonical(image))  # it changed something to check
    assert torch.equal(VolumeSegmenter(micro_model, device="cpu", batch_size=3, postprocess=False).segment_canonical(image), plain.segment_canonical(image))


def test_skipped_pairs_smoothed_and_fused_give_the_labels_of_the_whole_computation(micro_model):
    """Skipped pairs are neither resized, smoothed nor fused, organ by organ and chunk by chunk: the
    labels are those of smoothing and fusing every map, the skipped ones zero, over the whole volume."""
    from sdseg_monai.inference import VolumeSegmenter

    image = torch.rand((1, 24, 20, 11), generator=torch.Generator().manual_seed(6)) * 2 - 1
    micro_model.config.postprocessing = Postprocessing()
    maps, distances = VolumeSegmenter(micro_model, device="cpu").probabilities_canonical(image)
    radius = float(distances.flatten().sort().values[14])  # 14 of the 33 (organ, slice) pairs skipped
    weights = {"spleen": 1.0, "liver": 0.25}
    micro_model.config.postprocessing = Postprocessing(
        skip_decode_radius=radius, axial_smoothing=weights, thresholds={"liver": 0.45}
    )
    segmenter = VolumeSegmenter(micro_model, device="cpu", batch_size=3)  # chunks of 4, 4 and 3 slices
    with torch.inference_mode():
        chunks = list(segmenter._probability_chunks(image))
    decoded = torch.cat([chunk.decoded for chunk in chunks])  # (Z, K)
    assert torch.equal(decoded, (distances >= radius).T) and not decoded.all() and decoded.any()
    native = torch.cat([chunk.maps for chunk in chunks])
    assert not native[~decoded].any()  # skipped pairs are exactly zero
    # The decoded pairs, resized on their own, are what decoding and resizing everything gives (to
    # rounding: the decoder's batches hold other pairs).
    with torch.inference_mode():
        everything = torch.cat([chunk.maps for chunk in VolumeSegmenter(micro_model, device="cpu", batch_size=3, skip_decode=False)._probability_chunks(image)])
    assert torch.allclose(native[decoded], everything[decoded], rtol=0, atol=1e-6)
    names = list(segmenter.organs.values())
    expected = fuse_probabilities(
        smooth_axially(native, [weights.get(name, 0.0) for name in names]),
        list(segmenter.organs),
        [0.45 if name == "liver" else 0.5 for name in names],
    )
    assert torch.equal(segmenter.segment_canonical(image), expected.permute(1, 2, 0))


def test_skip_radius_is_a_margin_below_the_closest_visible_pair():
    from sdseg_monai.calibration import SKIP_DECODE_MARGIN, choose_skip_decode_radius

    peaks = [torch.tensor([[0.0, 0.9, 0.04], [0.6, 0.0, 0.0]]), torch.tensor([[0.05, 0.0, 0.0], [0.0, 0.0, 0.0]])]
    distances = [torch.tensor([[0.1, 8.0, 3.0], [6.0, 0.2, 0.1]]), torch.tensor([[4.0, 0.3, 0.1], [0.1, 0.1, 0.2]])]
    radius, closest, share = choose_skip_decode_radius(peaks, distances)
    assert closest == 4.0 and radius == SKIP_DECODE_MARGIN * 4.0 == 2.0  # 0.04 is not visible, 0.05 is
    assert share == pytest.approx(8 / 12)
    assert choose_skip_decode_radius([torch.zeros(2, 3)], [torch.ones(2, 3)]) == (0.0, None, 0.0)


# -- the search ------------------------------------------------------------------------------------------
def _search_case(seed: int):
    """Two organs on a 20x20x6 grid: organ 1 an under-confident box (0.3 inside), organ 2 a confident box
    with a confident stray island; a third organ the references do not label."""
    reference = torch.zeros((20, 20, 6), dtype=torch.uint8)
    probs = torch.zeros((3, 20, 20, 6))
    offset = seed % 3
    reference[2 + offset : 8 + offset, 2:8, 1:5] = 1
    probs[0, 2 + offset : 8 + offset, 2:8, 1:5] = 0.3
    reference[12:18, 10:18, 0:6] = 2
    probs[1, 12:18, 10:18, 0:6] = 0.9
    probs[1, 1, 17, 3] = probs[1, 2, 17, 3] = 0.9  # the island
    probs[2, 10:12, 0:3, :] = 0.8  # an unlabelled organ
    return probs.to(torch.float16), reference


def test_search_finds_the_threshold_and_the_component_filter():
    from sdseg_monai.calibration import search_postprocessing

    cases = [_search_case(s) for s in range(3)]
    post, before, after = search_postprocessing(
        [p for p, _ in cases], [r for _, r in cases], ["vein", "kidney", "other"], scored=["vein", "kidney"], smoothing_grid=(0.0,)
    )
    assert post.thresholds["vein"] <= 0.3 and "kidney" not in post.thresholds and "other" not in post.thresholds
    assert post.largest_component == ["kidney"]
    assert set(before) == set(after) == {"vein", "kidney"}
    assert before["vein"] == 0.0 and after["vein"] == 1.0
    assert before["kidney"] == pytest.approx(2 * 288 / (290 + 288)) and after["kidney"] == 1.0


def test_search_smooths_an_organ_that_a_threshold_alone_cannot_fix():
    from sdseg_monai.calibration import search_postprocessing

    # An organ in slices 0-4 of 8, confident except on slice 2 (0.2), and a confident (0.6) false
    # positive touching it on slice 3 only: no threshold keeps slice 2 and drops the false positive,
    # nor does a component filter (it is connected); averaging over neighbouring slices does.
    reference = torch.zeros((12, 12, 8), dtype=torch.uint8)
    reference[2:6, 2:6, 0:5] = 1
    probs = (reference == 1).float()[None] * 0.9
    probs[0, 2:6, 2:6, 2] = 0.2
    probs[0, 6:8, 2:6, 3] = 0.6
    post, before, after = search_postprocessing([probs.to(torch.float16)], [reference], ["liver"])
    assert post.smoothing("liver") > 0 and after == {"liver": 1.0} and before["liver"] < 0.9
    assert post.largest_component == []
    unsmoothed, _, threshold_only = search_postprocessing([probs.to(torch.float16)], [reference], ["liver"], smoothing_grid=(0.0,))
    # The best a threshold does: 0.2 keeps slice 2 and the 8 false-positive voxels with it.
    assert unsmoothed.axial_smoothing == {} and threshold_only["liver"] == pytest.approx(2 * 80 / (88 + 80))
    assert probs[0, 2, 2, 2] == pytest.approx(0.2)  # the input maps are not smoothed in place


def test_search_keeps_defaults_when_nothing_helps():
    from sdseg_monai.calibration import search_postprocessing

    reference = torch.zeros((10, 10, 4), dtype=torch.uint8)
    reference[2:6, 2:6, 1:3] = 1
    probs = (reference == 1).float()[None].to(torch.float16)
    post, before, after = search_postprocessing([probs], [reference], ["liver"])
    assert post == Postprocessing() and before == after == {"liver": 1.0}


def _sparse_maps(seed: int, organs: int = 4, shape=(22, 20, 12)) -> torch.Tensor:
    """Per-organ maps as a model gives them: a confident blob per organ, every other one in a faint
    halo that straddles the boxes' floor (the others end sharply, so that their last confident slices
    are the edge of what the floor keeps), quantised so that organs tie, and a stray confident voxel."""
    generator = torch.Generator().manual_seed(seed)
    maps = torch.zeros((organs, *shape))
    for k in range(organs):
        x, y, z = (int(torch.randint(0, n - 6, (1,), generator=generator)) for n in shape)
        if k % 2:
            halo = maps[k, max(0, x - 3) : x + 9, max(0, y - 3) : y + 9, max(0, z - 3) : z + 7]
            halo.copy_(torch.rand(halo.shape, generator=generator) * 0.07)
        maps[k, x : x + 6, y : y + 6, z : z + 4] = torch.rand((6, 6, 4), generator=generator)
    maps[1, 2, 2, 6] = 0.9
    maps[2, 4:9, 4:9, 5] = maps[3, 4:9, 4:9, 5] = 0.6  # a tie
    return (maps * 40).round() / 40


def test_searching_organ_boxes_gives_the_labels_of_the_whole_maps():
    """Calibration keeps each organ's maps in a box (CaseMaps); fused there, with every smoothing and
    threshold the search tries and pairs emptied by the skip radius, the labels are those of
    smoothing and fusing the whole maps, as segmenting does."""
    from sdseg_monai.calibration import CaseMaps, _candidate_confusions, _confusion, lowest_floor

    floor = lowest_floor(THRESHOLD_GRID)
    for seed in range(3):
        maps = _sparse_maps(seed)
        organs, depth = maps.shape[0], maps.shape[-1]
        skipped = torch.rand((organs, depth), generator=torch.Generator().manual_seed(seed)) < 0.2
        whole = maps * ~skipped[:, None, None, :]
        boxes = CaseMaps.of(maps, floor)
        boxes.drop_pairs(skipped)
        kept = sum(box.values.numel() for box in boxes.organs if box is not None)
        assert kept < maps.numel() / 2 and any(box.values.shape[2] < depth for box in boxes.organs)
        reference = torch.randint(0, organs + 1, maps.shape[1:], generator=torch.Generator().manual_seed(seed)).to(torch.uint8)

        def labels(thresholds, weights):  # as segmenting computes them, from the whole maps
            smoothed = smooth_axially(whole.permute(3, 0, 1, 2), weights)
            return fuse_probabilities(smoothed, range(1, organs + 1), thresholds).permute(1, 2, 0)

        rng = np.random.default_rng(seed)
        for _ in range(4):
            thresholds = [float(t) for t in rng.choice(THRESHOLD_GRID, organs)]
            weights = [float(w) for w in rng.choice(SMOOTHING_GRID, organs)]
            assert torch.equal(boxes.fuse(thresholds, weights)[1], labels(thresholds, weights))
            k = int(rng.integers(organs))
            table = _candidate_confusions(boxes, reference, k, thresholds, weights, THRESHOLD_GRID, SMOOTHING_GRID, organs + 1)
            for i, weight in enumerate(SMOOTHING_GRID):
                for j, value in enumerate(THRESHOLD_GRID):
                    tried_t, tried_w = list(thresholds), list(weights)
                    tried_t[k], tried_w[k] = value, weight
                    assert torch.equal(table[i][j], _confusion(labels(tried_t, tried_w), reference, organs + 1))
    assert torch.equal(maps, _sparse_maps(2))  # the maps given are not changed


# -- calibrate on a manifest split, save, and use -------------------------------------------------------
class UnderConfidentOracle(IntensityOracle):
    """The intensity oracle with the liver at probability 0.3 and a confident stray spleen voxel block."""

    def maps(self, slices):
        maps = super().maps(slices)
        liver = self.organs.index("liver")
        maps[:, liver] *= 0.3
        maps[:, self.organs.index("spleen"), 1:3, 1:3] = 1.0
        return maps


def test_calibrate_save_and_segment_with_the_calibrated_model(dataset, micro_sdseg, tmp_path):  # noqa: F811
    from sdseg_monai.calibration import CALIBRATION_NAME, calibrate, save_calibrated_model
    from sdseg_monai.evaluation import evaluate
    from sdseg_monai.inference import VolumeSegmenter

    manifest_path, root = dataset
    manifest = json.loads(manifest_path.read_text())
    manifest["splits"] = {"validation": ["a", "b"]}
    manifest_path.write_text(json.dumps(manifest))
    model_dir = micro_sdseg.save_pretrained(tmp_path / "model")
    before_bytes = {p.name: p.read_bytes() for p in model_dir.iterdir()}

    segmenter = VolumeSegmenter(model_dir, device="cpu")
    segmenter.inferer = UnderConfidentOracle(segmenter.inferer.organs)
    seen = []
    result = calibrate(segmenter, manifest_path, root, progress=lambda done, total, case: seen.append((done, total, case)))
    assert seen == [(1, 2, "a"), (2, 2, "b")] and result.cases == ["a", "b"]
    assert result.postprocessing.thresholds["liver"] <= 0.3
    assert "spleen" in result.postprocessing.largest_component
    assert result.before["liver"] == 0.0 and result.after["liver"] > 0.9  # the full-confidence oracle scores > 0.9
    assert result.after["spleen"] > result.before["spleen"]
    assert result.organs == ["liver", "spleen", "left_kidney"] and result.after["left_kidney"] is None
    assert result.mean_after > result.mean_before
    assert "liver" in result.format_table() and "mean Dice" in result.format_table()
    # The oracle's distance is 10x a map's peak: the closest visible pair is a liver slice (0.3 -> 3),
    # and the empty pairs (the kidney everywhere, the liver off the liver) are skipped.
    assert result.closest_decoded == pytest.approx(3.0) and result.postprocessing.skip_decode_radius == pytest.approx(1.5)
    assert result.skipped_share >= 1 / 3 and "decoding skipped within 1.500" in result.format_table()

    calibrated = save_calibrated_model(model_dir, result, tmp_path / "calibrated")
    assert {p.name: p.read_bytes() for p in model_dir.iterdir()} == before_bytes  # the input is untouched
    assert (calibrated / "model.safetensors").read_bytes() == before_bytes["model.safetensors"]
    saved = json.loads((calibrated / CALIBRATION_NAME).read_text())
    assert saved["per_organ"]["liver"]["threshold"] == result.postprocessing.thresholds["liver"]
    assert saved["postprocessing"]["skip_decode_radius"] == pytest.approx(1.5)
    assert saved["skip_decode"]["pairs_skipped"] == result.skipped_share

    # The calibrated model scores on the same cases what calibration promised (canonical vs input grid).
    user = VolumeSegmenter(calibrated, device="cpu")
    user.inferer = UnderConfidentOracle(user.inferer.organs, user.skip_decode_radius)
    report = evaluate(user, manifest_path, root, split="validation")
    scores = {o.name: o.mean_dice for o in report.per_organ}
    for organ in ("liver", "spleen"):
        assert scores[organ] == pytest.approx(result.after[organ], abs=0.02)
    assert report.postprocessing["largest_component"] == user.postprocessing["largest_component"]
    assert report.postprocessing["skip_decode_radius"] == pytest.approx(1.5)


def test_calibration_reports_the_dice_the_calibrated_model_scores(dataset, micro_sdseg, tmp_path):  # noqa: F811
    """The real (random-weight) model, no stand-in: calibration chooses and scores on the float32
    maps segmenting fuses, so its Dice is what evaluating the saved model gives (float16 maps were
    off by 2.5e-4 on these cases)."""
    from sdseg_monai.calibration import calibrate, save_calibrated_model
    from sdseg_monai.evaluation import evaluate
    from sdseg_monai.inference import VolumeSegmenter

    manifest_path, root = dataset
    manifest = json.loads(manifest_path.read_text())
    manifest["splits"] = {"validation": ["a", "b"]}
    manifest_path.write_text(json.dumps(manifest))
    model_dir = micro_sdseg.save_pretrained(tmp_path / "model")
    result = calibrate(VolumeSegmenter(model_dir, device="cpu"), manifest_path, root)
    assert result.postprocessing.thresholds and result.postprocessing.skip_decode_radius > 0  # something to reproduce
    calibrated = save_calibrated_model(model_dir, result, tmp_path / "calibrated")
    report = evaluate(VolumeSegmenter(calibrated, device="cpu"), manifest_path, root, split="validation")
    scores = {o.name: o.mean_dice for o in report.per_organ}
    assert any(result.after[name] for name in result.organs)  # not only empty organs
    for name in result.organs:
        assert (scores[name] is None) == (result.after[name] is None)
        if scores[name] is not None:
            assert scores[name] == pytest.approx(result.after[name], abs=1e-6)  # evaluate sums in float32


def test_calibration_refuses_the_test_split_and_its_own_model_folder(dataset, micro_sdseg, tmp_path):  # noqa: F811
    from sdseg_monai.calibration import CalibrationResult, calibrate, save_calibrated_model
    from sdseg_monai.inference import VolumeSegmenter

    manifest, root = dataset
    with pytest.raises(SDSegInputError, match="refusing to calibrate on the test split"):
        calibrate(VolumeSegmenter(micro_sdseg, device="cpu"), manifest, root, split="test")
    with pytest.raises(SDSegInputError, match="refusing to calibrate on the test split"):  # every case: test ones too
        calibrate(VolumeSegmenter(micro_sdseg, device="cpu"), manifest, root, split=None)
    model_dir = micro_sdseg.save_pretrained(tmp_path / "model")
    result = CalibrationResult(Postprocessing(), ["liver"], ["a"], {"liver": 1.0}, {"liver": 1.0})
    with pytest.raises(SDSegInputError, match="must go to a new folder"):
        save_calibrated_model(model_dir, result, tmp_path / "model" / ".." / "model")


def test_cli_calibrate(dataset, micro_sdseg, tmp_path, capsys):  # noqa: F811
    from sdseg_monai.cli import main

    manifest_path, root = dataset
    manifest = json.loads(manifest_path.read_text())
    manifest["splits"] = {"validation": ["a"], "test": ["b"]}
    manifest_path.write_text(json.dumps(manifest))
    model_dir = micro_sdseg.save_pretrained(tmp_path / "model")
    base = ["calibrate", "-m", str(model_dir), "--manifest", str(manifest_path), "--data-root", str(root), "--device", "cpu"]

    assert main([*base, "-o", str(tmp_path / "out"), "--split", "test"]) == 2
    assert "refusing to calibrate on the test split" in capsys.readouterr().err
    assert main([*base, "-o", str(model_dir)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "must go to a new folder" in err and str(model_dir) in err

    # The real (random-weight) micro model: one small case, the whole path from files to a saved model.
    assert main([*base, "-o", str(tmp_path / "out"), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "threshold" in out and "mean Dice" in out
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    report = json.loads((tmp_path / "out" / "calibration.json").read_text())
    assert config["postprocessing"] == report["postprocessing"] and report["cases"] == ["a"]
    assert np.all([0.1 <= t <= 0.9 for t in report["postprocessing"]["thresholds"].values()])

    # A MONAI bundle is a --model here too: same calibration, written as a model folder with the same tensors.
    from safetensors.torch import load_file

    from sdseg_monai.bundle import export_bundle

    bundle = export_bundle(model_dir, tmp_path / "bundle")
    assert main([*base[:1], "-m", str(bundle), *base[3:], "-o", str(tmp_path / "from_bundle"), "--quiet"]) == 0
    capsys.readouterr()
    assert json.loads((tmp_path / "from_bundle" / "calibration.json").read_text())["postprocessing"] == report["postprocessing"]
    ours, theirs = load_file(str(tmp_path / "from_bundle" / "model.safetensors")), load_file(str(model_dir / "model.safetensors"))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in theirs)
