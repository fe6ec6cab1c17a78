"""Reading CT volumes and label maps, and writing label volumes, with one-line errors.

Inputs are never modified. Outputs are written to a temporary file in the destination folder and
renamed into place, so an existing output is never half-overwritten.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from glob import escape as glob_escape
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from sdseg_monai import _quiet  # noqa: F401
from sdseg_monai.errors import SDSegInputError

NIFTI_SUFFIXES = (".nii", ".nii.gz")


@dataclass
class Volume:
    """A loaded volume: a (1, X, Y, Z) ``MetaTensor`` (affine in RAS) plus where it came from.

    ``header`` is the NIfTI header for NIfTI input (its qform/sform are reused on output), else None.
    ``shape`` is the input's own shape (a singleton 4th axis included). ``nonfinite_voxels`` counts
    the NaN/Inf voxels of the input (segmenting treats them as the bottom of the HU window).
    """

    image: Any
    source: str
    header: Any = None
    shape: tuple[int, ...] = ()
    nonfinite_voxels: int = 0

    @property
    def affine(self) -> np.ndarray:
        """The voxel-to-RAS affine; an LPS-space MetaTensor's (meta ``space`` LPS) is turned to RAS, so
        labels written with it lie on the same anatomy, not mirrored left to right."""
        from sdseg_monai.transforms import is_lps

        affine = np.asarray(self.image.affine, dtype=np.float64)
        if is_lps(self.image):
            from monai.data.utils import orientation_ras_lps

            return orientation_ras_lps(affine)
        return affine


def is_nifti(path: str | os.PathLike) -> bool:
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def _nifti_header(path: Path, what: str):
    import nibabel as nib

    try:
        image = nib.load(str(path))
    except Exception as e:  # noqa: BLE001
        raise SDSegInputError(f"not a readable NIfTI {what} ({_reason(e)})", path) from None
    shape = tuple(int(s) for s in image.shape)
    if len(shape) != 3 and not (len(shape) == 4 and shape[3] == 1):
        extra = f" with {shape[3]} volumes" if len(shape) == 4 else ""
        raise SDSegInputError(
            f"{len(shape)}D {what}{extra} (shape {'x'.join(map(str, shape))}); a 3D volume is required", path
        )
    if 0 in shape[:3]:
        raise SDSegInputError(f"{what} has a zero-length axis (shape {'x'.join(map(str, shape))})", path)
    return image, shape


def usable_affine(affine: np.ndarray | None) -> bool:
    """A voxel-to-world affine that places voxels: finite, with an invertible 3x3 part."""
    if affine is None:
        return False
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
        return False
    linear = affine[:3, :3]
    # Relative to the voxel sizes, so that micrometre voxels are not taken for a singular matrix.
    scale = np.prod(np.linalg.norm(linear, axis=0))
    return bool(scale > 0 and abs(np.linalg.det(linear)) > 1e-6 * scale)


def _nifti_affine(nifti, path: Path, what: str) -> np.ndarray:
    """The affine nibabel would use (sform, else qform, else the voxel sizes), or the next usable
    one when that one is singular or not finite; refuses a file where none is usable."""
    header = nifti.header
    with np.errstate(all="ignore"):
        coded = []
        for getter in (header.get_sform, header.get_qform):
            try:
                form, code = getter(coded=True)
            except Exception:  # noqa: BLE001  (a qform that cannot be decoded)
                continue
            if code:
                coded.append(form)
        # With neither form coded, nibabel's affine is the one from the voxel sizes.
        for affine in coded or [nifti.affine]:
            if usable_affine(affine):
                return np.asarray(affine, dtype=np.float64)
    raise SDSegInputError(f"{what} has no usable affine: sform and qform are singular or not finite", path)


def _reason(error: Exception) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def read_volume(path: str | os.PathLike, what: str = "image") -> Volume:
    """Load a NIfTI file or a folder holding one DICOM CT series.

    Args:
        path: ``.nii`` / ``.nii.gz`` file, or a DICOM series folder.
        what: ``"image"`` or ``"label map"``, for messages; label maps load as integers.

    Returns:
        a :class:`Volume` whose image is a (1, X, Y, Z) ``MetaTensor`` in the file's array order and
        memory layout (not necessarily C-contiguous).
    """
    path = Path(path)
    if not path.exists():
        raise SDSegInputError("no such file or folder", path)
    if path.is_dir():
        if what != "image":
            raise SDSegInputError(f"a {what} must be a NIfTI file, not a folder", path)
        from sdseg_monai.dicom import read_ct_series

        image = read_ct_series(path)
        return Volume(image=image, source=str(path), header=None, shape=tuple(image.shape[1:]))
    if not is_nifti(path):
        raise SDSegInputError("unsupported input: expected a .nii / .nii.gz file or a DICOM series folder", path)
    nifti, shape = _nifti_header(path, what)
    try:
        data = np.asanyarray(nifti.dataobj)
    except Exception as e:  # noqa: BLE001  (truncated or corrupt data block, bad gzip)
        raise SDSegInputError(f"cannot read the {what} data ({_reason(e)})", path) from None
    data = data.reshape(shape[:3])
    if data.dtype.kind not in "biuf":  # RGB records, complex numbers
        raise SDSegInputError(f"unsupported voxel type {data.dtype} (expected integers or floats)", path)
    affine = _nifti_affine(nifti, path, what)
    # A copy (never a view of a memory-mapped input) in the file's own layout: NIfTI stores Fortran
    # order, where an axial slice is contiguous; reordering it to C order took longer than the conversion.
    if what == "image":
        with np.errstate(over="ignore", invalid="ignore"):  # float64 beyond float32's range becomes Inf: counted next
            array = np.array(data, dtype=np.float32, order="K")
        nonfinite = count_nonfinite(array, path, what)
    else:
        array = _label_array(data, path, what)
        nonfinite = 0
    from monai.data import MetaTensor  # here: a refused file is told without waiting for MONAI's import

    meta = {"filename_or_obj": str(path), "original_affine": affine.copy(), "space": "RAS"}
    image = MetaTensor(array[None], affine=affine, meta=meta)
    return Volume(image=image, source=str(path), header=nifti.header, shape=shape, nonfinite_voxels=nonfinite)


def count_nonfinite(data: np.ndarray, path: str | os.PathLike, what: str = "image") -> int:
    """NaN/Inf voxels in ``data``; refuses a volume with no finite voxel."""
    if not np.issubdtype(data.dtype, np.floating):
        return 0
    finite = int(np.count_nonzero(np.isfinite(data)))
    if finite == 0:
        raise SDSegInputError(f"{what} has no finite voxel (all {data.size} are NaN or Inf)", path)
    return int(data.size - finite)


def _label_array(data: np.ndarray, path: Path, what: str) -> np.ndarray:
    """A label map as int16: whole numbers that int16 holds, refused otherwise (never wrapped)."""
    nonfinite = count_nonfinite(data, path, what)
    if nonfinite:
        raise SDSegInputError(f"{what} holds {nonfinite} NaN or Inf voxels", path)
    if data.dtype.kind == "f":
        rounded = np.rint(data)
        if not np.allclose(rounded, data):
            raise SDSegInputError(f"{what} holds non-integer values", path)
        data = rounded
    if data.size and (data.min() < np.iinfo(np.int16).min or data.max() > np.iinfo(np.int16).max):
        raise SDSegInputError(f"{what} holds values outside -32768..32767 ({data.min():g}..{data.max():g})", path)
    return np.array(data, dtype=np.int16, order="K")


# How far (mm, per affine entry) a label map's affine may be from its image's and still lie on its grid.
GRID_TOLERANCE = 1e-2


def check_label_grid(image: Volume, label: Volume) -> None:
    """Refuse a label map that does not lie on its image's voxel grid: another shape, or an affine
    further than :data:`GRID_TOLERANCE` from the image's (the labels would be read on the wrong voxels).

    Raises:
        SDSegInputError: one line naming the label map.
    """
    if label.shape[:3] != image.shape[:3]:
        raise SDSegInputError(
            f"label map shape {'x'.join(map(str, label.shape))} differs from its image's {'x'.join(map(str, image.shape))}", label.source
        )
    if not np.allclose(label.affine, image.affine, atol=GRID_TOLERANCE):
        raise SDSegInputError("label map affine differs from its image's: not on the same voxel grid", label.source)


def check_case_grids(cases) -> None:
    """:func:`check_label_grid` for each case (:class:`LabelledCase` or ``(image, label)`` pair of
    paths or volumes), reading what is not loaded yet."""
    for case in map(labelled_case, cases):
        image = case.image if isinstance(case.image, Volume) else read_volume(case.image)
        label = case.label if isinstance(case.label, Volume) else read_volume(case.label, what="label map")
        check_label_grid(image, label)


def check_writable(output: str | os.PathLike, *inputs: str | os.PathLike | None) -> Path:
    """Fail early (before any compute) when ``output`` or its JSON sidecar cannot be written, or
    would harm one of ``inputs`` (see :func:`check_spares_inputs`)."""
    output = Path(output)
    if output.is_dir():
        raise SDSegInputError("output path is a folder; give a file name such as mask.nii.gz", output)
    if not is_nifti(output):
        raise SDSegInputError("output must end in .nii or .nii.gz", output)
    side = sidecar_path(output)
    if side.is_dir():  # the rename would fail only after all the compute
        raise SDSegInputError(f"the label names of {output.name} go to this path, and it is a folder; give another output name", side)
    check_parent_writable(output, "output")
    check_spares_inputs([output, side], inputs)
    return output


def check_report_path(
    path: str | os.PathLike | None, what: str = "the report", inputs: Iterable[str | os.PathLike | None] = ()
) -> Path | None:
    """Refuse, before any compute, a report path (``what`` names it in the message) that is a folder,
    whose folder is missing or read-only, or that would harm one of ``inputs`` (see
    :func:`check_spares_inputs`). None passes (no report asked for)."""
    if path is None:
        return None
    path = Path(path)
    if path.is_dir():
        raise SDSegInputError(f"{what} must name a file, and this is a folder", path)
    check_parent_writable(path, what)
    check_spares_inputs([path], inputs)
    return path


def check_parent_writable(path: Path, what: str) -> None:
    """Refuse a file path whose folder is missing, or where nothing can be written (:func:`check_folder_writable`)."""
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise SDSegInputError(f"cannot write {what}: its folder does not exist", path)
    check_folder_writable(folder, what, path)


def check_folder_writable(folder: str | os.PathLike, what: str, named: str | os.PathLike | None = None) -> None:
    """Refuse, before any compute, a folder (or, when it does not exist yet, the nearest folder above
    it, where it will be made) in which ``what`` cannot be written: tried by creating and removing a
    hidden file there, since ``os.access`` answers yes to root and cannot see a read-only or pseudo
    file system (``/proc``) nor a share that maps users. The message names ``named`` (default: ``folder``).

    Raises:
        SDSegInputError: a file lies in the way, or no file can be created there (the system's reason).
    """
    folder = Path(folder) if str(folder) else Path(".")
    named = folder if named is None else named
    existing = folder
    while not (existing.exists() or existing.is_symlink()) and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise SDSegInputError(f"cannot write {what}: {existing} is not a folder", named)
    try:
        fd, probe = tempfile.mkstemp(prefix=".sdseg3d-write-check.", dir=existing)
    except OSError as e:
        raise SDSegInputError(f"cannot write {what} in {existing} ({e.strerror or type(e).__name__})", named) from None
    os.close(fd)
    os.unlink(probe)


def make_writable_folder(folder: str | os.PathLike, what: str) -> Path:
    """``folder``, made with its parents where missing, once :func:`check_folder_writable` finds that
    ``what`` can be written there; refused in one line otherwise."""
    folder = Path(folder)
    check_folder_writable(folder, what)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SDSegInputError(f"cannot create the folder for {what} ({e.strerror or type(e).__name__})", folder) from None
    return folder


@contextmanager
def told_write_errors(path: str | os.PathLike, what: str = "output") -> Iterator[None]:
    """An ``OSError`` while writing ``path`` (a full disk, a quota, a share gone mid-run) as a one-line
    input error naming it, not a traceback: what the system said, never half a file (the writers
    write through :func:`atomic_paths`)."""
    try:
        yield
    except OSError as e:
        raise SDSegInputError(f"cannot write {what} ({e.strerror or type(e).__name__})", path) from None


def check_spares_inputs(
    targets: Iterable[str | os.PathLike | None],
    inputs: Iterable[str | os.PathLike | None],
    roots: Iterable[str | os.PathLike | None] = (),
) -> None:
    """Refuse, before any compute, output paths that would harm an input: the one rule of every writer.

    A target (a file or a folder about to be written) may not be an input nor resolve to one (``./``,
    a symlink, a hard link), nor lie inside an input folder (a DICOM series, a model folder), nor hold
    an input at any depth (writing into the folder could replace it). A root (a data root) may hold
    outputs, but a target may not be one nor hold one.

    Args:
        targets: the files and folders about to be written.
        inputs: the files and folders read. None, empty and missing paths are skipped: nothing there to harm.
        roots: folders the inputs lie in.

    Raises:
        SDSegInputError: one line naming the target and the input.
    """
    targets = [Path(t) for t in targets if t]
    sources = [(Path(s), False) for s in inputs if s] + [(Path(r), True) for r in roots if r]  # "" would be the working folder
    for source, is_root in sources:
        if not source.exists():
            continue
        resolved = source.resolve()
        # Where its folder entry lies: a folder holding a symlink may be written through it.
        entry = Path(os.path.abspath(source))
        entry = entry.parent.resolve() / entry.name
        folder = source.is_dir()
        for target in targets:
            place = target.resolve()
            same = place == resolved or (target.exists() and os.path.samefile(target, source))
            if same and not folder:
                raise SDSegInputError(f"output would overwrite the input {source}; give another file name", target)
            if same or place in resolved.parents or place in entry.parents:
                raise SDSegInputError(f"output folder would replace the input {source}; choose a new folder", target)
            if folder and not is_root and resolved in place.parents:
                raise SDSegInputError(f"output lies inside the input folder {source}; write it elsewhere", target)


def sidecar_path(output: str | os.PathLike) -> Path:
    """``mask.nii.gz`` -> ``mask.json``: where the label names travel."""
    output = Path(output)
    name = output.name
    for suffix in NIFTI_SUFFIXES[::-1]:
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    return output.with_name(name + ".json")


_PROC_STATUS = "/proc/self/status"


def _proc_umask() -> int | None:
    """The umask as Linux reports it (``Umask:`` in /proc/self/status, Linux 4.7+), or None."""
    try:
        with open(_PROC_STATUS, encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return None


def _import_umask() -> int:
    """The umask once, at import (before any thread of ours), for where /proc has none."""
    value = _proc_umask()
    if value is None:  # no /proc: os.umask is the only reader; 0o077 meanwhile, so a racing thread's file is never laxer
        value = os.umask(0o077)
        os.umask(value)
    return value


_UMASK_AT_IMPORT = _import_umask()


def current_umask() -> int:
    """The process umask, read without setting it: os.umask() sets it process-wide, a race with
    threads creating files (they would get the passing value). Falls back to the value at import."""
    value = _proc_umask()
    return _UMASK_AT_IMPORT if value is None else value


def _temp_prefix(target: Path) -> str:
    return f".{target.name}."


def _fsync_path(path: Path, directory: bool = False) -> None:
    """Flush ``path`` to disk. A folder's flush is skipped where the OS or file system has none."""
    try:
        fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0))
    except OSError:
        if directory:  # e.g. Windows cannot open a folder
            return
        raise
    try:
        os.fsync(fd)
    except OSError as e:
        if not directory or e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


@contextmanager
def atomic_paths(*targets: Path) -> Iterator[list[Path]]:
    """Temporary paths beside ``targets``; on success all are flushed to disk and renamed into place,
    on failure removed.

    Each temporary is fsynced before its rename and each folder after: after a power loss a file
    written later (a done-record) never survives while one written before it is empty. The renames
    are all or nothing: when one fails, the targets renamed before it get back what they held (or
    are removed where there was none), so a label map never stands beside another run's sidecar.
    """
    temps, backups, existed = [], {}, {}
    for target in targets:
        fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(target), suffix="".join(target.suffixes[-2:]) or ".tmp", dir=target.parent)
        os.close(fd)
        temps.append(Path(tmp))
    try:
        yield temps
        mode = 0o666 & ~current_umask()  # mkstemp makes 0600; outputs get ordinary permissions
        for tmp in temps:
            os.chmod(tmp, mode)
            _fsync_path(tmp)
        for target in targets[:-1]:  # once the last rename is done, the write is whole: nothing to undo
            existed[target] = target.is_symlink() or target.exists()
            backups[target] = _backup(target)
        try:
            for tmp, target in zip(temps, targets):
                os.replace(tmp, target)
        except BaseException:
            # Which renames happened, from the temporaries gone: a signal can interrupt right after one.
            renamed = [target for tmp, target in zip(temps, targets) if not (tmp.exists() or tmp.is_symlink())]
            if len(renamed) < len(targets):
                _restore(renamed, backups, existed)
            raise
        for folder in dict.fromkeys(target.parent for target in targets):
            _fsync_path(folder, directory=True)
    finally:
        for leftover in [*temps, *filter(None, backups.values())]:
            if leftover.exists() or leftover.is_symlink():
                leftover.unlink()


def _backup(target: Path) -> Path | None:
    """A second name for ``target``'s present file (a hard link: no copy, the target stays in place;
    a copy where there are no hard links), or None where there is no file or none could be made (a
    file of another user, unreadable: replacing it needs only the folder, and is not refused for that)."""
    if not target.is_symlink() and not target.is_file():
        return None  # none, or a folder: a file's rename onto a folder fails, and needs no undoing
    fd, name = tempfile.mkstemp(prefix=_temp_prefix(target), suffix=".old", dir=target.parent)
    os.close(fd)
    backup = Path(name)
    backup.unlink()
    try:
        os.link(target, backup, follow_symlinks=False)  # a symlink is kept as the link it is
    except OSError:
        try:
            shutil.copy2(target, backup, follow_symlinks=False)
        except OSError:
            backup.unlink(missing_ok=True)
            return None
        except BaseException:
            backup.unlink(missing_ok=True)
            raise
    return backup


def _restore(renamed: list[Path], backups: dict[Path, Path | None], existed: dict[Path, bool]) -> None:
    """Undo the renames onto ``renamed``: each gets its backup back, or is removed where it was new
    (one that existed without a backup keeps the new file). Best effort: a failure here must not hide
    the error that caused it."""
    for target in reversed(renamed):
        try:
            backup = backups.get(target)
            if backup is not None:
                os.replace(backup, target)
            elif not existed.get(target, True):
                target.unlink()
        except OSError:
            pass


def remove_stale_temporaries(folder: Path, names: Iterable[str]) -> list[Path]:
    """Remove the temporaries :func:`atomic_paths` left in ``folder`` for the files ``names`` (a
    process killed mid-write runs no cleanup). Only for a folder no other process writes. Returns them."""
    removed = []
    for name in names:
        for stale in folder.glob(glob_escape(_temp_prefix(Path(name))) + "*"):
            if stale.is_symlink() or stale.is_file():  # a link (a symlink's backup) goes, never its target
                stale.unlink(missing_ok=True)
                removed.append(stale)
    return removed


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` through a temporary file renamed into place."""
    path = Path(path)
    with atomic_paths(path) as (tmp,):
        tmp.write_text(text, encoding="utf-8")
    return path


def nifti_stem(path: str | os.PathLike) -> str:
    """``scan.nii.gz`` / ``scan.nii`` -> ``scan`` (any case); other names unchanged."""
    name = Path(path).name
    for suffix in (".nii.gz", ".nii"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def label_nifti(labels: np.ndarray, volume: Volume):
    """A uint8 NIfTI image of ``labels`` on ``volume``'s grid: same shape, affine, qform and sform."""
    import nibabel as nib

    data = np.asarray(labels, dtype=np.uint8).reshape(volume.shape)
    if volume.header is not None:
        header = volume.header.copy()
        header.set_data_dtype(np.uint8)
        header["cal_min"], header["cal_max"] = 0, 0  # the CT's display range means nothing for labels
        nifti = nib.Nifti2Image if isinstance(header, nib.Nifti2Header) else nib.Nifti1Image  # NIfTI-2 in, NIfTI-2 out
        image = nifti(data, None, header=header)
        for getter, setter in ((volume.header.get_qform, image.set_qform), (volume.header.get_sform, image.set_sform)):
            with np.errstate(all="ignore"):
                try:
                    form, code = getter(coded=True)
                except Exception:  # noqa: BLE001  (a qform that cannot be decoded: the reader skipped it too)
                    form, code = np.full((4, 4), np.nan), 1
            if form is None:
                continue
            # A form the reader skipped (NaN, singular) goes uncoded, holding the affine it used instead:
            # readers of the labels then place them by the other form, as the input was read.
            usable = usable_affine(form)
            setter(form if usable else volume.affine, int(code) if usable else 0)
        # With neither form coded, both stay uncoded: every reader then places the labels where it
        # places the input (ITK and Slicer use the voxel sizes; a coded sform would flip them there).
    else:
        image = nib.Nifti1Image(data, volume.affine)
        image.set_qform(volume.affine, 1)
        image.set_sform(volume.affine, 1)
    image.header["scl_slope"] = 1.0
    image.header["scl_inter"] = 0.0
    image.header["descrip"] = b"sdseg3d labels"
    return image


def write_label_volume(
    labels: np.ndarray, volume: Volume, output: str | os.PathLike, sidecar: dict, inputs: Iterable[str | os.PathLike | None] = ()
) -> tuple[Path, Path]:
    """Write the label map and its JSON sidecar atomically; returns both paths.

    Neither may harm the volume's source nor ``inputs`` (e.g. the model folder; see :func:`check_writable`).
    """
    import nibabel as nib

    output = check_writable(output, volume.source, *inputs)  # the Python API is guarded as the CLI is
    side = sidecar_path(output)
    image = label_nifti(labels, volume)
    with told_write_errors(output), atomic_paths(output, side) as (tmp_image, tmp_side):
        nib.save(image, str(tmp_image))
        tmp_side.write_text(json.dumps(sidecar, indent=2) + "\n", encoding="utf-8")
    return output, side


# -- dataset manifests --------------------------------------------------------------------------------
# A manifest (``data_manifests/*.json``) says which cases a dataset has, where each case's image and
# label map lie relative to a data root, the label table, and the train / validation / test splits.
# Datasets themselves are never shipped; ``check_data_root`` says at once which files a root lacks.

from dataclasses import field  # noqa: E402
from pathlib import PurePosixPath  # noqa: E402

MANIFEST_SCHEMA_VERSION = 1
_MANIFEST_KEYS = {
    "schema_version", "name", "description", "source", "layout", "hu_window", "labels", "subsets", "splits", "cases",
}
_MANIFEST_REQUIRED = ("name", "labels", "splits", "cases")
_CASE_KEYS = ("image", "label")


@dataclass(frozen=True)
class ManifestCase:
    """One case of a manifest: its id and its files, relative to the data root (POSIX separators)."""

    case_id: str
    image: str
    label: str


@dataclass
class Manifest:
    """A validated dataset manifest (see :func:`load_manifest`).

    Attributes:
        path: the manifest file, for messages.
        name: short dataset name, e.g. ``"btcv"``.
        labels: ``{label value: organ name}`` of the reference label maps.
        subsets: named organ subsets, e.g. ``{"transunet8": (...)}``.
        splits: ``{split name: case ids}`` in manifest order.
        cases: ``{case id: ManifestCase}`` in manifest order.
        hu_window: the dataset's (low, high) intensity window, or None.
    """

    path: Path
    name: str
    labels: dict[int, str]
    splits: dict[str, tuple[str, ...]]
    cases: dict[str, ManifestCase]
    subsets: dict[str, tuple[str, ...]] = field(default_factory=dict)
    hu_window: tuple[float, float] | None = None
    description: str = ""
    source: Any = None
    layout: str = ""

    def cases_for(self, split: str | None = None) -> list[str]:
        """Case ids of ``split`` in manifest order; every case when ``split`` is None.

        Raises:
            SDSegInputError: the manifest has no such split.
        """
        if split is None:
            return list(self.cases)
        if split not in self.splits:
            raise SDSegInputError(f"no split {split!r} in manifest; known: {', '.join(self.splits) or 'none'}", self.path)
        return list(self.splits[split])

    def label_of(self, organ: str) -> int | None:
        """The label value of organ ``organ``, or None when the dataset does not label it."""
        for value, name in self.labels.items():
            if name == organ:
                return value
        return None


def _manifest_pairs(pairs: list[tuple[str, Any]]) -> dict:
    """``json`` object hook that refuses duplicate keys (a case listed twice would otherwise vanish)."""
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _relative_file(value: Any, where: str, bad) -> str:
    """A manifest file entry: a non-empty relative POSIX path that stays inside the data root."""
    if not isinstance(value, str) or not value.strip():
        bad(f"{where} must be a non-empty relative path")
    posix = PurePosixPath(value.replace("\\", "/"))
    if not posix.parts:  # "." or "./": the data root itself, not a file in it
        bad(f"{where} {value!r} names no file under the data root")
    if posix.is_absolute() or ".." in posix.parts or ":" in posix.parts[0]:
        bad(f"{where} {value!r} must be relative to the data root, without '..'")
    return posix.as_posix()


def load_manifest(path: str | os.PathLike) -> Manifest:
    """Read and validate a dataset manifest.

    Schema (JSON object)::

        {"schema_version": 1, "name": "btcv", "description": "...", "source": {...}, "layout": "...",
         "hu_window": [-175, 250],
         "labels": {"1": "spleen", ...},                      # label value -> organ name
         "subsets": {"transunet8": ["aorta", ...]},            # optional named organ subsets
         "splits": {"train": [...], "validation": [...], "test": [...]},
         "cases": {"0001": {"image": "img/img0001.nii.gz", "label": "label/label0001.nii.gz"}, ...}}

    Rules: split entries name known cases, at most once per split; ``test`` shares no case with any
    other split, and ``train`` none with ``validation`` (no leakage); subsets name known organs.

    Raises:
        SDSegInputError: one line naming the file, for a missing, unreadable or invalid manifest.
    """
    path = Path(path)
    if not path.exists():
        raise SDSegInputError("no such manifest file", path)
    if path.is_dir():
        raise SDSegInputError("manifest is a folder; give a .json manifest file", path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise SDSegInputError(f"cannot read manifest ({_reason(e)})", path) from None
    try:
        data = json.loads(text, object_pairs_hook=_manifest_pairs)
    except json.JSONDecodeError as e:
        raise SDSegInputError(f"manifest is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})", path) from None
    except ValueError as e:  # duplicate keys
        raise SDSegInputError(f"invalid manifest: {e}", path) from None

    def bad(message: str):
        raise SDSegInputError(f"invalid manifest: {message}", path)

    if not isinstance(data, dict):
        bad("the top level must be a JSON object")
    unknown = sorted(set(data) - _MANIFEST_KEYS)
    if unknown:
        bad(f"unknown key(s) {', '.join(map(repr, unknown))}; known: {', '.join(sorted(_MANIFEST_KEYS))}")
    missing = [k for k in _MANIFEST_REQUIRED if k not in data]
    if missing:
        bad(f"missing key(s) {', '.join(map(repr, missing))}")
    version = data.get("schema_version", MANIFEST_SCHEMA_VERSION)
    if version != MANIFEST_SCHEMA_VERSION:
        bad(f"schema_version {version!r} is not supported (this version reads {MANIFEST_SCHEMA_VERSION})")
    name = data["name"]
    if not isinstance(name, str) or not name.strip():
        bad("'name' must be a non-empty string")
    for key in ("description", "layout"):
        if not isinstance(data.get(key, ""), str):
            bad(f"{key!r} must be a string")

    hu_window = data.get("hu_window")
    if hu_window is not None:
        numbers = isinstance(hu_window, list) and len(hu_window) == 2
        numbers = numbers and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in hu_window)
        if not numbers or not hu_window[0] < hu_window[1]:
            bad(f"'hu_window' must be [low, high] with low < high, got {hu_window!r}")
        hu_window = (float(hu_window[0]), float(hu_window[1]))

    raw_labels = data["labels"]
    if not isinstance(raw_labels, dict) or not raw_labels:
        bad("'labels' must be a non-empty object {\"value\": \"organ name\"}")
    labels: dict[int, str] = {}
    for key, organ in raw_labels.items():
        # Label maps are written as uint8 and 0 is background.
        if not key.isdigit() or not 1 <= int(key) <= 255:
            bad(f"label value {key!r} must be an integer 1..255")
        if int(key) in labels:
            bad(f"label value {int(key)} is given twice")
        if not isinstance(organ, str) or not organ.strip():
            bad(f"label {key} must name an organ")
        if organ in labels.values():
            bad(f"organ {organ!r} has more than one label value")
        labels[int(key)] = organ

    raw_subsets = data.get("subsets", {})
    if not isinstance(raw_subsets, dict):
        bad("'subsets' must be an object {\"name\": [organ, ...]}")
    subsets: dict[str, tuple[str, ...]] = {}
    for subset, members in raw_subsets.items():
        if not isinstance(members, list) or not members or not all(isinstance(m, str) for m in members):
            bad(f"subset {subset!r} must be a non-empty list of organ names")
        unknown = [m for m in members if m not in labels.values()]
        if unknown:
            bad(f"subset {subset!r} names unknown organ(s) {', '.join(unknown)}")
        if len(set(members)) != len(members):
            bad(f"subset {subset!r} names an organ twice")
        subsets[subset] = tuple(members)

    raw_cases = data["cases"]
    if not isinstance(raw_cases, dict) or not raw_cases:
        bad("'cases' must be a non-empty object {\"case id\": {\"image\": ..., \"label\": ...}}")
    cases: dict[str, ManifestCase] = {}
    for case_id, files in raw_cases.items():
        if not case_id.strip():
            bad("a case id is empty")
        if not isinstance(files, dict) or set(files) != set(_CASE_KEYS):
            bad(f"case {case_id!r} must be an object with exactly the keys 'image' and 'label'")
        image = _relative_file(files["image"], f"case {case_id!r} image", bad)
        label = _relative_file(files["label"], f"case {case_id!r} label", bad)
        cases[case_id] = ManifestCase(case_id, image, label)

    raw_splits = data["splits"]
    if not isinstance(raw_splits, dict) or not raw_splits:
        bad("'splits' must be a non-empty object {\"split\": [case id, ...]}")
    splits: dict[str, tuple[str, ...]] = {}
    for split, members in raw_splits.items():
        if not isinstance(members, list) or not all(isinstance(m, str) for m in members):
            bad(f"split {split!r} must be a list of case ids")
        unknown = [m for m in members if m not in cases]
        if unknown:
            bad(f"split {split!r} names unknown case(s) {', '.join(unknown)}")
        twice = sorted({m for m in members if members.count(m) > 1})
        if twice:
            bad(f"split {split!r} lists case(s) {', '.join(twice)} more than once")
        splits[split] = tuple(members)
    # Leakage checks: a test case must never be trained or tuned on.
    pairs = [("test", other) for other in splits if other != "test"] + [("train", "validation")]
    for first, second in pairs:
        shared = [c for c in splits.get(first, ()) if c in splits.get(second, ())]
        if shared:
            bad(f"case(s) {', '.join(shared)} are in both split {first!r} and split {second!r}")

    return Manifest(
        path=path,
        name=name,
        labels=labels,
        splits=splits,
        cases=cases,
        subsets=subsets,
        hu_window=hu_window,
        description=data.get("description", ""),
        source=data.get("source"),
        layout=data.get("layout", ""),
    )


def check_data_root(
    manifest: Manifest, data_root: str | os.PathLike, split: str | None = None
) -> list[tuple[str, Path, Path]]:
    """Check that every file of ``split`` (every case when None) exists under ``data_root``.

    Returns:
        ``(case id, image path, label path)`` per case, in manifest order.

    Raises:
        SDSegInputError: one line naming the data root, for a missing root, or listing every missing
            file (their count, then each path relative to the root), so that one run shows them all.
    """
    root = Path(data_root)
    ids = manifest.cases_for(split)  # an unknown split fails here, before looking at the disk
    if not root.exists():
        raise SDSegInputError("no such data folder", root)
    if not root.is_dir():
        raise SDSegInputError("the data root must be a folder", root)
    found, missing = [], []
    for case_id in ids:
        case = manifest.cases[case_id]
        image, label = root / case.image, root / case.label
        # An image may also be a DICOM series folder; a label map is always a file.
        if not image.exists():
            missing.append(case.image)
        if not label.is_file():
            missing.append(case.label)
        found.append((case_id, image, label))
    if missing:
        what = f"split {split!r}" if split is not None else "all cases"
        raise SDSegInputError(
            f"{len(missing)} of {2 * len(ids)} files of {what} of manifest {manifest.path.name} are missing: "
            + ", ".join(missing),
            root,
        )
    return found


# ---------------------------------------------------------------------------------------------------
# Training slices
# ---------------------------------------------------------------------------------------------------

AUGMENTATIONS = ("none", "paper", "strong")
ORGAN_SAMPLINGS = ("slice", "organ")


def lateral_organs(config) -> list[str]:
    """The organs of a model config (:class:`~sdseg_monai.config.SDSegConfig`) that lie on one side of
    the body: named left or right (``left_kidney``), or coded with a laterality."""
    import re

    from sdseg_monai.labels import organ_code

    return [
        organ["name"]
        for organ in config.organs
        if {"left", "right"} & set(re.split(r"[^a-z]+", organ["name"].lower())) or organ_code(organ, config.dataset).modifier is not None
    ]


def flip_axes(config) -> tuple[int, ...]:
    """The axes (0, 1) of a model slice that random flips may mirror.

    A model with lateral organs (see :func:`lateral_organs`; BTCV's kidneys and adrenal glands) is
    never mirrored left to right: a mirrored right kidney looks like a left one, so the model would
    learn that the two are interchangeable. Mirroring front to back keeps left and right, and stays.
    """
    if not lateral_organs(config):
        return (0, 1)
    orientation = config.preprocessing.orientation.upper()
    return tuple(axis for axis in (0, 1) if orientation[axis] not in "LR")


def slice_augmentation(kind: str = "strong", flips: bool = False, *, size: int, axes: tuple[int, ...] = (0, 1)):
    """MONAI dictionary transforms for one training sample ``{"image": (3, S, S), "label": (1, S, S)}``.

    ``"strong"`` is the recipe :class:`DeviceSliceBatches` applies to whole batches, with the same
    ranges (its class constants): per-axis scale, translation in pixels on both axes, a coarse elastic
    field of the same control spacing and displacement spread, intensity scale, shift and noise.

    Args:
        kind: ``"none"``; ``"paper"`` (random flips only, as the official code); ``"strong"`` (flips if
            asked, plus random affine, elastic deformation, intensity scale/shift and noise, for small
            data sets such as phantoms and a single real CT).
        flips: random flips with ``"none"`` and ``"strong"`` too.
        size: the model's slice size S (translations and the elastic field are in pixels).
        axes: the slice axes flips may mirror: :func:`flip_axes` of the model (never left-right for
            a model with lateral organs).
    """
    from monai.transforms import (
        Compose,
        Rand2DElasticd,
        RandAffined,
        RandFlipd,
        RandGaussianNoised,
        RandScaleIntensityd,
        RandShiftIntensityd,
    )

    if kind not in AUGMENTATIONS:
        raise SDSegInputError(f"augmentation must be one of {AUGMENTATIONS}, got {kind!r}")
    keys = ["image", "label"]
    steps = []
    if flips or kind == "paper":
        steps += [RandFlipd(keys, prob=0.5, spatial_axis=axis) for axis in axes]
    if kind == "strong":
        r = DeviceSliceBatches
        # DeviceSliceBatches draws each control displacement uniform in +-ELASTIC_MAGNITUDE x S pixels;
        # MONAI draws a normal one: the same spread has SD (that bound) / sqrt(3).
        elastic_sd = r.ELASTIC_MAGNITUDE * size / 3**0.5
        steps += [
            RandAffined(
                keys,
                prob=r.AFFINE_PROB,
                rotate_range=(r.ROTATE,),  # one angle in 2D
                # MONAI takes one range per axis (a scalar is axis 0 only), translations in pixels.
                scale_range=(r.SCALE, r.SCALE),
                translate_range=(r.TRANSLATE * size, r.TRANSLATE * size),
                mode=("bilinear", "nearest"),
                padding_mode=("border", "zeros"),
            ),
            Rand2DElasticd(
                keys,
                spacing=(max(1, round(size / (r.ELASTIC_GRID - 1))),) * 2,
                magnitude_range=(elastic_sd, elastic_sd),
                prob=r.ELASTIC_PROB,
                mode=("bilinear", "nearest"),
                padding_mode=("border", "zeros"),
            ),
            RandScaleIntensityd("image", factors=r.INTENSITY_SCALE, prob=r.INTENSITY_PROB),
            RandShiftIntensityd("image", offsets=r.INTENSITY_SHIFT, prob=r.INTENSITY_PROB),
            RandGaussianNoised("image", std=r.NOISE_STD, prob=r.NOISE_PROB, sample_std=False),  # a fixed SD, as on the device
        ]
    return Compose(steps) if steps else None


@dataclass(frozen=True)
class LabelledCase:
    """A training or validation volume, its label map, and how that map labels the model's organs.

    Attributes:
        image: path or :class:`Volume`.
        label: path or :class:`Volume`.
        values: ``{model label value: value in this label map}`` of the model's organs the map labels
            (a dataset's own table, matched by organ name: :func:`manifest_organ_values`); the others
            are not labelled there, so they are never drawn from this case, not even as absent. None:
            the map uses the model's values for every organ.
    """

    image: Any
    label: Any
    values: dict[int, int] | None = None

    def organ_values(self, organ_labels) -> dict[int, int]:
        """``{model value: label map value}`` of the organs labelled, given the model's values."""
        return {int(v): int(v) for v in organ_labels} if self.values is None else dict(self.values)


def labelled_case(case) -> LabelledCase:
    """A :class:`LabelledCase` as it is, or one from an ``(image, label)`` pair in the model's values."""
    return case if isinstance(case, LabelledCase) else LabelledCase(*case)


def manifest_organ_values(manifest: Manifest, config) -> dict[int, int]:
    """Which of a model's organs a dataset labels, and with which value: ``{model label value: manifest
    label value}``, matched by organ name as evaluation does.

    Raises:
        SDSegInputError: one line naming the manifest, when it labels none of the model's organs, or
            when its HU window is not the window the model's preprocessing applies (the model would
            train on other intensities than it segments with).
    """
    window = tuple(config.preprocessing.hu_window)
    if manifest.hu_window is not None and not np.allclose(manifest.hu_window, window):
        raise SDSegInputError(
            f"the manifest's HU window {manifest.hu_window[0]:g}..{manifest.hu_window[1]:g} is not the model's "
            f"{window[0]:g}..{window[1]:g}; train a model made for this dataset (e.g. --dataset {manifest.name})",
            manifest.path,
        )
    matched, _ = match_organs(manifest, dict(zip(config.organ_labels, config.organ_names)))
    return {model_label: dataset_label for dataset_label, model_label, _ in matched}


def match_organs(manifest: Manifest, organs: dict[int, str]) -> tuple[list[tuple[int, int, str]], list[str]]:
    """Match a model's organs (``{model label: name}``) to a manifest's labels by name.

    Returns:
        ``(dataset label, model label, name)`` per organ matched, in dataset label order, and the
        names of the model's organs that the manifest does not label.

    Raises:
        SDSegInputError: one line naming the manifest, when it labels none of them.
    """
    matched, unmatched = [], []
    for model_label, name in organs.items():
        dataset_label = manifest.label_of(name)
        if dataset_label is None:
            unmatched.append(name)
        else:
            matched.append((dataset_label, int(model_label), name))
    if not matched:
        raise SDSegInputError(
            f"the model segments {', '.join(organs.values())}, none of which manifest {manifest.name!r} "
            f"labels ({', '.join(manifest.labels.values())})",
            manifest.path,
        )
    return sorted(matched), unmatched


class SliceDataset:
    """Axial training slices of labelled volumes, prepared once in the model's slice space.

    Each volume goes through the model's own preprocessing (canonical orientation, HU window,
    aspect-preserving resize), and its slices and model-space label maps are cached in memory. A sample
    draws a slice and an organ: mostly an organ present in the slice, a share ``absent_fraction`` an
    absent one (its mask is empty, so that absent organs learn to decode to nothing). Organs that a
    case does not label (:class:`LabelledCase`) are never drawn from it.

    All randomness of item ``i`` in epoch ``e`` comes from ``seed``, ``e`` and ``i``: the data stream is
    the same in every run, and a resumed run sees exactly what an uninterrupted one would.

    Args:
        cases: :class:`LabelledCase`, or ``(image, label)`` pairs (paths or :class:`Volume`) in the
            model's label values.
        preprocessing: the model's :class:`~sdseg_monai.config.Preprocessing`.
        organ_labels: label values of the model's organs; class index k is ``organ_labels[k]``.
        absent_fraction: share of samples that draw an organ absent from the slice.
        augment: a transform from :func:`slice_augmentation`, or None.
        seed: base seed of the data stream.
        load_threads: threads preparing the cases (default: the CPU count, at most 8).
    """

    def __init__(
        self,
        cases,
        preprocessing,
        organ_labels,
        absent_fraction: float = 0.1,
        augment=None,
        seed: int = 0,
        load_threads: int | None = None,
    ):
        from concurrent.futures import ThreadPoolExecutor

        self.preprocessing = preprocessing
        self.organ_labels = [int(v) for v in organ_labels]
        self.absent_fraction = float(absent_fraction)
        self.augment = augment
        self.seed = int(seed)
        self.epoch = 0
        from sdseg_monai.transforms import IMAGE_KEY, LABEL_KEY, canonical_transforms

        transforms = canonical_transforms(preprocessing, keys=[IMAGE_KEY], label_keys=[LABEL_KEY])
        threads = load_threads if load_threads is not None else min(8, os.cpu_count() or 1)
        # Decompression and resampling release the GIL; map keeps the case order, so the result is the
        # same with any number of threads.
        with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
            prepared = list(pool.map(lambda case: self._prepare(labelled_case(case), transforms), cases))
        self.images, self.labels, self.index = [], [], []
        self.known = []  # per volume: which organs (class indices) its label map labels
        for number, (model_grey, model_labels, known) in enumerate(prepared):
            self.images.append(model_grey)
            self.labels.append(model_labels)
            self.known.append(known)
            self.index += [(number, z) for z in range(model_grey.shape[0])]
        if not self.index:
            raise SDSegInputError("no training slices: the case list is empty")

    def _prepare(self, case, transforms):
        """One case's slices (float16 grey) and label maps (uint8, the model's label values), both in
        the model's slice space, and the class indices its label map labels; ``transforms`` are the
        model's canonical (deterministic) image + label transforms."""
        import torch

        from sdseg_monai.transforms import IMAGE_KEY, LABEL_KEY, SliceGeometry

        image, label, values = case.image, case.label, case.organ_values(self.organ_labels)
        if not set(values) & set(self.organ_labels):
            raise SDSegInputError("this case labels none of the model's organs", getattr(label, "source", label))
        image = image if isinstance(image, Volume) else read_volume(image)
        label = label if isinstance(label, Volume) else read_volume(label, what="label map")
        check_label_grid(image, label)
        size = self.preprocessing.slice_size
        canonical = transforms({IMAGE_KEY: image.image, LABEL_KEY: label.image})
        grey = canonical[IMAGE_KEY][0].permute(2, 0, 1)  # (Z, X, Y)
        lab = canonical[LABEL_KEY][0].permute(2, 0, 1)
        geometry = SliceGeometry(tuple(grey.shape[1:]), size)
        model_grey = geometry.to_model(grey[:, None])[:, 0].to(torch.float16)
        model_labels = torch.zeros((grey.shape[0], size, size), dtype=torch.uint8)
        for value, source in values.items():
            model_labels[geometry.masks_to_model(lab == source) > 0] = value
        known = [k for k, value in enumerate(self.organ_labels) if value in values]
        return model_grey, model_labels, known

    def __len__(self) -> int:
        return len(self.index)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def channels(self, volume: int, z: int):
        """The 3 input channels of slice ``z`` (grey replicated, or z-1, z, z+1 for 2.5D)."""
        import torch

        grey = self.images[volume]
        if self.preprocessing.channels == "2.5d":
            depth = grey.shape[0]
            return torch.stack([grey[min(max(z + o, 0), depth - 1)] for o in (-1, 0, 1)]).float()
        return grey[z].float()[None].expand(3, -1, -1).clone()

    def __getitem__(self, item: int) -> dict:
        import torch

        rng = np.random.default_rng([self.seed, self.epoch, int(item)])
        volume, z = self.index[item]
        label_slice = self.labels[volume][z]
        present = [k for k, v in enumerate(self.organ_labels) if bool((label_slice == v).any())]
        absent = [k for k in self.known[volume] if k not in present]
        if present and (not absent or rng.random() >= self.absent_fraction):
            organ = int(rng.choice(present))
        else:
            organ = int(rng.choice(absent))
        sample = {"image": self.channels(volume, z), "label": (label_slice == self.organ_labels[organ]).float()[None]}
        if self.augment is not None:
            self.augment.set_random_state(seed=int(rng.integers(2**31)))
            sample = self.augment(sample)
        image = torch.as_tensor(sample["image"]).float().clamp(-1, 1)
        mask = (torch.as_tensor(sample["label"])[0] >= 0.5).float()
        return {"image": image, "mask": mask, "class_id": torch.tensor(organ, dtype=torch.long)}


def derived_seed(*keys: int) -> int:
    """A 62-bit seed drawn from ``keys`` (e.g. base seed, step, rank): independent streams per key tuple."""
    return int(np.random.default_rng([int(k) for k in keys]).integers(2**62))


class DeviceSliceBatches:
    """Training batches drawn and augmented on the training device, all at once.

    A GPU trains the ``tiny`` preset far faster than worker processes can feed it one sample at a
    time, so this keeps a :class:`SliceDataset`'s model-space slices and label maps on the device and
    builds each batch with a few batched tensor operations: the same sampling rule (an organ present
    in the slice, a share ``absent_fraction`` an absent one) and the same ``"strong"`` recipe as
    :func:`slice_augmentation` (random affine, coarse elastic displacement, intensity scale, shift and
    noise; flips only if asked, and only along ``axes``), resampled in one ``grid_sample`` per batch.

    Batch ``n`` is a pure function of ``seed`` and ``n`` (random draws come from a CPU generator), so a
    resumed run sees exactly the batches an uninterrupted one would.

    Two options serve small structures and slow machines:

    - ``organ_sampling="organ"`` draws the organ first (uniform over the organs the data shows), then a
      slice showing it; with ``"slice"`` (the default) a slice comes first and small organs, present
      in few slices, are drawn several times less often than the liver.
    - ``organs_per_slice=O`` takes O different organs of each drawn slice: a batch of B samples then
      holds B / O slices, so the vision encoder, the costliest part of a step, runs O times less often.
      The batch gains ``"image_index"``, the slice of each sample.

    Args:
        dataset: the prepared slices.
        device: where batches are built (the training device).
        augmentation: ``"none"``, ``"paper"`` (flips) or ``"strong"``.
        flips: random flips with ``"none"`` and ``"strong"`` too.
        axes: the slice axes flips may mirror (:func:`flip_axes`: never left-right for a model with
            lateral organs).
        seed: base seed of the batch stream.
        organ_sampling: ``"slice"`` or ``"organ"`` (see above).
        organs_per_slice: samples taken from each drawn slice, each a different organ.
    """

    # Ranges of the "strong" recipe, which slice_augmentation's MONAI transforms take too. Scale is
    # 1 +- SCALE per axis; TRANSLATE, ELASTIC_MAGNITUDE: fractions of the slice; ELASTIC_GRID control
    # points per side.
    AFFINE_PROB, ROTATE, SCALE, TRANSLATE = 0.5, 0.2, 0.15, 0.06
    ELASTIC_PROB, ELASTIC_GRID, ELASTIC_MAGNITUDE = 0.2, 6, 0.03
    INTENSITY_PROB, INTENSITY_SCALE, INTENSITY_SHIFT = 0.5, 0.1, 0.1
    NOISE_PROB, NOISE_STD = 0.3, 0.03

    def __init__(
        self,
        dataset: SliceDataset,
        device,
        augmentation: str = "strong",
        flips: bool = False,
        seed: int = 0,
        organ_sampling: str = "slice",
        organs_per_slice: int = 1,
        axes: tuple[int, ...] = (0, 1),
    ):
        import torch

        if augmentation not in AUGMENTATIONS:
            raise SDSegInputError(f"augmentation must be one of {AUGMENTATIONS}, got {augmentation!r}")
        if organ_sampling not in ORGAN_SAMPLINGS:
            raise SDSegInputError(f"organ sampling must be one of {ORGAN_SAMPLINGS}, got {organ_sampling!r}")
        fewest = min(len(known) for known in dataset.known)  # organs labelled by the case that labels fewest
        if not 1 <= int(organs_per_slice) <= fewest:
            raise SDSegInputError(
                f"organs per slice must be 1 to {fewest}" + (" (the organs every case labels)" if fewest < len(dataset.organ_labels) else "")
                + f", got {organs_per_slice}"
            )
        self.organ_sampling = organ_sampling
        self.organs_per_slice = int(organs_per_slice)
        self.device = torch.device(device)
        self.augmentation = augmentation
        self.flips = bool(flips) or augmentation == "paper"
        self.axes = tuple(axes)
        self.seed = int(seed)
        self.absent_fraction = dataset.absent_fraction
        self.two_and_half_d = dataset.preprocessing.channels == "2.5d"
        # Plain tensors: MONAI's MetaTensor bookkeeping would cost more than the batch itself.
        self.images = torch.cat([v.as_subclass(torch.Tensor) for v in dataset.images]).to(self.device)  # (N, S, S) fp16
        labels = torch.cat([v.as_subclass(torch.Tensor) for v in dataset.labels])
        self.labels = labels.to(self.device)
        values = torch.tensor(dataset.organ_labels, dtype=labels.dtype)
        self.organ_values = values.to(self.device)
        # Which organs each slice shows, and each slice's neighbours within its own volume (2.5D).
        self.present = (labels[:, None] == values[None, :, None, None]).flatten(2).any(2)  # (N, K) on the CPU
        # Which organs each slice's label map labels: only those are drawn, present or absent.
        known = torch.zeros(len(dataset.images), len(values), dtype=torch.bool)
        for number, organs in enumerate(dataset.known):
            known[number, organs] = True
        self.known = known.repeat_interleave(torch.tensor([v.shape[0] for v in dataset.images]), 0)
        # For organ-first sampling: the slices showing each organ, concatenated, with offsets and counts.
        self.organ_slices = self.present.T.nonzero(as_tuple=True)[1]  # ordered by organ, then slice
        self.organ_counts = self.present.sum(0)
        self.organ_offsets = torch.cumsum(self.organ_counts, 0) - self.organ_counts
        self.shown_organs = torch.nonzero(self.organ_counts > 0).flatten()
        prev, nxt, offset = [], [], 0
        for volume in dataset.images:
            depth = volume.shape[0]
            z = torch.arange(depth)
            prev.append(offset + (z - 1).clamp(min=0))
            nxt.append(offset + (z + 1).clamp(max=depth - 1))
            offset += depth
        self.prev, self.next = torch.cat(prev).to(self.device), torch.cat(nxt).to(self.device)

    def __len__(self) -> int:
        return self.images.shape[0]

    def _organs(self, slices, generator, taken=None):
        """One organ per slice, not among ``taken`` (N, K): uniform among those present, or (share
        ``absent_fraction``, or when none is left present) uniform among those absent that the slice's
        case labels."""
        import torch

        present = self.present[slices]
        free = self.known[slices] if taken is None else self.known[slices] & ~taken
        pick_absent = (torch.rand(len(slices), generator=generator) < self.absent_fraction) | ~(present & free).any(1)
        pick_absent &= (~present & free).any(1)
        pool = torch.where(pick_absent[:, None], ~present, present) & free
        scores = torch.rand(present.shape, generator=generator).masked_fill(~pool, -1.0)
        return scores.argmax(1)

    def _organ_first(self, count, generator):
        """(slices, organs): an organ uniform among those shown, then a slice showing it; a share
        ``absent_fraction`` are instead a uniform slice with an organ absent from it."""
        import torch

        organs = self.shown_organs[torch.randint(len(self.shown_organs), (count,), generator=generator)]
        within = (torch.rand(count, generator=generator) * self.organ_counts[organs]).long()
        slices = self.organ_slices[self.organ_offsets[organs] + within.clamp(max=self.organ_counts[organs] - 1)]
        other = torch.randint(0, len(self), (count,), generator=generator)
        absent = ~self.present[other] & self.known[other]
        scores = torch.rand(absent.shape, generator=generator).masked_fill(~absent, -1.0)
        negative = (torch.rand(count, generator=generator) < self.absent_fraction) & absent.any(1)
        return torch.where(negative, other, slices), torch.where(negative, scores.argmax(1), organs)

    def batch(self, number: int, batch_size: int, rank: int = 0) -> dict:
        """Batch ``number`` of process ``rank``: ``{"image": (B, 3, S, S), "mask": (B, S, S), "class_id": (B,)}``,
        with ``organs_per_slice`` O > 1: B / O images and ``"image_index"`` (B,), each sample's image."""
        import torch

        per_slice = self.organs_per_slice
        if batch_size % per_slice:
            raise SDSegInputError(f"batch size {batch_size} is not a multiple of organs per slice ({per_slice})")
        count = batch_size // per_slice
        generator = torch.Generator().manual_seed(derived_seed(self.seed, number, rank))
        if self.organ_sampling == "organ":
            slices, first = self._organ_first(count, generator)
        else:
            slices = torch.randint(0, len(self), (count,), generator=generator)
            first = self._organs(slices, generator)
        organs = [first]
        taken = torch.zeros_like(self.present[slices])
        for _ in range(per_slice - 1):
            taken[torch.arange(count), organs[-1]] = True
            organs.append(self._organs(slices, generator, taken))
        organs = torch.stack(organs, 1)  # (count, O)
        idx, cls = slices.to(self.device), organs.to(self.device)
        if self.two_and_half_d:
            image = torch.stack([self.images[self.prev[idx]], self.images[idx], self.images[self.next[idx]]], 1).float()
        else:
            image = self.images[idx].float()[:, None].expand(-1, 3, -1, -1)
        mask = (self.labels[idx][:, None] == self.organ_values[cls][:, :, None, None]).float()  # (count, O, S, S)
        image, mask = self._augment(image, mask, generator)
        batch = {"image": image.clamp(-1, 1), "mask": (mask.flatten(0, 1) >= 0.5).float(), "class_id": cls.flatten()}
        if per_slice > 1:
            batch["image_index"] = torch.arange(count, device=self.device).repeat_interleave(per_slice)
        return batch

    def draw_spatial(self, b: int, generator) -> dict:
        """The random spatial parameters of ``b`` samples: the flips (B, 2) of slice axes 0 and 1 (-1
        mirrors), and of the ``"strong"`` recipe whether the affine applies (B,), its angle (B,), scale
        (B, 2) and shift (B, 2) in affine_grid's (x, y) order, i.e. slice axes (1, 0), and the coarse
        elastic displacements (B, 2, G, G), zero where the warp does not apply. Shifts and
        displacements are in grid units: 2 span the slice."""
        import torch

        rand = lambda *shape: torch.rand(shape, generator=generator)  # noqa: E731
        flip = torch.ones(b, 2)
        if self.flips:
            # Drawn for both axes whichever may mirror, so the other draws do not depend on it.
            draws = torch.where(rand(b, 2) < 0.5, -1.0, 1.0)
            for axis in self.axes:
                flip[:, axis] = draws[:, axis]
        on = rand(b) < self.AFFINE_PROB
        angle = (rand(b) * 2 - 1) * self.ROTATE * on
        scale = 1 + (rand(b, 2) * 2 - 1) * self.SCALE * on[:, None]
        shift = (rand(b, 2) * 2 - 1) * self.TRANSLATE * 2 * on[:, None]
        warp = (rand(b) < self.ELASTIC_PROB).float()
        coarse = (rand(b, 2, self.ELASTIC_GRID, self.ELASTIC_GRID) * 2 - 1) * self.ELASTIC_MAGNITUDE * 2
        return {"flip": flip, "on": on, "angle": angle, "scale": scale, "shift": shift, "elastic": coarse * warp[:, None, None, None]}

    def _augment(self, image, mask, generator):
        import torch
        import torch.nn.functional as F

        b, size = image.shape[0], image.shape[-1]
        rand = lambda *shape: torch.rand(shape, generator=generator)  # noqa: E731
        theta = torch.eye(2, 3).repeat(b, 1, 1)
        drawn = self.draw_spatial(b, generator) if self.flips or self.augmentation == "strong" else None
        if self.flips:
            # affine_grid's x (row 0) runs along the last axis, slice axis 1; its y along axis 0.
            theta[:, 0, 0] *= drawn["flip"][:, 1]
            theta[:, 1, 1] *= drawn["flip"][:, 0]
        elastic = None
        if self.augmentation == "strong":
            angle, scale, shift = drawn["angle"], drawn["scale"], drawn["shift"]
            cos, sin = torch.cos(angle), torch.sin(angle)
            rotation = torch.stack([torch.stack([cos, -sin], 1), torch.stack([sin, cos], 1)], 1)
            affine = rotation * scale[:, None, :]
            theta = torch.cat([affine @ theta[:, :, :2], shift[:, :, None]], 2)
            elastic = drawn["elastic"].to(self.device)
        if self.flips or self.augmentation == "strong":
            grid = F.affine_grid(theta.to(self.device), list(image.shape), align_corners=False)
            if elastic is not None:
                field = F.interpolate(elastic, size=(size, size), mode="bicubic", align_corners=True)
                grid = grid + field.permute(0, 2, 3, 1)
            image = F.grid_sample(image, grid, mode="bilinear", padding_mode="border", align_corners=False)
            mask = F.grid_sample(mask, grid, mode="nearest", padding_mode="zeros", align_corners=False)
        if self.augmentation == "strong":
            gain = 1 + (rand(b) * 2 - 1) * self.INTENSITY_SCALE * (rand(b) < self.INTENSITY_PROB)
            offset = (rand(b) * 2 - 1) * self.INTENSITY_SHIFT * (rand(b) < self.INTENSITY_PROB)
            noisy = (rand(b) < self.NOISE_PROB).float() * self.NOISE_STD
            # Pixel noise is drawn on the device (a CPU draw of B x 3 x S x S would dominate the step).
            noise_generator = torch.Generator(self.device).manual_seed(int(torch.randint(2**62, (1,), generator=generator)))
            noise = torch.randn(image.shape, generator=noise_generator, device=self.device) * noisy.to(self.device)[:, None, None, None]
            image = image * gain.to(self.device)[:, None, None, None] + offset.to(self.device)[:, None, None, None] + noise
        return image, mask
