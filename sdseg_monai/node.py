"""A DICOM node: CT series arrive by C-STORE, their segmentations go back as DICOM SEG.

:class:`DicomNode` is a Storage SCP (pynetdicom) that accepts CT images and C-ECHO, writes each
instance atomically under ``STORE/incoming/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm``
(validated UIDs only), and treats a series as complete once no instance of it has arrived for
``quiet_seconds``. A complete series goes through the reader, QC and segmenter of
:class:`~sdseg_monai.batch.BatchRunner` (one model, loaded once), which writes
``STORE/results/<study>/<series>[#k]/`` (labels, sidecar, ``seg.dcm``, done-record) and the summary.
Each SEG is queued in ``STORE/outbox/`` and sent by C-STORE to the forward peer; a failed send is
retried with exponential back-off, and the queue, being files, survives a restart. A LABELMAP SEG that
the peer refuses is rewritten and sent as BINARY. A series whose processing fails (e.g. a full disk) is
taken up again with the same back-off.

Logs name UIDs, AE titles and addresses only: no patient name or other header text.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from sdseg_monai._quiet import quiet_dicom
from sdseg_monai.errors import SDSegInputError, check_number

log = logging.getLogger("sdseg3d.node")

INCOMING, RESULTS, OUTBOX = "incoming", "results", "outbox"
SEG_NAME = "seg.dcm"
BINARY_SEG_NAME = "seg_binary.dcm"  # a LABELMAP SEG rewritten as BINARY for a peer that refuses LABELMAP
SENT_NAME = "sent.json"  # in a case's result folder once its SEG reached the forward peer (naming that SEG)
FORWARD_FIELD = "forward"  # the summary column saying where each SEG stands
CT_STORAGE = {
    "1.2.840.10008.5.1.4.1.1.2": "CT Image Storage",
    "1.2.840.10008.5.1.4.1.1.2.1": "Enhanced CT Image Storage",
    "1.2.840.10008.5.1.4.1.1.2.2": "Legacy Converted Enhanced CT Image Storage",
}
LABELMAP_SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.7"
# DIMSE statuses (PS3.4 annex B, PS3.7 annex C).
SUCCESS = 0x0000
REFUSED_SOP_CLASS = 0x0122  # "SOP class not supported": any image but CT
REFUSED_NOT_AUTHORIZED = 0x0124  # a calling host not in --allow
CANNOT_UNDERSTAND = 0xC000  # no valid UIDs
OUT_OF_RESOURCES = 0xA700  # the instance could not be written
WARNING_STATUSES = {0x0001, 0xB000, 0xB006, 0xB007}


def _pynetdicom():
    from monai.utils import optional_import

    module, ok = optional_import("pynetdicom")
    if not ok:
        raise SDSegInputError('the DICOM node needs pynetdicom: pip install "sdseg3d[dicom]"')
    return module


@dataclass(frozen=True)
class Peer:
    """A remote application entity: AE title, host and port."""

    ae_title: str
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


def _check_ae_title(title: str, what: str) -> str:
    if not title or len(title) > 16 or not title.isascii() or "\\" in title or not title.isprintable() or not title.strip():
        raise SDSegInputError(f"{what}: an AE title is 1 to 16 printable ASCII characters, got {title!r}")
    return title.strip()


def parse_peer(text: str) -> Peer:
    """``AE@HOST:PORT`` -> :class:`Peer`."""
    ae, at, address = text.rpartition("@")
    host, colon, port = address.rpartition(":")
    if not at or not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise SDSegInputError(f"--forward must be AE@HOST:PORT, e.g. PACS@10.0.0.5:104, got {text!r}")
    return Peer(_check_ae_title(ae, "--forward"), host, int(port))


def parse_allow(text: str | None) -> list[tuple[str, str | None]]:
    """``AE[@HOST],...`` -> [(AE title, IP address or None)]; hosts are resolved once, at start."""
    if not text:
        return []
    allowed = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        ae, _, host = item.partition("@")
        ae = _check_ae_title(ae, "--allow")
        if host:
            try:
                host = socket.gethostbyname(host)
            except OSError:
                raise SDSegInputError(f"--allow: cannot resolve host {host!r}") from None
        allowed.append((ae, host or None))
    return allowed


def _seconds(value, what: str) -> float:
    """A positive, finite number of seconds. NaN passes a ``<= 0`` check and would leave every series
    waiting for good, as infinity would."""
    return check_number(value, what, positive=True)


def _valid_uids(*values) -> bool:
    from sdseg_monai.dicom import valid_uid

    return all(valid_uid(v) for v in values)


class DicomNode:
    """Receive CT series, segment them, send their SEGs on. Initialise once, :meth:`start`, :meth:`stop`.

    Args:
        model: a saved model folder or bundle (loaded once).
        store: the node's folder (``incoming/``, ``results/``, ``outbox/``): not the model folder, nor
            one inside or above it.
        ae_title: this node's AE title.
        port: the port to listen on (0: any free port, see :attr:`port` after :meth:`start`).
        host: the address to listen on ("" for every interface).
        forward: where SEGs go (None: kept in ``results/`` only).
        allow: calling (AE title, IP or None) pairs accepted; empty accepts every caller.
        quiet_seconds: a series is complete once no instance of it arrived for this long.
        seg_type: ``"binary"`` or ``"labelmap"`` (falls back to binary where the peer refuses it).
        retry_seconds, max_retry_seconds: back-off of a failed send: retry_seconds, doubling up to
            max_retry_seconds.
        **segmenter_options: ``device``, ``batch_size``, ``organs``, ``seed``, ``precision``, ``compile`` (as ``batch``).
    """

    def __init__(self, model, store, *, ae_title: str = "SDSEG", port: int = 11112, host: str = "",
                 forward: Peer | None = None, allow: list[tuple[str, str | None]] | None = None,
                 quiet_seconds: float = 5.0, seg_type: str = "binary", retry_seconds: float = 5.0,
                 max_retry_seconds: float = 300.0, **segmenter_options):
        from sdseg_monai.batch import BatchRunner, dicom_seg_available
        from sdseg_monai.data import check_spares_inputs

        quiet_seconds = _seconds(quiet_seconds, "--quiet-seconds")
        retry_seconds = _seconds(retry_seconds, "--retry-seconds")
        max_retry_seconds = _seconds(max_retry_seconds, "max_retry_seconds")
        if max_retry_seconds < retry_seconds:
            raise SDSegInputError(f"--retry-seconds must be at most {max_retry_seconds:g}, the longest back-off; got {retry_seconds:g}")
        _pynetdicom()
        if not dicom_seg_available():
            raise SDSegInputError('the DICOM node writes DICOM SEG, which needs highdicom: pip install "sdseg3d[dicom]"')
        self.ae_title = _check_ae_title(ae_title, "--ae-title")
        self.store = Path(store)
        if self.store.exists() and not self.store.is_dir():
            raise SDSegInputError("--store must be a folder", self.store)
        check_spares_inputs([self.store], [model])  # its incoming/ and results/ never go into the model folder
        self.incoming, self.results, self.outbox = (self.store / name for name in (INCOMING, RESULTS, OUTBOX))
        for folder in (self.incoming, self.results, self.outbox):
            folder.mkdir(parents=True, exist_ok=True)
        self.runner = BatchRunner(model, self.results, dicom_seg=True, seg_type=seg_type, **segmenter_options)
        self.forward, self.allow = forward, list(allow or [])
        self.quiet_seconds, self.retry_seconds, self.max_retry_seconds = quiet_seconds, retry_seconds, max_retry_seconds
        self.bind = (host, int(port))
        self.port = int(port)
        self.rows: dict[str, dict] = self._load_rows()
        # (study, series) -> when it is due (time.monotonic()): quiet_seconds after its last instance
        self._pending: dict[tuple[str, str], float] = {}
        self._failures: dict[tuple[str, str], int] = {}  # series whose processing failed -> how many times in a row
        self._lock = threading.Lock()
        self._summary_lock = threading.Lock()  # summary writes, in the order of their snapshots
        self._stop = threading.Event()
        self._wake_sender = threading.Event()
        self._binary: dict[Path, str] = {}  # result folder -> the SEG its seg_binary.dcm was made for
        self._held: dict[str, float] = {}  # outbox item -> when to try again, where its record could not be written
        self._threads: list[threading.Thread] = []
        self._server = None
        self._quiet = contextlib.ExitStack()  # quiet_dicom() from start to stop
        self.busy = False  # a series is being segmented

    # -- life cycle -------------------------------------------------------------------------------
    def start(self) -> DicomNode:
        """Listen, and start the segmenting and sending threads. Series already received but not done
        (a previous run stopped before them) are taken up first; those done are not read again."""
        pynetdicom = _pynetdicom()
        from pydicom.uid import AllTransferSyntaxes
        from pynetdicom import evt
        from pynetdicom.presentation import StoragePresentationContexts

        ae = pynetdicom.AE(ae_title=self.ae_title)
        ae.add_supported_context("1.2.840.10008.1.1")  # Verification
        for context in StoragePresentationContexts:
            if context.abstract_syntax not in CT_STORAGE:  # refused with a status, not at negotiation
                ae.add_supported_context(context.abstract_syntax)
        for sop_class in CT_STORAGE:  # compressed CT too: the reader decodes RLE, JPEG, JPEG-LS, JPEG 2000
            ae.add_supported_context(sop_class, list(AllTransferSyntaxes))
        if self.allow:
            ae.require_calling_aet = sorted({title for title, _ in self.allow})
        handlers = [(evt.EVT_C_STORE, self._on_store), (evt.EVT_C_ECHO, self._on_echo), (evt.EVT_ACCEPTED, self._on_accepted)]
        # pynetdicom decodes what senders send on its own threads (a C-STORE request names the
        # instance's UID), and the SEGs sent hold the sources' patient: no value checks while serving.
        self._quiet.enter_context(quiet_dicom())
        try:
            self._server = ae.start_server(self.bind, block=False, evt_handlers=handlers)
        except OSError as e:
            self._quiet.close()
            raise SDSegInputError(f"cannot listen on port {self.bind[1]}: {e.strerror or e}") from None
        self.port = self._server.server_address[1]
        for series_dir in sorted(self.incoming.glob("*/*")):
            key = (series_dir.parent.name, series_dir.name)
            if series_dir.is_dir() and _valid_uids(*key) and not self._completed(*key):
                with self._lock:  # setdefault: an instance that arrived since the server started sets its own time
                    self._pending.setdefault(key, 0.0)  # due now: nothing more arrives for it from before
        for target, name in ((self._process_loop, "sdseg3d-segment"), (self._send_loop, "sdseg3d-forward")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        log.info("listening as %s on port %d; forwarding to %s", self.ae_title, self.port, self.forward or "nobody")
        return self

    def stop(self, timeout: float | None = None) -> None:
        """Stop listening, abort the associations in progress, let the series in flight finish (the rest
        stay on disk for the next start, the unsent SEGs in the outbox), and return."""
        if self._server is not None:
            server, self._server = self._server, None
            server.shutdown()
            for assoc in server.active_associations:  # shutdown() leaves them running, and their threads keep the process
                assoc.abort()
        self._stop.set()
        self._wake_sender.set()
        for thread in self._threads:
            thread.join(timeout)
        self._threads = []
        self._quiet.close()
        log.info("stopped; %d SEG(s) waiting in the outbox", len(list(self.outbox.glob("*.json"))))

    def __enter__(self) -> DicomNode:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def idle(self) -> bool:
        """Nothing waits to be segmented or sent (for tests and orderly shutdowns)."""
        with self._lock:
            pending = bool(self._pending)
        return not pending and not self.busy and not any(self.outbox.glob("*.json"))

    # -- receiving --------------------------------------------------------------------------------
    def _allowed(self, requestor) -> bool:
        if not self.allow:
            return True
        title = str(requestor.ae_title).strip()
        return any(title == ae and (host is None or host == requestor.address) for ae, host in self.allow)

    def _on_accepted(self, event) -> None:
        requestor = event.assoc.requestor
        log.info("association from %s at %s", str(requestor.ae_title).strip(), requestor.address)

    def _on_echo(self, event) -> int:
        return SUCCESS if self._allowed(event.assoc.requestor) else REFUSED_NOT_AUTHORIZED

    def _on_store(self, event) -> int:
        requestor = event.assoc.requestor
        if not self._allowed(requestor):
            log.warning("refused an instance from %s at %s: not in --allow", str(requestor.ae_title).strip(), requestor.address)
            return REFUSED_NOT_AUTHORIZED
        sop_class = str(event.request.AffectedSOPClassUID)
        try:
            ds = event.dataset
            study, series, sop = (str(ds.get(name, "")) for name in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"))
        except Exception:  # noqa: BLE001 - an undecodable dataset is refused, whatever broke
            study = series = sop = ""
        if not _valid_uids(study, series, sop):
            log.warning("refused an instance of class %s without valid study, series and instance UIDs", sop_class)
            return CANNOT_UNDERSTAND
        if sop_class not in CT_STORAGE:
            self._record_refused(study, series, sop_class)
            return REFUSED_SOP_CLASS
        folder = self.incoming / study / series
        try:
            from sdseg_monai.data import atomic_paths

            folder.mkdir(parents=True, exist_ok=True)
            with atomic_paths(folder / f"{sop}.dcm") as (tmp,):
                tmp.write_bytes(event.encoded_dataset())
        except OSError as e:
            log.error("series %s: cannot store instance %s (%s)", series, sop, e.strerror or type(e).__name__)
            return OUT_OF_RESOURCES
        with self._lock:
            self._pending[(study, series)] = time.monotonic() + self.quiet_seconds
        return SUCCESS

    def _record_refused(self, study: str, series: str, sop_class: str) -> None:
        with self._lock:
            if series in self.rows:
                return
            from sdseg_monai.batch import BatchCase, summary_row

            row = summary_row(BatchCase(series, study, series), "skipped", "not_ct", f"SOP class {sop_class} is not CT; refused (0x0122)")
            self.rows[series] = row
        self._write_summary()
        log.info("series %s: refused, SOP class %s is not CT", series, sop_class)

    # -- segmenting -------------------------------------------------------------------------------
    def _process_loop(self) -> None:
        while not self._stop.is_set():
            with self._lock:  # the longest due first: taken by UID, a series sorting last could wait for good
                now = time.monotonic()
                due = min(((at, key) for key, at in self._pending.items() if at <= now), default=None)
                if due is not None:
                    del self._pending[due[1]]
                    self.busy = True
            if due is None:
                self._stop.wait(0.1)
                continue
            key = due[1]
            try:
                self._process_series(*key)
                self._failures.pop(key, None)
            except Exception as e:  # noqa: BLE001 - e.g. a full disk: the node keeps serving, the series is retried
                self._failures[key] = self._failures.get(key, 0) + 1
                delay = self._backoff(self._failures[key])
                with self._lock:  # before busy drops, so that the node never looks idle meanwhile
                    self._pending.setdefault(key, time.monotonic() + delay)  # an instance that came meanwhile keeps its time
                log.error("series %s: processing failed (%s); next try in %.1f s", key[1], type(e).__name__, delay)
            finally:
                self.busy = False

    def _backoff(self, attempts: int) -> float:
        """Seconds before the next try after ``attempts`` failed ones: doubling, up to the longest."""
        return min(self.max_retry_seconds, self.retry_seconds * 2 ** (attempts - 1))

    def _process_series(self, study: str, series: str) -> None:
        from sdseg_monai.batch import collect_cases
        from sdseg_monai.dicom import index_tree

        cases = collect_cases(index_tree(self.incoming / study / series, include_derived=self.runner.include_derived), self.results,
                              self.runner.dicom_seg)
        for case in cases:
            if not case.segmentable:
                log.info("series %s: %s (%s)", case.key, case.row["status"], case.row["reason"])
            else:
                stored = self.runner.finished_row(case)
                if stored is not None:
                    case.row = stored
                else:
                    # Before the new SEG is written: removed after it, a send of the new one that finished
                    # meanwhile would lose its record and go again.
                    for stale in (SENT_NAME, BINARY_SEG_NAME):
                        (case.out_dir / stale).unlink(missing_ok=True)
                    self.runner.segment_case(case)
                    log.info("series %s: %s (%s) in %.1f s, %d images", case.key, case.row["status"], case.row["reason"],
                             case.row["seconds"], case.row["images_used"])
            forwarding = self.forward is not None and case.row["status"] == "ok"
            with self._lock:  # the row first: the sender updates it once the SEG is queued
                sent = _sent_state(case.out_dir) if forwarding else ""
                case.row[FORWARD_FIELD] = (sent or "queued") if forwarding else ""
                self.rows[case.key] = case.row
                if forwarding and not sent:  # under the lock: the sender's check that what it sent is still on disk is too
                    self._queue_seg(case.key, case.study_uid, case.series_uid, case.out_dir)
        if cases:
            self._write_summary()  # after the outbox items: a summary that cannot be written holds no SEG back

    def _completed(self, study: str, series: str) -> bool:
        """A series found at start that needs nothing: its done-record names exactly the instances on
        disk (and this model and these options), its row is in the summary, and its SEG was sent or
        waits in the outbox. Decided without reading a header. A series that was split into stacks, or
        had images dropped, has a done-record naming other instances: it is processed again."""
        from types import SimpleNamespace

        from sdseg_monai.batch import BatchCase

        folder, out_dir = self.incoming / study / series, self.results / study / series
        with os.scandir(folder) as entries:  # the node names each instance <SOPInstanceUID>.dcm
            instances = sorted(e.name[:-4] for e in entries if e.name.endswith(".dcm") and not e.name.startswith("."))
        case = BatchCase(series, study, series, stack=SimpleNamespace(sop_uids=instances), out_dir=out_dir)
        if series not in self.rows or self.runner.finished_row(case) is None:
            return False
        return self.forward is None or bool(_sent_state(out_dir)) or (self.outbox / f"{series}.json").is_file()

    def _queue_seg(self, key: str, study_uid: str, series_uid: str, folder: Path) -> None:
        """Put the case's SEG, not sent yet, in the outbox unless it waits there already. Call with the
        lock held."""
        from sdseg_monai.data import atomic_write_text

        item = self.outbox / f"{key}.json"
        if item.is_file() or not (folder / SEG_NAME).is_file():
            return
        record = {"case": key, "study_uid": study_uid, "series_uid": series_uid,
                  "result": folder.relative_to(self.results).as_posix(), "attempts": 0, "next_attempt": 0.0, "last_error": ""}
        atomic_write_text(item, json.dumps(record, indent=2) + "\n")
        self._wake_sender.set()

    # -- sending ----------------------------------------------------------------------------------
    def _send_loop(self) -> None:
        while not self._stop.is_set():
            self._wake_sender.clear()
            wait = 1.0
            for path in sorted(self.outbox.glob("*.json")):
                if self._stop.is_set():
                    return
                try:
                    record = json.loads(path.read_text(encoding="utf-8"))
                    delay = float(record.get("next_attempt", 0.0)) - time.time()
                except (OSError, ValueError, TypeError, AttributeError):  # half-gone or not an outbox item
                    continue
                delay = max(delay, self._held.get(path.name, 0.0) - time.time())
                if delay > 0:
                    wait = min(wait, delay)
                    continue
                try:
                    self._send_item(path, record)
                    self._held.pop(path.name, None)
                except Exception as e:  # noqa: BLE001 - e.g. a full disk: this item is retried later, the others go on
                    self._held[path.name] = time.time() + self.max_retry_seconds
                    log.error("outbox item %s: %s; next try in %.0f s", path.name, type(e).__name__, self.max_retry_seconds)
            self._wake_sender.wait(max(0.05, wait))

    def _send_item(self, path: Path, record: dict) -> None:
        """Send one outbox item. A failure of any kind (the peer, a damaged SEG, its source series gone)
        is a failed attempt, retried with back-off: nothing an item holds stops the sender."""
        from sdseg_monai.data import atomic_write_text

        case = str(record.get("case", ""))
        try:
            folder = self.results / record["result"]
            seg_uid, state, error = self._send_seg(folder, record)
        except Exception as e:  # noqa: BLE001
            folder, seg_uid, state = None, None, ""
            error = f"cannot send ({type(e).__name__}{': ' + str(e) if isinstance(e, SDSegInputError) else ''})"
        if error is None:
            log.info("series %s: SEG sent to %s (%s)", case, self.forward, state)
            with self._lock:  # the processing thread may have written a new SEG while this one was on its way
                if _seg_uid(folder) == seg_uid:
                    sent = {"state": state, "seg": seg_uid, "peer": str(self.forward), "time": time.time()}
                    atomic_write_text(folder / SENT_NAME, json.dumps(sent) + "\n")
                    path.unlink(missing_ok=True)
                else:
                    record.update(attempts=0, next_attempt=0.0, last_error="")
                    atomic_write_text(path, json.dumps(record, indent=2) + "\n")
                    state = "queued"
                    log.info("series %s: a newer SEG replaced it meanwhile; queued", case)
        else:
            record["attempts"] = int(record.get("attempts", 0)) + 1
            backoff = self._backoff(record["attempts"])
            record["next_attempt"], record["last_error"] = time.time() + backoff, error
            atomic_write_text(path, json.dumps(record, indent=2) + "\n")
            state = f"retrying: {error}"
            log.warning("series %s: SEG not sent to %s (%s); attempt %d, next in %.1f s", case, self.forward, error,
                        record["attempts"], backoff)
        with self._lock:
            known = case in self.rows
            if known:
                self.rows[case][FORWARD_FIELD] = state
        if known:
            self._write_summary()

    def _send_seg(self, folder: Path, record: dict) -> tuple[str, str, str | None]:
        """Send ``folder/seg.dcm``, falling back to a BINARY rewrite when the peer refuses a LABELMAP
        SEG. Returns (the SOPInstanceUID of the SEG read, state, None) on success, or (uid, "", the
        reason) on failure."""
        import pydicom

        seg = folder / SEG_NAME
        if not seg.is_file():
            return "", "", "the SEG file is missing"
        ds = pydicom.dcmread(seg)
        seg_uid = str(ds.SOPInstanceUID)
        status = self._c_store(ds)
        if status == "refused" and str(ds.SOPClassUID) == LABELMAP_SEG_STORAGE:
            binary = self._binary_seg(folder, record, seg_uid)
            status = self._c_store(pydicom.dcmread(binary))
            return (seg_uid, "sent (binary, the peer refused labelmap)", None) if status == "ok" else (seg_uid, "", status)
        return (seg_uid, "sent", None) if status == "ok" else (seg_uid, "", status)

    def _c_store(self, ds) -> str:
        """One association and C-STORE of ``ds`` to the forward peer: "ok", "refused" (the peer does not
        take this SOP class or transfer syntax), or the reason it failed."""
        from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

        pynetdicom = _pynetdicom()
        ae = pynetdicom.AE(ae_title=self.ae_title)
        ae.connection_timeout = ae.acse_timeout = 10
        ae.dimse_timeout = ae.network_timeout = 60
        syntax = ds.file_meta.TransferSyntaxUID
        syntaxes = [syntax] if syntax.is_compressed else [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
        ae.add_requested_context(ds.SOPClassUID, syntaxes)
        # Verification too, which every peer takes: the association stands even when the SEG's class or
        # transfer syntax is refused, and a refusal is then told apart from a peer that is down.
        ae.add_requested_context("1.2.840.10008.1.1")
        peer = self.forward
        assoc = ae.associate(peer.host, peer.port, ae_title=peer.ae_title)
        if not assoc.is_established:
            return "rejected by the peer" if assoc.is_rejected else "peer unreachable"
        try:
            if not any(c.abstract_syntax == ds.SOPClassUID for c in assoc.accepted_contexts):
                return "refused"
            response = assoc.send_c_store(ds)
            status = getattr(response, "Status", None)
            if status is None:
                return "no response"
            if status == SUCCESS or status in WARNING_STATUSES:
                return "ok"
            return "refused" if status == REFUSED_SOP_CLASS else f"status 0x{status:04X}"
        finally:
            assoc.release()

    def _binary_seg(self, folder: Path, record: dict, seg_uid: str) -> Path:
        """The case's labels as a BINARY SEG, ``seg_binary.dcm`` (from its label map and source series),
        made once per SEG ``seg_uid``: a series segmented again gets a new one."""
        import nibabel as nib
        import numpy as np

        from sdseg_monai.dicom import index_tree

        output = folder / BINARY_SEG_NAME
        if output.is_file() and self._binary.get(folder) == seg_uid:
            return output
        index = index_tree(self.incoming / record["study_uid"] / record["series_uid"], include_derived=self.runner.include_derived)
        stacks = [s for s in index.stacks if s.key == record["case"] and s.ok]
        if not stacks:
            raise SDSegInputError("the source series of this SEG is gone, or no longer passes QC", folder)
        labels = np.asarray(nib.load(str(folder / "label.nii.gz")).dataobj, dtype=np.uint8)
        segmented = {int(value) for value in json.loads((folder / "label.json").read_text(encoding="utf-8"))["labels"]}
        self.runner.write_seg(stacks[0], labels, segmented, output, "binary")
        self._binary[folder] = seg_uid
        return output

    # -- summary ----------------------------------------------------------------------------------
    def _load_rows(self) -> dict[str, dict]:
        from sdseg_monai.batch import SUMMARY_JSONL

        path = self.results / SUMMARY_JSONL
        rows = {}
        if path.is_file():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    row = json.loads(line)
                    rows[row["case"]] = row
                except (ValueError, KeyError, TypeError):
                    continue
        return rows

    def _write_summary(self) -> None:
        """``results/summary.csv`` and ``.jsonl`` of every series seen. Call without ``_lock``: only the
        snapshot takes it, as every C-STORE needs it and the summary grows with the node's life."""
        from sdseg_monai.batch import write_summary

        with self._summary_lock:  # snapshot and write together: a later snapshot is never overwritten by an older one
            with self._lock:
                rows = [dict(row) for row in self.rows.values()]
            write_summary(self.results, rows, extra_fields=(FORWARD_FIELD,))


def _seg_uid(folder: Path) -> str | None:
    """The SOPInstanceUID of ``folder/seg.dcm``, or None when there is none to read."""
    import pydicom

    try:
        return str(pydicom.dcmread(folder / SEG_NAME, stop_before_pixels=True, specific_tags=["SOPInstanceUID"]).SOPInstanceUID)
    except Exception:  # noqa: BLE001 - missing, half-gone or damaged: not the SEG that was sent
        return None


def _sent_state(folder: Path) -> str:
    """What the case's ``sent.json`` says of its current ``seg.dcm`` ("sent", or how it was sent), or ""
    when none was sent, or another SEG was (one written by an earlier version names none: taken as sent)."""
    try:
        record = json.loads((folder / SENT_NAME).read_text(encoding="utf-8"))
        if "seg" in record and record["seg"] != _seg_uid(folder):
            return ""
        return str(record.get("state", "sent"))
    except (OSError, ValueError, AttributeError, TypeError):
        return ""


def serve(node: DicomNode) -> None:
    """Run ``node`` until SIGINT or SIGTERM, then stop it cleanly (the CLI's loop). A second signal
    while it stops exits at once, with status 130."""
    import signal
    import sys

    from sdseg_monai._signals import handling

    stop = threading.Event()

    def on_signal(*_) -> None:
        if stop.is_set():  # the second: a CPU segmentation can take minutes. Every file is written whole or not at all
            log.warning("interrupted: what was in flight is taken up again at the next start")
            for stream in (sys.stdout, sys.stderr):
                stream.flush()
            os._exit(130)  # at once: the threads in flight (segmenting, sending) are not waited for
        stop.set()

    # The handlers go back whatever happens, a node that cannot start too (a busy port).
    with handling((signal.SIGINT, signal.SIGTERM), on_signal):
        node.start()
        try:
            while not stop.wait(0.5):
                pass
        finally:
            log.info("stopping: the series in flight finishes first (a second Ctrl-C or SIGTERM ends it at once)")
            node.stop()

