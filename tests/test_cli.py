"""The command line: version, listings that need no weights, errors as one line with exit 2."""

import json
import subprocess
import sys

import pytest

from sdseg_monai import __version__
from sdseg_monai.cli import main


def run(*args):
    return subprocess.run([sys.executable, "-m", "sdseg_monai.cli", *args], capture_output=True, text=True)


def test_version_short_and_long_flags(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"sdseg3d {__version__}"
    assert main(["-V"]) == 0


def test_help_lists_the_commands(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in ("organs", "presets", "demo"):
        assert command in out


def test_organs_prints_the_btcv_table_without_loading_torch():
    result = run("organs")
    assert result.returncode == 0
    lines = result.stdout.splitlines()
    assert "   13  left_adrenal_gland" in lines and "    1  spleen" in lines
    # Listing labels must stay instant: no torch, no diffusers.
    probe = subprocess.run(
        [sys.executable, "-c", "import sys; from sdseg_monai.cli import main; main(['organs']); "
         "print('torch' in sys.modules, 'diffusers' in sys.modules)"],
        capture_output=True, text=True,
    )
    assert probe.stdout.strip().splitlines()[-1] == "False False"


def test_organs_json_subset_and_sts(capsys):
    assert main(["organs", "--subset", "transunet8", "--json"]) == 0
    table = json.loads(capsys.readouterr().out)
    assert set(table.values()) == {"aorta", "gallbladder", "left_kidney", "right_kidney", "liver", "pancreas", "spleen", "stomach"}
    assert table["6"] == "liver"
    assert main(["organs", "-d", "sts", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"1": "teeth"}


@pytest.mark.parametrize(
    "args, fragment",
    [(["organs", "-d", "nope"], "unknown dataset preset 'nope'"), (["organs", "-s", "nope"], "unknown subset 'nope'")],
)
def test_bad_choices_exit_2_with_one_line(args, fragment):
    result = run(*args)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and fragment in result.stderr
    assert "Traceback" not in result.stderr


def test_unknown_option_is_a_usage_error():
    assert run("organs", "--bogus").returncode == 2


def test_demo_segments_a_phantom_and_draws_overlays(tmp_path):
    import numpy as np
    import torch
    from PIL import Image

    from conftest import micro_config
    from sdseg_monai.demo import PALETTE, run_demo
    from sdseg_monai.model import SDSeg

    torch.manual_seed(0)
    model = SDSeg(micro_config(organs=("spleen", "liver"), preprocessing={"hu_window": (-175, 250), "slice_size": 32}))
    result = run_demo(tmp_path / "demo", model=model, shape=(48, 48, 20), pictures=2)
    names = sorted(p.name for p in (tmp_path / "demo").iterdir())
    assert "prediction.nii.gz" in names and "prediction.json" in names
    assert len([n for n in names if n.endswith(".png")]) == 2
    assert [s.name for s in result.scores] == ["spleen", "liver"]
    assert all(s.reference_voxels > 0 for s in result.scores)  # the phantom holds both organs
    picture = np.asarray(Image.open(next((tmp_path / "demo").glob("*.png"))).convert("RGB"))
    panel = 48 * 3
    assert picture.shape[1] > 2 * panel + 200 and picture.shape[0] > panel  # two panels and a legend
    titles = picture[25:60, : 2 * panel]
    assert (titles == 255).all(-1).sum() > 100  # white title text over the panels
    legend = picture[:, 2 * panel + 40 :]
    for score in result.scores:  # each organ's colour swatch stands in the legend
        assert (legend == PALETTE[score.label]).all(-1).sum() >= 100


def test_demo_without_a_default_model_says_it_is_untrained(tmp_path, capsys, monkeypatch, no_default_model):
    import sdseg_monai.demo as demo

    monkeypatch.setattr(demo, "DEMO_SHAPE", (40, 40, 6))
    original = demo.run_demo
    monkeypatch.setattr(demo, "run_demo", lambda *a, **k: original(*a, **{**k, "shape": (40, 40, 6)}))
    assert main(["demo", "-o", str(tmp_path / "d")]) == 0
    out = capsys.readouterr().out
    assert "untrained" in out and "meaningless" in out and "liver" in out


@pytest.mark.parametrize(
    "command, option, value",
    [
        ("train", "--base-lr", "nan"), ("train", "--base-lr", "inf"), ("train", "--ema-decay", "nan"),
        ("train", "--max-minutes", "inf"), ("train", "--max-minutes", "nan"), ("train", "--mask-loss-weight", "nan"),
        ("train-autoencoder", "--lr", "nan"), ("train-autoencoder", "--lr", "-inf"), ("train-autoencoder", "--real-fraction", "nan"),
        ("serve-dicom", "--quiet-seconds", "inf"), ("serve-dicom", "--retry-seconds", "nan"),
    ],
)
def test_float_options_refuse_nan_and_infinity(command, option, value, tmp_path, capfd):
    """NaN passed ``min=``/``max=`` ranges (and --lr had none): train-autoencoder --lr nan ended in an
    internal error, --max-minutes inf and --lr inf ran. Now a usage error, before anything is read or made."""
    target = ["--store" if command == "serve-dicom" else "-o", str(tmp_path / "out")]
    capfd.readouterr()
    assert main([command, *target, option, value]) == 2
    err = capfd.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and option in err and "must be a finite number" in err and value in err, err
    assert "Traceback" not in err and not (tmp_path / "out").exists()


def test_a_finite_float_option_passes_to_the_command(tmp_path, capfd):
    """The control: the same options with finite values pass the parse; the command's own check speaks."""
    for option, value in (("--base-lr", "1e-5"), ("--ema-decay", "0.5"), ("--max-minutes", "0"), ("--mask-loss-weight", "0")):
        capfd.readouterr()
        assert main(["train", "-o", str(tmp_path / "out"), option, value]) == 2
        assert capfd.readouterr().err.strip() == "sdseg3d: error: no training data: give --manifest/--data-root and/or --volume IMAGE:LABEL"


def test_demo_label_maps_each_carry_their_label_names(tmp_path):
    """Label names travel with every label map: the phantom's reference had none (only the prediction's
    .json). Each .nii.gz label map has its .json; the phantom's names every value in it."""
    import nibabel as nib
    import numpy as np
    import torch

    from conftest import micro_config
    from sdseg_monai.demo import run_demo
    from sdseg_monai.labels import BTCV
    from sdseg_monai.model import SDSeg

    torch.manual_seed(0)
    model = SDSeg(micro_config(organs=("spleen", "liver"), preprocessing={"hu_window": (-175, 250), "slice_size": 32}))
    result = run_demo(tmp_path / "demo", model=model, seed=5, shape=(40, 40, 8), pictures=0)
    label_map = tmp_path / "demo" / "phantom_5_label.nii.gz"
    names = json.loads((tmp_path / "demo" / "phantom_5_label.json").read_text())["labels"]
    assert names == {str(o.label): o.name for o in BTCV.organs}
    values = {int(v) for v in np.unique(np.asarray(nib.load(str(label_map)).dataobj))} - {0}
    assert values and {str(v) for v in values} <= set(names)
    # The prediction's sidecar names the model's organs only: each file names its own map.
    assert json.loads((tmp_path / "demo" / "prediction.json").read_text())["labels"] == {"1": "spleen", "6": "liver"}
    assert tmp_path / "demo" / "phantom_5_label.json" in result.files
    assert not [p.name for p in (tmp_path / "demo").iterdir() if p.name.startswith(".")]  # no temporaries
