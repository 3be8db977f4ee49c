"""The annotation filter of a request, applied per frame before a format sees the boxes.

Each filter reports how many boxes it removed, so the job can say what happened to every label.
"""
from __future__ import annotations

from collections import Counter

import numpy as np

from stages.model import BoxLabel
from stages.request import AnnotationFilter


def apply_filter(boxes: list[BoxLabel], lidar_pts: np.ndarray, flt: AnnotationFilter
                 ) -> tuple[list[BoxLabel], np.ndarray, Counter]:
    """Keep the boxes that pass ``flt``; returns (boxes, their lidar point counts, removed count per filter).

    ``lidar_pts`` are the points counted in each box from the frame's point cloud. ``min_points`` uses the
    label's own ``num_pts`` when it carries one and the counted points otherwise, so a label without a count is
    never dropped for lacking one.
    """
    removed: Counter = Counter()
    keep = np.ones(len(boxes), dtype=bool)
    types = {t.lower() for t in flt.object_types} if flt.object_types else None
    size = flt.bbox_size_filter
    for i, box in enumerate(boxes):
        if types is not None and box.obj_type.lower() not in types:
            removed["object_types"] += 1
        elif flt.confidence_threshold is not None and box.score is not None and box.score < flt.confidence_threshold:
            removed["confidence_threshold"] += 1
        elif flt.min_points is not None and (box.num_pts if box.num_pts is not None else int(lidar_pts[i])) < flt.min_points:
            removed["min_points"] += 1
        elif size is not None and not _size_ok(box, size):
            removed["bbox_size_filter"] += 1
        else:
            continue
        keep[i] = False
    return [b for b, k in zip(boxes, keep) if k], lidar_pts[keep], removed


def _size_ok(box: BoxLabel, size) -> bool:
    length, width, height = (float(v) for v in box.size)
    for value, lo, hi in ((length, size.min_length, size.max_length), (width, size.min_width, size.max_width),
                          (height, size.min_height, size.max_height)):
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            return False
    return True
