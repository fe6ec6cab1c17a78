"""Reading CT volumes and label maps, and writing label volumes, with one-line errors.

Inputs are never modified. Outputs are written to a temporary file in the destination folder and
renamed into place, so an existing output is never half-overwritten.
"""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from sdseg_monai import _quiet  # noqa: F401
from sdseg_monai.errors import SDSegInputError

NIFTI_SUFFIXES = (".nii", ".nii.gz")


@dataclass
class Volume:
    """A loaded volume: a (1, X, Y, Z) ``MetaTensor`` (affine in RAS) plus where it came from.

    ``header`` is the NIfTI header for NIfTI input (its qform/sform are reused on output), else None.
    ``shape`` is the input's own shape (a singleton 4th axis included).
    """

    image: Any
    source: str
    header: Any = None
    shape: tuple[int, ...] = ()

    @property
    def affine(self) -> np.ndarray:
        return np.asarray(self.image.affine, dtype=np.float64)


def is_nifti(path: str | os.PathLike) -> bool:
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def _nifti_header(path: Path, what: str):
    import nibabel as nib

    try:
        image = nib.load(str(path))
    except Exception as e:  # noqa: BLE001
        raise SDSegInputError(f"not a readable NIfTI {what} ({_reason(e)})", path) from None
    shape = tuple(int(s) for s in image.shape)
    if len(shape) == 4 and shape[3] == 1:
        return image, shape
    if len(shape) != 3:
        extra = f" with {shape[3]} volumes" if len(shape) == 4 else ""
        raise SDSegInputError(
            f"{len(shape)}D {what}{extra} (shape {'x'.join(map(str, shape))}); a 3D volume is required", path
        )
    return image, shape


def _reason(error: Exception) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def read_volume(path: str | os.PathLike, what: str = "image") -> Volume:
    """Load a NIfTI file or a folder holding one DICOM CT series.

    Args:
        path: ``.nii`` / ``.nii.gz`` file, or a DICOM series folder.
        what: ``"image"`` or ``"label map"``, for messages; label maps load as integers.

    Returns:
        a :class:`Volume` whose image is a (1, X, Y, Z) ``MetaTensor`` in the file's array order.
    """
    from monai.data import MetaTensor

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
    dtype = np.int16 if what != "image" else np.float32
    if what != "image" and not np.issubdtype(data.dtype, np.integer):
        rounded = np.rint(data)
        if not np.allclose(rounded, data):
            raise SDSegInputError(f"{what} holds non-integer values", path)
        data = rounded
    affine = nifti.affine.astype(np.float64)
    meta = {"filename_or_obj": str(path), "original_affine": affine.copy(), "space": "RAS"}
    image = MetaTensor(np.ascontiguousarray(data, dtype=dtype)[None], affine=affine, meta=meta)
    return Volume(image=image, source=str(path), header=nifti.header, shape=shape)


def check_writable(output: str | os.PathLike) -> Path:
    """Fail early (before any compute) when ``output`` cannot be written."""
    output = Path(output)
    folder = output.parent if str(output.parent) else Path(".")
    if output.is_dir():
        raise SDSegInputError("output path is a folder; give a file name such as mask.nii.gz", output)
    if not is_nifti(output):
        raise SDSegInputError("output must end in .nii or .nii.gz", output)
    if not folder.is_dir():
        raise SDSegInputError("cannot write output: its folder does not exist", output)
    if not os.access(folder, os.W_OK):
        raise SDSegInputError("cannot write output: permission denied on its folder", output)
    return output


def sidecar_path(output: str | os.PathLike) -> Path:
    """``mask.nii.gz`` -> ``mask.json``: where the label names travel."""
    output = Path(output)
    name = output.name
    for suffix in NIFTI_SUFFIXES[::-1]:
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    return output.with_name(name + ".json")


@contextmanager
def atomic_paths(*targets: Path) -> Iterator[list[Path]]:
    """Temporary paths beside ``targets``; on success all are renamed into place, on failure removed."""
    temps = []
    for target in targets:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix="".join(target.suffixes[-2:]) or ".tmp", dir=target.parent)
        os.close(fd)
        temps.append(Path(tmp))
    try:
        yield temps
        umask = os.umask(0)
        os.umask(umask)
        for tmp, target in zip(temps, targets):
            os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; outputs get ordinary permissions
            os.replace(tmp, target)
    finally:
        for tmp in temps:
            if tmp.exists():
                tmp.unlink()


def label_nifti(labels: np.ndarray, volume: Volume):
    """A uint8 NIfTI image of ``labels`` on ``volume``'s grid: same shape, affine, qform and sform."""
    import nibabel as nib

    data = np.asarray(labels, dtype=np.uint8).reshape(volume.shape)
    if volume.header is not None:
        header = volume.header.copy()
        header.set_data_dtype(np.uint8)
        image = nib.Nifti1Image(data, None, header=header)
        qform, qcode = volume.header.get_qform(coded=True)
        sform, scode = volume.header.get_sform(coded=True)
        if qform is not None:
            image.set_qform(qform, int(qcode))
        if sform is not None:
            image.set_sform(sform, int(scode))
        if qform is None and sform is None:
            image.set_sform(volume.affine, 2)
    else:
        image = nib.Nifti1Image(data, volume.affine)
        image.set_qform(volume.affine, 1)
        image.set_sform(volume.affine, 1)
    image.header["scl_slope"] = 1.0
    image.header["scl_inter"] = 0.0
    image.header["descrip"] = b"sdseg3d labels"
    return image


def write_label_volume(labels: np.ndarray, volume: Volume, output: str | os.PathLike, sidecar: dict) -> tuple[Path, Path]:
    """Write the label map and its JSON sidecar atomically; returns both paths."""
    import nibabel as nib

    output = check_writable(output)
    side = sidecar_path(output)
    image = label_nifti(labels, volume)
    with atomic_paths(output, side) as (tmp_image, tmp_side):
        nib.save(image, str(tmp_image))
        tmp_side.write_text(json.dumps(sidecar, indent=2) + "\n", encoding="utf-8")
    return output, side
