"""What a format pairs a frame with when the frame has no image of a camera: the image of the plan's frame
nearest in time that has one (``missing_image_policy: nearest`` of the nuScenes and KITTI mappings).

The plan lists every frame's images, so each batch decides this alone, the same way every time (idempotent,
no cross-batch state).
"""
from __future__ import annotations

import bisect
from collections import defaultdict

from stages.model import FrameRef, LoadedFrame

MISSING_IMAGE_POLICIES = ("nearest", "skip")


class ImageIndex:
    """The plan's frames that have an image, per source camera channel, for nearest-in-time lookups."""

    def __init__(self, frames: list[FrameRef]):
        per_channel: dict[str, list[tuple[int, int]]] = defaultdict(list)
        for index, ref in enumerate(frames):
            for source, path in ref.cameras.items():
                if path is not None:
                    per_channel[source].append((ref.timestamp_us, index))
        self._times: dict[str, list[int]] = {}
        self._indices: dict[str, list[int]] = {}
        for source, rows in per_channel.items():
            rows.sort()
            self._times[source] = [t for t, _ in rows]
            self._indices[source] = [i for _, i in rows]

    def nearest(self, source: str, timestamp_us: int) -> int | None:
        """Index (in the plan) of the frame nearest in time to ``timestamp_us`` that has an image of ``source``;
        the earlier one on a tie; None when no frame has one."""
        times = self._times.get(source)
        if not times:
            return None
        i = bisect.bisect_left(times, timestamp_us)
        candidates = [k for k in (i - 1, i) if 0 <= k < len(times)]
        best = min(candidates, key=lambda k: (abs(times[k] - timestamp_us), times[k]))
        return self._indices[source][best]


def note_filled_image(frame: LoadedFrame, source: str, filled: str, used: FrameRef) -> None:
    """Say in ``frame``'s warnings that ``filled`` (e.g. "CAM_FRONT of this sample") is the image of camera
    ``source`` of frame ``used``; replaces the convert stage's plain "missing image for camera ..." warning."""
    plain = f"missing image for camera {source}"
    dt_ms = (used.timestamp_us - frame.ref.timestamp_us) / 1000.0
    message = f"{plain}: {filled} uses the image of frame {used.frame_id} ({dt_ms:+.1f} ms), the nearest in time"
    if plain in frame.warnings:
        frame.warnings[frame.warnings.index(plain)] = message
    else:
        frame.warnings.append(message)
