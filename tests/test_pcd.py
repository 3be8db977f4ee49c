"""Behaviour of stages.pcd: reading real SUSTechPOINTS clouds, agreeing with pypcd4, and failing loudly."""
from __future__ import annotations

import struct
from pathlib import Path

import lzf
import numpy as np
import pypcd4
import pytest

from stages.errors import PointCloudError
from stages.pcd import read_pcd, read_points_xyzir, write_pcd

SUSTECH = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "sustech-example"
REAL_PCDS = sorted((SUSTECH / "lidar").glob("*.pcd"))
ENCODINGS = ["ascii", "binary", "binary_compressed"]
PYPCD4_ENCODING = {"ascii": pypcd4.Encoding.ASCII, "binary": pypcd4.Encoding.BINARY,
                   "binary_compressed": pypcd4.Encoding.BINARY_COMPRESSED}


def random_fields(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    """A cloud with mixed field types; values are rounded so that LZF really compresses them."""
    rng = np.random.default_rng(seed)
    return {
        "x": np.round(rng.uniform(-80, 80, n), 2).astype(np.float32),
        "y": rng.uniform(-80, 80, n).astype(np.float32),
        "z": np.round(rng.normal(0, 2, n), 3).astype(np.float32),
        "intensity": rng.integers(0, 256, n).astype(np.float32),
        "ring": rng.integers(0, 64, n).astype(np.uint16),
        "label": rng.integers(-5, 5, n).astype(np.int32),
        "flag": rng.integers(0, 2, n).astype(np.uint8),
        "timestamp": 1.7e9 + np.sort(rng.uniform(0, 0.1, n)),  # float64
    }


def header_of(path: Path) -> str:
    raw = path.read_bytes()
    return raw[: raw.index(b"DATA")].decode()


# --- the real SUSTechPOINTS files -------------------------------------------------------------------------

@pytest.mark.skipif(not REAL_PCDS, reason="shared SUSTechPOINTS example not available")
@pytest.mark.parametrize("path", REAL_PCDS, ids=lambda p: p.name)
def test_real_sustech_pcd_reads_every_point_with_finite_xyz_intensity(path):
    declared = int(next(line.split()[1] for line in header_of(path).splitlines() if line.startswith("POINTS")))
    assert "COUNT 1 1 1 4 1 0 1 6 1 12" in header_of(path)  # the padding / COUNT 0 header shape

    points = read_points_xyzir(path)
    assert points.shape == (declared, 5) and points.dtype == np.float32
    assert declared > 60_000
    assert np.isfinite(points[:, :4]).all()
    assert (points[:, 3] >= 0).all() and (points[:, 3] <= 255).all()  # intensity is 0..255 in these files

    cloud = read_pcd(path)
    assert cloud.num_points == declared
    assert set(cloud.fields) == {"x", "y", "z", "intensity", "timestamp", "ring"}  # no padding fields
    for i, name in enumerate(["x", "y", "z", "intensity"]):
        assert np.array_equal(points[:, i], cloud.fields[name])
    # x/y/z/intensity sit at bytes 0/4/8/16 of each 48-byte record whatever the padding says.
    raw = path.read_bytes()
    start = raw.index(b"DATA binary\n") + len(b"DATA binary\n")
    independent = np.frombuffer(raw, dtype=np.dtype({"names": ["x", "i"], "formats": ["<f4", "<f4"],
                                                     "offsets": [0, 16], "itemsize": 48}),
                                count=declared, offset=start)
    assert np.array_equal(points[:, 0], independent["x"]) and np.array_equal(points[:, 3], independent["i"])


# --- agreement with pypcd4 --------------------------------------------------------------------------------

@pytest.mark.parametrize("encoding", ENCODINGS)
def test_files_written_by_pypcd4_read_exactly_like_pypcd4_reads_them(tmp_path, encoding):
    fields = random_fields(5000, seed=1)
    path = tmp_path / f"pypcd4_{encoding}.pcd"
    cloud = pypcd4.PointCloud.from_points(list(fields.values()), list(fields), [a.dtype for a in fields.values()])
    cloud.save(path, encoding=PYPCD4_ENCODING[encoding])
    assert f"DATA {encoding}" in path.read_text(errors="replace")[:600]

    reference = pypcd4.PointCloud.from_path(path).pc_data
    ours = read_pcd(path)
    assert ours.header["data"] == encoding and ours.num_points == 5000
    assert list(ours.fields) == list(fields)
    for name in fields:
        assert ours.fields[name].dtype == fields[name].dtype
        assert np.array_equal(ours.fields[name], reference[name]), name
        if encoding != "ascii":  # pypcd4 writes ascii floats with 10 decimals: its own parse is the reference
            assert np.array_equal(ours.fields[name], fields[name]), name

    xyzir = read_points_xyzir(path)
    expected = np.stack([reference[k].astype(np.float32) for k in ["x", "y", "z", "intensity", "ring"]], axis=1)
    assert xyzir.dtype == np.float32 and np.array_equal(xyzir, expected)


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_files_written_by_write_pcd_read_back_identically_by_pypcd4_and_by_us(tmp_path, encoding):
    fields = random_fields(3000, seed=2)
    fields["y"][7] = np.float32(1.0) / np.float32(3.0)  # needs all 9 significant digits in ascii
    path = tmp_path / f"ours_{encoding}.pcd"
    write_pcd(path, fields, data=encoding)

    ours = read_pcd(path)
    theirs = pypcd4.PointCloud.from_path(path)
    assert theirs.metadata.data.value == encoding
    assert theirs.metadata.points == ours.num_points == 3000
    for name, original in fields.items():
        assert ours.fields[name].dtype == original.dtype
        assert np.array_equal(ours.fields[name], original), name
        assert np.array_equal(theirs.pc_data[name], original), name


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_write_pcd_records_types_and_round_trips_multi_count_fields(tmp_path, encoding):
    n = 50
    rgb = np.arange(n * 3, dtype=np.uint8).reshape(n, 3)
    fields = {"x": np.linspace(-1, 1, n, dtype=np.float32), "y": np.zeros(n), "z": np.full(n, -7, np.int16),
              "rgb": rgb}
    path = tmp_path / "multi.pcd"
    write_pcd(path, fields, data=encoding)
    header = header_of(path)
    assert "VERSION 0.7" in header
    assert "SIZE 4 8 2 1" in header and "TYPE F F I U" in header and "COUNT 1 1 1 3" in header
    cloud = read_pcd(path)
    assert cloud.fields["rgb"].shape == (n, 3)
    for name, original in fields.items():
        assert np.array_equal(cloud.fields[name], original), name
    # No intensity / ring field: zeros.
    xyzir = read_points_xyzir(path)
    assert np.array_equal(xyzir[:, 0], fields["x"]) and not xyzir[:, 3:].any()


def test_write_pcd_empty_cloud_reads_back_empty(tmp_path):
    for encoding in ENCODINGS:
        path = tmp_path / f"empty_{encoding}.pcd"
        write_pcd(path, {"x": np.zeros(0, np.float32), "y": np.zeros(0, np.float32),
                         "z": np.zeros(0, np.float32)}, data=encoding)
        assert read_points_xyzir(path).shape == (0, 5)


# --- padding and COUNT 0, as in the SUSTechPOINTS header ---------------------------------------------------

SUSTECH_LIKE_HEADER = (
    "# .PCD v0.7 - Point Cloud Data file format\nVERSION 0.7\n"
    "FIELDS x y z _ intensity _ timestamp _ ring _\nSIZE 4 4 4 1 4 1 8 1 2 1\nTYPE F F F U F U F U U U\n"
    "COUNT 1 1 1 4 1 0 1 6 1 12\nWIDTH {n}\nHEIGHT 1\nVIEWPOINT 0 0 0 1 0 0 0\nPOINTS {n}\nDATA {data}\n"
)
# Byte offsets implied by that header: the COUNT 0 padding takes no room, so timestamp starts right after
# intensity (20) and ring after 6 padding bytes (34); the record is 48 bytes.
PADDED = np.dtype({"names": ["x", "y", "z", "intensity", "timestamp", "ring"],
                   "formats": ["<f4", "<f4", "<f4", "<f4", "<f8", "<u2"],
                   "offsets": [0, 4, 8, 16, 20, 34], "itemsize": 48})


def padded_cloud(n: int) -> np.ndarray:
    rng = np.random.default_rng(3)
    rec = np.frombuffer(bytearray([0xAB]) * (48 * n), dtype=PADDED)  # padding bytes hold 0xAB (no copy(): it
    # would leave them uninitialised)
    rec["x"], rec["y"], rec["z"] = (rng.uniform(-50, 50, (3, n)).astype(np.float32))
    rec["intensity"] = rng.integers(0, 256, n)
    rec["timestamp"] = 1818.8 + np.arange(n) * 1e-6
    rec["ring"] = np.arange(n) % 40
    return rec


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_padding_fields_and_count_zero_field_are_skipped(tmp_path, encoding):
    n = 257
    rec = padded_cloud(n)
    if encoding == "binary":
        body = rec.tobytes() + b"\0" * 100  # trailing bytes are tolerated
    elif encoding == "binary_compressed":
        raw = rec.tobytes()
        columns = [raw[i::48] for i in range(48)]  # byte j of every record
        # Column-major per field: a field occupies SIZE*COUNT consecutive bytes of each record.
        spans = [(0, 4), (4, 8), (8, 12), (12, 16), (16, 20), (20, 28), (28, 34), (34, 36), (36, 48)]
        soa = b"".join(np.stack([np.frombuffer(columns[b], np.uint8) for b in range(a, e)], axis=1).tobytes()
                       for a, e in spans)
        comp = lzf.compress(soa, len(soa) * 2)
        body = struct.pack("<II", len(comp), len(soa)) + comp
    else:
        # COUNT 4 / 6 / 12 padding contributes that many values per row, the COUNT 0 field none.
        rows = [f"{x!r} {y!r} {z!r} 1 2 3 4 {i!r} {t!r} " + "9 " * 6 + f"{ring} " + "7 " * 12
                for x, y, z, i, t, ring in rec.tolist()]
        body = ("\n".join(rows) + "\n").encode()
    path = tmp_path / f"padded_{encoding}.pcd"
    path.write_bytes(SUSTECH_LIKE_HEADER.format(n=n, data=encoding).encode() + body)

    cloud = read_pcd(path)
    assert list(cloud.fields) == ["x", "y", "z", "intensity", "timestamp", "ring"]
    for name in PADDED.names:
        assert np.array_equal(cloud.fields[name], rec[name]), name
    assert cloud.header["layout"] == "header" and cloud.header["untrusted"] == []
    xyzir = read_points_xyzir(path)
    expected = np.stack([rec[k].astype(np.float32) for k in ["x", "y", "z", "intensity", "ring"]], axis=1)
    # a file laid out as its header says reads as the header says, ring included
    assert np.array_equal(xyzir, expected) and xyzir[:, 4].any()


def test_real_sustech_ring_and_timestamp_are_read_where_the_bytes_hold_them():
    assert REAL_PCDS
    for path in REAL_PCDS:
        raw = path.read_bytes()
        start = raw.index(b"DATA binary\n") + len(b"DATA binary\n")
        n = read_pcd(path).num_points
        assert (len(raw) - start) // n == 48  # the records are as long as the header says ...
        # ... but timestamp and ring sit at bytes 24 and 32 (C alignment), not at 20 and 34 (the header's padding)
        independent = np.frombuffer(raw, dtype=np.dtype({"names": ["t", "ring"], "formats": ["<f8", "<u2"],
                                                         "offsets": [24, 32], "itemsize": 48}), count=n, offset=start)
        cloud = read_pcd(path)
        assert cloud.header["layout"] == "aligned"
        assert np.array_equal(cloud.fields["timestamp"], independent["t"])
        assert np.array_equal(cloud.fields["ring"], independent["ring"])
        # one 10 Hz sweep: times within 0.11 s; a 40-beam lidar: rings 0..39, every one present
        assert 0 < np.ptp(cloud.fields["timestamp"]) < 0.11
        ring = read_points_xyzir(path)[:, 4]
        assert np.array_equal(np.unique(ring), np.arange(40)) and np.array_equal(ring, independent["ring"])


def sustech_header(n: int, data: str = "binary", fields: str = "x y z _ intensity _ timestamp _ ring _") -> bytes:
    return SUSTECH_LIKE_HEADER.format(n=n, data=data).replace("x y z _ intensity _ timestamp _ ring _",
                                                              fields).encode()


def aligned_cloud(n: int, seed: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """Records laid out like the real SUSTechPOINTS files (timestamp at 24, ring at 32, constant padding)."""
    rng = np.random.default_rng(seed)
    layout = np.dtype({"names": ["x", "y", "z", "intensity", "timestamp", "ring"],
                       "formats": ["<f4", "<f4", "<f4", "<f4", "<f8", "<u2"],
                       "offsets": [0, 4, 8, 16, 24, 32], "itemsize": 48})
    rec = np.frombuffer(bytes([0x5A]) * (48 * n), dtype=layout).copy()
    rec["x"], rec["y"], rec["z"] = rng.uniform(-50, 50, (3, n)).astype(np.float32)
    rec["intensity"] = rng.integers(0, 256, n)
    rec["timestamp"] = 1818.8 + rng.uniform(0, 0.1, n)
    rec["ring"] = rng.integers(0, 40, n)
    return rec, layout


def test_a_header_whose_padding_contradicts_the_records_is_read_at_c_alignment(tmp_path):
    rec, _ = aligned_cloud(300)
    path = tmp_path / "aligned.pcd"
    path.write_bytes(sustech_header(300) + rec.tobytes())
    cloud = read_pcd(path)
    assert cloud.header["layout"] == "aligned"
    for name in rec.dtype.names:
        assert np.array_equal(cloud.fields[name], rec[name]), name
    assert np.array_equal(read_points_xyzir(path)[:, 4], rec["ring"])


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_a_count_zero_field_takes_no_bytes_and_hides_nothing_after_it(tmp_path, encoding):
    n = 64
    fields = random_fields(n, seed=6)
    x, y, z, intensity = (fields[k].astype(np.float32) for k in ("x", "y", "z", "intensity"))
    cases = {  # header fields / sizes / types / counts, and the values of one point in that order (COUNT 0: none)
        "leading": ("_ x y z", "1 4 4 4", "U F F F", "0 1 1 1", [x, y, z]),
        "before_intensity": ("x y z _ intensity", "4 4 4 4 4", "F F F U F", "1 1 1 0 1", [x, y, z, intensity]),
    }
    for name, (names, sizes, types, counts, values) in cases.items():
        head = (f"VERSION 0.7\nFIELDS {names}\nSIZE {sizes}\nTYPE {types}\nCOUNT {counts}\nWIDTH {n}\nHEIGHT 1\n"
                f"POINTS {n}\n")
        path = tmp_path / f"{name}_{encoding}.pcd"
        if encoding == "ascii":
            path.write_bytes(head.encode() + b"DATA ascii\n")
            write_pcd(tmp_path / "tmp.pcd", {f"v{i}": v for i, v in enumerate(values)}, data="ascii")
            body = (tmp_path / "tmp.pcd").read_bytes().split(b"DATA ascii\n", 1)[1]
            path.write_bytes(head.encode() + b"DATA ascii\n" + body)
        else:
            write_pcd(tmp_path / "tmp.pcd", {f"v{i}": v for i, v in enumerate(values)}, data=encoding)
            body = (tmp_path / "tmp.pcd").read_bytes().split(f"DATA {encoding}\n".encode(), 1)[1]
            path.write_bytes(head.encode() + f"DATA {encoding}\n".encode() + body)
        cloud = read_pcd(path)
        xyzir = read_points_xyzir(path)
        for i, key in enumerate(["x", "y", "z", "intensity"][:len(values)]):
            assert np.array_equal(cloud.fields[key], values[i]), (name, key)
            assert np.array_equal(xyzir[:, i], values[i]), (name, key)
        assert xyzir[:, 0].any() and xyzir[:, 2].any()


def test_a_header_layout_with_garbage_padding_is_kept_when_the_aligned_one_misreads_floats(tmp_path):
    n = 300
    rec = padded_cloud(n)  # laid out as the header says
    raw = np.frombuffer(rec.tobytes(), np.uint8).reshape(n, 48).copy()
    padding = np.r_[12:16, 28:34, 36:48]
    raw[:, padding] = np.random.default_rng(8).integers(0, 256, (n, len(padding)), dtype=np.uint8)
    path = tmp_path / "garbage_padding.pcd"
    path.write_bytes(sustech_header(n) + raw.tobytes())
    cloud = read_pcd(path)
    assert cloud.header["layout"] == "header" and cloud.header["untrusted"] == []
    assert np.array_equal(cloud.fields["timestamp"], rec["timestamp"])
    assert np.array_equal(read_points_xyzir(path)[:, 4], rec["ring"])


def test_when_the_data_cannot_tell_the_layouts_apart_ring_reads_0_and_intensity_is_an_error(tmp_path):
    n = 200
    noise = np.random.default_rng(7).integers(0, 256, (n, 48), dtype=np.uint8)  # every byte varies
    # ring at 20 (aligned) or 22 (the header's padding): integers only, and both paddings vary
    layout = np.dtype({"names": ["x", "y", "z", "intensity", "ring"], "formats": ["<f4"] * 4 + ["<u2"],
                       "offsets": [0, 4, 8, 16, 20], "itemsize": 34})
    rec = np.zeros(n, layout)
    rec["x"], rec["y"], rec["z"] = np.random.default_rng(9).uniform(-50, 50, (3, n))
    rec["intensity"], rec["ring"] = np.arange(n) % 256, np.arange(n) % 40
    raw = np.frombuffer(rec.tobytes(), np.uint8).reshape(n, 34).copy()
    raw[:, np.r_[12:16, 22:34]] = noise[:, np.r_[12:16, 22:34]]
    head = ("VERSION 0.7\nFIELDS x y z _ intensity _ _ ring _\nSIZE 4 4 4 1 4 1 1 2 1\nTYPE F F F U F U U U U\n"
            f"COUNT 1 1 1 4 1 0 2 1 10\nWIDTH {n}\nHEIGHT 1\nPOINTS {n}\nDATA binary\n")
    path = tmp_path / "ambiguous.pcd"
    path.write_bytes(head.encode() + raw.tobytes())
    cloud = read_pcd(path)
    assert cloud.header["untrusted"] == ["ring"] and "ring" not in cloud.fields
    xyzir = read_points_xyzir(path)
    assert np.array_equal(xyzir[:, 3], rec["intensity"]) and not xyzir[:, 4].any()

    # the same doubt about intensity (a 4-byte padding after a COUNT 0 one, before intensity) is an error
    head = ("VERSION 0.7\nFIELDS x y z _ _ intensity\nSIZE 4 4 4 1 1 4\nTYPE F F F U U F\nCOUNT 1 1 1 0 4 1\n"
            f"WIDTH {n}\nHEIGHT 1\nPOINTS {n}\nDATA binary\n")
    path = tmp_path / "ambiguous_intensity.pcd"
    path.write_bytes(head.encode() + noise[:, :20].tobytes())
    assert_error(path, "cannot tell where intensity sit", "COUNT 1 1 1 0 4 1")


def test_data_with_more_bytes_per_point_than_the_header_declares_is_an_error(tmp_path):
    n = 100
    path = tmp_path / "wide.pcd"
    head = f"VERSION 0.7\nFIELDS x y z _\nSIZE 4 4 4 1\nTYPE F F F U\nCOUNT 1 1 1 0\nPOINTS {n}\nDATA binary\n"
    path.write_bytes(head.encode() + b"\1" * (13 * n))  # a writer that gave the COUNT 0 field its SIZE
    assert_error(path, "record size mismatch", "exactly 13 bytes for each of the 100 points", "add up to 12")


def test_pypcd4_rejects_the_count_zero_header_that_we_read(tmp_path):
    path = tmp_path / "padded.pcd"
    path.write_bytes(SUSTECH_LIKE_HEADER.format(n=3, data="binary").encode() + padded_cloud(3).tobytes())
    with pytest.raises(Exception):
        pypcd4.PointCloud.from_path(path)
    assert read_points_xyzir(path).shape == (3, 5)


def test_old_version_headers_are_tolerated(tmp_path):
    path = tmp_path / "v6.pcd"
    path.write_bytes(b"VERSION .7\nFIELDS x y z\nSIZE 4 4 4\nTYPE F F F\nPOINTS 2\nDATA ascii\n1 2 3\n4 5 6\n")
    assert np.array_equal(read_points_xyzir(path)[:, :3], [[1, 2, 3], [4, 5, 6]])


# --- errors -------------------------------------------------------------------------------------------------

def written(tmp_path, encoding, n=1000) -> Path:
    path = tmp_path / f"cloud_{encoding}.pcd"
    write_pcd(path, random_fields(n, seed=4), data=encoding)
    return path


def assert_error(path, *fragments):
    with pytest.raises(PointCloudError) as info:
        read_points_xyzir(path)
    message = str(info.value)
    assert str(path) in message and info.value.path == str(path)
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_missing_file_is_a_point_cloud_error(tmp_path):
    assert_error(tmp_path / "nope.pcd", "not found")


def test_truncated_binary_file_says_how_many_bytes_were_expected_and_found(tmp_path):
    path = written(tmp_path, "binary")
    raw = path.read_bytes()
    path.write_bytes(raw[:-100])
    point_size = 4 * 4 + 2 + 4 + 1 + 8
    assert_error(path, "truncated", f"expected {1000 * point_size} bytes of point data",
                 f"found {1000 * point_size - 100}")


def test_truncated_binary_compressed_file_is_reported(tmp_path):
    path = written(tmp_path, "binary_compressed")
    path.write_bytes(path.read_bytes()[:-10])
    assert_error(path, "truncated", "compressed point data")


def test_garbled_lzf_payload_is_reported(tmp_path):
    path = written(tmp_path, "binary_compressed")
    raw = path.read_bytes()
    start = raw.index(b"DATA binary_compressed\n") + len(b"DATA binary_compressed\n")
    csize, usize = struct.unpack_from("<II", raw, start)
    bad = b"\x20\xff" * (csize // 2) + b"\0" * (csize % 2)  # back-references before the start of the output
    path.write_bytes(raw[: start + 8] + bad)
    assert_error(path, "garbled")


def test_lzf_payload_that_decompresses_short_is_reported(tmp_path):
    path = written(tmp_path, "binary_compressed", n=10)
    raw = path.read_bytes()
    start = raw.index(b"DATA binary_compressed\n") + len(b"DATA binary_compressed\n")
    _, usize = struct.unpack_from("<II", raw, start)
    comp = lzf.compress(b"\1" * (usize - 5), usize)
    path.write_bytes(raw[:start] + struct.pack("<II", len(comp), usize) + comp)
    assert_error(path, "garbled", f"{usize} bytes")


def test_header_without_fields_is_reported(tmp_path):
    path = tmp_path / "nofields.pcd"
    path.write_bytes(b"VERSION 0.7\nSIZE 4 4 4\nTYPE F F F\nCOUNT 1 1 1\nPOINTS 1\nDATA ascii\n1 2 3\n")
    assert_error(path, "missing FIELDS")


def test_header_without_points_or_with_unknown_data_or_mismatched_lengths_is_reported(tmp_path):
    base = "FIELDS x y z\nSIZE 4 4 4\nTYPE F F F\nCOUNT 1 1 1\n"
    cases = {"nopoints": (base + "DATA ascii\n", "missing POINTS"),
             "unknown": (base + "POINTS 0\nDATA binary_zstd\n", "unknown DATA type 'binary_zstd'"),
             "lengths": (base.replace("SIZE 4 4 4", "SIZE 4 4") + "POINTS 0\nDATA binary\n", "different lengths")}
    for name, (text, fragment) in cases.items():
        path = tmp_path / f"{name}.pcd"
        path.write_text(text)
        assert_error(path, fragment)


def test_ascii_row_with_a_missing_value_is_reported(tmp_path):
    path = tmp_path / "row.pcd"
    path.write_text("VERSION 0.7\nFIELDS x y z intensity\nSIZE 4 4 4 4\nTYPE F F F F\nCOUNT 1 1 1 1\n"
                    "WIDTH 3\nHEIGHT 1\nPOINTS 3\nDATA ascii\n1 2 3 4\n5 6 7\n8 9 10 11\n")
    assert_error(path, "wrong number of values", "expected 4")


def test_ascii_non_numeric_value_and_too_few_rows_are_reported(tmp_path):
    head = "FIELDS x y z\nSIZE 4 4 4\nTYPE F F F\nCOUNT 1 1 1\nPOINTS 2\nDATA ascii\n"
    path = tmp_path / "text.pcd"
    path.write_text(head + "1 2 3\n4 five 6\n")
    assert_error(path, "non-numeric", "five")
    path.write_text(head + "1 2 3\n")
    assert_error(path, "truncated", "expected 2")
