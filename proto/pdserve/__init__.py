"""pdserve client SDK and the pdserve.v1 gRPC contract (generated code in `pdserve.v1`).

    from pdserve import Client
    with Client("127.0.0.1:50051", api_key="KEY") as c:  # api_key: default PDSERVE_API_KEY
        print(c.generate("Hello", max_tokens=8, temperature=0).text)
"""

from pdserve.aio import AsyncClient, AsyncGenerateStream
from pdserve.client import Client, GenerateStream
from pdserve.errors import (
    AbortedError,
    AlreadyExistsError,
    CancelledError,
    DeadlineExceededError,
    FailedPreconditionError,
    InternalError,
    InvalidArgumentError,
    NotFoundError,
    PdserveError,
    ResourceExhaustedError,
    UnauthenticatedError,
    UnavailableError,
    UnimplementedError,
)
from pdserve.types import GenerateDelta, GenerateResult, ServerInfo, Timing, TokenLogprobs, Usage

__version__ = "0.1.0"

__all__ = [
    "AbortedError", "AlreadyExistsError", "AsyncClient", "AsyncGenerateStream", "CancelledError", "Client",
    "DeadlineExceededError", "FailedPreconditionError", "GenerateDelta", "GenerateResult", "GenerateStream",
    "InternalError", "InvalidArgumentError", "NotFoundError", "PdserveError", "ResourceExhaustedError",
    "ServerInfo", "Timing", "TokenLogprobs", "UnauthenticatedError", "UnavailableError", "UnimplementedError",
    "Usage", "__version__",
]
