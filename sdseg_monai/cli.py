"""``sdseg3d``: a thin command line over the Python API.

Exit codes: 0 ok; 2 bad input or usage (one line naming the file and the problem); 1 internal error.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Optional

import typer

from sdseg_monai import __version__
from sdseg_monai.errors import SDSegInputError

app = typer.Typer(
    name="sdseg3d",
    help="SDSeg 3D CT segmentation (Stable Diffusion Segmentation, single-step reverse process) on MONAI.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


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
        "paper": "official SDSeg UNet (LDM churches, ~290 M) on a local kl-f8 / SD autoencoder",
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
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Save the demo model folder here."),
    seed: int = typer.Option(0, "--seed", help="Seed of weights, example and noise."),
    slices: int = typer.Option(16, "--slices", min=1, help="Number of generated slices."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", "-b", min=1, help="(slice, organ) pairs per forward."),
):
    """Run batched one-step SDSeg inference on a freshly generated example (no download)."""
    from sdseg_monai.demo import run_demo

    result = run_demo(output, seed=seed, n_slices=slices, device=device, batch_size=batch_size)
    probs = result.probabilities
    typer.echo(
        f"SDSeg tiny preset on {result.device}: {probs.shape[0]} slices x {probs.shape[1]} organs "
        f"at {probs.shape[-1]}x{probs.shape[-2]}, one UNet call per (slice, organ)"
    )
    typer.echo(f"parameters: {result.parameters['unet'] / 1e6:.2f} M UNet, "
               f"{result.parameters['vision_encoder'] / 1e6:.2f} M vision encoder, "
               f"{result.parameters['autoencoder'] / 1e6:.2f} M autoencoder (frozen)")
    typer.echo(f"{'organ':<14} {'mean prob':>9} {'voxels>=0.5':>11}")
    for k, name in enumerate(result.organs):
        typer.echo(f"{name:<14} {probs[:, k].mean().item():>9.3f} {int((probs[:, k] >= 0.5).sum()):>11d}")
    typer.echo(f"{result.seconds:.2f} s, {result.slices_per_second:.1f} slices/s")
    typer.echo("note: untrained demo weights (the packaged default model comes later): the maps show "
               "the pipeline, not segmentation quality.")
    if result.model_dir is not None:
        typer.echo(f"model folder written: {result.model_dir}")


def _split_names(value: Optional[str]) -> Optional[list[str]]:
    if value is None:
        return None
    names = [n.strip() for n in value.split(",") if n.strip()]
    if not names:
        raise SDSegInputError("--organs needs at least one organ name")
    return names


def _resolve_model(model: Optional[Path]) -> Path:
    from sdseg_monai.model import CONFIG_NAME

    if model is None:
        raise SDSegInputError(
            "no packaged default model in this version yet; pass --model PATH (a saved SDSeg model folder)"
        )
    if not model.exists():
        raise SDSegInputError("no such model folder", model)
    if not (model / CONFIG_NAME).is_file():
        raise SDSegInputError(f"not an SDSeg model folder (no {CONFIG_NAME})", model)
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
    output: Path = typer.Option(..., "--output", "-o", help="Output label map (.nii.gz); names go to OUTPUT.json."),
    model: Optional[Path] = typer.Option(None, "--model", "-m", help="Saved SDSeg model folder."),
    device: str = typer.Option("auto", "--device", "-d", help="auto, cpu, cuda or cuda:N."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", "-b", min=1, help="(slice, organ) pairs per forward."),
    organs_: Optional[str] = typer.Option(None, "--organs", help="Comma-separated organ names (default: all)."),
    label: Optional[Path] = typer.Option(None, "--label", "-l", help="Reference label map: print per-organ Dice."),
    seed: int = typer.Option(0, "--seed", "-s", help="Seed of the diffusion noise."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar, no summary."),
):
    """Segment a CT volume into a label map on the input's exact grid."""
    from sdseg_monai.data import check_writable, read_volume
    from sdseg_monai.inference import VolumeSegmenter

    check_writable(output)
    model_dir = _resolve_model(model)
    volume = read_volume(input_path)
    reference = read_volume(label, what="label map") if label is not None else None
    if reference is not None and reference.shape[:3] != volume.shape[:3]:
        raise SDSegInputError(
            f"reference shape {'x'.join(map(str, reference.shape))} differs from the input's "
            f"{'x'.join(map(str, volume.shape))}",
            label,
        )
    segmenter = VolumeSegmenter(model_dir, device=device, organs=_split_names(organs_), batch_size=batch_size, seed=seed)
    bar = _SliceBar(volume.shape[2], enabled=not quiet)
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
def evaluate(
    model: Optional[Path] = typer.Option(None, "--model", "-m", help="Saved SDSeg model folder."),
    manifest: Path = typer.Option(..., "--manifest", help="Dataset manifest, e.g. data_manifests/btcv.json."),
    data_root: Path = typer.Option(..., "--data-root", help="Folder the manifest's relative paths start from."),
    split: str = typer.Option("test", "--split", help="Manifest split to evaluate: train, validation or test."),
    output: Path = typer.Option(..., "--output", "-o", help="Report folder: per_case.csv and report.json go there."),
    hd95: bool = typer.Option(False, "--hd95", help="Also compute HD95 (mm)."),
    device: str = typer.Option("auto", "--device", "-d", help="auto, cpu, cuda or cuda:N."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", "-b", min=1, help="(slice, organ) pairs per forward."),
    seed: int = typer.Option(0, "--seed", "-s", help="Seed of the diffusion noise."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No per-case progress; only the table."),
):
    """Score a model on a manifest split: per-organ Dice (and HD95), per-case CSV and JSON report."""
    from sdseg_monai.data import check_data_root, load_manifest
    from sdseg_monai.evaluation import evaluate as run_evaluation
    from sdseg_monai.evaluation import prepare_output_dir

    model_dir = _resolve_model(model)
    # Every input is checked before the model is loaded, so mistakes fail in a second.
    dataset = load_manifest(manifest)
    check_data_root(dataset, data_root, split)
    prepare_output_dir(output)
    from sdseg_monai.inference import VolumeSegmenter

    segmenter = VolumeSegmenter(model_dir, device=device, batch_size=batch_size, seed=seed)

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


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``sdseg3d`` console script; returns the exit code."""
    try:
        # Standalone mode: typer reports usage errors itself and exits 2.
        app(args=argv, prog_name="sdseg3d")
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    except SDSegInputError as e:
        typer.echo(f"sdseg3d: error: {e}", err=True)
        return 2
    except KeyboardInterrupt:
        typer.echo("sdseg3d: interrupted", err=True)
        return 130
    except Exception as e:  # noqa: BLE001
        if os.environ.get("SDSEG3D_DEBUG"):
            raise
        message = " ".join(str(e).split())
        typer.echo(f"sdseg3d: internal error: {type(e).__name__}: {message} (set SDSEG3D_DEBUG=1 for a traceback)", err=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
