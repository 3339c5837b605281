"""Batch bodies: rendered off the event loop into pieces of bounded size, sent one piece at a time.

A batch of the largest size is tens of megabytes (B x L x about 9 bytes as
safetensors, 13 as JSON). Rendered as one buffer and handed to the server in
one message, it costs a copy or two of that size while the GIL is held, one
write of that size on the event loop, and it leaves the process the moment it
is handed over, so nothing bounds how many such bodies wait for slow clients.
So:

* a safetensors body is not copied into one buffer: its pieces are the header
  and views of the arrays themselves (``wire.encode_pieces``);
* a JSON body is encoded a block of rows at a time: the encoder holds the GIL
  for one whole call, so no call gets more than a piece's worth of numbers;
* both are cut into pieces of at most ``MASKSERVE_RESPONSE_PIECE_BYTES`` (short
  consecutive pieces joined, so a small body is one message), and
  :class:`Pieces` sends them one after the other, each once the one before has
  drained to the client (the server's flow control), the loop serving every
  other request in between;
* the request holds its body's bytes against ``MASKSERVE_MAX_INFLIGHT_BYTES``
  (:func:`hold_body`, before it reads its batch) until the last piece is sent.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

import numpy as np
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from wire import encode_pieces

from ..core.work import admission
from ..data.catalog import DatasetRuntime
from .params import OutputParams

Piece = bytes | memoryview

# a number of a JSON body takes 2 to 12 bytes ("0," .. "-2147483648,"): this many per encoder call stay near a
# piece, and at most _JSON_NUMBERS_PER_CALL (a millisecond or two of the GIL)
_JSON_BYTES_PER_NUMBER = 8
_JSON_NUMBERS_PER_CALL = 8192


def render(
    arrays: Mapping[str, np.ndarray], meta: Mapping[str, object], as_json: bool, piece_bytes: int
) -> list[Piece]:
    """A batch's body as pieces of at most ``piece_bytes`` (CPU work: run it on the pool)."""
    if as_json:
        numbers = max(1, min(_JSON_NUMBERS_PER_CALL, piece_bytes // _JSON_BYTES_PER_NUMBER))
        return sliced(json_pieces(arrays, meta, numbers), piece_bytes)
    return sliced(encode_pieces(arrays, {k: str(v) for k, v in meta.items()}), piece_bytes)


def json_pieces(arrays: Mapping[str, np.ndarray], meta: Mapping[str, object], numbers: int) -> list[bytes]:
    """``{"metadata": meta, name: array as nested lists, ...}`` in pieces, each encoded by one call of at most
    ``numbers`` numbers (or one row of a 2-D array, if longer)."""
    out = [b'{"metadata":' + json.dumps(meta, separators=(",", ":")).encode()]
    for name, a in arrays.items():
        out.append(b"," + json.dumps(name).encode() + b":")
        if a.ndim == 0 or len(a) == 0:
            out.append(json.dumps(a.tolist(), separators=(",", ":")).encode())
            continue
        step = max(1, numbers // max(1, a[0].size))
        for first in range(0, len(a), step):
            rows = json.dumps(a[first : first + step].tolist(), separators=(",", ":"))[1:-1]
            out.append(("[" if first == 0 else ",").encode() + rows.encode())
        out.append(b"]")
    out.append(b"}")
    return out


def sliced(pieces: list[Piece], size: int) -> list[Piece]:
    """``pieces`` as pieces of at most ``size`` bytes, as few as that allows without copying a long one: one
    longer than ``size`` is cut into views, and consecutive shorter ones are joined while they fit together
    (each piece is a message through the app's send path and a write by the server: about 30 us of the
    event loop for a small body's five arrays, against a copy of a few microseconds)."""
    out: list[Piece] = []
    run: list[Piece] = []  # consecutive short pieces, joined once the next would not fit
    held = 0
    for piece in pieces:
        n = len(piece)
        if run and held + n > size:
            out.append(run[0] if len(run) == 1 else b"".join(run))
            run, held = [], 0
        if n <= size:
            run.append(piece)
            held += n
            continue
        view = memoryview(piece).cast("B")
        out.extend(view[i : i + size] for i in range(0, len(view), size))
    if run:
        out.append(run[0] if len(run) == 1 else b"".join(run))
    return out


def body_bytes(b: int, rt: DatasetRuntime, out: OutputParams, as_json: bool) -> int:
    """About how many bytes a batch of ``b`` rows of ``rt`` holds from its fetch until it is sent: its body
    (dense labels assumed) and the stored tokens it is read from."""
    if as_json:
        digits = max(4, len(str(len(rt.vocab.is_special) - 1))) + 1  # an id, or -100, and its comma
        per_token = 2 * digits + 2 + (2 if out.special_tokens_mask else 0)
        per_row = 21
    else:
        per_token = 9 + (1 if out.special_tokens_mask else 0)
        per_row = 8
    per_token += rt.id_dtype.itemsize + 1  # the fetched ids and their word starts
    return b * (rt.seq_len * per_token + per_row)


def hold_body(request: Request, b: int, rt: DatasetRuntime, out: OutputParams, as_json: bool) -> None:
    """Count the body of a ``b``-row batch against the process's byte limit before reading it (``Overloaded``
    when the process holds too many; see ``work.Admission.hold``)."""
    held = admission(request.scope)
    if held is not None:
        held.hold(body_bytes(b, rt, out, as_json))


class Pieces(Response):
    """A rendered body (see :func:`render`) sent a piece at a time; while it is sent, the request holds exactly
    its bytes (in place of the estimate it held while the batch was built)."""

    def __init__(self, pieces: list[Piece], *, media_type: str, headers: Mapping[str, str]) -> None:
        self.pieces = pieces
        self.nbytes = sum(len(p) for p in pieces)
        super().__init__(None, media_type=media_type, headers={**headers, "Content-Length": str(self.nbytes)})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        held = admission(scope)
        if held is not None:
            held.hold(self.nbytes, check=False)
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        last = len(self.pieces) - 1
        for i, piece in enumerate(self.pieces):
            await send({"type": "http.response.body", "body": piece, "more_body": i < last})
        if not self.pieces:
            await send({"type": "http.response.body", "body": b"", "more_body": False})
