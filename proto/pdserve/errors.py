"""Typed errors of the pdserve SDK: one class per gRPC status, each with `.code` and `.reason`."""

from __future__ import annotations

import grpc


class PdserveError(Exception):
    """A failed pdserve call. `code` is the gRPC status, `reason` the server's (or client's) explanation."""

    default_code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, reason: str, code: grpc.StatusCode | None = None) -> None:
        self.code: grpc.StatusCode = code or self.default_code
        self.reason = reason
        super().__init__(f"{self.code.name}: {reason}")


class InvalidArgumentError(PdserveError):
    """The request is malformed: empty or too long prompt, bad sampling values, unknown model..."""

    default_code = grpc.StatusCode.INVALID_ARGUMENT


class ResourceExhaustedError(PdserveError):
    """The cluster is full: the router's queue, or no decode worker has room for the KV cache."""

    default_code = grpc.StatusCode.RESOURCE_EXHAUSTED


class UnavailableError(PdserveError):
    """The router, or a worker it needs, cannot be reached (or no workers are registered)."""

    default_code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceededError(PdserveError):
    """The call's deadline passed, or a worker did not answer in time."""

    default_code = grpc.StatusCode.DEADLINE_EXCEEDED


class CancelledError(PdserveError):
    """The call was cancelled."""

    default_code = grpc.StatusCode.CANCELLED


class AbortedError(PdserveError):
    """The request was aborted mid-way, e.g. the KV handoff between the workers failed."""

    default_code = grpc.StatusCode.ABORTED


class AlreadyExistsError(PdserveError):
    """A request with the same request_id is already in flight."""

    default_code = grpc.StatusCode.ALREADY_EXISTS


class NotFoundError(PdserveError):
    default_code = grpc.StatusCode.NOT_FOUND


class FailedPreconditionError(PdserveError):
    default_code = grpc.StatusCode.FAILED_PRECONDITION


class UnimplementedError(PdserveError):
    default_code = grpc.StatusCode.UNIMPLEMENTED


class InternalError(PdserveError):
    default_code = grpc.StatusCode.INTERNAL


class UnauthenticatedError(PdserveError):
    """No API key, or a wrong one."""

    default_code = grpc.StatusCode.UNAUTHENTICATED


_BY_CODE: dict[grpc.StatusCode, type[PdserveError]] = {
    cls.default_code: cls
    for cls in (InvalidArgumentError, ResourceExhaustedError, UnavailableError, DeadlineExceededError,
                CancelledError, AbortedError, AlreadyExistsError, NotFoundError, FailedPreconditionError,
                UnimplementedError, InternalError, UnauthenticatedError)
}


def error_for(code: grpc.StatusCode, reason: str) -> PdserveError:
    """The typed exception for a status code (PdserveError itself for codes without a subclass)."""
    return _BY_CODE.get(code, PdserveError)(reason, code)


def from_rpc_error(err: grpc.RpcError) -> PdserveError:
    """Convert a grpc.RpcError (sync or aio) into the matching typed exception."""
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    details = err.details() if hasattr(err, "details") else str(err)
    return error_for(code or grpc.StatusCode.UNKNOWN, details or (code.name if code else "unknown error"))

