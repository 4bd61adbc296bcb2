"""Minimal reader of TensorFlow V2 checkpoint bundles (``<prefix>.index`` + ``<prefix>.data-*``).

Why hand-written: the only maintained readers of this format live inside TensorFlow itself
(``tf.train.load_checkpoint``), a ~600 MB dependency that musicnn's own metadata pins to an
unusable version; no standalone package reads it. The format is small and frozen:

* ``.index`` is a LevelDB/SSTable table (uncompressed blocks as written by TF): a 48-byte footer
  points to an index block whose entries point to data blocks; block entries are
  prefix-compressed ``(key, value)`` pairs. Key ``""`` holds a ``BundleHeaderProto``; every other
  key is a tensor name whose value is a ``BundleEntryProto`` (dtype, shape, shard_id, offset,
  size, crc32c). Each block carries a masked CRC32C.
* ``.data-SSSSS-of-NNNNN`` holds the raw little-endian tensor bytes at ``offset``.

Protobuf messages are decoded with a ~20-line wire-format parser because TF's .proto files are
not shipped outside TensorFlow. Both the block and tensor CRC32Cs are verified (vectorised with
numpy: ~0.1 s for the 3 MB of musicnn weights), so a truncated or corrupted bundle fails loudly.

    >>> ckpt = TFCheckpoint("site-packages/musicnn/MSD_musicnn/")        # doctest: +SKIP
    >>> ckpt.entries["dense/kernel"].shape, ckpt.read("dense/kernel").dtype  # doctest: +SKIP
    ((1506, 200), dtype('float32'))
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from ..errors import ModelLoadingError

_TABLE_MAGIC = 0xDB4775248B80FB57
# tensorflow/core/framework/types.proto DataType -> numpy (little-endian) dtype.
_DTYPES = {
    1: "<f4",
    2: "<f8",
    3: "<i4",
    4: "u1",
    5: "<i2",
    6: "i1",
    9: "<i8",
    10: "?",
    17: "<u2",
    19: "<f2",
    22: "<u4",
    23: "<u8",
}


@dataclass(frozen=True)
class TensorEntry:
    """One ``BundleEntryProto``: where a tensor's bytes live and their masked CRC32C."""

    name: str
    dtype: str  # numpy dtype string
    shape: tuple[int, ...]
    shard_id: int
    offset: int
    size: int
    crc32c: int | None  # masked, as stored


# ---------------------------------------------------------------------------------------------
# CRC32C (Castagnoli), vectorised. Pure-Python byte loops would take ~1 s per MB; instead the
# data is cut into L lanes whose CRC registers advance together in numpy, and lane results are
# merged pairwise with the GF(2)-linear "append m zero bytes" operator (the zlib crc32_combine
# idea), whose 32x32 matrices for m = 2^k are cached as byte lookup tables.

_POLY = 0x82F63B78


def _byte_table() -> np.ndarray:
    t = np.arange(256, dtype=np.uint32)
    for _ in range(8):
        t = np.where(t & 1, (t >> 1) ^ np.uint32(_POLY), t >> 1).astype(np.uint32)
    return t


_TABLE = _byte_table()


def _apply(cols: np.ndarray, r: np.ndarray) -> np.ndarray:
    """GF(2) matrix (32 column words) times register vector r (uint32)."""
    out = np.zeros_like(r)
    for b in range(32):
        out ^= np.where((r >> np.uint32(b)) & np.uint32(1), cols[b], np.uint32(0)).astype(np.uint32)
    return out


@lru_cache(maxsize=None)
def _zeros_cols(log2_bytes: int) -> np.ndarray:
    """Columns of the operator 'feed 2**log2_bytes zero bytes' on a raw CRC register."""
    if log2_bytes == 0:
        r = (np.uint32(1) << np.arange(32, dtype=np.uint32)).astype(np.uint32)
        return (_TABLE[r & np.uint32(0xFF)] ^ (r >> np.uint32(8))).astype(np.uint32)
    prev = _zeros_cols(log2_bytes - 1)
    return _apply(prev, prev)  # M^(2m) = M^m applied to each column of M^m


@lru_cache(maxsize=None)
def _zeros_tables(log2_bytes: int) -> np.ndarray:
    """[4, 256] lookup tables of the same operator, one per register byte."""
    cols = _zeros_cols(log2_bytes)
    v = np.arange(256, dtype=np.uint32)
    return np.stack([_apply(cols, v << np.uint32(8 * j)) for j in range(4)])


def _shift(r: np.ndarray, log2_bytes: int) -> np.ndarray:
    t = _zeros_tables(log2_bytes)
    m = np.uint32(0xFF)
    return t[0][r & m] ^ t[1][(r >> np.uint32(8)) & m] ^ t[2][(r >> np.uint32(16)) & m] ^ t[3][r >> np.uint32(24)]


def crc32c(data: bytes | np.ndarray) -> int:
    """CRC32C of ``data`` (bytes or any contiguous array, read as raw bytes)."""
    buf = np.frombuffer(memoryview(data).cast("B"), dtype=np.uint8)
    n = buf.size
    if n < 16:  # not worth vectorising
        crc = 0xFFFFFFFF
        for byte in buf.tolist():
            crc = int(_TABLE[(crc ^ byte) & 0xFF]) ^ (crc >> 8)
        return crc ^ 0xFFFFFFFF
    # Raw-register algebra: leading zero bytes leave a zero register at zero, so the data may be
    # left-padded to L lanes x m bytes (both powers of two: the shift operators are cached per
    # power), and the initial register ~0 is the same as XOR-ing 0xFF into the first 4 data bytes.
    L = 1 << min(14, max(0, n.bit_length() - 5))  # ~16-32 bytes a lane, at most 16384 lanes
    m_log2 = (-(-n // L) - 1).bit_length()
    m = 1 << m_log2
    padded = np.zeros(L * m, dtype=np.uint8)
    padded[L * m - n :] = buf
    padded[L * m - n : L * m - n + 4] ^= 0xFF
    lanes = padded.reshape(L, m)
    r = np.zeros(L, dtype=np.uint32)
    for j in range(m):
        r = _TABLE[(r ^ lanes[:, j]) & np.uint32(0xFF)] ^ (r >> np.uint32(8))
    level = m_log2
    while r.size > 1:  # merge neighbouring lanes: crc(A||B) = shift(crc(A), |B|) ^ crc(B)
        r = _shift(r[0::2], level) ^ r[1::2]
        level += 1
    return int(r[0] ^ np.uint32(0xFFFFFFFF))


def unmask_crc(masked: int) -> int:
    """Undo LevelDB/TF CRC masking: masked = rotr15(crc) + 0xa282ead8."""
    rot = (masked - 0xA282EAD8) & 0xFFFFFFFF
    return ((rot >> 17) | (rot << 15)) & 0xFFFFFFFF


# ---------------------------------------------------------------------------------------------
# Wire formats


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7


def _proto_fields(buf: bytes) -> list[tuple[int, int | bytes]]:
    """Decode one protobuf message into (field number, value) pairs (varints, fixed, bytes)."""
    out, pos = [], 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        num, wire = key >> 3, key & 7
        if wire == 0:
            val, pos = _varint(buf, pos)
        elif wire == 1:
            val, pos = struct.unpack_from("<Q", buf, pos)[0], pos + 8
        elif wire == 2:
            ln, pos = _varint(buf, pos)
            val, pos = buf[pos : pos + ln], pos + ln
        elif wire == 5:
            val, pos = struct.unpack_from("<I", buf, pos)[0], pos + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        out.append((num, val))
    return out


def _parse_entry(name: str, value: bytes) -> TensorEntry:
    dtype = shard = offset = size = 0
    crc, shape = None, []
    for num, val in _proto_fields(value):
        if num == 1:
            dtype = val
        elif num == 2:  # TensorShapeProto { repeated Dim dim = 2 { int64 size = 1 } }
            shape = [dict(_proto_fields(d)).get(1, 0) for n2, d in _proto_fields(val) if n2 == 2]
        elif num == 3:
            shard = val
        elif num == 4:
            offset = val
        elif num == 5:
            size = val
        elif num == 6:
            crc = val
        elif num == 7:
            raise ValueError(f"tensor {name!r} is stored as slices, which this reader does not support")
    if dtype not in _DTYPES:
        raise ValueError(f"tensor {name!r} has unsupported dtype enum {dtype}")
    return TensorEntry(name, _DTYPES[dtype], tuple(int(s) for s in shape), shard, offset, size, crc)


def _read_block(data: bytes, offset: int, size: int, where: str) -> list[tuple[bytes, bytes]]:
    """Entries of one SSTable block, after checking its trailer (type byte + masked CRC32C)."""
    if offset + size + 5 > len(data):
        raise ValueError(f"{where}: block at {offset} runs past the end of the file (truncated?)")
    block = data[offset : offset + size]
    ctype = data[offset + size]
    (stored,) = struct.unpack_from("<I", data, offset + size + 1)
    if crc32c(data[offset : offset + size + 1]) != unmask_crc(stored):
        raise ValueError(f"{where}: CRC32C mismatch in block at byte {offset} (corrupt file)")
    if ctype != 0:
        raise ValueError(f"{where}: compressed blocks (type {ctype}) are not supported")
    (n_restarts,) = struct.unpack_from("<I", block, len(block) - 4)
    end = len(block) - 4 - 4 * n_restarts
    entries, pos, key = [], 0, b""
    while pos < end:
        shared, pos = _varint(block, pos)
        non_shared, pos = _varint(block, pos)
        vlen, pos = _varint(block, pos)
        key = key[:shared] + block[pos : pos + non_shared]
        pos += non_shared
        entries.append((key, block[pos : pos + vlen]))
        pos += vlen
    return entries


class TFCheckpoint:
    """Tensors of a TF V2 bundle. ``prefix`` is the path without ``.index`` (for musicnn the
    directory itself: its files are literally named ``.index`` / ``.data-00000-of-00001``)."""

    def __init__(self, prefix: str | os.PathLike, verify: bool = True):
        prefix = str(prefix)
        self.index_path = Path(prefix + ".index")
        self.verify = verify
        try:
            raw = self.index_path.read_bytes()
        except OSError as exc:
            raise ModelLoadingError(f"{self.index_path}: cannot read checkpoint index ({exc.strerror})") from exc
        try:
            self.entries, self.num_shards = self._parse_index(raw)
        except (ValueError, IndexError, struct.error) as exc:
            raise ModelLoadingError(f"{self.index_path}: not a readable TensorFlow checkpoint index ({exc})") from exc
        self.data_paths = [Path(f"{prefix}.data-{i:05d}-of-{self.num_shards:05d}") for i in range(self.num_shards)]
        self._shards: dict[int, bytes] = {}

    def _parse_index(self, raw: bytes) -> tuple[dict[str, TensorEntry], int]:
        where = str(self.index_path)
        if len(raw) < 48 or struct.unpack_from("<Q", raw, len(raw) - 8)[0] != _TABLE_MAGIC:
            raise ValueError("bad table magic")
        footer = raw[-48:]
        _, pos = _varint(footer, 0)  # metaindex offset (unused)
        _, pos = _varint(footer, pos)  # metaindex size
        idx_off, pos = _varint(footer, pos)
        idx_size, pos = _varint(footer, pos)
        entries: dict[str, TensorEntry] = {}
        num_shards = 1
        for _, handle in _read_block(raw, idx_off, idx_size, where):
            off, p = _varint(handle, 0)
            size, _ = _varint(handle, p)
            for key, value in _read_block(raw, off, size, where):
                if key == b"":  # BundleHeaderProto { int32 num_shards = 1; endianness = 2; ... }
                    hdr = dict(_proto_fields(value))
                    num_shards = hdr.get(1, 1)
                    if hdr.get(2, 0) != 0:
                        raise ValueError("big-endian bundles are not supported")
                    continue
                name = key.decode()
                entries[name] = _parse_entry(name, value)
        return entries, num_shards

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def keys(self) -> list[str]:
        return sorted(self.entries)

    def _shard(self, i: int) -> bytes:
        if i not in self._shards:
            try:
                self._shards[i] = self.data_paths[i].read_bytes()
            except OSError as exc:
                raise ModelLoadingError(f"{self.data_paths[i]}: cannot read checkpoint data ({exc.strerror})") from exc
        return self._shards[i]

    def read(self, name: str) -> np.ndarray:
        """Tensor ``name`` as a native-endian numpy array (a copy), CRC-checked when verify."""
        if name not in self.entries:
            raise ModelLoadingError(f"{self.index_path}: checkpoint has no tensor {name!r}")
        e = self.entries[name]
        data = self._shard(e.shard_id)
        if e.offset + e.size > len(data):
            raise ModelLoadingError(
                f"{self.data_paths[e.shard_id]}: tensor {name!r} runs past the end of the file (truncated?)"
            )
        raw = data[e.offset : e.offset + e.size]
        if self.verify and e.crc32c is not None and crc32c(raw) != unmask_crc(e.crc32c):
            raise ModelLoadingError(
                f"{self.data_paths[e.shard_id]}: CRC32C mismatch for tensor {name!r} (corrupt checkpoint)"
            )
        dt = np.dtype(e.dtype)
        if dt.itemsize * int(np.prod(e.shape, dtype=np.int64)) != e.size:
            raise ModelLoadingError(f"{self.index_path}: tensor {name!r} size {e.size} does not match shape {e.shape}")
        return np.frombuffer(raw, dtype=dt).reshape(e.shape).astype(dt.newbyteorder("="))
