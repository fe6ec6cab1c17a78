"""Process-wide settings that must be in place before diffusers or huggingface_hub is imported.

sdseg3d never downloads anything at run time: every model and weight comes from a local path.
"""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
