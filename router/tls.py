"""TLS for the router's public ports, from `RouterConfig.tls_cert/tls_key[/tls_client_ca]` (PEM files):
grpc server credentials and the aiohttp SSL context; with a client CA, mutual TLS (a client certificate
signed by it is required)."""

from __future__ import annotations

import ssl
from pathlib import Path

import grpc

from router.config import RouterConfig


def grpc_credentials(config: RouterConfig) -> grpc.ServerCredentials | None:
    if config.tls_cert is None or config.tls_key is None:
        return None
    ca = Path(config.tls_client_ca).read_bytes() if config.tls_client_ca else None
    return grpc.ssl_server_credentials([(Path(config.tls_key).read_bytes(), Path(config.tls_cert).read_bytes())],
                                       root_certificates=ca, require_client_auth=ca is not None)


def http_ssl_context(config: RouterConfig) -> ssl.SSLContext | None:
    if config.tls_cert is None or config.tls_key is None:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(config.tls_cert, config.tls_key)
    if config.tls_client_ca:
        ctx.load_verify_locations(config.tls_client_ca)
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx
