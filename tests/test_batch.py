"""`sdseg3d batch`: a PACS-export tree in, labels + summary out; resume, shards, exit codes, and no
header free text in any path or summary line."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from dicom_series import ct_slices, phantom_ct, uid, write
from sdseg_monai.batch import shard_of
from sdseg_monai.cli import main

HOSTILE = "../../escape/x"
IMAGE, _ = phantom_ct((24, 20, 6))


def _tree(root: Path) -> Path:
    """Two studies; a CT split across folders; a CT with a missing slice; an MR; junk; a NIfTI file."""
    a = ct_slices(IMAGE, study=uid(1), series=uid(1, 1), patient_name=HOSTILE, description="/etc/passwd")
    write(a[:3], root / "export" / HOSTILE.replace("../", "up_") / "p1")
    write(a[3:], root / "export" / "p2")
    write(ct_slices(IMAGE + 30, study=uid(2), series=uid(2, 1), row_dir=(1, 0, 0), col_dir=(0, 0, -1)), root / "export" / "b" / "coronal")
    gap = ct_slices(IMAGE, study=uid(2), series=uid(2, 2))
    write(gap[:2] + gap[3:], root / "export" / "b" / "gap")
    write(ct_slices(IMAGE, study=uid(2), series=uid(2, 3), modality="MR"), root / "export" / "b" / "mr")
    (root / "export" / "notes.txt").write_text("junk")
    nib.save(nib.Nifti1Image(IMAGE.astype(np.float32), np.diag([0.8, 0.7, 3.0, 1.0])), str(root / "export" / "scan.nii.gz"))
    return root / "export"


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return _tree(tmp_path_factory.mktemp("tree"))


@pytest.fixture(scope="module")
def first_run(tree, model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("out") / "run"
    code = main(["batch", str(tree), "-o", str(out), "-m", str(model_dir), "-q", "--no-dicom-seg"])
    return code, out


def _rows(out: Path) -> dict:
    return {r["case"]: r for r in map(json.loads, (out / "summary.jsonl").read_text().splitlines())}


def _part(path: Path) -> tuple[str, list[dict]]:
    """A summary part: (the run id on its first line, its rows)."""
    header, *rows = map(json.loads, path.read_text().splitlines())
    return header["sdseg3d_run"], rows


def test_tree_layout_summary_and_exit_code(first_run, tree, model_dir, tmp_path):
    code, out = first_run
    assert code == 3  # the series with a missing slice failed; the others ran
    rows = _rows(out)
    assert {k: (r["status"], r["reason"]) for k, r in rows.items()} == {
        uid(1, 1): ("ok", "ok"), uid(2, 1): ("ok", "ok"), uid(2, 2): ("failed", "nonuniform_spacing"),
        uid(2, 3): ("skipped", "not_ct"), "scan.nii.gz": ("ok", "ok")}
    assert rows[uid(2, 1)]["plane"] == "coronal" and rows[uid(1, 1)]["images_used"] == 6
    assert "between slices 2 and 3" in rows[uid(2, 2)]["message"]
    for case, folder in ((uid(1, 1), out / uid(1) / uid(1, 1)), (uid(2, 1), out / uid(2) / uid(2, 1)), ("scan.nii.gz", out / "nifti" / "scan")):
        assert sorted(p.name for p in folder.iterdir()) == ["done.json", "label.json", "label.nii.gz"], case
        label = nib.load(str(folder / "label.nii.gz"))
        voxel_ml = abs(np.linalg.det(label.affine[:3, :3])) / 1000
        data = np.asarray(label.dataobj)
        sidecar = json.loads((folder / "label.json").read_text())
        for value, organ in sidecar["labels"].items():  # mL = voxel count x voxel volume
            assert rows[case]["volume_ml"][organ] == pytest.approx(np.count_nonzero(data == int(value)) * voxel_ml, abs=1e-3)
    assert not (out / uid(2) / uid(2, 2)).exists() and not (out / uid(2) / uid(2, 3)).exists()
    with open(out / "summary.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 5 and {"spleen_ml", "liver_ml", "model_hash", "sdseg3d_version"} <= set(table[0])
    # No header free text anywhere: paths, summary, sidecars.
    everything = "\n".join([*(str(p.relative_to(out)) for p in out.rglob("*")), *(p.read_text() for p in out.rglob("*.json*")),
                            (out / "summary.csv").read_text()])
    assert "escape" not in everything and "passwd" not in everything
    # The labels equal `sdseg3d segment` on the same series (same model, seed).
    single = tmp_path / "coronal.nii.gz"
    assert main(["segment", str(tree / "b" / "coronal"), "-o", str(single), "-m", str(model_dir), "-q"]) == 0
    batch_label = nib.load(str(out / uid(2) / uid(2, 1) / "label.nii.gz"))
    assert np.array_equal(np.asarray(batch_label.dataobj), np.asarray(nib.load(str(single)).dataobj))
    assert np.allclose(batch_label.affine, nib.load(str(single)).affine)


def test_rerun_does_no_inference_and_a_changed_option_recomputes(first_run, tree, model_dir, monkeypatch):
    code, out = first_run
    before = {p: p.stat().st_mtime_ns for p in out.rglob("label.nii.gz")}
    calls = []
    from sdseg_monai.inference import VolumeSegmenter

    original = VolumeSegmenter.segment
    monkeypatch.setattr(VolumeSegmenter, "segment", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    assert main(["batch", str(tree), "-o", str(out), "-m", str(model_dir), "-q", "--no-dicom-seg"]) == 3
    assert calls == [] and {p: p.stat().st_mtime_ns for p in out.rglob("label.nii.gz")} == before
    # A done-record missing (a kill before it was written): only that case is recomputed.
    (out / uid(2) / uid(2, 1) / "done.json").unlink()
    assert main(["batch", str(tree), "-o", str(out), "-m", str(model_dir), "-q", "--no-dicom-seg"]) == 3
    assert len(calls) == 1
    # Another seed is another result: everything recomputes.
    calls.clear()
    assert main(["batch", str(tree), "-o", str(out), "-m", str(model_dir), "-q", "--no-dicom-seg", "--seed", "1"]) == 3
    assert len(calls) == 3


def test_killed_run_resumes(tree, model_dir, tmp_path):
    out = tmp_path / "out"
    command = [sys.executable, "-m", "sdseg_monai.cli", "batch", str(tree), "-o", str(out), "-m", str(model_dir), "-q", "--no-dicom-seg"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not list(out.rglob("done.json")) and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    assert main(command[3:]) == 3
    rows = _rows(out)
    assert sum(r["status"] == "ok" for r in rows.values()) == 3
    for done in out.rglob("done.json"):  # every case done, its files complete
        assert nib.load(str(done.parent / "label.nii.gz")).get_fdata().shape[2] == 6
        assert json.loads((done.parent / "label.json").read_text())["labels"]


EXPECTED = {uid(1, 1): ("ok", "ok"), uid(2, 1): ("ok", "ok"), uid(2, 2): ("failed", "nonuniform_spacing"),
            uid(2, 3): ("skipped", "not_ct"), "scan.nii.gz": ("ok", "ok")}


def test_shards_are_disjoint_and_merge(tree, model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    base = ["batch", str(tree), "-o", str(out), "-m", str(model_dir), "-q", "--no-dicom-seg"]
    # The failed series is in shard 0's share; shard 0 leaves the merging, and the exit code, to shard 1.
    assert shard_of(uid(2, 2), 2) == 0 and main([*base, "--shard", "0/2"]) == 0
    assert not (out / "summary.csv").exists()  # waits for the other shard
    assert main([*base, "--shard", "1/2"]) == 3  # merges: a series of the tree failed
    parts = [[row["case"] for row in _part(out / f"summary.part-{i}-of-2.jsonl")[1]] for i in range(2)]
    assert not set(parts[0]) & set(parts[1]) and len(parts[0]) + len(parts[1]) == 5
    assert all(shard_of(case, 2) == i for i in range(2) for case in parts[i])
    assert {k: (r["status"], r["reason"]) for k, r in _rows(out).items()} == EXPECTED
    (out / "summary.csv").unlink()
    assert main(["batch", "--merge", str(out), "-q"]) == 0 and len(_rows(out)) == 5
    capsys.readouterr()
    # A stray file among the parts, or a part that is not rows: one line naming it.
    (out / "summary.part-0.jsonl").write_text("")
    assert main(["batch", "--merge", str(out), "-q"]) == 2
    err = capsys.readouterr().err
    assert "summary.part-0.jsonl: not a summary part of shard I of N" in err and len(err.splitlines()) == 1
    (out / "summary.part-0.jsonl").unlink()
    (out / "summary.part-1-of-2.jsonl").write_text('{"case": "x"\n')
    assert main(["batch", "--merge", str(out), "-q"]) == 2
    err = capsys.readouterr().err
    assert "summary.part-1-of-2.jsonl: line 1 is not a summary row" in err and len(err.splitlines()) == 1


def test_an_empty_share_is_not_an_error_and_the_merging_shard_speaks_for_the_tree(tree, model_dir, tmp_path, capsys):
    """More shards than work: a shard with nothing to do writes its empty part and exits 0, quietly.
    Exit 2 ("nothing to segment") only when the whole tree has nothing, from every shard, none writing."""
    out = tmp_path / "out"
    base = ["batch", str(tree), "-o", str(out), "-m", str(model_dir), "-q", "--no-dicom-seg"]
    assert not [case for case in EXPECTED if shard_of(case, 3) == 0]  # shard 0 of 3 has no case
    assert main([*base, "--shard", "0/3"]) == 0 and capsys.readouterr().err == ""
    run, rows = _part(out / "summary.part-0-of-3.jsonl")
    assert rows == [] and run  # no rows, only the run's id
    assert main([*base, "--shard", "1/3"]) == 0 and main([*base, "--shard", "2/3"]) == 3
    assert {k: (r["status"], r["reason"]) for k, r in _rows(out).items()} == EXPECTED
    write(ct_slices(IMAGE, modality="MR"), tmp_path / "mr")
    mr = ["batch", str(tmp_path / "mr"), "-o", str(tmp_path / "mr_out"), "-m", str(model_dir), "-q"]
    capsys.readouterr()
    for shard in ("0/2", "1/2"):
        assert main([*mr, "--shard", shard]) == 2 and "nothing to segment" in capsys.readouterr().err
    assert not (tmp_path / "mr_out").exists()


def test_torchrun_processes_share_the_tree(tree, model_dir, tmp_path):
    """Three ranks, five cases: rank 0's share is empty and rank 1's holds the failed series. torchrun
    stops every rank once one exits non-zero, so only the rank that merges the parts may: it exits 3,
    torchrun then 1 (its own code for a failed worker). Before, rank 0 exited 2 at once ("nothing to
    segment") and the parts of the ranks still running were never written."""
    out = tmp_path / "out"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "3", "-m", "sdseg_monai.cli", "batch",
               str(tree), "-o", str(out), "-m", str(model_dir), "-q", "--no-dicom-seg"]
    assert shard_of(uid(2, 2), 3) == 1 and not [case for case in EXPECTED if shard_of(case, 3) == 0]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert sorted(p.name for p in out.glob("summary.part-*")) == [f"summary.part-{i}-of-3.jsonl" for i in range(3)]
    assert {k: (r["status"], r["reason"]) for k, r in _rows(out).items()} == EXPECTED and (out / "summary.csv").is_file()
    assert result.returncode == 1, result.stderr[-3000:]
    assert result.stderr.count("exitcode  : 3") == 1 and "<NO_OTHER_FAILURES>" in result.stderr, result.stderr[-3000:]
    assert "nothing to segment" not in result.stderr


def _labels(out: Path) -> dict:
    return {str(p.parent.relative_to(out)): np.asarray(nib.load(str(p)).dataobj) for p in out.rglob("label.nii.gz")}


def test_overlapped_run_equals_case_by_case(tree, model_dir, tmp_path):
    """Reader threads, inference and the writer thread overlap; the outputs are those of one case at a
    time, bit for bit, and progress counts every case once, in increasing order."""
    from sdseg_monai.batch import BatchRunner

    calls = []
    runner = BatchRunner(model_dir, tmp_path / "overlapped", dicom_seg=False, readers=3)
    report = runner.run(tree, progress=lambda done, total, row: calls.append((done, total, row.get("case"))))
    one_by_one = BatchRunner(model_dir, tmp_path / "one_by_one", dicom_seg=False)
    rows = {}
    for case in one_by_one.plan(tree):
        if case.segmentable:
            rows[case.key] = one_by_one.segment_case(case)
    overlapped = {r["case"]: r for r in report.rows}
    assert {k: (r["status"], r["reason"], r.get("volume_ml")) for k, r in rows.items()} == {
        k: (overlapped[k]["status"], overlapped[k]["reason"], overlapped[k].get("volume_ml")) for k in rows}
    a, b = _labels(tmp_path / "overlapped"), _labels(tmp_path / "one_by_one")
    assert sorted(a) == sorted(b) and len(a) == 3 and all(np.array_equal(a[k], b[k]) for k in a)
    # Progress starts at the cases with nothing to segment (2 here), then counts each finished case once.
    assert [c[0] for c in calls] == [2, 3, 4, 5] and calls[-1][1] == 5
    assert sorted(c[2] for c in calls[1:]) == sorted(rows)  # each segmentable case reported once


def test_on_a_cpu_cases_are_read_in_the_segmenting_thread_unless_readers_are_asked_for(tree, model_dir, tmp_path, monkeypatch):
    """A reader thread beside a CPU's inference slowed it (its torch threads wait for the core the
    reader takes): on a CPU each case is read when its turn comes, in the thread that segments it.
    Asked for, readers read ahead in their own threads (the control)."""
    import threading

    from sdseg_monai.batch import BatchRunner

    threads = []
    original = BatchRunner._read

    def recording(self, case):
        threads.append(threading.current_thread() is threading.main_thread())
        return original(self, case)

    monkeypatch.setattr(BatchRunner, "_read", recording)
    runner = BatchRunner(model_dir, tmp_path / "cpu", dicom_seg=False, device="cpu")
    assert runner.readers == 0
    in_turn = runner.run(tree)
    assert len(threads) >= 3 and all(threads)
    reads, threads[:] = len(threads), []
    ahead = BatchRunner(model_dir, tmp_path / "readers", dicom_seg=False, device="cpu", readers=2).run(tree)
    assert len(threads) == reads and not any(threads)
    assert [(r["case"], r["status"]) for r in in_turn.rows] == [(r["case"], r["status"]) for r in ahead.rows]
    a, b = _labels(tmp_path / "cpu"), _labels(tmp_path / "readers")
    assert sorted(a) == sorted(b) and len(a) == 3 and all(np.array_equal(a[k], b[k]) for k in a)


def test_a_failed_write_lands_in_its_row_and_the_run_goes_on(tree, model_dir, tmp_path, monkeypatch):
    from sdseg_monai.batch import BatchRunner

    original = BatchRunner._write

    def write(self, case, *args):
        if case.key == uid(2, 1):
            raise OSError("disk full")
        return original(self, case, *args)

    monkeypatch.setattr(BatchRunner, "_write", write)
    report = BatchRunner(model_dir, tmp_path / "out", dicom_seg=False).run(tree)
    rows = {r["case"]: r for r in report.rows}
    assert (rows[uid(2, 1)]["status"], rows[uid(2, 1)]["reason"], rows[uid(2, 1)]["message"]) == ("failed", "inference_error", "OSError")
    assert rows[uid(1, 1)]["status"] == rows["scan.nii.gz"]["status"] == "ok" and report.exit_code == 3
    assert not (tmp_path / "out" / uid(2) / uid(2, 1) / "done.json").exists()


def test_an_error_in_the_progress_callback_is_raised_not_hung(tree, model_dir, tmp_path, monkeypatch):
    """The writer thread fails on the first finished case: the segmenting thread stops at the next
    case instead of segmenting every remaining one only for it to be thrown away. The second case is
    segmented or not, by which thread comes first (the failure may be seen before it starts); the
    third never is."""
    import threading

    from sdseg_monai.batch import BatchRunner
    from sdseg_monai.inference import VolumeSegmenter

    raised = threading.Event()

    def progress(done, total, row):
        if row:
            raised.set()
            raise RuntimeError("the caller's own bug")

    segmented = []
    original = VolumeSegmenter.segment

    def segment(self, *args, **kwargs):
        if segmented:  # the second case: let the writer thread fail first
            raised.wait(60)
            time.sleep(1.0)
        segmented.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(VolumeSegmenter, "segment", segment)
    outcome = []

    def run():
        try:
            BatchRunner(model_dir, tmp_path / "out", dicom_seg=False).run(tree, progress=progress)
        except RuntimeError as e:
            outcome.append(str(e))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout=300)
    assert not thread.is_alive() and outcome == ["the caller's own bug"]
    assert len(segmented) in (1, 2)  # of 3 segmentable cases (all 3 before)


@pytest.mark.parametrize("content", ["empty", "junk", "mr"])
def test_a_tree_with_nothing_to_segment_writes_nothing_from_any_shard(content, model_dir, tmp_path, capfd):
    """No case, or every series skipped: exit 2 and one line from every shard, and no summary, part
    or folder. Before, the run wrote a summary (unsharded) or its part and exited 0 (shards that
    did not merge), created the output folder, and printed a progress bar and a count line first."""
    tree = tmp_path / "in"
    tree.mkdir()
    if content == "junk":
        (tree / "notes.txt").write_text("junk")
    elif content == "mr":
        write(ct_slices(IMAGE, modality="MR"), tree / "mr")
    existing = tmp_path / "existing"
    (existing / "kept").mkdir(parents=True)
    for out in (tmp_path / "out", existing):
        for shard in (None, "0/1", "0/2", "1/2", "0/3", "1/3", "2/3"):
            capfd.readouterr()
            args = ["batch", str(tree), "-o", str(out), "-m", str(model_dir), "--no-dicom-seg", *(["--shard", shard] if shard else [])]
            assert main(args) == 2, shard
            err = capfd.readouterr().err.strip()
            skipped = "; skipped: 1 not_ct" if content == "mr" else ""
            assert err == f"sdseg3d: error: {tree}: nothing to segment (no CT series passed QC, no NIfTI file{skipped})", err
    assert not (tmp_path / "out").exists()
    assert [p.name for p in existing.rglob("*")] == ["kept"]


def test_a_tree_with_one_case_writes_its_summary(model_dir, tmp_path, capfd):
    """The control: one NIfTI file is something to segment; the run writes its summary and exits 0."""
    _nifti(tmp_path / "in" / "scan.nii.gz")
    assert main(["batch", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "-m", str(model_dir), "--no-dicom-seg"]) == 0
    assert "1 ok, 0 skipped, 0 failed" in capfd.readouterr().out and (tmp_path / "out" / "summary.csv").is_file()


def test_nothing_to_segment_and_bad_arguments(model_dir, tmp_path, capsys):
    write(ct_slices(IMAGE, modality="MR"), tmp_path / "mr")
    assert main(["batch", str(tmp_path / "mr"), "-o", str(tmp_path / "out"), "-m", str(model_dir), "-q"]) == 2
    assert "nothing to segment" in capsys.readouterr().err
    assert main(["batch", str(tmp_path / "mr"), "-o", str(tmp_path / "mr" / "out"), "-m", str(model_dir)]) == 2
    assert "inside the input folder" in capsys.readouterr().err
    assert main(["batch", str(tmp_path / "mr"), "-o", str(tmp_path / "o2"), "-m", str(model_dir), "--shard", "2/2"]) == 2
    assert "0 <= I < N" in capsys.readouterr().err
    shutil.rmtree(tmp_path / "mr")
    assert main(["batch", "--merge", str(tmp_path / "o2")]) == 2


def test_dicom_seg_per_series_equals_the_label_volume(model_dir, tmp_path):
    pytest.importorskip("highdicom")
    from dicom_series import enhanced_ct
    from test_dicom_seg import _highdicom_labels

    ct = ct_slices(IMAGE, study=uid(3), series=uid(3, 1))
    write(ct, tmp_path / "in" / "ct")
    frames = ct_slices(IMAGE[::-1], study=uid(3), series=uid(3, 2))
    write([enhanced_ct(frames, uid(3, 2))], tmp_path / "in" / "mf", names=["mf.dcm"])
    out = tmp_path / "out"
    assert main(["batch", str(tmp_path / "in"), "-o", str(out), "-m", str(model_dir), "-q", "--seg-type", "labelmap", "--save-image"]) == 0
    from sdseg_monai.dicom import index_tree, source_headers

    for stack in index_tree(tmp_path / "in").stacks:
        folder = out / stack.study_uid / stack.key
        label = np.asarray(nib.load(str(folder / "label.nii.gz")).dataobj)
        assert label.any()  # something to compare
        multiframe = stack.frames[0].number is not None
        sources = source_headers(stack)
        got = _highdicom_labels(folder / "seg.dcm", sources, [f.number for f in stack.frames] if multiframe else None)
        assert np.array_equal(got, label), stack.key
        assert pydicom_seg_type(folder / "seg.dcm") == "LABELMAP"
        image = nib.load(str(folder / "image.nii.gz"))  # --save-image: the HU volume read, on the labels' grid
        assert np.allclose(image.affine, nib.load(str(folder / "label.nii.gz")).affine)
        assert np.array_equal(np.asarray(image.dataobj), IMAGE[::-1] if multiframe else IMAGE)
    # Other options recompute, and leave no output of the old ones behind.
    assert main(["batch", str(tmp_path / "in"), "-o", str(out), "-m", str(model_dir), "-q", "--no-dicom-seg"]) == 0
    assert sorted(p.name for p in (out / uid(3) / uid(3, 1)).iterdir()) == ["done.json", "label.json", "label.nii.gz"]


def pydicom_seg_type(path):
    import pydicom

    return pydicom.dcmread(path, stop_before_pixels=True).SegmentationType


def test_seg_writer_processes_write_what_the_writer_thread_writes(model_dir, tmp_path):
    """On a GPU, DICOM SEG objects are encoded in spawned processes while later series run; each case is
    finished (done-record, progress) once its SEG is written, and a SEG that fails there fails its case only."""
    pytest.importorskip("highdicom")
    from dicom_series import enhanced_ct
    from test_dicom_seg import _highdicom_labels

    from sdseg_monai.batch import BatchRunner
    from sdseg_monai.dicom import index_tree, source_headers

    write(ct_slices(IMAGE, study=uid(3), series=uid(3, 1)), tmp_path / "in" / "ct")
    frames = ct_slices(IMAGE[::-1], study=uid(3), series=uid(3, 2))
    write([enhanced_ct(frames, uid(3, 2))], tmp_path / "in" / "mf", names=["mf.dcm"])
    write(ct_slices(IMAGE[:, ::-1], study=uid(4), series=uid(4, 1)), tmp_path / "in" / "ct2")
    broken = tmp_path / "processes" / uid(4) / uid(4, 1) / "seg.dcm"
    broken.mkdir(parents=True)  # a folder where the SEG file goes: write_dicom_seg refuses it, in its process
    calls = []
    runner = BatchRunner(model_dir, tmp_path / "processes", dicom_seg=True, seg_writers=2)
    report = runner.run(tmp_path / "in", progress=lambda done, total, row: calls.append(done))
    rows = {r["case"]: r for r in report.rows}
    assert (rows[uid(4, 1)]["status"], rows[uid(4, 1)]["reason"]) == ("failed", "inference_error")  # a write, not a read
    assert "output path is a folder" in rows[uid(4, 1)]["message"]
    assert not (broken.parent / "done.json").exists() and report.exit_code == 3
    assert calls == [0, 1, 2, 3]
    in_thread = BatchRunner(model_dir, tmp_path / "thread", dicom_seg=True, seg_writers=0).run(tmp_path / "in")
    assert in_thread.exit_code == 0
    for stack in index_tree(tmp_path / "in").stacks:
        if stack.key == uid(4, 1):
            continue
        multiframe = stack.frames[0].number is not None
        numbers = [f.number for f in stack.frames] if multiframe else None
        folders = [tmp_path / side / stack.study_uid / stack.key for side in ("processes", "thread")]
        assert all((folder / "done.json").is_file() for folder in folders)
        label = np.asarray(nib.load(str(folders[0] / "label.nii.gz")).dataobj)
        assert label.any() and np.array_equal(label, np.asarray(nib.load(str(folders[1] / "label.nii.gz")).dataobj))
        for folder in folders:
            assert np.array_equal(_highdicom_labels(folder / "seg.dcm", source_headers(stack), numbers), label), (folder, stack.key)


def test_seg_writer_processes_that_cannot_start_leave_the_segs_to_the_writer_thread(model_dir, tmp_path, monkeypatch):
    """A script without a __main__ guard re-runs itself in each spawned process, which then dies: the
    pool breaks, and every SEG is still written (in the writer thread), every case finished."""
    pytest.importorskip("highdicom")
    from concurrent.futures import Future
    from concurrent.futures.process import BrokenProcessPool

    from sdseg_monai.batch import BatchRunner

    class BrokenPool:
        """The first SEG is pending when the processes die; the next submit finds the pool broken."""

        submitted: list = []

        def submit(self, fn, *args):
            self.submitted.append(Future())
            if len(self.submitted) > 1:
                self.submitted[0].set_exception(BrokenProcessPool("a child process terminated abruptly"))
                raise BrokenProcessPool("a child process terminated abruptly")
            return self.submitted[0]

        def shutdown(self, **options):
            pass

    monkeypatch.setattr(BatchRunner, "_seg_pool", lambda self: BrokenPool())
    for index in (1, 2):
        write(ct_slices(IMAGE, study=uid(5), series=uid(5, index)), tmp_path / "in" / f"ct{index}")
    report = BatchRunner(model_dir, tmp_path / "out", dicom_seg=True, seg_writers=2).run(tmp_path / "in")
    assert report.exit_code == 0 and len(BrokenPool.submitted) == 2  # one pending, one refused
    assert [r["status"] for r in report.rows] == ["ok", "ok"]
    for index in (1, 2):
        folder = tmp_path / "out" / uid(5) / uid(5, index)
        assert (folder / "seg.dcm").is_file() and (folder / "done.json").is_file()


def test_an_error_in_the_progress_callback_with_seg_writer_processes_is_raised_not_hung(model_dir, tmp_path):
    """The last case's SEG is still being encoded in a process when the writer thread takes the stop
    marker; finishing that case then raises (here the progress callback). The error reaches the caller.
    Before, the writer thread waited for a second stop marker that never came, and run() hung."""
    pytest.importorskip("highdicom")
    import threading

    from sdseg_monai.batch import BatchRunner

    write(ct_slices(IMAGE, study=uid(6), series=uid(6, 1)), tmp_path / "in" / "ct")

    def progress(done, total, row):
        if row:
            raise RuntimeError("the caller's own bug")

    outcome = []

    def run():
        try:
            BatchRunner(model_dir, tmp_path / "out", dicom_seg=True, seg_writers=1).run(tmp_path / "in", progress=progress)
        except RuntimeError as e:
            outcome.append(str(e))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout=300)  # a guard against a hang, not a timing check
    assert not thread.is_alive() and outcome == ["the caller's own bug"]


def _nifti(path: Path, image=IMAGE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(image.astype(np.float32), np.diag([0.8, 0.7, 3.0, 1.0])), str(path))
    return path


def _count_segments(monkeypatch) -> list:
    from sdseg_monai.inference import VolumeSegmenter

    calls = []
    original = VolumeSegmenter.segment
    monkeypatch.setattr(VolumeSegmenter, "segment", lambda self, volume, **k: calls.append(volume.source) or original(self, volume, **k))
    return calls


def test_nifti_files_that_would_share_an_output_folder_both_fail(model_dir, tmp_path, monkeypatch):
    """scan.nii beside scan.nii.gz (any case of the suffix) map to one folder: both fail, every run and
    on every shard, naming each other. Before, one overwrote the other's outputs, and a rerun
    reported the other ok from the done-record of the first."""
    from sdseg_monai.batch import BatchRunner

    calls = _count_segments(monkeypatch)
    _nifti(tmp_path / "in" / "a.nii.gz")
    out = tmp_path / "out"
    assert BatchRunner(model_dir, out, dicom_seg=False).run(tmp_path / "in").exit_code == 0
    assert (out / "nifti" / "a" / "done.json").is_file() and len(calls) == 1
    _nifti(tmp_path / "in" / "a.nii", IMAGE[:, :, :5])
    _nifti(tmp_path / "in" / "sub" / "scan.NII.GZ")
    _nifti(tmp_path / "in" / "sub" / "scan.nii")
    _nifti(tmp_path / "in" / "sub" / "scan2.nii")  # a neighbour of its own
    calls.clear()
    report = BatchRunner(model_dir, out, dicom_seg=False).run(tmp_path / "in")
    rows = {r["case"]: r for r in report.rows}
    assert report.exit_code == 3 and calls == [str(tmp_path / "in" / "sub" / "scan2.nii")]
    assert rows["sub/scan2.nii"]["status"] == "ok"
    for pair, folder in ((("a.nii", "a.nii.gz"), "nifti/a"), (("sub/scan.NII.GZ", "sub/scan.nii"), "nifti/sub/scan")):
        for case in pair:
            assert (rows[case]["status"], rows[case]["reason"]) == ("failed", "duplicate_output"), case
            message = rows[case]["message"]
            assert all(name in message for name in pair) and folder in message and "\n" not in message
    assert not (out / "nifti" / "sub" / "scan").exists()
    for shard in range(2):  # no rank writes either (the keys differ, so the ranks may too)
        cases = BatchRunner(model_dir, out, dicom_seg=False, shard=(shard, 2)).plan(tmp_path / "in")
        assert not [c for c in cases if c.key in ("a.nii", "a.nii.gz") and c.segmentable]


def test_a_summary_part_of_another_run_is_not_merged(model_dir, tmp_path, caplog):
    """A part left by an earlier run over another tree (a damaged file since removed) must not
    complete this run's merge: shard 0 rerun alone waits, and says why; shard 1 then merges this
    run's rows only. ``--merge`` by hand refuses a mix of runs, naming the stale part."""
    from sdseg_monai.batch import BatchRunner

    names = [f"s{k}.nii.gz" for k in range(12)]
    good0 = next(n for n in names if shard_of(n, 2) == 0)
    good1, bad1 = [n for n in names if shard_of(n, 2) == 1][:2]
    for name in (good0, good1):
        _nifti(tmp_path / "in" / name)
    (tmp_path / "in" / bad1).write_bytes(b"not a nifti")
    out = tmp_path / "out"
    assert BatchRunner(model_dir, out, dicom_seg=False, shard=(0, 2)).run(tmp_path / "in").exit_code == 0
    assert BatchRunner(model_dir, out, dicom_seg=False, shard=(1, 2)).run(tmp_path / "in").exit_code == 3
    (tmp_path / "in" / bad1).unlink()
    stale = out / "summary.part-1-of-2.jsonl"
    (out / "summary.csv").unlink()
    caplog.clear()
    report = BatchRunner(model_dir, out, dicom_seg=False, shard=(0, 2)).run(tmp_path / "in")
    assert report.summary is None and report.exit_code == 0 and report.ignored_parts == [stale]
    assert not (out / "summary.csv").exists()
    assert [r.getMessage() for r in caplog.records if r.name == "sdseg3d.batch"] == [
        f"{stale}: a summary part of another run (other cases, model, options or shard count); not merged"]
    assert main(["batch", "--merge", str(out), "-q"]) == 2  # by hand: a mix of runs is refused
    report = BatchRunner(model_dir, out, dicom_seg=False, shard=(1, 2)).run(tmp_path / "in")
    assert report.exit_code == 0 and report.ignored_parts == []
    assert {k: r["status"] for k, r in _rows(out).items()} == {good0: "ok", good1: "ok"}
    assert main(["batch", "--merge", str(out), "-q"]) == 0


def test_merge_by_hand_names_the_part_of_another_run(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    row = {"case": "x.nii.gz", "study_uid": "", "status": "ok"}
    for index, run in ((0, "new"), (1, "old")):
        (out / f"summary.part-{index}-of-2.jsonl").write_text(json.dumps({"sdseg3d_run": run}) + "\n" + json.dumps(row) + "\n")
    os.utime(out / "summary.part-1-of-2.jsonl", ns=(1, 1))  # the older one
    assert main(["batch", "--merge", str(out), "-q"]) == 2
    err = capsys.readouterr().err
    assert f"{out / 'summary.part-1-of-2.jsonl'}: a summary part of another run than summary.part-0-of-2.jsonl" in err
    assert len(err.splitlines()) == 1 and not (out / "summary.csv").exists()


def test_a_nifti_file_is_hashed_once_and_its_done_record_names_what_was_read(model_dir, tmp_path, monkeypatch):
    """The done-key of a NIfTI case comes from one hash, taken when planning. A file replaced after
    it was read is not vouched for by the done-record: the case fails, and the next run segments the
    new file. Before, the writer thread hashed the file again, and the done-record named the new
    file's bytes over labels of the old one: every later run skipped it."""
    import sdseg_monai.batch
    import sdseg_monai.data
    from sdseg_monai.batch import BatchRunner

    scan = _nifti(tmp_path / "in" / "scan.nii.gz")
    replacement = _nifti(tmp_path / "replacement.nii.gz", IMAGE[:, :, :5])
    hashed = []
    file_sha256 = sdseg_monai.batch.file_sha256
    monkeypatch.setattr(sdseg_monai.batch, "file_sha256", lambda path: hashed.append(path) or file_sha256(path))
    read_volume = sdseg_monai.data.read_volume

    def read_then_replace(path):
        volume = read_volume(path)
        shutil.copyfile(replacement, tmp_path / "new.nii.gz")
        os.replace(tmp_path / "new.nii.gz", scan)  # someone replaces the input meanwhile
        return volume

    monkeypatch.setattr(sdseg_monai.data, "read_volume", read_then_replace)
    calls = _count_segments(monkeypatch)
    out = tmp_path / "out"
    report = BatchRunner(model_dir, out, dicom_seg=False).run(tmp_path / "in")
    assert (report.rows[0]["status"], report.rows[0]["reason"]) == ("failed", "read_error")
    assert "changed since the run hashed it" in report.rows[0]["message"] and hashed == [scan]
    assert not (out / "nifti" / "scan" / "done.json").exists()
    monkeypatch.setattr(sdseg_monai.data, "read_volume", read_volume)
    hashed.clear()
    assert BatchRunner(model_dir, out, dicom_seg=False).run(tmp_path / "in").exit_code == 0
    assert hashed == [scan] and len(calls) == 1  # one hash for planning and the done-record
    assert nib.load(str(out / "nifti" / "scan" / "label.nii.gz")).shape == (24, 20, 5)
    assert BatchRunner(model_dir, out, dicom_seg=False).run(tmp_path / "in").exit_code == 0 and len(calls) == 1


def test_a_done_record_whose_outputs_are_missing_or_empty_does_not_count(model_dir, tmp_path, monkeypatch):
    """After a power loss a done-record can survive its label file, empty: the case is not done."""
    from sdseg_monai.batch import BatchRunner

    _nifti(tmp_path / "in" / "scan.nii.gz")
    calls = _count_segments(monkeypatch)
    out, folder = tmp_path / "out", tmp_path / "out" / "nifti" / "scan"
    assert BatchRunner(model_dir, out, dicom_seg=False).run(tmp_path / "in").exit_code == 0
    assert json.loads((folder / "done.json").read_text())["outputs"] == ["label.nii.gz", "label.json"]
    (folder / "label.nii.gz").write_bytes(b"")
    assert BatchRunner(model_dir, out, dicom_seg=False).run(tmp_path / "in").exit_code == 0 and len(calls) == 2
    assert nib.load(str(folder / "label.nii.gz")).shape == (24, 20, 6)
    (folder / "label.json").unlink()
    assert BatchRunner(model_dir, out, dicom_seg=False).run(tmp_path / "in").exit_code == 0 and len(calls) == 3
    assert BatchRunner(model_dir, out, dicom_seg=False).run(tmp_path / "in").exit_code == 0 and len(calls) == 3


def test_a_case_folder_loses_the_temporaries_of_a_killed_run(model_dir, tmp_path):
    """A SIGKILL or a power loss mid-write leaves ``.<name>.<random>`` temporaries: removed when the case
    is written again; other files of the folder stay."""
    from sdseg_monai.batch import BatchRunner

    _nifti(tmp_path / "in" / "scan.nii.gz")
    folder = tmp_path / "out" / "nifti" / "scan"
    folder.mkdir(parents=True)
    stale = [".label.nii.gz.k3j4h5g6.nii.gz", ".label.json.x1.json", ".done.json.abc.json", ".seg.dcm.q9.dcm", ".image.nii.gz.z.nii.gz"]
    kept = [".label.nii.gz", ".hidden", "notes.txt", ".labels.nii.gz.k3.nii.gz"]
    for name in stale + kept:
        (folder / name).write_text("partial")
    assert BatchRunner(model_dir, tmp_path / "out", dicom_seg=False).run(tmp_path / "in").exit_code == 0
    assert sorted(p.name for p in folder.iterdir()) == sorted(["done.json", "label.json", "label.nii.gz", *kept])


SIGTERM_SCRIPT = """
import sys, time
from pathlib import Path
import sdseg_monai.batch as batch
from sdseg_monai.cli import main
from sdseg_monai.data import atomic_paths

write_text = batch.atomic_write_text

def stalled(path, text):  # the summary: stop half-way through writing it, in the main thread
    if Path(path).name != "summary.jsonl":
        return write_text(path, text)
    with atomic_paths(Path(path)) as (tmp,):
        tmp.write_text(text[:10])
        Path(sys.argv[1]).touch()
        time.sleep(600)

batch.atomic_write_text = stalled
sys.exit(main(sys.argv[2:]))
"""


def test_sigterm_leaves_no_temporary_file(model_dir, tmp_path):
    """torchrun stops the other ranks with SIGTERM when one fails; Python's default action for it
    runs no ``finally``, so a temporary being written stayed. batch turns it into an interrupt."""
    _nifti(tmp_path / "in" / "scan.nii.gz")
    out, marker = tmp_path / "out", tmp_path / "writing"
    process = subprocess.Popen([sys.executable, "-c", SIGTERM_SCRIPT, str(marker), "batch", str(tmp_path / "in"), "-o", str(out),
                                "-m", str(model_dir), "-q", "--no-dicom-seg"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300  # a guard against a hang, not a timing check
    while not marker.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert process.poll() is None, process.communicate()[1][-2000:]
    assert list(out.glob(".summary.jsonl.*"))  # caught half-way
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130 and "sdseg3d: interrupted" in err, err[-2000:]
    assert not list(out.glob(".summary.jsonl.*")) and not (out / "summary.jsonl").exists()
