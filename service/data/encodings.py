"""Compressed request bodies: ``Content-Encoding: gzip`` or ``zstd``, decoded as they arrive.

Decoding is CPU work, so it runs in worker threads: the body becomes a blocking file
(:class:`streams.BlockingBody`) that the decompressor pulls from, and each worker-thread call
(:func:`streams.pulled`) returns at most :data:`PIECE` decoded bytes. A decompression bomb therefore
costs one piece at a time, and the caller's limit on the decoded bytes (``ingest.limited``) stops it
after at most one piece past that limit.

gzip may hold several members and zstd several frames (and skippable frames), as ``cat a.gz b.gz`` and
``zstd`` with ``--long`` or multithreading write them. A body cut short must not pass for a shorter corpus:
``gzip`` says so itself, but zstd's stream reader ends quietly mid-frame, so :class:`ZstdFraming` walks the
frame and block headers of the bytes it reads (cheap: it skips block contents) to tell a whole stream
from a truncated one.
"""

from __future__ import annotations

import gzip
import io
import zlib
from collections.abc import AsyncIterator

import zstandard

from ..core.errors import CorruptBody
from .streams import BlockingBody, pulled

#: the Content-Encodings an ingest body may have
ENCODINGS = ("gzip", "zstd", "identity")
#: other names of the same encodings (RFC 9110, 8.4.1.3: x-gzip is gzip)
ALIASES = {"x-gzip": "gzip"}
#: decoded bytes returned per worker-thread call: the most a decoder holds at once
PIECE = 1 << 20

_ZSTD_MAGIC = 0xFD2FB528
_SKIPPABLE_MAGIC = 0x184D2A50  # the high 28 bits of a skippable frame's magic number


class FramingError(ValueError):
    """Bytes that are not a zstd frame where one should start, or a reserved block type."""


class ZstdFraming:
    """Where a zstd stream stands: between frames, or inside one (RFC 8878, section 3.1).

    Fed every byte the decompressor reads, it reads only the headers: magic number, frame header, each
    block's 3-byte header, the optional checksum; block contents are counted past, not looked at."""

    def __init__(self) -> None:
        self._state = "magic"
        self._need = 4  # header bytes the state waits for
        self._head = bytearray()
        self._skip = 0  # content bytes to pass over before the next header
        self._checksum = False

    @property
    def between_frames(self) -> bool:
        """Whether the bytes so far end where a frame ended (or before the first one)."""
        return self._state == "magic" and not self._head and not self._skip

    def feed(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        pos, end = 0, len(view)
        while pos < end:
            if self._skip:
                n = min(self._skip, end - pos)
                self._skip -= n
                pos += n
                continue
            n = min(self._need - len(self._head), end - pos)
            self._head += view[pos : pos + n]
            pos += n
            if len(self._head) == self._need:
                head = bytes(self._head)
                self._head.clear()
                self._advance(head)

    def _advance(self, head: bytes) -> None:
        value = int.from_bytes(head, "little")
        if self._state == "magic":
            if value == _ZSTD_MAGIC:
                self._expect("descriptor", 1)
            elif value & 0xFFFFFFF0 == _SKIPPABLE_MAGIC:
                self._expect("skippable", 4)
            else:
                raise FramingError(f"no zstd frame starts with {head.hex()}")
        elif self._state == "skippable":
            self._skip = value
            self._expect("magic", 4)
        elif self._state == "descriptor":
            fcs, single = value >> 6, (value >> 5) & 1
            self._checksum = bool(value & 0b100)
            rest = (0 if single else 1) + (0, 1, 2, 4)[value & 0b11] + ((single, 2, 4, 8)[fcs])
            if rest:
                self._expect("header", rest)
            else:
                self._expect("block", 3)
        elif self._state == "header":
            self._expect("block", 3)
        elif self._state == "block":
            kind, size = (value >> 1) & 0b11, value >> 3
            if kind == 3:
                raise FramingError("a block of the reserved type")
            self._skip = 1 if kind == 1 else size  # an RLE block holds one byte
            if not value & 1:
                self._expect("block", 3)
            elif self._checksum:
                self._expect("checksum", 4)
            else:
                self._expect("magic", 4)
        else:  # checksum
            self._expect("magic", 4)

    def _expect(self, state: str, need: int) -> None:
        self._state, self._need = state, need


class _Watched(io.RawIOBase):
    """A raw file read through, its bytes shown to a :class:`ZstdFraming` on the way."""

    def __init__(self, raw: io.RawIOBase, framing: ZstdFraming) -> None:
        super().__init__()
        self._raw = raw
        self._framing = framing

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:  # noqa: ANN001 - any writable buffer
        n = self._raw.readinto(buf)
        self._framing.feed(memoryview(buf)[:n])
        return n


# what a damaged or truncated stream raises: zlib's errors, gzip's header and CRC checks, gzip's
# "ended before the end-of-stream marker", zstd's errors, the framing's
_CORRUPT = (zlib.error, gzip.BadGzipFile, EOFError, zstandard.ZstdError, FramingError)


class Decoder:
    """One body's decoder, read :data:`PIECE` bytes at a time by :meth:`step` in a worker thread (the
    reader pulls the body through :class:`BlockingBody`; nothing is read until the first step)."""

    def __init__(self, body: AsyncIterator[bytes], encoding: str) -> None:
        raw = BlockingBody(body)
        self.encoding = encoding
        self._framing: ZstdFraming | None = None
        self._reader: io.BufferedIOBase | zstandard.ZstdDecompressionReader
        if encoding == "gzip":
            self._reader = gzip.GzipFile(fileobj=raw, mode="rb")  # every member, one after the other
        else:
            self._framing = ZstdFraming()
            self._reader = zstandard.ZstdDecompressor().stream_reader(
                _Watched(raw, self._framing), read_across_frames=True
            )
        self._done = False

    def step(self) -> bytes | None:
        """The next decoded piece; None at the end of a whole stream."""
        if self._done:
            return None
        try:
            piece = self._reader.read(PIECE)
        except _CORRUPT as exc:
            raise CorruptBody(f"the {self.encoding} body does not decode: {exc}") from None
        if piece:
            return piece
        self._done = True
        if self._framing is not None and not self._framing.between_frames:
            raise CorruptBody("the zstd body ends inside a frame: it was cut short")
        return None


def decoded(body: AsyncIterator[bytes], encoding: str) -> AsyncIterator[bytes]:
    """The body decoded as it arrives (``encoding``: one of :data:`ENCODINGS`), a piece per worker-thread
    call; a damaged or truncated stream raises :class:`CorruptBody`."""
    if encoding == "identity":
        return body
    decoder = Decoder(body, encoding)
    return pulled(decoder.step)
