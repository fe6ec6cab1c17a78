"""Plain misuse of SDSeg.predict: refused up front in one line naming the problem, never a raw error
from deep inside torch or diffusers."""

import numpy as np
import pytest
import torch

from sdseg_monai.errors import SDSegInputError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

GOOD = torch.zeros(2, 3, 32, 32)

# (what the caller passes, the message that must name the problem)
MISUSE = {
    "size 40": ({"images": torch.zeros(2, 3, 40, 40)}, r"shape \(S, 3, 32, 32\) \(this model's slice size is 32\), got \(2, 3, 40, 40\)"),
    "size 64": ({"images": torch.zeros(2, 3, 64, 64)}, r"slice size is 32\), got \(2, 3, 64, 64\)"),
    "size 32x48": ({"images": torch.zeros(2, 3, 32, 48)}, r"got \(2, 3, 32, 48\)"),
    "size 36": ({"images": torch.zeros(2, 3, 36, 36)}, r"got \(2, 3, 36, 36\)"),
    "one channel": ({"images": torch.zeros(2, 1, 32, 32)}, r"got \(2, 1, 32, 32\)"),
    "a numpy array": ({"images": np.zeros((2, 3, 32, 32), np.float32)}, "images must be a torch.Tensor .* got ndarray"),
    "integer pixels": ({"images": torch.zeros(2, 3, 32, 32, dtype=torch.uint8)}, "images must be floating point, in \\[-1, 1\\], got torch.uint8"),
    "zero slices": ({"images": torch.zeros(0, 3, 32, 32)}, r"no image slices to segment \(S = 0\)"),
    "batch -1": ({"batch_size": -1}, "batch_size must be a positive integer .* got -1"),
    "batch 0": ({"batch_size": 0}, "batch_size must be a positive integer .* got 0"),
    "batch 1.5": ({"batch_size": 1.5}, "batch_size must be a positive integer .* got 1.5"),
    "num_steps 2.5": ({"num_steps": 2.5}, r"num_steps must be an integer in 1..1000 \(the schedule's steps\), got 2.5"),
    "num_steps 1001": ({"num_steps": 1001}, "num_steps must be an integer in 1..1000 .* got 1001"),
    "num_steps 0": ({"num_steps": 0}, "num_steps must be an integer in 1..1000"),
    "num_samples 0": ({"num_samples": 0}, "num_samples must be a positive integer, got 0"),
    "seed 2**64": ({"seed": 2**64}, "seed must be an integer in 0..2\\*\\*63-1, got 18446744073709551616"),
    "seed -1": ({"seed": -1}, "seed must be an integer in 0..2\\*\\*63-1, got -1"),
    "seed 1.7": ({"seed": 1.7}, "seed must be an integer in 0..2\\*\\*63-1, got 1.7"),
    "organs empty": ({"organs": []}, "organs is empty"),
    "organs a number": ({"organs": 1}, "organs must be a list of organ names or class indices, got int"),
    "organ 1.5": ({"organs": [1.5]}, "an organ is a name or a class index, got 1.5"),
    "radius nan": ({"skip_decode_radius": float("nan")}, "skip_decode_radius must be >= 0, got nan"),
    "radius text": ({"skip_decode_radius": "0.5"}, "skip_decode_radius must be >= 0, got '0.5'"),
}


@pytest.mark.parametrize("case", list(MISUSE))
def test_predict_refuses_plain_misuse_in_one_line(micro_model, case):
    arguments, message = MISUSE[case]
    arguments = {"images": GOOD, **arguments}
    with pytest.raises(SDSegInputError, match=message) as error:
        micro_model.predict(arguments.pop("images"), **arguments)
    assert "\n" not in str(error.value)


def test_one_organ_named_as_a_string_is_that_organ(micro_model):
    alone = micro_model.predict(GOOD, organs="spleen", seed=0)
    assert torch.equal(alone, micro_model.predict(GOOD, organs=["spleen"], seed=0))
    assert micro_model.class_indices("liver") == [0]


def test_the_largest_seed_and_numpy_integers_are_accepted(micro_model):
    maps = micro_model.predict(GOOD[:1], seed=2**63 - 1, num_samples=2, batch_size=np.int64(3), num_steps=np.int32(1))
    assert maps.shape == (1, 3, 32, 32)
