"""The router's one internal error type: a gRPC status and a reason for the client."""

from __future__ import annotations

import grpc


class RouterError(Exception):
    """Raised anywhere in the request path; the servicer turns it into the call's status."""

    def __init__(self, code: grpc.StatusCode, reason: str) -> None:
        super().__init__(f"{code.name}: {reason}")
        self.code = code
        self.reason = reason


def invalid(reason: str) -> RouterError:
    return RouterError(grpc.StatusCode.INVALID_ARGUMENT, reason)


def worker_error(err: grpc.aio.AioRpcError, what: str) -> RouterError:
    """Map a worker RPC failure to the client's status. `what` names the step and worker, e.g.
    "prefill on worker p0 (10.0.0.1:5000)"."""
    code, details = err.code(), err.details() or ""
    if code == grpc.StatusCode.UNAVAILABLE:
        return RouterError(code, f"{what} failed: worker unreachable ({details})")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return RouterError(code, f"{what} timed out ({details})")
    if code == grpc.StatusCode.ABORTED:
        return RouterError(code, f"{what} aborted, KV handoff failed: {details}")
    if code in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.INVALID_ARGUMENT,
                grpc.StatusCode.ALREADY_EXISTS):
        return RouterError(code, f"{what}: {details}")
    if code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION,  # e.g. the lease expired,
                grpc.StatusCode.PERMISSION_DENIED):  # or the decode worker left the registry since the pick
        return RouterError(grpc.StatusCode.ABORTED, f"{what}: {details}")
    if code == grpc.StatusCode.CANCELLED:
        return RouterError(grpc.StatusCode.ABORTED, f"{what} was cancelled by the worker: {details}")
    return RouterError(grpc.StatusCode.INTERNAL, f"{what} failed with {code.name}: {details}")
