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

Memory: tables are built and written one at a time (``TableBuilder.build`` → ``write_dataset``). Links are
computed on Arrow / numpy columns (sort indices), and rows become Python dicts only ``ROW_CHUNK`` at a time,
streamed to the JSON file; so merge holds one table's staged columns, not the whole export as dicts.
"""
from __future__ import annotations

import io
import json
import os
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image

from stages.formats.nuscenes.mapping import AttributeRules, NuScenesMapping, normalise_name
from stages.formats.nuscenes.rounding import round_row
from stages.formats.nuscenes.tokens import make_token
from stages.formats.nuscenes.vocabulary import ATTRIBUTES, CATEGORIES, VISIBILITY, modality
from stages.model import SensorCalib

TABLE_NAMES = ("attribute", "calibrated_sensor", "category", "ego_pose", "instance", "log", "map", "sample",
               "sample_annotation", "sample_data", "scene", "sensor", "visibility")
VOCABULARY = "nuscenes"  # token namespace of project-independent rows (category, attribute, sensor)


def vocabulary_token(table: str, name: str) -> str:
    """Token of a category / attribute / sensor row: the same in every export, so exports can be combined."""
    return make_token(VOCABULARY, table, name)


ROW_CHUNK = 1024  # rows turned into Python objects at a time when writing / choosing attributes

SAMPLE_COLUMNS = ("token", "timestamp", "scene_token", "frame_id")
SAMPLE_DATA_COLUMNS = ("token", "sample_token", "ego_pose_token", "calibrated_sensor_token", "timestamp",
                       "fileformat", "is_key_frame", "height", "width", "filename", "frame_id", "channel")
EGO_POSE_COLUMNS = ("token", "timestamp", "rotation", "translation", "frame_id", "channel")
ANNOTATION_COLUMNS = ("token", "sample_token", "instance_token", "visibility_token", "translation", "size",
                      "rotation", "num_lidar_pts", "num_radar_pts", "frame_id", "timestamp", "obj_id", "obj_attr",
                      "category", "has_rider")


def _read(tables: Mapping[str, pa.Table], name: str, columns: tuple[str, ...]) -> pa.Table | None:
    """Only ``columns`` of staged table ``name`` (None when no batch has it). ``tables`` is a
    ``stages.merge.BatchTables`` (reads the table when asked) or any mapping of tables."""
    read = getattr(tables, "read", None)
    if read is not None:
        return read(name, columns)
    table = tables.get(name)
    return table.select(list(columns)) if table is not None else None


def _iter_rows(table: pa.Table, order: np.ndarray | None = None) -> Iterator[dict[str, Any]]:
    """The rows of ``table`` as dicts (keys in column order), in ``order`` (row indices) when given; converted
    ``ROW_CHUNK`` rows at a time, so only one chunk exists as Python objects."""
    for start in range(0, table.num_rows, ROW_CHUNK):
        part = table.slice(start, ROW_CHUNK) if order is None else table.take(order[start:start + ROW_CHUNK])
        yield from part.to_pylist()


def _sort_indices(**keys: Any) -> np.ndarray:
    """Row indices sorting by the given columns (ascending, first key first; strings by code point)."""
    columns = pa.table(keys)
    return pc.sort_indices(columns, sort_keys=[(k, "ascending") for k in keys]).to_numpy()


def _chain_starts(sorted_keys: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """True where a row of ``sorted_keys`` (already grouped) starts a new chain."""
    n = len(sorted_keys)
    if n == 0:
        return np.zeros(0, dtype=bool)
    changed = pc.not_equal(sorted_keys.slice(1), sorted_keys.slice(0, n - 1))
    return np.r_[True, np.asarray(changed.to_numpy(zero_copy_only=False), dtype=bool)]


def _links(perm: np.ndarray, starts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """prev / next row index (-1: none) of every row, for chains given by ``perm`` (row indices in chain order)
    and ``starts`` (True where a chain begins in ``perm``)."""
    prev = np.full(len(perm), -1, dtype=np.int64)
    nxt = np.full(len(perm), -1, dtype=np.int64)
    if len(perm):
        inner = np.flatnonzero(~starts)  # positions (in chain order) that have a predecessor
        prev[perm[inner]] = perm[inner - 1]
        nxt[perm[inner - 1]] = perm[inner]
    return prev, nxt


def _tokens_at(tokens: pa.ChunkedArray | pa.Array, index: np.ndarray) -> pa.ChunkedArray | pa.Array:
    """``tokens[index]``, "" where ``index`` is -1."""
    return pc.fill_null(tokens.take(pa.array(index, mask=index < 0)), "")


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
        self.first_timestamp_us = first_timestamp_us
        self.mapping = mapping
        self.channel_map = channel_map
        self.skipped_channels = skipped_channels
        self.calibration = calibration
        self.counts: Counter = Counter()
        # frame_order as arrays, to look frame ids up a column at a time
        self._order_keys = pa.array(list(frame_order), type=pa.string())
        self._order_values = np.fromiter(frame_order.values(), dtype=np.int64, count=len(frame_order))
        # the sample chain, set by _samples: frame orders (ascending) and tokens
        self._sample_orders = np.zeros(0, dtype=np.int64)
        self._sample_tokens = pa.array([], type=pa.string())

    def token(self, table: str, *key: object) -> str:
        return make_token(self.project, table, *key)

    def build(self, tables: Mapping[str, pa.Table]) -> Iterator[tuple[str, Iterable[dict[str, Any]]]]:
        """The 13 tables, one ``(name, rows)`` at a time; ``rows`` may be produced lazily. A table's staged input
        is read when the table is reached, so writing each table before taking the next (``write_dataset``)
        holds one table at a time. ``counts`` is complete once this is exhausted."""
        yield "category", [{"token": vocabulary_token("category", n), "name": n, "description": d}
                           for n, d in sorted(CATEGORIES.items())]
        yield "attribute", [{"token": vocabulary_token("attribute", n), "name": n, "description": d}
                            for n, d in sorted(ATTRIBUTES.items())]
        yield "visibility", [{"description": d, "token": t, "level": lv} for t, (lv, d) in sorted(VISIBILITY.items())]
        sensors, calibrated = self._sensors()
        yield "sensor", sensors
        yield "calibrated_sensor", calibrated
        log, maps, scene_token = self._log_and_map()
        yield "log", log
        yield "map", maps
        yield "sample", self._samples(_read(tables, "sample", SAMPLE_COLUMNS))
        yield "scene", [self._scene(scene_token, log[0]["token"])]
        yield "sample_data", self._sample_data(_read(tables, "sample_data", SAMPLE_DATA_COLUMNS))
        yield "ego_pose", self._ego_poses(_read(tables, "ego_pose", EGO_POSE_COLUMNS))
        annotations, instances = self._annotations(_read(tables, "sample_annotation", ANNOTATION_COLUMNS))
        yield "sample_annotation", annotations
        yield "instance", instances
        dropped = _read(tables, "dropped_annotation", ("obj_type",))
        dropped_counts = dropped["obj_type"].value_counts().to_pylist() if dropped is not None else []
        self.counts["dropped_unknown_types"] = sum(c["counts"] for c in dropped_counts)
        for c in dropped_counts:
            self.counts[f"dropped_unknown_type.{c['values']}"] = c["counts"]
        self.counts["skipped_channels"] = len(self.skipped_channels)
        for ch in self.skipped_channels:
            self.counts[f"skipped_channel.{ch}"] = 1

    def _frame_order(self, frame_ids: pa.ChunkedArray) -> np.ndarray:
        """Order in the plan of each frame id."""
        index = pc.index_in(frame_ids, value_set=self._order_keys)
        if index.null_count:
            raise KeyError(frame_ids.filter(pc.is_null(index))[0].as_py())
        return self._order_values[index.to_numpy()]

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

    def _samples(self, table: pa.Table | None) -> Iterable[dict]:
        """Samples in frame order, linked; sets the sample chain."""
        self.counts["samples"] = table.num_rows if table is not None else 0
        if table is None:
            return []
        order = self._frame_order(table["frame_id"])
        perm = np.argsort(order, kind="stable")
        prev, nxt = _links(perm, np.arange(len(perm)) == 0)  # one chain
        self._sample_orders = order[perm]
        self._sample_tokens = table["token"].take(perm)
        out = pa.table({"token": table["token"], "timestamp": table["timestamp"],
                        "prev": _tokens_at(table["token"], prev), "next": _tokens_at(table["token"], nxt),
                        "scene_token": table["scene_token"]})
        return _iter_rows(out, perm)

    def _scene(self, scene_token: str, log_token: str) -> dict:
        n = len(self._sample_tokens)
        return {"token": scene_token, "log_token": log_token, "nbr_samples": n,
                "first_sample_token": self._sample_tokens[0].as_py() if n else "",
                "last_sample_token": self._sample_tokens[n - 1].as_py() if n else "",
                "name": self.project, "description": f"NextPoints project {self.project}"}

    def _sample_data(self, table: pa.Table | None) -> Iterable[dict]:
        """Chains per channel (timestamp, then frame order); sweeps attached to the following sample."""
        for key in ("sample_data", "key_frame_sample_data", "sweeps"):
            self.counts[key] = 0
        if table is None:
            return []
        order = self._frame_order(table["frame_id"])
        channel = table["channel"]
        chain = _sort_indices(channel=channel, timestamp=table["timestamp"], order=order)
        prev, nxt = _links(chain, _chain_starts(channel.take(chain)))
        is_key = np.asarray(table["is_key_frame"].to_numpy(), dtype=bool)
        if len(self._sample_tokens):  # a sweep's sample: the one that follows it, else the last one
            following = np.searchsorted(self._sample_orders, order, side="right")
            sweep_sample = self._sample_tokens.take(np.minimum(following, len(self._sample_tokens) - 1))
        else:
            sweep_sample = pa.nulls(len(order), pa.string()).fill_null("")
        sample_token = pc.if_else(pa.array(is_key), table["sample_token"], sweep_sample)
        out = pa.table({
            "token": table["token"], "sample_token": sample_token, "ego_pose_token": table["ego_pose_token"],
            "calibrated_sensor_token": table["calibrated_sensor_token"], "timestamp": table["timestamp"],
            "fileformat": table["fileformat"], "is_key_frame": pa.array(is_key), "height": table["height"],
            "width": table["width"], "filename": table["filename"], "prev": _tokens_at(table["token"], prev),
            "next": _tokens_at(table["token"], nxt)})
        self.counts["sample_data"] = table.num_rows
        self.counts["key_frame_sample_data"] = int(is_key.sum())
        self.counts["sweeps"] = table.num_rows - self.counts["key_frame_sample_data"]
        for c in channel.value_counts().to_pylist():
            self.counts[f"sample_data.{c['values']}"] = c["counts"]
        return _iter_rows(out, _sort_indices(order=order, channel=channel))

    def _ego_poses(self, table: pa.Table | None) -> Iterable[dict]:
        """One ego_pose per sample_data, in frame order then channel."""
        if table is None:
            return []
        perm = _sort_indices(order=self._frame_order(table["frame_id"]), channel=table["channel"])
        return _iter_rows(table.select(["token", "timestamp", "rotation", "translation"]), perm)

    def _annotations(self, table: pa.Table | None) -> tuple[Iterable[dict], list[dict]]:
        """Chains per instance, one attribute each, and the instance table."""
        self.counts["annotations"] = table.num_rows if table is not None else 0
        if table is None:
            self.counts["instances"] = 0
            return [], []
        rules = self.mapping.attributes
        order = self._frame_order(table["frame_id"])
        instance = table["instance_token"]
        chain = _sort_indices(instance=instance, order=order)
        starts = _chain_starts(instance.take(chain))
        prev, nxt = _links(chain, starts)

        # speeds along each chain, then one attribute per annotation (chosen a chunk of rows at a time)
        timestamps = table["timestamp"].to_numpy()[chain]
        translations = table["translation"].combine_chunks().flatten().to_numpy().reshape(-1, 3)[chain]
        speeds = np.empty(len(chain))
        bounds = np.r_[np.flatnonzero(starts), len(chain)]
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            speeds[chain[lo:hi]] = horizontal_speeds(timestamps[lo:hi], translations[lo:hi], rules.max_time_diff_s)
        del timestamps, translations
        names = sorted(ATTRIBUTES)
        code_of = {name: i for i, name in enumerate(names)}

        def code(category: str, obj_attr: str, speed: float, has_rider: bool) -> int:  # index in names, -1: none
            name = choose_attribute(category, obj_attr, float(speed), bool(has_rider), rules)
            return code_of[name] if name else -1

        codes = np.empty(table.num_rows, dtype=np.int64)
        inputs = table.select(["category", "obj_attr", "has_rider"])
        for start in range(0, table.num_rows, ROW_CHUNK):
            part = inputs.slice(start, ROW_CHUNK).to_pydict()
            codes[start:start + len(part["category"])] = [
                code(*args) for args in zip(part["category"], part["obj_attr"], speeds[start:start + ROW_CHUNK],
                                            part["has_rider"])]
        has = codes >= 0
        attribute_tokens = pa.ListArray.from_arrays(
            pa.array(np.r_[0, np.cumsum(has)], type=pa.int32()),
            pa.array([vocabulary_token("attribute", name) for name in names]).take(codes[has]))
        for code, n in enumerate(np.bincount(codes[has], minlength=len(names))):
            if n:
                self.counts[f"attribute.{names[code]}"] += int(n)

        # one instance per chain: its first / last annotation, ordered by first frame then obj_id
        first = chain[starts]
        last = chain[np.r_[starts[1:], True]]
        instances = [{"token": token, "category_token": vocabulary_token("category", category), "nbr_annotations": n,
                      "first_annotation_token": first_token, "last_annotation_token": last_token,
                      "_order": (int(first_order), obj_id)}
                     for token, category, n, first_token, last_token, first_order, obj_id in zip(
                         instance.take(first).to_pylist(), table["category"].take(first).to_pylist(),
                         np.diff(np.r_[np.flatnonzero(starts), len(chain)]).tolist(),
                         table["token"].take(first).to_pylist(), table["token"].take(last).to_pylist(),
                         order[first], table["obj_id"].take(first).to_pylist())]
        instances.sort(key=lambda r: r.pop("_order"))
        self.counts["instances"] = len(instances)

        out = pa.table({
            "token": table["token"], "sample_token": table["sample_token"], "instance_token": instance,
            "visibility_token": table["visibility_token"], "attribute_tokens": attribute_tokens,
            "translation": table["translation"], "size": table["size"], "rotation": table["rotation"],
            "prev": _tokens_at(table["token"], prev), "next": _tokens_at(table["token"], nxt),
            "num_lidar_pts": table["num_lidar_pts"], "num_radar_pts": table["num_radar_pts"]})
        return _iter_rows(out, _sort_indices(order=order, instance=instance)), instances


def _write_text_atomic(path: Path, text: str | bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    if isinstance(text, bytes):
        tmp.write_bytes(text)
    else:
        tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


_ENCODE_ROW = json.JSONEncoder(ensure_ascii=False, allow_nan=False).encode  # = json.dumps(row, those options)


def write_rows(path: Path, rows: Iterable[dict[str, Any]], decimals: int | None = None) -> int:
    """Stream ``rows`` (floats rounded to ``decimals``) to ``path`` as a JSON array with one row per line:
    compact, diff-friendly, byte-stable for equal input. Written to a temporary file, then renamed; returns the
    number of rows."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    n = 0
    try:
        with open(tmp, "w", encoding="utf-8", buffering=1 << 18) as f:
            for row in rows:
                f.write(",\n" if n else "[\n")
                f.write(_ENCODE_ROW(round_row(row, decimals)))
                n += 1
            f.write("\n]\n" if n else "[]\n")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return n


def map_png() -> bytes:
    """A 1×1 black semantic-prior map: the devkit needs a map file per log; it loads and renders empty."""
    buf = io.BytesIO()
    Image.new("L", (1, 1), 0).save(buf, format="PNG")
    return buf.getvalue()


def write_dataset(dataroot: Path, version: str, tables: Iterable[tuple[str, Iterable[dict[str, Any]]]],
                  splits: dict[str, list[str]], decimals: int | None = None) -> dict[str, int]:
    """Write ``<dataroot>/<version>/<table>.json`` for each ``(name, rows)`` of ``tables`` as it comes (e.g.
    ``TableBuilder.build``), ``splits.json`` and the map PNGs; returns the number of rows of each table."""
    table_dir = Path(dataroot) / version
    written: dict[str, int] = {}
    map_files: list[str] = []
    for name, rows in tables:
        if name == "map":
            rows = list(rows)
            map_files = [record["filename"] for record in rows]
        written[name] = write_rows(table_dir / f"{name}.json", rows, decimals)
    missing = set(TABLE_NAMES) - set(written)
    if missing:
        raise ValueError(f"tables not produced: {sorted(missing)}")
    _write_text_atomic(table_dir / "splits.json", json.dumps(splits, indent=1, sort_keys=True) + "\n")
    png = map_png()
    for filename in map_files:
        _write_text_atomic(Path(dataroot) / filename, png)
    return written
