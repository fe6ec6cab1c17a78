"""``sdseg3d``: a thin command line over the Python API.

Exit codes: 0 ok; 2 bad input or usage (one line naming the file and the problem); 1 internal error; 130 interrupted
(Ctrl-C or SIGTERM, temporaries removed).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Optional

import typer

from sdseg_monai import __version__
from sdseg_monai.bench import QUICK_HELP
from sdseg_monai.errors import SDSegInputError, check_number

app = typer.Typer(
    name="sdseg3d",
    help="SDSeg 3D CT segmentation (Stable Diffusion Segmentation, single-step reverse process) on MONAI.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


# Options shared by segment, evaluate and stability.
NO_POSTPROCESS_OPTION = typer.Option(False, "--no-postprocess", help="Round every organ at 0.5, ignoring the model's calibrated postprocessing.")
DECODE_ALL_OPTION = typer.Option(False, "--decode-all", help="Decode every (slice, organ) pair, also those the calibration marks empty (slower).")
SHIFTS_OPTION = typer.Option(1, "--shifts", help="Test-time shifts averaged: 1, 2 or 4 (small organs gain; each shift is a whole pass).")
MAX_SEED = 2**63 - 1  # torch's generators take any seed below 2**64; phantoms' numpy ones below 2**128
COMPILE_OPTION = typer.Option(False, "--compile", help="Compile the network with torch.compile once at start (tens of seconds; for GPUs, slower on a CPU).")


def _option_check(check):
    """An option's callback running ``check`` (an API check): its refusal is a usage error (one line,
    exit 2) at parse time; None (not given) passes."""

    def callback(value):
        if value is not None:
            try:
                check(value)
            except SDSegInputError as e:
                raise typer.BadParameter(str(e)) from None
        return value

    return callback


def _finite(low: float | None = None, high: float | None = None, *, positive: bool = False):
    """A float option's callback: NaN, an infinity or a value out of range is a usage error. A callback
    rather than ``min``/``max``: a range lets NaN through in some typer releases."""
    return _option_check(lambda value: check_number(value, "", low, high, positive=positive))


def _check_bundle_version(value: str) -> str:
    from sdseg_monai.bundle import check_bundle_version  # on use: the bundle module loads MONAI's

    return check_bundle_version(value)


def _print_version(value: bool):
    if value:
        typer.echo(f"sdseg3d {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", "-V", callback=_print_version, is_eager=True, help="Print the version and exit."
    ),
):
    """SDSeg 3D CT segmentation on MONAI. Nothing is ever downloaded: all weights are local."""


@app.command()
def organs(
    dataset: str = typer.Option("btcv", "--dataset", "-d", help="Dataset preset: btcv or sts."),
    subset: Optional[str] = typer.Option(None, "--subset", "-s", help="Only a named subset, e.g. transunet8."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON {label: name}."),
):
    """List a dataset preset's label table (needs no weights)."""
    from sdseg_monai.labels import dataset_preset

    preset = dataset_preset(dataset)
    chosen = list(preset.organs)
    if subset is not None:
        if subset not in preset.subsets:
            known = ", ".join(preset.subsets) or "none"
            raise SDSegInputError(f"unknown subset {subset!r} of preset {preset.name!r}; known: {known}")
        chosen = [preset.organ(n) for n in preset.subsets[subset]]
    if as_json:
        typer.echo(json.dumps({str(o.label): o.name for o in chosen}, indent=2))
        return
    typer.echo(f"{preset.description}; HU window [{preset.hu_window[0]:g}, {preset.hu_window[1]:g}]")
    for name, members in preset.subsets.items():
        typer.echo(f"subset {name}: {len(members)} organs")
    typer.echo(f"{'label':>5}  name")
    for organ in chosen:
        typer.echo(f"{organ.label:>5}  {organ.name}")


@app.command()
def presets():
    """List the model presets and dataset presets (needs no weights)."""
    from sdseg_monai.config import MODEL_PRESETS
    from sdseg_monai.labels import DATASET_PRESETS

    notes = {
        "tiny": "a few M parameters, 128x128 slices, trains from scratch on CPU",
        "paper": "official SDSeg UNet (LDM churches layout, 295 M) on a local kl-f8 / SD autoencoder",
        "sd-v1": "every part from a local Stable Diffusion v1.x folder or checkpoint",
    }
    typer.echo("model presets:")
    for name in MODEL_PRESETS:
        typer.echo(f"  {name:<7} {notes[name]}")
    typer.echo("dataset presets:")
    for name, preset in DATASET_PRESETS.items():
        typer.echo(f"  {name:<7} {preset.description}")


@app.command()
def demo(
    output: Path = typer.Option(Path("sdseg3d_demo"), "--output", "-o", help="Folder for the phantom, prediction and PNG overlays."),
    model: Optional[Path] = typer.Option(None, "--model", "-m", help="Model folder (default: the packaged model)."),
    seed: int = typer.Option(777001, "--seed", min=0, max=MAX_SEED, help="Phantom seed."),
    device: str = typer.Option("auto", "--device", "-d", help="auto, cpu, cuda or cuda:N."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", "-b", min=1, help="(slice, organ) pairs per forward."),
):
    """Segment a freshly generated CT phantom, print per-organ Dice, write PNG overlays (no download)."""
    from sdseg_monai.demo import run_demo
    from sdseg_monai.metrics import format_scores

    if model is not None:
        model = _resolve_model(model)
    result = run_demo(output, model=model, seed=seed, device=device, batch_size=batch_size)
    typer.echo(f"phantom {seed}: {result.slices} slices, model: {result.model}, {result.seconds:.1f} s")
    typer.echo(format_scores(result.scores))
    if not result.trained:
        typer.echo("note: this build ships no trained default model yet; an untrained network stood in, "
                   "so the Dice values above are meaningless. Pass --model to use a trained one.")
    typer.echo(f"wrote {len(result.files)} files to {output}")


def _split_names(value: Optional[str]) -> Optional[list[str]]:
    if value is None:
        return None
    names = [n.strip() for n in value.split(",") if n.strip()]
    if not names:
        raise SDSegInputError("--organs needs at least one organ name")
    return names


PRECISION_HELP = "auto (bf16 on a CPU with AMX / AVX-512 BF16; fp32 on other CPUs, on a GPU and for noise-predicting models), fp32, bf16 or fp16."


def _announce_compiling(compile_: bool, quiet: bool) -> None:
    """torch.compile runs silently for tens of seconds before the first slice: say so first."""
    if compile_ and not quiet:
        typer.echo("compiling the network with torch.compile (once, before the first volume; tens of seconds)", err=True)


def _resolve_model(model: Optional[Path]) -> Path:
    from sdseg_monai.model import default_model_path, model_files

    if model is None:
        model = default_model_path()
        if model is None:
            raise SDSegInputError(
                "no packaged default model in this version yet; pass --model PATH (a saved SDSeg model folder)"
            )
    model_files(model)  # a saved model folder or a bundle, else a one-line refusal
    return model


class _SliceBar:
    """A progress bar over slices on stderr (tqdm when installed), or nothing."""

    def __init__(self, total: int, enabled: bool):
        self.bar = None
        if enabled:
            from monai.utils import optional_import

            tqdm, has_tqdm = optional_import("tqdm", name="tqdm")
            if has_tqdm:
                self.bar = tqdm(total=total, unit="slice", desc="segmenting", file=sys.stderr, leave=False)

    def __call__(self, done: int):
        if self.bar is not None:
            self.bar.update(done)

    def close(self):
        if self.bar is not None:
            self.bar.close()


@app.command()
def segment(
    input_path: Path = typer.Argument(..., metavar="INPUT", help="NIfTI file (.nii/.nii.gz) or a DICOM series folder."),
    output: Path = typer.Option(..., "--output", "-o", help="Output label map (.nii.gz); the label names go to a .json beside it (mask.nii.gz: mask.json)."),
    model: Optional[Path] = typer.Option(None, "--model", "-m", help="Saved SDSeg model folder."),
    device: str = typer.Option("auto", "--device", "-d", help="auto, cpu, cuda or cuda:N."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", "-b", min=1, help="(slice, organ) pairs per forward."),
    organs_: Optional[str] = typer.Option(None, "--organs", help="Comma-separated organ names (default: all)."),
    label: Optional[Path] = typer.Option(None, "--label", "-l", help="Reference label map: print per-organ Dice."),
    seed: int = typer.Option(0, "--seed", "-s", min=0, max=MAX_SEED, help="Seed of the diffusion noise."),
    no_postprocess: bool = NO_POSTPROCESS_OPTION,
    decode_all: bool = DECODE_ALL_OPTION,
    shifts: int = SHIFTS_OPTION,
    precision: str = typer.Option("auto", "--precision", help=PRECISION_HELP),
    compile_: bool = COMPILE_OPTION,
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar, no summary."),
):
    """Segment a CT volume into a label map on the input's exact grid."""
    from sdseg_monai.data import check_writable, read_volume
    from sdseg_monai.evaluation import read_case

    model_dir = _resolve_model(model)
    check_writable(output, input_path, label, model_dir)  # never into the model folder: mask.json over its config.json
    volume, reference = read_case(input_path, label) if label is not None else (read_volume(input_path), None)
    from sdseg_monai.inference import VolumeSegmenter  # after the input's checks: MONAI's import takes seconds
    from sdseg_monai.transforms import axial_depth

    _announce_compiling(compile_, quiet)
    segmenter = VolumeSegmenter(
        model_dir,
        device=device,
        organs=_split_names(organs_),
        batch_size=batch_size,
        seed=seed,
        postprocess=not no_postprocess,
        skip_decode=not decode_all,
        num_shifts=shifts,
        precision=precision,
        compile=compile_,
    )
    bar = _SliceBar(axial_depth(volume.shape, volume.affine, segmenter.config.preprocessing.orientation), enabled=not quiet)
    try:
        result = segmenter.segment(volume, progress=bar)
    finally:
        bar.close()
    image_path, sidecar = result.save(output)
    if not quiet:
        typer.echo(f"wrote {image_path} and {sidecar} ({len(result.organs)} organs, {result.seconds:.1f} s)")
    if reference is not None:
        from sdseg_monai.metrics import format_scores, organ_scores

        scores = organ_scores(result.labels, reference.image[0].numpy(), result.organs)
        typer.echo(format_scores(scores))


@app.command()
def batch(
    input_dir: Optional[Path] = typer.Argument(None, metavar="INPUT_DIR", help="A tree of DICOM files and/or NIfTI files."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Output folder: <study>/<series>/label.nii.gz, seg.dcm, summary.csv."),
    model: Optional[Path] = typer.Option(None, "--model", "-m", help="Saved SDSeg model folder or bundle."),
    device: str = typer.Option("auto", "--device", "-d", help="auto, cpu, cuda or cuda:N (under torchrun: this rank's GPU)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", "-b", min=1, help="(slice, organ) pairs per forward."),
    organs_: Optional[str] = typer.Option(None, "--organs", help="Comma-separated organ names (default: all)."),
    seed: int = typer.Option(0, "--seed", "-s", min=0, max=MAX_SEED, help="Seed of the diffusion noise."),
    precision: str = typer.Option("auto", "--precision", help=PRECISION_HELP),
    compile_: bool = COMPILE_OPTION,
    dicom_seg: Optional[bool] = typer.Option(None, "--dicom-seg/--no-dicom-seg", help="Write seg.dcm for DICOM series (default: when the dicom extra is installed)."),
    seg_type: str = typer.Option("binary", "--seg-type", help="DICOM SEG type: binary (what viewers show) or labelmap."),
    save_image: bool = typer.Option(False, "--save-image", help="Also write the image read, as image.nii.gz."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Recompute series already done with this model and these options."),
    include_derived: bool = typer.Option(False, "--include-derived", help="Segment derived and secondary series (MPR, MIP) too."),
    shard: Optional[str] = typer.Option(None, "--shard", help="I/N: this run's share of the series (array jobs)."),
    merge: Optional[Path] = typer.Option(None, "--merge", help="Only merge the summary parts of a sharded run in this folder."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar, no closing line."),
):
    """Segment every CT series (and NIfTI file) in a tree: labels, DICOM SEG and a summary, resumable."""
    from collections import Counter

    from sdseg_monai.batch import BatchRunner, check_tree_paths, merge_summaries, parse_shard

    if merge is not None:
        written = merge_summaries(merge)
        if not quiet:
            typer.echo(f"wrote {written}")
        return
    if input_dir is None or output is None:
        raise SDSegInputError("batch needs INPUT_DIR and --output (or --merge OUTPUT_DIR)")
    if shard is not None:
        part = parse_shard(shard)
    else:  # under torchrun, one shard per process
        world = int(os.environ.get("WORLD_SIZE", "1") or 1)
        part = (int(os.environ.get("RANK", "0") or 0), world)
        if world > 1 and device == "auto":
            import torch

            device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if torch.cuda.is_available() else "cpu"
    model_dir = _resolve_model(model)
    check_tree_paths(input_dir, output)  # before the model loads (and compiles): a typo is told at once
    _announce_compiling(compile_, quiet)
    runner = BatchRunner(model_dir, output, device=device, batch_size=batch_size, organs=_split_names(organs_),
                         seed=seed, precision=precision, dicom_seg=dicom_seg, seg_type=seg_type, save_image=save_image, overwrite=overwrite,
                         include_derived=include_derived, shard=part, compile=compile_)
    bar, started = None, False

    def progress(done: int, total: int, row: dict) -> None:
        nonlocal bar, started
        if not started and not quiet:  # the bar starts with the run's cases: a tree with nothing to segment shows none
            from monai.utils import optional_import

            tqdm, has_tqdm = optional_import("tqdm", name="tqdm")
            bar = tqdm(unit="series", desc="batch", file=sys.stderr, leave=False) if has_tqdm else None
        started = True
        if bar is not None:
            bar.total = total
            bar.n = done
            bar.refresh()

    try:
        report = runner.run(input_dir, progress=progress)
    finally:
        if bar is not None:
            bar.close()
    if report.exit_code == 2:  # nothing written: the one line says why
        skipped = ", ".join(f"{n} {reason}" for reason, n in sorted(Counter(r["reason"] for r in report.rows).items()))
        raise SDSegInputError(f"nothing to segment (no CT series passed QC, no NIfTI file{'; skipped: ' + skipped if skipped else ''})",
                              input_dir)
    if not quiet:
        statuses = [r["status"] for r in report.rows]
        typer.echo(f"{statuses.count('ok')} ok, {statuses.count('skipped')} skipped, {statuses.count('failed')} failed"
                   + (f"; summary {report.summary}" if report.summary else "; summary parts await the other shards"))
    if report.exit_code:
        raise typer.Exit(report.exit_code)


@app.command()
def evaluate(
    model: Optional[Path] = typer.Option(None, "--model", "-m", help="Saved SDSeg model folder."),
    manifest: Path = typer.Option(..., "--manifest", help="Dataset manifest, e.g. data_manifests/btcv.json."),
    data_root: Path = typer.Option(..., "--data-root", help="Folder the manifest's relative paths start from."),
    split: str = typer.Option("test", "--split", help="Manifest split to evaluate: train, validation or test."),
    output: Path = typer.Option(..., "--output", "-o", help="Report folder: per_case.csv and report.json go there."),
    hd95: bool = typer.Option(False, "--hd95", help="Also compute HD95 (mm), over the cases where both prediction and reference hold the organ."),
    device: str = typer.Option("auto", "--device", "-d", help="auto, cpu, cuda or cuda:N."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", "-b", min=1, help="(slice, organ) pairs per forward."),
    seed: int = typer.Option(0, "--seed", "-s", min=0, max=MAX_SEED, help="Seed of the diffusion noise."),
    no_postprocess: bool = NO_POSTPROCESS_OPTION,
    decode_all: bool = DECODE_ALL_OPTION,
    shifts: int = SHIFTS_OPTION,
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No per-case progress; only the table."),
):
    """Score a model on a manifest split: per-organ Dice (and HD95), per-case CSV and JSON report."""
    from sdseg_monai.data import check_data_root, load_manifest
    from sdseg_monai.evaluation import evaluate as run_evaluation
    from sdseg_monai.evaluation import evaluation_sources, prepare_output_dir

    model_dir = _resolve_model(model)
    # Every input is checked before the model is loaded, so mistakes fail in a second.
    dataset = load_manifest(manifest)
    files = check_data_root(dataset, data_root, split)
    prepare_output_dir(output, evaluation_sources(manifest, files, model_dir), roots=[data_root])
    from sdseg_monai.inference import VolumeSegmenter

    segmenter = VolumeSegmenter(
        model_dir, device=device, batch_size=batch_size, seed=seed, postprocess=not no_postprocess, skip_decode=not decode_all,
        num_shifts=shifts,
    )

    def progress(done: int, total: int, case) -> None:
        dice = [s.dice for s in case.scores if s.dice is not None]
        mean = f"{sum(dice) / len(dice):.4f}" if dice else "-"
        typer.echo(f"[{done}/{total}] {case.case_id}: mean Dice {mean} ({case.seconds:.1f} s)", err=True)

    report = run_evaluation(
        segmenter, dataset, data_root, split=split, output_dir=output, hd95=hd95, progress=None if quiet else progress
    )
    typer.echo(report.format_table())
    if not quiet:
        typer.echo(f"wrote {report.csv_path} and {report.json_path} ({report.seconds:.1f} s)")


@app.command()
def calibrate(
    model: Optional[Path] = typer.Option(None, "--model", "-m", help="Saved SDSeg model folder (default: the built-in model)."),
    manifest: Path = typer.Option(..., "--manifest", help="Dataset manifest, e.g. data_manifests/btcv.json."),
    data_root: Path = typer.Option(..., "--data-root", help="Folder the manifest's relative paths start from."),
    output: Path = typer.Option(..., "--output", "-o", help="New model folder: the model with its calibrated postprocessing."),
    split: str = typer.Option("validation", "--split", help="Manifest split to calibrate on (never test)."),
    device: str = typer.Option("auto", "--device", "-d", help="auto, cpu, cuda or cuda:N."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", "-b", min=1, help="(slice, organ) pairs per forward."),
    seed: int = typer.Option(0, "--seed", "-s", min=0, max=MAX_SEED, help="Seed of the diffusion noise."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No per-case progress; only the table."),
):
    """Choose per-organ thresholds, axial smoothing, largest-component organs and which decodes to skip on a validation split; write a calibrated copy of the model."""
    from sdseg_monai.calibration import calibrate as run_calibration
    from sdseg_monai.calibration import check_calibration_output, check_calibration_split, save_calibrated_model
    from sdseg_monai.data import check_data_root, load_manifest

    model_dir = _resolve_model(model)
    check_calibration_split(split)
    check_calibration_output(model_dir, output, manifest, data_root)
    dataset = load_manifest(manifest)
    check_data_root(dataset, data_root, split)
    from sdseg_monai.inference import VolumeSegmenter

    segmenter = VolumeSegmenter(model_dir, device=device, batch_size=batch_size, seed=seed)

    def progress(done: int, total: int, case_id: str) -> None:
        typer.echo(f"[{done}/{total}] {case_id}", err=True)

    result = run_calibration(segmenter, dataset, data_root, split=split, progress=None if quiet else progress)
    saved = save_calibrated_model(model_dir, result, output)
    typer.echo(result.format_table())
    if not quiet:
        typer.echo(f"wrote {saved} ({result.seconds:.1f} s)")


@app.command("export-bundle")
def export_bundle(
    model: Optional[Path] = typer.Argument(None, metavar="MODEL", help="Saved SDSeg model folder (default: the built-in model)."),
    output: Path = typer.Option(..., "--output", "-o", help="Bundle folder to write (replaced whole if it exists)."),
    version: str = typer.Option("0.1.0", "--version", callback=_option_check(_check_bundle_version), help="Bundle version recorded in configs/metadata.json: MAJOR.MINOR.PATCH."),
):
    """Write a saved model as a MONAI bundle (configs, models/model.pt, docs) that runs offline."""
    from sdseg_monai.bundle import export_bundle as write_bundle

    written = write_bundle(_resolve_model(model), output, version=version)
    typer.echo(f"wrote MONAI bundle {written}")


def _volume_pairs(values: list[str], option: str) -> list[tuple[Path, Path]]:
    pairs = []
    for value in values:
        image, sep, label = value.partition(":")
        if not sep or not image or not label:
            raise SDSegInputError(f"{option} takes IMAGE:LABEL, got {value!r}")
        pairs.append((Path(image), Path(label)))
    return pairs


# ``train``'s flags and the TrainSettings fields they set; on --resume, a flag not given takes the
# checkpoint's value (--max-minutes is a limit of this session, so it is not carried over).
RESUMED_SETTINGS = {
    "steps": "steps", "batch_size": "batch_size", "grad_accum": "grad_accum", "base_lr": "base_lr", "warmup": "warmup_steps",
    "ema_decay": "ema_decay", "checkpoint_every": "checkpoint_every", "validate_every": "validate_every", "augment": "augmentation",
    "flips": "flips", "organ_sampling": "organ_sampling", "organs_per_slice": "organs_per_slice", "workers": "num_workers", "seed": "seed",
}


@app.command()
def train(
    ctx: typer.Context,
    output: Path = typer.Option(..., "--output", "-o", help="Run folder: checkpoint.pt, log.jsonl, model/ (best), last_model/."),
    preset: str = typer.Option("tiny", "--preset", "-p", help="tiny, paper or sd-v1."),
    dataset: str = typer.Option("btcv", "--dataset", help="Dataset preset of the organ table and HU window."),
    organs_: Optional[str] = typer.Option(None, "--organs", help="Comma-separated organs (default: all of the dataset)."),
    manifest: Optional[Path] = typer.Option(
        None, "--manifest", help="Manifest: its train split trains, its validation split (if any) selects; organs matched by name, its HU window must be the model's."
    ),
    data_root: Optional[Path] = typer.Option(None, "--data-root", help="Root of the manifest's files."),
    volume: list[str] = typer.Option([], "--volume", help="Extra training volume IMAGE:LABEL (repeatable)."),
    val_volume: list[str] = typer.Option([], "--val-volume", help="Extra validation volume IMAGE:LABEL (repeatable)."),
    autoencoder: Optional[Path] = typer.Option(None, "--autoencoder", help="Autoencoder (tiny: from train-autoencoder; paper: kl-f8 / SD VAE)."),
    stable_diffusion: Optional[Path] = typer.Option(None, "--stable-diffusion", help="sd-v1: local SD v1.x folder or checkpoint."),
    unet: Optional[Path] = typer.Option(None, "--unet", help="paper: pretrained UNet (diffusers folder or LDM checkpoint)."),
    init_from: Optional[Path] = typer.Option(
        None, "--init-from", help="Start from a saved SDSeg model folder (e.g. the packaged default) instead of a preset: fine-tuning."
    ),
    steps: int = typer.Option(10000, "--steps", min=1),
    batch_size: int = typer.Option(8, "--batch-size", "-b", min=1, help="Samples per process per micro-batch."),
    grad_accum: int = typer.Option(1, "--grad-accum", min=1, help="Micro-batches per optimiser step."),
    base_lr: Optional[float] = typer.Option(None, "--base-lr", callback=_finite(0.0), help="Per-sample learning rate, >= 0 (x batch x accum x GPUs). Default: 1e-5 (paper), 2.5e-5 for tiny."),
    warmup: int = typer.Option(500, "--warmup", min=0),
    ema_decay: float = typer.Option(0.999, "--ema-decay", callback=_finite(0.0, 1.0), help="Decay of the weights' moving average, 0 to 1."),
    checkpoint_every: int = typer.Option(500, "--checkpoint-every", min=1),
    validate_every: int = typer.Option(1000, "--validate-every", min=0),
    augment: str = typer.Option(
        "strong", "--augment", help="none, paper (random flips) or strong (MONAI affine/elastic/intensity; no flips unless --flips)."
    ),
    flips: bool = typer.Option(
        False, "--flips", help="Random flips with any --augment. A model with left/right organs (BTCV: kidneys, adrenals) is flipped front to back only, never left to right."
    ),
    organ_sampling: str = typer.Option(
        "slice", "--organ-sampling", help="slice (a slice, then an organ in it) or organ (an organ, then a slice showing it: small organs as often as large)."
    ),
    organs_per_slice: int = typer.Option(
        1, "--organs-per-slice", min=1, help="Samples per drawn slice, each a different organ, sharing one image encoding (faster steps)."
    ),
    mask_loss_weight: Optional[float] = typer.Option(
        None, "--mask-loss-weight", callback=_finite(0.0), help="Weight (>= 0) of an extra BCE + Dice loss on the decoded mask (default: the model's; 0 is the paper)."
    ),
    condition_channels: Optional[int] = typer.Option(
        None, "--condition-channels", min=1, help="Widen the image latent to this many channels, starting from what the model computes (default: as is; the paper: 4)."
    ),
    slice_size: Optional[int] = typer.Option(
        None, "--slice-size", min=8, help="Train (and then segment) at this slice size, e.g. 256 for 32x32 latents (default: the model's)."
    ),
    workers: int = typer.Option(0, "--workers", min=0, help="Data-loader worker processes."),
    seed: int = typer.Option(0, "--seed", "-s", min=0, max=MAX_SEED),
    device: str = typer.Option("auto", "--device", "-d", help="auto, cpu, cuda or cuda:N (torchrun: the local GPU)."),
    max_minutes: Optional[float] = typer.Option(None, "--max-minutes", callback=_finite(0.0), help="Stop (validate, checkpoint, save) after this much wall time; --resume continues."),
    resume: bool = typer.Option(False, "--resume", help="Continue exactly where the run in OUTPUT stopped."),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
):
    """Train SDSeg (vision encoder + UNet; the autoencoder stays frozen). Works under torchrun."""
    from dataclasses import replace

    import torch

    from sdseg_monai.config import SDSegConfig
    from sdseg_monai.data import LabelledCase, check_data_root, load_manifest, manifest_organ_values
    from sdseg_monai.model import SDSeg
    from sdseg_monai.training import CHECKPOINT_NAME, TrainSettings, check_run_folder, train_sdseg
    from sdseg_monai.weights import sdseg_from_pretrained_parts, with_training_changes

    spec, manifest_files = None, {}
    if manifest is not None:
        if data_root is None:
            raise SDSegInputError("--manifest needs --data-root")
        spec = load_manifest(manifest)
        # Every missing file is reported before a model is built; the validation split is optional.
        for split in ["train"] + (["validation"] if "validation" in spec.splits else []):
            manifest_files[split] = check_data_root(spec, data_root, split)
    train_cases = _volume_pairs(volume, "--volume")
    validation_cases = _volume_pairs(val_volume, "--val-volume")
    for image, label in train_cases + validation_cases:
        for path in (image, label):
            if not Path(path).exists():
                raise SDSegInputError("no such file or folder", path)
    if not train_cases and not manifest_files.get("train"):
        raise SDSegInputError("no training data: give --manifest/--data-root and/or --volume IMAGE:LABEL")
    # The run folder gets model/ and last_model/: never over an input (--init-from RUN/model), a data root or a volume.
    read = [manifest] + ([] if resume else [init_from, autoencoder, stable_diffusion, unet])
    manifest_pairs = [(i, l) for files in manifest_files.values() for _, i, l in files]
    check_run_folder(output, manifest_pairs + train_cases + validation_cases, read, roots=[data_root])
    checkpoint = output / CHECKPOINT_NAME
    if resume:
        if any(v is not None for v in (mask_loss_weight, condition_channels, slice_size)):
            raise SDSegInputError("--resume continues the checkpoint's model as it was: drop --mask-loss-weight, --condition-channels and --slice-size")
        if not checkpoint.is_file():
            raise SDSegInputError("nothing to resume: no checkpoint.pt in this run folder", output)
        try:
            state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001  (truncated, not a checkpoint: torch raises many types)
            raise SDSegInputError(f"not a readable checkpoint ({type(e).__name__})", checkpoint) from None
        model = SDSeg(SDSegConfig.from_dict(state["config"]))
    else:
        if checkpoint.exists():
            raise SDSegInputError("run folder already holds a checkpoint: pass --resume, or choose another --output", output)
    if init_from is not None and not resume:
        if any(v is not None for v in (autoencoder, stable_diffusion, unet, organs_)):
            raise SDSegInputError("--init-from takes the whole model (organs included): drop --autoencoder, --stable-diffusion, --unet and --organs")
        model = SDSeg.from_pretrained(init_from)
    elif not resume:
        model = sdseg_from_pretrained_parts(
            preset,
            stable_diffusion=stable_diffusion,
            autoencoder=autoencoder,
            unet=unet,
            dataset=dataset,
            organs=_split_names(organs_),
        )
    if not resume:
        model = with_training_changes(model, mask_loss_weight, condition_channels, slice_size)
    if spec is not None:  # the manifest's own label values and window, matched to the model's organs by name
        values = manifest_organ_values(spec, model.config)
        unlabelled = [organ["name"] for organ in model.config.organs if int(organ["label"]) not in values]
        if unlabelled:  # matched by name: a differently named organ would otherwise drop out silently
            typer.echo(f"note: manifest {spec.name!r} labels no {', '.join(unlabelled)} (by name): its cases train and "
                       "validate the other organs only", err=True)
        # Manifest cases first, then --volume ones: the order the data stream (and a resume) depends on.
        train_cases = [LabelledCase(i, l, values) for _, i, l in manifest_files["train"]] + train_cases
        validation_cases = [LabelledCase(i, l, values) for _, i, l in manifest_files.get("validation", [])] + validation_cases
    settings = TrainSettings(
        steps=steps,
        batch_size=batch_size,
        grad_accum=grad_accum,
        base_lr=base_lr if base_lr is not None else (2.5e-5 if preset == "tiny" else None),
        warmup_steps=warmup,
        ema_decay=ema_decay,
        checkpoint_every=checkpoint_every,
        validate_every=validate_every,
        augmentation=augment,
        flips=flips,
        organ_sampling=organ_sampling,
        organs_per_slice=organs_per_slice,
        num_workers=workers,
        seed=seed,
        max_seconds=None if max_minutes is None else 60 * max_minutes,
    )
    if resume:  # the run's own settings, but for the flags given now (a trajectory flag that differs is refused)
        saved = state.get("settings") or {}
        kept = {field: saved[field] for flag, field in RESUMED_SETTINGS.items()
                if field in saved and ctx.get_parameter_source(flag).name == "DEFAULT"}
        settings = replace(settings, **kept)
    summary = train_sdseg(model, train_cases, output, settings, validation_cases, resume=resume, device=device, progress=not quiet)
    if not quiet:
        best = summary["best"]
        dice = "-" if best.get("step") is None else f"{best['mean_dice']:.4f} at step {best['step']}"
        typer.echo(f"{summary['steps']} steps, lr {summary['lr']:.2e}; best validation Dice {dice}; model: {summary['model']}")


@app.command()
def phantom(
    output: Path = typer.Option(..., "--output", "-o", help="Folder for phantom_<seed>_image.nii.gz and _label.nii.gz (created if missing)."),
    n: int = typer.Option(1, "--n", "-n", help="Number of phantoms: seeds SEED .. SEED+N-1."),
    seed: int = typer.Option(0, "--seed", "-s", min=0, max=MAX_SEED, help="Seed of the first phantom."),
    shape: tuple[int, int, int] = typer.Option((128, 128, 64), "--shape", help="Grid size X Y Z in voxels."),
    spacing: tuple[float, float, float] = typer.Option((3.0, 3.0, 3.0), "--spacing", help="Voxel size SX SY SZ in mm."),
    split: str = typer.Option("test", "--split", help="Split of OUTPUT/manifest.json these phantoms join (train, validation, test)."),
):
    """Write synthetic abdominal CT phantoms with BTCV 13-organ labels (NIfTI, RAS; no download).

    OUTPUT/manifest.json lists them by split, for `sdseg3d train` and `sdseg3d evaluate`."""
    import math

    from sdseg_monai.data import make_writable_folder

    if n < 1:
        raise SDSegInputError(f"--n must be at least 1, got {n}")
    if seed < 0:
        raise SDSegInputError(f"--seed must be >= 0, got {seed}")
    if any(v < 1 for v in shape):
        raise SDSegInputError(f"--shape needs three positive integers, got {' '.join(map(str, shape))}")
    if not all(math.isfinite(v) and v > 0 for v in spacing):
        raise SDSegInputError(f"--spacing needs three positive sizes in mm, got {' '.join(f'{v:g}' for v in spacing)}")
    if output.exists() and not output.is_dir():
        raise SDSegInputError("output must be a folder, and this is a file", output)
    make_writable_folder(output, "phantoms")
    from sdseg_monai.phantoms import update_phantom_manifest, write_phantoms

    for image_path, label_path in write_phantoms(output, n=n, seed=seed, shape=shape, spacing=spacing):
        typer.echo(str(image_path))
        typer.echo(str(label_path))
    typer.echo(str(update_phantom_manifest(output, list(range(seed, seed + n)), split)))


@app.command("train-autoencoder")
def train_autoencoder(
    output: Path = typer.Option(..., "--output", "-o", help="Folder for the trained autoencoder (diffusers config.json + safetensors)."),
    manifest: Optional[Path] = typer.Option(None, "--manifest", help="Manifest whose train split gives real organ masks."),
    data_root: Optional[Path] = typer.Option(None, "--data-root", help="Root of the manifest's files."),
    volume: list[str] = typer.Option([], "--volume", help="Labelled volume IMAGE:LABEL giving organ masks (repeatable)."),
    phantoms: int = typer.Option(0, "--phantoms", min=0, help="In-memory phantoms adding organ masks."),
    phantom_seed: int = typer.Option(100000, "--phantom-seed", min=0, max=MAX_SEED, help="Seed of the first phantom."),
    random_masks: int = typer.Option(8000, "--random-masks", min=0, help="Random organ-shaped masks in the pool."),
    real_fraction: float = typer.Option(0.25, "--real-fraction", callback=_finite(0.0, 1.0), help="Share of each batch from volume/phantom masks, 0 to 1."),
    steps: int = typer.Option(2400, "--steps", min=1),
    batch_size: int = typer.Option(8, "--batch-size", "-b", min=1),
    lr: float = typer.Option(1e-3, "--lr", callback=_finite(0.0), help="Peak learning rate, >= 0."),
    seed: int = typer.Option(0, "--seed", "-s", min=0, max=MAX_SEED),
    device: str = typer.Option("auto", "--device", "-d", help="auto, cpu, cuda or cuda:N (bf16 autocast on CUDA)."),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
):
    """Stage 0 of the tiny preset: train its mask autoencoder from scratch (BCE + soft Dice)."""
    import torch
    from diffusers import AutoencoderKL

    from sdseg_monai.config import TINY_AUTOENCODER, model_preset
    from sdseg_monai.data import check_data_root, load_manifest
    from sdseg_monai.model import check_output_folder, replace_dir, resolve_device
    from sdseg_monai.phantoms import phantom_volumes, random_organ_masks
    from sdseg_monai.training import init_posterior_logvar, mask_reconstruction_dice, model_space_organ_masks, train_mask_autoencoder

    cases = list(_volume_pairs(volume, "--volume"))
    if manifest is not None:
        if data_root is None:
            raise SDSegInputError("--manifest needs --data-root")
        cases += [(i, l) for _, i, l in check_data_root(load_manifest(manifest), data_root, "train")]
    check_output_folder(output, manifest, *(path for pair in cases for path in pair), roots=[data_root])
    cases += [phantom_volumes(phantom_seed + k) for k in range(phantoms)]
    config = model_preset("tiny")
    size = config.preprocessing.slice_size
    real = model_space_organ_masks(cases, config.preprocessing, config.organ_labels) if cases else torch.zeros((0, size, size), dtype=torch.bool)
    pool = random_organ_masks(random_masks, size=size, seed=seed).bool()
    masks = torch.cat([pool, real])
    if len(masks) == 0:
        raise SDSegInputError("no training masks: give --random-masks, --phantoms, --volume or --manifest")
    share = real_fraction if len(real) and len(pool) else (1.0 if len(real) else 0.0)
    weights = torch.cat([torch.full((len(pool),), (1 - share) / max(1, len(pool))), torch.full((len(real),), share / max(1, len(real)))])
    target = resolve_device(device)
    torch.manual_seed(seed)
    autoencoder = AutoencoderKL.from_config(TINY_AUTOENCODER)
    init_posterior_logvar(autoencoder)
    autoencoder.to(target)
    masks = masks.to(target)
    if not quiet:
        typer.echo(f"{len(pool)} random + {len(real)} organ masks at {size}x{size}; {steps} steps", err=True)
    log = (lambda record: typer.echo(f"step {record['step']}: loss {record['loss']:.4f}", err=True)) if not quiet else None
    bf16 = torch.bfloat16 if target.type == "cuda" else None  # on a CPU, bf16 is fast only with AVX512-BF16
    train_mask_autoencoder(
        autoencoder, masks, steps=steps, batch_size=batch_size, lr=lr, seed=seed, sample_weights=weights, autocast_dtype=bf16, callback=log
    )
    held_out = random_organ_masks(512, size=size, seed=seed + 1_000_003)
    dice = mask_reconstruction_dice(autoencoder, held_out)
    autoencoder.to("cpu")
    output.parent.mkdir(parents=True, exist_ok=True)
    import tempfile

    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    autoencoder.save_pretrained(tmp)
    replace_dir(tmp, output)
    typer.echo(f"held-out reconstruction Dice (512 fresh random masks): mean {torch.nanmean(dice).item():.4f}; saved {output}")


@app.command()
def stability(
    input_path: Optional[Path] = typer.Argument(
        None, metavar="INPUT", help="A NIfTI file, a folder of NIfTI files or a DICOM series folder (no labels: no Dice spread)."
    ),
    model: Optional[Path] = typer.Option(None, "--model", "-m", help="Saved SDSeg model folder (default: the packaged model)."),
    manifest: Optional[Path] = typer.Option(None, "--manifest", help="Dataset manifest instead of INPUT: its cases have labels."),
    data_root: Optional[Path] = typer.Option(None, "--data-root", help="Folder the manifest's relative paths start from."),
    split: str = typer.Option("test", "--split", help="Manifest split: train, validation or test."),
    seeds: int = typer.Option(10, "--seeds", help="Number of seeds: 0..N-1, seed 0 the reference (the paper: 10)."),
    organs_: Optional[str] = typer.Option(None, "--organs", help="Comma-separated organ names (default: all)."),
    device: str = typer.Option("auto", "--device", "-d", help="auto, cpu, cuda or cuda:N."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", "-b", min=1, help="(slice, organ) pairs per forward."),
    precision: str = typer.Option("auto", "--precision", help=PRECISION_HELP),
    no_postprocess: bool = NO_POSTPROCESS_OPTION,
    decode_all: bool = DECODE_ALL_OPTION,
    shifts: int = SHIFTS_OPTION,
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write the report as JSON here (atomically)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No per-run progress; only the table."),
):
    """Stability across seeds (the paper's Table 5): SSIM, MS-SSIM, PSNR of each seed's maps against seed 0's, and the Dice spread."""
    from sdseg_monai.data import check_report_path
    from sdseg_monai.stability import check_seeds, stability_cases, stability_sources
    from sdseg_monai.stability import stability as run_stability

    # Every input is checked before the model is loaded, so mistakes fail in a second.
    check_seeds(seeds)
    cases, dataset = stability_cases(input_path, manifest, data_root, split)
    model_dir = _resolve_model(model)
    check_report_path(json_path, "--json", stability_sources(cases, input_path, dataset, model_dir))

    def progress(case: int, cases_total: int, case_id: str, seed: int, seeds_total: int, seconds: float) -> None:
        typer.echo(f"[case {case}/{cases_total}, seed {seed}/{seeds_total}] {case_id} ({seconds:.1f} s)", err=True)

    report = run_stability(
        model_dir, input_path if dataset is None else None, seeds, manifest=dataset, data_root=data_root,
        split=split, progress=None if quiet else progress, device=device, organs=_split_names(organs_),
        batch_size=batch_size, precision=precision, postprocess=not no_postprocess, skip_decode=not decode_all,
        num_shifts=shifts,
    )
    typer.echo(report.format_table())
    if json_path is not None:
        written = report.write_json(json_path)
        if not quiet:
            typer.echo(f"wrote {written} ({report.seconds:.1f} s)")


@app.command()
def bench(
    quick: bool = typer.Option(False, "--quick", help=f"Under 2 minutes on 2 CPU cores. {QUICK_HELP}"),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write the report as JSON here (atomically)."),
    markdown: Optional[Path] = typer.Option(None, "--markdown", help="Write the report's tables as markdown here (atomically)."),
    device: str = typer.Option("auto", "--device", "-d", help="auto, cpu, cuda or cuda:N."),
    precision: str = typer.Option("auto", "--precision", help="Measured beside fp32: " + PRECISION_HELP),
    networks: Optional[str] = typer.Option(
        None, "--networks", help="Comma-separated: tiny (the packaged default), paper, sd-v1 (random weights) or saved model folders (default: all three; --quick: tiny)."
    ),
    shape: tuple[int, int, int] = typer.Option((512, 512, 100), "--shape", help="Phantom grid X Y Z (over 400 x 400 x 250 mm)."),
    real_ct: Optional[Path] = typer.Option(None, "--real-ct", help="Real CT: a NIfTI file or its folder (default: ../shared/data/ct when present)."),
    no_real_ct: bool = typer.Option(False, "--no-real-ct", help="Only the phantom."),
    no_peer: bool = typer.Option(False, "--no-peer", help="Leave out the SwinUNETR peer (the longest part on a CPU)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", "-b", min=1, help="(slice, organ) pairs per forward (default: the pipeline's)."),
    pipeline_volumes: Optional[int] = typer.Option(
        None, "--pipeline-volumes", min=0, help="Copies of the volume run through the batch runner, reading, inference and writing overlapped (default: 8 on a GPU, 2 on a CPU, 0 with --quick; 0: none)."
    ),
    compile_pipeline: Optional[bool] = typer.Option(
        None, "--compile/--no-compile", help="Run the pipeline once more compiled (torch.compile; default: on a GPU)."
    ),
    no_isolate: bool = typer.Option(
        False, "--no-isolate", help="Every configuration in this one process: no start-up per configuration, but no peak RSS either."
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress lines; only the tables."),
):
    """Speed on this machine, every ratio from one run: one step (tiny, paper, sd-v1; 1 and 13 organs; fp32 and auto) with
    stage times and peak RSS, DDIM 10/50 x 1/5 samples, SwinUNETR, FLOP/s against a matmul, skipped decodes, an overlapped
    batch of volumes, targets."""
    from sdseg_monai.bench import BenchOptions, bench_sources, run_bench, write_report
    from sdseg_monai.data import check_report_path

    overrides: dict = {"device": device, "precision": precision, "shape": tuple(shape), "batch_size": batch_size, "peer": not no_peer,
                       "isolate": not no_isolate}
    if networks is not None:
        overrides["networks"] = tuple(n.strip() for n in networks.split(",") if n.strip())
    if pipeline_volumes is not None:
        overrides["pipeline_volumes"] = pipeline_volumes
    if compile_pipeline is not None:
        overrides["compile_pipeline"] = compile_pipeline
    if no_real_ct:
        overrides["real_ct"] = None
    elif real_ct is not None:
        overrides["real_ct"] = str(real_ct)
    options = BenchOptions.quick_defaults(**overrides) if quick else BenchOptions(**overrides)
    if json_path is not None or markdown is not None:  # never over the real CT nor into a model folder
        sources = bench_sources(options)
        check_report_path(json_path, "--json", sources)
        check_report_path(markdown, "--markdown", sources)
    report = run_bench(
        options,
        progress=None if quiet else (lambda line: typer.echo(line, err=True)),
        checkpoint=(lambda partial: write_report(partial, json_path, markdown)) if json_path or markdown else None,
    )
    typer.echo(report.to_markdown())
    for path in write_report(report, json_path, markdown):
        if not quiet:
            typer.echo(f"wrote {path}", err=True)


@app.command("serve-dicom")
def serve_dicom(
    store: Path = typer.Option(..., "--store", help="The node's folder: incoming/ instances, results/ (labels, SEG, summary), outbox/ (SEGs to send)."),
    forward: Optional[str] = typer.Option(None, "--forward", help="AE@HOST:PORT that receives every SEG by C-STORE (default: keep them in --store)."),
    ae_title: str = typer.Option("SDSEG", "--ae-title", "-a", help="This node's AE title."),
    port: int = typer.Option(11112, "--port", "-p", min=0, max=65535, help="Port to listen on."),
    host: str = typer.Option("", "--host", help="Address to listen on (default: every interface)."),
    allow: Optional[str] = typer.Option(None, "--allow", help="Comma-separated calling AE titles accepted, each as AE or AE@HOST (default: any)."),
    quiet_seconds: float = typer.Option(5.0, "--quiet-seconds", callback=_finite(positive=True), help="A series is complete once no instance of it arrived for this long."),
    seg_type: str = typer.Option("binary", "--seg-type", help="binary or labelmap (sent as binary where the peer refuses labelmap)."),
    retry_seconds: float = typer.Option(5.0, "--retry-seconds", callback=_finite(positive=True), help="First wait before resending a SEG that failed; it doubles, up to 5 minutes."),
    model: Optional[Path] = typer.Option(None, "--model", "-m", help="Saved SDSeg model folder or bundle."),
    device: str = typer.Option("auto", "--device", "-d", help="auto, cpu, cuda or cuda:N."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", "-b", min=1, help="(slice, organ) pairs per forward."),
    organs_: Optional[str] = typer.Option(None, "--organs", help="Comma-separated organ names (default: all)."),
    precision: str = typer.Option("auto", "--precision", help=PRECISION_HELP),
    compile_: bool = COMPILE_OPTION,
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Log warnings and errors only."),
):
    """A DICOM node: receive CT series (C-STORE, C-ECHO), segment each once complete, send its DICOM SEG on. Stops on Ctrl-C / SIGTERM."""
    import logging

    from sdseg_monai.node import DicomNode, parse_allow, parse_peer, serve

    peer = parse_peer(forward) if forward else None
    allowed = parse_allow(allow)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    node_log = logging.getLogger("sdseg3d.node")
    node_log.addHandler(handler)
    node_log.setLevel(logging.WARNING if quiet else logging.INFO)
    logging.getLogger("pynetdicom").setLevel(logging.ERROR)  # its INFO and DEBUG lines can carry header text
    model_dir = _resolve_model(model)
    _announce_compiling(compile_, quiet)
    node = DicomNode(model_dir, store, ae_title=ae_title, port=port, host=host, forward=peer, allow=allowed,
                     quiet_seconds=quiet_seconds, seg_type=seg_type, retry_seconds=retry_seconds, device=device,
                     batch_size=batch_size, organs=_split_names(organs_), precision=precision, compile=compile_)
    serve(node)


def _is_usage_error(error: Exception) -> bool:
    """A click usage error (typer's own copy of click, or click itself in older typer releases)."""
    return hasattr(error, "format_message") and isinstance(getattr(error, "exit_code", None), int)


def _usage_line(error) -> str:
    """One line: the command, the problem, where to read more; or the help when no command was given."""
    ctx = getattr(error, "ctx", None)
    if type(error).__name__ == "NoArgsIsHelpError" and ctx is not None:
        return ctx.get_help()
    command = f"{ctx.command_path.split(' ', 1)[1]}: " if ctx is not None and " " in ctx.command_path else ""
    hint = f" (see {ctx.command_path} -h)" if ctx is not None else ""
    return f"sdseg3d: error: {command}{' '.join(error.format_message().split())}{hint}"


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``sdseg3d`` console script; returns the exit code."""
    from sdseg_monai._signals import sigterm_interrupts
    from sdseg_monai.allocator import keep_freed_memory

    keep_freed_memory()  # this command owns its process: its CPU work reuses freed memory (about 1.2x faster)
    with sigterm_interrupts():  # SIGTERM (kill, a scheduler's time limit) ends a command as Ctrl-C does
        return _run(argv)


def _run(argv: list[str] | None) -> int:
    """The command, its refusals and interruptions told in one line; returns the exit code."""
    try:
        # Not standalone: usage errors come here, to be told in one line like every other refusal.
        code = app(args=argv, prog_name="sdseg3d", standalone_mode=False)
        if code == 130:  # typer answers a Ctrl-C in a command with 130 and no word
            typer.echo("sdseg3d: interrupted", err=True)
        return code if isinstance(code, int) else 0
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    except SDSegInputError as e:
        typer.echo(f"sdseg3d: error: {e}", err=True)
        return 2
    except (KeyboardInterrupt, typer.Abort) as e:
        if isinstance(e.__cause__, EOFError):  # click turns an EOFError inside a command into Abort: not a Ctrl-C
            return _internal_error(e.__cause__)
        typer.echo("sdseg3d: interrupted", err=True)
        return 130
    except Exception as e:  # noqa: BLE001
        if _is_usage_error(e):
            typer.echo(_usage_line(e), err=True)
            return int(e.exit_code)
        return _internal_error(e)


def _internal_error(error: BaseException) -> int:
    """One line and exit 1 for our own failure; ``SDSEG3D_DEBUG`` raises it with its traceback."""
    if os.environ.get("SDSEG3D_DEBUG"):
        raise error
    message = " ".join(str(error).split())
    typer.echo(f"sdseg3d: internal error: {type(error).__name__}: {message} (set SDSEG3D_DEBUG=1 for a traceback)", err=True)
    return 1


if __name__ == "__main__":
    sys.exit(main())
