"""maskserve's thin client: httpx + numpy, torch optional; blocking, or for asyncio.

::

    from client import Client
    with Client("http://127.0.0.1:8000") as c:
        for batch in c.batches("wiki", batch_size=64, steps=1000):
            out = model(**batch.torch("cuda"))

    from client import AsyncClient
    async with AsyncClient("http://127.0.0.1:8000") as c:
        async for batch in c.job("pretrain"):
            out = model(**batch.torch("cuda"))
"""

from ._batch import AsyncBatchStream, Batch, BatchStream
from ._client import DEFAULT_URL, AsyncClient, Client
from ._jobs import AsyncJobStream, JobStream
from ._masking import mask_rate_schedule
from ._errors import (
    APIError,
    AuthenticationError,
    BadRequestError,
    ConflictError,
    CorpusError,
    GatewayError,
    JobConflict,
    GoneError,
    JobCancelled,
    MaskserveError,
    NotFoundError,
    PayloadTooLargeError,
    ProtocolError,
    OverloadedError,
    RequestTooLargeError,
    ServiceUnavailableError,
    TokenizerDirectoryError,
    TransportError,
    UnsupportedMediaTypeError,
)
from wire import CONTENT_TYPE, WireFormatError, decode, encode

__all__ = [
    "APIError",
    "AsyncBatchStream",
    "AsyncClient",
    "AsyncJobStream",
    "AuthenticationError",
    "BadRequestError",
    "Batch",
    "BatchStream",
    "CONTENT_TYPE",
    "Client",
    "ConflictError",
    "CorpusError",
    "DEFAULT_URL",
    "GatewayError",
    "GoneError",
    "JobCancelled",
    "JobConflict",
    "JobStream",
    "MaskserveError",
    "NotFoundError",
    "PayloadTooLargeError",
    "ProtocolError",
    "OverloadedError",
    "RequestTooLargeError",
    "ServiceUnavailableError",
    "TokenizerDirectoryError",
    "TransportError",
    "UnsupportedMediaTypeError",
    "WireFormatError",
    "decode",
    "encode",
    "mask_rate_schedule",
]
