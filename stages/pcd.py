"""Reading and writing PCD point-cloud files (PCD v0.7; v0.6 / ".7" headers tolerated).

Conventions:

* Multi-byte values are little-endian, as written by PCL on every common platform.
* Coordinates are whatever the file holds -- for NextPoints / SUSTechPOINTS data, metres in the lidar frame.
* ``DATA ascii``: one point per line, values separated by whitespace, in FIELDS order (a field with
  COUNT c contributes c values).
* ``DATA binary``: points are packed records of ``sum(SIZE*COUNT)`` bytes, in FIELDS order. Bytes after the
  last point are ignored, unless the data holds exactly a whole number of bytes more per point than the header's
  record: then the header does not describe the records, and that is an error.
* ``DATA binary_compressed``: uint32 compressed size, uint32 uncompressed size, then LZF data that
  decompresses to a column-major layout: all N values of field 1 (``SIZE*COUNT*N`` bytes, the COUNT values
  of one point contiguous, as PCL writes them), then field 2, ...
* Fields named ``_`` are padding: they occupy bytes but are not returned. A field with COUNT 0 occupies no
  bytes, as the spec (and PCL's reader) has it.

A binary header with a COUNT 0 field: the record layout is checked against the data (``_binary_layout``). A
writer only emits ``_`` for a gap between fields, so a gap of 0 bytes shows that its padding counts were not
the record's real gaps. The real SUSTechPOINTS files are such a case: their header (``FIELDS x y z _ intensity
_ timestamp _ ring _``, ``SIZE 4 4 4 1 4 1 8 1 2 1``, ``COUNT 1 1 1 4 1 0 1 6 1 12``) declares a 48-byte record,
and the records are 48 bytes long (the files end with 3,848 zero bytes), but the padding around timestamp and
ring is misplaced. The header puts them at bytes 20 and 34: there the timestamp decodes as denormals and
±1e308 and the ring as a constant 58,792. The bytes hold them at 24 and 32, where a C compiler places them:
timestamps within one 0.1 s sweep, rings 0..39. So the data decide between the header's layout and the
*aligned* one: the header's offsets up to the COUNT 0 field, then each real field at the next multiple of its
SIZE, padding dropped. A layout loses when a float field it moves decodes to absurd values. Failing that, the
header's layout wins when the bytes it calls padding are the same in every point, then the aligned one on
the same test. When nothing decides, the fields the two place differently are untrusted: ``read_pcd`` leaves
them out and lists them in ``header["untrusted"]``; ``read_points_xyzir`` raises if x, y, z or intensity is one
of them, and reads ring as 0. ``header["layout"]`` says which layout was used ("header" or "aligned").

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
    width/height/points (int), viewpoint (list[float], 7 values: tx ty tz qw qx qy qz), data (str),
    layout ("header" or "aligned") and untrusted (list[str]): how the binary records were laid out (module
    docstring).

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
              "points": points, "data": data, "layout": "header", "untrusted": []}
    return header, pos


def _layout(header: dict):
    """Yield (name, numpy dtype of one value, count, byte offset within a point) for every non-empty field, at
    the offsets the header implies (a COUNT 0 field takes no bytes)."""
    offset = 0
    for i, (name, t, s, c) in enumerate(zip(header["fields"], header["type"], header["size"], header["count"])):
        if c > 0:
            yield (name if name != "_" else f"_ {i}"), np.dtype(f"<{_NUMPY_KIND[t]}{s}"), c, offset
        offset += s * c


def _point_size(header: dict) -> int:
    return sum(s * c for s, c in zip(header["size"], header["count"]))


def _wanted(name: str, want) -> bool:
    return not name.startswith("_ ") and (want is None or name in want)


def _aligned_layout(header: dict) -> list[tuple] | None:
    """The header's layout up to its first COUNT 0 field, then every real field at the next multiple of its SIZE
    (C struct alignment), padding fields dropped; None when that does not fit in the header's record."""
    out, offset, after_zero = [], 0, False
    for i, (name, t, s, c) in enumerate(zip(header["fields"], header["type"], header["size"], header["count"])):
        after_zero = after_zero or c == 0
        if not after_zero:
            out.append((name if name != "_" else f"_ {i}", np.dtype(f"<{_NUMPY_KIND[t]}{s}"), c, offset))
            offset += s * c
        elif name != "_" and c > 0:
            offset = -(-offset // s) * s
            out.append((name, np.dtype(f"<{_NUMPY_KIND[t]}{s}"), c, offset))
            offset += s * c
    return out if offset <= _point_size(header) else None


def _padding_mask(layout: list[tuple], step: int) -> np.ndarray:
    """True for the bytes of a record that no real (non-padding) field of ``layout`` covers."""
    mask = np.ones(step, dtype=bool)
    for name, dt, c, off in layout:
        if not name.startswith("_ "):
            mask[off:off + dt.itemsize * c] = False
    return mask


def _implausible_floats(records: np.ndarray, layout: list[tuple], names: set[str]) -> bool:
    """Whether a floating-point field of ``names`` decodes, in some point, to a value no point cloud holds:
    infinite, or non-zero with a magnitude below 1e-30 or above 1e30 (metres, seconds and intensities never
    are; bytes read at the wrong offset mostly are). NaN is allowed: PCL marks invalid points with it."""
    step = records.shape[1]
    for name, dt, c, off in layout:
        if name in names and dt.kind == "f":
            view = np.dtype({"names": ["v"], "formats": [(dt, (c,))], "offsets": [off], "itemsize": step})
            values = np.abs(records.reshape(-1).view(view)["v"])
            with np.errstate(invalid="ignore"):
                if (np.isinf(values) | ((values > 0) & (values < 1e-30)) | (values > 1e30)).any():
                    return True
    return False


def _binary_layout(header: dict, buf, start: int) -> list[tuple]:
    """The record layout of binary data: the header's, unless it has a COUNT 0 field and the data refute it.

    Two candidates: the header's layout and the aligned one (``_aligned_layout``). When they place every real
    field alike there is nothing to decide. Otherwise, in one vectorised pass over the records:
    1. a candidate is refuted when a floating-point field it places differently decodes to implausible values
       (``_implausible_floats``); if exactly one is refuted, the other is used;
    2. else the header's layout is used if every byte it calls padding is the same in every point, else the
       aligned one on that condition;
    3. else the fields placed differently are untrusted: left out, and listed in ``header["untrusted"]``.
    Sets ``header["layout"]`` ("header" / "aligned") and ``header["untrusted"]``."""
    spec = list(_layout(header))
    header["layout"], header["untrusted"] = "header", []
    n, step = header["points"], _point_size(header)
    if 0 not in header["count"] or n < 2:
        return spec
    aligned = _aligned_layout(header)
    spec_at = {name: off for name, _, _, off in spec if not name.startswith("_ ")}
    moved = {name for name, _, _, off in aligned or () if not name.startswith("_ ") and spec_at[name] != off}
    if aligned is None or not moved:
        return spec
    records = np.frombuffer(buf, dtype=np.uint8, count=n * step, offset=start).reshape(n, step)
    refuted = [_implausible_floats(records, spec, moved), _implausible_floats(records, aligned, moved)]
    if refuted == [False, True]:
        return spec
    if refuted == [True, False]:
        header["layout"] = "aligned"
        return aligned
    if refuted == [False, False]:
        varies = (records != records[0]).any(axis=0)  # byte positions that are not the same in every point
        if not varies[_padding_mask(spec, step)].any():
            return spec
        if not varies[_padding_mask(aligned, step)].any():
            header["layout"] = "aligned"
            return aligned
    header["untrusted"] = [name for name in spec_at if name in moved]
    return [f for f in spec if f[0] not in moved]


def _read_binary(buf, start, header, want, path) -> dict[str, np.ndarray]:
    n, step = header["points"], _point_size(header)
    need, have = n * step, max(len(buf) - start, 0)
    if have < need:
        raise _fail(f"truncated: expected {need} bytes of point data, found {have}", path)
    if n > 1 and have > need and have % n == 0 and (have - need) >= n:
        raise _fail(f"record size mismatch: the data holds exactly {have // n} bytes for each of the {n} points, "
                    f"the header's fields (SIZE x COUNT) add up to {step}", path)
    cols = [(name, dt if c == 1 else (dt, (c,)), off) for name, dt, c, off in _binary_layout(header, buf, start)
            if _wanted(name, want)]
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

    x/y/z must be present; intensity and ring are 0 when the file lacks them. Ring is also 0 when the data
    leave its position in the record uncertain (``header["untrusted"]``, see the module docstring). For x, y,
    z or intensity that is a ``PointCloudError`` instead. Other fields (timestamps, padding) are not decoded.
    """
    header, cols = _read(path, want=set(_XYZIR))
    uncertain = [k for k in ("x", "y", "z", "intensity") if k in header.get("untrusted", ())]
    if uncertain:
        raise _fail(f"cannot tell where {'/'.join(uncertain)} sit in each record: the header "
                    f"(FIELDS {' '.join(header['fields'])}, COUNT {' '.join(map(str, header['count']))}) has "
                    "a COUNT 0 padding field and bytes it calls padding differ between points", path)
    missing = [k for k in ("x", "y", "z") if k not in cols]
    if missing:
        raise _fail(f"point cloud has no {'/'.join(missing)} field (FIELDS {' '.join(header['fields'])})", path)
    out = np.zeros((header["points"], 5), dtype=np.float32)
    for i, name in enumerate(_XYZIR):
        if name in cols:
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
