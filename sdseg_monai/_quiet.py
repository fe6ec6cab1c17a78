"""Silence third-party chatter that says nothing to our users (no warning spam)."""

import logging
import warnings

# MONAI registers every image reader up front; the GPU DICOM decoder complains when CUDA/nvImageCodec is absent.
logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", message=r"NvImgCodecPydicomReader", category=UserWarning)
