"""OpenAI error objects, and the HTTP status of each router status."""

from __future__ import annotations

from typing import Any

import grpc

from router.errors import RouterError

Code = grpc.StatusCode
# status code, OpenAI error type
_BY_CODE: dict[grpc.StatusCode, tuple[int, str]] = {
    Code.INVALID_ARGUMENT: (400, "invalid_request_error"),
    Code.NOT_FOUND: (404, "invalid_request_error"),
    Code.ALREADY_EXISTS: (409, "invalid_request_error"),
    Code.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    Code.UNAVAILABLE: (503, "service_unavailable"),
    Code.ABORTED: (503, "service_unavailable"),
    Code.DEADLINE_EXCEEDED: (504, "timeout"),
}
RETRY_AFTER_S = 1  # what 429 and 503 answers suggest: the queue and the worker pools change within seconds


class ApiError(Exception):
    """An error answer: HTTP status plus the OpenAI error object (`{"error": {message, type, param, code}}`)."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    @property
    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(RETRY_AFTER_S)} if self.status in (429, 503) else {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    @classmethod
    def from_router(cls, err: RouterError) -> ApiError:
        status, kind = _BY_CODE.get(err.code, (500, "internal_error"))
        return cls(status, err.reason, kind, code=err.code.name.lower())


def bad_request(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, param=param)
