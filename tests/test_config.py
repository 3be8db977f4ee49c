"""YAML pipeline configs (``pipeline/config.py``): one schema (the export section is the API's request model),
merged over ``configs/pipeline.yaml``, and every mistake named by file, line and key path before anything runs.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.config import ConfigError, PipelineConfig, load_config
from pipeline.retry_policy import RetryPolicy
from pipeline.settings import Settings

REPO_ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = REPO_ROOT / "configs" / "examples"


def write(tmp_path: Path, text: str, name: str = "export.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def problems(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    return [str(p) for p in caught.value.problems]


def test_a_misspelled_key_is_an_error_naming_file_line_and_path(tmp_path):
    path = write(tmp_path, """\
project:
  name: my_project
export:
  export_options:
    compres_output: false
""")
    assert problems(path) == [f"{path}:5: export.export_options.compres_output: unknown key "
                              "(did you mean 'compress_output'?)"]


def test_every_ill_typed_or_unknown_key_is_reported_at_once(tmp_path):
    path = write(tmp_path, """\
project: {name: my_project}
batch_size: zero
queue: medium
retry:
  max_retrys: 2
export:
  annotation_filter: {min_points: -1}
  start_frame: [1, 2]
mappings:
  categories: {car: vehicle.car}
""")
    found = problems(path)
    assert [p.split(": ")[0:2] for p in found] == [
        [f"{path}:2", "batch_size"], [f"{path}:3", "queue"], [f"{path}:5", "retry.max_retrys"],
        [f"{path}:7", "export.annotation_filter.min_points"], [f"{path}:8", "export.start_frame"]]
    assert "did you mean 'max_retries'" in found[2]


def test_a_config_without_a_project_or_with_a_bad_mapping_override_is_refused(tmp_path):
    assert problems(write(tmp_path, "export: {}\n")) == [f"{tmp_path / 'export.yaml'}:1: project: required key missing"]
    assert "give the project's name" in problems(write(tmp_path, "project: {}\n"))[0]

    path = write(tmp_path, """\
project: {name: p}
mappings:
  attributes:
    moving_sped_mps: 1.0
""")
    [problem] = problems(path)
    assert problem.startswith(f"{path}:4: mappings.attributes.moving_sped_mps: unknown key")
    path = write(tmp_path, """\
project: {name: p}
export: {export_format: kitti}
mappings:
  classes: {car: Automobile}
""")
    [problem] = problems(path)
    assert problem.startswith(f"{path}:4: mappings.classes.car: kitti mapping: type 'car' maps to 'Automobile'")


def test_priority_is_given_once_and_lands_in_the_request(tmp_path):
    config = load_config(write(tmp_path, "project: {name: p}\npriority: 9\n"))
    assert config.export.priority == 9
    [problem] = problems(write(tmp_path, "project: {name: p}\npriority: 9\nexport: {priority: 2}\n"))
    assert "priority is given both at the top level and in export" in problem


def test_the_shipped_examples_load_and_inherit_the_defaults(monkeypatch):
    nuscenes = load_config(EXAMPLES / "nuscenes.yaml")
    kitti = load_config(EXAMPLES / "kitti.yaml")
    assert nuscenes.project.name == kitti.project.name == "my_project"
    assert nuscenes.export.export_format.value == "nuscenes_v1.0" and kitti.export.export_format.value == "kitti"
    assert kitti.queue == "auto" and kitti.queue_name is None  # from configs/pipeline.yaml
    settings = Settings(NPX_MAX_RETRIES=7, NPX_RETRY_BACKOFF=0.5)
    # kitti.yaml sets no retry policy: configs/pipeline.yaml's nulls mean the service-wide NPX_* values
    assert kitti.retry_policy(settings) == RetryPolicy(7, 0.5, settings.retry_backoff_max, True)
    assert nuscenes.retry_policy(settings) == RetryPolicy(3, 2.0, 60.0, True)


def test_a_relative_project_path_is_resolved_against_the_data_root(tmp_path):
    from pipeline.errors import ProjectNotFound
    from stages.synth import generate_project

    generate_project(tmp_path / "data" / "drives", "d1", 2, cameras=1)
    by_path = PipelineConfig.model_validate({"project": {"path": "drives/d1"}})
    assert by_path.project.locate(tmp_path / "data") == ("d1", (tmp_path / "data" / "drives" / "d1").resolve())
    inner = PipelineConfig.model_validate({"project": {"path": str(tmp_path / "data/drives/d1/nextpoints")}})
    assert inner.project.locate(Path("/nowhere"))[0] == "d1"
    with pytest.raises(ProjectNotFound):
        PipelineConfig.model_validate({"project": {"name": "d1"}}).project.locate(tmp_path / "data")


def test_mapping_overrides_are_merged_over_the_mapping_file_and_stored_in_the_plan(small_project, tmp_path):
    """discover (stages/, no Celery) merges the overrides; every batch reads them from plan.json."""
    from stages.discover import discover
    from stages.mappings import load_mapping
    from stages.request import ExportRequest

    overrides = {"categories": {"car": "vehicle.emergency.police", "hovercraft": "vehicle.car"},
                 "attributes": {"moving_speed_mps": 0.7}}
    discover(small_project, ExportRequest(), tmp_path / "staging", export_id="e", mapping_overrides=overrides)
    stored = json.loads((tmp_path / "staging" / "plan.json").read_text())["mappings"]
    base = load_mapping("nuscenes")
    assert stored["categories"] == {**base["categories"], **overrides["categories"]}
    assert stored["attributes"] == {**base["attributes"], "moving_speed_mps": 0.7}
    assert stored["channels"] == base["channels"]


# --- sections checked by their owners (source layouts, output formats), at load time all the same ----------
def test_a_misspelled_source_setting_is_refused_at_load_time_naming_its_path_and_the_right_key(tmp_path):
    """No project folder yet (the demo project is generated later): the key must be a setting of some layout."""
    path = write(tmp_path, """\
project:
  name: not_generated_yet
  source_settings:
    lidar_axis: x_left_y_back
""")
    assert problems(path) == [f"{path}:4: project.source_settings.lidar_axis: unknown key (did you mean "
                              "'lidar_axes'?): not a setting of any layout (nextpoints, sustech)"]


def test_source_settings_are_checked_by_the_forced_layouts_reader_key_by_key(tmp_path):
    path = write(tmp_path, """\
project:
  name: p
  layout: sustech
  source_settings:
    lidar_height: 1.8
    main_lidar: lidar
    frame_rate_hz: -10
""")
    found = problems(path)
    assert [p.split(": ")[0:2] for p in found] == [[f"{path}:6", "project.source_settings.main_lidar"],
                                                  [f"{path}:7", "project.source_settings.frame_rate_hz"]]
    assert "not a setting of layout sustech" in found[0]
    assert "frame_rate_hz must be positive" in found[1]  # the reader's own reason


def test_source_settings_are_checked_against_the_layout_detected_in_the_project_folder(small_project, tmp_path):
    """``small_project`` is a NextPoints project: SUSTechPOINTS' lidar_axes is no setting of it."""
    path = write(tmp_path, f"project:\n  path: {small_project}\n  source_settings: {{lidar_axes: x_forward}}\n")
    [problem] = problems(path)
    assert problem.startswith(f"{path}:3: project.source_settings.lidar_axes: unknown key: "
                              "not a setting of layout nextpoints (known: main_lidar)")
    data_root = small_project.parents[1]
    relative = write(tmp_path, f"project:\n  path: {small_project.parent.name}\n"
                               "  source_settings: {lidar_axes: x_forward}\n")
    with pytest.raises(ConfigError, match="not a setting of layout nextpoints"):
        load_config(relative, data_root=data_root)
    ok = write(tmp_path, f"project:\n  path: {small_project}\n  source_settings: {{main_lidar: lidar-fusion}}\n")
    assert load_config(ok).project.source_settings == {"main_lidar": "lidar-fusion"}


def test_a_request_the_format_cannot_honour_is_refused_at_load_time_at_its_field(tmp_path):
    """The format's own request check (the one the API answers 422 with), at the field's line."""
    path = write(tmp_path, """\
project: {name: p}
export:
  export_format: nuscenes_v1.0
  coordinate_system: lidar
""")
    [problem] = problems(path)
    assert problem.startswith(f"{path}:4: export.coordinate_system: nuScenes stores boxes in the global frame")
    path = write(tmp_path, """\
project: {name: p}
export:
  export_format: kitti
  coordinate_system: lidar
  export_options:
    key_frame_interval: 5
    include_sweeps: true
""")
    [problem] = problems(path)
    assert problem.startswith(f"{path}:7: export.export_options.include_sweeps: KITTI 3D object has no sweeps")


def test_a_bad_mapping_value_is_named_at_its_own_path_and_line(tmp_path):
    """The format's mapping check says what is wrong; the config says where."""
    path = write(tmp_path, """\
project: {name: p}
mappings:
  categories:
    car: vehicle.car
    van: vehicle.spaceship
  attributes:
    moving_speed_mps: 0.5
    vehicle_categories: [vehicle.car, vehicle.boat]
""")
    found = problems(path)
    assert [p.split(": ")[0:2] for p in found] == [[f"{path}:5", "mappings.categories.van"],
                                                  [f"{path}:8", "mappings.attributes.vehicle_categories"]]
    assert "'vehicle.spaceship', not an official nuScenes category" in found[0]
    assert "unknown categories ['vehicle.boat']" in found[1]
