"""``--compile``: torch.compile of the UNet and the decoder, one compilation for every batch size.

The default run traces with dynamo's ``eager`` backend (the same operations, seconds to trace); the
slow test compiles with inductor, as a GPU run does."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch._dynamo.utils import counters

from conftest import labelled_scan, micro_config
from sdseg_monai.errors import SDSegInputError
from sdseg_monai.inference import VolumeSegmenter
from sdseg_monai.model import COMPILED_BATCH_MULTIPLE, SDSeg, pad_batch

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def fresh_micro_model() -> SDSeg:
    torch.manual_seed(0)
    return SDSeg(micro_config(organs=("spleen", "liver", "left_kidney"))).eval()


@pytest.fixture
def traced_by(monkeypatch):
    """compile_for_inference with a chosen backend in place of inductor (a minute per compile on 2 cores)."""
    original = SDSeg.compile_for_inference

    def use(backend):
        monkeypatch.setattr(SDSeg, "compile_for_inference", lambda self, backend_=backend: original(self, backend_))

    torch._dynamo.reset()
    yield use
    torch._dynamo.reset()


def test_pad_batch_repeats_the_last_item_up_to_the_multiple():
    x = torch.arange(10.0).reshape(5, 2)
    t = torch.tensor([7, 8, 9, 10, 11])
    padded_x, padded_t, nothing = pad_batch([x, t, None], 8)
    assert padded_x.shape == (8, 2) and torch.equal(padded_x[:5], x) and torch.equal(padded_x[5:], x[-1:].expand(3, 2))
    assert padded_t.tolist() == [7, 8, 9, 10, 11, 11, 11, 11] and nothing is None
    assert pad_batch([x[:4]], 4)[0].shape == (4, 2)  # already a multiple: as it is
    assert pad_batch([x], 1)[0] is x


def graphs() -> int:
    return counters["stats"]["unique_graphs"]


def test_compiled_model_predicts_as_before_and_compiles_once_for_every_batch_size(traced_by):
    slices = torch.rand((8, 3, 32, 32), generator=torch.Generator().manual_seed(1)) * 2 - 1  # 24 (slice, organ) pairs
    reference, compiled = fresh_micro_model(), fresh_micro_model().compile_for_inference(backend="eager")
    assert compiled._batch_multiple == COMPILED_BATCH_MULTIPLE
    assert list(compiled.state_dict()) == list(reference.state_dict())  # saves and loads as before
    with torch.inference_mode():
        expected = reference.predict(slices, seed=2, batch_size=24)
        # The two ends: a full batch, and one pair padded to 8 (CPU convolutions change backend at 16).
        assert torch.allclose(compiled.predict(slices, seed=2, batch_size=24), expected, atol=1e-5)
        assert torch.allclose(compiled.predict(slices[:1], seed=2, batch_size=1), expected[:1], atol=1e-5)
        warmed = graphs()
        for batch in (3, 5, 9, 17, 20):  # forwards of 3 to 20 pairs, padded to 8, 16 or 24
            assert torch.allclose(compiled.predict(slices, seed=2, batch_size=batch), expected, atol=1e-5)
        assert graphs() == warmed
        # Negative control: without the padding a batch of one pair is compiled apart.
        compiled._batch_multiple = 1
        compiled.predict(slices[:1], seed=2, batch_size=1)
        assert graphs() > warmed


def test_segmenter_compiles_a_copy_at_start_and_records_it(traced_by, tmp_path):
    traced_by("eager")
    model = fresh_micro_model()
    image, _, affine = labelled_scan()
    plain = VolumeSegmenter(model, device="cpu", seed=1).segment_array(image, affine)
    before = graphs()
    segmenter = VolumeSegmenter(model, device="cpu", seed=1, compile=True)
    assert graphs() > before  # compiled at construction, not on the first volume
    assert model._batch_multiple == 1 and segmenter.model is not model  # the caller's model untouched
    compiled_graphs = graphs()
    result = segmenter.segment_array(image, affine)
    assert graphs() == compiled_graphs
    assert np.array_equal(result.labels, plain.labels)
    assert result.sidecar()["compiled"] is True and plain.sidecar()["compiled"] is False
    path, sidecar = result.save(tmp_path / "mask.nii.gz")
    assert json.loads(sidecar.read_text())["compiled"] is True


def test_a_failing_compiler_is_one_line_naming_the_way_out(traced_by, model_dir, tmp_path, capsys):
    import nibabel as nib

    from sdseg_monai.cli import main

    def broken(graph, example_inputs):
        raise RuntimeError("no C++ compiler found\nsecond line")

    traced_by(broken)
    with pytest.raises(SDSegInputError, match=r"torch\.compile could not compile the network on this machine .*no C\+\+ compiler found\); run without --compile$"):
        VolumeSegmenter(model_dir, device="cpu", compile=True)
    image, _, affine = labelled_scan()
    nib.save(nib.Nifti1Image(image.astype(np.int16), affine), str(tmp_path / "scan.nii.gz"))
    capsys.readouterr()
    assert main(["segment", str(tmp_path / "scan.nii.gz"), "-o", str(tmp_path / "out.nii.gz"), "-m", str(model_dir), "--compile"]) == 2
    said = capsys.readouterr().err.splitlines()  # the wait announced, then the failure on one line
    assert said[0].startswith("compiling the network with torch.compile") and len(said) == 2
    assert said[1].startswith("sdseg3d: error: torch.compile could not compile") and not (tmp_path / "out.nii.gz").exists()


def test_batch_records_compile_only_when_on(model_dir, tmp_path, monkeypatch):
    from sdseg_monai.batch import BatchRunner

    monkeypatch.setattr(VolumeSegmenter, "_compile", lambda self: None)  # what is recorded, not the compiling
    assert "compiled" not in BatchRunner(model_dir, tmp_path / "plain", device="cpu").options  # older done-records match
    assert BatchRunner(model_dir, tmp_path / "compiled", device="cpu", compile=True).options["compiled"] is True


@pytest.mark.slow
def test_inductor_labels_as_uncompiled_and_bit_identical_run_to_run():
    """Inductor on the CPU (about a minute to compile on 2 cores)."""
    torch._dynamo.reset()
    model = fresh_micro_model()
    image, _, affine = labelled_scan((40, 36, 6))
    plain = VolumeSegmenter(model, device="cpu", skip_decode=False).segment_array(image, affine)
    segmenter = VolumeSegmenter(model, device="cpu", skip_decode=False, compile=True)
    first, second = segmenter.segment_array(image, affine), segmenter.segment_array(image, affine)
    assert np.array_equal(first.labels, second.labels)
    assert (first.labels != plain.labels).mean() <= 1e-3
