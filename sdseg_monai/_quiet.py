"""Silence third-party chatter that says nothing to our users (no warning spam).

Import-time settings below cover noise that is never ours to show; :func:`quiet_dicom` is applied
where we read or write DICOM, so that pydicom is changed only while our code uses it.
"""

import contextlib
import logging
import threading
import warnings

# MONAI registers every image reader up front; the GPU DICOM decoder complains when CUDA/nvImageCodec is absent.
logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", message=r"NvImgCodecPydicomReader", category=UserWarning)

# torch.compile traces diffusers' upsamplers through an lru_cache-wrapped version check (a constant):
# dynamo's several-line warning about the cache wrapper tells our users nothing.
warnings.filterwarnings("ignore", message=r"Dynamo detected a call to a `functools\.lru_cache`-wrapped function", category=UserWarning)

# nibabel logs each header problem it meets through its own stderr handler on this logger: those it
# fixes in memory (a zero pixdim) need no word, those it cannot fix (level 40 and up) raise, and the
# caller reports the error in one line. Its problem levels stop at 45.
logging.getLogger("nibabel.global").setLevel(logging.CRITICAL)

# pydicom falls back to its default character set with a warning that quotes the header's Specific
# Character Set, whatever its validation mode (not an optional check, it says), while dcmread decodes
# the header: there is no setting of its own to scope, and catch_warnings swaps the process-wide filter
# list, which threads (the node's associations) can leave in any state. Only pydicom.charset's warnings.
warnings.filterwarnings("ignore", category=UserWarning, module=r"pydicom\.charset$")

# highdicom warns, quoting the source's patient name, when that name has a single component (a SEG
# copies it as it is): header text in a log. Import-time for the same reason as above (SEGs are
# written on the batch's writer thread and the node's association threads).
warnings.filterwarnings("ignore", message=r"(?s)The string .* is unlikely to represent the intended person name",
                        category=UserWarning, module=r"highdicom\.")

# pydicom's value checks are process-wide settings, not per thread, and its own
# disable_value_validation() saves and restores per call: two threads interleaving (the batch writes
# SEGs on a thread while the next series is read; the node serves each association on its own) could
# switch the checks back on mid-read, or leave them off for good. A count of our users in flight
# decides when the user's own settings come back.
_dicom_lock = threading.Lock()
_dicom_users = 0
_dicom_saved: tuple | None = None


@contextlib.contextmanager
def quiet_dicom():
    """While our DICOM reading or writing runs (also a decorator), pydicom checks no values: its
    warning about an invalid or over-long value quotes the header (a UID, a name, a description).

    A value is checked when it is first used, not when the file is read: wrap the code that reads
    a dataset's attributes, not only ``dcmread``. A user's RAISE stays; their WARN is back once the
    last of our readers and writers is done (their pydicom, in another thread meanwhile, warns
    nothing either).
    """
    global _dicom_users, _dicom_saved
    from pydicom import config

    settings = config.settings
    with _dicom_lock:
        if _dicom_users == 0:
            # The private fields, as pydicom's own disable_value_validation(): None means "as
            # enforce_valid_values says", which the properties would not give back.
            _dicom_saved = (settings._reading_validation_mode, settings._writing_validation_mode)
            if settings.reading_validation_mode == config.WARN:
                settings.reading_validation_mode = config.IGNORE
            if settings.writing_validation_mode == config.WARN:
                settings.writing_validation_mode = config.IGNORE
        _dicom_users += 1
    try:
        yield
    finally:
        with _dicom_lock:
            _dicom_users -= 1
            if _dicom_users == 0:
                settings._reading_validation_mode, settings._writing_validation_mode = _dicom_saved
