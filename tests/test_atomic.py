"""Atomic writes (sdseg_monai.data.atomic_paths): permissions from the umask without setting it, data
on disk before the rename, and the cleanup of a killed run's temporaries."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

import sdseg_monai.data as data
from sdseg_monai.data import atomic_paths, atomic_write_text, current_umask, remove_stale_temporaries

pytestmark = pytest.mark.skipif(os.name != "posix", reason="POSIX permissions and fsync of folders")


@pytest.fixture
def umask_027():
    set_umask = os.umask  # the real one, whatever a test patches
    previous = set_umask(0o027)  # the test's own process setting, restored after
    yield 0o027
    set_umask(previous)


def test_atomic_paths_reads_the_umask_without_setting_it(tmp_path, monkeypatch, umask_027):
    """os.umask() sets the umask process-wide: a thread creating a file or folder meanwhile got the
    value passed (0: world-writable). The umask in force still decides the permissions."""

    def umask(_):
        raise AssertionError("os.umask called while writing")

    monkeypatch.setattr(os, "umask", umask)
    written = atomic_write_text(tmp_path / "x.json", "{}\n")
    assert stat.S_IMODE(written.stat().st_mode) == 0o666 & ~umask_027 == 0o640
    with atomic_paths(tmp_path / "a.txt", tmp_path / "b.txt") as temps:
        for tmp in temps:
            tmp.write_text("x")
    assert {stat.S_IMODE((tmp_path / n).stat().st_mode) for n in ("a.txt", "b.txt")} == {0o640}


def test_a_replaced_model_folder_takes_the_umask_without_setting_it(tmp_path, monkeypatch, umask_027):
    """The same for the folders that calibrate, export-bundle and train-autoencoder put in place."""
    import tempfile

    from sdseg_monai.model import replace_dir

    new = Path(tempfile.mkdtemp(dir=tmp_path))  # 0700, as the writers make it
    (new / "config.json").write_text("{}\n")

    def umask(_):
        raise AssertionError("os.umask called while replacing a folder")

    monkeypatch.setattr(os, "umask", umask)
    replace_dir(new, tmp_path / "model")
    assert stat.S_IMODE((tmp_path / "model").stat().st_mode) == 0o777 & ~umask_027 == 0o750


def test_the_umask_falls_back_to_its_value_at_import(tmp_path, monkeypatch, umask_027):
    """Without /proc (macOS, a sandbox), the value read once at import stands in."""
    if data._proc_umask() != umask_027:
        pytest.skip("no Umask: line in /proc/self/status")
    monkeypatch.setattr(data, "_PROC_STATUS", str(tmp_path / "missing"))
    monkeypatch.setattr(data, "_UMASK_AT_IMPORT", 0o002)
    assert current_umask() == 0o002
    assert stat.S_IMODE(atomic_write_text(tmp_path / "x.json", "{}\n").stat().st_mode) == 0o664


def test_atomic_paths_syncs_each_file_before_its_rename_and_the_folder_after(tmp_path, monkeypatch):
    """Without it, a power loss can keep a rename (a done-record) and lose the data written before
    it (the label file, left empty): a rerun would then skip the case."""
    events = []
    fsync, replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))) or fsync(fd))
    monkeypatch.setattr(os, "replace", lambda a, b: events.append(("replace", str(a), str(b))) or replace(a, b))
    if not Path("/proc/self/fd").is_dir():
        pytest.skip("no /proc/self/fd to name the file synced")
    (tmp_path / "sub").mkdir()
    targets = [tmp_path / "label.nii.gz", tmp_path / "sub" / "label.json"]
    with atomic_paths(*targets) as temps:
        for tmp in temps:
            tmp.write_text("data")
    names = [str(t) for t in temps]
    assert events == [("fsync", names[0]), ("fsync", names[1]), ("replace", names[0], str(targets[0])),
                      ("replace", names[1], str(targets[1])), ("fsync", str(tmp_path)), ("fsync", str(tmp_path / "sub"))]


def test_a_failed_write_syncs_and_renames_nothing(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(os, "fsync", calls.append)
    with pytest.raises(OSError, match="disk full"):
        with atomic_paths(tmp_path / "x.json") as (tmp,):
            tmp.write_text("half")
            raise OSError("disk full")
    assert calls == [] and list(tmp_path.iterdir()) == []


def test_remove_stale_temporaries_removes_only_its_own_naming(tmp_path):
    ours = [".label.nii.gz.abcd1234.nii.gz", ".done.json.x.json", ".we[ird].json.q.json"]
    others = [".label.nii.gz", "label.nii.gz", ".label.nii.gzz", ".done.jsonx.json", ".other.json.a.json", ".weird.json.q.json"]
    for name in ours + others:
        (tmp_path / name).write_text("x")
    target = tmp_path.parent / f"{tmp_path.name}_link_target.nii.gz"
    target.write_text("kept")
    (tmp_path / ".label.nii.gz.zz.old").symlink_to(target)  # atomic_paths' backup of a symlinked output
    ours.append(".label.nii.gz.zz.old")
    removed = remove_stale_temporaries(tmp_path, ["label.nii.gz", "done.json", "we[ird].json"])
    assert sorted(p.name for p in removed) == sorted(ours)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(others)
    assert target.read_text() == "kept"  # the link went, not what it points to
