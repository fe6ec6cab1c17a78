"""Stability of SDSeg's output across seeds: the paper's Table 5, on CT volumes.

SDSeg's output depends on the seed of its initial noise. The paper measures how much: inference is
repeated with seeds 0-9 and each other seed's probability maps are compared with seed 0's, instance
by instance, with SSIM, MS-SSIM and PSNR (and LPIPS over the whole test set). :func:`stability` does
the same for one loaded model on a folder of volumes or a manifest split, and, where reference labels
exist, also reports how much each organ's Dice moves from seed to seed.

Conventions (recorded in every report):

- **Instance**: one organ on one axial slice, as the model outputs it: the (S, S) probability map at
  the model's slice size (256x256 for the packaged default), before it goes back to the CT's grid,
  before axial smoothing and fusion. These are the maps the paper compares (256x256 there too), and
  the metrics then do not depend on the CT's in-plane resolution. A non-square slice is padded to a
  square first (:class:`~sdseg_monai.transforms.SliceGeometry`); the padding is part of the map.
- **Empty predictions are skipped**, as in the paper's evaluation notebook: an instance whose seed-0
  map is empty is not compared at all, and a (instance, seed) pair whose other map is empty is not
  compared either. A map is empty when no pixel exceeds ``empty_below`` (0.5: SDSeg's rounding,
  ``out_p > 0.5``, then predicts no pixel). Both are counted in the report. An instance whose every other seed is empty
  counts as skipped.
- **Averages**: per instance, the mean over the seeds compared with seed 0; then the mean over
  instances, per organ and over every organ's instances pooled (the paper pools its instances).
- **PSNR** (``data_range`` 1: probabilities lie in [0, 1]) is infinite for two identical maps. As the
  paper's notebook does, such pairs are left out of the PSNR mean and counted
  (``psnr_identical_pairs``); when every compared pair is identical, the PSNR is ``null`` in JSON
  (which has no infinity) and ``inf`` in the table.
- **MS-SSIM** uses MONAI's five scales and weights with an 11-pixel Gaussian window (sigma 1.5) when
  the maps are large enough (176 pixels or more); on smaller maps it uses the most
  scales that fit, with the first weights renormalised to sum to 1 (and a smaller window below 11
  pixels, for SSIM too). The report records what was used.
- **Dice spread**: per seed, the label map that ``segment`` would write with that seed (the model's
  postprocessing, on the input's grid) is scored against the reference; per organ, the mean Dice over
  the cases where the organ is present, then its mean, standard deviation (sample, ddof 1), minimum
  and maximum over the seeds.
- **LPIPS** (dataset level in the paper) only where the ``lpips`` package and all of its weights are
  already on this machine; nothing is ever downloaded. Otherwise the report says ``"lpips": null``
  and why.
- **Decoding**: the maps are those ``segment`` computes, so the (slice, organ) pairs that the model's
  calibration leaves undecoded (``skip_decode_radius``) have empty maps, and are skipped as empty
  predictions (calibration chose the radius so that such pairs decode to under 0.05 anyway). Pass
  ``skip_decode=False`` (``--decode-all``) to decode every pair.

Same inputs, model, options and seeds give an identical report (apart from its ``seconds``).

Example:
    >>> report = stability("my_model", "scans/", seeds=10, device="cpu")      # doctest: +SKIP
    >>> print(report.format_table())                                          # doctest: +SKIP
    >>> report.write_json("stability.json")                                   # doctest: +SKIP
"""

from __future__ import annotations

import functools
import json
import os
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from sdseg_monai import __version__
from sdseg_monai.data import atomic_write_text, check_data_root, check_report_path, is_nifti, load_manifest, nifti_stem, read_volume
from sdseg_monai.errors import SDSegInputError
from sdseg_monai.metrics import finite_or_none, mean_or_none

# MONAI's (and the MS-SSIM paper's) five scale weights, finest first.
MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
SSIM_KERNEL_SIZE = 11
SSIM_KERNEL_SIGMA = 1.5
DATA_RANGE = 1.0
# A map with no pixel above this predicts nothing under SDSeg's rounding (out_p > 0.5): an empty prediction.
EMPTY_BELOW = 0.5
DEFAULT_SEEDS = 10
LPIPS_NET = "alex"  # what the paper's torchmetrics LPIPS uses by default


# ---------------------------------------------------------------------------------------------------
# Metrics on a batch of instance pairs
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MetricSettings:
    """SSIM / MS-SSIM / PSNR settings for square maps of side ``size`` (see :meth:`for_size`)."""

    size: int
    kernel_size: int = SSIM_KERNEL_SIZE
    kernel_sigma: float = SSIM_KERNEL_SIGMA
    ms_ssim_weights: tuple[float, ...] = MS_SSIM_WEIGHTS
    data_range: float = DATA_RANGE

    @classmethod
    def for_size(cls, size: int) -> "MetricSettings":
        """MONAI's defaults where the maps are large enough, else the most MS-SSIM scales that fit.

        MONAI refuses MS-SSIM with L weights unless ``size // max(1, L - 1) ** 2 > kernel - 1``, and
        every scale (``size / 2 ** (L - 1)``) must still hold one window; the first L weights are then
        renormalised so that the product stays on the same [0, 1] scale.
        """
        size = int(size)
        if size < 1:
            raise SDSegInputError(f"maps of size {size} have no pixel to compare")
        kernel = SSIM_KERNEL_SIZE if size >= SSIM_KERNEL_SIZE else max(1, size - (1 - size % 2))  # largest odd <= size
        scales = 1
        for levels in range(len(MS_SSIM_WEIGHTS), 0, -1):
            if size // max(1, levels - 1) ** 2 > kernel - 1 and size // 2 ** (levels - 1) >= kernel:
                scales = levels
                break
        weights = MS_SSIM_WEIGHTS[:scales]
        if scales < len(MS_SSIM_WEIGHTS):
            total = sum(weights)
            weights = tuple(w / total for w in weights)
        return cls(size=size, kernel_size=kernel, ms_ssim_weights=weights)

    def to_dict(self) -> dict:
        return {
            "map_size": [self.size, self.size],
            "data_range": self.data_range,
            "ssim": {"kernel": "gaussian", "kernel_size": self.kernel_size, "kernel_sigma": self.kernel_sigma},
            "ms_ssim": {
                "kernel": "gaussian",
                "kernel_size": self.kernel_size,
                "kernel_sigma": self.kernel_sigma,
                "scales": len(self.ms_ssim_weights),
                "weights": list(self.ms_ssim_weights),
            },
            "psnr": {"max_val": self.data_range, "identical_pairs": "left out of the mean (infinite), counted"},
        }


def compare_maps(reference: torch.Tensor, other: torch.Tensor, settings: MetricSettings) -> dict[str, torch.Tensor]:
    """SSIM, MS-SSIM and PSNR of N map pairs with MONAI's metrics.

    Args:
        reference: (N, H, W) seed-0 maps in [0, 1] (MONAI's ``y``).
        other: (N, H, W) maps of another seed (MONAI's ``y_pred``).
        settings: window, scales and data range.

    Returns:
        ``{"ssim", "ms_ssim", "psnr"}``: (N,) float64 tensors; PSNR is ``inf`` for identical maps.
    """
    from monai.metrics import MultiScaleSSIMMetric, PSNRMetric, SSIMMetric

    y = reference.float()[:, None]
    y_pred = other.float()[:, None]
    ssim = SSIMMetric(
        spatial_dims=2, data_range=settings.data_range, win_size=settings.kernel_size, kernel_sigma=settings.kernel_sigma
    )
    ms_ssim = MultiScaleSSIMMetric(
        spatial_dims=2,
        data_range=settings.data_range,
        kernel_size=settings.kernel_size,
        kernel_sigma=settings.kernel_sigma,
        weights=settings.ms_ssim_weights,
    )
    psnr = PSNRMetric(max_val=settings.data_range)
    # Called on one batch and discarded: each metric object would otherwise buffer every batch.
    return {
        "ssim": ssim(y_pred=y_pred, y=y).flatten().double(),
        "ms_ssim": ms_ssim(y_pred=y_pred, y=y).flatten().double(),
        "psnr": psnr(y_pred=y_pred, y=y).flatten().double(),
    }


# ---------------------------------------------------------------------------------------------------
# LPIPS, only from weights already on disk
# ---------------------------------------------------------------------------------------------------


def lpips_availability() -> tuple[Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None, str]:
    """An LPIPS function of two (N, H, W) map batches in [0, 1], or None, and a sentence saying which.

    Needs the ``lpips`` package, its linear-layer weights (shipped inside the package) and torchvision's
    AlexNet weights already in the torch hub cache. Nothing is downloaded: when a file is missing, the
    function is None and the sentence names what is missing.
    """
    from monai.utils import optional_import

    lpips, has_lpips = optional_import("lpips")
    if not has_lpips:
        return None, "not computed: the lpips package is not installed (it is never downloaded at run time)"
    package_dir = Path(getattr(lpips, "__file__", "") or ".").parent
    linear = package_dir / "weights" / "v0.1" / f"{LPIPS_NET}.pth"
    if not linear.is_file():
        return None, f"not computed: the lpips package has no {LPIPS_NET} weights at {linear}"
    torchvision, has_torchvision = optional_import("torchvision")
    if not has_torchvision:
        return None, "not computed: lpips needs torchvision, which is not installed"
    try:
        url = torchvision.models.AlexNet_Weights.IMAGENET1K_V1.url
    except AttributeError:
        return None, "not computed: this torchvision does not name its AlexNet weights"
    backbone = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)
    if not backbone.is_file():
        return None, f"not computed: AlexNet weights are not in the torch hub cache ({backbone}; never downloaded)"
    try:
        network = lpips.LPIPS(net=LPIPS_NET, verbose=False).eval()
    except Exception as e:  # noqa: BLE001 - any failure to build it means: no LPIPS, and why
        return None, f"not computed: lpips failed to load ({type(e).__name__}: {' '.join(str(e).split())})"

    def distance(reference: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        # LPIPS takes 3-channel images in [-1, 1]; a map is replicated, as the paper's PNGs were grey.
        a = reference.float()[:, None].repeat(1, 3, 1, 1) * 2 - 1
        b = other.float()[:, None].repeat(1, 3, 1, 1) * 2 - 1
        with torch.no_grad():
            return network.to(a.device)(a, b).flatten().double()

    return distance, f"LPIPS ({LPIPS_NET}) from local weights"


# ---------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------


@dataclass
class DiceSpread:
    """One organ's mean Dice per seed (over the cases where it is present), and their spread."""

    by_seed: list[float | None]
    mean: float | None = None
    std: float | None = None
    min: float | None = None
    max: float | None = None

    @classmethod
    def of(cls, by_seed: list[float | None]) -> "DiceSpread":
        values = [v for v in by_seed if v is not None]
        if not values:
            return cls(by_seed=by_seed)
        return cls(
            by_seed=by_seed,
            mean=float(np.mean(values)),
            std=float(np.std(values, ddof=1)) if len(values) > 1 else None,
            min=float(np.min(values)),
            max=float(np.max(values)),
        )

    def to_dict(self) -> dict:
        return {"mean": finite_or_none(self.mean), "std": finite_or_none(self.std), "min": finite_or_none(self.min), "max": finite_or_none(self.max),
                "by_seed": [finite_or_none(v) for v in self.by_seed]}


@dataclass
class OrganStability:
    """One organ (or, with ``label`` None, every organ pooled) over all cases and seeds.

    ``ssim``, ``ms_ssim`` and ``psnr_db`` are means over the compared instances of each instance's mean
    over its compared seeds; ``psnr_db`` leaves identical pairs out (None when nothing is left).
    """

    name: str
    label: int | None
    instances: int = 0
    compared: int = 0
    skipped_empty_reference: int = 0
    skipped_other_seeds_empty: int = 0
    pairs_compared: int = 0
    pairs_skipped_empty: int = 0
    psnr_identical_pairs: int = 0
    ssim: float | None = None
    ms_ssim: float | None = None
    psnr_db: float | None = None
    dice: DiceSpread | None = None

    @property
    def skipped(self) -> int:
        return self.skipped_empty_reference + self.skipped_other_seeds_empty

    def to_dict(self) -> dict:
        out = {
            "label": self.label,
            "ssim": finite_or_none(self.ssim),
            "ms_ssim": finite_or_none(self.ms_ssim),
            "psnr_db": finite_or_none(self.psnr_db),
            "instances": self.instances,
            "instances_compared": self.compared,
            "instances_skipped": self.skipped,
            "skipped_empty_reference": self.skipped_empty_reference,
            "skipped_other_seeds_empty": self.skipped_other_seeds_empty,
            "pairs_compared": self.pairs_compared,
            "pairs_skipped_empty": self.pairs_skipped_empty,
            "psnr_identical_pairs": self.psnr_identical_pairs,
        }
        if self.dice is not None:
            out["dice"] = self.dice.to_dict()
        return out


@dataclass
class StabilityReport:
    """What :func:`stability` measured (see the module's conventions). ``sources``: what it read
    (:func:`stability_sources`), which :meth:`write_json` never overwrites; not in the report."""

    model: str
    precision: str
    seeds: list[int]
    inputs: dict
    cases: list[str]
    settings: MetricSettings
    empty_below: float
    organs: list[OrganStability]
    overall: OrganStability
    mean_dice: DiceSpread | None = None
    dice_reason: str = ""
    lpips: dict | None = None
    lpips_reason: str = ""
    postprocessing: dict = field(default_factory=dict)
    seconds: float = 0.0
    sources: list = field(default_factory=list, repr=False)

    def to_dict(self) -> dict:
        """Strict JSON content: undefined and infinite values are null."""
        return {
            "sdseg3d_version": __version__,
            "model": self.model,
            "precision": self.precision,
            "seeds": list(self.seeds),
            "reference_seed": self.seeds[0],
            "inputs": self.inputs,
            "cases": list(self.cases),
            "instances": {
                "what": "one organ on one axial slice: the model's probability map at its slice size, "
                "before smoothing, fusion and resampling to the CT grid",
                "empty_below": self.empty_below,
                "skipped": "an instance whose seed-0 map is empty; a pair whose other map is empty "
                "(empty: no pixel above empty_below)",
                "averaging": "per instance over its compared seeds, then over instances",
            },
            "metrics": self.settings.to_dict(),
            "summary": self.overall.to_dict(),
            "per_organ": {o.name: o.to_dict() for o in self.organs},
            "dice": None if self.mean_dice is None else {
                "mean_over_organs": self.mean_dice.to_dict(),
                "organs": [o.name for o in self.organs if o.dice is not None],
                "spread": "per seed, the mean over the cases where the organ is present; then the mean, "
                "sample standard deviation (ddof 1), minimum and maximum over the seeds",
            },
            "dice_reason": self.dice_reason or None,
            "lpips": self.lpips,
            "lpips_reason": self.lpips_reason or None,
            "postprocessing": self.postprocessing,
            "seconds": round(self.seconds, 3),
        }

    def format_table(self) -> str:
        """A printable per-organ table: instances compared and skipped, SSIM, MS-SSIM, PSNR, Dice spread."""
        s = self.settings
        seeds = self.seeds
        seed_text = f"{seeds[0]}-{seeds[-1]}" if seeds == list(range(seeds[0], seeds[0] + len(seeds))) else ", ".join(map(str, seeds))
        with_dice = self.mean_dice is not None
        lines = [
            f"stability over {len(seeds)} seeds ({seed_text}; seed {seeds[0]} the reference): {len(self.cases)} cases, "
            f"model {self.model or '<in memory>'}, precision {self.precision}",
            f"instances: {s.size}x{s.size} probability maps per (organ, axial slice), the model's output; "
            f"empty (no pixel > {self.empty_below:g}) skipped",
            f"MS-SSIM: {len(s.ms_ssim_weights)} scales, window {s.kernel_size} (SSIM too); PSNR: data range {s.data_range:g}",
            f"{'label':>5}  {'organ':<24} {'compared':>8} {'skipped':>8} {'SSIM':>7} {'MS-SSIM':>7} {'PSNR dB':>7}"
            + ("  Dice mean ± std [min, max] over seeds" if with_dice else ""),
        ]
        for o in [*self.organs, self.overall]:
            label = "" if o.label is None else str(o.label)
            row = (f"{label:>5}  {o.name:<24} {o.compared:>8} {o.skipped:>8} {_text(o.ssim):>7} {_text(o.ms_ssim):>7} "
                   f"{_psnr_text(o):>7}")
            if with_dice and o.dice is not None:
                row += f"  {_spread_text(o.dice)}"
            lines.append(row)
        if with_dice:
            lines.append(f"{'':>5}  {'mean Dice over organs':<24} {'':>8} {'':>8} {'':>7} {'':>7} {'':>7}  {_spread_text(self.mean_dice)}")
        elif self.dice_reason:
            lines.append(f"Dice: {self.dice_reason}")
        o = self.overall
        lines.append(f"pairs compared {o.pairs_compared}, skipped as empty {o.pairs_skipped_empty}, identical "
                     f"(left out of PSNR) {o.psnr_identical_pairs}")
        if self.lpips is not None:
            lines.append(f"LPIPS ({self.lpips['net']}): {_text(self.lpips['value'])} over {self.lpips['pairs']} pairs")
        else:
            lines.append(f"LPIPS: {self.lpips_reason}")
        return "\n".join(lines)

    def write_json(self, path: str | os.PathLike) -> Path:
        """Write :meth:`to_dict` to ``path`` atomically (a temporary file renamed into place); never
        over one of the report's ``sources`` nor into an input folder."""
        path = check_report_path(path, "--json", self.sources)
        return atomic_write_text(path, json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n")


def _text(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _psnr_text(o: OrganStability) -> str:
    if o.psnr_db is not None:
        return f"{o.psnr_db:.2f}"
    return "inf" if o.psnr_identical_pairs else "-"


def _spread_text(d: DiceSpread) -> str:
    if d.mean is None:
        return "absent"
    std = "-" if d.std is None else f"{d.std:.4f}"
    return f"{d.mean:.4f} ± {std} [{d.min:.4f}, {d.max:.4f}]"


# ---------------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StabilityCase:
    """One volume to repeat inference on, with its reference label map when there is one."""

    case_id: str
    image: Path
    label: Path | None = None


def check_seeds(seeds: int | Sequence[int]) -> list[int]:
    """``N`` -> seeds 0..N-1 (the paper's protocol); a list is taken as given, its first the reference."""
    if isinstance(seeds, (int, np.integer)):
        if seeds < 2:
            raise SDSegInputError(f"--seeds must be at least 2 (seed 0 is compared with the others), got {seeds}")
        return list(range(int(seeds)))
    seeds = [int(s) for s in seeds]
    if len(seeds) < 2:
        raise SDSegInputError(f"at least 2 seeds are needed (the first is compared with the others), got {seeds}")
    if any(s < 0 for s in seeds):
        raise SDSegInputError(f"seeds must be >= 0, got {seeds}")
    return seeds


def stability_cases(
    inputs: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    manifest=None,
    data_root: str | os.PathLike | None = None,
    split: str | None = "test",
):
    """The volumes to measure, every file checked before any compute.

    Args:
        inputs: a NIfTI file, a folder of NIfTI files (``*.nii``, ``*.nii.gz``, sorted by name), a DICOM
            series folder, or a list of these files; no reference labels.
        manifest: a manifest (or its path) instead of ``inputs``: the cases of ``split`` under
            ``data_root``, with their label maps.
        data_root: the folder the manifest's relative paths start from.
        split: the manifest split (None: every case).

    Returns:
        ``(cases, manifest or None)``.

    Raises:
        SDSegInputError: both or neither of inputs and manifest, a missing file, a folder with nothing
            to read, a manifest without data root, a bad manifest or missing manifest files.
    """
    from sdseg_monai.data import Manifest

    if inputs is not None and manifest is not None:
        raise SDSegInputError("give either INPUT (a file or folder of volumes) or --manifest with --data-root, not both")
    if inputs is None and manifest is None:
        raise SDSegInputError("nothing to measure: give INPUT (a NIfTI file or a folder of them) or --manifest with --data-root")
    if manifest is not None:
        if data_root is None:
            raise SDSegInputError("--manifest needs --data-root")
        if not isinstance(manifest, Manifest):
            manifest = load_manifest(manifest)
        files = check_data_root(manifest, data_root, split)
        if not files:
            raise SDSegInputError(f"split {split!r} of the manifest has no case", manifest.path)
        return [StabilityCase(case_id, Path(image), Path(label)) for case_id, image, label in files], manifest
    if data_root is not None:
        raise SDSegInputError("--data-root goes with --manifest; a folder INPUT is read as it is")
    paths = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    cases = []
    for path in map(Path, paths):
        if not path.exists():
            raise SDSegInputError("no such file or folder", path)
        if path.is_dir():
            volumes = sorted(p for p in path.iterdir() if p.is_file() and is_nifti(p) and not p.name.startswith("."))
            # A folder without NIfTI files is read as one DICOM series (read_volume refuses it otherwise).
            cases += [StabilityCase(nifti_stem(p), p) for p in volumes] or [StabilityCase(path.name, path)]
        elif is_nifti(path):
            cases.append(StabilityCase(nifti_stem(path), path))
        else:
            raise SDSegInputError("unsupported input: expected a .nii / .nii.gz file, a folder of them, or a DICOM series folder", path)
    if not cases:
        raise SDSegInputError("nothing to measure: no input volume")
    return cases, None


def stability_sources(cases: Sequence[StabilityCase], inputs=None, manifest=None, model=None) -> list:
    """What a stability run reads, which its report must never overwrite nor lie inside: each case's
    volume and label map, the inputs as given (a folder of NIfTI files, a DICOM series folder), the
    manifest (a :class:`~sdseg_monai.data.Manifest` or its path) and the model (its folder; a
    description of an in-memory model names nothing on disk and is skipped)."""
    given = [] if inputs is None else [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    manifest_path = getattr(manifest, "path", manifest)
    return [*given, manifest_path, model, *(path for case in cases for path in (case.image, case.label))]


# ---------------------------------------------------------------------------------------------------
# The measurement
# ---------------------------------------------------------------------------------------------------


class _SeededInferer:
    """Wraps the segmenter's inferer for one run: forces ``seed`` and hands each chunk's model-size
    maps (n, K, S, S) to ``on_chunk(first slice, maps)`` before the segmenter resamples them."""

    def __init__(self, inner, seed: int, on_chunk: Callable[[int, torch.Tensor], None]):
        self.inner, self.seed, self.on_chunk = inner, int(seed), on_chunk
        self.next_slice = 0

    def __call__(self, slices: torch.Tensor, network, *args, **kwargs):
        output = self.inner(slices, network, *args, **{**kwargs, "seed": self.seed})
        maps = output[0] if isinstance(output, tuple) else output
        self.on_chunk(self.next_slice, maps.detach())
        self.next_slice += maps.shape[0]
        return output


class _CaseTally:
    """Per-instance sums over the seeds of one case: (K, Z) arrays, so memory is the seed-0 maps and one chunk.

    The seed-0 maps and the metrics stay on the device the maps come from (a GPU computes them far
    faster than the host); the sums and counts live on the host."""

    def __init__(self, reference: torch.Tensor, settings: MetricSettings, empty_below: float, lpips_fn, n_seeds: int):
        self.reference = reference  # (K, Z, S, S) float16, filled by the seed-0 run
        self.settings, self.empty_below, self.lpips_fn = settings, float(empty_below), lpips_fn
        k, z = reference.shape[:2]
        self.reference_empty = torch.ones((k, z), dtype=torch.bool)
        zeros = lambda dtype=torch.float64: torch.zeros((k, z), dtype=dtype)  # noqa: E731
        self.ssim, self.ms_ssim, self.psnr = zeros(), zeros(), zeros()
        self.pairs, self.psnr_pairs = zeros(torch.int64), zeros(torch.int64)
        self.identical, self.skipped_empty = zeros(torch.int64), zeros(torch.int64)
        self.lpips_sum = [0.0] * n_seeds
        self.lpips_pairs = [0] * n_seeds

    def _empty(self, maps: torch.Tensor) -> torch.Tensor:
        return (maps.float().flatten(2).amax(dim=2) <= self.empty_below).cpu()

    def store_reference(self, start: int, maps: torch.Tensor) -> None:
        chunk = maps.to(self.reference.device).permute(1, 0, 2, 3).to(torch.float16)  # (K, n, S, S)
        self.reference[:, start : start + chunk.shape[1]] = chunk
        self.reference_empty[:, start : start + chunk.shape[1]] = self._empty(chunk)

    def compare(self, seed_index: int, start: int, maps: torch.Tensor) -> None:
        # Both sides in float16, so that two identical runs compare exactly equal.
        device = self.reference.device
        current = maps.to(device).permute(1, 0, 2, 3).to(torch.float16)
        n = current.shape[1]
        ref_ok = ~self.reference_empty[:, start : start + n]
        cur_ok = ~self._empty(current)
        self.skipped_empty[:, start : start + n] += (ref_ok & ~cur_ok).long()
        organ, offset = torch.nonzero(ref_ok & cur_ok, as_tuple=True)
        if not len(organ):
            return
        z = offset + start
        a = self.reference[organ.to(device), z.to(device)]
        b = current[organ.to(device), offset.to(device)]
        values = {key: value.cpu() for key, value in compare_maps(a, b, self.settings).items()}
        self.pairs[organ, z] += 1
        self.ssim[organ, z] += values["ssim"]
        self.ms_ssim[organ, z] += values["ms_ssim"]
        finite = torch.isfinite(values["psnr"])
        self.psnr[organ[finite], z[finite]] += values["psnr"][finite]
        self.psnr_pairs[organ, z] += finite.long()
        self.identical[organ, z] += (~finite).long()
        if self.lpips_fn is not None:
            self.lpips_sum[seed_index] += float(self.lpips_fn(a, b).sum().cpu())
            self.lpips_pairs[seed_index] += len(organ)


@dataclass
class _OrganPool:
    """Per-instance means of one organ over every case, and its counts."""

    ssim: list = field(default_factory=list)
    ms_ssim: list = field(default_factory=list)
    psnr: list = field(default_factory=list)
    instances: int = 0
    skipped_empty_reference: int = 0
    skipped_other_seeds_empty: int = 0
    pairs_compared: int = 0
    pairs_skipped_empty: int = 0
    psnr_identical_pairs: int = 0

    def add(self, tally: _CaseTally, k: int) -> None:
        pairs = tally.pairs[k]
        measured = pairs > 0
        self.instances += int(pairs.numel())
        self.skipped_empty_reference += int(tally.reference_empty[k].sum())
        self.skipped_other_seeds_empty += int((~tally.reference_empty[k] & ~measured).sum())
        self.pairs_compared += int(pairs.sum())
        self.pairs_skipped_empty += int(tally.skipped_empty[k].sum())
        self.psnr_identical_pairs += int(tally.identical[k].sum())
        self.ssim += (tally.ssim[k][measured] / pairs[measured]).tolist()
        self.ms_ssim += (tally.ms_ssim[k][measured] / pairs[measured]).tolist()
        with_psnr = tally.psnr_pairs[k] > 0
        self.psnr += (tally.psnr[k][with_psnr] / tally.psnr_pairs[k][with_psnr]).tolist()

    def absorb(self, other: _OrganPool) -> None:
        """Pool ``other``'s instances and counts into this one (lists concatenate, counts add)."""
        for item in fields(self):
            setattr(self, item.name, getattr(self, item.name) + getattr(other, item.name))

    def summary(self, name: str, label: int | None) -> OrganStability:
        return OrganStability(
            name=name,
            label=label,
            instances=self.instances,
            compared=len(self.ssim),
            skipped_empty_reference=self.skipped_empty_reference,
            skipped_other_seeds_empty=self.skipped_other_seeds_empty,
            pairs_compared=self.pairs_compared,
            pairs_skipped_empty=self.pairs_skipped_empty,
            psnr_identical_pairs=self.psnr_identical_pairs,
            ssim=mean_or_none(self.ssim),
            ms_ssim=mean_or_none(self.ms_ssim),
            psnr_db=mean_or_none(self.psnr),
        )


def _run_seed(segmenter, canonical, seed: int, on_chunk, with_labels: bool):
    """One inference of a canonical volume with ``seed``; the label map on the input's grid (as
    ``segment`` writes it) when ``with_labels``. The segmenter's inferer is restored afterwards."""
    from sdseg_monai.transforms import invert_to_input

    original = segmenter.inferer
    segmenter.inferer = _SeededInferer(original, seed, on_chunk)
    try:
        if not with_labels:
            with torch.inference_mode():
                for _ in segmenter._probability_chunks(canonical):
                    pass  # the maps reach on_chunk; no fusion needed without a reference
            return None
        labels = segmenter.segment_canonical(canonical)
        return invert_to_input(labels[None], canonical, segmenter.transforms)[0].numpy().astype(np.uint8)
    finally:
        segmenter.inferer = original


def stability(
    model,
    inputs: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    seeds: int | Sequence[int] = DEFAULT_SEEDS,
    *,
    manifest=None,
    data_root: str | os.PathLike | None = None,
    split: str | None = "test",
    empty_below: float = EMPTY_BELOW,
    progress: Callable[[int, int, str, int, int, float], None] | None = None,
    **segmenter_options,
) -> StabilityReport:
    """Repeat inference with several seeds and measure how much the output moves (the paper's Table 5).

    Every input is checked before the model is loaded. One segmenter serves every case and seed: only
    the seed changes between runs. Memory holds one case's seed-0 maps (K x Z x S x S, float16, on the
    segmenter's device, where the metrics run too) and one chunk of the current seed's, whatever the
    number of seeds.

    Args:
        model: a :class:`~sdseg_monai.inference.VolumeSegmenter` (used as it is, its own seed ignored),
            an :class:`~sdseg_monai.model.SDSeg` or a saved model folder.
        inputs: a NIfTI file, a folder of NIfTI files, a DICOM series folder or a list of files (no
            labels, so no Dice spread); or None with ``manifest``.
        seeds: N (seeds 0..N-1, as the paper's 0-9 for 10) or a list; the first is the reference.
        manifest: a manifest (or its JSON path): the cases of ``split`` under ``data_root``, with labels.
        data_root: the folder the manifest's relative paths start from.
        split: the manifest split (None: every case).
        empty_below: a map with no pixel above this is an empty prediction (skipped).
        progress: called after each run with (case number, cases, case id, seed number, seeds, seconds).
        **segmenter_options: for a model that is not yet a segmenter: ``device``, ``organs``,
            ``batch_size``, ``precision``, ``postprocess``, ``skip_decode``, ``num_shifts``, ...

    Returns:
        a :class:`StabilityReport`.

    Raises:
        SDSegInputError: bad inputs or seeds (before any compute), or an unreadable volume.
    """
    from sdseg_monai.evaluation import read_case, score_case, scored_organs
    from sdseg_monai.inference import VolumeSegmenter
    from sdseg_monai.transforms import IMAGE_KEY

    start_time = time.perf_counter()
    seeds = check_seeds(seeds)
    if not 0.0 < float(empty_below) <= 1.0:
        raise SDSegInputError(f"empty_below must lie in (0, 1], got {empty_below}")
    cases, manifest = stability_cases(inputs, manifest, data_root, split)
    if isinstance(model, VolumeSegmenter):
        if segmenter_options:
            raise SDSegInputError(f"options {', '.join(sorted(segmenter_options))} apply to a model, not to a loaded segmenter")
        segmenter = model
    else:
        segmenter = VolumeSegmenter(model, **segmenter_options)
    scored, unscored = scored_organs(segmenter, manifest) if manifest is not None else ([], [])
    names = list(segmenter.organs.values())
    labels = list(segmenter.organs)
    size = segmenter.config.preprocessing.slice_size
    settings = MetricSettings.for_size(size)
    lpips_fn, lpips_reason = lpips_availability()
    pools = [_OrganPool() for _ in names]
    lpips_sum, lpips_pairs = [0.0] * len(seeds), [0] * len(seeds)
    # dice[seed index][case index] -> {dataset label: dice or None}
    dice: list[list[dict[int, float | None]]] = [[] for _ in seeds]

    for case_index, case in enumerate(cases, start=1):
        if case.label is not None:
            volume, reference = read_case(case.image, case.label)
            reference_array = reference.image[0].numpy()
        else:
            volume, reference, reference_array = read_volume(case.image), None, None
        canonical = segmenter.transforms({IMAGE_KEY: volume.image})[IMAGE_KEY]
        depth = canonical.shape[-1]
        reference_maps = torch.zeros((len(names), depth, size, size), dtype=torch.float16, device=segmenter.device)
        tally = _CaseTally(reference_maps, settings, empty_below, lpips_fn, len(seeds))
        for seed_index, seed in enumerate(seeds):
            run_start = time.perf_counter()
            on_chunk = tally.store_reference if seed_index == 0 else functools.partial(tally.compare, seed_index)
            prediction = _run_seed(segmenter, canonical, seed, on_chunk, with_labels=reference_array is not None)
            if prediction is not None:
                scores = score_case(prediction, reference_array, scored)
                dice[seed_index].append({s.label: s.dice for s in scores})
            if progress is not None:
                progress(case_index, len(cases), case.case_id, seed_index + 1, len(seeds), time.perf_counter() - run_start)
        for k, pool in enumerate(pools):
            pool.add(tally, k)
        for i in range(len(seeds)):
            lpips_sum[i] += tally.lpips_sum[i]
            lpips_pairs[i] += tally.lpips_pairs[i]
        del volume, reference, reference_array, canonical, tally, reference_maps  # one case in memory at a time

    organs = [pool.summary(name, label) for pool, name, label in zip(pools, names, labels)]
    everything = _OrganPool()
    for pool in pools:
        everything.absorb(pool)
    overall = everything.summary("all organs", None)

    mean_dice, dice_reason = None, ""
    if manifest is not None:
        by_name = {o.name: o for o in organs}
        per_seed_means = []
        for dataset_label, _, name in scored:
            by_seed = [mean_or_none([case[dataset_label] for case in dice[i] if case[dataset_label] is not None]) for i in range(len(seeds))]
            by_name[name].dice = DiceSpread.of(by_seed)
            per_seed_means.append(by_seed)
        # Per seed, the mean over the organs scored, as `sdseg3d evaluate` reports it.
        mean_dice = DiceSpread.of([mean_or_none([m[i] for m in per_seed_means if m[i] is not None]) for i in range(len(seeds))])
        if unscored:
            dice_reason = f"not scored (no label in the manifest): {', '.join(unscored)}"
    else:
        dice_reason = "not computed: the inputs have no reference labels (give --manifest and --data-root)"

    lpips = None
    if lpips_fn is not None:
        by_seed = [lpips_sum[i] / lpips_pairs[i] if lpips_pairs[i] else None for i in range(1, len(seeds))]
        lpips = {"net": LPIPS_NET, "value": finite_or_none(mean_or_none([v for v in by_seed if v is not None])),
                 "by_seed": [finite_or_none(v) for v in by_seed], "pairs": int(sum(lpips_pairs)),
                 "averaging": "per seed over the compared pairs, then over the seeds (dataset level, as the paper)"}

    if manifest is not None:
        described = {"manifest": str(manifest.path), "data_root": str(data_root), "split": split if split is not None else "all"}
    else:
        described = {"paths": [str(c.image) for c in cases]}
    return StabilityReport(
        model=getattr(segmenter, "model_name", "") or "",
        precision=segmenter.precision,
        seeds=seeds,
        inputs=described,
        cases=[c.case_id for c in cases],
        settings=settings,
        empty_below=float(empty_below),
        organs=organs,
        overall=overall,
        mean_dice=mean_dice,
        dice_reason=dice_reason,
        lpips=lpips,
        lpips_reason=lpips_reason,
        postprocessing=dict(getattr(segmenter, "postprocessing", {})),
        seconds=time.perf_counter() - start_time,
        sources=stability_sources(cases, inputs, manifest, segmenter.model_name),
    )
