"""wire/: the safetensors encoder/decoder shared by service and client."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import safetensors.numpy
import safetensors.torch

from wire import WireFormatError, decode, encode

DTYPES = ["bool", "u1", "i1", "<u2", "<i2", "<u4", "<i4", "<u8", "<i8", "<f2", "<f4", "<f8"]
SHAPES = [(0,), (3, 0), (0, 4, 2), (1,), (7,), (2, 3), (2, 3, 4)]


def sample(dtype: str, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    dt = np.dtype(dtype)
    if dt.kind == "b":
        out = rng.random(shape) < 0.5
    elif dt.kind in "iu":
        info = np.iinfo(dt)
        out = rng.integers(info.min, info.max, size=shape, dtype=dt, endpoint=True)
    else:
        out = rng.standard_normal(shape) * 1000
    return np.asarray(out, dtype=dt)  # a 0-d array, not a numpy scalar, for shape ()


def mixed_arrays() -> dict[str, np.ndarray]:
    return {f"a_{np.dtype(d).name}_{len(s)}_{k}": sample(d, s, k) for k, (d, s) in
            enumerate((d, s) for d in DTYPES for s in [(0,), (1,), (3, 5)])}  # fmt: skip


def assert_same(a: np.ndarray, b: np.ndarray) -> None:
    assert a.shape == b.shape, (a.shape, b.shape)
    assert a.dtype.newbyteorder("<") == b.dtype.newbyteorder("<") or a.dtype == b.dtype, (a.dtype, b.dtype)
    np.testing.assert_array_equal(a, b)


def build(header: dict, data: bytes = b"", header_len: int | None = None) -> bytes:
    head = json.dumps(header).encode()
    return struct.pack("<Q", len(head) if header_len is None else header_len) + head + data


# ---- round trip ------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_round_trip_every_dtype_and_shape(dtype, shape):
    a = sample(dtype, shape, seed=len(shape))
    arrays, meta = decode(encode({"x": a}))
    assert set(arrays) == {"x"} and meta == {}
    assert_same(arrays["x"], a)


def test_round_trip_zero_dim_arrays():
    """A 0-d array (shape ()) keeps its shape; safetensors has shape [] for it."""
    arrays = {f"s_{np.dtype(d).name}": sample(d, (), k) for k, d in enumerate(DTYPES)}
    assert all(a.shape == () for a in arrays.values())
    buf = encode(arrays)
    out, _ = decode(buf)
    for k, a in arrays.items():
        assert_same(out[k], a)
    (n,) = struct.unpack_from("<Q", buf, 0)
    assert all(e["shape"] == [] for e in json.loads(buf[8 : 8 + n]).values())


def test_zero_dim_arrays_interoperate_with_official_library():
    a = np.asarray(42, dtype=np.int32)
    assert safetensors.numpy.load(encode({"a": a}))["a"].shape == ()
    out, _ = decode(safetensors.numpy.save({"a": a}))
    assert out["a"].shape == () and out["a"] == 42


def test_round_trip_many_arrays_with_metadata():
    arrays = mixed_arrays()
    meta = {"dataset": "wiki", "seed": "18446744073709551615", "empty": "", "ünï": "çødé"}
    out, got_meta = decode(encode(arrays, meta))
    assert got_meta == meta
    assert list(out) == list(arrays)
    for k in arrays:
        assert_same(out[k], arrays[k])


def test_metadata_values_become_strings():
    _, meta = decode(encode({"x": np.zeros(2, np.int32)}, {"epoch": 3, "p": 0.15}))
    assert meta == {"epoch": "3", "p": "0.15"}


def test_no_arrays():
    arrays, meta = decode(encode({}))
    assert arrays == {} and meta == {}
    arrays, meta = decode(encode({}, {"k": "v"}))
    assert arrays == {} and meta == {"k": "v"}


def test_non_contiguous_fortran_and_big_endian_inputs():
    base = np.arange(60, dtype=np.int32).reshape(6, 10)
    strided = base[::2, 1::3]
    fortran = np.asfortranarray(base)
    big = base.astype(">i4")
    big_f = np.arange(5, dtype=">f8") / 3
    out, _ = decode(encode({"s": strided, "f": fortran, "b": big, "bf": big_f}))
    assert_same(out["s"], strided)
    assert_same(out["f"], base)
    np.testing.assert_array_equal(out["b"], base)
    assert out["b"].dtype == np.dtype("<i4")
    np.testing.assert_array_equal(out["bf"], big_f)


def test_bytes_are_little_endian_and_data_aligned():
    buf = encode({"x": np.array([1, 2], dtype=np.int32)}, {"m": "v"})
    (n,) = struct.unpack_from("<Q", buf, 0)
    assert (8 + n) % 8 == 0, "data section should start 8-byte aligned"
    header = json.loads(buf[8 : 8 + n])
    assert header["x"] == {"dtype": "I32", "shape": [2], "data_offsets": [0, 8]}
    assert buf[8 + n :] == b"\x01\x00\x00\x00\x02\x00\x00\x00"


def test_unsupported_dtype_rejected():
    with pytest.raises(TypeError):
        encode({"x": np.array(["a", "b"])})
    with pytest.raises(TypeError):
        encode({"x": np.zeros(2, dtype=np.complex64)})


# ---- interoperability with the official library ----------------------------


def test_official_numpy_reads_ours():
    arrays = mixed_arrays()
    loaded = safetensors.numpy.load(encode(arrays, {"a": "b"}))
    assert set(loaded) == set(arrays)
    for k, a in arrays.items():
        assert_same(loaded[k], a)


def test_official_torch_reads_ours():
    arrays = mixed_arrays()
    loaded = safetensors.torch.load(encode(arrays))
    assert set(loaded) == set(arrays)
    for k, a in arrays.items():
        t = loaded[k]
        assert tuple(t.shape) == a.shape
        np.testing.assert_array_equal(t.numpy(), a)


def test_ours_reads_official_numpy():
    arrays = mixed_arrays()
    buf = safetensors.numpy.save(arrays, metadata={"dataset": "d", "seed": "7"})
    out, meta = decode(buf)
    assert meta == {"dataset": "d", "seed": "7"}
    assert set(out) == set(arrays)
    for k, a in arrays.items():
        assert_same(out[k], a)


def test_ours_reads_official_torch():
    import torch

    tensors = {"ids": torch.arange(12, dtype=torch.int32).reshape(3, 4), "m": torch.ones(3, 4, dtype=torch.uint8),
               "f": torch.linspace(0, 1, 5, dtype=torch.float16), "e": torch.zeros(0, 2, dtype=torch.int64)}  # fmt: skip
    out, _ = decode(safetensors.torch.save(tensors))
    for k, t in tensors.items():
        np.testing.assert_array_equal(out[k], t.numpy())
        assert out[k].shape == tuple(t.shape)


# ---- memory sharing --------------------------------------------------------


def test_bytearray_decodes_to_writable_views():
    a = np.arange(10, dtype=np.int32)
    buf = bytearray(encode({"a": a, "b": np.ones((2, 2), np.uint8)}))
    out, _ = decode(buf)
    raw = np.frombuffer(buf, dtype=np.uint8)
    for arr in out.values():
        assert arr.flags.writeable
        assert np.shares_memory(arr, raw)
    # modifying the buffer changes the array ...
    offset = len(buf) - a.nbytes - 4  # "a" comes first, then 4 bytes of "b"
    buf[offset : offset + 4] = struct.pack("<i", -7)
    assert out["a"][0] == -7
    # ... and writing the array writes the buffer
    out["b"][1, 1] = 200
    assert buf[-1] == 200


def test_bytes_decode_to_read_only_views():
    data = encode({"a": np.arange(4, dtype=np.int64)})
    out, _ = decode(data)
    assert not out["a"].flags.writeable
    with pytest.raises(ValueError):
        out["a"][0] = 1
    assert np.shares_memory(out["a"], np.frombuffer(data, dtype=np.uint8))


def test_memoryview_input_shares_memory():
    buf = bytearray(encode({"a": np.arange(3, dtype=np.uint16)}))
    out, _ = decode(memoryview(buf))
    out["a"][2] = 9
    assert decode(bytes(buf))[0]["a"][2] == 9


# ---- malformed buffers -----------------------------------------------------

GOOD_ENTRY = {"dtype": "I32", "shape": [2], "data_offsets": [0, 8]}


@pytest.mark.parametrize(
    "buf",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"\x05\x00\x00", id="short"),
        pytest.param(build({"a": GOOD_ENTRY}, bytes(8), header_len=10**6), id="header-length-past-end"),
        pytest.param(build({"a": GOOD_ENTRY}, bytes(8), header_len=(1 << 64) - 1), id="header-length-huge"),
        pytest.param(struct.pack("<Q", 5) + b"{bad}" + bytes(8), id="bad-json"),
        pytest.param(struct.pack("<Q", 3) + b"\xff\xfe{" + bytes(8), id="header-not-utf8"),
        pytest.param(build([1, 2]), id="header-not-object"),
        pytest.param(build({"a": {"dtype": "I32", "shape": [2], "data_offsets": [0, 16]}}, bytes(8)), id="end-past-data"),
        pytest.param(build({"a": {"dtype": "I32", "shape": [2], "data_offsets": [8, 0]}}, bytes(8)), id="begin-after-end"),
        pytest.param(build({"a": {"dtype": "I32", "shape": [1], "data_offsets": [-4, 0]}}, bytes(8)), id="negative-offset"),
        pytest.param(build({"a": {"dtype": "I32", "shape": [3], "data_offsets": [0, 8]}}, bytes(8)), id="size-mismatch"),
        pytest.param(build({"a": {"dtype": "X9", "shape": [2], "data_offsets": [0, 8]}}, bytes(8)), id="unknown-dtype"),
        pytest.param(build({"a": {"shape": [2], "data_offsets": [0, 8]}}, bytes(8)), id="missing-dtype"),
        pytest.param(build({"a": {"dtype": "I32", "shape": [2]}}, bytes(8)), id="missing-offsets"),
        pytest.param(build({"a": {"dtype": "I32", "shape": [2], "data_offsets": [0]}}, bytes(8)), id="one-offset"),
        pytest.param(build({"a": "I32"}, bytes(8)), id="entry-not-object"),
        pytest.param(build({"a": {"dtype": "I32", "shape": [-1, -4], "data_offsets": [0, 16]}}, bytes(16)),
                     id="negative-dims"),  # fmt: skip
        pytest.param(build({"a": {"dtype": "I32", "shape": [-2, -2], "data_offsets": [0, 16]}}, bytes(16)),
                     id="negative-dims-square"),  # fmt: skip
        pytest.param(build({"__metadata__": "not-a-map", "a": GOOD_ENTRY}, bytes(8)), id="metadata-not-object"),
    ],
)
def test_malformed_buffers_raise_wire_format_error(buf):
    with pytest.raises(WireFormatError):
        decode(buf)


def test_wire_format_error_is_a_value_error():
    assert issubclass(WireFormatError, ValueError)


def test_truncated_valid_buffer_raises():
    buf = encode({"a": np.arange(100, dtype=np.int64)})
    for cut in (4, 8, 20, len(buf) - 1):
        with pytest.raises(WireFormatError):
            decode(buf[:cut])
