"""NTNDArray encoding and decoding, with every codec, as NDPluginPva/NDPluginCodec send them."""

import tracemalloc

import h5py
import hdf5plugin
import imagecodecs
import numpy as np
import pytest

from ptychopv.io.ntndarray import CODECS, CodecError, bslz4_encode, decode_payload, from_value, to_value

DTYPES = [np.int8, np.uint8, np.int16, np.uint16, np.int32, np.uint32, np.int64, np.uint64, np.float32, np.float64]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("codec", [c for c in CODECS if c != "jpeg"])
def test_round_trip(dtype, codec):
    rng = np.random.default_rng(0)
    frame = rng.poisson(20, (67, 131)).astype(dtype)  # odd sizes: bitshuffle's leftover path
    v = to_value(frame, 41, timestamp=1700000000.25, attributes={"PositionX": 1.5e-6, "PositionY": -2e-6},
                 codec=codec)
    assert [d.size for d in v.dimension] == [131, 67]  # x first
    d = from_value(v)
    assert d.data.dtype == np.dtype(dtype) and d.data.shape == (67, 131)
    assert np.array_equal(d.data, frame)
    assert d.unique_id == 41 and d.timestamp == pytest.approx(1700000000.25)
    assert d.attributes["PositionX"] == 1.5e-6 and d.attributes["PositionY"] == -2e-6
    assert d.codec == codec
    if codec != "none":
        assert v.codec.name == codec and int(v.codec.parameters) >= 0
        assert v.uncompressedSize == frame.nbytes and v.compressedSize == len(v.value)


def test_jpeg_is_lossy_but_close():
    frame = (np.add.outer(np.arange(64), np.arange(64)) % 256).astype(np.uint8)
    d = from_value(to_value(frame, 1, codec="jpeg"))
    assert d.data.shape == frame.shape and np.abs(d.data.astype(int) - frame).mean() < 3


@pytest.mark.parametrize("dtype", [np.uint16, np.uint32, np.float32])
def test_bslz4_matches_the_hdf5_bitshuffle_filter(tmp_path, dtype):
    frame = np.random.default_rng(1).poisson(3, (100, 77)).astype(dtype)
    with h5py.File(tmp_path / "f.h5", "w") as f:
        f.create_dataset("d", data=frame[None], chunks=(1, *frame.shape), **hdf5plugin.Bitshuffle(cname="lz4"))
    with h5py.File(tmp_path / "f.h5", "r") as f:
        _, chunk = f["d"].id.read_direct_chunk((0, 0, 0))
    assert bslz4_encode(frame) == bytes(chunk)


@pytest.mark.parametrize("codec", ["lz4", "bslz4", "blosc", "zlib", "jpeg"])
def test_corrupt_payload_is_a_codec_error(codec):
    frame = np.arange(64 * 64, dtype=np.uint8).reshape(64, 64)
    v = to_value(frame, 1, codec=codec)
    v.value = ("ubyteValue", np.frombuffer(b"\x13\x37" * 50, np.uint8))
    with pytest.raises(CodecError, match="decode|truncated|wrong size|inconsistent|payload"):
        from_value(v)


def test_unknown_codec_and_bad_shape_are_errors():
    v = to_value(np.zeros((4, 4), np.uint16), 1, codec="lz4")
    v.codec.name = "zstd-magic"
    with pytest.raises(CodecError, match="unknown codec"):
        from_value(v)
    v = to_value(np.zeros((4, 4), np.uint16), 1)
    v.dimension = [{"size": 5}, {"size": 4}]
    with pytest.raises(CodecError, match="dimensions"):
        from_value(v)
    with pytest.raises(CodecError, match="original data type"):
        w = to_value(np.zeros((4, 4), np.uint16), 1, codec="lz4")
        w.codec.parameters = 99
        from_value(w)
    with pytest.raises(ValueError, match="2-D"):
        to_value(np.zeros((2, 2, 2)), 1)
    with pytest.raises(CodecError, match="decoded"):
        decode_payload(b"\x00" * 8, "lz4", np.uint16, 10)


def test_the_writer_reuses_one_value_and_every_frame_replaces_all_it_may_change():
    from ptychopv.io.ntndarray import NTNDArrayWriter

    w = NTNDArrayWriter()
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    v1 = w.value(a, 1, timestamp=10.5, attributes={"PositionX": 1.0, "PositionY": 2.0})
    v2 = w.value(a * 2, 2, timestamp=11.25, attributes={"PositionX": 3.0})
    assert v2 is v1                                           # the same Value, updated
    d = from_value(v2)
    assert d.unique_id == 2 and d.timestamp == pytest.approx(11.25) and np.array_equal(d.data, a * 2)
    assert d.attributes == {"ColorMode": 0, "PositionX": 3.0}  # PositionY of the last frame is gone
    v3 = w.value(np.zeros((5, 5), np.uint16), 3)              # another shape or dtype: a new Value
    assert v3 is not v1 and from_value(v3).data.shape == (5, 5)


def test_a_frame_passed_on_carries_each_attribute_once():
    """A decoded frame's attributes include its ``ColorMode``; republished (``Infer:Phase`` passes
    them on) the NTNDArray holds one ``ColorMode``, the frame's, not a second one beside it."""
    from ptychopv.io.ntndarray import NTNDArrayWriter

    frame = from_value(to_value(np.ones((4, 4), np.uint16), 1, attributes={"ColorMode": 2, "PositionX": 1.5}))
    assert frame.attributes == {"ColorMode": 2, "PositionX": 1.5}
    attrs = {**frame.attributes, "PositionY": -0.5}
    w = NTNDArrayWriter()
    for v in (to_value(frame.data, 2, attributes=attrs), w.value(frame.data, 2, attributes=attrs),
              w.value(frame.data, 3, attributes=attrs)):     # built anew, then updated in place
        names = [a["name"] for a in v["attribute"]]
        assert names == ["ColorMode", "PositionX", "PositionY"], names
        assert from_value(v).attributes == {"ColorMode": 2, "PositionX": 1.5, "PositionY": -0.5}
        assert [a["descriptor"] for a in v["attribute"]] == ["Color mode", "", ""]


def test_a_stitched_image_survives_publishing_as_an_ntndarray():
    """What the IOC posts on ``Stitch:Image`` / ``Refine:Image`` reads back as the image it was:
    phase, NaN where nothing was placed (weight 0 there), origin and pixel size."""
    from ptychopv.ioc.images import image_attributes, stitched_image
    from ptychopv.science.stitching import StitchedImage

    rng = np.random.default_rng(3)
    phase = rng.normal(size=(6, 9)).astype(np.float32)
    phase[:, :2] = np.nan                                     # not covered
    img = StitchedImage(phase, np.isfinite(phase).astype(np.float32), (-1.25e-6, 3.5e-7), 5.87e-8)
    back = stitched_image(from_value(to_value(img.phase, 7, attributes={**image_attributes(img), "ModelVersion": 2})))
    np.testing.assert_array_equal(back.phase, img.phase)      # NaN in the same places
    np.testing.assert_array_equal(back.weight, img.weight)
    assert back.origin_m == img.origin_m and back.pixel_size_m == img.pixel_size_m
    with pytest.raises(ValueError, match="no PixelSize, OriginX, OriginY attribute"):  # one that does not say where it lies
        stitched_image(from_value(to_value(img.phase, 8)))


@pytest.mark.parametrize("codec", ["lz4", "zlib", "blosc", "bslz4"])
def test_sizes_that_disagree_are_refused_before_anything_is_allocated(codec):
    """The decoders trusted uncompressedSize (and blosc's, bslz4's own headers) and compared the
    result with the dimensions only afterwards: a 400 kB payload claiming 4x4 inflated to 400 MB on
    the thread that takes the detector's frames. A zero-size dimension decoded to an empty frame
    that stopped a capture at its first frame."""
    import resource

    big = np.zeros((10240, 10240), np.uint16)              # 200 MB of zeros: a tiny payload
    v = to_value(big, 1, codec=codec)
    v.dimension = [{"size": 4}, {"size": 4}]
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(CodecError, match="uncompressedSize"):
        from_value(v)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 100_000     # kB: not 200 MB
    w = to_value(np.zeros((4, 4), np.uint16), 1, codec=codec)
    w.dimension = [{"size": 4}, {"size": 0}]
    with pytest.raises(CodecError, match="must all be positive"):
        from_value(w)
    u = to_value(np.zeros((4, 4), np.uint16), 1, codec=codec)
    u.uncompressedSize = 10**12                             # a header that asks for a terabyte
    with pytest.raises(CodecError, match="uncompressedSize"):
        from_value(u)


def test_a_small_jpeg_whose_header_claims_a_huge_image_is_refused_before_it_is_decoded():
    """A 4x4 uint8 NTNDArray whose jpeg payload (1 kB: a truncated JPEG) says 8000x8000 in its
    own header: libjpeg decoded all of it (64 MB, 0.4 s; a header may say 65535x65535x3, 13 GB)
    on the thread that takes the detector's frames, before the size was compared."""
    v = to_value(np.zeros((4, 4), np.uint8), 1, codec="jpeg")
    bomb = bytes(imagecodecs.jpeg8_encode(np.zeros((8000, 8000), np.uint8), level=90)[:1000])
    v["value"] = ("ubyteValue", np.frombuffer(bomb, np.uint8))
    v["compressedSize"] = len(bomb)
    tracemalloc.start()
    try:
        with pytest.raises(CodecError):
            from_value(v)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 * 2**20, f"{peak / 2**20:.0f} MiB allocated to refuse a 4x4 frame"
