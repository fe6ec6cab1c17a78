"""Dataset presets: label tables, organ subsets and HU windows. Pure Python, no torch import."""

from __future__ import annotations

from dataclasses import dataclass, field

from sdseg_monai.errors import SDSegInputError


@dataclass(frozen=True)
class Organ:
    """One foreground class: its value in label maps and its name."""

    label: int
    name: str


@dataclass(frozen=True)
class DatasetPreset:
    """What a dataset contributes to a model: organs, HU window and named organ subsets."""

    name: str
    description: str
    organs: tuple[Organ, ...]
    hu_window: tuple[float, float]
    subsets: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def organ(self, name: str) -> Organ:
        for organ in self.organs:
            if organ.name == name:
                return organ
        raise SDSegInputError(f"unknown organ {name!r} in preset {self.name!r}; known: {', '.join(self.names)}")

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(o.name for o in self.organs)


BTCV_ORGAN_NAMES = (
    "spleen",
    "right_kidney",
    "left_kidney",
    "gallbladder",
    "esophagus",
    "liver",
    "stomach",
    "aorta",
    "inferior_vena_cava",
    "portal_and_splenic_vein",
    "pancreas",
    "right_adrenal_gland",
    "left_adrenal_gland",
)

BTCV = DatasetPreset(
    name="btcv",
    description="BTCV / Synapse multi-organ abdominal CT, 13 organs",
    organs=tuple(Organ(i + 1, n) for i, n in enumerate(BTCV_ORGAN_NAMES)),
    hu_window=(-175.0, 250.0),
    subsets={
        # The 8 organs of the TransUNet evaluation protocol.
        "transunet8": (
            "aorta",
            "gallbladder",
            "left_kidney",
            "right_kidney",
            "liver",
            "pancreas",
            "spleen",
            "stomach",
        ),
    },
)

STS = DatasetPreset(
    name="sts",
    description="STS-3D tooth CBCT (MICCAI 2023 STS challenge), binary teeth",
    organs=(Organ(1, "teeth"),),
    # WL 500 / WW 1200.
    hu_window=(-100.0, 1100.0),
)

DATASET_PRESETS: dict[str, DatasetPreset] = {p.name: p for p in (BTCV, STS)}


def dataset_preset(name: str) -> DatasetPreset:
    """Return the dataset preset called ``name`` (case-insensitive)."""
    key = name.lower()
    if key not in DATASET_PRESETS:
        raise SDSegInputError(f"unknown dataset preset {name!r}; choose from {', '.join(DATASET_PRESETS)}")
    return DATASET_PRESETS[key]
