"""Every request field does what it says: annotation filters, frame selection, coordinate systems and export
options each change the output and the reported counts (issue 4). Exports run through the serial stages; the
devkit reads the results."""
from __future__ import annotations

import json
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from nuscenes.nuscenes import NuScenes

from stages.errors import InputError
from stages.geometry import quat_from_xyzw, quat_to_matrix
from stages.request import ExportRequest
from stages.serial import SerialRun, run_serial

VERSION = "v1.0-trainval"


def export(project: Path, dest: Path, **fields) -> SerialRun:
    body = {"export_options": {"compress_output": False}}
    for key, value in fields.items():
        if isinstance(value, dict) and isinstance(body.get(key), dict):
            body[key].update(value)
        else:
            body[key] = value
    return run_serial(project, dest, ExportRequest.model_validate(body), batch_size=4)


def label_files(project: Path) -> dict[str, list[dict]]:
    """frame id → the raw label objects (frames without a label file have none)."""
    frames = sorted((p.stem for p in (project / "lidar" / "lidar-fusion").glob("*.pcd")), key=int)
    out = {}
    for f in frames:
        path = project / "label" / f"{f}.json"
        out[f] = json.loads(path.read_text()) if path.exists() else []
    return out


@pytest.fixture(scope="module")
def unfiltered(synth_project, tmp_path_factory):
    dest = tmp_path_factory.mktemp("unfiltered") / "ds"
    run = export(synth_project, dest)
    return run, NuScenes(VERSION, str(dest), verbose=False)


def test_object_types_keep_only_the_named_types_case_insensitively(synth_project, tmp_path):
    run = export(synth_project, tmp_path / "ds", annotation_filter={"object_types": ["CAR", "Pedestrian"]})
    nusc = NuScenes(VERSION, str(tmp_path / "ds"), verbose=False)
    labels = [o for objs in label_files(synth_project).values() for o in objs]
    kept = [o for o in labels if o["obj_type"] in ("car", "pedestrian")]
    assert 0 < len(kept) < len(labels)
    assert {a["category_name"] for a in nusc.sample_annotation} == {"vehicle.car", "human.pedestrian.adult"}
    assert len(nusc.sample_annotation) == len(kept) == run.merged.annotations
    assert run.merged.filtered == {"object_types": len(labels) - len(kept)}


def test_with_sweeps_only_key_frame_labels_are_filtered_and_every_label_is_accounted_for(synth_project, tmp_path):
    """Sweeps carry no annotations: the filter runs on key frames only, and its counts add up to their labels."""
    run = export(synth_project, tmp_path / "ds", annotation_filter={"object_types": ["car"]},
                 export_options={"include_sweeps": True, "key_frame_interval": 2})
    nusc = NuScenes(VERSION, str(tmp_path / "ds"), verbose=False)
    per_frame = list(label_files(synth_project).values())
    on_key, on_sweeps = per_frame[0::2], per_frame[1::2]
    key_labels = sum(len(objs) for objs in on_key)
    cars = sum(o["obj_type"] == "car" for objs in on_key for o in objs)
    assert 0 < cars < key_labels
    assert len(nusc.sample_annotation) == run.merged.annotations == cars
    assert run.merged.filtered == {"object_types": key_labels - cars}
    counts = run.merged.counts
    assert run.merged.annotations + sum(run.merged.filtered.values()) + counts["dropped_unknown_types"] == key_labels
    assert sum(b.annotations for b in run.batches) == run.merged.annotations
    assert counts["sweep_labels_not_exported"] == sum(len(objs) for objs in on_sweeps) > 0


def test_min_points_counts_points_when_labels_carry_no_count(synth_project, unfiltered, tmp_path):
    _, full = unfiltered
    counts = [a["num_lidar_pts"] for a in full.sample_annotation]
    threshold = int(np.median(counts))
    run = export(synth_project, tmp_path / "ds", annotation_filter={"min_points": threshold})
    nusc = NuScenes(VERSION, str(tmp_path / "ds"), verbose=False)
    assert all(a["num_lidar_pts"] >= threshold for a in nusc.sample_annotation)
    expected_removed = sum(c < threshold for c in counts)
    assert 0 < expected_removed < len(counts)  # the labels have num_pts null: nothing is dropped for lacking it
    assert run.merged.filtered == {"min_points": expected_removed}
    assert run.merged.annotations == len(counts) - expected_removed


def test_min_points_uses_the_labels_own_count_when_it_has_one(small_project, tmp_path):
    label = sorted((small_project / "label").glob("*.json"))[0]
    objs = json.loads(label.read_text())
    for o in objs:
        o["num_pts"] = 1000  # the labelling tool says: plenty of points
    label.write_text(json.dumps(objs))
    run = export(small_project, tmp_path / "ds", annotation_filter={"min_points": 999})
    nusc = NuScenes(VERSION, str(tmp_path / "ds"), verbose=False)
    first = min(nusc.sample, key=lambda s: s["timestamp"])
    assert len(first["anns"]) == len(objs)
    others = [s for s in nusc.sample if s["token"] != first["token"]]
    assert all(not s["anns"] for s in others)  # counted points never reach 999 on the small synthetic frames
    total = sum(len(o) for o in label_files(small_project).values())
    assert run.merged.annotations == len(objs)
    assert run.merged.filtered == {"min_points": total - len(objs)}


def test_confidence_threshold_drops_low_scores_and_keeps_labels_without_one(small_project, tmp_path):
    label = sorted((small_project / "label").glob("*.json"))[0]
    objs = json.loads(label.read_text())
    for i, o in enumerate(objs):
        if i % 2 == 0:
            o["score"] = 0.2
        elif i % 4 == 1:
            o["score"] = 0.9
    label.write_text(json.dumps(objs))
    low = sum(1 for i in range(len(objs)) if i % 2 == 0)
    run = export(small_project, tmp_path / "ds", annotation_filter={"confidence_threshold": 0.5})
    assert run.merged.filtered == {"confidence_threshold": low}
    total = sum(len(v) for v in label_files(small_project).values())
    assert run.merged.annotations == total - low
    # the output holds exactly the scored-high and unscored labels of that frame (lidar = ego, so the devkit's
    # lidar-frame boxes are the label centres)
    nusc = NuScenes(VERSION, str(tmp_path / "ds"), verbose=False)
    first = min(nusc.sample, key=lambda s: s["timestamp"])
    _, boxes, _ = nusc.get_sample_data(first["data"]["LIDAR_TOP"])
    exported = sorted(tuple(np.round(b.center, 3)) for b in boxes)
    expected = sorted(tuple(np.round([o["psr"]["position"][k] for k in "xyz"], 3))
                      for i, o in enumerate(objs) if i % 2 == 1)
    assert exported == expected and 0 < len(expected) < len(objs)


SCALE_AXIS = {"length": "x", "width": "y", "height": "z"}
SIZE_INDEX = {"width": 0, "length": 1, "height": 2}  # nuScenes size is [w, l, h]


@pytest.mark.parametrize("bounds", [{"min_length": 3.0, "max_height": 3.0}, {"max_length": 4.2, "min_height": 1.6}],
                         ids=["min_length+max_height", "max_length+min_height"])
def test_bbox_size_filter_bounds_length_width_and_height(synth_project, tmp_path, bounds):
    run = export(synth_project, tmp_path / "ds", annotation_filter={"bbox_size_filter": bounds})
    nusc = NuScenes(VERSION, str(tmp_path / "ds"), verbose=False)

    def passes(name: str, value: float) -> bool:
        kind, dim = name.split("_")
        return value >= bounds[name] if kind == "min" else value <= bounds[name]

    labels = [o["psr"]["scale"] for objs in label_files(synth_project).values() for o in objs]
    ok = {name: [passes(name, s[SCALE_AXIS[name.split("_")[1]]]) for s in labels] for name in bounds}
    keep = [all(flags) for flags in zip(*ok.values())]
    assert 0 < sum(keep) < len(labels)
    for name in bounds:  # each bound alone removes labels the other keeps
        others = [all(ok[n][i] for n in bounds if n != name) for i in range(len(labels))]
        assert sum(others) > sum(keep), name
    for a in nusc.sample_annotation:
        assert all(passes(name, a["size"][SIZE_INDEX[name.split("_")[1]]]) for name in bounds), a["size"]
    assert len(nusc.sample_annotation) == run.merged.annotations == sum(keep)
    assert run.merged.filtered == {"bbox_size_filter": len(labels) - sum(keep)}


def test_bbox_size_filter_bounds_width_from_both_sides_and_height_from_below(synth_project, tmp_path):
    bounds = {"min_width": 1.0, "max_width": 2.2, "min_height": 1.7}
    run = export(synth_project, tmp_path / "ds", annotation_filter={"bbox_size_filter": bounds})
    nusc = NuScenes(VERSION, str(tmp_path / "ds"), verbose=False)
    labels = [o for objs in label_files(synth_project).values() for o in objs]
    passes = {"min_width": lambda s: s["y"] >= 1.0, "max_width": lambda s: s["y"] <= 2.2,
              "min_height": lambda s: s["z"] >= 1.7}
    keep = [o for o in labels if all(ok(o["psr"]["scale"]) for ok in passes.values())]
    for name, ok in passes.items():  # each bound alone removes labels the other two keep
        others = [o for o in labels if all(f(o["psr"]["scale"]) for n, f in passes.items() if n != name)]
        assert len(others) > len(keep), name
    assert 0 < len(keep) < len(labels) and {o["obj_type"] for o in keep} == {"van", "pickup"}
    for a in nusc.sample_annotation:
        w, _, h = a["size"]
        assert 1.0 <= w <= 2.2 and h >= 1.7
    assert {a["category_name"] for a in nusc.sample_annotation} == {"vehicle.car", "vehicle.truck"}  # van, pickup
    assert len(nusc.sample_annotation) == run.merged.annotations == len(keep)
    assert run.merged.filtered == {"bbox_size_filter": len(labels) - len(keep)}


def test_frame_selection_start_end_step_and_max(synth_project, tmp_path):
    frames = list(label_files(synth_project))
    run = export(synth_project, tmp_path / "ds", start_frame=frames[3], end_frame=frames[15], frame_step=3,
                 max_frames=4)
    nusc = NuScenes(VERSION, str(tmp_path / "ds"), verbose=False)
    expected = [int(f) // 1000 for f in frames[3:16:3][:4]]
    assert sorted(s["timestamp"] for s in nusc.sample) == expected
    assert run.discovered.n_frames == 4
    # end_frame alone bounds the selection (no max_frames): by id, and by index
    for end in (frames[8], 8):
        run = export(synth_project, tmp_path / f"end-{end}", start_frame=frames[3], end_frame=end, frame_step=2)
        nusc = NuScenes(VERSION, str(tmp_path / f"end-{end}"), verbose=False)
        assert sorted(s["timestamp"] for s in nusc.sample) == [int(f) // 1000 for f in frames[3:9:2]]
        assert run.discovered.n_frames == run.merged.frames == 3


def test_frame_selection_by_index_and_its_nested_spelling(synth_project, tmp_path):
    frames = list(label_files(synth_project))
    run = export(synth_project, tmp_path / "ds", frame_selection={"start_frame": 5, "max_frames": 2})
    nusc = NuScenes(VERSION, str(tmp_path / "ds"), verbose=False)
    assert sorted(s["timestamp"] for s in nusc.sample) == [int(f) // 1000 for f in frames[5:7]]
    assert run.discovered.n_frames == 2


def test_a_frame_selection_outside_the_project_is_an_error(synth_project, tmp_path):
    with pytest.raises(InputError, match="start_frame"):
        export(synth_project, tmp_path / "ds", start_frame="123")


def test_a_negative_index_counts_from_the_end_and_one_before_the_first_frame_is_an_error(synth_project, tmp_path):
    frames = list(label_files(synth_project))
    run = export(synth_project, tmp_path / "ds", start_frame=-3, end_frame=-2)
    nusc = NuScenes(VERSION, str(tmp_path / "ds"), verbose=False)
    assert sorted(s["timestamp"] for s in nusc.sample) == [int(f) // 1000 for f in frames[-3:-1]]
    assert run.discovered.n_frames == 2
    for field in ("start_frame", "end_frame"):
        with pytest.raises(InputError, match=f"{field} -{len(frames) + 1} is neither"):
            export(synth_project, tmp_path / field, **{field: -len(frames) - 1})
        with pytest.raises(InputError, match=f"{field} '-100' is neither.*from -20 to 19"):
            export(synth_project, tmp_path / field, **{field: "-100"})


def test_ego_vehicle_coordinates_put_every_sample_in_its_own_ego_frame(synth_project, unfiltered, tmp_path):
    export(synth_project, tmp_path / "ds", coordinate_system="ego_vehicle")
    nusc = NuScenes(VERSION, str(tmp_path / "ds"), verbose=False)
    for pose in nusc.ego_pose:
        assert pose["translation"] == [0.0, 0.0, 0.0] and pose["rotation"] == [1.0, 0.0, 0.0, 0.0]
    _, full = unfiltered
    # boxes in the global frame = boxes in the ego frame; the lidar-frame boxes are the same either way
    for sample, full_sample in zip(sorted(nusc.sample, key=lambda s: s["timestamp"]),
                                   sorted(full.sample, key=lambda s: s["timestamp"])):
        _, a, _ = nusc.get_sample_data(sample["data"]["LIDAR_TOP"])
        _, b, _ = full.get_sample_data(full_sample["data"]["LIDAR_TOP"])
        assert len(a) == len(b)
        for x, y in zip(sorted(a, key=lambda k: tuple(k.center)), sorted(b, key=lambda k: tuple(k.center))):
            assert np.allclose(x.center, y.center, atol=1e-6)


def test_global_coordinates_follow_the_ego_poses(synth_project, unfiltered):
    _, full = unfiltered
    for sd in full.sample_data[:20]:
        pose = full.get("ego_pose", sd["ego_pose_token"])
        stem = next(p.stem for p in (synth_project / "ego_pose").glob("*.json")
                    if int(p.stem) // 1000 == sd["timestamp"])
        src = json.loads((synth_project / "ego_pose" / f"{stem}.json").read_text())["transform"]
        t, r = src["translation"], src["rotation"]
        assert np.allclose(pose["translation"], [t["x"], t["y"], t["z"]])
        assert np.allclose(quat_to_matrix(np.array(pose["rotation"])),
                           quat_to_matrix(quat_from_xyzw(r["x"], r["y"], r["z"], r["w"])))


def test_without_images_or_pointclouds_nothing_of_them_is_written(synth_project, unfiltered, tmp_path):
    full_run, _ = unfiltered
    cameras = {k: v for k, v in full_run.merged.counts.items() if k.startswith("sample_data.CAM_")}
    assert len(cameras) == 6 and full_run.merged.counts["sample_data.LIDAR_TOP"] == 20
    run = export(synth_project, tmp_path / "a", export_options={"include_images": False})
    nusc = NuScenes(VERSION, str(tmp_path / "a"), verbose=False)
    assert {sd["channel"] for sd in nusc.sample_data} == {"LIDAR_TOP"}
    assert not list((tmp_path / "a" / "samples").glob("CAM_*"))
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    for counts in (run.merged.counts, manifest["counts"]):
        assert not [k for k in counts if k.startswith("sample_data.CAM_")] and "missing_images" not in counts
        assert counts["sample_data"] == counts["sample_data.LIDAR_TOP"] == 20
    assert run.merged.annotations == full_run.merged.annotations  # labels do not depend on the media

    run = export(synth_project, tmp_path / "b", export_options={"include_pointcloud": False})
    assert not list((tmp_path / "b").rglob("*.pcd.bin"))
    tables = json.loads((tmp_path / "b" / VERSION / "sample_data.json").read_text())
    assert tables and all(sd["fileformat"] == "jpg" for sd in tables)
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    for counts in (run.merged.counts, manifest["counts"]):
        assert "sample_data.LIDAR_TOP" not in counts
        assert {k: v for k, v in counts.items() if k.startswith("sample_data.CAM_")} == cameras
        assert counts["sample_data"] == sum(cameras.values())
    assert run.merged.annotations == full_run.merged.annotations


def test_without_sweeps_a_key_frame_interval_keeps_only_key_frames(synth_project, tmp_path):
    run = export(synth_project, tmp_path / "ds", export_options={"key_frame_interval": 5})
    nusc = NuScenes(VERSION, str(tmp_path / "ds"), verbose=False)
    assert len(nusc.sample) == run.discovered.n_frames == 4
    assert all(sd["is_key_frame"] for sd in nusc.sample_data)
    assert not (tmp_path / "ds" / "sweeps").exists() or not list((tmp_path / "ds" / "sweeps").rglob("*.*"))


def test_nuscenes_refuses_to_leave_out_ego_poses_and_says_why(synth_project, tmp_path):
    """include_ego_pose false is a 422 (check_request) for nuScenes: ego_pose is a mandatory table."""
    from stages.errors import RequestError
    from stages.formats.nuscenes import NuScenesFormat

    request = ExportRequest.model_validate({"export_options": {"include_ego_pose": False}})
    with pytest.raises(RequestError, match="nuScenes cannot leave out ego poses") as err:
        NuScenesFormat.check_request(request)
    assert err.value.field == "export_options.include_ego_pose"
    with pytest.raises(RequestError, match="every sample_data links to an ego_pose row"):
        export(synth_project, tmp_path / "ds", export_options={"include_ego_pose": False})
    assert not (tmp_path / "ds").exists()
    NuScenesFormat.check_request(ExportRequest())  # the default (true) is accepted


@pytest.mark.parametrize("archive", ["zip", "tar.gz", "tar.zst", "none"])
def test_each_archive_format_holds_the_dataset_and_its_manifest(small_project, tmp_path, archive):
    dest = tmp_path / ("export" + {"zip": ".zip", "tar.gz": ".tar.gz", "tar.zst": ".tar.zst", "none": ""}[archive])
    request = ExportRequest.model_validate({"export_options": {"output_format": archive, "compress_output": True}})
    run = run_serial(small_project, dest, request)
    out = tmp_path / "unpacked"
    if archive == "zip":
        zipfile.ZipFile(dest).extractall(out)
    elif archive == "tar.gz":
        with tarfile.open(dest, "r:gz") as tf:
            tf.extractall(out, filter="data")
    elif archive == "tar.zst":
        import zstandard

        with open(dest, "rb") as raw, zstandard.ZstdDecompressor().stream_reader(raw) as zr:
            with tarfile.open(fileobj=zr, mode="r|") as tf:
                tf.extractall(out, filter="data")
    else:
        out = dest
    manifest = json.loads((out / "manifest.json").read_text())
    import hashlib

    on_disk = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()} - {"manifest.json"}
    assert on_disk == set(manifest["files"])
    for rel, meta in manifest["files"].items():
        assert hashlib.sha256((out / rel).read_bytes()).hexdigest() == meta["sha256"]
    assert manifest["counts"]["annotations"] == run.merged.annotations
    assert run.packed.archive_format == archive
    NuScenes(VERSION, str(out), verbose=False)


def test_an_unexpected_error_in_a_frame_still_names_the_frame(small_project, tmp_path, monkeypatch):
    """Not every failure is a known input error; the job's report must still say which frame it hit."""
    from stages.formats.nuscenes import NuScenesFormat
    from pipeline.tasks import error_details

    frames = list(label_files(small_project))

    def broken(self, frame):
        if frame.ref.frame_id == frames[3]:
            raise KeyError("calibration")
        return original(self, frame)

    original = NuScenesFormat.convert_frame
    monkeypatch.setattr(NuScenesFormat, "convert_frame", broken)
    with pytest.raises(KeyError) as info:
        export(small_project, tmp_path / "ds")
    details = error_details(info.value, "convert", 0)
    assert details["frame"] == frames[3] and details["error"] == "KeyError"
