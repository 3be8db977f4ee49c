"""How floats are written to the nuScenes tables: rounded to ``coordinate_precision`` decimals (None: kept as they
are, Python's shortest round-trip repr), quaternions to at least ``MIN_QUATERNION_DECIMALS``.

Its own module because the convert stage needs it too (to count points in the boxes as they will be read back,
``lidar_pts.py``) and must not import ``tables.py`` (pyarrow.compute).
"""
from __future__ import annotations

from typing import Any

MIN_QUATERNION_DECIMALS = 9  # rounding a quaternion coarser than this visibly breaks its unit length


def _round_floats(value: Any, decimals: int) -> Any:
    if isinstance(value, float):
        return round(value, decimals)
    if isinstance(value, list):
        return [_round_floats(v, decimals) for v in value]
    return value


def round_row(row: dict[str, Any], decimals: int | None) -> dict[str, Any]:
    """Round every float of ``row`` to ``decimals`` (quaternions to at least MIN_QUATERNION_DECIMALS), in place."""
    if decimals is not None:
        for key, value in row.items():
            if isinstance(value, (float, list)):
                places = max(decimals, MIN_QUATERNION_DECIMALS) if key == "rotation" else decimals
                row[key] = _round_floats(value, places)
    return row
