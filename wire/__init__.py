"""The batch wire format: safetensors, written and read with numpy alone.

Shared by the service (which encodes batches) and the client (which decodes
them); it imports nothing of the project's and needs no HTTP library.

The format. A batch is one document, media type ``application/vnd.safetensors``:

- 8 bytes: ``N``, the header's length, an unsigned little-endian 64-bit integer;
- ``N`` bytes: the header, a UTF-8 JSON object, padded with spaces so that
  ``8 + N`` is a multiple of 8. Each key but one names an array and maps to
  ``{"dtype": D, "shape": [d0, ...], "data_offsets": [begin, end]}``, with ``D``
  one of BOOL, U8, I8, U16, I16, U32, I32, U64, I64, F16, F32, F64. The optional
  key ``__metadata__`` maps strings to strings;
- the data: each array's bytes, C order, little-endian, at ``begin..end`` (offsets
  counted from the data's start), ``end - begin`` being exactly the shape's
  element count times the dtype's size.

:func:`decode` returns arrays that share memory with the buffer (numpy and torch
read the token data without a copy), and raises :class:`WireFormatError` for a
buffer that breaks any of the rules above. docs/wire-format.md describes the
arrays a batch holds.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping

import numpy as np

CONTENT_TYPE = "application/vnd.safetensors"

# safetensors dtype names <-> numpy dtypes (always little-endian on the wire).
_TO_NUMPY: dict[str, np.dtype] = {
    "BOOL": np.dtype("bool"),
    "U8": np.dtype("<u1"),
    "I8": np.dtype("<i1"),
    "U16": np.dtype("<u2"),
    "I16": np.dtype("<i2"),
    "U32": np.dtype("<u4"),
    "I32": np.dtype("<i4"),
    "U64": np.dtype("<u8"),
    "I64": np.dtype("<i8"),
    "F16": np.dtype("<f2"),
    "F32": np.dtype("<f4"),
    "F64": np.dtype("<f8"),
}
_FROM_NUMPY: dict[np.dtype, str] = {v: k for k, v in _TO_NUMPY.items()}

_ALIGN = 8


class WireFormatError(ValueError):
    """The bytes are not a well-formed safetensors document."""


def encode(arrays: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None) -> bytes:
    """Serialize named arrays (C-contiguous after conversion) into one buffer."""
    return b"".join(encode_pieces(arrays, metadata))


def encode_pieces(
    arrays: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None
) -> list[bytes | memoryview]:
    """The document :func:`encode` returns, as its pieces in order, without copying the array data: the
    8-byte header length and the header, then each array's bytes (a view of the array itself when it is
    C-contiguous and little-endian, else of a converted copy). ``b"".join`` of them is ``encode``'s buffer."""
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    blobs: list[memoryview] = []
    offset = 0
    for name, arr in arrays.items():
        a = np.ascontiguousarray(arr).reshape(np.shape(arr))  # keeps 0-d arrays 0-d
        if a.dtype.byteorder == ">":
            a = a.astype(a.dtype.newbyteorder("<"))
        dtype = _FROM_NUMPY.get(a.dtype.newbyteorder("<") if a.dtype.byteorder == "=" else a.dtype)
        if dtype is None:
            raise TypeError(f"array {name!r} has dtype {a.dtype}, which has no safetensors name")
        header[name] = {"dtype": dtype, "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
        if a.nbytes:
            blobs.append(memoryview(a.reshape(-1).view(np.uint8)))
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-(len(head) + 8) % _ALIGN)
    return [struct.pack("<Q", len(head)) + head, *blobs]


def decode(buf: bytes | bytearray | memoryview) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Parse a safetensors buffer into arrays that share memory with ``buf``.

    Arrays are writable exactly when ``buf`` is (pass a ``bytearray`` to get
    writable arrays, e.g. for ``torch.from_numpy`` without a copy).
    """
    view = memoryview(buf).cast("B")
    if len(view) < 8:
        raise WireFormatError("buffer shorter than the 8-byte header length")
    (n,) = struct.unpack_from("<Q", view, 0)
    if 8 + n > len(view):
        raise WireFormatError(f"header length {n} runs past the end of a {len(view)}-byte buffer")
    try:
        header = json.loads(bytes(view[8 : 8 + n]))
    except ValueError as exc:
        raise WireFormatError(f"header is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise WireFormatError("header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise WireFormatError("__metadata__ must map strings to strings")
    data = view[8 + n :]
    arrays: dict[str, np.ndarray] = {}
    for name, spec in header.items():
        try:
            dtype = _TO_NUMPY[spec["dtype"]]
            shape = tuple(int(d) for d in spec["shape"])
            begin, end = (int(x) for x in spec["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise WireFormatError(f"bad header entry for {name!r}: {spec!r}") from None
        if any(d < 0 for d in shape):
            raise WireFormatError(f"array {name!r} has a negative dimension: {shape}")
        count = int(np.prod(shape, dtype=np.int64))
        if not 0 <= begin <= end <= len(data) or end - begin != count * dtype.itemsize:
            raise WireFormatError(f"array {name!r}: byte range {begin}..{end} does not fit shape {shape}")
        arrays[name] = np.frombuffer(data, dtype=dtype, count=count, offset=begin).reshape(shape)
    return arrays, metadata
