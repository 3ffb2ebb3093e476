"""Lazy access to the standard gRPC health-check stubs (package grpcio-health-checking)."""

from __future__ import annotations

from types import ModuleType

import grpc

from pdserve.errors import FailedPreconditionError


def health_modules() -> tuple[ModuleType, ModuleType]:
    """grpc_health's health_pb2 and health_pb2_grpc, imported on first use so that `import pdserve` needs
    only grpcio and protobuf. The package must match grpcio's version (its stubs refuse an older grpcio)."""
    try:
        from grpc_health.v1 import health_pb2, health_pb2_grpc
    except ImportError as exc:
        raise FailedPreconditionError(
            f"health checks need grpcio-health-checking=={grpc.__version__} ({exc})") from None
    except RuntimeError as exc:  # version guard of the generated stubs
        raise FailedPreconditionError(f"grpcio-health-checking does not match grpcio: {exc}") from None
    return health_pb2, health_pb2_grpc
