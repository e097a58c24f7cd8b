"""IDX parsing: round trips, and every malformed header is refused with a clear message."""

import gzip
import struct

import numpy as np
import pytest

from mnist_pipeline.core.errors import DataError
from mnist_pipeline.stages.idx import parse_idx, read_idx, to_idx_bytes, write_idx


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64])
def test_round_trip(tmp_path, dtype):
    array = (np.arange(2 * 3 * 4) - 5).astype(dtype).reshape(2, 3, 4)
    write_idx(tmp_path / "a.gz", array)
    back = read_idx(tmp_path / "a.gz")
    assert back.shape == (2, 3, 4)
    np.testing.assert_array_equal(back, array)


def test_reads_real_mnist_header_layout():
    # Labels file as MNIST lays it out: magic 0x00000801, count, then bytes.
    data = struct.pack(">HBBI", 0, 0x08, 1, 3) + bytes([7, 2, 1])
    np.testing.assert_array_equal(parse_idx(data), [7, 2, 1])


def header(code=0x08, dims=(2, 2)):
    return struct.pack(">HBB", 0, code, len(dims)) + struct.pack(f">{len(dims)}I", *dims)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "too short"),
        (b"\x00\x00", "too short"),
        (b"\x01\x00\x08\x01" + b"\x00" * 8, "magic"),
        (header(code=0x07) + b"\x00" * 4, "dtype code 0x07"),
        (struct.pack(">HBB", 0, 0x08, 0), "zero dimensions"),
        (struct.pack(">HBB", 0, 0x08, 3) + b"\x00\x00\x00\x02", "truncated IDX header"),
        (header() + b"\x00" * 3, "need 4 data bytes, file has 3"),
        (header() + b"\x00" * 5, "need 4 data bytes, file has 5"),
    ],
)
def test_malformed_is_refused(data, message):
    with pytest.raises(DataError, match=message):
        parse_idx(data, "x.idx")


def test_not_gzip(tmp_path):
    path = tmp_path / "x.gz"
    path.write_bytes(to_idx_bytes(np.zeros(3, np.uint8)))
    with pytest.raises(DataError, match="not a valid gzip file"):
        read_idx(path)


def test_truncated_gzip(tmp_path):
    path = tmp_path / "x.gz"
    path.write_bytes(gzip.compress(to_idx_bytes(np.zeros(1000, np.uint8)))[:-20])
    with pytest.raises(DataError, match="not a valid gzip file"):
        read_idx(path)


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="not found"):
        read_idx(tmp_path / "nope.gz")
