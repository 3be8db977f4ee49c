"""Reading and writing PCD point-cloud files (PCD v0.7; v0.6 / ".7" headers tolerated).

Conventions:

* Multi-byte values are little-endian, as written by PCL on every common platform.
* Coordinates are whatever the file holds -- for NextPoints / SUSTechPOINTS data, metres in the lidar frame.
* ``DATA ascii``: one point per line, values separated by whitespace, in FIELDS order (a field with
  COUNT c contributes c values).
* ``DATA binary``: points are packed records of ``sum(SIZE*COUNT)`` bytes, in FIELDS order. Bytes after the
  last point are ignored.
* ``DATA binary_compressed``: uint32 compressed size, uint32 uncompressed size, then LZF data that
  decompresses to a column-major layout: all N values of field 1 (``SIZE*COUNT*N`` bytes, the COUNT values
  of one point contiguous, as PCL writes them), then field 2, ...
* Fields named ``_`` are padding: they occupy bytes but are not returned. A field with COUNT 0 occupies no
  bytes (SUSTechPOINTS files have one).

Every problem raises :class:`stages.errors.PointCloudError` naming the file, except a file that exists but
cannot be read just now (permission, I/O error): :class:`stages.errors.InputUnavailable`, which the pipeline
retries.
"""
from __future__ import annotations

import io
import struct
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import lzf
import numpy as np

from stages.errors import PointCloudError, unreadable

__all__ = ["PcdCloud", "read_pcd", "read_points_xyzir", "write_pcd"]

_NUMPY_KIND = {"F": "f", "U": "u", "I": "i"}
_ENCODINGS = ("ascii", "binary", "binary_compressed")
_XYZIR = ("x", "y", "z", "intensity", "ring")


@dataclass
class PcdCloud:
    """A parsed PCD file.

    ``header`` keys: version (str), fields (list[str]), size/count (list[int]), type (list[str]),
    width/height/points (int), viewpoint (list[float], 7 values: tx ty tz qw qx qy qz), data (str).
    ``fields`` maps each non-padding field with COUNT >= 1 to an array of shape (N,) or (N, COUNT),
    dtype as declared by SIZE/TYPE.
    """

    header: dict
    fields: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def num_points(self) -> int:
        return int(self.header["points"])


def _fail(problem: str, path) -> PointCloudError:
    return PointCloudError(problem, path=path)


def _load(path) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise _fail("file not found", path) from None
    except OSError as exc:  # permission, I/O error, a folder in its place: may pass, so the task is retried
        raise unreadable(exc, path) from None


def _parse_header(buf: bytes, path) -> tuple[dict, int]:
    """Parse the text header; return (header dict, byte offset of the point data)."""
    raw: dict[str, list[str]] = {}
    pos = 0
    while True:
        end = buf.find(b"\n", pos)
        if end < 0:
            if pos >= len(buf):
                raise _fail("header has no DATA line", path)
            end = len(buf)
        line = buf[pos:end].decode("ascii", "replace").strip()
        pos = end + 1
        if not line or line.startswith("#"):
            continue
        key, *values = line.split()
        key = key.upper()
        raw[key] = values
        if key == "DATA":
            break
    for key in ("FIELDS", "POINTS"):
        if key not in raw:
            raise _fail(f"bad header: missing {key}", path)
    names = raw["FIELDS"]
    if not names:
        raise _fail("bad header: FIELDS is empty", path)
    data = (raw["DATA"] or [""])[0].lower()
    if data not in _ENCODINGS:
        raise _fail(f"unknown DATA type {data!r} (expected ascii, binary or binary_compressed)", path)
    try:
        size = [int(v) for v in raw.get("SIZE", [])]
        count = [int(v) for v in raw["COUNT"]] if "COUNT" in raw else [1] * len(names)
        points = int(raw["POINTS"][0])
        width = int(raw["WIDTH"][0]) if raw.get("WIDTH") else points
        height = int(raw["HEIGHT"][0]) if raw.get("HEIGHT") else 1
        viewpoint = [float(v) for v in raw.get("VIEWPOINT", [0, 0, 0, 1, 0, 0, 0])]
    except (ValueError, IndexError):
        raise _fail("bad header: non-numeric SIZE/COUNT/WIDTH/HEIGHT/POINTS/VIEWPOINT", path) from None
    types = [t.upper() for t in raw.get("TYPE", [])]
    if not (len(size) == len(types) == len(count) == len(names)):
        raise _fail(f"bad header: FIELDS/SIZE/TYPE/COUNT have different lengths "
                    f"({len(names)}/{len(size)}/{len(types)}/{len(count)})", path)
    if points < 0 or min(count) < 0:
        raise _fail("bad header: negative POINTS or COUNT", path)
    for name, t, s in zip(names, types, size):
        if t not in _NUMPY_KIND or s not in ((2, 4, 8) if t == "F" else (1, 2, 4, 8)):
            raise _fail(f"bad header: field {name!r} has unsupported TYPE {t} SIZE {s}", path)
    real = [n for n, c in zip(names, count) if n != "_" and c > 0]
    if len(set(real)) != len(real):
        raise _fail("bad header: duplicate field names", path)
    header = {"version": (raw.get("VERSION") or ["0.7"])[0], "fields": names, "size": size, "type": types,
              "count": count, "width": width, "height": height, "viewpoint": viewpoint,
              "points": points, "data": data}
    return header, pos


def _layout(header: dict):
    """Yield (name, numpy dtype of one value, count, byte offset within a point) for every non-empty field."""
    offset = 0
    for i, (name, t, s, c) in enumerate(zip(header["fields"], header["type"], header["size"], header["count"])):
        if c > 0:
            yield (name if name != "_" else f"_ {i}"), np.dtype(f"<{_NUMPY_KIND[t]}{s}"), c, offset
        offset += s * c


def _point_size(header: dict) -> int:
    return sum(s * c for s, c in zip(header["size"], header["count"]))


def _wanted(name: str, want) -> bool:
    return not name.startswith("_ ") and (want is None or name in want)


def _read_binary(buf, start, header, want, path) -> dict[str, np.ndarray]:
    n, step = header["points"], _point_size(header)
    need, have = n * step, max(len(buf) - start, 0)
    if have < need:
        raise _fail(f"truncated: expected {need} bytes of point data, found {have}", path)
    cols = [(name, dt if c == 1 else (dt, (c,)), off) for name, dt, c, off in _layout(header) if _wanted(name, want)]
    if not cols:
        return {}
    rec = np.dtype({"names": [c[0] for c in cols], "formats": [c[1] for c in cols],
                    "offsets": [c[2] for c in cols], "itemsize": step})
    arr = np.frombuffer(buf, dtype=rec, count=n, offset=start)
    return {name: arr[name] for name, _, _ in cols}


def _read_compressed(buf, start, header, want, path) -> dict[str, np.ndarray]:
    n, step = header["points"], _point_size(header)
    if n == 0 and len(buf) - start < 8:
        return {name: np.zeros((0,) if c == 1 else (0, c), dt) for name, dt, c, _ in _layout(header) if _wanted(name, want)}
    if len(buf) - start < 8:
        raise _fail(f"truncated: expected 8 bytes of compressed-size header, found {max(len(buf) - start, 0)}", path)
    csize, usize = struct.unpack_from("<II", buf, start)
    payload = buf[start + 8:start + 8 + csize]
    if len(payload) < csize:
        raise _fail(f"truncated: expected {csize} bytes of compressed point data, found {len(payload)}", path)
    if usize != n * step:
        raise _fail(f"garbled: uncompressed size {usize} does not match POINTS {n} x point size {step}", path)
    try:
        raw = lzf.decompress(payload, usize) if usize else b""
    except ValueError as exc:
        raise _fail(f"garbled: LZF decompression failed ({exc})", path) from None
    if raw is None or len(raw) != usize:
        raise _fail(f"garbled: LZF data does not decompress to {usize} bytes", path)
    out, offset = {}, 0
    for name, dt, c, _ in _layout(header):
        nbytes = n * c * dt.itemsize
        if _wanted(name, want):
            col = np.frombuffer(raw, dtype=dt, count=n * c, offset=offset)
            out[name] = col if c == 1 else col.reshape(n, c)
        offset += nbytes
    return out


def _read_ascii(buf, start, header, want, path) -> dict[str, np.ndarray]:
    n = header["points"]
    layout = list(_layout(header))
    ncols = sum(c for _, _, c, _ in layout)
    # One column per value; parse integers as integers (exact for 64-bit), floats straight to their type.
    cols = [(f"{name}#{k}", dt) for name, dt, c, _ in layout for k in range(c)]
    text = buf[start:].decode("ascii", "replace")
    if n == 0 or ncols == 0:
        rows = np.zeros(n, dtype=cols) if cols else None
    else:
        try:
            with warnings.catch_warnings():  # numpy warns that blank lines do not count towards max_rows
                warnings.simplefilter("ignore", UserWarning)
                rows = np.loadtxt(io.StringIO(text), dtype=np.dtype(cols), max_rows=n, ndmin=1, comments=None)
        except ValueError as exc:
            msg = str(exc).split(";")[0].rstrip(".")
            if "columns" in msg and "convert" not in msg:
                raise _fail(f"ascii row with the wrong number of values (expected {ncols} per row): {msg}", path) from None
            raise _fail(f"ascii data has a non-numeric value: {msg}", path) from None
        if rows.shape[0] < n:
            raise _fail(f"truncated: expected {n} ascii rows of point data, found {rows.shape[0]}", path)
    out = {}
    for name, dt, c, _ in layout:
        if _wanted(name, want):
            parts = [rows[f"{name}#{k}"] for k in range(c)]
            out[name] = parts[0] if c == 1 else np.stack(parts, axis=1)
    return out


_READERS = {"ascii": _read_ascii, "binary": _read_binary, "binary_compressed": _read_compressed}


def _read(path, want=None) -> tuple[dict, dict[str, np.ndarray]]:
    buf = _load(path)
    header, start = _parse_header(buf, path)
    return header, _READERS[header["data"]](buf, start, header, want, path)


def read_pcd(path) -> PcdCloud:
    """Read a whole PCD file. Arrays are fresh, writable, C-contiguous copies."""
    header, cols = _read(path)
    return PcdCloud(header, {k: v if v.flags.writeable and v.flags.c_contiguous else v.copy()
                             for k, v in cols.items()})


def read_points_xyzir(path) -> np.ndarray:
    """Read the points of a PCD file as an (N, 5) float32 array: x, y, z, intensity, ring.

    x/y/z must be present; intensity and ring are 0 when the file lacks them. Other fields
    (timestamps, padding) are not decoded.
    """
    header, cols = _read(path, want=set(_XYZIR))
    missing = [k for k in ("x", "y", "z") if k not in cols]
    if missing:
        raise _fail(f"point cloud has no {'/'.join(missing)} field (FIELDS {' '.join(header['fields'])})", path)
    out = np.zeros((header["points"], 5), dtype=np.float32)
    # Some PCL writers emit a padding field with COUNT 0 where the real struct has alignment padding; every
    # field declared after it sits at a different offset than the header says (the real SUSTechPOINTS files:
    # ring decodes as a constant ~58790). Such fields are not trusted: they read as 0, like an absent field.
    zero = [i for i, c in enumerate(header["count"]) if c == 0]
    untrusted = set(header["fields"][zero[0] + 1:]) if zero else set()
    for i, name in enumerate(_XYZIR):
        if name in cols and name not in untrusted:
            col = cols[name]
            out[:, i] = col if col.ndim == 1 else col[:, 0]
    return out


def _pcd_type(arr: np.ndarray, name: str) -> tuple[str, int]:
    kind = {"f": "F", "u": "U", "i": "I", "b": "U"}.get(arr.dtype.kind)
    if kind is None or (kind == "F" and arr.dtype.itemsize not in (4, 8)):
        raise ValueError(f"write_pcd: field {name!r} has unsupported dtype {arr.dtype}")
    return kind, arr.dtype.itemsize


def write_pcd(path, fields: dict[str, np.ndarray], data: str = "binary") -> None:
    """Write a PCD v0.7 file (unorganized: HEIGHT 1, identity VIEWPOINT).

    ``fields`` maps names to arrays of shape (N,) or (N, COUNT); PCD TYPE/SIZE come from the dtypes
    (float32 -> F 4, float64 -> F 8, uint8/16/32/64 -> U, int8/16/32/64 -> I, bool -> U 1).
    ``data`` is "ascii", "binary" or "binary_compressed" (LZF). Floats are written to ascii with enough
    digits to read back bit-exact.
    """
    if data not in _ENCODINGS:
        raise ValueError(f"write_pcd: unknown data encoding {data!r}")
    if not fields:
        raise ValueError("write_pcd: no fields")
    arrays = {k: np.asarray(v) for k, v in fields.items()}
    arrays = {k: (v.astype(np.uint8) if v.dtype.kind == "b" else v) for k, v in arrays.items()}
    n = len(next(iter(arrays.values())))
    specs = []
    for name, arr in arrays.items():
        if arr.ndim not in (1, 2) or arr.shape[0] != n:
            raise ValueError(f"write_pcd: field {name!r} has shape {arr.shape}, expected ({n},) or ({n}, count)")
        t, s = _pcd_type(arr, name)
        specs.append((name, t, s, 1 if arr.ndim == 1 else arr.shape[1]))
    header = "\n".join([
        "# .PCD v0.7 - Point Cloud Data file format", "VERSION 0.7",
        "FIELDS " + " ".join(s[0] for s in specs), "SIZE " + " ".join(str(s[2]) for s in specs),
        "TYPE " + " ".join(s[1] for s in specs), "COUNT " + " ".join(str(s[3]) for s in specs),
        f"WIDTH {n}", "HEIGHT 1", "VIEWPOINT 0 0 0 1 0 0 0", f"POINTS {n}", f"DATA {data}", ""]).encode("ascii")
    le = {name: np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<")) for name, arr in arrays.items()}
    if data == "binary_compressed":
        raw = b"".join(le[name].tobytes() for name, *_ in specs)
        comp = lzf.compress(raw, len(raw) + len(raw) // 16 + 64) if raw else b""
        body = struct.pack("<II", len(comp), len(raw)) + comp
    elif data == "binary":
        rec = np.empty(n, dtype=[(name, le[name].dtype, (c,) if c > 1 or le[name].ndim == 2 else ())
                                 for name, _, _, c in specs])
        for name, *_ in specs:
            rec[name] = le[name]
        body = rec.tobytes()
    else:
        table = np.empty((n, sum(s[3] for s in specs)), dtype=object) if n else None
        fmts, col = [], 0
        for name, t, s, c in specs:
            fmts += [("%.9g" if s == 4 else "%.17g") if t == "F" else "%d"] * c
            if n:
                table[:, col:col + c] = le[name].reshape(n, c)
            col += c
        out = io.StringIO()
        if n:
            np.savetxt(out, table, fmt=fmts, delimiter=" ")
        body = out.getvalue().encode("ascii")
    Path(path).write_bytes(header + body)
