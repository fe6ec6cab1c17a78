"""Batch runs over a tree of DICOM series and NIfTI files: one model, every series, a summary.

``OUTPUT_DIR/<StudyInstanceUID>/<SeriesInstanceUID>[#k]/`` receives ``label.nii.gz``, ``label.json``,
optionally ``seg.dcm`` and ``image.nii.gz``, and last ``done.json``: a series is done when its
done-record exists, its key (series, sorted SOP instance UIDs, model hash, options) matches and the
outputs it lists are there and not empty, so a killed run resumes and a changed model or option
recomputes. NIfTI cases go to ``OUTPUT_DIR/nifti/<relative path>/`` (two files that would share a
folder, ``scan.nii`` and ``scan.nii.gz``, both fail). Only validated UIDs and the tree's own relative paths become
path parts; no header free text reaches a path or a log line.

Reading and preprocessing the next series (reader threads) and writing the last one (a writer thread)
overlap with inference on the current one; bounded queues keep memory flat. Under
``torchrun`` or with ``shard=(i, n)`` a case belongs to the rank where sha256(key) mod n equals it;
each rank writes its summary part and the last to finish merges them. Only that rank's exit code
speaks for the run (torchrun stops every rank when one exits non-zero); the others exit 0. A tree
with nothing to segment is refused by every rank alike (exit 2), before anything is written. A part
carries its run's id (the tree's cases, the model, the options, the shard count): parts of another
run are never merged.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import queue
import re
import threading
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from sdseg_monai._signals import sigterm_interrupts
from sdseg_monai._version import __version__
from sdseg_monai.data import atomic_write_text, nifti_stem, remove_stale_temporaries
from sdseg_monai.errors import SDSegInputError
from sdseg_monai.model import file_sha256, model_hash

DONE_NAME = "done.json"
CASE_FILES = ("label.nii.gz", "label.json", "seg.dcm", "image.nii.gz", DONE_NAME)  # what a case folder receives
SUMMARY_CSV = "summary.csv"
SUMMARY_JSONL = "summary.jsonl"
PART_PREFIX = "summary.part-"
PART_NAME = re.compile(r"summary\.part-([0-9]+)-of-([0-9]+)\.jsonl")
PART_RUN = "sdseg3d_run"  # the key of a part's first line: the id of the run that wrote it
SEG_TYPES = ("binary", "labelmap")
SUMMARY_FIELDS = ("case", "study_uid", "series_uid", "status", "reason", "message", "images_used", "images_dropped",
                  "plane", "spacing_mm", "seconds", "model_hash", "sdseg3d_version")
PREFETCH = 2  # series read and prepared ahead of inference, beyond those being read
WRITE_BEHIND = 2  # segmented series waiting for the writer thread
CUDA_READERS = 4  # reader threads on a GPU, where reading (gzip, DICOM decoding) can be the slowest stage
# Processes that encode DICOM SEG objects on a GPU: pydicom holds the GIL, and one 512x512x100 SEG
# takes 0.9-1.6 s of a CPU, longer than a GPU takes to segment the series.
CUDA_SEG_WRITERS = 4
# Outcomes of the run itself, beside the reader's QC codes (sdseg_monai.dicom.REASONS).
RUN_REASONS = {
    "read_error": ("failed", "the image could not be read"),
    "inference_error": ("failed", "segmenting or writing failed (the error type is given)"),
    "duplicate_output": ("failed", "NIfTI files whose names differ only in the suffix (scan.nii, scan.nii.gz) would share "
                                   "one output folder; rename one"),
}
log = logging.getLogger("sdseg3d.batch")


@dataclass
class BatchCase:
    """One row of the summary: a DICOM stack or a NIfTI file, and where its outputs go."""

    key: str
    study_uid: str = ""
    series_uid: str = ""
    stack: object = None
    nifti: Path | None = None
    out_dir: Path | None = None
    row: dict = field(default_factory=dict)
    sha256: str | None = None  # a NIfTI file's, hashed once: the done-key of what was segmented
    source_stat: tuple | None = None  # the NIfTI file's identity when hashed: a changed file is not what was hashed

    @property
    def segmentable(self) -> bool:
        return self.out_dir is not None


@dataclass
class BatchReport:
    """``rows``: this run's cases, or every shard's once this run merged the summary parts, or every
    case of the tree when it has nothing to segment.
    ``exit_code``: see :func:`exit_code`; 0 for a shard that left the merging to another; 2 from every
    shard when the tree has nothing to segment (then nothing is written: no summary, part nor folder).
    ``summary``: the summary written, or None while parts await other shards (or nothing was written).
    ``ignored_parts``: summary parts found of another run (not merged)."""

    rows: list[dict]
    exit_code: int
    summary: Path | None
    ignored_parts: list[Path] = field(default_factory=list)


class _Counter:
    """Cases finished so far, reported to ``progress`` (done, total, row) from whichever thread finishes one."""

    def __init__(self, done: int, total: int, progress: Callable[[int, int, dict], None] | None):
        self.done, self.total, self.progress = done, total, progress
        self.lock = threading.Lock()
        if progress:
            progress(done, total, {})

    def step(self, row: dict) -> None:
        with self.lock:
            self.done += 1
            if self.progress:
                self.progress(self.done, self.total, row)


def shard_of(key: str, count: int) -> int:
    """The shard (rank) a case belongs to: sha256 of its key, mod ``count``."""
    return int(hashlib.sha256(key.encode("utf-8")).hexdigest(), 16) % count


def parse_shard(text: str) -> tuple[int, int]:
    """``"I/N"`` -> (I, N) with 0 <= I < N."""
    try:
        index, count = (int(v) for v in text.split("/"))
    except ValueError:
        raise SDSegInputError(f"--shard must be I/N, e.g. 0/4, got {text!r}") from None
    if count < 1 or not 0 <= index < count:
        raise SDSegInputError(f"--shard I/N needs 0 <= I < N, got {text!r}")
    return index, count


def check_tree_paths(input_dir: str | os.PathLike, output_dir: str | os.PathLike) -> Path:
    """Refuse a batch run's input that is missing, an output that is a file, one folder inside the
    other, or an output where nothing can be written (checked by :meth:`BatchRunner.run`, and by the
    command line before the model loads). Returns the input as a ``Path``."""
    from sdseg_monai.data import check_folder_writable, check_spares_inputs

    input_dir, output_dir = Path(input_dir), Path(output_dir)
    if not input_dir.exists():
        raise SDSegInputError("no such file or folder", input_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise SDSegInputError("the output must be a folder", output_dir)
    check_spares_inputs([output_dir / SUMMARY_CSV], [input_dir])
    if input_dir.is_dir() and output_dir.resolve() in input_dir.resolve().parents:
        raise SDSegInputError("the input lies inside the output folder; choose another output folder", input_dir)
    check_folder_writable(output_dir, "the output")
    return input_dir


def dicom_seg_available() -> bool:
    from monai.utils import optional_import

    return optional_import("highdicom")[1]


def collect_cases(index, output_dir: Path, dicom_seg: bool = False) -> list[BatchCase]:
    """Summary rows for every stack and NIfTI file of ``index``, with output folders for those to
    segment. With ``dicom_seg``, a stack no SEG can reference fails up front (before any output)."""
    cases = []
    for stack in index.stacks:
        if dicom_seg and stack.ok and stack.seg_refusal:
            stack.fail("split_multiframe", stack.seg_refusal)
        case = BatchCase(stack.key, stack.study_uid, stack.series_uid, stack=stack)
        case.row = summary_row(case, stack.status, stack.reason, stack.message)
        case.row.update(images_used=stack.images_used, images_dropped=sum(stack.dropped.values()),
                        plane=stack.plane, spacing_mm=[round(v, 4) for v in stack.spacing] if stack.ok else None)
        if stack.ok:
            case.out_dir = output_dir / stack.study_uid / stack.key
        cases.append(case)
    root = index.root if index.root.is_dir() else index.root.parent
    sharing: dict[Path, list[BatchCase]] = {}
    for path in index.nifti:
        relative = path.relative_to(root)
        case = BatchCase(relative.as_posix(), nifti=path, out_dir=output_dir / "nifti" / relative.parent / nifti_stem(relative))
        case.row = summary_row(case, "ok", "ok", "")
        sharing.setdefault(case.out_dir, []).append(case)
        cases.append(case)
    for shared in sharing.values():
        # All of them fail, whatever the order: one would overwrite the others' outputs (and done-record),
        # and under --shard two ranks would write one folder.
        if len(shared) > 1:
            folder = shared[0].out_dir.relative_to(output_dir).as_posix()
            names = " and ".join(c.key for c in shared)
            for case in shared:
                case.row.update(status="failed", reason="duplicate_output",
                                message=f"{names} would share the output folder {folder}; rename one of them")
                case.out_dir = None
    for case in cases:  # belt and braces: nothing is written outside the output folder
        if case.out_dir is not None and output_dir.resolve() not in case.out_dir.resolve().parents:
            raise SDSegInputError("a case's output folder would leave the output folder", case.out_dir)
    return cases


def _read_failure(error: Exception) -> SDSegInputError:
    """A read failure as a one-line input error: the error itself, or its type (never a library's text)."""
    return error if isinstance(error, SDSegInputError) else SDSegInputError(f"cannot read ({type(error).__name__})")


def _file_identity(path: Path) -> tuple[int, int, int, int]:
    """What changes when a file is replaced or rewritten: device, inode, size, modification time."""
    st = os.stat(path)
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def _size_and_time(path: Path) -> list[int] | None:
    """A file's size and modification time, alike on every machine that mounts it; None if gone."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns]


def _non_empty_file(path: Path) -> bool:
    try:
        return path.is_file() and path.stat().st_size > 0
    except OSError:
        return False


def summary_row(case: BatchCase, status: str, reason: str, message: str) -> dict:
    """``case``'s summary row, with nothing measured yet."""
    return {"case": case.key, "study_uid": case.study_uid, "series_uid": case.series_uid, "status": status,
            "reason": reason, "message": message, "images_used": 0, "images_dropped": 0, "plane": "",
            "spacing_mm": None, "seconds": 0.0, "model_hash": "", "sdseg3d_version": __version__, "volume_ml": {}}


class BatchRunner:
    """Initialise once (the model loads once), then :meth:`run` over a tree.

    Args:
        model: a saved model folder or bundle.
        output_dir: the output tree.
        device, batch_size, organs, seed, precision, compile: as :class:`~sdseg_monai.inference.VolumeSegmenter`.
        dicom_seg: write ``seg.dcm`` for DICOM cases (None: when the dicom extra is installed).
        seg_type: ``"binary"`` or ``"labelmap"``.
        save_image: also write the image read, as ``image.nii.gz``.
        overwrite: recompute cases whose done-record matches.
        include_derived: segment derived / secondary series too.
        shard: (index, count): this run's share of the cases.
        readers: threads that read and prepare cases ahead of inference (None: CUDA_READERS on a GPU;
            0 on a CPU, where each case is read in the segmenting thread when its turn comes: a reader
            beside inference made a 2-core run 1.27x slower, its torch threads waiting at every step for
            the core the reader took, while reading is about 2% of a case's time).
        seg_writers: processes that encode DICOM SEG objects while later cases run (None: 0 on a CPU,
            where the writer thread encodes them, CUDA_SEG_WRITERS on a GPU). They are spawned, so a
            script that calls :meth:`run` needs the ``if __name__ == "__main__":`` guard that
            multiprocessing asks for; without it the processes fail to start and the writer thread
            writes the SEGs itself.
    """

    def __init__(self, model, output_dir, *, device="auto", batch_size=None, organs=None, seed=0, precision="auto", dicom_seg=None,
                 seg_type="binary", save_image=False, overwrite=False, include_derived=False, shard=(0, 1),
                 readers: int | None = None, seg_writers: int | None = None, compile: bool = False):
        from sdseg_monai.inference import VolumeSegmenter

        if seg_type not in SEG_TYPES:
            raise SDSegInputError(f"--seg-type must be one of {', '.join(SEG_TYPES)}, got {seg_type!r}")
        if dicom_seg and not dicom_seg_available():
            raise SDSegInputError('DICOM SEG output needs the dicom extra: pip install "sdseg3d[dicom]"')
        self.output_dir = Path(output_dir)
        self.model_dir = Path(model)
        self.model_hash = model_hash(self.model_dir)
        self.segmenter = VolumeSegmenter(self.model_dir, device=device, organs=organs, batch_size=batch_size, seed=seed,
                                         precision=precision, compile=compile)
        self.dicom_seg = dicom_seg_available() if dicom_seg is None else bool(dicom_seg)
        self.seg_type, self.save_image, self.overwrite = seg_type, save_image, overwrite
        self.include_derived, self.shard = include_derived, shard
        on_gpu = self.segmenter.device.type == "cuda"
        self.readers = max(0, int(readers)) if readers is not None else (CUDA_READERS if on_gpu else 0)
        self.seg_writers = max(0, int(seg_writers)) if seg_writers is not None else (CUDA_SEG_WRITERS if on_gpu else 0)
        self.options = {"organs": sorted(self.segmenter.organs.values()), "seed": self.segmenter.seed,
                        "precision": self.segmenter.precision,
                        "dicom_seg": self.dicom_seg, "seg_type": seg_type, "save_image": save_image,
                        "include_derived": include_derived}
        if self.segmenter.compiled:  # only then: the done-records of runs from before this option still match
            self.options["compiled"] = True

    # -- planning ---------------------------------------------------------------------------------
    def plan(self, input_dir) -> list[BatchCase]:
        """This shard's cases of the tree, NIfTI files hashed (see :meth:`done_key`)."""
        return self._plan(input_dir)[0]

    def _plan(self, input_dir) -> tuple[list[BatchCase], str, list[BatchCase]]:
        """(this shard's cases, the run's id: see :meth:`run_id`, every case of the tree)."""
        from sdseg_monai.dicom import index_tree

        input_dir = check_tree_paths(input_dir, self.output_dir)
        index = index_tree(input_dir, include_derived=self.include_derived)
        cases = collect_cases(index, self.output_dir, self.dicom_seg)
        run = self.run_id(cases)
        index_, count = self.shard
        mine = [c for c in cases if shard_of(c.key, count) == index_]
        for case in mine:
            if case.nifti is not None and case.segmentable:
                try:
                    self._nifti_sha256(case)
                except Exception as e:  # noqa: BLE001  (reported in the case's row)
                    case.row.update(status="failed", reason="read_error", message=str(_read_failure(e)))
                    case.out_dir = None
        return mine, run, cases

    def run_id(self, cases: list[BatchCase]) -> str:
        """What every shard of one run computes alike, from every case of the tree (before sharding)
        with its QC outcome and content (a series' instances; a NIfTI file's size and time, not its
        hash: no rank reads another's files), the model, the options and the shard count."""
        plan = sorted(([c.key, c.row["status"], c.row["reason"],
                        c.stack.sop_uids if c.stack is not None else _size_and_time(c.nifti)] for c in cases), key=lambda entry: entry[0])
        record = {"cases": plan, "model_hash": self.model_hash, "options": self.options, "shards": self.shard[1],
                  "sdseg3d_version": __version__}
        return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:32]

    def done_key(self, case: BatchCase) -> str:
        """The key of a done-record: the case, its content (sorted SOP instance UIDs, or the NIfTI
        file's sha256, computed once per case), the model and the options."""
        content = case.stack.sop_uids if case.stack is not None else [self._nifti_sha256(case)]
        record = {"case": case.key, "instances": content, "model_hash": self.model_hash, "options": self.options}
        return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()

    @staticmethod
    def _nifti_sha256(case: BatchCase) -> str:
        """The NIfTI file's sha256, hashed on first use only: the done-record names the bytes hashed
        when planning, not a file replaced since. Notes the file's identity for :meth:`_read`.

        Raises:
            SDSegInputError: the file changed while it was hashed.
        """
        if case.sha256 is None:
            before = _file_identity(case.nifti)
            digest = file_sha256(case.nifti)
            if _file_identity(case.nifti) != before:
                raise SDSegInputError("the file changed while it was read; run again once it is complete", case.nifti)
            case.sha256, case.source_stat = digest, before
        return case.sha256

    def _outputs(self, case: BatchCase) -> list[str]:
        """The files of ``case``'s folder that its done-record vouches for."""
        return ["label.nii.gz", "label.json", *(["seg.dcm"] if self.dicom_seg and case.stack is not None else []),
                *(["image.nii.gz"] if self.save_image else [])]

    def finished_row(self, case: BatchCase) -> dict | None:
        """The stored summary row when ``case`` is already done with this model and these options, and
        every output its done-record lists is there and not empty (a power loss can leave a file empty)."""
        path = case.out_dir / DONE_NAME
        if self.overwrite or not path.is_file():
            return None
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(record, dict) or record.get("key") != self.done_key(case):
                return None
            if not all(_non_empty_file(case.out_dir / name) for name in {*self._outputs(case), *record.get("outputs", ())}):
                return None
        except (OSError, ValueError, TypeError, SDSegInputError):
            return None
        return record.get("row")

    # -- running ----------------------------------------------------------------------------------
    def run(self, input_dir, progress: Callable[[int, int, dict], None] | None = None) -> BatchReport:
        """Segment every case of this shard; write outputs, done-records and the summary. A tree with
        nothing to segment (no case, or every one skipped) is reported with exit code 2, and nothing
        is written.

        Three stages overlap: reader threads read and prepare the next cases, this thread segments,
        and a writer thread writes the last case's files (handing DICOM SEG objects to
        ``seg_writers`` processes, when there are any, and finishing each case when its SEG is
        written). ``progress`` is called (from the writer thread) as each case is finished.

        In the main thread, SIGTERM (torchrun's stop for the other ranks when one fails) raises
        KeyboardInterrupt meanwhile, so that no temporary file is left behind."""
        with sigterm_interrupts():
            return self._run(input_dir, progress)

    def _run(self, input_dir, progress) -> BatchReport:
        count = self.shard[1]
        if count > 1:  # a part left by an earlier run must not complete another rank's merge before ours is in
            self._part_path().unlink(missing_ok=True)
        cases, run, tree = self._plan(input_dir)
        if exit_code([c.row for c in tree]) == 2:  # the whole tree: every shard knows it, and none writes a thing
            return BatchReport([c.row for c in tree], 2, None)
        todo = []
        for case in cases:
            if case.segmentable:
                stored = self.finished_row(case)
                if stored is not None:
                    case.row = stored
                    continue
                todo.append(case)
        finished = _Counter(len(cases) - len(todo), len(cases), progress)
        writes: queue.Queue = queue.Queue(maxsize=WRITE_BEHIND)
        failures: list[BaseException] = []

        seg_pool = self._seg_pool()
        encoding: deque = deque()  # (case, start, SEG job, its future), oldest first

        def finish_encoded(keep: int):
            """Finish the cases whose SEG is written, in order, until at most ``keep`` are pending. If
            the processes could not start (a script without a ``__main__`` guard re-runs itself in a
            spawned process and fails there), the SEGs are written in this thread instead."""
            from concurrent.futures.process import BrokenProcessPool

            while encoding and (len(encoding) > keep or encoding[0][3].done()):
                case, start, job, future = encoding.popleft()
                with self._recording(case, start, writing=True):
                    try:
                        future.result()
                    except BrokenProcessPool:
                        write_seg_job(job)
                    self._finish(case, start)
                finished.step(case.row)

        def write_behind():
            stopped = False  # the stop marker is taken: waiting for another would hang both threads
            try:
                while (item := writes.get()) is not None:
                    case, volume, result, start = item
                    pending = None
                    with self._recording(case, start, writing=True):
                        pending = self._write(case, volume, result, start, seg_pool)
                    if pending is None:
                        finished.step(case.row)
                    else:
                        encoding.append((case, start, *pending))
                    finish_encoded(keep=self.seg_writers)
                stopped = True
                finish_encoded(keep=0)
            except BaseException as e:  # noqa: BLE001  (raised again in the caller's thread)
                failures.append(e)
                while not stopped and writes.get() is not None:  # never leave the segmenting thread blocked on a full queue
                    pass

        writer = threading.Thread(target=write_behind, name="sdseg3d-writer", daemon=True)
        writer.start()
        try:
            for case, volume, canonical, error in self._prefetch(todo):
                if failures:  # the writer thread stopped: anything segmented now would be thrown away
                    break
                start = time.perf_counter()
                result = None
                with self._recording(case, start):
                    if error is not None:
                        raise error
                    result = self.segmenter.segment(volume, canonical=canonical)
                if result is None:
                    finished.step(case.row)
                else:
                    writes.put((case, volume, result, start))
        finally:
            writes.put(None)
            writer.join()
            if seg_pool is not None:
                seg_pool.shutdown(wait=True, cancel_futures=True)
        if failures:
            raise failures[0]
        summary, rows, ignored = self.write_summary([c.row for c in cases], run)
        # A shard that leaves the merging to another exits 0: the merging one speaks for the whole tree.
        return BatchReport(rows, exit_code(rows) if summary is not None else 0, summary, ignored)

    def segment_case(self, case: BatchCase, volume=None, error: Exception | None = None) -> dict:
        """Segment one case and write its outputs (reading it first when ``volume`` is None), or record
        ``error`` (a failed read); a failure lands in the case's row, never stops the caller. Returns the row."""
        start = time.perf_counter()
        with self._recording(case, start):
            if error is not None:
                raise error
            if volume is None:
                volume = self._read(case)
            self._write(case, volume, self.segmenter.segment(volume), start)
        return case.row

    @contextmanager
    def _recording(self, case: BatchCase, start: float, writing: bool = False):
        """Records a failure of the block in the case's row instead of raising it (one bad series never
        stops the run), and the seconds since ``start``. An input error while ``writing`` (e.g. a SEG
        the source headers cannot carry) is an inference_error, not a read_error."""
        try:
            yield
        except SDSegInputError as e:
            stack_reason = case.stack.reason if case.stack is not None else "ok"
            reason = "inference_error" if writing else stack_reason if stack_reason != "ok" else "read_error"
            case.row.update(status="failed", reason=reason, message=str(e))
        except Exception as e:  # noqa: BLE001
            case.row.update(status="failed", reason="inference_error", message=type(e).__name__)
        case.row["seconds"] = round(time.perf_counter() - start, 3)

    def _prefetch(self, cases: list[BatchCase]):
        """(case, volume, canonical, error) in order; ``self.readers`` threads read and prepare up to
        PREFETCH cases beyond those they are reading (none: each case read here, when its turn comes)."""
        from concurrent.futures import ThreadPoolExecutor

        if not self.readers:
            for case in cases:
                yield (case, *self._load(case))
            return
        pool = ThreadPoolExecutor(max_workers=self.readers, thread_name_prefix="sdseg3d-reader")
        pending: deque = deque()
        try:
            for case in cases:
                pending.append((case, pool.submit(self._load, case)))
                if len(pending) > self.readers + PREFETCH - 1:
                    case_, loading = pending.popleft()
                    yield (case_, *loading.result())
            while pending:
                case_, loading = pending.popleft()
                yield (case_, *loading.result())
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def _load(self, case: BatchCase):
        """(volume, canonical, error): the case read and prepared, or why not. A read failure becomes a
        one-line input error; a preprocessing failure is passed on as it is (an inference error)."""
        try:
            volume = self._read(case)
        except Exception as e:  # noqa: BLE001  (reported in the case's row)
            return None, None, _read_failure(e)
        try:
            return volume, self.segmenter.prepare(volume), None
        except Exception as e:  # noqa: BLE001
            return volume, None, e

    def _read(self, case: BatchCase):
        from sdseg_monai.data import Volume, read_volume
        from sdseg_monai.dicom import read_stack

        if case.nifti is not None:
            self._nifti_sha256(case)  # before reading, when no plan hashed it
            volume = read_volume(case.nifti)
            if _file_identity(case.nifti) != case.source_stat:  # what was read is not what the done-key names
                raise SDSegInputError("the file changed since the run hashed it; run again once it is complete", case.nifti)
            return volume
        image = read_stack(case.stack)
        return Volume(image=image, source=case.key, header=None, shape=tuple(image.shape[1:]))

    def _seg_pool(self):
        """The processes that encode DICOM SEG objects, or None (the writer thread encodes them). Spawned,
        not forked: a forked child of a process that has initialised CUDA cannot use it, nor be trusted."""
        if not (self.dicom_seg and self.seg_writers):
            return None
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        return ProcessPoolExecutor(max_workers=self.seg_writers, mp_context=multiprocessing.get_context("spawn"))

    def _write(self, case: BatchCase, volume, result, start: float, seg_pool=None):
        """The case's outputs from its segmentation ``result``; its done-record last. With ``seg_pool``
        a DICOM SEG is encoded there: (its job, its future) is returned, and :meth:`_finish` follows
        the future's result. Returns None when the case is finished."""
        from sdseg_monai.data import atomic_paths, write_label_volume

        case.out_dir.mkdir(parents=True, exist_ok=True)
        (case.out_dir / DONE_NAME).unlink(missing_ok=True)  # recomputing: not done until the new record
        remove_stale_temporaries(case.out_dir, CASE_FILES)  # of a run killed mid-write; only this case writes here
        voxel_ml = float(abs(np.linalg.det(volume.affine[:3, :3]))) / 1000.0
        counts = np.bincount(result.labels.reshape(-1), minlength=256)
        case.row["volume_ml"] = {name: round(float(counts[label]) * voxel_ml, 3) for label, name in sorted(result.organs.items())}
        case.row.update(model_hash=self.model_hash, status="ok", reason="ok", message="")
        sidecar = {**result.sidecar(), "model_hash": self.model_hash, "case": case.key, "study_uid": case.study_uid,
                   "series_uid": case.series_uid, "sdseg3d_version": __version__}
        if case.stack is not None:
            sidecar["images"] = case.row["images_used"]
        write_label_volume(result.labels, volume, case.out_dir / "label.nii.gz", sidecar)
        if self.save_image:
            import nibabel as nib

            with atomic_paths(case.out_dir / "image.nii.gz") as (tmp,):
                nib.save(nib.Nifti1Image(np.asarray(volume.image[0], dtype=np.float32), volume.affine), str(tmp))
        else:
            (case.out_dir / "image.nii.gz").unlink(missing_ok=True)
        if self.dicom_seg and case.stack is not None:
            job = self.seg_job(case.stack, result.labels, result.organs, case.out_dir / "seg.dcm", self.seg_type)
            if seg_pool is not None:
                return job, _submit(seg_pool, write_seg_job, job)
            write_seg_job(job)
        else:
            (case.out_dir / "seg.dcm").unlink(missing_ok=True)  # a previous run's, with other options
        self._finish(case, start)
        return None

    def _finish(self, case: BatchCase, start: float) -> None:
        """The done-record, written last: it marks the case done."""
        case.row["seconds"] = round(time.perf_counter() - start, 3)
        record = {"key": self.done_key(case), "outputs": self._outputs(case), "row": case.row}
        atomic_write_text(case.out_dir / DONE_NAME, json.dumps(record, indent=2) + "\n")

    def seg_job(self, stack, labels, label_values, output: Path, seg_type: str) -> dict:
        """What :func:`write_seg_job` needs to write ``labels`` (on ``stack``'s grid) as a DICOM SEG of
        the source series, one segment per organ of ``label_values`` (the label values segmented):
        plain values and paths, so that another process can do it."""
        from sdseg_monai.dicom import source_paths

        multiframe = stack.frames[0].number is not None
        config = self.segmenter.config
        return {
            "labels": labels, "sources": source_paths(stack), "output": output,
            "organs": [o for o in config.organs if int(o["label"]) in label_values], "dataset": config.dataset,
            "seg_type": seg_type, "frame_numbers": [f.number for f in stack.frames] if multiframe else None,
            "model_hash": self.model_hash,
        }

    def write_seg(self, stack, labels, label_values, output: Path, seg_type: str) -> Path:
        """``labels`` as a DICOM SEG of ``stack``, in this process (see :meth:`seg_job`)."""
        return write_seg_job(self.seg_job(stack, labels, label_values, output, seg_type))

    # -- summary ----------------------------------------------------------------------------------
    def write_summary(self, rows: list[dict], run_id: str = "") -> tuple[Path | None, list[dict], list[Path]]:
        """The summary of ``rows``; with shards, this shard's part (headed by ``run_id``, see
        :meth:`run_id`), merged with the other shards' parts of the same run once all are in.

        Returns:
            (the summary, the rows it holds, the parts of other runs found), or (None, ``rows``, ...)
            while parts of this run await other shards. Each part of another run is logged as not merged.
        """
        count = self.shard[1]
        self.output_dir.mkdir(parents=True, exist_ok=True)
        if count == 1:
            return write_summary(self.output_dir, rows), rows, []
        atomic_write_text(self._part_path(), json.dumps({PART_RUN: run_id}) + "\n" + "".join(json.dumps(r) + "\n" for r in rows))
        ours: dict[int, list[dict]] = {}
        ignored = []
        for part in sorted(self.output_dir.glob(f"{PART_PREFIX}*")):
            if not (match := PART_NAME.fullmatch(part.name)):
                continue
            problem = None
            try:
                run, part_rows = _read_part(part)
            except SDSegInputError as e:
                run, problem = None, e
            except OSError as e:
                run, problem = None, SDSegInputError(f"cannot read ({type(e).__name__})", part)
            if run == run_id and int(match.group(2)) == count:
                ours[int(match.group(1))] = part_rows
            else:
                ignored.append(part)
                problem = problem or SDSegInputError("a summary part of another run (other cases, model, options or shard count)",
                                                     part)
                log.warning("%s; not merged", problem)
        if set(ours) != set(range(count)):
            return None, rows, ignored
        merged = [row for index in range(count) for row in ours[index]]
        return write_summary(self.output_dir, merged), merged, ignored

    def _part_path(self) -> Path:
        return self.output_dir / f"{PART_PREFIX}{self.shard[0]}-of-{self.shard[1]}.jsonl"


def _submit(pool, fn, *args):
    """``pool.submit(fn, *args)``; a pool whose processes have died gives a future holding that error,
    so that the caller handles it in one place, as for a job they died in."""
    from concurrent.futures import Future
    from concurrent.futures.process import BrokenProcessPool

    try:
        return pool.submit(fn, *args)
    except BrokenProcessPool as error:
        failed = Future()
        failed.set_exception(error)
        return failed


def write_seg_job(job: dict) -> Path:
    """Write the DICOM SEG a :meth:`BatchRunner.seg_job` describes, reading the source headers (no
    pixels) from its files; a module-level function, so that a spawned process can run it."""
    from sdseg_monai.dicom import read_headers
    from sdseg_monai.dicom_seg import write_dicom_seg

    return write_dicom_seg(job["labels"], read_headers(job["sources"]), job["output"], organs=job["organs"], dataset=job["dataset"],
                           seg_type=job["seg_type"], frame_numbers=job["frame_numbers"], model_hash=job["model_hash"])


def exit_code(rows: list[dict]) -> int:
    """0 when every case is ok or skipped, 3 when any failed, 2 when nothing segmentable was found
    (every row skipped: a case to segment ends ok or failed)."""
    statuses = {r["status"] for r in rows}
    return 3 if "failed" in statuses else 0 if "ok" in statuses else 2


def _organ_columns(rows: list[dict]) -> list[str]:
    return sorted({name for r in rows for name in r.get("volume_ml", {})})


def write_summary(output_dir: Path, rows: list[dict], extra_fields: tuple[str, ...] = ()) -> Path:
    """``summary.jsonl`` (one JSON row per case) and ``summary.csv`` (organ volumes as ``<organ>_ml``;
    ``extra_fields`` after the standard columns, e.g. the DICOM node's forwarding state)."""
    rows = sorted(rows, key=lambda r: (r["study_uid"], r["case"]))
    organs = _organ_columns(rows)
    fields = (*SUMMARY_FIELDS, *extra_fields)
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow([*fields, *(f"{o}_ml" for o in organs)])
    for r in rows:
        spacing = "x".join(f"{v:g}" for v in r["spacing_mm"]) if r.get("spacing_mm") else ""
        writer.writerow([*(spacing if f == "spacing_mm" else r.get(f, "") for f in fields),
                         *(r.get("volume_ml", {}).get(o, "") for o in organs)])
    atomic_write_text(output_dir / SUMMARY_JSONL, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
    atomic_write_text(output_dir / SUMMARY_CSV, text.getvalue())
    return output_dir / SUMMARY_CSV


def read_summary_parts(output_dir) -> list[dict]:
    """Every row of the shards' summary parts: one part per shard I of N, all of one N.

    Raises:
        SDSegInputError: no parts, a part not named summary.part-I-of-N.jsonl, parts missing or of
            several shard counts or runs, or a line that is not a JSON row (naming the file).
    """
    output_dir = Path(output_dir)
    parts = sorted(output_dir.glob(f"{PART_PREFIX}*"))
    if not parts:
        raise SDSegInputError("no summary parts (summary.part-*.jsonl) to merge", output_dir)
    shards = set()
    for part in parts:
        match = PART_NAME.fullmatch(part.name)
        if match is None or int(match.group(1)) >= int(match.group(2)):
            raise SDSegInputError("not a summary part of shard I of N (summary.part-I-of-N.jsonl with I < N); "
                                  "move it away and merge again", part)
        shards.add((int(match.group(1)), int(match.group(2))))
    counts = {n for _, n in shards}
    if len(counts) != 1 or len(shards) != next(iter(counts)):
        raise SDSegInputError(f"summary parts incomplete or from different shard counts: {len(parts)} found", output_dir)
    runs = {part: _read_part(part) for part in parts}
    newest = max(parts, key=lambda p: p.stat().st_mtime_ns)
    for part in parts:
        if runs[part][0] != runs[newest][0]:
            raise SDSegInputError(f"a summary part of another run than {newest.name} (other cases, model or options); "
                                  "move the stale part away and merge again", part)
    return [row for part in parts for row in runs[part][1]]


def _read_part(part: Path) -> tuple[str | None, list[dict]]:
    """(the run id heading a summary part, None in a part written before parts carried one; its rows).

    Raises:
        SDSegInputError: a line that is not a summary row (naming the file).
    """
    run, rows = None, []
    for number, line in enumerate(part.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if number == 1 and isinstance(row, dict) and set(row) == {PART_RUN}:
            run = str(row[PART_RUN])
            continue
        if not isinstance(row, dict) or not {"case", "study_uid", "status"} <= set(row):
            raise SDSegInputError(f"line {number} is not a summary row", part)
        rows.append(row)
    return run, rows


def merge_summaries(output_dir) -> Path:
    """Combine every rank's summary part into ``summary.csv`` / ``summary.jsonl``."""
    with sigterm_interrupts():
        return write_summary(Path(output_dir), read_summary_parts(output_dir))

