"""Dataset presets: label tables, organ subsets and HU windows. Pure Python, no torch import."""

from __future__ import annotations

from dataclasses import dataclass, field

from sdseg_monai.errors import SDSegInputError


# SNOMED CT concepts for DICOM SEG segment descriptions (DICOM CID 7150 / 7151 / 244).
ANATOMICAL_STRUCTURE = ("91723000", "Anatomical Structure")
LATERALITY_CODES = {"right": ("24028007", "Right"), "left": ("7771000", "Left")}


@dataclass(frozen=True)
class Organ:
    """One foreground class: its value in label maps, its name and, optionally, its SNOMED CT code.

    Attributes:
        label: value of the organ in label maps.
        name: organ name as used in configs and on the command line.
        snomed_code: SNOMED CT concept id of the structure (e.g. ``"10200004"``), or None.
        snomed_meaning: that concept's display name (e.g. ``"Liver"``), or None.
        laterality: ``"right"``, ``"left"`` or None, coded as a modifier of the structure.
    """

    label: int
    name: str
    snomed_code: str | None = None
    snomed_meaning: str | None = None
    laterality: str | None = None

    def __post_init__(self):
        _check_snomed(self.snomed_code, self.snomed_meaning, self.laterality, f"organ {self.name!r}")

    def snomed(self) -> dict[str, str] | None:
        """The ``"snomed"`` entry of a config's organ dict, or None when the organ has no code."""
        if self.snomed_code is None:
            return None
        entry = {"code": self.snomed_code, "meaning": self.snomed_meaning}
        if self.laterality:
            entry["laterality"] = self.laterality
        return entry


@dataclass(frozen=True)
class Code:
    """One coded concept (SNOMED CT unless ``scheme`` says otherwise)."""

    value: str
    meaning: str
    scheme: str = "SCT"


@dataclass(frozen=True)
class OrganCode:
    """What a DICOM SEG segment says an organ is: category, type and optional laterality modifier."""

    category: Code
    type: Code
    modifier: Code | None = None


def _check_snomed(code, meaning, laterality, what: str) -> None:
    if code is None and meaning is None and laterality is None:
        return
    if not (isinstance(code, str) and code.isdigit() and 6 <= len(code) <= 18):
        raise SDSegInputError(f"{what}: SNOMED CT code must be a string of 6 to 18 digits, got {code!r}")
    if not (isinstance(meaning, str) and meaning.strip() and len(meaning) <= 64):
        raise SDSegInputError(f"{what}: SNOMED CT meaning must be non-empty text of at most 64 characters")
    if laterality not in (None, *LATERALITY_CODES):
        raise SDSegInputError(f"{what}: laterality must be 'right', 'left' or absent, got {laterality!r}")


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

# (SNOMED CT code, meaning, laterality) per BTCV organ, in BTCV_ORGAN_NAMES order. The portal and
# splenic vein label is coded as the portal vein, its larger part.
_BTCV_SNOMED = (
    ("78961009", "Spleen", None),
    ("64033007", "Kidney", "right"),
    ("64033007", "Kidney", "left"),
    ("28231008", "Gallbladder", None),
    ("32849002", "Esophagus", None),
    ("10200004", "Liver", None),
    ("69695003", "Stomach", None),
    ("15825003", "Aorta", None),
    ("64131007", "Inferior vena cava", None),
    ("32764006", "Portal vein", None),
    ("15776009", "Pancreas", None),
    ("23451007", "Adrenal gland", "right"),
    ("23451007", "Adrenal gland", "left"),
)

BTCV = DatasetPreset(
    name="btcv",
    description="BTCV / Synapse multi-organ abdominal CT, 13 organs",
    organs=tuple(Organ(i + 1, n, *code) for i, (n, code) in enumerate(zip(BTCV_ORGAN_NAMES, _BTCV_SNOMED, strict=True))),
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
    organs=(Organ(1, "teeth", "38199008", "Tooth"),),
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


def organ_code(organ: dict, dataset: str | None = None) -> OrganCode:
    """The codes a DICOM SEG segment gives one organ of a model config.

    The organ dict's own ``"snomed"`` entry wins (a model trained on other organs carries it), else the
    dataset preset's organ of the same name, else the generic "Anatomical Structure" so that the
    segment is still valid.

    Args:
        organ: a config's organ, ``{"label": int, "name": str}`` plus optionally ``"snomed"``:
            ``{"code": "10200004", "meaning": "Liver", "laterality": "right" | "left"}``.
        dataset: name of the dataset preset the model's organs come from, or None.

    Returns:
        The segment's property category, type and laterality modifier (None without laterality).

    Raises:
        SDSegInputError: the ``"snomed"`` entry is malformed.
    """
    category = Code(*ANATOMICAL_STRUCTURE)
    name = organ.get("name")
    entry = organ.get("snomed")
    if entry is not None:
        if not isinstance(entry, dict) or set(entry) - {"code", "meaning", "laterality"}:
            raise SDSegInputError(f"organ {name!r}: 'snomed' must be an object with code, meaning and optional laterality")
        code, meaning, laterality = entry.get("code"), entry.get("meaning"), entry.get("laterality")
        _check_snomed(code, meaning, laterality, f"organ {name!r}")
    else:
        preset = DATASET_PRESETS.get(dataset.lower()) if dataset else None
        match = next((o for o in preset.organs if o.name == name), None) if preset else None
        if match is None or match.snomed_code is None:
            return OrganCode(category, Code(*ANATOMICAL_STRUCTURE))
        code, meaning, laterality = match.snomed_code, match.snomed_meaning, match.laterality
    modifier = Code(*LATERALITY_CODES[laterality]) if laterality else None
    return OrganCode(category, Code(code, meaning), modifier)
