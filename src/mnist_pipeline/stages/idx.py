"""The IDX file format (LeCun's MNIST format): the one place that reads and writes it.

Layout: two zero bytes, a dtype code, the number of dimensions, then each dimension as a
big-endian uint32, then the data, big-endian, row-major. Files may be gzip-compressed.
"""

from __future__ import annotations

import gzip
import io
import struct
from pathlib import Path

import numpy as np

from mnist_pipeline.core.errors import DataError

#: IDX dtype codes and the NumPy dtypes they stand for (multi-byte types are big-endian).
DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
CODES = {dtype.newbyteorder(">"): code for code, dtype in DTYPES.items()}


def parse_idx(data: bytes, name: str = "<bytes>") -> np.ndarray:
    """Parse IDX bytes (already decompressed) into an array, checking every header field."""
    if len(data) < 4:
        raise DataError(f"{name}: not an IDX file ({len(data)} bytes, too short for a header)")
    zero, code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0:
        raise DataError(f"{name}: bad IDX magic number 0x{data[:4].hex()} (must start 0x0000)")
    if code not in DTYPES:
        raise DataError(f"{name}: unknown IDX dtype code 0x{code:02x}")
    if ndim == 0:
        raise DataError(f"{name}: IDX header declares zero dimensions")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{name}: truncated IDX header ({len(data)} bytes, need {header})")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    dtype = DTYPES[code]
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    actual = len(data) - header
    if actual != expected:
        raise DataError(
            f"{name}: IDX dimensions {'x'.join(map(str, shape))} need {expected} data bytes, "
            f"file has {actual}"
        )
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file, gunzipping it when its name ends in .gz."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file not found")
    raw = path.read_bytes()
    if path.suffix == ".gz":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as exc:
            raise DataError(f"{path}: not a valid gzip file ({exc})") from None
    return parse_idx(raw, str(path))


def to_idx_bytes(array: np.ndarray) -> bytes:
    """Serialise an array as IDX (used by tests and tools to make MNIST-format data)."""
    dtype = array.dtype.newbyteorder(">") if array.dtype.itemsize > 1 else array.dtype
    if dtype not in CODES and array.dtype not in CODES:
        raise ValueError(f"dtype {array.dtype} has no IDX code")
    code = CODES.get(dtype, CODES.get(array.dtype))
    header = struct.pack(">HBB", 0, code, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + np.ascontiguousarray(array, dtype=dtype).tobytes()


def write_idx(path: str | Path, array: np.ndarray) -> None:
    """Write an array as an IDX file, gzip-compressed (deterministically) when the name ends .gz.

    Level 1: gzip's default, 9, takes a minute for 30,000 of the tests' synthetic digits (long
    runs of equal bytes are its worst case) and 0.2 s at level 1; readers see the same content."""
    path = Path(path)
    data = to_idx_bytes(array)
    if path.suffix == ".gz":
        buffer = io.BytesIO()
        with gzip.GzipFile(fileobj=buffer, mode="wb", mtime=0, compresslevel=1) as gz:
            gz.write(data)
        data = buffer.getvalue()
    path.write_bytes(data)
