"""The KITTI mapping (``configs/mappings/kitti.yaml``, stored in the plan) parsed and validated once:
source object types → KITTI classes, the reference camera, the out-of-image and missing-image policies, the image
encoding and the ImageSets split."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from stages.formats.images import MISSING_IMAGE_POLICIES
from stages.model import SensorCalib

KITTI_CLASSES = ("Car", "Van", "Truck", "Pedestrian", "Person_sitting", "Cyclist", "Tram", "Misc", "DontCare")
# Tried in order when the mapping names no reference camera (exact channel names, then case-insensitively).
DEFAULT_REFERENCE_CAMERAS = ("camera-front", "front", "CAM_FRONT")
UNKNOWN_TYPE_POLICIES = ("skip", "error")
OUT_OF_IMAGE_POLICIES = ("keep", "drop")
IMAGE_FORMATS = ("source", "png")


def normalise_name(name: str) -> str:
    """Type names compare case-insensitively with "-", "_" and " " alike (after an exact match failed)."""
    return name.strip().lower().replace("-", "_").replace(" ", "_")


@dataclass(frozen=True)
class Split:
    """Contiguous blocks by plan index: train first, then val, then test (neighbouring frames of one recording
    are near-duplicates, so interleaving them would leak between splits)."""

    val_fraction: float = 0.0
    test_fraction: float = 0.0

    def assign(self, indices: list[int]) -> dict[str, list[int]]:
        """``{train, val, trainval, test}`` → sorted indices. Every index is in exactly one of train/val/test."""
        ordered = sorted(indices)
        n = len(ordered)
        n_test = int(round(n * self.test_fraction))
        n_val = min(int(round(n * self.val_fraction)), n - n_test)
        n_train = n - n_val - n_test
        train, val, test = ordered[:n_train], ordered[n_train:n_train + n_val], ordered[n_train + n_val:]
        return {"train": train, "val": val, "trainval": train + val, "test": test}


@dataclass(frozen=True)
class KittiMapping:
    classes: dict[str, str | None]  # exact source type -> KITTI class, None = deliberately not exported
    classes_normalised: dict[str, str | None]  # keyed by normalise_name; names two entries fold to are left out
    unknown_type_policy: str  # skip | error
    sitting_obj_attrs: frozenset[str]  # obj_attr values turning a Pedestrian into Person_sitting
    reference_camera: str | None  # source camera channel; None = first of DEFAULT_REFERENCE_CAMERAS present
    out_of_image: str  # keep | drop
    image_format: str  # source (copy the file as is) | png (re-encode)
    split: Split
    max_tilt_deg: float  # boxes tilted more than this w.r.t. the camera's -y axis are counted
    missing_image_policy: str = "nearest"  # nearest (image_2 from the nearest frame) | skip (left out of ImageSets)

    @staticmethod
    def from_dict(d: dict[str, Any]) -> "KittiMapping":
        """Validate the YAML's content; raises ``ValueError`` naming the offending entry."""
        classes: dict[str, str | None] = {}
        normalised: dict[str, str | None] = {}
        ambiguous: set[str] = set()
        for src, cls in (d.get("classes") or {}).items():
            if cls is not None and cls not in KITTI_CLASSES:
                raise ValueError(f"kitti mapping: type {src!r} maps to {cls!r}; KITTI classes are "
                                 f"{', '.join(KITTI_CLASSES)} (or null to leave the type out)")
            classes[str(src)] = cls
            key = normalise_name(str(src))
            if key in normalised and normalised[key] != cls:
                ambiguous.add(key)  # e.g. NextPoints "bicycle" vs SUSTech "Bicycle": only exact matches decide
            normalised[key] = cls
        for key in ambiguous:
            del normalised[key]
        policy = d.get("unknown_type_policy", "skip")
        if policy not in UNKNOWN_TYPE_POLICIES:
            raise ValueError(f"kitti mapping: unknown_type_policy must be one of {UNKNOWN_TYPE_POLICIES}, "
                             f"got {policy!r}")
        out_of_image = d.get("out_of_image", "keep")
        if out_of_image not in OUT_OF_IMAGE_POLICIES:
            raise ValueError(f"kitti mapping: out_of_image must be one of {OUT_OF_IMAGE_POLICIES}, "
                             f"got {out_of_image!r}")
        image_format = d.get("image_format", "source")
        if image_format not in IMAGE_FORMATS:
            raise ValueError(f"kitti mapping: image_format must be one of {IMAGE_FORMATS}, got {image_format!r}")
        split_d = d.get("split") or {}
        unknown = set(split_d) - {"val_fraction", "test_fraction"}
        if unknown:
            raise ValueError(f"kitti mapping: unknown split keys {sorted(unknown)}")
        split = Split(float(split_d.get("val_fraction", 0.0)), float(split_d.get("test_fraction", 0.0)))
        if not (0 <= split.val_fraction <= 1 and 0 <= split.test_fraction <= 1
                and split.val_fraction + split.test_fraction <= 1):
            raise ValueError(f"kitti mapping: split fractions must be in [0, 1] and sum to at most 1, got {split}")
        image_policy = d.get("missing_image_policy", "nearest")
        if image_policy not in MISSING_IMAGE_POLICIES:
            raise ValueError(f"kitti mapping: missing_image_policy must be one of {MISSING_IMAGE_POLICIES}, "
                             f"got {image_policy!r}")
        ref = d.get("reference_camera")
        return KittiMapping(
            classes=classes, classes_normalised=normalised, unknown_type_policy=policy,
            sitting_obj_attrs=frozenset(normalise_name(s) for s in d.get("sitting_obj_attrs") or []),
            reference_camera=None if ref is None else str(ref), out_of_image=out_of_image,
            image_format=image_format, split=split, max_tilt_deg=float(d.get("max_tilt_deg", 1.0)),
            missing_image_policy=image_policy,
        )

    def class_of(self, obj_type: str, attributes: list[str] | tuple[str, ...] = ()) -> tuple[str | None, bool]:
        """(KITTI class or None, whether the type is listed in the mapping at all).

        An exact match wins; otherwise the type is matched case-insensitively unless two listed types fold to
        the same name with different classes. A Pedestrian with a sitting obj_attr becomes Person_sitting.
        """
        if obj_type in self.classes:
            cls, known = self.classes[obj_type], True
        else:
            key = normalise_name(obj_type)
            cls, known = self.classes_normalised.get(key), key in self.classes_normalised
        if cls == "Pedestrian" and any(normalise_name(a) in self.sitting_obj_attrs for a in attributes):
            cls = "Person_sitting"
        return cls, known

    def reference_channel(self, calibration: dict[str, SensorCalib]) -> str:
        """The source camera channel whose image, intrinsics and frame the labels use; ``ValueError`` when the
        mapping's camera is not in the project or no default is present."""
        cameras = {ch: c for ch, c in calibration.items() if c.sensor_type == "camera"}
        if self.reference_camera is not None:
            if self.reference_camera not in cameras:
                raise ValueError(f"kitti mapping: reference_camera {self.reference_camera!r} is not a camera of "
                                 f"this project (cameras: {', '.join(sorted(cameras)) or 'none'})")
            return self.reference_camera
        for name in DEFAULT_REFERENCE_CAMERAS:
            if name in cameras:
                return name
        folded = {normalise_name(ch): ch for ch in cameras}
        for name in DEFAULT_REFERENCE_CAMERAS:
            if normalise_name(name) in folded:
                return folded[normalise_name(name)]
        raise ValueError(f"KITTI needs a reference camera: none of {', '.join(DEFAULT_REFERENCE_CAMERAS)} is in "
                         f"this project (cameras: {', '.join(sorted(cameras)) or 'none'}); set reference_camera "
                         f"in configs/mappings/kitti.yaml")
