"""The nuScenes mapping (``configs/mappings/nuscenes.yaml``, stored in the plan) parsed and validated once:
source object types → categories, source channels → nuScenes channels, and the attribute rules."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from stages.formats.images import MISSING_IMAGE_POLICIES
from stages.formats.nuscenes.vocabulary import (CAMERA_CHANNELS, CATEGORIES, LIDAR_CHANNEL,
                                                RADAR_CHANNELS, VISIBILITY)
from stages.model import SensorCalib

POLICIES = ("skip", "error")


def normalise_name(name: str) -> str:
    """Channel / type names compare case-insensitively with "-", "_" and " " alike."""
    return name.strip().lower().replace("-", "_").replace(" ", "_")


@dataclass(frozen=True)
class AttributeRules:
    vehicle_categories: frozenset[str]
    cycle_categories: frozenset[str]
    pedestrian_categories: frozenset[str]
    static_obj_attrs: frozenset[str]
    sitting_obj_attrs: frozenset[str]
    moving_speed_mps: float
    max_time_diff_s: float
    rider_types: frozenset[str]
    rider_radius_m: float
    ridden_types: frozenset[str] = frozenset()  # source types whose one box holds cycle and rider


@dataclass(frozen=True)
class NuScenesMapping:
    categories: dict[str, str]  # normalised source type -> nuScenes category
    unknown_type_policy: str  # skip | error
    channel_aliases: dict[str, str]  # normalised source channel -> nuScenes channel
    attributes: AttributeRules
    default_visibility: str
    log_vehicle: str
    log_location: str
    split_name: str
    missing_image_policy: str = "nearest"  # nearest | skip

    @staticmethod
    def from_dict(d: dict[str, Any], layout: str | None = None) -> "NuScenesMapping":
        """Validate the YAML's content; raises ``ValueError`` naming the offending entry.

        ``layouts.<layout>`` holds per-source-layout overrides: its ``categories`` replace the shared entries of
        the same (normalised) name, its ``ridden_types`` are types whose single box holds a cycle *and* its
        rider (always ``cycle.with_rider``). A type name can thus mean different things in different layouts
        (NextPoints' ``rider`` is a person, SUSTechPOINTS' ``Rider`` a person on a two-wheeler, in one box).
        """
        overrides = (d.get("layouts") or {}).get(layout) or {}
        unknown = sorted(set(overrides) - {"categories", "ridden_types"})
        if unknown:
            raise ValueError(f"nuscenes mapping: layouts.{layout} has unknown keys {unknown}")
        d = {**d, "categories": {**(d.get("categories") or {}), **(overrides.get("categories") or {})}}

        def need(key: str) -> Any:
            if key not in d:
                raise ValueError(f"nuscenes mapping: missing key {key!r}")
            return d[key]

        categories: dict[str, str] = {}
        for src, cat in (need("categories") or {}).items():
            if cat not in CATEGORIES:
                raise ValueError(f"nuscenes mapping: type {src!r} maps to {cat!r}, not an official nuScenes category")
            categories[normalise_name(str(src))] = cat
        policy = d.get("unknown_type_policy", "skip")
        if policy not in POLICIES:
            raise ValueError(f"nuscenes mapping: unknown_type_policy must be one of {POLICIES}, got {policy!r}")
        image_policy = d.get("missing_image_policy", "nearest")
        if image_policy not in MISSING_IMAGE_POLICIES:
            raise ValueError(f"nuscenes mapping: missing_image_policy must be one of {MISSING_IMAGE_POLICIES}, "
                             f"got {image_policy!r}")
        aliases: dict[str, str] = {}
        known_channels = (LIDAR_CHANNEL, *CAMERA_CHANNELS, *RADAR_CHANNELS)
        for channel, names in (need("channels") or {}).items():
            if channel not in known_channels:
                raise ValueError(f"nuscenes mapping: {channel!r} is not a nuScenes channel")
            for name in [channel, *(names or [])]:
                key = normalise_name(str(name))
                if aliases.get(key, channel) != channel:
                    raise ValueError(f"nuscenes mapping: {name!r} listed for both {aliases[key]} and {channel}")
                aliases[key] = channel
        a = need("attributes")
        for key in ("vehicle_categories", "cycle_categories", "pedestrian_categories"):
            bad = [c for c in a.get(key, []) if c not in CATEGORIES]
            if bad:
                raise ValueError(f"nuscenes mapping: attributes.{key} lists unknown categories {bad}")
        rules = AttributeRules(
            vehicle_categories=frozenset(a.get("vehicle_categories", [])),
            cycle_categories=frozenset(a.get("cycle_categories", [])),
            pedestrian_categories=frozenset(a.get("pedestrian_categories", [])),
            static_obj_attrs=frozenset(normalise_name(s) for s in a.get("static_obj_attrs", [])),
            sitting_obj_attrs=frozenset(normalise_name(s) for s in a.get("sitting_obj_attrs", [])),
            moving_speed_mps=float(a.get("moving_speed_mps", 0.3)),
            max_time_diff_s=float(a.get("max_time_diff_s", 1.5)),
            rider_types=frozenset(normalise_name(s) for s in a.get("rider_types", [])),
            rider_radius_m=float(a.get("rider_radius_m", 1.0)),
            ridden_types=frozenset(normalise_name(s) for s in overrides.get("ridden_types", [])),
        )
        visibility = str(d.get("default_visibility", "4"))
        if visibility not in VISIBILITY:
            raise ValueError(f"nuscenes mapping: default_visibility must be one of {sorted(VISIBILITY)}")
        log = d.get("log") or {}
        split_name = str(d.get("split_name", "export"))
        return NuScenesMapping(categories=categories, unknown_type_policy=policy, channel_aliases=aliases,
                               attributes=rules, default_visibility=visibility,
                               log_vehicle=str(log.get("vehicle", "nextpoints")),
                               log_location=str(log.get("location", "unknown")), split_name=split_name,
                               missing_image_policy=image_policy)

    def category_of(self, obj_type: str) -> str | None:
        """The nuScenes category of a source object type, None when the mapping has none."""
        return self.categories.get(normalise_name(obj_type))

    def channel_map(self, calibration: dict[str, SensorCalib], main_lidar: str) -> tuple[dict[str, str], list[str]]:
        """(source channel → nuScenes channel for every exported sensor, skipped source channels).

        The main lidar is always LIDAR_TOP; cameras map through the aliases; other lidars, radars (the sources do
        not read them), imu/gps and unlisted cameras are skipped. Two source channels claiming one nuScenes
        channel is an error.
        """
        mapped = {main_lidar: LIDAR_CHANNEL}
        skipped = []
        for source in sorted(calibration):
            if source == main_lidar:
                continue
            target = self.channel_aliases.get(normalise_name(source))
            if calibration[source].sensor_type != "camera" or target is None or not target.startswith("CAM"):
                skipped.append(source)
                continue
            clash = [s for s, t in mapped.items() if t == target]
            if clash:
                raise ValueError(f"source channels {clash[0]!r} and {source!r} both map to {target}; "
                                 "rename one in configs/mappings/nuscenes.yaml")
            mapped[source] = target
        return mapped, skipped
