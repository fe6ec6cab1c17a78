"""SIGTERM (kill, a batch scheduler's time limit) ends every command as Ctrl-C does: exit 130, one line,
no temporary file left."""

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from sdseg_monai._signals import sigterm_interrupts
from sdseg_monai.cli import main

# Runs a command whose first NIfTI write stops half-way (its temporary written, not yet renamed) and
# touches argv[1] then. argv[2] == "no-handler": sdseg3d without its SIGTERM handler (the control).
STALL_SCRIPT = """
import contextlib, sys, time
from pathlib import Path
import nibabel
import sdseg_monai._signals
from sdseg_monai.cli import main

save = nibabel.save

def stalled(image, path):
    save(image, path)
    Path(sys.argv[1]).touch()
    time.sleep(600)

nibabel.save = stalled
if sys.argv[2] == "no-handler":
    sdseg_monai._signals.sigterm_interrupts = contextlib.nullcontext
sys.exit(main(sys.argv[3:]))
"""


def _run_until_stalled(tmp_path, args, handler=True):
    marker = tmp_path / "writing"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")])}
    process = subprocess.Popen([sys.executable, "-c", STALL_SCRIPT, str(marker), "handler" if handler else "no-handler", *args],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 300  # a guard against a hang, not a timing check
    while not marker.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert process.poll() is None, process.communicate()[1][-2000:]
    return process


def _temporaries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_sigterm_during_phantom_is_an_interrupt_and_leaves_no_temporary(tmp_path):
    out = tmp_path / "out"
    process = _run_until_stalled(tmp_path, ["phantom", "-o", str(out), "--shape", "16", "16", "8"])
    assert _temporaries(out)  # caught half-way: the temporaries are there
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130 and err.strip() == "sdseg3d: interrupted", err[-2000:]
    assert not _temporaries(out) and not list(out.glob("phantom_*"))


def test_sigterm_without_the_handler_kills_and_leaves_temporaries(tmp_path):
    """The control: Python's default action, what every command did before."""
    out = tmp_path / "out"
    process = _run_until_stalled(tmp_path, ["phantom", "-o", str(out), "--shape", "16", "16", "8"], handler=False)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == -signal.SIGTERM and "interrupted" not in err
    assert len(_temporaries(out)) == 3  # image, label map and its names


def test_sigterm_during_segment_is_an_interrupt_and_leaves_no_temporary(model_dir, tmp_path):
    import nibabel as nib

    from conftest import labelled_scan

    image, _, affine = labelled_scan()
    scan = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(image.astype("float32"), affine), str(scan))
    out = tmp_path / "out"
    out.mkdir()
    process = _run_until_stalled(tmp_path, ["segment", str(scan), "-o", str(out / "mask.nii.gz"), "-m", str(model_dir), "-d", "cpu", "-q"])
    assert len(_temporaries(out)) == 2  # the label map's and its sidecar's
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130 and err.strip().splitlines()[-1] == "sdseg3d: interrupted", err[-2000:]
    assert not _temporaries(out) and not list(out.iterdir())


@pytest.fixture
def default_sigterm():
    """SIGTERM at Python's default action for the test, as in a fresh process."""
    previous = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    yield
    signal.signal(signal.SIGTERM, previous)


def test_sigterm_interrupts_in_the_block_only(default_sigterm):
    with pytest.raises(KeyboardInterrupt):
        with sigterm_interrupts():
            signal.raise_signal(signal.SIGTERM)
            time.sleep(5)  # the handler runs before this ends
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_sigterm_interrupts_keeps_a_handler_of_its_own_and_stays_off_other_threads(default_sigterm):
    received = []
    own = lambda signum, frame: received.append(signum)  # noqa: E731
    signal.signal(signal.SIGTERM, own)
    with sigterm_interrupts():
        signal.raise_signal(signal.SIGTERM)
    assert received == [signal.SIGTERM] and signal.getsignal(signal.SIGTERM) is own
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    seen = []

    def worker():
        with sigterm_interrupts():  # a thread cannot set a handler: it changes nothing, refuses nothing
            seen.append(signal.getsignal(signal.SIGTERM))

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert seen == [signal.SIG_DFL]


def test_main_handles_sigterm_while_a_command_runs_only(default_sigterm, monkeypatch, capfd):
    import sdseg_monai.labels

    during = []
    original = sdseg_monai.labels.dataset_preset

    def preset(name):
        during.append(signal.getsignal(signal.SIGTERM))
        return original(name)

    monkeypatch.setattr(sdseg_monai.labels, "dataset_preset", preset)
    assert main(["organs"]) == 0
    assert len(during) == 1 and during[0] not in (signal.SIG_DFL, signal.SIG_IGN, None)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL

    def terminated(name):
        signal.raise_signal(signal.SIGTERM)
        time.sleep(5)

    monkeypatch.setattr(sdseg_monai.labels, "dataset_preset", terminated)
    capfd.readouterr()
    assert main(["organs"]) == 130 and capfd.readouterr().err.strip() == "sdseg3d: interrupted"
