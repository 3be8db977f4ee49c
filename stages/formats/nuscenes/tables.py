"""Merge-time nuScenes work: link the per-frame rows across frames and write the 13 tables + splits.json.

Links made here (empty link = ""):
- ``sample.prev/next`` in frame order; ``scene.first/last_sample_token`` and ``nbr_samples`` from that chain;
- ``sample_data.prev/next`` per channel in timestamp order (then frame order: a camera image filled in from
  the nearest frame has that frame's timestamp and sits next to that frame's own row, on the side of its
  sample); a sweep's ``sample_token`` is the sample that follows it (the last sample when none follows);
- ``sample_annotation.prev/next`` per instance; ``instance.first/last_annotation_token``, ``nbr_annotations``;
- ``attribute_tokens``: at most one attribute, from the category family (vehicle / cycle / pedestrian), the
  source ``obj_attr`` flags, the instance's horizontal speed in the global frame (m/s, from the neighbouring
  annotations) and the per-frame rider flag computed at convert time.

Output is deterministic: rows are sorted by frame order then channel / instance, tokens are content-derived,
floats use Python's shortest round-trip repr (optionally rounded to ``coordinate_precision`` decimals).
"""
from __future__ import annotations

import bisect
import io
import json
import os
from collections import Counter, defaultdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from PIL import Image

from stages.formats.nuscenes.mapping import AttributeRules, NuScenesMapping, normalise_name
from stages.formats.nuscenes.tokens import make_token
from stages.formats.nuscenes.vocabulary import ATTRIBUTES, CATEGORIES, VISIBILITY, modality
from stages.model import SensorCalib

TABLE_NAMES = ("attribute", "calibrated_sensor", "category", "ego_pose", "instance", "log", "map", "sample",
               "sample_annotation", "sample_data", "scene", "sensor", "visibility")
VOCABULARY = "nuscenes"  # token namespace of project-independent rows (category, attribute, sensor)
MIN_QUATERNION_DECIMALS = 9  # rounding a quaternion coarser than this visibly breaks its unit length


def vocabulary_token(table: str, name: str) -> str:
    """Token of a category / attribute / sensor row: the same in every export, so exports can be combined."""
    return make_token(VOCABULARY, table, name)


def _rows(tables: dict[str, pa.Table], name: str) -> list[dict[str, Any]]:
    table = tables.get(name)
    return table.to_pylist() if table is not None else []


def _link(rows: list[dict[str, Any]]) -> None:
    """Set prev/next along ``rows`` (already in chain order)."""
    for i, row in enumerate(rows):
        row["prev"] = rows[i - 1]["token"] if i > 0 else ""
        row["next"] = rows[i + 1]["token"] if i + 1 < len(rows) else ""


def horizontal_speeds(timestamps_us: np.ndarray, translations: np.ndarray, max_time_diff_s: float) -> np.ndarray:
    """Horizontal speed (m/s) of each annotation of one instance, from its chain neighbours (global frame).

    Uses the previous and next annotation when each is at most ``max_time_diff_s`` away (a central difference,
    like the devkit's ``box_velocity``), one of them at the chain's ends; NaN when neither is usable.
    """
    t = np.asarray(timestamps_us, dtype=np.float64) * 1e-6
    xy = np.asarray(translations, dtype=np.float64).reshape(-1, 3)[:, :2]
    idx = np.arange(len(t))
    gap_ok = np.diff(t) <= max_time_diff_s
    lo = np.where(np.r_[False, gap_ok], idx - 1, idx)
    hi = np.where(np.r_[gap_ok, False], idx + 1, idx)
    dt = t[hi] - t[lo]
    dist = np.linalg.norm(xy[hi] - xy[lo], axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(dt > 0, dist / np.where(dt > 0, dt, 1.0), np.nan)


def choose_attribute(category: str, obj_attr: str, speed: float, has_rider: bool, rules: AttributeRules) -> str | None:
    """The one nuScenes attribute of an annotation, or None for categories without attributes.

    ``speed`` in m/s (NaN = unknown, counted as not moving); ``obj_attr`` the source's comma-separated flags.
    """
    flags = {normalise_name(a) for a in obj_attr.split(",") if a.strip()}
    moving = bool(np.isfinite(speed) and speed >= rules.moving_speed_mps)
    if category in rules.vehicle_categories:
        if flags & rules.static_obj_attrs:
            return "vehicle.parked"
        return "vehicle.moving" if moving else "vehicle.stopped"
    if category in rules.cycle_categories:
        return "cycle.with_rider" if has_rider else "cycle.without_rider"
    if category in rules.pedestrian_categories:
        if flags & rules.sitting_obj_attrs:
            return "pedestrian.sitting_lying_down"
        if flags & rules.static_obj_attrs:
            return "pedestrian.standing"
        return "pedestrian.moving" if moving else "pedestrian.standing"
    return None


class TableBuilder:
    """Builds the final nuScenes tables of one export from the concatenated per-frame rows."""

    def __init__(self, *, project: str, frame_order: dict[str, int], first_timestamp_us: int,
                 mapping: NuScenesMapping, channel_map: dict[str, str], skipped_channels: list[str],
                 calibration: dict[str, SensorCalib]):
        self.project = project
        self.order = frame_order
        self.first_timestamp_us = first_timestamp_us
        self.mapping = mapping
        self.channel_map = channel_map
        self.skipped_channels = skipped_channels
        self.calibration = calibration
        self.counts: Counter = Counter()
        self._sample_chain: list[tuple[int, str]] = []  # (frame order, sample token), set by _samples

    def token(self, table: str, *key: object) -> str:
        return make_token(self.project, table, *key)

    def build(self, tables: dict[str, pa.Table]) -> dict[str, list[dict[str, Any]]]:
        out: dict[str, list[dict[str, Any]]] = {}
        out["category"] = [{"token": vocabulary_token("category", n), "name": n, "description": d}
                           for n, d in sorted(CATEGORIES.items())]
        out["attribute"] = [{"token": vocabulary_token("attribute", n), "name": n, "description": d}
                            for n, d in sorted(ATTRIBUTES.items())]
        out["visibility"] = [{"description": d, "token": t, "level": lv} for t, (lv, d) in sorted(VISIBILITY.items())]
        out["sensor"], out["calibrated_sensor"] = self._sensors()
        out["log"], out["map"], scene_token = self._log_and_map()
        out["sample"] = self._samples(_rows(tables, "sample"))
        out["scene"] = [self._scene(scene_token, out["log"][0]["token"], out["sample"])]
        out["sample_data"], out["ego_pose"] = self._sample_data(_rows(tables, "sample_data"),
                                                                _rows(tables, "ego_pose"))
        out["sample_annotation"], out["instance"] = self._annotations(_rows(tables, "sample_annotation"))
        dropped = Counter(r["obj_type"] for r in _rows(tables, "dropped_annotation"))
        self.counts["dropped_unknown_types"] = sum(dropped.values())
        for obj_type, n in sorted(dropped.items()):
            self.counts[f"dropped_unknown_type.{obj_type}"] = n
        self.counts["skipped_channels"] = len(self.skipped_channels)
        for ch in self.skipped_channels:
            self.counts[f"skipped_channel.{ch}"] = 1
        for name in TABLE_NAMES:
            self.counts[f"table.{name}"] = len(out[name])
        return out

    def _sensors(self) -> tuple[list[dict], list[dict]]:
        """One sensor row per exported channel; its calibrated_sensor = the source's sensor→ego calibration."""
        sensors, calibrated = [], []
        for source, channel in sorted(self.channel_map.items(), key=lambda kv: kv[1]):
            calib = self.calibration[source]
            sensor_token = vocabulary_token("sensor", channel)
            sensors.append({"token": sensor_token, "channel": channel, "modality": modality(channel)})
            is_camera = modality(channel) == "camera"
            calibrated.append({
                "token": self.token("calibrated_sensor", channel), "sensor_token": sensor_token,
                "translation": [float(v) for v in calib.pose.translation],
                "rotation": [float(v) for v in calib.pose.rotation],
                "camera_intrinsic": np.asarray(calib.intrinsic, dtype=np.float64).tolist() if is_camera else []})
            if is_camera and any(abs(v) > 0 for v in (calib.distortion or {}).values()):
                # nuScenes assumes rectified images; distorted ones are exported as they are, and counted.
                self.counts["cameras_with_distortion"] += 1
        return sensors, calibrated

    def _log_and_map(self) -> tuple[list[dict], list[dict], str]:
        log_token = self.token("log", self.project)
        date = datetime.fromtimestamp(self.first_timestamp_us / 1e6, tz=timezone.utc).strftime("%Y-%m-%d")
        log = [{"token": log_token, "logfile": self.project, "vehicle": self.mapping.log_vehicle,
                "date_captured": date, "location": self.mapping.log_location}]
        map_token = self.token("map", self.project)
        maps = [{"category": "semantic_prior", "token": map_token, "filename": f"maps/{map_token}.png",
                 "log_tokens": [log_token]}]
        return log, maps, self.token("scene", self.project)

    def _samples(self, rows: list[dict]) -> list[dict]:
        rows.sort(key=lambda r: self.order[r["frame_id"]])
        _link(rows)
        self._sample_chain = [(self.order[r["frame_id"]], r["token"]) for r in rows]
        self.counts["samples"] = len(rows)
        return [{"token": r["token"], "timestamp": r["timestamp"], "prev": r["prev"], "next": r["next"],
                 "scene_token": r["scene_token"]} for r in rows]

    def _scene(self, scene_token: str, log_token: str, samples: list[dict]) -> dict:
        return {"token": scene_token, "log_token": log_token, "nbr_samples": len(samples),
                "first_sample_token": samples[0]["token"] if samples else "",
                "last_sample_token": samples[-1]["token"] if samples else "",
                "name": self.project, "description": f"NextPoints project {self.project}"}

    def _sample_data(self, rows: list[dict], poses: list[dict]) -> tuple[list[dict], list[dict]]:
        """Chains per channel, sweeps attached to the following sample; one ego_pose per sample_data."""
        sample_orders = [order for order, _ in self._sample_chain]
        sample_tokens = [token for _, token in self._sample_chain]
        by_channel: dict[str, list[dict]] = defaultdict(list)
        for r in rows:
            by_channel[r["channel"]].append(r)
        for channel_rows in by_channel.values():
            channel_rows.sort(key=lambda r: (r["timestamp"], self.order[r["frame_id"]]))
            _link(channel_rows)
        for r in rows:
            if not r["is_key_frame"]:  # the sample that follows the sweep, else the last one
                i = bisect.bisect_right(sample_orders, self.order[r["frame_id"]])
                r["sample_token"] = sample_tokens[min(i, len(sample_tokens) - 1)] if sample_tokens else ""
        rows.sort(key=lambda r: (self.order[r["frame_id"]], r["channel"]))
        out = [{"token": r["token"], "sample_token": r["sample_token"], "ego_pose_token": r["ego_pose_token"],
                "calibrated_sensor_token": r["calibrated_sensor_token"], "timestamp": r["timestamp"],
                "fileformat": r["fileformat"], "is_key_frame": bool(r["is_key_frame"]), "height": r["height"],
                "width": r["width"], "filename": r["filename"], "prev": r["prev"], "next": r["next"]}
               for r in rows]
        poses.sort(key=lambda r: (self.order[r["frame_id"]], r["channel"]))
        ego = [{"token": r["token"], "timestamp": r["timestamp"], "rotation": r["rotation"],
                "translation": r["translation"]} for r in poses]
        self.counts["sample_data"] = len(out)
        self.counts["key_frame_sample_data"] = sum(r["is_key_frame"] for r in out)
        self.counts["sweeps"] = len(out) - self.counts["key_frame_sample_data"]
        for channel, channel_rows in sorted(by_channel.items()):
            self.counts[f"sample_data.{channel}"] = len(channel_rows)
        return out, ego

    def _annotations(self, rows: list[dict]) -> tuple[list[dict], list[dict]]:
        """Chains per instance, one attribute each, and the instance table."""
        rules = self.mapping.attributes
        attribute_tokens = {name: vocabulary_token("attribute", name) for name in ATTRIBUTES}
        by_instance: dict[str, list[dict]] = defaultdict(list)
        for r in rows:
            by_instance[r["instance_token"]].append(r)
        instances = []
        for token, chain in by_instance.items():
            chain.sort(key=lambda r: self.order[r["frame_id"]])
            _link(chain)
            speeds = horizontal_speeds(np.array([r["timestamp"] for r in chain]),
                                       np.array([r["translation"] for r in chain]), rules.max_time_diff_s)
            for r, speed in zip(chain, speeds):
                name = choose_attribute(r["category"], r["obj_attr"], float(speed), bool(r["has_rider"]), rules)
                r["attribute_tokens"] = [attribute_tokens[name]] if name else []
                if name:
                    self.counts[f"attribute.{name}"] += 1
            instances.append({"token": token, "category_token": vocabulary_token("category", chain[0]["category"]),
                              "nbr_annotations": len(chain), "first_annotation_token": chain[0]["token"],
                              "last_annotation_token": chain[-1]["token"],
                              "_order": (self.order[chain[0]["frame_id"]], chain[0]["obj_id"])})
        rows.sort(key=lambda r: (self.order[r["frame_id"]], r["instance_token"]))
        out = [{"token": r["token"], "sample_token": r["sample_token"], "instance_token": r["instance_token"],
                "visibility_token": r["visibility_token"], "attribute_tokens": r["attribute_tokens"],
                "translation": r["translation"], "size": r["size"], "rotation": r["rotation"],
                "prev": r["prev"], "next": r["next"], "num_lidar_pts": r["num_lidar_pts"],
                "num_radar_pts": r["num_radar_pts"]} for r in rows]
        instances.sort(key=lambda r: r.pop("_order"))
        self.counts["annotations"] = len(out)
        self.counts["instances"] = len(instances)
        return out, instances


def _round_floats(value: Any, decimals: int) -> Any:
    if isinstance(value, float):
        return round(value, decimals)
    if isinstance(value, list):
        return [_round_floats(v, decimals) for v in value]
    return value


def apply_precision(tables: dict[str, list[dict[str, Any]]], decimals: int | None) -> None:
    """Round every float of the tables to ``decimals`` (quaternions to at least MIN_QUATERNION_DECIMALS)."""
    if decimals is None:
        return
    for rows in tables.values():
        for row in rows:
            for key, value in row.items():
                if isinstance(value, (float, list)):
                    places = max(decimals, MIN_QUATERNION_DECIMALS) if key == "rotation" else decimals
                    row[key] = _round_floats(value, places)


def _write_text_atomic(path: Path, text: str | bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    if isinstance(text, bytes):
        tmp.write_bytes(text)
    else:
        tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def dump_rows(rows: list[dict[str, Any]]) -> str:
    """A JSON array with one row per line: compact, diff-friendly, byte-stable for equal input."""
    if not rows:
        return "[]\n"
    return "[\n" + ",\n".join(json.dumps(r, ensure_ascii=False, allow_nan=False) for r in rows) + "\n]\n"


def map_png() -> bytes:
    """A 1×1 black semantic-prior map: the devkit needs a map file per log; it loads and renders empty."""
    buf = io.BytesIO()
    Image.new("L", (1, 1), 0).save(buf, format="PNG")
    return buf.getvalue()


def write_dataset(dataroot: Path, version: str, tables: dict[str, list[dict[str, Any]]],
                  splits: dict[str, list[str]]) -> None:
    """Write ``<dataroot>/<version>/<table>.json`` for the 13 tables, ``splits.json`` and the map PNGs."""
    table_dir = Path(dataroot) / version
    for name in TABLE_NAMES:
        _write_text_atomic(table_dir / f"{name}.json", dump_rows(tables[name]))
    _write_text_atomic(table_dir / "splits.json", json.dumps(splits, indent=1, sort_keys=True) + "\n")
    png = map_png()
    for record in tables["map"]:
        _write_text_atomic(Path(dataroot) / record["filename"], png)
