"""Run by tests/test_training.py under `torchrun --standalone --nproc_per_node 2`: a tiny DDP run on CPU."""

import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))

from conftest import micro_config  # noqa: E402
from test_training import write_cases  # noqa: E402

from sdseg_monai.model import SDSeg  # noqa: E402
from sdseg_monai.training import TrainSettings, train_sdseg  # noqa: E402

if __name__ == "__main__":
    out = sys.argv[1]
    torch.set_num_threads(1)
    cases = write_cases(os.path.join(out, "data"), 2) if os.environ["RANK"] == "0" else None
    torch.distributed.init_process_group("gloo")
    torch.distributed.barrier()  # rank 0 wrote the data
    cases = write_cases(os.path.join(out, "data"), 2, write=False)
    torch.manual_seed(0)
    model = SDSeg(micro_config(organs=("spleen", "liver"), latent_scale=0.5))
    # "device-batches": batches built in-process (as on GPUs), with a time limit all processes agree on.
    on_device = sys.argv[2:] == ["device-batches"]
    settings = TrainSettings(
        steps=4, batch_size=2, checkpoint_every=2, validate_every=0, log_every=2, base_lr=1e-4, augmentation="none", warmup_steps=1,
        batches_on_device=on_device, max_seconds=3600.0 if on_device else None,
    )  # fmt: skip
    summary = train_sdseg(model, cases, os.path.join(out, "run"), settings, device="cpu", progress=False)
    checksum = float(sum(p.double().sum() for p in model.unet.parameters()))
    with open(os.path.join(out, f"rank{os.environ['RANK']}.json"), "w") as f:
        json.dump({"steps": summary["steps"], "checksum": checksum, "world": torch.distributed.get_world_size()}, f)
    torch.distributed.destroy_process_group()
