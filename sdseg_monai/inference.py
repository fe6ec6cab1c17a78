"""Volume segmentation with SDSeg's one-step reverse process.

:class:`OneStepInferer` is a MONAI ``Inferer`` (so a bundle config can call it) that turns model slices
into per-organ probability maps. :class:`VolumeSegmenter` loads a model once and segments many
volumes: canonical reorientation and HU window (MONAI), streaming over axial slices in chunks
(decoding only the (slice, organ) pairs the model's calibration does not mark empty), per-organ maps
back to native in-plane resolution, fusion into one label map with the model's calibrated
postprocessing (axial smoothing, per-organ thresholds, largest components), and MONAI's ``Invertd``
back onto the input's exact grid.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from sdseg_monai import _quiet  # noqa: F401
from sdseg_monai.allocator import keep_freed_memory
from sdseg_monai.config import SKIP_DECODE_PROBABILITY, Postprocessing
from sdseg_monai.data import (
    Volume,
    check_writable,
    count_nonfinite,
    read_volume,
    usable_affine,
    write_label_volume,
)
from sdseg_monai.errors import SDSegInputError
from sdseg_monai.model import (
    SDSeg,
    _is_int,
    check_num_shifts,
    check_seed,
    default_batch_size,
    resolve_device,
    slices_per_call,
)
from sdseg_monai.transforms import (
    IMAGE_KEY,
    SliceGeometry,
    axial_slices,
    canonical_transforms,
    fuse_probabilities,
    invert_to_input,
    keep_largest_component,
    smooth_axially,
)

try:
    from monai.inferers import Inferer
except ImportError:  # pragma: no cover - monai is a dependency
    Inferer = object


class OneStepInferer(Inferer):
    """MONAI inferer: model slices (S, 3, H, W) in [-1, 1] -> probabilities (S, K, H, W).

    Args:
        organs: organ names (default: all the model's organs).
        seed: seed of the shared initial noise.
        batch_size: (slice, organ) pairs per forward pass; None picks one for the device.
        num_steps: 1 is SDSeg's single-step reverse process; more runs DDIM.
        num_samples: noise draws averaged.
        precision: ``"auto"``, ``"fp32"``, ``"bf16"`` or ``"fp16"``.
        skip_decode_radius: pairs predicted this close to an empty mask are not decoded (0: decode all;
            a calibrated model's value is ``config.postprocessing.skip_decode_radius``).
        num_shifts: test-time shifts by half a latent cell averaged (1, 2 or 4; each costs a pass).

    Keyword arguments given at call time override these (e.g. ``return_distances=True``).
    """

    def __init__(
        self,
        organs: Sequence[str] | None = None,
        seed: int = 0,
        batch_size: int | None = None,
        num_steps: int = 1,
        num_samples: int = 1,
        precision: str = "auto",
        skip_decode_radius: float = 0.0,
        num_shifts: int = 1,
    ):
        # As given: predict checks them (a plain string is one organ; 2.5 steps is refused, not truncated).
        self.organs = organs if organs is None or isinstance(organs, str) else list(organs)
        self.seed = seed
        self.batch_size = batch_size
        self.num_steps = num_steps
        self.num_samples = num_samples
        self.precision = precision
        self.skip_decode_radius = float(skip_decode_radius)
        self.num_shifts = int(num_shifts)

    def __call__(self, inputs: torch.Tensor, network: SDSeg, *args, **kwargs):
        options = {
            "organs": self.organs,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "num_steps": self.num_steps,
            "num_samples": self.num_samples,
            "precision": self.precision,
            "skip_decode_radius": self.skip_decode_radius,
            "num_shifts": self.num_shifts,
        }
        return network.predict(inputs, **{**options, **kwargs})


@dataclass
class Segmentation:
    """A label map on the input's grid, with the names of its labels."""

    labels: np.ndarray  # uint8, the input's array order and shape (without a singleton 4th axis)
    volume: Volume
    organs: dict[int, str]  # label value -> organ name, for the organs segmented
    seed: int
    model: str = ""
    seconds: float = 0.0
    timings: dict = field(default_factory=dict)
    postprocessing: dict = field(default_factory=dict)
    precision: str = "fp32"
    compiled: bool = False
    batch_size: int = 0  # (slice, organ) pairs per forward: on a GPU it follows free memory, and kernels may round by it

    def sidecar(self) -> dict:
        return {
            "labels": {str(k): v for k, v in sorted(self.organs.items())},
            "model": self.model,
            "input": self.volume.source,
            "seed": self.seed,
            "postprocessing": self.postprocessing,
            "precision": self.precision,
            "compiled": self.compiled,  # torch.compile's kernels round differently: labels may differ in a few voxels
            "batch_size": self.batch_size,  # -b with this value repeats the run's batches exactly
            # NaN/Inf input voxels, segmented as the bottom of the HU window.
            "nonfinite_input_voxels": int(self.volume.nonfinite_voxels),
        }

    def save(self, output: str | os.PathLike) -> tuple[Path, Path]:
        """Write ``output`` (uint8 NIfTI on the input grid) and its ``.json`` sidecar, atomically."""
        return write_label_volume(self.labels, self.volume, output, self.sidecar(), inputs=[self.model])  # the model's folder, if it is one


def casts_to_bf16(device: torch.device) -> bool:
    """Whether bf16 casts the network (:meth:`SDSeg.cast_for_inference`) rather than autocasting it
    in channels-last: on a GPU, where autocast's fp32 GroupNorms and their layout copies cost most of
    the time; not on a CPU, where autocast with channels-last is what measured 2.46x faster end to end
    with AMX. fp16 always autocasts: its range is fp32's only inside autocast's fp32 operations."""
    return device.type == "cuda"


def model_for_precision(model: SDSeg, device: torch.device, precision: str, owned: bool = False) -> SDSeg:
    """``model`` on ``device`` in eval mode, as a resolved ``precision`` runs it: with bf16 on a GPU
    cast (:func:`casts_to_bf16`; as it is when already cast); below fp32 on a CPU with its weights
    channels-last (NHWC convolutions are what AMX runs fastest in bf16, part of the 2.46x issue 19
    measured; in fp32 on an AVX2 CPU they measured no faster; not on a GPU, where every GroupNorm
    copied its NHWC input back to NCHW, a third of the profiled GPU time).

    Args:
        model: the network.
        device: where it will run.
        precision: a resolved precision (``"fp32"``, ``"bf16"`` or ``"fp16"``).
        owned: prepare ``model`` itself, in place; otherwise a copy, and ``model`` stays as it was.
    """
    if not owned:
        model = copy.deepcopy(model)
    if precision == "bf16" and casts_to_bf16(device):
        if model.cast_dtype != torch.bfloat16:
            model.cast_for_inference(torch.bfloat16)
        return model.to(device).eval()
    model = model.to(device).eval()
    if precision != "fp32" and device.type == "cpu":
        model = model.to(memory_format=torch.channels_last)
    return model


IN_MEMORY_MODEL = "<in-memory SDSeg>"


def model_description(model: SDSeg) -> str:
    """What a segmentation records as its model when given an :class:`SDSeg` rather than a folder:
    the folder it was loaded from when it says so (``name_or_path``), else a fixed description."""
    name = getattr(model, "name_or_path", None)
    return os.fspath(name) if isinstance(name, (str, os.PathLike)) and os.fspath(name) else IN_MEMORY_MODEL


class VolumeSegmenter:
    """Initialise once, segment many volumes.

    On a CPU it makes the process's C allocator keep freed memory for reuse
    (:func:`~sdseg_monai.allocator.keep_freed_memory`: about 1.2x faster; ``SDSEG3D_MALLOC=system`` opts out).

    Args:
        model: an :class:`SDSeg` or a saved model folder. A given :class:`SDSeg` is copied (see
            ``copy_model``), so the segmenter neither changes it nor follows later changes to it.
        device: ``"auto"`` (CUDA when present), ``"cpu"``, ``"cuda"``, ``"cuda:N"``.
        organs: organ names to segment (default: all the model's organs).
        batch_size: (slice, organ) pairs per forward pass (default: 64 on a CPU; on a GPU by free
            memory, recorded in the sidecar).
        seed: seed of the diffusion noise; the same input, model, seed, precision and batch size give
            bit-identical output (kernels may round differently at another batch size).
        precision: inference precision (``"auto"``: bf16 on a CPU with AMX or AVX-512 BF16, fp32 on
            other CPUs, on CUDA and for noise-predicting models; see
            :func:`~sdseg_monai.model.resolve_precision`). Below fp32, on
            a CPU the model runs under autocast with its weights channels-last; on a GPU bf16 runs the
            network wholly in bf16 (see :func:`model_for_precision`) and fp16 under autocast. A model
            already cast below fp32 runs, and is recorded, in its dtype (see :meth:`SDSeg.effective_precision`).
        num_steps, num_samples: see :class:`OneStepInferer`.
        postprocess: apply the model's calibrated postprocessing (its per-organ thresholds, axial
            smoothing, largest-component organs and skipped decodes); False gives SDSeg's plain
            rounding at 0.5 (``p > 0.5``), every pair decoded.
        threshold: if set, every organ's threshold (an organ claims a voxel when its probability
            exceeds its threshold and is the highest such).
        skip_decode: with the postprocessing, leave undecoded the (slice, organ) pairs that the
            model's calibrated ``skip_decode_radius`` marks empty (the labels calibration measured,
            less time). Off when a threshold is at or below
            :data:`~sdseg_monai.config.SKIP_DECODE_PROBABILITY`, where that calibration no longer holds.
        num_shifts: test-time shifts averaged (1, 2 or 4): more accurate on small organs, each shift a
            whole pass (see :meth:`SDSeg.predict`).
        compile: compile the UNet and the decoder with ``torch.compile`` (see
            :meth:`SDSeg.compile_for_inference`), here, once, at construction: tens of
            seconds, then fused kernels for every volume. Meant for GPUs: on this project's 2-core
            AVX2 CPU compiled inference ran 2.1x slower.
        copy_model: with a given :class:`SDSeg`, run a copy of it (its memory again: about 1 GB for
            an SD-size model; a model folder is loaded once, with no copy). False hands the model
            over instead: the segmenter moves it to ``device``, puts it in eval mode, lays it out
            (or casts it) for the precision and compiles it, in place, and refuses to run once it is
            back in train mode; for a caller that has no further use for it, or only reads it.

    Raises:
        SDSegInputError: a bad setting, on one line.
    """

    def __init__(
        self,
        model: SDSeg | str | os.PathLike,
        device: str | torch.device = "auto",
        organs: Sequence[str] | None = None,
        batch_size: int | None = None,
        seed: int = 0,
        precision: str = "auto",
        num_steps: int = 1,
        num_samples: int = 1,
        postprocess: bool = True,
        threshold: float | None = None,
        skip_decode: bool = True,
        num_shifts: int = 1,
        compile: bool = False,
        copy_model: bool = True,
    ):
        check_num_shifts(num_shifts)
        check_seed(seed)
        if batch_size is not None and not (_is_int(batch_size) and batch_size >= 1):
            raise SDSegInputError(f"batch_size must be a whole number >= 1 (None: the device's default), got {batch_size!r}")
        self.device = resolve_device(device)
        if self.device.type == "cpu":
            keep_freed_memory()
        loaded = not isinstance(model, SDSeg)
        network = SDSeg.from_pretrained(model) if loaded else model
        self.model_name = str(model) if loaded else model_description(model)
        self.precision = network.effective_precision(precision, self.device)
        self.classes = network.class_indices(organs)  # refused before a copy is made
        self.model = model_for_precision(network, self.device, self.precision, owned=loaded or not copy_model)
        self.compiled = bool(compile)
        self.config = self.model.config
        self.organs = {self.config.organ_labels[k]: self.config.organ_names[k] for k in self.classes}
        self.batch_size = int(batch_size) if batch_size is not None else default_batch_size(self.device, self.config)
        self.seed = int(seed)
        post = self.config.postprocessing if postprocess else Postprocessing()
        if threshold is not None:
            post = replace(post, default_threshold=float(threshold), thresholds={})
        names = [self.config.organ_names[k] for k in self.classes]
        self.thresholds = [post.threshold(name) for name in names]
        self.axial_smoothing = [post.smoothing(name) for name in names]
        self.largest_component = [self.config.organ_labels[k] for k in self.classes if self.config.organ_names[k] in post.largest_component]
        skips = postprocess and skip_decode and min(self.thresholds) > SKIP_DECODE_PROBABILITY
        self.skip_decode_radius = post.skip_decode_radius if skips else 0.0
        self.inferer = OneStepInferer(
            organs=names,
            seed=seed,
            batch_size=self.batch_size,
            num_steps=num_steps,
            num_samples=num_samples,
            precision=self.precision,
            skip_decode_radius=self.skip_decode_radius,
            num_shifts=num_shifts,
        )
        # Kept here, not read back from the inferer: callers may swap in any callable as the inferer.
        self.num_shifts = int(num_shifts)
        self.transforms = canonical_transforms(self.config.preprocessing)
        if self.compiled:
            self._compile()

    def _compile(self) -> None:
        """Compile now (initialise once, predict many), on blank slices, every pair decoded: one full
        batch and one single pair, the two ends of the batch sizes to come (convolution backends are
        chosen by batch size, so torch.compile compiles a range of sizes apart: on a CPU below 16)."""
        self.model.compile_for_inference()
        size = self.config.preprocessing.slice_size
        blank = torch.zeros((-(-self.batch_size // len(self.classes)), 3, size, size), device=self.device)
        try:
            for slices, organs, batch in ((blank, self.classes, self.batch_size), (blank[:1], self.classes[:1], 1)):
                self.model.predict(slices, organs, seed=self.seed, batch_size=batch, precision=self.precision)
        except Exception as error:  # noqa: BLE001  (compilers fail in many ways: one line, and the way out)
            while (inner := getattr(error, "inner_exception", None) or error.__cause__) is not None:
                error = inner  # what the backend raised, not dynamo's wrapper
            first = (str(error).strip().splitlines() or [""])[0][:200]
            raise SDSegInputError(f"torch.compile could not compile the network on this machine ({type(error).__name__}: {first}); "
                                  "run without --compile") from None

    @property
    def postprocessing(self) -> dict:
        """The postprocessing this segmenter applies, by organ name (recorded with every output)."""
        return {
            "thresholds": dict(zip(self.organs.values(), self.thresholds)),
            "largest_component": [self.organs[label] for label in self.largest_component],
            "skip_decode_radius": self.skip_decode_radius,
            "axial_smoothing": {name: w for name, w in zip(self.organs.values(), self.axial_smoothing) if w},
            "num_shifts": self.num_shifts,
        }

    @property
    def chunk_slices(self) -> int:
        """Axial slices per chunk: as many as one batch of (slice, organ) pairs holds, at least 4 (a
        GPU's 1,024 pairs and 13 organs: 78 slices, one forward, where 79 took a second one for 3
        pairs), at most :data:`~sdseg_monai.model.CPU_SLICES_PER_CALL` on a CPU. Memory holds K
        native-resolution maps for one chunk only, never for the volume."""
        return slices_per_call(self.device, max(4, self.batch_size // len(self.classes)))

    def prepare(self, volume: Volume):
        """The model's preprocessing of ``volume``: its canonical, windowed image (a MetaTensor that
        remembers how to go back), in page-locked memory when the device is a GPU so that its copy
        there runs asynchronously. Thread-safe: a reader thread prepares the next volume while
        :meth:`segment` runs (see :class:`~sdseg_monai.batch.BatchRunner`)."""
        from monai.data import MetaTensor

        canonical = self.transforms({IMAGE_KEY: volume.image})[IMAGE_KEY]
        if self.device.type == "cuda":  # resolve_device has checked that CUDA is there
            canonical = MetaTensor(canonical.as_tensor().pin_memory(), meta=canonical.meta, applied_operations=canonical.applied_operations)
        return canonical

    def segment(
        self,
        source: str | os.PathLike | Volume,
        progress: Callable[[int], None] | None = None,
        canonical=None,
    ) -> Segmentation:
        """Segment a NIfTI file, a DICOM series folder, or a loaded :class:`Volume`.

        Args:
            source: the input.
            progress: called after each chunk with the number of axial slices in that chunk (an
                increment: the calls add up to the volume's slices).
            canonical: ``prepare(source)``, when the caller prepared the volume already.
        """
        import time

        volume = source if isinstance(source, Volume) else read_volume(source)
        start = time.perf_counter()
        if canonical is None:
            canonical = self.prepare(volume)
        labels = self.segment_canonical(canonical, progress)
        native = invert_to_input(labels[None], canonical, self.transforms)[0]
        return Segmentation(
            labels=native.numpy().astype(np.uint8),
            volume=volume,
            organs=dict(self.organs),
            seed=self.seed,
            model=self.model_name,
            seconds=time.perf_counter() - start,
            postprocessing=self.postprocessing,
            precision=self.precision,
            compiled=self.compiled,
            batch_size=self.batch_size,
        )

    def segment_array(self, array: np.ndarray, affine: np.ndarray | None = None) -> Segmentation:
        """Segment a 3D HU array (X, Y, Z) with a voxel-to-RAS ``affine`` (identity if None)."""
        from monai.data import MetaTensor

        array = np.asarray(array)
        if array.ndim != 3 or 0 in array.shape:
            raise SDSegInputError(f"expected a non-empty 3D array, got shape {array.shape}")
        affine = np.eye(4) if affine is None else np.asarray(affine, dtype=np.float64)
        if not usable_affine(affine):
            raise SDSegInputError("affine is singular or not finite")
        if array.dtype.kind not in "biuf":
            raise SDSegInputError(f"unsupported voxel type {array.dtype} (expected integers or floats)")
        with np.errstate(over="ignore", invalid="ignore"):  # native byte order; beyond float32's range: Inf, counted next
            array = np.asarray(array, dtype=np.float32)
        nonfinite = count_nonfinite(array, "<array>")
        image = MetaTensor(torch.as_tensor(array)[None], affine=affine, meta={"space": "RAS"})
        return self.segment(Volume(image=image, source="<array>", header=None, shape=array.shape, nonfinite_voxels=nonfinite))

    def _probability_chunks(self, image: torch.Tensor, progress: Callable[[int], None] | None = None, **options):
        """Per-organ probabilities of a canonical, windowed (1, X, Y, Z) volume, chunk by chunk, as
        :class:`ProbabilityChunk` on the segmenter's device. ``options`` override the inferer's.

        Only the decoded pairs are resized back to native resolution: the others are exactly zero."""
        if self.model.training:  # a model handed over (copy_model=False), then put back in train mode by its owner
            raise SDSegInputError("the segmenter's model is in train mode, where dropout makes labels vary: call .eval() on it")
        _, size_x, size_y, depth = image.shape
        radius = float(options.get("skip_decode_radius", self.skip_decode_radius))
        measure = bool(options.get("return_distances")) or radius > 0
        if measure:
            options = {**options, "return_distances": True}
        volume = image.as_tensor() if hasattr(image, "as_tensor") else image
        # Asynchronous from page-locked memory (see prepare); from pageable memory torch copies safely.
        volume = volume.to(self.device, non_blocking=True)
        geometry = SliceGeometry((size_x, size_y), self.config.preprocessing.slice_size)
        for start in range(0, depth, self.chunk_slices):
            indices = range(start, min(start + self.chunk_slices, depth))
            slices = geometry.to_model(axial_slices(volume, indices, self.config.preprocessing.channels))
            output = _as_tuple(self.inferer(slices, self.model, **options))
            maps = output[0].to(self.device)  # a stand-in inferer may answer on another device
            distances = output[1] if measure and len(output) > 1 else None
            if radius > 0 and distances is not None:
                decoded = (distances >= radius).to(self.device)
            else:
                decoded = torch.ones(maps.shape[:2], dtype=torch.bool, device=self.device)
            yield ProbabilityChunk(start, _to_native(geometry, maps, decoded), decoded, distances)
            if progress is not None:
                progress(len(indices))

    def _smoothed(self, chunks):
        """The chunks with the model's axial smoothing, each yielded once the next chunk's first slice
        (its context) is known."""
        if not any(self.axial_smoothing):
            yield from chunks
            return
        before, pending = None, None
        for chunk in chunks:
            if pending is not None:
                last = (pending.maps[-1:].clone(), pending.decoded[-1])  # before it is smoothed in place
                yield self._smooth(pending, before, chunk)
                before = last
            pending = chunk
        if pending is not None:
            yield self._smooth(pending, before, None)

    def _smooth(self, chunk: ProbabilityChunk, before, after: ProbabilityChunk | None) -> ProbabilityChunk:
        """``chunk`` smoothed in place, given the raw slice before it (maps, decoded) and the chunk after
        it (None at the volume's ends). Organs with no decoded pair within reach are zero and stay so:
        they are not computed."""
        reach = chunk.decoded.any(dim=0)
        if before is not None:
            reach = reach | before[1]
        if after is not None:
            reach = reach | after.decoded[0]
        weighted = torch.tensor([w > 0 for w in self.axial_smoothing], device=reach.device)
        organs = (reach & weighted).nonzero()[:, 0]
        if not len(organs):
            return chunk
        weights = [self.axial_smoothing[k] for k in organs.tolist()]
        chunk.maps[:, organs] = smooth_axially(
            chunk.maps[:, organs],
            weights,
            None if before is None else before[0][:, organs],
            None if after is None else after.maps[:1, organs],
        )
        decoded = chunk.decoded.clone()
        decoded[:, organs] = True  # smoothing spreads an organ into its undecoded neighbours
        return replace(chunk, decoded=decoded)

    @torch.inference_mode()
    def segment_canonical(self, image: torch.Tensor, progress: Callable[[int], None] | None = None) -> torch.Tensor:
        """Label map (X, Y, Z) uint8 of a canonical, windowed (1, X, Y, Z) volume, chunk by chunk.
        Maps stay on the segmenter's device; only the labels come back."""
        # In the image's memory layout (a NIfTI's Fortran order), which the written file keeps.
        plain = image.as_tensor() if hasattr(image, "as_tensor") else image
        labels = torch.zeros_like(plain[0], dtype=torch.uint8, device=self.device)
        label_values = [self.config.organ_labels[k] for k in self.classes]
        for chunk in self._smoothed(self._probability_chunks(image, progress)):
            # An organ with no decoded pair in the chunk is all zero there: it claims no voxel (skipping
            # only runs with thresholds above SKIP_DECODE_PROBABILITY), so fusion leaves it out.
            organs = chunk.decoded.any(dim=0).nonzero()[:, 0].tolist()
            if not organs:
                continue
            maps = chunk.maps if len(organs) == len(label_values) else chunk.maps[:, organs]
            fused = fuse_probabilities(maps, [label_values[k] for k in organs], [self.thresholds[k] for k in organs])
            labels[..., chunk.start : chunk.start + fused.shape[0]] = fused.permute(1, 2, 0)
        if self.largest_component:
            labels = keep_largest_component(labels, self.largest_component)
        return labels.cpu()

    @torch.inference_mode()
    def probabilities_canonical(
        self, image: torch.Tensor, progress: Callable[[int], None] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-organ probabilities (K, X, Y, Z) float32 of a canonical, windowed (1, X, Y, Z) volume,
        organs in the order of :attr:`organs`, every pair decoded, and each (organ, slice)'s distance
        from an empty mask (K, Z) (for calibrating the postprocessing; a whole volume in memory, in
        the precision segmenting fuses, so that calibration chooses on the same values)."""
        _, size_x, size_y, depth = image.shape
        maps = torch.zeros((len(self.classes), size_x, size_y, depth), dtype=torch.float32)
        distances = torch.zeros((len(self.classes), depth), dtype=torch.float32)
        for chunk in self._probability_chunks(image, progress, skip_decode_radius=0.0, return_distances=True):
            end = chunk.start + chunk.maps.shape[0]
            maps[..., chunk.start : end] = chunk.maps.permute(1, 2, 3, 0).cpu()
            distances[:, chunk.start : end] = chunk.distances.T.cpu()
        return maps, distances


@dataclass
class ProbabilityChunk:
    """Per-organ probabilities of consecutive axial slices at native in-plane resolution.

    Attributes:
        start: index of the first slice in the volume.
        maps: (n, K, X, Y) float32 on the segmenter's device.
        decoded: (n, K) bool, the pairs whose maps may be non-zero; the others' are exactly zero (their
            decode was skipped).
        distances: (n, K) each pair's distance from an empty mask, when it was measured.
    """

    start: int
    maps: torch.Tensor
    decoded: torch.Tensor
    distances: torch.Tensor | None = None


def _to_native(geometry: SliceGeometry, maps: torch.Tensor, decoded: torch.Tensor) -> torch.Tensor:
    """Model-space maps (n, K, S, S) -> native (n, K, X, Y), resizing only the ``decoded`` pairs (the
    others are zero, and a resized zero map is zero)."""
    if bool(decoded.all()):
        return geometry.from_model(maps)
    native = maps.new_zeros((*maps.shape[:2], *geometry.shape))
    pairs = decoded.nonzero(as_tuple=True)
    if len(pairs[0]):
        native[pairs] = geometry.from_model(maps[pairs][:, None])[:, 0]
    return native


def _as_tuple(output) -> tuple:
    return output if isinstance(output, tuple) else (output,)


def segment_file(
    input_path: str | os.PathLike,
    output: str | os.PathLike,
    model: SDSeg | str | os.PathLike,
    **options,
) -> tuple[Segmentation, Path, Path]:
    """One-shot convenience: segment ``input_path`` and write ``output`` and its sidecar (never over
    the input, nor into the model's folder)."""
    check_writable(output, input_path, model_description(model) if isinstance(model, SDSeg) else model)
    segmenter = VolumeSegmenter(model, **options)
    result = segmenter.segment(input_path)
    image_path, sidecar_path = result.save(output)
    return result, image_path, sidecar_path
