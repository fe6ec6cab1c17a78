"""`sdseg3d serve-dicom`: CT series arrive over DICOM on localhost, SEGs go to a test PACS.

Every wait is bounded, and each test stops the node and its peers itself."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest

pytest.importorskip("pynetdicom")
pytest.importorskip("highdicom")

from dicom_series import ct_slices, phantom_ct, uid, write  # noqa: E402
from sdseg_monai.node import LABELMAP_SEG_STORAGE, DicomNode, Peer, parse_allow, parse_peer  # noqa: E402

SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
PATIENT = "Secret^Patient"
IMAGE, _ = phantom_ct((24, 20, 6))
WAIT = 60.0  # seconds: the longest any condition is waited for


def wait_for(condition, what: str, timeout: float = WAIT):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Pacs:
    """A test PACS: a pynetdicom Storage SCP keeping what it receives; LABELMAP SEG only on request."""

    def __init__(self, port: int, labelmap: bool = False):
        from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless
        from pynetdicom import AE, evt
        from pynetdicom.presentation import StoragePresentationContexts

        self.port, self.received = port, []
        ae = AE(ae_title="PACS")
        ae.supported_contexts = StoragePresentationContexts
        ae.add_supported_context("1.2.840.10008.1.1")
        if labelmap:
            ae.add_supported_context(LABELMAP_SEG_STORAGE, [RLELossless, ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        self.ae, self.server = ae, None
        self.handlers = [(evt.EVT_C_STORE, self._store)]

    def _store(self, event):
        ds = event.dataset
        ds.file_meta = event.file_meta
        self.received.append(ds)
        return 0x0000

    def __enter__(self):
        self.server = self.ae.start_server(("127.0.0.1", self.port), block=False, evt_handlers=self.handlers)
        return self

    def __exit__(self, *exc):
        self.server.shutdown()


def send(datasets, port: int, calling: str = "SCANNER") -> list[int] | None:
    """C-STORE ``datasets`` in one association; their statuses, or None when the association fails."""
    from pydicom.uid import ExplicitVRLittleEndian
    from pynetdicom import AE

    ae = AE(ae_title=calling)
    for sop_class in sorted({str(ds.SOPClassUID) for ds in datasets}):
        ae.add_requested_context(sop_class, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="SDSEG")
    if not assoc.is_established:
        return None
    try:
        return [int(assoc.send_c_store(ds).Status) for ds in datasets]
    finally:
        assoc.release()


def echo(port: int, calling: str = "SCANNER") -> int | None:
    from pynetdicom import AE

    ae = AE(ae_title=calling)
    ae.add_requested_context("1.2.840.10008.1.1")
    assoc = ae.associate("127.0.0.1", port, ae_title="SDSEG")
    if not assoc.is_established:
        return None
    try:
        return int(assoc.send_c_echo().Status)
    finally:
        assoc.release()


def rows(store: Path) -> dict:
    path = store / "results" / "summary.jsonl"
    return {r["case"]: r for r in map(json.loads, path.read_text().splitlines())} if path.is_file() else {}


def node(model_dir, store, pacs_port=None, **options) -> DicomNode:
    forward = Peer("PACS", "127.0.0.1", pacs_port) if pacs_port else None
    settings = dict(port=0, host="127.0.0.1", forward=forward, quiet_seconds=0.5, retry_seconds=0.2, max_retry_seconds=0.5, device="cpu")
    return DicomNode(model_dir, store, **{**settings, **options})


def series(number: int, study: int = 1, **options):
    return ct_slices(IMAGE + 10 * number, study=uid(study), series=uid(study, number), patient_name=PATIENT, **options)


def test_round_trip_gives_the_labels_of_segment(model_dir, tmp_path, caplog):
    from test_dicom_seg import _highdicom_labels

    from sdseg_monai.data import read_volume
    from sdseg_monai.inference import VolumeSegmenter

    caplog.set_level(logging.DEBUG)
    datasets = series(1)
    with Pacs(free_port()) as pacs, node(model_dir, tmp_path / "store", pacs.port) as scp:
        assert echo(scp.port) == 0x0000
        assert send(datasets, scp.port) == [0x0000] * len(datasets)
        wait_for(lambda: pacs.received, "the SEG at the PACS")
        wait_for(scp.idle, "the node to settle")
    (seg,) = pacs.received
    assert str(seg.SOPClassUID) == SEG_STORAGE and seg.StudyInstanceUID == uid(1)
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == uid(1, 1)
    # The SEG decodes to what `sdseg3d segment` gives on the same series.
    source_dir = write(datasets, tmp_path / "sent")[0].parent
    expected = VolumeSegmenter(model_dir, device="cpu").segment(read_volume(source_dir)).labels
    seg_path = tmp_path / "back.dcm"
    seg.save_as(seg_path, enforce_file_format=True)
    assert expected.any() and np.array_equal(_highdicom_labels(seg_path, datasets), expected)
    row = rows(tmp_path / "store")[uid(1, 1)]
    assert row["status"] == "ok" and row["forward"] == "sent" and row["images_used"] == len(datasets)
    stored = sorted(p.name for p in (tmp_path / "store" / "incoming" / uid(1) / uid(1, 1)).iterdir())
    assert stored == sorted(f"{ds.SOPInstanceUID}.dcm" for ds in datasets)  # atomic writes: no temporaries left
    # Logs name UIDs, never the patient.
    assert any(uid(1, 1) in r.getMessage() for r in caplog.records if r.name == "sdseg3d.node")
    assert not any("Secret" in r.getMessage() for r in caplog.records)


def test_two_associations_a_second_series_and_a_non_ct_series(model_dir, tmp_path):
    first, second = series(1), series(2)
    mr = ct_slices(IMAGE, study=uid(1), series=uid(1, 3), modality="MR", patient_name=PATIENT)
    for ds in mr:
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.4"  # MR Image Storage
    with Pacs(free_port()) as pacs, node(model_dir, tmp_path / "store", pacs.port, quiet_seconds=2.0) as scp:
        assert send(first[:3], scp.port) == [0] * 3
        assert send(first[3:] + second, scp.port) == [0] * (len(first) - 3 + len(second))
        assert send(mr, scp.port) == [0x0122] * len(mr)  # refused politely, with a status
        wait_for(lambda: len(pacs.received) == 2, "two SEGs")
        wait_for(scp.idle, "the node to settle")
    summary = rows(tmp_path / "store")
    assert summary[uid(1, 1)]["images_used"] == len(first)  # both associations, one series
    assert summary[uid(1, 2)]["status"] == "ok"
    assert summary[uid(1, 3)]["status"] == "skipped" and summary[uid(1, 3)]["reason"] == "not_ct"
    assert sorted(ds.ReferencedSeriesSequence[0].SeriesInstanceUID for ds in pacs.received) == [uid(1, 1), uid(1, 2)]
    assert not (tmp_path / "store" / "incoming" / uid(1) / uid(1, 3)).exists()
    assert (tmp_path / "store" / "results" / "summary.csv").read_text().splitlines()[0].split(",")[13] == "forward"


def test_only_allowed_callers_are_heard(model_dir, tmp_path):
    assert parse_allow("GOOD, OTHER@127.0.0.1") == [("GOOD", None), ("OTHER", "127.0.0.1")]
    allow = parse_allow("GOOD@127.0.0.1,NEAR@10.255.255.1")
    with node(model_dir, tmp_path / "store", allow=allow) as scp:
        assert echo(scp.port, "GOOD") == 0x0000
        assert echo(scp.port, "EVIL") is None  # association rejected: unknown calling AE title
        assert send(series(1), scp.port, "EVIL") is None
        assert send(series(2), scp.port, "NEAR") == [0x0124] * 6  # the right title from the wrong host
        assert send(series(3), scp.port, "GOOD") == [0] * 6
        wait_for(lambda: uid(1, 3) in rows(tmp_path / "store"), "the allowed series")
    assert sorted(p.name for p in (tmp_path / "store" / "incoming" / uid(1)).iterdir()) == [uid(1, 3)]


def test_a_pacs_down_at_first_and_a_restart_with_a_queued_seg(model_dir, tmp_path):
    store, port = tmp_path / "store", free_port()
    with node(model_dir, store, port) as scp:  # nothing listens on the PACS port yet
        send(series(1), scp.port)
        wait_for(lambda: rows(store).get(uid(1, 1), {}).get("forward", "").startswith("retrying"), "a failed send")
        item = json.loads((store / "outbox" / f"{uid(1, 1)}.json").read_text())
        assert item["attempts"] >= 1 and item["last_error"] == "peer unreachable"
    assert (store / "outbox" / f"{uid(1, 1)}.json").is_file()  # stopped: the SEG waits on disk
    with Pacs(port) as pacs:
        with node(model_dir, store, port) as scp:  # restart: the queue is sent, nothing recomputed
            wait_for(lambda: pacs.received, "the queued SEG after the restart")
            wait_for(scp.idle, "the node to settle")
        assert not list((store / "outbox").iterdir()) and rows(store)[uid(1, 1)]["forward"] == "sent"
    # Down, then up while the node runs: the retry gets through.
    with node(model_dir, store, port) as scp:
        send(series(2), scp.port)
        wait_for(lambda: (store / "outbox" / f"{uid(1, 2)}.json").is_file() and json.loads((store / "outbox" / f"{uid(1, 2)}.json").read_text())["attempts"] >= 1, "a failed send")
        with Pacs(port) as pacs:
            wait_for(lambda: pacs.received, "the SEG once the PACS is up")
            wait_for(scp.idle, "the node to settle")
    assert pacs.received[0].ReferencedSeriesSequence[0].SeriesInstanceUID == uid(1, 2)
    assert len(pacs.received) == 1  # series 1 was not sent twice


@pytest.mark.parametrize("takes_labelmap", [True, False])
def test_labelmap_seg_falls_back_to_binary_where_the_pacs_refuses_it(model_dir, tmp_path, takes_labelmap):
    with Pacs(free_port(), labelmap=takes_labelmap) as pacs, node(model_dir, tmp_path / "store", pacs.port, seg_type="labelmap") as scp:
        send(series(1), scp.port)
        wait_for(lambda: pacs.received, "the SEG")
        wait_for(scp.idle, "the node to settle")
    (seg,) = pacs.received
    assert str(seg.SOPClassUID) == (LABELMAP_SEG_STORAGE if takes_labelmap else SEG_STORAGE)
    state = rows(tmp_path / "store")[uid(1, 1)]["forward"]
    assert state == ("sent" if takes_labelmap else "sent (binary, the peer refused labelmap)")


def _referenced(seg) -> set[str]:
    return {item.ReferencedSOPInstanceUID for item in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence}


def _incoming(store: Path, datasets) -> None:
    """``datasets`` as the node stores what arrives (late instances, without the network)."""
    write(datasets, store / "incoming" / uid(1) / uid(1, 1), names=[f"{ds.SOPInstanceUID}.dcm" for ds in datasets])


def test_late_instances_give_a_new_binary_seg_where_the_pacs_refuses_labelmap(model_dir, tmp_path):
    """The BINARY rewrite belongs to the SEG it was made from: after late instances the peer gets the
    new labels, not the first SEG's rewrite again."""
    datasets, store = series(1), tmp_path / "store"
    with Pacs(free_port()) as pacs, node(model_dir, store, pacs.port, seg_type="labelmap") as scp:
        assert send(datasets[:4], scp.port) == [0] * 4
        wait_for(lambda: pacs.received, "the first SEG")
        wait_for(scp.idle, "the node to settle")
        assert send(datasets[4:], scp.port) == [0] * 2
        wait_for(lambda: len(pacs.received) == 2, "the SEG of the whole series")
        wait_for(scp.idle, "the node to settle")
    first, second = pacs.received
    assert str(second.SOPClassUID) == SEG_STORAGE and len(_referenced(first)) == 4
    assert _referenced(second) == {ds.SOPInstanceUID for ds in datasets}  # was the first's 4 again
    assert rows(store)[uid(1, 1)]["forward"] == "sent (binary, the peer refused labelmap)"


def test_derived_series_taken_with_include_derived_get_their_binary_seg(model_dir, tmp_path):
    """The BINARY rewrite reads the source series as the node's runner does (--include-derived too)."""
    datasets = series(1, image_type=("DERIVED", "SECONDARY", "MPR"))
    options = dict(seg_type="labelmap", include_derived=True)
    with Pacs(free_port()) as pacs, node(model_dir, tmp_path / "store", pacs.port, **options) as scp:
        assert send(datasets, scp.port) == [0] * 6
        wait_for(lambda: pacs.received, "the BINARY SEG")
        wait_for(scp.idle, "the node to settle")
    (seg,) = pacs.received
    assert str(seg.SOPClassUID) == SEG_STORAGE and _referenced(seg) == {ds.SOPInstanceUID for ds in datasets}


def test_a_seg_rewritten_while_the_old_one_is_sent_is_sent_too(model_dir, tmp_path):
    """Late instances are segmented while the first SEG is on its way: the old SEG must not be marked
    as sent for the new one (before, the new SEG found the outbox item and was never sent)."""
    datasets, store = series(1), tmp_path / "store"
    with Pacs(free_port()) as pacs, node(model_dir, store, pacs.port) as scp:
        original, calls = scp._c_store, []

        def c_store(ds):
            calls.append(ds.SOPInstanceUID)
            if len(calls) == 1:
                _incoming(store, datasets[4:])
                scp._process_series(uid(1), uid(1, 1))
            return original(ds)

        scp._c_store = c_store
        assert send(datasets[:4], scp.port) == [0] * 4
        wait_for(lambda: len(pacs.received) == 2, "the SEG of the whole series")
        wait_for(scp.idle, "the node to settle")
    first, second = pacs.received
    assert len(_referenced(first)) == 4 and _referenced(second) == {ds.SOPInstanceUID for ds in datasets}
    folder = store / "results" / uid(1) / uid(1, 1)
    on_disk = pydicom.dcmread(folder / "seg.dcm", stop_before_pixels=True).SOPInstanceUID
    assert json.loads((folder / "sent.json").read_text())["seg"] == on_disk == second.SOPInstanceUID
    assert rows(store)[uid(1, 1)]["forward"] == "sent" and not list((store / "outbox").iterdir())


def test_an_outbox_item_that_cannot_be_sent_is_retried_and_the_others_go(model_dir, tmp_path):
    """A damaged seg.dcm, and a LABELMAP SEG the peer refuses whose source series is gone: each is a
    failed attempt with its reason, retried with back-off; the sender lives on and sends the rest.
    Before, the first raised out of the sender thread, and nothing was forwarded again."""
    from test_dicom_seg import _phantom, _write

    store = tmp_path / "store"
    damaged, gone = (store / "results" / "1.2.3" / f"1.2.3.{k}" for k in (4, 5))
    for folder in (damaged, gone):
        folder.mkdir(parents=True)
        item = {"case": folder.name, "study_uid": "1.2.3", "series_uid": folder.name, "result": f"1.2.3/{folder.name}",
                "attempts": 0, "next_attempt": 0.0, "last_error": ""}
        (store / "outbox").mkdir(exist_ok=True)
        (store / "outbox" / f"{folder.name}.json").write_text(json.dumps(item))  # sorted before the real series
    (damaged / "seg.dcm").write_bytes(b"not DICOM at all" * 20)
    sources, labels = _phantom(tmp_path)
    shutil.copy(_write(tmp_path, "labelmap", labels, sources, seg_type="labelmap"), gone / "seg.dcm")
    with Pacs(free_port()) as pacs, node(model_dir, store, pacs.port, retry_seconds=5.0, max_retry_seconds=5.0) as scp:
        assert send(series(1), scp.port) == [0] * 6
        wait_for(lambda: pacs.received, "the SEG of the series sent after them")
        assert all(thread.is_alive() for thread in scp._threads)
    assert [ds.ReferencedSeriesSequence[0].SeriesInstanceUID for ds in pacs.received] == [uid(1, 1)]
    errors = {name: json.loads((store / "outbox" / f"{name}.json").read_text()) for name in ("1.2.3.4", "1.2.3.5")}
    assert errors["1.2.3.4"]["attempts"] >= 1 and errors["1.2.3.4"]["last_error"] == "cannot send (InvalidDicomError)"
    assert errors["1.2.3.5"]["last_error"].startswith("cannot send (SDSegInputError: ")
    assert errors["1.2.3.5"]["last_error"].endswith("1.2.3.5: the source series of this SEG is gone, or no longer passes QC)")
    assert all(1 <= item["attempts"] <= 5 for item in errors.values())  # backed off (5 s), not spinning


def test_bad_options_are_one_line_errors(model_dir, tmp_path, capsys):
    from sdseg_monai.cli import main
    from sdseg_monai.errors import SDSegInputError

    assert parse_peer("PACS@pacs.example:104") == Peer("PACS", "pacs.example", 104)
    for text in ("PACS@host", "host:104", "@host:104", "PACS@host:99999", "A_TITLE_LONGER_THAN_16@h:1"):
        with pytest.raises(SDSegInputError):
            parse_peer(text)
    code = main(["serve-dicom", "--store", str(tmp_path / "s"), "--forward", "nonsense", "-m", str(model_dir)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "--forward must be AE@HOST:PORT" in err and len(err.splitlines()) == 1
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        code = main(["serve-dicom", "--store", str(tmp_path / "s"), "--host", "127.0.0.1", "--port", str(busy.getsockname()[1]),
                     "-m", str(model_dir), "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "cannot listen on port" in err and "Traceback" not in err


def test_the_command_serves_until_sigterm(model_dir, tmp_path):
    port = free_port()
    command = [sys.executable, "-m", "sdseg_monai.cli", "serve-dicom", "--store", str(tmp_path / "store"), "--host", "127.0.0.1",
               "--port", str(port), "-m", str(model_dir), "--device", "cpu", "--quiet-seconds", "0.5"]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        wait_for(lambda: process.poll() is not None or echo(port) == 0, "the node to answer C-ECHO")
        assert process.poll() is None
        assert send(series(1), port) == [0] * 6
        wait_for(lambda: rows(tmp_path / "store").get(uid(1, 1), {}).get("status") == "ok", "the series to be segmented")
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=WAIT) == 0
        log = process.stderr.read()
        assert uid(1, 1) in log and "Secret" not in log and "stopping" in log
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "0", "-1"])
def test_seconds_that_are_not_positive_and_finite_are_refused(model_dir, tmp_path, capsys, value):
    """NaN passed the old ``<= 0`` check, and a node given it never segmented what it received."""
    from sdseg_monai.cli import main
    from sdseg_monai.errors import SDSegInputError

    store = tmp_path / "store"
    for name in ("quiet_seconds", "retry_seconds", "max_retry_seconds"):
        with pytest.raises(SDSegInputError, match="must be a finite number > 0") as error:
            DicomNode(model_dir, store, port=0, **{name: float(value)})
        assert "\n" not in str(error.value)
    for option in ("--quiet-seconds", "--retry-seconds"):
        code = main(["serve-dicom", "--store", str(store), "-m", str(model_dir), "--port", "0", "--device", "cpu", option, value])
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1 and option in err, err  # the CLI may refuse it before the node
    assert not store.exists()  # refused before anything was made


def test_the_command_says_nothing_of_hostile_headers(model_dir, tmp_path):
    """pydicom's warnings quote the values they find wrong: a UID that is a path with a line break (in
    the request itself, decoded on pynetdicom's threads), an over-long name or description, a character
    set it does not know. None reaches the log; the instances are refused or segmented as before."""
    import warnings

    port, store = free_port(), tmp_path / "store"
    with warnings.catch_warnings():  # pydicom warns here too, as these are set and sent
        warnings.simplefilter("ignore")
        hostile = ct_slices(IMAGE, study="../../../escape_study", series="../escape_series\nFAKE LOG LINE")
        long = ct_slices(IMAGE, study=uid(1), series=uid(1, 1), patient_name="Long^" + "N" * 100, description="D" * 120)
        charset = ct_slices(IMAGE, study=uid(1), series=uid(1, 2), patient_name=PATIENT)
        for ds in charset:
            ds.SpecificCharacterSet = "EVIL\nFAKE CHARSET"
    command = [sys.executable, "-m", "sdseg_monai.cli", "serve-dicom", "--store", str(store), "--host", "127.0.0.1",
               "--port", str(port), "-m", str(model_dir), "--device", "cpu", "--quiet-seconds", "0.5"]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        wait_for(lambda: process.poll() is not None or echo(port) == 0, "the node to answer C-ECHO")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert send(hostile, port) == [0xC000] * 6
            assert send(long, port) == [0] * 6 and send(charset, port) == [0] * 6
        wait_for(lambda: len(rows(store)) == 2, "both series to be done")
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=WAIT) == 0
        log = process.stderr.read()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert "refused an instance" in log and "stopping" in log
    assert [word for word in ("Warning", "warn", "FAKE", "escape", "exceeds", "EVIL", "NNNN", "DDDD", "Secret") if word in log] == [], log
    summary = rows(store)
    assert summary[uid(1, 1)]["status"] == "ok"
    assert summary[uid(1, 2)]["status"] == "failed" and "EVIL" not in json.dumps(summary[uid(1, 2)])


def test_an_item_whose_record_cannot_be_written_waits_instead_of_spinning(model_dir, tmp_path):
    """Where even the outbox record cannot be written (a full disk), the item waits the longest
    back-off in memory: it was sent to the peer again every second, for good."""
    store = tmp_path / "store"
    (store / "outbox").mkdir(parents=True)
    item = {"case": "1.2.3.4", "study_uid": "1.2.3", "series_uid": "1.2.3.4", "result": "1.2.3/1.2.3.4", "attempts": 0, "next_attempt": 0.0}
    (store / "outbox" / "1.2.3.4.json").write_text(json.dumps(item))
    tries = []
    with Pacs(free_port()) as pacs, node(model_dir, store, pacs.port, retry_seconds=0.2, max_retry_seconds=30.0) as scp:

        def full_disk(path, record):
            tries.append(time.monotonic())
            raise OSError(28, "No space left on device")

        scp._send_item = full_disk
        scp._wake_sender.set()
        time.sleep(2.5)
    assert len(tries) == 1, tries


def test_due_series_are_taken_longest_due_first(model_dir, tmp_path):
    """Where series arrive faster than they are segmented (about 100 s a CT on a CPU), the one due
    longest goes first, ties by UID. Before, the smallest UID went first: one sorting last could wait for good."""
    scp, taken = node(model_dir, tmp_path / "store"), []
    scp._process_series = lambda study, series: taken.append(series)
    now = time.monotonic()
    scp._pending = {(uid(1), uid(1, 1)): now - 10, (uid(2), uid(2, 9)): now - 40, (uid(1), uid(1, 5)): now - 20,
                    (uid(1), uid(1, 4)): now - 20, (uid(1), uid(1, 2)): now + 600}
    with scp:
        wait_for(lambda: len(taken) == 4, "the series due")
        assert list(scp._pending) == [(uid(1), uid(1, 2))]  # not due yet
    assert taken == [uid(2, 9), uid(1, 4), uid(1, 5), uid(1, 1)]


@pytest.mark.parametrize("failing", ["summary", "outbox item"])
def test_a_failure_after_segmenting_is_retried_and_the_seg_sent(model_dir, tmp_path, monkeypatch, caplog, failing):
    """A brief full disk while the summary or the outbox item is written: the series is taken up again
    (not segmented again) and its SEG sent. Before, it had left the queue: a done-record, a row saying
    "queued", and nothing in the outbox until a restart."""
    import sdseg_monai.batch

    caplog.set_level(logging.INFO, logger="sdseg3d.node")
    store, failed, segmented = tmp_path / "store", [], []

    def once(function):
        def failing_once(*args, **kwargs):
            if not failed and threading.current_thread().name == "sdseg3d-segment":
                failed.append(function)
                raise OSError(28, "No space left on device")
            return function(*args, **kwargs)
        return failing_once

    if failing == "summary":
        monkeypatch.setattr(sdseg_monai.batch, "write_summary", once(sdseg_monai.batch.write_summary))
    with Pacs(free_port()) as pacs, node(model_dir, store, pacs.port) as scp:
        if failing == "outbox item":
            scp._queue_seg = once(scp._queue_seg)
        segment_case = scp.runner.segment_case
        scp.runner.segment_case = lambda case, *args: segmented.append(case.key) or segment_case(case, *args)
        assert send(series(1), scp.port) == [0] * 6
        wait_for(lambda: pacs.received, "the SEG")
        wait_for(scp.idle, "the node to settle")
    assert failed and segmented == [uid(1, 1)] and len(pacs.received) == 1
    assert rows(store)[uid(1, 1)]["forward"] == "sent" and not list((store / "outbox").iterdir())
    assert any(f"series {uid(1, 1)}: processing failed (OSError); next try in" in r.getMessage() for r in caplog.records)


def test_a_series_arriving_while_the_node_starts_waits_for_its_quiet_time(model_dir, tmp_path, monkeypatch):
    """Series found in incoming/ at start are due at once; one whose instances arrive while the node
    starts waits for --quiet-seconds. Before, it was marked due too, and segmented while still arriving."""
    from pynetdicom import AE

    store, start_server = tmp_path / "store", AE.start_server
    _incoming(store, series(1))  # received before a restart

    def starting(ae, *args, **kwargs):
        server = start_server(ae, *args, **kwargs)
        assert send(series(2)[:3], server.server_address[1]) == [0] * 3  # the scanner sends on
        return server

    monkeypatch.setattr(AE, "start_server", starting)
    with node(model_dir, store, quiet_seconds=600.0) as scp:
        with scp._lock:
            due = scp._pending.get((uid(1), uid(1, 2)), 0.0)
        assert due > time.monotonic()
        wait_for(lambda: uid(1, 1) in rows(store), "the series received before the start")
    assert uid(1, 2) not in rows(store)


def test_a_restart_takes_up_only_the_series_that_need_it(model_dir, tmp_path):
    """At start, a series segmented on all its instances whose SEG was sent is not read again (before,
    every start read every series ever received); one whose SEG is neither sent nor queued, or that
    was never segmented, is. The summary keeps every row."""
    store, port = tmp_path / "store", free_port()
    with Pacs(port) as pacs:
        with node(model_dir, store, port) as scp:
            assert send(series(1) + series(2), scp.port) == [0] * 12
            wait_for(lambda: len(pacs.received) == 2, "two SEGs")
            wait_for(scp.idle, "the node to settle")
        (store / "results" / uid(1) / uid(1, 2) / "sent.json").unlink()  # as if lost: neither sent nor queued
        third = series(3)
        write(third, store / "incoming" / uid(1) / uid(1, 3), names=[f"{ds.SOPInstanceUID}.dcm" for ds in third])
        scp, taken = node(model_dir, store, port), []
        process_series = scp._process_series
        scp._process_series = lambda study, series: taken.append(series) or process_series(study, series)
        with scp:
            wait_for(lambda: len(pacs.received) == 4, "the SEGs of series 2 and 3")
            wait_for(scp.idle, "the node to settle")
    assert taken == [uid(1, 2), uid(1, 3)]
    summary = rows(store)
    assert sorted(summary) == [uid(1, 1), uid(1, 2), uid(1, 3)] and {r["forward"] for r in summary.values()} == {"sent"}


def test_instances_are_taken_while_the_summary_is_written(model_dir, tmp_path, monkeypatch):
    """The summary, rewritten whole for each series and each send, grows with the node's life: it is
    written outside the lock every C-STORE takes. Before, C-STORE responses waited for it."""
    import sdseg_monai.batch

    store, writing, release, statuses = tmp_path / "store", threading.Event(), threading.Event(), []
    write_summary = sdseg_monai.batch.write_summary

    def slow_write(*args, **kwargs):
        writing.set()
        release.wait(WAIT)
        return write_summary(*args, **kwargs)

    monkeypatch.setattr(sdseg_monai.batch, "write_summary", slow_write)
    with node(model_dir, store) as scp:
        try:
            assert send(series(1), scp.port) == [0] * 6
            wait_for(writing.is_set, "the summary being written")
            threading.Thread(target=lambda: statuses.append(send(series(2), scp.port)), daemon=True).start()
            wait_for(lambda: statuses, "C-STOREs while the summary is written")
        finally:
            release.set()
        wait_for(lambda: uid(1, 2) in rows(store), "the second series")
    assert statuses == [[0] * 6]


def test_stop_aborts_the_associations_in_progress(model_dir, tmp_path):
    """pynetdicom's server shutdown leaves running associations be, and their threads (not daemons)
    kept a stopped node's process alive until the caller let go."""
    from pynetdicom import AE

    ae = AE(ae_title="SCANNER")
    ae.add_requested_context("1.2.840.10008.1.1")
    scp = node(model_dir, tmp_path / "store").start()
    try:
        assoc = ae.associate("127.0.0.1", scp.port, ae_title="SDSEG")
        assert assoc.is_established
        acceptors = scp._server.active_associations
    finally:
        scp.stop()
    try:
        assert acceptors and not any(a.dul.is_alive() for a in acceptors)
        wait_for(lambda: assoc.is_aborted, "the A-ABORT at the caller")
    finally:
        if assoc.is_established:
            assoc.abort()


# serve-dicom whose segmentation takes as long as the test wants (minutes on a CPU, in life).
SEGMENTING_FOREVER = """
import os, sys, threading
from pathlib import Path
from sdseg_monai.batch import BatchRunner
from sdseg_monai.cli import main

def segment_case(self, case, *args, **kwargs):
    Path(os.environ["SDSEG_TEST_SEGMENTING"]).touch()
    threading.Event().wait()

BatchRunner.segment_case = segment_case
sys.exit(main(sys.argv[1:]))
"""


def test_a_second_signal_while_stopping_exits_at_once(model_dir, tmp_path):
    """The first SIGTERM lets the series in flight finish; a second signal (here Ctrl-C) ends the
    process at once, 130 and one line. Before, it was ignored: only SIGKILL ended a long segmentation."""
    port, store, segmenting, stderr = free_port(), tmp_path / "store", tmp_path / "segmenting", tmp_path / "stderr.txt"
    command = [sys.executable, "-c", SEGMENTING_FOREVER, "serve-dicom", "--store", str(store), "--host", "127.0.0.1",
               "--port", str(port), "-m", str(model_dir), "--device", "cpu", "--quiet-seconds", "0.5"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "SDSEG_TEST_SEGMENTING": str(segmenting)}
    with stderr.open("w") as err:
        process = subprocess.Popen(command, stderr=err, env=env)
    try:
        wait_for(lambda: process.poll() is not None or echo(port) == 0, "the node to answer C-ECHO")
        assert send(series(1), port) == [0] * 6
        wait_for(segmenting.exists, "the segmentation to start")
        process.send_signal(signal.SIGTERM)
        wait_for(lambda: "stopping" in stderr.read_text(), "the node to begin stopping")
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=WAIT) == 130
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    after = stderr.read_text().split("stopping", 1)[1].splitlines()[1:]
    assert len(after) == 1 and "interrupted" in after[0], after
    assert len(list((store / "incoming" / uid(1) / uid(1, 1)).iterdir())) == 6  # taken up at the next start
