"""NTNDArray codec: numpy frames <-> areaDetector NTNDArrays, with compression.

Pure of any server: :func:`to_value` builds the p4p ``Value`` an NDPluginPva would post,
:func:`from_value` decodes one back to numpy. Compression follows ADCore's NDPluginCodec:
``value`` holds the compressed bytes as ``ubyteValue``, ``codec.name`` names the codec,
``codec.parameters`` holds the original NDDataType code, ``uncompressedSize`` the original size
in bytes. Payloads are encoded/decoded with ``imagecodecs``, a maintained codec library:

- ``lz4``: one raw LZ4 block (``LZ4_compress_default``);
- ``bslz4``: bitshuffle + LZ4 in the HDF5-filter framing (12-byte big-endian header: total
  bytes and block bytes; then per block a 4-byte big-endian length and the LZ4 block of the
  bit-shuffled block), so a chunk can go straight into an HDF5 file;
- ``blosc``: a Blosc-1 frame; ``zlib``: a zlib stream; ``jpeg``: a JPEG (8-bit data only).

The dimension convention is areaDetector's: ``dimension[0]`` is x, the fastest axis.
"""

from __future__ import annotations

import math
import struct
import time
from dataclasses import dataclass, field

import imagecodecs
import numpy as np
from p4p import Value
from p4p.nt import NTNDArray

CODECS = ("none", "lz4", "bslz4", "blosc", "zlib", "jpeg")

# ADCore NDDataType_t, by code: the names DataType_RBV shows, and the dtypes (the code travels in
# codec.parameters). The one table of them; plugins/frame.py and the schema read it.
ND_DATA_TYPES = ("Int8", "UInt8", "Int16", "UInt16", "Int32", "UInt32", "Int64", "UInt64", "Float32", "Float64")
ND_DTYPES = {i: np.dtype(name.lower()).type for i, name in enumerate(ND_DATA_TYPES)}
ND_CODE = {np.dtype(v): k for k, v in ND_DTYPES.items()}
# NTNDArray value-union member for each dtype.
UNION = {np.dtype(np.int8): "byteValue", np.dtype(np.uint8): "ubyteValue",
         np.dtype(np.int16): "shortValue", np.dtype(np.uint16): "ushortValue",
         np.dtype(np.int32): "intValue", np.dtype(np.uint32): "uintValue",
         np.dtype(np.int64): "longValue", np.dtype(np.uint64): "ulongValue",
         np.dtype(np.float32): "floatValue", np.dtype(np.float64): "doubleValue"}
BSLZ4_BLOCK_BYTES = 8192  # bitshuffle's default target block size


class CodecError(ValueError):
    """An NTNDArray whose payload cannot be decoded; the message says why."""


# ----------------------------------------------------------------------------- payload codecs
def _bslz4_block_elems(itemsize: int) -> int:
    # bitshuffle wants a multiple of 8 elements per block
    return max(8, (BSLZ4_BLOCK_BYTES // itemsize) // 8 * 8)


def _bslz4_blocks(n: int, block: int) -> list[int]:
    """Element counts of the compressed blocks: full blocks, then the last block cut to a
    multiple of 8; the final ``n % 8`` elements follow uncompressed (as bitshuffle does)."""
    sizes = [block] * (n // block)
    last = n % block - n % 8
    return sizes + ([last] if last else [])


def bslz4_encode(arr: np.ndarray) -> bytes:
    arr = np.ascontiguousarray(arr).ravel()
    itemsize = arr.dtype.itemsize
    block = _bslz4_block_elems(itemsize)
    out = [struct.pack(">QI", arr.nbytes, block * itemsize)]
    start = 0
    for n in _bslz4_blocks(len(arr), block):
        shuffled = imagecodecs.bitshuffle_encode(arr[start:start + n], itemsize=itemsize, blocksize=n)
        comp = imagecodecs.lz4_encode(shuffled, header=False)
        out.append(struct.pack(">I", len(comp)) + comp)
        start += n
    out.append(arr[start:].tobytes())
    return b"".join(out)


def bslz4_decode(buf: bytes, dtype: np.dtype, size: int | None = None) -> np.ndarray:
    """``size``: the bytes expected; a header that says otherwise is refused before anything is
    allocated for it."""
    dtype = np.dtype(dtype)
    itemsize = dtype.itemsize
    if len(buf) < 12:
        raise CodecError("bslz4 payload shorter than its 12-byte header")
    total, block_bytes = struct.unpack_from(">QI", buf, 0)
    if block_bytes == 0 or block_bytes % itemsize or total % itemsize:
        raise CodecError(f"bslz4 header inconsistent with {dtype} data (total {total}, block {block_bytes})")
    if size is not None and total != size:
        raise CodecError(f"bslz4 header inconsistent: it says {total} bytes, {size} expected")
    count = total // itemsize
    out = np.empty(count, dtype=dtype)
    pos = i = 0
    pos = 12
    for n in _bslz4_blocks(count, block_bytes // itemsize):
        if pos + 4 > len(buf):
            raise CodecError("bslz4 payload truncated")
        (clen,) = struct.unpack_from(">I", buf, pos)
        pos += 4
        raw = imagecodecs.lz4_decode(buf[pos:pos + clen], header=False, out=n * itemsize)
        pos += clen
        if len(raw) != n * itemsize:
            raise CodecError("bslz4 block decoded to the wrong size")
        out[i:i + n] = np.frombuffer(imagecodecs.bitshuffle_decode(raw, itemsize=itemsize, blocksize=n), dtype)
        i += n
    tail = buf[pos:]
    if len(tail) != (count - i) * itemsize:
        raise CodecError("bslz4 payload truncated (uncompressed tail has the wrong length)")
    out[i:] = np.frombuffer(tail, dtype=dtype)
    return out


def encode_payload(arr: np.ndarray, codec: str) -> bytes:
    """Compress a frame's bytes as NDPluginCodec would."""
    arr = np.ascontiguousarray(arr)
    if codec == "lz4":
        return bytes(imagecodecs.lz4_encode(arr.tobytes(), header=False))
    if codec == "bslz4":
        return bslz4_encode(arr)
    if codec == "blosc":
        return bytes(imagecodecs.blosc_encode(arr.tobytes(), typesize=arr.dtype.itemsize, shuffle=1,
                                              compressor="lz4", level=5, numthreads=1))
    if codec == "zlib":
        return bytes(imagecodecs.zlib_encode(arr.tobytes()))
    if codec == "jpeg":
        if arr.dtype != np.uint8:
            raise ValueError(f"jpeg needs uint8 data, got {arr.dtype}")
        return bytes(imagecodecs.jpeg8_encode(arr, level=90))
    raise ValueError(f"unknown codec {codec!r}; allowed: {', '.join(CODECS)}")


def decode_payload(buf: bytes, codec: str, dtype: np.dtype, size: int,
                   shape: tuple[int, ...] | None = None) -> np.ndarray:
    """Decompress ``buf`` into ``size`` bytes of ``dtype``; :class:`CodecError` on failure.
    ``shape``: the frame's (jpeg: an image of another size in its own header is refused before
    anything is allocated for it)."""
    dtype = np.dtype(dtype)
    try:
        if codec == "lz4":
            raw = imagecodecs.lz4_decode(buf, header=False, out=size)
        elif codec == "bslz4":
            return bslz4_decode(buf, dtype, size)
        elif codec == "blosc":
            raw = imagecodecs.blosc_decode(buf, numthreads=1, out=size)
        elif codec == "zlib":
            raw = imagecodecs.zlib_decode(buf, out=size)
        elif codec == "jpeg":
            out = None if shape is None else np.empty(shape, np.uint8)
            return np.asarray(imagecodecs.jpeg8_decode(buf, out=out)).ravel()
        else:
            raise CodecError(f"unknown codec {codec!r}; supported: {', '.join(CODECS)}")
    except CodecError:
        raise
    except Exception as exc:  # imagecodecs raises its own error types per codec
        raise CodecError(f"{codec} payload could not be decoded: {exc}") from None
    if len(raw) != size:
        raise CodecError(f"{codec} payload decoded to {len(raw)} bytes, uncompressedSize says {size}")
    return np.frombuffer(raw, dtype=dtype)


# ----------------------------------------------------------------------------- NTNDArray values
_NT = NTNDArray()


def _stamp(t: float) -> dict:
    sec = int(t)
    return {"secondsPastEpoch": sec, "nanoseconds": int(round((t - sec) * 1e9)) % 1_000_000_000, "userTag": 0}


def _attribute_array(attributes: dict | None) -> list[dict]:
    """The NTAttribute elements of a frame: ``ColorMode`` first (0, mono, unless ``attributes``
    gives one: a decoded frame passed on carries its own), then the others, each name once. The
    fields not given (descriptor, sourceType, source) take their defaults, "" and 0: in p4p a
    dict of two keys converts in two thirds of the time of one of five, and this runs per frame."""
    rest = dict(attributes or {})
    return ([{"name": "ColorMode", "value": rest.pop("ColorMode", 0), "descriptor": "Color mode"}]
            + [{"name": k, "value": v} for k, v in rest.items()])


def to_value(arr: np.ndarray, unique_id: int, *, timestamp: float | None = None,
             data_timestamp: float | None = None, attributes: dict | None = None,
             codec: str = "none") -> Value:
    """A complete NTNDArray ``Value`` for a 2-D frame (every field set, so a post replaces all)."""
    arr = np.asarray(arr)
    if arr.ndim != 2:
        raise ValueError(f"an NTNDArray frame must be 2-D (ny, nx), got shape {arr.shape}")
    if arr.dtype not in UNION:
        raise ValueError(f"dtype {arr.dtype} has no NTNDArray representation")
    now = time.time()
    ts = now if timestamp is None else timestamp
    dts = ts if data_timestamp is None else data_timestamp
    ny, nx = arr.shape
    if codec == "none":
        value = (UNION[arr.dtype], np.ascontiguousarray(arr).ravel())
        params, comp_size = None, arr.nbytes
    else:
        payload = encode_payload(arr, codec)
        value = ("ubyteValue", np.frombuffer(payload, dtype=np.uint8))
        params, comp_size = ND_CODE[arr.dtype], len(payload)
    return Value(_NT.type, {
        "value": value,
        "codec": {"name": "" if codec == "none" else codec, "parameters": params},
        "compressedSize": comp_size,
        "uncompressedSize": arr.nbytes,
        "uniqueId": int(unique_id) & 0x7FFFFFFF,
        "dataTimeStamp": _stamp(dts),
        "timeStamp": _stamp(ts),
        "dimension": [{"size": nx, "offset": 0, "fullSize": nx, "binning": 1, "reverse": False},
                      {"size": ny, "offset": 0, "fullSize": ny, "binning": 1, "reverse": False}],
        "attribute": _attribute_array(attributes),
    })


class NTNDArrayWriter:
    """Builds the ``Value`` of each frame of one stream by updating the fields of the last one:
    about a third of the cost of :func:`to_value` (which builds every field anew), so a chain that
    republishes each frame at kHz rates spends its time on the frames, not on p4p. Every field a
    frame may change is set on every frame (value, uniqueId, time stamps, sizes, attributes), so a
    ``SharedPV.post`` of it replaces all. Not thread-safe: one writer per stream."""

    def __init__(self):
        self._value: Value | None = None
        self._key = None

    def value(self, arr: np.ndarray, unique_id: int, *, timestamp: float | None = None,
              data_timestamp: float | None = None, attributes: dict | None = None, codec: str = "none") -> Value:
        arr = np.asarray(arr)
        key = (arr.shape, arr.dtype.str, codec)
        if codec != "none" or key != self._key or arr.ndim != 2 or arr.dtype not in UNION:
            self._value = to_value(arr, unique_id, timestamp=timestamp, data_timestamp=data_timestamp,
                                   attributes=attributes, codec=codec)
            self._key = key
            return self._value
        v = self._value
        ts = time.time() if timestamp is None else timestamp
        dts = ts if data_timestamp is None else data_timestamp
        v["value"] = (UNION[arr.dtype], np.ascontiguousarray(arr).ravel())
        v["uniqueId"] = int(unique_id) & 0x7FFFFFFF
        v["timeStamp"] = _stamp(ts)
        v["dataTimeStamp"] = _stamp(dts)
        v["attribute"] = _attribute_array(attributes)
        return v


@dataclass
class Decoded:
    """A decoded NTNDArray."""

    data: np.ndarray
    unique_id: int
    timestamp: float
    data_timestamp: float
    attributes: dict = field(default_factory=dict)
    codec: str = "none"


def image_number(d: Decoded) -> int:
    """A live image's ``ImageNumber`` attribute (``Stitch:Image``, ``Refine:Image``: it rises at
    every reset, so a client tells a scan's image from the last one's); -1 where it has none."""
    return int(d.attributes.get("ImageNumber", -1))


def _seconds(v: Value, stamp: str) -> float:
    return v[stamp + ".secondsPastEpoch"] + v[stamp + ".nanoseconds"] * 1e-9


def from_value(v: Value) -> Decoded:
    """Decode an NTNDArray ``Value``; :class:`CodecError` names what is wrong with a bad one.

    Fields are read by name (``v["codec.name"]``): in p4p that is a third to a fifth of the cost
    of attribute access (``v.codec.name``), and this runs once per frame on the thread that
    takes the detector's frames, under the GIL (a 128x128 frame with three attributes: 43 -> 7 us)."""
    try:
        dims = [d["size"] for d in v["dimension"]]
    except Exception:
        raise CodecError("not an NTNDArray: no dimension array") from None
    if not dims:
        raise CodecError("NTNDArray has no dimensions")
    if any(int(d) <= 0 for d in dims):
        raise CodecError(f"NTNDArray dimension sizes {dims} must all be positive")
    shape = tuple(reversed(dims))
    codec = v["codec.name"] or "none"
    raw = v["value"]
    if raw is None:
        raise CodecError("NTNDArray has an empty value union")
    if codec == "none":
        data = raw if isinstance(raw, np.ndarray) else np.asarray(raw)
    else:
        code = v["codec.parameters"]
        try:
            dtype = ND_DTYPES[int(code)]
        except (TypeError, ValueError, KeyError):
            raise CodecError(f"codec {codec!r} with unknown original data type {code!r} in codec.parameters") from None
        size, expected = int(v["uncompressedSize"]), math.prod(shape) * np.dtype(dtype).itemsize
        if size != expected:
            # checked before decoding: a small payload must not make the decoder allocate what an
            # uncompressedSize (or a blosc header) of its own says
            raise CodecError(f"uncompressedSize {size} does not match the dimensions {shape} of {np.dtype(dtype)} "
                             f"({expected} bytes)")
        data = decode_payload(np.asarray(raw).tobytes(), codec, dtype, size, shape)
    if data.size != math.prod(shape):
        raise CodecError(f"NTNDArray holds {data.size} elements but its dimensions say {shape}")
    attrs = {a["name"]: a["value"] for a in v["attribute"]}
    return Decoded(data.reshape(shape), int(v["uniqueId"]), _seconds(v, "timeStamp"), _seconds(v, "dataTimeStamp"),
                   attrs, codec)
