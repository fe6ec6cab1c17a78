"""``sdseg3d bench``: how fast SDSeg segments a CT on this machine, side by side with what it is up against.

One run, one machine, one volume (a 512x512x100 synthetic phantom, plus the real CT of
``../shared/data/ct`` when present), every ratio measured in the same run:

- **one step**: end-to-end segmentation (NIfTI read to written labels) with the packaged default model
  (``tiny``) and the ``paper`` and ``sd-v1`` sized networks (seeded random weights), 1 organ (the liver)
  and all 13, in fp32 and in the precision ``auto`` picks here: slices/s, seconds per volume, peak RSS
  (and CUDA memory), and a stage breakdown from forward hooks on the vision encoder, the UNet and the
  autoencoder's decoder;
- **multi-step**: the same network run as multi-step, multi-sample diffusion segmenters run theirs
  (DDIM 10 and 50 steps, 1 and 5 samples averaged: the MedSegDiff / Diff-UNet protocols), as ratios to
  one step, on a few slices spread over the volume; the one-sample chains once more with the model's
  calibrated skip, as its one step runs;
- **peer**: MONAI ``SwinUNETR`` as the ``swin_unetr_btcv_segmentation`` bundle runs it (random weights:
  its speed only);
- **against the limit**: achieved FLOP/s over the FLOP/s of a large matmul on the same device;
- **skipped decodes**: the default model with its calibrated skip and with every pair decoded;
- **pipeline**: several copies of the volume through ``sdseg3d batch``'s runner, where reading,
  inference and writing overlap: slices/s from the first read to the last written label, beside the
  one-volume number; on a GPU once more with ``--compile`` (torch.compile), its compiling timed apart.

Peak RSS: each measured configuration runs in a fresh Python process, which reads its own high-water
mark (``VmHWM`` on Linux, see :func:`peak_rss_gb`) right after its measured run, so no configuration
inherits another's memory and later extras (FLOP counts) cannot raise it.
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from sdseg_monai import allocator
from sdseg_monai.errors import SDSegInputError

# The CT the targets speak of: 512x512x100 over a 400x400x250 mm field of view.
REFERENCE_SHAPE = (512, 512, 100)
PHANTOM_EXTENT_MM = (400.0, 400.0, 250.0)
PHANTOM_SEED = 9000  # a held-out (test) phantom seed: no model has trained on it
REAL_CT_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "ct"
REAL_CT_NAME = "abdomen_ct_3mm.nii.gz"
NETWORKS = ("tiny", "paper", "sd-v1")
ONE_ORGAN = "liver"
# (DDIM steps, samples averaged); (1, 1) is SDSeg's one step and the denominator of every ratio.
PROTOCOLS = ((1, 1), (10, 1), (50, 1), (10, 5), (50, 5))
QUICK_PROTOCOLS = ((1, 1), (50, 1))
# The swin_unetr_btcv_segmentation bundle (MONAI model zoo, configs/inference.json).
PEER_SPACING = (1.5, 1.5, 2.0)
PEER_ROI = 96
PEER_FEATURE_SIZE = 48
PEER_OVERLAP = 0.5
PEER_SW_BATCH = 4
PEER_HU_RANGE = (-175.0, 250.0)
GB = 1e9

QUICK_HELP = (
    "A central 4-slice slab of the 512x512x100 phantom (2.5 mm slices) instead of the whole "
    "volume, the tiny (default) network only, no real CT, multi-step on 1 slice as DDIM 50 with 1 "
    "sample only, SwinUNETR timed on one 96^3 window, no pipeline row and no allocator comparison; "
    "per-volume numbers are extrapolated to 100 slices (and SwinUNETR's is a lower bound: its network alone)."
)


# -- timing and the device's limit (shared with benchmarks/gpu_baseline.py) ---------------------------
def sync(device) -> None:
    """Wait for the device's queued work (CUDA runs asynchronously; a CPU needs nothing)."""
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device, repeats: int = 1) -> float:
    """Seconds per call of ``fn``, averaged over ``repeats``, the device synchronised around them."""
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync(device)
    return (time.perf_counter() - start) / repeats


def matmul_tflops(device, n: int, dtype=None, repeats: int | None = None) -> float:
    """TFLOP/s of an n x n matmul on ``device``: what the device reaches on its best-suited op.

    Args:
        device: a torch device.
        n: the matrix side.
        dtype: default bf16 on CUDA, fp32 elsewhere.
        repeats: timed calls after one warm-up (default 5 on CUDA, 3 elsewhere); the fastest counts,
            the device's reach rather than a neighbour's interruptions.
    """
    import torch

    device = torch.device(device)
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    # fp32 on CUDA: in TF32, as cuDNN runs fp32 convolutions by default (else the pipeline's fp32
    # convolutions would reach more than "the limit").
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = device.type == "cuda" and torch.backends.cudnn.allow_tf32
    try:
        a @ b
        seconds = min(timed(lambda: a @ b, device) for _ in range(repeats or (5 if device.type == "cuda" else 3)))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    return 2 * n**3 / seconds / 1e12


def write_phantom(shape, folder: Path, extent_mm=PHANTOM_EXTENT_MM, seed: int = PHANTOM_SEED, name: str = "phantom.nii.gz") -> Path:
    """A phantom CT (int16 NIfTI) on ``shape`` over ``extent_mm``, centred on the body.

    Generated at a quarter of the in-plane size (the generator is single-threaded numpy) and resized
    in-plane, which keeps it CT-like. A smaller z extent at the same slice thickness gives the central
    slab of the same anatomy.
    """
    import nibabel as nib
    import numpy as np
    import torch

    from sdseg_monai.phantoms import abdominal_phantom

    coarse = (max(1, shape[0] // 4), max(1, shape[1] // 4), shape[2])
    spacing = tuple(e / c for e, c in zip(extent_mm, coarse))
    image, _, affine = abdominal_phantom(seed, shape=coarse, spacing=spacing)
    planes = torch.from_numpy(image).permute(2, 0, 1)[:, None]
    fine = torch.nn.functional.interpolate(planes, size=tuple(shape[:2]), mode="bilinear", align_corners=False)
    affine = affine.copy()
    affine[0, 0] *= coarse[0] / shape[0]
    affine[1, 1] *= coarse[1] / shape[1]
    path = Path(folder) / name
    nib.save(nib.Nifti1Image(fine[:, 0].permute(1, 2, 0).numpy().astype(np.int16), affine), path)
    return path


class StageTimer:
    """Seconds spent in, and items passed through, named modules: forward pre and post hooks.

    On CUDA each hook synchronises the device, so a module's time is its own (at the cost of the
    overlap the host would otherwise get). Use as a context manager; hooks go when it exits.

    Args:
        modules: name -> module.
        device: the modules' device.
    """

    def __init__(self, modules: dict, device):
        import torch

        self.modules = modules
        self.cuda = torch.device(device).type == "cuda"
        self.device = device
        self.seconds = {name: 0.0 for name in modules}
        self.items = {name: 0 for name in modules}
        self.calls = {name: 0 for name in modules}
        self._handles = []
        self._started: dict[str, list[float]] = {name: [] for name in modules}

    def _pre(self, name):
        def hook(module, inputs):
            if self.cuda:
                sync(self.device)
            self._started[name].append(time.perf_counter())

        return hook

    def _post(self, name):
        def hook(module, inputs, output):
            if self.cuda:
                sync(self.device)
            self.seconds[name] += time.perf_counter() - self._started[name].pop()
            self.calls[name] += 1
            if inputs and hasattr(inputs[0], "shape"):
                self.items[name] += int(inputs[0].shape[0])

        return hook

    def __enter__(self) -> StageTimer:
        for name, module in self.modules.items():
            self._handles.append(module.register_forward_pre_hook(self._pre(name)))
            self._handles.append(module.register_forward_hook(self._post(name)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def peak_rss_gb() -> float | None:
    """This process's peak resident set size so far (GB): ``VmHWM`` on Linux, whose ``ru_maxrss``
    carries the parent's resident size across fork and exec (a fresh child would report at least its
    parent's); ``getrusage`` elsewhere; None where neither exists (Windows)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / GB  # kB
    except (OSError, ValueError, IndexError):
        pass
    try:
        import resource
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / GB if sys.platform == "darwin" else peak * 1024 / GB  # bytes on macOS, KiB on Linux


# -- options and report ----------------------------------------------------------------------------
@dataclass
class BenchOptions:
    """What one ``sdseg3d bench`` run measures.

    Args:
        device: ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        precision: the precision compared with fp32 (``"auto"`` resolves as inference does; when it
            resolves to fp32, fp32 runs once).
        networks: ``tiny`` (the packaged default model), ``paper``, ``sd-v1`` (random weights) or
            saved model folders.
        shape: the phantom's grid (X, Y, Z); its field of view is 400 x 400 x 250 mm.
        slab: measure a central slab of this many slices of the phantom (same slice thickness)
            instead of the whole volume; per-volume numbers are then extrapolated.
        large_slab: slab for ``paper`` and ``sd-v1`` (default: 2 slices on a CPU, where one of their
            slices takes a minute or more with 13 organs; the whole volume on a GPU).
        real_ct: the real CT's folder (default: ``../shared/data/ct`` when present; None skips it).
        organ_counts: organ sets per network: 1 (the liver) and the model's 13.
        batch_size: (slice, organ) pairs per forward (default: the pipeline's).
        multistep_slices: slices, spread evenly over the volume's depth, that the multi-step
            protocols run on (None: 2 on a CPU, 16 on a GPU, where 2 slices' pairs are too few to fill it).
        protocols: (DDIM steps, samples averaged); must include (1, 1).
        multistep_networks: networks the multi-step protocols run on (default: tiny on a CPU, all
            on a GPU).
        peer: run the SwinUNETR peer.
        peer_windows: time the peer's network on this many 96^3 windows and estimate the rest
            (None: the whole sliding-window pipeline).
        peer_feature_size, peer_roi, peer_spacing: the bundle's (tests shrink them).
        pipeline_volumes: copies of the volume the batch runner segments one after another, reading,
            inference and writing overlapped (None: 8 on a GPU, 2 on a CPU; 0 leaves it out).
        compile_pipeline: run the pipeline once more with ``--compile`` (torch.compile), its compiling
            timed apart (None: on a GPU; on a CPU it measured slower).
        compare_allocator: on a CPU, run the headline configuration once more with the C library's
            own malloc (:mod:`sdseg_monai.allocator`), in its own process (needs ``isolate``; not
            when ``SDSEG3D_MALLOC=system`` already opts every run out).
        isolate: one fresh process per measured configuration (peak RSS is meaningful only then).
        quick: set by :meth:`quick_defaults`, recorded in the report.
    """

    device: str = "auto"
    precision: str = "auto"
    networks: tuple[str, ...] = NETWORKS
    shape: tuple[int, int, int] = REFERENCE_SHAPE
    slab: int | None = None
    large_slab: int | None | str = "auto"
    real_ct: str | None = "auto"
    organ_counts: tuple[int, ...] = (1, 13)
    batch_size: int | None = None
    multistep_slices: int | None = None
    protocols: tuple[tuple[int, int], ...] = PROTOCOLS
    multistep_networks: tuple[str, ...] | None = None
    peer: bool = True
    peer_windows: int | None = None
    peer_feature_size: int = PEER_FEATURE_SIZE
    peer_roi: int = PEER_ROI
    peer_spacing: tuple[float, float, float] = PEER_SPACING
    pipeline_volumes: int | None = None
    compile_pipeline: bool | None = None
    compare_allocator: bool = True
    isolate: bool = True
    quick: bool = False

    @classmethod
    def quick_defaults(cls, **overrides) -> BenchOptions:
        """The ``--quick`` run (under 2 minutes on 2 CPU cores); see :data:`QUICK_HELP`."""
        settings = dict(
            networks=("tiny",), slab=4, real_ct=None, multistep_slices=1, protocols=QUICK_PROTOCOLS,
            peer_windows=1, pipeline_volumes=0, compare_allocator=False, quick=True,
        )
        settings.update(overrides)
        return cls(**settings)


@dataclass
class BenchReport:
    """Everything one bench run measured; :meth:`to_dict` for JSON, :meth:`to_markdown` for tables."""

    options: dict
    machine: dict
    versions: dict
    matmul: dict
    volumes: list = field(default_factory=list)
    one_step: list = field(default_factory=list)
    multistep: list = field(default_factory=list)
    peer: list = field(default_factory=list)
    skip_decode: list = field(default_factory=list)
    allocator: list = field(default_factory=list)
    pipeline: list = field(default_factory=list)
    targets: list = field(default_factory=list)
    notes: list = field(default_factory=list)
    wall_seconds: float = 0.0
    incomplete: str | None = None

    def to_dict(self) -> dict:
        """The whole report as plain JSON types (non-finite numbers as None)."""
        return _finite(asdict(self))

    def to_markdown(self) -> str:
        """The machine, the tables (one step, skipped decodes, multi-step, peer, targets) and the notes."""
        return _markdown(self)


def _finite(value):
    """JSON-safe copy: NaN and infinities become None (strict JSON has neither)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def bench_sources(options: BenchOptions | dict) -> list[Path]:
    """What a bench run reads, which its reports must never overwrite nor lie inside: the real CT and
    the saved model folders (the packaged default for ``tiny``). ``options``: a :class:`BenchOptions`
    or a report's ``options``. Refuses an unknown network or a missing real CT, as the run would."""
    get = options.get if isinstance(options, dict) else lambda name: getattr(options, name)
    models = [Path(spec["path"]) for spec in map(resolve_network, get("networks") or ()) if spec["path"] is not None]
    real_ct = _real_ct(get("real_ct"))
    return models + ([real_ct] if real_ct is not None else [])


def write_report(report: BenchReport, json_path: str | os.PathLike | None = None, markdown_path: str | os.PathLike | None = None) -> list[Path]:
    """Write the report as JSON and/or markdown, each atomically (a temporary file renamed into place),
    never over what the run read (:func:`bench_sources`)."""
    from sdseg_monai.data import atomic_write_text, check_report_path

    sources = bench_sources(report.options) if json_path is not None or markdown_path is not None else []
    check_report_path(json_path, "--json", sources)
    check_report_path(markdown_path, "--markdown", sources)
    written = []
    for path, text in ((json_path, lambda: json.dumps(report.to_dict(), indent=2) + "\n"), (markdown_path, report.to_markdown)):
        if path is not None:
            written.append(atomic_write_text(path, text()))
    return written


# -- the machine ------------------------------------------------------------------------------------
def machine_info(device) -> dict:
    """CPU model, cores, torch threads, native bf16 (AMX / AVX-512 BF16), GPU name and memory."""
    import torch

    from sdseg_monai.model import cpu_has_fast_bf16

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    probes = {}
    for name, probe in (("amx", "_is_amx_tile_supported"), ("avx512_bf16", "_is_avx512_bf16_supported")):
        check = getattr(torch.cpu, probe, None)
        try:
            probes[name] = bool(check()) if check is not None else None
        except RuntimeError:
            probes[name] = None
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    info = {
        "cpu": cpu,
        "cpu_cores": os.cpu_count(),
        "cpu_cores_usable": usable,
        "torch_threads": torch.get_num_threads(),
        "cpu_fast_bf16": cpu_has_fast_bf16(),
        **{f"cpu_{k}": v for k, v in probes.items()},
        "load_average_start": _load_average(),
        "cpu_busy_before": cpu_busy(),
        "device": str(device),
        "gpu": None,
        "gpu_memory_gb": None,
        "platform": platform.platform(),
    }
    if torch.device(device).type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = props.name
        info["gpu_memory_gb"] = props.total_memory / GB
    return info


def cpu_busy(seconds: float = 0.5) -> float | None:
    """Share of the machine's CPU time busy over ``seconds`` (from ``/proc/stat``; None elsewhere).
    Sampled while the bench itself idles: what other processes take from the measurements."""

    def sample():
        fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        return sum(fields), fields[3] + (fields[4] if len(fields) > 4 else 0)  # total, idle + iowait

    try:
        total0, idle0 = sample()
        time.sleep(seconds)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    return 1.0 - (idle1 - idle0) / max(1, total1 - total0)


def _load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages: above the core count, other processes shared the CPU."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def versions() -> dict:
    import diffusers
    import monai
    import torch

    from sdseg_monai import __version__

    return {
        "sdseg3d": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "monai": monai.__version__,
        "diffusers": diffusers.__version__,
        "cuda": torch.version.cuda,
    }


# -- networks ---------------------------------------------------------------------------------------
def resolve_network(name: str) -> dict:
    """What a network name means: ``tiny`` is the packaged default model (a tiny preset with random
    weights in a build without one), ``paper`` and ``sd-v1`` presets with seeded random weights, and
    anything else a saved model folder. Refuses unknown names."""
    from sdseg_monai.model import default_model_path, model_files

    if name == "tiny":
        path = default_model_path()
        if path is not None:
            return {"name": "tiny", "path": str(path), "preset": None, "weights": "packaged default"}
        return {"name": "tiny", "path": None, "preset": "tiny", "weights": "random"}
    if name in ("paper", "sd-v1"):
        return {"name": name, "path": None, "preset": name, "weights": "random"}
    path = Path(name)
    if not path.exists():
        raise SDSegInputError(f"unknown network {name!r}: give tiny, paper, sd-v1 or a saved model folder")
    model_files(path)
    return {"name": path.name, "path": str(path), "preset": None, "weights": "saved"}


def network_config(spec: dict):
    """The :class:`SDSegConfig` of a resolved network (no weights loaded)."""
    from sdseg_monai.config import SDSegConfig, model_preset
    from sdseg_monai.model import model_files

    if spec["path"] is not None:
        return SDSegConfig.from_json_file(model_files(spec["path"])[0])
    return model_preset(spec["preset"], latent_scale=0.18215)


def build_network(spec: dict, device):
    """The network of ``spec`` on ``device``, in eval mode (random weights seeded with 0)."""
    import torch

    from sdseg_monai.model import SDSeg

    if spec["path"] is not None:
        return SDSeg.from_pretrained(spec["path"], device=device)
    torch.manual_seed(0)
    return SDSeg(network_config(spec)).to(device).eval()


def part_flops(config) -> dict:
    """FLOPs of one item through each part (``torch.utils.flop_counter``, on a meta-device copy, so
    nothing is computed): vision encoder per slice, UNet per (slice, organ) pair and step, decoder per
    decoded pair. Counts matmuls, convolutions and attention (2 FLOPs a multiply-add), not norms or
    pointwise ops."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from sdseg_monai.model import SDSeg

    with torch.device("meta"):
        model = SDSeg(config).requires_grad_(False)  # torch 2.11's flop counter fails on a meta parameter that needs grad
    size, latent, channels = config.preprocessing.slice_size, config.latent_size, config.latent_channels
    meta = {"device": "meta"}
    with torch.no_grad():
        with FlopCounterMode(display=False) as counter:
            cond = model.vision_encoder(torch.zeros(1, 3, size, size, **meta))
        encoder = counter.get_total_flops()
        with FlopCounterMode(display=False) as counter:
            model.denoise(torch.zeros(1, channels, latent, latent, **meta), cond, torch.zeros(1, dtype=torch.long, **meta),
                          torch.zeros(1, dtype=torch.long, **meta))
        unet = counter.get_total_flops()
        with FlopCounterMode(display=False) as counter:
            model.autoencoder.decoder(torch.zeros(1, channels, latent, latent, **meta))
        decoder = counter.get_total_flops()
    return {"encoder": float(encoder), "unet": float(unet), "decoder": float(decoder)}


# -- measured configurations (each in a fresh process when isolated) ------------------------------------
def _setup_child(case: dict):
    """Threads and device of a measured configuration; returns the torch device."""
    import torch

    from sdseg_monai.model import resolve_device  # the package set HF_HUB_OFFLINE before diffusers

    # As the sdseg3d command runs (and SwinUNETR too, to be fair to it); the allocator control opts out.
    allocator.keep_freed_memory()
    if case.get("threads"):
        torch.set_num_threads(int(case["threads"]))
    device = resolve_device(case["device"])
    if device.type == "cuda":
        if device.index is not None:
            torch.cuda.set_device(device)
        # In one process (--no-isolate), the last configuration's cached blocks would shrink the free
        # memory that sizes the batch, and its peak would be this one's.
        import gc

        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    return device


def _memory(device) -> dict:
    import torch

    cuda = torch.cuda.max_memory_allocated(device) / GB if device.type == "cuda" else None
    return {"peak_rss_gb": peak_rss_gb(), "cuda_max_memory_allocated_gb": cuda}


def _organ_names(model, count: int) -> list[str] | None:
    names = list(model.config.organ_names)
    if count >= len(names):
        return None  # all of them
    first = [ONE_ORGAN] if ONE_ORGAN in names else []
    return (first + [n for n in names if n not in first])[:count]


def segment_case(case: dict) -> dict:
    """One end-to-end segmentation, timed by stage: read, preprocess (the canonical transforms, timed
    on their own), vision encoder, UNet, decoder (forward hooks), postprocessing (the rest of
    ``segment``: slicing and resizing, smoothing, fusion, components, inversion) and write."""
    from sdseg_monai.data import read_volume
    from sdseg_monai.inference import VolumeSegmenter, model_for_precision
    from sdseg_monai.model import resolve_precision
    from sdseg_monai.transforms import IMAGE_KEY

    device = _setup_child(case)
    # Laid out for its precision once, here: the segmenters below run this very model, whose parts the hooks time.
    built = build_network(case["network"], device)
    model = model_for_precision(built, device, resolve_precision(device, case["precision"], built.config), owned=True)
    organs = _organ_names(model, case["organs"])
    segmenter = VolumeSegmenter(model, copy_model=False, organs=organs, skip_decode=case["skip_decode"], device=device, batch_size=case["batch_size"],
                                precision=case["precision"], seed=0)
    warm_up(segmenter, case["volume"])
    parts = {"encoder": model.vision_encoder, "unet": model.unet, "decoder": model.autoencoder.decoder}
    sync(device)
    start = time.perf_counter()
    volume = read_volume(case["volume"])
    read = time.perf_counter() - start
    with StageTimer(parts, device) as stages:
        began = time.perf_counter()
        result = segmenter.segment(volume)
        sync(device)
        segment_seconds = time.perf_counter() - began
    began = time.perf_counter()
    result.save(case["output"])
    write = time.perf_counter() - began
    total = time.perf_counter() - start
    memory = _memory(device)  # the high-water mark of the measured run, before anything else runs here
    # The canonical transforms once more on their own: their share of segment().
    began = time.perf_counter()
    canonical = segmenter.transforms({IMAGE_KEY: volume.image})[IMAGE_KEY]
    preprocess = time.perf_counter() - began
    network = sum(stages.seconds.values())
    slices = int(canonical.shape[-1])  # axial slices, whatever the file's axis order
    return {
        "seconds": total,
        "slices": slices,
        "slices_per_s": slices / total,
        "organs": len(segmenter.classes),
        "organ_names": list(segmenter.organs.values()) if len(segmenter.classes) < 4 else None,
        "precision": segmenter.precision,
        "batch_size": segmenter.batch_size,
        "skip_decode_radius": segmenter.skip_decode_radius,
        "stages": {
            "read": read,
            "preprocess": preprocess,
            "encoder": stages.seconds["encoder"],
            "unet": stages.seconds["unet"],
            "decoder": stages.seconds["decoder"],
            "postprocess": max(0.0, segment_seconds - preprocess - network),
            "write": write,
        },
        "items": dict(stages.items),
        "freed_memory_kept": allocator.keep_freed_memory(),  # as the segmenter left it (it applies on a CPU)
        **memory,
    }


def warm_up(segmenter, path: str) -> None:
    """Run ``segmenter``'s model once before its timed run, every pair decoded, so that one-time costs
    stay out of the timings (also benchmarks/precision_dice.py's). On a GPU at the measured shapes: one
    full chunk of its organs on the grid of the volume at ``path`` (the first call of a shape picks its
    kernels and grows the allocator; a one-pair warm-up left them in the timed run). On a CPU, where
    that would cost as much as the run, one small slice and one organ."""
    import numpy as np

    from sdseg_monai.inference import VolumeSegmenter

    organs = list(segmenter.organs.values())
    if segmenter.device.type == "cuda":
        array, affine = _warm_up_array(path, segmenter.chunk_slices)
    else:
        organs, array, affine = organs[:1], np.random.default_rng(0).uniform(-200, 200, (64, 64, 1)).astype(np.float32), None
    VolumeSegmenter(segmenter.model, copy_model=False, organs=organs, skip_decode=False, device=segmenter.device, batch_size=segmenter.batch_size,
                    precision=segmenter.precision, seed=segmenter.seed).segment_array(array, affine)


def _warm_up_array(path: str, slices: int):
    """Random HU on the grid of the NIfTI at ``path`` (its header only), at most ``slices`` thick along
    its axial (S-I) axis, and its affine."""
    import nibabel as nib
    import numpy as np

    from sdseg_monai.transforms import axial_axis

    image = nib.load(str(path))
    shape = list(image.shape[:3])
    axial = axial_axis(image.affine)
    shape[axial] = min(shape[axial], slices)
    return np.random.default_rng(0).uniform(-200, 200, shape).astype(np.float32), image.affine


def _model_slices(model, path: str, count: int):
    """``count`` axial slices of a volume, as the model sees them (S, 3, S, S): the middle slice of
    each of ``count`` equal parts of its depth, so that they show organs as often as the volume does
    (central slices show more, and the calibrated skip would decode more of their pairs)."""
    from sdseg_monai.data import read_volume
    from sdseg_monai.transforms import IMAGE_KEY, SliceGeometry, axial_slices, canonical_transforms

    preprocessing = model.config.preprocessing
    canonical = canonical_transforms(preprocessing)({IMAGE_KEY: read_volume(path).image})[IMAGE_KEY]
    depth = canonical.shape[-1]
    count = min(count, depth)
    spread = [int((2 * i + 1) * depth // (2 * count)) for i in range(count)]
    geometry = SliceGeometry(tuple(canonical.shape[1:3]), preprocessing.slice_size)
    return geometry.to_model(axial_slices(canonical, spread, preprocessing.channels))


def multistep_case(case: dict) -> dict:
    """SDSeg's one step against DDIM chains and averaged samples on the same slices and network
    (``SDSeg.predict``, every organ, every pair decoded in all of them), then the one-sample
    protocols again with the model's calibrated skip (the shipped one step's, applied to any chain's
    final latent): their decoded pairs, and the mask pixels (at the organ's threshold) that differ
    from decoding every pair."""
    import torch

    from sdseg_monai.inference import model_for_precision
    from sdseg_monai.model import resolve_precision

    device = _setup_child(case)
    built = build_network(case["network"], device)
    precision = resolve_precision(device, case["precision"], built.config)
    model = model_for_precision(built, device, precision, owned=True)
    slices = _model_slices(model, case["volume"], case["slices"])
    options = dict(seed=0, batch_size=case["batch_size"], precision=case["precision"])
    post = model.config.postprocessing
    thresholds = torch.tensor([post.threshold(name) for name in model.config.organ_names]).view(1, -1, 1, 1)
    last: dict = {}

    def run(steps: int, samples: int, radius: float) -> None:
        last["result"] = model.predict(slices, num_steps=steps, num_samples=samples, skip_decode_radius=radius,
                                       return_distances=radius > 0, **options)

    # Warm-up at the measured batch shapes: on a GPU the first call of a shape picks its kernels and
    # grows the allocator (a one-pair warm-up left one step timed slower than DDIM 10).
    run(1, 1, 0.0)
    radius = post.skip_decode_radius
    # The skip keeps or drops a pair for all its samples: one-sample chains are the comparison.
    skipping = [tuple(p) for p in case["protocols"] if p[1] == 1] if radius > 0 else []
    rows, masks = [], {}
    for steps, samples in case["protocols"]:
        seconds = timed(lambda: run(steps, samples, 0.0), device)
        rows.append({"steps": steps, "samples": samples, "decode": "all", "seconds": seconds, "seconds_per_slice": seconds / len(slices)})
        if (steps, samples) in skipping:
            masks[steps, samples] = last["result"].cpu() >= thresholds
    for steps, samples in skipping:
        seconds = timed(lambda: run(steps, samples, radius), device)
        maps, distances = last["result"]
        rows.append({"steps": steps, "samples": samples, "decode": "calibrated skip", "seconds": seconds,
                     "seconds_per_slice": seconds / len(slices), "decoded_pairs": int((distances >= radius).sum()),
                     "mask_pixels_changed": int(((maps.cpu() >= thresholds) != masks[steps, samples]).sum())})
    return {"slices": len(slices), "organs": model.config.num_classes, "precision": precision, "runs": rows}


def count_windows(shape, roi: int = PEER_ROI, overlap: float = PEER_OVERLAP) -> int:
    """How many ``roi``^3 windows ``monai.inferers.sliding_window_inference`` runs on an image of
    spatial ``shape`` (padded to at least ``roi``), as its scan-interval rule gives them."""
    from monai.data.utils import dense_patch_slices

    size = [max(int(s), roi) for s in shape]
    interval = [roi if s == roi else max(int(roi * (1 - overlap)), 1) for s in size]
    return len(dense_patch_slices(size, (roi,) * len(size), interval))


def peer_windows(shape, spacing_mm, spacing=PEER_SPACING, roi: int = PEER_ROI, overlap: float = PEER_OVERLAP) -> dict:
    """The grid a volume of ``shape`` and voxel size ``spacing_mm`` has once resampled to ``spacing``
    (MONAI's own shape rule), and the sliding windows on it: computed, not run."""
    import numpy as np
    from monai.data.utils import compute_shape_offset

    affine = np.diag([*map(float, spacing_mm), 1.0])
    resampled, _ = compute_shape_offset(tuple(shape[:3]), affine, np.diag([*map(float, spacing), 1.0]))
    return {"resampled_shape": [int(s) for s in resampled], "windows": count_windows(resampled, roi, overlap)}


def peer_network(feature_size: int = PEER_FEATURE_SIZE):
    """The bundle's network: ``SwinUNETR``, 1 channel in, 14 out (background and BTCV's 13 organs),
    seeded random weights. monai >= 1.5 dropped ``img_size``: it takes any size divisible by 32."""
    import torch
    from monai.networks.nets import SwinUNETR

    torch.manual_seed(0)
    return SwinUNETR(in_channels=1, out_channels=14, feature_size=feature_size, spatial_dims=3, use_checkpoint=False)


_SWIN_UNETR = peer_network  # the real peer, which needs einops; tests may stand another network in


def peer_precision(device) -> str:
    """The peer's precision: fp16 autocast on CUDA (the bundle's ``amp``), fp32 elsewhere."""
    import torch

    return "fp16" if torch.device(device).type == "cuda" else "fp32"


def peer_case(case: dict) -> dict:
    """MONAI SwinUNETR as the swin_unetr_btcv_segmentation bundle runs it: RAS, 1.5x1.5x2.0 mm,
    HU [-175, 250] -> [0, 1], 96^3 sliding window (4 per batch, overlap 0.5; fp16 autocast on CUDA as
    the bundle's ``amp``), softmax, ``Invertd`` back to the input grid, argmax, written as a label
    NIfTI. With ``windows`` set, only the network runs, on that many windows."""
    import torch
    from monai.data import MetaTensor
    from monai.inferers import sliding_window_inference
    from monai.transforms import Compose, Invertd, Orientationd, ScaleIntensityRanged, Spacingd

    from sdseg_monai.data import read_volume, write_label_volume
    from sdseg_monai.model import precision_dtype
    from sdseg_monai.transforms import AXIS_LABELS

    device = _setup_child(case)
    roi, spacing = case["roi"], tuple(case["spacing"])
    net = peer_network(case["feature_size"]).to(device).eval()
    precision = peer_precision(device)
    amp = torch.autocast(device.type, dtype=precision_dtype(precision), enabled=precision != "fp32")
    pre = Compose([
        Orientationd(keys="image", axcodes="RAS", labels=AXIS_LABELS),
        Spacingd(keys="image", pixdim=spacing, mode="bilinear"),
        ScaleIntensityRanged(keys="image", a_min=PEER_HU_RANGE[0], a_max=PEER_HU_RANGE[1], b_min=0.0, b_max=1.0, clip=True),
    ])
    out: dict = {"precision": precision, "feature_size": case["feature_size"], "roi": roi}
    with torch.inference_mode():
        if device.type == "cuda":  # kernel choice; on a CPU a warm-up would cost as much as a window
            with amp:
                net(torch.zeros(1, 1, roi, roi, roi, device=device))
        sync(device)
        start = time.perf_counter()
        volume = read_volume(case["volume"])
        read = time.perf_counter() - start
        began = time.perf_counter()
        data = pre({"image": volume.image})
        image = data["image"]
        preprocess = time.perf_counter() - began
        geometry = {"resampled_shape": [int(s) for s in image.shape[1:]], "windows": count_windows(image.shape[1:], roi, PEER_OVERLAP)}
        out.update(geometry)
        if case["windows"]:
            window = torch.zeros(1, 1, roi, roi, roi, device=device)
            crop = image[0, :roi, :roi, :roi].as_tensor()
            window[0, 0, : crop.shape[0], : crop.shape[1], : crop.shape[2]] = crop.to(device)
            with amp:
                seconds = timed(lambda: net(window), device, repeats=int(case["windows"]))
            out.update({"mode": f"network on {case['windows']} window(s)", "seconds_per_window": seconds, "windows_timed": int(case["windows"]),
                        "stages": {"read": read, "preprocess": preprocess}, **_memory(device)})
        else:
            began = time.perf_counter()
            with amp:
                logits = sliding_window_inference(image[None].to(device), (roi,) * 3, PEER_SW_BATCH, net, overlap=PEER_OVERLAP)
            sync(device)
            network = time.perf_counter() - began
            began = time.perf_counter()
            probabilities = torch.softmax(logits.float(), dim=1)[0].cpu()
            probabilities = probabilities.as_tensor() if hasattr(probabilities, "as_tensor") else probabilities
            pred = MetaTensor(probabilities, meta=dict(image.meta), applied_operations=list(image.applied_operations))
            inverted = Invertd(keys="pred", transform=pre, orig_keys="image", nearest_interp=False)({"pred": pred, "image": image})["pred"]
            labels = torch.argmax(inverted, dim=0).to(torch.uint8).numpy()
            post = time.perf_counter() - began
            began = time.perf_counter()
            write_label_volume(labels, volume, case["output"], {"model": "SwinUNETR (random weights)"})
            write = time.perf_counter() - began
            total = time.perf_counter() - start
            out.update({
                "mode": "whole pipeline", "seconds": total, "seconds_per_window": network / geometry["windows"],
                "stages": {"read": read, "preprocess": preprocess, "network": network, "postprocess": post, "write": write},
                **_memory(device),
            })
    import copy

    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        copy.deepcopy(net).to("meta").requires_grad_(False)(torch.zeros(1, 1, roi, roi, roi, device="meta"))
    out["flops_per_window"] = float(counter.get_total_flops())
    out["slices"] = int(volume.shape[2])
    return out


def pipeline_case(case: dict) -> dict:
    """``case["volumes"]`` copies of the volume through :class:`~sdseg_monai.batch.BatchRunner` (what
    ``sdseg3d batch`` runs): reader threads, inference and the writer thread overlap. Timed from the
    first read to the last written label (and done-record)."""
    import shutil

    from sdseg_monai.batch import BatchRunner
    from sdseg_monai.data import read_volume

    device = _setup_child(case)
    with tempfile.TemporaryDirectory(prefix="sdseg3d_bench_pipeline_") as folder:
        folder = Path(folder)
        model = case["network"]["path"] or build_network(case["network"], device).save_pretrained(folder / "model")
        inputs = folder / "in"
        inputs.mkdir()
        for index in range(case["volumes"]):
            copy = inputs / f"volume_{index:03d}.nii.gz"
            try:
                os.link(case["volume"], copy)
            except OSError:
                shutil.copyfile(case["volume"], copy)
        began = time.perf_counter()
        runner = BatchRunner(model, folder / "out", device=device, batch_size=case["batch_size"], precision=case["precision"],
                             dicom_seg=False, readers=case.get("readers"), compile=case.get("compile", False))
        setup = time.perf_counter() - began  # the model's load, and with compile its compiling
        warm_up(runner.segmenter, case["volume"])
        sync(device)
        start = time.perf_counter()
        report = runner.run(inputs)
        sync(device)
        seconds = time.perf_counter() - start
        memory = _memory(device)
        failed = [r for r in report.rows if r["status"] != "ok"]
        if failed:
            raise RuntimeError(f"{len(failed)} of {len(report.rows)} volumes failed: {failed[0]['reason']} {failed[0]['message']}")
        slices = int(runner.segmenter.prepare(read_volume(case["volume"])).shape[-1]) * case["volumes"]
    return {"seconds": seconds, "volumes": case["volumes"], "slices": slices, "slices_per_s": slices / seconds,
            "compiled": runner.segmenter.compiled, "setup_seconds": setup, "readers": runner.readers,
            "organs": len(runner.segmenter.classes), "precision": runner.segmenter.precision, **memory}


CASES = {"segment": segment_case, "multistep": multistep_case, "peer": peer_case, "pipeline": pipeline_case}


def run_case(case: dict) -> dict:
    """Run one measured configuration (in this process); errors come back as ``{"error": ...}`` so
    one failure (e.g. out of memory on a big network) does not lose the rest of the bench."""
    try:
        return CASES[case["kind"]](case)
    except Exception as error:  # noqa: BLE001  (a bench of record: report what failed, keep the rest)
        return {"error": f"{type(error).__name__}: {' '.join(str(error).split())}"[:500]}


def _run_isolated(case: dict) -> dict:
    """``run_case`` in a fresh Python process (``python -m sdseg_monai.bench CASE RESULT``), so that
    its peak RSS is its own. A new interpreter rather than ``multiprocessing``: nothing depends on
    the caller's ``__main__`` (a script without a main guard, a notebook)."""
    import subprocess

    package_root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")])), **case.get("env", {})}
    with tempfile.TemporaryDirectory(prefix="sdseg3d_bench_case_") as folder:
        result_path = Path(folder) / "result.json"
        process = subprocess.run(
            [sys.executable, "-m", "sdseg_monai.bench", json.dumps(case), str(result_path)],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )
        if result_path.is_file():
            return json.loads(result_path.read_text())
        last = (process.stderr or "").strip().splitlines()[-1:] or ["no message"]
        return {"error": f"the measuring process exited with status {process.returncode} (killed for memory?): {last[0][:300]}"}


# -- the run ----------------------------------------------------------------------------------------
def _ratio(a, b):
    return a / b if a is not None and b not in (None, 0) else None


def run_bench(
    options: BenchOptions | None = None,
    progress: Callable[[str], None] | None = None,
    checkpoint: Callable[[BenchReport], None] | None = None,
) -> BenchReport:
    """Measure everything :class:`BenchOptions` asks for, in one run on one machine.

    Args:
        options: what to measure (default: the full bench).
        progress: called with a line of text as each configuration starts and ends.
        checkpoint: called with the report so far (``incomplete`` says where it stopped) before each
            configuration starts, so that a run cut short (a time limit) keeps what it measured.

    Returns:
        the :class:`BenchReport`.

    Raises:
        SDSegInputError: a bad option (unknown device, precision or network, bad shape), before any compute.
    """
    import torch

    from sdseg_monai.model import precision_dtype, resolve_device, resolve_precision

    options = options or BenchOptions()
    say = progress or (lambda line: None)
    wall = time.perf_counter()
    device = resolve_device(options.device)
    resolved = resolve_precision(device, options.precision)
    if len(options.shape) != 3 or any(int(n) < 1 for n in options.shape):
        raise SDSegInputError(f"--shape needs three positive integers, got {options.shape}")
    if options.slab is not None and options.slab < 1:
        raise SDSegInputError(f"slab must be at least 1 slice, got {options.slab}")
    if (1, 1) not in [tuple(p) for p in options.protocols]:
        raise SDSegInputError("the multi-step protocols must include (1, 1), the one step every ratio divides by")
    specs = [resolve_network(name) for name in options.networks]
    if not specs:
        raise SDSegInputError("no network to measure")
    real_ct = _real_ct(options.real_ct)
    precisions = ["fp32"] + ([resolved] if resolved != "fp32" else [])
    large_slab = options.large_slab if options.large_slab != "auto" else (2 if device.type == "cpu" else None)
    multistep_slices = options.multistep_slices or (16 if device.type == "cuda" else 2)
    multistep_names = options.multistep_networks
    if multistep_names is None:
        multistep_names = tuple(s["name"] for s in specs) if device.type == "cuda" else tuple(s["name"] for s in specs[:1])
    threads = torch.get_num_threads()
    report = BenchReport(
        options={**asdict(options), "resolved_precision": resolved, "precisions": precisions, "large_slab": large_slab,
                 "multistep_slices": multistep_slices},
        machine=machine_info(device),
        versions=versions(),
        matmul={},
    )
    said = []  # notes from the run itself; _notes adds those read off the rows
    if resolved == "fp32":
        said.append(f"precision {options.precision} resolves to fp32 on this {device.type}: fp32 ran once")
    import importlib.util

    peer = options.peer and (importlib.util.find_spec("einops") is not None or peer_network is not _SWIN_UNETR)
    if options.peer and not peer:
        said.append("SwinUNETR needs einops (pip install 'sdseg3d[bench]'): the peer was left out")
    # The limit in every precision that runs, the peer's too (fp16 on CUDA), so each row has its share.
    for precision in dict.fromkeys(precisions + ([peer_precision(device)] if peer else [])):
        n = 8192 if device.type == "cuda" else 2048
        report.matmul[precision] = {"n": n, "tflops": matmul_tflops(device, n, precision_dtype(precision)),
                                    "tf32": device.type == "cuda" and precision == "fp32" and torch.backends.cudnn.allow_tf32}
        say(f"matmul {precision}: {report.matmul[precision]['tflops']:.3f} TFLOP/s")

    reference_slices = int(options.shape[2])
    z_mm = PHANTOM_EXTENT_MM[2] / reference_slices
    with tempfile.TemporaryDirectory(prefix="sdseg3d_bench_") as scratch:
        scratch = Path(scratch)
        volumes = {}

        def add_volume(name, path, kind, slices_of, generated=None):
            import nibabel as nib

            header = nib.load(str(path))
            volumes[name] = {"name": name, "path": str(path), "kind": kind, "shape": list(header.shape[:3]),
                             "spacing_mm": [float(s) for s in header.header.get_zooms()[:3]], "reference_slices": slices_of}
            if generated is not None:
                volumes[name]["generated_seconds"] = generated
            report.volumes.append({k: v for k, v in volumes[name].items() if k != "path"} | {"source": str(path) if kind == "real CT" else "generated"})

        def phantom(slab):
            shape = (*options.shape[:2], slab or reference_slices)
            extent = (*PHANTOM_EXTENT_MM[:2], z_mm * shape[2])
            name = "phantom" if slab is None else f"phantom slab {slab}"
            if name not in volumes:
                began = time.perf_counter()
                path = write_phantom(shape, scratch, extent, name=f"{name.replace(' ', '_')}.nii.gz")
                add_volume(name, path, "phantom" if slab is None else "central slab of the phantom", reference_slices, time.perf_counter() - began)
            return name

        main_volume = phantom(options.slab)
        if real_ct is not None:
            add_volume("real CT", real_ct, "real CT", None)

        def conclude() -> None:
            """Targets and notes from the rows so far: a checkpoint's report is judged as the final one is."""
            report.targets = _targets(report, device, resolved, tuple(options.shape), specs[0]["name"], main_volume)
            report.notes = said + _notes(report, options, device, large_slab)
            report.wall_seconds = time.perf_counter() - wall

        def measure(case: dict, label: str) -> dict:
            case = {**case, "device": str(device), "threads": threads, "batch_size": options.batch_size}
            if checkpoint is not None:
                report.incomplete = f"stopped before: {label}"
                conclude()
                checkpoint(report)
            say(f"{label} ...")
            began = time.perf_counter()
            result = _run_isolated(case) if options.isolate else run_case(case)
            if not options.isolate and "error" not in result:
                result["peak_rss_gb"] = None  # one process ran everything: its high-water mark is no one's
            say(f"{label}: {'failed: ' + result['error'] if 'error' in result else f'{time.perf_counter() - began:.1f} s'}")
            return result

        # One step, every network, organ set and precision, on the phantom (big networks on a slab).
        labels = {}
        volumes_in_pipeline = options.pipeline_volumes if options.pipeline_volumes is not None else (8 if device.type == "cuda" else 2)
        compile_pipeline = options.compile_pipeline if options.compile_pipeline is not None else device.type == "cuda"
        compare_allocator = (options.compare_allocator and options.isolate and device.type == "cpu"
                             and allocator.supported() and not allocator.opted_out())
        flops_per_network = []  # counted once per network: the multi-step rows below reuse them
        for index, spec in enumerate(specs):
            config = network_config(spec)
            flops = part_flops(config)
            flops_per_network.append(flops)
            large = spec["preset"] in ("paper", "sd-v1") and large_slab is not None
            volume = phantom(min(large_slab, options.slab or large_slab)) if large else main_volume
            # Most organs first: the headline rows are measured before a time limit can cut the run short.
            runs = [(count, precision, True) for count in sorted(options.organ_counts, reverse=True) for precision in precisions]
            # The first network (the default) once more with every pair decoded: what its calibrated skip saves.
            compare_skip = index == 0 and config.postprocessing.skip_decode_radius > 0
            if compare_skip:
                runs.append((max(options.organ_counts), resolved, False))
            for count, precision, skip in runs:
                output = scratch / f"labels_{len(report.one_step)}.nii.gz"
                case = {"kind": "segment", "network": spec, "organs": count, "precision": precision, "skip_decode": skip,
                        "volume": volumes[volume]["path"], "output": str(output)}
                label = f"one step {spec['name']}, {min(count, config.num_classes)} organ(s), {precision}, {volume}"
                result = measure(case, label + ("" if skip else ", every pair decoded"))
                row = _one_step_row(spec, volumes[volume], result, flops, report.matmul.get(precision, {}).get("tflops"), skip)
                report.one_step.append(row)
                if "error" not in result:
                    labels[(spec["name"], volume, row["organs"], precision, skip)] = output
            if real_ct is not None and index == 0:
                for skip in (True, False) if compare_skip else (True,):
                    output = scratch / f"labels_{len(report.one_step)}.nii.gz"
                    case = {"kind": "segment", "network": spec, "organs": max(options.organ_counts), "precision": resolved, "skip_decode": skip,
                            "volume": volumes["real CT"]["path"], "output": str(output)}
                    result = measure(case, f"one step {spec['name']}, real CT" + ("" if skip else ", every pair decoded"))
                    row = _one_step_row(spec, volumes["real CT"], result, flops, report.matmul.get(resolved, {}).get("tflops"), skip)
                    report.one_step.append(row)
                    if "error" not in result:
                        labels[(spec["name"], "real CT", row["organs"], resolved, skip)] = output
            if index == 0 and compare_allocator:
                # The headline run once more with the C library's own malloc (a fresh process): what keeping
                # freed memory (sdseg_monai.allocator, process-wide) is worth, side by side.
                count = max(options.organ_counts)
                kept = _one_step(report.one_step, spec["name"], main_volume, min(count, config.num_classes), resolved)
                if kept is not None:
                    output = scratch / "labels_system_malloc.nii.gz"
                    case = {"kind": "segment", "network": spec, "organs": count, "precision": resolved, "skip_decode": True,
                            "volume": volumes[main_volume]["path"], "output": str(output), "env": {allocator.OPT_OUT: "system"}}
                    result = measure(case, f"one step {spec['name']}, {kept['organs']} organ(s), {resolved}, {main_volume}, system malloc")
                    kept_labels = labels.get((spec["name"], main_volume, kept["organs"], resolved, True))
                    report.allocator.append(_allocator_row(kept, result, kept_labels, output))
            if index == 0 and volumes_in_pipeline > 0:  # the default's batch run next: on a GPU, the headline target
                for compiled in (False, True) if compile_pipeline else (False,):
                    case = {"kind": "pipeline", "network": spec, "volume": volumes[main_volume]["path"], "volumes": volumes_in_pipeline,
                            "precision": resolved, "compile": compiled}
                    result = measure(case, f"pipeline {spec['name']}, {volumes_in_pipeline} x {main_volume}" + (", compiled" if compiled else ""))
                    report.pipeline.append(_pipeline_row(spec, main_volume, result, report.one_step))

        report.skip_decode = _skip_rows(report.one_step, labels)

        for spec, flops in zip(specs, flops_per_network):
            if spec["name"] not in multistep_names:
                continue
            case = {"kind": "multistep", "network": spec, "volume": volumes[main_volume]["path"], "slices": multistep_slices,
                    "precision": resolved, "protocols": [list(p) for p in options.protocols]}
            result = measure(case, f"multi-step {spec['name']}, {multistep_slices} slice(s)")
            report.multistep.append(_multistep_row(spec, result, flops))

        if peer:
            peer_volumes = [main_volume] + (["real CT"] if real_ct is not None else [])
            for name in peer_volumes:
                case = {"kind": "peer", "volume": volumes[name]["path"], "output": str(scratch / f"peer_{len(report.peer)}.nii.gz"),
                        "windows": options.peer_windows, "feature_size": options.peer_feature_size, "roi": options.peer_roi,
                        "spacing": list(options.peer_spacing), "precision": resolved}
                result = measure(case, f"SwinUNETR, {name}" + (f", {options.peer_windows} window(s)" if options.peer_windows else ""))
                report.peer.append(_peer_row(volumes[name], result, options, report.matmul))

    report.machine["load_average_end"] = _load_average()
    report.machine["cpu_busy_after"] = cpu_busy()
    conclude()
    report.incomplete = None
    return report


def _real_ct(option) -> Path | None:
    if option is None or option == "":
        return None
    folder = REAL_CT_DIR if option == "auto" else Path(option)
    path = folder / REAL_CT_NAME if folder.is_dir() else folder
    if path.is_file():
        return path
    if option == "auto":
        return None  # not shipped with this checkout: skipped, said in the notes
    raise SDSegInputError(f"no real CT here (expected {REAL_CT_NAME} in the folder, or a NIfTI file)", option)


def _one_step_row(spec, volume, result, flops, matmul, skip) -> dict:
    row = {"network": spec["name"], "weights": spec["weights"], "volume": volume["name"], "skip_decode": skip}
    if "error" in result:
        return {**row, "organs": None, "error": result["error"]}
    row.update(result)
    whole = volume["reference_slices"] is None or volume["reference_slices"] == result["slices"]
    per_volume = volume["reference_slices"] or result["slices"]
    row["seconds_per_volume"] = result["seconds"] if whole else per_volume / result["slices_per_s"]
    row["volume_slices"] = per_volume
    row["extrapolated"] = not whole
    items = result["items"]
    total = sum(flops[part] * items.get(part, 0) for part in flops)
    network = sum(result["stages"][part] for part in ("encoder", "unet", "decoder"))
    row["flops_per_item"] = flops
    row["tflop"] = total / 1e12
    row["achieved_tflops"] = total / result["seconds"] / 1e12
    row["network_tflops"] = total / network / 1e12 if network > 0 else None
    row["matmul_fraction"] = _ratio(row["achieved_tflops"], matmul)
    row["network_matmul_fraction"] = _ratio(row["network_tflops"], matmul)
    row["decoded_share"] = _ratio(items.get("decoder", 0), items.get("unet", 0))
    return row


def _one_step(rows, network: str, volume: str, organs: int, precision: str, skip: bool = True) -> dict | None:
    """The measured (not failed) one-step row of that network, volume, organ count, precision and skip."""
    key = (network, volume, organs, precision, skip)
    return next((r for r in rows if not r.get("error") and (r["network"], r["volume"], r["organs"], r["precision"], r["skip_decode"]) == key), None)


def _labels_differing(path_a, path_b) -> tuple[int, int]:
    """(voxels labelled differently, voxels) between two label files of the same grid."""
    import nibabel as nib
    import numpy as np

    a = np.asanyarray(nib.load(str(path_a)).dataobj)
    b = np.asanyarray(nib.load(str(path_b)).dataobj)
    return int((a != b).sum()), int(a.size)


def _skip_rows(rows, labels) -> list[dict]:
    """Calibrated skip against every pair decoded, for each volume both ran on: time ratio and the
    voxels labelled differently."""
    out = []
    for row in rows:
        if row.get("error") or row["skip_decode"]:
            continue
        key = (row["network"], row["volume"], row["organs"], row["precision"])
        partner = _one_step(rows, *key)
        if partner is None or (*key, True) not in labels:
            continue
        differing, voxels = _labels_differing(labels[(*key, True)], labels[(*key, False)])
        out.append({
            "network": row["network"], "volume": row["volume"], "organs": row["organs"], "precision": row["precision"],
            "skip_decode_radius": partner["skip_decode_radius"],
            "seconds_skip": partner["seconds"], "seconds_decode_all": row["seconds"],
            "speed_up": row["seconds"] / partner["seconds"],
            "decoder_seconds_skip": partner["stages"]["decoder"], "decoder_seconds_decode_all": row["stages"]["decoder"],
            "decoded_share": partner["decoded_share"],
            "voxels_differing": differing, "voxels": voxels, "labels_identical": differing == 0,
        })
    return out


def _allocator_row(kept: dict, result: dict, kept_labels, system_labels) -> dict:
    """The headline run with freed memory kept (as shipped) against the C library's own malloc: time
    ratio, peak RSS of each, and the voxels labelled differently (none expected: only timing changes)."""
    row = {key: kept[key] for key in ("network", "volume", "organs", "precision")}
    if "error" in result:
        return {**row, "error": result["error"]}
    differing, voxels = _labels_differing(kept_labels, system_labels)
    return {
        **row,
        "seconds_kept": kept["seconds"], "seconds_system": result["seconds"],
        "speed_up": _ratio(result["seconds"], kept["seconds"]),
        "decoder_seconds_kept": kept["stages"]["decoder"], "decoder_seconds_system": result["stages"]["decoder"],
        "peak_rss_gb_kept": kept.get("peak_rss_gb"), "peak_rss_gb_system": result.get("peak_rss_gb"),
        "applied": [kept.get("freed_memory_kept"), result.get("freed_memory_kept")],
        "voxels_differing": differing, "voxels": voxels,
    }


def _pipeline_row(spec, volume: str, result, one_step) -> dict:
    """The overlapped run beside the one-volume run of the same network, volume, organs and precision."""
    row = {"network": spec["name"], "volume": volume}
    if "error" in result:
        return {**row, "error": result["error"]}
    row.update(result)
    single = _one_step(one_step, spec["name"], volume, result["organs"], result["precision"])
    row["one_volume_slices_per_s"] = single["slices_per_s"] if single else None
    row["speed_up"] = _ratio(result["slices_per_s"], row["one_volume_slices_per_s"])
    return row


def _multistep_row(spec, result, flops: dict) -> dict:
    """A network's multi-step runs with their ratios to one step: in measured seconds, and in FLOPs
    (``flops``: :func:`part_flops`), the ratio the split of work between the UNet, which a chain
    repeats, and the encoder and decoder, which run once, allows at equal efficiency. Each run is
    compared with one step decoding every pair (``ratio_to_one_step``) and with one step decoding
    as it does (``..._same_decode``: the calibrated skip's runs against one step with the skip)."""
    row = {"network": spec["name"], "weights": spec["weights"]}
    if "error" in result:
        return {**row, "error": result["error"]}
    row.update(result)
    row["flops_per_item"] = flops
    runs = {(r["steps"], r["samples"], r["decode"]): r for r in result["runs"]}
    pairs = result["slices"] * result["organs"]

    def run_flops(run: dict) -> float:
        decoded = run.get("decoded_pairs", pairs)
        return flops["encoder"] * result["slices"] + run["samples"] * (run["steps"] * flops["unet"] * pairs + flops["decoder"] * decoded)

    base = runs[1, 1, "all"]
    for run in result["runs"]:
        same = runs.get((1, 1, run["decode"]), base)
        run["ratio_to_one_step"] = run["seconds"] / base["seconds"]
        run["ratio_to_one_step_same_decode"] = run["seconds"] / same["seconds"]
        run["flop_ratio_to_one_step"] = run_flops(run) / run_flops(base)
        run["flop_ratio_to_one_step_same_decode"] = run_flops(run) / run_flops(same)
    return row


def _peer_row(volume, result, options, matmul) -> dict:
    row = {"network": "SwinUNETR (random weights)", "volume": volume["name"]}
    if "error" in result:
        return {**row, "error": result["error"]}
    row.update(result)
    whole = volume["reference_slices"] is None or volume["reference_slices"] == result["slices"]
    if result["mode"] == "whole pipeline":
        row["seconds_per_volume"] = result["seconds"] if whole else None
        row["basis"] = "measured"
        network_seconds = result["stages"]["network"]
    else:
        # Only the network ran: its time on every window of the reference volume, a lower bound.
        if whole:
            geometry = {"windows": result["windows"], "resampled_shape": result["resampled_shape"]}
        else:  # the slab's slices, as many as the whole phantom has, at the same thickness
            geometry = peer_windows([*volume["shape"][:2], volume["reference_slices"]], volume["spacing_mm"], options.peer_spacing, options.peer_roi)
        row["reference_windows"] = geometry["windows"]
        row["reference_resampled_shape"] = geometry["resampled_shape"]
        network_seconds = geometry["windows"] * result["seconds_per_window"]
        row["seconds_per_volume"] = network_seconds
        row["basis"] = "lower bound: network only, from the timed window(s)"
    windows = row.get("reference_windows", result["windows"])
    row["achieved_tflops"] = result["flops_per_window"] * windows / network_seconds / 1e12 if network_seconds else None
    row["matmul_fraction"] = _ratio(row["achieved_tflops"], matmul.get(result["precision"], {}).get("tflops"))
    return row


def _targets(report: BenchReport, device, resolved: str, shape, default_network: str, main_volume: str) -> list[dict]:
    """The issue's targets, each with the number it was judged on and how that number came about.

    On a CPU the default is judged in the precision asked for (``auto``: as shipped), with its speed-up
    over fp32 where both ran; on a GPU in the faster of fp32 and that precision, the basis saying which."""
    targets = []
    ct = "x".join(map(str, shape))
    gpu = device.type == "cuda"
    judged = ("fp32", resolved) if gpu else (resolved,)

    def add(name, goal, value, passed, basis, **extra):
        targets.append({"target": name, "goal": goal, "value": value, "passed": passed, "basis": basis, **extra})

    def headline(network, precisions=judged):
        """The network's every-organ row, skip as shipped, on the phantom (or its slab): the fastest of ``precisions``."""
        rows = [r for r in report.one_step if not r.get("error") and r["network"] == network and r["volume"] != "real CT"
                and r["skip_decode"] and r["precision"] in precisions]
        most = max((r["organs"] for r in rows), default=None)
        return max((r for r in rows if r["organs"] == most), key=lambda r: r["slices_per_s"], default=None)

    def basis(row):
        return ("extrapolated from a central slab" if row["extrapolated"] else "measured") + (f", {row['precision']}" if gpu else "")

    def on_slab(met: bool, slab: bool, provable: bool) -> bool | None:
        """``met``, unless measured on a central slab of the phantom (``slab``) and not ``provable`` there:
        a slab's slices show more organs than the volume's average one (with the calibrated skip, more
        pairs decoded) and a volume's fixed costs fall on few slices, so it overstates seconds and
        understates speed-ups and peak memory. On a slab only a pass on speed (``provable`` True) or a
        miss on memory (False) holds; the other outcome is inconclusive."""
        return met if not slab or met == provable else None

    main_on_slab = any(v["name"] == main_volume and v.get("reference_slices") not in (None, v["shape"][2]) for v in report.volumes)
    default = headline(default_network)
    multistep = next((m for m in report.multistep if not m.get("error")), None)
    if multistep is not None:
        runs = {(r["steps"], r["samples"], r["decode"]): r for r in multistep["runs"]}
        ddim = runs.get((50, 1, "all"))
        if ddim is not None:
            flop_ratio = ddim.get("flop_ratio_to_one_step")
            add(f"one step >= 10x faster than DDIM-50 ({multistep['network']}, every pair decoded in both)", ">= 10",
                ddim["ratio_to_one_step"], ddim["ratio_to_one_step"] >= 10, f"measured on {multistep['slices']} slice(s)"
                + (f"; {_fmt(flop_ratio)}x in FLOPs" if flop_ratio is not None else ""))
        ddim_skip, one_skip = runs.get((50, 1, "calibrated skip")), runs.get((1, 1, "calibrated skip"))
        if ddim_skip is not None and one_skip is not None:
            pairs = multistep["slices"] * multistep["organs"]
            ratio = ddim_skip["ratio_to_one_step_same_decode"]
            add(f"one step >= 10x faster than DDIM-50 ({multistep['network']}, the calibrated skip in both)", ">= 10", ratio,
                on_slab(ratio >= 10, main_on_slab, provable=True), f"measured on {multistep['slices']} slice(s)"
                + (" of a central slab" if main_on_slab else "") + f"; {_fmt(ddim_skip['flop_ratio_to_one_step_same_decode'])}x in FLOPs; decoded "
                f"{one_skip['decoded_pairs']} and {ddim_skip['decoded_pairs']} of {pairs} pairs, {one_skip['mask_pixels_changed']} and "
                f"{ddim_skip['mask_pixels_changed']} mask pixels changed by the skip")
    peer = next((p for p in report.peer if not p.get("error") and p["volume"] == main_volume), None)
    if default is not None and peer is not None and peer.get("seconds_per_volume"):
        ratio = peer["seconds_per_volume"] / default["seconds_per_volume"]
        # A peer's lower bound or the default's slab understates the ratio: a pass holds, a miss proves nothing.
        passed = True if ratio >= 6 else (False if peer["basis"] == "measured" and not default["extrapolated"] else None)
        add(f"default >= 6x faster than SwinUNETR on the {ct} CT", ">= 6", ratio, passed,
            f"SwinUNETR {peer['basis']}; default {basis(default)}")
    if default is not None:
        if default.get("peak_rss_gb") is not None:
            rss = default["peak_rss_gb"]
            add("peak RSS <= 3 GB (default, all organs)", "<= 3", rss, on_slab(rss <= 3.0, default["extrapolated"], provable=False),
                "measured" + (" on a central slab" if default["extrapolated"] else ""))
        if not gpu:
            seconds = default["seconds_per_volume"]
            fp32 = headline(default_network, ("fp32",)) if resolved != "fp32" else None
            fp32 = fp32 if fp32 is not None and fp32["organs"] == default["organs"] else None
            speed_up = _ratio(fp32["seconds_per_volume"], seconds) if fp32 else None
            against = f"; {resolved} {speed_up:.2f}x as fast as fp32 ({fp32['seconds_per_volume']:.1f} s)" if speed_up else ""
            add(f"{ct} CT, {default['organs']} organs, <= 60 s on CPU", "<= 60", seconds,
                on_slab(seconds <= 60, default["extrapolated"], provable=True), basis(default) + against,
                speed_up_over_fp32=speed_up)
        else:
            # End to end, read to written: the batch runner (plain or compiled) or one volume, whichever was faster.
            slab = ", on a slab" if default["extrapolated"] else ""
            rates = [(p["slices_per_s"], f"{p['volumes']} volumes through the batch runner, {p['precision']}"
                      + (", compiled" if p.get("compiled") else "") + slab)
                     for p in report.pipeline if not p.get("error") and p["organs"] == default["organs"]]
            rates.append((default["slices_per_s"], f"one volume, {default['precision']}{slab}"))
            rate, how = max(rates, key=lambda r: r[0])
            add(f"default, {default['organs']} organs, >= 500 slices/s end to end on a GPU", ">= 500", rate,
                on_slab(rate >= 500, default["extrapolated"], provable=True), how + ", read to written")
    sd = headline("sd-v1") if gpu else None
    if sd is not None:
        add(f"sd-v1, {sd['organs']} organs, >= 50 slices/s end to end on a GPU", ">= 50", sd["slices_per_s"],
            on_slab(sd["slices_per_s"] >= 50, sd["extrapolated"], provable=True),
            f"one volume, {sd['precision']}" + (", on a slab" if sd["extrapolated"] else "")
            + (", every pair decoded (random weights)" if not sd["skip_decode_radius"] else ""))
    return targets


def _notes(report: BenchReport, options: BenchOptions, device, large_slab) -> list[str]:
    notes = []
    if options.quick:
        notes.append("--quick: " + QUICK_HELP)
    if options.real_ct == "auto" and not any(v["kind"] == "real CT" for v in report.volumes) and not options.quick:
        notes.append(f"no real CT at {REAL_CT_DIR}: skipped")
    if any(r.get("weights") == "random" for r in report.one_step):
        notes.append("paper and sd-v1 (and tiny without a packaged model) have seeded random weights: speed only; "
                     "with no calibration, every (slice, organ) pair is decoded")
    if large_slab is not None and any(r["network"] in ("paper", "sd-v1") and r.get("extrapolated") for r in report.one_step):
        notes.append(f"paper and sd-v1 ran on a central slab of {large_slab} slice(s); their per-volume seconds are extrapolated")
    if any(r.get("extrapolated") and r.get("skip_decode_radius") for r in report.one_step):
        notes.append("a slab's central slices show more organs than the volume's average slice: with the calibrated skip they "
                     "decode more pairs, so seconds per volume extrapolated from them overstate a whole volume's")
    if report.multistep:
        notes.append("multi-step: SDSeg.predict on slices spread evenly over the volume's depth, every organ, every pair decoded, "
                     "then the one-sample protocols with the model's calibrated skip (the ratios measure the reverse process alone); "
                     "seconds per slice, not per volume; the FLOP ratio is what the split of work allows at equal efficiency: a chain "
                     "repeats the UNet, the encoder and decoder run once (a skipped pair's decode is not counted)")
    if report.peer:
        notes.append("SwinUNETR: random weights (speed only), read with the same reader and written with the same writer as SDSeg")
    notes.append("peak RSS: each configuration ran in a fresh Python process and read its own high-water mark right after "
                 "its measured run" if options.isolate else "peak RSS: not measured (configurations shared one process)")
    notes.append("FLOPs: torch.utils.flop_counter on one item through each part (matmuls, convolutions, attention), times the "
                 "items the hooks counted; achieved = FLOPs / end-to-end seconds, network = FLOPs / encoder+UNet+decoder seconds")
    busy = [report.machine.get(k) for k in ("cpu_busy_before", "cpu_busy_after")]
    if device.type == "cpu" and any(b is not None and b > 0.1 for b in busy):
        notes.append("other processes kept the CPU " + " / ".join(f"{b:.0%}" for b in busy if b is not None)
                     + " busy just before / after the bench: the CPU timings are slower than on an idle machine")
    if device.type == "cuda":
        notes.append("stage times synchronise the device at every hook: the network stages lose their overlap with the host")
    return notes


# -- markdown ---------------------------------------------------------------------------------------
def _fmt(value, digits: int = 2, suffix: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}{suffix}"
    if abs(value) >= 100:
        return f"{value:,.0f}{suffix}"
    return f"{value:.{digits}f}{suffix}"


def _section(title: str, columns: list[str], rows: list[dict], keys: tuple[str, ...], cells: Callable[[dict], list]) -> list[str]:
    """Markdown lines of a table under a heading (none without rows): a row's ``cells``, or for a
    failed row its ``keys`` and the error."""
    if not rows:
        return []
    lines = ["", f"## {title}", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        values = [row[key] for key in keys] + [f"failed: {row['error']}"] if row.get("error") else cells(row)
        lines.append("| " + " | ".join(str(v) for v in values) + " |" + " |" * (len(columns) - len(values)))
    return lines


def _markdown(report: BenchReport) -> str:
    m, v = report.machine, report.versions
    lines = [
        "# sdseg3d bench",
        "",
        f"Machine: {m['cpu']}, {m['cpu_cores_usable']} cores, {m['torch_threads']} torch threads, "
        f"AMX {_fmt(m.get('cpu_amx'))}, AVX-512 BF16 {_fmt(m.get('cpu_avx512_bf16'))}; device {m['device']}"
        + (f" ({m['gpu']}, {m['gpu_memory_gb']:.0f} GB)" if m.get("gpu") else "")
        + (f"; CPU busy with other work {m['cpu_busy_before']:.0%} before, {m['cpu_busy_after']:.0%} after"
           if m.get("cpu_busy_before") is not None and m.get("cpu_busy_after") is not None else "") + ".",
        f"Versions: sdseg3d {v['sdseg3d']}, torch {v['torch']}, monai {v['monai']}, diffusers {v['diffusers']}, python {v['python']}.",
        "Matmul: " + ", ".join(f"{p}{' (TF32)' if x.get('tf32') else ''} {_fmt(x['tflops'], 3)} TFLOP/s (n={x['n']})" for p, x in report.matmul.items())
        + f". Wall time {report.wall_seconds:.0f} s" + (" (--quick)" if report.options.get("quick") else "") + ".",
        "",
        "| volume | shape | spacing (mm) |",
        "|---|---|---|",
    ]
    for vol in report.volumes:
        lines.append(f"| {vol['name']} | {'x'.join(map(str, vol['shape']))} | {' x '.join(f'{s:.2f}' for s in vol['spacing_mm'])} |")
    lines += [
        "",
        "## One step (read to written labels)",
        "",
        "| network | volume | organs | precision | decodes | slices/s | s/volume | read+pre | encoder | UNet | decoder | post | write | peak RSS GB | TFLOP/s (of matmul) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report.one_step:
        if r.get("error"):
            lines.append(f"| {r['network']} | {r['volume']} | | | | failed: {r['error']} |||||||||")
            continue
        s = r["stages"]
        decodes = f"skip ({_fmt(r['decoded_share'], 2)} decoded)" if r["skip_decode_radius"] > 0 else "all"
        mem = _fmt(r["peak_rss_gb"]) + (f" (CUDA {_fmt(r['cuda_max_memory_allocated_gb'])})" if r.get("cuda_max_memory_allocated_gb") is not None else "")
        lines.append(
            f"| {r['network']} ({r['weights']}) | {r['volume']} | {r['organs']} | {r['precision']} | {decodes} | {_fmt(r['slices_per_s'])} | "
            f"{_fmt(r['seconds_per_volume'], 1)}{'*' if r['extrapolated'] else ''} | {_fmt(s['read'] + s['preprocess'])} | {_fmt(s['encoder'])} | "
            f"{_fmt(s['unet'])} | {_fmt(s['decoder'])} | {_fmt(s['postprocess'])} | {_fmt(s['write'])} | {mem} | "
            f"{_fmt(r['achieved_tflops'], 3)} ({_fmt(r['matmul_fraction'], 2)}) |"
        )
    lines.append("")
    lines.append("Stage columns are seconds over the slices measured; * per-volume seconds extrapolated from a slab.")
    lines += _section(
        "Skipped decodes",
        ["network", "volume", "organs", "decoded", "s (skip)", "s (all)", "speed-up", "voxels differing"],
        report.skip_decode, ("network", "volume", "organs"),
        lambda r: [r["network"], r["volume"], r["organs"], _fmt(r["decoded_share"]), _fmt(r["seconds_skip"], 1),
                   _fmt(r["seconds_decode_all"], 1), f"{_fmt(r['speed_up'])}x", f"{r['voxels_differing']:,} of {r['voxels']:,}"],
    )
    lines += _section(
        "C allocator (freed memory kept for reuse, as shipped, against the C library's own malloc)",
        ["network", "volume", "organs", "precision", "s (kept)", "s (system)", "speed-up", "decoder s (kept / system)",
         "peak RSS GB (kept / system)", "voxels differing"],
        report.allocator, ("network", "volume", "organs", "precision"),
        lambda r: [r["network"], r["volume"], r["organs"], r["precision"], _fmt(r["seconds_kept"], 1), _fmt(r["seconds_system"], 1),
                   f"{_fmt(r['speed_up'])}x", f"{_fmt(r['decoder_seconds_kept'])} / {_fmt(r['decoder_seconds_system'])}",
                   f"{_fmt(r['peak_rss_gb_kept'])} / {_fmt(r['peak_rss_gb_system'])}", f"{r['voxels_differing']:,} of {r['voxels']:,}"],
    )
    lines += _section(
        "Pipeline (volumes one after another; reading, inference and writing overlap)",
        ["network", "volume", "volumes", "organs", "precision", "compiled", "start s", "readers", "slices/s", "one volume alone, slices/s",
         "speed-up", "peak RSS GB"],
        report.pipeline, ("network", "volume"),
        lambda r: [r["network"], r["volume"], r["volumes"], r["organs"], r["precision"], _fmt(r.get("compiled", False)),
                   _fmt(r.get("setup_seconds"), 1), r["readers"], _fmt(r["slices_per_s"]), _fmt(r["one_volume_slices_per_s"]),
                   f"{_fmt(r['speed_up'])}x", _fmt(r.get("peak_rss_gb"))],
    )
    if report.multistep:
        lines += ["", "## Multi-step, multi-sample (the same network)", "",
                  "Ratios are to one step decoding as the row does (every pair, or the calibrated skip).", "",
                  "| network | slices x organs | protocol | decodes | s/slice | x one step | x one step (FLOPs) |", "|---|---|---|---|---|---|---|"]
        for row in report.multistep:
            if row.get("error"):
                lines.append(f"| {row['network']} | failed: {row['error']} ||||||")
                continue
            for run in row["runs"]:
                protocol = "one step" if run["steps"] == 1 else f"DDIM {run['steps']}"
                protocol += f", {run['samples']} sample{'s' if run['samples'] > 1 else ''}"
                decodes = run["decode"]
                if "decoded_pairs" in run:
                    decodes += (f" ({run['decoded_pairs']} of {row['slices'] * row['organs']} pairs, "
                                f"{run['mask_pixels_changed']} mask px changed)")
                lines.append(f"| {row['network']} | {row['slices']} x {row['organs']} | {protocol} | {decodes} | {_fmt(run['seconds_per_slice'])} | "
                             f"{_fmt(run['ratio_to_one_step_same_decode'])} | {_fmt(run['flop_ratio_to_one_step_same_decode'])} |")
    if report.peer:
        lines += ["", "## Conventional 3D peer: SwinUNETR (bundle settings, random weights)", "",
                  "| volume | mode | windows | s/window | s/volume | basis | peak RSS GB | TFLOP/s (of matmul) |", "|---|---|---|---|---|---|---|---|"]
        for r in report.peer:
            if r.get("error"):
                lines.append(f"| {r['volume']} | failed: {r['error']} |||||||")
                continue
            windows = r.get("reference_windows", r["windows"])
            lines.append(f"| {r['volume']} | {r['mode']} | {windows} | {_fmt(r['seconds_per_window'])} | {_fmt(r['seconds_per_volume'], 1)} | "
                         f"{r['basis']} | {_fmt(r.get('peak_rss_gb'))} | {_fmt(r['achieved_tflops'], 3)} ({_fmt(r['matmul_fraction'], 2)}) |")
    if report.targets:
        lines += ["", "## Targets", "", "| target | value | result | basis |", "|---|---|---|---|"]
        for t in report.targets:
            result = {True: "pass", False: "FAIL", None: "inconclusive"}[t["passed"]]
            lines.append(f"| {t['target']} | {_fmt(t['value'])} | {result} | {t['basis']} |")
    if report.incomplete:
        lines += ["", f"**Incomplete report** ({report.incomplete}): the run was cut short; the tables hold what it measured."]
    if report.notes:
        lines += ["", "Notes:", ""] + [f"- {note}" for note in report.notes]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":  # one measured configuration, in the fresh process _run_isolated starts
    _case, _result = json.loads(sys.argv[1]), Path(sys.argv[2])
    _result.write_text(json.dumps(run_case(_case)))
